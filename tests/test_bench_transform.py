"""The optimizer-step benchmark (experiments/bench_transform.py) at a tiny size: its bookkeeping."""

import pytest

from experiments import bench_transform


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
