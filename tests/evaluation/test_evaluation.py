"""Held-out evaluation: truncation and length reporting against cases where truncation is known by construction, and
the budget ladder (each token decoded once) against decoding at the longer budget from the start."""

import math

import pytest
import torch

from trl_entropy.decoding import Decoder, end_token_ids
from trl_entropy.evaluation import (
    TRUNCATION_WARNING_RATE,
    Completion,
    continue_completions,
    evaluate,
    evaluate_ladder,
    generate_completions,
    truncation_rate,
)
from trl_entropy.evaluation.generate import generate_completions as generate_samples
from trl_entropy.evaluation.generate import score_completions
from trl_entropy.evaluation.tasks import extract_answer, grade
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


def test_truncation_rate_counts_the_completions_cut_off():
    completions = _completions([3, 5, 8, 40], [True, True, True, False])
    assert truncation_rate(completions) == 0.25
    assert math.isnan(truncation_rate([]))
    assert 0 < TRUNCATION_WARNING_RATE < 1


# ---- the budget ladder: each token decoded once ---------------------------------------------------------------------


def _ending_model(seed: int = 3):
    """The tiny model with, as end token, one its greedy path emits at varied positions: completions then end at
    different lengths, some after the smaller budgets of a ladder."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed=seed)
    # Prompts of several lengths: batches are left-padded, and merged rows come from batches of different widths.
    prompts = [*tiny_prompts(13, seed=5), "yes", "what is the answer ?", "1 2 3 4 5 6 7 8 9 10 11"]
    free = [_reference_greedy(model, tokenizer, p, 30) for p in prompts]
    candidates = [t for t in range(3, len(tokenizer)) if sum(t in ids[2:] for ids in free) >= 6]
    end_id = max(candidates, key=lambda t: len({ids.index(t) for ids in free if t in ids}))
    model.generation_config.eos_token_id = end_id
    return model, tokenizer, prompts, end_id


def _direct_greedy(model, tokenizer, prompt: str, budget: int) -> list[int]:
    """Unbatched ``generate`` of one prompt with the model's end token, cut after it: the independent reference."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=budget, do_sample=False, pad_token_id=0)[0, ids.size(1) :].tolist()
    end = model.generation_config.eos_token_id
    return out[: out.index(end) + 1] if end in out else out


@pytest.mark.parametrize("segment_tokens", [None, 2, 5])
def test_greedy_ladder_gives_the_tokens_of_one_decoding_at_each_budget(segment_tokens):
    model, tokenizer, prompts, _ = _ending_model()
    problems = [{"prompt": p, "answer": "0"} for p in prompts]
    budgets = (4, 9, 30)
    rungs = evaluate_ladder(
        model,
        tokenizer,
        problems,
        budgets,
        max_truncated=0.0,
        batch_size=3,
        progress=False,
        segment_tokens=segment_tokens,
    )
    assert [r.max_new_tokens for r in rungs] == [4, 9, 30][: len(rungs)]
    assert len(rungs) >= 2 and 0 < rungs[0].num_truncated < len(prompts)  # the ladder really continued some
    for rung in rungs:
        fresh = evaluate(
            model, tokenizer, problems, rung.max_new_tokens, batch_size=3, progress=False, segment_tokens=None
        )
        for prompt, got, ref in zip(prompts, rung.completions, fresh.completions):
            assert got.token_ids == ref.token_ids == _direct_greedy(model, tokenizer, prompt, rung.max_new_tokens)
            assert got.finished == ref.finished and got.text == ref.text
            assert got.token_entropies == pytest.approx(ref.token_entropies, abs=1e-5)
            assert got.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)
        assert rung.correct == fresh.correct and rung.truncation_rate == fresh.truncation_rate
    assert rungs[-1].truncation_rate == 0.0 or rungs[-1].max_new_tokens == budgets[-1]


def test_ladder_stops_at_the_first_budget_with_few_enough_cut_off():
    model, tokenizer, prompts, _ = _ending_model()
    problems = [{"prompt": p, "answer": "0"} for p in prompts]
    every = evaluate_ladder(model, tokenizer, problems, (4, 9, 30), max_truncated=0.0, batch_size=4, progress=False)
    rates = [r.truncation_rate for r in every]
    threshold = rates[0]  # the first rung already meets it
    assert len(evaluate_ladder(model, tokenizer, problems, (4, 9, 30), max_truncated=threshold, progress=False)) == 1
    with pytest.raises(ValueError, match="`budgets`"):
        evaluate_ladder(model, tokenizer, problems, (9, 4))
    with pytest.raises(ValueError, match="`max_truncated`"):
        evaluate_ladder(model, tokenizer, problems, (4, 9), max_truncated=1.5)


