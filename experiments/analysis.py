r"""Pure analyses over the engine's stored results (see the results schema).

Inputs are the records of ``runs.jsonl`` (a list of dicts) and the arrays of
the ``curves/*.npz`` sidecars. Nothing here trains or plots.

* :func:`best_settings` — the best learning rate per ``(batch_size, beta)``
  and its seed statistics (the steps-to-result table).
* :func:`fit_steps_vs_batch` — the Shallue / McCandlish trade-off
  ``(S / S_min - 1)(E / E_min - 1) = 1`` with ``E = S B``, i.e.
  ``S(B) = S_min (1 + B_crit / B)``, fitted by least squares in log space.
* :func:`oscillation` and :func:`oscillation_by_window` — step-to-step noise of
  the mini-batch loss around its trend; :func:`window_means` for
  ``grad_norm`` over training.
* :func:`effective_batch_comparison` — is momentum at batch ``B`` like SGD at
  ``B (1 + beta) / (1 - beta)``?
"""

from __future__ import annotations

import collections
import itertools
import math
import pathlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments.store import read_curves_file

Record = Mapping[str, Any]
Curves = Mapping[str, Mapping[str, np.ndarray]]


def _steps(record: Record) -> float:
    steps = record.get("steps_to_target")
    return math.inf if steps is None or record.get("diverged") else float(steps)


def _final_loss(record: Record) -> float:
    loss = record.get("final_train_loss")
    if loss is None or record.get("diverged") or not math.isfinite(loss):
        return math.inf
    return float(loss)


def filter_records(records: Iterable[Record], **equal: Any) -> list[Record]:
    """The records whose fields equal the given values (floats compared with ``isclose``)."""

    def matches(record: Record) -> bool:
        for key, value in equal.items():
            got = record.get(key)
            if isinstance(value, float) and isinstance(got, int | float):
                if not math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12):
                    return False
            elif got != value:
                return False
        return True

    return [record for record in records if matches(record)]


def seed_stats(records: Sequence[Record]) -> dict:
    """Statistics over the seeds of one configuration.

    Returns:
      ``seeds``; ``reached`` (seeds that reached the target); ``steps_median``
      (over all seeds, a seed that never reached counting as infinitely slow, so
      it is ``None`` unless more than half reached); ``steps_mean``,
      ``steps_std`` (population std), ``steps_min``, ``steps_max`` over the seeds
      that reached; ``final_train_loss`` (median over all seeds, a seed without
      a finite one, e.g. diverged, counting as infinitely high, so it is ``None``
      unless more than half have one),
      ``final_test_accuracy`` (mean over seeds that have a finite one); ``diverged``
      (count).
    """
    steps = np.array([_steps(r) for r in records])
    reached = steps[np.isfinite(steps)]
    median = float(np.median(steps)) if steps.size else math.inf
    losses = np.array([_final_loss(r) for r in records])
    loss = float(np.median(losses)) if losses.size else math.inf
    accuracy = [
        r["final_test_accuracy"] for r in records
        if r.get("final_test_accuracy") is not None and math.isfinite(r["final_test_accuracy"])
    ]  # fmt: skip
    return {
        "seeds": len(records),
        "reached": int(reached.size),
        "steps_median": median if math.isfinite(median) else None,
        "steps_mean": float(reached.mean()) if reached.size else None,
        "steps_std": float(reached.std()) if reached.size else None,
        "steps_min": float(reached.min()) if reached.size else None,
        "steps_max": float(reached.max()) if reached.size else None,
        "final_train_loss": loss if math.isfinite(loss) else None,
        "final_test_accuracy": float(np.mean(accuracy)) if accuracy else None,
        "diverged": int(sum(bool(r.get("diverged")) for r in records)),
    }


def _rank(stats: Mapping[str, Any], lr: float) -> tuple[float, float, float]:
    steps = math.inf if stats["steps_median"] is None else stats["steps_median"]
    loss = math.inf if stats["final_train_loss"] is None else stats["final_train_loss"]
    return (steps, loss, lr)


