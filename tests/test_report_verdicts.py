"""The verdict rules of the report (experiments/report.py) on synthetic results.

Each test builds the stored results a rule reads, with the answer known by construction, and
checks the verdict the rule gives: these pin the rules stated in the report, not the data.
"""

import dataclasses
import math
import re

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
                    "run_id": f"{name}:{seed}",
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
        # A wide middle batch overlaps both neighbours, but 128 is slower than 32 in every seed:
        # "some larger batch" is any larger one, not only the next (it said "never").
        ({32: [100, 110], 64: [95, 120], 128: [112, 130]}, "B = 32 -> 128"),
    ],
)
def test_claim_4_not_faster_means_a_larger_batch_needs_no_fewer_steps(steps, plateau):
    sweep, curves = _sweep({(b, 0.0): (s, SHRINKING) for b, s in steps.items()})
    evidence = report.verdict_batch_size(_results(sweep, curves))["evidence"]
    assert f"a larger batch needing no fewer steps: {plateau or 'never'};" in evidence


def test_claim_4_not_faster_counts_a_seed_that_never_reached_as_slowest():
    # B = 32's third seed never reached the target: its seed range reaches infinity, so B = 64
    # (106-108 steps) is not slower beyond seed spread (it said "B = 32 -> 64", from the two
    # seeds that reached).
    sweep, curves = _sweep({(32, 0.0): ([100, 105, None], SHRINKING),
                            (64, 0.0): ([106, 107, 108], SHRINKING)}, seeds=3)  # fmt: skip
    evidence = report.verdict_batch_size(_results(sweep, curves))["evidence"]
    assert "a larger batch needing no fewer steps: never;" in evidence


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
        ([1.0, 3.0], [3.0, 4.0], False),  # a tie is not below
        ([1.0, float("nan")], [3.0, 4.0], False),
        ([float("nan"), 1.0], [3.0, 4.0], False),  # wherever the NaN sits
        ([], [3.0], False),
    ],
)
def test_all_below_needs_finite_values(low, high, expected):
    assert report._all_below(low, high) is expected


# ---------------------------------------------------------------------------
# Odd but legal results: too little data gives "not settled", never a verdict either way.


def _diverged(records, curves, at=100):
    """Marks every run diverged at step ``at``: NaN curves from there on, as the engine stores."""
    for record in records:
        record.update(diverged=True, steps_to_target=None, final_train_loss=None)
        record.update(final_test_accuracy=None)
        for name in ("batch_loss", "grad_norm"):
            curves[record["curves"]][name][record["curve_index"], at:] = np.nan


def test_claim_1_is_unsettled_without_three_batch_sizes_or_the_effective_test():
    # Two batch sizes, no effective-batch test: a rank correlation needs 3, so nothing measured
    # (it said "not supported").
    sweep, curves = _sweep({(32, 0.0): (100, SHRINKING), (64, 0.0): (100, MILD)})
    verdict = report.verdict_noise(_results(sweep, curves))
    assert verdict["verdict"] == report.UNSETTLED
    assert "(needs 3 batch sizes, has 2)" in verdict["evidence"]


def test_claim_2_leaves_out_diverged_runs():
    sweep, curves = _sweep({(32, 0.0): (100, SHRINKING), (64, 0.0): (100, SHRINKING)})
    assert report.verdict_shrinks(_results(sweep, curves))["verdict"] == report.SUPPORTED
    _diverged([r for r in sweep if r["batch_size"] == 64], curves)
    verdict = report.verdict_shrinks(_results(sweep, curves))
    assert verdict["verdict"] == report.SUPPORTED  # at the only B it can be judged at
    assert verdict["evidence"].startswith(
        "the spread and the gradient norm both shrink at B = 32 (of 1"
    )
    _diverged(sweep, curves)
    verdict = report.verdict_shrinks(_results(sweep, curves))
    assert verdict["verdict"] == report.UNSETTLED
    assert "did not diverge" in verdict["evidence"]


def test_claim_2_without_sgd_runs_says_so():
    sweep, curves = _sweep({(32, 0.9): (100, SHRINKING)})
    verdict = report.verdict_shrinks(_results(sweep, curves))
    assert (verdict["verdict"], verdict["evidence"]) == (
        report.UNSETTLED,
        "no SGD (beta 0) runs in the sweep",
    )


def test_claim_2_states_the_chance_for_the_seeds_it_has():
    for seeds, chance in ((1, 2), (2, 6), (3, 20)):
        sweep, curves = _sweep({(32, 0.0): (100, SHRINKING)}, seeds=seeds)
        rule = report.verdict_shrinks(_results(sweep, curves))["rule"]
        assert f"by chance 1 time in {chance}.)" in rule


def _lr_grid(batch, beta, losses, *, diverged=()):
    """Records of one (batch, beta) over three lrs, two seeds; ``losses`` per lr, none reach."""
    records = []
    for lr, loss in zip((0.01, 0.1, 1.0), losses, strict=True):
        for seed in range(2):
            records.append(
                {"batch_size": batch, "beta": beta, "lr": lr, "seed": seed, "steps": STEPS,
                 "steps_to_target": None, "final_train_loss": None if lr in diverged else loss,
                 "final_test_accuracy": 0.5, "diverged": lr in diverged, "wall_seconds": 1.0}
            )  # fmt: skip
    return records


def test_claim_3_leaves_out_settings_where_every_lr_diverged():
    bracketed = _lr_grid(32, 0.0, [0.9, 0.3, 0.6])  # crawl at 0.01, overshoot at 1.0
    every_lr_diverged = _lr_grid(32, 0.9, [0, 0, 0], diverged=(0.01, 0.1, 1.0))
    verdict = report.verdict_learning_rate(_results(bracketed + every_lr_diverged))
    assert verdict["verdict"] == report.SUPPORTED
    assert verdict["evidence"].startswith(
        "crawl at the smallest lr in 1/1, overshoot at the largest"
    )
    assert verdict["evidence"].endswith(
        "; left out, half the seeds or more diverged at every lr: 1"
    )
    verdict = report.verdict_learning_rate(_results(every_lr_diverged))
    assert verdict["verdict"] == report.UNSETTLED


def test_claim_4_is_unsettled_with_one_sgd_batch_size():
    sweep, curves = _sweep({(32, 0.0): (100, SHRINKING), (32, 0.9): (50, SHRINKING),
                            (64, 0.9): (30, SHRINKING)})  # fmt: skip
    verdict = report.verdict_batch_size(_results(sweep, curves))
    assert verdict["verdict"] == report.UNSETTLED
    assert verdict["evidence"] == (
        "needs SGD (beta 0) runs at 2 or more batch sizes; the sweep has them at B = 32"
    )


def test_claim_4_judges_sgd_batch_sizes_only_and_names_what_it_cannot_measure():
    # SGD at 32 and 64 (both reach the target), momentum also at 128: B = 128 is no SGD batch
    # that "never reached the target", and 2 batch sizes give no rank correlation.
    sweep, curves = _sweep({(32, 0.0): (100, SHRINKING), (64, 0.0): (60, SHRINKING),
                            (128, 0.9): (30, SHRINKING)})  # fmt: skip
    verdict = report.verdict_batch_size(_results(sweep, curves))
    assert "stuck (no): batch sizes that never reached the target: none;" in verdict["evidence"]
    assert "steadier: SGD oscillation falls with B (not measured);" in verdict["evidence"]
    # Costlier: the fit through (32, 100) and (64, 60) gives B_crit = 128, outside 32-64; not
    # faster: 60 < 100 steps; stuck: no. Every part measured fails (B = 128 made it "stuck").
    assert "fitted B_crit = 128 " in verdict["evidence"]
    assert verdict["verdict"] == report.NOT_SUPPORTED


