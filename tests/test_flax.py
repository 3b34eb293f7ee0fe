"""`ema_sgd` as the optimizer of Flax NNX and Flax Linen training loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_momentum as emm

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
train_state = pytest.importorskip("flax.training.train_state")
serialization = pytest.importorskip("flax.serialization")

STEPS = 300


def regression_data() -> tuple[jax.Array, jax.Array]:
    """A smooth 4 -> 1 regression problem that a 32-unit MLP fits closely."""
    x = jax.random.normal(jax.random.key(0), (128, 4))
    y = jnp.sin(x @ jnp.array([1.0, -0.5, 0.25, 0.8]))[:, None]
    return x, y


def mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((pred - y) ** 2)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return linen.Dense(1)(jnp.tanh(linen.Dense(32)(x)))


def test_nnx_optimizer_trains_to_low_loss():
    x, y = regression_data()
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, emm.ema_sgd(1.0, beta=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    # cached_partial skips re-walking the module graph on every call.
    step = nnx.cached_partial(train_step, model, optimizer)
    first = float(step(x, y))
    for _ in range(STEPS - 1):
        step(x, y)
    final = float(mse(model(x), y))

    assert final < first / 100
    # The transform's own state lives inside the NNX optimizer and counts steps.
    counts = [leaf for leaf in jax.tree.leaves(nnx.state(optimizer)) if leaf.dtype == jnp.int32]
    assert STEPS in [int(c) for c in counts]


def test_nnx_optimizer_matches_plain_optax_loop():
    """NNX adds no arithmetic of its own: the same steps as a hand-written loop."""
    x, y = regression_data()
    model = NnxMLP(nnx.Rngs(0))
    # A second, identically initialized model: NNX state shares the model's variables.
    graphdef, params = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)
    tx = emm.ema_sgd(0.2, beta=0.9)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        grads = nnx.grad(lambda m: mse(m(x), y))(model)
        optimizer.update(model, grads)

    @jax.jit
    def optax_step(params, state):
        grads = jax.grad(lambda p: mse(nnx.merge(graphdef, p)(x), y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(20):
        nnx_step(model, optimizer)
        params, state = optax_step(params, state)
    for got, want in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_linen_train_state_trains_to_low_loss():
    x, y = regression_data()
    model = LinenMLP()
    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=model.init(jax.random.key(0), x)["params"],
        tx=emm.ema_sgd(1.0, beta=0.9),
    )

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            return mse(state.apply_fn({"params": params}, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    state, first = train_step(state, x, y)
    for _ in range(STEPS - 1):
        state, _ = train_step(state, x, y)
    final = float(mse(state.apply_fn({"params": state.params}, x), y))

    assert final < float(first) / 100
    assert int(state.step) == STEPS
    assert int(optax.tree.get(state.opt_state, "count")) == STEPS


def test_msgpack_round_trip_of_the_state_continues_bit_identically():
    """Without Orbax: flax.serialization writes the state by field names and restores into
    a fresh `init`, bf16 velocity, None leaf and a masked-out leaf included."""
    params = {"w": jnp.zeros((3, 2)), "h": jnp.zeros(2, jnp.bfloat16), "n": None}
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(
            emm.ema_sgd(
                0.1, optax.linear_schedule(0.5, 0.9, 4), debias=True, rounding="stochastic", seed=3
            ),
            {"w": True, "h": True, "n": False},
        ),
    )
    grads = [
        {"w": jnp.full((3, 2), 0.1 * k), "h": jnp.full(2, 0.3 * k, jnp.bfloat16), "n": None}
        for k in range(1, 7)
    ]

    def run(params, state, grads):
        for g in grads:
            updates, state = jax.jit(tx.update)(g, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    want = run(params, tx.init(params), grads)
    midway = run(params, tx.init(params), grads[:3])
    blob = serialization.to_bytes(midway[1])
    restored = serialization.from_bytes(tx.init(params), blob)
    got = run(midway[0], restored, grads[3:])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        g, w = np.asarray(g).reshape(-1), np.asarray(w).reshape(-1)
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))
