"""Tests of experiments.sweep in-process: resume skips finished groups, --lrs auto, the summary."""

import dataclasses

import numpy as np
import pytest

from experiments import data, store, sweep, train

# lrs=None (--lrs auto): 7 runs per group. Both in-process sweeps use the same model, batch sizes
# and run counts, so the second reuses the first one's compiled programs.
TINY = dict(lrs=None, steps=4, eval_every=4, seeds=[0], progress=False)


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def counting(monkeypatch):
    """Replaces the run_group that run_sweep calls by a wrapper that records each call."""
    calls, real = [], train.run_group

    def run_group(data, model, batch_size, beta, *args, **kwargs):
        calls.append((batch_size, beta))
        return real(data, model, batch_size, beta, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_group", run_group)
    return calls


def test_resume_does_not_recompute_finished_groups(digits, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = sweep.run_sweep(out, digits, "linear", [16], [0.0], **TINY)
    before = (out / store.RUNS_FILE).read_bytes()

    # A finished sweep: nothing to compute at all.
    def fail(*args, **kwargs):
        raise AssertionError("run_group called for a finished group")

    monkeypatch.setattr(sweep, "run_group", fail)
    again = sweep.run_sweep(out, digits, "linear", [16], [0.0], **TINY)
    assert again == first
    assert (out / store.RUNS_FILE).read_bytes() == before

    # A grown sweep: only the new group is computed.
    calls = counting(monkeypatch)
    grown = sweep.run_sweep(out, digits, "linear", [16, 8], [0.0], **TINY)
    assert calls == [(8, 0.0)]
    assert grown[:7] == first and [r["batch_size"] for r in grown[7:]] == [8] * 7
    assert (out / store.RUNS_FILE).read_bytes().startswith(before)
    assert len(store.read_runs(out)) == 14


def test_other_data_under_a_built_in_name_is_not_taken_for_it(digits, tmp_path, monkeypatch):
    """A run id names a built-in dataset without hashing it: a subset of the digits, still named
    "digits", was handed the full data's stored runs (same ids, same losses) instead of trained."""
    out = tmp_path / "out"
    full = sweep.run_sweep(out, digits, "linear", [16], [0.0], **TINY)
    subset = dataclasses.replace(digits, x_train=digits.x_train[:100], y_train=digits.y_train[:100])
    calls = counting(monkeypatch)
    runs = sweep.run_sweep(out, subset, "linear", [16], [0.0], **TINY)
    assert calls == [(16, 0.0)]
    assert {r["run_id"] for r in runs}.isdisjoint(r["run_id"] for r in full)
    assert all("data_digest" in r for r in runs) and all("data_digest" not in r for r in full)
    # The digits as loaded, or an equal copy, are the built-in dataset: their stored runs count.
    monkeypatch.setattr(sweep, "run_group", None)
    copy = dataclasses.replace(digits, x_train=digits.x_train.copy())
    assert sweep.run_sweep(out, copy, "linear", [16], [0.0], **TINY) == full
    assert data.run_digest(digits) is None and data.run_digest(copy) is None
    assert data.run_digest(subset) == runs[0]["data_digest"]


@pytest.mark.parametrize("text", ["auto", " auto "])
def test_lrs_auto_parses_to_none(text):
    assert sweep._lrs(text) is None


def test_lrs_list_parses():
    assert sweep._lrs("0.1,3") == [0.1, 3.0]


@pytest.mark.parametrize("batch_size", [0, -1, 8.0, True, "8"])
def test_auto_lrs_of_a_batch_size_that_is_not_a_positive_int_is_a_value_error(batch_size):
    # 0 gave seven zero rates, -1 "math domain error", "8" a TypeError, 8.0 and True a grid.
    with pytest.raises(ValueError, match=f"batch_size={batch_size!r}"):
        sweep.auto_lrs(batch_size)


def test_auto_lrs_depend_on_the_batch_size(digits, tmp_path):
    assert len({tuple(sweep.auto_lrs(b)) for b in (8, 16, 32)}) == 3
    out = tmp_path / "out"
    records = sweep.run_sweep(out, digits, "linear", [8, 16], [0.0], **TINY)
    assert records == store.read_runs(out)
    for batch_size in (8, 16):
        lrs = [r["lr"] for r in records if r["batch_size"] == batch_size]
        assert lrs == sweep.auto_lrs(batch_size)


@pytest.mark.parametrize("name", ["batch_sizes", "betas", "lrs", "seeds"])
def test_a_number_where_a_list_is_needed_is_a_value_error(name, digits, tmp_path):
    args = dict(batch_sizes=[8], betas=[0.0], **TINY) | {name: 2}
    with pytest.raises(ValueError, match=f"{name} must be a list, got {name}=2"):
        sweep.run_sweep(tmp_path / "out", digits, "linear", **args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["betas", "lrs"])
@pytest.mark.parametrize("value", [None, "0.1", True])
def test_a_list_item_that_is_not_a_number_is_a_value_error(name, value, digits, tmp_path):
    # float() took "0.1" and True as numbers and failed on None with a TypeError.
    args = dict(batch_sizes=[8], betas=[0.0], **TINY) | {name: [value]}
    with pytest.raises(ValueError, match=f"{name} must be a list of numbers, got {name}="):
        sweep.run_sweep(tmp_path / "out", digits, "linear", **args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # Each left DIR behind (.lock, runs.jsonl, curves/), refused only by run_group.
        ({"batch_sizes": [0]}, "batch_size=0"),
        ({"batch_sizes": [5000]}, "batch_size=5000"),
        ({"batch_sizes": [0], "lrs": None}, "batch_size=0"),  # was auto_lrs' all-zero lrs=
        ({"betas": [1.0]}, "beta=1.0"),
        ({"lrs": [float("nan")]}, "lrs="),
        ({"steps": 0}, "steps=0"),
        ({"eval_every": 8}, "eval_every=8"),
        ({"target_loss": -1.0}, "target_loss"),
        ({"model": "rnn"}, "model='rnn'"),
        ({"devices": []}, "devices"),
        # The first group was trained and stored before the second was refused.
        ({"batch_sizes": [8, 0]}, "batch_size=0"),
        ({"betas": [0.0, 1.0]}, "beta=1.0"),
        # Were a sweep of nothing (the CLI cannot ask for one): an empty DIR, and [].
        ({"batch_sizes": []}, "batch_sizes=\\[\\]"),
        ({"betas": []}, "betas=\\[\\]"),
        ({"lrs": []}, "lrs=\\[\\]"),
        ({"seeds": []}, "seeds"),
        # Were trained, a repeated lr or seed as two records with one run id (the CLI refuses
        # repeated values); 0.0 and -0.0 are one beta.
        ({"batch_sizes": [8, 8]}, "batch_sizes=\\[8, 8\\]"),
        ({"betas": [0.0, -0.0]}, "betas=\\[0.0, -0.0\\]"),
        ({"lrs": [0.1, 0.1]}, "lrs=\\[0.1, 0.1\\]"),
        ({"seeds": [0, 0]}, "seeds=\\[0, 0\\]"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(kwargs, match, digits, tmp_path):
    args = dict(model="linear", batch_sizes=[8], betas=[0.0], **TINY) | {"lrs": [0.1]} | kwargs
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(tmp_path / "out", digits, **args)
    assert not (tmp_path / "out").exists()


def test_data_that_is_not_a_dataset_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="data='digits'"):  # was an AttributeError
        sweep.run_sweep(tmp_path / "out", "digits", "linear", [8], [0.0], **TINY)
    assert not (tmp_path / "out").exists()


def test_numpy_lists_are_taken_and_a_fractional_batch_size_is_refused(digits, tmp_path):
    # NumPy seeds failed to go into a run id (int64 is not JSON serializable); batch size 8.5
    # was trained and recorded as 8.
    out = tmp_path / "out"
    args = dict(TINY, lrs=np.asarray([0.1]), seeds=np.arange(2))
    records = sweep.run_sweep(out, digits, "linear", np.asarray([8]), np.asarray([0.0]), **args)
    assert [(r["batch_size"], r["lr"], r["seed"]) for r in records] == [(8, 0.1, 0), (8, 0.1, 1)]
    assert records == sweep.run_sweep(
        out, digits, "linear", [8], [0.0], **TINY | {"lrs": [0.1], "seeds": [0, 1]}
    )
    with pytest.raises(ValueError, match=r"batch_size=8\.5"):
        sweep.run_sweep(out, digits, "linear", [8.5], [0.0], **args)


def record(lr, loss, *, batch_size=16, beta=0.0, seed=0, diverged=False):
    return {
        "dataset": "digits", "model": "mlp", "steps": 100, "batch_size": batch_size,
        "beta": beta, "lr": lr, "seed": seed, "final_train_loss": loss,
        "final_test_loss": 2 * loss if loss is not None else None,
        "final_test_accuracy": 0.9 if loss is not None else None, "steps_to_target": None,
        "diverged": diverged, "wall_seconds": 1.0,
    }  # fmt: skip


def rows(text):
    """The summary's table rows, split into their columns."""
    return [line.split() for line in text.splitlines()[2:-1]]


def test_summary_picks_the_lr_with_the_lowest_mean_train_loss():
    records = [
        *(record(0.01, loss, seed=s) for s, loss in enumerate([0.9, 0.7])),
        *(record(0.1, loss, seed=s) for s, loss in enumerate([0.2, 0.4])),  # best: mean 0.3
        *(record(1.0, loss, seed=s) for s, loss in enumerate([0.5, 0.6])),
        record(10.0, None, seed=0, diverged=True),
        record(10.0, 0.01, seed=1),  # lowest loss, but a seed diverged: not eligible
        record(0.5, 1.5, batch_size=64, beta=0.9),  # worst in its group...
        record(0.05, 1.2, batch_size=64, beta=0.9),  # ...and the best
    ]
    text = sweep.summary(records)
    assert text.splitlines()[0].startswith("digits / mlp: 10 runs of 100 steps")
    (small, big) = rows(text)
    assert small[:4] == ["16", "0", "0.1", "0.3000"]
    assert small[4:6] == ["0.6000", "0.900"] and small[-1] == "1/8"
    assert big[:4] == ["64", "0.9", "0.05", "1.2000"] and big[-1] == "0/2"
    # The table says how it picked the lr (the main job picks by steps to target instead).
    assert text.splitlines()[-1].startswith("best lr: the lowest mean final train loss")


def test_summary_shows_a_beta_and_an_lr_as_given():
    # With ":g" (6 significant digits) beta 0.9999999 was printed as 1, and with ".3g" lrs 0.1234
    # and 0.1236 both as 0.123: the table named a beta no run used, or an lr ambiguously.
    records = [record(0.1234, 0.3, beta=0.9999999), record(0.1236, 0.4, beta=0.9999999)]
    (row,) = rows(sweep.summary(records))
    assert row[1:3] == ["0.9999999", "0.1234"]
    (row,) = rows(sweep.summary([record(0.1, 0.3, beta=0.0)]))
    assert row[1:3] == ["0", "0.1"]


def test_summary_of_a_group_that_all_diverged():
    text = sweep.summary([record(10.0, None, diverged=True), record(20.0, None, diverged=True)])
    assert rows(text) == [["16", "0", "-", "2/2"]]
    assert sweep.summary([]) == "no runs"
