"""Reproduce the MNIST-1D paper's baselines (Adam) and train the same models with ema_sgd.

The reference setup (Greydanus, 2020, "Scaling down deep learning"): Adam with learning rate
1e-2, batch size 100, 6000 steps, on the 4000/1000 MNIST-1D split; the paper reports test
accuracies of 32% (logistic regression), 68% (MLP) and 94% (CNN). Adam is optax.adam's algorithm
with its defaults (the same moments and epsilon as torch.optim.Adam), equal to optax.adam within
float32 rounding: the engine computes it (see below).

ema_sgd runs the same models, batch size and budget with beta 0.9. Its learning rate (EMA form;
heavy-ball rate lr * (1 - beta)) is chosen per model without looking at test data: among 0.1,
0.3, 1 and 3, the one with the lowest final full-train-set loss (mean over seeds), ignoring any
learning rate for which a seed diverged. The four rates train together in one vmapped group.

Both use the engine (experiments.train): batches drawn without replacement from a fresh
permutation each epoch, seed s fixing the initialization and the data order, all devices used,
accuracy from the engine's final evaluation of the full test set. Reported: mean and standard
deviation (ddof 0) over seeds 0..N-1; none (null, "diverged") for Adam if any seed diverged.
Output: DIR/baselines.json, one entry per model.

Known differences from the paper's PyTorch code: its batches cycle through the training set in a
fixed order; its layers use PyTorch's default initialization (ours: Flax's LeCun-normal weights,
zero biases); its MLP adds a residual connection around the second hidden layer (ours is the
plain 40-100-100-10 MLP of the study); and its loop ``for step in range(total_steps + 1)`` makes
6001 updates for its 6000 steps. The CNN's layers match. Single-seed results vary by a few
points: the CNN's test accuracy with Adam over seeds 0-3 was 93.2 +- 1.2% on a 2-core CPU.
Adam's results, like ema_sgd's, do not depend on the device count: the engine writes Adam's bias
correction as products (experiments.train._scale_by_adam), which XLA compiles the same way for one
device as for several; with optax.adam's divisions the MLP had 70.2% on one CPU device, 67.0% on
two.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments import data as datasets
from experiments import models as model_zoo
from experiments.cli import (
    UsageError,
    add_out_argument,
    check_one_process,
    locked_out,
    positive_int,
    seed_count,
)
from experiments.store import write_json
from experiments.train import GroupResult, run_group

HELP = "reproduce the MNIST-1D paper's baselines (Adam) beside ema_sgd"
ON_INTERRUPT = "interrupted; nothing was written"  # printed on Ctrl-C

PAPER_TEST_ACCURACY = {"linear": 0.32, "mlp": 0.68, "cnn": 0.94}  # on mnist1d only
ADAM_LR = 1e-2
BATCH_SIZE = 100
STEPS = 6000
EMA_BETA = 0.9
EMA_LRS = (0.1, 0.3, 1.0, 3.0)
EVALS_PER_RUN = 10  # full train/test evaluations per run; only the last is reported
BASELINES_FILE = "baselines.json"
DATASETS = ("mnist1d", "digits")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard deviation over seeds; ``None`` if any seed has no result."""
    if any(v is None for v in values):
        return None, None
    return float(np.mean(values)), float(np.std(values))


def _by_lr(result: GroupResult) -> dict[float, list[Any]]:
    runs: dict[float, list[Any]] = {}
    for run in result.runs:
        runs.setdefault(run.lr, []).append(run)
    return runs


def _pick_ema_lr(result: GroupResult) -> float | None:
    """The learning rate with the lowest mean final train loss among those with no diverged seed."""
    scores = {}
    for lr, runs in _by_lr(result).items():
        losses = [r.final_train_loss for r in runs]
        if not any(r.diverged for r in runs) and None not in losses:
            scores[lr] = float(np.mean(losses))
    scores = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    return min(scores, key=scores.get) if scores else None


