"""Batched generation (with any logits processors: EM-INF, adaptive temperature), self-consistency voting and
scoring against known answers. The decoding loop is :class:`trl_entropy.decoding.Decoder`, the one evaluation uses.
Plain values in, plain values out: no command line and no task here; what ``trl-entropy generate`` runs (model
loading, prompt files, the built-in tasks, output files) is :func:`trl_entropy.cli.generate.run_generate`.

Example::

    from trl_entropy.evaluation.generate import generate_completions, render_prompt, score_completions
    from trl_entropy.decoding.processors import EMInfLogitsProcessor
    from trl_entropy.evaluation.tasks import extract_answer, grade

    prompts = [render_prompt(tokenizer, "What is 2 + 3?")]
    samples = generate_completions(model, tokenizer, prompts, do_sample=True, temperature=0.1,
                                   logits_processors=[EMInfLogitsProcessor()])
    records, summary = score_completions(samples, ["5"], parse_answer=extract_answer, is_correct=grade)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from .. import stats
from ..decoding.loop import Completion, Decoder, render_prompt, truncation_rate
from ..stats import wilson_interval

logger = logging.getLogger(__name__)

__all__ = [
    "Completion",
    "load_prompts",
    "render_prompt",
    "generate_completions",
    "count_generated_tokens",
    "normalize_answer",
    "majority_vote",
    "wilson_interval",
    "score_completions",
]


def load_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL prompts file: each non-empty line an object with ``prompt`` (a string or a list of chat
    messages) and optionally ``answer`` (converted to a string)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({err.msg}).") from err
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str | list):
                raise ValueError(f"{path}:{line_number}: each line needs a 'prompt' (a string or a list of messages).")
            if row.get("answer") is not None:
                row["answer"] = str(row["answer"])
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompt.")
    return rows


def count_generated_tokens(generated_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """Tokens each row of ``generated_ids`` ``[N, T]`` (the new tokens only) really generated: up to and including its
    first end-of-sequence token, or all ``T`` if it has none (generation stopped at the length limit)."""
    length = generated_ids.size(1)
    if not eos_token_ids or length == 0:
        return torch.full((generated_ids.size(0),), length, dtype=torch.long)
    is_eos = torch.isin(generated_ids, torch.tensor(list(eos_token_ids), device=generated_ids.device))
    no_eos = torch.full((generated_ids.size(0),), length, dtype=torch.long, device=generated_ids.device)
    return torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, no_eos).cpu()


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    logits_processors: Sequence[LogitsProcessor] = (),
    seed: int | None = 0,
    add_special_tokens: bool = False,
    progress: bool = True,
    desc: str = "generate",
    segment_tokens: int | None = 32,
) -> list[list[Completion]]:
    """Generate ``num_samples`` completions for each already-rendered prompt (:func:`render_prompt`), in left-padded
    batches of about ``batch_size`` sequences (a prompt's samples in one batch), with
    :class:`~trl_entropy.decoding.Decoder` (tqdm in tokens; ``segment_tokens`` as there). ``top_k``/``top_p`` None
    take the model's generation config. ``add_special_tokens`` is passed to the tokenizer (False for text rendered by
    a chat template, which already holds its special tokens).

    Returns:
        One list of :class:`Completion` per prompt, in order.
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
    if num_samples > 1 and not do_sample:
        raise ValueError(f"`num_samples` > 1 (got {num_samples}) needs `do_sample=True`.")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    rows = [prompt for prompt in prompts for _ in range(num_samples)]
    decoder = Decoder(
        model,
        tokenizer,
        rows,
        batch_size=max(1, batch_size // num_samples) * num_samples,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k,
        top_p=top_p,
        logits_processors=logits_processors,
        seed=seed,
        add_special_tokens=add_special_tokens,
        segment_tokens=segment_tokens,
        progress=progress,
        desc=desc,
    )
    completions = decoder.extend_to(max_new_tokens)
    return [completions[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form of an extracted answer for voting: numbers compare by value (``"5.0"`` == ``"5"``), other
    strings by their stripped text."""
    if answer is None:
        return None
    text = answer.strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text or None
    if not math.isfinite(value):
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-missing answer after :func:`normalize_answer` (:func:`trl_entropy.stats.majority_vote`);
    ties go to the answer seen first; None when no answer could be extracted at all."""
    return stats.majority_vote([normalize_answer(a) for a in answers])


def score_completions(
    completions: Sequence[Sequence[Completion]],
    answers: Sequence[str | None] | None,
    parse_answer: Callable[[str], str | None],
    is_correct: Callable[[str, str], bool],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-prompt records (extracted answers, vote, correctness) and a summary (accuracy with its 95% Wilson interval
    over the prompts that have an answer, generated-token cost, and the fraction of completions cut off at the token
    budget: an accuracy whose answers were cut off partly measures the budget).

    ``parse_answer(text)`` extracts a completion's answer (None when there is none); ``is_correct(prediction,
    answer)`` grades the voted answer (e.g. :func:`trl_entropy.evaluation.tasks.extract_answer` and
    :func:`trl_entropy.evaluation.tasks.grade`).

    Returns:
        ``(records, summary)``; ``records[i]`` has ``completions``, ``num_tokens``, ``extracted``, ``prediction`` and
        ``correct`` (None without a known answer).
    """
    answers = list(answers) if answers is not None else [None] * len(completions)
    if len(answers) != len(completions):
        raise ValueError(f"Got {len(completions)} prompts' completions but {len(answers)} answers.")
    records, n_graded, n_correct = [], 0, 0
    for samples, answer in zip(completions, answers):
        extracted = [parse_answer(c.text) for c in samples]
        prediction = majority_vote(extracted)
        correct = None
        if answer is not None:
            correct = prediction is not None and is_correct(prediction, str(answer))
            n_graded += 1
            n_correct += int(correct)
        records.append(
            {
                "completions": [c.text for c in samples],
                "num_tokens": [c.num_tokens for c in samples],
                "truncated": [c.truncated for c in samples],
                "extracted": extracted,
                "prediction": prediction,
                "correct": correct,
            }
        )
    total_tokens = sum(sum(r["num_tokens"]) for r in records)
    n = len(records)
    low, high = wilson_interval(n_correct, n_graded) if n_graded else (float("nan"), float("nan"))
    summary = {
        "num_problems": n,
        "num_samples": len(completions[0]) if n else 0,
        "num_graded": n_graded,
        "num_correct": n_correct,
        "accuracy": n_correct / n_graded if n_graded else None,
        "accuracy_ci95": [low, high] if n_graded else None,
        "total_generated_tokens": total_tokens,
        "mean_generated_tokens_per_problem": total_tokens / n if n else None,
        "answer_rate": sum(r["prediction"] is not None for r in records) / n if n else None,
        "mean_completion_length": total_tokens / max(1, sum(len(samples) for samples in completions)),
        "truncation_rate": truncation_rate([c for samples in completions for c in samples]) if n else None,
    }
    return records, summary
