"""Tests for the two-batch gradient noise scale estimator (experiments/noise_scale.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import noise_scale


def test_unbiased_estimates_invert_the_expectation():
    grad_sq, trace = 3.0, 45.0
    expected = lambda b: grad_sq + trace / b
    got = noise_scale.unbiased_estimates(expected(8), expected(128), 8, 128)
    np.testing.assert_allclose(got, (grad_sq, trace), rtol=1e-12)
    assert noise_scale.simple_noise_scale(*got) == pytest.approx(15.0)


def test_simple_noise_scale_is_nan_without_signal():
    assert np.isnan(noise_scale.simple_noise_scale(-1e-3, 5.0))


@pytest.mark.parametrize(("b_small", "b_big"), [(0, 4), (8, 8), (16, 4)])
def test_bad_batch_sizes_are_rejected(b_small, b_big):
    with pytest.raises(ValueError, match="b_small"):
        noise_scale.unbiased_estimates(1.0, 1.0, b_small, b_big)


def _mean_estimation_problem():
    """Loss 0.5 |w - x|^2 per example: per-example gradient w - x_i, Gaussian."""
    rng = np.random.default_rng(0)
    dim, n = 16, 4096
    scales = np.linspace(0.5, 2.0, dim)
    x = (rng.normal(size=(n, dim)) * scales + 1.0).astype(np.float32)
    y = np.zeros(n, dtype=np.float32)
    params = {"w": jnp.full(dim, 1.5, dtype=jnp.float32)}
    grad_sq = float(np.sum((1.5 - x.astype(np.float64).mean(0)) ** 2))
    trace = float(np.sum(x.astype(np.float64).var(0)))
    return params, x, y, grad_sq, trace


def _loss(params, x, y):
    del y
    return 0.5 * jnp.mean(jnp.sum((params["w"] - x) ** 2, axis=-1))


_GRAD = jax.grad(_loss)


def test_estimator_recovers_known_trace_and_gradient():
    params, x, y, grad_sq, trace = _mean_estimation_problem()
    # This dataset: |G|^2 ~ 16 * 0.5^2 = 4, tr(Sigma) ~ sum(scales^2) ~ 28.
    est = noise_scale.estimate_noise_scale(
        _GRAD, params, x, y, b_small=4, b_big=64, num_pairs=2000, key=jax.random.key(0)
    )
    # Four standard errors: a deterministic seed, and a check that can fail.
    assert abs(est.trace - trace) < 4 * est.trace_stderr
    assert abs(est.grad_sq - grad_sq) < 4 * est.grad_sq_stderr
    assert est.trace_stderr < 0.05 * trace
    assert est.grad_sq_stderr < 0.1 * grad_sq
    assert est.b_simple == pytest.approx(trace / grad_sq, rel=0.15)
    assert est.small_sq > est.big_sq


def test_estimator_is_unbiased_for_a_tiny_dataset_sampled_with_replacement():
    # Eight skewed examples: Sigma is the dataset's covariance with ddof = 0, and batches drawn
    # with replacement give E|G_B|^2 = |G|^2 + tr(Sigma) / B exactly. Drawing without
    # replacement would give tr(Sigma) (N - B) / (B (N - 1)) instead, and here the estimates
    # 8/7 tr(Sigma) and |G|^2 - tr(Sigma)/7 (14% and 18% off), beyond 4 standard errors (< 3%).
    x = np.array([[0, 0], [0, 1], [1, 0], [0, 0], [3, 0], [0, 0], [1, 2], [6, 1]], np.float32)
    y = np.zeros(len(x), np.float32)
    params = {"w": jnp.array([3.0, 1.5], jnp.float32)}
    grad_sq = float(np.sum((np.array([3.0, 1.5]) - x.mean(0)) ** 2))  # 3.640625
    trace = float(np.sum(x.astype(np.float64).var(0)))  # 4.484375
    est = noise_scale.estimate_noise_scale(
        _GRAD, params, x, y, b_small=2, b_big=6, num_pairs=20_000, key=jax.random.key(1)
    )
    assert est.trace_stderr < 0.03 * trace and est.grad_sq_stderr < 0.06 * grad_sq
    assert abs(est.trace - trace) < 4 * est.trace_stderr
    assert abs(est.grad_sq - grad_sq) < 4 * est.grad_sq_stderr
    # B_simple is the ratio of the averaged estimates, not an average of per-pair ratios.
    assert est.b_simple == pytest.approx(est.trace / est.grad_sq, rel=1e-12)


def test_b_simple_stderr_is_its_spread_over_independent_estimates():
    # |G_small|^2 enters the pair's |G|^2 and tr(Sigma) estimates with opposite signs, so they
    # are anti-correlated (-0.75 here) and the ratio varies more than their standard errors
    # combined as if independent say (0.77 of the spread here).
    params, x, y, *_ = _mean_estimation_problem()
    estimates = [
        noise_scale.estimate_noise_scale(_GRAD, params, x, y, 8, 32, 64, jax.random.key(k))
        for k in range(200)
    ]
    spread = np.std([e.b_simple for e in estimates], ddof=1)
    stderr = np.mean([e.b_simple_stderr for e in estimates])
    independent = np.mean(
        [e.b_simple * np.hypot(e.trace_stderr / e.trace, e.grad_sq_stderr / e.grad_sq)
         for e in estimates]
    )  # fmt: skip
    assert 0.88 < stderr / spread < 1.12
    assert independent / spread < 0.85


def test_estimator_rejects_single_pair():
    params, x, y, *_ = _mean_estimation_problem()
    with pytest.raises(ValueError, match="num_pairs"):
        noise_scale.estimate_noise_scale(_GRAD, params, x, y, 4, 64, 1, jax.random.key(0))


def test_along_training_is_one_run_whichever_checkpoints_split_it(monkeypatch):
    # The training batches used to be drawn per chunk of gcd(checkpoints) steps, so asking for
    # one more checkpoint changed the run (and every later measurement) it was meant to observe.
    from experiments.data import Dataset

    # The run alone is under test (the estimator's compilation would double the test's time).
    monkeypatch.setattr(
        noise_scale,
        "estimate_noise_scale",
        lambda *a: noise_scale.NoiseScale(*[0.0] * len(noise_scale.NoiseScale._fields)),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = (np.arange(8) % 3).astype(np.int32)
    data = Dataset("tiny", x, y, x, y, 3)
    kw = dict(lr=0.5, batch_size=2, b_small=2, b_big=4, num_pairs=2)
    coarse = noise_scale.along_training(data, "linear", checkpoints=(0, 4), **kw)
    fine = noise_scale.along_training(data, "linear", checkpoints=(0, 2, 4), **kw)
    assert [r["step"] for r in fine] == [0, 2, 4]
    assert coarse == [fine[0], fine[2]]
    assert fine[1]["train_loss"] != fine[2]["train_loss"]  # it trains


@pytest.mark.parametrize(
    ("b_small", "b_big", "num_pairs", "rows", "labels", "match"),
    [
        # 4 examples drawn, 4.5 in the formula: tr(Sigma) came out 12.5% high, silently.
        (4.5, 64, 8, 4096, 4096, "b_small must be an integer, got b_small=4.5"),
        (4, 64.0, 8, 4096, 4096, "b_big must be an integer"),
        (4, 64, 2.9, 4096, 4096, "num_pairs must be an integer, got num_pairs=2.9"),
        (4, 64, 8, 0, 0, "x and y need the same number of examples"),
        (4, 64, 8, 4096, 10, r"x.shape=\(4096, 16\), y.shape=\(10,\)"),
    ],
)
def test_estimator_rejects_bad_arguments(b_small, b_big, num_pairs, rows, labels, match):
    params, x, y, *_ = _mean_estimation_problem()
    with pytest.raises(ValueError, match=match):
        noise_scale.estimate_noise_scale(
            _GRAD, params, x[:rows], y[:labels], b_small, b_big, num_pairs, jax.random.key(0)
        )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        # Each failed only once training had started, or as another exception than ValueError.
        (dict(batch_size=0), "batch_size must be an integer >= 1, got batch_size=0"),  # ZeroDiv
        (dict(batch_size=2.5), "batch_size must be an integer >= 1, got batch_size=2.5"),
        (dict(checkpoints=(0, 2.5)), r"checkpoints must be integers in \[0, 2\*\*31\)"),
        (dict(checkpoints=()), r"at least one, got checkpoints=\[\]"),  # returned no rows
        (dict(checkpoints=(0, -4)), r"checkpoints must be integers in \[0, 2\*\*31\)"),
        # jax.random.key(-1) is jax.random.key(2**32 - 1): another seed's run, silently.
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got seed=-1"),
        (dict(b_small=8, b_big=2), "need 0 < b_small < b_big, got b_small=8, b_big=2"),
    ],
)
def test_along_training_rejects_bad_arguments_before_training(change, match, monkeypatch):
    from experiments import models
    from experiments.data import Dataset

    def untouched(*args, **kwargs):
        raise AssertionError("the model was built: the arguments were not checked first")

    monkeypatch.setattr(models, "make_model", untouched)
    x = np.zeros((8, 4), np.float32)
    y = np.zeros(8, np.int32)
    kw = dict(lr=0.5, batch_size=2, checkpoints=(0, 4), b_small=2, b_big=4, num_pairs=2)
    with pytest.raises(ValueError, match=match):
        noise_scale.along_training(Dataset("tiny", x, y, x, y, 3), "linear", **{**kw, **change})
