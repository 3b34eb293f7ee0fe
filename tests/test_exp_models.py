"""Tests of experiments.models: output shapes, the loss, and the fixed-order sum."""

import dataclasses

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import strategies as st

from experiments import models


@dataclasses.dataclass
class Spec:
    input_shape: tuple[int, ...]
    num_classes: int


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("shape", [(40,), (8, 8), (28, 28)])
def test_output_shapes(name, shape):
    forward = lambda: models.make_model(name, Spec(shape, 7), nnx.Rngs(0))(jnp.zeros((3, *shape)))
    assert nnx.eval_shape(forward).shape == (3, 7)


def test_paper_sizes():
    def count(name):
        model = nnx.eval_shape(lambda: models.make_model(name, Spec((40,), 10), nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    # MLP 40-100-100-10; CNN 3 x Conv1d(25 channels, kernels 5/3/3) + Linear(125, 10).
    assert count("mlp") == 40 * 100 + 100 * 100 + 100 * 10 + 210
    assert count("cnn") == 150 + 2 * 1900 + 1260


def test_bad_model():
    with pytest.raises(ValueError, match="name='rnn'"):
        models.make_model("rnn", Spec((40,), 10), nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_shape"):
        models.make_model("cnn", Spec((2, 2, 2), 10), nnx.Rngs(0))


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize(
    ("shape", "num_classes", "match"),
    [
        ((0,), 10, r"input_shape must hold sizes >= 1, got input_shape=\(0,\)"),
        ((8, 0), 10, r"input_shape must hold sizes >= 1, got input_shape=\(8, 0\)"),
        ((40,), 0, "num_classes must be >= 1, got num_classes=0"),
    ],
)
def test_an_empty_input_or_no_classes_is_a_value_error(name, shape, num_classes, match):
    # Was a ZeroDivisionError from the initializer for linear and mlp (the documented error is
    # a ValueError, which the command line reports in one line).
    with pytest.raises(ValueError, match=match):
        models.make_model(name, Spec(shape, num_classes), nnx.Rngs(0))


def test_loss_matches_optax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(37, 10)) * 5, jnp.float32)
    labels = jnp.arange(37) % 10
    np.testing.assert_allclose(
        models.cross_entropy(logits, labels),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        rtol=1e-6,
        atol=1e-6,
    )
    model = lambda x: x  # loss_fn only calls the model
    expected = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    np.testing.assert_allclose(models.loss_fn(model, logits, labels), expected, rtol=1e-6)


def test_bias_gradient():
    x, b = jnp.arange(12.0).reshape(2, 3, 2), jnp.array([1.0, -1.0])
    grad = jax.grad(lambda b: jnp.sum(models.add_bias(x, b) ** 2))(b)
    np.testing.assert_allclose(grad, jax.grad(lambda b: jnp.sum((x + b) ** 2))(b))


@pytest.mark.parametrize("x_shape", [(32, 40), (5, 3, 40)])
def test_matmul_gradients_match_autodiff(x_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, (40, 7))
    g = jax.random.normal(kg, (*x_shape[:-1], 7))
    out, vjp = jax.vjp(models.matmul, x, w)
    ref_out, ref_vjp = jax.vjp(jnp.matmul, x, w)
    np.testing.assert_array_equal(out, ref_out)
    for got, ref in zip(vjp(g), ref_vjp(g), strict=True):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    # Batched over runs, as in the engine: each run's gradient is its own.
    xs, ws, gs = (jnp.stack([a, 2 * a]) for a in (x, w, g))
    grads = jax.vmap(lambda x, w, g: jax.vjp(models.matmul, x, w)[1](g))(xs, ws, gs)
    for run in range(2):
        expected = ref_vjp(g) if run == 0 else jax.vjp(jnp.matmul, 2 * x, 2 * w)[1](2 * g)
        for got, ref in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got[run], ref, rtol=1e-5, atol=1e-3)


