"""Tests for the closed-form noisy quadratic model (experiments/nqm.py)."""

import argparse
import io
import json
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import nqm


def _monte_carlo_losses(lr, beta, batch_size, h, steps, samples, seed=0):
    """Simulates heavy-ball on the NQM: x' = x + b (x - x_prev) - a (h x + noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, h.size))
    x_prev = x.copy()
    losses = [0.5 * (x**2 @ h)]
    for _ in range(steps):
        noise = rng.normal(size=x.shape) * np.sqrt(h / batch_size)
        x, x_prev = x + beta * (x - x_prev) - lr * (h * x + noise), x
        losses.append(0.5 * (x**2 @ h))
    return np.array(losses)  # [steps + 1, samples]


@pytest.mark.parametrize(("lr", "beta", "batch_size"), [(0.5, 0.0, 2.0), (0.2, 0.9, 4.0)])
def test_closed_form_matches_monte_carlo(lr, beta, batch_size):
    h = nqm.curvatures(4)
    steps = 60
    losses = _monte_carlo_losses(lr, beta, batch_size, h, steps, samples=100_000)
    mean = losses.mean(axis=1)
    stderr = losses.std(axis=1) / np.sqrt(losses.shape[1])
    expected = nqm.expected_loss_curve(lr, beta, batch_size, steps, h)
    # The chosen settings are far from steady state at first and noise-dominated
    # at the end, so both terms of the recursion are exercised.
    assert expected[-1] < 0.5 * expected[0]
    assert np.all(np.abs(mean - expected) < 5 * stderr + 1e-12)


def test_velocity_basis_and_sgd_map_match_the_stated_recursion():
    h = nqm.curvatures(30)
    for lr, beta in [(0.3, 0.95), (1.0, 0.5), (0.7, 0.0)]:
        reference = nqm.expected_loss_curve(lr, beta, 16.0, 400, h)
        matrix, offset = nqm._affine_map(np.array([lr]), np.array([beta]), 16.0, h)
        state = nqm._initial_state(offset)
        losses = [nqm._loss(state, h)[0]]
        for _ in range(400):
            state = nqm._apply(matrix, offset, state)
            losses.append(nqm._loss(state, h)[0])
        np.testing.assert_allclose(losses, reference, rtol=1e-9)


def test_sgd_recursion_is_the_b0_row():
    h = nqm.curvatures(5)
    matrix, noise = nqm.second_moment_map(np.array([0.3]), np.array([0.0]), 8.0, h)
    np.testing.assert_allclose(matrix[0, 0, 0], (1 - 0.3 * h) ** 2)
    np.testing.assert_allclose(matrix[0, 1:, 0], 0.0)
    np.testing.assert_allclose(noise[0, 0], 0.09 * h / 8.0)


@pytest.mark.parametrize(("lr", "beta"), [(0.4, 0.0), (0.05, 0.9), (0.8, 0.99)])
def test_stationary_loss_is_the_limit(lr, beta):
    h = nqm.curvatures(20)
    curve = nqm.expected_loss_curve(lr, beta, 32.0, 20_000, h)
    stationary = nqm.stationary_loss(np.array([lr]), np.array([beta]), 32.0, h)[0]
    assert curve[-1] == pytest.approx(stationary, rel=1e-6)


def test_steps_to_target_matches_step_by_step_iteration():
    h = nqm.curvatures(50)
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(60):
        lr = 10 ** rng.uniform(-2.5, 0.3)
        beta = float(rng.choice([0.0, 0.5, 0.9, 0.99]))
        batch_size = 2.0 ** rng.integers(0, 12)
        curve = nqm.expected_loss_curve(lr, beta, batch_size, 5000, h)
        got = nqm.steps_to_target([lr], beta, batch_size, h=h, max_steps=5000)[0]
        stationary = nqm.stationary_loss(np.array([lr]), np.array([beta]), batch_size, h)[0]
        hits = np.flatnonzero(curve <= nqm.TARGET_LOSS)
        if not nqm.stable([lr], [beta], h.max())[0] or stationary > nqm.TARGET_LOSS:
            assert got == np.inf
            continue
        if hits.size == 0:
            assert got == np.inf
            continue
        checked += 1
        step = int(got)
        # Always a crossing; the first one unless the loss dips below the target
        # and back inside one grid cell (possible with high momentum).
        assert curve[step] <= nqm.TARGET_LOSS < curve[step - 1]
        assert step >= hits[0]
        if beta == 0.0:
            assert step == hits[0]
    assert checked >= 20


def test_a_crossing_after_max_steps_is_not_reported():
    # Found by search: this SGD setting first reaches the target at step 5115, inside the
    # grid cell (4608, 5120] that the walk enters before max_steps = 5000.
    h, lr = nqm.curvatures(50), 0.013169211721850942
    curve = nqm.expected_loss_curve(lr, 0.0, 1e6, 5115, h)
    assert np.flatnonzero(curve <= nqm.TARGET_LOSS).tolist() == [5115]
    assert nqm.steps_to_target([lr], 0.0, 1e6, h=h, max_steps=5115)[0] == 5115
    assert nqm.steps_to_target([lr], 0.0, 1e6, h=h, max_steps=5114)[0] == np.inf
    assert nqm.steps_to_target([lr], 0.0, 1e6, h=h, max_steps=5000)[0] == np.inf


def test_a_transient_dip_below_the_target_does_not_count():
    # One underdamped coordinate: the mean of x oscillates through 0, so E[x^2] dips to the
    # accumulated noise variance before settling at the stationary value above the target.
    h = np.array([1.0])
    curve = nqm.expected_loss_curve(0.5, 0.9, 100.0, 200, h)
    stationary = nqm.stationary_loss(np.array([0.5]), np.array([0.9]), 100.0, h)[0]
    assert curve.min() < nqm.TARGET_LOSS < stationary
    assert nqm.steps_to_target([0.5], 0.9, 100.0, h=h)[0] == np.inf


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
def test_stability_boundary_is_where_the_heavy_ball_roots_leave_the_unit_circle(beta):
    # x' = (1 + b - a h) x - b x_prev: roots of z^2 - (1 + b - a h) z + b. Jury's test gives
    # |z| < 1 iff 0 < a h < 2 (1 + b); at a h = 2 (1 + b) one root is -1.
    h_max = 2.0
    limit = 2.0 * (1.0 + beta) / h_max
    lr = limit * np.array([1e-3, 0.5, 1 - 1e-6, 1 + 1e-6, 2.0])
    radius = [np.abs(np.roots([1.0, -(1.0 + beta - a * h_max), beta])).max() for a in lr]
    np.testing.assert_array_equal(nqm.stable(lr, beta, h_max), np.less(radius, 1.0))
    np.testing.assert_array_equal(nqm.stable(lr, beta, h_max), [True, True, True, False, False])
    # The second-moment map's eigenvalues are products of two roots: the same region.
    for a, r in zip(lr, radius, strict=True):
        matrix, _ = nqm.second_moment_map(np.array([a]), np.array([beta]), 1.0, np.array([h_max]))
        moments = np.abs(np.linalg.eigvals(matrix[:, :, 0, 0])).max()
        assert moments == pytest.approx(r**2, rel=1e-6)


def test_ema_learning_rate_of_a_row_gives_the_heavy_ball_path():
    # EMA form v = b v + (1 - b) g, theta -= eta v with eta = row's ema_lr must move like
    # heavy ball x' = x + b (x - x_prev) - a g with a = row's lr (REFERENCES section 1).
    rows = nqm.study([4, 1024], (0.0, 0.9), dim=50, refinements=0)
    settings = [(row["momentum_lr"], row["momentum_beta"], row["momentum_ema_lr"]) for row in rows]
    settings += [
        (entry["lr"], float(beta), entry["ema_lr"])
        for row in rows
        for beta, entry in row["by_beta"].items()
    ]
    assert any(beta == 0.9 for _, beta, _ in settings)
    h = 0.37
    for a, beta, eta in settings:
        theta, v = 1.0, 0.0
        x, x_prev = 1.0, 1.0
        for _ in range(25):
            v = beta * v + (1 - beta) * h * theta
            theta -= eta * v
            x, x_prev = x + beta * (x - x_prev) - a * h * x, x
            assert theta == pytest.approx(x, rel=1e-9, abs=1e-12)


def test_tuned_lr_is_as_good_as_a_dense_grid():
    # Large batch: the best momentum step lies above SGD's limit 2 / h_max, near 0.8 of
    # momentum's own limit 2 (1 + b) / h_max; small batch: far below it. The refined grid's
    # last spacing is 1/48 decade; the README reports tuning at most 2.5% above a dense grid.
    h = nqm.curvatures(1000)
    for batch_size in (16.0, 1e6):
        steps, _ = nqm.tune(batch_size, 0.9, h=h)
        limit = 2.0 * 1.9 / h.max()
        dense = nqm.steps_to_target(limit * np.geomspace(1e-3, 1 - 1e-9, 200), 0.9, batch_size, h=h)
        assert steps <= 1.025 * dense.min()


def test_unstable_settings_never_reach_the_target():
    steps = nqm.steps_to_target([2.5, 3.9, 4.1], [0.0, 0.99, 0.99], 1e6, h=nqm.curvatures(10))
    assert steps[0] == np.inf and np.isfinite(steps[1]) and steps[2] == np.inf


def test_stop_at_first_returns_only_the_fastest():
    h = nqm.curvatures(100)
    lr = np.array([0.01, 0.1, 1.0])
    full = nqm.steps_to_target(lr, 0.0, 1e4, h=h)
    first = nqm.steps_to_target(lr, 0.0, 1e4, h=h, stop_at_first=True)
    fastest = np.argmin(full)
    assert first[fastest] == full[fastest]
    assert np.all(np.delete(first, fastest) == np.inf)


def test_sgd_and_momentum_in_one_call_give_what_each_gives_alone():
    # beta broadcasts to [n], so one call may mix SGD (b = 0) with momentum: the walk then runs
    # every setting in the 3-moment velocity basis, and the bisection of a crossing cell must
    # too (it used the 1-moment SGD map on the SGD columns' 3 moments: 136, not 135).
    h = nqm.curvatures(50)
    lr, beta = np.array([0.5, 0.05, 0.3]), np.array([0.0, 0.9, 0.0])
    together = nqm.steps_to_target(lr, beta, 1e4, h=h, max_steps=5000)
    pairs = list(zip(lr, beta, strict=True))
    alone = [nqm.steps_to_target([a], b, 1e4, h=h, max_steps=5000)[0] for a, b in pairs]
    first = [
        np.flatnonzero(nqm.expected_loss_curve(a, b, 1e4, 5000, h) <= nqm.TARGET_LOSS)[0]
        for a, b in pairs
    ]
    np.testing.assert_array_equal(alone, first)
    np.testing.assert_array_equal(together, alone)


@pytest.mark.parametrize("batch_size", [float("nan"), 0.0, -1.0])
def test_a_batch_size_that_is_not_positive_is_refused(batch_size):
    # NaN failed no comparison, so every setting silently came back as inf ("never reached").
    with pytest.raises(ValueError, match="batch_size"):
        nqm.steps_to_target([0.1], 0.0, batch_size, h=nqm.curvatures(5))


@pytest.mark.parametrize("beta", [1.0, -0.1, float("nan")])
def test_study_refuses_a_beta_outside_0_1_before_tuning(beta, monkeypatch):
    # beta = 1 tuned every other beta first, then raised ZeroDivisionError at a / (1 - beta).
    monkeypatch.setattr(nqm, "tune", lambda *args, **kwargs: pytest.fail("tuned"))
    with pytest.raises(ValueError, match="betas"):
        nqm.study([4], (0.0, beta), dim=5)


def test_momentum_helps_only_at_large_batch():
    # The paper's model (d = 10^4). At B = 1 the noise floor, not curvature,
    # limits the step, and momentum's best is the same as SGD's (measured:
    # 0.04% apart); at B = 2^16 SGD is capped by a < 2 / h_max while momentum's
    # effective step a / (1 - b) is not (measured: 17x fewer steps).
    small_sgd, _ = nqm.tune(1, 0.0)
    small_mom, _ = nqm.tune(1, 0.9)
    assert abs(small_mom - small_sgd) < 0.01 * small_sgd
    large_sgd, _ = nqm.tune(2**16, 0.0)
    large_mom, _ = nqm.tune(2**16, 0.9)
    assert large_mom < 0.2 * large_sgd


def _run_cli(out, *argv):
    """``nqm --out OUT ARGV`` in this process (one worker); returns the rows of its nqm.json."""
    parser = argparse.ArgumentParser()
    nqm.add_arguments(parser)
    args = parser.parse_args(["--out", str(out), *argv])
    args.workers = 1
    assert nqm.run(args) == 0
    return json.loads((out / "nqm.json").read_text())


def test_cli_writes_json_and_figure(tmp_path, capsys):
    rows = _run_cli(tmp_path, "--batch-sizes", "1,2,4,8", "--dim", "100", "--betas", "0,0.9")
    assert [row["batch_size"] for row in rows] == [1, 2, 4, 8]
    keys = {"batch_size", "sgd_steps", "momentum_steps", "sgd_lr", "momentum_lr", "momentum_beta"}
    for row in rows:
        assert keys <= row.keys()
        assert row["momentum_steps"] <= row["sgd_steps"]  # beta = 0 is in the grid
    assert rows[0]["sgd_steps"] > rows[-1]["sgd_steps"]
    assert (tmp_path / "nqm.png").stat().st_size > 0
    assert "| 8 |" in capsys.readouterr().out


def test_workers_give_the_same_rows():
    serial = nqm.study([4, 64], (0.0, 0.9), dim=50)
    assert nqm.study([4, 64], (0.0, 0.9), dim=50, workers=2) == serial


_ANNOUNCE = """
import multiprocessing, sys, threading, time

