"""Held-out evaluation helpers (against float64 brute force and closed forms) and the ``trl-entropy demo`` run."""

import json
import math
import re

import pytest
import torch

from trl_entropy.cli.demo import DemoArguments, render_report, run_demo
from trl_entropy.evaluation import (
    evaluate,
    generate_completions,
    plot_entropy_histograms,
    wilson_interval,
)
from trl_entropy.evaluation.tasks import grade
from trl_entropy.stats import paired_bootstrap_interval
from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts

Z95 = 1.959963984540054


def _wilson_by_bisection(successes, n, z=Z95):
    """Both roots of (p_hat - p)^2 = z^2 p (1 - p) / n, found by bisection in float64 (no closed form used)."""
    p_hat = successes / n

    def gap(p):
        return (p_hat - p) ** 2 - z * z * p * (1 - p) / n

    def root(low, high):  # gap(low) and gap(high) have opposite signs (or one is 0)
        for _ in range(200):
            mid = (low + high) / 2
            if (gap(low) > 0) == (gap(mid) > 0):
                low = mid
            else:
                high = mid
        return (low + high) / 2

    lower = 0.0 if successes == 0 else root(0.0, p_hat)
    upper = 1.0 if successes == n else root(1.0, p_hat)
    return lower, upper


@pytest.mark.parametrize("successes, n", [(0, 8), (1, 8), (4, 8), (8, 8), (27, 96), (12, 96), (0, 1), (500, 1000)])
def test_wilson_interval_matches_the_score_equation(successes, n):
    low, high = wilson_interval(successes, n)
    ref_low, ref_high = _wilson_by_bisection(successes, n)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_interval_narrows_with_n_and_rejects_bad_input():
    widths = [wilson_interval(n // 4, n) for n in (8, 32, 128, 512)]
    assert all(b[1] - b[0] < a[1] - a[0] for a, b in zip(widths, widths[1:]))
    with pytest.raises(ValueError, match="`n`"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="`successes`"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="`confidence`"):
        wilson_interval(1, 4, confidence=1.0)


def test_paired_bootstrap_interval_properties():
    assert paired_bootstrap_interval([True, False, True], [True, False, True]) == (0.0, 0.0)
    assert paired_bootstrap_interval([False] * 5, [True] * 5) == (1.0, 1.0)
    # Large n: the percentile interval approaches the normal interval of the mean paired difference.
    g = torch.Generator().manual_seed(0)
    before = (torch.rand(400, generator=g) < 0.3).tolist()
    after = (torch.rand(400, generator=g) < 0.45).tolist()
    diffs = [int(a) - int(b) for b, a in zip(before, after)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    low, high = paired_bootstrap_interval(before, after, resamples=4000)
    assert low < mean < high
    assert (high - low) == pytest.approx(2 * Z95 * sd / math.sqrt(len(diffs)), rel=0.15)
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap_interval([True], [True, False])


def _reference_entropies(model, tokenizer, prompt, completion_ids, temperature):
    """Teacher-forced, unpadded forward over prompt + completion; float64 entropy of softmax(z / T) per position."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    positions = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion_ids)]
    log_p = torch.log_softmax(positions / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1), positions.argmax(-1)


@pytest.mark.parametrize("do_sample, temperature", [(False, 1.0), (True, 0.7)])
def test_generate_completions_entropies_match_float64_brute_force(do_sample, temperature):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=1)
    model.train()
    # Prompts of different lengths, so that left padding is exercised.
    prompts = [*tiny_prompts(3, seed=2), "what is 1 + 2 + 3 + 4 + 5 ?", "yes"]
    completions = generate_completions(
        model, tokenizer, prompts, max_new_tokens=6, do_sample=do_sample, temperature=temperature, batch_size=4
    )
    restored_training_mode = model.training
    model.eval()
    assert len(completions) == len(prompts)
    for prompt, completion in zip(prompts, completions):
        assert completion.num_tokens == len(completion.token_entropies) > 0
        reference, argmax = _reference_entropies(model, tokenizer, prompt, completion.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(completion.token_entropies).double(), reference, atol=1e-4, rtol=1e-4)
        if not do_sample:
            assert completion.token_ids == argmax.tolist()
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert tokenizer.padding_side == "right"  # restored
    assert restored_training_mode  # generation ran in eval mode and restored the caller's train mode


def test_generate_completions_cuts_at_the_first_end_token():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=3)
    prompts = tiny_prompts(4, seed=4)
    full = generate_completions(model, tokenizer, prompts, max_new_tokens=8, progress=False)
    ids = full[0].token_ids
    # Declare as end-of-sequence the first token of row 0 that is new at its position (k >= 1): generation must then
    # stop there, keep the end token and drop what follows, in every row.
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    model.generation_config.eos_token_id = ids[k]
    cut = generate_completions(model, tokenizer, prompts, max_new_tokens=8, progress=False)
    assert cut[0].token_ids == ids[: k + 1]
    for before, after in zip(full, cut):
        stop = next((i for i, t in enumerate(before.token_ids) if t == ids[k]), None)
        expected = before.token_ids if stop is None else before.token_ids[: stop + 1]
        assert after.token_ids == expected
        assert after.token_entropies == pytest.approx(before.token_entropies[: len(expected)], abs=1e-5)


def test_generate_completions_rejects_bad_arguments():
    model, tokenizer = make_tiny_model_and_tokenizer()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_completions(model, tokenizer, ["yes"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        generate_completions(model, tokenizer, ["yes"], batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_completions(model, tokenizer, ["yes"], do_sample=True, temperature=float("nan"))


def test_evaluate_grades_every_completion():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=5)
    prompts = tiny_prompts(6, seed=6)
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=3, progress=False)
    # Answers chosen so that some completions are right: the number each completion ends with, for half of them.
    answers = []
    for i, completion in enumerate(completions):
        numbers = re.findall(r"-?\d+", completion.text)
        answers.append(numbers[-1] if numbers and i % 2 == 0 else "12345")
    problems = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    result = evaluate(model, tokenizer, problems, max_new_tokens=3, progress=False)
    expected = [grade(c.text, a) for c, a in zip(completions, answers)]
    assert result.correct == expected
    assert result.num_correct == sum(expected) and result.num_problems == 6
    assert result.accuracy_interval() == wilson_interval(sum(expected), 6)
    tokens = [h for c in completions for h in c.token_entropies]
    assert result.mean_entropy == pytest.approx(sum(tokens) / len(tokens), rel=1e-6)
    assert result.mean_length == pytest.approx(sum(c.num_tokens for c in completions) / 6)


def _diagnosis(answers, max_new_tokens=4, seed=0):
    """A real diagnosis of the tiny model (its completions graded against ``answers``)."""
    from trl_entropy.evaluation.diagnose import diagnose

    model, tokenizer = make_tiny_model_and_tokenizer(seed=seed)
    prompts = tiny_prompts(len(answers))
    return diagnose(
        model,
        tokenizer,
        prompts,
        answers,
        parse_answer=lambda t: (t.split() or [None])[-1],
        is_correct=lambda t, a: (t.split() or [None])[-1] == a,
        num_samples=2,
        max_new_tokens=max_new_tokens,
        batch_size=8,
        progress=False,
    )


STUDY = {
    "rows": [
        {"regime": regime, "method": method, "label": method, "seeds": [0, 1, 2],
         "greedy": {"mean": g, "std": 0.02, "changes": [0.1, 0.2, 0.3]}, "sampled": {"mean": g / 2, "std": None}}
        for regime, method, g in (("open", "none", 0.3), ("open", "em_rl_token", 0.6), ("short", "none", 0.5),
                                  ("short", "em_rl_token", 0.4))
    ]
}  # fmt: skip


def _results(before, after, study=STUDY):
    from trl_entropy.cli.demo import paired_changes

    args = DemoArguments(num_samples=2)
    return {
        "args": {**args.__dict__},
        "before": before,
        "after": after,
        "paired": paired_changes(before, after),
        "study": study,
        "study_other_regime": "the other regime line",
        "timing": {
            "total_s": 600,
            "diagnose_s": 100,
            "train_s": 400,
            "eval_s": 50,
            "cpu_s": 1100,
            "num_threads": 1,
            "machine": "x",
        },  # fmt: skip
    }


def test_render_report_table_matches_the_results():
    before = _diagnosis(["what", "is", "3", "=", "?", "4"])
    after = _diagnosis(["3", "is", "3", "=", "the", "4"], seed=1)
    results = _results(before, after)
    report = render_report(results, ["a.png"])
    row = next(line for line in report.splitlines() if line.startswith("| Accuracy, greedy"))
    low, high = before["greedy"]["accuracy_ci95"]
    assert f"{before['greedy']['accuracy']:.1%} [{low:.1%}, {high:.1%}]" in row
    paired = results["paired"]["greedy"]
    assert f"{paired['change']:+.1%}" in row and f"p={paired['mcnemar_p']:.2g}" in row
    assert "30.0% +- 2.0 -> 60.0% +- 2.0" in row  # the study's open regime, mean +- std over seeds
    greedy_changes = [int(b["greedy_correct"]) - int(a["greedy_correct"])
                      for a, b in zip(before["per_prompt"], after["per_prompt"])]  # fmt: skip
    assert paired["change"] == pytest.approx(sum(greedy_changes) / 6)
    row = next(line for line in report.splitlines() if line.startswith("| Pass@2"))
    assert f"{before['pass_at_k']:.1%}" in row and f"{after['pass_at_k']:.1%}" in row
    assert "**6 problems**" in report and "![a](a.png)" in report and "the other regime line" in report
    assert f"Verdict: **{before['verdict']['verdict']}**" in report


@pytest.mark.parametrize("budget, warned", [(3, True), (40, False)])  # at 40 the tiny model may still run on
def test_report_warns_when_more_than_5_percent_of_base_answers_are_truncated(budget, warned):
    before = _diagnosis(["3"] * 4, max_new_tokens=budget)
    after = _diagnosis(["3"] * 4, max_new_tokens=budget, seed=1)
    report = render_report(_results(before, after), [])
    for key in ("greedy", "sampled"):
        rate = before[key]["truncation_rate"]
        assert (f"of the base model's {key} answers are cut off at {budget} tokens" in report) is (rate > 0.05)
        warned = warned or rate > 0.05
    assert ("Warning" in report) is warned
    row = next(line for line in report.splitlines() if line.startswith(f"| Truncated at {budget} tokens, greedy"))
    assert f"| {before['greedy']['truncation_rate']:.1%} |" in row


def test_the_shipped_study_summary_names_both_regimes():
    from trl_entropy.cli.demo import study_reference

    study = study_reference()
    assert study is not None and study["source"] == "benchmarks/bench_label_free.py"
    regimes = {(row["regime"], row["method"]) for row in study["rows"]}
    assert {("open", "none"), ("short", "none"), ("open", "em_rl_token"), ("short", "em_rl_token")} <= regimes


def test_plot_entropy_histograms_writes_a_figure_of_the_requested_size(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    samples = {"before": [0.1, 0.5, 2.0, float("nan")], "after": [0.0, 0.1]}
    path = plot_entropy_histograms(samples, tmp_path / "nested" / "h.png", dpi=50)
    assert image.imread(path).shape[:2] == (4 * 50, 7 * 50)  # figsize (7, 4) inches at 50 dpi
    with pytest.raises(ValueError, match="`bins`"):
        plot_entropy_histograms(samples, tmp_path / "x.png", bins=0)


def test_demo_arguments_validation():
    with pytest.raises(ValueError, match="num_generations"):
        DemoArguments(num_generations=1)
    with pytest.raises(ValueError, match="num_samples"):
        DemoArguments(num_samples=1)
    with pytest.raises(ValueError, match="task"):
        DemoArguments(task="imagenet")
    with pytest.raises(ValueError, match="temperature"):
        DemoArguments(temperature=0.0)
    quick = DemoArguments(quick=True)
    assert (quick.max_steps, quick.num_eval_problems, quick.num_samples, quick.eval_max_new_tokens) == (2, 8, 2, 32)
    assert DemoArguments().prompt_style == "open" and DemoArguments().num_threads == 1


@pytest.mark.slow
def test_demo_quick_mode_writes_a_report(tmp_path):
    output_dir = tmp_path / "demo"
    args = DemoArguments(output_dir=str(output_dir), quick=True, max_completion_length=16, prompts_per_step=1)
    results = run_demo(args)

    report = (output_dir / "report.md").read_text()
    assert "## What to expect on this model and task" in report and "Verdict: **" in report
    assert "| Accuracy, greedy |" in report and "| Accuracy, sampled T=1 |" in report
    assert "**8 problems**" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"before.png", "after.png"} <= set(images)
    for image in images:
        assert (output_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((output_dir / "results.json").read_text())
    for stage in ("before", "after"):
        per_prompt = saved[stage]["per_prompt"]
        assert len(per_prompt) == 8
        assert saved[stage]["greedy"]["accuracy"] == sum(p["greedy_correct"] for p in per_prompt) / 8
    assert saved["paired"]["greedy"]["change"] == pytest.approx(
        saved["after"]["greedy"]["accuracy"] - saved["before"]["greedy"]["accuracy"]
    )
    assert [entry["step"] for entry in saved["training_log"]] == [1, 2]
    assert all("rewards/entropy_token/mean" in entry for entry in saved["training_log"])
    assert results["timing"]["num_threads"] == 1


def test_demo_refuses_more_held_out_problems_than_the_split_holds(tmp_path):
    from trl_entropy.cli.demo import _load_problems
    from trl_entropy.evaluation.tasks import ArithmeticTask

    # The distinct test-split questions of the open arithmetic task, counted independently of the demo's loop.
    task = ArithmeticTask(prompt_style="open")
    train_questions = set(task.dataset(512, split="train", seed=0)["question"])
    held_out_questions = set(task.dataset(400, split="test", seed=0)["question"]) - train_questions
    args = DemoArguments(output_dir=str(tmp_path), num_eval_problems=len(held_out_questions))
    held_out, _ = _load_problems(args)
    assert len(held_out) == len(held_out_questions) == len(set(held_out["question"]))
    too_many = DemoArguments(output_dir=str(tmp_path), num_eval_problems=len(held_out_questions) + 1)
    with pytest.raises(ValueError, match=rf"`num_eval_problems` must be at most {len(held_out_questions)}"):
        _load_problems(too_many)