def test_custom_vjps_second_derivatives_match_autodiff():
    """Reverse over reverse (the custom backward passes are differentiated) and forward over
    reverse (a Hessian-vector product), both through matmul and add_bias, as plain x @ w + b."""
    kx, kw, kb, kv = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (5, 3, 6))
    w, b = jax.random.normal(kw, (6, 4)), jax.random.normal(kb, (4,))
    ours = lambda x, w, b: jnp.sum(jnp.tanh(models.add_bias(models.matmul(x, w), b)) ** 2)
    plain = lambda x, w, b: jnp.sum(jnp.tanh(x @ w + b) ** 2)
    np.testing.assert_allclose(ours(x, w, b), plain(x, w, b), rtol=1e-6)
    hessian = lambda f: jax.tree.leaves(
        jax.jit(jax.jacrev(jax.grad(f, (0, 1, 2)), (0, 1, 2)))(x, w, b)
    )
    for got, ref in zip(hessian(ours), hessian(plain), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    keys = jax.random.split(kv, 3)
    v = tuple(jax.random.normal(k, a.shape) for k, a in zip(keys, (x, w, b), strict=True))
    hvp = lambda f: jax.jit(lambda *p: jax.jvp(jax.grad(f, (0, 1, 2)), p, v)[1])(x, w, b)
    for got, ref in zip(hvp(ours), hvp(plain), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_matmul_materializes_the_transpose_only_on_cpu(platform):
    """The barrier that keeps x^T materialized is XLA:CPU-specific; other compilers get x^T g."""
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(models.matmul(x, w) ** 2), argnums=1))
    lowered = grad.trace(jnp.ones((8, 4)), jnp.ones((4, 3))).lower(lowering_platforms=(platform,))
    assert ("optimization_barrier" in lowered.as_text()) == (platform == "cpu")


def test_mlp_gradients_match_plain_linear_layers():
    model = models.make_model("mlp", Spec((40,), 10), nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (16, 40))
    y = jnp.arange(16) % 10

    def plain(p):
        p = nnx.to_pure_dict(p)
        h = x
        for name in ("hidden1", "hidden2", "out"):
            h = h @ p[name]["layer"]["kernel"] + p[name]["bias"]
            h = jax.nn.relu(h) if name != "out" else h
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h, y))

    got = jax.grad(lambda p: models.loss_fn(nnx.merge(graphdef, p), x, y))(params)
    ref = jax.grad(plain)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1024, 1025, 10000])
def test_ordered_sum_is_the_documented_pairwise_order(n):
    """Zero-pad to a power of two, then add the upper half to the lower half until one is left.

    Computed here in float32 numpy with that exact order: the result must match to the bit.
    """
    x = np.asarray(jax.random.normal(jax.random.key(n), (n,)), np.float32) * 3
    ref = np.concatenate([x, np.zeros((1 << (n - 1).bit_length()) - n, np.float32)])
    while len(ref) > 1:
        ref = ref[: len(ref) // 2] + ref[len(ref) // 2 :]
    assert np.asarray(jax.jit(models.ordered_sum)(x)).tobytes() == ref[0].tobytes()


def test_ordered_sum_is_independent_of_batching():
    x = jax.random.normal(jax.random.key(0), (16, 1438)) * 3
    summed = jax.jit(jax.vmap(models.ordered_sum))
    full = np.asarray(summed(x))
    np.testing.assert_allclose(full, np.asarray(x).sum(axis=1), rtol=1e-5, atol=1e-4)
    for k in (1, 2, 3, 8):
        np.testing.assert_array_equal(np.asarray(summed(x[:k])), full[:k])
    np.testing.assert_allclose(models.ordered_sum(x, axis=0), x.sum(axis=0), rtol=1e-5, atol=1e-5)


def test_ordered_sum_of_an_empty_axis_is_zero_and_so_is_the_bias_gradient():
    # Was a TypeError ("add got incompatible shapes for broadcasting: (0,), (2,)").
    np.testing.assert_array_equal(models.ordered_sum(jnp.zeros(0)), 0.0)
    x = jnp.ones((3, 0, 2))
    got = models.ordered_sum(x, axis=1)
    assert got.shape == (3, 2) and got.dtype == x.dtype
    np.testing.assert_array_equal(got, jnp.sum(x, axis=1))
    grad = jax.grad(lambda b: jnp.sum(models.add_bias(jnp.zeros((0, 4)), b)))(jnp.ones(4))
    np.testing.assert_array_equal(grad, jnp.zeros(4))


def _ours(x, w, b, c):
    return jnp.sum(jnp.tanh(models.add_bias(models.matmul(x, w), b)) * c)


def _plain(x, w, b, c):
    return jnp.sum(jnp.tanh(x @ w + b) * c)


# Compiled once per shape: the property test below draws its shapes from a few, so that it
# stays fast, and its values freely.
_GRADS = {
    (f, vmapped): jax.jit(jax.vmap(jax.grad(f, (0, 1, 2))) if vmapped else jax.grad(f, (0, 1, 2)))
    for f in (_ours, _plain)
    for vmapped in (False, True)
}


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    st.sampled_from([(), (2, 3)]),  # the batch axes of x: none (1-D x), or two
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_custom_vjps_match_plain_autodiff(batch, vmapped, seed, scale):
    """matmul and add_bias differentiate as plain ``x @ w + b``: the same gradients (to float32
    rounding, in another summation order), of the same shapes and dtypes, for 1-D and N-D x, and
    under vmap over a leading run axis, each run's gradient its own."""
    n_in, n_out, runs = 5, 3, (2,) if vmapped else ()
    rng = np.random.default_rng(seed)
    x, w, b, c = (
        jnp.asarray(rng.normal(size=runs + shape) * s, jnp.float32)
        for shape, s in (
            ((*batch, n_in), scale),
            ((n_in, n_out), 1 / scale),
            ((n_out,), 1.0),
            ((*batch, n_out), scale),
        )
    )
    got, ref = (_GRADS[f, vmapped](x, w, b, c) for f in (_ours, _plain))
    rows = int(np.prod(batch))  # the terms each kernel or bias gradient sums
    for a, r in zip(got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype == jnp.float32
        atol = 1e-6 * rows * n_in * float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=atol)
    if vmapped:  # run 1 alone gives run 1's gradients
        alone = _GRADS[_plain, False](x[1], w[1], b[1], c[1])
        for a, r in zip(got, alone, strict=True):
            atol = 1e-6 * rows * n_in * float(jnp.max(jnp.abs(r)))
            np.testing.assert_allclose(a[1], r, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "b_dtype"),
    [
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.float32, jnp.bfloat16, jnp.bfloat16),
        (jnp.float16, jnp.float32, jnp.bfloat16),
    ],
)
def test_custom_vjps_give_each_argument_a_gradient_of_its_own_dtype(x_dtype, w_dtype, b_dtype):
    """With mixed dtypes, matmul and add_bias return autodiff's cotangent dtypes: the gradient of a
    bfloat16 input or parameter is bfloat16. Their backward passes returned the promoted float32
    instead, so a bfloat16 model's gradients came back float32."""
    x = jnp.ones((4, 3), x_dtype)
    w, b = jnp.ones((3, 2), w_dtype), jnp.ones(2, b_dtype)
    ours = jax.grad(lambda x, w, b: jnp.sum(models.add_bias(models.matmul(x, w), b)), (0, 1, 2))
    plain = jax.grad(lambda x, w, b: jnp.sum(x @ w + b), (0, 1, 2))
    expected = [x_dtype, w_dtype, b_dtype]
    assert [g.dtype for g in plain(x, w, b)] == expected
    assert [g.dtype for g in ours(x, w, b)] == expected


