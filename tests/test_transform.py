"""Tests of `ema_momentum` and `ema_sgd`: values, equivalences, properties, composition."""

import decimal
import fractions
import functools
import pickle
import warnings

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import ema_momentum as emm

# Older jax has no jax.enable_x64, only jax.experimental.enable_x64.
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:
    from jax.experimental import enable_x64


def _grads(num_steps, tree, seed=0, dtype=jnp.float32):
    key = jax.random.key(seed)
    return [
        jax.tree.map(
            lambda p, k=k: jax.random.normal(jax.random.fold_in(key, k), p.shape, dtype), tree
        )
        for k in range(num_steps)
    ]


def _run(tx, grads, params):
    """Applies `tx` to a gradient sequence; returns per-step updates and the final state."""
    state = tx.init(params)
    outs = []
    for g in grads:
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs, state


def _descend(tx, grads, params):
    """Takes optimizer steps with a fixed gradient sequence; returns the parameter path."""
    state = tx.init(params)
    path = []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        path.append(params)
    return path


PARAMS = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(5)}


# ---------------------------------------------------------------------------
# Closed forms.


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_closed_form_first_three_steps(beta):
    g1, g2, g3 = jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5]), jnp.array([-1.0, 4.0])
    v1 = (1 - beta) * g1
    v2 = beta * v1 + (1 - beta) * g2
    v3 = beta * v2 + (1 - beta) * g3
    outs, state = _run(emm.ema_momentum(beta), [g1, g2, g3], jnp.zeros(2))
    chex.assert_trees_all_close(outs, [v1, v2, v3], rtol=1e-6)
    chex.assert_trees_all_close(state.velocity, v3, rtol=1e-6)
    assert state.count == 3


def test_closed_form_debias_nesterov_qhm_two_steps():
    b, nu = 0.8, 0.3
    g1, g2 = jnp.array([2.0]), jnp.array([-1.0])
    v1, v2 = (1 - b) * g1, b * (1 - b) * g1 + (1 - b) * g2
    (d1, d2), _ = _run(emm.ema_momentum(b, debias=True), [g1, g2], jnp.zeros(1))
    chex.assert_trees_all_close((d1, d2), (v1 / (1 - b), v2 / (1 - b**2)), rtol=1e-6)
    (n1, n2), _ = _run(emm.ema_momentum(b, nesterov=True), [g1, g2], jnp.zeros(1))
    chex.assert_trees_all_close((n1, n2), (b * v1 + (1 - b) * g1, b * v2 + (1 - b) * g2), rtol=1e-6)
    (q1, q2), _ = _run(emm.ema_momentum(b, nu=nu), [g1, g2], jnp.zeros(1))
    chex.assert_trees_all_close(
        (q1, q2), (nu * v1 + (1 - nu) * g1, nu * v2 + (1 - nu) * g2), rtol=1e-6
    )
    # Together: the velocity is debiased first, then mixed with the raw gradient.
    h1, h2 = v1 / (1 - b), v2 / (1 - b**2)
    (e1, e2), _ = _run(emm.ema_momentum(b, nesterov=True, debias=True), [g1, g2], jnp.zeros(1))
    chex.assert_trees_all_close((e1, e2), (b * h1 + (1 - b) * g1, b * h2 + (1 - b) * g2), rtol=1e-5)
    (r1, r2), _ = _run(emm.ema_momentum(b, nu=nu, debias=True), [g1, g2], jnp.zeros(1))
    chex.assert_trees_all_close(
        (r1, r2), (nu * h1 + (1 - nu) * g1, nu * h2 + (1 - nu) * g2), rtol=1e-5
    )


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
def test_constant_gradient(beta):
    g = jnp.array([1.5, -0.25])
    outs, _ = _run(emm.ema_momentum(beta), [g] * 30, jnp.zeros(2))
    expected = [(1 - beta ** (t + 1)) * g for t in range(30)]
    chex.assert_trees_all_close(outs, expected, rtol=1e-5)
    debiased, state = _run(emm.ema_momentum(beta, debias=True), [g] * 30, jnp.zeros(2))
    chex.assert_trees_all_close(debiased, [g] * 30, rtol=1e-6)
    # The stored velocity is never debiased.
    chex.assert_trees_all_close(state.velocity, expected[-1], rtol=1e-5)


def test_debias_is_exact_under_a_beta_schedule():
    schedule = optax.linear_schedule(0.5, 0.99, transition_steps=5)
    ones = [jnp.ones(())] * 6
    ours, _ = _run(emm.ema_momentum(schedule, debias=True), ones, jnp.zeros(()))
    chex.assert_trees_all_close(ours, [jnp.ones(())] * 6, rtol=1e-6)
    # optax.ema divides by 1 - beta_t**t, which is wrong under a schedule
    # (README, API): the sequence drifts up to ~14.6.
    theirs, _ = _run(
        optax.inject_hyperparams(optax.ema)(schedule, debias=True), ones, jnp.zeros(())
    )
    assert float(theirs[-1]) > 10.0


def test_beta_schedule_uses_the_step_count():
    schedule = lambda count: jnp.where(count < 1, 0.5, 0.25)
    (u1, u2), state = _run(emm.ema_momentum(schedule), [jnp.ones(())] * 2, jnp.zeros(()))
    chex.assert_trees_all_close((u1, u2), (0.5, 0.25 * 0.5 + 0.75), rtol=1e-6)
    chex.assert_trees_all_close(state.weight_sum, 1 - 0.125)


def test_nesterov_mixes_with_the_beta_of_the_same_step():
    # nu = beta_t, the beta that made v_t: the schedule at count 0 for the first update.
    schedule = lambda count: jnp.where(count < 1, 0.5, 0.25)
    g1, g2 = jnp.array([2.0]), jnp.array([-1.0])
    v1 = 0.5 * g1
    v2 = 0.25 * v1 + 0.75 * g2
    (u1, u2), _ = _run(emm.ema_momentum(schedule, nesterov=True), [g1, g2], jnp.zeros(1))
    chex.assert_trees_all_close((u1, u2), (0.5 * v1 + 0.5 * g1, 0.25 * v2 + 0.75 * g2), rtol=1e-6)
    chex.assert_trees_all_close((u1, u2), (jnp.array([1.5]), jnp.array([-0.875])), rtol=1e-6)


def test_count_saturates():
    tx = emm.ema_momentum(0.9)
    state = tx.init(jnp.zeros(2))._replace(count=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
    _, state = tx.update(jnp.ones(2), state)
    assert state.count == jnp.iinfo(jnp.int32).max
    assert state.count.dtype == jnp.int32


# ---------------------------------------------------------------------------
# Equivalences with optax (many random steps). Float32 runs are checked where
# the arithmetic is the same operation for operation; the others in float64.


def test_equals_optax_ema_bitwise_float32():
    grads = _grads(100, PARAMS)
    ours, s1 = _run(emm.ema_momentum(0.9), grads, PARAMS)
    theirs, s2 = _run(optax.ema(0.9, debias=False), grads, PARAMS)
    chex.assert_trees_all_equal(ours, theirs)
    chex.assert_trees_all_equal(s1.velocity, s2.ema)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.999])
def test_debiased_equals_optax_ema_debiased(beta):
    with enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), PARAMS)
        grads = _grads(100, params, dtype=jnp.float64)
        ours, _ = _run(emm.ema_momentum(beta, debias=True), grads, params)
        theirs, _ = _run(optax.ema(beta, debias=True), grads, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-12, atol=1e-14)
    grads = _grads(100, PARAMS)
    ours, _ = _run(emm.ema_momentum(beta, debias=True), grads, PARAMS)
    theirs, _ = _run(optax.ema(beta, debias=True), grads, PARAMS)
    chex.assert_trees_all_close(ours, theirs, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99])
