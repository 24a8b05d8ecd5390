"""`trl-entropy diagnose` and its statistics: AUROC, its interval, Mann-Whitney, Cohen's d, McNemar, pass@k and
majority@k against scipy or hand-computed values; the measurement with and without answers on the tiny model; bad
data refused in one line before the model loads."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from scipy import stats as scipy_stats

from trl_entropy.evaluation.diagnose import confidence_separation, diagnose, label_free_agreement, verdict
from trl_entropy.stats import (
    auroc,
    auroc_interval,
    majority_at_k,
    mann_whitney_p,
    mcnemar_exact_p,
    pass_at_k,
)
from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts

# ---- statistics -----------------------------------------------------------------------------------------------------


def _scores(seed: int, n_pos: int, n_neg: int, ties: bool):
    rng = random.Random(seed)
    draw = (lambda: round(rng.gauss(0, 1), 1)) if ties else (lambda: rng.gauss(0, 1))
    positive = [draw() + 0.5 for _ in range(n_pos)]
    negative = [draw() for _ in range(n_neg)]
    return positive + negative, [True] * n_pos + [False] * n_neg


@pytest.mark.parametrize("seed,n_pos,n_neg,ties", [(0, 20, 30, False), (1, 7, 40, True), (2, 50, 5, True)])
def test_auroc_and_mann_whitney_match_scipy(seed, n_pos, n_neg, ties):
    scores, labels = _scores(seed, n_pos, n_neg, ties)
    positive = [s for s, y in zip(scores, labels) if y]
    negative = [s for s, y in zip(scores, labels) if not y]
    u = scipy_stats.mannwhitneyu(
        positive, negative, alternative="two-sided", method="asymptotic", use_continuity=False
    )
    assert auroc(scores, labels) == pytest.approx(u.statistic / (n_pos * n_neg), abs=1e-12)
    assert mann_whitney_p(scores, labels) == pytest.approx(u.pvalue, rel=1e-9)
    # The definition: P(positive > negative) + P(tie) / 2, by brute force over all pairs.
    pairs = [(p > q) + 0.5 * (p == q) for p, q in itertools.product(positive, negative)]
    assert auroc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_auroc_interval_is_hanley_mcneil_by_hand():
    scores, labels = [0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1], [True, True, True, True, False, False, False, False]
    area = auroc(scores, labels)
    assert area == pytest.approx(15 / 16)
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    se = math.sqrt((area * (1 - area) + 3 * (q1 - area**2) + 3 * (q2 - area**2)) / 16)
    low, high = auroc_interval(scores, labels)
    assert low == pytest.approx(area - 1.959963984540054 * se) and high == pytest.approx(min(1.0, area + 1.96 * se))
    with pytest.raises(ValueError, match="both outcomes"):
        auroc([0.1, 0.2], [True, True])


def test_mcnemar_exact_matches_a_binomial_test():
    before = [True] * 10 + [False] * 10 + [True] * 3 + [False] * 9
    after = [True] * 10 + [False] * 10 + [False] * 3 + [True] * 9  # 3 lost, 9 gained
    expected = scipy_stats.binomtest(3, 12, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(before, after) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact_p(before, before) == 1.0


def test_pass_at_k_and_majority_at_k_by_hand():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    brute = [any(c) for c in itertools.combinations([True, True, False, False, False], 2)]
    assert pass_at_k(5, 2, 2) == pytest.approx(sum(brute) / len(brute))
    assert majority_at_k(["3", "4", "3", None], "3") and not majority_at_k(["4", "3", "4", "3"], "3")  # tie: first
    assert not majority_at_k([None, None], "3")
    with pytest.raises(ValueError, match="`k` must be"):
        pass_at_k(3, 1, 4)


def test_confidence_separation_cohens_d_and_auroc():
    correct = [True, True, True, False, False, False]
    confidence = [-0.1, -0.2, -0.3, -0.9, -1.0, -0.6]
    result = confidence_separation(confidence, correct)
    right, wrong = [-0.1, -0.2, -0.3], [-0.9, -1.0, -0.6]
    pooled = math.sqrt((2 * scipy_stats.tstd(right) ** 2 + 2 * scipy_stats.tstd(wrong) ** 2) / 4)
    assert result["cohens_d"] == pytest.approx((sum(right) / 3 - sum(wrong) / 3) / pooled)
    assert result["auroc"] == 1.0 and result["num_correct"] == 3
    assert confidence_separation([0.1, 0.2, 0.3], [True, False, False]) is None  # one correct answer


def test_label_free_agreement_by_hand():
    stats = label_free_agreement([["3", "3", "4", None], [None, None], ["5", "6"]])
    assert stats["majority_agreement"] == pytest.approx((2 + 1) / (3 + 2))
    assert stats["mean_distinct_answers"] == pytest.approx(2.0) and stats["prompts_without_answer"] == pytest.approx(
        1 / 3
    )


def test_verdict_applies_its_rule():
    def metrics(greedy, sampled, area, interval):
        separation = {"auroc": area, "auroc_ci95": interval}
        return {
            "has_answers": True,
            "greedy": {"accuracy": greedy},
            "sampled": {"accuracy": sampled},
            "confidence": {"sequence_entropy": separation},
        }

    assert verdict(metrics(0.4, 0.2, 0.7, [0.6, 0.8]))["verdict"] == "likely to help"
    assert verdict(metrics(0.5, 0.48, 0.7, [0.6, 0.8]))["verdict"] == "unlikely to help"
    assert verdict(metrics(0.4, 0.2, 0.55, [0.45, 0.65]))["verdict"] == "unlikely to help"
    assert verdict(metrics(0.4, 0.33, 0.7, [0.6, 0.8]))["verdict"] == "uncertain"
    assert verdict({"has_answers": False})["verdict"] == "no verdict without answers"


# ---- the measurement on the tiny model ------------------------------------------------------------------------------


def _parse(text: str):
    words = text.split()
    return words[-1] if words else None


def test_diagnose_with_and_without_answers_on_the_tiny_model():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    prompts = tiny_prompts(6)
    greedy_answers = []
    for prompt in prompts:  # references: the tiny model's own greedy last word (greedy accuracy 100% by design)
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        greedy_answers.append(_parse(tokenizer.decode(out[0, ids["input_ids"].size(1) :], skip_special_tokens=True)))
    common = dict(parse_answer=_parse, num_samples=3, temperature=1.0, max_new_tokens=5, batch_size=8, progress=False)
    with_answers = diagnose(
        model, tokenizer, prompts, [a or "" for a in greedy_answers], is_correct=lambda t, a: _parse(t) == a, **common
    )
    assert with_answers["greedy"]["accuracy"] == pytest.approx(sum(a is not None for a in greedy_answers) / 6)
    assert 0.0 <= with_answers["sampled"]["accuracy"] <= 1.0
    samples = with_answers["per_sample"]
    assert len(samples) == 18 and with_answers["settings"]["num_samples"] == 3
    per_prompt = [[s["correct"] for s in samples if s["prompt"] == i] for i in range(6)]
    assert with_answers["pass_at_k"] == pytest.approx(sum(any(c) for c in per_prompt) / 6)
    assert with_answers["verdict"]["verdict"] in ("likely to help", "unlikely to help", "uncertain")
    json.dumps(with_answers)  # JSON-ready

    without = diagnose(model, tokenizer, prompts, None, **common)
    assert without["has_answers"] is False and "accuracy" not in without["greedy"]
    assert without["verdict"]["verdict"] == "no verdict without answers"
    assert set(without["label_free"]) >= {"majority_agreement", "mean_distinct_answers", "greedy_is_majority"}
    # The same samples (same seed): the label-free quantities do not depend on having answers.
    assert without["label_free"] == with_answers["label_free"]
    with pytest.raises(ValueError, match="`is_correct` is required"):
        diagnose(model, tokenizer, prompts, greedy_answers, parse_answer=_parse)


def test_diagnose_greedy_half_is_the_same_with_ended_rows_dropped():
    """Dropping ended completions from their batch (``segment_tokens``) changes how much is computed, not the greedy
    completions: the greedy half of the diagnosis equals one ``generate`` call per batch."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    prompts = tiny_prompts(6)
    free = []
    for prompt in prompts:  # the greedy path with no end token, to pick one that ends rows at varied lengths
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        free.append(out[0, ids["input_ids"].size(1) :].tolist())
    model.generation_config.eos_token_id = max(
        range(3, len(tokenizer)), key=lambda t: len({row.index(t) for row in free if t in row[1:]})
    )
    common = dict(parse_answer=_parse, num_samples=2, max_new_tokens=12, batch_size=4, progress=False)
    dropped = diagnose(model, tokenizer, prompts, None, segment_tokens=3, **common)
    whole = diagnose(model, tokenizer, prompts, None, segment_tokens=None, **common)
    assert dropped["greedy_texts"] == whole["greedy_texts"]
    assert dropped["greedy"]["mean_length"] == whole["greedy"]["mean_length"]


