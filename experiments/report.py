"""Rebuild DIR/report.md and its figures from a study's stored results, without training.

``python -m experiments report DIR`` reads what ``python -m experiments --out DIR`` stored
(``study.json``, ``sweep/``, ``effective/``, ``quadratic.json``, ``nqm.json``, ``noise_scale.json``,
``baselines.json``) and writes ``DIR/report.md``, ``DIR/figures/*.png`` and ``DIR/verdicts.json``.
Every number in the report is computed here from those files; the verdict on each claim of the
source material follows a rule stated next to it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import io
import itertools
import math
import shlex
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from experiments import analysis
from experiments.store import CorruptStoreError, read_json, read_runs, write_bytes, write_json

HELP = "rebuild DIR/report.md and its figures from stored results (no training)"

FIGURES_DIR = "figures"
SMOOTHING = 51  # steps of the moving average drawn over raw batch-loss curves
FULL_LOSS_WINDOW = 11  # evaluations (of the full training set) in the effective test's trend
DATASET_TITLES = {"mnist1d": "MNIST-1D", "digits": "8x8 digits"}  # the report's title
DATASETS = {
    "mnist1d": "MNIST-1D (4000 training / 1000 test signals of length 40, 10 classes, generated "
    "offline by the `mnist1d` package)",
    "digits": "scikit-learn's 8x8 digits (fixed seeded split, scaled to [0, 1])",
}
MODELS = {
    "linear": "linear (multinomial logistic regression)",
    "mlp": "MLP with two hidden layers of 100 ReLU units (40-100-100-10 on MNIST-1D)",
    "cnn": "CNN of the MNIST-1D paper (3 stride-2 convolutions of 25 channels, then linear)",
}

SUPPORTED, PARTLY, NOT_SUPPORTED, UNSETTLED = (
    "supported",
    "partly supported",
    "not supported",
    "not settled by this run",
)


@dataclasses.dataclass
class Results:
    """Everything a study stored, loaded once."""

    out: Path
    meta: dict
    sweep: list[dict]
    sweep_curves: dict
    effective: list[dict]
    effective_curves: dict
    quadratic: dict | None
    nqm: list[dict] | None
    noise: dict | None
    baselines: dict | None
    extra_sweeps: dict[str, list[dict]]  # other models swept on the same grid

    @property
    def preset(self) -> dict:
        return self.meta["preset"]

    @functools.cached_property
    def best(self) -> list[dict]:
        return analysis.best_settings(self.sweep)

    def betas(self) -> list[float]:
        return sorted({float(r["beta"]) for r in self.sweep})

    def batch_sizes(self) -> list[int]:
        return sorted({int(r["batch_size"]) for r in self.sweep})

    def best_row(self, batch_size: int, beta: float) -> dict | None:
        rows = [
            r for r in self.best if r["batch_size"] == batch_size and math.isclose(r["beta"], beta)
        ]
        return rows[0] if rows else None

    def sweep_runs(self, batch_size: int, beta: float, lr: float) -> list[dict]:
        return analysis.filter_records(
            self.sweep, batch_size=int(batch_size), beta=float(beta), lr=float(lr)
        )

    def fit(self, beta: float) -> analysis.ScalingFit | None:
        return analysis.fit_from_rows(self.best, beta)


def load(out: str | Path) -> Results:
    """Loads a study directory; raises ValueError if it holds no study, or a file of it that
    the report cannot read."""
    from experiments.stage_files import read_stage_file
    from experiments.study import (
        EFFECTIVE_DIR,
        STUDY_FILE,
        SWEEP_DIR,
        Preset,
        sweep_dir,
        valid_meta,
    )

    out = Path(out)
    if not out.exists():
        raise ValueError(f"{str(out)!r} does not exist")
    if not out.is_dir():
        raise ValueError(f"{str(out)!r} is not a directory")
    meta = read_json(out / STUDY_FILE)
    if meta is None:
        hint = (
            "; it holds a sweep's results, and the report reads the directory of the main job "
            "(python -m experiments --out DIR)"
            if (out / "runs.jsonl").exists()
            else ""
        )
        raise ValueError(f"{str(out)!r} holds no study ({STUDY_FILE} is missing){hint}")
    required = {
        f.name
        for f in dataclasses.fields(Preset)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if not valid_meta(meta) or not required <= meta["preset"].keys():
        raise ValueError(f"{str(out / STUDY_FILE)!r} is not a study's record")
    sweep = read_runs(out / SWEEP_DIR)
    effective = read_runs(out / EFFECTIVE_DIR)
    sweep_curves = analysis.load_curves(out / SWEEP_DIR, sweep)
    effective_curves = analysis.load_curves(out / EFFECTIVE_DIR, effective)
    preset = meta["preset"]
    study = {"dataset": preset["dataset"], "model": preset["model"]}  # the effective test's too
    swept = {**study, "target_loss": preset["target_loss"]}
    _check_records(out / SWEEP_DIR, sweep, sweep_curves, study=swept)
    _check_records(
        out / EFFECTIVE_DIR, effective, effective_curves, EFFECTIVE_CURVES_READ, study=study
    )
    extra_sweeps = {
        model: read_runs(out / sweep_dir(model, preset["model"]))
        for model in preset.get("extra_models", [])
    }
    for model, records in extra_sweeps.items():
        _check_records(
            out / sweep_dir(model, preset["model"]), records, study={**swept, "model": model}
        )
    return Results(
        out=out,
        meta=meta,
        sweep=sweep,
        sweep_curves=sweep_curves,
        effective=effective,
        effective_curves=effective_curves,
        quadratic=read_stage_file(out / "quadratic.json"),
        nqm=read_stage_file(out / "nqm.json"),
        noise=read_stage_file(out / "noise_scale.json"),
        baselines=read_stage_file(out / "baselines.json"),
        extra_sweeps=extra_sweeps,
    )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value) -> bool:
    """A whole number that a float holds exactly (a batch size of 2.5 was read as 2 and 2.5)."""
    return _is_number(value) and abs(value) < 2**53 and value == int(value)


# The numbers of every record, and the values each may take.
NUMBER_FIELDS = {
    "batch_size": lambda v: _whole(v) and v >= 1,
    "beta": lambda v: _is_number(v) and 0 <= v < 1,
    "lr": lambda v: _is_number(v) and 0 < v < math.inf,
    "seed": _whole,
    "steps": lambda v: _whole(v) and v >= 1,
    "wall_seconds": lambda v: _is_number(v) and 0 <= v < math.inf,
}
# Read where present, None (or absent) where the run has none.
OPTIONAL_NUMBER_FIELDS = ("final_train_loss", "final_test_accuracy")
CURVES_READ = ("batch_loss", "grad_norm")  # the arrays of a record's curves the report reads
# The effective-batch test's records: also the full-train loss at the file's eval_steps.
EFFECTIVE_CURVES_READ = (*CURVES_READ, "train_loss")


def _check_records(
    where: Path,
    records: Sequence[dict],
    curves: dict | None = None,
    read: Sequence[str] = CURVES_READ,
    study: dict | None = None,
) -> None:
    """Raises CorruptStoreError (a ValueError), before anything is written, unless the report
    can read every record (one written by hand, or by another tool, may lack a field or point
    past its curves); ``read``: the arrays of its curves that the report reads. ``study``: the
    fields every record that has them must hold as given (the study's dataset, model, target)."""
    seen: dict[tuple, int] = {}  # (batch_size, beta, lr, seed): the record's number
    for number, record in enumerate(records, start=1):
        # `sweep --out DIR/sweep` of another model, data or target appends to the study's runs:
        # at its settings they would count as more seeds, at others join its grid.
        other = [
            f"{key} {record[key]!r}, where the study's is {value!r}"
            for key, value in (study or {}).items()
            if key in record and record[key] != value
        ]
        if other:
            raise CorruptStoreError(
                f"record {number} of {str(where / 'runs.jsonl')!r} is a run of another study "
                f"({'; '.join(other)}); remove its lines, or move the directory away"
            )
        bad = [key for key, valid in NUMBER_FIELDS.items() if not valid(record.get(key))]
        bad += [
            key for key in OPTIONAL_NUMBER_FIELDS
            if record.get(key) is not None and not _is_number(record[key])
        ]  # fmt: skip
        reached = record.get("steps_to_target")  # an evaluation step of the run
        if reached is not None and not (
            _is_number(reached)
            and 0 < reached <= (record["steps"] if "steps" not in bad else math.inf)
        ):
            bad.append("steps_to_target")
        if not isinstance(record.get("diverged"), bool):
            bad.append("diverged")
        if curves is not None and not bad:
            arrays = curves[record["curves"]]
            if any(
                name not in arrays or not 0 <= record["curve_index"] < len(arrays[name])
                for name in read
            ) or ("train_loss" in read and "eval_steps" not in arrays):
                bad.append(f"its curves in {record['curves']}")
        if bad:
            raise CorruptStoreError(
                f"record {number} of {str(where / 'runs.jsonl')!r} is not a run the report can "
                f"read ({', '.join(bad)} missing or invalid); remove that line to recompute the "
                "run, or move the directory away"
            )
        # A run recorded twice (a repeated line, or a sweep of other settings into this
        # directory) would count as one more seed of its setting.
        key = tuple(float(record[k]) for k in ("batch_size", "beta", "lr", "seed"))
        if key in seen:
            raise CorruptStoreError(
                f"record {number} of {str(where / 'runs.jsonl')!r} repeats the run of record "
                f"{seen[key]} (batch size {key[0]:g}, beta {key[1]:g}, lr {key[2]:g}, seed "
                f"{key[3]:g}), which would count as one more seed; remove one of the two lines, "
                "or move the directory away"
            )
        seen[key] = number


# ---------------------------------------------------------------------------
# Measurements shared by the figures and the verdicts.


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, values.size))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _nanmean(values, axis=None):
    """The mean of the finite values (along ``axis``); NaN, without numpy's warning, where there
    are none (every seed diverged there, or its batch loss underflowed to 0)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        return np.where(finite, values, 0.0).sum(axis=axis) / finite.sum(axis=axis)


def _label(beta: float) -> str:
    return "SGD (beta 0)" if beta == 0 else f"EMA momentum (beta {beta:g})"


def _color(beta: float, betas: Sequence[float]) -> str:
    return f"C{list(betas).index(beta)}" if beta in betas else "k"


def late_window_oscillation(res: Results, batch_size: int, beta: float) -> list[float]:
    """Relative oscillation of the batch loss (analysis.oscillation) of each seed at the best lr
    (none where there is no best lr: half the seeds or more diverged at every lr)."""
    row = res.best_row(batch_size, beta)
    if row is None or row["final_train_loss"] is None:
        return []
    values = []
    for record in res.sweep_runs(batch_size, beta, row["lr"]):
        if record.get("diverged"):  # its curves are NaN from the divergence on
            continue
        loss = analysis.curve(record, res.sweep_curves, "batch_loss")
        values.append(float(analysis.oscillation(loss[None], window=SMOOTHING)[0]))
    return [v for v in values if math.isfinite(v)]


@dataclasses.dataclass(frozen=True)
class EffectiveCase:
    """One configuration of the effective-batch test, over its seeds.

    Each list holds one value per seed, NaN where the seed has none (it diverged): its mean is
    then NaN, which no rule's comparison passes, and a rule on every seed sees every seed.
    """

    batch_size: int
    beta: float
    full_loss_oscillation: list[float]  # relative spread of the full-train loss, last half
    full_loss_jitter: list[float]  # the same in loss units (std around the trend)
    batch_loss_oscillation: list[float]  # relative spread of the batch loss, last 20%
    late_train_loss: list[float]  # mean full-train loss over the last half
    records: list[dict]

    @staticmethod
    def mean(values: Sequence[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    @staticmethod
    def std(values: Sequence[float]) -> float:
        return float(np.std(values)) if values else math.nan


def effective_case(res: Results, batch_size: int, beta: float) -> EffectiveCase | None:
    """Measures one configuration of the effective-batch test (``DIR/effective``)."""
    records = analysis.filter_records(res.effective, batch_size=int(batch_size), beta=float(beta))
    if not records:
        return None
    full, jitter, batch, late = [], [], [], []
    for record in records:
        train = analysis.curve(record, res.effective_curves, "train_loss")
        loss = analysis.curve(record, res.effective_curves, "batch_loss")
        for values, log in ((full, True), (jitter, False)):
            spread = analysis.oscillation(
                train[None], window=FULL_LOSS_WINDOW, last_fraction=0.5, log=log
            )
            values.append(float(spread[0]))
        batch.append(float(analysis.oscillation(loss[None], window=SMOOTHING)[0]))
        late.append(float(np.mean(train[train.size // 2 :])))
    # A diverged seed stays (as NaN): dropping it judged the seeds that survived as "every seed".
    return EffectiveCase(int(batch_size), float(beta), full, jitter, batch, late, records)


def effective_triples(res: Results) -> list[tuple[EffectiveCase, EffectiveCase, EffectiveCase]]:
    """(momentum at B, SGD at B, SGD at B (1+beta)/(1-beta)) for every tested B."""
    from experiments.study import effective_sgd_batch

    stage = res.meta.get("stages", {}).get("effective")
    if not stage or "skipped" in stage:
        return []
    beta = float(stage["beta"])
    triples = []
    for b in res.preset["effective_batches"]:
        big = effective_sgd_batch(b, beta)
        cases = (
            effective_case(res, b, beta),
            effective_case(res, b, 0.0),
            effective_case(res, big, 0.0),
        )
        if all(cases):
            triples.append(cases)
    return triples


# ---------------------------------------------------------------------------
# Figures. Each function draws one PNG and returns its caption.


def _batch_axis(ax, sizes: Sequence[int]) -> None:
    """A log x axis labelled with the batch sizes themselves."""
    ax.set_xscale("log")
    ax.set_xticks(list(sizes), [str(b) for b in sizes])
    ax.xaxis.set_minor_locator(_null_locator())
    ax.set_xlabel("batch size B")


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _skipped(res: Results, stage: str) -> str:
    """Why a stage of the main job was skipped, as its section's text ("" if it was not)."""
    reason = res.meta.get("stages", {}).get(stage, {}).get("skipped")
    return f"Not run: {reason}." if reason else ""


