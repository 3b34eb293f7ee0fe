"""A bfloat16 velocity: nearest rounding stalls, stochastic rounding does not."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_momentum as emm

BETA = 0.999
STEPS = 5000
TARGET = 1 - BETA**STEPS  # The velocity after STEPS constant unit gradients: 0.99328...


def bf16_velocity_after_constant_gradient(rounding: str, seed: int = 0) -> jax.Array:
    """Velocity of 256 entries after STEPS updates with gradient 1, in one jitted scan."""
    tx = emm.ema_momentum(BETA, accumulator_dtype=jnp.bfloat16, rounding=rounding, seed=seed)
    grad = jnp.ones((256,), jnp.float32)

    @jax.jit
    def train(state):
        def step(state, _):
            _, state = tx.update(grad, state)
            return state, None

        return jax.lax.scan(step, state, length=STEPS)[0]

    state = train(tx.init(grad))
    assert int(state.count) == STEPS
    assert state.velocity.dtype == jnp.bfloat16
    return state.velocity


def bf16_neighbours(x: float) -> tuple[float, float]:
    """The bfloat16 values just below and just above a positive, non-representable `x`."""
    low = np.array(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    high = low + np.uint32(0x10000)
    return float(low.view(np.float32)), float(high.view(np.float32))


def test_nearest_rounding_stalls_far_below_the_target():
    velocity = np.asarray(bf16_velocity_after_constant_gradient("nearest"), np.float32)
    # Once (1 - BETA) * (1 - v) drops below half a bfloat16 ulp of v, round-to-nearest
    # returns v unchanged. That happens at v = 0.25: half an ulp there is 2**-10 ~ 0.00098,
    # the increment 0.001 * 0.75. Every entry is stuck at exactly that value.
    np.testing.assert_array_equal(velocity, 0.25)
    assert velocity.max() < 0.9 < TARGET


def test_stochastic_rounding_reaches_the_target():
    velocity = np.asarray(bf16_velocity_after_constant_gradient("stochastic"), np.float32)
    assert abs(velocity.mean() - TARGET) < 0.01 * TARGET
    # Each entry is a random walk on the bfloat16 grid (ulp 2**-8 near 1) around the target.
    assert np.all(np.abs(velocity - TARGET) < 0.05)


def test_stochastic_rounding_is_reproducible_and_seeded():
    first = bf16_velocity_after_constant_gradient("stochastic", seed=0)
    again = bf16_velocity_after_constant_gradient("stochastic", seed=0)
    other = bf16_velocity_after_constant_gradient("stochastic", seed=1)
    np.testing.assert_array_equal(
        jax.lax.bitcast_convert_type(first, jnp.uint16),
        jax.lax.bitcast_convert_type(again, jnp.uint16),
    )
    assert np.any(np.asarray(first != other))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bfloat16_velocity_takes_half_the_state_bytes(rounding):
    params = {"w": jnp.zeros((300, 100), jnp.float32), "b": jnp.zeros((100,), jnp.float32)}
    params_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
    full = emm.ema_sgd(0.1, BETA).init(params)
    half = emm.ema_sgd(0.1, BETA, accumulator_dtype=jnp.bfloat16, rounding=rounding).init(params)

    def array_bytes(state):  # Scalars (count and friends) are a few bytes whatever the dtype.
        return sum(leaf.nbytes for leaf in jax.tree.leaves(state) if leaf.ndim > 0)

    def scalar_bytes(state):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(state) if leaf.ndim == 0)

    assert array_bytes(full) == params_bytes == 120_400
    assert array_bytes(half) == params_bytes // 2
    assert scalar_bytes(half) == scalar_bytes(full) <= 16
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(half))
    assert total == params_bytes // 2 + scalar_bytes(half)


def stochastic_roundings(value: float, shape: tuple[int, ...], steps: int) -> np.ndarray:
    """bfloat16 roundings of `value`: the velocity of beta=0 is the gradient, rounded.

    Returns an array of shape `(steps, *shape)`: one rounding per entry and step.
    """
    tx = emm.ema_momentum(0.0, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    grad = jnp.full(shape, value, jnp.float32)

    @jax.jit
    def roundings(state):
        def step(state, _):
            _, state = tx.update(grad, state)
            return state, state.velocity

        return jax.lax.scan(step, state, length=steps)[1]

    return np.asarray(roundings(tx.init(grad)), np.float32)


@pytest.mark.parametrize("value", [1 + 2**-7 / 3, np.pi, 1e-3 * (1 + 2**-9), 7e-20])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased_across_entries(value, sign):
    value = float(np.float32(value))
    low, high = bf16_neighbours(value)
    assert low < value < high
    samples = sign * stochastic_roundings(sign * value, (65_536,), steps=1)
    # Only the two neighbours occur, the upper one with probability (value - low) / ulp.
    assert set(np.unique(samples)) <= {low, high}
    p_up = (value - low) / (high - low)
    # 0.01 is over 4 binomial standard deviations at 65536 draws (at most 0.002).
    assert abs(np.mean(samples == high) - p_up) < 0.01
    assert abs(samples.mean() - value) < 0.01 * (high - low)


def test_stochastic_rounding_is_unbiased_across_steps():
    """One entry, many steps: the noise of a position changes with the step count."""
    value = 1 + 2**-7 / 3
    low, high = bf16_neighbours(value)
    samples = stochastic_roundings(value, (1,), steps=4000)[:, 0]
    assert set(np.unique(samples)) == {low, high}
    # The binomial standard deviation at 4000 draws is 0.0075.
    assert abs(np.mean(samples == high) - 1 / 3) < 0.03


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_non_finite_gradients_propagate(rounding):
    tx = emm.ema_momentum(0.5, accumulator_dtype=jnp.bfloat16, rounding=rounding)
    grad = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.0], jnp.float32)
    state = tx.init(grad)
    updates, state = jax.jit(tx.update)(grad, state)
    velocity = np.asarray(state.velocity, np.float32)
    assert updates.dtype == jnp.float32
    np.testing.assert_array_equal(velocity, [np.nan, np.inf, -np.inf, 0.5])
    np.testing.assert_array_equal(updates, [np.nan, np.inf, -np.inf, 0.5])
    # NaN and inf are sticky in the velocity, as in optax: guard with optax.apply_if_finite.
    updates, state = jax.jit(tx.update)(jnp.ones(4), state)
    np.testing.assert_array_equal(
        np.asarray(state.velocity, np.float32), [np.nan, np.inf, -np.inf, 0.75]
    )


def test_stochastic_rounding_draws_different_bits_for_each_leaf():
    """Two leaves equal in value and shape, at the same step and seed, get independent noise."""
    value = 1 + 2**-7 / 3  # between two bfloat16 neighbours: rounds up with probability 1/3
    grads = {"a": jnp.full((256,), value, jnp.float32), "b": jnp.full((256,), value, jnp.float32)}
    tx = emm.ema_momentum(0.0, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    a, b = (np.asarray(state.velocity[k], np.float32) for k in ("a", "b"))
    assert set(np.unique(a)) == set(np.unique(b)) == set(bf16_neighbours(value))
    assert np.any(a != b)


def test_stochastic_rounding_keeps_nans_whose_low_bits_would_carry():
    """A NaN with its low 16 bits set (CUDA's canonical 0x7FFFFFFF) must not round to zero.

    Arithmetic keeps the payload of a quiet NaN, so it reaches the rounding intact; adding
    the noise there carries out of the mantissa: 0x7FFFFFFF becomes -0.0, 0xFFFFFFFF +0.0.
    """
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF] * 8, np.uint32).view(np.float32)
    tx = emm.ema_momentum(0.5, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    grad = jnp.asarray(nans)
    updates, state = jax.jit(tx.update)(grad, tx.init(grad))
    assert np.all(np.isnan(np.asarray(state.velocity, np.float32)))
    assert np.all(np.isnan(np.asarray(updates)))


def test_stochastic_rounding_keeps_float32_leaves_exact():
    """Only bfloat16 leaves are rounded stochastically; float32 state is untouched."""
    tx = emm.ema_momentum(0.9, rounding="stochastic")
    params = {"half": jnp.zeros(3, jnp.bfloat16), "full": jnp.zeros(3, jnp.float32)}
    grads = {"half": jnp.ones(3, jnp.bfloat16), "full": jnp.full(3, 0.3, jnp.float32)}
    _, state = tx.update(grads, tx.init(params))
    assert state.velocity["half"].dtype == jnp.bfloat16
    assert state.velocity["full"].dtype == jnp.float32
    np.testing.assert_allclose(state.velocity["full"], 0.03, rtol=1e-6)


@pytest.mark.parametrize(
    ("seed", "injected_seed"),
    [
        (12345, 12345),  # inject_hyperparams passes a Python int as an int32 array
        (2**32 - 5, np.uint32(2**32 - 5)),  # at 2**31 and above an int32 overflows: pass uint32
    ],
)
def test_a_seed_means_the_same_through_inject_hyperparams(seed, injected_seed):
    """The same rounding bits from the seed passed directly and through inject_hyperparams."""
    grad = jnp.full((64,), 0.3, jnp.float32)
    options = dict(accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    # 1 - 0.75 is exact in float32: with 0.999, 1 - beta differs between the Python float and
    # the float32 array inject_hyperparams makes, and an element whose noise falls in that gap
    # rounds differently (seeds 12344, 12346, 12350, 12357), which is not what this tests.
    plain = emm.ema_momentum(0.75, seed=seed, **options)
    injected = optax.inject_hyperparams(
        emm.ema_momentum, static_args=("accumulator_dtype", "rounding")
    )(0.75, seed=injected_seed, **options)
    velocities = []
    for tx in (plain, injected):
        state = tx.init(grad)
        for _ in range(3):
            _, state = jax.jit(tx.update)(grad, state)
        velocities.append(optax.tree.get(state, "velocity"))
    assert velocities[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(velocities[0], velocities[1])


@pytest.mark.parametrize("debias", [False, True])
def test_grad_through_a_stochastically_rounded_velocity_is_that_of_nearest(debias):
    """The rounding's bit arithmetic has no derivative: it is differentiated like a cast."""
    grads = [jnp.full((8,), 0.3 * (k + 1), jnp.float32) for k in range(4)]

    def last_update(beta, rounding):
        options = dict(debias=debias, accumulator_dtype=jnp.bfloat16, rounding=rounding)
        tx = emm.ema_momentum(beta, **options)
        state = tx.init(grads[0])
        for g in grads:
            u, state = tx.update(g, state)
        return jnp.sum(u)

    nearest = jax.grad(last_update)(jnp.float32(0.5), "nearest")
    stochastic = jax.grad(last_update)(jnp.float32(0.5), "stochastic")
    assert abs(float(nearest)) > 1.0
    np.testing.assert_allclose(stochastic, nearest, rtol=2e-2)
    # The forward values are still stochastically rounded, bit for bit as without grad.
    value, _ = jax.value_and_grad(last_update)(jnp.float32(0.5), "stochastic")
    assert value == last_update(jnp.float32(0.5), "stochastic")


def test_under_vmap_one_seed_draws_the_same_bits_for_every_member():
    """As documented: map the seed too for independent noise across vmapped models."""
    value = 1 + 2**-7 / 3
    grads = jnp.full((4, 256), value, jnp.float32)
    tx = emm.ema_momentum(0.0, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    _, state = jax.jit(jax.vmap(tx.update))(grads, jax.vmap(tx.init)(grads))
    v = np.asarray(state.velocity, np.float32)
    assert len(np.unique(v[0])) == 2
    assert all(np.array_equal(v[0], v[k]) for k in range(1, 4))

    def update(seed, g):
        mapped = optax.inject_hyperparams(
            emm.ema_momentum, static_args=("accumulator_dtype", "rounding")
        )(0.0, seed=seed, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
        return optax.tree.get(mapped.update(g, mapped.init(g))[1], "velocity")

    v = np.asarray(jax.jit(jax.vmap(update))(jnp.arange(4), grads), np.float32)
    assert not any(np.array_equal(v[0], v[k]) for k in range(1, 4))


# ---------------------------------------------------------------------------
# Added by mutation testing.


def bf16_nearest(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even of finite float32 values to bfloat16, as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    return ((bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)).view(np.float32)


def bf16_toward_and_away_from_zero(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two bfloat16 values (as float32) that bracket finite float32 values `x`."""
    toward = np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return toward.view(np.float32), (toward + np.uint32(0x10000)).view(np.float32)


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_update_is_the_float32_ema_not_the_rounded_velocity(rounding, debias):
    """Only the stored velocity is rounded to bfloat16; the float32 update is not."""
    beta = 0.5
    tx = emm.ema_momentum(beta, debias=debias, accumulator_dtype=jnp.bfloat16, rounding=rounding)
    state = tx.init(jnp.zeros(64, jnp.float32))
    stored, weight = np.zeros(64), 0.0  # float64 references
    for g in (1 + 2**-7 / 3, -0.3, 2.7):  # 1 + 2**-7 / 3 makes v_1 fall between bf16 values
        g = float(np.float32(g))
        updates, state = jax.jit(tx.update)(jnp.full(64, g, jnp.float32), state)
        v = beta * stored + (1 - beta) * g
        weight = beta * weight + (1 - beta)
        assert updates.dtype == jnp.float32
        np.testing.assert_allclose(updates, v / weight if debias else v, rtol=1e-6)
        velocity = np.asarray(state.velocity, np.float32)
        if rounding == "nearest":
            np.testing.assert_array_equal(velocity, bf16_nearest(v))
        else:
            toward, away = bf16_toward_and_away_from_zero(v)
            assert np.all((velocity == toward) | (velocity == away))
        stored = velocity.astype(np.float64)


def test_under_grad_the_velocity_is_still_rounded_stochastically():
    """The custom JVP only changes the derivative: the primal velocity keeps its random bits."""
    value = 1 + 2**-7 / 3  # between two bfloat16 neighbours: rounds up with probability 1/3
    low, high = bf16_neighbours(value)
    grad = jnp.full((256,), value, jnp.float32)

    def update_sum(beta):
        tx = emm.ema_momentum(beta, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
        updates, state = tx.update(grad, tx.init(grad))
        return jnp.sum(updates), state.velocity

    (_, with_grad), d_beta = jax.value_and_grad(update_sum, has_aux=True)(jnp.float32(0.0))
    _, without_grad = update_sum(jnp.float32(0.0))
    # beta=0: the velocity is the gradient, rounded; nearest rounding would give `low` only.
    assert set(np.unique(np.asarray(with_grad, np.float32))) == {low, high}
    np.testing.assert_array_equal(
        jax.lax.bitcast_convert_type(with_grad, jnp.uint16),
        jax.lax.bitcast_convert_type(without_grad, jnp.uint16),
    )
    # u = beta * 0 + (1 - beta) * g: d sum(u) / d beta = -sum(g).
    np.testing.assert_allclose(d_beta, -256 * np.float32(value), rtol=1e-6)


def test_stochastic_rounding_applies_to_bfloat16_params_without_an_accumulator_dtype():
    """accumulator_dtype=None stores a bfloat16 param's velocity in bfloat16, rounded as asked."""
    params = jnp.zeros((256,), jnp.bfloat16)
    grads = jnp.ones((256,), jnp.bfloat16)
    low, high = bf16_neighbours(float(np.float32(0.1)))  # v_1 = 0.1 * 1: up with p = 0.8
    velocities = []
    for accumulator_dtype in (None, jnp.bfloat16):
        tx = emm.ema_momentum(0.9, accumulator_dtype=accumulator_dtype, rounding="stochastic")
        _, state = jax.jit(tx.update)(grads, tx.init(params))
        assert state.velocity.dtype == jnp.bfloat16
        velocities.append(np.asarray(state.velocity, np.float32))
    # Nearest rounding would give `high` everywhere.
    assert set(np.unique(velocities[0])) == {low, high}
    np.testing.assert_array_equal(velocities[0], velocities[1])


def test_ema_sgd_forwards_the_rounding_and_the_seed():
    value = 1 + 2**-7 / 3
    low, high = bf16_neighbours(value)
    grad = jnp.full((256,), value, jnp.float32)
    options = dict(accumulator_dtype=jnp.bfloat16, rounding="stochastic")

    def velocity(tx):
        _, state = jax.jit(tx.update)(grad, tx.init(grad), grad)
        return np.asarray(optax.tree.get(state, "velocity"), np.float32)

    seven = velocity(emm.ema_sgd(0.1, 0.0, seed=7, **options))
    assert set(np.unique(seven)) == {low, high}  # nearest rounding would give `low` only
    np.testing.assert_array_equal(seven, velocity(emm.ema_momentum(0.0, seed=7, **options)))
    assert np.any(seven != velocity(emm.ema_sgd(0.1, 0.0, seed=0, **options)))


def test_bfloat16_gradients_into_float32_params_give_a_bfloat16_update_unless_cast():
    """The README's mixed-precision rule: the update keeps the gradient's dtype (optax#1098);
    casting the gradients to float32 first gives the float32 update that optax.sgd returns."""
    params = jnp.linspace(0.1, 1.0, 7, dtype=jnp.float32)
    grads = [(params * c).astype(jnp.bfloat16) for c in (1.2345, -0.7, 3.1)]
    ours, theirs = emm.ema_sgd(0.1, 0.9), optax.sgd(0.1 * (1 - 0.9), momentum=0.9)
    s_cast = s_ours = ours.init(params)
    s_theirs = theirs.init(params)
    for g in grads:
        u_ours, s_ours = ours.update(g, s_ours, params)
        u_cast, s_cast = ours.update(optax.tree.cast(g, jnp.float32), s_cast, params)
        u_theirs, s_theirs = theirs.update(g, s_theirs, params)
        assert u_ours.dtype == jnp.bfloat16
        assert u_cast.dtype == u_theirs.dtype == jnp.float32
        np.testing.assert_allclose(u_cast, u_theirs, rtol=1e-6)
        # The same float32 velocity; only the update is rounded (to within bf16's 2**-8).
        chex.assert_trees_all_equal(s_ours[0].velocity, s_cast[0].velocity)
        np.testing.assert_allclose(np.asarray(u_ours, np.float32), u_cast, rtol=2**-7)
        assert not np.array_equal(np.asarray(u_ours, np.float32), u_cast)
