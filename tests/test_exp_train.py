"""Tests of experiments.train: pairing, divergence isolation, device-count invariance."""

import math

import jax
import numpy as np
import pytest

from experiments import data, train

STEPS, EVAL_EVERY, BATCH = 30, 10, 16
CURVES = ("batch_loss", "grad_norm", "train_loss", "test_loss", "test_accuracy")


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def mixed(digits):
    """A sane lr and an exploding one, two seeds, on one device."""
    return train.run_group(
        digits, "mlp", BATCH, 0.9, [0.3, 1e5], [0, 1], STEPS, EVAL_EVERY,
        target_loss=1.5, devices=jax.devices()[:1],
    )  # fmt: skip


def test_result_layout(mixed):
    assert [(r.lr, r.seed) for r in mixed.runs] == [(0.3, 0), (0.3, 1), (1e5, 0), (1e5, 1)]
    assert mixed.batch_loss.shape == mixed.grad_norm.shape == (4, STEPS)
    assert mixed.eval_steps.tolist() == [10, 20, 30]
    assert mixed.train_loss.shape == mixed.test_accuracy.shape == (4, 3)
    assert len({r.run_id for r in mixed.runs}) == 4
    assert mixed.wall_seconds > 0


def test_sane_runs_learn(mixed):
    for r, run in enumerate(mixed.runs[:2]):
        assert not run.diverged and run.diverged_at is None
        assert np.isfinite(mixed.batch_loss[r]).all()
        assert mixed.train_loss[r, -1] < mixed.train_loss[r, 0] < np.log(10)
        assert run.final_train_loss == pytest.approx(float(mixed.train_loss[r, -1]))
        assert run.final_test_accuracy > 0.5
        reached = mixed.eval_steps[mixed.train_loss[r] <= 1.5]
        assert run.steps_to_target == (int(reached[0]) if len(reached) else None)


def test_divergence_is_detected_and_frozen(mixed):
    for r, run in list(enumerate(mixed.runs))[2:]:
        assert run.diverged and run.diverged_at is not None and run.diverged_at <= 3
        assert np.isnan(mixed.batch_loss[r, run.diverged_at :]).all()
        assert np.isnan(mixed.train_loss[r]).all()
        assert run.final_train_loss is None and run.steps_to_target is None


def test_divergence_does_not_touch_other_runs(digits, mixed):
    alone = train.run_group(
        digits, "mlp", BATCH, 0.9, [0.3], [0, 1], STEPS, EVAL_EVERY,
        target_loss=1.5, devices=jax.devices()[:1],
    )  # fmt: skip
    for name in CURVES:
        np.testing.assert_array_equal(getattr(alone, name), getattr(mixed, name)[:2])
    assert alone.runs == tuple(
        type(r)(**{**r.as_record(), "wall_seconds": a.wall_seconds})
        for r, a in zip(mixed.runs[:2], alone.runs, strict=True)
    )


def test_seed_pairs_runs_across_learning_rates(mixed):
    # Same seed: same initial parameters and same first batch, so the same first loss.
    assert mixed.batch_loss[0, 0] == mixed.batch_loss[2, 0]
    assert mixed.batch_loss[1, 0] == mixed.batch_loss[3, 0]
    assert mixed.batch_loss[0, 0] != mixed.batch_loss[1, 0]


def test_identical_on_one_and_eight_devices(digits, mixed):
    assert len(jax.devices()) == 8
    sharded = train.run_group(
        digits, "mlp", BATCH, 0.9, [0.3, 1e5], [0, 1], STEPS, EVAL_EVERY,
        target_loss=1.5, devices=jax.devices(),
    )  # fmt: skip
    for name in CURVES:
        np.testing.assert_array_equal(getattr(sharded, name), getattr(mixed, name))
    assert [r.as_record() | {"wall_seconds": 0} for r in sharded.runs] == [
        r.as_record() | {"wall_seconds": 0} for r in mixed.runs
    ]


def test_eval_steps_include_the_last_step():
    spec = train.GroupSpec("digits", "mlp", 8, 0.0, steps=25, eval_every=10)
    assert spec.eval_steps == (10, 20, 25)


def test_negative_zero_beta_is_zero():
    spec = train.GroupSpec("digits", "mlp", 8, -0.0, steps=25, eval_every=10)
    zero = train.GroupSpec("digits", "mlp", 8, 0.0, steps=25, eval_every=10)
    assert math.copysign(1.0, spec.beta) == 1.0
    assert spec == zero and spec.run_id(0.1, 0, None) == zero.run_id(0.1, 0, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5000}, "batch_size"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.5}, "beta"),
        ({"lrs": [0.1, 0.0]}, "lrs"),
        ({"lrs": [float("nan")]}, "lrs"),
        ({"seeds": [-1]}, "seeds"),
        ({"seeds": []}, "seeds"),
        ({"steps": 0}, "steps"),
        ({"eval_every": 40}, "eval_every"),
        ({"target_loss": -1.0}, "target_loss"),
        ({"model": "rnn"}, "name='rnn'"),
    ],
)
def test_bad_arguments(digits, kwargs, match):
    args = dict(model="mlp", batch_size=8, beta=0.9, lrs=[0.1], seeds=[0], steps=20, eval_every=10)
    with pytest.raises(ValueError, match=match):
        train.run_group(digits, **(args | kwargs))