def test_ema_sgd_equals_heavy_ball_sgd(beta, nesterov):
    lr = 0.3
    with enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), PARAMS)
        grads = _grads(200, params, dtype=jnp.float64)
        ours = _descend(emm.ema_sgd(lr, beta, nesterov=nesterov), grads, params)
        heavy_ball = optax.sgd(lr * (1 - beta), momentum=beta, nesterov=nesterov)
        theirs = _descend(heavy_ball, grads, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-10, atol=1e-12)
    grads = _grads(200, PARAMS)
    ours = _descend(emm.ema_sgd(lr, beta, nesterov=nesterov), grads, PARAMS)
    theirs = _descend(optax.sgd(lr * (1 - beta), momentum=beta, nesterov=nesterov), grads, PARAMS)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_ema_sgd_equals_heavy_ball_sgd_on_complex_params(nesterov):
    lr, beta = 0.3, 0.9
    with enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.complex128), PARAMS)
        real, imag = _grads(60, PARAMS, seed=1), _grads(60, PARAMS, seed=2)
        grads = [
            jax.tree.map(lambda a, b: (a + 1j * b).astype(jnp.complex128), r, i)
            for r, i in zip(real, imag, strict=True)
        ]
        heavy_ball = optax.sgd(lr * (1 - beta), momentum=beta, nesterov=nesterov)
        ours = _descend(emm.ema_sgd(lr, beta, nesterov=nesterov), grads, params)
        theirs = _descend(heavy_ball, grads, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-10, atol=1e-12)
        assert ours[-1]["w"].dtype == jnp.complex128


def test_nu_beta_is_nesterov_and_nu_one_is_default():
    with enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), PARAMS)
        grads = _grads(50, params, dtype=jnp.float64)
        nesterov, _ = _run(emm.ema_momentum(0.9, nesterov=True), grads, params)
        qhm, _ = _run(emm.ema_momentum(0.9, nu=0.9), grads, params)
        chex.assert_trees_all_close(nesterov, qhm, rtol=1e-14, atol=1e-15)
    grads = _grads(50, PARAMS)
    chex.assert_trees_all_equal(
        _run(emm.ema_momentum(0.9, nu=1.0), grads, PARAMS)[0],
        _run(emm.ema_momentum(0.9), grads, PARAMS)[0],
    )


def test_nu_zero_is_sgd():
    grads = _grads(30, PARAMS)
    ours = _descend(emm.ema_sgd(0.1, 0.9, nu=0.0), grads, PARAMS)
    chex.assert_trees_all_equal(ours, _descend(optax.sgd(0.1), grads, PARAMS))


def test_beta_zero_is_sgd_through_the_same_path():
    grads = _grads(30, PARAMS)
    ours = _descend(emm.ema_sgd(0.1, 0.0), grads, PARAMS)
    chex.assert_trees_all_equal(ours, _descend(optax.sgd(0.1), grads, PARAMS))


# ---------------------------------------------------------------------------
# Properties.

_floats = st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32)
_sequences = hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.just(3)), elements=_floats)
_betas = st.floats(0.0, 0.999)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(_sequences, _sequences, _betas, st.floats(-3, 3), st.floats(-3, 3))
def test_linear_in_the_gradient_sequence(gs1, gs2, beta, a, c):
    n = min(len(gs1), len(gs2))
    gs1, gs2 = gs1[:n], gs2[:n]
    with enable_x64(True):
        tx = emm.ema_momentum(beta)
        u1, _ = _run(tx, list(jnp.asarray(gs1)), jnp.zeros(3, jnp.float64))
        u2, _ = _run(tx, list(jnp.asarray(gs2)), jnp.zeros(3, jnp.float64))
        mix, _ = _run(tx, list(jnp.asarray(a * gs1 + c * gs2)), jnp.zeros(3, jnp.float64))
        expected = [a * x + c * y for x, y in zip(u1, u2, strict=True)]
        chex.assert_trees_all_close(mix, expected, rtol=1e-9, atol=1e-9)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(_sequences)
def test_beta_zero_is_the_identity(gs):
    grads = list(jnp.asarray(gs, jnp.float32))
    outs, _ = _run(emm.ema_momentum(0.0), grads, jnp.zeros(3))
    chex.assert_trees_all_equal(outs, grads)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(_sequences, _betas)
def test_velocity_stays_in_the_range_of_the_gradients(gs, beta):
    with enable_x64(True):
        grads = list(jnp.asarray(gs))
        outs, _ = _run(emm.ema_momentum(beta), grads, jnp.zeros(3, jnp.float64))
        debiased, _ = _run(emm.ema_momentum(beta, debias=True), grads, jnp.zeros(3, jnp.float64))
    eps = 1e-9
    for t in range(len(grads)):
        seen = gs[: t + 1]
        # v_t is a convex combination of 0 (the init) and the gradients seen;
        # the debiased one of the gradients alone.
        lo, hi = seen.min(axis=0), seen.max(axis=0)
        v, d = np.asarray(outs[t]), np.asarray(debiased[t])
        assert np.all(v >= np.minimum(lo, 0) - eps) and np.all(v <= np.maximum(hi, 0) + eps)
        tol = eps * (1 + np.abs(seen).max())
        assert np.all(d >= lo - tol) and np.all(d <= hi + tol)


# ---------------------------------------------------------------------------
# Composition with optax, all under jit.


def _jit_steps(tx, params, grads):
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_chain_with_clipping_weight_decay_and_schedule():
    schedule = optax.cosine_decay_schedule(0.1, 20)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(1e-4),
        emm.ema_sgd(schedule, 0.9),
    )
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(1e-4),
        emm.ema_momentum(0.9),
        optax.scale_by_learning_rate(schedule),
    )
    grads = _grads(20, PARAMS)
    ours, _ = _jit_steps(tx, PARAMS, grads)
    theirs, _ = _jit_steps(reference, PARAMS, grads)
    chex.assert_trees_all_equal(ours, theirs)


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(emm.ema_sgd)(learning_rate=0.1, beta=0.9)
    grads = _grads(10, PARAMS)
    ours, state = _jit_steps(tx, PARAMS, grads)
    reference, _ = _jit_steps(emm.ema_sgd(0.1, 0.9), PARAMS, grads)
    chex.assert_trees_all_close(ours, reference, rtol=1e-5)
    # A new beta in the state is the one the next step uses.
    velocity = state.inner_state[0].velocity
    state.hyperparams["beta"] = jnp.asarray(0.5)
    updates, state = jax.jit(tx.update)(grads[0], state, PARAMS)
    expected = jax.tree.map(lambda v, g: -0.1 * (0.5 * v + 0.5 * g), velocity, grads[0])
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)


OPTAX_VERSION = tuple(int(part) for part in optax.__version__.split(".")[:3])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("static", [True, False], ids=["static_args", "as_a_value"])
def test_inject_hyperparams_with_an_accumulator_dtype(dtype, static):
    if not static and OPTAX_VERSION < (0, 2, 8):
        pytest.skip("before optax 0.2.8, inject_hyperparams casts the value to float32")
    # As a value, inject_hyperparams takes the callable jnp.bfloat16 for a schedule and passes
    # the array it returns; that array's dtype is the accumulator's (pytest turns JAX's
    # deprecation warning for jnp.dtype(array) into an error).
    inject = optax.inject_hyperparams(
        emm.ema_sgd, static_args=("accumulator_dtype",) if static else ()
    )
    tx = inject(learning_rate=0.1, beta=0.9, accumulator_dtype=dtype)
    state = tx.init(PARAMS)  # eagerly: under jit the value is a tracer, which has a dtype
    _, state = tx.update(_grads(1, PARAMS)[0], state, PARAMS)
    velocity = state.inner_state[0].velocity
    assert all(v.dtype == dtype for v in jax.tree.leaves(velocity))


