"""The verdict rules of the report (experiments/report.py) on synthetic results.

Each test builds the stored results a rule reads, with the answer known by construction, and
checks the verdict the rule gives: these pin the rules stated in the report, not the data.
"""

import numpy as np
import pytest

from experiments import report

STEPS = 600  # per synthetic run: enough for ten windows of the 51-step moving average


def _curves(seed, spread, grad):
    """A batch-loss curve whose step-to-step spread is ``spread(t)`` and a gradient norm
    ``grad(t)``, ``t`` the fraction of training; seed 1 is 2% above seed 0 in both."""
    t = np.linspace(0.0, 1.0, STEPS)
    scale = 1 + 0.02 * seed
    zigzag = (-1.0) ** np.arange(STEPS)  # its 51-step moving average is ~0: all of it is spread
    return 1.0 + scale * spread(t) * zigzag, scale * grad(t)


def _sweep(settings, *, seeds=2):
    """Sweep records and curves: ``settings`` maps (batch, beta) to (steps to target, shape).

    ``steps`` is a number or a per-seed list; ``shape`` is ``(spread, grad)`` functions of the
    training fraction, the same for every seed up to noise.
    """
    records, curves = [], {}
    for (batch, beta), (steps, (spread, grad)) in settings.items():
        name = f"b{batch}_beta{beta}.npz"
        loss, gnorm = zip(*(_curves(seed, spread, grad) for seed in range(seeds)), strict=True)
        curves[name] = {"batch_loss": np.stack(loss), "grad_norm": np.stack(gnorm)}
        per_seed = steps if isinstance(steps, list) else [steps] * seeds
        for seed in range(seeds):
            records.append(
                {
                    "batch_size": batch,
                    "beta": beta,
                    "lr": 0.1,
                    "seed": seed,
                    "steps": STEPS,
                    "steps_to_target": per_seed[seed],
                    "final_train_loss": 0.4,
                    "final_test_accuracy": 0.6,
                    "diverged": False,
                    "wall_seconds": 1.0,
                    "curves": name,
                    "curve_index": seed,
                }
            )
    return records, curves


def _results(sweep=(), curves=None, quadratic=None):
    return report.Results(
        out=None,
        meta={"preset": {"effective_batches": []}, "stages": {}},
        sweep=list(sweep),
        sweep_curves=curves or {},
        effective=[],
        effective_curves={},
        quadratic=quadratic,
        nqm=None,
        noise=None,
        baselines=None,
        extra_sweeps={},
    )


# Spread and gradient norm as functions of the fraction of training t.
FLAT = (lambda t: 0.1 * (1 + 0.1 * t), lambda t: 1.0 + 0.1 * t)
SHRINKING = (lambda t: 0.1 * (1 - 0.8 * t), lambda t: 1.0 - 0.8 * t)
SPREAD_ONLY = (lambda t: 0.1 * (1 - 0.8 * t), lambda t: 1.0 + 0.1 * t)
MILD = (lambda t: 0.1 * (1 - 0.2 * t), lambda t: 1.0 - 0.2 * t)


@pytest.mark.parametrize(
    "shapes, expected, holds, spread_grows, grad_grows",
    [
        ((SHRINKING, SHRINKING, SHRINKING), report.SUPPORTED, "32, 64, 128", "none", "none"),
        # The spread shrinks but its stated cause, the gradient, grows: the claim does not hold.
        ((SPREAD_ONLY,) * 3, report.NOT_SUPPORTED, "none", "none", "32, 64, 128"),
        ((FLAT, FLAT, SHRINKING), report.PARTLY, "128", "32, 64", "32, 64"),
        ((FLAT, FLAT, FLAT), report.NOT_SUPPORTED, "none", "32, 64, 128", "32, 64, 128"),
    ],
)
def test_claim_2_is_judged_at_every_batch_size(shapes, expected, holds, spread_grows, grad_grows):
    sweep, curves = _sweep(
        {(b, 0.0): (100, shape) for b, shape in zip((32, 64, 128), shapes, strict=True)}
    )
    verdict = report.verdict_shrinks(_results(sweep, curves))
    assert verdict["verdict"] == expected
    assert verdict["evidence"].startswith(
        f"the spread and the gradient norm both shrink at B = {holds} (of 3 batch sizes); "
        f"against it, the spread grows at B = {spread_grows} and the gradient norm at B = "
        f"{grad_grows};"
    )


