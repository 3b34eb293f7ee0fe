"""Momentum gradient descent in its exponential-moving-average (EMA) form."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike


class EmaMomentumState(NamedTuple):
    """State of :func:`ema_momentum`; a plain pytree of arrays."""

    count: jax.Array  # shape=(), dtype=int32: updates so far, saturating.
    weight_sum: jax.Array  # shape=(), float32 (float64 under x64): 1 - prod(beta_i).
    velocity: optax.Updates  # like params; dtype `accumulator_dtype` or the params'.


def _concrete_float(value: Any, name: str, *, schedule: bool = True) -> float | None:
    """Returns `value` as a Python float if it is a concrete scalar, else None.

    Traced values (under `jit`, `vmap`, `grad`) and schedules (if `schedule`)
    are not concrete: they are not validated, so the transform still works over
    hyperparameters. Anything else that is not one real number (a string, None,
    a bool, a complex number, an array of another shape) is a ValueError naming
    `name`. A number too large for a float is returned as an infinity.
    """
    what = "a real scalar or a schedule" if schedule else "a real scalar"
    if callable(value) and schedule:
        return None
    dtype = getattr(value, "dtype", None)
    if (
        callable(value)
        or value is None
        or isinstance(value, (str, bytes, complex, bool))
        or getattr(value, "shape", ()) != ()
        or (dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating))
        # As `nesterov=1` is not True, `learning_rate=True` is a slip, not 1.
        or (dtype is not None and jnp.issubdtype(dtype, jnp.bool_))
        # A 0-d string or object array: float() would parse np.array("0.9"), which "0.9" is not.
        or (dtype is not None and not jnp.issubdtype(dtype, jnp.number))
    ):
        hint = ""
        if isinstance(value, jax.Array) and jnp.issubdtype(dtype, jnp.complexfloating):
            # optax.inject_hyperparams casts float hyperparameters to the params' widest dtype.
            hint = (
                " With complex params, optax.inject_hyperparams makes hyperparameters complex; "
                "pass hyperparam_dtype=jnp.float32."
            )
        raise ValueError(f"{name} must be {what}, got {name}={value!r}.{hint}")
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:
        return None
    except OverflowError:  # an int (or Fraction) beyond the float range
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {name}={value!r}.") from None


def _as_weak_float(value: Any) -> Any:
    """A concrete real number that is not a JAX array, as the Python float it equals.

    A Python float is weakly typed, so it never widens or narrows the compute
    dtype, and the arithmetic can use it whatever its type: `jnp.asarray` takes
    no `Fraction` or `Decimal` and no `np.longdouble`. JAX arrays (traced, or from
    `optax.inject_hyperparams`) and schedules are returned as they are.
    """
    if callable(value) or isinstance(value, (jax.Array, int)):
        return value
    return float(value)


def _check_beta(beta: Any) -> None:
    b = _concrete_float(beta, "beta")
    if b is not None and not (math.isfinite(b) and 0.0 <= b < 1.0):
        hint = ""
        dtype = getattr(beta, "dtype", None)
        if (
            b == 1.0
            and dtype is not None
            and jnp.issubdtype(dtype, jnp.floating)
            and jnp.finfo(dtype).bits < 32
        ):
            # optax.inject_hyperparams casts hyperparameters to the params' dtype by default.
            hint = (
                f" A {jnp.dtype(dtype).name} beta rounds values such as 0.999 up to 1; with "
                "optax.inject_hyperparams, pass hyperparam_dtype=jnp.float32."
            )
        raise ValueError(f"beta must be a finite number in [0, 1), got beta={beta!r}.{hint}")


def _check_nu(nu: Any) -> None:
    n = _concrete_float(nu, "nu", schedule=False)
    if n is not None and not (math.isfinite(n) and 0.0 <= n <= 1.0):
        raise ValueError(f"nu must be a finite number in [0, 1], got nu={nu!r}.")


def _check_learning_rate(learning_rate: Any) -> None:
    lr = _concrete_float(learning_rate, "learning_rate")
    if lr is not None and not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(
            f"learning_rate must be a finite number >= 0, got learning_rate={learning_rate!r}."
        )


def _check_flag(value: Any, name: str) -> None:
    # `if value` would read any object as a flag: nesterov="no" would turn Nesterov on.
    dtype = getattr(value, "dtype", None)
    numpy_bool = dtype is not None and dtype == jnp.bool_ and getattr(value, "shape", None) == ()
    if not (isinstance(value, bool) or numpy_bool):
        raise ValueError(f"{name} must be True or False, got {name}={value!r}.")
    try:
        bool(value)
    except jax.errors.ConcretizationTypeError:
        # A flag picks the form of the update; traced (under jit or vmap), it cannot.
        raise ValueError(
            f"{name} must be a concrete True or False, got {name}={value!r}: a flag cannot be "
            "traced; build one transform per value."
        ) from None


def _check_seed(seed: Any) -> None:
    # `optax.inject_hyperparams` passes every numeric argument as an array, so
    # integer arrays (concrete or traced) are accepted alongside Python ints.
    dtype = getattr(seed, "dtype", None)
    if (
        isinstance(seed, bool)
        or not (isinstance(seed, int) or (dtype is not None and jnp.issubdtype(dtype, jnp.integer)))
        or getattr(seed, "shape", ()) != ()
    ):
        raise ValueError(f"seed must be an integer, got seed={seed!r}.")
    try:
        value = int(seed)
    except jax.errors.ConcretizationTypeError:
        return
    # The seed is used as a uint32: a wider range would silently alias (2**32 to 0, -1 to 2**32-1).
    if not 0 <= value < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got seed={seed!r}.")


def _canonical_accumulator_dtype(accumulator_dtype: Any) -> jnp.dtype | None:
    if accumulator_dtype is None:
        return None
    if isinstance(accumulator_dtype, jax.Array):
        # optax.inject_hyperparams takes a dtype such as jnp.bfloat16 for a schedule (it is
        # callable) and passes the value it returns, an array of that dtype.
        accumulator_dtype = accumulator_dtype.dtype
    try:
        dtype = jnp.dtype(accumulator_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            "accumulator_dtype must be None or a floating or complex dtype, "
            f"got accumulator_dtype={accumulator_dtype!r}."
        )
    return jax.dtypes.canonicalize_dtype(dtype)


def _compute_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
    """The dtype the EMA is computed in: the inputs' common dtype, at least float32."""
    # Not cached: besides the dtypes, `result_type` reads JAX settings (x64, explicit x64 dtypes)
    # that a cache key would have to track; it costs about 14 us per leaf of an eager update.
    # Promotion here is deliberate, so it must not trip a user's strict mode. A float narrower
    # than float32 computes in float32 anyway; as float32 here, float8 (which JAX promotes
    # with nothing implicitly, not even float32) takes part too.
    dtypes = tuple(
        jnp.float32 if jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits < 32 else d
        for d in dtypes
    )
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes, jnp.float32)