def _teacher_forced_logprobs(model, tokenizer, prompt: str, completion_ids: list[int], temperature: float):
    """float64 log-probability of each completion token under softmax(z / T), from one unpadded forward."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].double()
    positions = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion_ids)]
    log_p = torch.log_softmax(positions / temperature, dim=-1)
    return log_p.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1)


def test_sampled_ladder_draws_each_new_token_from_the_model_given_its_whole_prefix():
    """Sampled rungs are a draw from the model's distribution: every token, continued ones included, is recorded with
    the log-probability the model gives it after the prompt and all the tokens before it (a wrong prefix, position
    or padding in a resumed or merged row would show here)."""
    model, tokenizer, prompts, _ = _ending_model()
    problems = [{"prompt": p, "answer": "0"} for p in prompts]
    rungs = evaluate_ladder(
        model, tokenizer, problems, (3, 8, 20), max_truncated=0.0, do_sample=True, temperature=0.8,
        batch_size=3, seed=7, progress=False, segment_tokens=2,
    )  # fmt: skip
    assert len(rungs) >= 2 and rungs[0].num_truncated > 0
    for rung in rungs:
        for prompt, completion in zip(prompts, rung.completions):
            assert len(completion.token_logprobs) == len(completion.token_entropies) == completion.num_tokens
            reference = _teacher_forced_logprobs(model, tokenizer, prompt, completion.token_ids, 0.8)
            torch.testing.assert_close(torch.tensor(completion.token_logprobs).double(), reference, atol=1e-4, rtol=0)
    again = evaluate_ladder(
        model, tokenizer, problems, (3, 8, 20), max_truncated=0.0, do_sample=True, temperature=0.8,
        batch_size=3, seed=7, progress=False, segment_tokens=2,
    )  # fmt: skip
    assert [c.token_ids for c in again[-1].completions] == [c.token_ids for c in rungs[-1].completions]  # seeded


def test_continue_completions_equals_decoding_at_the_longer_budget():
    model, tokenizer, prompts, _ = _ending_model()
    short = generate_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=4, progress=False)
    assert any(c.truncated for c in short) and not all(c.truncated for c in short)
    continued = continue_completions(model, tokenizer, prompts, short, 25, batch_size=4, progress=False)
    fresh = generate_completions(model, tokenizer, prompts, max_new_tokens=25, batch_size=4, progress=False)
    for before, got, ref in zip(short, continued, fresh):
        assert got.token_ids == ref.token_ids and got.finished == ref.finished
        assert got.token_entropies == pytest.approx(ref.token_entropies, abs=1e-5)
        assert got.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)
        if before.finished:
            assert got is before  # nothing decoded again
    with pytest.raises(ValueError, match="`completions`"):
        continue_completions(model, tokenizer, prompts, short[:-1], 25)


def test_end_tokens_are_the_tokenizer_s_and_the_generation_config_s():
    """TRL 1.16 GRPOTrainer's rule: a completion ends at the tokenizer's EOS or any EOS of the generation config."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed=3)
    prompt = tiny_prompts(1, seed=5)[0]
    reference = _reference_greedy(model, tokenizer, prompt, 12)
    k = next(i for i in range(1, len(reference)) if reference[i] not in reference[:i])
    others = [t for t in range(3, len(tokenizer)) if t not in reference][:2]  # never emitted on this path
    model.generation_config.eos_token_id = others
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(reference[k])
    assert end_token_ids(model, tokenizer) == [reference[k], *others]
    (completion,) = generate_completions(model, tokenizer, [prompt], max_new_tokens=12, progress=False)
    assert completion.token_ids == reference[: k + 1] and completion.finished
    model.generation_config.eos_token_id = None
    assert end_token_ids(model, tokenizer) == [reference[k]]


def test_decoder_refuses_a_smaller_budget_and_bad_settings():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=3)
    decoder = Decoder(model, tokenizer, ["yes"], progress=False)
    decoder.extend_to(4)
    with pytest.raises(ValueError, match="`max_new_tokens` must be >= the budget already decoded \\(4\\)"):
        decoder.extend_to(3)
    with pytest.raises(ValueError, match="`segment_tokens`"):
        Decoder(model, tokenizer, ["yes"], segment_tokens=0)
    with pytest.raises(ValueError, match="`prefixes`"):
        Decoder(model, tokenizer, ["yes"], prefixes=[[1], [2]])


def test_ladder_resumes_a_sliding_window_cache_as_one_decoding():
    """Gemma 3's hybrid cache (sliding-window layers, which cannot be merged across batches, only pruned): resumed
    segments still give the tokens of one unbatched decoding."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from trl_entropy.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    layers = ["sliding_attention", "full_attention"] * 2
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=256, pad_token_id=0,
        eos_token_id=1, bos_token_id=None, layer_types=layers,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    prompts = [*tiny_prompts(7, seed=5), "yes", "1 2 3 4 5 6 7 8 9 10 11"]
    free = [_reference_greedy(model, tokenizer, p, 20) for p in prompts]
    model.generation_config.eos_token_id = max(
        range(3, len(tokenizer)), key=lambda t: len({row.index(t) for row in free if t in row[1:]})
    )
    decoder = Decoder(model, tokenizer, prompts, batch_size=3, segment_tokens=3, progress=False)
    for budget in (5, 11, 20):
        got = decoder.extend_to(budget)
    assert any(c.finished for c in got) and any(c.num_tokens > 11 for c in got)
    assert [c.token_ids for c in got] == [_direct_greedy(model, tokenizer, p, 20) for p in prompts]
