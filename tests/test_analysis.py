"""Tests for the analyses over stored results (experiments/analysis.py), on synthetic fixtures."""

import math

import numpy as np
import pytest

from experiments import analysis


def _record(batch_size, beta, lr, seed, steps, loss, *, diverged=False, curves="c.npz", index=0):
    return {
        "run_id": f"{batch_size}-{beta}-{lr}-{seed}",
        "dataset": "synthetic",
        "model": "mlp",
        "batch_size": batch_size,
        "beta": beta,
        "lr": lr,
        "seed": seed,
        "steps": 1000,
        "eval_every": 10,
        "target_loss": 0.1,
        "final_train_loss": None if diverged else loss,
        "final_test_loss": None if diverged else loss,
        "final_test_accuracy": None if diverged else 0.9,
        "steps_to_target": steps,
        "diverged": diverged,
        "diverged_at": 5 if diverged else None,
        "wall_seconds": 1.0,
        "curves": curves,
        "curve_index": index,
    }


@pytest.fixture
def records():
    out = []
    for seed, (fast, slow) in enumerate([(100, 300), (110, 310), (130, None)]):
        out.append(_record(16, 0.0, 0.01, seed, None, 0.5))
        out.append(_record(16, 0.0, 0.1, seed, fast, 0.05))
        out.append(_record(16, 0.0, 1.0, seed, slow, 0.09))
        # beta = 0.9: no lr reaches the target with most seeds; lr 0.1 is lowest in loss.
        out.append(_record(16, 0.9, 0.01, seed, None, 0.4))
        out.append(_record(16, 0.9, 0.1, seed, 500 if seed == 0 else None, 0.2))
        out.append(_record(16, 0.9, 1.0, seed, None, None, diverged=True))
    return out


def test_best_lr_by_median_steps(records):
    rows = analysis.best_settings(records)
    assert [(row["batch_size"], row["beta"]) for row in rows] == [(16, 0.0), (16, 0.9)]
    sgd = rows[0]
    assert sgd["lr"] == 0.1
    assert sgd["steps_median"] == 110
    assert sgd["steps_mean"] == pytest.approx(340 / 3)
    assert sgd["steps_std"] == pytest.approx(np.std([100, 110, 130]))
    assert (sgd["steps_min"], sgd["steps_max"]) == (100, 130)
    assert sgd["reached"] == sgd["seeds"] == 3
    assert sgd["lrs_tried"] == [0.01, 0.1, 1.0]
    assert not sgd["lr_at_grid_edge"]


def test_median_counts_unreached_seeds_as_slowest(records):
    lr1 = analysis.seed_stats(analysis.filter_records(records, beta=0.0, lr=1.0))
    assert lr1["reached"] == 2 and lr1["steps_median"] == 310
    lr_momentum = analysis.seed_stats(analysis.filter_records(records, beta=0.9, lr=0.1))
    assert lr_momentum["reached"] == 1 and lr_momentum["steps_median"] is None
    assert lr_momentum["steps_mean"] == 500


def test_no_lr_reaching_falls_back_to_final_loss(records):
    momentum = analysis.best_settings(records)[1]
    assert momentum["lr"] == 0.1
    assert momentum["steps_median"] is None
    assert momentum["final_train_loss"] == 0.2
    diverged = analysis.seed_stats(analysis.filter_records(records, beta=0.9, lr=1.0))
    assert diverged["diverged"] == 3 and diverged["final_train_loss"] is None


def test_grid_edge_is_flagged():
    rows = analysis.best_settings(
        [_record(8, 0.0, lr, 0, steps, 0.1) for lr, steps in [(0.1, 50), (0.3, 80)]]
    )
    assert rows[0]["lr"] == 0.1 and rows[0]["lr_at_grid_edge"]


def test_markdown_table(records):
    table = analysis.steps_table_markdown(analysis.best_settings(records))
    assert "| 0 | 16 | 0.1 | 110 | 113 ± 12 | 100-130 | 3/3 |" in table
    assert table.count("\n") == 3