def _zeros_like(param: jax.Array, dtype: jnp.dtype | None, path: Any = ()) -> jax.Array:
    """Zeros shaped, typed and *sharded* like `param`, eagerly or under `jit`.

    `jnp.zeros_like` keeps the sharding of a concrete array but not of a tracer:
    under a jitted `init` its output would be left to the compiler, which puts
    it on one device. `shard_alike` ties the output's sharding to `param`'s.
    """
    try:
        array = jnp.asarray(param)
    except TypeError:  # a function, a string, ...: e.g. an unfiltered Equinox module's field
        array = None
    if array is None or not (
        jnp.issubdtype(array.dtype, jnp.number) or jnp.issubdtype(array.dtype, jnp.bool_)
    ):
        what = f"a {array.dtype} array" if array is not None else f"a {type(param).__name__}"
        fix = (
            "for abstract params, call jax.eval_shape(tx.init, params)"
            if isinstance(param, jax.ShapeDtypeStruct)
            else "give init only the numeric arrays (None in place of the others), e.g. "
            "eqx.filter(model, eqx.is_inexact_array)"
        )
        raise ValueError(
            f"params{jax.tree_util.keystr(path)} is {what}, which cannot have a velocity: {fix}."
        )
    param = array
    if (
        dtype is not None
        and jnp.issubdtype(param.dtype, jnp.complexfloating)
        and not jnp.issubdtype(dtype, jnp.complexfloating)
    ):
        raise ValueError(
            f"accumulator_dtype={dtype} cannot hold {param.dtype} parameters without "
            "dropping their imaginary part; use a complex accumulator_dtype."
        )
    if dtype is None:
        # An EMA of integers is not an integer: an integer (or bool) leaf gets a velocity of
        # the default float dtype, as `optax.ema` computes; a float one keeps its dtype.
        inexact = jnp.issubdtype(param.dtype, jnp.inexact)
        dtype = param.dtype if inexact else jax.dtypes.canonicalize_dtype(jnp.float64)
    # Not `jnp.zeros_like`: zeros computed from `param` stay batched like it under
    # `vmap`, so with explicit mesh axes a sharded batch dimension keeps its sharding.
    zeros = jnp.where(False, param, jnp.zeros((), param.dtype)).astype(dtype)
    return shard_alike(zeros, param)[0]


