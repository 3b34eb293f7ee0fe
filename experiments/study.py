"""The main job: does momentum buy large-batch stability at small-batch cost?

``python -m experiments [--out DIR] [--preset quick|full]`` runs every stage of the study into DIR
and ends with ``DIR/report.md``. Each stage stores its results as it goes and is skipped (or, for
the sweeps, resumed) when run again, so an interrupted job continues where it stopped; a stage
whose output files were since removed or damaged (for a sweep, runs missing from its store), or
whose results an older version of this code computed differently (:data:`STAGE_VERSIONS`), runs
again. It runs in one process, on that host's devices; in a multi-process JAX job (a multi-host TPU
slice) it stops before writing anything: there ``sweep --distributed`` runs the grid.

Stages:

1. ``quadratic``: the course picture, a noisy ill-conditioned 2-D quadratic (experiments.quadratic).
2. ``nqm``: Zhang et al.'s noisy quadratic model, closed form (experiments.nqm).
3. ``sweep``: MNIST-1D, batch size x beta x learning rate x seed, steps to a train-loss target
   (experiments.sweep) into ``DIR/sweep``.
4. ``effective``: at one fixed learning rate (the best SGD rate of the sweep at the smallest test
   batch), momentum at batch B against SGD at B and at ``B (1 + beta) / (1 - beta)``, evaluated on
   the full training set every few steps, into ``DIR/effective``.
5. ``noise_scale``: the simple gradient noise scale ``B_simple`` (McCandlish et al.) measured along
   an SGD training run of the sweep's model.
6. ``baselines``: the MNIST-1D paper's setup (Adam, lr 1e-2, batch 100) for every model, and the
   same models with ``ema_sgd`` (experiments.baselines).
7. ``report``: figures and ``DIR/report.md`` (experiments.report).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import stage_files
from experiments.cli import usable_cores
from experiments.stage_files import STAGE_FILES
from experiments.store import RUNS_FILE, read_json, read_runs, write_json

HELP = "the whole study into --out (default: results), then its report"
ON_INTERRUPT = "interrupted; finished runs and stages are kept: rerun to resume"
DEFAULT_OUT = Path("results")  # the main job's --out when none is given


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that sizes the study. Budgets are in optimizer steps, never epochs."""

    name: str
    dataset: str
    model: str
    batch_sizes: tuple[int, ...]
    betas: tuple[float, ...]
    seeds: int
    example_budget: int  # a sweep run at batch B gets clip(example_budget / B, *step_range) steps
    step_range: tuple[int, int]
    evals_per_run: int  # full train/test evaluations per sweep run, evenly spaced
    target_loss: float  # full-train-set cross-entropy goal for steps-to-target
    effective_beta: float
    effective_batches: tuple[int, ...]  # momentum batch sizes B of the effective-batch test
    effective_steps: int
    effective_eval_every: int
    noise_scale_batches: tuple[int, int]  # (b_small, b_big) of the two-batch estimator
    noise_scale_checkpoints: tuple[int, ...]
    noise_scale_pairs: int
    nqm_batch_sizes: tuple[int, ...]
    nqm_betas: tuple[float, ...]  # momentum values tuned over in the NQM (0 is SGD)
    baseline_models: tuple[str, ...]
    baseline_steps: int
    baseline_seeds: int
    # Models swept on the same grid after `model` (its steps-to-result table and fit only).
    extra_models: tuple[str, ...] = ()

    def __post_init__(self):
        # Later stages take their learning rate from the sweep at these batch sizes.
        needed = {min(self.effective_batches), self.noise_scale_batches[0]}
        if not needed <= set(self.batch_sizes):
            raise ValueError(
                f"preset {self.name!r}: batch sizes {sorted(needed)} (the smallest effective-"
                f"batch test and noise-scale batch) must be in batch_sizes={self.batch_sizes}."
            )

    def sweep_steps(self, batch_size: int) -> int:
        """The step budget at one batch size: a fixed number of examples, within step_range.

        Perfect scaling (half the steps at twice the batch) costs the same examples at every
        batch size, so an example budget gives every batch size the same chance to show it;
        the floor leaves large batches enough steps to reach the target at all.
        """
        every = self.sweep_eval_every(batch_size)
        return math.ceil(self._budget_steps(batch_size) / every) * every

    def sweep_eval_every(self, batch_size: int) -> int:
        """Steps between evaluations at one batch size: about ``evals_per_run`` per run.

        Steps-to-result is resolved to one evaluation interval, the same fraction of the budget at
        every batch size. (A fixed interval would make evaluation, not training, the main cost at
        small batch sizes: a full pass over the 5000 examples costs what ~200 steps of batch 8 do.)
        """
        return max(1, math.ceil(self._budget_steps(batch_size) / self.evals_per_run))

    def _budget_steps(self, batch_size: int) -> int:
        """``example_budget / batch_size`` steps, clipped to ``step_range``."""
        lo, hi = self.step_range
        return min(hi, max(lo, math.ceil(self.example_budget / batch_size)))

    @property
    def effective_sgd_batches(self) -> tuple[int, ...]:
        """SGD batch sizes of the effective-batch test: each B and B (1 + beta) / (1 - beta)."""
        sizes = {b for b in self.effective_batches} | {
            effective_sgd_batch(b, self.effective_beta) for b in self.effective_batches
        }
        return tuple(sorted(sizes))