def test_tree_get_count():
    _, state = _jit_steps(emm.ema_sgd(0.1, 0.9), PARAMS, _grads(3, PARAMS))
    assert optax.tree.get(state, "count") == 3


def test_masked():
    mask = {"w": True, "b": False}
    grads = _grads(5, PARAMS)
    ours, _ = _jit_steps(optax.masked(emm.ema_momentum(0.9), mask), PARAMS, grads)
    # Masked-out leaves pass through untouched: the raw gradients are applied.
    chex.assert_trees_all_close(ours["b"], sum(g["b"] for g in grads), rtol=1e-6)
    reference, _ = _jit_steps(emm.ema_momentum(0.9), PARAMS, grads)
    chex.assert_trees_all_equal(ours["w"], reference["w"])


_SHAPES = st.sampled_from([(), (0,), (3,), (2, 0), (2, 3)])
# Nested dicts, tuples and lists, empty containers among them, with None and array leaves
# (scalar and zero-size too): the trees init and update must walk like optax.
_TREES = st.recursive(
    st.one_of(_SHAPES, st.none()),
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
        st.lists(children, max_size=2).map(tuple),
        st.lists(children, max_size=2),
    ),
    max_leaves=6,
)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(_TREES, st.floats(0.0, 0.999), st.integers(0, 2**32 - 1), st.booleans())
def test_random_trees_and_masks_match_optax_ema_bitwise(shapes, beta, seed, use_mask):
    rng = np.random.default_rng(seed)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
    shaped = lambda: jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes, is_leaf=is_shape
    )
    params = shaped()
    mask = jax.tree.map(lambda _: bool(rng.integers(2)), params)
    wrap = (lambda tx: optax.masked(tx, mask)) if use_mask else (lambda tx: tx)
    ours, theirs = wrap(emm.ema_momentum(beta)), wrap(optax.ema(beta, debias=False))
    state, reference = ours.init(params), theirs.init(params)
    for _ in range(2):
        grads = shaped()
        updates, state = ours.update(grads, state)
        expected, reference = theirs.update(grads, reference)
        chex.assert_trees_all_equal(updates, expected, strict=True)
    velocity = optax.tree.get(state, "velocity")
    chex.assert_trees_all_equal(velocity, optax.tree.get(reference, "ema"), strict=True)


def test_multi_steps():
    grads = _grads(8, PARAMS)
    ours, _ = _jit_steps(optax.MultiSteps(emm.ema_sgd(0.1, 0.9), 2), PARAMS, grads)
    averaged = [jax.tree.map(lambda a, b: (a + b) / 2, *grads[i : i + 2]) for i in range(0, 8, 2)]
    theirs, _ = _jit_steps(emm.ema_sgd(0.1, 0.9), PARAMS, averaged)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5)


def test_nan_gradients_propagate_and_apply_if_finite_guards():
    grads = _grads(3, PARAMS)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[1])
    plain, _ = _jit_steps(emm.ema_sgd(0.1, 0.9), PARAMS, [grads[0], bad])
    assert bool(jnp.isnan(plain["b"][0]))
    guarded_tx = optax.apply_if_finite(emm.ema_sgd(0.1, 0.9), max_consecutive_errors=3)
    guarded, state = _jit_steps(guarded_tx, PARAMS, [grads[0], bad, grads[2]])
    expected, _ = _jit_steps(emm.ema_sgd(0.1, 0.9), PARAMS, [grads[0], grads[2]])
    chex.assert_trees_all_equal(guarded, expected)
    assert state.total_notfinite == 1


def test_none_leaves():
    params = {"a": jnp.ones(2), "frozen": None}
    tx = emm.ema_sgd(0.1, 0.5)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)({"a": jnp.ones(2), "frozen": None}, state)
    assert updates["frozen"] is None
    chex.assert_trees_all_close(updates["a"], -0.05 * jnp.ones(2))


def test_a_none_gradient_keeps_the_velocity_of_its_param():
    # A param with no gradient this step (None) keeps its velocity, so the state keeps its
    # structure (a jitted step or a scan carry needs it) and the EMA resumes where it was.
    tx = emm.ema_momentum(0.5)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"a": jnp.ones(2), "b": jnp.full(2, 4.0)}, state)
    updates, skipped = jax.jit(tx.update)({"a": jnp.ones(2), "b": None}, state)
    assert updates["b"] is None
    chex.assert_trees_all_equal_structs(skipped, state)
    chex.assert_trees_all_equal(skipped.velocity["b"], jnp.full(2, 2.0))
    chex.assert_trees_all_close(skipped.velocity["a"], jnp.full(2, 0.75))
    updates, _ = jax.jit(tx.update)({"a": jnp.ones(2), "b": jnp.zeros(2)}, skipped)
    chex.assert_trees_all_equal(updates["b"], jnp.full(2, 1.0))


def test_compiles_once():
    traces = []
    tx = emm.ema_sgd(0.1, 0.9, debias=True)

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, tx.init(PARAMS)
    for g in _grads(3, PARAMS):
        params, state = step(params, state, g)
    assert len(traces) == 1


def _eager_dispatches(jaxpr):
    """How many computations an eager run of `jaxpr` dispatches, one per operation.

    A nested `jit` is one computation; a `custom_jvp` function runs its body
    operation by operation when called eagerly, so its equations are counted.
    """
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_jvp_call":
            n += _eager_dispatches(eqn.params["call_jaxpr"].jaxpr)
        else:
            n += 1
    return n


@pytest.mark.parametrize(
    ("kwargs", "most"),
    [
        # v_new = (1 - b) * g + b * v, pinned to v's sharding: 2 products, a sum, shard_alike.
        ({}, 4),
        # ... plus the cast of the bfloat16 velocity and one jitted stochastic rounding.
        ({"accumulator_dtype": jnp.bfloat16, "rounding": "stochastic"}, 6),
    ],
)
def test_an_eager_update_dispatches_few_operations_per_leaf(kwargs, most):
    # Unjitted, each operation is dispatched on its own (~10-30 us on CPU): the step for one
    # more leaf was 5 operations (`g ** 1` of `optax.tree.update_moment` among them) and,
    # with stochastic rounding, 53 (the leaf's salt, 27 scalar operations, and the rounding's).
    tx = emm.ema_momentum(0.9, **kwargs)

    def count(num_leaves):
        params = {f"p{i}": jnp.zeros(5) for i in range(num_leaves)}
        state = tx.init(params)
        return _eager_dispatches(jax.make_jaxpr(tx.update)(params, state).jaxpr)

    assert count(3) - count(2) <= most