def _legend(ax, **kwargs) -> None:
    """``ax.legend(**kwargs)`` if anything drawn has a label (an empty panel gets none, quietly)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def fig_loss_curves(res: Results, path: Path | BinaryIO) -> str:
    """Train (mini-batch) loss vs step for a small, a medium and a large batch."""
    sizes = res.batch_sizes()
    picks = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    betas = res.betas()
    fig = _figure(figsize=(5 * len(picks), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(picks), sharey=True))
    for ax, batch_size in zip(axes, picks, strict=True):
        for beta in betas:
            row = res.best_row(batch_size, beta)
            # No best lr where half the seeds or more diverged at every lr (the tie-break's is not).
            if row is None or row["final_train_loss"] is None:
                continue
            runs = sorted(res.sweep_runs(batch_size, beta, row["lr"]), key=lambda r: r["seed"])
            loss = analysis.curve(runs[0], res.sweep_curves, "batch_loss")
            steps = np.arange(1, loss.size + 1)
            color = _color(beta, betas)
            ax.plot(steps, loss, color=color, alpha=0.25, lw=0.6)
            smooth = _moving_average(loss, SMOOTHING)  # centred; shorter runs, a shorter window
            lag = (loss.size - smooth.size) // 2
            ax.plot(
                steps[lag : lag + smooth.size], smooth, color=color, lw=1.8,
                label=f"{_label(beta)}, lr {row['lr']:.3g}",
            )  # fmt: skip
        ax.axhline(res.preset["target_loss"], color="gray", ls=":", lw=1, label="target (full set)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"batch size {batch_size}")
        _legend(ax, fontsize=8, loc="lower left")
    axes[0].set_ylabel("mini-batch cross-entropy (log scale)")
    fig.suptitle("Training loss at each batch size's best learning rate (seed 0)")
    fig.savefig(path, dpi=110)
    return (
        "Mini-batch training loss at every step (faint) and its 51-step moving average (bold), "
        "each optimizer at its best learning rate for that batch size. The faint band is the "
        "step-to-step oscillation of claim 1, measured across all batch sizes in the "
        "oscillation figure."
    )


def fig_steps(res: Results, path: Path | BinaryIO) -> str:
    """Steps (and examples) to the target vs batch size, with the fitted trade-off curves."""
    betas = res.betas()
    fig = _figure(figsize=(12, 4.8))
    ax, ax_e = fig.subplots(1, 2)
    anchor = None
    for beta in betas:
        rows = [r for r in res.best if math.isclose(r["beta"], beta) and r["steps_median"]]
        if not rows:
            continue
        b = np.array([r["batch_size"] for r in rows], float)
        med = np.array([r["steps_median"] for r in rows], float)
        lo = np.array([r["steps_min"] for r in rows], float)
        hi = np.array([r["steps_max"] for r in rows], float)
        color = _color(beta, betas)
        ax.errorbar(
            b, med, yerr=[med - lo, hi - med], fmt="o-", color=color, capsize=3,
            label=f"{_label(beta)}: median, min-max over seeds",
        )  # fmt: skip
        ax_e.loglog(b, med * b, "o-", color=color, label=_label(beta))
        fit = res.fit(beta)
        if fit is not None:
            grid = np.geomspace(b.min(), b.max(), 100)
            # As in the fits table: a B_crit beyond the batch sizes tested is an extrapolation.
            if fit.b_crit_at_bound:
                where = " (at the search bound)"
            elif not b.min() <= fit.b_crit <= b.max():
                where = " (extrapolated)"
            else:
                where = ""
            ax.plot(
                grid, fit.s_min * (1 + fit.b_crit / grid), "--", color=color, lw=1,
                label=f"fit S_min(1 + B_crit/B): B_crit = {fit.b_crit:.3g}{where}",
            )  # fmt: skip
        if anchor is None:
            anchor = (b[0], med[0])
    if anchor is not None:
        grid = np.geomspace(min(res.batch_sizes()), max(res.batch_sizes()), 50)
        ax.plot(grid, anchor[1] * anchor[0] / grid, ":", color="gray", label="perfect scaling 1/B")
    _batch_axis(ax, res.batch_sizes())
    ax.set_yscale("log")
    ax.set_ylabel(f"steps to full-train loss {res.preset['target_loss']:g}")
    ax.set_title("Steps to result (learning rate tuned per batch size)")
    _legend(ax, fontsize=7)
    _batch_axis(ax_e, res.batch_sizes())
    ax_e.set_ylabel("examples to target (steps x B)")
    ax_e.set_title("Examples (compute) to result")
    _legend(ax_e, fontsize=8)
    fig.savefig(path, dpi=110)
    return (
        "Left: Shallue et al.'s steps-to-result, the median over seeds of the first evaluation at "
        "which the full training loss reached the target, at the best learning rate of each batch "
        "size (bars: the fastest and the slowest seed that reached it). Dotted: perfect scaling "
        "from SGD's smallest batch. Dashed: the fit S(B) = S_min (1 + B_crit / B) of McCandlish "
        "et al. Right: the same results in examples processed, the compute a larger batch costs."
    )


def fig_best_lr(res: Results, path: Path | BinaryIO) -> str:
    """Best learning rate vs batch size against linear and square-root scaling."""
    betas = res.betas()
    fig = _figure(figsize=(6.5, 4.6))
    ax = fig.subplots()
    anchor = None
    for beta in betas:
        # No best lr where half the seeds or more diverged at every lr (the tie-break's is not).
        rows = [
            r for r in res.best
            if math.isclose(r["beta"], beta) and r["final_train_loss"] is not None
        ]  # fmt: skip
        if not rows:
            continue
        b = np.array([r["batch_size"] for r in rows], float)
        lr = np.array([r["lr"] for r in rows], float)
        edge = np.array([r["lr_at_grid_edge"] for r in rows], bool)
        color = _color(beta, betas)
        ax.plot(b, lr, "o-", color=color, label=_label(beta))
        ax.plot(b[edge], lr[edge], "o", mfc="white", color=color)
        if anchor is None:
            anchor = (b[0], lr[0])
    if anchor is not None:
        grid = np.geomspace(min(res.batch_sizes()), max(res.batch_sizes()), 50)
        ax.plot(
            grid, anchor[1] * grid / anchor[0], ":", color="gray", label="linear scaling (lr ~ B)"
        )
        ax.plot(grid, anchor[1] * np.sqrt(grid / anchor[0]), "--", color="gray", lw=0.8,
                label="square-root scaling")  # fmt: skip
    _batch_axis(ax, res.batch_sizes())
    ax.set_yscale("log")
    ax.set_ylabel("best learning rate eta (EMA form)")
    ax.set_title("Best learning rate vs batch size")
    _legend(ax, fontsize=8)
    fig.savefig(path, dpi=110)
    return (
        "The learning rate with the fewest median steps to the target, per batch size and "
        "optimizer (open markers: at the edge of the grid searched, so the optimum may lie "
        "beyond). Both lines start at SGD's smallest batch. The rate is the EMA-form eta; the "
        "heavy-ball rate of optax/PyTorch is eta (1 - beta)." + _lr_grid_note(res)
    )


def _lr_grid_note(res: Results) -> str:
    """What the swept lr grid lets the best-lr figure show: if every batch size swept the same
    lrs up to a factor sqrt(B), a best lr can only sit on a square-root line (a grid step apart),
    so following square-root scaling is partly the grid's doing ("" for any other grid)."""
    grids = {}
    for r in res.sweep:
        grids.setdefault(int(r["batch_size"]), set()).add(float(r["lr"]))
    if len(grids) < 2 or min(len(g) for g in grids.values()) < 2:
        return ""
    scaled = [np.array(sorted(g)) / math.sqrt(b) for b, g in sorted(grids.items())]
    if any(s.size != scaled[0].size or not np.allclose(s, scaled[0], rtol=1e-2) for s in scaled):
        return ""
    steps = scaled[0][1:] / scaled[0][:-1]
    if not np.allclose(steps, steps[0], rtol=1e-2):
        return ""
    return (
        f" The grid itself scales as sqrt(B), a factor {steps[0]:.3g} between neighbouring lrs: "
        "a best lr is known only to within that factor, and can only land on the square-root "
        "line or a whole number of grid steps off it, so a line along it is partly the grid's "
        "doing."
    )


