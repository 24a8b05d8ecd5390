"""The label-free training probe: held-out accuracy before and after a few EM-RL steps, measured as `evaluate` does."""

import copy

import pytest
import torch

from trl_entropy.evaluation import evaluate
from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts
from trl_entropy.trainers.probe import training_probe

SETTINGS = dict(steps=2, prompts_per_step=1, num_generations=2, max_completion_length=4, eval_max_new_tokens=4)
SETTINGS.update(learning_rate=0.05, bf16=False, seed=3)


def _held_out(tokenizer, model, n: int = 6) -> list[dict]:
    # answers the tiny model gets right on some problems and wrong on others: its own greedy last word, or a miss
    prompts = tiny_prompts(n + 4)[4:]
    greedy = evaluate(
        model, tokenizer, [{"prompt": p, "answer": "0"} for p in prompts], max_new_tokens=4, progress=False
    )
    answers = [c.text.split()[-1] if c.text.split() and i % 2 == 0 else "no" for i, c in enumerate(greedy.completions)]
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]


def test_probe_reports_evaluate_before_and_after_and_trains_in_place():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    held_out = _held_out(tokenizer, model)
    untouched = copy.deepcopy(model)
    result = training_probe(model, tokenizer, tiny_prompts(4), held_out, **SETTINGS)

    def reference(current) -> dict:
        out = {}
        for mode, do_sample in (("greedy", False), ("sampled", True)):
            r = evaluate(
                current,
                tokenizer,
                held_out,
                max_new_tokens=4,
                do_sample=do_sample,
                seed=1000 + 3 if do_sample else None,
                progress=False,
            )
            out[mode] = {"accuracy": r.accuracy, "truncation_rate": r.truncation_rate}
        return out

    assert result["before"] == reference(untouched)
    assert result["after"] == reference(model)  # the model passed in is the trained one
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), untouched.parameters())]
    assert any(changed)
    for mode in ("greedy", "sampled"):
        assert result["changes"][mode] == result["after"][mode]["accuracy"] - result["before"][mode]["accuracy"]
    assert result["trend"] == pytest.approx((result["changes"]["greedy"] + result["changes"]["sampled"]) / 2)
    assert result["settings"]["steps"] == 2 and result["settings"]["bf16"] is False


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"steps": 0}, "`steps` must be an integer >= 1, got 0"),
        ({"steps": 5}, "`train_prompts` must hold at least steps x prompts_per_step = 5 prompts, got 4"),
        ({"num_generations": 1}, "`num_generations` must be an integer >= 2, got 1"),
        ({"temperature": 0.0}, "`temperature` must be a number >= 1e-06, got 0.0"),
    ],
)
def test_probe_refuses_bad_settings_in_one_line_before_training(kwargs, fragment):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    with pytest.raises(ValueError) as error:
        training_probe(model, tokenizer, tiny_prompts(4), [{"prompt": "p", "answer": "1"}], **{**SETTINGS, **kwargs})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_probe_refuses_held_out_problems_without_answers():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    with pytest.raises(ValueError, match="`held_out` must be a non-empty list of problems with `prompt` and `answer`"):
        training_probe(model, tokenizer, tiny_prompts(4), [{"prompt": "p"}], **SETTINGS)