def test_an_eager_update_compiles_nothing_for_more_leaves_of_a_known_shape():
    # The jitted pieces of an eager update are cached by shape and dtype: neither the leaf's
    # index nor the step count nor the values may force a compilation.
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    tx = emm.ema_sgd(0.1, 0.9, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    small = {"a": jnp.ones(3)}
    jax.block_until_ready(tx.update(small, tx.init(small), small))
    params = {f"p{i}": jnp.full(3, i, jnp.float32) for i in range(4)}
    state = tx.init(params)
    jax.block_until_ready(state)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            _, state = tx.update(params, state, params)
        jax.block_until_ready(state)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


@pytest.mark.parametrize(
    "kwargs", [{}, {"accumulator_dtype": jnp.bfloat16, "rounding": "stochastic"}]
)
def test_jit_with_donated_params_and_state(kwargs):
    # An output that cannot reuse a donated buffer is a UserWarning, an error in this suite.
    tx = emm.ema_sgd(0.1, 0.9, debias=True, **kwargs)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    grads = _grads(3, PARAMS)
    want = (PARAMS, tx.init(PARAMS))
    for g in grads:
        want = jax.jit(step)(*want, g)
    donated_step = jax.jit(step, donate_argnums=(0, 1))
    got = jax.tree.map(jnp.copy, (PARAMS, tx.init(PARAMS)))
    for g in grads:
        inputs = jax.tree.leaves(got)
        got = donated_step(*got, g)
        assert all(x.is_deleted() for x in inputs)
    chex.assert_trees_all_equal(got, want)


def test_state_pickles():
    _, state = _jit_steps(emm.ema_sgd(0.1, 0.9), PARAMS, _grads(2, PARAMS))
    restored = pickle.loads(pickle.dumps(state))
    assert isinstance(restored[0], emm.EmaMomentumState)
    chex.assert_trees_all_equal(restored, state)


def test_vmap_and_grad_over_hyperparameters():
    g = _grads(5, {"x": jnp.zeros(3)})

    def final_update(beta, nu):
        tx = emm.ema_momentum(beta, nu=nu, debias=True)
        outs, _ = _run(tx, g, {"x": jnp.zeros(3)})
        return jnp.sum(outs[-1]["x"])

    betas = jnp.array([0.0, 0.5, 0.9])
    batched = jax.jit(jax.vmap(final_update, in_axes=(0, None)))(betas, jnp.asarray(0.7))
    single = jnp.stack([final_update(b, 0.7) for b in betas])
    chex.assert_trees_all_close(batched, single, rtol=1e-6)
    d_beta = jax.grad(final_update)(jnp.asarray(0.5), jnp.asarray(0.7))
    eps = 1e-3
    fd = (final_update(0.5 + eps, 0.7) - final_update(0.5 - eps, 0.7)) / (2 * eps)
    chex.assert_trees_all_close(d_beta, fd, rtol=1e-2)
    # A traced out-of-range value is not checked (it cannot be), so tracing works.
    jax.jit(final_update)(jnp.asarray(1.5), jnp.asarray(0.5))


def test_grad_over_nu_and_learning_rate():
    g = _grads(5, {"x": jnp.zeros(3)})

    def final_step(lr, nu):
        outs, _ = _run(emm.ema_sgd(lr, 0.8, nu=nu), g, {"x": jnp.zeros(3)})
        return jnp.sum(outs[-1]["x"])

    for argnum in (0, 1):
        grad = jax.grad(final_step, argnums=argnum)(jnp.asarray(0.3), jnp.asarray(0.6))
        eps = jnp.zeros(2).at[argnum].set(1e-3)
        fd = (
            final_step(*(jnp.asarray([0.3, 0.6]) + eps))
            - final_step(*(jnp.asarray([0.3, 0.6]) - eps))
        ) / 2e-3
        chex.assert_trees_all_close(grad, fd, rtol=1e-2)
        assert abs(float(grad)) > 1e-3


# ---------------------------------------------------------------------------
# Dtypes.


def test_state_structure_and_dtypes_are_stable():
    tx = emm.ema_sgd(0.1, 0.9, debias=True)
    state0 = tx.init(PARAMS)
    _, state1 = jax.jit(tx.update)(_grads(1, PARAMS)[0], state0, PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1)
    chex.assert_trees_all_equal_shapes_and_dtypes(state0[0].velocity, PARAMS)


@pytest.mark.parametrize(
    ("param_dtype", "accumulator_dtype", "velocity_dtype"),
    [
        (jnp.bfloat16, None, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.float32, jnp.bfloat16, jnp.bfloat16),
        (jnp.complex64, None, jnp.complex64),
    ],
)
def test_dtype_preservation(param_dtype, accumulator_dtype, velocity_dtype):
    params = jnp.ones(4, param_dtype)
    tx = emm.ema_sgd(0.1, 0.9, accumulator_dtype=accumulator_dtype)
    state = tx.init(params)
    assert state[0].velocity.dtype == velocity_dtype
    updates, state = jax.jit(tx.update)(params, state, params)
    assert updates.dtype == param_dtype
    assert state[0].velocity.dtype == velocity_dtype
    assert optax.apply_updates(params, updates).dtype == param_dtype


_REAL_OPTIONS = [
    {"nu": 0.5, "accumulator_dtype": jnp.float32},
    {"accumulator_dtype": jnp.bfloat16, "rounding": "stochastic"},
]
_ANY_OPTIONS = [{}, {"debias": True, "nesterov": True}]


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [(d, k) for d in (jnp.float32, jnp.bfloat16) for k in _ANY_OPTIONS + _REAL_OPTIONS]
    + [(jnp.complex64, k) for k in [*_ANY_OPTIONS, {"accumulator_dtype": jnp.complex64}]],
)
def test_no_implicit_dtype_promotion(dtype, kwargs):
    # Implicit mixed-dtype arithmetic inside the transform would be a bug: it
    # could silently upcast user state or downcast the compute.
    tx = emm.ema_momentum(optax.constant_schedule(0.9), **kwargs)
    params = {"a": jnp.ones(3, dtype), "b": jnp.ones((2, 2), dtype)}
    with jax.numpy_dtype_promotion("strict"):
        state = tx.init(params)
        for _ in range(2):
            updates, state = jax.jit(tx.update)(params, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int8, jnp.uint32])
def test_integer_and_bool_leaves_cause_no_implicit_promotion(dtype):
    # Their velocity is float; making its zeros must not promote a bool against an int 0.
    tx = emm.ema_sgd(0.1, 0.9, debias=True)
    params = {"a": jnp.ones(3, dtype)}
    with jax.numpy_dtype_promotion("strict"):
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(params, state)
    assert updates["a"].dtype == state[0].velocity["a"].dtype == jnp.float32
    np.testing.assert_allclose(updates["a"], -0.1 * np.ones(3))


