"""The leave-one-setting-out procedure on hand-made tables whose answers are worked out by hand in the comments."""

import math

import pytest

from trl_entropy.evaluation.validation import (
    PROBE_ONLY_RULE,
    PROBE_RULE,
    STATIC_RULE,
    Setting,
    binomial_p_at_least,
    choose_thresholds,
    clopper_pearson_interval,
    compare_rules,
    leave_one_setting_out,
    predict,
)

INF = math.inf


def _probe_table() -> list[Setting]:
    rows = [  # name, gap, auroc, probe trend, outcome
        ("A", 0.20, 0.70, 0.05, "helped"),
        ("B", 0.02, 0.90, -0.10, "hurt"),
        ("C", 0.15, 0.80, -0.02, "mixed"),
        ("D", 0.25, 0.65, 0.03, "helped"),
        ("E", 0.12, 0.55, 0.04, "hurt"),
    ]
    return [
        Setting(n, {"greedy_minus_sampled": g, "confidence_auroc": a, "probe_trend": p}, o) for n, g, a, p, o in rows
    ]


def test_probe_rule_left_out_by_hand():
    # Hold out A: on B, C, D, E the candidates are -inf, -0.06, 0.005, 0.035, inf; 0.005 (helps D, E) and inf (helps
    # none) both agree 3 of 4; inf predicts helps less often: A gets "does not help", but A helped.
    # Hold out B: 0.005 (helps A, D, E) and 0.045 (helps A) agree 3 of 4 -> 0.045; B (-0.10) does not help: agrees.
    # Hold out C: -0.035 and 0.045 agree 3 of 4 -> 0.045; C (-0.02) does not help, C was mixed: agrees.
    # Hold out D: 0.045 agrees 4 of 4 (helps A only); D (0.03) does not help, but D helped.
    # Hold out E: 0.005 agrees 4 of 4 (helps A, D); E (0.04) helps, but E hurt.
    result = leave_one_setting_out(PROBE_ONLY_RULE, _probe_table())
    rows = {r["name"]: r for r in result.predictions}
    assert [rows[n]["thresholds"][0] for n in "ABCDE"] == pytest.approx([INF, 0.045, 0.045, 0.045, 0.005])
    assert [rows[n]["train_agreement"] for n in "ABCDE"] == [3, 3, 3, 4, 4]
    assert [rows[n]["agrees"] for n in "ABCDE"] == [False, True, True, False, False]
    assert result.agreements == 2 and result.n == 5
    # The majority class of the other four: A: 1 of 4 helped -> no help (wrong); B, C, E: 2 of 4, a tie -> no help
    # (right); D: 1 of 4 -> no help (wrong).
    assert result.majority_baseline == 3
    assert result.p_vs_chance == pytest.approx(26 / 32)  # P(X >= 2), X ~ Bin(5, 1/2) = 1 - (1 + 5) / 32
    assert result.exact_ci95 == pytest.approx((0.0527, 0.8534), abs=1e-4)  # Clopper-Pearson 2/5, tabulated
    assert result.wilson_ci95 == pytest.approx((0.1176, 0.7693), abs=1e-4)


def test_static_rule_left_out_by_hand():
    settings = [
        Setting("S1", {"greedy_minus_sampled": 0.20, "confidence_auroc": 0.70}, "helped"),
        Setting("S2", {"greedy_minus_sampled": 0.02, "confidence_auroc": 0.90}, "hurt"),
        Setting("S3", {"greedy_minus_sampled": 0.15, "confidence_auroc": 0.55}, "hurt"),
    ]
    # Hold out S1: on S2 and S3 only "never helps" agrees twice; the largest such thresholds are (inf, inf): S1 is
    # predicted not to help, but helped.
    # Hold out S2: (-inf, 0.625), (0.175, -inf) and (0.175, 0.625) all help S1 only; the largest is (0.175, 0.625);
    # S2's gap 0.02 < 0.175: does not help, and S2 hurt: agrees.
    # Hold out S3: only a gap threshold 0.11 with the AUROC ignored helps S1 and not S2; S3 (gap 0.15) helps: wrong.
    result = leave_one_setting_out(STATIC_RULE, settings)
    expected = [[INF, INF], [0.175, 0.625], [0.11, -INF]]
    for row, thresholds in zip(result.predictions, expected):
        assert row["thresholds"] == pytest.approx(thresholds)
    assert [r["agrees"] for r in result.predictions] == [False, True, False]
    assert result.agreements == 1


