"""Many devices: the velocity follows the parameters' sharding; DP and FSDP training.

The root conftest gives every test process 8 simulated CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import ema_momentum as emm

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS from the root conftest"
)

MESHES = {
    "1d": ((8,), ("d",)),
    "2d": ((4, 2), ("data", "model")),
}


def mesh_of(name: str, axis_type: AxisType = AxisType.Auto) -> jax.sharding.Mesh:
    shape, names = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def sharded_params(mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Leaves sharded every way a mesh allows: split, split over two axes, replicated, scalar."""
    first, last = mesh.axis_names[0], mesh.axis_names[-1]
    specs = {
        "split_rows": P(first),
        "split_cols": P(None, last),
        "split_both": P(first, last) if first != last else P(None, first),
        "flattened_axes": P(tuple(mesh.axis_names)),
        "replicated": P(),
        "scalar": P(),
    }
    shapes = {
        "split_rows": (16, 6),
        "split_cols": (4, 16),
        "split_both": (8, 16),
        "flattened_axes": (24,),
        "replicated": (5,),
        "scalar": (),
    }
    return {
        name: jax.device_put(
            jnp.linspace(-1.0, 1.0, int(np.prod(shapes[name]))).reshape(shapes[name]),
            NamedSharding(mesh, specs[name]),
        )
        for name in specs
    }


def velocity_of(state) -> dict[str, jax.Array]:
    return optax.tree.get(state, "velocity")


def assert_same_sharding(tree, like):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), ref in zip(leaves, jax.tree.leaves(like), strict=True):
        assert leaf.sharding.is_equivalent_to(ref.sharding, ref.ndim), (
            f"{jax.tree_util.keystr(path)}: {leaf.sharding} is not {ref.sharding}"
        )
        # Each device holds only its shard: the state does not multiply memory.
        assert [s.data.shape for s in leaf.addressable_shards] == [
            s.data.shape for s in ref.addressable_shards
        ]


FLOAT32 = {"accumulator_dtype": None}
BF16_STOCHASTIC = {"accumulator_dtype": jnp.bfloat16, "rounding": "stochastic"}