@pytest.mark.parametrize("kwargs", [{}, {"nesterov": True}, {"nu": 0.5, "debias": True}])
def test_array_hyperparameters_cause_no_implicit_promotion(kwargs):
    # optax.inject_hyperparams hands the transform bfloat16 arrays for bf16 params.
    params = {"a": jnp.ones(3, jnp.bfloat16)}
    tx = optax.inject_hyperparams(emm.ema_sgd)(0.1, 0.9, **kwargs)
    with jax.numpy_dtype_promotion("strict"):
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(params, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    # A float32 array beta on float64 params computes in float64, without promotion.
    with enable_x64(True), jax.numpy_dtype_promotion("strict"):
        params = {"a": jnp.ones(3, jnp.float64)}
        tx = emm.ema_momentum(np.float32(0.9), nu=np.float32(0.5))
        updates, _ = jax.jit(tx.update)(params, tx.init(params))
        assert updates["a"].dtype == jnp.float64


@pytest.mark.parametrize("wrap", [lambda tx: tx, lambda tx: optax.apply_if_finite(tx, 3)])
def test_a_float32_learning_rate_keeps_bfloat16_updates(wrap):
    # inject_hyperparams(..., hyperparam_dtype=jnp.float32), the fix the README gives for bf16
    # params, hands ema_sgd a float32 array learning rate. optax's scale multiplied the bf16
    # update by it into float32: a TypePromotionError under strict promotion, and a crash in
    # apply_if_finite, whose two branches then return updates of different dtypes.
    params = {"a": jnp.ones(3, jnp.bfloat16)}
    tx = wrap(optax.inject_hyperparams(emm.ema_sgd, hyperparam_dtype=jnp.float32)(0.1, 0.999))
    state = tx.init(params)
    with jax.numpy_dtype_promotion("strict"):
        for _ in range(2):
            updates, state = jax.jit(tx.update)(params, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


@pytest.mark.parametrize(
    ("param_dtype", "lr"),
    [
        (jnp.bfloat16, np.float32(0.1)),
        (jnp.float16, np.float32(0.1)),
        (jnp.float32, jnp.bfloat16(0.1)),
        (jnp.float32, np.float64(0.1)),
    ],
)
def test_an_array_learning_rate_acts_as_the_python_float_it_holds(param_dtype, lr):
    # The same bits and dtype as a Python float, eagerly and traced under jit (compared with a
    # jitted Python float: XLA fuses a jitted step, which changes last bits against eager).
    def run(lr):
        return _run(emm.ema_sgd(lr, 0.9), _grads(2, params, dtype=param_dtype), params)[0]

    with enable_x64(True):
        lr = jnp.asarray(lr)
        params = {"a": jnp.linspace(-1.0, 1.0, 5, dtype=param_dtype)}
        expected = run(float(lr))
        chex.assert_trees_all_equal(run(lr), expected)
        chex.assert_trees_all_equal(jax.jit(run)(lr), jax.jit(lambda: run(float(lr)))())
    chex.assert_trees_all_equal_shapes_and_dtypes(expected[-1], params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_numpy_float64_hyperparameters_do_not_widen_the_compute_under_x64(dtype):
    # np.float64 subclasses Python's float but is not weakly typed: it must be cast too.
    with enable_x64(True):
        params = {"a": jnp.ones(3, dtype)}
        tx = emm.ema_sgd(np.float64(0.1), np.float64(0.9), nu=np.float64(0.5))
        state = tx.init(params)
        jaxpr = str(jax.make_jaxpr(tx.update)(params, state))
        assert "f64[3]" not in jaxpr
        with jax.numpy_dtype_promotion("strict"):
            updates, state = jax.jit(tx.update)(params, state)
        assert updates["a"].dtype == dtype
        assert state[0].weight_sum.dtype == jnp.float64  # the scalar debias weight is wide


@pytest.mark.parametrize(
    ("kwargs", "expected"), [({}, 0.5), ({"nesterov": True}, 0.75), ({"debias": True}, 1.0)]
)
def test_a_numpy_float64_from_a_schedule_does_not_widen_the_compute_under_x64(kwargs, expected):
    # optax.constant_schedule returns its value as it is, here a strongly typed np.float64: the
    # beta the update reads each step must be cast like any other array, not taken as weak.
    with enable_x64(True):
        params = {"a": jnp.ones(3, jnp.float32)}
        tx = emm.ema_momentum(optax.constant_schedule(np.float64(0.5)), **kwargs)
        state = tx.init(params)
        assert "f64[3]" not in str(jax.make_jaxpr(tx.update)(params, state))
        with jax.numpy_dtype_promotion("strict"):
            updates, state = jax.jit(tx.update)(params, state)
        assert updates["a"].dtype == state.velocity["a"].dtype == jnp.float32
        np.testing.assert_array_equal(updates["a"], np.full(3, expected))


@pytest.mark.skipif(
    not hasattr(jax.config, "jax_explicit_x64_dtypes"), reason="jax has no explicit_x64_dtypes"
)
def test_the_compute_dtype_follows_jax_explicit_x64_dtypes_set_mid_process():
    # With x64 off, jax_explicit_x64_dtypes decides whether float64 arrays promote to float64
    # ("allow") or are cut to float32 ("warn"): the same dtypes, another compute dtype, which a
    # compute dtype cached on the dtypes (and x64) alone got wrong.
    if not hasattr(jax.config, "jax_explicit_x64_dtypes"):
        pytest.skip("this jax has no jax_explicit_x64_dtypes setting")
    previous = jax.config.jax_explicit_x64_dtypes
    try:
        jax.config.update("jax_explicit_x64_dtypes", "allow")
        grads = jnp.full(3, 0.1, jnp.float64)
        tx = emm.ema_momentum(0.25)
        state = tx.init(grads)
        jax.config.update("jax_explicit_x64_dtypes", "warn")
        with warnings.catch_warnings():  # "float64 ... will be truncated", once per key
            warnings.simplefilter("ignore")
            tx.update(grads, state)  # computed in float32
        jax.config.update("jax_explicit_x64_dtypes", "allow")
        updates, _ = tx.update(grads, state)
        np.testing.assert_array_equal(updates, np.full(3, 0.75 * np.float64(0.1)))
    finally:
        jax.config.update("jax_explicit_x64_dtypes", previous)


def test_python_scalar_leaves():
    tx = emm.ema_momentum(0.5, debias=True)
    updates, state = tx.update({"a": 2.0}, tx.init({"a": 1.0}))
    chex.assert_trees_all_close(updates["a"], 2.0)
    assert state.count == 1


@pytest.mark.parametrize("param", [jnp.int32(0), 0, jnp.zeros(2, jnp.int8), jnp.zeros(2, bool)])
def test_integer_leaves_get_a_float_velocity(param):
    # Truncating the velocity to the leaf's integer dtype would stall the EMA; optax.ema
    # computes it in the default float dtype, and so do we.
    tx, ema = emm.ema_momentum(0.9), optax.ema(0.9, debias=False)
    state, ema_state = tx.init({"a": param}), ema.init({"a": param})
    assert state.velocity["a"].dtype == jnp.float32
    g = {"a": jnp.full(jnp.shape(param), 10, jnp.int32)}
    for _ in range(50):
        updates, state = tx.update(g, state)
        theirs, ema_state = ema.update(g, ema_state)
    assert updates["a"].dtype == jnp.float32
    chex.assert_trees_all_close(updates, theirs, rtol=1e-6)
    np.testing.assert_allclose(updates["a"], 10 * (1 - 0.9**50), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_a_float0_gradient_of_an_integer_leaf_is_named(jit):
    # jax.grad(..., allow_int=True), the way to differentiate a tree with integer leaves, gives
    # them float0 gradients; they failed inside jnp ('dtype=float0 is not a valid dtype for JAX
    # type promotion'), naming neither the updates nor the leaf.
    params = {"w": jnp.ones(2), "step": jnp.arange(3)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    tx = emm.ema_sgd(0.1, 0.9)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=r"updates\['step'\] are float0 .* None in its place"):
        update(grads, tx.init(params), params)
    # The fix the message names: None for the leaf without a gradient.
    grads["step"] = None
    updates, _ = update(grads, tx.init(params), params)
    assert updates["step"] is None
    chex.assert_trees_all_close(updates["w"], -0.1 * 0.1 * 2 * jnp.ones(2))


def test_a_complex_accumulator_for_real_params():
    # A tree that mixes complex and real params needs one complex accumulator_dtype; the real
    # leaves' updates stay real (without a ComplexWarning-style lossy cast) and exact.
    params = {"c": jnp.ones(3, jnp.complex64), "r": jnp.ones(3, jnp.float32)}
    grads = _grads(10, {"r": jnp.zeros(3)})
    tx = emm.ema_momentum(0.9, accumulator_dtype=jnp.complex64)
    real, _ = _run(emm.ema_momentum(0.9), grads, {"r": params["r"]})
    state = tx.init(params)
    assert state.velocity["r"].dtype == jnp.complex64
    for g, want in zip(grads, real, strict=True):
        updates, state = jax.jit(tx.update)({"c": params["c"], **g}, state)
        assert updates["r"].dtype == jnp.float32
        chex.assert_trees_all_close(updates["r"], want["r"], rtol=1e-6)
    # An integer leaf's update is real too (float, as without the complex accumulator).
    updates, _ = tx.update({"i": jnp.arange(3)}, tx.init({"i": jnp.arange(3)}))
    assert updates["i"].dtype == jnp.float32


@pytest.mark.parametrize("beta", [np.int32(1), jnp.asarray(1), np.uint8(1), 1])
def test_a_non_float_beta_of_one_is_named(beta):
    with pytest.raises(ValueError, match=r"beta must be a finite number in \[0, 1\), got beta="):
        emm.ema_momentum(beta)


def test_a_bfloat16_beta_of_one_names_the_fix():
    tx = optax.inject_hyperparams(emm.ema_momentum)(beta=0.999)
    with pytest.raises(ValueError, match=r"bfloat16 beta rounds .* hyperparam_dtype=jnp.float32"):
        tx.init(jnp.ones(2, jnp.bfloat16))
    tx = optax.inject_hyperparams(emm.ema_momentum, hyperparam_dtype=jnp.float32)(beta=0.999)
    tx.init(jnp.ones(2, jnp.bfloat16))


def test_only_a_narrow_beta_of_one_gets_the_hyperparam_dtype_hint():
    for beta in (jnp.asarray(0.999, jnp.bfloat16), jnp.asarray(0.9999, jnp.float16)):
        with pytest.raises(ValueError, match=r"float16 beta rounds .* hyperparam_dtype"):
            emm.ema_momentum(beta)
    # A float32 (or wider) 1.0 was not rounded up: it is just out of range.
    for beta in (np.float32(1.0), np.float64(1.0), 1.0):
        with pytest.raises(ValueError, match=r"beta must be a finite number in \[0, 1\)") as error:
            emm.ema_momentum(beta)
        assert "hyperparam_dtype" not in str(error.value)


@pytest.mark.parametrize("jit", [False, True])
def test_complex_params_under_inject_hyperparams_name_the_fix(jit):
    # inject_hyperparams casts float hyperparameters to the params' widest dtype: complex64
    # here, which is not a real scalar. The error names the fix (it works in optax.sgd).
    params = {"c": jnp.zeros(2, jnp.complex64), "r": jnp.zeros(2)}
    maybe_jit = jax.jit if jit else lambda f: f
    for factory, name in ((emm.ema_sgd, "learning_rate"), (emm.ema_momentum, "beta")):
        tx = optax.inject_hyperparams(factory)(0.1)
        with pytest.raises(ValueError, match=rf"{name} must be a real .* hyperparam_dtype=jnp.f"):
            maybe_jit(tx.init)(params)
    grads = [{"c": jnp.full(2, 1 - 2j, jnp.complex64), "r": jnp.ones(2)}] * 3
    tx = optax.inject_hyperparams(emm.ema_sgd, hyperparam_dtype=jnp.float32)(0.1, 0.9)
    ours, _ = _run(tx, grads, params)
    want, _ = _run(emm.ema_sgd(0.1, 0.9), grads, params)
    chex.assert_trees_all_close(ours, want, rtol=1e-6)
    assert ours[-1]["r"].dtype == jnp.float32


def test_a_complex_hyperparameter_outside_inject_hyperparams_gets_no_hint():
    for value in (0.1 + 0j, np.complex64(0.1)):
        with pytest.raises(ValueError, match=r"beta must be a real scalar") as error:
            emm.ema_momentum(value)
        assert "hyperparam_dtype" not in str(error.value)


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float8_e4m3fnuz]
)
def test_narrow_arithmetic_runs_in_float32(dtype):
    # With bf16 (or f16, or float8, which JAX promotes with nothing implicitly) everywhere, the
    # EMA is computed in float32 and rounded once.
    v = jnp.asarray([1.0, -3.0, 7.0], dtype)
    g = jnp.asarray([0.3, 0.7, -0.1], dtype)
    tx = emm.ema_momentum(0.99)
    state = tx.init(v)._replace(velocity=v)
    u, state = tx.update(g, state)
    f32 = 0.01 * g.astype(jnp.float32) + 0.99 * v.astype(jnp.float32)
    chex.assert_trees_all_equal(state.velocity, f32.astype(dtype))
    chex.assert_trees_all_equal(u, f32.astype(dtype))


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_float8_accumulator_dtype_is_computed_in_float32(nesterov):
    # accumulator_dtype=float8 was accepted at construction, then every update failed in
    # jnp.result_type: float8 types have no implicit promotion path, not even to float32.
    tx = emm.ema_sgd(0.5, 0.5, nesterov=nesterov, accumulator_dtype=jnp.float8_e4m3fn)
    params = jnp.zeros(3)
    grads = jnp.asarray([1.0, -0.3, 0.1])
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    velocity = optax.tree.get(state, "velocity")
    assert velocity.dtype == jnp.float8_e4m3fn and updates.dtype == jnp.float32
    chex.assert_trees_all_equal(velocity, (0.5 * grads).astype(jnp.float8_e4m3fn))
    weight = 0.5 if nesterov else 1.0  # nu = beta: half the EMA, half the gradient
    chex.assert_trees_all_close(updates, -0.5 * (weight * 0.5 * grads + (1 - weight) * grads))


# ---------------------------------------------------------------------------
# Convergence.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
@pytest.mark.parametrize("kwargs", [{}, {"nesterov": True}, {"debias": True}, {"nu": 0.7}])
def test_converges_on_a_parabola(dtype, kwargs):
    target = jnp.asarray([1.0, -2.0, 0.5], dtype) * (1 + 1j if dtype == jnp.complex64 else 1)
    loss = lambda x: jnp.sum(jnp.abs(x - target) ** 2)
    tx = emm.ema_sgd(0.1, 0.9, **kwargs)
    params = jnp.zeros(3, dtype)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        # Conjugate of the Wirtinger derivative: the descent direction for complex parameters.
        grads = (
            jnp.conj(jax.grad(loss, holomorphic=False)(params))
            if dtype == jnp.complex64
            else jax.grad(loss)(params)
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(300):
        params, state = step(params, state)
    chex.assert_trees_all_close(params, target, atol=1e-4)


def test_converges_on_rosenbrock():
    def rosenbrock(xy):
        x, y = xy
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    tx = emm.ema_sgd(2e-3, 0.9)
    params = jnp.asarray([-1.0, 1.0])

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(rosenbrock)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(functools.partial(jax.lax.scan, body, length=20_000))(
        (params, tx.init(params))
    )
    chex.assert_trees_all_close(params, jnp.ones(2), atol=1e-3)


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "beta",
    [
        1.0,
        -0.1,
        1.5,
        float("nan"),
        float("inf"),
        np.float32(1.0),
        pytest.param(10**400, id="1e400"),
    ],
)
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=r"beta must be .* got beta="):
        emm.ema_momentum(beta)
    with pytest.raises(ValueError, match=r"beta must be"):
        emm.ema_sgd(0.1, beta)


@pytest.mark.parametrize("nu", [-0.1, 1.01, float("nan"), pytest.param(-(10**400), id="-1e400")])
def test_bad_nu(nu):
    with pytest.raises(ValueError, match=r"nu must be .* got nu="):
        emm.ema_momentum(0.9, nu=nu)


# A bool is not a number here (nor in NumPy's type hierarchy): `ema_sgd(True, 0.9)` is a slip,
# not a learning rate of 1, as `nesterov=1` is not True.
NOT_SCALARS = [
    "0.1",
    None,
    0.1 + 0j,
    np.complex64(0.1),
    [0.1],
    np.array([0.9, 0.9]),
    object(),
    False,
    np.bool_(False),
    jnp.asarray(False),
    np.array("0.9"),  # 0-d string arrays: float() parses them, and "0.9" is refused
    np.array(b"0.9"),
    np.array(0.9, dtype=object),
]


@pytest.mark.parametrize("value", NOT_SCALARS, ids=lambda v: type(v).__name__)
def test_hyperparameters_that_are_not_real_scalars(value):
    with pytest.raises(ValueError, match=r"learning_rate must be a real scalar or a schedule"):
        emm.ema_sgd(value, 0.9)
    with pytest.raises(ValueError, match=r"beta must be a real scalar or a schedule, got beta="):
        emm.ema_momentum(value)
    if value is not None:  # nu=None is the default: plain EMA momentum
        with pytest.raises(ValueError, match=r"nu must be a real scalar, got nu="):
            emm.ema_momentum(0.9, nu=value)


def test_real_numbers_that_are_not_arrays_act_as_python_floats():
    # Validation takes any real number float() accepts; the update must then use it, not fail
    # later in jnp.asarray (a Fraction, a Decimal) or on a float128 JAX has no type for.
    # Like a Python float, it is weakly typed: np.float64(0.1) takes the steps 0.1 takes.
    params = jnp.zeros(3)
    grads = _grads(2, params)
    want = _descend(emm.ema_sgd(0.1, 0.5, nu=0.75), grads, params)
    want_debiased = _descend(emm.ema_sgd(0.1, 0.5, debias=True), grads, params)
    for number in (fractions.Fraction, decimal.Decimal, np.longdouble, np.float64):
        tx = emm.ema_sgd(number("0.1"), number("0.5"), nu=number("0.75"))
        chex.assert_trees_all_equal(_descend(tx, grads, params), want)
        tx = emm.ema_sgd(0.1, number("0.5"), debias=True)
        chex.assert_trees_all_equal(_descend(tx, grads, params), want_debiased)


def test_nu_is_not_a_schedule():
    with pytest.raises(ValueError, match=r"nu must be a real scalar, got nu="):
        emm.ema_momentum(0.9, nu=optax.constant_schedule(0.5))


@pytest.mark.parametrize("flag", ["nesterov", "debias"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_bools(flag, value):
    with pytest.raises(ValueError, match=rf"{flag} must be True or False, got {flag}="):
        emm.ema_sgd(0.1, 0.9, **{flag: value})


@pytest.mark.parametrize("flag", ["nesterov", "debias"])
@pytest.mark.parametrize("transform", [jax.jit, jax.vmap])
def test_traced_flags_are_named(flag, transform):
    # A flag picks the form of the update, so it cannot be traced (say, vmapped over a sweep's
    # configurations). It used to pass the check as a bool array and then fail in `if flag`
    # with JAX's TracerBoolConversionError, which names no argument.
    def velocity(value):
        tx = emm.ema_momentum(0.9, **{flag: value})
        return tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]

    with pytest.raises(ValueError, match=rf"{flag} must be a concrete True or False, got {flag}="):
        transform(velocity)(jnp.array([True, False]) if transform is jax.vmap else True)


def test_nesterov_with_nu():
    with pytest.raises(ValueError, match=r"nesterov=True and nu=0.5 are exclusive"):
        emm.ema_sgd(0.1, 0.9, nesterov=True, nu=0.5)
    # nu=0 (plain SGD) is a value too, not "no nu": with nesterov it would be silently ignored.
    for nu in (0.0, 0, np.float32(0.0)):
        with pytest.raises(ValueError, match=r"nesterov=True and nu=.* are exclusive"):
            emm.ema_momentum(0.9, nesterov=True, nu=nu)


@pytest.mark.parametrize(
    "lr", [-0.1, float("nan"), float("inf"), -float("inf"), pytest.param(10**400, id="1e400")]
)
def test_bad_learning_rate(lr):
    with pytest.raises(ValueError, match=r"learning_rate must be .* got learning_rate="):
        emm.ema_sgd(lr, 0.9)


@pytest.mark.parametrize("dtype", ["float17", jnp.int32, "not a dtype", bool])
def test_bad_accumulator_dtype(dtype):
    with pytest.raises(ValueError, match=r"accumulator_dtype must be .* got accumulator_dtype="):
        emm.ema_momentum(0.9, accumulator_dtype=dtype)


def test_bad_rounding_and_seed():
    with pytest.raises(ValueError, match=r"rounding must be .* got rounding='up'"):
        emm.ema_momentum(0.9, rounding="up")
    with pytest.raises(ValueError, match=r"rounding='stochastic' is for bfloat16"):
        emm.ema_momentum(0.9, accumulator_dtype=jnp.float32, rounding="stochastic")
    with pytest.raises(ValueError, match=r"seed must be an integer, got seed=1.5"):
        emm.ema_momentum(0.9, seed=1.5)
    for seed in (-1, 2**32, np.int64(-1), np.ones(2, np.int32), True, False):
        with pytest.raises(ValueError, match=r"seed must be "):
            emm.ema_momentum(0.9, seed=seed)
    emm.ema_momentum(0.9, seed=2**32 - 1)


def test_real_accumulator_for_complex_params():
    tx = emm.ema_momentum(0.9, accumulator_dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"accumulator_dtype=float32 cannot hold complex64"):
        tx.init({"z": jnp.ones(2, jnp.complex64)})


@pytest.mark.parametrize("jit", [False, True])
def test_complex_gradients_for_a_real_velocity(jit):
    # The stored velocity would keep only the real part while this step's update has both:
    # the imaginary part would get no momentum, with at most a deprecation warning from JAX.
    tx = emm.ema_momentum(0.9)
    state = tx.init({"w": jnp.ones(2)})
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=r"updates\['w'\] are complex64 .* a float32 velocity"):
        update({"w": jnp.ones(2, jnp.complex64)}, state)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "updates, match",
    [
        ({"b": jnp.ones(2)}, r"structure of the state's velocity .* Dict key mismatch"),
        ({"w": jnp.ones(2), "b": jnp.ones(2)}, r"structure of the state's velocity"),
        ([jnp.ones(2)], r"structure of the state's velocity"),
        # A shape mismatch used to broadcast where it could (a [3, 2] gradient into a [2]
        # velocity trained on) and otherwise fail inside jnp with a TypeError.
        ({"w": jnp.ones(3)}, r"updates\['w'\] have shape \(3,\) but .* shape \(2,\)"),
        ({"w": jnp.ones((3, 2))}, r"updates\['w'\] have shape \(3, 2\) but .* shape \(2,\)"),
    ],
)
def test_updates_of_other_params_than_init_saw(updates, match, jit):
    tx = emm.ema_momentum(0.9)
    state = tx.init({"w": jnp.ones(2)})
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=match):
        update(updates, state)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "init_w",
    # Params where the gradients have an array: a None (an unused or filtered-out part of the
    # model), a subtree, a masked-out leaf. The treedef of the updates matches any subtree at
    # a leaf, so these got past the structure check and failed with an AttributeError.
    [None, {"x": jnp.ones(2)}, (jnp.ones(2),), optax.MaskedNode()],
)
def test_an_array_of_updates_where_init_saw_no_array(init_w, jit):
    tx = emm.ema_momentum(0.9)
    state = tx.init({"w": init_w, "b": jnp.ones(2)})
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=r"structure of the state's velocity.*updates\['w'\]"):
        update({"w": jnp.ones(2), "b": jnp.ones(2)}, state)


