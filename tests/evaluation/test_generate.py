"""The generation helper: token counting, voting, Wilson intervals, prompt files and end-to-end runs."""

import json
from collections import Counter

import pytest
import torch

from trl_entropy.cli.arguments import GenerateArguments
from trl_entropy.cli.generate import run_generate
from trl_entropy.evaluation.generate import (
    Completion,
    count_generated_tokens,
    generate_completions,
    load_prompts,
    majority_vote,
    normalize_answer,
    render_prompt,
    score_completions,
    wilson_interval,
)
from trl_entropy.evaluation.tasks import extract_answer, grade


def test_count_generated_tokens_matches_a_python_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (50, 12), generator=g)
    eos = [1, 5]
    expected = []
    for row in ids.tolist():
        hits = [i for i, t in enumerate(row) if t in eos]
        expected.append(hits[0] + 1 if hits else len(row))
    assert count_generated_tokens(ids, eos).tolist() == expected
    assert count_generated_tokens(ids, []).tolist() == [12] * 50
    assert count_generated_tokens(ids[:, :0], eos).tolist() == [0] * 50


def test_normalize_answer_and_majority_vote():
    assert normalize_answer(" 5.0 ") == "5" and normalize_answer("1,000") == "1000"
    assert normalize_answer("0.5") == "0.5" and normalize_answer("x+1") == "x+1" and normalize_answer(None) is None
    assert majority_vote(["3", "5", "5.0", None, "3"]) == "3"  # tie 2-2: the answer seen first
    assert majority_vote([None, "7", "8", "8"]) == "8"
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    g = torch.Generator().manual_seed(1)
    for _ in range(200):  # against a brute-force vote
        votes = [None if v == 0 else str(v) for v in torch.randint(0, 4, (5,), generator=g).tolist()]
        seen = [v for v in votes if v is not None]
        if not seen:
            assert majority_vote(votes) is None
            continue
        counts = Counter(seen)
        best = max(counts.values())
        assert majority_vote(votes) == min((seen.index(v), v) for v in counts if counts[v] == best)[1]


def test_load_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "what is 1 + 2 ?", "answer": 3}, {"prompt": [{"role": "user", "content": "hi"}], "id": 7}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    loaded = load_prompts(path)
    assert loaded[0] == {"prompt": "what is 1 + 2 ?", "answer": "3"} and loaded[1] == rows[1]
    path.write_text('{"prompt": "a"}\n{"question": "no prompt"}\n')
    with pytest.raises(ValueError, match=":2: each line needs a 'prompt'"):
        load_prompts(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=":1: not valid JSON"):
        load_prompts(path)