def test_fit_recovers_known_critical_batch():
    batch = 2.0 ** np.arange(2, 15)
    steps = 200.0 * (1 + 300.0 / batch)
    fit = analysis.fit_steps_vs_batch(batch, steps)
    assert fit.s_min == pytest.approx(200.0, rel=1e-3)
    assert fit.b_crit == pytest.approx(300.0, rel=1e-3)
    assert fit.e_min == pytest.approx(60_000.0, rel=2e-3)
    assert fit.rms_log_residual < 1e-3
    assert not fit.b_crit_at_bound


def test_fit_with_noise_stays_close():
    rng = np.random.default_rng(0)
    batch = np.repeat(2.0 ** np.arange(0, 13), 3)
    steps = 50.0 * (1 + 1000.0 / batch) * np.exp(rng.normal(0, 0.05, batch.size))
    fit = analysis.fit_steps_vs_batch(batch, steps)
    assert fit.b_crit == pytest.approx(1000.0, rel=0.15)
    assert fit.s_min == pytest.approx(50.0, rel=0.1)
    assert fit.rms_log_residual == pytest.approx(0.05, rel=0.3)


def test_fit_flags_perfect_scaling_as_unbounded():
    batch = np.array([8.0, 16.0, 32.0, 64.0])
    fit = analysis.fit_steps_vs_batch(batch, 6400.0 / batch)
    assert fit.b_crit_at_bound and fit.b_crit > 1e4 * 64 * 0.99


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="distinct"):
        analysis.fit_steps_vs_batch([8, 8], [10, 12])
    with pytest.raises(ValueError, match="finite"):
        analysis.fit_steps_vs_batch([8, 16], [10, math.inf])


def test_fit_from_rows_uses_reached_batch_sizes():
    rows = [
        {"batch_size": b, "beta": 0.9, "steps_median": 100 * (1 + 64 / b)} for b in (4, 16, 64, 256)
    ] + [{"batch_size": 1024, "beta": 0.9, "steps_median": None}]
    fit = analysis.fit_from_rows(rows, 0.9)
    assert fit.b_crit == pytest.approx(64, rel=1e-3)
    assert analysis.fit_from_rows(rows, 0.0) is None


