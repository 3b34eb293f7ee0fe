r"""The simple gradient noise scale of McCandlish et al. (2018), from two batch sizes.

McCandlish, Kaplan, Amodei & OpenAI Dota Team, "An Empirical Model of
Large-Batch Training", arXiv 1812.06162, appendix A.1.

A mini-batch gradient of ``B`` examples drawn independently from the data has

.. math::

  E\,|G_B|^2 = |G|^2 + \operatorname{tr}(\Sigma) / B,

with :math:`G` the full-data gradient and :math:`\Sigma` the covariance of one
example's gradient. Two batch sizes :math:`B_s < B_b` give the unbiased estimates

.. math::

  |G|^2 \approx \frac{B_b |G_{B_b}|^2 - B_s |G_{B_s}|^2}{B_b - B_s}, \qquad
  \operatorname{tr}(\Sigma) \approx \frac{|G_{B_s}|^2 - |G_{B_b}|^2}{1/B_s - 1/B_b},

and :math:`B_\text{simple} = \operatorname{tr}(\Sigma) / |G|^2`. Both estimates
are noisy and :math:`|G|^2` can come out negative for one pair, so (as the
paper recommends) they are averaged over many pairs of batches before the
ratio is taken.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ArrayLike = jax.typing.ArrayLike
# Pairs evaluated at once (vmapped); the rest run sequentially to bound memory.
_PAIRS_PER_CHUNK = 32


class NoiseScale(NamedTuple):
    """Estimates averaged over ``num_pairs`` pairs of independent batches."""

    b_simple: float  # tr(Sigma) / |G|^2 (ratio of the two means); nan if |G|^2 <= 0
    # Standard error of b_simple (delta method). The two estimates of one pair are strongly
    # anti-correlated (|G_small|^2 enters them with opposite signs), so combining their standard
    # errors as if independent understates it (by ~20% at B = 32/512 on MNIST-1D).
    b_simple_stderr: float
    grad_sq: float  # mean unbiased estimate of |G|^2
    trace: float  # mean unbiased estimate of tr(Sigma)
    grad_sq_stderr: float  # standard error of grad_sq over the pairs
    trace_stderr: float  # standard error of trace over the pairs
    small_sq: float  # mean |G_small|^2
    big_sq: float  # mean |G_big|^2


def unbiased_estimates(
    small_sq: ArrayLike, big_sq: ArrayLike, b_small: float, b_big: float
) -> tuple[Any, Any]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes.

    Args:
      small_sq: ``|G_small|^2``, the squared norm of a mean gradient over ``b_small`` examples.
      big_sq: ``|G_big|^2`` over ``b_big`` examples (arrays broadcast elementwise).
      b_small: The small batch size.
      b_big: The big batch size, ``> b_small``.

    Returns:
      ``(grad_sq, trace)``.

    Examples:
      >>> # |G|^2 = 2, tr(Sigma) = 8: E|G_B|^2 = 2 + 8 / B.
      >>> unbiased_estimates(2 + 8 / 4, 2 + 8 / 64, 4, 64)
      (2.0, 8.0)
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def simple_noise_scale(grad_sq: float, trace: float) -> float:
    """``B_simple = tr(Sigma) / |G|^2``; ``nan`` when the ``|G|^2`` estimate is not positive."""
    return float(trace / grad_sq) if grad_sq > 0 else float("nan")


def _check_estimator(b_small: object, b_big: object, num_pairs: object) -> None:
    # A fractional batch size would be drawn truncated but enter the estimates as given.
    for name, value in (("b_small", b_small), ("b_big", b_big), ("num_pairs", num_pairs)):
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {name}={value!r}")
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")


@functools.partial(jax.jit, static_argnames=("grad_fn", "b_small", "b_big", "num_pairs"))
def _squared_norms(grad_fn, params, x, y, key, *, b_small, b_big, num_pairs):
    n = x.shape[0]
    key_small, key_big = jax.random.split(key)
    # Sampling with replacement makes the examples of a batch independent, so
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B holds exactly, with Sigma the covariance of
    # one example's gradient over the dataset.
    small = jax.random.randint(key_small, (num_pairs, b_small), 0, n)
    big = jax.random.randint(key_big, (num_pairs, b_big), 0, n)

    def sq_norm(index):
        grads = grad_fn(params, x[index], y[index])
        return optax.tree.norm(grads, squared=True)

    chunk = min(num_pairs, _PAIRS_PER_CHUNK)
    return (
        jax.lax.map(sq_norm, small, batch_size=chunk),
        jax.lax.map(sq_norm, big, batch_size=chunk),
    )


def estimate_noise_scale(
    grad_fn: Callable[[Any, jax.Array, jax.Array], Any],
    params: Any,
    x: ArrayLike,
    y: ArrayLike,
    b_small: int,
    b_big: int,
    num_pairs: int,
    key: jax.Array,
) -> NoiseScale:
    """Estimates the simple noise scale of ``grad_fn`` at ``params`` on the data ``(x, y)``.

    Args:
      grad_fn: ``grad_fn(params, x_batch, y_batch)`` returns the gradient (any
        pytree) of the *mean* loss over the batch, e.g.
        ``jax.grad(loss_fn)``. Pass the same function object on every call: it
        is a static argument of the jitted computation, so a new object
        recompiles.
      params: The parameters (any pytree).
      x: Inputs, leading axis = examples.
      y: Targets, leading axis = examples.
      b_small: Small batch size (examples drawn with replacement).
      b_big: Big batch size, ``> b_small``.
      num_pairs: Number of (small, big) batch pairs to average over (``>= 2``).
      key: PRNG key for drawing the batches.

    Returns:
      A :class:`NoiseScale` with the averaged estimates.
    """
    _check_estimator(b_small, b_big, num_pairs)
    x, y = jnp.asarray(x), jnp.asarray(y)
    # Indexing past the end of y would clamp (JAX gathers do) and pair inputs with wrong labels.
    if x.ndim == 0 or y.ndim == 0 or not 0 < len(x) == len(y):
        raise ValueError(
            f"x and y need the same number of examples (>= 1) on their leading axis, got "
            f"x.shape={x.shape}, y.shape={y.shape}"
        )
    small_sq, big_sq = _squared_norms(
        grad_fn,
        params,
        x,
        y,
        key,
        b_small=int(b_small),
        b_big=int(b_big),
        num_pairs=int(num_pairs),
    )
    small_sq = np.asarray(small_sq, dtype=np.float64)
    big_sq = np.asarray(big_sq, dtype=np.float64)
    grad_sq, trace = unbiased_estimates(small_sq, big_sq, b_small, b_big)
    stderr = lambda values: float(values.std(ddof=1) / np.sqrt(values.size))
    b_simple = simple_noise_scale(float(grad_sq.mean()), float(trace.mean()))
    return NoiseScale(
        b_simple=b_simple,
        # The ratio's first-order error is the mean of (trace - b_simple grad_sq) / mean(grad_sq).
        b_simple_stderr=stderr(trace - b_simple * grad_sq) / float(grad_sq.mean()),
        grad_sq=float(grad_sq.mean()),
        trace=float(trace.mean()),
        grad_sq_stderr=stderr(grad_sq),
        trace_stderr=stderr(trace),
        small_sq=float(small_sq.mean()),
        big_sq=float(big_sq.mean()),
    )


def along_training(
    data: Any,
    model: str,
    *,
    lr: float,
    batch_size: int,
    checkpoints: Sequence[int],
    b_small: int,
    b_big: int,
    num_pairs: int,
    beta: float = 0.0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """``B_simple`` at the given steps of one ``ema_sgd`` training run of a model on a dataset.

    The run trains ``model`` on ``data.x_train`` with ``ema_sgd(lr, beta)`` at ``batch_size``
    (batches drawn with replacement); at every checkpoint step it estimates the noise scale with
    :func:`estimate_noise_scale` on the full training set and measures the full training loss.

    Args:
      data: An :class:`experiments.data.Dataset`.
      model: A model name of :func:`experiments.models.make_model`.
      lr: The EMA-form learning rate.
      batch_size: The training batch size (>= 1).
      checkpoints: Steps (integers in ``[0, 2**31)``, at least one) at which to measure; 0 is
        the initialization.
      b_small: Small batch size of the estimator.
      b_big: Big batch size of the estimator.
      num_pairs: Batch pairs per estimate.
      beta: Momentum of the training run (0: SGD).
      seed: Seeds the initialization, the training batches and the estimator's batches, in
        ``[0, 2**32)``.

    Returns:
      One row per checkpoint: ``step``, ``train_loss`` and the :class:`NoiseScale` fields.
    """
    from flax import nnx

    import ema_momentum as emm
    from experiments.models import loss_fn, make_model

    # Checked before training: a bad estimator argument failed only at the first checkpoint, a
    # batch_size of 0 as a ZeroDivisionError, a fractional one or checkpoint as a TypeError.
    _check_estimator(b_small, b_big, num_pairs)
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
    if not checkpoints or not all(
        isinstance(c, numbers.Integral) and 0 <= c < 2**31 for c in checkpoints
    ):
        raise ValueError(
            f"checkpoints must be integers in [0, 2**31), at least one, got "
            f"checkpoints={list(checkpoints)}"
        )
    # jax.random.key keeps a seed's low 32 bits: -1 drew what 2**32 - 1 draws.
    if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got seed={seed!r}")
    graphdef, params = nnx.split(make_model(model, data, nnx.Rngs(params=jax.random.key(seed))))
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    tx = emm.ema_sgd(lr, beta)

    def mean_loss(p, xb, yb):
        return loss_fn(nnx.merge(graphdef, p), xb, yb)

    grad_fn = jax.grad(mean_loss)

    key = jax.random.key(seed)
    train_key, estimate_key = jax.random.split(key)

    @functools.partial(jax.jit, static_argnames="length")
    def train(params, opt_state, start, length):
        def body(carry, step):
            params, opt_state = carry
            # One key per step, so the run is the same whichever checkpoints split it.
            k = jax.random.fold_in(train_key, step)
            index = jax.random.randint(k, (batch_size,), 0, x.shape[0])
            updates, opt_state = tx.update(grad_fn(params, x[index], y[index]), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), start + jnp.arange(length))
        return params, opt_state

    # Training in equal chunks (the checkpoints' gcd) compiles the scan once.
    chunk = math.gcd(*checkpoints)
    opt_state, done, rows = tx.init(params), 0, []
    for step in sorted(set(checkpoints)):
        while done < step:
            params, opt_state = train(params, opt_state, done, length=chunk)
            done += chunk
        estimate = estimate_noise_scale(
            grad_fn, params, x, y, b_small, b_big, num_pairs,
            jax.random.fold_in(estimate_key, step),
        )  # fmt: skip
        rows.append(
            {
                "step": step,
                "train_loss": float(jax.jit(mean_loss)(params, x, y)),
                **estimate._asdict(),
            }
        )
    return rows