def _like(hyperparameter: Any, x: jax.Array) -> Any:
    """A hyperparameter ready to combine with `x`: arrays are cast to its dtype.

    Python numbers are weakly typed and left alone. An array or NumPy scalar (e.g.
    from `optax.inject_hyperparams`, or a bfloat16 or float64 one) is cast, so that
    no arithmetic mixes dtypes (`jax.numpy_dtype_promotion("strict")` holds) and
    the compute dtype is never widened or narrowed by a hyperparameter.
    """
    # Not `isinstance(..., float)`: `np.float64` subclasses `float` but is not weakly typed.
    if isinstance(hyperparameter, (int, float)) and not hasattr(hyperparameter, "dtype"):
        return hyperparameter
    return jnp.asarray(hyperparameter).astype(jnp.result_type(x))


def _astype(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x.astype(dtype)`, skipped where `x` is a strong `dtype` array already (a no-op)."""
    # NumPy arrays have no `weak_type`: they take `astype` as before.
    if x.dtype == dtype and getattr(x, "weak_type", True) is False:
        return x
    return x.astype(dtype)


def _mix32(h: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons): a bijective uint32 hash with strong avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


@jax.jit
def _step_salt(seed: Any, count: jax.Array) -> jax.Array:
    """A uint32 naming (seed, step); `_round_leaf` mixes in the leaf.

    Jitted, like `_round_leaf`, so that an eager `update` dispatches one computation instead
    of one per operation; integer arithmetic, it gives the same bits either way.
    """
    h = _mix32(jnp.asarray(seed).astype(jnp.uint32) + jnp.uint32(0x9E3779B9))
    return _mix32(h ^ count.astype(jnp.uint32))


@jax.jit
def _round_leaf(x: jax.Array, step_salt: jax.Array, index: Any) -> jax.Array:
    """`x` stochastically rounded to bfloat16 with the bits of leaf `index` at this step."""
    salt = _mix32(step_salt ^ jnp.asarray(index).astype(jnp.uint32))
    return _stochastic_round_to_bfloat16(x, salt)


@jax.custom_jvp
def _stochastic_round_to_bfloat16(x: jax.Array, salt: jax.Array) -> jax.Array:
    """Rounds `x` to bfloat16 up or down with probability given by the remainder.

    `E[round(x)] = x`, so an EMA stored in bfloat16 stays unbiased instead of
    stalling once its increments fall below half a bfloat16 ulp. The 16 random
    bits of an element hash its position with `salt`: counter-based noise that
    fuses into the update (`jax.random.bits` made the step ~10x slower on CPU)
    and follows any sharding of `x`.
    """
    x32 = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    position = jax.lax.iota(jnp.uint32, x32.size).reshape(x32.shape)
    noise = _mix32(position ^ salt) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    result = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    # A NaN whose payload lives in the dropped bits would otherwise become inf.
    return jnp.where(jnp.isnan(x32), x32, result).astype(jnp.bfloat16)


@_stochastic_round_to_bfloat16.defjvp
def _stochastic_round_jvp(primals, tangents):
    # Differentiated like round-to-nearest (`x.astype(bfloat16)`): the bit arithmetic above
    # has a zero derivative, which would silently cut `jax.grad` through the stored velocity.
    x, salt = primals
    return _stochastic_round_to_bfloat16(x, salt), tangents[0].astype(jnp.bfloat16)


def ema_momentum(
    beta: optax.ScalarOrSchedule = 0.9,
    *,
    nesterov: bool = False,
    nu: jax.typing.ArrayLike | None = None,
    debias: bool = False,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
    rounding: Literal["nearest", "stochastic"] = "nearest",
    seed: int | jax.typing.ArrayLike = 0,
) -> optax.GradientTransformation:
    r"""Momentum as an exponential moving average of the gradients.

    At step :math:`t = 1, 2, \dots`, with gradient :math:`g_t` and :math:`v_0 = 0`:

    .. math::

      v_t &= \beta_t v_{t-1} + (1 - \beta_t) g_t, \\
      \hat v_t &= v_t / (1 - \textstyle\prod_{i \le t} \beta_i)
        \quad \text{if debias, else } v_t, \\
      u_t &= \nu \hat v_t + (1 - \nu) g_t.

    :math:`\nu = 1` by default (plain EMA momentum); ``nesterov=True`` means
    :math:`\nu = \beta_t`; an explicit ``nu`` gives quasi-hyperbolic momentum
    (Ma & Yarats, 2019). ``beta=0`` is the identity (plain SGD once scaled).

    For a constant ``beta`` and zero initialization, :math:`v_t = (1-\beta) m_t` where
    :math:`m_t` is the heavy-ball buffer of :func:`optax.trace`, so ``ema_sgd(lr, beta)``
    takes the same steps as ``optax.sgd(lr * (1 - beta), momentum=beta)``. (Under a
    ``beta`` schedule the two differ: the EMA weighs each gradient by its own
    :math:`1 - \beta_t`.)

    The stored velocity is never debiased. Debiasing divides by
    :math:`1 - \prod_i \beta_i`, kept in the state as the EMA of a constant 1,
    so it is exact when ``beta`` follows a schedule (``1 - beta_t ** t``, as in
    :func:`optax.ema`, is not) and free of cancellation when ``beta`` is near 1.
    Arithmetic runs in at least float32 whatever the storage dtype;
    the returned update has the dtype of the incoming gradient (a float one; an
    integer gradient's update is float). ``jax.grad`` flows through the stored
    velocity as through a cast, also with stochastic rounding.

    Args:
      beta: Decay of the moving average, in ``[0, 1)``, or a schedule mapping
        the step count (0 at the first update) to it.
      nesterov: Use Nesterov momentum in EMA form (``nu = beta_t``).
      nu: Quasi-hyperbolic weight in ``[0, 1]`` of the velocity against the
        raw gradient. ``nu=1`` is EMA momentum, ``nu=0`` is SGD. Exclusive with
        ``nesterov``.
      debias: Divide the velocity by ``1 - prod(beta)`` in the output (Adam-style).
      accumulator_dtype: dtype in which the velocity is stored; ``None`` keeps
        the dtype of the parameters (the default float dtype for integer
        ones). A complex dtype may hold real parameters (for a tree that mixes
        both); their updates stay real.
      rounding: How the float32 result is rounded into a ``bfloat16`` velocity:
        ``"nearest"`` (round to nearest even) or ``"stochastic"`` (unbiased; the
        EMA does not stall). Leaves stored in another dtype are not affected.
      seed: Seeds the stochastic rounding, an integer in ``[0, 2**32)``; the random
        bits are derived from it, the step count and each element's position, so
        runs are reproducible and need no key. Under ``jax.vmap`` over models,
        map ``seed`` too (e.g. ``optax.inject_hyperparams``) for independent noise:
        with one seed every member draws the same bits. ``inject_hyperparams``
        makes a Python int an int32: pass a seed of ``2**31`` or more as
        ``jnp.uint32(seed)`` (it leaves a NumPy scalar out of its hyperparameters).

    Returns:
      An :class:`optax.GradientTransformation` with state :class:`EmaMomentumState`.

    Raises:
      ValueError: for a ``beta`` or ``nu`` that is not a real scalar (a bool is
        not one) or, for ``beta``, a schedule, a concrete ``beta`` outside
        ``[0, 1)``, ``nu`` outside ``[0, 1]``, a ``nesterov`` or ``debias`` that is
        not a concrete bool, ``nesterov`` together with ``nu``, an
        ``accumulator_dtype`` that is not a floating or complex dtype, an unknown ``rounding``,
        ``rounding="stochastic"`` with an ``accumulator_dtype`` other than
        bfloat16 or ``None``, or a ``seed`` that is not an integer in
        ``[0, 2**32)``. The returned ``init`` raises it for complex parameters
        and a real ``accumulator_dtype`` and for a leaf of the params that is not a
        numeric array (a PRNG key, a function), and ``update`` for complex gradients
        into a real velocity, for a float0 gradient (pass ``None`` for a leaf
        without one) or for updates whose tree structure or shapes differ
        from the params ``init`` was given.

    Note:
      :func:`optax.inject_hyperparams` casts hyperparameters to the params' dtype
      unless given ``hyperparam_dtype``: with bfloat16 params, ``beta=0.999``
      becomes exactly 1. Eagerly, ``init`` then raises; under ``jit`` it cannot
      be checked and the velocity stops learning. With complex params they
      become complex, which ``init`` refuses (jitted or not). Pass
      ``hyperparam_dtype=jnp.float32``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import ema_momentum as emm
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), emm.ema_momentum(0.5))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> updates, state = tx.update({"w": jnp.array([0.2, -0.4])}, state)
      >>> updates["w"]
      Array([ 0.1, -0.2], dtype=float32)
      >>> updates, state = tx.update({"w": jnp.array([0.2, -0.4])}, state)
      >>> updates["w"]
      Array([ 0.15, -0.3 ], dtype=float32)

    References:
      Polyak, 1964 (heavy ball); Ma & Yarats, `Quasi-hyperbolic momentum and Adam
      for deep learning <https://arxiv.org/abs/1810.06801>`_, 2019.
    """
    _check_beta(beta)
    _check_flag(nesterov, "nesterov")
    _check_flag(debias, "debias")
    if nesterov and nu is not None:
        raise ValueError(f"nesterov=True and nu={nu!r} are exclusive: nesterov means nu=beta.")
    if nu is not None:
        _check_nu(nu)
        nu = _as_weak_float(nu)
    beta = _as_weak_float(beta)
    accumulator_dtype = _canonical_accumulator_dtype(accumulator_dtype)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got rounding={rounding!r}.")
    if rounding == "stochastic" and accumulator_dtype not in (None, jnp.dtype(jnp.bfloat16)):
        raise ValueError(
            "rounding='stochastic' is for bfloat16 velocities, got "
            f"accumulator_dtype={accumulator_dtype!r}."
        )
    _check_seed(seed)

    def init_fn(params: optax.Params) -> EmaMomentumState:
        return EmaMomentumState(
            count=jnp.zeros([], jnp.int32),
            weight_sum=jnp.zeros([], jax.dtypes.canonicalize_dtype(jnp.float64)),
            velocity=jax.tree_util.tree_map_with_path(
                lambda path, p: _zeros_like(p, accumulator_dtype, path), params
            ),
        )

    def update_fn(
        updates: optax.Updates, state: EmaMomentumState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, EmaMomentumState]:
        del params
        beta_t = beta(state.count) if callable(beta) else beta
        # The EMA of a constant 1 is 1 - prod(beta_i), the weight the velocity
        # gives the gradients. Kept as its own EMA, it is exact under a beta
        # schedule and, unlike 1 - prod, free of cancellation when beta ~ 1.
        weight_sum = optax.tree.update_moment(
            jnp.ones_like(state.weight_sum), state.weight_sum, _like(beta_t, state.weight_sum), 1
        ).astype(state.weight_sum.dtype)
        weight = beta_t if nesterov else nu

        @functools.cache
        def step_salt() -> jax.Array:
            # Once per update, not once per leaf (eagerly, each operation is dispatched).
            # A Python int seed may exceed int32, which a jitted argument is made into.
            return _step_salt(np.uint32(seed) if isinstance(seed, int) else seed, state.count)

        def leaf(index, path, g, v):
            if not jax.tree_util.all_leaves([v]):
                # `flatten_up_to` matches a leaf of the updates with any subtree of the velocity.
                raise ValueError(
                    "updates do not have the structure of the state's velocity (init was given "
                    f"params of another structure): updates{jax.tree_util.keystr(path)} are an "
                    f"array where the velocity has {jax.tree.structure(v)}."
                )
            if getattr(g, "dtype", None) == jax.dtypes.float0:
                # What jax.grad(..., allow_int=True) gives an integer leaf: no gradient at all.
                raise ValueError(
                    f"updates{jax.tree_util.keystr(path)} are float0 (the gradient of an integer "
                    "input, from jax.grad(..., allow_int=True)), which has no values to average; "
                    "pass None in its place (the leaf's velocity is then kept)."
                )
            g = g if isinstance(g, jax.Array) else jnp.asarray(g)
            if g.shape != v.shape:
                raise ValueError(
                    f"updates{jax.tree_util.keystr(path)} have shape {g.shape} but the state's "
                    f"velocity for them has shape {v.shape} (init was given other params)."
                )
            if jnp.iscomplexobj(g) and not jnp.iscomplexobj(v):
                # Storing the EMA would drop its imaginary part (JAX only warns), while this
                # step's update kept it: the imaginary part would get no momentum.
                raise ValueError(
                    f"updates{jax.tree_util.keystr(path)} are {g.dtype} but the state has a "
                    f"{v.dtype} velocity for them, which would drop their imaginary part; init "
                    "with complex params or pass a complex accumulator_dtype."
                )
            compute = _compute_dtype(g.dtype, v.dtype)
            g_c = _astype(g, compute)
            b = _like(beta_t, g_c)
            # `optax.tree.update_moment(g_c, v, b, order=1)` less its `g_c ** 1`: the same
            # bits with one operation fewer to dispatch per leaf in an eager `update`.
            v_new = (1 - b) * g_c + b * _astype(v, compute)
            if rounding == "stochastic" and v.dtype == jnp.bfloat16:
                stored = _round_leaf(v_new, step_salt(), index)
            else:
                stored = _astype(v_new, v.dtype)
            # Pins the new velocity to the old one's sharding. Left to the compiler, it
            # may pick another layout (e.g. from the gradient's), and the next jitted
            # step would then reshard or recompile.
            stored = shard_alike(stored, v)[0]
            u = v_new / _astype(weight_sum, compute) if debias else v_new
            if weight is not None:
                w = _like(weight, g_c)
                u = w * u + (1 - w) * g_c
            if jnp.iscomplexobj(u) and not jnp.iscomplexobj(g):
                u = jnp.real(u)  # a complex accumulator_dtype for real params: 0 imaginary part
            # The update has the gradient's dtype; an integer gradient's is float (as computed).
            return _astype(u, g.dtype if jnp.issubdtype(g.dtype, jnp.inexact) else u.dtype), stored

        leaves_g, treedef = jax.tree_util.tree_flatten_with_path(
            updates, is_leaf=lambda x: x is None
        )
        try:
            leaves_v = treedef.flatten_up_to(state.velocity)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "updates do not have the structure of the state's velocity (init was given "
                f"params of another structure): {e}"
            ) from None
        results = [
            (None, v) if g is None else leaf(i, path, g, v)
            for i, ((path, g), v) in enumerate(zip(leaves_g, leaves_v, strict=True))
        ]
        new_updates = treedef.unflatten([u for u, _ in results])
        velocity = treedef.unflatten([v for _, v in results])
        return new_updates, EmaMomentumState(
            count=optax.safe_increment(state.count),
            weight_sum=weight_sum,
            velocity=velocity,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def ema_sgd(
    learning_rate: optax.ScalarOrSchedule,
    beta: optax.ScalarOrSchedule = 0.9,
    *,
    nesterov: bool = False,
    nu: jax.typing.ArrayLike | None = None,
    debias: bool = False,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
    rounding: Literal["nearest", "stochastic"] = "nearest",
    seed: int | jax.typing.ArrayLike = 0,
) -> optax.GradientTransformation:
    r"""Stochastic gradient descent with EMA momentum.

    .. math::

      v_t = \beta v_{t-1} + (1 - \beta) g_t, \qquad \theta_t = \theta_{t-1} - \eta v_t.

    This is :func:`ema_momentum` chained with
    :func:`optax.scale_by_learning_rate`, except that an array learning rate (a
    float32 one from ``optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32)``,
    or a traced one) is cast to each update's dtype, as a Python float or a
    schedule's value is: bfloat16 updates stay bfloat16. It takes the same steps as heavy-ball
    momentum ``optax.sgd(eta * (1 - beta), momentum=beta)`` (and
    ``torch.optim.SGD(lr=eta * (1 - beta), momentum=beta)``): ``eta`` is the
    *effective* learning rate ``a / (1 - beta)`` of a heavy-ball learning rate
    ``a`` (Shallue et al., 2019). ``beta=0`` is plain SGD through the same code
    path.

    Args:
      learning_rate: The step size :math:`\eta` (>= 0), or a schedule.
      beta: See :func:`ema_momentum`.
      nesterov: See :func:`ema_momentum`.
      nu: See :func:`ema_momentum`.
      debias: See :func:`ema_momentum`.
      accumulator_dtype: See :func:`ema_momentum`.
      rounding: See :func:`ema_momentum`.
      seed: See :func:`ema_momentum`.

    Returns:
      An :class:`optax.GradientTransformation` whose state is the pair
      ``(EmaMomentumState, state of optax.scale_by_learning_rate)``.

    Raises:
      ValueError: for a ``learning_rate`` that is not a real scalar or a
        schedule, a concrete one that is negative or not finite, and for every
        bad input of :func:`ema_momentum`.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import ema_momentum as emm
      >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
      >>> tx = emm.ema_sgd(learning_rate=0.1, beta=0.9)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> @jax.jit
      ... def step(w, state):
      ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
      ...   return optax.apply_updates(w, updates), state
      >>> for _ in range(300):
      ...   w, state = step(w, state)
      >>> w.round(4)
      Array([3., 3., 3.], dtype=float32)
    """
    _check_learning_rate(learning_rate)
    # A NumPy scalar (np.float64 under x64) would widen optax's `lr * update` beyond the
    # params' dtype; as a Python float it is weakly typed, like a literal.
    learning_rate = _as_weak_float(learning_rate)
    return optax.chain(
        ema_momentum(
            beta,
            nesterov=nesterov,
            nu=nu,
            debias=debias,
            accumulator_dtype=accumulator_dtype,
            rounding=rounding,
            seed=seed,
        ),
        _scale_by_learning_rate(learning_rate),
    )


def _scale_by_learning_rate(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """`optax.scale_by_learning_rate`, with an array learning rate cast to each update's dtype.

    optax casts a schedule's value to each update's dtype but multiplies by a constant as it
    is: a float32 array (from `optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32)`,
    or traced) turned bfloat16 updates into float32 ones. Cast, it acts like the Python float
    it holds. The state is optax's: empty for a constant, a count for a schedule.
    """
    if callable(learning_rate):
        return optax.scale_by_learning_rate(learning_rate)
    step_size = -learning_rate

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        return jax.tree.map(lambda u: _like(step_size, u) * u, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