def _check_arguments(
    models: Sequence[str], steps: int, seeds: int | Sequence[int]
) -> tuple[list[str], list[int]]:
    """Validates :func:`run_baselines`' arguments; returns the models and the seeds as lists."""
    if isinstance(models, str) or not isinstance(models, Iterable):
        raise ValueError(f"models must be a list of model names, got models={models!r}.")
    models = list(models)
    unknown = [m for m in models if m not in model_zoo.MODELS]
    if unknown:
        raise ValueError(f"models must be among {', '.join(model_zoo.MODELS)}, got {unknown[0]!r}.")
    if not models or len(set(models)) != len(models):
        raise ValueError(f"models must be distinct and at least one, got models={models!r}.")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got steps={steps!r}.")
    if _is_int(seeds):
        seed_list = list(range(seeds)) if seeds <= 2**31 else []  # seeds are int32
    elif isinstance(seeds, Iterable) and not isinstance(seeds, str | bytes):
        seed_list = list(seeds)
    else:
        seed_list = []  # refused below
    if not (
        seed_list
        and all(_is_int(s) and 0 <= s < 2**31 for s in seed_list)
        and len(set(seed_list)) == len(seed_list)
    ):
        raise ValueError(
            f"seeds must be a count >= 1 or distinct ints in [0, 2**31), got seeds={seeds!r}."
        )
    return models, seed_list