def test_claim_2_needs_every_seed_below_every_seed():
    # Each seed's spread falls by 20%, but the seeds differ by a factor of 2: not beyond the
    # spread between seeds.
    sweep, curves = _sweep({(32, 0.0): (100, MILD)})
    assert report.verdict_shrinks(_results(sweep, curves))["verdict"] == report.SUPPORTED
    loss = curves["b32_beta0.0.npz"]["batch_loss"]
    loss[1] = 1 + 2 * (loss[1] - 1)
    assert report.verdict_shrinks(_results(sweep, curves))["verdict"] == report.NOT_SUPPORTED


@pytest.mark.parametrize(
    "steps, plateau",
    [
        ({32: 400, 64: 200, 128: 120}, None),
        ({32: 400, 64: 200, 128: 200}, "B = 64 -> 128"),
        ({32: 400, 64: [190, 230], 128: [220, 240]}, None),  # seed ranges overlap
        ({32: 400, 64: [190, 210], 128: [215, 240]}, "B = 64 -> 128"),
    ],
)
def test_claim_4_not_faster_means_a_larger_batch_needs_no_fewer_steps(steps, plateau):
    sweep, curves = _sweep({(b, 0.0): (s, SHRINKING) for b, s in steps.items()})
    evidence = report.verdict_batch_size(_results(sweep, curves))["evidence"]
    assert f"a larger batch needing no fewer steps: {plateau or 'never'};" in evidence


def _effective(jitter_sgd, jitter_momentum):
    case = lambda beta, jitter, late, b: report.EffectiveCase(b, beta, [], jitter, [], late, [])
    return [
        (
            case(0.9, jitter_momentum, [1.0, 1.0], 8),
            case(0.0, jitter_sgd, [1.0, 1.0], 8),
            case(0.0, [0.01, 0.01], [0.5, 0.5], 152),
        )
    ]


@pytest.mark.parametrize(
    "jitter_momentum, expected",
    [([0.02, 0.03], report.PARTLY), ([0.02, 0.05], report.NOT_SUPPORTED)],
)
def test_claim_5_steadier_needs_every_seed_below_sgd(monkeypatch, jitter_momentum, expected):
    monkeypatch.setattr(
        report, "effective_triples", lambda res: _effective([0.04, 0.06], jitter_momentum)
    )
    sweep, curves = _sweep({(8, 0.0): (100, FLAT), (8, 0.9): (100, FLAT)})
    verdict = report.verdict_momentum(_results(sweep, curves))
    assert verdict["verdict"] == expected
    at = "8" if expected == report.PARTLY else "none"
    assert f"beyond seed spread at B = {at} (of B = 8)" in verdict["evidence"]


def _quadratic(momentum_better):
    """Two batch sizes, three seeds; ``momentum_better(b, seed, key)`` says who wins a metric."""
    runs = []
    for b in (4, 256):
        for beta in (0.0, 0.9):
            summaries = []
            for seed in range(3):
                summary = {
                    "mean_cos_successive": 0.0,
                    "flat_loss_second_half": 1.0,
                    "steep_loss_second_half": 1.0,
                }
                for key in ("reversal_fraction", "steep_axis_travel", "flat_half_steps"):
                    momentum_wins = momentum_better(b, seed, key)
                    summary[key] = 10 if (beta > 0) == momentum_wins else 20
                summaries.append(summary)
            runs.append({"batch_size": b, "beta": beta, "seed_summaries": summaries})
    return {"runs": runs}


