"""The optimizer-step benchmark (experiments/bench_transform.py) at a tiny size: its bookkeeping."""

import json
import subprocess
import sys

import pytest

from experiments import bench_transform, cli


def test_tiny_benchmark_rows(monkeypatch):
    monkeypatch.setattr(bench_transform, "SHAPES", {"1 x 8k": (1, 8000), "4 x 2k": (4, 2000)})
    result = bench_transform.measure(repeats=2, inner=1, with_torch=False, scale=0.5)
    rows = {(row["shape"], row["contender"]): row for row in result["rows"]}
    # A scaled run names the leaf sizes it timed, not the full-size ones.
    assert {shape for shape, _ in rows} == {"1 x 4,000", "4 x 1,000"}
    for shape, n_params in (("1 x 4,000", 4000), ("4 x 1,000", 4000)):
        assert rows[(shape, "optax.sgd(momentum)")]["ratio_to_optax_sgd"] == 1.0
        # Bytes a step moves at the least: params read and written, gradient read, state read
        # and written: 20 bytes per float32 parameter, 16 with a bfloat16 state.
        assert rows[(shape, "emm.ema_sgd")]["bytes_per_step"] == 20 * n_params
        assert rows[(shape, "emm.ema_sgd bf16 nearest")]["bytes_per_step"] == 16 * n_params
        assert rows[(shape, "x + y (reference)")]["fraction_of_x_plus_y"] == 1.0
        for name in ("emm.ema_sgd bf16 nearest", "emm.ema_sgd bf16 stochastic"):
            assert rows[(shape, name)]["state_bytes_over_params_bytes"] == pytest.approx(
                0.5, abs=0.01
            )
        assert rows[(shape, "emm.ema_sgd")]["state_bytes_over_params_bytes"] == pytest.approx(
            1, abs=0.01
        )
        assert all(rows[(shape, c)]["ms_per_step"] > 0 for s, c in rows if s == shape)


def _tiny(monkeypatch):
    monkeypatch.setattr(bench_transform, "SHAPES", {"1 x 1k": (1, 1000), "3 x 1k": (3, 1000)})


def test_without_torch_the_row_is_left_out(monkeypatch):
    _tiny(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    result = bench_transform.measure(repeats=1, inner=1, with_torch=True)
    assert not any("torch" in row["contender"] for row in result["rows"])
    json.loads(json.dumps(result, allow_nan=False))


def test_torch_row_counts_the_same_bytes(monkeypatch):
    pytest.importorskip("torch")
    _tiny(monkeypatch)
    result = bench_transform.measure(repeats=1, inner=1, with_torch=True)
    torch_rows = [row for row in result["rows"] if row["contender"].startswith("torch.optim.SGD")]
    assert [row["shape"] for row in torch_rows] == ["1 x 1k", "3 x 1k"]
    for row, n_params in zip(torch_rows, (1000, 3000), strict=True):
        assert row["bytes_per_step"] == 20 * n_params
        assert row["state_bytes_over_params_bytes"] == 1.0


@pytest.mark.parametrize(
    "value", ["0", "-0.5", "1.5", "nan", "inf", "abc", "", "+0.5", "0.0_1", "\u0661", "1e5"]
)
def test_bad_scale_is_one_error_line(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench-transform", "--scale", value])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err == f"error: argument --scale: must be a number in (0, 1], got {value!r}\n"


@pytest.mark.parametrize("value", ["1", "0.5", ".5", "1e-3", "5E-1"])
def test_scale_takes_plain_numbers(value):
    assert bench_transform._scale(value) == float(value)


def test_run_as_a_module_is_the_same_command():
    """`python -m experiments.bench_transform`: one error line (it printed the usage too)."""
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench_transform", "--inner", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: argument --inner: must be an integer >= 1, got '0'\n"


def test_fraction_of_x_plus_y_is_a_within_repeat_ratio(monkeypatch):
    """Like "vs optax.sgd": the median over repeats of the ratio within the repeat, not a ratio
    of medians taken over different repeats (the two columns of one run disagreed)."""
    _tiny(monkeypatch)
    add_seconds = [1.0, 2.0, 3.0]
    ema_seconds = [3.0, 2.0, 9.0]  # within-repeat ratios to x + y: 3, 1, 3; medians 3 and 2

    def samples(contenders, repeats, inner):
        names = [c.name for c in contenders]
        out = [[1.0] * repeats for _ in contenders]
        out[names.index("x + y (reference)")] = add_seconds
        out[names.index("emm.ema_sgd")] = ema_seconds
        return out

    monkeypatch.setattr(bench_transform, "_time_interleaved", samples)
    result = bench_transform.measure(repeats=3, inner=1, with_torch=False)
    for row in result["rows"]:
        if row["contender"] == "emm.ema_sgd":
            # 20 bytes per parameter against x + y's 12, at a third of its speed.
            assert row["fraction_of_x_plus_y"] == pytest.approx(20 / 12 / 3)
            assert row["ms_per_step"] == 3000.0  # the median time, as before
            assert row["gb_per_s"] == pytest.approx(row["bytes_per_step"] / 3.0 / 1e9)
        if row["contender"] == "x + y (reference)":
            assert row["fraction_of_x_plus_y"] == 1.0


def test_eager_mode_times_each_update_on_shapes_of_its_own(monkeypatch, capsys):
    # The README's eager paragraph had no command behind it; --eager is that command.
    monkeypatch.setattr(bench_transform, "EAGER_LEAVES", 2)
    monkeypatch.setattr(bench_transform, "EAGER_SIZE", 8)
    shapes = []

    def spy(tx):  # records the leaf shapes each contender's first call sees
        original = tx.init

        def recording(params):
            shapes.append(tuple(p.shape for p in params))
            return original(params)

        return tx._replace(init=recording)

    txs = bench_transform._eager_txs
    monkeypatch.setattr(
        bench_transform, "_eager_txs", lambda: {k: spy(v) for k, v in txs().items()}
    )
    assert cli.main(["bench-transform", "--eager", "--json", "--repeats", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [row["contender"] for row in result["rows"]]
    assert names == [
        "emm.ema_sgd (eager)",
        "emm.ema_sgd bf16 stochastic (eager)",
        "optax.sgd(momentum) (eager)",
        "optax.chain(ema, scale) (eager)",
        "emm.ema_sgd (jitted update)",
    ]
    assert all(row["ms_per_update"] > 0 and row["first_call_s"] > 0 for row in result["rows"])
    # No eager contender's first call reuses a shape another compiled before it.
    seen = [set(s) for s in shapes]
    assert len(seen) == 4
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :]), shapes
    assert cli.main(["bench-transform", "--eager", "--repeats", "1"]) == 0
    assert capsys.readouterr().out.startswith("| update | ms per update | first call (s) |")
