"""Tests for the 2-D noisy quadratic picture (experiments/quadratic.py)."""

import argparse
import json

import numpy as np
import pytest

from experiments import quadratic


def test_noiseless_sgd_is_the_closed_form():
    path = quadratic.trajectory(0.5, 0.0, 1, steps=6, noise_std=0.0)
    factors = (1 - 0.5 * np.array(quadratic.CURVATURES)) ** np.arange(7)[:, None]
    np.testing.assert_allclose(path, factors * np.array(quadratic.START), rtol=1e-5)


def test_noiseless_momentum_is_heavy_ball_with_a_equal_eta_times_one_minus_beta():
    eta, beta = 0.8, 0.9
    h, theta, prev = np.array(quadratic.CURVATURES), np.array(quadratic.START), None
    expected = [theta]
    for _ in range(10):
        velocity = 0.0 if prev is None else theta - prev
        theta, prev = theta + beta * velocity - eta * (1 - beta) * h * theta, theta
        expected.append(theta)
    got = quadratic.trajectory(eta, beta, 1, steps=10, noise_std=0.0)
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-5, atol=1e-6)


def test_trajectories_are_seeded():
    first = quadratic.trajectory(1.0, 0.9, 4, steps=20, seed=3)
    np.testing.assert_array_equal(first, quadratic.trajectory(1.0, 0.9, 4, steps=20, seed=3))
    assert not np.array_equal(first, quadratic.trajectory(1.0, 0.9, 4, steps=20, seed=4))


def test_summary_of_known_paths():
    zigzag = np.array([[(-1.0) ** t, -0.1 * t] for t in range(11)])
    summary = quadratic.summarize(zigzag)
    assert summary["reversal_fraction"] == 1.0
    assert summary["mean_cos_successive"] < -0.9
    assert summary["steep_axis_travel"] == pytest.approx(20.0)
    line = np.stack([np.linspace(1, 0, 11), np.zeros(11)], axis=1)
    summary = quadratic.summarize(line)
    assert summary["mean_cos_successive"] == pytest.approx(1.0)
    assert summary["path_length"] == pytest.approx(1.0)
    assert summary["final_loss"] == 0.0


def test_sgd_zigzags_at_eta_h_above_one():
    # eta * h_1 = 1.6 > 1: each SGD step overshoots the valley floor, so the
    # steep coordinate flips sign and successive steps point back and forth.
    # Momentum's steep-axis roots are complex with angle ~0.44 rad: it turns
    # slowly instead. The large batch keeps the noise from blurring this.
    result = quadratic.study(batch_sizes=(256,), steps=40)
    sgd, momentum = (run["summary"] for run in result["runs"])
    assert sgd["reversal_fraction"] > 0.5
    assert momentum["reversal_fraction"] < 0.2
    assert momentum["steep_axis_travel"] < sgd["steep_axis_travel"]


def test_cli_writes_json_and_figure(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    quadratic.add_arguments(parser)
    assert quadratic.run(parser.parse_args(["--out", str(tmp_path), "--steps", "12"])) == 0
    result = json.loads((tmp_path / "quadratic.json").read_text())
    assert len(result["runs"]) == 4
    assert {(run["optimizer"], run["batch_size"]) for run in result["runs"]} == {
        ("SGD", 4),
        ("EMA momentum", 4),
        ("SGD", 256),
        ("EMA momentum", 256),
    }
    assert all(len(run["path"]) == 13 for run in result["runs"])
    assert (tmp_path / "quadratic.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_study_needs_a_seed():
    with pytest.raises(ValueError, match="seeds must be >= 1, got 0"):
        quadratic.study(seeds=0)
