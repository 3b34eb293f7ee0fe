"""The command line: ``python -m experiments <command> ...``; ``--help`` works everywhere.

Adding a command is one line in :data:`COMMANDS`: a module with a one-line ``HELP`` string,
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Bad input is reported by
raising :class:`UsageError` (or through ``parser.error``): the user sees exactly one line
``error: ...`` on stderr and the exit status is 2. On Ctrl-C the user sees the module's
``ON_INTERRUPT`` line (what was kept), else "interrupted", and the exit status is 130.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import importlib
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

COMMANDS: list[tuple[str, str]] = [
    ("sweep", "experiments.sweep"),
    ("bench", "experiments.bench"),
    ("bench-transform", "experiments.bench_transform"),
    ("report", "experiments.report"),
    ("quadratic", "experiments.quadratic"),
    ("nqm", "experiments.nqm"),
    ("baselines", "experiments.baselines"),
]
MAIN_JOB = "experiments.study"  # runs when no command is given
MAIN_JOB_OPTION = "main_job_"  # the prefix of the main job's options in the parsed arguments

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UsageError(Exception):
    """Bad input from the user; reported as one ``error: ...`` line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr, without the usage text.

    They are raised as :class:`UsageError`; :func:`main` writes the line and exits with status 2.
    Options are taken only as spelled in full: argparse would take a prefix of one (``sweep
    --seed 3``, quadratic's first seed, ran ``--seeds 3``: seeds 0, 1 and 2).
    """

    def __init__(self, *args: Any, allow_abbrev: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


INT_LIMIT = 2**31  # every count and index here is an int32 (steps, seeds, batch sizes, ...)


def _int_at_least(text: str, low: int, limit: int | None = INT_LIMIT) -> int:
    # Plain ASCII digits only: int() would also take "4_0" (as 40), "+4" and other scripts' digits.
    digits = text.strip()
    if not re.fullmatch(r"[0-9]+", digits):
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    try:
        value: int | float = int(digits)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits()): huge
        value = math.inf
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    if limit is not None and value >= limit:
        power = limit.bit_length() - 1
        shown = f"2**{power}" if limit == 2**power else f"{limit:_}"
        raise argparse.ArgumentTypeError(f"must be an integer < {shown}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite decimal number; ``-0`` is ``0`` (one value, one run id)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and not math.isfinite(value):  # nan, inf, 1e999
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    # ASCII decimals only, as for integers: float() also takes "0.0_1" (as 0.01), "+1" and other
    # scripts' digits.
    if value is None or not re.fullmatch(
        r"\s*-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text, flags=re.ASCII
    ):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    return value + 0.0


def positive_int_list(text: str, limit: int | None = INT_LIMIT) -> list[int]:
    """An argparse ``type``: comma-separated integers >= 1 (and < ``limit``)."""
    return [_int_at_least(part.strip(), 1, limit) for part in text.split(",")]


MAX_SEEDS = 10_000  # --seeds N: enough for any study here; 2**31 - 1 would fill memory with seeds


def seed_count(text: str) -> int:
    """An argparse ``type``: a number of seeds, an integer in ``[1, MAX_SEEDS]``."""
    return int_in(1, MAX_SEEDS)(text)


def user_path(text: str) -> str:
    """An argparse ``type``: a path to read, a leading ``~`` being the home directory (as
    :func:`output_dir` treats ``--out``; a shell leaves ``--data-dir=~/x`` as it is)."""
    return os.path.expanduser(text)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        value = _int_at_least(text, low, limit=None)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be an integer <= {high:_}, got {text!r}")
        return value

    return parse


def finite_float_list(text: str) -> list[float]:
    """An argparse ``type``: comma-separated finite numbers."""
    return [finite_float(part.strip()) for part in text.split(",")]


def exact_text(x: float) -> str:
    """``x`` as ``:g`` writes it where that is ``x`` exactly (``0``, ``0.9``), else as ``repr``
    (``:g`` would write a beta of 0.9999999 as ``1``, and two lrs 0.1234 and 0.1236 alike)."""
    text = f"{x:g}"
    return text if float(text) == x else repr(float(x))


def check_unique(name: str, values: Sequence[object]) -> None:
    """Raises :class:`UsageError` if ``values`` (given as option ``name``) repeat one."""
    if len(set(values)) != len(values):
        raise UsageError(f"{name} has duplicates: {','.join(map(str, values))}")


def check_betas(values: Sequence[float]) -> None:
    """Raises :class:`UsageError` unless every value of ``--betas`` is in [0, 1)."""
    bad = [beta for beta in values if not 0.0 <= beta < 1.0]
    if bad:
        raise UsageError(f"--betas must be in [0, 1), got {bad[0]}")


def check_one_process(command: str, instead: str = "") -> None:
    """Raises :class:`UsageError` in a multi-process JAX job, for a ``command`` that runs in one.

    A multi-host TPU slice makes every process a part of one JAX job (so does
    ``jax.distributed.initialize()``): each process would run the command, on a shared disk into
    the same DIR. ``instead`` is added to "run it on one host" (another way to run it).
    """
    import jax

    if jax.process_count() > 1:
        raise UsageError(
            f"{command} runs in one process, not in a {jax.process_count()}-process JAX job "
            f"(a multi-host TPU slice, or after jax.distributed.initialize()): run it on one "
            f"host{instead}"
        )


def output_dir(text: str) -> Path:
    """An argparse ``type``: a directory to write into, existing or to be created.

    A path that is a file, or lies under one, is refused when the arguments are parsed, before
    anything is computed (creating it would otherwise fail only when results are written). A
    leading ``~`` is the home directory, as in a shell (which leaves ``--out=~/x`` as it is).
    """
    if not text:
        raise argparse.ArgumentTypeError("must be a directory path, got ''")
    if "\0" in text:  # no shell passes one, but main(argv) may; the mkdir would fail after the work
        raise argparse.ArgumentTypeError(f"a path cannot hold a null character, got {text!r}")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~name of no user (or no home directory): pathlib cannot expand it
        raise argparse.ArgumentTypeError(
            f"{text!r}: cannot expand {Path(text).parts[0]!r} to a home directory"
        ) from None
    # A broken symbolic link does not "exist", but it cannot be made a directory either: the
    # mkdir would fail only when results are written (after training, for some commands).
    try:
        existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    except OSError as e:  # a name too long, a folder on the way that cannot be searched, ...
        raise argparse.ArgumentTypeError(f"{text!r}: {e.strerror or e}") from None
    where = "" if existing == path else f" (its parent {str(existing)!r})"
    if not existing.exists():
        raise argparse.ArgumentTypeError(f"{text!r}{where} is a broken symbolic link")
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}{where} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}{where} is not writable")
    return path


@contextlib.contextmanager
def locked_out(path: Path, writes: Sequence[str]) -> Iterator[Any]:
    """The lock of ``path`` for a command that writes the files ``writes`` into it: an
    :class:`experiments.store.DirectoryLock`, taken at once if ``path`` exists (a directory that
    another process is writing, such as the main job's, is refused before the command's work),
    else by its ``hold()``, which makes ``path``, before the first write. Another process's lock
    is reported as :class:`UsageError`: one line, nothing written.
    """
    from experiments.store import DirectoryLock, StoreLockedError

    try:
        with DirectoryLock(path, writes, make=False) as lock:
            yield lock
    except StoreLockedError as e:
        raise UsageError(str(e)) from None


def add_out_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Adds ``--out DIR`` (an :func:`output_dir`): required without a ``default``."""
    if default is None:
        parser.add_argument(
            "--out", type=output_dir, required=True, metavar="DIR", help="results directory"
        )
    else:
        parser.add_argument(
            "--out",
            metavar="DIR",
            type=output_dir,
            default=default,
            help=f"output directory (default: {default})",
        )


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, as on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_one_cpu_device_per_core() -> None:
    """Makes XLA's CPU backend one single-threaded device per core, unless flags say otherwise.

    The engine shards its runs over devices, so per-core devices run them in parallel with no
    synchronization inside each small step: about twice the run-steps/s of one multi-threaded
    CPU device on 2 cores. Only the CPU backend is affected (not GPUs or TPUs), and only if
    called before jax is imported.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={usable_cores()}"
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags.strip()


def _plain(doc: str) -> str:
    """A module docstring as plain text for a terminal: without reST's ``literal`` marks."""
    return doc.replace("``", "").replace("::\n", ":\n")


def build_parser() -> ArgumentParser:
    """The parser with every registered command."""
    main_job = importlib.import_module(MAIN_JOB)
    parser = ArgumentParser(
        prog="python -m experiments",
        description="Batch size vs momentum experiments on real data with compiled JAX sweeps. "
        "With no command: the main job, " + main_job.HELP + ".",
    )
    main_job.add_arguments(parser)
    # Given before a command, the main job's options were lost: argparse lets the command's
    # own values overwrite them (`--out X quadratic` wrote to quadratic's default, results/) or
    # leaves them unused. Under their own names, `main` hands them to the main job or refuses them.
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            action.dest = MAIN_JOB_OPTION + action.dest
    parser.set_defaults(run=main_job.run, on_interrupt=_on_interrupt(main_job))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        sub = commands.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", None) or _plain(module.__doc__),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=module.run, on_interrupt=_on_interrupt(module))
        module.add_arguments(sub)
    return parser


def _on_interrupt(module: Any) -> str:
    """The line a command prints on Ctrl-C: its module's ``ON_INTERRUPT``, else "interrupted"."""
    return getattr(module, "ON_INTERRUPT", "interrupted")


def _interrupt_again(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    """A ``sys.unraisablehook`` that raises a lost Ctrl-C again instead of printing it.

    Python ignores an exception raised in a garbage-collector or weakref callback, such as JAX's
    ``_xla_gc_callback``, and prints "Exception ignored in ..." with a traceback: a Ctrl-C that
    landed there was lost, and the command ran on. Here it is raised again in the main thread a
    moment later (not from the hook itself: Python would raise it at once, inside the hook, and
    ignore it again). Other unraisable exceptions go to ``hook``.
    """

    def unraisablehook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            again = threading.Timer(0.01, _thread.interrupt_main)
            again.daemon = True
            again.start()
        else:
            hook(unraisable)

    return unraisablehook


def _main_job_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Gives the main job its options; raises :class:`UsageError` for one set before a command."""
    for action in parser._actions:
        if not action.dest.startswith(MAIN_JOB_OPTION):
            continue
        value = getattr(args, action.dest)
        delattr(args, action.dest)
        if args.command is None:
            setattr(args, action.dest.removeprefix(MAIN_JOB_OPTION), value)
        # As text: argparse converts a default (`"results"`) only once parsing has succeeded.
        elif str(value) != str(action.default):
            option = max(action.option_strings, key=len)
            raise UsageError(
                f"{option} before the command is the main job's option, not {args.command}'s; "
                f"see python -m experiments {args.command} --help"
            )


def _error_line(message: object) -> str:
    """``error: message`` as one line: a line break in it (a value echoed as given, such as
    argparse's "unrecognized arguments: ...") is written as its escape (``\\n``)."""
    text = str(message)
    breaks = {c for c in text if len(f"a{c}b".splitlines()) > 1}
    for c in breaks:
        text = text.replace(c, repr(c)[1:-1])
    return f"error: {text}\n"


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Holds back SIGINT (Ctrl-C) in this thread until the block ends, where it is delivered.

    A Ctrl-C while jax loads its compiled extensions crashed the process (SIGABRT from a C++
    ``nanobind::python_error``, or SIGSEGV) in about 1 of 10 interrupts within the first 0.6 s.
    Blocked, it stays pending, and arrives as an ordinary KeyboardInterrupt once the imports are
    done. Threads started meanwhile inherit the block, so the main thread alone receives it.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    use_one_cpu_device_per_core()
    on_interrupt = "interrupted"  # until the command is known (Ctrl-C while jax is imported)
    hook, sys.unraisablehook = sys.unraisablehook, _interrupt_again(sys.unraisablehook)
    stdout, errors = sys.stdout, getattr(sys.stdout, "errors", None)
    if errors == "strict" and hasattr(stdout, "reconfigure"):
        # A path whose bytes are not UTF-8 (decoded as surrogates) is printed as those bytes, as
        # `ls` shows it, instead of failing with a UnicodeEncodeError after the work is done.
        stdout.reconfigure(errors="surrogateescape")
    try:
        with _sigint_deferred():
            parser = build_parser()  # imports the commands' modules, and with them jax
        args = argparse.Namespace()
        try:
            parser.parse_args(argv, args)
        except UsageError as error:
            # A command's complaint may come from a main job option set before it (`--out X
            # sweep`: "--out is required"); then that is the reason to give.
            _main_job_options(parser, args)
            sys.stderr.write(_error_line(error))
            sys.exit(USAGE_ERROR)
        _main_job_options(parser, args)
        on_interrupt = args.on_interrupt
        return args.run(args)
    except (UsageError, OSError) as e:
        # OSError: what the file system refused (a read-only or full disk, a file where a folder
        # is expected, ...): one line instead of a traceback. Stored results stay valid.
        sys.stderr.write(_error_line(e))
        return USAGE_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(on_interrupt + "\n")
        return INTERRUPTED
    finally:
        sys.unraisablehook = hook
        if errors == "strict" and hasattr(stdout, "reconfigure"):
            stdout.reconfigure(errors=errors)