def best_settings(records: Iterable[Record]) -> list[dict]:
    """The best learning rate for every ``(batch_size, beta)`` in ``records``.

    Criterion: the smallest median over seeds of ``steps_to_target`` (a seed
    that did not reach the target, or diverged, counts as infinitely slow);
    ties, including "no learning rate reached the target with more than half
    of its seeds", are broken by the smaller median final train loss, then by
    the smaller learning rate. Records of different datasets, models or budgets must be
    separated first (:func:`filter_records`): a seed recorded twice at one setting raises
    ``ValueError``.

    Returns:
      Rows sorted by ``(beta, batch_size)``: ``batch_size``, ``beta``, ``lr``,
      ``lrs_tried``, the :func:`seed_stats` of the chosen lr, and
      ``lr_at_grid_edge`` (the chosen lr is the smallest or largest tried, so
      the grid may not contain the optimum).
    """
    groups: dict[tuple[int, float], dict[float, list[Record]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for record in records:
        groups[(int(record["batch_size"]), float(record["beta"]))][float(record["lr"])].append(
            record
        )
    rows = []
    for (batch_size, beta), by_lr in groups.items():
        for lr, runs in by_lr.items():
            seeds = collections.Counter(r.get("seed") for r in runs)
            twice = [seed for seed, count in seeds.items() if count > 1]
            if twice:
                raise ValueError(
                    f"batch_size={batch_size}, beta={beta}, lr={lr}: seed {twice[0]} has "
                    f"{seeds[twice[0]]} records; a seed counts once (separate runs of other "
                    "settings, e.g. another budget, first)"
                )
        stats = {lr: seed_stats(runs) for lr, runs in by_lr.items()}
        best = min(by_lr, key=lambda lr, stats=stats: _rank(stats[lr], lr))
        tried = sorted(by_lr)
        rows.append(
            {
                "batch_size": batch_size,
                "beta": beta,
                "lr": best,
                "lrs_tried": tried,
                "lr_at_grid_edge": len(tried) > 1 and best in (tried[0], tried[-1]),
                **stats[best],
            }
        )
    return sorted(rows, key=lambda row: (row["beta"], row["batch_size"]))


def steps_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`best_settings` rows (steps: median, mean ± std, range)."""
    lines = [
        "| beta | batch | best lr | steps to target: median (all seeds) | mean ± std "
        "(seeds that reached) | min-max (seeds that reached) | seeds reached "
        "| final train loss (median) | test accuracy (mean) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    for row in rows:
        # One seed that reached has no seed-to-seed spread (its std, 0, is not a measurement).
        std = "n/a" if row["reached"] < 2 else format(row["steps_std"], ".0f")
        spread = "-" if row["steps_mean"] is None else f"{row['steps_mean']:.0f} ± {std}"
        span = "-" if row["steps_min"] is None else f"{row['steps_min']:.0f}-{row['steps_max']:.0f}"
        edge = " (grid edge)" if row["lr_at_grid_edge"] else ""
        # Where half the seeds or more diverged at every lr, the tie-break's pick is no best lr.
        lr = "none (diverged)" if row["final_train_loss"] is None else f"{row['lr']:.3g}{edge}"
        lines.append(
            f"| {row['beta']:g} | {row['batch_size']} | {lr} "
            f"| {fmt(row['steps_median'], '.0f')} | {spread} | {span} "
            f"| {row['reached']}/{row['seeds']} | {fmt(row['final_train_loss'], '.4f')} "
            f"| {fmt(row['final_test_accuracy'], '.3f')} |"
        )
    return "\n".join(lines)


class ScalingFit(NamedTuple):
    """``S(B) = S_min (1 + B_crit / B)`` fitted to steps-to-target vs batch size."""

    s_min: float  # fewest steps (the large-batch limit)
    b_crit: float  # critical batch size, E_min / S_min
    e_min: float  # fewest examples (the small-batch limit), S_min * B_crit
    rms_log_residual: float  # root-mean-square of log(S) - log(fit)
    b_crit_at_bound: bool  # True when B_crit hit the search range: not determined by the data


def fit_steps_vs_batch(
    batch_sizes: Sequence[float], steps: Sequence[float], *, grid_points: int = 4001
) -> ScalingFit:
    """Fits ``S(B) = S_min (1 + B_crit / B)`` by least squares on ``log S``.

    For a fixed ``B_crit`` the best ``log S_min`` is the mean of
    ``log S - log(1 + B_crit / B)``, so only ``B_crit`` is searched: on a log
    grid from ``min(B) / 10^4`` to ``max(B) * 10^4``, then on a finer grid around
    the best point. ``B_crit`` far below the measured batch sizes means "steps
    no longer fall with B" (no scaling regime measured), far above means
    "perfect scaling throughout"; both are flagged with ``b_crit_at_bound``.

    Args:
      batch_sizes: Batch sizes (at least 2 distinct values).
      steps: Steps to target at those batch sizes (finite, > 0; drop the others).
      grid_points: Points of each search grid.

    Returns:
      A :class:`ScalingFit`.
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(
            f"batch_sizes and steps must be 1-D of one length, got {b.shape}, {s.shape}"
        )
    if np.unique(b).size < 2:
        raise ValueError(f"need at least 2 distinct batch sizes, got {b.tolist()}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0) and np.all(b > 0)):
        raise ValueError(f"steps and batch_sizes must be finite and > 0, got {s.tolist()}")
    log_s = np.log(s)
    lo, hi = np.log(b.min()) - 4 * np.log(10), np.log(b.max()) + 4 * np.log(10)

    def solve(log_bc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = np.log1p(np.exp(log_bc[:, None]) / b[None, :])
        log_s_min = (log_s[None, :] - shape).mean(axis=1)
        residual = log_s[None, :] - log_s_min[:, None] - shape
        return log_s_min, np.mean(residual**2, axis=1)

    grid = np.linspace(lo, hi, grid_points)
    _, loss = solve(grid)
    i = int(np.argmin(loss))
    step = grid[1] - grid[0]
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)], grid_points)
    log_s_min, loss = solve(fine)
    j = int(np.argmin(loss))
    log_bc = fine[j]
    s_min = float(np.exp(log_s_min[j]))
    b_crit = float(np.exp(log_bc))
    return ScalingFit(
        s_min=s_min,
        b_crit=b_crit,
        e_min=s_min * b_crit,
        rms_log_residual=float(np.sqrt(loss[j])),
        b_crit_at_bound=bool(log_bc <= lo + step or log_bc >= hi - step),
    )


def fit_from_rows(rows: Sequence[Mapping[str, Any]], beta: float) -> ScalingFit | None:
    """:func:`fit_steps_vs_batch` on the median steps of :func:`best_settings` rows of one beta.

    Batch sizes whose best setting did not reach the target are left out;
    ``None`` if fewer than 2 remain.
    """
    points = [
        (row["batch_size"], row["steps_median"])
        for row in rows
        if math.isclose(row["beta"], beta) and row["steps_median"] is not None
    ]
    if len({batch for batch, _ in points}) < 2:
        return None
    batch, steps = zip(*points, strict=True)
    return fit_steps_vs_batch(batch, steps)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid"), -1, values)


def detrended(batch_loss: np.ndarray, window: int = 51, *, log: bool = True) -> np.ndarray:
    """Residual of the per-step batch loss around its centred moving average.

    Args:
      batch_loss: ``[R, steps]`` (or ``[steps]``) mini-batch losses.
      window: Odd length of the centred moving average, in steps.
      log: Work with ``log(loss)``, so the spread is relative (a ratio to the
        trend); with ``False`` it is in loss units.

    Returns:
      ``[R, steps - window + 1]``: the residual at steps
      ``window // 2 .. steps - 1 - window // 2``.
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 3, got {window}")
    values = np.atleast_2d(np.asarray(batch_loss, dtype=np.float64))
    if values.shape[-1] < window:
        raise ValueError(f"need at least window={window} steps, got {values.shape[-1]}")
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log(values)
    half = window // 2
    # A loss of 0 (float32 underflow) or a diverged run's NaN: NaN where the window holds it.
    with np.errstate(invalid="ignore"):
        return values[:, half : values.shape[-1] - half] - _moving_average(values, window)


def oscillation(
    batch_loss: np.ndarray, *, window: int = 51, last_fraction: float = 0.2, log: bool = True
) -> np.ndarray:
    """The late-training oscillation of each run: std of the detrended batch loss.

    The measure: take ``log(batch loss)`` at every step, subtract its centred
    moving average over ``window`` steps (the trend), and report the standard
    deviation of what is left over the last ``last_fraction`` of the steps. With
    ``log=True`` it is a relative spread (0.1 = the batch loss typically sits
    ~10% above or below its trend), comparable across runs at different loss
    levels. A run with a NaN or infinite loss in the window (diverged) gives NaN.

    Returns:
      ``[R]`` oscillation values.
    """
    if not 0 < last_fraction <= 1:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}")
    residual = detrended(batch_loss, window, log=log)
    start = residual.shape[-1] - max(2, round(last_fraction * residual.shape[-1]))
    late = residual[:, max(start, 0) :]
    finite = np.isfinite(late).all(axis=-1)
    values = np.full(late.shape[0], np.nan)
    values[finite] = np.std(late[finite], axis=-1)  # the std of an inf would warn
    return values


def oscillation_by_window(
    batch_loss: np.ndarray, *, num_windows: int = 10, window: int = 51, log: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The same measure over ``num_windows`` successive windows through training.

    Returns:
      ``(centers, values)``: the centre step of each window ``[num_windows]``
      and the std of the detrended loss in it, ``[R, num_windows]`` (NaN where
      the window holds a non-finite value).
    """
    residual = detrended(batch_loss, window, log=log)
    if num_windows < 1 or residual.shape[-1] < 2 * num_windows:
        raise ValueError(f"num_windows={num_windows} too large for {residual.shape[-1]} steps")
    edges = np.linspace(0, residual.shape[-1], num_windows + 1).astype(int)
    values = np.full((residual.shape[0], num_windows), np.nan)
    for k in range(num_windows):
        part = residual[:, edges[k] : edges[k + 1]]
        ok = np.isfinite(part).all(axis=-1)
        values[ok, k] = part[ok].std(axis=-1)
    centers = (edges[:-1] + edges[1:]) / 2 + window // 2
    return centers, values


def window_means(values: np.ndarray, num_windows: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Mean of a per-step quantity (e.g. ``grad_norm``) over successive windows.

    Returns:
      ``(centers, means)`` with ``means`` of shape ``[R, num_windows]`` (NaN
      where a window holds a non-finite value).
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if num_windows < 1 or values.shape[-1] < num_windows:
        raise ValueError(f"num_windows={num_windows} too large for {values.shape[-1]} steps")
    edges = np.linspace(0, values.shape[-1], num_windows + 1).astype(int)
    means = np.stack([values[:, a:b].mean(axis=-1) for a, b in itertools.pairwise(edges)], axis=-1)
    return (edges[:-1] + edges[1:] - 1) / 2, means


def load_curves(run_dir: str | pathlib.Path, records: Iterable[Record]) -> dict[str, dict]:
    """Loads every curves sidecar that ``records`` refer to, keyed by its relative path.

    Raises:
      ValueError: naming the file, if one is missing or cannot be read whole (truncated,
        emptied, not an ``.npz``, a failed CRC).
    """
    return {
        path: read_curves_file(run_dir, path)
        for path in sorted({record["curves"] for record in records})
    }


def curve(record: Record, curves: Curves, name: str) -> np.ndarray:
    """The row of array ``name`` (e.g. ``"batch_loss"``) that belongs to ``record``."""
    return np.asarray(curves[record["curves"]][name][record["curve_index"]])


def effective_batch_comparison(
    records: Sequence[Record],
    curves: Curves,
    *,
    lr: float,
    beta: float,
    batch_size: int,
    window: int = 51,
    last_fraction: float = 0.2,
) -> dict:
    """Momentum at batch ``B`` vs SGD at ``B`` and at ``B (1 + beta) / (1 - beta)``, one lr.

    For i.i.d. gradient noise the EMA buffer's variance is ``(1 - beta) / (1 +
    beta)`` of one gradient's, the variance of a batch ``(1 + beta) / (1 -
    beta)`` times larger. This pulls the runs that test whether training
    behaves accordingly, all at the same EMA-form learning rate ``lr``. When the
    effective batch was not run, the nearest batch size run with SGD at this lr
    (in log distance) is used and reported.

    Returns:
      ``{"effective_batch": float, "momentum": ..., "sgd_same_batch": ...,
      "sgd_effective_batch": ...}``; each entry ``None`` when missing, else
      ``batch_size``, ``beta``, the :func:`seed_stats` of its seeds, and
      ``oscillation`` (mean over seeds of :func:`oscillation`) and
      ``oscillation_std`` (over seeds).
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    effective = batch_size * (1 + beta) / (1 - beta)
    at_lr = filter_records(records, lr=float(lr))
    sgd_batches = sorted({int(r["batch_size"]) for r in filter_records(at_lr, beta=0.0)})
    nearest = min(sgd_batches, key=lambda b: abs(math.log(b / effective))) if sgd_batches else None

    def summary(batch: int | None, b: float) -> dict | None:
        if batch is None:
            return None
        runs = filter_records(at_lr, beta=float(b), batch_size=int(batch))
        if not runs:
            return None
        osc = np.array(
            [
                oscillation(
                    curve(run, curves, "batch_loss"), window=window, last_fraction=last_fraction
                )[0]
                for run in runs
            ]
        )
        return {
            "batch_size": int(batch),
            "beta": float(b),
            **seed_stats(runs),
            "oscillation": float(np.mean(osc)),
            "oscillation_std": float(np.std(osc)),
        }

    return {
        "effective_batch": effective,
        "momentum": summary(batch_size, beta),
        "sgd_same_batch": summary(batch_size, 0.0),
        "sgd_effective_batch": summary(nearest, 0.0),
    }
