"""`ema_sgd(lr, b)` takes the same steps as `torch.optim.SGD(lr=lr*(1-b), momentum=b)`.

torch is not a dependency of the project; this test runs only where it is installed.
"""

import jax
import numpy as np
import pytest

import ema_momentum as emm

# Older jax has no jax.enable_x64, only jax.experimental.enable_x64.
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:
    from jax.experimental import enable_x64

torch = pytest.importorskip("torch")


# torch refuses Nesterov without momentum, so (0.0, True) is not a case.
@pytest.mark.parametrize(
    ("beta", "nesterov"), [(0.0, False), (0.9, False), (0.9, True), (0.99, True)]
)
def test_matches_torch_sgd(beta, nesterov):
    lr, steps = 0.05, 100
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(4, 3))
    grads = rng.normal(size=(steps, 4, 3))

    p = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr * (1 - beta), momentum=beta, nesterov=nesterov)
    theirs = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        theirs.append(p.detach().numpy().copy())

    with enable_x64(True):
        tx = emm.ema_sgd(lr, beta, nesterov=nesterov)
        theta = jax.numpy.asarray(theta0)
        state = tx.init(theta)
        ours = []
        for g in grads:
            updates, state = tx.update(jax.numpy.asarray(g), state, theta)
            theta = theta + updates
            ours.append(np.asarray(theta))
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
