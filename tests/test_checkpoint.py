"""Orbax checkpoints: save mid-training, restore from shapes alone, continue bit-identically."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ema_momentum as emm

ocp = pytest.importorskip("orbax.checkpoint")

STEPS_BEFORE, STEPS_AFTER = 7, 8

OPTIMIZERS = {
    "chain_clip_decay_schedule": lambda: optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.add_decayed_weights(1e-3),
        emm.ema_sgd(optax.cosine_decay_schedule(0.3, 20), beta=0.9),
    ),
    "debias_nesterov": lambda: emm.ema_sgd(0.2, beta=0.95, debias=True, nesterov=True),
    "beta_schedule_debias": lambda: emm.ema_sgd(
        0.2, beta=optax.linear_schedule(0.5, 0.95, 10), debias=True
    ),
    # The rounding noise depends on the step count: a restored count continues the stream.
    "bf16_stochastic": lambda: emm.ema_sgd(
        0.2, beta=0.9, accumulator_dtype=jnp.bfloat16, rounding="stochastic", seed=7
    ),
}


def init_params() -> dict[str, jax.Array]:
    return {
        "w": jax.random.normal(jax.random.key(1), (6, 4)),
        "b": jnp.zeros((4,)),
        "s": jnp.ones(()),
    }


def loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) * params["s"] - y) ** 2)


def make_step(tx):
    x = jax.random.normal(jax.random.key(2), (32, 6))
    y = jnp.cos(x[:, :4])

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def run(step, params, opt_state, steps):
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params, opt_state


def abstract_like(tree, sharding):
    """What a fresh process knows: shapes and dtypes (from `jax.eval_shape`), a sharding."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def assert_bit_identical(got, want):
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        # Compare bits, not values: NaN-safe, and -0.0 differs from 0.0.
        np.testing.assert_array_equal(
            np.asarray(g).reshape(-1).view(np.uint8), np.asarray(w).reshape(-1).view(np.uint8)
        )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_restore_and_continue_is_bit_identical(tmp_path, name):
    tx = OPTIMIZERS[name]()
    step = make_step(tx)
    params = init_params()
    want = run(step, params, tx.init(params), STEPS_BEFORE + STEPS_AFTER)

    midway = run(step, params, tx.init(params), STEPS_BEFORE)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": midway[0], "opt_state": midway[1]})
        checkpointer.wait_until_finished()
    del midway

    # A fresh process: the optimizer rebuilt from its config, the target from shapes only.
    tx = OPTIMIZERS[name]()
    shapes = jax.eval_shape(
        lambda: (lambda p: {"params": p, "opt_state": tx.init(p)})(init_params())
    )
    target = abstract_like(shapes, SingleDeviceSharding(jax.devices()[0]))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    (ema_state,) = [
        leaf
        for leaf in jax.tree.leaves(
            restored["opt_state"], is_leaf=lambda x: isinstance(x, emm.EmaMomentumState)
        )
        if isinstance(leaf, emm.EmaMomentumState)
    ]
    assert int(ema_state.count) == STEPS_BEFORE

    got = run(make_step(tx), restored["params"], restored["opt_state"], STEPS_AFTER)
    assert_bit_identical(got, want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices from the root conftest")
def test_sharded_state_restores_into_its_sharding(tmp_path):
    """FSDP-style: the velocity is saved from, and restored into, shards on 8 devices."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("d"))
    params = jax.device_put({"w": jnp.linspace(-1.0, 1.0, 64).reshape(16, 4)}, sharding)
    grads = jax.device_put({"w": jnp.full((16, 4), 0.5)}, sharding)
    tx = emm.ema_sgd(0.1, beta=0.9, debias=True)
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(params)
    for _ in range(3):
        _, state = update(grads, state, params)

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", state)
        checkpointer.wait_until_finished()
        shapes = jax.eval_shape(tx.init, params)
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(
                s.shape, s.dtype, sharding=sharding if s.ndim else NamedSharding(mesh, P())
            ),
            shapes,
        )
        restored = checkpointer.restore(tmp_path / "ckpt", target)

    velocity = optax.tree.get(restored, "velocity")["w"]
    assert velocity.sharding.is_equivalent_to(sharding, 2)
    assert {s.data.shape for s in velocity.addressable_shards} == {(2, 4)}
    assert_bit_identical(jax.device_get(restored), jax.device_get(state))
    assert_bit_identical(update(grads, restored, params), update(grads, state, params))
