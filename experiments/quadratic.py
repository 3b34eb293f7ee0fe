r"""The course picture: SGD vs EMA momentum on a noisy, ill-conditioned 2-D quadratic.

Loss :math:`L(\theta) = \tfrac12 (h_1 \theta_1^2 + h_2 \theta_2^2)` with a steep
axis (:math:`h_1 = 1`) and a flat one (:math:`h_2 = 0.03`). A mini-batch
gradient is the true gradient plus Gaussian noise of standard deviation
:math:`\sigma / \sqrt{B}` per coordinate, the scaling of a mean over :math:`B`
independent examples. Both optimizers are ``emm.ema_sgd`` with the same
learning rate :math:`\eta` (``beta = 0`` is plain SGD): in the EMA form a
constant gradient :math:`g` moves both by :math:`\eta g` per step once the
velocity, :math:`(1 - \beta^t) g` after :math:`t` steps from zero, has built up
(momentum ends :math:`\beta / (1 - \beta)` of SGD's steps behind), so the
comparison isolates what averaging does. Both see the same noise draws.

The step size is chosen near SGD's stability limit on the steep axis
(:math:`\eta h_1 = 1.6 < 2`), which is where SGD's zig-zag lives: each step
overshoots the valley floor and flips the sign of :math:`\theta_1`. EMA momentum
is heavy ball with step :math:`a = \eta (1 - \beta)`, stable for
:math:`a h < 2 (1 + \beta)`, i.e. :math:`\eta h < 2 (1 + \beta) / (1 - \beta)`
(38 at :math:`\beta = 0.9`), so at this :math:`\eta` it is far from its limit.

Each comparison is repeated over ``SEEDS`` noise seeds (both optimizers see the
same draws in a seed, so the comparison is paired); the figure draws the first.
"""

from __future__ import annotations

import argparse
import functools
import math
import numbers
import pathlib
from collections.abc import Sequence
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_momentum as emm
from experiments.cli import (
    add_out_argument,
    check_one_process,
    int_in,
    locked_out,
    non_negative_int,
    seed_count,
)
from experiments.store import write_json_and_figure