def effective_sgd_batch(batch_size: int, beta: float) -> int:
    """The larger SGD batch of the effective-batch test: ``B (1 + beta) / (1 - beta)``, rounded
    (the study runs it and the report reads it with this one expression)."""
    return round(batch_size * (1 + beta) / (1 - beta))


def sweep_lrs(batch_size: int) -> list[float]:
    """The sweep's lr grid at one batch size: the five largest of ``sweep --lrs auto``.

    ``auto`` spans c/31.6 .. 31.6c with c = 0.1 sqrt(B / 32); a pilot run showed the two smallest
    never best for either optimizer, so the study spends its time on the other five. The report
    flags any best lr at the edge of its grid.
    """
    from experiments.sweep import auto_lrs

    return auto_lrs(batch_size)[2:]


PRESETS = {
    "quick": Preset(
        name="quick",
        dataset="mnist1d",
        model="mlp",
        batch_sizes=(8, 16, 32, 64, 128, 256, 512),
        betas=(0.0, 0.9),
        seeds=2,
        example_budget=64_000,
        step_range=(600, 8000),
        evals_per_run=80,
        target_loss=0.5,
        effective_beta=0.9,
        effective_batches=(8, 16),
        effective_steps=1500,
        effective_eval_every=10,
        noise_scale_batches=(32, 512),
        noise_scale_checkpoints=(0, 100, 300, 1000, 3000),
        noise_scale_pairs=64,
        nqm_batch_sizes=tuple(4**k for k in range(9)),
        nqm_betas=(0.0, 0.9, 0.95, 0.99, 0.995, 0.999),
        # The paper's CNN takes 5-6 minutes a seed on 2 CPU cores (the README's 4 seeds: 20-24
        # minutes): full preset only.
        baseline_models=("linear", "mlp"),
        baseline_steps=6000,
        baseline_seeds=1,
    ),
    "full": Preset(
        name="full",
        dataset="mnist1d",
        model="mlp",
        batch_sizes=(4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
        betas=(0.0, 0.5, 0.9, 0.99),
        seeds=5,
        example_budget=320_000,
        step_range=(2000, 40_000),
        evals_per_run=200,
        target_loss=0.5,
        effective_beta=0.9,
        effective_batches=(4, 8, 16, 32, 64),
        effective_steps=5000,
        effective_eval_every=10,
        noise_scale_batches=(32, 1024),
        noise_scale_checkpoints=(0, 100, 300, 1000, 3000, 10000),
        noise_scale_pairs=256,
        nqm_batch_sizes=tuple(2**k for k in range(17)),
        nqm_betas=(0.0, 0.5, 0.9, 0.95, 0.99, 0.995, 0.999),
        baseline_models=("linear", "mlp", "cnn"),
        baseline_steps=6000,
        baseline_seeds=3,
        extra_models=("cnn",),
    ),
}

STUDY_FILE = "study.json"
# The version of each stage's results, raised when a change of this code changes what the stage
# computes: a study resumed after such an update computes the stage again instead of reusing what
# the older code stored. A stage recorded without a version, or missing here, is version 1.
STAGE_VERSIONS = {
    "noise_scale": 2,  # one training batch key per step; B_simple's own standard error
    "baselines": 2,  # the engine's own Adam, the same on any device count (optax.adam's was not)
}
# Stages whose results are run stores (resumed run by run): an older version cannot be redone
# over them, since the stored runs would be reused, so such a study is refused.
STORE_STAGES = ("sweep", "effective")
STAGES = ("quadratic", "nqm", "sweep", "effective", "noise_scale", "baselines")  # in their order
SWEEP_DIR = "sweep"
EFFECTIVE_DIR = "effective"


def machine() -> dict[str, Any]:
    """Where the study ran, for the report's setup section."""
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def sweep_dir(model: str, study_model: str) -> str:
    """Where the sweep of ``model`` is stored: ``sweep`` for the study's own model."""
    return SWEEP_DIR if model == study_model else f"{SWEEP_DIR}_{model}"


def valid_meta(meta: Any) -> bool:
    """Whether ``meta`` (read from ``DIR/study.json``) has the shape the study writes, in what the
    report reads of it."""
    return (
        isinstance(meta, dict)
        and _valid_preset(meta.get("preset"))
        and isinstance(meta.get("machine", {}), dict)
        and isinstance(meta.get("machine", {}).get("devices", []), list)
        and isinstance(meta.get("stages", {}), dict)
        and all(_valid_stage_record(*item) for item in meta.get("stages", {}).items())
    )


def _valid_preset(preset: Any) -> bool:
    """Whether ``preset`` is a :class:`Preset` as ``study.json`` stores it: each setting that this
    code knows of its type (tuples as lists)."""
    hints = typing.get_type_hints(Preset)
    return (
        isinstance(preset, dict)
        and isinstance(preset.get("name"), str)
        and all(_stored_as(value, hints[name]) for name, value in preset.items() if name in hints)
    )


def _stored_as(value: Any, hint: Any) -> bool:
    """Whether ``value`` is JSON of type ``hint``: int, float, str, or a tuple of them (a list)."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args[-1] is Ellipsis:
            return isinstance(value, list) and all(_stored_as(v, args[0]) for v in value)
        return (
            isinstance(value, list)
            and len(value) == len(args)
            and all(map(_stored_as, value, args))
        )
    return {
        int: stage_files.is_int,
        float: stage_files.is_number,
        str: lambda v: isinstance(v, str),
    }[hint](value)


def _valid_stage_record(name: str, record: Any) -> bool:
    """Whether ``record`` has the shape :meth:`Study.stage` stores for stage ``name``: its wall
    time, and of what the stage returns, the effective-batch test's lr and beta (unless it was
    skipped) and the sweep's steps per batch size."""
    if not stage_files.has(record, stage_files.is_number, "wall_seconds"):
        return False
    if name == "effective" and "skipped" not in record:
        return stage_files.has(record, stage_files.is_number, "lr") and stage_files.has(
            record, lambda b: stage_files.is_number(b) and 0 <= b < 1, "beta"
        )
    return name != "sweep" or isinstance(record.get("steps", {}), dict)


