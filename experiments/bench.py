"""Measure training throughput: MNIST-1D MLP at batch 32, momentum 0.9, side by side.

Contenders, all the same model, optimizer (EMA momentum, beta 0.9) and per-epoch shuffling:
  naive_loop   a Python loop calling a jitted single-run step (one device)
  scan         the engine's compiled lax.scan chunk, one run (one device)
  scan_vmap    the engine's compiled lax.scan chunk, 8 runs vmapped and sharded over the devices
               (on CPU, the command line makes one device per core): all of them when 8 runs split
               evenly over them, else the most that do (2 of 3, 4 of 6, 8 of 16)
  torch_eager  a PyTorch eager loop, torch.optim.SGD(lr*(1-beta), momentum=beta), started from
               the same initial weights, on one torch thread (only if torch is importable): its
               fastest setting at batch 32 on 2 cores (with two threads we measured 880 vs 970
               steps/s on a quiet machine, and under 50 when other processes shared the cores)

Throughput is in run-steps per second (one optimizer step of one run). Everything is compiled and
warmed up first; the contenders are timed in turn, round after round, and the median round is
reported. A speed-up is the median over rounds of that round's ratio to torch eager. Also
reported: the model FLOP rate of scan_vmap at batch 1024 (the matmuls of a run-step: per layer
2 x batch x weights FLOPs for the forward product, as many for the weight gradient and for the
input gradient, except the first layer's, whose input is the data) against the float32 matmul rate
of the same devices (2048x2048 jnp.dot on each of them at once), and the FLOP rates that the timed
batch-32 throughputs of scan_vmap and torch eager amount to. When scan_vmap's batch-32 rate is
close to its batch-1024 rate, the step is bound by its matmuls, not by per-kernel overhead.

A fifth program, timed in the same rounds and reported apart (``matmuls_only``), runs nothing of
the step but its eight matmuls, for the same 8 runs on the same devices
(experiments.bench._matmul_chunk): what those products alone cost as XLA compiles them, a bound
on how fast scan_vmap could get without faster matmuls.

Ctrl-C stops it: one line on stderr, exit status 130, nothing on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import train
from experiments.data import load_dataset
from experiments.models import kernel_gradient

HELP = "measure run-steps/s: naive loop, scan, scan+vmap, torch eager"
ON_INTERRUPT = "interrupted; nothing was measured"  # printed on Ctrl-C

MODEL, BATCH, BETA, LR = "mlp", 32, 0.9, 0.1
VMAP_RUNS = 8
STEPS = 300  # per timed round and contender
ROUNDS = 5
FLOPS_BATCH, FLOPS_STEPS = 1024, 100
PEAK_SIZE = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the bench options to ``parser``."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )


def _engine_devices(devices: list[jax.Device]) -> list[jax.Device]:
    """The first devices of ``devices``, as many as the most that ``VMAP_RUNS`` splits evenly over.

    A sharded run axis must divide evenly: 8 runs over 3 (or 16) devices would fail.
    """
    n = max(d for d in range(1, min(len(devices), VMAP_RUNS) + 1) if VMAP_RUNS % d == 0)
    return devices[:n]


def _flops_per_example(params: nnx.State) -> int:
    """The matmul FLOPs of one example's forward and backward pass through the MLP.

    Each layer's forward product and kernel gradient cost 2 x n_in x n_out FLOPs per example; so
    does its input gradient, except the first layer's (its input is the data, whose gradient is not
    computed): 8 matmuls per step, not 9. ``params`` may be stacked along a leading run axis.
    """
    kernels = {
        name: math.prod(layer["layer"]["kernel"].shape[-2:])
        for name, layer in nnx.to_pure_dict(params).items()
    }
    return 2 * (3 * sum(kernels.values()) - kernels["hidden1"])


def _engine(n_runs: int, batch_size: int, devices: list[jax.Device]):
    """A warmed-up ``steps -> None`` runner of the engine's scan chunk, and its initial state."""
    data = load_dataset("mnist1d")
    st = train._Static(MODEL, data.input_shape, data.num_classes, data.n_train, batch_size)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("runs",))
    by_run = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("runs"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x, y = jax.device_put((data.x_train, data.y_train), replicated)
    state = train._init_runs([(LR, seed) for seed in range(n_runs)], BETA, st, by_run)

    def run(steps: int) -> None:
        out = train._train_chunk(state, jnp.int32(0), x, y, st=st, length=steps)
        jax.block_until_ready(out)

    return run, state, st, (x, y)


def _naive_loop(device: jax.Device) -> Callable[[int], None]:
    _, state, st, (x, y) = _engine(1, BATCH, [device])
    one = jax.tree.map(lambda a: a[0], state)
    step = jax.jit(functools.partial(train._step_one, st=st))

    def run(steps: int) -> None:
        s = one
        for t in range(steps):
            s, out = step(s, t, x, y)
        jax.block_until_ready(out)

    return run


@functools.partial(jax.jit, static_argnames=("length", "batch_size"))
def _matmul_chunk(kernels: dict, x: jax.Array, *, length: int, batch_size: int) -> dict:
    """``length`` steps of only the MLP step's eight matmuls, for every run (axis 0 of the kernels
    and of ``x``, each run's own data).

    A step multiplies each run's next batch of its ``x`` (in a fixed order) forward through the
    three kernels (no bias, ReLU or loss: the logits stand in for their own gradient), back
    through the second and third kernels, forms the three kernel gradients as the engine does
    (:func:`experiments.models.kernel_gradient`) and moves each kernel by a millionth of its
    gradient, so that every step depends on the one before and none can be skipped.
    """
    per_epoch = x.shape[1] // batch_size

    def one_run(k: dict, x: jax.Array, step: jax.Array) -> dict:
        xb = jax.lax.dynamic_slice_in_dim(x, (step % per_epoch) * batch_size, batch_size)
        h1 = xb @ k["hidden1"]
        h2 = h1 @ k["hidden2"]
        g3 = h2 @ k["out"]
        g2 = g3 @ k["out"].T
        g1 = g2 @ k["hidden2"].T
        grads = {"hidden1": (xb, g1), "hidden2": (h1, g2), "out": (h2, g3)}
        return {name: k[name] - 1e-6 * kernel_gradient(*grads[name]) for name in k}

    def body(carry, _):
        k, step = carry
        return (jax.vmap(one_run, in_axes=(0, 0, None))(k, x, step), step + 1), None

    return jax.lax.scan(body, (kernels, jnp.int32(0)), length=length)[0][0]


def _matmuls_only(state: train._RunState, x: jax.Array) -> Callable[[int], None]:
    """A ``steps -> None`` runner of :func:`_matmul_chunk` on the engine's kernels and devices."""
    params = nnx.to_pure_dict(state.params)
    kernels = {name: layer["layer"]["kernel"] for name, layer in params.items()}
    # Each run its own batches, as each of the engine's runs draws its own order: one batch for
    # all runs made the first layer's two products one matmul of every run's kernels at once.
    x = np.asarray(x).reshape(x.shape[0], -1)
    runs = len(kernels["out"])
    x = jax.device_put(
        np.stack([np.roll(x, -run * BATCH, axis=0) for run in range(runs)]),
        kernels["out"].sharding,
    )

    def run(steps: int) -> None:
        jax.block_until_ready(_matmul_chunk(kernels, x, length=steps, batch_size=BATCH))

    return run


def _torch_eager(state: train._RunState) -> Callable[[int], None] | None:
    try:
        import torch
    except ImportError:
        return None
    data = load_dataset("mnist1d")
    params = jax.tree.map(lambda a: np.asarray(a[0]), nnx.to_pure_dict(state.params))
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 100), torch.nn.ReLU(),
        torch.nn.Linear(100, 100), torch.nn.ReLU(),
        torch.nn.Linear(100, 10),
    )  # fmt: skip
    with torch.no_grad():
        for layer, name in zip(model[::2], ("hidden1", "hidden2", "out"), strict=True):
            layer.weight.copy_(torch.from_numpy(params[name]["layer"]["kernel"].T.copy()))
            layer.bias.copy_(torch.from_numpy(params[name]["bias"].copy()))
    opt = torch.optim.SGD(model.parameters(), lr=LR * (1 - BETA), momentum=BETA)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train).long()
    generator = torch.Generator().manual_seed(0)
    per_epoch = data.n_train // BATCH

    torch.set_num_threads(1)

    def run(steps: int) -> None:
        for t in range(steps):
            if t % per_epoch == 0:
                perm = torch.randperm(data.n_train, generator=generator)
            idx = perm[(t % per_epoch) * BATCH : (t % per_epoch + 1) * BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    return run


def _seconds(fn: Callable[[int], None], steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return time.perf_counter() - start


def _matmul_gflops(devices: list[jax.Device]) -> float:
    """The float32 matmul rate of all devices together, each multiplying its own matrices."""
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), ("d",)), jax.sharding.PartitionSpec("d")
    )
    a = jax.device_put(jnp.ones((len(devices), PEAK_SIZE, PEAK_SIZE), jnp.float32), sharding)
    dot = jax.jit(jax.vmap(jnp.dot))
    dot(a, a).block_until_ready()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return len(devices) * 2 * PEAK_SIZE**3 / statistics.median(times) / 1e9


