r"""The noisy quadratic model (NQM) of Zhang et al. (2019), in closed form.

Zhang, Li, Nado, Martens, Sachdeva, Dahl, Shallue & Grosse, "Which Algorithmic
Choices Matter at Which Batch Sizes? Insights From a Noisy Quadratic Model",
NeurIPS 2019 (arXiv 1907.04164).

The model: loss :math:`L(\theta) = \tfrac12 \sum_i h_i \theta_i^2` with
:math:`h_i = 1/i`, :math:`d = 10^4`, :math:`\theta_0 \sim N(0, I)`. A mini-batch
gradient of batch size :math:`B` is :math:`h_i \theta_i + \epsilon_i` with
independent noise of variance :math:`h_i / B` (gradient covariance equal to the
curvature, as in the paper). The target is an *expected* loss of 0.01.

Heavy-ball momentum with step :math:`a` and momentum :math:`b` moves each
coordinate independently:

.. math::

  x_{t+1} = x_t + b (x_t - x_{t-1}) - a (h x_t + \epsilon_t)
          = c x_t - b x_{t-1} - a \epsilon_t, \qquad c = 1 - a h + b.

Squaring and taking expectations (:math:`\epsilon_t` is independent of
:math:`x_t, x_{t-1}`) closes the recursion on
:math:`s_t = (E[x_t^2], E[x_{t-1}^2], E[x_t x_{t-1}])`:

.. math::

  s_{t+1} = \begin{pmatrix} c^2 & b^2 & -2cb \\ 1 & 0 & 0 \\ c & 0 & -b \end{pmatrix} s_t
            + \begin{pmatrix} a^2 h / B \\ 0 \\ 0 \end{pmatrix},
  \qquad s_0 = (1, 1, 1)

(zero initial velocity, :math:`x_{-1} = x_0`). With :math:`b = 0` the first
row is plain SGD, :math:`E[x_{t+1}^2] = (1 - a h)^2 E[x_t^2] + a^2 h / B`, so
SGD and momentum share one code path here as they do in ``emm.ema_sgd``. In the
EMA form of this project the same trajectory has learning rate
:math:`\eta = a / (1 - b)`.

Nothing is sampled: the expected loss :math:`\tfrac12 \sum_i h_i E[x_{i,t}^2]`
is propagated exactly, and steps to target are found by walking a geometric
grid of steps with powers of the (affine) second-moment map, then bisecting the
first grid cell that reaches the target (see :func:`steps_to_target`).
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import pathlib
import signal
import threading
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

from experiments.cli import (
    add_out_argument,
    check_betas,
    check_unique,
    exact_text,
    finite_float_list,
    int_in,
    locked_out,
    positive_int,
    positive_int_list,
    usable_cores,
)
from experiments.store import write_json_and_figure

HELP = "noisy quadratic model (Zhang et al. 2019): steps to target vs batch size, closed form"
ON_INTERRUPT = "interrupted; nothing was written"  # printed on Ctrl-C
DESCRIPTION = """\
The noisy quadratic model (NQM) of Zhang et al. (2019), in closed form.

Loss 0.5 sum_i h_i theta_i^2 with h_i = 1/i in d = 10^4 dimensions, theta_0 ~ N(0, I); a
mini-batch gradient of batch size B has independent noise of variance h_i / B. The expected loss
under heavy-ball momentum is propagated exactly (no sampling), and for every batch size and beta
the learning rate is tuned for the fewest steps to an expected loss of 0.01.

Zhang, Li, Nado, Martens, Sachdeva, Dahl, Shallue & Grosse, "Which Algorithmic Choices Matter at
Which Batch Sizes? Insights From a Noisy Quadratic Model", NeurIPS 2019 (arXiv 1907.04164)."""
DIMENSION = 10_000
# The CLI's bound on d (100 times the paper's); beyond it numpy ran out of memory.
MAX_DIMENSION = 10**6
# Tuning holds [3, 3, 21, d] float64 maps and their temporaries: a worker's peak resident memory
# grew by 13-14 kB per dimension at d = 10^3 to 3 * 10^4 (batch size 1; 9-10 kB at 64 and 65536),
# so about 14 GB per worker at 10^6.
MEMORY_PER_DIMENSION = 14_000  # bytes
TARGET_LOSS = 0.01
BATCH_SIZES = tuple(2**k for k in range(17))
# The CLI's bound on a batch size: the closed form computes with B as a float64, exact below 2**53
# (a batch size of 309 digits or more is not a float64 at all).
MAX_BATCH_SIZE = 2**53
# 0 is in the grid, so "momentum" below means "tuned over beta, SGD included";
# the per-beta results are reported too, so a reader sees what each beta does.
BETAS = (0.0, 0.5, 0.9, 0.95, 0.99, 0.995, 0.999)
MAX_STEPS = 2**26
GRID_PER_OCTAVE = 8
_DIVERGED_LOSS = 1e12