@pytest.mark.parametrize(
    "mesh_name, axis_type, jit_init, options",
    [
        ("1d", AxisType.Auto, False, FLOAT32),
        ("1d", AxisType.Auto, True, FLOAT32),
        ("2d", AxisType.Auto, False, FLOAT32),
        ("2d", AxisType.Auto, True, FLOAT32),
        ("2d", AxisType.Auto, True, BF16_STOCHASTIC),
        ("1d", AxisType.Explicit, False, BF16_STOCHASTIC),
        ("2d", AxisType.Explicit, True, FLOAT32),
    ],
    ids=[
        "1d-auto-eager-f32",
        "1d-auto-jit-f32",
        "2d-auto-eager-f32",
        "2d-auto-jit-f32",
        "2d-auto-jit-bf16sr",
        "1d-explicit-eager-bf16sr",
        "2d-explicit-jit-f32",
    ],
)
def test_velocity_has_the_sharding_of_the_params(mesh_name, axis_type, jit_init, options):
    mesh = mesh_of(mesh_name, axis_type)
    params = sharded_params(mesh)
    tx = emm.ema_sgd(0.1, 0.9, **options)
    state = (jax.jit(tx.init) if jit_init else tx.init)(params)
    assert_same_sharding(velocity_of(state), params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(params, state, params)
        return optax.apply_updates(params, updates), state

    new_params, state = step(params, state)
    assert_same_sharding(velocity_of(state), params)
    assert_same_sharding(new_params, params)


@pytest.mark.parametrize("grad_spec", [P(), P(None, "model"), P("model", "data")])
def test_update_keeps_the_velocity_sharding_whatever_the_gradient_sharding(grad_spec):
    """Left to the compiler, the new velocity would follow the gradient's layout."""
    mesh = mesh_of("2d")
    params = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data")))
    grads = jax.device_put(jnp.full((8, 8), 0.5), NamedSharding(mesh, grad_spec))
    tx = emm.ema_momentum(0.9)
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(params)
    for _ in range(2):
        _, state = update(grads, state)
        assert_same_sharding(state.velocity, params)
    np.testing.assert_allclose(state.velocity, 0.5 * (1 - 0.9**2), rtol=1e-6)


def test_optax_trace_jitted_init_does_not_keep_the_sharding():
    """The contrast that motivates `shard_alike`, as of this jax/optax version.

    optax.sgd(momentum)'s jitted init builds its trace with `jnp.zeros_like` on tracers,
    so the compiler places it on a single device (under FSDP: device-count times the
    memory). If a future optax keeps the sharding, this test flags that the README's
    comparison is stale.
    """
    mesh = mesh_of("1d")
    params = sharded_params(mesh)
    trace = optax.tree.get(jax.jit(optax.sgd(0.1, momentum=0.9).init)(params), "trace")
    assert not trace["split_rows"].sharding.is_equivalent_to(params["split_rows"].sharding, 2)
    assert len(trace["split_rows"].sharding.device_set) == 1
    # Eagerly, zeros_like on concrete arrays keeps it, for optax as for ema_sgd.
    trace = optax.tree.get(optax.sgd(0.1, momentum=0.9).init(params), "trace")
    assert trace["split_rows"].sharding.is_equivalent_to(params["split_rows"].sharding, 2)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_vmap_over_a_sharded_batch_of_models(axis_type):
    """A batch of models (leading axis sharded) initialized under vmap keeps the sharding."""
    mesh = mesh_of("2d", axis_type)
    batch = jax.device_put(
        jnp.linspace(-1.0, 1.0, 8 * 6).reshape(8, 6), NamedSharding(mesh, P("data", "model"))
    )
    tx = emm.ema_momentum(0.9, accumulator_dtype=jnp.bfloat16, rounding="stochastic")
    with jax.set_mesh(mesh):
        for init in (jax.vmap(tx.init), jax.jit(jax.vmap(tx.init))):
            state = init(batch)
            assert state.velocity.shape == (8, 6)
            assert state.count.shape == (8,)
            assert_same_sharding(state.velocity, batch)


def test_explicit_axes_vmap_update_needs_the_count_sharded_like_the_batch():
    """The README's known limit, as of this jax version.

    Under explicit mesh axes an eager vmap(init) shards the per-model count like the batch and
    vmap(update) works; a jitted vmap(init) leaves the count unsharded and vmap(update) refuses
    that state. If a future jax accepts it, this test flags that the README is stale.
    """
    mesh = mesh_of("1d", AxisType.Explicit)
    batch = jax.device_put(
        jnp.linspace(-1.0, 1.0, 8 * 6).reshape(8, 6), NamedSharding(mesh, P("d"))
    )
    tx = emm.ema_momentum(0.5)
    with jax.set_mesh(mesh):
        state = jax.vmap(tx.init)(batch)
        assert state.count.sharding.spec == P("d")
        updates, _ = jax.jit(jax.vmap(tx.update))(batch, state)
        np.testing.assert_allclose(updates, 0.5 * np.asarray(batch), rtol=1e-6)

        state = jax.jit(jax.vmap(tx.init))(batch)
        assert state.count.sharding.spec != P("d")
        for update in (jax.vmap(tx.update), jax.jit(jax.vmap(tx.update))):
            with pytest.raises(ValueError, match="should be sharded the same"):
                update(batch, state)


def test_vmap_update_matches_per_model_updates():
    mesh = mesh_of("1d")
    grads = jax.device_put(
        jax.random.normal(jax.random.key(0), (8, 5)), NamedSharding(mesh, P("d"))
    )
    tx = emm.ema_momentum(0.8, debias=True)
    state = jax.jit(jax.vmap(tx.init))(grads)
    assert_same_sharding(state.velocity, grads)
    updates, state = jax.jit(jax.vmap(tx.update))(grads, state)
    updates, state = jax.jit(jax.vmap(tx.update))(2 * grads, state)
    assert_same_sharding(state.velocity, grads)
    for i in range(8):
        one = tx.init(grads[i])
        want, one = tx.update(grads[i], one)
        want, one = tx.update(2 * grads[i], one)
        np.testing.assert_allclose(updates[i], want, rtol=1e-6)
        np.testing.assert_allclose(state.velocity[i], one.velocity, rtol=1e-6)


def test_grad_over_beta_with_sharded_params():
    """`shard_alike` in init and update is differentiable (here, through a traced beta)."""
    mesh = mesh_of("2d")
    grads = jax.device_put(jnp.full((8, 4), 2.0), NamedSharding(mesh, P("data", "model")))

    def second_update_sum(beta):
        tx = emm.ema_momentum(beta)
        state = tx.init(grads)
        _, state = tx.update(grads, state)
        updates, _ = tx.update(grads, state)
        return jnp.sum(updates)

    # Two steps of a constant gradient 2: v = 2 (1 - beta^2), so d/dbeta = -4 beta per entry.
    np.testing.assert_allclose(jax.jit(jax.grad(second_update_sum))(0.5), 32 * -4 * 0.5)


@pytest.mark.parametrize("params", [np.ones((4, 3), np.float32), 1.5, jnp.float32(2.0)])
def test_init_accepts_numpy_arrays_and_python_scalars(params):
    tx = emm.ema_sgd(0.1, 0.9)
    for init in (tx.init, jax.jit(tx.init)):
        state = init(params)
        velocity = velocity_of(state)
        assert velocity.shape == np.shape(params)
        assert velocity.dtype == jnp.float32
        np.testing.assert_array_equal(velocity, 0.0)
        updates, _ = jax.jit(tx.update)(params, state)
        np.testing.assert_allclose(updates, -0.1 * 0.1 * np.asarray(params), rtol=1e-6)


def mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def mlp_problem():
    kx, k1, k2 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 16))
    y = jnp.sin(x[:, :4].sum(axis=1, keepdims=True))
    params = {
        "w1": jax.random.normal(k1, (16, 32)) / 4,
        "b1": jnp.zeros((32,)),
        "w2": jax.random.normal(k2, (32, 8)) / 6,
        "b2": jnp.zeros((8,)),
    }
    return params, x, jnp.tile(y, (1, 8))