def measure() -> dict:
    """Runs the benchmark; returns the JSON-ready results."""
    devices = _engine_devices(jax.devices())
    with jax.threefry_partitionable(False):
        scan_vmap, state, _, data = _engine(VMAP_RUNS, BATCH, devices)
        contenders = {
            "naive_loop": (_naive_loop(devices[0]), 1),
            "scan": (_engine(1, BATCH, devices[:1])[0], 1),
            "scan_vmap": (scan_vmap, VMAP_RUNS),
            "matmuls_only": (_matmuls_only(state, data[0]), VMAP_RUNS),
            "torch_eager": (_torch_eager(state), 1),
        }
        big, big_state, _, _ = _engine(VMAP_RUNS, FLOPS_BATCH, devices)
        for fn, _ in contenders.values():  # compile and warm up
            if fn is not None:
                fn(STEPS)
        big(FLOPS_STEPS)

        times: dict[str, list[float]] = {name: [] for name in contenders}
        big_times = []
        for _ in range(ROUNDS):
            for name, (fn, _) in contenders.items():
                if fn is not None:
                    times[name].append(_seconds(fn, STEPS))
            big_times.append(_seconds(big, FLOPS_STEPS))

    rates = {
        name: None if not times[name] else runs * STEPS / statistics.median(times[name])
        for name, (_, runs) in contenders.items()
    }
    flops_per_example = _flops_per_example(big_state.params)
    flops_per_run_step = flops_per_example * FLOPS_BATCH
    achieved = flops_per_run_step * VMAP_RUNS * FLOPS_STEPS / statistics.median(big_times)
    peak = _matmul_gflops(devices)
    speedups = round_speedups = None
    if times["torch_eager"]:
        # The median over rounds of each round's ratio: both sides of a ratio were timed seconds
        # apart, so a slow stretch of a shared machine cancels out instead of skewing one side.
        round_speedups = {
            name: [
                runs * t_torch / t
                for t, t_torch in zip(times[name], times["torch_eager"], strict=True)
            ]
            for name, (_, runs) in contenders.items()
        }
        speedups = {name: statistics.median(r) for name, r in round_speedups.items()}
    matmuls_only = {
        "run_steps_per_s": rates.pop("matmuls_only"),
        "speedup_vs_torch_eager": None if speedups is None else speedups.pop("matmuls_only"),
        "speedup_vs_torch_eager_per_round": (
            None if round_speedups is None else round_speedups.pop("matmuls_only")
        ),
    }
    return {
        "run_steps_per_s": rates,
        "speedup_vs_torch_eager": speedups,
        "speedup_vs_torch_eager_per_round": round_speedups,
        "matmuls_only": matmuls_only,
        "gflops": {
            "scan_vmap_batch_1024": achieved / 1e9,
            "matmul_peak": peak,
            "fraction_of_peak": achieved / 1e9 / peak,
            "flops_per_run_step": flops_per_run_step,
            **{
                f"{name}_batch_{BATCH}": (
                    None if rates[name] is None else rates[name] * flops_per_example * BATCH / 1e9
                )
                for name in ("scan_vmap", "torch_eager")
            },
        },
        "config": {
            "model": MODEL,
            "dataset": "mnist1d",
            "batch_size": BATCH,
            "beta": BETA,
            "lr": LR,
            "vmap_runs": VMAP_RUNS,
            "steps_per_round": STEPS,
            "rounds": ROUNDS,
            "devices": [str(d) for d in devices],
        },
    }