def curvatures(dim: int = DIMENSION) -> np.ndarray:
    """The NQM spectrum ``h_i = 1/i`` for ``i = 1..dim``."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return 1.0 / np.arange(1, dim + 1, dtype=np.float64)


def second_moment_map(
    lr: np.ndarray, beta: np.ndarray, batch_size: float, h: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The affine map ``s -> M s + n`` of the expected second moments, per coordinate.

    Args:
      lr: Heavy-ball step ``a``, shape ``[n]``.
      beta: Heavy-ball momentum ``b``, shape ``[n]``.
      batch_size: ``B``; the gradient-noise variance of coordinate ``i`` is ``h_i / B``.
      h: Curvatures, shape ``[d]``.

    Returns:
      ``(M, noise)`` with ``M`` of shape ``[3, 3, n, d]`` and ``noise`` of shape
      ``[3, n, d]``, acting on ``(E[x_t^2], E[x_{t-1}^2], E[x_t x_{t-1}])``.
    """
    a = np.asarray(lr, dtype=np.float64)[:, None]
    b = np.asarray(beta, dtype=np.float64)[:, None]
    c = 1.0 - a * h[None, :] + b
    b = np.broadcast_to(b, c.shape)
    zero = np.zeros_like(c)
    one = np.ones_like(c)
    matrix = np.stack(
        [
            np.stack([c * c, b * b, -2.0 * c * b]),
            np.stack([one, zero, zero]),
            np.stack([c, zero, -b]),
        ]
    )
    noise = np.stack([a * a * h[None, :] / batch_size + zero, zero, zero])
    return matrix, noise