def test_claim_4_with_no_batch_size_reaching_the_target_prints_no_none():
    sweep, curves = _sweep({(32, 0.0): (None, SHRINKING), (64, 0.0): (None, SHRINKING)})
    evidence = report.verdict_batch_size(_results(sweep, curves))["evidence"]
    assert "None" not in evidence
    assert "not faster (not measured): median steps to target none reached," in evidence


def _effective_results(jitter, *, diverged=()):
    """An effective-batch test at B = 8 (beta 0.9, so B' = 152), two seeds, 400 steps, an eval
    every 10: ``jitter[(batch, beta)]`` is the full-train loss's step-to-step zigzag around 1.0,
    the batch loss's is 0.1 at B = 8 and 0.03 at B' = 152; ``(batch, beta, seed)`` in
    ``diverged`` marks that run diverged at step 200 (NaN from there)."""
    records, curves = [], {}
    zigzag = lambda n: (-1.0) ** np.arange(n)
    for (batch, beta), size in jitter.items():
        name = f"b{batch}_beta{beta}.npz"
        train = np.stack([1.0 + size * (1 + 0.1 * seed) * zigzag(40) for seed in range(2)])
        loss = np.stack([1.0 + (0.1 if batch == 8 else 0.03) * zigzag(400) for _ in range(2)])
        for seed in range(2):
            if (batch, beta, seed) in diverged:
                train[seed, 20:], loss[seed, 200:] = np.nan, np.nan
            records.append({"batch_size": batch, "beta": beta, "lr": 0.1, "seed": seed,
                            "steps": 400, "diverged": (batch, beta, seed) in diverged,
                            "curves": name, "curve_index": seed})  # fmt: skip
        curves[name] = {"train_loss": train, "batch_loss": loss}
    res = _results()
    res.meta = {"preset": {"effective_batches": [8]}, "stages": {"effective": {"beta": 0.9}}}
    res.effective, res.effective_curves = records, curves
    return res


def test_claim_5_steadier_fails_when_a_momentum_seed_diverged():
    jitter = {(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005}
    verdict = report.verdict_momentum(_effective_results(jitter))
    assert verdict["verdict"] == report.PARTLY  # less jitter than SGD in every seed
    assert "beyond seed spread at B = 8 (of B = 8)" in verdict["evidence"]
    # Momentum's second seed diverged: not every momentum seed lies below every SGD seed (its
    # NaN was dropped, and the seed left over passed for "every seed").
    verdict = report.verdict_momentum(_effective_results(jitter, diverged={(8, 0.9, 1)}))
    assert verdict["verdict"] == report.NOT_SUPPORTED
    assert "beyond seed spread at B = none (of B = 8)" in verdict["evidence"]


def test_claim_1_fixed_lr_part_fails_when_a_large_batch_seed_diverged():
    jitter = {(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005}
    verdict = report.verdict_noise(_effective_results(jitter))
    assert verdict["verdict"] == report.PARTLY  # no sweep: one part measured, and it holds
    verdict = report.verdict_noise(_effective_results(jitter, diverged={(152, 0.0, 1)}))
    # SGD at B' diverged in one seed: its oscillation is no mean over the seeds (it was the
    # surviving seed's, and passed).
    assert verdict["verdict"] == report.NOT_SUPPORTED
    assert "B = 8 -> B' = 152: batch-loss oscillation 0.102 -> -;" in verdict["evidence"]


@pytest.mark.parametrize("beta, larger", [(0.9, "19x"), (0.5, "3x"), (0.99, "199x")])
def test_claim_1_rule_names_the_batch_factor_of_the_tested_beta(beta, larger):
    res = _effective_results({(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005})
    res.meta["stages"]["effective"]["beta"] = beta  # it said "19x" at every beta
    assert f"SGD with a {larger} larger batch has less" in report.verdict_noise(res)["rule"]


def test_claim_5_without_the_effective_test_says_so():
    sweep, curves = _sweep({(8, 0.0): (100, FLAT), (8, 0.9): (50, FLAT)})
    evidence = report.verdict_momentum(_results(sweep, curves))["evidence"]
    assert "(of B = )" not in evidence
    assert evidence.endswith(
        "B = 8: 0.50; no effective-batch test (momentum at B against SGD at B and at B (1 + beta) "
        "/ (1 - beta), one lr) in these results"
    )


def test_claim_5_names_the_beta_of_each_ratio_when_several_were_swept():
    # The full preset sweeps betas 0.5, 0.9 and 0.99: each batch size had one unlabelled ratio
    # per beta ("B = 8: 0.80, B = 8: 0.50"), which a reader could not tell apart.
    sweep, curves = _sweep({(8, 0.0): (100, FLAT), (8, 0.5): (80, FLAT), (8, 0.9): (50, FLAT)})
    evidence = report.verdict_momentum(_results(sweep, curves))["evidence"]
    expected = "(each at its best lr): B = 8, beta 0.5: 0.80, B = 8, beta 0.9: 0.50;"
    assert expected in evidence


def test_claim_5_rule_says_the_speed_ratio_averages_over_the_betas_when_several_were_swept():
    several = _sweep({(8, 0.0): (100, FLAT), (8, 0.5): (80, FLAT), (8, 0.9): (50, FLAT)})
    one = _sweep({(8, 0.0): (100, FLAT), (8, 0.9): (50, FLAT)})
    rules = [report.verdict_momentum(_results(*s))["rule"] for s in (several, one)]
    averaged = "averaged over the three smallest batch sizes and the momentum betas."
    assert averaged in rules[0]
    assert "averaged over the three smallest batch sizes. Supported" in rules[1]


def _study_dir(path, sweep=(), curves=None, dataset="digits"):
    """A main job's directory holding only ``study.json`` and (if any) the sweep's records."""
    import dataclasses
    import json

    from experiments import study

    preset = dataclasses.replace(study.PRESETS["quick"], dataset=dataset)
    (path / "study.json").write_text(json.dumps({"preset": dataclasses.asdict(preset)}))
    if sweep:
        (path / "sweep" / "curves").mkdir(parents=True)
        for name, arrays in (curves or {}).items():
            np.savez(path / "sweep" / "curves" / name, **arrays)
        lines = [json.dumps({**r, "curves": f"curves/{r['curves']}"}) + "\n" for r in sweep]
        (path / "sweep" / "runs.jsonl").write_text("".join(lines))
    return path


def _build_quietly(path):
    """``report.build`` with every warning an error (a legend without entries, an all-NaN mean)."""
    import json
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.build(path)
    return (path / "report.md").read_text(), json.loads((path / "verdicts.json").read_text())


def test_report_of_a_sweep_where_every_run_diverged(tmp_path):
    # It stopped with "error: Data cannot be log-scaled" (and warnings) after writing 3 figures.
    sweep, curves = _sweep({(b, beta): (100, SHRINKING) for b in (16, 32, 64) for beta in (0, 0.9)})
    _diverged(sweep, curves, at=2)
    text, verdicts = _build_quietly(_study_dir(tmp_path, sweep, curves))
    assert [v["verdict"] for v in verdicts[:5]] == [report.UNSETTLED] * 5
    assert "figures/oscillation.png" in text
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE)  # no NaN shown as a number


def test_a_report_that_fails_while_being_built_writes_nothing(tmp_path, monkeypatch):
    # The figures were written as they were drawn: an error in a later section left the new
    # figures (and verdicts.json) beside the old report.md.
    sweep, curves = _sweep({(b, beta): (100, SHRINKING) for b in (16, 64) for beta in (0, 0.9)})
    path = _study_dir(tmp_path, sweep, curves)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}

    def fail(res):
        raise RuntimeError("a section failed")

    monkeypatch.setattr(report, "_baselines_section", fail)
    with pytest.raises(RuntimeError, match="a section failed"):
        report.build(path)
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    monkeypatch.undo()
    text, _ = _build_quietly(path)  # and without the failure, each linked figure is a PNG
    linked = re.findall(r"\]\((figures/\w+\.png)\)", text)
    assert len(linked) >= 4
    assert all((path / name).read_bytes().startswith(b"\x89PNG") for name in linked)


def test_report_of_a_small_sweep_without_the_other_stages(tmp_path):
    sweep, curves = _sweep({(b, beta): (100, SHRINKING) for b in (16, 64) for beta in (0, 0.9)})
    text, verdicts = _build_quietly(_study_dir(tmp_path, sweep, curves))
    assert len(verdicts) == 6
    assert text.startswith("# Batch size and momentum on 8x8 digits: ")  # not "MNIST-1D"
    section = text.split("## 1. The course picture")[1].split("## 2.")[0]
    assert "quadratic.png" not in section and "Not run." in section  # no link to a missing image


def test_report_of_a_study_without_sweep_results_yet(tmp_path):
    text, verdicts = _build_quietly(_study_dir(tmp_path))
    # Every claim is listed, not settled (the verdict table was empty).
    assert [v["claim"].split(".")[0] for v in verdicts] == ["1", "2", "3", "4", "5", "6"]
    assert {v["verdict"] for v in verdicts} == {report.UNSETTLED}
    assert text.count("Not run: no sweep results yet.") == 4
    assert "| 6. " in text


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda r: r.pop("batch_size"), "batch_size missing or invalid"),
        (lambda r: r.update(curve_index=99), "its curves in curves/b16_beta0.npz"),
        # Fields the analyses read that were not checked: a TypeError traceback (a string, a
        # list) or a ZeroDivisionError (0 steps, the wall time per step) after the figures.
        (lambda r: r.update(final_train_loss="0.4"), "final_train_loss missing or invalid"),
        (lambda r: r.update(final_test_accuracy="0.6"), "final_test_accuracy missing or invalid"),
        (lambda r: r.update(steps_to_target=[100]), "steps_to_target missing or invalid"),
        (lambda r: r.update(steps_to_target=0), "steps_to_target missing or invalid"),
        (lambda r: r.update(steps=0), "steps missing or invalid"),
        # Numbers out of range: an IndexError traceback (batch size 2.5, read as 2 by one part
        # and as 2.5 by another), "nan" in the report (beta NaN), an OverflowError (steps inf),
        # steps to target past the run's end.
        (lambda r: r.update(batch_size=2.5), "batch_size missing or invalid"),
        (lambda r: r.update(beta=math.nan), "beta missing or invalid"),
        (lambda r: r.update(lr=-0.1), "lr missing or invalid"),
        (lambda r: r.update(steps=math.inf), "steps missing or invalid"),
        (lambda r: r.update(steps_to_target=STEPS + 1), "steps_to_target missing or invalid"),
    ],
)
def test_report_of_a_record_it_cannot_read_is_one_error_line(edit, what, tmp_path, capsys):
    # A record written by hand: it was a traceback (KeyError, IndexError) after `figures/`.
    from experiments import cli

    sweep, curves = _sweep({(16, 0): (100, SHRINKING), (64, 0): (100, SHRINKING)})
    edit(sweep[1])
    path = _study_dir(tmp_path, sweep, curves)
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: record 2 of "), err
    assert what in err[0]
    assert sorted(p.name for p in path.iterdir()) == ["study.json", "sweep"]  # nothing written


