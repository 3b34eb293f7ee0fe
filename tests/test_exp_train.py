"""Tests of experiments.train: pairing, divergence isolation, device-count invariance."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
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


def test_cnn_identical_on_one_and_two_devices():
    """The 2-D CNN (convolutions, not the custom matmul) on 1 and 2 devices, bitwise.

    Three runs (one diverging) do not divide 2 devices, so the run axis is padded to 4: three
    runs share the one device, two each of the two. 40 synthetic 8 x 8 images, batch 8: 5 steps
    an epoch, so 6 steps start a second one.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, 50).astype(np.int32)
    images = data.Dataset("images", x[:40], y[:40], x[40:], y[40:], 4)
    grid = {"lrs": [0.1, 1e6, 0.3], "seeds": [0], "steps": 6, "eval_every": 3}
    results = [
        train.run_group(images, "cnn", 8, 0.9, **grid, target_loss=1.4, devices=jax.devices()[:n])
        for n in (1, 2)
    ]
    assert [r.diverged_at for r in results[0].runs] == [None, 2, None]
    assert np.isfinite(results[0].train_loss[[0, 2]]).all()
    for result in results:  # the group's time is shared by its runs, not by the padding
        assert sum(r.wall_seconds for r in result.runs) == pytest.approx(result.wall_seconds)
    for other in results[1:]:
        for name in CURVES:
            np.testing.assert_array_equal(getattr(other, name), getattr(results[0], name))
        assert [r.as_record() | {"wall_seconds": 0} for r in other.runs] == [
            r.as_record() | {"wall_seconds": 0} for r in results[0].runs
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


def test_a_blow_up_by_the_last_update_is_caught_by_the_final_evaluation(digits):
    """LATE's lr 120 run stopped after 5 steps: every mini-batch loss passed (the 6th, the first
    above the threshold, is never taken), but the final evaluation, after the 5th update, is above
    it: the run is marked diverged at step 6, the step that would have come next."""
    threshold = train.EXPLOSION_FACTOR * math.log(10)
    result = train.run_group(
        digits, "linear", LATE["batch"], 0.0, [1.0, 120.0], [LATE["seed"]], 5, 5,
        devices=jax.devices()[:1],
    )  # fmt: skip
    sane, blown = result.runs
    assert (result.batch_loss[1] < threshold).all() and result.train_loss[1, -1] > threshold
    assert blown.diverged and blown.diverged_at == 6
    assert not sane.diverged and sane.diverged_at is None
    # Like an evaluation before a diverging step, the final one is kept as measured.
    assert blown.final_train_loss == pytest.approx(float(result.train_loss[1, -1]))


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


def test_steps_to_target_compares_the_loss_exactly(digits, late):
    """The first evaluation whose full-train-set loss is <= target_loss, compared exactly.

    A float32 loss v is above any target in (v - half an ulp, v); comparing in float32 rounded
    such a target up to v and reported the target as reached (at step 6 here), while the record's
    own loss (the same v, as a float) stayed above it.
    """
    reached_at = late.eval_steps[1]
    loss = float(late.train_loss[0, 1])  # the sane run's loss at step 6: a float32 value
    below = float(np.nextafter(loss, 0.0))  # the float just below; as a float32 it is `loss`
    assert np.float32(below) == np.float32(loss) and below < loss
    for target in (loss, below):
        result = train.run_group(
            digits, "linear", LATE["batch"], 0.0, LATE["lrs"][:1], [LATE["seed"]],
            LATE["steps"], LATE["eval_every"], target_loss=target, devices=jax.devices()[:1],
        )  # fmt: skip
        np.testing.assert_array_equal(result.train_loss[0], late.train_loss[0])
        run = result.runs[0]
        below_target = [float(v) <= target for v in late.train_loss[0]]
        first = int(late.eval_steps[below_target.index(True)]) if any(below_target) else None
        assert run.steps_to_target == first
        assert (run.steps_to_target == reached_at) == (target == loss)


def test_each_epoch_draws_a_fresh_permutation(digits, late):
    """The sane run of ``late`` is plain SGD on epoch e's order shuffle.permutation(fold_in(k, e)),
    and its grad_norm curve is the global L2 norm of each step's mini-batch gradient.

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
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    opt_state, losses, norms = tx.init(params), [], []
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        idx = perms[epoch][pos * batch : (pos + 1) * batch]
        params, opt_state, loss, norm = sgd_step(
            params, opt_state, digits.x_train[idx], digits.y_train[idx]
        )
        losses.append(float(loss))
        norms.append(float(norm))
    np.testing.assert_allclose(late.batch_loss[0], losses, rtol=1e-5)
    np.testing.assert_allclose(late.grad_norm[0], norms, rtol=1e-5)


def test_divergence_at_the_first_step():
    """Inputs of size 1e5 make the initial loss itself explode: diverged_at is 1 (1-based), the
    first loss is kept, and no later loss and no evaluation counts, however lax the target."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32) * 1e5
    y = rng.integers(0, 3, 40).astype(np.int32)
    huge = data.Dataset("huge", x[:30], y[:30], x[30:], y[30:], 3)
    result = train.run_group(
        huge, "linear", 8, 0.0, [1e-3, 1.0], [0], 4, 2, target_loss=1e30, devices=jax.devices()[:1]
    )
    for r, run in enumerate(result.runs):
        assert run.diverged and run.diverged_at == 1
        assert np.isfinite(result.batch_loss[r, 0]) and result.batch_loss[r, 0] > 100 * math.log(3)
        assert np.isnan(result.batch_loss[r, 1:]).all() and np.isnan(result.grad_norm[r, 1:]).all()
        for curve in (result.train_loss, result.test_loss, result.test_accuracy):
            assert np.isnan(curve[r]).all()
        assert run.final_train_loss is run.final_test_loss is run.final_test_accuracy is None
        assert run.steps_to_target is None


def test_a_non_finite_evaluation_before_divergence_is_recorded_as_none(digits):
    """lr 1e38: step 1's loss is sane, but its update overflows the parameters. The evaluation
    after step 1 comes before the divergence (detected at step 2) and so counts, but its infinite
    train loss is recorded as None (a record is JSON), while its finite accuracy is kept."""
    result = train.run_group(
        digits, "linear", 16, 0.0, [1e38], [0], 2, 1, devices=jax.devices()[:1]
    )
    run = result.runs[0]
    assert run.diverged_at == 2 and np.isfinite(result.batch_loss[0, 0])
    assert np.isinf(result.train_loss[0, 0]) and np.isnan(result.train_loss[0, 1])
    assert run.final_train_loss is None
    assert run.final_test_accuracy == pytest.approx(float(result.test_accuracy[0, 0]))


def test_each_seed_has_its_own_initialization_and_data_order():
    """Run i of a grid gets the parameters and data key of its own seed s: the halves of
    ``jax.random.split(jax.random.key(s))``, whatever the order of the grid."""
    st = train._Static("linear", (3,), 2, 8, 4)
    runs = _runs_on_one_device()
    grid = [(0.1, 1), (0.1, 0), (0.2, 1)]
    with jax.threefry_partitionable(False):
        state = train._init_runs(grid, 0.9, st, runs)
        for i, (_, seed) in enumerate(grid):
            init_key, data_key = jax.random.split(jax.random.key(seed))
            np.testing.assert_array_equal(
                jax.random.key_data(state.data_key[i]), jax.random.key_data(data_key)
            )
            params = nnx.split(make_model("linear", st, nnx.Rngs(params=init_key)))[1]
            chex.assert_trees_all_equal(jax.tree.map(lambda a, i=i: a[i], state.params), params)


def test_evaluation_is_the_mean_over_the_whole_sets(digits):
    """The chunked, zero-weight-padded evaluation against a plain forward pass over each set.

    Neither set is a whole number of EVAL_CHUNK chunks (1438 = 5 x 256 + 158, 359 = 256 + 103),
    so both carry padding that must weigh nothing.
    """
    assert digits.n_train % train.EVAL_CHUNK and len(digits.y_test) % train.EVAL_CHUNK
    st = train._Static("mlp", digits.input_shape, digits.num_classes, digits.n_train, BATCH)
    runs = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("runs",)),
        jax.sharding.PartitionSpec("runs"),
    )
    with jax.threefry_partitionable(False):
        params = train._init_runs([(0.1, 0), (0.1, 1)], 0.9, st, runs).params
    sets = [(digits.x_train, digits.y_train), (digits.x_test, digits.y_test)]
    layouts = [train._eval_layout(x, y) for x, y in sets]
    train_loss, test_loss, test_acc = train._evaluate(params, *layouts, st=st)
    for r in range(2):
        model = nnx.merge(train._graphdef(st), jax.tree.map(lambda a, r=r: a[r], params))
        for (x, y), loss in zip(sets, (train_loss[r], test_loss[r]), strict=True):
            per_example = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
            np.testing.assert_allclose(loss, np.mean(per_example), rtol=1e-6)
        accuracy = np.mean(np.argmax(model(digits.x_test), axis=-1) == digits.y_test)
        np.testing.assert_allclose(test_acc[r], accuracy, rtol=1e-6)


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
        ({"beta": 0.99999999}, "beta"),  # 1 as a float32: the run would not learn
        ({"lrs": [0.1, 0.0]}, "lrs"),
        ({"lrs": [float("nan")]}, "lrs"),
        ({"lrs": [1e-40]}, "lrs"),  # a float32 denormal, which XLA on CPU flushes to 0
        ({"seeds": [2**31]}, "seeds"),  # not an int32
        ({"seeds": [-1]}, "seeds"),
        ({"seeds": []}, "seeds"),
        ({"seeds": 2}, "seeds=2"),  # the CLI's --seeds 2 means seeds 0 and 1: a slip
        ({"seeds": np.asarray(0)}, "seeds"),
        ({"lrs": 0.1}, "lrs=0.1"),
        ({"lrs": "0.1"}, "lrs='0.1'"),
        ({"steps": 0}, "steps"),
        ({"eval_every": 40}, "eval_every"),
        ({"target_loss": -1.0}, "target_loss"),
        ({"target_loss": float("inf")}, "target_loss"),
        ({"target_loss": "1"}, "target_loss"),
        ({"beta": None}, "beta=None"),  # was a TypeError from float()
        ({"beta": "0.9"}, "beta='0.9'"),  # was taken as 0.9
        ({"lrs": [None]}, r"lrs=\[None\]"),  # was a TypeError from float()
        ({"lrs": ["x"]}, "lrs="),  # was float()'s ValueError, which did not name lrs
        ({"lrs": [True]}, "lrs="),  # was taken as 1.0
        ({"target_loss": True}, "target_loss"),
        ({"devices": []}, "devices"),  # was a ZeroDivisionError
        ({"devices": [jax.devices()[0]] * 2}, "devices"),  # was a bare AssertionError from Mesh
        ({"devices": "cpu"}, "devices"),  # was an AttributeError
        ({"model": "rnn"}, "model='rnn'"),  # was make_model's "name='rnn'"
        ({"model": None}, "model=None"),
        # A repeated lr or seed trained the same run twice, under one run id: two records of it.
        ({"lrs": [0.1, 0.1]}, r"lrs=\[0.1, 0.1\]"),
        ({"lrs": [0.1, np.float64(0.1)]}, "lrs="),
        ({"seeds": [0, 1, 0]}, r"seeds=\[0, 1, 0\]"),
        ({"seeds": np.zeros(2, int)}, "seeds="),
        # The engine counts steps in int32 (the CLI refuses --steps 2**31): was an OverflowError
        # once the runs were initialized.
        ({"steps": 2**31, "eval_every": 2**31}, "steps=2147483648"),
        ({"devices": 2}, "devices=2"),  # was a TypeError that did not name devices
    ],
)
def test_bad_arguments(digits, kwargs, match):
    args = dict(model="mlp", batch_size=8, beta=0.9, lrs=[0.1], seeds=[0], steps=20, eval_every=10)
    with pytest.raises(ValueError, match=match):
        train.run_group(digits, **(args | kwargs))


