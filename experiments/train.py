"""The training engine: whole runs compiled, vmapped over a learning-rate x seed grid, sharded.

A *group* is every run that shares (dataset, model, batch size, beta, steps, eval_every); it differs
only in learning rate and seed. :func:`run_group` trains a group as one program:

- ``jax.lax.scan`` runs ``eval_every`` optimizer steps per call (one compiled chunk, reused), and a
  compiled evaluation measures the full train and test sets between chunks;
- ``jax.vmap`` runs the lr x seed grid side by side; lr and beta are traced values, so every group
  with the same batch size and step budget reuses the same compiled program;
- the run axis is sharded over the given devices (a 1-D :class:`jax.sharding.Mesh`), padded to a
  multiple of the device count; each run's numbers do not depend on the device count.

Seed ``s`` fixes both the initialization and the data order, identically for every learning rate,
so runs that differ only in lr are paired. Each epoch is a fresh permutation of the training set
(sampling without replacement; the last partial batch is dropped), drawn on device by
:func:`experiments.shuffle.permutation` (no sort).

A run *diverges* at the first step whose mini-batch loss or gradient norm is not finite or whose
loss exceeds ``EXPLOSION_FACTOR * max(1, ln(num_classes))`` (100 times the loss of a uniform guess).
That step's update is not applied, the run's parameters stay frozen from then on, its later curve
entries are NaN, and the other runs in the vmap are unaffected. No mini-batch checks the last
update: a run whose full-train-set loss at the final evaluation fails the same test diverges at
step ``steps + 1``, the step that would have come next (that evaluation is kept, as one before a
diverging step is).

The optimizer is ``ema_sgd(lr, beta)`` unless ``run_group(..., optimizer="adam")`` asks for
``optax.adam(lr)`` (with its defaults; beta is then unused): the reference setup of the MNIST-1D
paper, used by the baselines. It is a compile-time choice, part of a group's identity. Adam's bias
correction is written as products (:func:`_scale_by_adam`), so its runs too do not depend on the
device count.

Multi-host (several processes, e.g. a TPU pod slice): call ``jax.distributed.initialize()`` in
every process first, then ``run_group(...)`` with the same arguments in every process, the same
data too (nothing checks it here; ``run_sweep`` does): the run axis is sharded over all hosts'
devices (each process supplies its devices' shards of the inputs) and every process gets the full
results (gathered with ``multihost_utils.process_allgather``). Let only process 0 write the
results store, as :func:`experiments.sweep.run_sweep` and ``sweep --distributed`` do. Tested with
two local processes of two CPU devices each, and of one and three: the same numbers as one process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import ema_momentum as emm
from experiments import shuffle
from experiments.data import Dataset, run_digest
from experiments.models import MODELS, cross_entropy, loss_fn, make_model, ordered_sum

EXPLOSION_FACTOR = 100.0
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # below it XLA may flush to zero (CPU does)
EVAL_CHUNK = 256  # examples per evaluation step; bounds memory on large datasets
MIN_RUNS_PER_DEVICE = 2
OPTIMIZERS = ("ema_sgd", "adam")
DEFAULT_OPTIMIZER = "ema_sgd"


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """The settings shared by every run of one compiled group."""

    dataset: str
    model: str
    batch_size: int
    beta: float
    steps: int
    eval_every: int
    optimizer: str = DEFAULT_OPTIMIZER
    data_digest: str | None = None  # data.run_digest: which data, where the name does not say

    def __post_init__(self) -> None:
        # A beta of -0.0 is 0.0; normalized so both name the same group and the same run ids.
        object.__setattr__(self, "beta", float(self.beta) + 0.0)

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """The steps after which the full train and test sets are evaluated."""
        points = list(range(self.eval_every, self.steps + 1, self.eval_every))
        if points[-1] != self.steps:
            points.append(self.steps)
        return tuple(points)

    def config(self) -> dict[str, Any]:
        """The fields that identify the group; ``optimizer`` only when it is not ``ema_sgd``,
        ``data_digest`` only when there is one (not a built-in dataset as loaded).

        Leaving out the defaults keeps the run and group ids of ``ema_sgd`` runs on the built-in
        datasets what they were before these fields existed, so existing results stores stay
        valid.
        """
        config = dataclasses.asdict(self)
        if config["optimizer"] == DEFAULT_OPTIMIZER:
            del config["optimizer"]
        if config["data_digest"] is None:
            del config["data_digest"]
        return config

    def run_id(self, lr: float, seed: int, target_loss: float | None) -> str:
        """A stable hash of one run's full configuration.

        ``target_loss`` is hashed as a Python float (a NumPy scalar would not go into JSON, and
        ``5`` and ``5.0`` are the same goal).
        """
        target = None if target_loss is None else float(target_loss)
        return _stable_hash({**self.config(), "lr": lr, "seed": seed, "target_loss": target})


def _stable_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The summary of one run: every field of a ``runs.jsonl`` record except the curve pointers.

    Final metrics come from the last evaluation; for a diverged run, from the last evaluation
    before it diverged (``None`` if there was none). ``steps_to_target`` is the first evaluation
    step whose full-train-set loss is ``<= target_loss`` (compared exactly, not in float32).
    ``wall_seconds`` is the group's wall time (compilation included) divided by its number of
    runs, which train side by side: the records of a group sum to the group's time.
    """

    run_id: str
    dataset: str
    model: str
    batch_size: int
    beta: float
    lr: float
    seed: int
    steps: int
    eval_every: int
    target_loss: float | None
    final_train_loss: float | None
    final_test_loss: float | None
    final_test_accuracy: float | None
    steps_to_target: int | None
    diverged: bool
    diverged_at: int | None
    wall_seconds: float
    data_digest: str | None = None  # which data, where the name does not say (data.run_digest)

    def as_record(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict; ``data_digest`` only when there is one."""
        record = dataclasses.asdict(self)
        if record["data_digest"] is None:
            del record["data_digest"]
        return record


@dataclasses.dataclass(frozen=True, eq=False)
class GroupResult:
    """Everything one group produced; rows of every ``[R, ...]`` array follow ``runs``.

    Attributes:
      spec: The group's shared settings.
      runs: One :class:`RunResult` per run, learning-rate major (``lrs x seeds``).
      batch_loss: ``[R, steps]`` mini-batch loss before each update; NaN after divergence.
      grad_norm: ``[R, steps]`` global L2 norm of each mini-batch gradient; NaN after divergence.
      eval_steps: ``[E]`` the evaluation steps.
      train_loss: ``[R, E]`` full-train-set loss; NaN at and after divergence.
      test_loss: ``[R, E]`` test-set loss; NaN at and after divergence.
      test_accuracy: ``[R, E]`` test-set accuracy; NaN at and after divergence.
      wall_seconds: Wall time of the whole group, compilation included.
    """

    spec: GroupSpec
    runs: tuple[RunResult, ...]
    batch_loss: np.ndarray
    grad_norm: np.ndarray
    eval_steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    wall_seconds: float

    @property
    def group_id(self) -> str:
        """A stable hash of the spec and the run ids: names the group's curves file."""
        return _stable_hash({**self.spec.config(), "run_ids": [r.run_id for r in self.runs]})

    def curves(self) -> dict[str, np.ndarray]:
        """The arrays of the group's ``.npz`` sidecar (see the results schema)."""
        return {
            "run_ids": np.asarray([r.run_id for r in self.runs]),
            "batch_loss": self.batch_loss,
            "grad_norm": self.grad_norm,
            "eval_steps": self.eval_steps,
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
        }


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time settings of a group's programs (hashable: a ``jit`` static argument)."""

    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int
    batch_size: int
    optimizer: str = DEFAULT_OPTIMIZER

    @property
    def threshold(self) -> float:
        return EXPLOSION_FACTOR * max(1.0, math.log(self.num_classes))


class _RunState(NamedTuple):
    params: Any
    opt_state: Any
    perm: jax.Array  # this epoch's order of the training set
    data_key: jax.Array
    lr: jax.Array
    beta: jax.Array
    diverged: jax.Array
    diverged_at: jax.Array  # 1-based step at which divergence was detected; -1 if never


def _transform(optimizer: str, lr: jax.Array, beta: jax.Array) -> optax.GradientTransformation:
    """The optimizer of one run; ``lr`` and ``beta`` may be traced (beta is unused by Adam)."""
    if optimizer == "adam":
        return optax.chain(_scale_by_adam(), optax.scale_by_learning_rate(lr))
    return emm.ema_sgd(lr, beta)


def _scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` (its defaults and state), with the bias correction as products.

    optax divides each moment by ``1 - b**t`` (each run's own number under vmap), then the one
    quotient by the other's square root plus eps. XLA's algebraic simplifier rewrote those
    divisions differently in the one-device and the several-device programs (one: a
    multiplication by the reciprocal of ``1 - b**t``; two: the two divisions merged into one by
    a product), so a run's last bits, and after thousands of steps its accuracy, depended on the
    device count. Written as multiplications by the reciprocals, the update leaves the simplifier
    neither rewrite, and both programs compute the same numbers; they equal optax.adam's within
    float32 rounding. (An optimization barrier around the bias-corrected moments did not help:
    the optimized CPU program no longer has it.)
    """

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        r1, r2 = 1 / (1 - b1**count), 1 / (1 - b2**count)
        updates = jax.tree.map(lambda m, v: (m * r1) / (jnp.sqrt(v * r2) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(optax.scale_by_adam(b1, b2, eps).init, update_fn)


@functools.cache
def _graphdef(st: _Static) -> nnx.GraphDef:
    abstract = nnx.eval_shape(lambda: make_model(st.model, st, nnx.Rngs(0)))
    return nnx.split(abstract)[0]


def _epoch_perm(data_key: jax.Array, epoch: jax.Array, n: int) -> jax.Array:
    return shuffle.permutation(jax.random.fold_in(data_key, epoch), n)


@functools.partial(jax.jit, static_argnames=("model", "input_shape", "num_classes"))
def _init_seed(
    seed: jax.Array, *, model: str, input_shape: tuple[int, ...], num_classes: int
) -> tuple[Any, jax.Array]:
    """Initial parameters and data-order key of one seed; compiled once per model and data shape."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    spec = _Static(model, input_shape, num_classes, n_train=0, batch_size=0)
    _, params = nnx.split(make_model(model, spec, nnx.Rngs(params=init_key)))
    return params, data_key


def _init_runs(
    grid: Sequence[tuple[float, int]], beta: float, st: _Static, sharding: NamedSharding
) -> _RunState:
    """The stacked state of every run, sharded along the run axis.

    Each seed is initialized once and shared by all its learning rates, so paired runs start from
    the same parameters and see the same data order.
    """
    per_seed = {
        seed: _init_seed(
            jnp.int32(seed), model=st.model, input_shape=st.input_shape, num_classes=st.num_classes
        )
        for seed in sorted({seed for _, seed in grid})
    }
    params = jax.tree.map(lambda *p: jnp.stack(p), *[per_seed[seed][0] for _, seed in grid])
    n = len(grid)
    state = _RunState(
        params=params,
        opt_state=jax.vmap(_transform(st.optimizer, 0.0, beta).init)(params),
        # Step 0 starts an epoch and draws its permutation, so this placeholder is never read.
        perm=jnp.zeros((n, st.n_train), jnp.int32),
        data_key=jnp.stack([per_seed[seed][1] for _, seed in grid]),
        lr=jnp.asarray([lr for lr, _ in grid], jnp.float32),
        beta=jnp.full(n, beta, jnp.float32),
        diverged=jnp.zeros(n, bool),
        diverged_at=jnp.full(n, -1, jnp.int32),
    )
    return _put(state, sharding)


def _step_one(
    s: _RunState, step: jax.Array, x: jax.Array, y: jax.Array, st: _Static
) -> tuple[_RunState, tuple[jax.Array, jax.Array]]:
    graphdef = _graphdef(st)
    steps_per_epoch = st.n_train // st.batch_size
    pos = step % steps_per_epoch
    # `step` is not batched, so this stays a real branch under vmap: one permutation per epoch.
    perm = jax.lax.cond(
        pos == 0,
        lambda: _epoch_perm(s.data_key, step // steps_per_epoch, st.n_train),
        lambda: s.perm,
    )
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * st.batch_size, st.batch_size)
    xb, yb = x[idx], y[idx]

    loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), xb, yb))(s.params)
    gnorm = jnp.sqrt(sum(ordered_sum(g * g) for g in jax.tree.leaves(grads)))
    bad = ~jnp.isfinite(loss) | ~jnp.isfinite(gnorm) | (loss > st.threshold)
    stop = s.diverged | bad

    tx = _transform(st.optimizer, s.lr, s.beta)
    updates, opt_state = tx.update(grads, s.opt_state, s.params)
    params = optax.apply_updates(s.params, updates)
    keep = lambda old, new: jnp.where(stop, old, new)
    new = s._replace(
        params=jax.tree.map(keep, s.params, params),
        opt_state=jax.tree.map(keep, s.opt_state, opt_state),
        perm=perm,
        diverged=stop,
        diverged_at=jnp.where(bad & ~s.diverged, step + 1, s.diverged_at),
    )
    nan = jnp.float32(jnp.nan)
    return new, (jnp.where(s.diverged, nan, loss), jnp.where(s.diverged, nan, gnorm))


@functools.partial(jax.jit, static_argnames=("st", "length"))
def _train_chunk(
    state: _RunState, step0: jax.Array, x: jax.Array, y: jax.Array, *, st: _Static, length: int
) -> tuple[_RunState, jax.Array, jax.Array]:
    step_all = jax.vmap(functools.partial(_step_one, st=st), in_axes=(0, None, None, None))

    def body(carry, _):
        state, step = carry
        state, outputs = step_all(state, step, x, y)
        return (state, step + 1), outputs

    (state, _), (losses, gnorms) = jax.lax.scan(body, (state, step0), length=length)
    return state, losses.T, gnorms.T


def _metrics_one(params: Any, x: jax.Array, y: jax.Array, w: jax.Array, st: _Static) -> jax.Array:
    """Weighted sums of the loss and of correct predictions of one run on one chunk."""
    logits = nnx.merge(_graphdef(st), params)(x)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return jnp.stack([ordered_sum(cross_entropy(logits, y) * w), ordered_sum(correct * w)])


def _dataset_metrics(params: Any, layout: tuple[jax.Array, ...], st: _Static) -> jax.Array:
    """Mean loss and accuracy of every run over a dataset laid out by :func:`_eval_layout`."""
    xs, ys, ws = layout
    n_runs = jax.tree.leaves(params)[0].shape[0]
    per_run = jax.vmap(functools.partial(_metrics_one, st=st))

    def body(total, chunk):
        # Every run gets its own copy of the chunk: with the inputs shared, XLA fuses the runs into
        # one wider matmul whose rounding depends on how many runs share a device.
        x, y, w = (jnp.broadcast_to(a, (n_runs, *a.shape)) for a in chunk)
        return total + per_run(params, x, y, w), None

    total, _ = jax.lax.scan(body, jnp.zeros((n_runs, 2), jnp.float32), (xs, ys, ws))
    return total / ordered_sum(ws)


@functools.partial(jax.jit, static_argnames="st")
def _evaluate(
    params: Any, train: tuple[jax.Array, ...], test: tuple[jax.Array, ...], *, st: _Static
) -> tuple[jax.Array, jax.Array, jax.Array]:
    train_metrics = _dataset_metrics(params, train, st)
    test_metrics = _dataset_metrics(params, test, st)
    return train_metrics[:, 0], test_metrics[:, 0], test_metrics[:, 1]


def _eval_layout(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads a dataset to whole chunks of at most EVAL_CHUNK examples; padding has weight 0."""
    n = len(y)
    chunk = min(EVAL_CHUNK, n)
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    yp = np.concatenate([y, np.zeros(pad, y.dtype)])
    wp = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (
        xp.reshape(chunks, chunk, *x.shape[1:]),
        yp.reshape(chunks, chunk),
        wp.reshape(chunks, chunk),
    )


def _validate(
    data: Dataset,
    batch_size: int,
    beta: float,
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    eval_every: int,
    target_loss: float | None,
) -> None:
    check_batch_size(data, batch_size)
    # The engine trains in float32: a beta such as 0.99999999 would become 1 (no learning), an lr
    # of 1e-50 would become 0 and one of 1e39 infinite.
    if not (math.isfinite(beta) and 0.0 <= beta < 1.0 and np.float32(beta) < 1.0):
        raise ValueError(f"beta must be in [0, 1) (also as a float32), got beta={beta!r}.")
    if not lrs or not all(positive_float32(lr) for lr in lrs):
        raise ValueError(
            f"lrs must be a non-empty list of normal float32 numbers > 0, got lrs={lrs!r}."
        )
    if not seeds or not all(is_int(s) and 0 <= s < 2**31 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints in [0, 2**31), got {seeds!r}.")
    # A repeated lr or seed would train the same run twice, under one run id.
    for name, values in (("lrs", lrs), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name} must not repeat a value, got {name}={values!r}.")
    # The engine counts steps in int32.
    if not is_int(steps) or not 1 <= steps < 2**31:
        raise ValueError(f"steps must be an int in [1, 2**31), got steps={steps!r}.")
    if not is_int(eval_every) or not 1 <= eval_every <= steps:
        raise ValueError(f"eval_every must be an int in [1, steps], got eval_every={eval_every!r}.")
    # NaN and inf fail too.
    if target_loss is not None and not (is_number(target_loss) and 0 <= target_loss <= FLOAT32_MAX):
        raise ValueError(f"target_loss must be a float32 number >= 0, got {target_loss!r}.")


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_batch_size(data: Dataset, batch_size: int) -> None:
    """Raises a ValueError unless ``batch_size`` is an int in ``[1, data.n_train]``."""
    if not is_int(batch_size) or not 1 <= batch_size <= data.n_train:
        raise ValueError(
            f"batch_size must be an int in [1, {data.n_train}] (the training set size), "
            f"got batch_size={batch_size!r}."
        )


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy one, or a 0-d NumPy or JAX array of
    one (an element of ``jnp.logspace(...)``, say); a bool, a string or None is not."""
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0:
        kind = value.dtype.kind
        return kind in "iuf" or value.dtype == jnp.bfloat16
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def listed(value: Any, name: str) -> list[Any]:
    """``value`` as a list of Python scalars (a NumPy one would not go into a run id's JSON).

    A number or a string, where a list was meant, is a ValueError.
    """
    if isinstance(value, str | bytes) or not np.iterable(value):
        raise ValueError(f"{name} must be a list, got {name}={value!r}.")
    return [v.item() if isinstance(v, np.generic) else v for v in value]


def positive_float32(value: float) -> bool:
    """Whether ``value`` is a normal float32 number > 0: not 0, inf, NaN or a denormal as one."""
    return FLOAT32_TINY <= value <= FLOAT32_MAX


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """``jax.device_put(tree, sharding)``, also when the mesh spans other processes' devices.

    ``device_put`` accepts only shardings of this process's devices. With several processes
    (multi-host), every process holds the same values, so each leaf becomes a global array built
    from the local copy: every process supplies the shards of its own devices.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(leaf: Any) -> jax.Array:
        if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            data = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def _to_host(a: jax.Array) -> np.ndarray:
    if a.is_fully_addressable:
        return np.asarray(a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def check_group(
    data: Dataset,
    model: str,
    batch_size: int,
    beta: float,
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    eval_every: int,
    *,
    target_loss: float | None = None,
    devices: Sequence[jax.Device] | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
) -> tuple[GroupSpec, _Static, list[float], list[int], float | None, list[jax.Device]]:
    """Checks :func:`run_group`'s arguments without computing anything (``run_sweep`` checks
    every group with it before it opens its results directory).

    Returns:
      The group's spec and compile-time settings, and ``lrs``, ``seeds``, ``target_loss`` and
      ``devices`` as plain Python values (``devices`` defaulting to all of ``jax.devices()``).

    Raises:
      TypeError: if ``data`` is not a :class:`experiments.data.Dataset`.
      ValueError: for any other argument out of range, naming it and its value.
    """
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be an experiments.data.Dataset, got data={data!r}.")
    # Not float() on anything: it would take the string "0.9" and fail on None with a TypeError.
    if not is_number(beta):
        raise ValueError(f"beta must be a number, got beta={beta!r}.")
    lrs = listed(lrs, "lrs")
    if not all(is_number(lr) for lr in lrs):
        raise ValueError(f"lrs must be a list of numbers, got lrs={lrs!r}.")
    beta, lrs, seeds = float(beta), [float(lr) for lr in lrs], listed(seeds, "seeds")
    _validate(data, batch_size, beta, lrs, seeds, steps, eval_every, target_loss)
    target_loss = None if target_loss is None else float(target_loss)  # a NumPy scalar: JSON-ready
    devices = listed(jax.devices() if devices is None else devices, "devices")
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(
            f"devices must be a non-empty list of jax devices, got devices={devices!r}."
        )
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got devices={devices!r}.")
    if not isinstance(model, str) or model not in MODELS:  # make_model would name it "name"
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got model={model!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got optimizer={optimizer!r}."
        )
    spec = GroupSpec(
        data.name, model, int(batch_size), beta, int(steps), int(eval_every), optimizer,
        run_digest(data),
    )  # fmt: skip
    st = _Static(
        model, data.input_shape, data.num_classes, data.n_train, int(batch_size), optimizer
    )
    _graphdef(st)  # an unknown model or an input it cannot take fails here, before any work
    return spec, st, lrs, seeds, target_loss, devices


def run_group(
    data: Dataset,
    model: str,
    batch_size: int,
    beta: float,
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    eval_every: int,
    *,
    target_loss: float | None = None,
    devices: Sequence[jax.Device] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
) -> GroupResult:
    """Trains every (lr, seed) pair of one group as a single compiled, vmapped, sharded program.

    Args:
      data: The dataset.
      model: ``"linear"``, ``"mlp"`` or ``"cnn"``.
      batch_size: Examples per step, in ``[1, data.n_train]``.
      beta: Momentum in ``[0, 1)``; ``0`` is SGD through the same code path.
      lrs: Distinct learning rates (EMA form, ``ema_sgd``), each a normal float32 number > 0.
      seeds: Distinct seeds in ``[0, 2**31)``; seed ``s`` fixes the initialization and the data
        order.
      steps: Optimizer steps per run, in ``[1, 2**31)``.
      eval_every: Evaluate the full train and test sets every this many steps (and at the end),
        in ``[1, steps]``.
      target_loss: Full-train-set loss goal for ``steps_to_target``; ``None`` for none.
      devices: Devices to shard the runs over; defaults to all of ``jax.devices()``.
      on_chunk: Called with the number of steps done after each compiled chunk finishes.
      optimizer: ``"ema_sgd"`` (``emm.ema_sgd(lr, beta)``) or ``"adam"`` (``optax.adam(lr)``
        with its default moments and epsilon, equal within float32 rounding; ``beta`` is then
        unused but still validated).

    Returns:
      The :class:`GroupResult`, runs ordered ``[(lr, seed) for lr in lrs for seed in seeds]``.

    Raises:
      TypeError: if ``data`` is not a :class:`experiments.data.Dataset` or ``on_chunk`` is not
        callable.
      ValueError: for any other argument out of range (see :func:`check_group`), before any
        work.
    """
    spec, st, lrs, seeds, target_loss, devices = check_group(
        data, model, batch_size, beta, lrs, seeds, steps, eval_every,
        target_loss=target_loss, devices=devices, optimizer=optimizer,
    )  # fmt: skip
    beta = spec.beta
    if on_chunk is not None and not callable(on_chunk):  # else a TypeError after the first chunk
        raise TypeError(f"on_chunk must be callable or None, got on_chunk={on_chunk!r}.")
    start = time.perf_counter()

    grid = [(lr, seed) for lr in lrs for seed in seeds]
    n_runs = len(grid)
    # Each device gets the same number of runs, and at least two: XLA compiles a vmap of one run
    # to different kernels, which would make a run's numbers depend on the device count. Padding
    # repeats the first run: it costs what a real run costs, and if it diverges, only as the first
    # run does (runs are isolated, and padded rows are dropped from the results).
    per_device = max(MIN_RUNS_PER_DEVICE, -(-n_runs // len(devices)))
    padded = grid + [grid[0]] * (per_device * len(devices) - n_runs)
    mesh = Mesh(np.asarray(devices), ("runs",))
    by_run = NamedSharding(mesh, PartitionSpec("runs"))
    replicated = NamedSharding(mesh, PartitionSpec())
    x, y = _put((data.x_train, data.y_train), replicated)
    train_eval = _put(_eval_layout(data.x_train, data.y_train), replicated)
    test_eval = _put(_eval_layout(data.x_test, data.y_test), replicated)

    batch_loss, grad_norm, evals = [], [], []
    # Non-partitionable threefry compiles several times faster on CPU; each run draws its own
    # numbers under vmap, so the results still do not depend on the sharding.
    with jax.threefry_partitionable(False):
        state = _init_runs(padded, beta, st, by_run)
        done = 0
        for point in spec.eval_steps:
            state, losses, gnorms = _train_chunk(
                state, jnp.int32(done), x, y, st=st, length=point - done
            )
            evals.append(_evaluate(state.params, train_eval, test_eval, st=st))
            batch_loss.append(losses)
            grad_norm.append(gnorms)
            if on_chunk is not None:
                jax.block_until_ready(losses)
                on_chunk(point - done)
            done = point

    batch_loss = np.concatenate([_to_host(a) for a in batch_loss], axis=1)[:n_runs]
    grad_norm = np.concatenate([_to_host(a) for a in grad_norm], axis=1)[:n_runs]
    train_loss, test_loss, test_acc = (
        np.stack([_to_host(e[i]) for e in evals], axis=1)[:n_runs] for i in range(3)
    )
    diverged_at = _to_host(state.diverged_at)[:n_runs]
    # The last update's result is checked by no mini-batch: the final evaluation, on the whole
    # training set, stands in for the step that would have come next.
    final = train_loss[:, -1]
    blown = (diverged_at < 0) & ~(np.isfinite(final) & (final <= st.threshold))
    diverged_at = np.where(blown, spec.steps + 1, diverged_at)
    eval_steps = np.asarray(spec.eval_steps, np.int64)
    after = (diverged_at[:, None] >= 0) & (eval_steps[None, :] >= diverged_at[:, None])
    for curve in (train_loss, test_loss, test_acc):
        curve[after] = np.nan
    wall = time.perf_counter() - start
    # In float64: NumPy compares a float32 array with a Python float in float32, which would round
    # a target just below a float32 loss up to it and call it reached.
    reached_target = (
        train_loss.astype(np.float64) <= float(target_loss)
        if target_loss is not None
        else np.zeros(train_loss.shape, bool)
    )

    runs = []
    for r, (lr, seed) in enumerate(grid):
        valid = np.flatnonzero(~after[r])
        last = valid[-1] if len(valid) else None
        reached = np.flatnonzero(reached_target[r])
        runs.append(
            RunResult(
                run_id=spec.run_id(lr, seed, target_loss),
                dataset=spec.dataset,
                model=spec.model,
                batch_size=spec.batch_size,
                beta=spec.beta,
                lr=lr,
                seed=seed,
                steps=spec.steps,
                eval_every=spec.eval_every,
                target_loss=target_loss,
                final_train_loss=None if last is None else _finite_or_none(train_loss[r, last]),
                final_test_loss=None if last is None else _finite_or_none(test_loss[r, last]),
                final_test_accuracy=None if last is None else _finite_or_none(test_acc[r, last]),
                steps_to_target=int(eval_steps[reached[0]]) if len(reached) else None,
                diverged=bool(diverged_at[r] >= 0),
                diverged_at=int(diverged_at[r]) if diverged_at[r] >= 0 else None,
                wall_seconds=wall / n_runs,
                data_digest=spec.data_digest,
            )
        )
    return GroupResult(
        spec=spec,
        runs=tuple(runs),
        batch_loss=batch_loss,
        grad_norm=grad_norm,
        eval_steps=eval_steps,
        train_loss=train_loss,
        test_loss=test_loss,
        test_accuracy=test_acc,
        wall_seconds=wall,
    )