@pytest.mark.parametrize(
    "leaf, what",
    # What an unfiltered model carries besides its weights: a PRNG key, an activation
    # function, a name. They failed with NotImplementedError ('Cannot call abstract method
    # astype') or a TypeError from jnp, naming neither the argument nor the leaf.
    [(jax.random.key(0), r"a key<fry> array"), (jax.nn.relu, r"a \w+"), ("relu", r"a str")],
)
def test_params_that_are_not_numeric_arrays(leaf, what):
    with pytest.raises(ValueError, match=rf"params\['extra'\] is {what}, which cannot have"):
        emm.ema_momentum(0.9).init({"w": jnp.ones(2), "extra": leaf})


def test_a_key_in_the_params_of_a_jitted_init():
    with pytest.raises(ValueError, match=r"params\['extra'\] is a key<fry> array"):
        jax.jit(emm.ema_momentum(0.9).init)({"w": jnp.ones(2), "extra": jax.random.key(0)})


def test_abstract_params_point_to_eval_shape():
    # A ShapeDtypeStruct given to init itself was told to filter with eqx.filter.
    params = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
    tx = emm.ema_momentum(0.9)
    with pytest.raises(ValueError, match=r"params\['w'\] is a ShapeDtypeStruct.*jax\.eval_shape"):
        tx.init(params)
    assert jax.eval_shape(tx.init, params).velocity["w"].shape == (2, 3)