@pytest.mark.parametrize("shape", [(40,), (8, 8), (28, 28)])
def test_cnn_computes_the_papers_convbase_given_its_weights(shape):
    """The CNN is the MNIST-1D paper's ``ConvBase`` (PyTorch: three ``Conv1d`` of 25 channels,
    kernels 5/3/3, stride 2, padding 1, ReLU, then ``Linear``), here also in 2-D: given the same
    weights it gives the same logits, so padding, strides and flatten sizes agree (125 inputs to
    the linear layer for length 40, 25 for 8x8 digits, 400 for 28x28). PyTorch flattens channel by
    channel, ours position by position: the same linear layer up to a permutation of its inputs."""
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv1d if len(shape) == 1 else torch.nn.Conv2d
    torch.manual_seed(0)
    convs = [conv(1 if i == 0 else 25, 25, k, stride=2, padding=1) for i, k in enumerate((5, 3, 3))]
    x = np.random.default_rng(0).normal(size=(6, *shape)).astype(np.float32)
    with torch.no_grad():
        h = torch.from_numpy(x)[:, None]
        for c in convs:
            h = c(h).relu()
        flat_shape = h.shape[1:]  # (channels, *spatial)
        linear = torch.nn.Linear(h[0].numel(), 10)
        expected = linear(h.reshape(len(x), -1)).numpy()

    model = models.make_model("cnn", Spec(shape, 10), nnx.Rngs(0))
    assert model.out.layer.kernel.shape == (int(np.prod(flat_shape)), 10)
    for ours, theirs in zip(model.convs, convs, strict=True):
        w = theirs.weight.detach().numpy()  # [out, in, *kernel] -> [*kernel, in, out]
        ours.layer.kernel[...] = jnp.asarray(np.moveaxis(w, (0, 1), (-1, -2)))
        ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())
    w = linear.weight.detach().numpy().reshape(10, *flat_shape)  # [out, channels, *spatial]
    model.out.layer.kernel[...] = jnp.asarray(np.moveaxis(w, (0, 1), (-1, -2)).reshape(-1, 10))
    model.out.bias[...] = jnp.asarray(linear.bias.detach().numpy())
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