def fig_oscillation(res: Results, path: Path | BinaryIO) -> str:
    """Oscillation vs batch size (claim 1) and through training (claim 2)."""
    betas = res.betas()
    fig = _figure(figsize=(12, 9))
    (ax_b, ax_r), (ax_t, ax_g) = fig.subplots(2, 2)
    for beta in betas:
        sizes, means, stds = [], [], []
        for b in res.batch_sizes():
            values = late_window_oscillation(res, b, beta)
            if values:
                sizes.append(b)
                means.append(np.mean(values))
                stds.append(np.std(values))
        if not sizes:  # an empty series would leave the log axis without a range
            continue
        ax_b.errorbar(sizes, means, yerr=stds, fmt="o-", capsize=3, color=_color(beta, betas),
                      label=_label(beta))  # fmt: skip
    _batch_axis(ax_b, res.batch_sizes())
    ax_b.set_yscale("log")
    ax_b.set_ylabel("std of log batch loss around its trend")
    ax_b.set_title("Late-training oscillation at the best lr")
    _legend(ax_b, fontsize=8)

    for beta in betas:
        sizes, spread, grads = [], [], []
        for b in res.batch_sizes():
            m = _best_lr_first_last_tenth(res, b, beta)
            if m is None:
                continue
            sizes.append(b)
            spread.append(m["absolute"][1] / m["absolute"][0])
            grads.append(m["grad"][1] / m["grad"][0])
        color = _color(beta, betas)
        for values, marker, what in ((spread, "o-", "batch-loss spread"), (grads, "s:", "|g|")):
            # Per batch size, the seeds' finite ratios (a NaN one: too short a window, say).
            points = [(b, v[np.isfinite(v)]) for b, v in zip(sizes, values, strict=True)]
            points = [(b, v) for b, v in points if v.size]
            if not points:
                continue
            mid = np.array([np.median(v) for _, v in points])
            lo = mid - np.array([v.min() for _, v in points])
            hi = np.array([v.max() for _, v in points]) - mid
            ax_r.errorbar([b for b, _ in points], mid, yerr=[lo, hi], fmt=marker, capsize=3,
                          color=color, label=f"{_label(beta)}: {what}")  # fmt: skip
    ax_r.axhline(1.0, color="gray", lw=0.8)
    _batch_axis(ax_r, res.batch_sizes())
    ax_r.set_yscale("log")
    ax_r.set_ylabel("last tenth / first tenth of training")
    ax_r.set_title("Does it shrink during training? (best lr; min-max over seeds)")
    _legend(ax_r, fontsize=7)

    triples = effective_triples(res)
    if triples:
        momentum, sgd, _ = triples[0]
        for case, style in ((sgd, "-"), (momentum, "--")):
            loss = np.stack(
                [analysis.curve(r, res.effective_curves, "batch_loss") for r in case.records]
            )
            centers, spread = analysis.oscillation_by_window(loss, window=SMOOTHING, log=False)
            centers, rel = analysis.oscillation_by_window(loss, window=SMOOTHING, log=True)
            color = _color(case.beta, betas)
            ax_t.plot(centers, _nanmean(spread, axis=0), "o" + style, color=color,
                      label=f"{_label(case.beta)}: absolute")  # fmt: skip
            ax_t.plot(centers, _nanmean(rel, axis=0), "s" + style, color=color, alpha=0.5,
                      label=f"{_label(case.beta)}: relative (log)")  # fmt: skip
            gnorm = np.stack(
                [analysis.curve(r, res.effective_curves, "grad_norm") for r in case.records]
            )
            gc, gm = analysis.window_means(gnorm)
            ax_g.plot(gc, _nanmean(gm, axis=0), "o" + style, color=color, label=_label(case.beta))
        lr = res.meta["stages"]["effective"]["lr"]
        ax_t.set_title(f"Oscillation through training, B = {sgd.batch_size}, lr {lr:.3g}")
        ax_g.set_title(f"Mini-batch gradient norm, B = {sgd.batch_size}, lr {lr:.3g}")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("step")
    # Two measures share the axis: the absolute one in loss units, the relative one of log(loss).
    ax_t.set_ylabel("std around its trend: of batch loss (o), of log batch loss (s)")
    _legend(ax_t, fontsize=7)
    ax_g.set_xlabel("step")
    ax_g.set_ylabel("mean |g| per window")
    _legend(ax_g, fontsize=8)
    fig.savefig(path, dpi=110)
    return (
        "Left: the oscillation measure, the standard deviation of log(batch loss) around its "
        "51-step centred moving average over the last 20% of training (0.1 = the batch loss sits "
        "about 10% above or below its trend), at each batch size's best learning rate, mean and "
        "std over seeds. Top right (claim 2): at the same learning rates, the absolute spread of "
        "the batch loss (loss units) and the mean mini-batch gradient norm in the last tenth of "
        "training over the first tenth, median over seeds (bars: min-max); below 1 means it "
        "shrank. Bottom: the spread, absolute (loss units, circles) and relative (std of log "
        "loss, squares), and the gradient norm in ten windows through the SGD and momentum runs "
        "of the effective-batch test at its smallest batch, at its one fixed learning rate, "
        "means over seeds."
    )


def fig_effective(res: Results, path: Path | BinaryIO) -> str:
    """Is momentum at B like SGD at B (1 + beta) / (1 - beta)? Full-train loss at one lr."""
    triples = effective_triples(res)
    stage = res.meta["stages"]["effective"]
    fig = _figure(figsize=(12, 4.6))
    ax_c, ax_o = fig.subplots(1, 2)
    momentum, sgd, big = triples[0]
    for case, color, style in ((sgd, "C0", "-"), (big, "C2", "-"), (momentum, "C1", "--")):
        record = sorted(case.records, key=lambda r: r["seed"])[0]
        steps = res.effective_curves[record["curves"]]["eval_steps"]
        train = analysis.curve(record, res.effective_curves, "train_loss")
        if not np.isfinite(train).any():  # diverged by its first evaluation: nothing to draw
            continue  # (a log axis of no finite value cannot be drawn)
        ax_c.plot(steps, train, style, color=color, lw=1,
                  label=f"{_label(case.beta)}, B = {case.batch_size}")  # fmt: skip
    ax_c.set_yscale("log")
    ax_c.set_xlabel("step")
    ax_c.set_ylabel("full training-set loss (log scale)")
    ax_c.set_title(f"One fixed lr {stage['lr']:.3g}, seed 0")
    _legend(ax_c, fontsize=8)
    labels, positions = [], []
    for i, (m, s, g) in enumerate(triples):
        for j, (case, color) in enumerate(((s, "C0"), (m, "C1"), (g, "C2"))):
            x = i * 4 + j
            if math.isfinite(case.mean(case.late_train_loss)):  # NaN: a seed diverged
                ax_o.errorbar(x, case.mean(case.late_train_loss),
                              yerr=case.std(case.late_train_loss), fmt="o", color=color,
                              capsize=3)  # fmt: skip
            labels.append(f"{'SGD' if case.beta == 0 else 'mom.'}\nB={case.batch_size}")
            positions.append(x)
    ax_o.set_xticks(positions, labels, fontsize=7)
    ax_o.set_yscale("log")
    ax_o.set_ylabel("full-train loss, mean over the last half (log scale)")
    ax_o.set_title("Late full-train loss (mean, std over seeds)")
    fig.savefig(path, dpi=110)
    return (
        f"The effective-batch test at one learning rate ({stage['lr']:.3g}, the best SGD rate "
        "of the sweep at the smallest batch tested): EMA momentum (beta "
        f"{stage['beta']:g}) at batch B against SGD at B and at B (1 + beta) / (1 - beta). "
        f"The full training set is evaluated every {res.preset['effective_eval_every']} steps, so "
        "the curves show the parameters' own progress and jitter, free of the sampling noise of "
        "a mini-batch loss. Right: each configuration's full-train loss late in training (the "
        "mean over the last half; still falling, so a measure of progress, not a floor), which "
        "claim 5's verdict compares."
    )


def fig_noise_scale(res: Results, path: Path | BinaryIO) -> str:
    """B_simple along training against the fitted critical batch sizes."""
    rows = res.noise["rows"]
    steps = np.array([max(r["step"], 1) for r in rows], float)
    # Non-finite estimates are stored as null: nan here, a gap in the plot.
    column = lambda key: np.array([r[key] for r in rows], float)
    b = column("b_simple")
    # Results written before B_simple had its own standard error draw without error bars.
    err = np.array([r.get("b_simple_stderr") for r in rows], float)
    fig = _figure(figsize=(7, 4.6))
    ax = fig.subplots()
    ax.errorbar(steps, b, yerr=err, fmt="o-", color="k", capsize=3,
                label="B_simple = tr(Sigma) / |G|^2 (+- 1 s.e.)")  # fmt: skip
    for beta in res.betas():
        fit = res.fit(beta)
        if fit is not None:
            ax.axhline(fit.b_crit, ls="--", color=_color(beta, res.betas()),
                       label=f"B_crit fitted to steps-to-result, {_label(beta)}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training step (step 0 drawn at 1)")
    ax.set_ylabel("batch size")
    ax.set_title(f"Gradient noise scale along SGD training (lr {res.noise['lr']:.3g})")
    _legend(ax, fontsize=8)
    twin = ax.twinx()
    twin.plot(steps, column("train_loss"), "s:", color="gray", alpha=0.7)
    twin.set_ylabel("full training loss (gray)")
    fig.savefig(path, dpi=110)
    batches, pairs = res.preset.get("noise_scale_batches"), res.preset.get("noise_scale_pairs")
    if batches and pairs:
        how = (
            f"gradients at B = {batches[0]} and B = {batches[1]} averaged over {pairs} batch "
            f"pairs, along one SGD run (B = {batches[0]}, lr {res.noise['lr']:.3g}, seed 0)"
        )
    else:
        how = "gradients at two batch sizes averaged over many batch pairs, along one SGD run"
    return (
        f"The simple noise scale of McCandlish et al., estimated from the squared norms of {how}, "
        "against the critical batch sizes fitted to the steps-to-result curves (bars: one "
        "standard error of the estimate over the batch pairs). McCandlish et al. find B_crit "
        "close to the noise scale, which grows as the loss falls."
    )


# ---------------------------------------------------------------------------
# Verdicts: one per claim of the source material, each from a stated rule.


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _verdict(claim: str, verdict: str, rule: str, evidence: str, literature: str, figure: str):
    return {
        "claim": claim,
        "verdict": verdict,
        "rule": rule,
        "evidence": evidence,
        "literature": literature,
        "figure": figure,
    }