def test_data_that_is_not_a_dataset_is_a_type_error(digits):
    # Was an AttributeError ('str' object has no attribute 'n_train').
    for data_arg in ("digits", None):
        with pytest.raises(TypeError, match=f"data={data_arg!r}"):
            train.run_group(data_arg, "linear", 8, 0.9, [0.1], [0], 2, 2)


def test_an_on_chunk_that_is_not_callable_is_a_type_error_before_any_work(digits, monkeypatch):
    # Was "'int' object is not callable", raised after the first chunk had trained.
    monkeypatch.setattr(train, "_init_runs", lambda *a: pytest.fail("work started"))
    with pytest.raises(TypeError, match="on_chunk=3"):
        train.run_group(digits, "linear", 8, 0.9, [0.1], [0], 2, 2, on_chunk=3)


def test_numpy_seeds_and_lrs_are_taken(digits):
    # NumPy integer seeds passed the checks, then failed to be hashed into a run id (TypeError:
    # int64 is not JSON serializable).
    result = train.run_group(
        digits, "linear", 8, 0.9, np.asarray([0.1]), np.arange(2), steps=2, eval_every=2
    )
    assert [(r.lr, r.seed) for r in result.runs] == [(0.1, 0), (0.1, 1)]
    assert all(type(r.seed) is int and type(r.lr) is float for r in result.runs)


