"""Tests of the command line and the results store: end to end, crash, resume, lock, bad input."""

import argparse
import contextlib
import errno
import functools
import importlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from test_exp_data import write_idx, write_mnist

from experiments import cli, data, store

SWEEP = [
    "sweep", "--dataset", "digits", "--batch-sizes", "16", "--betas", "0,0.5,0.9",
    "--lrs", "0.3,100000", "--seeds", "2", "--steps", "60", "--eval-every", "20",
    "--target-loss", "1.0",
]  # fmt: skip
N_RUNS = 3 * 2 * 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: a shared persistent compilation cache keeps reruns fast."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return os.environ | {
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def start(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(args, env):
    return subprocess.run(
        [sys.executable, "-m", "experiments", *args], env=env, capture_output=True, text=True
    )


def without_wall_time(records):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted sweep."""
    out = tmp_path_factory.mktemp("reference") / "out"
    done = run([*SWEEP, "--out", str(out)], env)
    assert done.returncode == 0, done.stderr
    return out, done


def test_sweep_end_to_end(reference):
    out, done = reference
    records = store.read_runs(out)
    assert len(records) == N_RUNS == len({r["run_id"] for r in records})
    assert "best lr" in done.stdout and "100%" in done.stderr  # summary and progress bars
    # stderr is a pipe here, as a log file is: the runs bar only, no nested per-step bar, whose
    # cursor moves a log records as blank lines and escape codes.
    assert "step/s" not in done.stderr and "\x1b[A" not in done.stderr
    assert "\n\n" not in done.stderr
    for r in records:
        curves = store.load_curves(out, r)
        assert curves["batch_loss"].shape == (60,)
        assert curves["eval_steps"].tolist() == [20, 40, 60]
        assert r["diverged"] == (r["lr"] == 100000)
        if not r["diverged"]:
            assert r["final_train_loss"] == pytest.approx(float(curves["train_loss"][-1]))


def test_rerun_skips_completed_runs(reference, env):
    out, _ = reference
    before = (out / "runs.jsonl").read_bytes()
    # A beta written as -0 is the same as 0: its runs are already done.
    sweep = [a for a in SWEEP if a not in ("--betas", "0,0.5,0.9")] + ["--betas=-0,0.5,0.9"]
    again = run([*sweep, "--out", str(out)], env)
    assert again.returncode == 0, again.stderr
    assert (out / "runs.jsonl").read_bytes() == before


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_resume_after_kill_is_identical_to_uninterrupted(sig, reference, env, tmp_path):
    """SIGKILL mid-sweep, tear the last line, rerun: nothing lost, duplicated or different.

    The first group, written by a fresh process into a fresh DIR, also checks determinism.
    SIGTERM (``kill``, a scheduler's time limit) is not caught: it ends the process at once, as
    SIGKILL does (the README says so), with the same guarantees.
    """
    out = tmp_path / "out"
    runs_file = out / "runs.jsonl"
    proc = start([*SWEEP, "--out", str(out)], env)
    deadline = time.monotonic() + 120
    while not (runs_file.exists() and runs_file.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(sig)
    proc.communicate()
    assert proc.returncode == -sig
    assert 0 < len(store.read_runs(out)) < N_RUNS  # killed mid-sweep
    with runs_file.open("ab") as f:
        f.write(b'{"run_id": "torn')

    resumed = run([*SWEEP, "--out", str(out)], env)
    assert resumed.returncode == 0, resumed.stderr
    assert runs_file.read_bytes().endswith(b"\n")
    records = store.read_runs(out)
    expected = store.read_runs(reference[0])
    key = lambda r: r["run_id"]
    assert sorted(without_wall_time(records), key=key) == sorted(
        without_wall_time(expected), key=key
    )
    for r in records:
        mine, theirs = store.load_curves(out, r), store.load_curves(reference[0], r)
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def communicate_all(procs, timeout):
    """``(stdout, stderr, exit status)`` of each process; one still running after ``timeout``
    seconds fails the test, and none is left running."""
    try:
        return [(*proc.communicate(timeout=timeout), proc.returncode) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


def sweep_on_two_processes(args, env, per_process=((), ()), devices=(2, 2), timeout=300):
    """Runs ``args`` (plus ``per_process[i]`` in process i) as a 2-process JAX job on this machine.

    Process i has ``devices[i]`` CPU devices. Returns ``(stdout, stderr, exit status)`` per process.
    A process still running after ``timeout`` seconds fails the test.
    """
    flags = [{"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"} for n in devices]
    job = ["--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    procs = [
        start([*args, *job, "--process-id", str(i), *per_process[i]], env | flags[i])
        for i in range(2)
    ]
    return communicate_all(procs, timeout)


def script_on_two_processes(script, args, env, timeout=300):
    """Runs ``python -c script PORT i *args`` in processes i = 0 and 1 (two CPU devices each), the
    script joining them into one JAX job. Returns ``(stdout, stderr, exit status)`` per process.
    """
    env = env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, port, str(i), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    return communicate_all(procs, timeout)


def test_sweep_over_two_processes_is_identical_to_one(reference, env, tmp_path):
    """A multi-host job, simulated by two local processes with two CPU devices each.

    Process 0 writes the same records and curves as the one-process reference (8 devices) and
    prints the summary; process 1 prints nothing (the Gloo library's connection lines aside). A
    rerun of the job computes nothing.
    """
    out = tmp_path / "out"
    (out0, err0, code0), (out1, err1, code1) = sweep_on_two_processes(
        [*SWEEP, "--out", str(out)], env
    )
    assert code0 == code1 == 0, err0 + err1
    # Gloo's connection messages, which its threads may print run together, between blank lines,
    # or broken over lines (seen in CI: "...is connected to \n3 peer ranks...").
    words = r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of .*? is : \d+"
    gloo = words.replace(" ", r"\s*")
    assert "best lr" in out0 and re.sub(gloo, "", out1, flags=re.S).strip() == ""
    assert "100%" not in err1
    sample = "[Gloo] Rank 3 is connected to \n3 peer ranks. Expected number of connected peer "
    sample += "ranks is : 3"
    assert re.sub(gloo, "", sample, flags=re.S) == ""
    records = store.read_runs(out)
    expected = store.read_runs(reference[0])
    assert without_wall_time(records) == without_wall_time(expected)
    for r in records:
        mine, theirs = store.load_curves(out, r), store.load_curves(reference[0], r)
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])

    before = (out / "runs.jsonl").read_bytes()
    results = sweep_on_two_processes([*SWEEP, "--out", str(out)], env)
    assert [code for *_, code in results] == [0, 0]
    assert (out / "runs.jsonl").read_bytes() == before


def test_locked_dir_stops_every_process_of_a_job(tmp_path, env):
    out = tmp_path / "out"
    with store.ResultStore(out):
        results = sweep_on_two_processes([*SWEEP, "--out", str(out)], env)
    assert [code for *_, code in results] == [2, 2]
    (_, err0, _), (_, err1, _) = results
    assert err0.splitlines()[-1].startswith("error: ")
    assert "in use by another process" in err0.splitlines()[-1]
    assert err1.splitlines()[-1] == f"error: process 0 could not open the results in {out}"
    assert store.read_runs(out) == []


def test_a_dir_process_0_cannot_create_stops_every_process_of_a_job(tmp_path, env):
    """DIR/curves is a file: process 0 raised the OSError before the processes agreed on its
    store, and both waited for the other until JAX's 300 s timeout ended them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "curves").write_bytes(b"")
    sweep = ["sweep", "--dataset", "digits", "--batch-sizes", "16", "--betas", "0", "--lrs", "0.1"]
    sweep += ["--seeds", "1", "--steps", "2", "--eval-every", "2", "--out", str(out)]
    results = sweep_on_two_processes(sweep, env, timeout=60)
    assert [code for *_, code in results] == [2, 2]
    (_, err0, _), (_, err1, _) = results
    assert err0.splitlines()[-1].startswith("error: ") and "curves" in err0.splitlines()[-1]
    assert err1.splitlines()[-1] == f"error: process 0 could not open the results in {out}"
    assert "Traceback" not in err0 + err1
    assert not (out / "runs.jsonl").exists()


def test_processes_running_different_sweeps_are_stopped(tmp_path, env):
    out = tmp_path / "out"
    seeds = (["--seeds", "1"], ["--seeds", "2"])
    results = sweep_on_two_processes([*SWEEP, "--out", str(out)], env, per_process=seeds)
    assert [code for *_, code in results] == [2, 2]
    for _, err, _ in results:
        assert err.splitlines()[-1].startswith("error: the processes of the job were given")
    assert store.read_runs(out) == []


def test_processes_with_different_device_counts(reference, env, tmp_path):
    """One device in process 0, three in process 1: the sweep runs over all four, and its
    records and curves are those of the one-process reference (8 devices)."""
    out = tmp_path / "out"
    sweep = [a for a in SWEEP if a not in ("--betas", "0,0.5,0.9")] + ["--betas", "0.9"]
    results = sweep_on_two_processes([*sweep, "--out", str(out)], env, devices=(1, 3))
    assert [code for *_, code in results] == [0, 0], results[0][1] + results[1][1]
    records = store.read_runs(out)
    expected = [r for r in store.read_runs(reference[0]) if r["beta"] == 0.9]
    assert len(records) == 4 and without_wall_time(records) == without_wall_time(expected)
    for r, e in zip(records, expected, strict=True):
        mine, theirs = store.load_curves(out, r), store.load_curves(reference[0], e)
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])


# Process i of a 2-process job calls run_sweep on the digits, process 1 on another order of the
# same training set (what another host's library version might give): argv is port, i, DIR.
DIFFERENT_DATA = """
import dataclasses, sys
import jax
port, i, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=i)
from experiments import data, sweep
digits = data.load_dataset("digits")
if i == 1:
    digits = dataclasses.replace(digits, x_train=digits.x_train[::-1].copy())
try:
    sweep.run_sweep(out, digits, "linear", [16], [0.9], lrs=[0.3, 0.1], seeds=[0, 1], steps=2,
                    eval_every=2, progress=False)
except sweep.SweepMismatchError as e:
    print(e)
    sys.exit(3)
"""


def test_processes_given_different_data_are_stopped(tmp_path, env):
    """The run ids of a built-in dataset do not hash its arrays: processes holding different
    data trained the runs on each one's devices on its own data, and process 0 recorded them
    all, with no error."""
    out = tmp_path / "out"
    results = script_on_two_processes(DIFFERENT_DATA, [str(out)], env)
    assert [code for *_, code in results] == [3, 3], results
    for stdout, _, _ in results:
        assert stdout.splitlines()[-1].startswith("the processes of the job loaded different data")
    assert not out.exists()


# Process i of a 2-process job runs a command of python -m experiments: argv is port, i, then the
# command's arguments (a multi-host TPU slice joins its hosts without being asked to).
COMMAND_IN_A_JOB = """
import sys
import jax
port, i = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=i)
from experiments import cli
sys.exit(cli.main(sys.argv[3:]))
"""


def test_baselines_in_a_multi_process_job_is_refused_in_every_process(tmp_path, env):
    """baselines trains on all devices, so every process of the job took part in its training;
    where DIR existed, process 0 took its lock, process 1 was refused and exited, and process 0
    waited for it in the training until JAX's timeout ended it with a traceback (2 minutes).
    Like the main job, it now stops in every process before its work, writing nothing."""
    out = tmp_path / "out"
    out.mkdir()
    command = ["baselines", "--out", str(out), "--dataset", "digits", "--steps", "2"]
    results = script_on_two_processes(COMMAND_IN_A_JOB, command, env, timeout=100)
    assert [code for *_, code in results] == [2, 2], results
    for stdout, stderr, _ in results:
        assert stdout == "" and "Traceback" not in stderr
        assert stderr.splitlines()[-1] == (
            "error: baselines runs in one process, not in a 2-process JAX job (a multi-host TPU "
            "slice, or after jax.distributed.initialize()): run it on one host"
        )
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "command, work", [("quadratic", "experiments.quadratic.study"),
                      ("baselines", "experiments.baselines.run_baselines")]
)  # fmt: skip
def test_jax_commands_in_a_multi_process_job_are_refused_before_their_work(
    command, work, tmp_path, capsys, monkeypatch
):
    """quadratic computes with JAX: in a multi-process job every process computed it and wrote
    DIR (the same one, where the hosts share a disk: a process then found it locked by another
    and exited with status 2 after its work). It runs in one process, as the main job and
    baselines (above) do."""
    import jax

    def started(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(work, started)
    out = tmp_path / "out"
    args = [command, "--out", str(out), "--steps", "2", "--dataset", "digits"]
    assert cli.main(args[:5] if command == "quadratic" else args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {command} runs in one process, not in a 2-process JAX job (a multi-host TPU "
        "slice, or after jax.distributed.initialize()): run it on one host\n"
    )
    assert not out.exists()


def test_a_process_that_cannot_load_the_data_stops_the_job(tmp_path, env):
    """The data files are on process 0's disk only: process 1 says why it stops, process 0 that
    process 1 stopped."""
    out, idx = tmp_path / "out", tmp_path / "idx"
    idx.mkdir()
    write_mnist(idx)
    sweep = ["sweep", "--dataset", "idx", "--batch-sizes", "2", "--betas", "0", "--lrs", "0.1"]
    sweep += ["--steps", "2", "--eval-every", "2", "--out", str(out)]
    dirs = (["--data-dir", str(idx)], ["--data-dir", str(tmp_path / "missing")])
    results = sweep_on_two_processes(sweep, env, per_process=dirs)
    assert [code for *_, code in results] == [2, 2]
    (_, err0, _), (_, err1, _) = results
    assert err1.splitlines()[-1].startswith("error: cannot load dataset idx: ")
    assert (
        err0.splitlines()[-1]
        == "error: process 1 of the job stopped with an error (see its output)"
    )
    assert not out.exists()


def test_a_process_given_arguments_it_refuses_stops_the_job(tmp_path, env):
    """Process 1 alone is given --eval-every > --steps: it refused them before joining the job,
    and process 0 waited for it for JAX's 300 s, then ended with a stack trace (exit 134)."""
    out = tmp_path / "out"
    sweep = ["sweep", "--dataset", "digits", "--batch-sizes", "16", "--betas", "0", "--lrs", "0.1"]
    sweep += ["--seeds", "1", "--steps", "2", "--eval-every", "2", "--out", str(out)]
    per_process = ((), ["--eval-every", "3"])
    results = sweep_on_two_processes(sweep, env, per_process=per_process, timeout=60)
    assert [code for *_, code in results] == [2, 2]
    (_, err0, _), (_, err1, _) = results
    assert err1.splitlines()[-1] == "error: --eval-every (3) must be <= --steps (2)"
    assert (
        err0.splitlines()[-1]
        == "error: process 1 of the job stopped with an error (see its output)"
    )
    assert "Traceback" not in err0 + err1
    assert not out.exists()


def test_a_killed_process_stops_process_0_at_once_with_one_line(tmp_path, env):
    """Process 1 is killed after the first group is stored. Process 0's next gather failed at
    once, and it printed a traceback, waited up to JAX's 100 s heartbeat timeout and aborted with
    a stack trace (exit status 134)."""
    out = tmp_path / "out"
    sweep = ["sweep", "--dataset", "digits", "--batch-sizes", "16", "--betas", "0,0.9"]
    sweep += ["--lrs", "0.3", "--seeds", "2", "--steps", "4", "--eval-every", "2"]
    job = ["--out", str(out), "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    two_devices = env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [start([*sweep, *job, "--process-id", str(i)], two_devices) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not ((out / "runs.jsonl").exists() and (out / "runs.jsonl").stat().st_size > 0):
            assert all(proc.poll() is None for proc in procs), procs[0].communicate()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        procs[1].kill()
        _, err0 = procs[0].communicate(timeout=30)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 2
    assert err0.splitlines()[-1].startswith(
        "error: a computation of the job failed (did a process stop?); finished groups are kept, "
        "rerun the job to resume: "
    )
    assert "Traceback" not in err0
    assert [r["beta"] for r in store.read_runs(out)] == [0.0, 0.0]  # the first group, whole


def test_distributed_without_a_cluster_is_a_usage_error(tmp_path, env):
    out = tmp_path / "out"
    env = {k: v for k, v in env.items() if not k.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_"))}
    done = run([*SWEEP, "--out", str(out), "--distributed"], env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: cannot join the distributed job: ")
    assert done.stderr.count("\n") == 1
    assert not out.exists()


def test_lock_refuses_a_second_writer(tmp_path, env):
    out = tmp_path / "out"
    with store.ResultStore(out):
        done = run([*SWEEP, "--out", str(out)], env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "in use by another process" in done.stderr
    assert not (out / "runs.jsonl").read_bytes()


def test_store_refuses_second_writer_in_process(tmp_path):
    with store.ResultStore(tmp_path), pytest.raises(store.StoreLockedError):
        store.ResultStore(tmp_path)
    store.ResultStore(tmp_path).close()  # released


def test_store_repairs_torn_last_line_and_rejects_corruption(tmp_path):
    runs = tmp_path / "runs.jsonl"
    (tmp_path / "curves").mkdir()
    np.savez(tmp_path / "curves" / "g.npz", run_ids=np.asarray(["a", "b"]))
    a, b = (
        b'{"run_id": "%s", "curves": "curves/g.npz", "curve_index": %d}\n' % (name, index)
        for index, name in enumerate((b"a", b"b"))
    )
    runs.write_bytes(a + b + b'{"run_')
    assert [r["run_id"] for r in store.read_runs(tmp_path)] == ["a", "b"]
    with store.ResultStore(tmp_path) as s:
        assert s.missing(["a", "b", "c"]) == ["c"]
    assert runs.read_bytes() == a + b
    runs.write_bytes(a + b"not json\n" + b)
    with pytest.raises(store.CorruptStoreError, match="line 2"):
        store.read_runs(tmp_path)


def main_in_process(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


@pytest.fixture
def corrupt_idx(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    write_mnist(folder)
    write_idx(folder / "train-images-idx3-ubyte", data.IDX_LABELS_MAGIC, np.zeros(6))
    return folder


# Each bad input and the start of its error line: the shared arguments of test_bad_input are
# valid on their own (test_the_bad_input_cases_start_from_valid_arguments), so each case fails at
# its own check.
BAD = [
    (["--batch-sizes", "0"], "argument --batch-sizes: must be an integer >= 1, got '0'"),
    (["--batch-sizes", "8,x"], "argument --batch-sizes: must be an integer >= 1, got 'x'"),
    (["--batch-sizes", "5000"], "batch size 5000 is larger than the 1438 training examples"),
    (["--batch-sizes", "8,8"], "--batch-sizes has duplicates: 8,8"),
    (["--betas", "1"], "--betas must be in [0, 1), got 1.0"),
    (["--betas", "-0.1"], "--betas must be in [0, 1), got -0.1"),
    (["--betas", "abc"], "argument --betas: must be a number, got 'abc'"),
    (["--betas", "0,-0"], "--betas has duplicates: 0.0,0.0"),
    (["--lrs", "0"], "argument --lrs: learning rates must be in [1.18e-38, 3.4e+38]"),
    (["--lrs", "-1"], "argument --lrs: learning rates must be in [1.18e-38, 3.4e+38]"),
    (["--lrs", "1e-50"], "argument --lrs: learning rates must be in [1.18e-38, 3.4e+38]"),
    (["--lrs", "1e39"], "argument --lrs: learning rates must be in [1.18e-38, 3.4e+38]"),
    (["--lrs", "1e-40"], "argument --lrs: learning rates must be in [1.18e-38, 3.4e+38]"),
    (["--betas", "0.99999999"], "--betas 0.99999999 is 1 in float32"),
    (["--target-loss", "1e39"], "--target-loss must be in [0, 3.403e+38], got 1e+39"),
    (["--steps", "2147483648"], "argument --steps: must be an integer < 2**31, got '2147483648'"),
    (["--seeds", "4_0"], "argument --seeds: must be an integer >= 1, got '4_0'"),
    (["--seeds", "+4"], "argument --seeds: must be an integer >= 1, got '+4'"),
    (["--seeds", "\uff14"], "argument --seeds: must be an integer >= 1, got '\uff14'"),
    (["--lrs", "abc"], "argument --lrs: must be a number, got 'abc'"),
    (["--lrs", "nan"], "argument --lrs: must be a finite number, got 'nan'"),
    (["--lrs", "inf"], "argument --lrs: must be a finite number, got 'inf'"),
    (["--lrs", "1e999"], "argument --lrs: must be a finite number, got '1e999'"),
    (["--lrs", "0.0_1"], "argument --lrs: must be a number, got '0.0_1'"),  # float(): 0.01
    (["--lrs", "+0.1"], "argument --lrs: must be a number, got '+0.1'"),
    (["--lrs", "\u0661"], "argument --lrs: must be a number, got '\u0661'"),  # float(): 1.0
    (["--betas", "0,\uff10.9"], "argument --betas: must be a number, got '\uff10.9'"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["--steps", "2.5"], "argument --steps: must be an integer >= 1, got '2.5'"),
    (["--steps", "x"], "argument --steps: must be an integer >= 1, got 'x'"),
    (["--seeds", "0"], "argument --seeds: must be an integer >= 1, got '0'"),
    (["--seeds", "-3"], "argument --seeds: must be an integer >= 1, got '-3'"),
    (["--seeds", "2147483647"], "argument --seeds: must be an integer <= 10_000, got '2147483647'"),
    (["--seeds", "2147483648"], "argument --seeds: must be an integer <= 10_000, got '2147483648'"),
    (["--eval-every", "0"], "argument --eval-every: must be an integer >= 1, got '0'"),
    (["--eval-every", "100", "--steps", "10"], "--eval-every (100) must be <= --steps (10)"),
    (["--target-loss", "-1"], "--target-loss must be in [0, 3.403e+38], got -1.0"),
    (["--target-loss", "x"], "argument --target-loss: must be a number, got 'x'"),
    (["--dataset", "cifar"], "argument --dataset: invalid choice: 'cifar'"),
    (["--model", "rnn"], "argument --model: invalid choice: 'rnn'"),
    (["--devices", "99"], "--devices 99 but only 8 device(s) are available"),
    (["--data-dir", "/tmp"], "--data-dir is only used with --dataset idx, not digits"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--num-processes", "0"], "argument --num-processes: must be an integer >= 1, got '0'"),
    (["--process-id", "-1"], "argument --process-id: must be an integer >= 0, got '-1'"),
    (
        ["--num-processes", "2", "--process-id", "2"],
        "--process-id must be < --num-processes (2), got 2",
    ),
    (["--distributed", "--devices", "1"], "--devices cannot be combined with --distributed"),
]
BAD_INPUT_BASE = ["--dataset", "digits", "--steps", "20", "--eval-every", "10"]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(extra) for extra, _ in BAD])
def test_bad_input(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, captured = main_in_process(["sweep", *BAD_INPUT_BASE, "--out", str(out), *extra], capsys)
    assert code == 2
    assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1
    assert not out.exists()


def test_the_bad_input_cases_start_from_valid_arguments(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", *BAD_INPUT_BASE, "--out", str(out), "--batch-sizes", "16", "--lrs", "0.1"]
    code, _ = main_in_process([*args, "--seeds", "1", "--betas", "0"], capsys)
    assert code == 0 and len(store.read_runs(out)) == 1


@pytest.mark.parametrize("case", ["no_dir", "missing", "corrupt"])
def test_bad_idx_data(case, tmp_path, capsys, corrupt_idx):
    out = tmp_path / "out"
    data_dir = {"no_dir": [], "missing": ["--data-dir", str(tmp_path / "none")]}.get(
        case, ["--data-dir", str(corrupt_idx)]
    )
    code, captured = main_in_process(
        ["sweep", "--dataset", "idx", "--out", str(out), *data_dir], capsys
    )
    assert code == 2 and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert not out.exists()


def test_data_dir_starting_with_a_tilde_is_under_home(tmp_path, capsys, monkeypatch):
    # `--data-dir=~/x` reaches the program unexpanded (a shell expands only a word starting with ~).
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist", n_train=16, n_test=4, rows=8, cols=8)
    out = tmp_path / "out"
    argv = ["sweep", "--dataset", "idx", "--data-dir=~/mnist", "--out", str(out),
            "--batch-sizes", "4", "--betas", "0", "--lrs", "0.1", "--seeds", "1", "--steps", "2",
            "--eval-every", "2"]  # fmt: skip
    code, captured = main_in_process(argv, capsys)
    assert code == 0, captured.err
    assert len(store.read_runs(out)) == 1


def test_idx_runs_of_other_files_are_not_taken_for_done(tmp_path, capsys):
    # The run id holds a digest of the IDX data: MNIST and Fashion-MNIST never pass for each other.
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        write_mnist(folder, n_train=16, n_test=4, rows=8, cols=8)
    labels = np.arange(16)[::-1] % 10  # same images and shapes, other training labels
    write_idx(second / "train-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, labels)
    out = tmp_path / "out"
    argv = ["sweep", "--dataset", "idx", "--out", str(out), "--batch-sizes", "4", "--betas", "0",
            "--lrs", "0.1", "--seeds", "1", "--steps", "4", "--eval-every", "2"]  # fmt: skip
    for folder in (first, second, first):
        assert main_in_process([*argv, "--data-dir", str(folder)], capsys)[0] == 0
    records = store.read_runs(out)
    assert len(records) == 2 and records[0]["run_id"] != records[1]["run_id"]
    digests = [data.load_dataset("idx", folder).digest for folder in (first, second)]
    assert digests[0] != digests[1]
    assert [r["data_digest"] for r in records] == digests  # readers can tell them apart


def test_model_that_cannot_take_the_images_is_refused_before_writing(tmp_path, capsys):
    folder = tmp_path / "tiny"
    folder.mkdir()
    write_mnist(folder, rows=1, cols=1)
    out = tmp_path / "out"
    argv = ["sweep", "--dataset", "idx", "--data-dir", str(folder), "--model", "cnn"]
    argv += ["--batch-sizes", "2"]
    code, captured = main_in_process([*argv, "--out", str(out)], capsys)
    assert code == 2 and captured.err.count("\n") == 1
    assert captured.err.startswith("error: --model cnn: input_shape=(1, 1) is too small")
    assert not out.exists()


@pytest.mark.parametrize("line", [b"{garbage", b"{}", b"[1, 2]", b'{"run_id": 3}'])
def test_a_corrupt_record_before_the_last_is_one_error_line(line, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", *BAD_INPUT_BASE, "--out", str(out), "--batch-sizes", "16", "--lrs", "0.1"]
    args += ["--seeds", "2", "--betas", "0"]
    assert main_in_process(args, capsys)[0] == 0
    good = (out / "runs.jsonl").read_bytes().splitlines(keepends=True)
    corrupt = line + b"\n" + good[1]
    (out / "runs.jsonl").write_bytes(corrupt)
    code, captured = main_in_process(args, capsys)
    assert code == 2 and captured.err.count("\n") == 1
    assert captured.err.startswith("error: corrupt record on line 1 of ")
    assert (out / "runs.jsonl").read_bytes() == corrupt  # left as it was


def test_a_missing_curves_file_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", *BAD_INPUT_BASE, "--out", str(out), "--batch-sizes", "16", "--lrs", "0.1"]
    args += ["--seeds", "1", "--betas", "0"]
    assert main_in_process(args, capsys)[0] == 0
    for curves in (out / "curves").glob("*.npz"):
        curves.unlink()
    code, captured = main_in_process(args, capsys)
    assert code == 2 and captured.err.count("\n") == 1
    assert "whose curves file is missing (curves/" in captured.err


@pytest.mark.parametrize("blocker", ["runs.jsonl", "curves"])
def test_what_the_file_system_refuses_is_one_error_line(blocker, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / blocker).mkdir() if blocker == "runs.jsonl" else (out / blocker).write_text("x")
    args = ["sweep", *BAD_INPUT_BASE, "--out", str(out), "--batch-sizes", "16", "--lrs", "0.1"]
    code, captured = main_in_process(args, capsys)
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: [Errno ")


def test_an_unwritable_out_is_refused_when_the_arguments_are_parsed(tmp_path, capsys, monkeypatch):
    # os.access is patched: the tests may run as root, for whom every directory is writable.
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    code, captured = main_in_process(["quadratic", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and captured.err.count("\n") == 1
    assert "(its parent" in captured.err and captured.err.rstrip().endswith("is not writable")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from experiments import sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    args = ["sweep", *BAD_INPUT_BASE, "--out", str(tmp_path / "out"), "--batch-sizes", "16"]
    code, captured = main_in_process(args, capsys)
    assert code == 130 and captured.err.count("\n") == 1
    assert captured.err == "interrupted; finished runs are kept: rerun to resume\n"


def test_ctrl_c_in_a_gc_callback_still_interrupts(tmp_path, capsys, monkeypatch):
    # Python ignores an exception raised in a gc callback (JAX has one) and prints a traceback; a
    # Ctrl-C that landed there was lost: seen once in ~40 SIGINTs to a sweep, which ran on.
    import gc

    from experiments import sweep

    def raise_once(phase, info):
        gc.callbacks.remove(raise_once)
        raise KeyboardInterrupt

    def run(args):  # a sweep that runs on for 5 s unless interrupted
        gc.callbacks.append(raise_once)
        gc.collect()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.001)
        return 0

    monkeypatch.setattr(sweep, "run", run)
    args = ["sweep", *BAD_INPUT_BASE, "--out", str(tmp_path / "out"), "--batch-sizes", "16"]
    code, captured = main_in_process(args, capsys)
    assert code == 130
    assert captured.err == "interrupted; finished runs are kept: rerun to resume\n"
    assert raise_once not in gc.callbacks


def test_ctrl_c_while_the_commands_are_imported_is_one_line(monkeypatch, capsys):
    # Importing jax, flax and torch takes a second or two; it was a traceback.
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["sweep", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_ctrl_c_is_held_back_while_jax_loads_and_delivered_after(monkeypatch, capsys):
    # A Ctrl-C inside jax's compiled extensions as they load crashed the process (SIGABRT or
    # SIGSEGV, 3 of 30 interrupts 0.15-0.6 s after start); held back, it arrives once they are in.
    import signal

    real_import = cli.importlib.import_module
    masks = []

    def import_module(name, *args):
        masks.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        if len(masks) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # pending until the imports are done
        return real_import(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    assert cli.main(["sweep", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert masks and all(masks)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    code, captured = main_in_process(["sweep", "--dataset", "digits", "--out", str(out)], capsys)
    assert code == 2 and "not a directory" in captured.err


@pytest.mark.parametrize("command", [[], ["sweep"], ["baselines"], ["nqm"], ["quadratic"]])
@pytest.mark.parametrize("under_file", [False, True])
def test_out_in_place_of_a_file_is_refused(command, under_file, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    out = file / "results" if under_file else file
    code, captured = main_in_process([*command, "--out", str(out)], capsys)
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: argument --out: ") and captured.err.count("\n") == 1
    assert "not a directory" in captured.err and file.read_text() == "x"


def test_a_command_with_its_own_out_ignores_the_main_jobs_default(tmp_path, capsys, monkeypatch):
    # argparse converts a string default it keeps: the main job's "results" was checked (and
    # refused) for every command, though the command writes to its own --out.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("x")
    out = tmp_path / "q"
    code, captured = main_in_process(
        ["quadratic", "--out", str(out), "--steps", "2", "--seeds", "1"], capsys
    )
    assert code == 0, captured.err
    assert (out / "quadratic.json").is_file() and (tmp_path / "results").read_text() == "x"
    # With no command the default is the main job's directory, and is still checked at once.
    code, captured = main_in_process([], capsys)
    assert code == 2 and captured.out == ""
    assert captured.err == "error: argument --out: 'results' exists and is not a directory\n"


BAD_NQM_QUADRATIC = [
    ["nqm", "--betas", "0,1.5"],
    ["nqm", "--betas", "0,x"],
    ["nqm", "--betas", "nan"],
    ["nqm", "--betas", "0.9,0.9"],
    ["nqm", "--batch-sizes", "0,4"],
    ["nqm", "--batch-sizes", "x"],
    ["nqm", "--batch-sizes", "4,4"],
    ["nqm", "--dim", "0"],
    ["nqm", "--workers", "-1"],
    ["quadratic", "--steps", "1"],
    ["quadratic", "--steps", "x"],
    ["quadratic", "--steps", "1_0"],
    ["quadratic", "--steps", "3000000000"],
    ["quadratic", "--seed", "4294967296"],
    ["quadratic", "--seed", "0.5"],
    ["quadratic", "--seed", "-1"],
    ["quadratic", "--seeds", "0"],
    ["quadratic", "--seeds", "10001"],
]


@pytest.mark.parametrize("argv", BAD_NQM_QUADRATIC, ids=" ".join)
def test_bad_input_of_nqm_and_quadratic(argv, tmp_path, capsys):
    out = tmp_path / "out"
    code, captured = main_in_process([argv[0], "--out", str(out), *argv[1:]], capsys)
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert argv[1] in captured.err
    assert not out.exists()


def test_nqm_batch_sizes_are_not_bounded_by_int32():
    # The NQM is closed-form: unlike the engine's counts, its batch sizes need not fit an int32.
    args = cli.build_parser().parse_args(["nqm", "--batch-sizes", "1,4294967296"])
    assert args.batch_sizes == [1, 2**32]


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "{out}", "quadratic", "--steps", "2", "--seeds", "1"],
        ["--out", "{out}", "nqm", "--batch-sizes", "1"],
        ["--out", "{out}", "sweep", "--dataset", "digits"],
        ["--out={out}", "report", "{out}"],
        ["--preset", "full", "quadratic", "--out", "{out}"],
    ],
    ids=lambda argv: " ".join(argv[:3]),
)
def test_main_job_options_before_a_command_are_refused(argv, tmp_path, capsys, monkeypatch):
    # argparse let the command's own options overwrite them: `--out X quadratic` wrote to
    # quadratic's default, results/ in the working directory; `--out X sweep` said --out was
    # missing; `--out X report` and `--preset full quadratic` ignored them.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine"
    code, captured = main_in_process([a.replace("{out}", str(out)) for a in argv], capsys)
    assert code == 2 and captured.out == ""
    option = argv[0].split("=")[0]
    assert captured.err.startswith(f"error: {option} before the command ")
    assert captured.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_main_job_options_reach_the_main_job_and_commands_run_without_them(monkeypatch):
    import experiments.quadratic
    import experiments.study

    seen = []
    monkeypatch.setattr(experiments.study, "run", lambda args: seen.append(vars(args)) or 0)
    monkeypatch.setattr(experiments.quadratic, "run", lambda args: seen.append(vars(args)) or 0)
    assert cli.main(["--out", "elsewhere", "--preset", "full"]) == 0
    assert cli.main([]) == 0
    assert cli.main(["--out", "results", "quadratic", "--out", "mine"]) == 0  # the default
    assert [(str(a["out"]), a.get("preset")) for a in seen] == [
        ("elsewhere", "full"),
        ("results", "quick"),
        ("mine", None),
    ]
    assert not any(name.startswith(cli.MAIN_JOB_OPTION) for a in seen for name in a)


def test_missing_out(capsys):
    code, captured = main_in_process(["sweep"], capsys)
    assert code == 2 and captured.err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "3\n"],  # argparse: "unrecognized arguments: 3<newline>"
        ["bench", "a\rb"],
        ["bench-transform", "--json", "x\u2028y"],
        ["baselines", "--out", "x", "--models", "mlp\n,mlp\n"],  # "--models has duplicates: ..."
    ],
    ids=repr,
)
def test_an_error_line_is_one_line_whatever_the_arguments_hold(argv, tmp_path, capsys, monkeypatch):
    # A value holding a line break, echoed as it is, made the "one line" two.
    monkeypatch.chdir(tmp_path)
    code, captured = main_in_process(argv, capsys)
    assert code == 2 and captured.out == "" and list(tmp_path.iterdir()) == []
    assert captured.err.startswith("error: ") and captured.err.endswith("\n")
    assert len(captured.err.splitlines()) == 1, captured.err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["sweep", "--dataset", "digits", "--seed", "3"], "--seed"),  # was --seeds 3: seeds 0..2
        (["baselines", "--seed", "5"], "--seed"),  # was --seeds 5
        (["baselines", "--model", "mlp"], "--model"),  # sweep's option; was --models
        (["quadratic", "--ste=5"], "--ste=5"),
        (["--pre=full"], "--pre=full"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_an_abbreviated_option_is_refused(argv, option, tmp_path, capsys, monkeypatch):
    # argparse took a unique prefix for the option it starts: `sweep --seed 3` (quadratic's name
    # for the first seed) silently ran seeds 0, 1 and 2.
    import experiments.baselines
    import experiments.quadratic
    import experiments.study
    import experiments.sweep

    for module in (
        experiments.baselines,
        experiments.quadratic,
        experiments.study,
        experiments.sweep,
    ):
        monkeypatch.setattr(module, "run", lambda args: 0)  # the old code took the prefix and ran
    monkeypatch.chdir(tmp_path)
    argv = [argv[0], "--out", "out", *argv[1:]] if argv[0] != "--pre=full" else argv
    code, captured = main_in_process(argv, capsys)
    assert code == 2 and captured.out == "" and list(tmp_path.iterdir()) == []
    assert captured.err.startswith(f"error: unrecognized arguments: {option}")
    assert captured.err.count("\n") == 1


def test_no_option_is_taken_by_a_prefix_of_its_name(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [(None, parser), *subparsers.choices.items()]:
        for action in sub._actions:
            for option in action.option_strings:
                prefix = option[:-1]  # quadratic's --seeds: --seed is an option of its own
                if len(option) > 3 and prefix not in sub._option_string_actions:
                    argv = [*([name] if name else []), prefix]
                    argv += ["--out", "o"] if name in ("sweep", "baselines") else []
                    argv += ["DIR"] if name == "report" else []
                    with pytest.raises(cli.UsageError, match="unrecognized arguments"):
                        parser.parse_args(argv)


def test_bad_input_from_a_real_process(tmp_path, env):
    out = tmp_path / "out"
    done = run(["sweep", "--dataset", "digits", "--out", str(out), "--betas", "1.5"], env)
    assert done.returncode == 2
    assert done.stderr == "error: --betas must be in [0, 1), got 1.5\n"
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name, _ in cli.COMMANDS])
def test_help(argv, capsys):
    code, captured = main_in_process(argv, capsys)
    assert code == 0 and "usage:" in captured.out
    if argv == ["--help"]:
        assert all(name in captured.out for name, _ in cli.COMMANDS)
    # Plain text for a terminal: no reST markup from a module docstring.
    assert not any(markup in captured.out for markup in (":math:", ".. math::", ":func:"))


def test_auto_lrs():
    from experiments.sweep import auto_lrs

    assert auto_lrs(32) == [0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16]
    assert auto_lrs(128)[3] == 0.2


def test_bench_table_shape():
    from experiments import bench

    results = {
        "run_steps_per_s": {
            "naive_loop": 10.0,
            "scan": 20.0,
            "scan_vmap": 80.0,
            "torch_eager": None,
        },
        "speedup_vs_torch_eager": None,
        "gflops": {"scan_vmap_batch_1024": 1.0, "matmul_peak": 4.0, "fraction_of_peak": 0.25},
    }
    table = bench.table(results)
    assert "| scan_vmap | 80 | n/a | n/a |" in table and "25%" in table
    names = ("naive_loop", "scan", "scan_vmap", "torch_eager")
    with_torch = {
        **results,
        "run_steps_per_s": {**results["run_steps_per_s"], "torch_eager": 5.0},
        "speedup_vs_torch_eager": dict(zip(names, (2.0, 4.0, 16.0, 1.0), strict=True)),
        "speedup_vs_torch_eager_per_round": dict(
            zip(names, ([2.0], [4.0], [12.5, 16.0, 17.3], [1.0]), strict=True)
        ),
    }
    assert "| scan_vmap | 80 | 16.0x | 12.5-17.3x |" in bench.table(with_torch)
    alone = {"run_steps_per_s": 90.0, "speedup_vs_torch_eager": None}
    assert "same devices, nothing else of the step): 90 run-steps/s." in bench.table(
        {**results, "matmuls_only": alone}
    )
    alone = {**alone, "speedup_vs_torch_eager": 18.0, "speedup_vs_torch_eager_per_round": [17, 19]}
    assert ": 90 run-steps/s, 18.0x torch eager (rounds 17.0-19.0x)." in bench.table(
        {**with_torch, "matmuls_only": alone}
    )
    with_rates = {
        **with_torch,
        "gflops": {**results["gflops"], "scan_vmap_batch_32": 0.75, "torch_eager_batch_32": 0.05},
    }
    expected = "rate at batch 32, in GFLOP/s: scan_vmap 0.8, torch_eager 0.1."
    assert expected in bench.table(with_rates)
    json.dumps(results)


def test_bench_measures_every_contender(monkeypatch):
    """The benchmark itself runs end to end (at a tiny size) and reports what the README cites.

    On 3 devices (one per core on a 3-core machine): 8 runs do not split over 3, and it crashed.
    """
    import jax

    from experiments import bench

    devices = jax.devices()[:3]
    monkeypatch.setattr(jax, "devices", lambda *args: devices)
    monkeypatch.setattr(bench, "STEPS", 4)
    monkeypatch.setattr(bench, "ROUNDS", 3)
    monkeypatch.setattr(bench, "FLOPS_BATCH", 64)
    monkeypatch.setattr(bench, "FLOPS_STEPS", 2)
    monkeypatch.setattr(bench, "PEAK_SIZE", 64)
    results = bench.measure()
    rates = results["run_steps_per_s"]
    assert set(rates) == {"naive_loop", "scan", "scan_vmap", "torch_eager"}
    if rates["torch_eager"] is not None:  # the same contenders (matmuls_only is apart)
        assert set(results["speedup_vs_torch_eager"]) == set(rates)
        assert set(results["speedup_vs_torch_eager_per_round"]) == set(rates)
    alone = results["matmuls_only"]
    assert alone["run_steps_per_s"] > 0
    if rates["torch_eager"] is None:
        assert alone["speedup_vs_torch_eager"] is alone["speedup_vs_torch_eager_per_round"] is None
    else:
        assert len(alone["speedup_vs_torch_eager_per_round"]) == 3
        assert alone["speedup_vs_torch_eager"] == pytest.approx(
            statistics.median(alone["speedup_vs_torch_eager_per_round"])
        )
    assert all(rates[name] > 0 for name in ("naive_loop", "scan", "scan_vmap"))
    if rates["torch_eager"] is None:
        assert results["speedup_vs_torch_eager"] is None
        assert results["speedup_vs_torch_eager_per_round"] is None
    else:
        assert results["speedup_vs_torch_eager"]["torch_eager"] == 1.0
        assert all(len(r) == 3 for r in results["speedup_vs_torch_eager_per_round"].values())
    assert results["gflops"]["scan_vmap_batch_1024"] > 0 and results["gflops"]["matmul_peak"] > 0
    assert results["config"]["vmap_runs"] == bench.VMAP_RUNS == 8
    assert results["gflops"]["flops_per_run_step"] == 82_000 * 64
    # The batch-32 FLOP rates are the timed throughputs times the FLOPs of a batch-32 run-step.
    assert results["gflops"]["scan_vmap_batch_32"] == pytest.approx(
        rates["scan_vmap"] * 82_000 * 32 / 1e9
    )
    if rates["torch_eager"] is None:
        assert results["gflops"]["torch_eager_batch_32"] is None
    else:
        assert results["gflops"]["torch_eager_batch_32"] == pytest.approx(
            rates["torch_eager"] * 82_000 * 32 / 1e9
        )
    assert results["config"]["devices"] == [str(d) for d in devices[:2]]
    json.dumps(results, allow_nan=False)
    assert "| scan_vmap |" in bench.table(results)


def test_bench_flops_count_the_eight_matmuls_of_a_step():
    """Per example: each layer's forward product and kernel gradient, 2 x n_in x n_out FLOPs each,
    and the input gradients of the second and third layers (the data's is not computed)."""
    import jax
    import jax.numpy as jnp

    from experiments import bench, train

    params, _ = train._init_seed(jnp.int32(0), model="mlp", input_shape=(40,), num_classes=10)
    forward = 2 * (40 * 100 + 100 * 100 + 100 * 10)
    assert bench._flops_per_example(params) == 2 * forward + 2 * (100 * 100 + 100 * 10) == 82_000
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)  # as the engine's state holds them
    assert bench._flops_per_example(stacked) == 82_000


def test_bench_matmuls_only_computes_the_steps_eight_products():
    """Three steps of two runs against float64 NumPy: the forward products, the input gradients of
    the 2nd and 3rd kernels, the kernel gradients, the update, and the next batch of data (the
    third step's is the first again: the data's 9 examples hold 2 whole batches of 4)."""
    import jax.numpy as jnp

    from experiments import bench

    rng = np.random.default_rng(0)
    shapes = {"hidden1": (6, 5), "hidden2": (5, 5), "out": (5, 3)}
    kernels = {k: rng.normal(size=(2, *shape)).astype(np.float32) for k, shape in shapes.items()}
    # each run's own data: 2 batches of 4 and one example left over; large, so a step moves
    # kernels well above rounding
    x = (30 * rng.normal(size=(2, 9, 6))).astype(np.float32)
    got = bench._matmul_chunk(
        {k: jnp.asarray(v) for k, v in kernels.items()}, jnp.asarray(x), length=3, batch_size=4
    )
    for run in range(2):
        w = {k: v[run].astype(np.float64) for k, v in kernels.items()}
        for step in range(3):
            xb = x[run, 4 * (step % 2) : 4 * (step % 2) + 4].astype(np.float64)
            h1 = xb @ w["hidden1"]
            h2 = h1 @ w["hidden2"]
            g3 = h2 @ w["out"]
            g2 = g3 @ w["out"].T
            g1 = g2 @ w["hidden2"].T
            grads = {"hidden1": xb.T @ g1, "hidden2": h1.T @ g2, "out": h2.T @ g3}
            moved = {k: w[k] - 1e-6 * grads[k] for k in w}
            if step == 2:  # the change is the gradient's, not the rounding of the kernels
                for k in w:
                    change = np.asarray(got[k][run], np.float64) - w[k]
                    np.testing.assert_allclose(change, moved[k] - w[k], rtol=1e-3)
            w = moved
        for k in w:
            np.testing.assert_allclose(np.asarray(got[k][run]), w[k], rtol=1e-6, atol=1e-6)


def test_bench_matmuls_only_multiplies_each_runs_own_batch():
    """Each of the eight products is one per run, its batch dimension the runs, as in the engine,
    where each run draws its own batches: with one batch for all runs, the first layer's forward
    product and kernel gradient were each one matmul of every run's kernels at once
    ([32, 40] x [40, 8 x 100]), a program other than the step's."""
    import jax

    from experiments import bench

    _, state, _, (x, _) = bench._engine(8, bench.BATCH, jax.devices()[:1])
    traced = []
    real = bench._matmul_chunk

    def traced_chunk(kernels, x, **kwargs):
        traced.append(jax.make_jaxpr(functools.partial(real, **kwargs))(kernels, x))
        return real(kernels, x, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "_matmul_chunk", traced_chunk)
        bench._matmuls_only(state, x)(2)

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    found = list(dots(traced[0].jaxpr))
    assert len(found) == 3 + 2 + 3 * 2  # kernel gradients: the CPU and the default branch
    for eqn in found:
        (_, batch) = eqn.params["dimension_numbers"]
        assert batch == ((0,), (0,)), eqn
        assert [v.aval.shape[0] for v in eqn.invars] == [8, 8], eqn


def test_bench_matmuls_only_runs_as_many_steps_of_every_run_as_it_is_timed_for(monkeypatch):
    """The rate is VMAP_RUNS x steps / time: the runner must run all the engine's kernels (every
    run, not one) for the steps asked, at the benchmark's batch size, on the flattened data."""
    import types

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments import bench, train

    params, _ = train._init_seed(jnp.int32(0), model="mlp", input_shape=(40,), num_classes=10)
    state = types.SimpleNamespace(params=jax.tree.map(lambda a: jnp.stack([a] * 8), params))
    calls = []
    monkeypatch.setattr(bench, "_matmul_chunk", lambda *a, **kw: calls.append((a, kw)) or a[0])
    x = jnp.zeros((100, 40, 1))
    bench._matmuls_only(state, x)(7)
    [((kernels, got_x), kwargs)] = calls
    expected = nnx.to_pure_dict(state.params)
    assert kwargs == {"length": 7, "batch_size": bench.BATCH}
    assert got_x.shape == (8, 100, 40)  # each run its own copy of the flattened data
    assert sorted(kernels) == sorted(expected)
    for name, layer in expected.items():
        assert kernels[name].shape[0] == 8  # all the runs
        np.testing.assert_array_equal(kernels[name], layer["layer"]["kernel"])


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_bench_matmuls_only_forms_the_kernel_gradients_as_the_engine_does(platform):
    # On CPU the engine's kernel gradients multiply a materialized x^T (models.kernel_gradient):
    # the bound it gives is for those products as XLA compiles them in the step, not other ones.
    import jax.numpy as jnp

    from experiments import bench

    kernels = {k: jnp.ones((2, 4, 4)) for k in ("hidden1", "hidden2", "out")}
    lowered = bench._matmul_chunk.trace(kernels, jnp.ones((2, 8, 4)), length=1, batch_size=4).lower(
        lowering_platforms=(platform,)
    )
    assert lowered.as_text().count("optimization_barrier") == (3 if platform == "cpu" else 0)


@pytest.mark.parametrize(("n", "used"), [(1, 1), (2, 2), (3, 2), (4, 4), (6, 4), (8, 8), (16, 8)])
def test_bench_shards_its_8_runs_over_devices_that_divide_them(n, used):
    from experiments import bench

    assert bench._engine_devices(list(range(n))) == list(range(used))


def test_bench_torch_eager_trains_as_the_engine_does(monkeypatch):
    """The torch contender is the engine's run 0 (model, initial weights, optimizer math): given
    the engine's data order, its losses are the engine's to float32 rounding (steps 2 to 4 follow
    the updates, so a wrong learning rate, momentum or weight layout fails)."""
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    from experiments import bench, train

    steps = 4  # as test_bench_measures_every_contender times it: its compiled scan is reused
    with jax.threefry_partitionable(False):
        _, state, st, (x, y) = bench._engine(1, bench.BATCH, jax.devices()[:1])
        _, engine_losses, _ = train._train_chunk(state, jnp.int32(0), x, y, st=st, length=steps)
        perm = np.asarray(train._epoch_perm(state.data_key[0], jnp.int32(0), st.n_train))
    monkeypatch.setattr(torch, "randperm", lambda n, generator: torch.from_numpy(perm.copy()))
    losses = []
    cross_entropy = torch.nn.functional.cross_entropy

    def recorded(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recorded)
    threads = torch.get_num_threads()
    try:
        bench._torch_eager(state)(steps)
    finally:
        torch.set_num_threads(threads)
    engine_losses = np.asarray(engine_losses)[0]
    np.testing.assert_allclose(losses, engine_losses, rtol=1e-5)


def test_bench_without_torch_reports_null(monkeypatch):
    """The bookkeeping without torch (the runners are stand-ins): nulls, valid JSON, a table."""
    import types

    import jax
    import jax.numpy as jnp

    from experiments import bench, train

    params, _ = train._init_seed(jnp.int32(0), model="mlp", input_shape=(40,), num_classes=10)
    state = types.SimpleNamespace(params=jax.tree.map(lambda a: jnp.stack([a] * 8), params))
    runner = lambda steps: None
    monkeypatch.setattr(bench, "_engine", lambda *args: (runner, state, None, (None, None)))
    monkeypatch.setattr(bench, "_naive_loop", lambda device: runner)
    monkeypatch.setattr(bench, "_matmuls_only", lambda state, x: runner)
    monkeypatch.setattr(bench, "_matmul_gflops", lambda devices: 1e3)
    monkeypatch.setattr(bench, "_seconds", lambda fn, steps: 0.5)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    results = bench.measure()
    assert results["run_steps_per_s"]["torch_eager"] is None
    assert results["run_steps_per_s"]["scan_vmap"] == 8 * bench.STEPS / 0.5
    assert results["speedup_vs_torch_eager"] is None
    assert results["speedup_vs_torch_eager_per_round"] is None
    assert results["matmuls_only"] == {
        "run_steps_per_s": 8 * bench.STEPS / 0.5,
        "speedup_vs_torch_eager": None,
        "speedup_vs_torch_eager_per_round": None,
    }
    json.loads(json.dumps(results, allow_nan=False))
    assert "| torch_eager | n/a (torch not installed) | n/a | n/a |" in bench.table(results)


@pytest.mark.parametrize("command", ["bench", "bench-transform"])
def test_bench_ctrl_c_says_nothing_is_kept(command, monkeypatch, capsys):
    """No "rerun to resume" (the main job's line): a benchmark keeps nothing to resume."""
    from experiments import bench, bench_transform

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "measure", interrupted)
    monkeypatch.setattr(bench_transform, "measure", interrupted)
    code, captured = main_in_process([command, "--json"], capsys)
    assert code == cli.INTERRUPTED == 130
    assert captured.out == ""
    assert captured.err == "interrupted; nothing was measured\n"


def test_usable_cores_without_cpu_affinity(monkeypatch):
    # macOS and Windows have no os.sched_getaffinity; every command sizes the CPU devices first.
    assert cli.usable_cores() >= 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cli.usable_cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cli.usable_cores() == 1


def test_ctrl_c_stops_the_nqm_workers_at_once(tmp_path, env):
    """A terminal's Ctrl-C reaches the whole process group: one line, exit 130, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", "nqm", "--out", str(out), "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    time.sleep(8)  # the workers are spawned and tuning (the whole job takes about a minute)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # it used to wait for the batch sizes in progress
    assert proc.returncode == 130
    assert err.splitlines() == ["interrupted; nothing was written"]
    assert not (out / "nqm.json").exists()


@pytest.mark.parametrize(
    ("text", "value"), [("0.1", 0.1), (" 1e-3 ", 1e-3), (".5", 0.5), ("5.", 5.0), ("1E+2", 100.0)]
)
def test_finite_float_takes_plain_decimal_numbers(text, value):
    assert cli.finite_float(text) == value


@pytest.mark.parametrize("command", [[], ["quadratic"], ["nqm"], ["sweep"], ["baselines"]])
def test_an_out_holding_a_null_character_is_refused_when_parsed(
    command, tmp_path, capsys, monkeypatch
):
    # No shell passes one, but main(argv) takes any string: it was accepted, and quadratic failed
    # with a ValueError traceback ("embedded null byte") when it wrote, after the work.
    import experiments.baselines
    import experiments.nqm
    import experiments.quadratic
    import experiments.study
    import experiments.sweep

    for module in (
        experiments.baselines, experiments.nqm, experiments.quadratic, experiments.study,
        experiments.sweep,
    ):  # fmt: skip
        monkeypatch.setattr(module, "run", lambda args: 0)  # the old code ran them
    out = str(tmp_path / "a\x00b")
    code, captured = main_in_process([*command, "--out", out], capsys)
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: argument --out: ") and "null" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_a_coordinator_without_a_port_is_one_error_line(tmp_path, capsys):
    # jax.distributed.initialize took the text after its last ":" as the port: an IndexError
    # traceback (exit status 1) for an address without one.
    argv = ["sweep", "--dataset", "digits", "--out", str(tmp_path / "out"), "--coordinator"]
    job = ["--num-processes", "1", "--process-id", "0"]
    code, captured = main_in_process([*argv, "localhost", *job], capsys)
    assert code == 2 and captured.out == "" and list(tmp_path.iterdir()) == []
    assert captured.err == (
        "error: argument --coordinator: must be HOST:PORT with a port in [1, 65535], "
        "got 'localhost'\n"
    )


@pytest.mark.parametrize("address", ["localhost:", ":1234", "h:0", "h:65536", "h:x", "h:+1", "h"])
def test_coordinator_must_be_host_and_port(address):
    parser = cli.build_parser()
    with pytest.raises(cli.UsageError, match="argument --coordinator: must be HOST:PORT"):
        parser.parse_args(["sweep", "--out", "o", "--coordinator", address])
    for good in ("localhost:1234", "10.0.0.1:65535", "[::1]:1"):
        assert parser.parse_args(["sweep", "--out", "o", "--coordinator", good]).coordinator == good


@pytest.mark.parametrize("command", [[], ["quadratic"], ["sweep"], ["report", "DIR", "--export"]])
def test_an_out_the_file_system_cannot_name_is_refused_naming_the_option(command, tmp_path, capsys):
    # It was refused, but as the OSError of a stat, without the option: "error: [Errno 36] File
    # name too long: '...'".
    out = str(tmp_path / ("x" * 300))
    argv = [*command, out] if command[-1:] == ["--export"] else [*command, "--out", out]
    code, captured = main_in_process(argv, capsys)
    assert code == 2 and captured.out == "" and list(tmp_path.iterdir()) == []
    option = "--export" if command[:1] == ["report"] else "--out"
    assert captured.err == f"error: argument {option}: {out!r}: File name too long\n"


@pytest.mark.parametrize(
    "extra", [["--inner", "5"], ["--scale", "0.001"], ["--no-torch"], ["--json", "--inner=1"]]
)
def test_bench_transform_eager_refuses_the_options_it_does_not_use(extra, capsys, monkeypatch):
    # --eager times its own shapes and contenders: these were ignored without a word.
    import experiments.bench_transform

    monkeypatch.setattr(experiments.bench_transform, "measure_eager", lambda repeats: 1 / 0)
    code, captured = main_in_process(["bench-transform", "--eager", *extra], capsys)
    option = next(a for a in extra if a != "--json").split("=")[0]
    assert (code, captured.out) == (2, "")
    assert captured.err == f"error: {option} is not used with --eager\n"


@pytest.mark.parametrize("blocker", ["figures", "report.md", "figures/b.png"])
def test_report_export_refused_midway_copies_nothing(blocker, tmp_path, capsys, monkeypatch):
    # A file where the figures' folder goes, or a folder where a file goes, failed with an
    # OSError after the files before it were copied and the report's lines were printed.
    from experiments import report

    study, dest = tmp_path / "study", tmp_path / "dest"
    (study / "figures").mkdir(parents=True)
    for name in ("report.md", "verdicts.json", "figures/a.png", "figures/b.png"):
        (study / name).write_text(name)
    (dest / blocker).parent.mkdir(parents=True, exist_ok=True)
    (dest / blocker).mkdir() if blocker.endswith((".md", ".png")) else (dest / blocker).write_text(
        ""
    )
    monkeypatch.setattr(report, "build", lambda out: Path(out) / "report.md")  # a study's work
    monkeypatch.setattr(report, "summary", lambda out: "summary")
    before = sorted(dest.rglob("*"))
    code, captured = main_in_process(["report", str(study), "--export", str(dest)], capsys)
    assert (code, captured.out) == (2, "") and sorted(dest.rglob("*")) == before
    assert captured.err.startswith("error: --export: cannot export ") and blocker in captured.err
    assert captured.err.count("\n") == 1
    assert report.export(study, tmp_path / "elsewhere") == [
        tmp_path / "elsewhere" / name
        for name in ("report.md", "verdicts.json", "figures/a.png", "figures/b.png")
    ]


def test_report_of_an_empty_dir_is_refused(tmp_path, capsys, monkeypatch):
    # As --out '' is: `report "$DIR"` with DIR unset rebuilt the report of the working directory.
    from experiments import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "build", lambda out: Path(out) / "report.md")  # a study's work
    monkeypatch.setattr(report, "summary", lambda out: "summary")
    code, captured = main_in_process(["report", ""], capsys)
    assert (code, captured.out) == (2, "")
    assert captured.err == "error: argument DIR: must be a directory path, got ''\n"


HUGE = "9" * 5000  # more digits than int() converts (4300 by default)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "--steps", HUGE], "argument --steps: must be an integer < 2**31"),
        (
            ["sweep", "--batch-sizes", f"8,{HUGE}"],
            "argument --batch-sizes: must be an integer < 2**31",
        ),
        (["nqm", "--batch-sizes", HUGE], "argument --batch-sizes: must be an integer < 2**53"),
        (["quadratic", "--steps", HUGE], "argument --steps: must be an integer <= 100_000"),
        (["quadratic", "--seeds", HUGE], "argument --seeds: must be an integer <= 10_000"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else "",
)
def test_an_integer_of_very_many_digits_is_refused_as_too_large(argv, message, tmp_path, capsys):
    # int() refused it with a ValueError, which argparse reported as "invalid positive_int value"
    # (nqm: "invalid functools.partial(<function positive_int_list at 0x...>, ...) value").
    code, captured = main_in_process([argv[0], "--out", str(tmp_path / "out"), *argv[1:]], capsys)
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {message}, got '999"), captured.err[:200]
    assert list(tmp_path.iterdir()) == []


def test_finite_float_minus_zero_is_zero():
    assert math.copysign(1.0, cli.finite_float("-0")) == 1.0  # one value, one run id


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "{out}"],
        ["sweep", "--dataset", "digits", "--out", "{out}"],
        ["nqm", "--out", "{out}"],
        ["quadratic", "--out", "{out}"],
        ["baselines", "--out", "{out}"],
        ["report", "{tmp}", "--export", "{out}"],
    ],
    ids=lambda argv: argv[0],
)
def test_out_under_an_unknown_users_home_is_one_error_line(argv, tmp_path, capsys, monkeypatch):
    # Path.expanduser raised RuntimeError ("Could not determine home directory") for ~someone
    # who is not a user: a traceback and exit status 1.
    monkeypatch.chdir(tmp_path)
    out = "~no_such_user_of_this_machine/results"
    argv = [a.replace("{out}", out).replace("{tmp}", str(tmp_path)) for a in argv]
    code, captured = main_in_process(argv, capsys)
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: argument --") and captured.err.count("\n") == 1
    assert "~no_such_user_of_this_machine" in captured.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [[], ["sweep"], ["baselines"], ["nqm"], ["quadratic"]])
def test_out_that_is_a_broken_symbolic_link_is_refused_when_parsed(command, tmp_path, capsys):
    # It passed the check (it does not "exist"), so the work ran and only the final mkdir failed:
    # "error: [Errno 17] File exists", after minutes of training for baselines.
    out = tmp_path / "link"
    out.symlink_to(tmp_path / "nowhere")
    code, captured = main_in_process([*command, "--out", str(out)], capsys)
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: argument --out: ") and captured.err.count("\n") == 1
    assert "broken symbolic link" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


@pytest.mark.parametrize("batch_size", [str(2**53), "9" * 400])
def test_nqm_batch_sizes_beyond_exact_float64_are_refused(batch_size, tmp_path, capsys):
    # The closed form computes with B as a float64: a batch size of 400 digits was an
    # OverflowError traceback ("int too large to convert to float").
    out = tmp_path / "out"
    argv = ["nqm", "--out", str(out), "--batch-sizes", f"1,{batch_size}", "--dim", "1"]
    code, captured = main_in_process([*argv, "--betas", "0", "--workers", "1"], capsys)
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: argument --batch-sizes: must be an integer < 2**53")
    assert captured.err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("damage", ["corrupt runs.jsonl", "runs.jsonl a folder", "curves a file"])
def test_a_refused_store_is_left_as_it_was(damage, tmp_path, capsys):
    # The store was refused only after it had made DIR/.lock and DIR/curves/ in it.
    out = tmp_path / "out"
    out.mkdir()
    if damage == "corrupt runs.jsonl":
        (out / "runs.jsonl").write_bytes(b"garbage\n{}\n")
    elif damage == "runs.jsonl a folder":
        (out / "runs.jsonl").mkdir()
    else:
        (out / "curves").write_text("x")
    before = sorted(p.name for p in out.iterdir())
    args = ["sweep", *BAD_INPUT_BASE, "--out", str(out), "--batch-sizes", "16", "--lrs", "0.1"]
    code, captured = main_in_process(args, capsys)
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_refused_store_keeps_a_lock_file_it_did_not_make(tmp_path):
    (tmp_path / "runs.jsonl").write_bytes(b"garbage\n{}\n")
    (tmp_path / store.LOCK_FILE).write_bytes(b"")
    with pytest.raises(store.CorruptStoreError):
        store.ResultStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.LOCK_FILE, "runs.jsonl"]
    with store.ResultStore(tmp_path / "new"):  # and one that opens keeps its own
        pass
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        store.LOCK_FILE, "curves", "runs.jsonl"
    ]  # fmt: skip


def test_a_path_that_is_not_utf8_is_printed_as_its_bytes(tmp_path, monkeypatch):
    # Python decodes such a path's bytes as surrogates, which a UTF-8 stdout refuses (the usual
    # "strict" errors of a UTF-8 locale): the results were written, then printing where was a
    # UnicodeEncodeError traceback, exit status 1.
    out = tmp_path / os.fsdecode(b"out\xff")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(["quadratic", "--out", str(out), "--steps", "2", "--seeds", "1"]) == 0
    stdout.flush()
    assert os.fsencode(out / "quadratic.json") in stdout.buffer.getvalue()
    assert sys.stdout is stdout and stdout.errors == "strict"  # as it was


def _run_main_with(setup):
    """``python -m experiments`` in a subprocess, after the Python code ``setup`` (which sees
    ``cli`` and may replace ``cli.main``)."""
    code = (
        "import runpy\n"
        "from experiments import cli\n"
        f"{setup}"
        "runpy.run_module('experiments', run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_an_interrupted_command_exits_without_the_interpreters_finalization():
    # A Ctrl-C during an XLA compilation cuts it short while its compiler threads run on; the
    # interpreter's finalization then crashed the process with SIGSEGV after "interrupted" was
    # printed (3 of 26 SIGINTs to the main job; exit -11 instead of 130). It now exits at once,
    # without finalizing: every result was stored and synced before.
    done = _run_main_with(
        "import atexit, sys\n"
        "atexit.register(lambda: print('finalized', flush=True))\n"
        "cli.main = lambda: (print('out', end=''), sys.stderr.write('interrupted'), 130)[-1]\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (130, "out", "interrupted")


@pytest.mark.parametrize("status", [0, 130])
def test_a_ctrl_c_after_the_command_is_done_is_ignored(status):
    # The command's results were written and reported; a Ctrl-C in the interpreter's finalization
    # (jax's atexit clean-up, about 0.7 s) printed "Exception ignored in atexit callback" with a
    # traceback, or killed the process (exit -2). A second Ctrl-C after an interrupt, in the
    # collection before the exit, printed "Exception ignored in: _xla_gc_callback" with one.
    done = _run_main_with(
        "import atexit, gc, os, signal, time\n"
        "def ctrl_c(*args):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.05)\n"
        "    print('done', end='', flush=True)\n"
        "def in_gc(phase, info):\n"
        "    gc.callbacks.remove(in_gc)\n"
        "    ctrl_c()\n"
        "def main():\n"
        "    print('out', end='')\n"
        "    atexit.register(ctrl_c)\n"
        "    gc.callbacks.append(in_gc)\n"
        f"    return {status}\n"
        "cli.main = main\n"
    )
    assert (done.returncode, done.stderr) == (status, "")
    assert done.stdout.startswith("outdone")  # the Ctrl-C landed after main returned


def test_a_ctrl_c_that_escapes_main_is_no_traceback():
    # A second Ctrl-C while main wrote the first's line escaped it: a KeyboardInterrupt traceback.
    done = _run_main_with("def main():\n    raise KeyboardInterrupt\ncli.main = main\n")
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "")


FUZZ_VALUES = [
    "", " ", "-1", "0", "1", "-0", "1e309", "nan", "inf", "0x10", "1_000", "\u0661\u0662", "3\n",
    "a\rb", "1e-50", "0.5", "0.9", "2147483648", "9" * 5000, "~", "~/x", "~nosuchuser/x", ",",
    "1,,2", "1,1", "auto", "--", "-x", "o", "o/p", "\x00", "é", ".", "..", "linear,mlp", "mlp,mlp",
    "digits", "idx", "full", "localhost:1", "x" * 300,
]  # fmt: skip


@functools.cache
def fuzz_parsers():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {None: parser, **subparsers.choices}


@hypothesis.strategies.composite
def fuzz_argv(draw):
    st = hypothesis.strategies
    command = draw(st.sampled_from(list(fuzz_parsers())))
    actions = [a for a in fuzz_parsers()[command]._actions if a.option_strings]
    everyone = sorted({s for p in fuzz_parsers().values() for s in p._option_string_actions})
    argv = [] if command is None else [command]
    value = st.one_of(st.sampled_from(FUZZ_VALUES), st.text(max_size=6))
    for _ in range(draw(st.integers(0, 5))):
        how = draw(st.integers(0, 5))
        if how == 0:  # a bare value, "--", or another command's option
            argv.append(draw(st.one_of(value, st.sampled_from(["--", *everyone]))))
            continue
        action = draw(st.sampled_from(actions))
        option = draw(st.sampled_from(action.option_strings))
        if how == 1 and option.startswith("--"):  # an abbreviation
            option = option[: draw(st.integers(3, len(option)))]
        if action.nargs == 0:
            argv.append(option)
        elif draw(st.booleans()):
            argv.append(f"{option}={draw(value)}")
        else:
            argv += [option, draw(value)]
    if command == "report" and draw(st.booleans()):
        argv.insert(1, draw(value))
    return argv


@hypothesis.settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(draws=hypothesis.strategies.data())
def test_fuzzed_arguments_are_taken_or_refused_in_one_line(draws, tmp_path, monkeypatch):
    # Only argparse and the options' types run here: each command's run is replaced. What one
    # accepts, it gets: every option as spelled in full, and an --out it can create.
    fuzz_parsers()  # built here, not in the strategy: importing the commands uses `random`
    argv = draws.draw(fuzz_argv(), label="argv")
    work, home = tmp_path / "work", tmp_path / "home"
    for folder in (work, home):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    accepted = []

    def run(args):
        accepted.append(args)
        for name in ("out", "export"):
            path = getattr(args, name, None)
            if path is not None and tmp_path in Path(os.path.abspath(path)).parents:
                path.mkdir(parents=True, exist_ok=True)  # no ValueError (a null character)
        return 0

    for _, module in [(None, cli.MAIN_JOB), *cli.COMMANDS]:
        monkeypatch.setattr(importlib.import_module(module), "run", run)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    out, err = out.getvalue(), err.getvalue()
    assert code in (0, 2), (argv, code)
    if code == 2:
        assert out == "" and not accepted and not any(work.iterdir()) and not any(home.iterdir())
        assert err.startswith("error: ") and len(err.splitlines()) == 1, (argv, err)
        assert not re.search(r"invalid \S+ value", err), err  # a type's ValueError, unexplained
    elif accepted:
        given = argv[: argv.index("--")] if "--" in argv else argv
        spelled = [a.split("=")[0] for a in given if a.startswith("--") and a != "--"]
        parsers = [fuzz_parsers()[None], fuzz_parsers()[accepted[0].command]]
        assert all(any(o in p._option_string_actions for p in parsers) for o in spelled), argv


# Each command that writes into DIR besides sweep (the store locks) and the main job, with the
# smallest settings it takes.
WRITERS = {
    "quadratic": ["quadratic", "--steps", "2", "--seeds", "1"],
    "nqm": ["nqm", "--batch-sizes", "4", "--betas", "0", "--dim", "1", "--workers", "1"],
    "baselines": [
        "baselines", "--dataset", "digits", "--models", "linear", "--steps", "1", "--seeds", "1",
    ],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_command_writing_into_a_locked_directory_is_refused(
    command, tmp_path, capsys, monkeypatch
):
    # They wrote into DIR while the main job (or a sweep) held its lock, as into any other:
    # results written behind the main job's back, and its clean-up of temporary files could
    # remove theirs while they were being written. Refused before the work, not after it.
    def work(*args, **kwargs):
        raise AssertionError("worked before refusing the locked directory")

    work_of = {"quadratic": "study", "nqm": "study", "baselines": "run_baselines"}
    monkeypatch.setattr(importlib.import_module(f"experiments.{command}"), work_of[command], work)
    (tmp_path / "keep.json").write_text("{}")
    held = store.lock_directory(tmp_path)  # as another process writing DIR would
    try:
        code, captured = main_in_process([*WRITERS[command], "--out", str(tmp_path)], capsys)
    finally:
        os.close(held)
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "is in use by another process" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.LOCK_FILE, "keep.json"]


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_command_holds_the_lock_while_it_runs(command, tmp_path, capsys, monkeypatch):
    # Taken before the work (refused at once, not after it), held until the results are written,
    # released at the end; the hidden temporary files a killed run of the command left (never
    # read: nothing else removed them) are removed once it holds the lock.
    out = tmp_path / "out"
    out.mkdir()
    names = {"quadratic": ["json", "png"], "nqm": ["json", "png"], "baselines": ["json"]}
    for suffix in names[command]:  # each file the command writes
        (out / f".{command}.{suffix}.a1b2c3.tmp").write_bytes(b"half")
    (out / "other.tmp").write_bytes(b"kept")
    real = store.write_bytes
    locked = []

    def write_bytes(path, data):
        with pytest.raises(store.StoreLockedError):
            os.close(store.lock_directory(out))
        locked.append(path)
        real(path, data)

    monkeypatch.setattr(store, "write_bytes", write_bytes)
    code, captured = main_in_process([*WRITERS[command], "--out", str(out)], capsys)
    assert code == 0, captured.err
    assert locked
    os.close(store.lock_directory(out))  # released
    left = {p.name for p in out.iterdir()} - {store.LOCK_FILE}
    assert sorted(left) == sorted({"other.tmp", f"{command}.json"} | (
        set() if command == "baselines" else {f"{command}.png"}
    ))  # fmt: skip


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_new_directory_is_made_and_locked_only_to_write(command, tmp_path, capsys, monkeypatch):
    # A DIR that does not exist yet is made only when the results are written: killed during
    # the work (SIGKILL, SIGTERM), a command leaves nothing behind. If another process made and
    # locked it meanwhile, the command is refused then, writing nothing.
    out = tmp_path / "new" / "out"
    module = importlib.import_module(f"experiments.{command}")
    name = {"quadratic": "study", "nqm": "study", "baselines": "run_baselines"}[command]
    work = getattr(module, name)
    held = []

    def other_process_meanwhile(*args, **kwargs):
        assert not (tmp_path / "new").exists()
        result = work(*args, **kwargs)
        out.mkdir(parents=True)
        held.append(store.lock_directory(out))
        return result

    monkeypatch.setattr(module, name, other_process_meanwhile)
    try:
        code, captured = main_in_process([*WRITERS[command], "--out", str(out)], capsys)
    finally:
        os.close(held.pop())
    assert code == 2 and captured.out == ""  # after the work's progress bars, one error line:
    assert captured.err.splitlines()[-1].startswith("error: ")
    assert "is in use by another process" in captured.err.splitlines()[-1]
    assert [p.name for p in out.iterdir()] == [store.LOCK_FILE]


@pytest.mark.parametrize("stop", ["full disk", "Ctrl-C"])
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_command_stopped_while_writing_a_new_directory_leaves_nothing(
    command, stop, tmp_path, capsys, monkeypatch
):
    # The lock made DIR (and its missing parents) and DIR/.lock just before the first write; a
    # write that fails, or a Ctrl-C then, must not leave them behind ("nothing was written").
    out = tmp_path / "new" / "out"

    def write_bytes(path, data):
        if stop == "Ctrl-C":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "write_bytes", write_bytes)
    code, captured = main_in_process([*WRITERS[command], "--out", str(out)], capsys)
    assert (code, captured.out) == ((130, "") if stop == "Ctrl-C" else (2, ""))
    last = captured.err.splitlines()[-1]  # after the work's progress bars
    assert last.startswith("interrupted") if stop == "Ctrl-C" else "No space left" in last
    assert [p.name for p in tmp_path.iterdir()] == []