def sgd_map(lr: np.ndarray, batch_size: float, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SGD recursion ``s -> (1 - a h)^2 s + a^2 h / B`` as a ``[1, 1, n, d]`` affine map.

    It is the first row of :func:`second_moment_map` at ``b = 0`` (where the
    other two moments drop out); nine times cheaper to iterate.
    """
    a = np.asarray(lr, dtype=np.float64)[:, None]
    return ((1.0 - a * h[None, :]) ** 2)[None, None], (a * a * h[None, :] / batch_size)[None]


def velocity_moment_map(
    lr: np.ndarray, beta: np.ndarray, batch_size: float, h: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`second_moment_map` in the velocity basis ``(E[x_t^2], E[v_t^2], E[x_t v_t])``.

    Here ``v_t = x_t - x_{t-1}``.
    With ``p = 1 - a h``, ``q = a h``: ``x' = p x + b v - a eps`` and
    ``v' = -q x + b v - a eps``. The same dynamics, but better conditioned: in
    the ``(x_t, x_{t-1})`` basis the slow mode ``1 - 2 a h / (1 - b)`` of a
    flat coordinate is the small difference of entries near 4 (``c^2`` and
    ``2 c b``), and the rounding errors that repeated squaring amplifies push
    it above 1 (e.g. ``a = 1e-5, b = 0.99``, ``h = 1e-4`` diverges after
    ``2^20`` steps). Starts from ``(1, 0, 0)``.
    """
    a = np.asarray(lr, dtype=np.float64)[:, None]
    b = np.asarray(beta, dtype=np.float64)[:, None]
    q = a * h[None, :]
    p = 1.0 - q
    b = np.broadcast_to(b, p.shape)
    matrix = np.stack(
        [
            np.stack([p * p, b * b, 2.0 * p * b]),
            np.stack([q * q, b * b, -2.0 * q * b]),
            np.stack([-p * q, b * b, b * (p - q)]),
        ]
    )
    noise = a * a * h[None, :] / batch_size
    return matrix, np.stack([noise, noise, noise])


def _affine_map(
    lr: np.ndarray, beta: np.ndarray, batch_size: float, h: np.ndarray, *, sgd: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sgd_map` if ``sgd`` (default: if every beta is 0), else :func:`velocity_moment_map`.

    A subset of settings must be mapped in the basis that the whole set was (a subset of mixed
    betas may be all SGD): pass ``sgd`` then.
    """
    if np.all(beta == 0) if sgd is None else sgd:
        return sgd_map(lr, batch_size, h)
    return velocity_moment_map(lr, beta, batch_size, h)


def _initial_state(offset: np.ndarray) -> np.ndarray:
    """``E[x_0^2] = 1``; the other moments (velocity ones, if any) are 0."""
    state = np.zeros(offset.shape)
    state[0] = 1.0
    return state


def stationary_loss(
    lr: np.ndarray, beta: np.ndarray, batch_size: float, h: np.ndarray
) -> np.ndarray:
    """Expected loss as ``t -> inf`` for stable ``(a, b)``, shape ``[n]``.

    The fixed point of :func:`second_moment_map` has
    ``E[x^2] = a (1 + b) / (B (1 - b) (2 (1 + b) - a h))`` (for ``b = 0`` the SGD
    value ``a / (B (2 - a h))``).
    """
    a = np.asarray(lr, dtype=np.float64)[:, None]
    b = np.asarray(beta, dtype=np.float64)[:, None]
    second = a * (1 + b) / (batch_size * (1 - b) * (2 * (1 + b) - a * h[None, :]))
    return 0.5 * second @ h


def _apply(matrix: np.ndarray, offset: np.ndarray, state: np.ndarray) -> np.ndarray:
    return np.einsum("ij...,j...->i...", matrix, state) + offset


def _compose_square(matrix: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M, q)`` applied twice: ``(M^2, M q + q)``."""
    squared = np.einsum("ij...,jk...->ik...", matrix, matrix)
    return squared, _apply(matrix, offset, offset)


def _loss(state: np.ndarray, h: np.ndarray) -> np.ndarray:
    return 0.5 * state[0] @ h


def stable(lr: np.ndarray, beta: np.ndarray, h_max: float) -> np.ndarray:
    """Whether heavy-ball ``(a, b)`` is stable on every coordinate: ``0 < a h < 2 (1 + b)``."""
    lr = np.asarray(lr, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    return (lr > 0) & (beta >= 0) & (beta < 1) & (lr * h_max < 2.0 * (1.0 + beta))


def expected_loss_curve(
    lr: float, beta: float, batch_size: float, steps: int, h: np.ndarray
) -> np.ndarray:
    """Expected loss at steps ``0..steps`` by iterating the recursion one step at a time.

    The reference that :func:`steps_to_target` is tested against; cost is
    ``O(steps * d)``.
    """
    matrix, noise = second_moment_map(np.array([lr]), np.array([beta]), batch_size, h)
    state = np.ones((3, 1, h.size))
    losses = np.empty(steps + 1)
    losses[0] = _loss(state, h)[0]
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            state = _apply(matrix, noise, state)
            losses[t] = _loss(state, h)[0]
    return losses


def steps_to_target(
    lr: Sequence[float] | np.ndarray,
    beta: Sequence[float] | np.ndarray | float,
    batch_size: float,
    *,
    h: np.ndarray | None = None,
    target: float = TARGET_LOSS,
    max_steps: int = MAX_STEPS,
    grid_per_octave: int = GRID_PER_OCTAVE,
    stop_at_first: bool = False,
) -> np.ndarray:
    """First step at which the expected NQM loss is ``<= target``, for many ``(a, b)`` at once.

    The loss is evaluated every step for the first ``2 * grid_per_octave``
    steps, then on a geometric grid with ``grid_per_octave`` points per doubling
    of the step count, by applying precomputed powers ``M^(2^k)`` of the affine
    second-moment map. The first grid cell whose end is at or below the target
    is then bisected with the smaller powers. The answer is the exact first
    crossing unless the expected loss dips below the target and comes back
    within a single grid cell (tests compare it with step-by-step iteration).

    Unstable settings (``a h_max >= 2 (1 + b)``) and settings whose stationary
    loss (:func:`stationary_loss`) is above the target are reported as ``inf``
    without being run (the latter can only touch the target in a transient dip of
    the expected loss, which is not counted), as are settings that do not reach
    the target by ``max_steps``.

    Args:
      lr: Heavy-ball steps ``a``, shape ``[n]``.
      beta: Heavy-ball momenta ``b``, broadcastable to ``[n]`` (0 is SGD).
      batch_size: The batch size ``B``.
      h: Curvatures (default: the NQM spectrum, ``d = 10^4``).
      target: Expected-loss target.
      max_steps: Give up after this many steps.
      grid_per_octave: Grid points per doubling of the step count (a power of 2).
      stop_at_first: Stop as soon as any setting reaches the target; the others
        are then ``inf`` ("not faster"). This is what tuning needs.

    Returns:
      Steps to target, float array of shape ``[n]`` (``inf``: not reached).
    """
    if grid_per_octave < 1 or grid_per_octave & (grid_per_octave - 1):
        raise ValueError(f"grid_per_octave must be a power of 2, got {grid_per_octave}")
    if not batch_size > 0:  # NaN too
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    h = curvatures() if h is None else np.asarray(h, dtype=np.float64)
    lr = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), lr.shape)
    result = np.full(lr.shape, np.inf)
    active = np.flatnonzero(stable(lr, beta, h.max()))
    if 0.5 * h.sum() <= target:
        result[active] = 0
        return result
    # A setting whose stationary loss is above the target only reaches it, if at
    # all, in a transient dip; it is counted as not reaching it (and not run).
    active = active[stationary_loss(lr[active], beta[active], batch_size, h) <= target]
    if active.size == 0:
        return result
    sgd = bool(np.all(beta[active] == 0))  # the basis of every setting, bisection included
    matrix, offset = _affine_map(lr[active], beta[active], batch_size, h, sgd=sgd)
    state = _initial_state(offset)
    t, stride = 0, 1
    while active.size and t < max_steps:
        new_state = _apply(matrix, offset, state)
        crossed = _loss(new_state, h) <= target
        if crossed.any():
            result[active[crossed]] = t + _bisect(
                state[:, crossed],
                lr[active[crossed]],
                beta[active[crossed]],
                batch_size,
                h,
                target,
                stride,
                sgd=sgd,
            )
            if stop_at_first:
                break
            keep = ~crossed
            active, matrix, offset = active[keep], matrix[:, :, keep], offset[:, keep]
            new_state = new_state[:, keep]
        state = new_state
        t += stride
        if t == 2 * grid_per_octave * stride:
            matrix, offset = _compose_square(matrix, offset)
            stride *= 2
    # The last grid cell may end past max_steps (when max_steps is not on the grid).
    result[result > max_steps] = np.inf
    return result


def _bisect(
    state: np.ndarray,
    lr: np.ndarray,
    beta: np.ndarray,
    batch_size: float,
    h: np.ndarray,
    target: float,
    stride: int,
    *,
    sgd: bool,
) -> np.ndarray:
    """Steps ``k`` in ``1..stride`` after ``state`` at which the loss first reaches the target.

    ``sgd``: whether ``state`` is in the basis of :func:`sgd_map` (else the velocity basis).
    """
    powers = [_affine_map(lr, beta, batch_size, h, sgd=sgd)]
    while 2 ** len(powers) < stride:
        powers.append(_compose_square(*powers[-1]))
    advanced = np.zeros(lr.shape, dtype=np.int64)
    for k in range(len(powers) - 1, -1, -1):
        if 2**k >= stride:
            continue
        candidate = _apply(*powers[k], state)
        above = _loss(candidate, h) > target
        state = np.where(above[None, :, None], candidate, state)
        advanced += np.where(above, 2**k, 0)
    return advanced + 1


def tune(
    batch_size: float,
    beta: float,
    *,
    h: np.ndarray | None = None,
    target: float = TARGET_LOSS,
    max_steps: int = MAX_STEPS,
    coarse_per_decade: int = 3,
    decades: float = 7.0,
    refinements: int = 2,
    points: int = 9,
) -> tuple[float, float]:
    """Best heavy-ball step ``a`` for one ``(B, b)``: a log grid, then zooms around the best.

    The coarse grid spans ``decades`` decades below the stability limit
    ``2 (1 + b) / h_max``, and ``log10(1 / (1 - b))`` decades more if its best
    is its smallest step or none reached the target: at small batches the best
    step is set by the noise, at about the same effective step ``a / (1 - b)``
    for every ``b``. Each refinement lays ``points`` points across the previous
    spacing on either side of the best point.

    Returns:
      ``(steps, a)``; ``(inf, nan)`` if no grid point reaches the target.
    """
    h = curvatures() if h is None else h
    limit = 2.0 * (1.0 + beta) / h.max()
    spacing = 1.0 / coarse_per_decade
    best_steps, best_lr = math.inf, math.nan

    def try_grid(grid: np.ndarray) -> None:
        nonlocal best_steps, best_lr
        steps = steps_to_target(
            grid, beta, batch_size, h=h, target=target, max_steps=max_steps, stop_at_first=True
        )
        i = int(np.argmin(steps))
        if steps[i] < best_steps or (steps[i] == best_steps and grid[i] < best_lr):
            best_steps, best_lr = float(steps[i]), float(grid[i])

    coarse = limit * 10.0 ** (-np.arange(1, int(decades * coarse_per_decade) + 1) * spacing)
    try_grid(coarse)
    # The decades below the coarse grid, searched only where its best is its smallest step or
    # none of its steps reached the target: elsewhere the best lies within it.
    extra = math.ceil(coarse_per_decade * math.log10(1.0 / (1.0 - beta)) - 1e-9) if beta < 1 else 0
    if extra > 0 and not best_lr > coarse[-1]:
        try_grid(coarse[-1] * 10.0 ** (-np.arange(1, extra + 1) * spacing))
    for _ in range(refinements):
        if not math.isfinite(best_steps):
            break
        try_grid(best_lr * 10.0 ** (np.linspace(-spacing, spacing, points)))
        spacing *= 2.0 / (points - 1)
    return best_steps, best_lr


def study(
    batch_sizes: Sequence[int] = BATCH_SIZES,
    betas: Sequence[float] = BETAS,
    *,
    dim: int = DIMENSION,
    target: float = TARGET_LOSS,
    max_steps: int = MAX_STEPS,
    refinements: int = 2,
    workers: int = 1,
) -> list[dict]:
    """Steps to target vs batch size for tuned SGD and tuned heavy-ball momentum.

    For every batch size, the step ``a`` is tuned for SGD (``b = 0``) and for
    every ``b`` in ``betas``; "momentum" is the best ``(a, b)`` over ``betas``.
    With ``workers > 1`` the batch sizes are shared among that many (spawned)
    processes, at most one per batch size; the results are the same.

    Returns:
      One row per batch size with ``batch_size``, ``dim``, ``sgd_steps``,
      ``momentum_steps``, ``sgd_lr`` (``a``), ``momentum_lr`` (heavy-ball ``a``),
      ``momentum_beta``, ``momentum_ema_lr`` (``eta = a / (1 - b)``) and
      ``by_beta``: ``{beta: {"steps", "lr", "ema_lr"}}`` for every beta.
      Steps that were not reached (and their lrs) are ``None``.

    Raises:
      ValueError: a beta outside [0, 1) (checked before anything is tuned).
      ChildProcessError: a worker process died (killed, out of memory) before the end.
    """
    bad = [beta for beta in betas if not 0.0 <= beta < 1.0]
    if bad:
        raise ValueError(f"betas must be in [0, 1), got {bad[0]}")
    task = functools.partial(
        _study_one,
        betas=tuple(betas),
        dim=dim,
        target=target,
        max_steps=max_steps,
        refinements=refinements,
    )
    workers = min(workers, len(batch_sizes))  # an extra worker would only cost its start
    if workers <= 1:
        return [task(batch_size) for batch_size in batch_sizes]
    # spawn, not fork: the parent may have started JAX's threads.
    # A multiprocessing Pool, not a ProcessPoolExecutor: leaving the block terminates the workers,
    # so Ctrl-C stops at once instead of waiting for the batch sizes in progress.
    context = multiprocessing.get_context("spawn")
    others = set(multiprocessing.active_children())
    with context.Pool(workers, _init_worker) as pool:
        result = pool.map_async(task, batch_sizes, chunksize=1)
        # A worker that dies (the OOM killer, kill -9) is replaced by the pool, but the batch
        # size it was tuning is lost (or the task queue's lock, if it was waiting for one): the
        # wait would never end. The pool's workers, the replacements included, are watched from
        # here on; one that died before cannot have taken a task (starting takes longer).
        seen: set[multiprocessing.process.BaseProcess] = set()
        while not result.ready():
            seen |= set(multiprocessing.active_children()) - others
            dead = [worker for worker in seen if not worker.is_alive()]
            if dead and not result.ready():
                code = dead[0].exitcode
                why = f" (killed by signal {-code}: out of memory?)" if code < 0 else ""
                raise ChildProcessError(
                    f"an NQM worker process ended with exit code {code} before its batch sizes "
                    f"were done{why}"
                )
            result.wait(0.2)
        return result.get()


def _init_worker() -> None:
    """Sets up a worker process of :func:`study`.

    It ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and the parent alone
    reports it. If the parent dies without ending the pool (``kill -9``, the OOM killer), the
    worker exits at once and quietly instead of tuning its batch size to the end and then printing
    a ``BrokenPipeError`` traceback: a thread waits for the parent's end and exits. A result
    written to the dead parent's pipe before that thread runs ends the worker by SIGPIPE (the
    default action, which Python replaces); the thread also ends a worker left waiting for the
    result pipe's lock that such a worker held.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGPIPE"):  # not on Windows
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns when the parent has ended
    os._exit(1)


def _study_one(
    batch_size: int,
    *,
    betas: tuple[float, ...],
    dim: int,
    target: float,
    max_steps: int,
    refinements: int,
) -> dict:
    h = curvatures(dim)
    options = dict(h=h, target=target, max_steps=max_steps, refinements=refinements)
    sgd_steps, sgd_lr = tune(batch_size, 0.0, **options)
    by_beta = {
        beta: (sgd_steps, sgd_lr) if beta == 0.0 else tune(batch_size, beta, **options)
        for beta in betas
    }
    best_beta = min(by_beta, key=lambda beta: (by_beta[beta][0], beta))
    best_steps, best_lr = by_beta[best_beta]
    return {
        "batch_size": int(batch_size),
        "dim": dim,
        "sgd_steps": _int_or_none(sgd_steps),
        "momentum_steps": _int_or_none(best_steps),
        "sgd_lr": _float_or_none(sgd_lr),
        "momentum_lr": _float_or_none(best_lr),
        "momentum_beta": best_beta,
        "momentum_ema_lr": _float_or_none(best_lr / (1.0 - best_beta)),
        "by_beta": {
            str(beta): {
                "steps": _int_or_none(steps),
                "lr": _float_or_none(lr),
                "ema_lr": _float_or_none(lr / (1.0 - beta)),
            }
            for beta, (steps, lr) in by_beta.items()
        },
    }


def row_dim(row: dict) -> int:
    """The dimension ``d`` of a row of :func:`study` (rows written before it was recorded: the
    default, which they were run at)."""
    return row.get("dim", DIMENSION)


def _int_or_none(steps: float) -> int | None:
    return int(steps) if math.isfinite(steps) else None


def _float_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def plot(rows: Sequence[dict], path: str | pathlib.Path | BinaryIO) -> None:
    """Steps to target vs batch size (log-log) and momentum's speed-up over SGD, as a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    batch = np.array([row["batch_size"] for row in rows], dtype=float)
    sgd = np.array([np.nan if row["sgd_steps"] is None else row["sgd_steps"] for row in rows])
    mom = np.array(
        [np.nan if row["momentum_steps"] is None else row["momentum_steps"] for row in rows]
    )
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax, ax_ratio = fig.subplots(1, 2, width_ratios=(3, 2))
    ax.loglog(batch, sgd, "o-", label="SGD (lr tuned per batch size)")
    ax.loglog(batch, mom, "s--", label="heavy-ball momentum (lr and beta tuned)")
    reached = np.flatnonzero(np.isfinite(sgd))  # batch sizes may not have reached the target
    if reached.size:
        i = reached[0]
        scaling = sgd[i] * batch[i] / batch
        ax.loglog(batch, scaling, ":", color="gray", label="perfect scaling (1/B)")
    for row, b, s in zip(rows, batch, mom, strict=True):
        if np.isfinite(s):
            ax.annotate(
                exact_text(row["momentum_beta"]),
                (b, s),
                textcoords="offset points",
                xytext=(0, -12),
                ha="center",
                fontsize=7,
                color="C1",
            )
    steps = np.concatenate([sgd, mom])
    if np.isfinite(steps).any():
        ax.set_ylim(bottom=np.nanmin(steps) / 3)
    ax.set_xlabel("batch size B (examples per step)")
    ax.set_ylabel("steps to expected loss 0.01")
    ax.set_title("Steps to target vs batch size")
    ax.text(
        0.02,
        0.02,
        "numbers under the squares: the best beta",
        transform=ax.transAxes,
        fontsize=8,
        color="C1",
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    ratio = sgd / mom
    ax_ratio.semilogx(batch, ratio, "o-", color="C2")
    ax_ratio.axhline(1.0, color="gray", ls=":")
    ax_ratio.set_yscale("log")
    ratio_top = np.nanmax(ratio) if np.isfinite(ratio).any() else 1.0
    ax_ratio.set_yticks([t for t in (1, 1.5, 2, 3, 5, 10, 20, 50, 100) if t <= 1.5 * ratio_top])
    ax_ratio.yaxis.set_major_formatter(ScalarFormatter())
    ax_ratio.yaxis.set_minor_formatter(NullFormatter())
    ax_ratio.set_xlabel("batch size B (examples per step)")
    ax_ratio.set_ylabel("SGD steps / momentum steps")
    ax_ratio.set_title("Momentum's speed-up (1 = no gain)")
    ax_ratio.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"Noisy quadratic model (Zhang et al. 2019; d = {row_dim(rows[0])}, h_i = 1/i), "
        "each point at its best lr"
    )
    fig.savefig(path, dpi=120, format="png")


def write(rows: Sequence[dict], out_dir: str | pathlib.Path) -> None:
    """Writes ``out_dir/nqm.json`` and ``out_dir/nqm.png`` (nothing if interrupted while
    drawing)."""
    write_json_and_figure(out_dir, "nqm", list(rows), functools.partial(plot, rows))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``nqm`` subcommand."""
    add_out_argument(parser, default="results")
    parser.add_argument(
        "--batch-sizes",
        metavar="LIST",
        # Not bounded by int32 (the closed form trains nothing), but a float64 in it.
        type=functools.partial(positive_int_list, limit=MAX_BATCH_SIZE),
        default=",".join(str(b) for b in BATCH_SIZES),
        help="comma-separated batch sizes below 2**53 (default: 1, 2, 4, ..., 65536)",
    )
    parser.add_argument(
        "--betas",
        metavar="LIST",
        type=finite_float_list,
        default=",".join(f"{beta:g}" for beta in BETAS),
        help="comma-separated momentum grid (default: %(default)s)",
    )
    parser.add_argument(
        "--dim",
        metavar="N",
        type=int_in(1, MAX_DIMENSION),
        default=DIMENSION,
        help=f"dimension d, at most {MAX_DIMENSION:_} (default: {DIMENSION}); tuning takes "
        f"about {MEMORY_PER_DIMENSION // 1000} kB of memory per dimension and worker",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        default=usable_cores(),
        help="processes to share the batch sizes, at most one each (default: usable cores)",
    )


def run(args: argparse.Namespace) -> int:
    """The ``nqm`` subcommand: tunes, writes ``nqm.json`` and ``nqm.png``, prints a table.

    Raises:
      UsageError: a repeated batch size or beta, a beta outside [0, 1), or ``--out`` in use by
        another process.
    """
    check_unique("--batch-sizes", args.batch_sizes)
    check_unique("--betas", args.betas)
    check_betas(args.betas)
    with locked_out(args.out, ["nqm.json", "nqm.png"]) as lock:  # refused before the work
        rows = study(sorted(args.batch_sizes), args.betas, dim=args.dim, workers=args.workers)
        lock.hold()  # a DIR made meanwhile by another process's command is refused
        write(rows, args.out)
    print(format_table(rows))
    print(f"wrote {pathlib.Path(args.out) / 'nqm.json'} and nqm.png")
    return 0


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of the study's rows."""
    lines = [
        "| batch | SGD steps | momentum steps | SGD a | momentum a | beta | eta = a/(1-beta) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    number = lambda value: "-" if value is None else f"{value:.3g}"
    for row in rows:
        lines.append(
            f"| {row['batch_size']} | {row['sgd_steps'] or '-'} | {row['momentum_steps'] or '-'} "
            f"| {number(row['sgd_lr'])} | {number(row['momentum_lr'])} "
            f"| {exact_text(row['momentum_beta'])} | {number(row['momentum_ema_lr'])} |"
        )
    return "\n".join(lines)