def train(params, x, y, steps=30):
    """`steps` jitted steps of ema_sgd (debiased, clipped); returns params, state, loss."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), emm.ema_sgd(0.3, 0.9, debias=True))

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = jax.jit(tx.init)(params)
    for _ in range(steps):
        params, state, loss = step(params, state)
    return params, state, loss


def on_one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def test_data_parallel_training_matches_one_device():
    params, x, y = mlp_problem()
    want, _, want_loss = train(*on_one_device((params, x, y)))

    mesh = mesh_of("1d")
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))
    got, state, loss = train(
        jax.device_put(params, replicated), jax.device_put(x, batch), jax.device_put(y, batch)
    )
    assert_same_sharding(got, jax.device_put(params, replicated))
    assert_same_sharding(velocity_of(state), jax.device_put(params, replicated))
    assert float(loss) < 0.5 * float(mlp_loss(params, x, y))
    # The gradient's mean over the batch is summed per device and then across devices,
    # a different float32 reduction order than on one device: equal up to rounding.
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_fsdp_sharded_params_train_like_one_device(mesh_name):
    params, x, y = mlp_problem()
    want, _, _ = train(*on_one_device((params, x, y)))

    mesh = mesh_of(mesh_name)
    # ZeRO-3 style: every parameter split over all devices along its longest axis.
    every = tuple(mesh.axis_names)
    specs = {"w1": P(None, every), "b1": P(every), "w2": P(every), "b2": P(every)}
    shardings = {name: NamedSharding(mesh, spec) for name, spec in specs.items()}
    sharded = jax.device_put(params, shardings)
    batch = NamedSharding(mesh, P(every))
    got, state, loss = train(sharded, jax.device_put(x, batch), jax.device_put(y, batch))

    assert_same_sharding(velocity_of(state), sharded)
    assert float(loss) < 0.5 * float(mlp_loss(params, x, y))
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)


def test_stochastic_rounding_in_shard_map_needs_a_seed_per_shard():
    # Inside shard_map each shard sees only its local positions: with one seed every shard
    # draws the same rounding bits; folding the shard index into the seed (as the README says)
    # gives each its own.
    mesh = mesh_of("1d")
    grads = jnp.full((16, 64), 1 / 3, jnp.bfloat16)

    def velocity(g, per_shard):
        seed = 7 + jax.lax.axis_index("d") if per_shard else 7
        tx = emm.ema_momentum(
            0.99, accumulator_dtype=jnp.bfloat16, rounding="stochastic", seed=seed
        )
        _, state = tx.update(g, tx.init(g), g)
        return state.velocity

    for per_shard in (False, True):
        mapped = jax.shard_map(
            lambda g, per_shard=per_shard: velocity(g, per_shard),
            mesh=mesh, in_specs=P("d"), out_specs=P("d"),
        )  # fmt: skip
        shards = np.asarray(jax.jit(mapped)(grads).astype(jnp.float32)).reshape(8, 2, 64)
        same = [np.array_equal(shards[0], shards[i]) for i in range(1, 8)]
        assert all(same) if not per_shard else not any(same)


def test_sharded_updates_are_bitwise_those_of_one_device_and_gather_nothing():
    """The update is elementwise: sharded, jitted with in/out shardings and donation, it computes
    the very bits of one device (the stochastic rounding's noise too: it hashes each element's
    global position), and the compiled step moves no data between devices."""
    mesh = mesh_of("2d")
    params = sharded_params(mesh)
    one = on_one_device(jax.tree.map(np.asarray, params))
    tx = emm.ema_sgd(0.1, 0.9, debias=True, **BF16_STOCHASTIC)

    def step(params, state, t):
        grads = jax.tree.map(lambda p: jnp.sin(p * t), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    shardings = jax.tree.map(lambda x: x.sharding, (params, state))
    replicated = NamedSharding(mesh, P())
    sharded_step = jax.jit(
        step,
        in_shardings=(*shardings, replicated),
        out_shardings=shardings,
        donate_argnums=(0, 1),
    )
    sharded_step = sharded_step.lower(params, state, 1.0).compile()
    for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert collective not in sharded_step.as_text()
    one_state, one_step = tx.init(one), jax.jit(step)
    for t in (1.0, 2.0):
        params, state = sharded_step(params, state, t)
        one, one_state = one_step(one, one_state, t)
    assert_same_sharding(velocity_of(state), sharded_params(mesh))
    got_leaves, want_leaves = jax.tree.leaves((params, state)), jax.tree.leaves((one, one_state))
    for got, want in zip(got_leaves, want_leaves, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(
            np.asarray(got).reshape(-1).view(np.uint8), np.asarray(want).reshape(-1).view(np.uint8)
        )
