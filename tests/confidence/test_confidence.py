"""Tests of trl_entropy.confidence: calibrated thresholds, early stopping inside generate, the two-stage pipeline."""

import json
import math
import random
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_entropy.cli.arguments import CalibrateArguments, EarlyStopGenerateArguments
from trl_entropy.cli.confidence import run_calibrate, run_early_stop_generate
from trl_entropy.confidence import (
    THRESHOLD_METHODS,
    ConfidenceSignal,
    EntropyEarlyStopping,
    EntropyThresholdCalibrator,
    TokenConfidenceRecorder,
    deepconf_threshold,
    delimiter_token_ids,
    think_just_enough_generate,
    welch_p_value,
)
from trl_entropy.ops import threshold_bayes
from trl_entropy.testing import make_tiny_model, make_tiny_tokenizer, tiny_prompts

# ---------------------------------------------------------------------------------------------------------------------
# Float64 references
# ---------------------------------------------------------------------------------------------------------------------


def gaussian_groups(mu_c, sigma_c, n_c, mu_i, sigma_i, n_i, seed=0):
    rng = random.Random(seed)
    correct = [rng.gauss(mu_c, sigma_c) for _ in range(n_c)]
    incorrect = [rng.gauss(mu_i, sigma_i) for _ in range(n_i)]
    return correct + incorrect, [True] * n_c + [False] * n_i