def test_predict_and_missing_features():
    features = {"greedy_minus_sampled": 0.2, "confidence_auroc": math.nan}
    assert predict(STATIC_RULE, (0.1, -INF), features) == "helps"  # the AUROC is ignored at -inf
    assert predict(STATIC_RULE, (0.1, 0.6), features) == "does not help"  # NaN fails a finite threshold
    assert predict(STATIC_RULE, (0.2, -INF), features) == "helps"  # at the threshold counts as above
    with pytest.raises(ValueError, match="thresholds"):
        predict(STATIC_RULE, (0.1,), features)


def test_choose_thresholds_separates_a_separable_table():
    settings = [
        Setting(str(i), {"probe_trend": t}, "helped" if t > 0 else "hurt")
        for i, t in enumerate([-0.2, -0.1, 0.1, 0.3])
    ]
    thresholds, agreement = choose_thresholds(PROBE_ONLY_RULE, settings)
    assert thresholds == pytest.approx((0.0,)) and agreement == 4


def test_compare_rules_skips_rules_without_their_features_and_picks_the_best():
    table = _probe_table()
    summary = compare_rules(table)
    names = [r["rule"] for r in summary["results"]]
    assert names == ["static", "static+probe", "probe"] and summary["skipped_rules"] == []
    best = max(summary["results"], key=lambda r: r["agreements"])
    assert summary["best_rule"] == best["rule"]
    assert summary["beats_chance"] is False  # 5 settings can never beat chance: 5 of 5 has p = 1/32 > 0.025
    static_only = [Setting(s.name, {k: s.features[k] for k in STATIC_RULE.features}, s.outcome) for s in table]
    summary = compare_rules(static_only, rules=(STATIC_RULE, PROBE_RULE))
    assert summary["skipped_rules"] == ["static+probe"] and summary["best_rule"] == "static"


def test_exact_interval_and_binomial_tail():
    assert clopper_pearson_interval(8, 8)[0] == pytest.approx(0.025 ** (1 / 8))  # k = n: low = (alpha/2)^(1/n)
    assert clopper_pearson_interval(0, 8)[1] == pytest.approx(1 - 0.025 ** (1 / 8))
    assert binomial_p_at_least(9, 10) == pytest.approx(11 / 1024)
    low, high = clopper_pearson_interval(7, 10)
    # The exact interval's ends are where the tails equal 2.5%.
    assert binomial_p_at_least(7, 10, low) == pytest.approx(0.025, abs=1e-9)
    assert 1 - binomial_p_at_least(8, 10, high) == pytest.approx(0.025, abs=1e-9)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="outcome"):
        Setting("x", {}, "better")
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_setting_out(STATIC_RULE, _probe_table()[:1])


def test_min_verdict_prompts_from_the_wilson_half_width():
    import statistics

    from trl_entropy.evaluation import wilson_interval
    from trl_entropy.evaluation.diagnose import MIN_VERDICT_PROMPTS, MODE_GAP_HELPS, min_prompts_for_effect

    assert MIN_VERDICT_PROMPTS == min_prompts_for_effect(MODE_GAP_HELPS) == 93
    # Independent check at exactly 50% (even n): the Wilson interval of n/2 of n is within +-10 points from n = 94
    # on and wider at 92; at 64 problems (the demo) it is +-11.9 points, at 8 (demo --quick) +-28.5.
    assert (wilson_interval(47, 94)[1] - wilson_interval(47, 94)[0]) / 2 <= 0.10
    assert (wilson_interval(46, 92)[1] - wilson_interval(46, 92)[0]) / 2 > 0.10
    z = statistics.NormalDist().inv_cdf(0.975)
    assert min_prompts_for_effect(0.05) == math.ceil(z * z * 0.25 / 0.05**2 - z * z)  # the closed form at p = 1/2
    with pytest.raises(ValueError, match="effect"):
        min_prompts_for_effect(0.0)


def test_verdict_says_too_few_samples_below_the_minimum():
    from trl_entropy.evaluation.diagnose import MIN_VERDICT_PROMPTS, TOO_FEW_SAMPLES, verdict

    def metrics(num_prompts):
        return {
            "has_answers": True,
            "settings": {"num_prompts": num_prompts},
            "greedy": {"accuracy": 0.5},
            "sampled": {"accuracy": 0.2},
            "confidence": {"sequence_entropy": {"auroc": 0.8, "auroc_ci95": [0.7, 0.9]}},
        }

    few = verdict(metrics(8), min_prompts=MIN_VERDICT_PROMPTS)
    assert few["verdict"] == TOO_FEW_SAMPLES == "too few samples for a verdict"
    assert few["numbers"]["greedy_minus_sampled"] == pytest.approx(0.3) and "8 prompts" in few["reason"]
    assert verdict(metrics(MIN_VERDICT_PROMPTS), min_prompts=MIN_VERDICT_PROMPTS)["verdict"] == "likely to help"
    assert verdict(metrics(8))["verdict"] == "likely to help"  # without a minimum, the rule alone (as before)