def _noisy_loss(steps, sigma, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    sigma = np.broadcast_to(sigma, t.shape)
    return 2.0 * np.exp(-t / 800) * np.exp(sigma * rng.normal(size=steps))


def test_oscillation_measures_known_relative_noise():
    loss = np.stack([_noisy_loss(4000, 0.1, seed=0), _noisy_loss(4000, 0.3, seed=1)])
    osc = analysis.oscillation(loss, window=51, last_fraction=0.25)
    # The moving average removes 1/window of the variance.
    np.testing.assert_allclose(osc, np.array([0.1, 0.3]) * np.sqrt(1 - 1 / 51), rtol=0.08)


def test_linear_oscillation_shrinks_with_the_loss_but_log_does_not():
    loss = _noisy_loss(4000, 0.1)
    _, log_windows = analysis.oscillation_by_window(loss, num_windows=4, window=51)
    _, lin_windows = analysis.oscillation_by_window(loss, num_windows=4, window=51, log=False)
    assert np.ptp(log_windows) < 0.02
    assert np.all(np.diff(lin_windows[0]) < 0)


def test_oscillation_by_window_tracks_shrinking_noise():
    loss = _noisy_loss(5000, np.linspace(0.4, 0.05, 5000))
    centers, values = analysis.oscillation_by_window(loss, num_windows=5, window=51)
    assert centers.shape == (5,) and values.shape == (1, 5)
    assert np.all(np.diff(values[0]) < 0)
    assert values[0, 0] == pytest.approx(0.365, rel=0.1)


def test_diverged_run_gives_nan():
    loss = np.stack([_noisy_loss(1000, 0.1), _noisy_loss(1000, 0.1)])
    loss[1, 600:] = np.nan
    osc = analysis.oscillation(loss, window=21)
    assert np.isfinite(osc[0]) and np.isnan(osc[1])


def test_window_means():
    values = np.arange(12.0)[None]
    centers, means = analysis.window_means(values, 3)
    np.testing.assert_allclose(centers, [1.5, 5.5, 9.5])
    np.testing.assert_allclose(means, [[1.5, 5.5, 9.5]])


def test_bad_window_is_rejected():
    with pytest.raises(ValueError, match="window"):
        analysis.detrended(np.ones(100), window=10)


def test_load_curves_and_effective_batch_comparison(tmp_path):
    # lr 0.5: momentum (beta 0.5) at B = 16 -> effective batch 48; SGD ran at 16 and 64.
    sigmas = {(16, 0.5): 0.1, (16, 0.0): 0.2, (64, 0.0): 0.11}
    records = []
    rows = []
    for i, ((batch, beta), sigma) in enumerate(sigmas.items()):
        for seed in range(2):
            records.append(
                _record(
                    batch, beta, 0.5, seed, 100 + batch, 0.1, curves="curves/g.npz", index=len(rows)
                )
            )
            rows.append(_noisy_loss(2000, sigma, seed=10 * i + seed))
    records.append(_record(16, 0.0, 0.1, 0, 50, 0.1, curves="curves/g.npz", index=0))
    (tmp_path / "curves").mkdir()
    np.savez(tmp_path / "curves" / "g.npz", batch_loss=np.stack(rows).astype(np.float32))
    curves = analysis.load_curves(tmp_path, records)
    np.testing.assert_allclose(
        analysis.curve(records[3], curves, "batch_loss"), rows[3].astype(np.float32)
    )
    result = analysis.effective_batch_comparison(records, curves, lr=0.5, beta=0.5, batch_size=16)
    assert result["effective_batch"] == pytest.approx(48.0)
    assert result["momentum"]["batch_size"] == 16 and result["momentum"]["beta"] == 0.5
    assert result["sgd_same_batch"]["batch_size"] == 16
    assert result["sgd_effective_batch"]["batch_size"] == 64
    assert result["sgd_same_batch"]["seeds"] == 2  # the lr = 0.1 run is not mixed in
    assert result["momentum"]["steps_median"] == 116
    for key, sigma in [("momentum", 0.1), ("sgd_same_batch", 0.2), ("sgd_effective_batch", 0.11)]:
        assert result[key]["oscillation"] == pytest.approx(sigma, rel=0.15)


def test_effective_batch_comparison_without_sgd_runs():
    records = [_record(16, 0.9, 0.5, 0, 10, 0.1)]
    curves = {"c.npz": {"batch_loss": _noisy_loss(500, 0.1)[None]}}
    result = analysis.effective_batch_comparison(records, curves, lr=0.5, beta=0.9, batch_size=16)
    assert result["sgd_same_batch"] is None and result["sgd_effective_batch"] is None
    assert result["momentum"]["seeds"] == 1


def test_best_lr_counts_a_seed_that_never_reached_as_slowest():
    # lr 0.1: one seed fast, two never reach (median: never); lr 0.3: every seed at 50 steps.
    records = [_record(8, 0.0, 0.1, 0, 10, 0.05)] + [
        _record(8, 0.0, 0.1, seed, None, 0.5) for seed in (1, 2)
    ]
    records += [_record(8, 0.0, 0.3, seed, 50, 0.08) for seed in range(3)]
    row = analysis.best_settings(records)[0]
    assert row["lr"] == 0.3 and row["steps_median"] == 50


@pytest.mark.parametrize("diverged_seeds, expected", [(1, 0.5), (2, None), (3, None)])
def test_median_final_loss_counts_a_diverged_seed_as_highest(diverged_seeds, expected):
    # 3 seeds: the median is a number only while most seeds have one (it was inf, printed so).
    records = [
        _record(16, 0.0, 0.1, seed, None, 0.5, diverged=seed < diverged_seeds) for seed in range(3)
    ]
    assert analysis.seed_stats(records)["final_train_loss"] == expected
    table = analysis.steps_table_markdown(analysis.best_settings(records))
    assert "inf" not in table and "nan" not in table
    accuracy = "-" if diverged_seeds == 3 else "0.900"  # the mean over seeds that have one
    assert table.endswith(f"| 0/3 | {'-' if expected is None else '0.5000'} | {accuracy} |")


def test_seed_stats_of_non_finite_metrics_written_by_hand():
    # The store writes no NaN (allow_nan=False), but a hand-edited runs.jsonl can hold one.
    records = [_record(16, 0.0, 0.1, seed, 100, 0.5) for seed in range(3)]
    records[0]["final_test_accuracy"] = math.nan
    records[1]["final_train_loss"] = math.inf
    records[2]["steps_to_target"] = math.nan
    stats = analysis.seed_stats(records)
    assert stats["final_test_accuracy"] == 0.9
    assert stats["final_train_loss"] == 0.5 and stats["reached"] == 2
    table = analysis.steps_table_markdown(analysis.best_settings(records))
    assert "nan" not in table and "inf" not in table


def test_steps_table_header_says_which_seeds_each_column_is_over():
    # The median counts a seed that never reached the target as infinitely slow; mean, std and
    # range are over the seeds that reached it. One unreached seed of three shows the difference.
    from experiments import analysis

    records = [
        {"lr": 0.1, "seed": s, "steps_to_target": t, "final_train_loss": 0.4, "diverged": False,
         "final_test_accuracy": 0.9, "batch_size": 8, "beta": 0.0}
        for s, t in enumerate((100, 200, None))
    ]  # fmt: skip
    row = analysis.seed_stats(records)
    assert row["steps_median"] == 200 and row["steps_mean"] == 150
    table = analysis.steps_table_markdown(
        [{**row, "beta": 0.0, "batch_size": 8, "lr": 0.1, "lr_at_grid_edge": False}]
    )
    header = table.splitlines()[0]
    assert "median (all seeds)" in header
    assert "mean ± std (seeds that reached)" in header
    assert "| 200 | 150 ± 50 | 100-200 | 2/3 |" in table


def test_steps_table_shows_no_spread_for_one_seed():
    # One seed has no seed-to-seed spread: the table said "100 ± 0", a spread of zero measured.
    one = analysis.steps_table_markdown(analysis.best_settings([_record(8, 0.0, 0.1, 0, 100, 0.1)]))
    assert one.endswith("| 100 | 100 ± n/a | 100-100 | 1/1 | 0.1000 | 0.900 |")
    # Two seeds that agree have a spread, and it is zero.
    two = [_record(8, 0.0, 0.1, seed, 100, 0.1) for seed in range(2)]
    assert "| 100 | 100 ± 0 | 100-100 | 2/2 |" in analysis.steps_table_markdown(
        analysis.best_settings(two)
    )
    # One of two seeds reached: the spread over the seeds that reached is not known either.
    two[1]["steps_to_target"] = None
    assert "| 100 ± n/a | 100-100 | 1/2 |" in analysis.steps_table_markdown(
        analysis.best_settings(two)
    )


def test_best_settings_refuses_a_seed_recorded_twice():
    # A seed run twice (e.g. a second sweep into the directory with another budget) counted as
    # a third seed: "3/3 seeds reached" of a 2-seed sweep, its steps in the median twice.
    records = [_record(8, 0.0, 0.1, seed, 100 + seed, 0.1) for seed in range(2)]
    records.append({**records[1], "run_id": "another", "steps_to_target": 900})
    with pytest.raises(ValueError, match=r"batch_size=8, beta=0.0, lr=0.1: seed 1 .* 2 records"):
        analysis.best_settings(records)


def test_steps_table_names_no_best_lr_where_most_seeds_diverged_at_every_lr():
    # The tie-break's pick (the smallest lr, "at the grid edge") was shown as the best lr.
    records = [
        _record(8, 0.0, lr, seed, None, None, diverged=True) for lr in (0.1, 0.3) for seed in (0, 1)
    ]
    table = analysis.steps_table_markdown(analysis.best_settings(records))
    assert table.endswith("| 0 | 8 | none (diverged) | - | - | - | 0/2 | - | - |")


def test_oscillation_of_a_batch_loss_of_exactly_zero_is_nan_without_a_warning():
    # Long small-batch runs (B = 4, 40000 steps) record batch losses of exactly 0 (float32
    # underflow): log(0) is -inf, and the moving average's -inf - -inf warned.
    loss = np.exp(_noisy_loss(400, 0.1))
    loss[390] = 0.0
    assert np.isnan(analysis.oscillation(loss[None])[0])  # pytest turns a warning into an error


def test_equal_steps_and_loss_pick_the_smaller_lr():
    records = [_record(8, 0.0, lr, seed, 40, 0.1) for lr in (0.3, 0.1, 0.2) for seed in (0, 1)]
    assert analysis.best_settings(records)[0]["lr"] == 0.1


def test_a_seed_that_reached_the_target_and_then_diverged_counts_as_not_reached():
    stats = analysis.seed_stats(
        [_record(8, 0.0, 0.1, 0, 30, None, diverged=True), _record(8, 0.0, 0.1, 1, 40, 0.1)]
    )
    assert stats["reached"] == 1 and stats["steps_median"] is None and stats["steps_mean"] == 40


def test_the_trend_of_a_straight_line_is_the_line_itself():
    """The centred moving average of a line is the line: the residual, aligned, is exactly 0."""
    line = 3.0 + 0.5 * np.arange(40.0)
    np.testing.assert_allclose(analysis.detrended(line, 5, log=False), 0.0, atol=1e-12)


def test_oscillation_is_the_std_over_the_last_fraction_of_the_detrended_steps():
    loss = _noisy_loss(400, 0.2)
    residual = analysis.detrended(loss, 21)[0]
    late = residual[-round(0.25 * residual.size) :]
    assert analysis.oscillation(loss, window=21, last_fraction=0.25)[0] == pytest.approx(
        np.std(late), rel=1e-12
    )


def test_oscillation_by_window_centres_are_steps_of_the_run():
    """Window k covers residuals edges[k]..edges[k+1]: steps offset by window // 2."""
    centers, _ = analysis.oscillation_by_window(_noisy_loss(120, 0.1), num_windows=2, window=21)
    np.testing.assert_allclose(centers, [25 + 10, 75 + 10])


def test_the_nearest_effective_batch_is_nearest_in_log_distance():
    # beta 0.9 at B = 2: effective batch 38; SGD ran at 16 (nearer in steps) and 64 (nearer in log).
    records = [_record(2, 0.9, 0.5, 0, 10, 0.1)] + [
        _record(b, 0.0, 0.5, 0, 10, 0.1, index=i) for i, b in enumerate((16, 64), start=1)
    ]
    curves = {"c.npz": {"batch_loss": np.stack([_noisy_loss(300, 0.1, seed=s) for s in range(3)])}}
    result = analysis.effective_batch_comparison(records, curves, lr=0.5, beta=0.9, batch_size=2)
    assert result["effective_batch"] == pytest.approx(38.0)
    assert result["sgd_effective_batch"]["batch_size"] == 64


def test_filter_records_compares_floats_as_close_not_equal():
    records = [_record(8, 0.0, 0.3, 0, 10, 0.1), _record(8, 0.9, 0.3, 0, 10, 0.1)]
    assert 0.1 + 0.2 != 0.3
    assert analysis.filter_records(records, lr=0.1 + 0.2, beta=0.0) == records[:1]


def test_fit_s_min_is_the_least_squares_optimum_for_its_b_crit():
    """For a fixed B_crit, log S_min minimizing the squared log residuals is their mean."""
    b = np.array([8.0, 16.0, 32.0, 64.0, 128.0])
    s = 100.0 * (1 + 40.0 / b) * np.array([1.0, 1.3, 0.9, 1.0, 1.25])  # skewed noise
    fit = analysis.fit_steps_vs_batch(b, s)
    residual = np.log(s) - np.log1p(fit.b_crit / b)
    assert np.log(fit.s_min) == pytest.approx(np.mean(residual), rel=1e-12)
    assert fit.rms_log_residual == pytest.approx(np.std(residual), rel=1e-9)