def _stage_files():
    """A file of each stage's results, of the shape its writer writes, at the smallest size."""
    summary = {
        "final_loss": 0.3, "mean_loss_second_half": 0.3, "path_length": 3.0,
        "mean_cos_successive": -0.5, "reversal_fraction": 0.6, "steep_axis_travel": 2.0,
        "steep_loss_second_half": 0.1, "flat_loss_second_half": 0.2, "flat_half_steps": 2,
    }  # fmt: skip
    setup = {
        "curvatures": [1.0, 0.01], "start": [1.0, 1.0], "learning_rate": 0.5, "beta": 0.9,
        "noise_std_per_example": 1.0, "steps": 2, "seed": 0, "seeds": 1,
    }  # fmt: skip
    runs = [
        {"optimizer": name, "beta": beta, "batch_size": 4, "summary": summary,
         "path": [[1.0, 1.0], [0.5, 0.9], [0.2, 0.4]], "seed_summaries": [summary]}
        for name, beta in (("SGD", 0.0), ("EMA momentum", 0.9))
    ]  # fmt: skip
    nqm_row = {
        "batch_size": 1, "dim": 10, "sgd_steps": 100, "momentum_steps": None, "sgd_lr": 0.5,
        "momentum_lr": None, "momentum_beta": 0.0, "momentum_ema_lr": None,
        "by_beta": {"0.0": {"steps": 100, "lr": 0.5, "ema_lr": 0.5}},
    }  # fmt: skip
    noise_row = {
        "step": 0, "train_loss": 2.3, "b_simple": 120.0, "b_simple_stderr": 6.0, "grad_sq": 0.5,
        "grad_sq_stderr": 0.01, "trace": 60.0, "trace_stderr": 2.0, "small_sq": 2.3, "big_sq": 0.6,
    }  # fmt: skip
    baseline = {
        "test_accuracy": 0.6, "test_accuracy_std": 0.0, "seeds": 1, "optimizer": "adam",
        "lr": 0.01, "batch_size": 100, "steps": 50, "paper": None,
        "ema_sgd": {"test_accuracy": 0.5, "test_accuracy_std": 0.0, "lr": 0.3, "beta": 0.9,
                    "seeds": 1},
    }  # fmt: skip
    return {
        "quadratic.json": {"setup": setup, "runs": runs},
        "nqm.json": [nqm_row],
        "noise_scale.json": {"lr": 0.1, "beta": 0.0, "rows": [noise_row]},
        "baselines.json": {"linear": baseline},
    }


def test_report_reads_the_stage_files_of_a_study(tmp_path):
    import json

    path = _study_dir(tmp_path)
    for name, value in _stage_files().items():
        (path / name).write_text(json.dumps(value))
    text, verdicts = _build_quietly(path)
    assert "Gaussian gradient noise of std 1/sqrt(B)" in text
    assert "| 1 | 100 | - | 0.5 | - | 0 | - |" in text  # the NQM row
    assert "| 0 | 2.300 | 120 ± 6 | 0.5 ± 0.01 | 60 ± 2 |" in text  # the noise-scale row
    assert "| linear | - | 0.600 | 0.500 (beta 0.9, lr 0.3) | 1 |" in text
    # How ema_sgd's lr was chosen (experiments.baselines): not on the test set it reports.
    assert "lr picked from 0.1, 0.3, 1, 3 by the lowest final train loss" in " ".join(text.split())
    assert "± the standard deviation (ddof 0)" in text  # as experiments.baselines computes it
    assert verdicts[5]["verdict"] != report.UNSETTLED  # claim 6, from quadratic.json


