"""Truncation and length reporting of held-out evaluation, against cases where truncation is known by construction."""

import math

import pytest
import torch

from trl_entropy.evaluation import (
    TRUNCATION_WARNING_RATE,
    Completion,
    evaluate,
    finishing_budget,
    generate_completions,
    truncation_rate,
)
from trl_entropy.generate import generate_completions as generate_samples
from trl_entropy.generate import score_completions
from trl_entropy.tasks import extract_answer, grade
from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts


def _reference_greedy(model, tokenizer, prompt: str, steps: int) -> list[int]:
    """Greedy tokens of one unpadded prompt with no end token at all (generation never stops early)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.size(1) :].tolist()


@pytest.mark.parametrize("budget", [3, 6])
def test_evaluate_reports_truncation_and_length_where_they_are_known(budget):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=11)
    prompts = [*tiny_prompts(6, seed=12), "yes"]
    references = [_reference_greedy(model, tokenizer, p, budget) for p in prompts]
    # Make a token the greedy path really produces the end token: rows that emit it within the budget finish
    # there, the others are cut off at the budget. Greedy decoding is unchanged up to that point, so the expected
    # length and truncation of every row follow from the reference alone.
    end_id = references[0][1]
    model.generation_config.eos_token_id = end_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end_id)
    expected_lengths = [ref.index(end_id) + 1 if end_id in ref else budget for ref in references]
    expected_truncated = [end_id not in ref for ref in references]
    assert any(expected_truncated) and not all(expected_truncated)  # both kinds are present

    problems = [{"prompt": p, "answer": "0"} for p in prompts]
    result = evaluate(model, tokenizer, problems, max_new_tokens=budget, batch_size=3, progress=False)

    assert [c.num_tokens for c in result.completions] == expected_lengths
    assert [c.truncated for c in result.completions] == expected_truncated
    assert result.num_truncated == sum(expected_truncated)
    assert result.truncation_rate == pytest.approx(sum(expected_truncated) / len(prompts))
    assert result.mean_length == pytest.approx(sum(expected_lengths) / len(prompts))
    summary = result.to_dict()
    assert summary["max_new_tokens"] == budget
    assert summary["num_truncated"] == sum(expected_truncated)
    assert summary["truncation_rate"] == result.truncation_rate
    assert summary["mean_completion_length"] == result.mean_length
    text = result.summary()
    assert f"budget {budget} tokens" in text and f"{result.truncation_rate:.1%} truncated" in text


def test_a_completion_ending_exactly_at_the_budget_is_finished():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=11)
    prompt = tiny_prompts(1, seed=12)[0]
    reference = _reference_greedy(model, tokenizer, prompt, 4)
    model.generation_config.eos_token_id = reference[3]
    if reference[3] in reference[:3]:
        pytest.skip("the fourth greedy token also occurs earlier")
    (completion,) = generate_completions(model, tokenizer, [prompt], max_new_tokens=4, progress=False)
    assert completion.num_tokens == 4 and completion.finished and not completion.truncated
    (cut,) = generate_completions(model, tokenizer, [prompt], max_new_tokens=3, progress=False)
    assert cut.num_tokens == 3 and cut.truncated


def test_generate_samples_report_truncation_like_evaluation():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=11)
    prompts = tiny_prompts(5, seed=12)
    references = [_reference_greedy(model, tokenizer, p, 5) for p in prompts]
    end_id = references[0][2]
    model.generation_config.eos_token_id = end_id
    samples = generate_samples(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, progress=False)
    evaluated = generate_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, progress=False)
    expected = [end_id not in ref for ref in references]
    assert [s[0].truncated for s in samples] == [c.truncated for c in evaluated] == expected
    records, summary = score_completions(samples, None, parse_answer=extract_answer, is_correct=grade)
    assert [r["truncated"] for r in records] == [[t] for t in expected]
    assert summary["truncation_rate"] == pytest.approx(sum(expected) / 5)
    assert summary["mean_completion_length"] == pytest.approx(sum(s[0].num_tokens for s in samples) / 5)


def _completions(lengths: list[int], finished: list[bool]) -> list[Completion]:
    return [Completion(text="", token_ids=[0] * n, finished=f) for n, f in zip(lengths, finished)]


def _budget_by_brute_force(completions: list[Completion], fraction: float) -> int | None:
    """Smallest budget B (1..longest) at which at least ``fraction`` of the completions end within B tokens."""
    for budget in range(1, max(c.num_tokens for c in completions) + 1):
        done = sum(c.finished and c.num_tokens <= budget for c in completions)
        if done >= fraction * len(completions) - 1e-9:
            return budget
    return None


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.95, 1.0])
def test_finishing_budget_matches_brute_force(fraction):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 30, (1,), generator=g))
        lengths = torch.randint(1, 40, (n,), generator=g).tolist()
        finished = (torch.rand(n, generator=g) < 0.9).tolist()
        completions = _completions(lengths, finished)
        assert finishing_budget(completions, fraction) == _budget_by_brute_force(completions, fraction)


def test_finishing_budget_and_truncation_rate_edge_cases():
    completions = _completions([3, 5, 8, 40], [True, True, True, False])
    assert truncation_rate(completions) == 0.25
    assert finishing_budget(completions, 0.75) == 8
    assert finishing_budget(completions, 0.95) is None  # the cut-off answer would need a larger budget to measure
    assert math.isnan(truncation_rate([]))
    with pytest.raises(ValueError, match="`fraction`"):
        finishing_budget(completions, 0.0)
    with pytest.raises(ValueError, match="`completions`"):
        finishing_budget([], 0.95)
    assert 0 < TRUNCATION_WARNING_RATE < 1
