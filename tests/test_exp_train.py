"""Tests of experiments.train: pairing, divergence isolation, device-count invariance."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import ema_momentum as emm
from experiments import data, shuffle, train
from experiments.models import loss_fn, make_model

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


# Linear model, batch 200: an epoch of digits (1438 examples) is 7 steps, so 12 steps reach into a
# second epoch. lr 1.0 trains; lr 120 blows up through finite losses: its mini-batch loss is about
# 197 at step 3 and 257 at step 5, so it first exceeds the threshold (100 * ln 10, about 230) at
# step 5, i.e. diverged_at 6, which is an evaluation step (every 3) after a valid one (step 3).
LATE = {"batch": 200, "lrs": [1.0, 120.0], "seed": 0, "steps": 12, "eval_every": 3}


@pytest.fixture(scope="module")
def late(digits):
    """A sane run over two epochs and a run whose finite loss crosses the threshold mid-run."""
    return train.run_group(
        digits, "linear", LATE["batch"], 0.0, LATE["lrs"], [LATE["seed"]], LATE["steps"],
        LATE["eval_every"], devices=jax.devices()[:1],
    )  # fmt: skip


def test_finite_loss_above_threshold_diverges(late):
    threshold = train.EXPLOSION_FACTOR * math.log(10)
    run, loss, gnorm = late.runs[1], late.batch_loss[1], late.grad_norm[1]
    assert run.diverged and run.diverged_at == 6
    # Nothing was non-finite up to and including the diverging step: only the threshold caught it.
    assert np.isfinite(loss[:6]).all() and np.isfinite(gnorm[:6]).all()
    assert (loss[:5] < threshold).all() and loss[5] > threshold
    assert np.isnan(loss[6:]).all() and np.isnan(gnorm[6:]).all()


def test_divergence_at_an_evaluation_step_keeps_the_previous_one(late):
    run = late.runs[1]
    assert late.eval_steps.tolist() == [3, 6, 9, 12] and run.diverged_at == 6
    for curve in (late.train_loss, late.test_loss, late.test_accuracy):
        assert np.isfinite(curve[1, 0])  # step 3, before divergence
        assert np.isnan(curve[1, 1:]).all()  # at the diverging step 6 and after
    assert run.final_train_loss == pytest.approx(float(late.train_loss[1, 0]))
    assert run.final_test_loss == pytest.approx(float(late.test_loss[1, 0]))
    assert run.final_test_accuracy == pytest.approx(float(late.test_accuracy[1, 0]))
    assert run.final_train_loss > 100  # the blown-up but finite evaluation at step 3


def test_each_epoch_draws_a_fresh_permutation(digits, late):
    """The sane run of ``late`` is plain SGD on epoch e's order shuffle.permutation(fold_in(k, e)).

    Tolerance: relative 1e-5 (float32; vmapping may change XLA's fusion and so the last bits).
    """
    batch, lr, seed, steps = LATE["batch"], LATE["lrs"][0], LATE["seed"], LATE["steps"]
    per_epoch = digits.n_train // batch
    assert per_epoch < steps < 2 * per_epoch
    with jax.threefry_partitionable(False):
        init_key, data_key = jax.random.split(jax.random.key(seed))
        graphdef, params = nnx.split(make_model("linear", digits, nnx.Rngs(params=init_key)))
        perms = [
            np.asarray(shuffle.permutation(jax.random.fold_in(data_key, e), digits.n_train))
            for e in (0, 1)
        ]
    assert not np.array_equal(perms[0][: 5 * batch], perms[1][: 5 * batch])
    tx = emm.ema_sgd(lr, 0.0)

    @jax.jit
    def sgd_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        idx = perms[epoch][pos * batch : (pos + 1) * batch]
        params, opt_state, loss = sgd_step(
            params, opt_state, digits.x_train[idx], digits.y_train[idx]
        )
        losses.append(float(loss))
    np.testing.assert_allclose(late.batch_loss[0], losses, rtol=1e-5)


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
