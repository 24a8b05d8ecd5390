"""The one decoding loop of the package, and what a causal LM computed at each of its steps.

:class:`Decoder` generates completions in left-padded batches with ``model.generate`` and can extend the ones cut off
at a budget to a longer one, resuming each from its KV cache, so that every token is decoded once: evaluation
(:mod:`trl_entropy.evaluation`, its budget ladder included), ``diagnose``, the collapse guard's probe and
``trl-entropy generate`` (:mod:`trl_entropy.evaluation.generate`) all decode through it. Between segments of
:attr:`Decoder.segment_tokens` tokens it drops the completions that have ended and merges the remaining rows into full
batches, so that a batch does not keep computing rows that are done (``generate`` runs a batch until its longest row
ends).

:class:`GenerationEntropyRecorder` records the entropy, the sampled token's log-probability and the self-certainty of
``softmax(logits / T)`` at each step, from the raw logits (before any logits processor), in ``O(batch x steps)`` memory
instead of keeping every step's ``[batch, vocabulary]`` logits. Used by the trainers (the ``"generation"`` signal
source) and by :class:`Decoder`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from ..ops import self_certainty, token_entropy
from ..signals import SIGNAL_NAMES

__all__ = [
    "Completion",
    "Decoder",
    "GenerationEntropyRecorder",
    "end_token_ids",
    "render_prompt",
    "truncation_rate",
]

RECORDED_SIGNALS = ("token_entropy", "token_logprob")
"""What :class:`Decoder` records per token when asked to (``record=True``)."""


class GenerationEntropyRecorder:
    """Records, during ``model.generate``, the requested signals from each decoding step's raw logits.

    A forward hook on the causal LM sees each step's logits ``[B, 1, V]`` (before any logits processor); the entropy
    and self-certainty of ``softmax(logits / T)`` are reduced to ``[B]`` at once, so memory stays ``O(B * steps)``
    plus one ``[B, V]`` row of log-probs for ``token_logprob``: the token sampled at step ``s`` is fed back as the
    input of step ``s + 1``, where its log-prob is read.
    """

    def __init__(self, module: torch.nn.Module, temperature: float, signals: tuple[str, ...]):
        unknown = sorted(set(signals) - set(SIGNAL_NAMES))
        if unknown:
            raise ValueError(f"Unknown signals {unknown}; allowed: {list(SIGNAL_NAMES)}.")
        self.module, self.temperature, self.signals = module, temperature, tuple(signals)
        self.steps: dict[str, list[torch.Tensor]] = {name: [] for name in self.signals}
        self._previous_logprobs: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> GenerationEntropyRecorder:
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        logits = getattr(output, "logits", None)
        if logits is None:  # not a generation step (e.g. a fused-head scoring call)
            return
        scaled = logits[:, -1, :].float() / self.temperature
        if "token_entropy" in self.steps:
            self.steps["token_entropy"].append(token_entropy(scaled))
        if "token_self_certainty" in self.steps:
            self.steps["token_self_certainty"].append(self_certainty(scaled))
        if "token_logprob" in self.steps:
            fed = kwargs.get("input_ids", args[0] if args else None)
            if self._previous_logprobs is not None:
                picked = self._previous_logprobs.gather(-1, fed[:, -1:].to(scaled.device)).squeeze(-1)
                self.steps["token_logprob"].append(picked)
            self._previous_logprobs = torch.log_softmax(scaled, dim=-1)

    def per_completion(self, completion_ids: list[list[int]]) -> dict[str, list[torch.Tensor]]:
        """``{signal: [values of completion i]}``, each a float32 CPU tensor of that (EOS-trimmed) completion's
        length."""
        out = {}
        for name, recorded in self.steps.items():
            steps = list(recorded)
            if name == "token_logprob" and self._previous_logprobs is not None:
                # The last sampled token is never fed back: read its log-prob from the completions.
                last = torch.tensor([ids[len(steps)] if len(ids) > len(steps) else 0 for ids in completion_ids])
                device = self._previous_logprobs.device
                steps.append(self._previous_logprobs.gather(-1, last.unsqueeze(-1).to(device)).squeeze(-1))
            stacked = torch.stack(steps, dim=1).float().cpu() if steps else torch.zeros(len(completion_ids), 0)
            out[name] = [stacked[row, : len(ids)].clone() for row, ids in enumerate(completion_ids)]
        return out


# ---- completions ----------------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One generated completion.

    Attributes:
        text: decoded completion, special tokens removed.
        token_ids: generated token ids up to and including the first end-of-sequence token.
        token_entropies: entropy (nats) of the model's next-token distribution at each token of ``token_ids`` (empty
            when generation did not record it).
        token_logprobs: log-probability of each token of ``token_ids`` under that distribution (empty when not
            recorded).
        finished: whether the completion ended with an end-of-sequence token within the token budget; False means
            it was cut off at ``max_new_tokens`` and its final answer may be missing.
    """

    text: str
    token_ids: list[int]
    token_entropies: list[float] = field(default_factory=list)
    finished: bool = True
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def truncated(self) -> bool:
        """Cut off at the token budget before an end-of-sequence token."""
        return not self.finished

    @property
    def mean_entropy(self) -> float:
        """Mean token entropy, NaN for an empty completion (nothing to average)."""
        finite = [h for h in self.token_entropies if math.isfinite(h)]
        return sum(finite) / len(finite) if finite else math.nan

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability of the completion's tokens, NaN for an empty or unrecorded completion."""
        finite = [v for v in self.token_logprobs if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan


def truncation_rate(completions: Sequence[Completion]) -> float:
    """Fraction of ``completions`` cut off at the token budget (NaN for none)."""
    return sum(c.truncated for c in completions) / len(completions) if completions else math.nan


# ---- prompts and end tokens -----------------------------------------------------------------------------------------


def render_prompt(tokenizer, prompt: str | list[dict], apply_chat_template: bool = True) -> str:
    """The text fed to the model: the chat template with a generation prompt when asked for and available (a string
    becomes one user message), else the string itself or the messages' contents joined by newlines.

    :class:`Decoder` follows TRL's dataset convention instead: a string prompt is text already (used as is), a list of
    messages goes through ``render_prompt(tokenizer, messages)``."""
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "\n".join(message["content"] for message in prompt)


def end_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and every EOS of ``model.generation_config``, the rule of
    TRL 1.16's ``GRPOTrainer`` (``self.eos_token_ids``), so that evaluation ends a completion where training does. A
    chat model whose generation config still names the base model's EOS ends its turn with the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [*ids, *(int(e) for e in configured if e not in ids)]


def _trim_at_end(token_ids: list[int], end_ids: set[int]) -> list[int]:
    """The completion up to and including its first end token."""
    for position, token in enumerate(token_ids):
        if token in end_ids:
            return token_ids[: position + 1]
    return token_ids


# ---- the loop -------------------------------------------------------------------------------------------------------


class _TokenProgress(BaseStreamer):
    """A ``generate`` streamer that moves a tqdm bar in token slots: each completion's budget, consumed one slot per
    generated token, and all at once for the unused rest when the completion ends (those slots need no decoding).
    The bar's total is completions x budget, so its rate and ETA are about the work left."""

    def __init__(self, bar, end_ids: list[int]):
        self.bar, self.end_ids = bar, torch.tensor(end_ids, dtype=torch.long)
        self.done: torch.Tensor | None = None
        self.steps = self.step = 0
        self.generated = self.ended = 0

    def start(self, rows: int, steps: int) -> None:
        self.done, self.steps, self.step = torch.zeros(rows, dtype=torch.bool), steps, -1

    def put(self, value: torch.Tensor) -> None:
        self.step += 1
        if self.step == 0:  # generate pushes its input first
            return
        active = ~self.done
        ended = active & torch.isin(value.reshape(-1).cpu(), self.end_ids)
        self.done |= ended
        count, finished = int(active.sum()), int(ended.sum())
        self.generated += count
        self.ended += finished
        self.bar.update(count + finished * (self.steps - self.step))

    def end(self) -> None:
        self.bar.set_postfix_str(f"{self.generated} generated", refresh=False)


@dataclass
class _Group:
    """Rows decoded together: their left-padded ids so far (prompt, then generated tokens), the attention mask, and
    the KV cache of all but the last id (None before the first segment, or for a model that returns none)."""

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: Any
    generated: int


def _plain_layers(cache) -> list | None:
    """The cache's per-layer stores when every one is a plain full-attention ``DynamicLayer`` (keys and values
    ``[B, heads, T, head_dim]``), the only kind that rows of different lengths can be merged in by left-padding; else
    None."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" or layer.keys is None for layer in layers):
        return None
    return layers


def _cache_output_name() -> str:
    """Where ``generate`` takes and returns a cache: ``cache`` in transformers >= 5, ``past_key_values`` before."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


class Decoder:
    """Decodes one completion per prompt in left-padded batches and extends the ones cut off at a budget to a longer
    budget, each token decoded once.

    ``extend_to(budget)`` returns every completion at ``budget`` tokens. Called again with a larger budget, it resumes
    only the completions that were cut off, each from its KV cache (from prompt + partial completion where the model
    returns no cache), and records entropies and log-probabilities for the new tokens only. Greedy decoding gives the
    tokens of one decoding at the larger budget from the start (the same computation, continued; a row's arithmetic
    can differ in the last bits where rows are merged or dropped, so a near-tie between two tokens could in principle
    flip: the tests and ``benchmarks/bench_eval_speed.py`` compare the tokens). Sampling gives a draw from the same
    distribution as one decoding at the larger budget, but not the same draw: the random stream is consumed in another
    order.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompts: one per row: a string (fed as is, as TRL feeds a standard dataset's prompt) or a list of chat
            messages (:func:`render_prompt`).
        prefixes: optional partial completion (token ids) per row, continued from prompt + prefix; its tokens count
            in the budget. Rows with a prefix have no recorded values for it.
        batch_size: rows per ``generate`` call, ``>= 1``.
        do_sample: sample (else greedy).
        temperature, top_k, top_p: sampling settings passed to ``generate`` (None: the model's generation config).
        logits_processors: extra ``LogitsProcessor`` objects (EM-INF, adaptive temperature).
        record: record each new token's entropy and log-probability at ``entropy_temperature``
            (:class:`GenerationEntropyRecorder`).
        entropy_temperature: ``T`` of the recorded ``H(softmax(z / T))``, ``> 0``.
        seed: ``torch.manual_seed`` before the first token; None leaves the RNG alone.
        add_special_tokens: passed to the tokenizer (False for text rendered by a chat template).
        segment_tokens: most tokens decoded per ``generate`` call; between calls, rows that ended are dropped and the
            rest merged into full batches. None: one call per batch and budget (``generate``'s own behaviour).
        progress: show a tqdm bar in tokens (see :class:`_TokenProgress`).
        desc: the bar's label.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompts: Sequence[str | list[dict]],
        prefixes: Sequence[Sequence[int]] | None = None,
        *,
        batch_size: int = 32,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        logits_processors: Sequence = (),
        record: bool = False,
        entropy_temperature: float = 1.0,
        seed: int | None = None,
        add_special_tokens: bool = False,
        segment_tokens: int | None = 32,
        progress: bool = True,
        desc: str = "decoding",
    ):
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
        if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"`temperature` must be a finite number > 0, got {temperature}.")
        if not (entropy_temperature > 0 and math.isfinite(entropy_temperature)):
            raise ValueError(f"`entropy_temperature` must be a finite number > 0, got {entropy_temperature}.")
        if segment_tokens is not None and not (isinstance(segment_tokens, int) and segment_tokens >= 1):
            raise ValueError(f"`segment_tokens` must be None or an integer >= 1, got {segment_tokens!r}.")
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"`prefixes` must have one entry per prompt, got {len(prefixes)} for {len(prompts)}.")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.segment_tokens = batch_size, segment_tokens
        self.record, self.entropy_temperature = record, entropy_temperature
        self.progress, self.desc = progress, desc
        self.end_ids = end_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.end_ids[0] if self.end_ids else 0)
        sampling = {"do_sample": do_sample}
        if do_sample:
            settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
            sampling.update({k: v for k, v in settings.items() if v is not None})
        self.generate_kwargs = sampling
        self.logits_processors = list(logits_processors)
        texts = [p if isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
        encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []
        prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in texts]
        self.tokens: list[list[int]] = prefixes
        self.values: list[dict[str, list[float]]] = [{name: [] for name in RECORDED_SIGNALS} for _ in texts]
        self.finished = [bool(p) and p[-1] in self.end_ids for p in prefixes]
        self.budget = 0
        self._groups: list[_Group] = []
        # Rows start in batches of equal prefix length (a group's rows advance together), in their order.
        by_length: dict[int, list[int]] = {}
        for row, prefix in enumerate(prefixes):
            if not self.finished[row]:
                by_length.setdefault(len(prefix), []).append(row)
        for length, rows in by_length.items():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                self._groups.append(self._new_group(chunk, [encoded[r] + prefixes[r] for r in chunk], length))
        if seed is not None:
            torch.manual_seed(seed)

    def _new_group(self, rows: list[int], ids: list[list[int]], generated: int) -> _Group:
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([[self.pad_id] * (width - len(i)) + i for i in ids], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], dtype=torch.long)
        return _Group(rows, input_ids, mask, None, generated)

    # ---- public -------------------------------------------------------------------------------------------------
    def completions(self) -> list[Completion]:
        """Every completion as decoded so far, in prompt order (new objects: later extensions leave them as they
        are)."""
        return [
            Completion(
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=list(ids),
                token_entropies=list(values["token_entropy"]),
                finished=finished,
                token_logprobs=list(values["token_logprob"]),
            )
            for ids, values, finished in zip(self.tokens, self.values, self.finished)
        ]

    @torch.no_grad()
    def extend_to(self, max_new_tokens: int) -> list[Completion]:
        """Decode every completion cut off so far up to ``max_new_tokens`` tokens (``>=`` the previous budget) and
        return all completions at that budget (:meth:`completions`)."""
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}.")
        if max_new_tokens < self.budget:
            raise ValueError(
                f"`max_new_tokens` must be >= the budget already decoded ({self.budget}), got {max_new_tokens}."
            )
        self.budget = max_new_tokens
        pending = [g for g in self._groups if g.generated < max_new_tokens]
        slots = sum(len(g.rows) * (max_new_tokens - g.generated) for g in pending)
        model = self.model
        was_training = model.training
        model.eval()
        bar = tqdm(total=slots, desc=self.desc, unit="tok", disable=not self.progress or slots == 0, leave=False)
        streamer = _TokenProgress(bar, self.end_ids) if self.progress else None
        try:
            while pending:
                # The least advanced group first: every row passes a segment boundary before any goes further.
                group = min(pending, key=lambda g: (g.generated, g.rows[0]))
                steps = max_new_tokens - group.generated
                if self.segment_tokens is not None:
                    steps = min(steps, self.segment_tokens)
                self._decode(group, steps, streamer)
                self._groups = self._merged([g for g in self._groups if g.rows])
                pending = [g for g in self._groups if g.generated < max_new_tokens]
        finally:
            bar.close()
            model.train(was_training)
        return self.completions()

    # ---- internals ----------------------------------------------------------------------------------------------
    def _decode(self, group: _Group, steps: int, streamer: _TokenProgress | None) -> None:
        """Decode ``steps`` more tokens for the rows of ``group``, then keep in it only the rows that did not end."""
        model = self.model
        device = next(model.parameters()).device
        cache_name = _cache_output_name()
        kwargs = dict(self.generate_kwargs)
        if group.cache is not None:
            kwargs[cache_name] = group.cache
        if streamer is not None:
            streamer.start(len(group.rows), steps)
            kwargs["streamer"] = streamer
        recorder = GenerationEntropyRecorder(model, self.entropy_temperature, RECORDED_SIGNALS if self.record else ())
        width = group.input_ids.size(1)
        with recorder:
            out = model.generate(
                input_ids=group.input_ids.to(device),
                attention_mask=group.attention_mask.to(device),
                max_new_tokens=steps,
                pad_token_id=self.pad_id,
                eos_token_id=self.end_ids or None,
                logits_processor=LogitsProcessorList(self.logits_processors),
                return_dict_in_generate=True,
                use_cache=True,
                **kwargs,
            )
        new = out.sequences[:, width:].tolist()
        end_ids = set(self.end_ids)
        trimmed = [_trim_at_end(ids, end_ids) for ids in new]
        values = recorder.per_completion(trimmed) if self.record else {}
        keep = []
        for position, (row, ids) in enumerate(zip(group.rows, trimmed)):
            self.tokens[row].extend(ids)
            for name, per_row in values.items():
                self.values[row][name].extend(per_row[position].tolist())
            self.finished[row] = bool(ids) and ids[-1] in end_ids
            if not self.finished[row]:
                keep.append(position)
        taken = len(new[0]) if new else 0
        cache = getattr(out, cache_name, None)
        if cache is not None and keep and len(keep) < len(group.rows):
            try:
                cache.batch_select_indices(torch.tensor(keep, device=device))
            except (AttributeError, NotImplementedError):  # a cache that cannot drop rows: resume from the ids
                cache = None
        mask = torch.cat([group.attention_mask, torch.ones(len(group.rows), taken, dtype=torch.long)], dim=1)
        group.rows = [group.rows[p] for p in keep]
        group.input_ids = out.sequences[keep].cpu() if keep else out.sequences[:0].cpu()
        group.attention_mask = mask[keep]
        group.cache = cache if keep else None
        group.generated += taken

    def _merged(self, groups: list[_Group]) -> list[_Group]:
        """Merge groups that have decoded the same number of tokens into groups of up to ``batch_size`` rows
        (left-padding the shorter ids, mask and cache), when their caches allow it."""
        if self.segment_tokens is None:
            return groups
        out: list[_Group] = []
        by_generated: dict[int, list[_Group]] = {}
        for group in groups:
            by_generated.setdefault(group.generated, []).append(group)
        for same in by_generated.values():
            mergeable = [g for g in same if len(g.rows) < self.batch_size and _plain_layers(g.cache) is not None]
            out.extend(g for g in same if g not in mergeable)
            current: list[_Group] = []
            for group in mergeable:
                if current and sum(len(g.rows) for g in current) + len(group.rows) > self.batch_size:
                    out.append(_concatenate(current, self.pad_id))
                    current = []
                current.append(group)
            if current:
                out.append(_concatenate(current, self.pad_id))
        return out


def _concatenate(groups: list[_Group], pad_id: int) -> _Group:
    """One group of the rows of ``groups`` (same number of generated tokens), left-padded to the longest."""
    if len(groups) == 1:
        return groups[0]
    width = max(g.input_ids.size(1) for g in groups)
    ids, masks, keys, values = [], [], [], []
    for group in groups:
        pad = width - group.input_ids.size(1)
        rows = len(group.rows)
        ids.append(torch.cat([torch.full((rows, pad), pad_id, dtype=torch.long), group.input_ids], dim=1))
        masks.append(torch.cat([torch.zeros(rows, pad, dtype=torch.long), group.attention_mask], dim=1))
        layers = _plain_layers(group.cache)
        # Padded cache positions are masked out: their keys never receive attention weight.
        keys.append([torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)) for layer in layers])
        values.append([torch.nn.functional.pad(layer.values, (0, 0, pad, 0)) for layer in layers])
    cache = groups[0].cache
    for index, layer in enumerate(_plain_layers(cache)):
        layer.keys = torch.cat([k[index] for k in keys], dim=0)
        layer.values = torch.cat([v[index] for v in values], dim=0)
    rows = [row for group in groups for row in group.rows]
    return _Group(rows, torch.cat(ids), torch.cat(masks), cache, groups[0].generated)
