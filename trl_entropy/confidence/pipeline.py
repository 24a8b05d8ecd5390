"""The Think-Just-Enough two-stage pipeline (and its online and token-budget modes) over a list of prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .signals import ConfidenceSignal
from .stopping import EntropyEarlyStopping, TokenConfidenceRecorder

__all__ = ["EarlyStopResult", "think_just_enough_generate"]


@dataclass
class EarlyStopResult:
    """One problem's outcome in :func:`think_just_enough_generate`.

    Attributes:
        completion: the decoded output (first step, then the forced answer prompt and answer, or the continuation).
        completion_ids: its token ids, forced answer-prompt tokens included.
        num_tokens: ``len(completion_ids)``: every output token, forced ones included (so savings are not inflated).
        first_step_tokens: tokens of the first reasoning step (two-stage) or before the confident stop (online).
        step_signal: mean signal over the first step (two-stage) or the running mean at the stop (online); NaN when
            there is no value.
        confident: whether the row was stopped as confident and answered directly.
        outcome: ``"answered_early"``, ``"extended"`` (continued reasoning), ``"ended_in_first_step"`` (EOS during
            the first step) or ``"finished"`` (online mode, no confident stop).
    """

    completion: str
    completion_ids: list[int]
    num_tokens: int
    first_step_tokens: int
    step_signal: float
    confident: bool
    outcome: str


def _encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def _generate_rows(
    model,
    rows: list[list[int]],
    pad_token_id: int,
    max_new_tokens: list[int],
    make_stopper,
    batch_size: int,
    generation_kwargs: dict,
    progress,
) -> list[tuple[list[int], float, str | None, float]]:
    """Generate a continuation of each token row, left-padded in batches.

    Returns per row ``(new_ids, mean_signal, stop_reason, stop_value)``; ``make_stopper(caps)`` builds the
    :class:`EntropyEarlyStopping` of a batch whose rows may generate at most ``caps`` tokens each.
    """
    device = next(model.parameters()).device
    out: list[tuple[list[int], float, str | None, float]] = []
    for start in range(0, len(rows), batch_size):
        batch, caps = rows[start : start + batch_size], max_new_tokens[start : start + batch_size]
        width = max(len(r) for r in batch)
        input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
        stopper = make_stopper(caps)
        with stopper.recorder.watch(model):  # record the raw distribution, not the penalised scores
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(caps),
                logits_processor=[stopper.recorder],
                stopping_criteria=[stopper],
                pad_token_id=pad_token_id,
                **generation_kwargs,
            )[:, width:]
        signal = stopper.sequence_signal().tolist()
        reasons, values = stopper.stop_reasons, stopper.stop_values.tolist()
        for i in range(len(batch)):
            n = int(stopper.num_tokens[i]) if stopper.num_tokens.numel() else 0
            out.append((generated[i, :n].tolist(), signal[i] if n else float("nan"), reasons[i], values[i]))
        progress.update(len(batch))
    return out


def think_just_enough_generate(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    threshold: float | None = None,
    *,
    mode: Literal["two_stage", "online"] = "two_stage",
    signal: ConfidenceSignal | None = None,
    step_delimiter: str = "\n\n",
    step_delimiter_ids: Sequence[int] | None = None,
    min_step_tokens: int = 4,
    max_step_tokens: int = 128,
    max_new_tokens: int = 512,
    answer_prompt: str = "Therefore, the final answer is",
    max_answer_tokens: int = 16,
    token_budget: int | None = None,
    batch_size: int = 8,
    generation_kwargs: dict | None = None,
    show_progress: bool = True,
) -> list[EarlyStopResult]:
    """Think Just Enough: answer right away when the first reasoning step is confident, else keep reasoning.

    ``mode="two_stage"`` (the paper): (1) generate the first reasoning step, up to the first ``step_delimiter``
    after ``min_step_tokens`` tokens or ``max_step_tokens``; (2) if its mean signal is ``<= threshold``, append
    ``answer_prompt`` and generate a short answer, else continue reasoning. ``mode="online"``: one pass in which an
    :class:`EntropyEarlyStopping` checks the running mean at every step delimiter; confident rows are then answered
    directly. ``threshold=None`` never stops early: the baseline with identical decoding.

    Token budget (two-stage only): ``token_budget`` is the average number of output tokens per problem. The prompts
    share a pool of ``token_budget * len(prompts)`` tokens; what the first steps and early answers leave is split
    equally between the problems that continue reasoning, so tokens saved on confident problems go to uncertain ones.
    Without it, each problem may use up to ``max_new_tokens`` output tokens.

    Args:
        model: a causal LM; tokenizer: its tokenizer (``pad_token`` set).
        prompts: plain strings, or chat messages rendered with the tokenizer's chat template.
        threshold: stop threshold in the signal's unit (e.g. ``calibrator.threshold()``), or None.
        signal: token signal, an entropy kind (default top-20 entropy in bits, as the paper).
        step_delimiter / step_delimiter_ids: end of a reasoning step, as text found in the decoded tokens, or as ids.
        answer_prompt: text forced after a confident first step to elicit the answer.
        max_answer_tokens: tokens generated after ``answer_prompt``.
        batch_size: rows per ``generate`` call.
        generation_kwargs: extra ``generate`` arguments (``do_sample``, ``temperature``...).
        show_progress: tqdm bars over problems, one per stage.

    Returns:
        One :class:`EarlyStopResult` per prompt, in order.
    """
    from tqdm.auto import tqdm

    if mode not in ("two_stage", "online"):
        raise ValueError(f"`mode` must be 'two_stage' or 'online', got {mode!r}.")
    for name, value in (
        ("min_step_tokens", min_step_tokens),
        ("max_step_tokens", max_step_tokens),
        ("max_new_tokens", max_new_tokens),
        ("max_answer_tokens", max_answer_tokens),
        ("batch_size", batch_size),
    ):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if max_step_tokens > max_new_tokens:
        raise ValueError(f"`max_step_tokens` ({max_step_tokens}) must be <= `max_new_tokens` ({max_new_tokens}).")
    if token_budget is not None and (mode != "two_stage" or token_budget < 1):
        raise ValueError(f"`token_budget` must be an integer >= 1 and needs mode='two_stage', got {token_budget!r}.")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"`threshold` must be finite or None, got {threshold}.")
    signal = signal or ConfidenceSignal()
    if signal.higher_is_confident:
        raise ValueError("`signal` must be an entropy kind: low entropy means confident in Think Just Enough.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer needs a pad token (`tokenizer.pad_token = tokenizer.eos_token`).")
    if step_delimiter_ids is not None:
        delimiter = {"delimiter_token_ids": list(step_delimiter_ids)}
        if not delimiter["delimiter_token_ids"]:
            raise ValueError("`step_delimiter_ids` must be non-empty.")
    elif step_delimiter:
        delimiter = {"delimiter": step_delimiter, "tokenizer": tokenizer}
    else:
        raise ValueError("`step_delimiter` must be a non-empty string (or give `step_delimiter_ids`).")
    eos_ids = _eos_ids(model, tokenizer)
    generation_kwargs = dict(generation_kwargs or {})
    pad = tokenizer.pad_token_id
    n = len(prompts)
    prompt_ids = [_encode_prompt(tokenizer, p) for p in prompts]

    def stopper_factory(**kwargs):
        return lambda caps: EntropyEarlyStopping(
            recorder=TokenConfidenceRecorder(signal),
            **delimiter,
            eos_token_id=eos_ids,
            max_tokens_per_row=caps,
            **kwargs,
        )

    def run(rows, caps, desc, **kwargs):
        with tqdm(total=len(rows), desc=desc, disable=not show_progress or not rows, leave=False) as bar:
            return _generate_rows(
                model, rows, pad, caps, stopper_factory(**kwargs), batch_size, generation_kwargs, bar
            )

    # Stage 1: the first reasoning step (two-stage) or the whole online pass.
    if mode == "two_stage":
        first = run(
            prompt_ids, [max_step_tokens] * n, "first step", min_new_tokens=min_step_tokens, stop_at_delimiter=True
        )
    else:
        first = run(
            prompt_ids,
            [max_new_tokens] * n,
            "online",
            threshold=threshold,
            min_new_tokens=min_step_tokens,
            check_at="delimiter",
        )
    step_ids = [ids for ids, *_ in first]
    if mode == "two_stage":
        step_signal = [value for _, value, _, _ in first]
        ended = [reason == "eos" for _, _, reason, _ in first]
        confident = [
            threshold is not None and not e and math.isfinite(v) and v <= threshold for v, e in zip(step_signal, ended)
        ]
    else:
        confident = [reason == "confident" for _, _, reason, _ in first]
        step_signal = [stop if c else value for (_, value, _, stop), c in zip(first, confident)]
        ended = [not c for c in confident]

    # Stage 2a: answer directly after a confident step.
    answers: dict[int, list[int]] = {}
    confident_rows = [i for i in range(n) if confident[i]]
    if confident_rows:
        forced = {}
        for i in confident_rows:
            text = answer_prompt if first[i][2] == "delimiter" or mode == "online" else step_delimiter + answer_prompt
            forced[i] = tokenizer(text, add_special_tokens=False)["input_ids"]
        outputs = run(
            [prompt_ids[i] + step_ids[i] + forced[i] for i in confident_rows],
            [max_answer_tokens] * len(confident_rows),
            "answer",
            stop_at_delimiter=True,
        )
        for i, (ids, *_) in zip(confident_rows, outputs):
            answers[i] = forced[i] + ids

    # Stage 2b: continue reasoning on the uncertain rows.
    continuations: dict[int, list[int]] = {}
    extend_rows = [i for i in range(n) if not confident[i] and not ended[i]] if mode == "two_stage" else []
    if extend_rows:
        if token_budget is not None:
            used = sum(len(ids) for ids in step_ids) + sum(len(a) for a in answers.values())
            share = max(0, token_budget * n - used) // len(extend_rows)
            caps = {i: share for i in extend_rows}
        else:
            caps = {i: max_new_tokens - len(step_ids[i]) for i in extend_rows}
        extend_rows = [i for i in extend_rows if caps[i] >= 1]
        outputs = run(
            [prompt_ids[i] + step_ids[i] for i in extend_rows], [caps[i] for i in extend_rows], "extended reasoning"
        )
        for i, (ids, *_) in zip(extend_rows, outputs):
            continuations[i] = ids

    results = []
    for i in range(n):
        ids = step_ids[i] + answers.get(i, []) + continuations.get(i, [])
        if confident[i]:
            outcome = "answered_early"
        elif mode == "online":
            outcome = "finished"
        elif ended[i]:
            outcome = "ended_in_first_step"
        else:
            outcome = "extended"
        results.append(
            EarlyStopResult(
                completion=tokenizer.decode(ids, skip_special_tokens=True),
                completion_ids=ids,
                num_tokens=len(ids),
                first_step_tokens=len(step_ids[i]),
                step_signal=float(step_signal[i]),
                confident=confident[i],
                outcome=outcome,
            )
        )
    return results