HELP = "the course picture: SGD vs EMA momentum on a noisy ill-conditioned 2-D quadratic"
DESCRIPTION = """\
The course picture: SGD vs EMA momentum on a noisy, ill-conditioned 2-D quadratic.

Loss 0.5 (h1 theta1^2 + h2 theta2^2) with a steep axis (h1 = 1) and a flat one (h2 = 0.03). A
mini-batch gradient is the true gradient plus Gaussian noise of std 1/sqrt(B) per coordinate.
Both optimizers are ema_sgd with the same learning rate eta = 1.6 (beta = 0 is plain SGD), near
SGD's stability limit on the steep axis (eta h1 < 2), where SGD zig-zags across the valley (EMA
momentum is stable up to eta h < 2 (1 + beta) / (1 - beta), 38 at beta = 0.9). Both see the
same noise draws in a seed; --seeds seeds are summarized and the first is drawn.

Writes OUT/quadratic.json (paths and per-seed summaries) and OUT/quadratic.png."""
CURVATURES = (1.0, 0.03)
START = (-2.0, 3.0)
LEARNING_RATE = 1.6
BETA = 0.9
NOISE_STD = 1.0
BATCH_SIZES = (4, 256)
STEPS = 80
MAX_STEPS = 100_000  # a 2-D toy: its paths are kept in memory and in quadratic.json
SEEDS = 16
SEED_LIMIT = 2**32  # jax.random.key keeps a seed's low 32 bits: 2**32 + 5 draws what 5 draws


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    # An int-like float would be truncated somewhere (a batch size of 2.5 drew noise for 2.5 but
    # was recorded as 2), and a seed past 2**32 silently repeats a smaller one's draws.
    if (
        not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value >= high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def loss(theta: np.ndarray, curvatures: Sequence[float] = CURVATURES) -> np.ndarray:
    """``0.5 * sum_i h_i theta_i^2`` over the last axis."""
    return 0.5 * np.sum(np.asarray(curvatures) * np.asarray(theta) ** 2, axis=-1)


def trajectory(
    learning_rate: float,
    beta: float,
    batch_size: int,
    *,
    steps: int = STEPS,
    curvatures: Sequence[float] = CURVATURES,
    start: Sequence[float] = START,
    noise_std: float = NOISE_STD,
    seed: int = 0,
) -> np.ndarray:
    """Runs ``emm.ema_sgd(learning_rate, beta)`` on the noisy quadratic.

    Args:
      learning_rate: EMA-form learning rate ``eta`` (finite, ``>= 0``).
      beta: Momentum, in ``[0, 1)``; 0 is SGD.
      batch_size: ``B``; the gradient noise has std ``noise_std / sqrt(B)``.
      steps: Number of optimizer steps.
      curvatures: ``(h_1, h_2)``.
      start: Initial parameters.
      noise_std: Per-example gradient noise std ``sigma`` (finite, ``>= 0``).
      seed: Seed of the noise draws (the same for every optimizer), in ``[0, 2**32)``.

    Returns:
      The parameters at steps ``0..steps``, shape ``[steps + 1, 2]``.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("steps", steps, 0)
    _check_int("seed", seed, 0, SEED_LIMIT)
    # _descend traces learning_rate and beta, so ema_sgd's own checks see no values there: a beta
    # of 1 ran a frozen "momentum" whose zero travel read as damping, a nan one a path of nans.
    for name, value in (("learning_rate", learning_rate), ("beta", beta)):
        if not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number, got {name}={value!r}")
    emm.ema_sgd(learning_rate, beta)  # a finite learning_rate >= 0 and beta in [0, 1), or raises
    if not (isinstance(noise_std, numbers.Real) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got noise_std={noise_std!r}")
    # A nan or inf among them gave a path of nans; a length mismatch, an error from inside jit.
    shape = np.shape(curvatures)
    if len(shape) != 1 or np.shape(start) != shape or not np.isfinite([curvatures, start]).all():
        raise ValueError(
            f"curvatures and start must be finite numbers, as many of each, got "
            f"curvatures={curvatures!r}, start={start!r}"
        )
    h = jnp.asarray(curvatures, dtype=jnp.float32)
    noise = jax.random.normal(jax.random.key(seed), (steps, h.size), dtype=jnp.float32)
    noise = noise * (noise_std / np.sqrt(batch_size))
    theta0 = jnp.asarray(start, dtype=jnp.float32)
    path = _descend(jnp.float32(learning_rate), jnp.float32(beta), theta0, h, noise)
    return np.concatenate([np.asarray(theta0)[None], np.asarray(path)])


@jax.jit
def _descend(learning_rate, beta, theta0, h, noise):
    # Traced hyperparameters: one compilation serves every (eta, beta).
    optimizer = emm.ema_sgd(learning_rate, beta)

    def step(carry, eps):
        theta, state = carry
        grad = h * theta + eps
        updates, state = optimizer.update(grad, state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, state), theta

    return jax.lax.scan(step, (theta0, optimizer.init(theta0)), noise)[1]


def summarize(path: np.ndarray, curvatures: Sequence[float] = CURVATURES) -> dict:
    """Numbers that describe a trajectory.

    Returns:
      ``final_loss``; ``mean_loss_second_half`` (over steps ``steps/2..steps``,
      less sensitive to the last draw); ``path_length`` (sum of step lengths);
      ``mean_cos_successive`` (mean cosine between successive steps: -1 is a
      perfect zig-zag, +1 a straight line); ``reversal_fraction`` (fraction of
      successive steps whose directions differ by more than 90 degrees);
      ``steep_axis_travel`` (sum of ``|delta theta_1|``, the back-and-forth
      across the valley); ``steep_loss_second_half`` and
      ``flat_loss_second_half`` (the two axes' terms of
      ``mean_loss_second_half``); ``flat_half_steps`` (the first step at which
      ``|theta_2|`` is at most half its start, ``None`` if never: the speed
      along the flat axis, where the gradient keeps its sign).

    Raises:
      ValueError: for a path of fewer than 3 points, or one with a non-finite point (a run
        that diverged), whose statistics would be nan or wrong.
    """
    path = np.asarray(path, dtype=np.float64)
    # Two steps are the fewest with a successive-step cosine (the mean of none is nan).
    if path.ndim != 2 or path.shape[0] < 3 or path.shape[1] != len(curvatures):
        raise ValueError(
            f"path must be [steps + 1 >= 3, {len(curvatures)}] (one row per step), got shape "
            f"{path.shape}"
        )
    # A run that overflowed has nan steps, which every statistic below would take as "no
    # reversal", "not halved" or nan: wrong numbers, or JSON that cannot be written.
    finite = np.isfinite(path).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"path is not finite from step {int(np.argmin(finite))} on (the run diverged: a "
            f"smaller learning_rate keeps it finite)"
        )
    steps = np.diff(path, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    cosine = np.sum(steps[1:] * steps[:-1], axis=1) / np.maximum(lengths[1:] * lengths[:-1], 1e-30)
    losses = loss(path, curvatures)
    per_axis = 0.5 * np.asarray(curvatures) * path**2
    half = len(losses) // 2
    halved = np.abs(path[:, 1]) <= 0.5 * np.abs(path[0, 1])
    return {
        "final_loss": float(losses[-1]),
        "mean_loss_second_half": float(losses[half:].mean()),
        "path_length": float(lengths.sum()),
        "mean_cos_successive": float(cosine.mean()),
        "reversal_fraction": float(np.mean(cosine < 0)),
        "steep_axis_travel": float(np.abs(steps[:, 0]).sum()),
        "steep_loss_second_half": float(per_axis[half:, 0].mean()),
        "flat_loss_second_half": float(per_axis[half:, 1].mean()),
        "flat_half_steps": int(np.argmax(halved)) if halved.any() else None,
    }


def study(
    *,
    learning_rate: float = LEARNING_RATE,
    beta: float = BETA,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    steps: int = STEPS,
    seed: int = 0,
    seeds: int = SEEDS,
) -> dict:
    """Trajectories and summaries for SGD and EMA momentum at each batch size.

    Args:
      learning_rate: The shared EMA-form learning rate ``eta``.
      beta: Momentum's beta, in ``(0, 1)``.
      batch_sizes: Distinct batch sizes ``B`` (the noise std is ``1 / sqrt(B)``).
      steps: Optimizer steps.
      seed: The first noise seed; its trajectories are the ones stored and drawn.
      seeds: How many noise seeds, ``seed .. seed + seeds - 1`` (all below ``2**32``), are
        summarized.

    Returns:
      ``{"setup": {...}, "runs": [{"optimizer", "beta", "batch_size", "summary",
      "path", "seed_summaries"}, ...]}`` with ``path`` a list of
      ``[theta_1, theta_2]`` and ``summary`` its :func:`summarize`, both of the
      first seed, and ``seed_summaries`` the summary of every seed in order.
    """
    # Checked before anything runs; two steps are the fewest with a successive-step cosine.
    _check_int("seeds", seeds, 1, SEED_LIMIT + 1)
    _check_int("steps", steps, 2)
    _check_int("seed", seed, 0, SEED_LIMIT - seeds + 1)
    for batch_size in batch_sizes:
        _check_int("batch_size", batch_size, 1)
    # Each batch size is one panel of two runs, SGD and momentum: a repeated one failed only when
    # drawing, after the work, and so did none; beta 0 ran SGD twice, one of them labelled "EMA
    # momentum", in a quadratic.json the report refuses (no momentum run to pair SGD with).
    if len(batch_sizes) == 0 or len(set(batch_sizes)) != len(batch_sizes):
        raise ValueError(
            f"batch_sizes must be distinct, at least one, got batch_sizes={list(batch_sizes)}"
        )
    if not (isinstance(beta, numbers.Real) and 0 < beta < 1):
        raise ValueError(f"beta must be in (0, 1) (momentum, compared with SGD), got beta={beta!r}")
    runs = []
    for batch_size in batch_sizes:
        for name, b in (("SGD", 0.0), ("EMA momentum", beta)):
            # Summarized as they come: the CLI's 10_000 seeds of 100_000 steps held 8 GB of paths.
            first, seed_summaries = None, []
            for i in range(seeds):
                path = trajectory(learning_rate, b, batch_size, steps=steps, seed=seed + i)
                try:
                    seed_summaries.append(summarize(path))
                except ValueError as error:
                    raise ValueError(
                        f"{name} (beta={b:g}) at learning_rate={learning_rate:g}, "
                        f"batch_size={batch_size}, seed {seed + i}: {error}"
                    ) from None
                if i == 0:
                    first = path
            runs.append(
                {
                    "optimizer": name,
                    "beta": b,
                    "batch_size": int(batch_size),
                    "summary": seed_summaries[0],
                    "path": first.tolist(),
                    "seed_summaries": seed_summaries,
                }
            )
    setup = {
        "curvatures": list(CURVATURES),
        "start": list(START),
        "learning_rate": learning_rate,
        "beta": beta,
        "noise_std_per_example": NOISE_STD,
        "steps": steps,
        "seed": seed,
        "seeds": seeds,
    }
    return {"setup": setup, "runs": runs}


def plot(result: dict, path: str | pathlib.Path | BinaryIO) -> None:
    """One panel per batch size: loss contours and both optimizers' paths, as a PNG."""
    from matplotlib.figure import Figure

    batch_sizes = sorted({run["batch_size"] for run in result["runs"]})
    paths = np.concatenate([np.asarray(run["path"]) for run in result["runs"]])
    lim1 = 1.15 * np.abs(paths[:, 0]).max()
    lim2 = 1.15 * np.abs(paths[:, 1]).max()
    grid1, grid2 = np.meshgrid(np.linspace(-lim1, lim1, 300), np.linspace(-lim2, lim2, 300))
    surface = loss(np.stack([grid1, grid2], axis=-1))
    setup = result["setup"]
    fig = Figure(figsize=(6.5 * len(batch_sizes), 6.5), layout="constrained")
    axes = fig.subplots(1, len(batch_sizes), squeeze=False)[0]
    for ax, batch_size in zip(axes, batch_sizes, strict=True):
        ax.contour(
            grid1,
            grid2,
            surface,
            levels=np.geomspace(0.01, surface.max(), 12),
            colors="0.75",
            linewidths=0.8,
        )
        for run, color in zip(
            [run for run in result["runs"] if run["batch_size"] == batch_size],
            ("C3", "C0"),
            strict=True,
        ):
            trail = np.asarray(run["path"])
            summary = run["summary"]
            label = (
                f"{run['optimizer']} (beta={run['beta']:g}): mean loss over the 2nd half "
                f"{summary['mean_loss_second_half']:.3f}, mean cos of successive steps "
                f"{summary['mean_cos_successive']:+.2f}"
            )
            ax.plot(trail[:, 0], trail[:, 1], "-o", color=color, ms=2.5, lw=1, label=label)
        ax.plot(*setup["start"], "k*", ms=12, label="start")
        ax.plot(0, 0, "kx", ms=9, label="minimum")
        ax.set_xlim(-lim1, lim1)
        ax.set_ylim(-lim2, lim2)
        ax.set_xlabel(f"theta_1 (steep direction, h = {setup['curvatures'][0]:g})")
        ax.set_ylabel(f"theta_2 (flat direction, h = {setup['curvatures'][1]:g})")
        ax.set_title(f"batch size {batch_size}: gradient noise std {1 / np.sqrt(batch_size):.2g}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8)
    fig.suptitle(
        f"{setup['steps']} steps of SGD vs EMA momentum, same learning rate "
        f"eta = {setup['learning_rate']:g}, same noise draws"
    )
    fig.savefig(path, dpi=120, format="png")


def write(result: dict, out_dir: str | pathlib.Path) -> None:
    """Writes ``out_dir/quadratic.json`` and ``out_dir/quadratic.png`` (nothing if interrupted
    while drawing)."""
    write_json_and_figure(out_dir, "quadratic", result, functools.partial(plot, result))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``quadratic`` subcommand."""
    add_out_argument(parser, default="results")
    parser.add_argument(
        "--steps",
        metavar="N",
        type=int_in(2, MAX_STEPS),
        default=STEPS,
        help=f"optimizer steps, 2 to {MAX_STEPS:_} (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="first noise seed (default: 0)",
    )
    parser.add_argument(
        "--seeds",
        metavar="N",
        type=seed_count,
        default=SEEDS,
        help="noise seeds summarized, from --seed on; the first is drawn (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """The ``quadratic`` subcommand: writes ``quadratic.json`` and ``quadratic.png``, holding the
    lock of ``--out`` (another process writing there is refused) from before the work; refused
    in a multi-process JAX job, where every process would compute it and write ``--out``."""
    check_one_process("quadratic")
    with locked_out(args.out, ["quadratic.json", "quadratic.png"]) as lock:
        result = study(steps=args.steps, seed=args.seed, seeds=args.seeds)
        lock.hold()  # a DIR made meanwhile by another process's command is refused
        write(result, args.out)
    for item in result["runs"]:
        summary = item["summary"]
        print(
            f"B={item['batch_size']:<4d} {item['optimizer']:<13s} final loss "
            f"{summary['final_loss']:.4f}  mean cos {summary['mean_cos_successive']:+.2f}  "
            f"path length {summary['path_length']:.2f}"
        )
    print(f"wrote {pathlib.Path(args.out) / 'quadratic.json'} and quadratic.png")
    return 0