def test_render_prompt(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    messages = [{"role": "user", "content": "what is 2 + 2 ?"}]
    assert render_prompt(tokenizer, "what is 2 + 2 ?") == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert render_prompt(tokenizer, "what is 2 + 2 ?", apply_chat_template=False) == "what is 2 + 2 ?"
    two = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_prompt(tokenizer, two, apply_chat_template=False) == "a\nb"


def test_generate_completions_match_direct_generate(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["what is 3 + 4 ?", "what is 10 + 2 ? the answer is", "yes"]
    got = generate_completions(model, tokenizer, prompts, max_new_tokens=7, batch_size=1, progress=False)
    eos = model.generation_config.eos_token_id
    for prompt, (completion,) in zip(prompts, got):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)[0, ids.size(1) :].tolist()
        n = new.index(eos) + 1 if eos in new else len(new)
        assert completion.num_tokens == n <= 7
        assert completion.text == tokenizer.decode(new[:n], skip_special_tokens=True)
    # Batched, left-padded generation gives the same greedy completions.
    batched = generate_completions(model, tokenizer, prompts, max_new_tokens=7, batch_size=3, progress=False)
    assert [c[0].text for c in batched] == [c[0].text for c in got]
    assert tokenizer.padding_side == "right"  # restored


def test_generate_completions_self_consistency_is_seeded(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["what is 3 + 4 ?", "what is 1 + 1 ?"]
    kwargs = dict(max_new_tokens=5, batch_size=4, do_sample=True, num_samples=3, progress=False)
    first = generate_completions(model, tokenizer, prompts, seed=0, **kwargs)
    again = generate_completions(model, tokenizer, prompts, seed=0, **kwargs)
    other = generate_completions(model, tokenizer, prompts, seed=1, **kwargs)
    assert [len(c) for c in first] == [3, 3]
    assert first == again and first != other
    with pytest.raises(ValueError, match="num_samples"):
        generate_completions(model, tokenizer, prompts, num_samples=2, do_sample=False)


def test_score_completions():
    completions = [
        [
            Completion("the answer is 7", [0] * 4),
            Completion("8", [0] * 1),
            Completion("7.0", [0] * 2),
        ],  # vote 7: correct
        [Completion("no idea", [0] * 3), Completion("", [0] * 0), Completion("5", [0] * 1)],  # vote 5: wrong
        [Completion("12", [0] * 1), Completion("12", [0] * 1), Completion("3", [0] * 1)],  # no answer known
    ]
    records, summary = score_completions(completions, ["7", "6", None], parse_answer=extract_answer, is_correct=grade)
    assert [r["prediction"] for r in records] == ["7", "5", "12"]
    assert [r["correct"] for r in records] == [True, False, None]
    assert summary["num_graded"] == 2 and summary["num_correct"] == 1 and summary["accuracy"] == 0.5
    assert summary["accuracy_ci95"] == list(wilson_interval(1, 2))
    assert summary["total_generated_tokens"] == 14 and summary["mean_generated_tokens_per_problem"] == 14 / 3
    assert summary["num_samples"] == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 4}, "num_samples"),
        ({"em_inf": True, "adaptive_temperature": True}, "at most one"),
        ({"em_inf_threshold": -1.0}, "threshold"),
        ({"em_inf_optimizer": "lbfgs"}, "optimizer"),
        ({"adaptive_temperature_alpha": 2.0}, "alpha"),
        ({"batch_size": 0}, "batch_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_problems": 0}, "num_problems"),
    ],
)
def test_generate_arguments_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerateArguments(**kwargs)