def _as_stored(preset: Preset) -> dict[str, Any]:
    """``preset`` as ``study.json`` stores it (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(preset)))


def preset_differences(stored: dict[str, Any], preset: Preset) -> list[str]:
    """The settings in which a study's stored preset differs from ``preset``.

    A setting the stored one lacks (a study written before it was added) counts as its default.
    """
    current = _as_stored(preset)
    fields = dataclasses.fields(Preset)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    defaults = json.loads(json.dumps(defaults))
    names = [*current, *sorted(set(stored) - set(current))]
    return [name for name in names if stored.get(name, defaults.get(name)) != current.get(name)]


class Study:
    """Runs the stages of one preset into one directory, remembering which are done.

    ``DIR/study.json`` holds the preset, the machine, each finished stage's wall time and the
    values one stage hands to the next (e.g. the effective-batch test's learning rate).
    """

    def __init__(self, out: Path, preset: Preset, *, progress: bool = True):
        self.out, self.preset, self.progress = out, preset, progress
        self._read_meta()
        self._data = None

    def _read_meta(self) -> None:
        """Reads ``study.json`` (the stages done so far); refuses another preset's study."""
        meta = read_json(self.out / STUDY_FILE)
        if meta is None:
            meta = {}
        elif not valid_meta(meta):
            raise ValueError(
                f"{str(self.out / STUDY_FILE)!r} is not a study's record; use another --out."
            )
        if meta and meta["preset"]["name"] != self.preset.name:
            raise ValueError(
                f"{str(self.out)!r} holds a {meta['preset']['name']!r} study; use another --out "
                f"for --preset {self.preset.name}."
            )
        # The same name with other settings (a preset changed by an update of this code): the
        # stages done so far would be mixed with new ones, and study.json would describe these.
        changed = preset_differences(meta["preset"], self.preset) if meta else []
        if changed:
            raise ValueError(
                f"{str(self.out)!r} holds a {self.preset.name!r} study run with other settings "
                f"of that preset ({', '.join(changed)}); use another --out, or move it away to "
                "start afresh."
            )
        stale = [
            name for name in STORE_STAGES
            if name in meta.get("stages", {}) and self._older(name, meta["stages"][name])
        ]  # fmt: skip
        if stale:
            raise ValueError(
                f"{str(self.out)!r} holds {', '.join(stale)} results of an older version of this "
                "code, which computes them differently now; use another --out, or move it away "
                "to start afresh."
            )
        meta["preset"] = dataclasses.asdict(self.preset)
        meta.setdefault("stages", {})
        meta["machine"] = machine()
        self.meta = meta

    @property
    def data(self):
        if self._data is None:
            from experiments.data import load_dataset

            self._data = load_dataset(self.preset.dataset)
        return self._data

    def _save(self) -> None:
        write_json(self.out / STUDY_FILE, self.meta)

    def outputs(self, name: str) -> list[Path]:
        """The files stage ``name`` writes (none when it was skipped for want of a learning rate):
        the report reads them."""
        if "skipped" in self.meta["stages"].get(name, {}):
            return []
        p = self.preset
        files = {
            "quadratic": ["quadratic.json", "quadratic.png"],
            "nqm": ["nqm.json", "nqm.png"],
            "sweep": [f"{sweep_dir(m, p.model)}/{RUNS_FILE}" for m in (p.model, *p.extra_models)],
            "effective": [f"{EFFECTIVE_DIR}/{RUNS_FILE}"],
            "noise_scale": ["noise_scale.json"],
            "baselines": ["baselines.json"],
        }
        return [self.out / file for file in files.get(name, [])]

    @staticmethod
    def _older(name: str, record: dict[str, Any]) -> bool:
        """Whether stage ``name``'s ``record`` comes from an older version of the stage."""
        return record.get("version", 1) != STAGE_VERSIONS.get(name, 1)

    def _lost_output(self, name: str) -> str | None:
        """Why stage ``name``'s stored results cannot be used, if they cannot: an output missing,
        not valid JSON or not of the shape the stage writes, or results of an older version of
        the stage."""
        if self._older(name, self.meta["stages"][name]):
            return "its results are from an older version of this code"
        for path in self.outputs(name):
            if not path.is_file():
                return f"{path.relative_to(self.out)} is missing"
            if path.suffix == ".json":
                try:
                    value = read_json(path)
                except ValueError:
                    return f"{path.relative_to(self.out)} is not valid JSON"
                if not STAGE_FILES[path.name](value):
                    return f"{path.relative_to(self.out)} does not hold what the stage writes"
        lacking = self._runs_lacking(name) if name in STORE_STAGES and self.outputs(name) else None
        if lacking is not None:
            out, missing, total = lacking
            return f"{(out / RUNS_FILE).relative_to(self.out)} lacks {missing} of its {total} runs"
        return None

    def stage(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Runs stage ``name`` unless it finished before; records its wall time and outputs.

        A stage recorded as done whose output was since removed or damaged (by hand), or whose run
        store lacks some of its runs, runs again (a run store resumes): the report would otherwise
        say "not run" of it, fail, or go on without those runs.
        """
        if name in self.meta["stages"]:
            lost = self._lost_output(name)
            if lost is None:
                self._log(f"[{name}] done before, skipped")
                return
            self._log(f"[{name}] done before, but {lost}: running it again")
            del self.meta["stages"][name]
        self._log(f"[{name}] ...")
        # A sweep resumed after an interruption keeps the runs stored before it: their time counts
        # (each record holds its share of its group's wall time), or the report's wall time
        # would be this process's alone.
        earlier = sum(
            record["wall_seconds"]
            for path in self.outputs(name)
            if path.name == RUNS_FILE
            for record in read_runs(path.parent)
        )
        start = time.perf_counter()
        extra = fn() or {}
        seconds = time.perf_counter() - start + earlier
        record = {"wall_seconds": round(seconds, 1), **extra}
        if STAGE_VERSIONS.get(name, 1) != 1:
            record["version"] = STAGE_VERSIONS[name]
        self.meta["stages"][name] = record
        self._save()
        skipped = f", skipped: {extra['skipped']}" if "skipped" in extra else ""
        resumed = f" (runs stored before: {earlier:.0f} s)" if earlier else ""
        self._log(f"[{name}] {seconds:.0f} s{resumed}{skipped}")

    def _log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def run_all(self) -> None:
        """Every stage, in order; one process at a time per directory (``DIR/.lock``)."""
        from experiments.store import lock_directory

        self.out.mkdir(parents=True, exist_ok=True)
        lock = lock_directory(self.out)
        try:
            self._read_meta()  # again, under the lock: another job may have finished stages since
            self._remove_leftovers()
            self._run_all()
        finally:
            os.close(lock)

    def _remove_leftovers(self) -> None:
        """Removes the temporary files of ``write_json`` and ``write_bytes`` that a killed job
        left (hidden ``.NAME.*.tmp`` next to the JSON files and the two figures this job writes in
        DIR; never referenced). Not those of ``verdicts.json``, ``report.md`` and ``figures/``,
        which the report removes under its own lock (:func:`experiments.report.locked`)."""
        from experiments.store import remove_leftovers

        remove_leftovers(
            self.out,
            [
                STUDY_FILE,
                "quadratic.json",
                "quadratic.png",
                "nqm.json",
                "nqm.png",
                "noise_scale.json",
                "baselines.json",
            ],
        )

    def plan(self) -> str:
        """The line the job starts with: the preset, its stages in order (the sweep's with its
        number of runs) and those recorded as done before."""
        runs = sum(
            len(call["batch_sizes"]) * len(call["betas"]) * len(call["lrs"]) * len(call["seeds"])
            for _, call in self._run_sweeps("sweep")
        )
        stages = ", ".join(f"{name} ({runs} runs)" if name == "sweep" else name for name in STAGES)
        done = [name for name in STAGES if name in self.meta["stages"]]
        done_text = "all" if len(done) == len(STAGES) else ", ".join(done) or "none"
        return (
            f"[plan] preset {self.preset.name}: {stages}, then the report; done before: {done_text}"
        )

    def _run_all(self) -> None:
        self._save()
        self._log(self.plan())
        for name in STAGES:
            self.stage(name, getattr(self, name))
        from experiments import report
        from experiments.store import StoreLockedError

        try:
            held = report.locked(self.out)
        except StoreLockedError:  # a `report DIR` of its own is being written: said, waited for
            self._log(f"[report] waiting for another report of {self.out} to be written")
            held = report.locked(self.out, wait=True)
        with held:
            report.build(self.out)

    def quadratic(self) -> None:
        from experiments import quadratic

        quadratic.write(quadratic.study(), self.out)

    def nqm(self) -> None:
        from experiments import nqm

        sizes = self.preset.nqm_batch_sizes
        # Spawning worker processes costs seconds; it pays off only for many batch sizes.
        workers = min(2, usable_cores()) if len(sizes) >= 4 else 1
        rows = nqm.study(sizes, self.preset.nqm_betas, workers=workers)
        nqm.write(rows, self.out)

    def _run_sweeps(self, name: str, lr: float | None = None) -> list[tuple[Path, dict[str, Any]]]:
        """The ``run_sweep`` calls of store stage ``name`` (the effective-batch test's at ``lr``):
        each results directory with the arguments other than the data."""
        p = self.preset
        if name == "sweep":
            return [
                (self.out / sweep_dir(model, p.model), dict(
                    model=model, batch_sizes=[b], betas=p.betas, lrs=sweep_lrs(b),
                    seeds=range(p.seeds), steps=p.sweep_steps(b), eval_every=p.sweep_eval_every(b),
                    target_loss=p.target_loss,
                ))
                for model, b in itertools.product((p.model, *p.extra_models), p.batch_sizes)
            ]  # fmt: skip
        common = dict(
            model=p.model, lrs=[lr], seeds=range(p.seeds), steps=p.effective_steps,
            eval_every=p.effective_eval_every, target_loss=None,
        )  # fmt: skip
        return [
            (self.out / EFFECTIVE_DIR, dict(batch_sizes=batches, betas=[beta], **common))
            for batches, beta in (
                (p.effective_batches, p.effective_beta), (p.effective_sgd_batches, 0.0)
            )
        ]  # fmt: skip

    def _runs_lacking(self, name: str) -> tuple[Path, int, int] | None:
        """A results directory of store stage ``name`` that lacks runs of the stage (a line of
        its ``runs.jsonl`` deleted, as the store's error for a corrupt line suggests): the
        directory, how many runs it lacks and how many the stage has there. A run is identified
        by its id, as ``run_sweep`` identifies it (:func:`experiments.sweep.sweep_plan`)."""
        from experiments.sweep import sweep_plan

        planned: dict[Path, set[str]] = {}
        for out, call in self._run_sweeps(name, self.meta["stages"][name].get("lr")):
            plan = sweep_plan(self.data, **call)  # the same arguments as the stage's run_sweep
            planned.setdefault(out, set()).update(run_id for *_, ids in plan for run_id in ids)
        for out, run_ids in planned.items():
            missing = run_ids - {record["run_id"] for record in read_runs(out)}
            if missing:
                return out, len(missing), len(run_ids)
        return None

    def sweep(self) -> dict[str, Any]:
        from experiments.sweep import run_sweep

        p = self.preset
        for out, call in self._run_sweeps("sweep"):
            run_sweep(out, self.data, progress=self.progress, **call)
        return {
            "steps": {str(b): p.sweep_steps(b) for b in p.batch_sizes},
            "eval_every": {str(b): p.sweep_eval_every(b) for b in p.batch_sizes},
        }

    def best_sgd_lr(self, batch_size: int) -> float | None:
        """The sweep's best SGD learning rate at ``batch_size`` (``analysis.best_settings``);
        ``None`` if at every learning rate half the seeds or more diverged (none trained)."""
        from experiments import analysis
        from experiments.store import read_runs

        records = analysis.filter_records(
            read_runs(self.out / SWEEP_DIR), beta=0.0, batch_size=batch_size
        )
        if not records:
            raise ValueError(f"the sweep has no SGD runs at batch size {batch_size}")
        best = analysis.best_settings(records)[0]
        return None if best["final_train_loss"] is None else best["lr"]

    @staticmethod
    def _no_lr(batch_size: int) -> dict[str, Any]:
        """A stage's record when it has no learning rate to run at (the report says why)."""
        return {
            "skipped": f"at batch size {batch_size} half the seeds or more of the sweep diverged "
            "at every SGD learning rate, so there was none to run it at"
        }

    def effective(self) -> dict[str, Any]:
        from experiments.sweep import run_sweep

        p = self.preset
        lr = self.best_sgd_lr(min(p.effective_batches))
        if lr is None:
            return self._no_lr(min(p.effective_batches))
        for out, call in self._run_sweeps("effective", lr):
            run_sweep(out, self.data, progress=self.progress, **call)
        return {"lr": lr, "beta": p.effective_beta}

    def noise_scale(self) -> dict[str, Any]:
        from experiments import noise_scale

        p = self.preset
        b_small, b_big = p.noise_scale_batches
        lr = self.best_sgd_lr(b_small)
        if lr is None:
            return self._no_lr(b_small)
        rows = noise_scale.along_training(
            self.data, p.model, lr=lr, batch_size=b_small, checkpoints=p.noise_scale_checkpoints,
            b_small=b_small, b_big=b_big, num_pairs=p.noise_scale_pairs, seed=0,
        )  # fmt: skip
        # B_simple is nan when the |G|^2 estimate is not positive, and a run that blew up has
        # non-finite values; strict JSON stores them as null.
        rows = [
            {k: v if isinstance(v, int) or math.isfinite(v) else None for k, v in row.items()}
            for row in rows
        ]
        write_json(self.out / "noise_scale.json", {"lr": lr, "beta": 0.0, "rows": rows})
        return {"lr": lr}

    def baselines(self) -> None:
        from experiments import baselines

        p = self.preset
        result = baselines.run_baselines(
            p.baseline_models, steps=p.baseline_steps, seeds=range(p.baseline_seeds),
            progress=self.progress,
        )  # fmt: skip
        write_json(self.out / "baselines.json", result)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The main job's options (also accepted with no subcommand)."""
    from experiments.cli import output_dir

    parser.add_argument(
        "--out",
        type=output_dir,
        # Not a string: argparse would check a string default for every command, which writes to
        # its own --out (a file named results in the working directory failed `quadratic --out X`).
        # :func:`run` checks it when the main job uses it.
        default=DEFAULT_OUT,
        metavar="DIR",
        help="results and report directory (default: %(default)s)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="quick: minutes on a laptop CPU (default); full: more batch sizes, betas, seeds and "
        "longer budgets, and a CNN sweep, for a GPU/TPU (on 2 CPU cores about two days)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs (or resumes) the study; prints where the report is and its summary table."""
    from experiments.cli import UsageError, check_one_process, output_dir

    # In a multi-process JAX job each process would run the study, process 0 alone storing the
    # sweep: the others then stop for want of its runs, and process 0 waits for them until JAX
    # aborts the job. The sweep's grid runs over several processes with `sweep --distributed`.
    check_one_process(
        "the main job",
        ", or run its grid in every process with python -m experiments sweep --distributed",
    )
    out = args.out
    if out is DEFAULT_OUT:  # left unchecked by argparse (see add_arguments)
        try:
            out = output_dir(str(out))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"argument --out: {e}") from None
    try:
        study = Study(out, PRESETS[args.preset])
    except ValueError as e:
        raise UsageError(str(e)) from None
    from experiments.store import CorruptStoreError, StoreLockedError

    try:
        study.run_all()
    except (StoreLockedError, CorruptStoreError) as e:
        raise UsageError(str(e)) from None
    from experiments import report

    print(report.summary(out))
    print(f"report: {out / 'report.md'}")
    return 0
