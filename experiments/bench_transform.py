"""Benchmark of one optimizer step: `ema_sgd` against optax (and PyTorch when importable).

Every JAX contender is timed as the same jitted step with params and optimizer state donated and
the gradient passed in as a fixed argument::

    step(params, state, grads) -> (params - lr * update(grads, state), new_state)

on (a) one leaf of 20M float32 parameters and (b) 500 leaves of 20k. The contenders run
interleaved (in a new, seeded random order every repeat) so that drifts of the machine, and
whatever a contender leaves behind for the next one (torch's threads), hit all of them alike;
a time is the median over repeats of the mean time of `--inner` consecutive steps, a ratio (to
optax.sgd, or of bandwidths to x + y) the median over repeats of the ratio within the repeat.

Bandwidth counts the bytes a step has to move at the least: params read and written, gradient
read, state read and written (20 bytes per float32 parameter with a float32 state). The reference
is a jitted, donated ``x + y`` over the same leaves (12 bytes per element), the fastest an
elementwise pass over memory goes on this machine.

Run as ``python -m experiments bench-transform`` (or ``python -m experiments.bench_transform``,
the same command: the same CPU devices, errors and Ctrl-C). Ctrl-C stops it: one line on stderr,
exit status 130, nothing on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from experiments import cli

if __name__ == "__main__":
    # Run as a script: the CPU devices `python -m experiments` makes, set before jax is imported
    # (with jax imported first, XLA would get a single CPU device).
    cli.use_one_cpu_device_per_core()

import jax
import jax.numpy as jnp
import optax

import ema_momentum as emm

HELP = "time one optimizer step: ema_sgd vs optax.sgd(momentum), optax.ema, torch SGD"
ON_INTERRUPT = "interrupted; nothing was measured"  # printed on Ctrl-C

LEARNING_RATE = 0.01
BETA = 0.9
SHAPES: dict[str, tuple[int, int]] = {"1 x 20M": (1, 20_000_000), "500 x 20k": (500, 20_000)}
BASELINE = "optax.sgd(momentum)"


@dataclass
class Contender:
    """A prepared step: `call()` advances it once; `sync()` waits for the device."""

    name: str
    call: Callable[[], None]
    sync: Callable[[], None]
    bytes_per_step: int
    state_bytes: int | None


def _tree_nbytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _jax_contender(
    name: str, tx: optax.GradientTransformation, n_leaves: int, size: int
) -> Contender:
    params = [jnp.full((size,), 1.0, jnp.float32) for _ in range(n_leaves)]
    # Distinct values per leaf so that no leaf's work can be shared with another's.
    grads = [jnp.full((size,), 1e-3 * (i + 1), jnp.float32) for i in range(n_leaves)]
    state = tx.init(params)
    state_bytes = _tree_nbytes(state)
    velocity_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state) if leaf.ndim > 0)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    carry = [params, state]

    def call() -> None:
        carry[0], carry[1] = jitted(carry[0], carry[1], grads)

    return Contender(
        name=name,
        call=call,
        sync=lambda: jax.block_until_ready(carry),
        bytes_per_step=3 * _tree_nbytes(params) + 2 * velocity_bytes,
        state_bytes=state_bytes,
    )


def _add_contender(n_leaves: int, size: int) -> Contender:
    xs = [jnp.full((size,), 1.0, jnp.float32) for _ in range(n_leaves)]
    ys = [jnp.full((size,), 1e-3, jnp.float32) for _ in range(n_leaves)]
    jitted = jax.jit(lambda xs, ys: [x + y for x, y in zip(xs, ys, strict=True)], donate_argnums=0)
    carry = [xs]

    def call() -> None:
        carry[0] = jitted(carry[0], ys)

    return Contender(
        name="x + y (reference)",
        call=call,
        sync=lambda: jax.block_until_ready(carry),
        bytes_per_step=3 * _tree_nbytes(xs),
        state_bytes=None,
    )


def _torch_contender(n_leaves: int, size: int) -> Contender | None:
    try:
        import torch  # Optional: not a dependency of the project.
    except ImportError:
        return None
    params = [torch.full((size,), 1.0, dtype=torch.float32) for _ in range(n_leaves)]
    for i, p in enumerate(params):
        p.grad = torch.full((size,), 1e-3 * (i + 1), dtype=torch.float32)
    # Same trajectory as ema_sgd(LEARNING_RATE, BETA): heavy ball with lr * (1 - beta).
    opt = torch.optim.SGD(params, lr=LEARNING_RATE * (1 - BETA), momentum=BETA, foreach=True)

    def call() -> None:
        opt.step()

    opt.step()  # Creates the momentum buffers, so that their bytes can be counted.
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return Contender(
        name=f"torch.optim.SGD(foreach) {torch.__version__}",
        call=call,
        sync=lambda: None,  # CPU tensors: the step has finished when it returns.
        bytes_per_step=5 * sum(p.numel() * p.element_size() for p in params),
        state_bytes=state_bytes,
    )


def _contenders(n_leaves: int, size: int, with_torch: bool) -> list[Contender]:
    txs = {
        "emm.ema_sgd": emm.ema_sgd(LEARNING_RATE, BETA),
        "emm.ema_sgd bf16 nearest": emm.ema_sgd(
            LEARNING_RATE, BETA, accumulator_dtype=jnp.bfloat16
        ),
        "emm.ema_sgd bf16 stochastic": emm.ema_sgd(
            LEARNING_RATE, BETA, accumulator_dtype=jnp.bfloat16, rounding="stochastic"
        ),
        BASELINE: optax.sgd(LEARNING_RATE * (1 - BETA), momentum=BETA),
        "optax.chain(ema, scale)": optax.chain(
            optax.ema(BETA, debias=False), optax.scale_by_learning_rate(LEARNING_RATE)
        ),
    }
    contenders = [_jax_contender(name, tx, n_leaves, size) for name, tx in txs.items()]
    contenders.append(_add_contender(n_leaves, size))
    if with_torch:
        torch_contender = _torch_contender(n_leaves, size)
        if torch_contender is not None:
            contenders.append(torch_contender)
    return contenders


def _time_interleaved(contenders: list[Contender], repeats: int, inner: int) -> list[list[float]]:
    """Seconds per step, `repeats` samples per contender; they alternate within each repeat."""
    for c in contenders:  # Compile and warm up.
        for _ in range(2):
            c.call()
        c.sync()
    samples: list[list[float]] = [[] for _ in contenders]
    for r in range(repeats):
        # A fresh order every repeat (seeded): in a fixed cycle each contender always ran right
        # after the same one, and the one after torch paid for its threads still winding down
        # (emm.ema_sgd, first in the list: 1.09-1.13 of optax.sgd on one 20M leaf, 0.96 without
        # torch, where the compiled steps are the same but for two scalars).
        for i in random.Random(r).sample(range(len(contenders)), len(contenders)):
            c = contenders[i]
            start = time.perf_counter()
            for _ in range(inner):
                c.call()
            c.sync()
            samples[i].append((time.perf_counter() - start) / inner)
    return samples


def measure(repeats: int, inner: int, with_torch: bool, scale: float = 1.0) -> dict[str, Any]:
    """Runs the benchmark on both shapes; returns the machine and one row per contender.

    `scale` multiplies the size of every leaf (a smoke test runs with a tiny one).
    """
    rows = []
    for shape_name, (n_leaves, full_size) in SHAPES.items():
        size = max(1, round(full_size * scale))
        if size != full_size:
            shape_name = f"{n_leaves} x {size:,}"
        contenders = _contenders(n_leaves, size, with_torch)
        samples = _time_interleaved(contenders, repeats, inner)
        seconds = [statistics.median(s) for s in samples]
        baseline = samples[[c.name for c in contenders].index(BASELINE)]
        add = next(i for i, c in enumerate(contenders) if c.state_bytes is None)
        add_bytes, add_sample = contenders[add].bytes_per_step, samples[add]
        params_bytes = 4 * n_leaves * size
        for c, t, sample in zip(contenders, seconds, samples, strict=True):
            bandwidth = c.bytes_per_step / t
            # Ratios within a repeat: the contenders ran back to back, so load that drifts
            # over the run cancels out.
            ratio = statistics.median(x / y for x, y in zip(sample, baseline, strict=True))
            # Likewise the bandwidth relative to x + y in the same repeat.
            of_add = statistics.median(
                (c.bytes_per_step / x) / (add_bytes / a)
                for x, a in zip(sample, add_sample, strict=True)
            )
            rows.append(
                {
                    "shape": shape_name,
                    "contender": c.name,
                    "ms_per_step": 1e3 * t,
                    "ratio_to_optax_sgd": ratio,
                    "bytes_per_step": c.bytes_per_step,
                    "gb_per_s": bandwidth / 1e9,
                    "fraction_of_x_plus_y": of_add,
                    "state_bytes": c.state_bytes,
                    "state_bytes_over_params_bytes": (
                        None if c.state_bytes is None else c.state_bytes / params_bytes
                    ),
                }
            )
        del contenders
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "jax_devices": [str(d) for d in jax.devices()],
        },
        "repeats": repeats,
        "inner": inner,
        "scale": scale,
        "rows": rows,
    }


EAGER_LEAVES, EAGER_SIZE = 20, 100  # --eager: many small leaves, where dispatch dominates


def _eager_txs() -> dict[str, optax.GradientTransformation]:
    return {
        "emm.ema_sgd": emm.ema_sgd(LEARNING_RATE, BETA),
        "emm.ema_sgd bf16 stochastic": emm.ema_sgd(
            LEARNING_RATE, BETA, accumulator_dtype=jnp.bfloat16, rounding="stochastic"
        ),
        BASELINE: optax.sgd(LEARNING_RATE * (1 - BETA), momentum=BETA),
        "optax.chain(ema, scale)": optax.chain(
            optax.ema(BETA, debias=False), optax.scale_by_learning_rate(LEARNING_RATE)
        ),
    }


def measure_eager(repeats: int) -> dict[str, Any]:
    """Times ``tx.update`` called eagerly (unjitted) and jitted on 20 leaves of 100-199 floats.

    A time is the median over ``repeats`` of the best of 3 calls, the contenders interleaved
    (a seeded random order every repeat). The first call of ``update`` (after ``init``'s) is
    timed separately, each contender on leaf shapes of its own (sizes 100 + 20 k + i), so that
    it compiles every operation afresh as a user's first call does; JAX caches an eager
    operation per shape, and a shape seen before would cost nothing.
    """
    rows, calls, first = [], [], []
    named = [(f"{name} (eager)", tx, False) for name, tx in _eager_txs().items()]
    named.append(("emm.ema_sgd (jitted update)", emm.ema_sgd(LEARNING_RATE, BETA), True))
    for k, (_, tx, jitted) in enumerate(named):
        sizes = [EAGER_SIZE + EAGER_LEAVES * k + i for i in range(EAGER_LEAVES)]
        params = [jnp.ones((n,), jnp.float32) for n in sizes]
        grads = [jnp.full((n,), 1e-3, jnp.float32) for n in sizes]
        update = jax.jit(tx.update) if jitted else tx.update
        state = jax.block_until_ready(tx.init(params))  # its own first call is not timed
        start = time.perf_counter()
        jax.block_until_ready(update(grads, state, params))
        first.append(time.perf_counter() - start)

        def call(update=update, grads=grads, state=state, params=params) -> None:
            jax.block_until_ready(update(grads, state, params))

        calls.append(call)
    samples: list[list[float]] = [[] for _ in named]
    for r in range(repeats):
        for i in random.Random(r).sample(range(len(named)), len(named)):
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                calls[i]()
                best = min(best, time.perf_counter() - start)
            samples[i].append(best)
    for (name, _, _), sample, seconds in zip(named, samples, first, strict=True):
        rows.append(
            {
                "contender": name,
                "ms_per_update": 1e3 * statistics.median(sample),
                "first_call_s": seconds,
            }
        )
    return {"leaves": EAGER_LEAVES, "leaf_size": EAGER_SIZE, "repeats": repeats, "rows": rows}


def format_eager_table(result: dict[str, Any]) -> str:
    """The rows of :func:`measure_eager` as a Markdown table."""
    lines = ["| update | ms per update | first call (s) |", "|---|---:|---:|"]
    for row in result["rows"]:
        lines.append(
            f"| {row['contender']} | {row['ms_per_update']:.2f} | {row['first_call_s']:.2f} |"
        )
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| shape | contender | ms/step | vs optax.sgd | GB/s | of x+y | state bytes / params |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ratio = row["state_bytes_over_params_bytes"]
        lines.append(
            f"| {row['shape']} | {row['contender']} | {row['ms_per_step']:.2f} "
            f"| {row['ratio_to_optax_sgd']:.3f} | {row['gb_per_s']:.1f} "
            f"| {row['fraction_of_x_plus_y']:.2f} | {'-' if ratio is None else f'{ratio:.3f}'} |"
        )
    return "\n".join(lines)


DEFAULT_INNER = 3  # steps per timed repeat
DEFAULT_SCALE = 1.0  # leaf sizes as listed


def _scale(text: str) -> float:
    try:
        value = cli.finite_float(text)  # ASCII numbers only
    except argparse.ArgumentTypeError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the benchmark's options to `parser`."""
    parser.add_argument(
        "--repeats",
        metavar="N",
        type=cli.positive_int,
        default=41,
        help="timed repeats per contender (default 41)",
    )
    parser.add_argument(
        "--inner",
        metavar="N",
        type=cli.positive_int,
        default=DEFAULT_INNER,
        help=f"steps per timed repeat (default {DEFAULT_INNER})",
    )
    parser.add_argument(
        "--scale",
        metavar="X",
        type=_scale,
        default=DEFAULT_SCALE,
        help="multiply every leaf size by X in (0, 1] (default 1; e.g. 0.001 for a smoke test)",
    )
    parser.add_argument(
        "--no-torch", action="store_true", help="skip torch.optim.SGD even if torch is importable"
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help=f"instead, time tx.update called unjitted on {EAGER_LEAVES} leaves of {EAGER_SIZE} "
        "floats or a few more (each contender its own shapes, so its first call compiles "
        "afresh; median of --repeats best-of-3 calls), and its first call",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark with parsed `args`; returns the exit code."""
    if args.eager:
        # Its shapes and contenders are its own: these would be ignored without a word.
        unused = [
            option
            for option, given in (
                ("--inner", args.inner != DEFAULT_INNER),
                ("--scale", args.scale != DEFAULT_SCALE),
                ("--no-torch", args.no_torch),
            )
            if given
        ]
        if unused:
            raise cli.UsageError(f"{unused[0]} is not used with --eager")
        eager = measure_eager(args.repeats)
        print(json.dumps(eager, indent=2) if args.json else format_eager_table(eager))
        return 0
    result = measure(args.repeats, args.inner, with_torch=not args.no_torch, scale=args.scale)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        machine = result["machine"]
        print(
            f"{machine['processor']}, {machine['platform']}, jax {machine['jax']}, "
            f"optax {machine['optax']}, {len(machine['jax_devices'])} JAX device(s); "
            f"median of {result['repeats']} repeats x {result['inner']} steps; "
            f"leaf sizes x {result['scale']:g}"
        )
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(["bench-transform", *sys.argv[1:]]))