def test_report_reads_the_stage_files_of_an_older_version(tmp_path):
    # Fields added since (the quadratic's seeds, the NQM's d and by_beta, B_simple's standard
    # error, the paper's accuracy) are not required: such files are the stage's results too.
    import json

    from experiments import stage_files

    files = _stage_files()
    del files["quadratic.json"]["setup"]["seeds"]
    for run in files["quadratic.json"]["runs"]:
        del run["seed_summaries"]  # the report summarizes the one stored path afresh
    del files["nqm.json"][0]["dim"], files["nqm.json"][0]["by_beta"]
    del files["noise_scale.json"]["rows"][0]["b_simple_stderr"]
    del files["baselines.json"]["linear"]["paper"]
    path = _study_dir(tmp_path)
    for name, value in files.items():
        assert stage_files.STAGE_FILES[name](value), name
        (path / name).write_text(json.dumps(value))
    text, verdicts = _build_quietly(path)
    assert "| 0 | 2.300 | 120 ± - | 0.5 ± 0.01 | 60 ± 2 |" in text
    assert "reversals 0% vs 0%" in verdicts[5]["evidence"]  # of the path (60% in its summary)


DELETE = object()


def _edited(value, keys, new):
    """``value`` with the item at ``keys`` (a path of keys and indices) set to ``new``, or
    removed if ``new`` is ``DELETE``; ``new`` itself if ``keys`` is empty."""
    if not keys:
        return new
    *parents, last = keys
    target = value
    for key in parents:
        target = target[key]
    if new is DELETE:
        del target[last]
    else:
        target[last] = new
    return value


# Valid JSON of another shape than its stage writes: a value missing, or of another type.
MISSHAPEN = [
    ("baselines.json", (), [1]),
    ("baselines.json", ("linear", "ema_sgd"), 0.5),
    ("baselines.json", ("linear", "seeds"), "1"),
    ("noise_scale.json", ("rows",), 3),
    ("noise_scale.json", ("rows", 0, "b_simple"), DELETE),
    ("noise_scale.json", ("lr",), None),
    ("noise_scale.json", ("rows", 0, "train_loss"), "NaN"),
    ("noise_scale.json", ("rows", 0, "b_simple_stderr"), -3.0),  # drawn as an error bar
    ("nqm.json", (), {"rows": []}),
    ("nqm.json", (0,), 1),
    ("nqm.json", (0, "momentum_beta"), None),
    ("nqm.json", (0, "sgd_steps"), [100]),
    ("nqm.json", (0, "by_beta"), {"SGD": {}}),
    ("quadratic.json", (), [1]),
    ("quadratic.json", ("setup", "curvatures"), DELETE),
    ("quadratic.json", ("runs", 1), DELETE),  # SGD without momentum: nothing to pair it with
    ("quadratic.json", ("runs", 0, "seed_summaries", 0, "reversal_fraction"), "0.6"),
    ("quadratic.json", ("runs", 0, "seed_summaries"), 2.5),
    ("quadratic.json", ("runs", 0, "seed_summaries", 0), 1.5),
]


@pytest.mark.parametrize("name, keys, new", MISSHAPEN)
def test_report_of_a_stage_file_of_another_shape_is_one_error_line(
    name, keys, new, tmp_path, capsys
):
    # The report drew its figures (and some wrote verdicts.json), then ended in a traceback
    # (AttributeError, TypeError, KeyError).
    import json

    from experiments import cli

    path = _study_dir(tmp_path)
    for file, value in _stage_files().items():
        (path / file).write_text(json.dumps(_edited(value, keys, new) if file == name else value))
    (path / "report.md").write_text("old")
    before = sorted(p.name for p in path.iterdir())
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {str(path / name)!r} does not hold "), err
    assert sorted(p.name for p in path.iterdir()) == before  # no figures, no verdicts.json
    assert (path / "report.md").read_text() == "old"


def test_best_lr_figure_leaves_out_settings_where_every_lr_diverged(tmp_path, monkeypatch):
    # With no lr that trained, the tie-break's pick (the smallest lr) was drawn as "best".
    figures, make = [], report._figure

    def keep(**kwargs):
        figures.append(make(**kwargs))
        return figures[-1]

    monkeypatch.setattr(report, "_figure", keep)
    sgd = _lr_grid(32, 0.0, [0.9, 0.3, 0.6]) + _lr_grid(64, 0.0, [0.9, 0.3, 0.6])
    momentum = _lr_grid(32, 0.9, [0, 0, 0], diverged=(0.01, 0.1, 1.0))
    report.fig_best_lr(_results(sgd + momentum), tmp_path / "best_lr.png")
    lines = {line.get_label(): line.get_xydata().tolist() for line in figures[0].axes[0].lines}
    assert lines["SGD (beta 0)"] == [[32, 0.1], [64, 0.1]]
    assert "EMA momentum (beta 0.9)" not in lines


def test_report_of_a_sweep_directory_says_what_it_reads(tmp_path, capsys):
    from experiments import cli

    sweep, curves = _sweep({(16, 0): (100, SHRINKING)})
    path = _study_dir(tmp_path, sweep, curves) / "sweep"  # what `sweep --out DIR` writes
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no study (study.json is missing); it holds a sweep's" in err[0]
    assert "python -m experiments --out DIR" in err[0]
    assert sorted(p.name for p in path.iterdir()) == ["curves", "runs.jsonl"]


def _unhalved(result: dict, batch_size: int, seed: int) -> dict:
    """``result`` where neither optimizer halved theta_2 in one seed of ``batch_size``."""
    for run in result["runs"]:
        if run["batch_size"] == batch_size:
            run["seed_summaries"][seed]["flat_half_steps"] = None
    return result


@pytest.mark.parametrize(
    "momentum_better, expected",
    [
        # Damped and sped up wherever measured: the unmeasured seed could go either way.
        (lambda b, seed, key: True, report.UNSETTLED),
        # Damped everywhere, not sped up where measured: partly, whatever the missing seed says.
        (lambda b, seed, key: key != "flat_half_steps", report.PARTLY),
        # Momentum lags in the measured seeds of B = 4 too: nothing holds, whatever the missing
        # seed says.
        (lambda b, seed, key: False, report.NOT_SUPPORTED),
    ],
)
def test_claim_6_a_seed_where_neither_optimizer_halved_is_not_a_loss(momentum_better, expected):
    # A run too short for either optimizer to halve theta_2 measures no speed-up either way; it
    # used to count as momentum losing, which turned "supported" into "partly supported".
    result = _unhalved(_quadratic(momentum_better), 4, 1)
    verdict = report.verdict_damping(_results(quadratic=result))
    assert verdict["verdict"] == expected
    assert "neither halved theta_2 in 1/3 seeds" in verdict["evidence"]