def test_numpy_target_loss_is_taken(digits):
    # A NumPy float32 target (a loss read from a result, say) passed the checks, then failed to be
    # hashed into a run id (TypeError: float32 is not JSON serializable). It is the same goal as
    # the Python float, with the same run id; an int target too. JAX scalars stay accepted as lr
    # and beta (0.25 and 0.5 are exact in float32).
    args = (digits, "linear", 8, jnp.float32(0.5), jnp.asarray([0.25]), [0], 2, 2)
    spec = train.GroupSpec("digits", "linear", 8, 0.5, 2, 2)
    ids = {spec.run_id(0.25, 0, target) for target in (np.float32(3.0), 3, 3.0)}
    assert len(ids) == 1
    run = train.run_group(*args, target_loss=np.float32(3.0), devices=jax.devices()[:1]).runs[0]
    assert type(run.target_loss) is float and run.target_loss == 3.0
    assert run.run_id == spec.run_id(0.25, 0, 3.0) and run.steps_to_target == 2


def _runs_on_one_device() -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("runs",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("runs"))


def _crafted_chunk(x, y, num_classes, bias, kernel, steps, beta=0.9, lr=0.1):
    """``steps`` steps of linear runs from the given (stacked, one per run) bias and kernel, on
    ``x``, ``y`` in batches of half the set: the engine's state before and after, and its
    per-step losses and gradient norms."""
    st = train._Static("linear", x.shape[1:], num_classes, len(y), len(y) // 2)
    runs = _runs_on_one_device()
    with jax.threefry_partitionable(False):
        state = train._init_runs([(lr, 0)] * len(bias), beta, st, runs)
        values = {
            "bias": jnp.asarray(bias, jnp.float32),
            "kernel": jnp.asarray(kernel, jnp.float32),
        }
        params = jax.tree_util.tree_map_with_path(
            lambda path, a: values["bias" if "bias" in jax.tree_util.keystr(path) else "kernel"],
            state.params,
        )
        state = state._replace(params=params)
        after, losses, gnorms = train._train_chunk(
            state, jnp.int32(0), jnp.asarray(x), jnp.asarray(y), st=st, length=steps
        )
    return state, after, np.asarray(losses), np.asarray(gnorms)


def test_the_threshold_is_exceeded_not_reached_and_at_least_100():
    """Two classes: the threshold is 100 * max(1, ln 2) = 100, not 100 * ln 2 (about 69).

    Zero inputs and all labels 1: a bias (b, 0) gives every example the loss b exactly (in float32,
    log(1 + e^-b) vanishes), so the first losses are 80, 100 and 120; only 120 exceeds 100.
    """
    x, y = np.zeros((8, 3), np.float32), np.ones(8, np.int32)
    bias = [[80.0, 0.0], [100.0, 0.0], [120.0, 0.0]]
    _, after, losses, _ = _crafted_chunk(x, y, 2, bias, np.zeros((3, 3, 2)), steps=2)
    np.testing.assert_array_equal(losses[:, 0], [80.0, 100.0, 120.0])
    assert np.asarray(after.diverged_at).tolist() == [-1, -1, 1]
    assert np.isfinite(losses[:2]).all() and np.isnan(losses[2, 1])


def test_a_diverged_run_stays_frozen_even_when_later_batches_are_sane():
    """A run that diverges at step 1 keeps its parameters and optimizer state from then on, and
    its later losses and gradient norms stay NaN, though the later batches would be harmless.

    The first batch (epoch 0's order) holds the only examples with non-zero inputs. Run 0 meets
    them with a kernel row giving loss 1000 (over the threshold); run 1 with a zero kernel: its
    loss is ln 2, but the gradient of the kernel row that feature 1 (1e30) feeds overflows the
    gradient norm, which alone catches it. The second batch has zero inputs and a small finite
    loss: a run that took it for a recovery would resume training.
    """
    n = 8
    with jax.threefry_partitionable(False):
        data_key = jax.random.split(jax.random.key(0))[1]
        first_batch = np.asarray(shuffle.permutation(jax.random.fold_in(data_key, 0), n))[: n // 2]
    x, y = np.zeros((n, 3), np.float32), np.ones(n, np.int32)
    x[first_batch, 0], x[first_batch, 1] = 1.0, 1e30
    kernel = np.zeros((2, 3, 2), np.float32)
    kernel[0, 0, 0] = 1000.0
    before, after, losses, gnorms = _crafted_chunk(x, y, 2, np.zeros((2, 2)), kernel, steps=4)
    assert losses[0, 0] == pytest.approx(1000.0) and losses[1, 0] == pytest.approx(math.log(2))
    assert np.isinf(gnorms[:, 0]).all()
    assert np.asarray(after.diverged_at).tolist() == [1, 1]
    assert np.asarray(after.diverged).all()
    assert np.isnan(losses[:, 1:]).all() and np.isnan(gnorms[:, 1:]).all()
    chex.assert_trees_all_equal(after.params, before.params)
    chex.assert_trees_all_equal(after.opt_state, before.opt_state)


_permutation = jax.jit(shuffle.permutation, static_argnums=1)  # eager, it takes seconds


def _mean_ce(graphdef, params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnums=0)
def _plain_step(graphdef, params, opt_state, x, y, lr, beta):
    loss, grads = jax.value_and_grad(functools.partial(_mean_ce, graphdef))(params, x, y)
    updates, opt_state = emm.ema_sgd(lr, beta).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)


@functools.partial(jax.jit, static_argnums=0)
def _plain_evaluate(graphdef, params, x_train, y_train, x_test, y_test):
    logits = nnx.merge(graphdef, params)(x_test)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
    test_loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
    return _mean_ce(graphdef, params, x_train, y_train), test_loss, accuracy


def _plain_run(dataset, model, batch, beta, lr, seed, steps, eval_every, target_loss):
    """One run as a plain Python loop, written from the module's docstring, not its code: seed s
    splits into an init key and a data key, epoch e's order is shuffle.permutation(fold_in(data
    key, e)), the last partial batch is dropped, a step whose loss or gradient norm is not finite
    or whose loss exceeds 100 * max(1, ln classes) is not applied and ends the run, and the full
    sets are evaluated with a plain forward pass after every eval_every steps and after the last.
    """
    threshold = 100 * max(1.0, math.log(dataset.num_classes))
    target_loss = -math.inf if target_loss is None else target_loss
    per_epoch = dataset.n_train // batch
    with jax.threefry_partitionable(False):
        init_key, data_key = jax.random.split(jax.random.key(seed))
        graphdef, params = nnx.split(make_model(model, dataset, nnx.Rngs(params=init_key)))
        orders = [
            np.asarray(_permutation(jax.random.fold_in(data_key, e), dataset.n_train))
            for e in range(-(-steps // per_epoch))
        ]
    sets = (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)
    points = sorted({*range(eval_every, steps + 1, eval_every), steps})
    opt_state, losses, evals, diverged_at = emm.ema_sgd(lr, beta).init(params), [], [], None
    for i in range(steps):
        epoch, pos = divmod(i, per_epoch)
        idx = orders[epoch][pos * batch : (pos + 1) * batch]
        x, y = dataset.x_train[idx], dataset.y_train[idx]
        new, new_state, loss, norm = _plain_step(graphdef, params, opt_state, x, y, lr, beta)
        losses.append((float(loss), float(norm)))
        if not (math.isfinite(loss) and math.isfinite(norm) and loss <= threshold):
            diverged_at = i + 1
            break
        params, opt_state = new, new_state
        if i + 1 in points:
            evals.append([float(v) for v in _plain_evaluate(graphdef, params, *sets)])
    if diverged_at is None and not evals[-1][0] <= threshold:
        diverged_at = steps + 1
    curves = np.full((3, len(points)), np.nan)
    curves[:, : len(evals)] = np.asarray(evals).T.reshape(3, -1)
    if diverged_at is not None:
        curves[:, np.asarray(points) >= diverged_at] = np.nan
    reached = [p for p, v in zip(points, curves[0], strict=True) if v <= target_loss]
    return {
        "batch": np.asarray(losses).T,
        "eval_steps": points,
        "curves": curves,
        "steps_to_target": reached[0] if reached else None,
        "diverged_at": diverged_at,
    }


@pytest.mark.parametrize(("fixture", "rows"), [("mixed", [1, 2]), ("late", [0, 1])])
def test_a_plain_loop_reproduces_the_runs(request, digits, fixture, rows):
    """Every mini-batch loss and gradient norm and every evaluation of an engine run against
    :func:`_plain_run`, to float32 rounding, and its record to the same numbers.

    ``mixed``: momentum 0.9, batch 16 (which does not divide 1438), target 1.5 reached at the last
    evaluation, and lr 1e5 diverging at step 2 (before any evaluation). ``late``: two epochs (38
    examples dropped from each), and lr 120 diverging at step 6, an evaluation step.
    """
    result = request.getfixturevalue(fixture)
    spec = result.spec
    for r in rows:
        run = result.runs[r]
        plain = _plain_run(
            digits, spec.model, spec.batch_size, spec.beta, run.lr, run.seed, spec.steps,
            spec.eval_every, run.target_loss,
        )  # fmt: skip
        taken = plain["batch"].shape[1]  # up to and including the diverging step
        np.testing.assert_allclose(result.batch_loss[r, :taken], plain["batch"][0], rtol=1e-5)
        np.testing.assert_allclose(result.grad_norm[r, :taken], plain["batch"][1], rtol=1e-5)
        assert np.isnan(result.batch_loss[r, taken:]).all()
        assert result.eval_steps.tolist() == plain["eval_steps"]
        engine = np.stack([result.train_loss[r], result.test_loss[r], result.test_accuracy[r]])
        np.testing.assert_allclose(engine, plain["curves"], rtol=1e-5)
        assert run.diverged_at == plain["diverged_at"]
        assert run.diverged == (run.diverged_at is not None)
        assert run.steps_to_target == plain["steps_to_target"]
        kept = np.flatnonzero(~np.isnan(plain["curves"][0]))
        finals = (run.final_train_loss, run.final_test_loss, run.final_test_accuracy)
        if len(kept):
            np.testing.assert_allclose(finals, plain["curves"][:, kept[-1]], rtol=1e-5)
        else:
            assert finals == (None, None, None)
    assert [r.steps_to_target for r in result.runs] == (
        [30, 30, None, None] if fixture == "mixed" else [None, None]
    )
    assert [r.diverged_at for r in result.runs] == (
        [None, None, 2, 2] if fixture == "mixed" else [None, 6]
    )


def test_a_nan_final_evaluation_is_a_divergence(digits):
    """lr 3e38: the one step's loss is sane, but its update overflows the parameters to +-inf and
    the final evaluation's train loss is NaN (1e38, as in the test above, gives inf). NaN compares
    false with everything, so a check "loss > threshold" would pass it: it is a divergence at
    step 2, and its NaN train loss is recorded as None."""
    result = train.run_group(
        digits, "linear", 16, 0.0, [3e38], [0], 1, 1, devices=jax.devices()[:1]
    )
    run = result.runs[0]
    assert np.isfinite(result.batch_loss[0, 0]) and np.isnan(result.train_loss[0, 0])
    assert run.diverged and run.diverged_at == 2
    assert run.final_train_loss is None and run.steps_to_target is None


def test_the_runs_are_sharded_over_the_devices(digits, monkeypatch):
    """On two devices each holds its half of the run axis (2 of 4 runs), not a copy of all."""
    seen = []
    chunk = train._train_chunk

    def spy(state, *args, **kwargs):
        seen.append(state)
        return chunk(state, *args, **kwargs)

    monkeypatch.setattr(train, "_train_chunk", spy)
    devices = jax.devices()[:2]
    train.run_group(digits, "linear", BATCH, 0.9, [0.1, 0.2], [0, 1], 2, 2, devices=devices)
    assert seen
    for leaf in jax.tree.leaves(seen[0]):
        shards = leaf.addressable_shards
        assert sorted(s.device.id for s in shards) == sorted(d.id for d in devices)
        assert [s.data.shape[0] for s in shards] == [2, 2], leaf.sharding


def test_many_runs_per_device_give_the_gradient_norms_of_two(digits):
    """Eight runs on one device and two on each of four, bitwise: with more runs per device XLA
    reorders a plain jnp.sum of the squared gradients (last bits), which ordered_sum prevents."""
    lrs = [0.05 * (i + 1) for i in range(4)]
    one, four = (
        train.run_group(digits, "linear", BATCH, 0.9, lrs, [0, 1], 2, 2, devices=devices)
        for devices in (jax.devices()[:1], jax.devices()[:4])
    )
    np.testing.assert_array_equal(one.grad_norm, four.grad_norm)
    np.testing.assert_array_equal(one.batch_loss, four.batch_loss)


@pytest.mark.parametrize(
    "n_runs, device_counts, rows",
    [(3, (1, 8), (3, 2)), (5, (1, 2), (5, 3)), (1, (1, 8), (2, 2))],
)
def test_a_grid_that_does_not_fill_the_devices_gives_the_numbers_of_one_device(
    digits, monkeypatch, n_runs, device_counts, rows
):
    """Runs that do not divide the devices are padded to as many per device as the others, at
    least two (3 runs on 8 devices train 16): each device's vmap has another size, the numbers
    stay those of one device (the README's claim)."""
    seen = []
    chunk = train._train_chunk

    def spy(state, *args, **kwargs):
        seen.append([s.data.shape[0] for s in state.diverged.addressable_shards])
        return chunk(state, *args, **kwargs)

    monkeypatch.setattr(train, "_train_chunk", spy)
    lrs, seeds = [0.1, 0.3, 1e5, 0.05, 0.2][:n_runs], [0]
    results = []
    for n, per_device in zip(device_counts, rows, strict=True):
        seen.clear()
        result = train.run_group(
            digits, "linear", BATCH, 0.9, lrs, seeds, 4, 2, target_loss=1.5,
            devices=jax.devices()[:n],
        )  # fmt: skip
        results.append(result)
        assert seen[0] == [per_device] * n
    for other in results[1:]:
        for name in CURVES:
            np.testing.assert_array_equal(getattr(other, name), getattr(results[0], name))
        assert [r.as_record() | {"wall_seconds": 0} for r in other.runs] == [
            r.as_record() | {"wall_seconds": 0} for r in results[0].runs
        ]
    assert len(results[0].runs) == n_runs
