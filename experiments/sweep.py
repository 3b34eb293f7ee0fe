"""Train a grid of batch sizes x betas x learning rates x seeds; resumable, results in --out DIR.

Each (batch size, beta) is one compiled group that trains all its learning rates and seeds at
once (see experiments.train). Budgets are in optimizer steps, not epochs. Rerunning the same
command skips finished runs; after a crash it completes the sweep. Results: DIR/runs.jsonl (one
JSON record per run) and DIR/curves/*.npz (per-step curves).

--lrs auto: for batch size B, seven learning rates spaced half a decade apart, centred on
0.1 * sqrt(B / 32): c/31.6, c/10, c/3.16, c, 3.16c, 10c, 31.6c (3 significant digits). The
square-root rule keeps the noise of an SGD step roughly constant across batch sizes, and the
wide grid brackets the best rate with and without momentum (lr is the EMA-form rate of
ema_sgd, so beta=0.9 tolerates much larger values).

Multi-host (--distributed): start the same command in every process of the job. Each process
first joins it with jax.distributed.initialize() (Cloud TPU, SLURM, Open MPI and Kubernetes are
detected; elsewhere give --coordinator, --num-processes and --process-id), then every group's run
axis is sharded over all processes' devices. Process 0 alone locks, reads and writes DIR (on its
own disk) and prints; the others compute and print nothing. The numbers are the same as on one
host, also when the processes have different numbers of devices.
Processes started with different sweeps or holding different data, a process that cannot load
the data (its files are on its own disk) or that refuses its arguments after parsing them
(--eval-every > --steps), and a process 0 that cannot open DIR are stopped with an error instead
of waiting on each other or training on different data; when a process dies, the next exchange
of results ends the others with one error line (see the README for what JAX leaves waiting).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from experiments import data as datasets
from experiments import models
from experiments.cli import (
    USAGE_ERROR,
    UsageError,
    add_out_argument,
    check_betas,
    check_unique,
    exact_text,
    finite_float,
    finite_float_list,
    non_negative_int,
    positive_int,
    positive_int_list,
    seed_count,
    user_path,
)
from experiments.store import CorruptStoreError, ResultStore, StoreLockedError
from experiments.train import (
    FLOAT32_MAX,
    FLOAT32_TINY,
    GroupSpec,
    check_batch_size,
    check_group,
    is_int,
    is_number,
    listed,
    positive_float32,
    run_group,
)

HELP = "train a batch size x beta x lr x seed grid (resumable)"
ON_INTERRUPT = "interrupted; finished runs are kept: rerun to resume"  # printed on Ctrl-C

AUTO_LR_CENTER = 0.1  # at batch size AUTO_LR_BATCH
AUTO_LR_BATCH = 32
AUTO_LR_HALF_DECADES = range(-3, 4)


def auto_lrs(batch_size: int) -> list[float]:
    """The ``--lrs auto`` grid for one batch size (see the module docstring).

    Raises:
      ValueError: unless ``batch_size`` is an int >= 1 (0 gave seven zero rates).
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got batch_size={batch_size!r}.")
    center = AUTO_LR_CENTER * math.sqrt(batch_size / AUTO_LR_BATCH)
    return [float(f"{center * 10 ** (k / 2):.3g}") for k in AUTO_LR_HALF_DECADES]


def _lrs(text: str) -> list[float] | None:
    if text.strip() == "auto":
        return None
    lrs = finite_float_list(text)
    if not all(positive_float32(lr) for lr in lrs):
        raise argparse.ArgumentTypeError(
            f"learning rates must be in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}] (normal float32 "
            f"numbers, the engine's), got {text!r}"
        )
    return lrs