def announce():
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.02)
    print(*(p.pid for p in multiprocessing.active_children()), flush=True)

threading.Thread(target=announce, daemon=True).start()
"""
# A study on 2 workers, each tuning one batch size for about 20 s.
_STUDY = "from experiments import nqm; nqm.study([2, 4], (0.0, 0.9), dim=100_000, workers=2)"
_CLI = (
    "from experiments import cli; sys.exit(cli.main(['nqm', '--out', sys.argv[1], "
    "'--batch-sizes', '2,4', '--betas', '0,0.9', '--dim', '100000', '--workers', '2']))"
)


def _cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _start_tuning(script, *args):
    """Runs ``script`` after :data:`_ANNOUNCE`; returns the process and its two workers' pids
    once both are tuning (past their start, which takes well under a second of CPU)."""
    root = os.path.dirname(os.path.dirname(nqm.__file__))
    env = os.environ | {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen(
        [sys.executable, "-c", _ANNOUNCE + script, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 60
    while min(_cpu_seconds(pid) for pid in workers) < 0.6:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return parent, workers


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")


@needs_proc
def test_workers_of_a_killed_parent_exit_at_once_and_quietly():
    # kill -9 (or an OOM kill) of the parent mid-run: the workers used to tune their batch size
    # to the end, then print a BrokenPipeError traceback each.
    parent, workers = _start_tuning(_STUDY)
    parent.kill()
    parent.wait()
    try:
        # The workers (and multiprocessing's resource tracker) hold the parent's stderr: it ends
        # when they have all exited.
        _, err = parent.communicate(timeout=10)
    finally:
        _kill(workers)
    assert "Traceback" not in err and "Error" not in err, err


def test_no_more_workers_than_batch_sizes(monkeypatch):
    # `nqm --workers 100000` started 100000 processes for 17 batch sizes.
    context = multiprocessing.get_context("spawn")
    started = []
    real_pool = type(context).Pool

    def pool(self, processes=None, *args, **kwargs):
        started.append(processes)
        return real_pool(self, processes, *args, **kwargs)

    monkeypatch.setattr(type(context), "Pool", pool)
    rows = nqm.study([4, 64], (0.0,), dim=20, workers=50)
    assert started == [2]
    assert rows == nqm.study([4, 64], (0.0,), dim=20)


@needs_proc
def test_a_killed_worker_is_an_error_not_a_hang(tmp_path):
    # A worker ended by the OOM killer or kill -9: the pool started a new one, the batch size in
    # progress was lost, and the parent waited for it forever.
    out = tmp_path / "out"
    parent, workers = _start_tuning(_CLI, str(out))
    os.kill(workers[0], signal.SIGKILL)
    try:
        stdout, err = parent.communicate(timeout=10)
    finally:
        _kill([parent.pid, *workers])
    assert parent.returncode == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"exit code -{signal.SIGKILL.value} " in err and "killed" in err
    assert not out.exists()


def test_cli_refuses_a_dimension_beyond_memory(tmp_path, capsys):
    # --dim 20000000 was a numpy MemoryError traceback (exit 1) once the tuning allocated its maps.
    from experiments import cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        cli.main(["nqm", "--out", str(out), "--dim", str(nqm.MAX_DIMENSION + 1)])
    code = exit.value.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and not out.exists()
    assert captured.err.startswith("error: argument --dim: ") and captured.err.count("\n") == 1


# Peak resident memory of one worker's tuning at ``dim``, in a fresh process: batch size 1 (the
# largest of the grid's; 65536 took about 25% less) and the default betas.
# (VmHWM: getrusage's ru_maxrss keeps the high-water mark of the process that forked this one.)
_MEMORY = """
import re, sys
from experiments import nqm
def peak():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read())[1]) * 1024
dim = int(sys.argv[1])
before = peak()
nqm.study([1], nqm.BETAS, dim=dim, workers=1)
print((peak() - before) / dim)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's /proc measures it")
def test_the_help_states_the_memory_a_worker_needs_per_dimension(capsys):
    """A code comment said about 4 kB per dimension and worker (5 GB at --dim 1000000); a worker
    took about 13.5 kB per dimension, and the help, with --workers one per core by default, did
    not say it. The figure the help gives is the one measured (here at d = 10^4, about 0.13 GB)."""
    from experiments import cli

    with pytest.raises(SystemExit):
        cli.main(["nqm", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    per_dim = nqm.MEMORY_PER_DIMENSION
    assert f"about {per_dim // 1000} kB of memory per dimension and worker" in help_text
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY, "10000"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert 0.7 * per_dim < float(done.stdout) < 1.1 * per_dim, done.stdout


def test_ctrl_c_while_the_figure_is_drawn_writes_nothing(tmp_path, monkeypatch, capsys):
    # Drawing takes a second or so; nqm.json used to be written before it, so a Ctrl-C there left
    # it behind while the CLI said "nothing was written".
    from matplotlib.figure import Figure

    from experiments import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    out = tmp_path / "out"
    argv = ["nqm", "--out", str(out), "--batch-sizes", "4,64", "--betas", "0", "--dim", "20"]
    code = cli.main([*argv, "--workers", "1"])
    assert code == cli.INTERRUPTED
    assert capsys.readouterr().err == nqm.ON_INTERRUPT + "\n"
    assert not out.exists()


def _section(rows):
    import types

    from experiments import report

    return report._nqm_section(types.SimpleNamespace(nqm=rows))


def test_the_figure_and_the_report_name_the_dimension_that_was_run(tmp_path, monkeypatch):
    # Both said "d = 10^4" whatever --dim was; nqm.json did not record it.
    from matplotlib.figure import Figure

    titles = []
    savefig = Figure.savefig

    def record(self, *args, **kwargs):
        titles.append(self.get_suptitle())
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    rows = nqm.study([4, 64], (0.0, 0.9), dim=20, refinements=0)
    assert all(row["dim"] == 20 for row in rows)
    nqm.write(rows, tmp_path)
    assert "d = 20," in titles[0] and "10^4" not in titles[0]
    text = _section(json.loads((tmp_path / "nqm.json").read_text()))
    assert "d = 20," in text and "10^4" not in text
    # nqm.json written before the dimension was recorded: the default it was run at.
    old = [{k: v for k, v in row.items() if k != "dim"} for row in rows]
    assert "d = 10000," in _section(old)


def test_the_report_section_with_fewer_than_two_batch_sizes_at_the_target():
    # It fitted steps vs batch size regardless: a ValueError (a TypeError when the first batch
    # size had not reached the target) that stopped the whole report.
    rows = nqm.study([4, 64], (0.0, 0.9), dim=20, refinements=0)
    for row in rows[:1]:
        row.update(sgd_steps=None, momentum_steps=None, sgd_lr=None, momentum_lr=None)
    text = _section(rows)
    assert "| 4 | - | - |" in text
    assert "at B = 64" in text and "B_crit: SGD not fitted, momentum not fitted" in text
    both = _section(nqm.study([4, 64], (0.0,), dim=20, refinements=0))
    assert "at B = 4," in both and "Fitted B_crit: SGD " in both
    one = _section(nqm.study([64], (0.0,), dim=20, refinements=0))
    assert "B_crit: SGD not fitted, momentum not fitted" in one


def test_rows_where_no_batch_size_reached_the_target_are_written_and_reported(tmp_path):
    # The figure's y limits were NaN: a ValueError once every step count was computed.
    rows = nqm.study([4, 64], (0.0, 0.9), dim=20, max_steps=10, refinements=0)
    assert all(row["sgd_steps"] is None and row["momentum_steps"] is None for row in rows)
    nqm.write(rows, tmp_path)
    assert (tmp_path / "nqm.png").read_bytes()[:4] == b"\x89PNG"
    text = _section(json.loads((tmp_path / "nqm.json").read_text()))
    assert "No batch size reached the target." in text and "| 64 | - | - |" in text


def test_default_workers_are_the_usable_cores(monkeypatch):
    # os.cpu_count() counts the machine's CPUs, not those the process may run on (taskset, a
    # batch scheduler's CPU set): 8 workers would share 2 cores.
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    parser = argparse.ArgumentParser()
    nqm.add_arguments(parser)
    assert parser.parse_args([]).workers == 2


def test_tuning_reaches_the_small_steps_of_a_beta_near_one():
    # At small batches the best heavy-ball step is about (1 - b) times SGD's (the same effective
    # step a / (1 - b)): for b = 0.99999 it lay below the coarse grid's 7 decades, and the beta
    # was reported as never reaching the target.
    h = nqm.curvatures(1000)
    steps, lr = nqm.tune(1, 0.99999, h=h)
    assert np.isfinite(steps)
    _, sgd_lr = nqm.tune(1, 0.0, h=h)
    assert 0.3 < lr / (1 - 0.99999) / sgd_lr < 3
    dense = nqm.steps_to_target(lr * np.geomspace(0.3, 3, 100), 0.99999, 1, h=h)
    assert steps <= 1.025 * dense.min()
    for beta in (1.0, 1.5):  # unstable at every step: not reached, as before
        steps, lr = nqm.tune(1, beta, h=h)
        assert steps == np.inf and np.isnan(lr)


def test_the_report_flags_a_tuned_beta_at_the_grid_edge_only_where_betas_were_tuned():
    # With one beta (nqm --betas 0) the section said "the tuned beta is the largest of the grid
    # (0) ... the optimum may lie beyond it": nothing was tuned.
    one = nqm.study([4, 64], (0.9,), dim=20, refinements=0)
    assert "largest of the grid" not in _section(one)
    two = nqm.study([4, 64], (0.5, 0.9), dim=20, refinements=0)
    at_edge = [row["batch_size"] for row in two if row["momentum_beta"] == 0.9]
    assert at_edge  # the check below is not vacuous
    text = _section(two)
    assert f"largest of the grid (0.9) at B = {', '.join(map(str, at_edge))}:" in text


def test_the_table_and_the_figure_show_a_beta_near_one_as_it_is(tmp_path, capsys, monkeypatch):
    # nqm takes any beta below 1 (its closed form is float64), but its table and figure wrote the
    # tuned beta with :g, so 0.9999999 was shown as 1, a beta the command refuses.
    (row,) = _run_cli(tmp_path, "--batch-sizes", "4096", "--dim", "10", "--betas", "0.9999999")
    assert row["momentum_beta"] == 0.9999999
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4096 |")]
    assert line.split(" | ")[5] == "0.9999999"
    assert nqm.format_table([{**row, "momentum_beta": 0.995}]).split(" | ")[-2] == "0.995"

    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    reached = {**row, "sgd_steps": 100, "momentum_steps": 50, "momentum_lr": 1e-6}
    reached["momentum_ema_lr"] = 10.0
    nqm.plot([reached, {**reached, "batch_size": 8192, "momentum_beta": 0.99}], io.BytesIO())
    (fig,) = drawn
    assert [t.get_text() for t in fig.axes[0].texts][:2] == ["0.9999999", "0.99"]