def table(results: dict) -> str:
    """The results as a markdown table."""
    speedups = results["speedup_vs_torch_eager"]
    per_round = results.get("speedup_vs_torch_eager_per_round")
    lines = [
        "| contender | run-steps/s | vs torch eager | rounds: lowest-highest |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in results["run_steps_per_s"].items():
        shown = "n/a (torch not installed)" if rate is None else f"{rate:,.0f}"
        ratio = spread = "n/a"
        if speedups is not None and rate is not None:
            ratio = f"{speedups[name]:.1f}x"
            spread = f"{min(per_round[name]):.1f}-{max(per_round[name]):.1f}x"
        lines.append(f"| {name} | {shown} | {ratio} | {spread} |")
    g = results["gflops"]
    lines.append("")
    lines.append(
        f"scan_vmap at batch {FLOPS_BATCH}: {g['scan_vmap_batch_1024']:.1f} GFLOP/s = "
        f"{100 * g['fraction_of_peak']:.0f}% of the measured float32 matmul rate "
        f"({g['matmul_peak']:.1f} GFLOP/s)."
    )
    at_batch = [
        f"{name} {g[key]:.1f}"
        for name in ("scan_vmap", "torch_eager")
        if g.get(key := f"{name}_batch_{BATCH}") is not None
    ]
    if at_batch:
        lines.append(f"Model FLOP rate at batch {BATCH}, in GFLOP/s: {', '.join(at_batch)}.")
    if (alone := results.get("matmuls_only")) is not None:
        line = (
            f"The step's 8 matmuls alone ({VMAP_RUNS} runs on the same devices, nothing else of "
            f"the step): {alone['run_steps_per_s']:,.0f} run-steps/s"
        )
        if alone["speedup_vs_torch_eager"] is not None:
            per_round = alone["speedup_vs_torch_eager_per_round"]
            line += (
                f", {alone['speedup_vs_torch_eager']:.1f}x torch eager "
                f"(rounds {min(per_round):.1f}-{max(per_round):.1f}x)"
            )
        lines.append(line + ".")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints a table, or one JSON object with ``--json``."""
    results = measure()
    print(json.dumps(results) if args.json else table(results))
    return 0