@pytest.mark.parametrize("method", ["plain", "em_inf", "adaptive_temperature"])
def test_run_generate_end_to_end_on_a_prompts_file(tmp_path, tiny_model_and_tokenizer, method):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": f"what is {a} + {b} ?", "answer": a + b, "id": i} for i, (a, b) in enumerate([(1, 2), (3, 4)])]
    lines.append({"prompt": "yes"})  # no answer: not graded
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    args = GenerateArguments(
        prompts_file=str(prompts),
        num_problems=0,
        max_new_tokens=4,
        do_sample=True,
        temperature=0.5,
        top_k=10,
        num_samples=2,
        batch_size=4,
        em_inf=method == "em_inf",
        adaptive_temperature=method == "adaptive_temperature",
        output_file=str(tmp_path / "out.jsonl"),
    )
    summary = run_generate(args, model, tokenizer)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records[:2]] == [0, 1] and records[0]["answer"] == "3" and "answer" not in records[2]
    assert all(len(r["completions"]) == 2 and all(0 <= n <= 4 for n in r["num_tokens"]) for r in records)
    assert summary["num_graded"] == 2 and summary["num_correct"] == sum(r["correct"] is True for r in records)
    assert summary["total_generated_tokens"] == sum(sum(r["num_tokens"]) for r in records)
    on_disk = json.loads((tmp_path / "out.summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"] and on_disk["arguments"]["num_samples"] == 2
    if method == "em_inf":
        stats = summary["em_inf_stats"]
        assert stats["calls"] >= 1 and stats["mean_entropy_after"] <= stats["mean_entropy_before"]
    else:
        assert "em_inf_stats" not in summary


def test_run_generate_on_the_arithmetic_task(tmp_path, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    args = GenerateArguments(num_problems=5, max_new_tokens=3, output_file=str(tmp_path / "o.jsonl"))
    summary = run_generate(args, model, tokenizer)
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(records) == 5 and summary["num_graded"] == 5
    assert all(r["question"].startswith("What is") for r in records)
    low, high = summary["accuracy_ci95"]
    assert low <= summary["accuracy"] <= high


@pytest.mark.slow
def test_run_generate_with_em_inf_on_the_default_model(tmp_path):
    args = GenerateArguments(
        num_problems=2,
        max_new_tokens=8,
        em_inf=True,
        do_sample=True,
        temperature=0.1,
        output_file=str(tmp_path / "o.jsonl"),
    )
    summary = run_generate(args)
    assert summary["num_problems"] == 2 and 0 <= summary["accuracy"] <= 1
    assert 2 <= summary["total_generated_tokens"] <= 2 * 8
    stats = summary["em_inf_stats"]
    assert stats["calls"] >= 1 and stats["mean_entropy_after"] <= stats["mean_entropy_before"]


def test_generate_arguments_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses(
        [
            "--em_inf",
            "--do_sample",
            "--temperature",
            "0.1",
            "--top_k",
            "5",
            "--num_samples",
            "4",
            "--em_inf_steps",
            "7",
        ]
    )
    assert args.em_inf and args.do_sample and args.temperature == 0.1 and args.top_k == 5 and args.top_p is None
    assert args.num_samples == 4 and args.em_inf_config().steps == 7


def test_progress_counts_token_slots_up_to_completions_times_budget():
    """The bar advances one slot per generated token and, when a completion ends, by its unused budget: it ends at
    completions x budget, and its ``generated`` count is the tokens really generated (hand-made steps)."""
    import io

    from tqdm import tqdm

    from trl_entropy.decoding.loop import _TokenProgress

    bar = tqdm(total=3 * 4, file=io.StringIO())
    progress = _TokenProgress(bar, end_ids=[1])
    progress.start(rows=3, steps=4)
    progress.put(torch.tensor([[9, 9], [9, 9], [9, 9]]))  # the prompt: not counted
    steps = [[5, 1, 5], [5, 0, 1], [5, 0, 0], [5, 0, 0]]  # row 1 ends at step 1, row 2 at step 2, row 0 runs out
    seen = []
    for tokens in steps:
        progress.put(torch.tensor(tokens))
        seen.append(bar.n)
    progress.end()
    assert seen == [3 + 3, 6 + 2 + 2, 10 + 1, 11 + 1]
    assert bar.n == bar.total and progress.generated == 4 + 1 + 2 and progress.ended == 2


def test_generate_completions_match_evaluation_loop_with_samples_and_segments(tiny_model_and_tokenizer):
    """One loop: the command's greedy completions are evaluation's, whatever the segment length."""
    from trl_entropy.evaluation import generate_completions as evaluation_completions

    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["what is 3 + 4 ?", "what is 10 + 2 ? the answer is", "yes"]
    ours = generate_completions(model, tokenizer, prompts, max_new_tokens=9, batch_size=2, progress=False)
    whole = generate_completions(
        model, tokenizer, prompts, max_new_tokens=9, batch_size=2, progress=False, segment_tokens=None
    )
    theirs = evaluation_completions(model, tokenizer, prompts, max_new_tokens=9, batch_size=2, progress=False)
    assert [c[0].token_ids for c in ours] == [c[0].token_ids for c in whole] == [c.token_ids for c in theirs]
    sampled = generate_completions(
        model, tokenizer, prompts, max_new_tokens=6, do_sample=True, num_samples=3, batch_size=4, progress=False
    )
    assert [len(s) for s in sampled] == [3, 3, 3] and all(1 <= c.num_tokens <= 6 for s in sampled for c in s)