@pytest.mark.parametrize(
    "momentum_better, expected",
    [
        (lambda b, seed, key: True, report.SUPPORTED),
        (lambda b, seed, key: key != "flat_half_steps", report.PARTLY),
        # One seed of one batch size lags along the flat axis: the speed-up must hold in all.
        (
            lambda b, seed, key: not (b == 4 and seed == 2 and key == "flat_half_steps"),
            report.PARTLY,
        ),
        (lambda b, seed, key: key == "steep_axis_travel", report.NOT_SUPPORTED),
    ],
)
def test_claim_6_is_paired_over_seeds(momentum_better, expected):
    verdict = report.verdict_damping(_results(quadratic=_quadratic(momentum_better)))
    assert verdict["verdict"] == expected


def test_claim_6_on_the_real_quadratic():
    from experiments import quadratic

    result = quadratic.study(seeds=4)
    evidence = report.verdict_damping(_results(quadratic=result))["evidence"]
    assert evidence.count("(momentum fewer in 4/4 seeds)") == 2
    assert evidence.count("(less in 4/4)") == 2


def test_the_ema_form_starts_behind_sgd_along_an_agreeing_gradient_at_equal_lr():
    # Why claim 6's speed-up is not expected at equal eta: without noise, along the flat axis
    # the gradient keeps its sign, EMA momentum's steady step equals SGD's and its velocity
    # starts at zero, so it halves its distance later.
    from experiments import quadratic

    lr = quadratic.LEARNING_RATE
    sgd, momentum = (
        quadratic.summarize(quadratic.trajectory(lr, beta, 1, noise_std=0.0))
        for beta in (0.0, quadratic.BETA)
    )
    # SGD: |1 - eta h_2|^t = 1/2 at t = ln 2 / -ln(1 - 0.048) = 14.1.
    assert sgd["flat_half_steps"] == 15
    assert momentum["flat_half_steps"] > sgd["flat_half_steps"]


def test_flat_half_steps():
    from experiments.quadratic import summarize

    assert summarize(np.array([[1.0, 4.0], [1.0, 3.0], [1.0, 2.0]]))["flat_half_steps"] == 2
    assert summarize(np.array([[1.0, 4.0], [1.0, 3.0], [1.0, 2.5]]))["flat_half_steps"] is None


def test_claim_6_from_results_of_an_older_version():
    # quadratic.json from before per-seed summaries holds each run's path (seed 0) only.
    from experiments import quadratic

    result = quadratic.study(seeds=1)
    for run in result["runs"]:
        del run["seed_summaries"], run["summary"]
    evidence = report.verdict_damping(_results(quadratic=result))["evidence"]
    assert evidence.startswith("B = 4 (1 noise seeds,")


def test_fits_table_flags_an_extrapolated_critical_batch():
    # Steps on the curve S_min (1 + B_crit / B) with B_crit = 500, measured up to B = 128.
    sweep, curves = _sweep({(b, 0.0): (100 * (1 + 500 / b), FLAT) for b in (8, 16, 32, 64, 128)})
    table = report._fits_table(_results(sweep, curves))
    assert "| 500 (outside the batch sizes tested, 8-128: extrapolated) |" in table
    sweep, curves = _sweep({(b, 0.0): (100 * (1 + 50 / b), FLAT) for b in (8, 16, 32, 64, 128)})
    assert "| 50 | " in report._fits_table(_results(sweep, curves))


def test_claim_2_is_unsettled_by_runs_too_short_to_window():
    sweep, curves = _sweep({(32, 0.0): (100, SHRINKING)})
    for arrays in curves.values():
        arrays["batch_loss"], arrays["grad_norm"] = (a[:, :40] for a in arrays.values())
    assert report.verdict_shrinks(_results(sweep, curves))["verdict"] == report.UNSETTLED


@pytest.mark.parametrize(
    "low, high, expected",
    [
        ([1.0, 2.0], [3.0, 4.0], True),
        ([1.0, 3.5], [3.0, 4.0], False),
        ([1.0, float("nan")], [3.0, 4.0], False),
        ([float("nan"), 1.0], [3.0, 4.0], False),  # wherever the NaN sits
        ([], [3.0], False),
    ],
)
def test_all_below_needs_finite_values(low, high, expected):
    assert report._all_below(low, high) is expected