def _rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _sgd_oscillation_by_batch(res: Results) -> tuple[list[int], list[float]]:
    sizes, values = [], []
    for b in res.batch_sizes():
        osc = late_window_oscillation(res, b, 0.0)
        if osc:
            sizes.append(b)
            values.append(float(np.mean(osc)))
    return sizes, values


def _unmeasured_oscillation(res: Results) -> str:
    """``"; ..."`` naming the SGD seeds at a best lr, not diverged, whose oscillation is NaN (a
    batch loss of exactly 0 in the window: long small-batch runs underflow float32), which
    :func:`late_window_oscillation` leaves out; ``""`` if none."""
    left_out = []
    for b in res.batch_sizes():
        row = res.best_row(b, 0.0)
        if row is None or row["final_train_loss"] is None:  # no best lr
            continue
        seeds = [r for r in res.sweep_runs(b, 0.0, row["lr"]) if not r.get("diverged")]
        measured = len(late_window_oscillation(res, b, 0.0))
        if measured < len(seeds):
            left_out.append(f"B = {b} ({measured} of {len(seeds)} seeds)")
    if not left_out:
        return ""
    return (
        "; the oscillation is not measurable where a batch loss is 0 (float32 underflow; its log "
        "is undefined), left out: " + ", ".join(left_out)
    )


def verdict_noise(res: Results) -> dict:
    sizes, osc = _sgd_oscillation_by_batch(res)
    rho = _rank_correlation(sizes, osc)
    triples = effective_triples(res)
    fixed = [
        (s.batch_size, g.batch_size,
         s.mean(s.full_loss_jitter), g.mean(g.full_loss_jitter),
         s.mean(s.batch_loss_oscillation), g.mean(g.batch_loss_oscillation))
        for _, s, g in triples
    ]  # fmt: skip
    # Beyond seed spread: every seed at B' below every seed at B (the means alone passed seeds
    # that overlap). A diverged seed is NaN, which passes nothing.
    calmer_at = [
        s.batch_size for _, s, g in triples
        if _all_below(g.batch_loss_oscillation, s.batch_loss_oscillation)
    ]  # fmt: skip
    fixed_ok = bool(fixed) and len(calmer_at) == len(fixed)
    sweep_ok = math.isfinite(rho) and rho < 0
    verdict = (
        SUPPORTED if fixed_ok and sweep_ok else PARTLY if fixed_ok or sweep_ok else NOT_SUPPORTED
    )
    # Where every SGD run of the test diverged in a seed (no mean), it measured nothing.
    measured = [b for b, _, _, _, bs, bg in fixed if math.isfinite(bs) or math.isfinite(bg)]
    if not measured and not math.isfinite(rho):  # neither part measured
        verdict = UNSETTLED
    beta = res.meta.get("stages", {}).get("effective", {}).get("beta")
    beta = res.preset.get("effective_beta") if beta is None else beta
    larger = (
        "(1 + beta) / (1 - beta) times larger batch"
        if beta is None
        else f"{(1 + beta) / (1 - beta):.3g}x larger batch"
    )
    lines = [
        f"SGD at a fixed lr, batch B = {b} -> B' = {g}: batch-loss oscillation {_fmt(bs)} -> "
        f"{_fmt(bg)}; jitter of the full-train loss (loss units) {_fmt(fs)} -> {_fmt(fg)}"
        for b, g, fs, fg, bs, bg in fixed
    ]
    if fixed:
        lines.append(
            "less batch-loss oscillation at B' than at B in every seed at B = "
            + (", ".join(map(str, calmer_at)) or "none")
            + f" (of B = {', '.join(str(b) for b, *_ in fixed)})"
        )
    lines.append(
        f"SGD at each batch size's best lr: oscillation {_fmt(osc[0]) if osc else '-'} at B = "
        f"{sizes[0] if sizes else '-'} to {_fmt(osc[-1]) if osc else '-'} at B = "
        f"{sizes[-1] if sizes else '-'}; rank correlation with B {_fmt(rho, '+.2f')}"
        + ("" if math.isfinite(rho) else f" (needs 3 batch sizes, has {len(sizes)})")
        + _unmeasured_oscillation(res)
    )
    return _verdict(
        "1. The loss oscillates from step to step because each mini-batch differs.",
        verdict,
        f"supported if, at one fixed lr, SGD with a {larger} has less batch-loss "
        "oscillation at every B tested (every seed at B' below every seed at B), and the "
        "oscillation at the tuned lr falls with B (rank correlation < 0); partly if only one "
        "holds; not settled if neither could be measured (no effective-batch test, or every SGD "
        "run of it diverged; fewer than 3 batch sizes). "
        "(The jitter of the full-train loss is reported, not judged: it depends on the loss "
        "level, which the batch size also changes.)",
        "; ".join(lines),
        "Mini-batch gradient noise has covariance Sigma/B (McCandlish et al. 2018); Smith & Le "
        "(2018) put the SGD noise scale at eps N / (B (1 - m)) with the heavy-ball lr eps, "
        "which in the EMA form used here (eps = eta (1 - beta)) is eta N / B.",
        "oscillation.png, effective_batch.png, loss_curves.png",
    )


def _first_last_tenth(records: Sequence[dict], curves: dict) -> dict[str, np.ndarray] | None:
    """Per seed, the first and the last tenth of training: ``[2, seeds]`` arrays (first, last).

    ``None`` if the runs are too short for ten windows of the moving average (tiny presets).
    """
    loss = np.stack([analysis.curve(r, curves, "batch_loss") for r in records])
    gnorm = np.stack([analysis.curve(r, curves, "grad_norm") for r in records])
    try:
        _, absolute = analysis.oscillation_by_window(loss, window=SMOOTHING, log=False)
        _, relative = analysis.oscillation_by_window(loss, window=SMOOTHING, log=True)
        _, grads = analysis.window_means(gnorm)
    except ValueError:
        return None
    return {
        name: np.stack([a[:, 0], a[:, -1]])
        for name, a in (("absolute", absolute), ("relative", relative), ("grad", grads))
    }


