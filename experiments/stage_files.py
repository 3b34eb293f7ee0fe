"""The shape of each stage's JSON file, as the report reads it.

One check per file (:data:`STAGE_FILES`): what the stage's writer writes, less the fields an older
version did not write and the report does without. A file of another shape (edited by hand, or
written by another tool) is treated as lost by the main job (:mod:`experiments.study`), which runs
its stage again, and refused by the report before it writes anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.store import read_json


def is_number(value: Any) -> bool:
    """A finite JSON number (the writers store no NaN or infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number_or_none(value: Any) -> bool:
    return value is None or is_number(value)


def _stderr_or_none(value: Any) -> bool:
    """A standard error (a number >= 0), or None where not finite."""
    return value is None or (is_number(value) and value >= 0)


def is_int(value: Any) -> bool:
    """A JSON integer."""
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return is_int(value) and value >= 1


def _steps_or_none(value: Any) -> bool:
    """A step count, or None where the goal was never reached."""
    return value is None or (is_int(value) and value >= 0)


def has(record: Any, check: Callable[[Any], bool], *keys: str) -> bool:
    """Whether ``record`` is a dict holding every key in ``keys``, each passing ``check``."""
    return isinstance(record, dict) and all(key in record and check(record[key]) for key in keys)


def _float_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# quadratic.summarize's numbers that the verdict on claim 6 reads (and flat_half_steps).
QUADRATIC_SUMMARY = (
    "mean_cos_successive", "reversal_fraction", "steep_axis_travel", "steep_loss_second_half",
    "flat_loss_second_half",
)  # fmt: skip


def _quadratic_summaries(run: dict) -> int | None:
    """How many seeds ``run`` of ``quadratic.json`` summarizes (``None`` if the report cannot read
    them): its ``seed_summaries``, or for an older version its one ``path`` of (theta_1, theta_2)
    points, which the report summarizes afresh."""
    stored = run.get("seed_summaries") or []
    if not (isinstance(stored, list) and all(isinstance(x, dict) for x in stored)):
        return None
    if stored and all("flat_half_steps" in x for x in stored):
        readable = all(
            has(x, is_number, *QUADRATIC_SUMMARY) and _steps_or_none(x["flat_half_steps"])
            for x in stored
        )
        return len(stored) if readable else None
    path = run.get("path")
    readable = (
        isinstance(path, list)
        and len(path) >= 3  # two steps: the fewest with a successive-step cosine
        and all(isinstance(point, list) and len(point) == 2 for point in path)
        and all(is_number(x) for point in path for x in point)
    )
    return 1 if readable else None


def valid_quadratic(result: Any) -> bool:
    """Whether ``result`` (``quadratic.json``) has the shape ``quadratic.study`` returns: SGD and
    momentum at each batch size, over the same number of seeds."""
    if not (
        has(result, lambda setup: isinstance(setup, dict), "setup")
        and has(result["setup"], is_number, "learning_rate", "beta", "noise_std_per_example")
        and has(result["setup"], _count, "steps")
        and has(result["setup"], lambda c: isinstance(c, list) and len(c) == 2, "curvatures")
        and all(is_number(c) for c in result["setup"]["curvatures"])
        and has(result["setup"], is_int, "seed")
        and _count(result["setup"].get("seeds", 1))
        and has(result, lambda runs: isinstance(runs, list) and runs, "runs")
    ):
        return False
    seeds: dict[int, dict[bool, int | None]] = {}
    for run in result["runs"]:
        if not (has(run, _count, "batch_size") and has(run, is_number, "beta")):
            return False
        seeds.setdefault(run["batch_size"], {})[run["beta"] > 0] = _quadratic_summaries(run)
    return all(
        set(kinds) == {False, True} and None not in kinds.values() and len(set(kinds.values())) == 1
        for kinds in seeds.values()
    )


def valid_nqm(rows: Any) -> bool:
    """Whether ``rows`` (``nqm.json``) has the shape ``nqm.study`` returns (``dim`` and
    ``by_beta`` optional: an older version did not write them)."""
    return (
        isinstance(rows, list)
        and len(rows) > 0
        and all(
            has(row, _count, "batch_size")
            and has(row, _steps_or_none, "sgd_steps", "momentum_steps")
            and has(row, _number_or_none, "sgd_lr", "momentum_lr", "momentum_ema_lr")
            and has(row, is_number, "momentum_beta")
            and _count(row.get("dim", 1))
            and isinstance(row.get("by_beta", {}), dict)
            and all(_float_text(beta) for beta in row.get("by_beta", {}))
            for row in rows
        )
    )


# The numbers of a row of noise_scale.json that the report reads (None where not finite), and
# their standard errors (b_simple_stderr optional: an older version did not write it).
NOISE_SCALE_ROW = ("train_loss", "b_simple", "grad_sq", "trace")
NOISE_SCALE_STDERR = ("grad_sq_stderr", "trace_stderr")


def valid_noise_scale(result: Any) -> bool:
    """Whether ``result`` (``noise_scale.json``) has the shape :meth:`Study.noise_scale` writes."""
    return (
        has(result, is_number, "lr")
        and has(result, lambda rows: isinstance(rows, list), "rows")
        and all(
            has(row, is_int, "step")
            and has(row, _number_or_none, *NOISE_SCALE_ROW)
            and has(row, _stderr_or_none, *NOISE_SCALE_STDERR)
            and _stderr_or_none(row.get("b_simple_stderr"))
            for row in result["rows"]
        )
    )


def valid_baselines(results: Any) -> bool:
    """Whether ``results`` (``baselines.json``) has the shape ``baselines.run_baselines`` returns
    (``paper`` optional)."""
    return isinstance(results, dict) and all(
        has(entry, _count, "seeds")
        and has(entry, _number_or_none, "test_accuracy", "test_accuracy_std")
        and _number_or_none(entry.get("paper"))
        and has(entry.get("ema_sgd"), _number_or_none, "test_accuracy", "test_accuracy_std", "lr")
        and has(entry["ema_sgd"], is_number, "beta")
        for entry in results.values()
    )


# Each stage's JSON file and the check of its shape, for the main job and the report alike.
STAGE_FILES = {
    "quadratic.json": valid_quadratic,
    "nqm.json": valid_nqm,
    "noise_scale.json": valid_noise_scale,
    "baselines.json": valid_baselines,
}


def read_stage_file(path: Path) -> Any:
    """The results in stage file ``path`` (a name in :data:`STAGE_FILES`), or None if there is
    none.

    Raises:
      ValueError: naming ``path``, if it is not valid JSON or not of the shape its stage writes.
    """
    value = read_json(path)
    if value is not None and not STAGE_FILES[path.name](value):
        raise ValueError(
            f"{str(path)!r} does not hold the {path.stem} stage's results (a value missing or of "
            "another type); the main job computes them again when rerun on this directory"
        )
    return value