def test_good_edge_values_are_accepted():
    emm.ema_sgd(0.0, 0.0)
    emm.ema_sgd(jnp.asarray(0.1), jnp.asarray(0.999), nu=1.0)
    emm.ema_sgd(optax.constant_schedule(0.1), optax.constant_schedule(0.9))


# ---------------------------------------------------------------------------
# Dtypes and ema_sgd's options, against float64 NumPy references (added by mutation testing).


@pytest.mark.parametrize(
    ("grad_dtype", "accumulator_dtype"), [(np.float64, np.float32), (np.float32, np.float64)]
)
def test_arithmetic_runs_in_the_wider_of_the_gradient_and_accumulator_dtypes(
    grad_dtype, accumulator_dtype
):
    # Under x64, a float32 velocity for float64 gradients (or a float64 one for float32
    # gradients) is combined with the gradient in float64: only the stored velocity is rounded
    # to its dtype, and only the update to the gradient's.
    beta = 0.9
    grads = np.random.default_rng(0).normal(size=(4, 5)).astype(grad_dtype)
    tolerance = {np.float64: dict(rtol=1e-13, atol=1e-14), np.float32: dict(rtol=1e-6, atol=1e-7)}
    with enable_x64(True):
        tx = emm.ema_momentum(beta, debias=True, accumulator_dtype=accumulator_dtype)
        state = tx.init(jnp.zeros(5, grad_dtype))
        stored, weight = np.zeros(5), 0.0  # float64 references
        for g in grads:
            updates, state = tx.update(jnp.asarray(g), state)
            v = beta * stored + (1 - beta) * g.astype(np.float64)
            weight = beta * weight + (1 - beta)
            stored = v.astype(accumulator_dtype).astype(np.float64)
            assert updates.dtype == grad_dtype
            assert state.velocity.dtype == accumulator_dtype
            np.testing.assert_allclose(updates, v / weight, **tolerance[grad_dtype])
            np.testing.assert_allclose(state.velocity, stored, **tolerance[accumulator_dtype])