# ---- the command: bad data in one line, before the model loads ------------------------------------------------------


def _run(argv, capsys):
    from trl_entropy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["diagnose", *argv])
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "rows,extra,fragments",
    [
        ([{"question": "What is 1 + 2?", "answer": "3"}], [], ["no 'prompt' column", "question"]),
        ([], [], ["is empty"]),
        ([{"prompt": "What is 1 + 2?"}], ["--answer_column", "answer"], ["no column 'answer'", "prompt"]),
        ([{"prompt": "What is 1 + 2?", "answer": " "}], [], ["holds no answer"]),
    ],
)
def test_bad_data_is_refused_in_one_line_before_the_model_loads(tmp_path, capsys, rows, extra, fragments):
    path = tmp_path / "data.jsonl"
    path.write_text("") if not rows else _write_jsonl(path, rows)
    status, lines = _run(
        ["--dataset_name", str(path), "--model_name_or_path", str(tmp_path / "no_model"), *extra], capsys
    )
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("trl-entropy diagnose: error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_option_is_one_line(capsys):
    status, lines = _run(["--num_samples", "1"], capsys)
    assert status == 2 and len(lines) == 1 and "`num_samples` must be an integer >= 2, got 1" in lines[0]


def test_diagnose_command_writes_json_and_png(tmp_path, capsys):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": p, "answer": "3"} for p in tiny_prompts(4)])
    from trl_entropy.cli import main

    argv = ["diagnose", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", data, "--num_samples", "2"]
    argv += ["--max_completion_length", "4", "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert result["settings"]["num_prompts"] == 4 and result["data"]["answer_column"] == "answer"
    assert (tmp_path / "out" / "diagnosis.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Verdict:" in printed and "Rule:" in printed
    # How far the verdict can be trusted: the shipped leave-one-setting-out result, printed beside it.
    from trl_entropy.evaluation.diagnose import validation_statement

    statement = validation_statement()
    assert statement and result["verdict"]["validation"] == statement
    assert f"Validation: {statement}" in printed