def _all_below(low: Sequence[float], high: Sequence[float]) -> bool:
    """Whether every value of ``low`` lies below every one of ``high`` (all finite, none empty)."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    finite = low.size and high.size and np.isfinite(low).all() and np.isfinite(high).all()
    return bool(finite) and float(low.max()) < float(high.min())


def _shrinks(first_last: np.ndarray) -> bool:
    """Whether every seed's last value lies below every seed's first one (beyond seed spread)."""
    first, last = first_last
    return _all_below(last, first)


def _grows(first_last: np.ndarray) -> bool:
    """Whether every seed's last value lies above every seed's first one."""
    return _shrinks(-np.asarray(first_last))


def _best_lr_first_last_tenth(res: Results, batch_size: int, beta: float) -> dict | None:
    """:func:`_first_last_tenth` of every seed at the best lr of ``(batch_size, beta)``; ``None``
    where there is no best lr (half the seeds or more diverged at every lr).

    A seed that diverged stays: its curves are NaN from its divergence on, so it fails the
    rule's "every seed" (dropping it judged the seeds that survived as every seed).
    """
    row = res.best_row(batch_size, beta)
    if row is None or row["final_train_loss"] is None:
        return None
    return _first_last_tenth(res.sweep_runs(batch_size, beta, row["lr"]), res.sweep_curves)


def verdict_shrinks(res: Results) -> dict:
    claim = (
        "2. Oscillation shrinks during training even at a fixed learning rate, because the "
        "surface flattens and the gradients (and their differences between batches) shrink."
    )
    per_batch = []
    for b in res.batch_sizes():
        m = _best_lr_first_last_tenth(res, b, 0.0)
        if m is not None:
            per_batch.append((b, res.best_row(b, 0.0)["lr"], m))
    if not per_batch:
        evidence = (
            "no SGD (beta 0) runs in the sweep"
            if not any(r["beta"] == 0.0 for r in res.best)
            else "no SGD run at a best lr that did not diverge and is long enough for ten "
            "windows of the moving average"
        )
        return _verdict(claim, UNSETTLED, "-", evidence, "-", "-")
    # The claim holds at B if the oscillation shrinks and so does its stated cause, the gradient.
    holds = [b for b, _, m in per_batch if _shrinks(m["absolute"]) and _shrinks(m["grad"])]
    grows = lambda key: [b for b, _, m in per_batch if _grows(m[key])]
    if not holds:
        verdict = NOT_SUPPORTED
    elif len(holds) == len(per_batch):
        verdict = SUPPORTED
    else:
        verdict = PARTLY
    mean = lambda a: float(_nanmean(a))
    listed = lambda sizes: ", ".join(map(str, sizes)) or "none"
    lines = [
        f"the spread and the gradient norm both shrink at B = {listed(holds)} (of "
        f"{len(per_batch)} batch sizes); against it, the spread grows at B = "
        f"{listed(grows('absolute'))} and the gradient norm at B = {listed(grows('grad'))}"
    ] + [
        f"B = {b} (lr {lr:.3g}): spread {_fmt(mean(m['absolute'][0]))} -> "
        f"{_fmt(mean(m['absolute'][1]))}, relative {_fmt(mean(m['relative'][0]))} -> "
        f"{_fmt(mean(m['relative'][1]))}, gradient norm {_fmt(mean(m['grad'][0]))} -> "
        f"{_fmt(mean(m['grad'][1]))}"
        for b, lr, m in per_batch
    ]
    seeds = min(m["grad"].shape[1] for _, _, m in per_batch)  # the fewest at any B
    triples = effective_triples(res)
    m = _first_last_tenth(triples[0][1].records, res.effective_curves) if triples else None
    if m is not None:
        sgd = triples[0][1]
        lr = res.meta["stages"]["effective"]["lr"]
        lines.append(
            f"the effective-batch run (B = {sgd.batch_size}, lr {lr:.3g}, "
            f"{sgd.records[0]['steps']} steps): spread {_fmt(mean(m['absolute'][0]))} -> "
            f"{_fmt(mean(m['absolute'][1]))}, gradient norm {_fmt(mean(m['grad'][0]))} -> "
            f"{_fmt(mean(m['grad'][1]))}"
        )
    noise_rows = res.noise["rows"] if res.noise else []
    if noise_rows:
        a, z = noise_rows[0], noise_rows[-1]
        lines.append(
            f"between batches, tr(Sigma) (per-example gradient variance) {_fmt(a['trace'])} at "
            f"step {a['step']} -> {_fmt(z['trace'])} at step {z['step']}, |G|^2 "
            f"{_fmt(a['grad_sq'])} -> {_fmt(z['grad_sq'])}"
        )
    return _verdict(
        claim,
        verdict,
        "SGD at each batch size's best lr, first vs last tenth of training, per seed: the "
        "absolute spread of the batch loss (std around its moving average) and the mean "
        "mini-batch gradient norm shrink (or grow) at B if every seed's last value lies below "
        "(above) every seed's first. The claim holds at B if both shrink. Supported if it holds "
        "at every B, partly if at some (the regime is named), not supported if at none. (With "
        f"{seeds} seed{'s' if seeds > 1 else ''} a quantity that does not change passes one such "
        f"test by chance 1 time in {math.comb(2 * seeds, seeds)}.)",
        "; ".join(lines),
        "At a fixed learning rate SGD reaches a noise floor proportional to lr/B rather than "
        "zero (the NQM's stationary loss, Zhang et al. 2019); McCandlish et al. find the noise "
        "scale tr(Sigma)/|G|^2 grows during training.",
        "oscillation.png, noise_scale.png",
    )


def verdict_learning_rate(res: Results) -> dict:
    both = crawl = overshoot = total = untrained = 0
    loss = lambda stats: (
        math.inf if stats["final_train_loss"] is None else stats["final_train_loss"]
    )
    for row in res.best:
        tried = row["lrs_tried"]
        if len(tried) < 3:
            continue
        if row["final_train_loss"] is None:  # half the seeds or more diverged at every lr
            untrained += 1
            continue
        total += 1
        best_loss = row["final_train_loss"]
        small = analysis.seed_stats(res.sweep_runs(row["batch_size"], row["beta"], tried[0]))
        large = analysis.seed_stats(res.sweep_runs(row["batch_size"], row["beta"], tried[-1]))
        slow = small["steps_median"] is None or (
            row["steps_median"] is not None and small["steps_median"] > row["steps_median"]
        )
        is_crawl = slow and loss(small) > best_loss
        is_over = large["diverged"] > 0 or loss(large) > best_loss
        crawl += is_crawl
        overshoot += is_over
        both += is_crawl and is_over
    share = both / total if total else math.nan
    verdict = (
        UNSETTLED if not total else SUPPORTED if share >= 0.75 else PARTLY if share >= 0.25
        else NOT_SUPPORTED
    )  # fmt: skip
    diverged = [r for r in res.sweep if r["diverged"]]
    largest = {(row["batch_size"], row["beta"]): max(row["lrs_tried"]) for row in res.best}
    at_top = sum(math.isclose(r["lr"], largest[(r["batch_size"], r["beta"])]) for r in diverged)
    return _verdict(
        "3. A badly chosen learning rate overshoots near the minimum or crawls.",
        verdict,
        "for every (batch size, beta): the smallest lr tried is slower to the target and ends "
        "higher than the best (crawl), and the largest diverges or ends higher (overshoot); "
        "supported if both hold in >= 75% of them, partly if in >= 25%. (A weak test: any grid "
        "wide enough to bracket the best lr shows both ends.) A (batch size, beta) with fewer "
        "than 3 lrs, or where half the seeds or more diverged at every lr (no best lr), is left "
        "out.",
        f"crawl at the smallest lr in {crawl}/{total}, overshoot at the largest in "
        f"{overshoot}/{total}, both in {both}/{total}; {len(diverged)} of {len(res.sweep)} sweep "
        f"runs diverged, {at_top} of them at the largest lr of their grid"
        + (
            f"; left out, half the seeds or more diverged at every lr: {untrained}"
            if untrained
            else ""
        ),
        "The learning rate must be retuned for every batch size (Shallue et al. 2019; the Deep "
        "Learning Tuning Playbook).",
        "best_lr.png, loss_curves.png",
    )


def _time_per_step(res: Results, batch_size: int, beta: float) -> float:
    runs = analysis.filter_records(res.sweep, batch_size=batch_size, beta=beta)
    return float(np.mean([r["wall_seconds"] / r["steps"] for r in runs])) if runs else math.nan


def verdict_batch_size(res: Results) -> dict:
    claim = (
        "4. A larger batch is the direct fix (a steadier gradient), but costs more per step, is "
        "not necessarily faster, and large batches easily get stuck at flat saddle points: batch "
        "size is a balance."
    )
    rule = (
        "four parts, at each batch size's best lr: steadier (SGD's oscillation falls with B); "
        "costlier (the fitted B_crit lies below the largest batch tested: well above it, doubling "
        "the batch nearly doubles the examples needed to reach the target); not faster (some "
        "larger batch needs at least as many steps to the target as a smaller one, seed ranges not "
        "overlapping); stuck (a "
        "large batch never reaches the target while a smaller one does, or test accuracy drops "
        "by > 2 points from the smallest to the largest batch; the budgets differ, clip(examples "
        "/ B) steps, so the largest batches see more examples). Supported if all four hold, "
        "partly if some do; a part the results cannot measure (too few batch sizes, or too few "
        "reaching the target) counts for neither, and with none measured it is not settled."
    )
    literature = (
        "Shallue et al. (2019): perfect scaling, then diminishing returns, then a plateau, with "
        "the learning rate retuned per batch size; McCandlish et al.: B_crit ~ the noise scale. "
        "Shallue et al. attribute most reported large-batch generalization gaps to insufficient "
        "tuning and budgets."
    )
    figures = "steps_to_target.png, loss_curves.png"
    tested = sorted({r["batch_size"] for r in res.best if r["beta"] == 0.0})
    if len(tested) < 2:
        evidence = (
            "needs SGD (beta 0) runs at 2 or more batch sizes; the sweep has them at B = "
            + (", ".join(map(str, tested)) or "none")
        )
        return _verdict(claim, UNSETTLED, rule, evidence, literature, figures)
    sizes, osc = _sgd_oscillation_by_batch(res)
    steadier = _rank_correlation(sizes, osc) < 0 if len(osc) >= 3 else None
    rows = sorted(
        (r for r in res.best if r["beta"] == 0.0 and r["steps_median"] is not None),
        key=lambda r: r["batch_size"],
    )
    fit = res.fit(0.0)
    reached = {r["batch_size"] for r in rows}
    stuck = [b for b in tested if b not in reached]
    examples = {r["batch_size"]: r["steps_median"] * r["batch_size"] for r in rows}
    steps = {r["batch_size"]: r["steps_median"] for r in rows}
    # Above B_crit a larger batch costs examples: below the smallest batch tested, at every one.
    costlier = None if fit is None else fit.b_crit < max(tested)
    # A larger batch that needs at least as many steps as a smaller one: the plateau. Any
    # smaller one, not only the next (a wide middle batch can overlap both neighbours); a seed
    # that never reached the target is infinitely slow, so it widens its batch's seed range.
    slowest = lambda r: r["steps_max"] if r["reached"] == r["seeds"] else math.inf
    no_gain = [
        (a["batch_size"], b["batch_size"])
        for a, b in itertools.combinations(rows, 2)
        if b["steps_min"] >= slowest(a)
    ]
    not_faster = bool(no_gain) if len(rows) >= 2 else None
    times = {
        r["batch_size"]: r["steps_median"] * _time_per_step(res, r["batch_size"], 0.0) for r in rows
    }
    fastest_wall = min(times, key=times.get) if times else None
    # No best lr where half the seeds or more diverged at every lr, and no accuracy at it (a
    # diverged run keeps its last one before it diverged).
    accuracy = {
        r["batch_size"]: r["final_test_accuracy"] for r in res.best
        if r["beta"] == 0.0 and r["final_train_loss"] is not None
        and r["final_test_accuracy"] is not None
    }  # fmt: skip
    big, small = (max(accuracy), min(accuracy)) if accuracy else (None, None)
    acc_drop = accuracy[small] - accuracy[big] if accuracy else math.nan
    gets_stuck = (
        bool(stuck and reached and max(stuck) > min(reached)) or acc_drop > 0.02
        if reached or len(accuracy) >= 2
        else None
    )
    parts = [steadier, costlier, not_faster, gets_stuck]
    measured = [part for part in parts if part is not None]
    if not measured:
        verdict = UNSETTLED
    elif len(measured) == len(parts) and all(measured):
        verdict = SUPPORTED
    else:
        verdict = PARTLY if any(measured) else NOT_SUPPORTED
    lo_b, hi_b = (min(examples), max(examples)) if examples else (None, None)
    yes = lambda flag: "not measured" if flag is None else "yes" if flag else "no"
    at = lambda b: "-" if b is None else b
    evidence = (
        f"steadier: SGD oscillation falls with B ({yes(steadier)}"
        f"{_unmeasured_oscillation(res)}); costlier: examples to target "
        f"{_fmt(examples.get(lo_b), '.3g')} at B = {at(lo_b)} vs "
        f"{_fmt(examples.get(hi_b), '.3g')} at B = {at(hi_b)}, fitted B_crit = "
        f"{_fmt(fit.b_crit if fit else None)} (S_min = {_fmt(fit.s_min if fit else None)} "
        f"steps), below the largest batch tested ({yes(costlier)}); not faster "
        f"({yes(not_faster)}): "
        "median steps to target "
        + (", ".join(f"{s:.0f} at B = {b}" for b, s in steps.items()) or "none reached")
        + f", a larger batch needing no fewer steps: "
        f"{', '.join(f'B = {a} -> {b}' for a, b in no_gain) or 'never'}; "
        f"not judged (it depends on the machine): the fastest in wall-clock time to target here "
        f"was B = {at(fastest_wall)} ({_fmt(times.get(fastest_wall), '.3g')} s, its group's wall "
        f"time per run and step, compilation included, times its steps); stuck "
        f"({yes(gets_stuck)}): batch sizes that never reached the target: {stuck or 'none'}; "
        f"test accuracy at the best lr {_fmt(accuracy.get(small))} at B = {at(small)} vs "
        f"{_fmt(accuracy.get(big))} at B = {at(big)}"
    )
    return _verdict(claim, verdict, rule, evidence, literature, figures)


def verdict_momentum(res: Results) -> dict:
    triples = effective_triples(res)
    positions = []
    lines = []
    for m, s, g in triples:
        lm, ls, lg = (c.mean(c.late_train_loss) for c in (m, s, g))
        p = math.log(lm / ls) / math.log(lg / ls) if lg != ls else math.nan
        positions.append(p)
        lines.append(
            f"B = {m.batch_size}, B' = {g.batch_size}: late full-train loss SGD(B) {_fmt(ls)}, "
            f"momentum(B) {_fmt(lm)}, SGD(B') {_fmt(lg)}, so momentum sits {_fmt(p, '.2f')} of "
            f"the way from SGD at B to SGD at B' (log scale); batch-loss oscillation "
            f"{_fmt(s.mean(s.batch_loss_oscillation))}, {_fmt(m.mean(m.batch_loss_oscillation))}, "
            f"{_fmt(g.mean(g.batch_loss_oscillation))}; full-train-loss jitter "
            f"{_fmt(s.mean(s.full_loss_jitter))}, {_fmt(m.mean(m.full_loss_jitter))}, "
            f"{_fmt(g.mean(g.full_loss_jitter))}"
        )
    ratios = []
    momentum_betas = [b for b in res.betas() if b > 0]
    for b in res.batch_sizes()[:3]:
        sgd = res.best_row(b, 0.0)
        for beta in momentum_betas:
            mom = res.best_row(b, beta)
            if sgd and mom and sgd["steps_median"] and mom["steps_median"]:
                ratios.append((b, beta, mom["steps_median"] / sgd["steps_median"]))
    like_bigger = bool(positions) and all(p >= 0.5 for p in positions)
    # Beyond seed spread: every momentum seed below every SGD seed.
    steadier_at = [
        m.batch_size for m, s, _ in triples if _all_below(m.full_loss_jitter, s.full_loss_jitter)
    ]
    steadier = bool(triples) and len(steadier_at) == len(triples)
    faster_small = bool(ratios) and np.mean([r for *_, r in ratios]) < 0.9
    if like_bigger and faster_small:
        verdict = SUPPORTED
    elif like_bigger or faster_small or steadier:
        verdict = PARTLY
    else:
        # Where every configuration of the test diverged in a seed (no mean), it measured nothing.
        measured = [
            m for m, s, g in triples
            if any(math.isfinite(c.mean(c.late_train_loss)) for c in (m, s, g))
        ]  # fmt: skip
        verdict = NOT_SUPPORTED if measured or ratios else UNSETTLED
    lines.append(
        "steps to target at the small batch sizes, momentum / SGD (each at its best lr): "
        + (
            ", ".join(
                f"B = {b}" + (f", beta {beta:g}" if len(momentum_betas) > 1 else "") + f": {r:.2f}"
                for b, beta, r in ratios
            )
            or "none where both reached it"
        )
    )
    lines.append(
        "less full-train-loss jitter than SGD beyond seed spread at B = "
        + (", ".join(map(str, steadier_at)) or "none")
        + f" (of B = {', '.join(str(m.batch_size) for m, _, _ in triples)})"
        if triples
        else "no effective-batch test (momentum at B against SGD at B and at B (1 + beta) / "
        "(1 - beta), one lr) in these results"
    )
    return _verdict(
        "5. Momentum gives 'large-batch-like stable gradients at small-batch cost'.",
        verdict,
        "two parts. At one fixed lr, momentum at B is 'like a bigger batch' if its full-train "
        "loss late in training (the mean over the last half) lies at least half way, on a "
        "log scale, from SGD's at B to SGD's at B (1 + beta) / (1 - beta), at every B tested. "
        "At tuned lrs, it buys small-batch speed if it needs < 0.9x SGD's median steps to the "
        "target, averaged over the three smallest batch sizes"
        + (" and the momentum betas" if len(momentum_betas) > 1 else "")
        + ". Supported if both hold; partly if one does, or if momentum at least steadies the "
        "parameters (less jitter of the full-train loss than SGD at the same B, every seed below "
        "every SGD seed, at every B tested).",
        "; ".join(lines),
        "Shallue et al. and Zhang et al. (NQM): momentum matches SGD at small batch sizes and "
        "helps only above a critical batch size, by extending perfect scaling; Kidambi et al. "
        "(2018): heavy-ball cannot beat SGD on some stochastic problems. For i.i.d. noise the EMA "
        "has (1 - beta)/(1 + beta) of a gradient's variance, but successive velocities are "
        "correlated and the parameters integrate them; Smith & Le's noise scale at one EMA-form "
        "eta, eta N / B, does not depend on beta, so it predicts momentum at B to train like SGD "
        "at B, not like a larger batch.",
        "effective_batch.png, steps_to_target.png, nqm.png",
    )


def verdict_damping(res: Results) -> dict:
    if not res.quadratic:
        return _verdict("6. Agreeing gradients accelerate, alternating ones cancel.", UNSETTLED,
                        "-", "the quadratic stage did not run", "-", "-")  # fmt: skip
    from experiments.quadratic import summarize

    def summaries(run: dict) -> list[dict]:
        stored = run.get("seed_summaries") or []
        if stored and all("flat_half_steps" in x for x in stored):
            return stored
        # Written by an older version: summarize the one stored path (its first seed) afresh.
        return [summarize(run["path"])]

    by = {(r["batch_size"], r["beta"] > 0): summaries(r) for r in res.quadratic["runs"]}

    def halving(runs: list[dict]) -> list[float]:  # a run that never halved is the slowest
        return [math.inf if r["flat_half_steps"] is None else r["flat_half_steps"] for r in runs]

    lines, damp, faster = [], [], []
    for b in sorted({k[0] for k in by}):
        s, m = by[(b, False)], by[(b, True)]
        # Paired: in a seed both optimizers see the same noise draws.
        fewer = sum(
            x["reversal_fraction"] < y["reversal_fraction"] for x, y in zip(m, s, strict=True)
        )
        less = sum(
            x["steep_axis_travel"] < y["steep_axis_travel"] for x, y in zip(m, s, strict=True)
        )
        pairs = list(zip(halving(m), halving(s), strict=True))
        ahead = sum(x < y for x, y in pairs)
        # A seed where neither halved theta_2 within the steps run measures no speed-up either way.
        neither = sum(x == y == math.inf for x, y in pairs)
        n = len(s)
        damp.append(fewer == n and less == n)
        faster.append(None if neither and ahead + neither == n else ahead == n)
        unmeasured = f"; neither halved theta_2 in {neither}/{n} seeds" if neither else ""
        mean = lambda runs, key: float(np.mean([r[key] for r in runs]))
        lines.append(
            f"B = {b} ({n} noise seeds, SGD vs momentum, means): successive-step cosine "
            f"{mean(s, 'mean_cos_successive'):+.2f} vs {mean(m, 'mean_cos_successive'):+.2f}, "
            f"reversals {mean(s, 'reversal_fraction'):.0%} vs {mean(m, 'reversal_fraction'):.0%} "
            f"(momentum fewer in {fewer}/{n} seeds), back-and-forth across the valley "
            f"{mean(s, 'steep_axis_travel'):.3g} vs {mean(m, 'steep_axis_travel'):.3g} (less in "
            f"{less}/{n}); along the flat axis, where gradients agree, steps to halve theta_2 "
            f"(median) {_fmt(float(np.median(halving(s))))} vs "
            f"{_fmt(float(np.median(halving(m))))} (momentum faster in {ahead}/{n}{unmeasured}); "
            f"loss over the second half along the flat axis "
            f"{mean(s, 'flat_loss_second_half'):.3g} vs {mean(m, 'flat_loss_second_half'):.3g}, "
            f"along the steep axis "
            f"{mean(s, 'steep_loss_second_half'):.3g} vs {mean(m, 'steep_loss_second_half'):.3g}"
        )
    parts = damp + faster
    known = [p for p in parts if p is not None]
    if len(known) < len(parts) and (all(known) or not any(known)):
        verdict = UNSETTLED  # the unmeasured parts decide between two verdicts
    else:
        verdict = SUPPORTED if all(parts) else PARTLY if any(parts) else NOT_SUPPORTED
    return _verdict(
        "6. Where gradients agree across steps the velocity grows and steps speed up; where they "
        "alternate they cancel and the oscillation is damped.",
        verdict,
        "on the noisy 2-D quadratic at one lr (the same for both), paired over noise seeds, at "
        "every batch size: damped if momentum reverses direction less often and travels less "
        "across the steep axis in every seed; sped up if it halves its distance along the flat "
        "axis (where the gradient keeps its sign) in fewer steps in every seed. At the same eta "
        "the EMA form predicts no speed-up (see the literature column), so this part tests the "
        "claim as the course states it, with one eta for both; at small B the noise, not the "
        "gradient, moves theta_2 first. Supported if both "
        "hold at every batch size, partly if either holds somewhere; a seed where neither "
        "optimizer halved theta_2 within the steps run does not count, and the claim is not "
        "settled if such seeds decide the verdict.",
        "; ".join(lines),
        "Polyak's heavy ball on a quadratic: acceleration along low-curvature directions, damped "
        "oscillation along high-curvature ones (deterministic analysis; noise limits it, Zhang "
        "et al. 2019). In the EMA form at the same eta, a steady gradient g gives the step "
        "eta g, as in SGD (the classical form's 1/(1 - beta) gain is absorbed into eta), and the "
        "EMA starts at zero, so momentum starts behind along agreeing gradients. What it gains is "
        "stability (it is stable for eta h < 2 (1 + beta)/(1 - beta), SGD only for eta h < 2), "
        "so it can take a larger eta.",
        "quadratic.png",
    )


def verdicts(res: Results) -> list[dict]:
    """The verdict on each testable claim (1-6) of the source material."""
    return [
        verdict_noise(res),
        verdict_shrinks(res),
        verdict_learning_rate(res),
        verdict_batch_size(res),
        verdict_momentum(res),
        verdict_damping(res),
    ]


# ---------------------------------------------------------------------------
# The report.


def _evaluations(res: Results) -> str:
    """How many full evaluations the sweep's runs made: the preset asks for about
    ``evals_per_run``, a whole number of steps apart (e.g. "75-80"), and one at the last step
    where the steps are no whole number of intervals (as the engine's ``eval_steps``)."""
    counts = {
        -(-int(r["steps"]) // int(r["eval_every"]))
        for r in res.sweep
        if isinstance(r.get("eval_every"), int) and r["eval_every"] > 0
    }
    if not counts:
        return f"about {res.preset['evals_per_run']}"
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


def _unfinished_sweep(res: Results) -> str:
    """A warning where the sweep, which most verdicts judge, has runs stored but is not recorded
    as finished (``report DIR`` while the main job runs, or after it was stopped); "" if not."""
    from experiments.study import sweep_lrs

    if not res.sweep or "sweep" in res.meta.get("stages", {}):
        return ""
    p = res.preset
    planned = sum(len(sweep_lrs(b)) for b in p["batch_sizes"]) * len(p["betas"]) * p["seeds"]
    return (
        f"**The sweep has not finished**: {len(res.sweep)} of the {planned} runs of its grid are "
        f"stored, at batch sizes {', '.join(map(str, res.batch_sizes()))}; the verdicts, tables "
        "and figures judge those alone."
    )


def _setup_section(res: Results) -> str:
    p, meta = res.preset, res.meta
    stages = meta.get("stages", {})
    wall = sum(s["wall_seconds"] for s in stages.values())
    steps = stages.get("sweep", {}).get("steps", {})
    m = meta.get("machine", {})
    lines = [
        "## Setup",
        "",
        f"- **Data**: {DATASETS.get(p['dataset'], p['dataset'])}.",
        f"- **Model**: {MODELS.get(p['model'], p['model'])}, softmax cross-entropy; optimizer "
        "`ema_sgd(lr, beta)`, beta = 0 being plain SGD through the same code"
        + (
            f"; also swept on the same grid: {', '.join(p['extra_models'])}."
            if p.get("extra_models")
            else "."
        ),
        f"- **Grid**: batch sizes {', '.join(map(str, p['batch_sizes']))}; beta "
        f"{', '.join(f'{b:g}' for b in p['betas'])}; {p['seeds']} seeds (a seed fixes the "
        "initialization and the data order, identical across learning rates); five learning "
        "rates per batch size, half a decade apart from c/3.16 to 31.6c with c = 0.1 sqrt(B/32) "
        "(the five largest of `sweep --lrs auto`; `experiments.study.sweep_lrs`).",
        f"- **Budget** (in steps): clip({p['example_budget']} examples / B, "
        f"{p['step_range'][0]}, {p['step_range'][1]}) steps per run, rounded up to a whole "
        "number of evaluation intervals"
        + (f" ({', '.join(f'B={b}: {s}' for b, s in steps.items())})" if steps else "")
        + f"; {_evaluations(res)} evaluations of the full train and test sets per run, evenly "
        "spaced, which sets the resolution of steps to result.",
        f"- **Target**: full-training-set loss <= {p['target_loss']:g}; steps to result = the "
        "first evaluation at or below it (Shallue et al.). Best lr per (batch size, beta): the "
        "fewest median steps over seeds, a seed that never reached counting as infinitely slow; "
        "ties broken by the final train loss. It is picked on the same seeds whose results the "
        "tables, figures and verdicts then report (no held-out seeds), so these are the best of "
        "the grid on these seeds: optimistic where two lrs come close, for SGD and momentum "
        "alike.",
        f"- **Preset** `{p['name']}`; machine: {m.get('processor', '?')}, "
        f"{m.get('cpu_count', '?')} "
        f"CPUs, {m.get('platform', '?')}, JAX {m.get('jax', '?')} on {m.get('backend', '?')} "
        f"({len(m.get('devices', []))} devices).",
        f"- **Wall time**: {wall:.0f} s in all ("
        + ", ".join(f"{k} {v['wall_seconds']:.0f} s" for k, v in stages.items())
        + ").",
    ]
    return "\n".join(lines)


def _verdict_table(items: Sequence[dict]) -> str:
    lines = ["| claim | verdict | evidence from this run | literature |", "|---|---|---|---|"]
    for v in items:
        lines.append(
            f"| {v['claim']} | **{v['verdict']}** | {v['evidence']} (figures: {v['figure']}) "
            f"| {v['literature']} |"
        )
    return "\n".join(lines)


def _effective_table(res: Results) -> str:
    lines = [
        "| B | optimizer | batch | late full-train loss (mean ± std) | batch-loss oscillation "
        "(mean, seed range) | full-train-loss jitter: relative (mean, seed range) | absolute |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]

    def spread(values: list[float]) -> str:
        # Claims 1 and 5 judge these seed by seed: the range shows whether the seeds lie apart.
        ranged = len(values) > 1 and all(map(math.isfinite, values))
        extent = f" ({_fmt(min(values))}-{_fmt(max(values))})" if ranged else ""
        return _fmt(EffectiveCase.mean(values)) + extent

    for m, s, g in effective_triples(res):
        for case in (s, m, g):
            late = case.late_train_loss
            # One seed has no spread over seeds (its std, 0, is not a measurement).
            std = _fmt(case.std(late), ".2g") if len(late) > 1 else "n/a"
            lines.append(
                f"| {m.batch_size} | {_label(case.beta)} | {case.batch_size} "
                f"| {_fmt(case.mean(late), '.4f')} ± {std} "
                f"| {spread(case.batch_loss_oscillation)} "
                f"| {spread(case.full_loss_oscillation)} "
                f"| {spread(case.full_loss_jitter)} |"
            )
    return "\n".join(lines)


def _fits_table(res: Results, best: list[dict] | None = None) -> str:
    best = res.best if best is None else best
    lines = ["| optimizer | S_min (steps) | B_crit | E_min (examples) | rms log residual |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for beta in sorted({row["beta"] for row in best}):
        fit = analysis.fit_from_rows(best, beta)
        if fit is None:
            lines.append(f"| {_label(beta)} | - | - | - | - |")
            continue
        sizes = [row["batch_size"] for row in best if row["beta"] == beta]
        if fit.b_crit_at_bound:
            bound = " (at the search bound)"
        elif not min(sizes) <= fit.b_crit <= max(sizes):
            bound = f" (outside the batch sizes tested, {min(sizes)}-{max(sizes)}: extrapolated)"
        else:
            bound = ""
        lines.append(
            f"| {_label(beta)} | {fit.s_min:.3g} | {fit.b_crit:.3g}{bound} | {fit.e_min:.3g} "
            f"| {fit.rms_log_residual:.3f} |"
        )
    return "\n".join(lines)


def _nqm_section(res: Results) -> str:
    from experiments import nqm

    rows = res.nqm

    # `nqm --out DIR` may have rewritten nqm.json with any batch sizes: some may not have
    # reached the target, and a fit needs two that did.
    def fit(key: str) -> analysis.ScalingFit | None:
        done = [r for r in rows if r[key]]
        if len({r["batch_size"] for r in done}) < 2:
            return None
        return analysis.fit_steps_vs_batch([r["batch_size"] for r in done], [r[key] for r in done])

    sgd, mom = fit("sgd_steps"), fit("momentum_steps")
    # As in the fits table: a B_crit at the search bound is not determined by the data.
    shown = lambda f: f"{f.b_crit:.3g}{' (at the search bound)' if f.b_crit_at_bound else ''}"
    if sgd and mom:
        fits = f"Fitted B_crit: SGD {shown(sgd)}, momentum {shown(mom)}."
    else:
        fits = (
            f"B_crit: SGD {shown(sgd) if sgd else 'not fitted'}, momentum "
            f"{shown(mom) if mom else 'not fitted'} (a fit needs two batch sizes that reached "
            "the target)."
        )
    reached = [r for r in rows if r["sgd_steps"] and r["momentum_steps"]]
    if reached:
        first, last = reached[0], reached[-1]
        ratios = (
            f"Momentum / SGD steps: {first['momentum_steps'] / first['sgd_steps']:.2f} at "
            f"B = {first['batch_size']}, {last['momentum_steps'] / last['sgd_steps']:.3f} at "
            f"B = {last['batch_size']}. "
        )
    else:
        ratios = "No batch size reached the target. "
    grid = [float(beta) for beta in rows[0].get("by_beta", {})]
    # With one beta there is no grid to be at the edge of: nothing was tuned.
    at_edge = [r["batch_size"] for r in rows if len(grid) > 1 and r["momentum_beta"] == max(grid)]
    edge = (
        f" The tuned beta is the largest of the grid ({max(grid):g}) at B = "
        f"{', '.join(map(str, at_edge))}: there the optimum may lie beyond it."
        if at_edge
        else ""
    )
    return "\n".join([
        "## 6. The noisy quadratic model (Zhang et al. 2019)",
        "",
        "![NQM](nqm.png)",
        "",
        f"Loss 0.5 sum_i h_i theta_i^2 with h_i = 1/i, d = {nqm.row_dim(rows[0])}, "
        "gradient-noise variance h_i/B; the expected loss is propagated in closed form (no "
        "sampling) and the step size a (and, for momentum, beta) is tuned per batch size for the "
        f"fewest steps to an expected loss of 0.01. {ratios}{fits}{edge}",
        "",
        nqm.format_table(rows),
    ])  # fmt: skip


def _noise_section(res: Results) -> str:
    rows = res.noise["rows"]
    lines = [
        "| step | full train loss | B_simple ± s.e. | abs(G)^2 ± s.e. | tr(Sigma) ± s.e. |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {_fmt(r['train_loss'], '.3f')} | {_fmt(r['b_simple'])} ± "
            f"{_fmt(r.get('b_simple_stderr'), '.2g')} "
            f"| {_fmt(r['grad_sq'])} ± {_fmt(r['grad_sq_stderr'], '.2g')} | {_fmt(r['trace'])} ± "
            f"{_fmt(r['trace_stderr'], '.2g')} |"
        )
    return "\n".join(lines)


def _baseline_lrs() -> str:
    from experiments.baselines import EMA_LRS

    return ", ".join(f"{lr:g}" for lr in EMA_LRS)


def _baselines_section(res: Results) -> str:
    from experiments.baselines import PAPER_TEST_ACCURACY

    if not res.baselines:
        return "The baselines stage did not run (`python -m experiments baselines --out DIR`)."
    lines = [
        "| model | paper (Adam) | this run: Adam, lr 1e-2, batch 100 | this run: ema_sgd | seeds |",
        "|---|---:|---:|---:|---:|",
    ]

    def accuracy(e: dict, seeds: int) -> str:  # a single seed has no spread to show
        if e["test_accuracy"] is None:  # a seed diverged (experiments.baselines)
            return "diverged"
        spread = f" ± {_fmt(e['test_accuracy_std'], '.3f')}" if seeds > 1 else ""
        return _fmt(e["test_accuracy"], ".3f") + spread

    for name, entry in res.baselines.items():
        ema, seeds = entry["ema_sgd"], entry["seeds"]
        ema_cell = (
            f"diverged at every lr (beta {ema['beta']:g})"
            if ema["lr"] is None
            else f"{accuracy(ema, seeds)} (beta {ema['beta']:g}, lr {_fmt(ema['lr'])})"
        )
        lines.append(
            f"| {name} | {_fmt(entry.get('paper'), '.2f')} | {accuracy(entry, seeds)} | "
            f"{ema_cell} | {seeds} |"
        )
    missing = [m for m in PAPER_TEST_ACCURACY if m not in res.baselines]
    if missing and res.preset["dataset"] == "mnist1d":
        # The command writes DIR/baselines.json afresh: it names the models already run too.
        every = ",".join(PAPER_TEST_ACCURACY)
        lines += [
            "",
            f"Not run in the `{res.preset['name']}` preset: {', '.join(missing)} (run "
            f"`python -m experiments baselines --out DIR --models {every} --steps "
            f"{res.preset['baseline_steps']} --seeds {res.preset['baseline_seeds']}`, which "
            "writes DIR/baselines.json afresh with every model, or the `full` preset).",
        ]
    return "\n".join(lines)


def _extra_sweep_parts(res: Results) -> list[str]:
    """The steps-to-result table and fits of every other model swept on the same grid."""
    parts = []
    for model, records in res.extra_sweeps.items():
        if not records:
            continue
        best = analysis.best_settings(records)
        parts += [
            f"### The same sweep with the {MODELS.get(model, model)}",
            "",
            analysis.steps_table_markdown(best),
            "",
            _fits_table(res, best),
            "",
        ]
    return parts


def build(out: str | Path) -> Path:
    """Writes ``DIR/report.md``, ``DIR/figures/*.png`` and ``DIR/verdicts.json``.

    Everything is drawn and composed in memory first: an error on the way writes nothing. Call it
    holding :func:`locked`, as the ``report`` command and the main job do.
    """
    res = load(out)
    drawn: dict[str, io.BytesIO] = collections.defaultdict(io.BytesIO)  # figure name: its PNG
    captions = {}
    sweep_figures = {
        "loss_curves": fig_loss_curves,
        "steps_to_target": fig_steps,
        "best_lr": fig_best_lr,
        "oscillation": fig_oscillation,
    }
    if res.sweep:
        for name, draw in sweep_figures.items():
            captions[name] = draw(res, drawn[name])
    if effective_triples(res):
        captions["effective_batch"] = fig_effective(res, drawn["effective_batch"])
    # A log axis needs a positive B_simple (null where the |G|^2 estimate was not positive).
    if res.noise and any((r["b_simple"] or 0) > 0 for r in res.noise["rows"]):
        captions["noise_scale"] = fig_noise_scale(res, drawn["noise_scale"])
    items = verdicts(res)  # each one "not settled" where its results are missing

    def figure(name: str) -> str:
        if name in captions:
            return f"![{name}]({FIGURES_DIR}/{name}.png)\n\n*{captions[name]}*"
        return "" if res.sweep or name not in sweep_figures else "Not run: no sweep results yet."

    quad = res.quadratic
    shell_out = shlex.quote(str(res.out))  # as a shell takes it: a path may hold spaces
    # The stand-alone commands with the preset's settings (their defaults differ).
    pr = res.preset
    join = lambda values: ",".join(str(v) for v in values)  # exact, as the options parse them
    nqm_options = f"--batch-sizes {join(pr['nqm_batch_sizes'])} --betas {join(pr['nqm_betas'])}"
    baseline_options = (
        f"--models {','.join(pr['baseline_models'])} --steps {pr['baseline_steps']} "
        f"--seeds {pr['baseline_seeds']}"
    )
    parts = [
        f"# Batch size and momentum on {DATASET_TITLES.get(pr['dataset'], pr['dataset'])}: what "
        "the course notes claim, measured",
        "",
        f"Generated by `python -m experiments report {shell_out}` on "
        f"{datetime.date.today().isoformat()} from the stored results of the `{res.preset['name']}`"
        " preset. Every number below is computed from those results.",
        "",
        "## Verdicts",
        "",
        _unfinished_sweep(res),
        "",
        _verdict_table(items),
        "",
        "How each verdict is decided:",
        "",
        *[f"- Claim {v['claim'].split('.')[0]}: {v['rule']}" for v in items],
        "",
        _setup_section(res),
        "",
        "## 1. The course picture: a noisy, ill-conditioned quadratic",
        "",
        (
            "![quadratic](quadratic.png)\n\n"
            f"Loss 0.5 (theta_1^2 + {quad['setup']['curvatures'][1]:g} theta_2^2) with Gaussian "
            f"gradient noise of std {quad['setup']['noise_std_per_example']:g}/sqrt(B); SGD and "
            f"EMA momentum (beta {quad['setup']['beta']:g}) at the same lr "
            f"{quad['setup']['learning_rate']:g}"
            f", the same noise draws, {quad['setup']['steps']} steps; drawn: noise seed "
            f"{quad['setup']['seed']}, of the {quad['setup'].get('seeds', 1)} the verdict on "
            "claim 6 pairs."
        )
        if quad
        else "Not run.",
        "",
        "## 2. Loss curves",
        "",
        figure("loss_curves"),
        "",
        "## 3. Steps to result vs batch size",
        "",
        figure("steps_to_target"),
        "",
        analysis.steps_table_markdown(res.best) if res.best else "",
        "",
        _fits_table(res) if res.best else "",
        "",
        *_extra_sweep_parts(res),
        "## 4. Best learning rate vs batch size",
        "",
        figure("best_lr"),
        "",
        "## 5. Oscillation, and is momentum like a bigger batch?",
        "",
        figure("oscillation"),
        "",
        figure("effective_batch"),
        "",
        _effective_table(res)
        if effective_triples(res)
        else _skipped(res, "effective")
        or "The effective-batch test (momentum at B against SGD at B and at B (1 + beta) / "
        "(1 - beta), at one lr): not run.",
        "",
        _nqm_section(res) if res.nqm else "## 6. The noisy quadratic model\n\nNot run.",
        "",
        "## 7. Gradient noise scale",
        "",
        figure("noise_scale"),
        "",
        _noise_section(res) if res.noise else _skipped(res, "noise_scale") or "Not run.",
        "",
        "## Baselines: is the training pipeline right?",
        "",
        "The MNIST-1D paper's setup (Greydanus 2020: Adam, lr 1e-2, batch 100, 6000 steps) next "
        "to its reported test accuracy, and the same models trained with `ema_sgd`, its lr "
        f"picked from {_baseline_lrs()} by the lowest final train loss (mean over seeds; an lr at "
        "which a seed diverged is skipped): the test set chooses nothing. Accuracies are means "
        "over seeds, ± the standard deviation (ddof 0).",
        "",
        _baselines_section(res),
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python -m experiments --out {shell_out} --preset {res.preset['name']}  # all, resumable",
        f"python -m experiments report {shell_out}          # this report from the stored results",
        f"python -m experiments quadratic --out {shell_out}  # section 1",
        f"python -m experiments nqm --out {shell_out} {nqm_options}  # section 6",
        f"python -m experiments baselines --out {shell_out} {baseline_options}  # baselines",
        "```",
        "",
    ]
    path = res.out / "report.md"
    text = "\n".join(parts)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    if drawn:
        (res.out / FIGURES_DIR).mkdir(exist_ok=True)
    for name, png in drawn.items():
        write_bytes(res.out / FIGURES_DIR / f"{name}.png", png.getvalue())
    write_json(res.out / "verdicts.json", items)
    # A path in it that is not UTF-8 (bytes Python decodes as surrogates) is written as it is.
    write_bytes(path, text.encode("utf-8", errors="surrogateescape"))
    return path


def summary(out: str | Path) -> str:
    """A short text summary: the verdicts and the steps-to-result of each batch size."""
    res = load(out)
    lines = [f"{'claim':<7}verdict"]
    for v in read_json(res.out / "verdicts.json") or []:
        lines.append(f"{v['claim'].split('.')[0]:<7}{v['verdict']}")
    betas = res.betas()
    lines.append("")
    lines.append(f"{'batch':>6}" + "".join(f"{'steps, ' + _label(b):>34}" for b in betas))
    for batch_size in res.batch_sizes():
        cells = []
        for beta in betas:
            row = res.best_row(batch_size, beta)
            text = "-" if row is None or row["steps_median"] is None else (
                f"{row['steps_median']:.0f} (lr {row['lr']:.3g})"
            )  # fmt: skip
            cells.append(f"{text:>34}")
        lines.append(f"{batch_size:>6}" + "".join(cells))
    lines.append(
        f"steps: the median over seeds of the steps to a full-train loss of "
        f"{res.preset['target_loss']:g}, at the batch size's best lr"
    )
    return "\n".join(lines)


# What export copies: the report, its verdicts and the two stages' images, and the figures
# (those build draws, EXPORTED; any other PNG in DIR/figures too).
EXPORTED_FILES = ["report.md", "verdicts.json", "quadratic.png", "nqm.png"]
EXPORTED = EXPORTED_FILES + [
    f"{FIGURES_DIR}/{name}.png"
    for name in (
        "loss_curves", "steps_to_target", "best_lr", "oscillation", "effective_batch",
        "noise_scale",
    )
]  # fmt: skip


# What build writes in DIR: the report, its verdicts and the figures it draws.
WRITES = ["report.md", "verdicts.json", *EXPORTED[len(EXPORTED_FILES) :]]
REPORT_LOCK = ".report.lock"


def locked(out: str | Path, wait: bool = False):
    """DIR's report lock (``DIR/.report.lock``, an :class:`experiments.store.DirectoryLock`; a
    context manager), to hold while a report of DIR is built (and exported).

    Two reports of one DIR at once (``report DIR`` while the main job writes its own at its end)
    mixed their files, and the one that read the results first could replace the other's: the
    main job's final report by one of its unfinished sweep. Not DIR's own lock (``DIR/.lock``),
    which the main job holds throughout: ``report DIR`` while it runs shows the results so far.
    The temporary files a killed report left are removed once it is held.

    Raises:
      experiments.store.StoreLockedError: if another process holds it (and not ``wait``).
    """
    from experiments.store import DirectoryLock

    return DirectoryLock(out, WRITES, "wait for it", REPORT_LOCK, wait)


def check_export(dest: str | Path, names: Sequence[str] = EXPORTED) -> None:
    """Raises ValueError if ``dest`` cannot take one of ``names`` (paths relative to it): a
    folder where the file goes, or a file where its folder goes."""
    for name in names:
        target = Path(dest) / name
        if target.is_dir():
            raise ValueError(f"cannot export {name}: {str(target)!r} is a directory")
        if target.parent.exists() and not target.parent.is_dir():
            raise ValueError(f"cannot export {name}: {str(target.parent)!r} is not a directory")


def export(out: str | Path, dest: str | Path) -> list[Path]:
    """Copies the report, its verdicts and its figures (not the raw results) to ``dest``, each
    file written whole (:func:`experiments.store.write_bytes`).

    The copy keeps the report's relative links, so ``dest/report.md`` shows its figures; the
    README's results come from such a copy.

    Raises:
      ValueError: a folder in ``dest`` where a file goes, or a file where a folder goes (checked
        before anything is copied).
    """
    out, dest = Path(out), Path(dest)
    names = EXPORTED_FILES + [
        f"{FIGURES_DIR}/{p.name}" for p in sorted((out / FIGURES_DIR).glob("*.png"))
    ]
    names = [name for name in names if (out / name).exists()]
    # Checked before the first copy: such a file failed with an OSError after the ones before.
    check_export(dest, names)
    copied = []
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        # Each file whole, as the report writes it: a crash or a full disk midway leaves the
        # last export's file, not a torn one, and a reader of the old file keeps it whole.
        write_bytes(dest / name, (out / name).read_bytes())
        copied.append(dest / name)
    return copied


def _study_dir(text: str) -> str:
    # Path("") is the working directory: `report "$DIR"` with DIR unset rebuilt its report.
    if not text:
        raise argparse.ArgumentTypeError("must be a directory path, got ''")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``report`` subcommand."""
    parser.add_argument(
        "dir", type=_study_dir, metavar="DIR", help="a directory written by the main job"
    )
    from experiments.cli import output_dir

    parser.add_argument(
        "--export",
        type=output_dir,
        metavar="PATH",
        help="also copy the report and its figures to PATH (e.g. docs/results for the README)",
    )


def run(args: argparse.Namespace) -> int:
    """Rebuilds the report; prints its path."""
    from experiments.cli import UsageError

    # Checked before the report is rebuilt: copying its files onto themselves would fail after.
    dest = args.export
    if dest and dest.exists() and Path(args.dir).exists() and dest.samefile(args.dir):
        raise UsageError(f"--export {str(dest)!r} is DIR itself; give another directory")
    if dest:
        try:  # as far as known before the report is built: a refusal writes nothing in DIR
            check_export(dest)
        except ValueError as e:
            raise UsageError(f"--export: {e}") from None
    # Not for a DIR without a study: build refuses it, and the lock file would be left in a
    # folder that is not this tool's.
    from experiments.store import StoreLockedError
    from experiments.study import STUDY_FILE

    try:
        held = locked(args.dir) if (Path(args.dir) / STUDY_FILE).is_file() else None
    except StoreLockedError as e:  # another report of DIR is being written
        raise UsageError(str(e)) from None
    with held or contextlib.nullcontext():
        try:
            path = build(args.dir)
        except (ValueError, zipfile.BadZipFile) as e:  # no study, or a corrupt one
            raise UsageError(str(e)) from None
        copied = None
        if args.export:
            try:  # before anything is printed: a refusal is one error line and nothing else
                copied = export(args.dir, args.export)
            except ValueError as e:
                raise UsageError(f"--export: {e}") from None
        text = summary(args.dir)
    print(text)
    print(f"report: {path}")
    if copied is not None:
        print(f"exported {len(copied)} files to {args.export}")
    return 0
