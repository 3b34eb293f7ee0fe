"""Flax NNX classifiers: ``linear``, ``mlp`` and ``cnn``, sized from the data.

The MLP and CNN follow the MNIST-1D paper (Greydanus, 2020): MLP 40-100-100-10 with ReLU; CNN of
three stride-2 convolutions with 25 channels (kernels 5, 3, 3; padding 1), ReLU, then a linear
layer. The CNN convolves in 1-D over signals of shape ``(length,)`` and in 2-D over images of shape
``(height, width)``.
"""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

MODELS = ("linear", "mlp", "cnn")
MLP_WIDTH = 100
CNN_CHANNELS = 25
CNN_KERNELS = (5, 3, 3)


class DatasetSpec(Protocol):
    """What a model needs to know about its data (a :class:`experiments.data.Dataset` fits)."""

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    num_classes: int


def ordered_sum(x: jax.Array, axis: int | None = None) -> jax.Array:
    """Sum of ``x`` (over ``axis``, or all elements) in a fixed pairwise order of elementwise adds.

    XLA picks the summation order of a reduction from the surrounding shapes (for instance how
    many vmapped runs share a device), which changes the last bits of the result. Elementwise
    adds are never reordered, so this sum is the same wherever and however often it is batched.
    """
    if axis is None:
        x, axis = x.reshape(-1), 0
    x = jnp.moveaxis(x, axis, 0)
    if x.shape[0] == 0:  # an empty sum is 0 (the halving below would add shapes 0 and 2)
        return jnp.zeros(x.shape[1:], x.dtype)
    n, size = x.shape[0], 1 << max(0, (x.shape[0] - 1).bit_length())
    if n < size:
        # The first halving adds the zero padding (to a power of two) to the upper half only, so
        # XLA fuses the pad into the add instead of writing a padded copy of the whole input.
        half = size // 2
        x = x[:half] + jnp.pad(x[half:], [(0, size - n)] + [(0, 0)] * (x.ndim - 1))
    while x.shape[0] > 1:
        x = x[: x.shape[0] // 2] + x[x.shape[0] // 2 :]
    return x[0]


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x + bias`` over the last axis; the bias gradient is an :func:`ordered_sum`.

    Autodiff would sum the bias gradient over the batch with an XLA reduction, whose order (and
    so whose last bits) depends on how many vmapped runs share a device.
    """
    return x + bias


def _add_bias_fwd(x: jax.Array, bias: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    # Empty arrays carry the dtypes to the backward pass: each cotangent takes its primal's dtype
    # (``g`` has the promoted one), as in autodiff.
    return x + bias, (jnp.empty(0, x.dtype), jnp.empty(0, bias.dtype))


def _add_bias_bwd(dtypes: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_dtype, bias_dtype = (a.dtype for a in dtypes)
    d_bias = ordered_sum(g.reshape(-1, g.shape[-1]), axis=0)
    return g.astype(x_dtype), d_bias.astype(bias_dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` (``[..., n_in] @ [n_in, n_out]``) whose kernel gradient is a plain matmul.

    Autodiff's kernel gradient ``x^T g`` contracts the batch axis of both operands, a transposed
    left operand that XLA:CPU sends to a slower matmul than the forward one (about 2x at the
    engine's sizes, e.g. ``[4, 32, 100]`` per device). On CPU, ``x^T`` is therefore materialized
    first, behind an optimization barrier (else XLA folds the transpose back into the matmul). The
    copy costs less than it saves: at batch 32 the engine's step is 8-11% faster with 8 runs on 2
    devices and 1.7x faster with one run. Other platforms get plain ``x^T g``
    (``jax.lax.platform_dependent`` picks at lowering). Values are autodiff's up to rounding (the
    products may be summed in another order). The input gradient is autodiff's ``g @ kernel^T``.
    """
    return x @ kernel


def kernel_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x^T g`` for ``[batch, n_in]`` inputs and ``[batch, n_out]`` output gradients, as
    :func:`matmul` computes its kernel gradient: on CPU from a materialized ``x^T``."""
    return jax.lax.platform_dependent(
        x,
        g,
        cpu=lambda x, g: jax.lax.optimization_barrier(x.T) @ g,
        default=lambda x, g: x.T @ g,
    )


def _matmul_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ kernel, (x, kernel)


def _matmul_bwd(
    residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    d_kernel = kernel_gradient(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    d_x = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    # Each cotangent in its primal's dtype, as in autodiff (``g`` has the promoted one).
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Biased(nnx.Module):
    """A bias-free layer followed by :func:`add_bias` (a zero-initialized bias).

    A bias-free ``nnx.Linear`` (``x @ kernel``) is applied through :func:`matmul`.
    """

    def __init__(self, layer: nnx.Module, features: int):
        self.layer = layer
        self.bias = nnx.Param(jnp.zeros(features))

    def __call__(self, x: jax.Array) -> jax.Array:
        if isinstance(self.layer, nnx.Linear):
            y = matmul(x, self.layer.kernel[...])
        else:
            y = self.layer(x)
        return add_bias(y, self.bias[...])


def _dense(n_in: int, n_out: int, rngs: nnx.Rngs) -> Biased:
    return Biased(nnx.Linear(n_in, n_out, use_bias=False, rngs=rngs), n_out)


class Linear(nnx.Module):
    """Multinomial logistic regression on the flattened input."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs):
        self.out = _dense(math.prod(input_shape), num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
    """Two hidden ReLU layers of :data:`MLP_WIDTH` units on the flattened input."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs):
        self.hidden1 = _dense(math.prod(input_shape), MLP_WIDTH, rngs)
        self.hidden2 = _dense(MLP_WIDTH, MLP_WIDTH, rngs)
        self.out = _dense(MLP_WIDTH, num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.hidden1(x))
        x = jax.nn.relu(self.hidden2(x))
        return self.out(x)


class CNN(nnx.Module):
    """Three stride-2 ReLU convolutions (1-D or 2-D by the input's rank), then a linear layer."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs):
        if len(input_shape) not in (1, 2):
            raise ValueError(
                f"input_shape must be (length,) or (height, width), got input_shape={input_shape}."
            )
        ndim = len(input_shape)
        convs = []
        in_channels, spatial = 1, list(input_shape)
        for k in CNN_KERNELS:
            conv = nnx.Conv(
                in_channels,
                CNN_CHANNELS,
                kernel_size=(k,) * ndim,
                strides=(2,) * ndim,
                padding=((1, 1),) * ndim,
                use_bias=False,
                rngs=rngs,
            )
            convs.append(Biased(conv, CNN_CHANNELS))
            in_channels = CNN_CHANNELS
            spatial = [(s + 2 - k) // 2 + 1 for s in spatial]
            if min(spatial) < 1:
                raise ValueError(f"input_shape={input_shape} is too small for the CNN.")
        self.convs = nnx.List(convs)
        self.out = _dense(CNN_CHANNELS * math.prod(spatial), num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x[..., None]  # a single input channel, channels last
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.out(x.reshape(x.shape[0], -1))


_CLASSES = {"linear": Linear, "mlp": MLP, "cnn": CNN}


def make_model(name: str, dataset_spec: DatasetSpec, rngs: nnx.Rngs) -> nnx.Module:
    """Builds a freshly initialized model for a dataset.

    Args:
      name: ``"linear"``, ``"mlp"`` or ``"cnn"``.
      dataset_spec: Gives ``input_shape`` (one example, without the batch axis) and ``num_classes``.
      rngs: Randomness for the initialization.

    Returns:
      The model; it maps ``[batch, *input_shape]`` to logits ``[batch, num_classes]``.

    Raises:
      ValueError: for an unknown name or an input shape the model cannot take.
    """
    if name not in _CLASSES:
        raise ValueError(f"name must be one of {', '.join(MODELS)}, got name={name!r}.")
    input_shape, num_classes = tuple(dataset_spec.input_shape), dataset_spec.num_classes
    # A size of 0 was a ZeroDivisionError in the initializer (a fan-in or fan-out of 0).
    if any(size < 1 for size in input_shape):
        raise ValueError(f"input_shape must hold sizes >= 1, got input_shape={input_shape}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes!r}.")
    return _CLASSES[name](input_shape, num_classes, rngs=rngs)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, summed in a fixed order."""
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_norm = jnp.log(ordered_sum(jnp.exp(shifted), axis=-1))
    return log_norm - jnp.take_along_axis(shifted, labels[:, None], axis=-1)[:, 0]


def loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``model`` on inputs ``x`` with integer labels ``y``."""
    return ordered_sum(cross_entropy(model(x), y)) / len(y)