def run_baselines(
    models: Sequence[str],
    *,
    steps: int = STEPS,
    seeds: int | Sequence[int] = 1,
    progress: bool = True,
    data: datasets.Dataset | None = None,
) -> dict[str, dict[str, Any]]:
    """Trains each model with the paper's Adam setup and with ema_sgd; returns the results.

    Args:
      models: Model names (``"linear"``, ``"mlp"``, ``"cnn"``).
      steps: Optimizer steps per run.
      seeds: The seeds: a count ``N`` for ``0..N-1``, or the seeds themselves.
      progress: Show a tqdm progress bar on stderr.
      data: The dataset; MNIST-1D if ``None``. Paper numbers are given for MNIST-1D only.

    Returns:
      ``{model: {"test_accuracy", "test_accuracy_std", "seeds", "optimizer", "lr",
      "batch_size", "steps", "paper", "ema_sgd": {"test_accuracy", "test_accuracy_std", "lr",
      "beta", "seeds"}}}``; accuracies are fractions in [0, 1], ``None`` where a run diverged.

    Raises:
      ValueError: for unknown or repeated models, or out-of-range steps, seeds or batch size.
    """
    models, seed_list = _check_arguments(models, steps, seeds)
    steps = int(steps)  # a NumPy integer is not JSON
    data = datasets.load_dataset("mnist1d") if data is None else data
    eval_every = max(1, steps // EVALS_PER_RUN)
    results: dict[str, dict[str, Any]] = {}
    with tqdm(
        total=2 * len(models) * steps, unit="step", disable=not progress, dynamic_ncols=True
    ) as bar:
        for model in models:
            bar.set_description(f"{model} adam")
            adam = run_group(
                data, model, BATCH_SIZE, 0.0, [ADAM_LR], seed_list, steps, eval_every,
                optimizer="adam", on_chunk=bar.update,
            )  # fmt: skip
            bar.set_description(f"{model} ema_sgd")
            ema = run_group(
                data, model, BATCH_SIZE, EMA_BETA, EMA_LRS, seed_list, steps, eval_every,
                on_chunk=bar.update,
            )  # fmt: skip
            # A diverged run's final accuracy is its last evaluation before it diverged: no result.
            adam_mean, adam_std = _mean_std(
                [None if r.diverged else r.final_test_accuracy for r in adam.runs]
            )
            ema_lr = _pick_ema_lr(ema)
            ema_runs = _by_lr(ema)[ema_lr] if ema_lr is not None else []
            ema_mean, ema_std = _mean_std([r.final_test_accuracy for r in ema_runs] or [None])
            results[model] = {
                "test_accuracy": adam_mean,
                "test_accuracy_std": adam_std,
                "seeds": len(seed_list),
                "optimizer": "adam",
                "lr": ADAM_LR,
                "batch_size": BATCH_SIZE,
                "steps": steps,
                "paper": PAPER_TEST_ACCURACY[model] if data.name == "mnist1d" else None,
                "ema_sgd": {
                    "test_accuracy": ema_mean,
                    "test_accuracy_std": ema_std,
                    "lr": ema_lr,
                    "beta": EMA_BETA,
                    "seeds": len(seed_list),
                },
            }
    return results


def _fmt_acc(mean: float | None, std: float | None, seeds: int) -> str:
    if mean is None:
        return "diverged"
    if seeds == 1:  # one seed has no spread to show: "± 0.0%" would claim an exact number
        return f"{100 * mean:5.1f}%"
    return f"{100 * mean:5.1f} ± {100 * std:4.1f}%"


def table(results: dict[str, dict[str, Any]]) -> str:
    """The results beside the paper's numbers, one line per model and optimizer.

    Accuracy is the mean over seeds, with the standard deviation (ddof 0) where there are several.
    """
    lines = [f"{'model':<7} {'optimizer':<14} {'lr':>6} {'test accuracy':>15} {'paper':>6}"]
    for model, r in results.items():
        paper = "-" if r["paper"] is None else f"{100 * r['paper']:.0f}%"
        acc = _fmt_acc(r["test_accuracy"], r["test_accuracy_std"], r["seeds"])
        lines.append(f"{model:<7} {'adam':<14} {r['lr']:>6g} {acc:>15} {paper:>6}")
        e = r["ema_sgd"]
        name = f"ema_sgd b={e['beta']:g}"
        lr = "-" if e["lr"] is None else f"{e['lr']:g}"
        acc = _fmt_acc(e["test_accuracy"], e["test_accuracy_std"], e["seeds"])
        lines.append(f"{model:<7} {name:<14} {lr:>6} {acc:>15} {'':>6}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the baselines options to ``parser``."""
    add_out_argument(parser)
    parser.add_argument(
        "--steps", type=positive_int, default=STEPS, metavar="N",
        help=f"optimizer steps per run (default: {STEPS}, as in the paper)",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=seed_count, default=1, metavar="N",
        help="number of seeds 0..N-1 (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--models", default=",".join(model_zoo.MODELS), metavar="M,M,...",
        help=f"comma-separated models (default: {','.join(model_zoo.MODELS)})",
    )  # fmt: skip
    parser.add_argument(
        "--dataset", choices=DATASETS, default="mnist1d",
        help="mnist1d (the paper's data; default) or digits (a small check)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Validates the input, takes DIR's lock (refused if another process holds it), trains, writes
    DIR/baselines.json and prints the table. Refused in a multi-process JAX job: every process
    would train (on all the job's devices) and write DIR."""
    check_one_process("baselines")
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in model_zoo.MODELS]
    if unknown:
        raise UsageError(
            f"--models: unknown model {unknown[0]!r} (choose from {', '.join(model_zoo.MODELS)})"
        )
    if len(set(models)) != len(models):
        raise UsageError(f"--models has duplicates: {args.models}")
    out = args.out
    if (out / BASELINES_FILE).is_dir():  # else refused when written, after all the training
        raise UsageError(f"{str(out / BASELINES_FILE)!r} is a directory; nothing was written")
    data = datasets.load_dataset(args.dataset)
    if BATCH_SIZE > data.n_train:
        raise UsageError(f"{args.dataset} has fewer than {BATCH_SIZE} training examples")
    with locked_out(out, [BASELINES_FILE]) as lock:  # refused before the training
        start = time.perf_counter()
        results = run_baselines(models, steps=args.steps, seeds=args.seeds, data=data)
        wall = time.perf_counter() - start
        lock.hold()  # a DIR made meanwhile by another process's command is refused
        write_json(out / BASELINES_FILE, results)
    print(f"{args.dataset}: batch {BATCH_SIZE}, {args.steps} steps, {args.seeds} seed(s)")
    print(table(results))
    print(f"wall time {wall:.1f} s; wrote {out / BASELINES_FILE}")
    return 0