def _coordinator(text: str) -> str:
    # jax.distributed.initialize takes what follows the last ":" as the port; without one it
    # failed with an IndexError traceback.
    host, _, port = text.rpartition(":")
    if not (host and re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT with a port in [1, 65535], got {text!r}"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the sweep options to ``parser``."""
    add_out_argument(parser)
    parser.add_argument(
        "--dataset", choices=datasets.DATASETS, default="mnist1d",
        help="mnist1d (generated offline), digits (scikit-learn) or idx (MNIST-format files from "
        "--data-dir) (default: mnist1d)",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir",
        type=user_path,
        metavar="PATH",
        help="folder of MNIST-format IDX files (--dataset idx only)",
    )
    parser.add_argument(
        "--model", choices=models.MODELS, default="mlp",
        help="Flax NNX model: linear, MLP (two hidden layers of 100) or CNN (default: mlp)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-sizes", type=positive_int_list, default=[8, 32, 128], metavar="B,B,...",
        help="comma-separated batch sizes (default: 8,32,128)",
    )  # fmt: skip
    parser.add_argument(
        "--betas", type=finite_float_list, default=[0.0, 0.9], metavar="BETA,...",
        help="momentum values in [0, 1); 0 is plain SGD (default: 0,0.9)",
    )  # fmt: skip
    parser.add_argument(
        "--lrs", type=_lrs, default=None, metavar="auto|LR,...",
        help="learning rates (EMA form), or 'auto' for 7 per batch size: half-decade steps "
        "around 0.1*sqrt(B/32) (default: auto)",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=seed_count, default=2, metavar="N",
        help="number of seeds 0..N-1; a seed fixes init and data order (default: 2)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=positive_int, default=2000, metavar="N",
        help="optimizer steps per run (default: 2000)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-every", type=positive_int, default=100, metavar="N",
        help="evaluate the full train and test sets every N steps (default: 100)",
    )  # fmt: skip
    parser.add_argument(
        "--target-loss", type=finite_float, default=None, metavar="X",
        help="record the first eval step with full train loss <= X (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--devices", type=positive_int, default=None, metavar="N",
        help="shard the runs over the first N devices (default: all)",
    )  # fmt: skip
    group = parser.add_argument_group(
        "multi-host", "run one sweep over several processes (see the description above)"
    )
    group.add_argument(
        "--distributed", action="store_true",
        help="join a multi-process JAX job (jax.distributed.initialize) before computing",
    )  # fmt: skip
    group.add_argument(
        "--coordinator", type=_coordinator, metavar="HOST:PORT",
        help="address of process 0's coordinator service (implies --distributed)",
    )  # fmt: skip
    group.add_argument(
        "--num-processes", type=positive_int, metavar="N",
        help="processes in the job (implies --distributed)",
    )  # fmt: skip
    group.add_argument(
        "--process-id", type=non_negative_int, metavar="I",
        help="this process's index, 0..N-1 (implies --distributed)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Validates everything (loading the data too), then runs the sweep."""
    distributed = args.distributed or any(
        value is not None for value in (args.coordinator, args.num_processes, args.process_id)
    )
    if distributed:
        _join(args)
    with _a_lost_process_ends_the_job():
        return _checked_run(args)


def _checked_run(args: argparse.Namespace) -> int:
    # What each process checks from here on may fail in one process only (it was given other
    # arguments, or the data files of --data-dir are on its own disk): the others must not wait
    # for it, until JAX's timeout ends them with a stack trace.
    try:
        _check_arguments(args)
        data = _load(args)
    except UsageError:
        _agree(ok=False)
        raise
    _agree(ok=True)
    try:
        records = run_sweep(
            args.out,
            data,
            args.model,
            args.batch_sizes,
            args.betas,
            lrs=args.lrs,
            seeds=range(args.seeds),
            steps=args.steps,
            eval_every=args.eval_every,
            target_loss=args.target_loss,
            devices=None if args.devices is None else jax.devices()[: args.devices],
        )
    except (StoreLockedError, CorruptStoreError, SweepMismatchError) as e:
        raise UsageError(str(e)) from None
    if jax.process_index() == 0:
        print(summary(records))
    return 0


@contextlib.contextmanager
def _a_lost_process_ends_the_job() -> Iterator[None]:
    """In a multi-process job, ends this process with one error line when a computation fails.

    A process that dies (killed, out of memory) makes the others' next collective fail at once.
    Left to JAX, a process would print the traceback, then wait at exit for the dead one, up to its
    100 s heartbeat timeout, and abort with a stack trace (exit status 134). Finished groups are
    stored already; a rerun of the job resumes.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        sys.stdout.flush()
        sys.stderr.write(
            "error: a computation of the job failed (did a process stop?); finished groups are "
            f"kept, rerun the job to resume: {first_line}\n"
        )
        sys.stderr.flush()
        # Not sys.exit: JAX's exit handler would wait for the lost process, then abort.
        os._exit(USAGE_ERROR)


def _check_arguments(args: argparse.Namespace) -> None:
    """Raises a UsageError for arguments that argparse accepts one by one but not together."""
    if args.dataset == "idx" and args.data_dir is None:
        raise UsageError("--dataset idx needs --data-dir")
    if args.dataset != "idx" and args.data_dir is not None:
        raise UsageError(f"--data-dir is only used with --dataset idx, not {args.dataset}")
    check_betas(args.betas)
    rounded = [beta for beta in args.betas if np.float32(beta) >= 1.0]
    if rounded:
        raise UsageError(f"--betas {rounded[0]} is 1 in float32 (the engine's precision)")
    check_unique("--batch-sizes", args.batch_sizes)
    check_unique("--betas", args.betas)
    if args.lrs is not None:
        check_unique("--lrs", args.lrs)
    if args.eval_every > args.steps:
        raise UsageError(f"--eval-every ({args.eval_every}) must be <= --steps ({args.steps})")
    if args.target_loss is not None and not 0 <= args.target_loss <= FLOAT32_MAX:
        raise UsageError(f"--target-loss must be in [0, {FLOAT32_MAX:.4g}], got {args.target_loss}")


def _load(args: argparse.Namespace) -> datasets.Dataset:
    """The dataset, once it and the arguments that depend on it (--devices too) are checked."""
    n_devices = len(jax.devices())
    if args.devices is not None and args.devices > n_devices:
        raise UsageError(f"--devices {args.devices} but only {n_devices} device(s) are available")
    try:
        data = datasets.load_dataset(args.dataset, args.data_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load dataset {args.dataset}: {e}") from None
    too_big = [b for b in args.batch_sizes if b > data.n_train]
    if too_big:
        raise UsageError(
            f"batch size {too_big[0]} is larger than the {data.n_train} training examples"
        )
    try:  # e.g. images too small for the CNN's three stride-2 convolutions; before DIR is opened
        nnx.eval_shape(lambda: models.make_model(args.model, data, nnx.Rngs(0)))
    except ValueError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    return data


def _agree(*, ok: bool) -> None:
    """In a multi-process job, raises a UsageError in every process that is ``ok`` unless all are.

    Every process calls it, so none waits on one that stopped.
    """
    if jax.process_count() == 1:
        return
    failed = np.flatnonzero(_every_process(np.asarray([ok], np.int32))[:, 0] == 0)
    if ok and len(failed):
        raise UsageError(f"process {failed[0]} of the job stopped with an error (see its output)")


def _join(args: argparse.Namespace) -> None:
    """Joins the multi-process job the ``--distributed`` arguments describe."""
    if args.devices is not None:
        raise UsageError("--devices cannot be combined with --distributed (every device is used)")
    n, i = args.num_processes, args.process_id
    if n is not None and i is not None and i >= n:
        raise UsageError(f"--process-id must be < --num-processes ({n}), got {i}")
    try:
        jax.distributed.initialize(args.coordinator, num_processes=n, process_id=i)
    except (RuntimeError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot join the distributed job: {first_line}") from None


def sweep_plan(
    data: datasets.Dataset,
    model: str,
    batch_sizes: Sequence[int],
    betas: Sequence[float],
    lrs: Sequence[float] | None,
    seeds: Sequence[int],
    steps: int,
    eval_every: int,
    target_loss: float | None,
) -> list[tuple[GroupSpec, list[float], list[str]]]:
    """The groups of a sweep, in order: each group's spec, its lrs and the ids of its runs (as
    :func:`run_sweep` stores them). The arguments are :func:`run_sweep`'s, unchecked."""
    digest = datasets.run_digest(data)  # None for a built-in dataset as loaded
    plan = []
    for batch_size in batch_sizes:
        if lrs is None:  # auto_lrs(0) would be all zeros, and refused as lrs, not batch_sizes
            check_batch_size(data, batch_size)
        group_lrs = auto_lrs(batch_size) if lrs is None else [float(lr) for lr in lrs]
        for beta in betas:
            # Not int(batch_size): 8.5 would be trained as 8; as it is, run_group refuses it.
            spec = GroupSpec(
                data.name, model, batch_size, float(beta), steps, eval_every,
                data_digest=digest,
            )  # fmt: skip
            ids = [spec.run_id(lr, s, target_loss) for lr in group_lrs for s in seeds]
            plan.append((spec, group_lrs, ids))
    return plan


def run_sweep(
    out_dir: str | Path,
    data: datasets.Dataset,
    model: str,
    batch_sizes: Sequence[int],
    betas: Sequence[float],
    *,
    lrs: Sequence[float] | None = None,
    seeds: Sequence[int] = (0,),
    steps: int,
    eval_every: int,
    target_loss: float | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Runs (or resumes) a sweep into a results directory.

    Args:
      out_dir: The results directory (created if missing; see :mod:`experiments.store`).
      data: The dataset.
      model: ``"linear"``, ``"mlp"`` or ``"cnn"``.
      batch_sizes: Distinct batch sizes in ``[1, data.n_train]``; one group per batch size and
        beta.
      betas: Distinct momentum values in ``[0, 1)``.
      lrs: Distinct learning rates for every batch size, or ``None`` for :func:`auto_lrs`.
      seeds: Distinct seeds in ``[0, 2**31)``; each fixes the initialization and data order.
      steps: Optimizer steps per run, in ``[1, 2**31)``.
      eval_every: Steps between full evaluations, in ``[1, steps]``.
      target_loss: Full-train-set loss goal for ``steps_to_target``.
      devices: Devices to shard each group over; defaults to all.
      progress: Show tqdm progress bars on stderr.

    Returns:
      The records of every run of the sweep (new and previously stored), in grid order. In a
      multi-process job (after ``jax.distributed.initialize()``) every process must call this with
      the same arguments; process 0 alone reads and writes ``out_dir`` and gets the records, the
      others compute their share of each group and get ``[]``.

    Raises:
      TypeError: if ``data`` is not a :class:`experiments.data.Dataset`.
      ValueError: for an argument out of range (as :func:`experiments.train.run_group` checks it,
        for every group; empty or repeated batch sizes or betas too), before ``out_dir`` is
        opened or created.
      experiments.store.StoreLockedError: if another process is writing ``out_dir``.
      experiments.store.CorruptStoreError: if ``out_dir`` holds a corrupt ``runs.jsonl``.
      SweepMismatchError: in a multi-process job, if the processes were given different sweeps
        or different data.
    """
    batch_sizes, betas = listed(batch_sizes, "batch_sizes"), listed(betas, "betas")
    lrs = None if lrs is None else listed(lrs, "lrs")
    seeds = listed(seeds, "seeds")
    # Checked before float(): it would take the string "0.9" and fail on None with a TypeError.
    for name, values in (("betas", betas), ("lrs", lrs or [])):
        if not all(is_number(v) for v in values):
            raise ValueError(f"{name} must be a list of numbers, got {name}={values!r}.")
    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"data must be an experiments.data.Dataset, got data={data!r}.")
    plan = sweep_plan(data, model, batch_sizes, betas, lrs, seeds, steps, eval_every, target_loss)
    if jax.process_count() > 1:
        _check_same_plan(plan, data)
    # Every group is checked before out_dir is opened: a bad batch size or beta would otherwise
    # leave a results directory behind, or fail after the groups before it were trained.
    for spec, group_lrs, _ in plan:
        check_group(
            data, model, spec.batch_size, spec.beta, group_lrs, seeds, steps, eval_every,
            target_loss=target_loss, devices=devices,
        )  # fmt: skip
    for name, values in (("batch_sizes", batch_sizes), ("betas", betas)):
        if not values:
            raise ValueError(f"{name} must be a non-empty list, got {name}={values!r}.")
        if len(set(values)) != len(values):  # 0.0 and -0.0 too: the same beta
            raise ValueError(f"{name} must not repeat a value, got {name}={values!r}.")
    lead = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        store, refused = None, None
        if lead:
            try:
                store = stack.enter_context(ResultStore(out_dir))
            except (StoreLockedError, CorruptStoreError, OSError) as e:
                refused = e  # OSError: e.g. a file where DIR/curves should be
        missing = [0 if store is None else len(store.missing(ids)) for *_, ids in plan]
        if jax.process_count() > 1:  # process 0's store decides for every process
            agreed = _every_process(np.asarray([refused is not None, *missing], np.int32))[0]
            if agreed[0] and refused is None:
                raise StoreLockedError(f"process 0 could not open the results in {out_dir}")
            missing = [int(m) for m in agreed[1:]]
        if refused is not None:
            raise refused
        total = sum(len(ids) for *_, ids in plan)
        # A log file (stderr not a terminal) gets the runs bar only: the nested per-step bar
        # moves the cursor, which a file records as blank lines and escape codes.
        step_bars = progress and lead and sys.stderr.isatty()
        runs_bar = tqdm(
            total=total, initial=total - sum(missing), desc="runs", unit="run",
            disable=not (progress and lead), dynamic_ncols=True,
        )  # fmt: skip
        with runs_bar:
            for (spec, group_lrs, _), n_missing in zip(plan, missing, strict=True):
                if not n_missing:
                    continue
                with tqdm(
                    total=steps, desc=f"batch {spec.batch_size} beta {spec.beta:g}",
                    unit="step", leave=False, disable=not step_bars, dynamic_ncols=True,
                ) as steps_bar:  # fmt: skip
                    result = run_group(
                        data, model, spec.batch_size, spec.beta, group_lrs, seeds, steps,
                        eval_every, target_loss=target_loss, devices=devices,
                        on_chunk=steps_bar.update,
                    )  # fmt: skip
                if store is not None:
                    store.add_group(result)
                runs_bar.update(n_missing)
        if store is None:
            return []
        by_id = {r["run_id"]: r for r in store.records}
    return [by_id[run_id] for *_, ids in plan for run_id in ids]


class SweepMismatchError(ValueError):
    """The processes of a multi-process job were asked for different sweeps."""


def _check_same_plan(
    plan: Sequence[tuple[GroupSpec, list[float], list[str]]], data: datasets.Dataset
) -> None:
    """Raises :class:`SweepMismatchError` in every process unless all run the same sweep.

    Processes running different sweeps would compile different programs and wait on each
    other forever; comparing a digest of every process's run ids turns that into an error.
    The data are compared too, first: each process supplies its own devices' copy, and different
    data also give different run ids (:func:`experiments.data.run_digest`), so a data mismatch
    would otherwise be reported as different sweeps.
    """
    plan_digest = hashlib.sha256(json.dumps([ids for *_, ids in plan]).encode()).digest()
    digests = plan_digest[:8] + datasets.content_digest(data)[:8]
    every = _every_process(np.frombuffer(digests, np.int32))
    if (every[:, 2:] != every[0, 2:]).any():
        raise SweepMismatchError(
            "the processes of the job loaded different data (the same dataset name, other "
            "numbers: other files or library versions?)"
        )
    if (every != every[0]).any():
        raise SweepMismatchError(
            "the processes of the job were given different sweeps; start the same command in "
            "every process"
        )


def _every_process(value: np.ndarray) -> np.ndarray:
    """``value`` of every process, stacked in process order; every process must call it.

    Gathered as ``run_group`` gathers its results: from a global array with a row per device.
    ``multihost_utils.process_allgather`` of a host array and ``broadcast_one_to_all`` need the
    same number of devices in every process, which a job need not have.
    """
    devices = jax.devices()
    by_device = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))
    rows = jax.make_array_from_callback(
        (len(devices), *value.shape), by_device, lambda index: value[None]
    )
    every = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
    first: dict[int, np.ndarray] = {}
    for device, row in zip(devices, every, strict=True):
        first.setdefault(device.process_index, row)
    return np.stack([first[i] for i in range(jax.process_count())])


def _mean(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if len(finite) == len(values) else math.nan


def summary(records: Sequence[dict[str, Any]]) -> str:
    """A one-screen table: per batch size and beta, the best lr and its results (seed means).

    The best lr has the lowest mean final train loss among those with no diverged seed.
    """
    if not records:
        return "no runs"
    first = records[0]
    groups: dict[tuple[int, float], dict[float, list[dict[str, Any]]]] = {}
    for r in records:
        groups.setdefault((r["batch_size"], r["beta"]), {}).setdefault(r["lr"], []).append(r)
    wall = sum(r["wall_seconds"] for r in records)
    lines = [
        f"{first['dataset']} / {first['model']}: {len(records)} runs of {first['steps']} steps "
        f"({wall:.1f} s of group wall time)",
        f"{'batch':>6} {'beta':>6} {'best lr':>9} {'train loss':>11} {'test loss':>10} "
        f"{'test acc':>9} {'to target':>10} {'diverged':>9}",
    ]
    for (batch_size, beta), by_lr in sorted(groups.items()):
        runs = [r for rs in by_lr.values() for r in rs]
        diverged = sum(r["diverged"] for r in runs)
        scores = {
            lr: _mean([r["final_train_loss"] for r in rs])
            for lr, rs in by_lr.items()
            if not any(r["diverged"] for r in rs)
        }
        scores = {lr: s for lr, s in scores.items() if math.isfinite(s)}
        if not scores:
            lines.append(
                f"{batch_size:>6} {exact_text(beta):>6} {'-':>9} {'':>43} {diverged:>4}/{len(runs)}"
            )
            continue
        best = min(scores, key=scores.get)
        rs = by_lr[best]
        to_target = [r["steps_to_target"] for r in rs]
        target = "-" if None in to_target else f"{np.median(to_target):g}"
        lines.append(
            f"{batch_size:>6} {exact_text(beta):>6} {exact_text(best):>9} {scores[best]:>11.4f} "
            f"{_mean([r['final_test_loss'] for r in rs]):>10.4f} "
            f"{_mean([r['final_test_accuracy'] for r in rs]):>9.3f} {target:>10} "
            f"{diverged:>4}/{len(runs)}"
        )
    lines.append(
        "best lr: the lowest mean final train loss of the lrs with no diverged seed; losses and "
        "accuracy: seed means; to target: the median step"
    )
    return "\n".join(lines)