# What the figures and captions tell a reader.
@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures ``report`` draws, kept for inspection."""
    kept, make = [], report._figure

    def keep(**kwargs):
        kept.append(make(**kwargs))
        return kept[-1]

    monkeypatch.setattr(report, "_figure", keep)
    return kept


def _grid(lrs_of):
    """Sweep records (two seeds, none reaching the target) over ``lrs_of(batch)`` for B = 8, 32."""
    return [
        {"batch_size": b, "beta": 0.0, "lr": lr, "seed": seed, "steps": 100,
         "steps_to_target": None, "final_train_loss": 1.0 + lr, "final_test_accuracy": 0.5,
         "diverged": False, "wall_seconds": 1.0}
        for b in (8, 32) for lr in lrs_of(b) for seed in range(2)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "lrs_of, note",
    [
        # The study's grid: c/3.16 .. 31.6c, c = 0.1 sqrt(B/32), half a decade apart.
        (lambda b: [0.1 * math.sqrt(b / 32) * 10 ** (k / 2) for k in range(-1, 4)], "3.16"),
        (lambda b: [0.01, 0.1, 1.0], None),  # the same lrs at every B: no sqrt(B) grid to flag
    ],
)
def test_best_lr_caption_says_when_the_grid_itself_scales_as_sqrt_b(lrs_of, note, tmp_path):
    # The best lrs fell on the square-root line because every lr tried was on one; it was unsaid.
    caption = report.fig_best_lr(_results(_grid(lrs_of)), tmp_path / "best_lr.png")
    if note is None:
        assert "sqrt(B)" not in caption
    else:
        assert f"The grid itself scales as sqrt(B), a factor {note} between" in caption


def test_steps_legend_flags_an_extrapolated_critical_batch(figures, tmp_path):
    # S = 10 (1 + 1000 / B) at B = 16..128: B_crit ~ 1000 lies beyond the batch sizes tested.
    steps = {b: round(10 * (1 + 1000 / b)) for b in (16, 32, 64, 128)}
    sweep, curves = _sweep({(b, 0.0): (s, FLAT) for b, s in steps.items()})
    res = _results(sweep, curves)
    res.meta["preset"]["target_loss"] = 0.5
    assert res.fit(0.0).b_crit > 128 and not res.fit(0.0).b_crit_at_bound
    report.fig_steps(res, tmp_path / "steps.png")
    labels = [line.get_label() for line in figures[0].axes[0].lines]
    assert any(lab.startswith("fit S_min") and lab.endswith("(extrapolated)") for lab in labels)


def test_oscillation_axes_name_both_measures_they_draw(figures, tmp_path):
    # The bottom-left panel draws the spread of the loss and of log(loss) on one axis labelled
    # only "std of batch loss".
    sweep, curves = _sweep({(b, beta): (100, SHRINKING) for b in (16, 32) for beta in (0, 0.9)})
    caption = report.fig_oscillation(_results(sweep, curves), tmp_path / "oscillation.png")
    assert figures[0].axes[2].get_ylabel() == (
        "std around its trend: of batch loss (o), of log batch loss (s)"
    )
    assert "median over seeds (bars: min-max)" in caption and "means over seeds" in caption


def test_noise_scale_caption_names_the_run_and_the_error_bars(tmp_path):
    # It said "two batch sizes", "one SGD run" and nothing of the bars (one standard error).
    row = {"step": 0, "train_loss": 2.3, "b_simple": 120.0, "b_simple_stderr": 6.0,
           "grad_sq": 0.5, "grad_sq_stderr": 0.01, "trace": 60.0, "trace_stderr": 2.0}  # fmt: skip
    res = _results()
    res.meta["preset"].update(noise_scale_batches=[32, 512], noise_scale_pairs=64)
    res = dataclasses.replace(res, noise={"lr": 0.316, "beta": 0.0, "rows": [row]})
    caption = report.fig_noise_scale(res, tmp_path / "noise.png")
    assert "gradients at B = 32 and B = 512 averaged over 64 batch pairs" in caption
    assert "one SGD run (B = 32, lr 0.316, seed 0)" in caption
    assert "bars: one standard error" in caption
    assert "| B_simple ± s.e. |" in report._noise_section(res)


def test_setup_states_the_evaluations_the_runs_made():
    # The quick preset asks for about 80 evaluations per run; a whole number of steps apart,
    # the runs made 75 (B >= 128: every 8 of 600 steps) to 80: the setup said "80" of all.
    from experiments.study import PRESETS

    preset = dataclasses.asdict(PRESETS["quick"])
    sweep, curves = _sweep({(32, 0.0): (100, FLAT), (128, 0.0): (100, FLAT)})
    for record in sweep:
        record["steps"], record["eval_every"] = (
            (2000, 25) if record["batch_size"] == 32 else (600, 8)
        )
    res = dataclasses.replace(_results(sweep, curves), meta={"preset": preset, "stages": {}})
    assert "; 75-80 evaluations of the full train and test sets per run" in (
        report._setup_section(res)
    )
    for record in sweep:
        record["steps"], record["eval_every"] = 600, 8
    assert "; 75 evaluations of the full train" in report._setup_section(res)
    # Steps that are no whole number of intervals end with one more evaluation, at the last
    # step (the engine's eval_steps: 8, 16, ..., 600, 605), which was not counted.
    for record in sweep:
        record["steps"] = 605
    assert "; 76 evaluations of the full train" in report._setup_section(res)


def test_setup_budget_formula_gives_the_step_counts_it_lists():
    # The quick preset's B = 64 runs make 1001 steps (77 evaluations 13 apart), which the
    # budget's formula as stated, clip(64000 examples / B, 600, 8000) = 1000, did not give.
    from experiments.study import PRESETS

    quick = PRESETS["quick"]
    preset = dataclasses.asdict(quick)
    steps = {str(b): quick.sweep_steps(b) for b in quick.batch_sizes}
    stages = {"sweep": {"steps": steps, "wall_seconds": 1.0}}
    res = dataclasses.replace(_results(), meta={"preset": preset, "stages": stages})
    line = next(x for x in report._setup_section(res).splitlines() if "**Budget**" in x)
    lo, hi = quick.step_range
    rounded = "rounded up to a whole number of evaluation intervals" in line
    listed = re.findall(r"B=(\d+): (\d+)", line)
    assert [b for b, _ in listed] == [str(b) for b in quick.batch_sizes]
    for b, s in ((int(b), int(s)) for b, s in listed):
        clipped = min(hi, max(lo, math.ceil(quick.example_budget / b)))
        every = quick.sweep_eval_every(b)
        assert s == clipped or (rounded and s % every == 0 and clipped < s < clipped + every), b


def test_effective_table_shows_no_spread_for_one_seed():
    # With one seed the late loss's spread over seeds was printed as "± 0".
    jitter = {(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005}
    res = _effective_results(jitter)
    assert "| 1.0000 ± 0 |" in report._effective_table(res)  # two seeds that agree: zero
    res.effective = [r for r in res.effective if r["seed"] == 0]
    table = report._effective_table(res)
    assert "± 0 " not in table and table.count("| 1.0000 ± n/a |") == 3


def test_report_of_a_sweep_holding_a_run_twice_is_one_error_line(tmp_path, capsys):
    # A repeated line of runs.jsonl counted its run as one more seed ("3/3" of a 2-seed sweep).
    from experiments import cli

    sweep, curves = _sweep({(16, 0): ([100, 300], SHRINKING), (64, 0): (100, SHRINKING)})
    sweep.append(dict(sweep[1]))
    path = _study_dir(tmp_path, sweep, curves)
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: record 5 of "), err
    assert "repeats the run of record 2 (batch size 16, beta 0, lr 0.1, seed 1)" in err[0]
    assert sorted(p.name for p in path.iterdir()) == ["study.json", "sweep"]  # nothing written


def test_claim_2_counts_a_seed_that_diverged_at_the_best_lr():
    # Three seeds, the third diverged at the best lr (still the best: most seeds reached the
    # target). The rule asks every seed to shrink; the diverged one was dropped, and the two
    # left passed for "every seed".
    sweep, curves = _sweep({(32, 0.0): (100, SHRINKING)}, seeds=3)
    assert report.verdict_shrinks(_results(sweep, curves))["verdict"] == report.SUPPORTED
    _diverged([r for r in sweep if r["seed"] == 2], curves, at=300)
    verdict = report.verdict_shrinks(_results(sweep, curves))
    assert verdict["verdict"] == report.NOT_SUPPORTED
    shrink = "the spread and the gradient norm both shrink at B = none "
    assert verdict["evidence"].startswith(shrink)
    assert "With 3 seeds" in verdict["rule"]


def test_setup_says_the_best_lr_is_picked_on_the_seeds_it_reports():
    # The tables report the seeds the best lr was picked on (no held-out seeds): a selection
    # the setup did not state.
    sweep, curves = _sweep({(32, 0.0): (100, FLAT)})
    from experiments.study import PRESETS

    preset = dataclasses.asdict(PRESETS["quick"])
    res = dataclasses.replace(_results(sweep, curves), meta={"preset": preset, "stages": {}})
    assert "picked on the same seeds whose results" in report._setup_section(res)


def test_smith_le_noise_scale_is_stated_in_the_reports_learning_rate():
    # Smith & Le's eps N / (B (1 - m)) takes the heavy-ball lr eps; the report's lrs are the
    # EMA-form eta = eps / (1 - beta), with which it reads eta N / B (the same for every beta).
    # Quoted bare, it gave momentum a noise scale 1 / (1 - beta) = 10x too large at beta 0.9.
    jitter = {(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005}
    res = _effective_results(jitter)
    noise = report.verdict_noise(res)["literature"]
    assert "eps N / (B (1 - m)) with the heavy-ball lr eps" in noise
    assert "eta N / B" in noise
    assert "eta N / B" in report.verdict_momentum(res)["literature"]


def test_claims_1_and_4_name_the_seeds_whose_oscillation_is_not_measurable():
    # A batch loss of exactly 0 (float32 underflow in long small-batch runs) has no log: that
    # seed's oscillation is NaN and was dropped, and a batch size with no seed left vanished
    # from the rank correlation unsaid (and numpy warned).
    sweep, curves = _sweep({(b, 0.0): (100, SHRINKING) for b in (16, 32, 64, 128)})
    curves["b16_beta0.0.npz"]["batch_loss"][:, -30] = 0.0  # both seeds, in the last 20%
    curves["b32_beta0.0.npz"]["batch_loss"][1, -30] = 0.0  # one seed
    res = _results(sweep, curves)
    noise = report.verdict_noise(res)["evidence"]
    assert re.search(r"best lr: oscillation [\d.]+ at B = 32 to", noise)  # its seed with one
    note = (
        "the oscillation is not measurable where a batch loss is 0 (float32 underflow; its log "
        "is undefined), left out: B = 16 (0 of 2 seeds), B = 32 (1 of 2 seeds)"
    )
    assert note in noise
    assert note in report.verdict_batch_size(res)["evidence"]
    # Claim 2's relative spread in the last tenth has no seed at B = 16 ("Mean of empty slice").
    assert re.search(
        r"B = 16 \(lr 0.1\): spread [\d.]+ -> [\d.]+, relative [\d.]+ -> -,",
        (report.verdict_shrinks(res)["evidence"]),
    )


def test_steps_caption_says_its_bars_span_the_seeds_that_reached(tmp_path):
    # Three seeds, the third never reaching the target: the bar ends at the slowest seed that
    # reached it (the table says so), while the caption said "slowest seed".
    sweep, curves = _sweep({(b, 0.0): ([100, 120, None], FLAT) for b in (16, 32)}, seeds=3)
    res = _results(sweep, curves)
    res.meta["preset"]["target_loss"] = 0.5
    caption = report.fig_steps(res, tmp_path / "steps.png")
    assert "(bars: the fastest and the slowest seed that reached it)" in caption


def test_claim_1_leaves_out_a_batch_size_with_no_best_lr():
    # At B = 64 one of the two seeds diverged at every lr: no best lr (claims 2 and 3 and the
    # best-lr figure leave it out), but the surviving seed's oscillation entered claim 1.
    sweep, curves = _sweep({(b, 0.0): (100, SHRINKING) for b in (16, 32, 64, 128)})
    _diverged([r for r in sweep if r["batch_size"] == 64 and r["seed"] == 1], curves)
    res = _results(sweep, curves)
    assert res.best_row(64, 0.0)["final_train_loss"] is None
    assert report.late_window_oscillation(res, 64, 0.0) == []
    assert report._sgd_oscillation_by_batch(res)[0] == [16, 32, 128]


def test_claim_4_reads_no_test_accuracy_where_there_is_no_best_lr():
    # Every SGD run diverged, after some evaluations: the engine keeps each run's last test
    # accuracy before it diverged. There is no best lr at any batch size, yet the accuracies
    # of those diverged runs (0.6 at B = 16, 0.3 at B = 64) made claim 4 "stuck (yes)" and
    # "partly supported", where the README says a sweep in which every lr diverged is not
    # settled.
    sweep, curves = _sweep({(b, 0.0): (100, SHRINKING) for b in (16, 32, 64)})
    _diverged(sweep, curves, at=300)
    for record in sweep:
        record["final_test_accuracy"] = {16: 0.6, 32: 0.5, 64: 0.3}[record["batch_size"]]
    verdict = report.verdict_batch_size(_results(sweep, curves))
    assert verdict["verdict"] == report.UNSETTLED
    assert "stuck (not measured):" in verdict["evidence"]
    assert verdict["evidence"].endswith("test accuracy at the best lr - at B = - vs - at B = -")


@pytest.mark.parametrize("missing", ["train_loss", "eval_steps"])
def test_report_of_effective_curves_without_an_array_it_reads_is_one_error_line(
    missing, tmp_path, capsys
):
    # The effective-batch test's curves are read for their full-train loss at eval_steps too,
    # which the check of the records did not ask for: a KeyError traceback.
    import json

    from experiments import cli

    path = _study_dir(tmp_path)
    records = _effective_results({(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005}).effective
    (path / "effective" / "curves").mkdir(parents=True)
    lines = []
    for r in records:
        base = {"run_id": f"{r['curves']}:{r['seed']}", "wall_seconds": 1.0}
        lines.append(json.dumps({**r, **base, "curves": f"curves/{r['curves']}"}) + "\n")
        arrays = {"batch_loss": np.ones((2, 400)), "grad_norm": np.ones((2, 400))}
        arrays |= {"train_loss": np.ones((2, 40)), "eval_steps": np.arange(10, 401, 10)}
        arrays.pop(missing)
        np.savez(path / "effective" / "curves" / r["curves"], **arrays)
    (path / "effective" / "runs.jsonl").write_text("".join(lines))
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: record 1 of "), err
    assert "its curves in curves/b8_beta0.9.npz" in err[0]
    assert sorted(p.name for p in path.iterdir()) == ["effective", "study.json"]


def test_claim_4_costlier_when_the_critical_batch_lies_below_every_batch_tested():
    # S(B) = 100 (1 + 4 / B): B_crit = 4, below the smallest batch tested, so every batch pays
    # nearly in proportion to B (examples to target 2000 at B = 16, 13300 at B = 128). The
    # rule's own reason ("well above it, doubling the batch nearly doubles the examples") holds
    # throughout, yet "B_crit inside the range tested" judged costlier "no".
    steps = {b: round(100 * (1 + 4 / b)) for b in (16, 32, 64, 128)}
    sweep, curves = _sweep({(b, 0.0): (s, SHRINKING) for b, s in steps.items()})
    verdict = report.verdict_batch_size(_results(sweep, curves))
    assert "fitted B_crit = 4" in verdict["evidence"]
    assert "below the largest batch tested (yes)" in verdict["evidence"]
    assert "costlier (the fitted B_crit lies below the largest batch tested" in verdict["rule"]


def test_report_of_an_unfinished_sweep_says_so(tmp_path):
    # `report DIR` while the main job is still sweeping (or after it was stopped): the verdicts
    # judged the runs stored so far, under a setup listing the whole grid, and nothing said the
    # sweep was incomplete (a missing stage says "Not run"; a missing sweep "no sweep results").
    import json

    sweep, curves = _sweep({(b, beta): (100, SHRINKING) for b in (16, 64) for beta in (0, 0.9)})
    path = _study_dir(tmp_path, sweep, curves)
    text, _ = _build_quietly(path)
    note = (
        "**The sweep has not finished**: 8 of the 140 runs of its grid are stored, at batch "
        "sizes 16, 64; the verdicts, tables and figures judge those alone."
    )
    assert note in text.split("## Setup")[0]
    meta = json.loads((path / "study.json").read_text())
    meta["stages"] = {"sweep": {"wall_seconds": 1.0}}
    (path / "study.json").write_text(json.dumps(meta))
    text, _ = _build_quietly(path)
    assert "The sweep has not finished" not in text


@pytest.mark.parametrize(
    "field, value, what",
    [
        ("model", "cnn", "model 'cnn', where the study's is 'mlp'"),
        ("dataset", "mnist1d", "dataset 'mnist1d', where the study's is 'digits'"),
        ("target_loss", 0.3, "target_loss 0.3, where the study's is 0.5"),
    ],
)
def test_report_of_a_sweep_holding_runs_of_another_study_is_one_error_line(
    field, value, what, tmp_path, capsys
):
    # `sweep --out DIR/sweep` with another model (or data, or target) appends its runs to the
    # study's: at other lrs they joined its grid unsaid (a 6th lr, another best lr; steps to
    # another target), where the same settings were refused as a repeated run.
    from experiments import cli

    sweep, curves = _sweep({(16, 0): (100, SHRINKING), (64, 0): (100, SHRINKING)})
    for record in sweep:
        record.update(model="mlp", dataset="digits", target_loss=0.5)
    sweep.append({**sweep[0], "lr": 0.01, field: value})
    path = _study_dir(tmp_path, sweep, curves)
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: record 5 of "), err
    assert f"is a run of another study ({what})" in err[0]
    assert sorted(p.name for p in path.iterdir()) == ["study.json", "sweep"]  # nothing written


def test_loss_curves_leave_out_settings_where_every_lr_diverged(figures, tmp_path):
    # As the best-lr figure does: with no lr that trained, the tie-break's pick was drawn and
    # labelled as that batch size's best learning rate.
    sweep, curves = _sweep({(b, beta): (100, SHRINKING) for b in (16, 32, 64) for beta in (0, 0.9)})
    _diverged([r for r in sweep if r["batch_size"] == 64 and r["beta"] == 0.9], curves)
    res = _results(sweep, curves)
    res.meta["preset"]["target_loss"] = 0.5
    report.fig_loss_curves(res, tmp_path / "loss_curves.png")
    labels = [[line.get_label() for line in ax.lines] for ax in figures[0].axes]
    assert "EMA momentum (beta 0.9), lr 0.1" in labels[0]
    assert "SGD (beta 0), lr 0.1" in labels[2]
    assert not any(label.startswith("EMA momentum") for label in labels[2])


def test_an_effective_test_where_every_run_diverged_at_once_settles_nothing(tmp_path):
    # Every run of the effective-batch test diverged before its first evaluation: nothing was
    # measured ("-" throughout), yet claims 1 and 5 were judged "not supported", and its figure
    # failed ("Data cannot be log-scaled"), so the report could not be built at all.
    jitter = {(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005}
    res = _effective_results(jitter, diverged={(*case, seed) for case in jitter for seed in (0, 1)})
    for arrays in res.effective_curves.values():
        arrays["train_loss"][:] = np.nan
        arrays["batch_loss"][:, 2:] = np.nan
        arrays["eval_steps"] = np.arange(10, 401, 10)
    res.meta["stages"]["effective"]["lr"] = 0.1
    res.meta["preset"]["effective_eval_every"] = 10
    for verdict in (report.verdict_noise(res), report.verdict_momentum(res)):
        assert verdict["verdict"] == report.UNSETTLED, verdict["evidence"]
    assert (
        "B = 8 -> B' = 152: batch-loss oscillation - -> -;" in report.verdict_noise(res)["evidence"]
    )
    report.fig_effective(res, tmp_path / "effective_batch.png")
    # One configuration measured is a measurement: SGD at B' diverged, the rest did not.
    res = _effective_results(jitter, diverged={(152, 0.0, 0), (152, 0.0, 1)})
    assert report.verdict_noise(res)["verdict"] == report.NOT_SUPPORTED


def test_claim_3_says_half_the_seeds_leave_a_setting_without_a_best_lr():
    # Two seeds, one diverged at every lr: the median final loss over the seeds is then infinite,
    # so there is no best lr and the setting is left out, which the rule and the evidence put as
    # "most seeds diverged" (one of two is not most).
    bracketed = _lr_grid(32, 0.0, [0.9, 0.3, 0.6])
    half = _lr_grid(32, 0.9, [0.9, 0.3, 0.6])
    for record in half:
        if record["seed"] == 1:
            record.update(diverged=True, final_train_loss=None)
    verdict = report.verdict_learning_rate(_results(bracketed + half))
    assert verdict["evidence"].endswith(
        "; left out, half the seeds or more diverged at every lr: 1"
    )
    assert "or where half the seeds or more diverged at every lr (no best lr)" in verdict["rule"]


@pytest.mark.parametrize("blocker", ["report.md", "figures/loss_curves.png", "figures"])
def test_report_export_refused_writes_nothing_in_dir(blocker, tmp_path, capsys):
    # An --export PATH that cannot take the report was refused only after DIR's report,
    # figures and verdicts.json had been written: exit status 2, "error: --export: ...", and
    # DIR rebuilt all the same.
    from experiments import cli

    sweep, curves = _sweep({(b, 0.0): (100, SHRINKING) for b in (16, 64)})
    (tmp_path / "study").mkdir()
    path = _study_dir(tmp_path / "study", sweep, curves)
    dest = tmp_path / "dest"
    (dest / "figures").mkdir(parents=True)
    if blocker == "figures":
        (dest / "figures").rmdir()
        (dest / "figures").write_text("")
    else:
        (dest / blocker).mkdir()
    assert cli.main(["report", str(path), "--export", str(dest)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: --export: cannot export ")
    assert sorted(p.name for p in path.iterdir()) == ["study.json", "sweep"]  # nothing written


def test_nqm_section_flags_either_critical_batch_at_the_search_bound():
    # Only momentum's B_crit was flagged: an SGD one at the search bound (its steps flat over
    # the batch sizes run: no B_crit measured) was given as a number like any other.
    import types

    rows = [
        {"batch_size": b, "sgd_steps": 100, "momentum_steps": round(10 * (1 + 500 / b)),
         "sgd_lr": 1.0, "momentum_lr": 0.1, "momentum_beta": 0.9, "momentum_ema_lr": 1.0}
        for b in (64, 256, 1024)
    ]  # fmt: skip
    assert report.analysis.fit_steps_vs_batch([64, 256, 1024], [100] * 3).b_crit_at_bound
    text = report._nqm_section(types.SimpleNamespace(nqm=rows))
    sgd = re.search(r"Fitted B_crit: SGD ([^,]*), momentum ([^.]*\.\d*)", text)
    assert sgd and sgd[1].endswith(" (at the search bound)"), text
    assert "(at the search bound)" not in sgd[2]


def test_report_without_the_effective_test_says_it_was_not_run(tmp_path):
    # Section 5 said nothing of it (no figure, no table, no "Not run" as the other stages get),
    # while the oscillation caption describes its panels.
    sweep, curves = _sweep({(b, beta): (100, SHRINKING) for b in (16, 64) for beta in (0, 0.9)})
    text, _ = _build_quietly(_study_dir(tmp_path, sweep, curves))
    section = text.split("## 5.")[1].split("## 6.")[0]
    assert "The effective-batch test (momentum at B against SGD at B and at B (1 + beta) / " in (
        section
    )
    assert section.rstrip().endswith("(1 - beta), at one lr): not run.")


def test_claim_3_is_supported_at_three_quarters_of_the_settings():
    # Crawl and overshoot at B = 8, 16, 32; at B = 64 the best lr is the smallest (no crawl).
    records = [r for b in (8, 16, 32) for r in _lr_grid(b, 0.0, [0.9, 0.3, 0.6])]
    records += _lr_grid(64, 0.0, [0.3, 0.6, 0.9])
    verdict = report.verdict_learning_rate(_results(records))
    assert verdict["evidence"].startswith("crawl at the smallest lr in 3/4")
    assert verdict["verdict"] == report.SUPPORTED  # ">= 75%", as the rule says


def test_claim_5_speed_is_the_mean_ratio_over_the_three_smallest_batch_sizes():
    # Momentum's steps / SGD's at B = 8, 16, 32: 1.0, 0.95, 0.3 (mean 0.75 < 0.9, median 0.95);
    # at B = 64 (not among the three smallest) 2.0.
    ratios = {8: 1.0, 16: 0.95, 32: 0.3, 64: 2.0}
    settings = {(b, 0.0): (100, FLAT) for b in ratios}
    settings |= {(b, 0.9): (round(100 * r), FLAT) for b, r in ratios.items()}
    verdict = report.verdict_momentum(_results(*_sweep(settings)))
    assert verdict["verdict"] == report.PARTLY  # faster at small batches; nothing else measured


def _two_effective_batches(level, jitter):
    """An effective-batch test at B = 8 and 16 (beta 0.9, so B' = 152 and 304), two seeds: the
    full-train loss of ``(batch, beta)`` zigzags by ``jitter`` around ``level``."""
    records, curves = [], {}
    zigzag = lambda n: (-1.0) ** np.arange(n)
    for (batch, beta), size in jitter.items():
        name = f"b{batch}_beta{beta}.npz"
        base = level.get((batch, beta), 1.0)
        train = np.stack([base + size * (1 + 0.1 * seed) * zigzag(40) for seed in range(2)])
        loss = np.stack([1.0 + 0.1 * zigzag(400) for _ in range(2)])
        for seed in range(2):
            records.append({"batch_size": batch, "beta": beta, "lr": 0.1, "seed": seed,
                            "steps": 400, "diverged": False, "curves": name,
                            "curve_index": seed})  # fmt: skip
        curves[name] = {"train_loss": train, "batch_loss": loss}
    res = _results()
    res.meta = {"preset": {"effective_batches": [8, 16]}, "stages": {"effective": {"beta": 0.9}}}
    res.effective, res.effective_curves = records, curves
    return res


CONFIGS = [(8, 0.9), (8, 0.0), (152, 0.0), (16, 0.9), (16, 0.0), (304, 0.0)]


@pytest.mark.parametrize(
    "level, jitter",
    [
        # Steadier than SGD (every seed below every seed) at B = 8 but not at B = 16.
        ({}, dict(zip(CONFIGS, [0.01, 0.05, 0.005, 0.05, 0.01, 0.005], strict=True))),
        # Momentum's late loss is most of the way to SGD at B' at B = 8 (0.74), not at 16 (0.07).
        (
            dict(zip(CONFIGS, [0.6, 1.0, 0.5, 0.95, 1.0, 0.5], strict=True)),
            dict.fromkeys(CONFIGS, 0.02),
        ),
    ],
    ids=["steadier", "like_bigger"],
)
def test_claim_5_parts_must_hold_at_every_tested_batch_size(level, jitter):
    verdict = report.verdict_momentum(_two_effective_batches(level, jitter))
    assert verdict["verdict"] == report.NOT_SUPPORTED


def test_claim_1_fixed_lr_part_needs_every_large_batch_seed_below_every_small_batch_seed():
    # SGD's batch-loss oscillation at B = 8 is 0.1 in seed 0 and 0.02 in seed 1 (mean 0.06); at
    # B' = 152 it is 0.03 in both. The means fall, but seed 1 at B oscillates less than either
    # seed at B': not beyond seed spread. The rule compared the means and judged it "less".
    res = _effective_results({(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005})
    zigzag = (-1.0) ** np.arange(400)
    res.effective_curves["b8_beta0.0.npz"]["batch_loss"][1] = 1.0 + 0.02 * zigzag
    verdict = report.verdict_noise(res)
    assert verdict["verdict"] == report.NOT_SUPPORTED  # no sweep: the one part measured fails
    assert "every seed" in verdict["rule"]
    assert "at B' than at B in every seed at B = none (of B = 8)" in verdict["evidence"]
    # Every seed apart, as in the unedited test: the part holds.
    verdict = report.verdict_noise(
        _effective_results({(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005})
    )
    assert verdict["verdict"] == report.PARTLY
    assert "at B' than at B in every seed at B = 8 (of B = 8)" in verdict["evidence"]


def test_effective_table_shows_the_seed_range_of_the_measures_the_verdicts_judge_per_seed():
    # Claims 1 and 5 judge the batch-loss oscillation and the full-train-loss jitter seed by seed
    # (every seed below every other seed), but the table showed their means alone: a reader could
    # not see whether the seeds lay apart.
    jitter = {(8, 0.9): 0.01, (8, 0.0): 0.05, (152, 0.0): 0.005}
    res = _effective_results(jitter)
    table = report._effective_table(res)
    for _, s, _ in report.effective_triples(res):
        low, high = min(s.full_loss_jitter), max(s.full_loss_jitter)
        assert low < high  # the two seeds differ by 10%
        cell = f"{report._fmt(s.mean(s.full_loss_jitter))} ({report._fmt(low)}-{report._fmt(high)})"
        assert cell in table
    assert "seed range" in table.splitlines()[0]
    res.effective = [r for r in res.effective if r["seed"] == 0]
    rows = report._effective_table(res).splitlines()[2:]
    # One seed: the mean alone, no range.
    assert all(re.fullmatch(r" [0-9.]+ ", cell) for row in rows for cell in row.split("|")[5:8])