def log_normal_pdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def reference_signal(logits: torch.Tensor, kind: str, top_k: int = 20, base: float = 2.0) -> torch.Tensor:
    """The per-token signal from raw logits, in float64, written independently of the library."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    if kind == "entropy":
        return -(logp.exp() * logp).sum(-1) / math.log(base)
    top = logp.sort(dim=-1, descending=True).values[..., :top_k]
    if kind == "topk_confidence":
        return -top.mean(-1)
    q = top.exp() / top.exp().sum(-1, keepdim=True)
    return -(q * q.log()).sum(-1) / math.log(base)


# ---------------------------------------------------------------------------------------------------------------------
# Calibration: closed forms on Gaussian groups
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_matches_closed_forms_on_gaussian_groups():
    entropies, labels = gaussian_groups(0.8, 0.2, 12, 1.6, 0.5, 9, seed=1)
    cal = EntropyThresholdCalibrator(p_value_method="normal").fit(entropies, labels)
    s = cal.stats
    correct = [e for e, ok in zip(entropies, labels) if ok]
    incorrect = [e for e, ok in zip(entropies, labels) if not ok]
    mu_c, sd_c = statistics.fmean(correct), statistics.stdev(correct)
    mu_i, sd_i = statistics.fmean(incorrect), statistics.stdev(incorrect)
    pooled = math.sqrt((11 * sd_c**2 + 8 * sd_i**2) / 19)
    d = (mu_c - mu_i) / pooled
    assert (s.n_correct, s.n_incorrect) == (12, 9)
    for got, want in [(s.mu_correct, mu_c), (s.sigma_correct, sd_c), (s.mu_incorrect, mu_i)]:
        assert got == pytest.approx(want, rel=1e-12)
    assert s.sigma_incorrect == pytest.approx(sd_i, rel=1e-12)
    assert s.cohens_d == pytest.approx(d, rel=1e-12)
    t = cal.thresholds
    assert t["mean"] == pytest.approx(mu_c, rel=1e-12)
    assert t["info"] == pytest.approx(mu_c + sd_c * math.log(1 + abs(d)), rel=1e-12)
    assert t["universal"] == pytest.approx(
        mu_c + abs(d) / (1 + abs(d)) * (mu_i - mu_c) * max(0.0, 1 - sd_c / mu_c), rel=1e-12
    )
    # Bayes: the equal-prior decision boundary lies between the means, where the two densities are equal.
    tau = t["bayes"]
    assert mu_c < tau < mu_i
    assert log_normal_pdf(tau, mu_c, sd_c) == pytest.approx(log_normal_pdf(tau, mu_i, sd_i), abs=1e-9)
    # Left of it the correct density dominates, right of it the incorrect one (it is the decision boundary).
    assert log_normal_pdf(tau - 1e-3, mu_c, sd_c) > log_normal_pdf(tau - 1e-3, mu_i, sd_i)
    assert log_normal_pdf(tau + 1e-3, mu_c, sd_c) < log_normal_pdf(tau + 1e-3, mu_i, sd_i)
    # The separation test: normal approximation of Welch's statistic, computed by hand.
    z = (mu_c - mu_i) / math.sqrt(sd_c**2 / 12 + sd_i**2 / 9)
    assert s.t_statistic == pytest.approx(z, rel=1e-12)
    assert s.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert s.p_value_method == "normal_approximation"
    assert cal.separates and "SEPARATES" in cal.summary()


def test_bayes_root_is_midpoint_when_sigmas_are_equal():
    rng = random.Random(3)
    correct = [rng.gauss(1.0, 0.3) for _ in range(7)]
    shift = 0.9  # incorrect = correct + shift: identical sample standard deviations
    cal = EntropyThresholdCalibrator().fit(correct + [c + shift for c in correct], [True] * 7 + [False] * 7)
    s = cal.stats
    assert s.sigma_correct == pytest.approx(s.sigma_incorrect, rel=1e-12)
    assert cal.threshold("bayes") == pytest.approx((s.mu_correct + s.mu_incorrect) / 2, abs=1e-9)
    assert threshold_bayes(0.5, 0.2, 1.7, 0.2) == pytest.approx(1.1, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    mu_c=st.floats(0.0, 5.0),
    gap=st.floats(0.05, 5.0),
    sigma_c=st.floats(0.05, 3.0),
    ratio=st.floats(0.2, 5.0),
)
def test_bayes_root_equalises_the_two_densities(mu_c, gap, sigma_c, ratio):
    mu_i, sigma_i = mu_c + gap, sigma_c * ratio
    tau = threshold_bayes(mu_c, sigma_c, mu_i, sigma_i)
    diff = log_normal_pdf(tau, mu_c, sigma_c) - log_normal_pdf(tau, mu_i, sigma_i)
    # A root between the means exists whenever the density ratio changes sign between them.
    at_mu_c = log_normal_pdf(mu_c, mu_c, sigma_c) - log_normal_pdf(mu_c, mu_i, sigma_i)
    at_mu_i = log_normal_pdf(mu_i, mu_c, sigma_c) - log_normal_pdf(mu_i, mu_i, sigma_i)
    if at_mu_c > 0 > at_mu_i:
        assert mu_c <= tau <= mu_i
        scale = 1 + abs(tau - mu_c) / sigma_c**2 + abs(tau - mu_i) / sigma_i**2
        assert abs(diff) <= 1e-9 * scale


def test_p_value_welch_is_calibrated_and_the_normal_approximation_is_not_more_conservative():
    pytest.importorskip("scipy")
    rng = random.Random(0)
    rejections = {"scipy": 0, "normal": 0}
    reps = 1500
    for _ in range(reps):
        x = [rng.gauss(0, 1) for _ in range(6)]
        y = [rng.gauss(0, 3) for _ in range(9)]  # same mean, unequal variances: the null of Welch's test
        p_t = welch_p_value(x, y, "scipy")
        p_z = welch_p_value(x, y, "normal")
        assert p_t[0] == pytest.approx(p_z[0], rel=1e-12)  # the same statistic
        assert p_z[1] <= p_t[1] + 1e-12  # Student's t has heavier tails than the normal
        rejections["scipy"] += p_t[1] < 0.05
        rejections["normal"] += p_z[1] < 0.05
    assert 0.03 < rejections["scipy"] / reps < 0.07
    assert rejections["normal"] > rejections["scipy"]
    assert welch_p_value([1.0, 2.0], [3.0, 4.0])[2] == "welch_t"  # auto picks scipy when installed


def test_non_separating_signal_is_reported():
    # Correct answers with the *higher* entropy: d > 0.
    entropies, labels = gaussian_groups(1.5, 0.2, 8, 0.8, 0.2, 8, seed=2)
    cal = EntropyThresholdCalibrator().fit(entropies, labels)
    assert cal.stats.cohens_d > 0 and not cal.separates
    assert "DOES NOT SEPARATE" in cal.summary()
    # Same distribution for both groups: no significant difference.
    correct, incorrect = [0.8, 0.9, 1.0, 1.1, 1.2, 1.0], [0.85, 0.95, 1.05, 1.15, 0.95, 1.1]
    cal = EntropyThresholdCalibrator().fit(correct + incorrect, [True] * 6 + [False] * 6)
    assert cal.stats.cohens_d < 0 and cal.stats.p_value > 0.5 and not cal.separates
    assert "DOES NOT SEPARATE" in cal.summary()


@pytest.mark.parametrize(
    "entropies, labels, match",
    [
        ([0.1, 0.2, 0.3], [True, True], "one length"),
        ([0.1, 0.2, 0.3, 0.4], [True, True, True, True], "at least 2 incorrect"),
        ([0.1, 0.2, 0.3, 0.4], [False, False, False, False], "at least 2 correct"),
        ([0.1, 0.2, 0.3], [True, True, False], "at least 2 incorrect"),
        ([0.1], [True], "at least 2"),
        ([], [], "at least 2"),
        ([0.1, float("nan"), 0.3, 0.4], [True, True, False, False], "NaN or infinite"),
        ([0.1, float("inf"), 0.3, 0.4], [True, True, False, False], "NaN or infinite"),
        ([0.2, 0.2, 0.3, 0.4], [True, True, False, False], "zero variance"),
        ([0.1, 0.2, 0.3, 0.4], [True, 2, False, False], "is_correct"),
        (["a", 0.2, 0.3, 0.4], [True, True, False, False], "sequence_entropies"),
    ],
)
def test_degenerate_inputs_are_refused(entropies, labels, match):
    with pytest.raises(ValueError, match=match):
        EntropyThresholdCalibrator().fit(entropies, labels)


def test_bad_calibrator_arguments():
    with pytest.raises(ValueError, match="alpha"):
        EntropyThresholdCalibrator(alpha=1.5)
    with pytest.raises(ValueError, match="method"):
        EntropyThresholdCalibrator(method="median")
    with pytest.raises(ValueError, match="deepconf_threshold"):
        EntropyThresholdCalibrator(signal=ConfidenceSignal("topk_confidence"))
    with pytest.raises(RuntimeError, match="not fitted"):
        EntropyThresholdCalibrator().threshold()


def test_json_round_trip(tmp_path):
    entropies, labels = gaussian_groups(0.7, 0.2, 10, 1.4, 0.4, 10, seed=4)
    cal = EntropyThresholdCalibrator(alpha=0.01, method="bayes", signal=ConfidenceSignal("entropy", 20, math.e))
    cal.fit(torch.tensor(entropies), torch.tensor(labels))
    path = cal.save(tmp_path / "sub" / "cal.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["cal.json"]  # no temp file left behind
    loaded = EntropyThresholdCalibrator.load(path)
    assert loaded.stats == cal.stats
    assert loaded.threshold() == cal.threshold("bayes")
    assert (loaded.alpha, loaded.method, loaded.signal) == (0.01, "bayes", cal.signal)
    assert loaded.sequence_entropies == pytest.approx(entropies, rel=1e-6)  # float32 tensor input
    assert loaded.is_confident([cal.threshold("bayes"), cal.threshold("bayes") + 1e-6, float("nan")]) == [
        True,
        False,
        False,
    ]
    # Saving again replaces the file atomically.
    cal.method = "mean"
    cal.save(path)
    assert EntropyThresholdCalibrator.load(path).method == "mean"


def test_corrupt_and_invalid_json_give_clear_errors(tmp_path):
    entropies, labels = gaussian_groups(0.7, 0.2, 6, 1.4, 0.4, 6, seed=4)
    path = EntropyThresholdCalibrator().fit(entropies, labels).save(tmp_path / "cal.json")
    good = json.loads(path.read_text())

    path.write_text(path.read_text()[:50])  # truncated mid-write
    with pytest.raises(ValueError, match="Corrupt calibration file .*not valid JSON"):
        EntropyThresholdCalibrator.load(path)
    with pytest.raises(FileNotFoundError, match="calibrate"):
        EntropyThresholdCalibrator.load(tmp_path / "missing.json")

    def write(payload):
        path.write_text(json.dumps(payload))
        return path

    with pytest.raises(ValueError, match="format"):
        EntropyThresholdCalibrator.load(write({**good, "format": "other"}))
    with pytest.raises(ValueError, match="missing keys"):
        EntropyThresholdCalibrator.load(write({k: v for k, v in good.items() if k != "stats"}))
    with pytest.raises(ValueError, match="expected a JSON object"):
        EntropyThresholdCalibrator.load(write([1, 2]))
    tampered = json.loads(json.dumps(good))
    tampered["stats"]["thresholds"]["bayes"] += 0.5
    with pytest.raises(ValueError, match="thresholds.bayes"):
        EntropyThresholdCalibrator.load(write(tampered))
    tampered = json.loads(json.dumps(good))
    tampered["data"]["is_correct"] = tampered["data"]["is_correct"][:-1]
    with pytest.raises(ValueError, match="stored examples are invalid"):
        EntropyThresholdCalibrator.load(write(tampered))
    tampered = json.loads(json.dumps(good))
    tampered["signal"]["top_k"] = 0
    with pytest.raises(ValueError, match="top_k"):
        EntropyThresholdCalibrator.load(write(tampered))


def test_deepconf_threshold_is_the_quantile():
    values = [float(v) for v in range(1, 101)]
    assert deepconf_threshold(values, keep_ratio=0.1) == pytest.approx(statistics.quantiles(values, n=10)[-1], 0.01)
    assert deepconf_threshold(values + [float("nan")], keep_ratio=1.0) == 1.0
    with pytest.raises(ValueError, match="keep_ratio"):
        deepconf_threshold(values, keep_ratio=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Early stopping inside generate, on the tiny model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model(seed=0)
    with torch.no_grad():
        # Sharper, more varied distributions than the random init's near-uniform ones, so rows differ clearly.
        model.lm_head.weight.mul_(60)
    model.eval()
    tokenizer = make_tiny_tokenizer()
    tokenizer.padding_side = "left"
    return model, tokenizer


def generate(model, tokenizer, stopper, n=8, max_new_tokens=14, use_recorder=True, **kwargs):
    inputs = tokenizer(tiny_prompts(n), return_tensors="pt", padding=True)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        logits_processor=[stopper.recorder] if use_recorder else None,
        stopping_criteria=[stopper],
        return_dict_in_generate=True,
        output_logits=True,
        **{"do_sample": False, **kwargs},
    )
    return out, inputs["input_ids"].size(1)


def expected_stops(values, tokens, rule, min_new_tokens, eos_id=1, delimiter=None):
    """Brute force: per row, the number of generated tokens and the reason it ended."""
    lengths, reasons = [], []
    for row in range(values.size(0)):
        length, reason = values.size(1), None
        for t in range(values.size(1)):
            n = t + 1
            if tokens[row, t] == eos_id:
                length, reason = n, "eos"
                break
            at_check = n >= min_new_tokens and (delimiter is None or tokens[row, t] == delimiter)
            if at_check and rule(values[row, :n]):
                length, reason = n, "stop"
                break
        lengths.append(length)
        reasons.append(reason)
    return lengths, reasons


def threshold_splitting_rows(statistic, tokens, checkable, lower_stops=True, eos_id=1):
    """A threshold that some rows pass and others never do.

    ``statistic[r, t]`` is what the rule compares at step t, ``checkable[r, t]`` whether step t is checked. Each
    row's most extreme checkable value before its EOS decides whether it ever stops; the threshold sits in the widest
    gap between those per-row extremes, far from any value, so float32-vs-float64 rounding can not flip a decision.
    Rows behave identically in the stopping run up to their stop (greedy decoding, independent rows).
    """
    extremes = []
    for r in range(statistic.size(0)):
        eos = (tokens[r] == eos_id).nonzero()
        end = int(eos[0]) if len(eos) else statistic.size(1)
        values = statistic[r, :end][checkable[r, :end]]
        if len(values):
            extremes.append(float(values.min() if lower_stops else values.max()))
    extremes.sort()
    width, i = max((extremes[i + 1] - extremes[i], i) for i in range(len(extremes) - 1))
    assert width > 1e-4
    return (extremes[i] + extremes[i + 1]) / 2


@pytest.mark.parametrize("kind", ["topk_entropy", "entropy"])
def test_entropy_stopping_stops_exactly_the_rows_brute_force_says(tiny, kind):
    model, tokenizer = tiny
    signal = ConfidenceSignal(kind, top_k=20, base=2.0)
    # Reference run without a threshold: brute-force running means from the raw logits pick a useful threshold.
    ref, width = generate(model, tokenizer, EntropyEarlyStopping(None, signal=signal, eos_token_id=1))
    ref_values = reference_signal(torch.stack(ref.logits, 1), kind)
    running = ref_values.cumsum(1) / torch.arange(1, ref_values.size(1) + 1)
    checkable = torch.arange(running.size(1)).expand_as(running) >= 2
    tau = threshold_splitting_rows(running, ref.sequences[:, width:], checkable)

    stopper = EntropyEarlyStopping(tau, signal=signal, min_new_tokens=3, eos_token_id=1)
    out, width = generate(model, tokenizer, stopper)
    values = reference_signal(torch.stack(out.logits, 1), kind)
    tokens = out.sequences[:, width:]
    lengths, reasons = expected_stops(values, tokens, lambda v: v.mean() <= tau, min_new_tokens=3)
    assert stopper.num_tokens.tolist() == lengths
    assert [{"confident": "stop"}.get(r, r) for r in stopper.stop_reasons] == reasons
    assert 0 < reasons.count("stop") < len(reasons)  # the threshold splits the batch
    for row, n in enumerate(lengths):
        assert (tokens[row, n:] == tokenizer.pad_token_id).all()  # stopped rows receive only padding
        if reasons[row] == "stop":
            assert stopper.stop_values[row].item() == pytest.approx(values[row, :n].mean().item(), abs=1e-5)
    # The recorded signal is the reference signal of the raw logits; the sequence signal its mean over the row.
    recorded, mask = stopper.token_values()
    assert torch.allclose(recorded.double(), values, atol=1e-5)
    means = torch.stack([values[r, :n].mean() for r, n in enumerate(lengths)])
    assert torch.allclose(stopper.sequence_signal(), means, atol=1e-5)
    assert mask.sum(1).tolist() == lengths


def test_delimiter_mode_checks_only_at_step_ends(tiny):
    model, tokenizer = tiny
    ref, width = generate(model, tokenizer, EntropyEarlyStopping(None, eos_token_id=1), max_new_tokens=16)
    tokens = ref.sequences[:, width:]
    # The most frequent generated token (not padding or EOS) plays the delimiter.
    content = tokens[(tokens != tokenizer.pad_token_id) & (tokens != 1)]
    delimiter = int(torch.mode(content).values)
    values = reference_signal(torch.stack(ref.logits, 1), "topk_entropy")
    running = values.cumsum(1) / torch.arange(1, values.size(1) + 1)
    checkable = (tokens == delimiter) & (torch.arange(running.size(1)).expand_as(running) >= 1)
    tau = threshold_splitting_rows(running, tokens, checkable)

    stopper = EntropyEarlyStopping(
        tau, min_new_tokens=2, check_at="delimiter", delimiter_token_ids=[delimiter], eos_token_id=1
    )
    out, width = generate(model, tokenizer, stopper, max_new_tokens=16)
    values = reference_signal(torch.stack(out.logits, 1), "topk_entropy")
    lengths, reasons = expected_stops(
        values, out.sequences[:, width:], lambda v: v.mean() <= tau, min_new_tokens=2, delimiter=delimiter
    )
    assert stopper.num_tokens.tolist() == lengths
    assert [{"confident": "stop"}.get(r, r) for r in stopper.stop_reasons] == reasons
    for row, n in enumerate(lengths):
        if reasons[row] == "stop":
            assert out.sequences[row, width + n - 1] == delimiter

    # stop_at_delimiter without a threshold: every row ends at its first delimiter after min_new_tokens.
    stopper = EntropyEarlyStopping(
        None, min_new_tokens=2, delimiter_token_ids=[delimiter], stop_at_delimiter=True, eos_token_id=1
    )
    out, width = generate(model, tokenizer, stopper, max_new_tokens=16)
    lengths, reasons = expected_stops(values, out.sequences[:, width:], lambda v: True, 2, delimiter=delimiter)
    assert stopper.num_tokens.tolist() == lengths
    assert [{"delimiter": "stop"}.get(r, r) for r in stopper.stop_reasons] == reasons


def test_deepconf_window_mode_matches_brute_force(tiny):
    model, tokenizer = tiny
    window = 3
    signal = ConfidenceSignal("topk_confidence", top_k=20)
    ref, width = generate(model, tokenizer, EntropyEarlyStopping(None, mode="deepconf", eos_token_id=1))
    conf = reference_signal(torch.stack(ref.logits, 1), "topk_confidence")
    windows = torch.stack([conf[:, max(0, t - window + 1) : t + 1].mean(1) for t in range(conf.size(1))], 1)
    checkable = torch.arange(windows.size(1)).expand_as(windows) >= 3
    tau = threshold_splitting_rows(windows, ref.sequences[:, width:], checkable)

    stopper = EntropyEarlyStopping(
        tau, mode="deepconf", signal=signal, window=window, min_new_tokens=4, eos_token_id=1
    )
    out, width = generate(model, tokenizer, stopper)
    conf = reference_signal(torch.stack(out.logits, 1), "topk_confidence")
    lengths, reasons = expected_stops(
        conf, out.sequences[:, width:], lambda v: v[-window:].mean() < tau, min_new_tokens=4
    )
    assert stopper.num_tokens.tolist() == lengths
    assert [{"low_confidence": "stop"}.get(r, r) for r in stopper.stop_reasons] == reasons
    assert 0 < reasons.count("stop") < len(reasons)


def test_recorder_reads_logits_before_sampling_warpers(tiny):
    model, tokenizer = tiny
    stopper = EntropyEarlyStopping(None, signal=ConfidenceSignal("entropy"), eos_token_id=1)
    torch.manual_seed(0)
    out, _ = generate(
        model, tokenizer, stopper, do_sample=True, temperature=0.5, top_k=5, output_scores=True, max_new_tokens=6
    )
    recorded = stopper.recorder.token_values().double()
    raw = reference_signal(torch.stack(out.logits, 1), "entropy")
    warped = reference_signal(torch.stack(out.scores, 1), "entropy")
    assert torch.allclose(recorded, raw, atol=1e-5)
    assert not torch.allclose(recorded, warped, atol=1e-2)


def test_scores_fallback_and_missing_logits_error(tiny):
    model, tokenizer = tiny
    tau = 1.0
    with_recorder = EntropyEarlyStopping(tau, min_new_tokens=2, eos_token_id=1)
    generate(model, tokenizer, with_recorder)
    # Greedy decoding applies no warper, so `scores` are the raw logits and the fallback gives the same stops.
    fallback = EntropyEarlyStopping(tau, min_new_tokens=2, eos_token_id=1)
    with pytest.warns(UserWarning, match="scores"):
        generate(model, tokenizer, fallback, use_recorder=False, output_scores=True)
    assert fallback.num_tokens.tolist() == with_recorder.num_tokens.tolist()
    assert fallback.stop_reasons == with_recorder.stop_reasons
    with pytest.raises(RuntimeError, match="recorder"):
        inputs = tokenizer(tiny_prompts(2), return_tensors="pt", padding=True)
        model.generate(**inputs, max_new_tokens=3, stopping_criteria=[EntropyEarlyStopping(tau)])


def test_statistics_restart_with_each_generate_call(tiny):
    model, tokenizer = tiny
    stopper = EntropyEarlyStopping(None, eos_token_id=1)
    generate(model, tokenizer, stopper, n=8, max_new_tokens=10)
    first = stopper.recorder.generation_index
    out, width = generate(model, tokenizer, stopper, n=3, max_new_tokens=5)
    assert stopper.recorder.generation_index == first + 1
    assert stopper.recorder.num_steps == len(out.logits) and stopper.num_tokens.shape == (3,)
    values = reference_signal(torch.stack(out.logits, 1), "topk_entropy")
    assert torch.allclose(stopper.recorder.token_values().double(), values, atol=1e-5)


def test_nan_logits_never_stop_a_row():
    logits = torch.tensor([[0.0, 1.0, float("nan")], [0.0, 5.0, 0.0]])
    for kind in ("entropy", "topk_entropy", "topk_confidence"):
        signal = ConfidenceSignal(kind, top_k=2)(logits)
        assert math.isnan(signal[0]) and math.isfinite(signal[1])
    # A masked alternative (-inf) is a more peaked distribution: finite, higher DeepConf confidence.
    masked = ConfidenceSignal("topk_confidence", top_k=2)(
        torch.tensor([[0.0, float("-inf"), float("-inf")], [0.0, -1.0, -1.0]])
    )
    assert math.isfinite(masked[0]) and masked[0] > masked[1]
    recorder = TokenConfidenceRecorder(ConfidenceSignal("entropy"))
    stopper = EntropyEarlyStopping(10.0, recorder=recorder)  # any finite entropy passes this threshold
    ids = torch.tensor([[5, 6], [5, 6]])
    recorder(ids, logits)
    assert stopper(torch.cat([ids, torch.tensor([[1], [1]])], 1), None).tolist() == [False, True]


def test_criterion_argument_validation():
    with pytest.raises(ValueError, match="mode"):
        EntropyEarlyStopping(1.0, mode="other")
    with pytest.raises(ValueError, match="threshold"):
        EntropyEarlyStopping(float("nan"))
    with pytest.raises(ValueError, match="min_new_tokens"):
        EntropyEarlyStopping(1.0, min_new_tokens=0)
    with pytest.raises(ValueError, match="delimiter_token_ids"):
        EntropyEarlyStopping(1.0, check_at="delimiter")
    with pytest.raises(ValueError, match="window"):
        EntropyEarlyStopping(1.0, mode="deepconf", window=0)
    with pytest.raises(ValueError, match="topk_confidence"):
        EntropyEarlyStopping(1.0, mode="deepconf", signal=ConfidenceSignal("entropy"))
    with pytest.raises(ValueError, match="top_k"):
        ConfidenceSignal(top_k=1)
    with pytest.raises(ValueError, match="base"):
        ConfidenceSignal(base=1.0)


def test_delimiter_token_ids_finds_every_token_containing_it():
    tokenizer = make_tiny_tokenizer()
    assert delimiter_token_ids(tokenizer, "answer") == [tokenizer.convert_tokens_to_ids("answer")]
    assert set(delimiter_token_ids(tokenizer, "3")) == {
        tokenizer.convert_tokens_to_ids(t)
        for t in ("3", "13", "23", "30", "31", "32", "33", "34", "35", "36", "37", "38", "39")
    }


# ---------------------------------------------------------------------------------------------------------------------
# The two-stage pipeline, on the tiny model
# ---------------------------------------------------------------------------------------------------------------------


def first_step_signal(model, prompt_ids, step_ids):
    """Brute force: mean top-20 entropy (bits) of the step's tokens, from one teacher-forced forward pass."""
    ids = torch.tensor([prompt_ids + step_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return reference_signal(logits, "topk_entropy").mean().item()


def test_two_stage_pipeline(tiny):
    model, tokenizer = tiny
    prompts = tiny_prompts(6)
    delimiter = [tokenizer.convert_tokens_to_ids("?")]
    common = dict(step_delimiter_ids=delimiter, min_step_tokens=2, max_step_tokens=6, max_new_tokens=14)
    common.update(answer_prompt="the answer", max_answer_tokens=3, batch_size=4, show_progress=False)
    base = think_just_enough_generate(model, tokenizer, prompts, None, **common)
    signals = [r.step_signal for r in base]
    tau = sorted(signals)[len(signals) // 2]
    early = think_just_enough_generate(model, tokenizer, prompts, tau, **common)

    answer_ids = tokenizer("the answer", add_special_tokens=False)["input_ids"]
    for prompt, b, e in zip(prompts, base, early):
        prompt_ids = tokenizer(prompt)["input_ids"]
        step = b.completion_ids[: b.first_step_tokens]
        # Both runs share the first step, and its signal is the teacher-forced brute-force value.
        assert e.completion_ids[: e.first_step_tokens] == step
        assert b.step_signal == pytest.approx(first_step_signal(model, prompt_ids, step), abs=1e-5)
        assert e.step_signal == pytest.approx(b.step_signal, abs=1e-6)
        assert e.confident == (b.outcome != "ended_in_first_step" and b.step_signal <= tau)
        assert b.num_tokens == len(b.completion_ids) <= 14 and not b.confident
        if e.confident:
            assert e.outcome == "answered_early"
            assert e.completion_ids[len(step) : len(step) + len(answer_ids)] == answer_ids
            assert len(step) + len(answer_ids) < e.num_tokens <= len(step) + len(answer_ids) + 3
        else:
            # Uncertain problems reason exactly as without early stopping (greedy decoding).
            assert e.completion_ids == b.completion_ids and e.outcome == b.outcome
    assert any(e.confident for e in early) and not all(e.confident for e in early)
    assert sum(e.num_tokens for e in early) < sum(b.num_tokens for b in base)


def test_two_stage_without_early_stopping_equals_plain_generation(tiny):
    model, tokenizer = tiny
    prompts = tiny_prompts(4, seed=1)
    delimiter = [tokenizer.convert_tokens_to_ids("?")]
    results = think_just_enough_generate(
        model,
        tokenizer,
        prompts,
        None,
        step_delimiter_ids=delimiter,
        min_step_tokens=2,
        max_step_tokens=5,
        max_new_tokens=12,
        batch_size=1,
        show_progress=False,
    )
    for prompt, r in zip(prompts, results):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        plain = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=0)[
            0, ids.size(1) :
        ]
        assert r.completion_ids == plain.tolist()


def test_token_budget_moves_saved_tokens_to_uncertain_problems(tiny):
    model, tokenizer = tiny
    prompts = tiny_prompts(6, seed=2)
    delimiter = [tokenizer.convert_tokens_to_ids("?")]
    common = dict(step_delimiter_ids=delimiter, min_step_tokens=2, max_step_tokens=6, max_new_tokens=30)
    common.update(answer_prompt="the answer", max_answer_tokens=2, batch_size=6, show_progress=False)
    budget = 12
    probe = think_just_enough_generate(model, tokenizer, prompts, None, **common)
    tau = sorted(r.step_signal for r in probe)[2]
    base = think_just_enough_generate(model, tokenizer, prompts, None, token_budget=budget, **common)
    early = think_just_enough_generate(model, tokenizer, prompts, tau, token_budget=budget, **common)
    for results in (base, early):
        assert sum(r.num_tokens for r in results) <= budget * len(prompts)
    extended_base = [r.num_tokens - r.first_step_tokens for r in base if r.outcome == "extended"]
    extended_early = [r.num_tokens - r.first_step_tokens for r in early if r.outcome == "extended"]
    assert any(r.confident for r in early) and extended_early
    # Uncertain problems get a larger share of the pool when confident ones stop early (when they use it all).
    assert max(extended_early) > max(extended_base)


def test_pipeline_argument_validation(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="mode"):
        think_just_enough_generate(model, tokenizer, ["what is"], mode="other")
    with pytest.raises(ValueError, match="max_step_tokens"):
        think_just_enough_generate(model, tokenizer, ["what is"], max_step_tokens=10, max_new_tokens=5)
    with pytest.raises(ValueError, match="token_budget"):
        think_just_enough_generate(model, tokenizer, ["what is"], mode="online", token_budget=10)
    with pytest.raises(ValueError, match="step_delimiter"):
        think_just_enough_generate(model, tokenizer, ["what is"], step_delimiter="")


# ---------------------------------------------------------------------------------------------------------------------
# Command-line arguments and entry points
# ---------------------------------------------------------------------------------------------------------------------


def test_argument_dataclasses_validate():
    with pytest.raises(ValueError, match="num_problems"):
        CalibrateArguments(num_problems=0)
    with pytest.raises(ValueError, match="max_step_tokens"):
        CalibrateArguments(max_step_tokens=500, max_new_tokens=100)
    with pytest.raises(ValueError, match="method"):
        CalibrateArguments(method="median")
    with pytest.raises(ValueError, match="arithmetic_operations"):
        CalibrateArguments(arithmetic_operations="/")
    with pytest.raises(ValueError, match="calibration_path"):
        EarlyStopGenerateArguments()
    with pytest.raises(ValueError, match="token_budget"):
        EarlyStopGenerateArguments(threshold=1.0, mode="online", token_budget=100)
    assert CalibrateArguments(step_delimiter=r"\n\n").step_delimiter == "\n\n"  # typed on a command line
    args = EarlyStopGenerateArguments(threshold=1.0)
    assert args.split == "test" and args.signal == ConfidenceSignal()
    assert set(THRESHOLD_METHODS) == {"mean", "info", "bayes", "universal"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny):
    model, tokenizer = tiny
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_run_early_stop_generate_end_to_end(tiny_model_dir, tmp_path):
    args = EarlyStopGenerateArguments(
        model_name_or_path=str(tiny_model_dir),
        threshold=1.0,
        num_problems=6,
        arithmetic_low=1,
        arithmetic_high=9,
        instruction="",
        step_delimiter="?",
        min_step_tokens=2,
        max_step_tokens=6,
        max_new_tokens=12,
        answer_prompt="the answer",
        max_answer_tokens=2,
        output_file=str(tmp_path / "out.json"),
    )
    report = run_early_stop_generate(args)
    saved = json.loads((tmp_path / "out.json").read_text())
    rows = saved["results"]
    assert len(rows) == 6 and saved["metrics"] == json.loads(json.dumps(report))
    assert report["early_stopping"]["accuracy"] == sum(r["correct"] for r in rows) / 6
    assert report["early_stopping"]["total_tokens"] == sum(r["num_tokens"] for r in rows)
    expected_early = [r["outcome"] != "ended_in_first_step" and r["step_signal"] <= 1.0 for r in rows]
    assert [r["confident"] for r in rows] == expected_early
    assert report["early_stopping"]["answered_early"] == sum(expected_early) / 6
    assert report["token_saving"] == pytest.approx(
        1 - report["early_stopping"]["total_tokens"] / report["baseline"]["total_tokens"]
    )


def test_run_calibrate_refuses_when_no_answer_is_correct(tiny_model_dir, tmp_path):
    # The random tiny model never answers "what is a + b" right: calibration must refuse, not write a threshold.
    args = CalibrateArguments(
        model_name_or_path=str(tiny_model_dir),
        num_problems=4,
        arithmetic_low=1,
        arithmetic_high=9,
        instruction="",
        step_delimiter="?",
        max_step_tokens=4,
        max_new_tokens=6,
        output_file=str(tmp_path / "cal.json"),
    )
    with pytest.raises(ValueError, match="at least 2 correct"):
        run_calibrate(args)
    assert not (tmp_path / "cal.json").exists()


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 2.0}, {"no_repeat_ngram_size": 1}])
def test_recorded_signal_is_the_models_raw_distribution_whatever_the_logits_processors(
    tiny_model_and_tokenizer, penalty
):
    """issue 13 item 9: repetition_penalty / no_repeat_ngram_size change the scores a logits processor is handed, not
    the model's own distribution, which is what the recorder must measure (float64 reference on the raw logits)."""
    model, tokenizer = tiny_model_and_tokenizer
    signal = ConfidenceSignal("entropy", base=2.0)
    prompt = "what is 3 + 4 ?"
    settings = {"do_sample": False, **penalty}
    (result,) = think_just_enough_generate(
        model,
        tokenizer,
        [prompt],
        threshold=None,
        signal=signal,
        step_delimiter_ids=[tokenizer.pad_token_id],
        min_step_tokens=8,
        max_step_tokens=8,
        max_new_tokens=8,
        generation_kwargs=settings,
        show_progress=False,
    )
    n = result.first_step_tokens
    assert n >= 2
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **inputs,
        max_new_tokens=n,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    assert out.sequences[0, inputs["input_ids"].size(1) :].tolist() == result.completion_ids[:n]

    def mean_bits(steps):
        logp = torch.log_softmax(torch.stack(steps)[:, 0].double(), dim=-1)
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1) / math.log(2.0)
        return entropy.mean().item()

    raw, processed = mean_bits(out.logits), mean_bits(out.scores)
    assert abs(processed - raw) > 1e-3  # the processor moves the scores: the test can tell the two apart
    assert result.step_signal == pytest.approx(raw, abs=1e-5)

    # The recorder alone, inside `watch`, records the same raw values step by step.
    recorder = TokenConfidenceRecorder(signal)
    with recorder.watch(model):
        model.generate(**inputs, max_new_tokens=n, logits_processor=[recorder], **settings)
    expected = [mean_bits([step]) for step in out.logits]
    assert recorder.token_values()[0].tolist() == pytest.approx(expected, abs=1e-5)