def test_a_complex128_accumulator_keeps_complex64_updates():
    g = np.array([1 + 2j, -0.5 + 0.25j, 3 - 1j], np.complex64)
    with enable_x64(True):
        tx = emm.ema_momentum(0.5, debias=True, accumulator_dtype=jnp.complex128)
        state = tx.init(jnp.zeros(3, jnp.complex64))
        v, weight = np.zeros(3, np.complex128), 0.0
        for k in range(1, 4):
            updates, state = tx.update(jnp.asarray(k * g), state)
            v = 0.5 * v + 0.5 * k * g.astype(np.complex128)  # exact: dyadic values
            weight = 0.5 * weight + 0.5
            assert updates.dtype == jnp.complex64
            assert state.velocity.dtype == jnp.complex128
            np.testing.assert_array_equal(state.velocity, v)
            np.testing.assert_allclose(updates, v / weight, rtol=1e-6)


def test_integer_leaves_get_a_float64_velocity_under_x64():
    # The default float dtype, as optax.ema computes: float64 under x64, not float32.
    with enable_x64(True):
        tx = emm.ema_momentum(0.5)
        state = tx.init({"a": jnp.zeros(2, jnp.int32)})
        assert state.velocity["a"].dtype == jnp.float64
        for _ in range(30):
            updates, state = tx.update({"a": jnp.array([3, -7], jnp.int32)}, state)
        assert updates["a"].dtype == jnp.float64
        # 0.5 ** 30 is below float32 resolution, not float64's: the sums are exact in float64.
        np.testing.assert_array_equal(updates["a"], np.array([3.0, -7.0]) * (1 - 0.5**30))


@pytest.mark.parametrize(
    ("dtype", "stored"),
    [(jnp.float64, jnp.float32), ("float64", jnp.float32), (np.complex128, jnp.complex64)],
)
def test_a_64_bit_accumulator_dtype_without_x64_is_the_32_bit_one(dtype, stored, recwarn):
    # Without x64 jax has no 64-bit arrays: the velocity is stored in the 32-bit counterpart,
    # as `jnp.asarray` would store it, without a truncation warning at init or update.
    assert not jax.config.jax_enable_x64
    tx = emm.ema_momentum(0.5, accumulator_dtype=dtype)
    state = tx.init(jnp.zeros(3))
    updates, state = jax.jit(tx.update)(jnp.array([1.0, 2.0, -4.0]), state)
    assert state.velocity.dtype == stored
    assert updates.dtype == jnp.float32
    np.testing.assert_array_equal(updates, [0.5, 1.0, -2.0])
    assert not [str(w.message) for w in recwarn.list]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"debias": True},
        {"nesterov": True},
        {"nu": 0.25},
        {"nu": 0.25, "debias": True},
        {"nesterov": True, "debias": True, "accumulator_dtype": jnp.float32},
    ],
)
def test_ema_sgd_forwards_every_option_to_ema_momentum(kwargs):
    # theta_t = theta_{t-1} - lr * u_t with u_t from the formulas of the ema_momentum docstring,
    # computed in float64 (the velocity stored in float32 when asked).
    lr, beta = 0.3, 0.8
    grads = np.random.default_rng(1).normal(size=(6, 4))
    accumulator = kwargs.get("accumulator_dtype", np.float64)
    nu = beta if kwargs.get("nesterov") else kwargs.get("nu", 1.0)
    theta, v, weight = np.zeros(4), np.zeros(4), 0.0
    expected = []
    for g in grads:
        v_new = beta * v + (1 - beta) * g
        weight = beta * weight + (1 - beta)
        v_hat = v_new / weight if kwargs.get("debias") else v_new
        theta = theta - lr * (nu * v_hat + (1 - nu) * g)
        expected.append(theta)
        v = v_new.astype(accumulator).astype(np.float64)
    with enable_x64(True):
        tx = emm.ema_sgd(lr, beta, **kwargs)
        path = _descend(tx, list(jnp.asarray(grads)), jnp.zeros(4, jnp.float64))
        velocity = optax.tree.get(_run(tx, list(jnp.asarray(grads)), jnp.zeros(4))[1], "velocity")
    assert velocity.dtype == accumulator
    np.testing.assert_allclose(velocity, v, rtol=1e-12)
    np.testing.assert_allclose(np.stack(path), np.stack(expected), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("x64", [False, True])
def test_init_count_is_an_int32_scalar(x64):
    # The documented state: a float32 count would stop at 2**24 (2**24 + 1 rounds back to it).
    with enable_x64(x64):
        state = emm.ema_momentum(0.9).init(jnp.zeros(2))
        assert state.count.shape == () and state.count.dtype == jnp.int32
        _, state = emm.ema_momentum(0.9).update(jnp.ones(2), state)
        assert state.count.dtype == jnp.int32 and state.count == 1
