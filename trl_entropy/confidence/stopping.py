"""Online recording and stopping inside ``model.generate``: :class:`TokenConfidenceRecorder` (the model's own
distribution at each step) and :class:`EntropyEarlyStopping` (a ``StoppingCriteria``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .signals import ConfidenceSignal

__all__ = ["TokenConfidenceRecorder", "EntropyEarlyStopping", "delimiter_token_ids"]


class TokenConfidenceRecorder(LogitsProcessor):
    """Records a :class:`ConfidenceSignal` of each decoding step's logits; leaves the logits unchanged.

    The papers measure the model's own distribution. transformers hands a logits processor the scores *after* its
    built-in modifiers (``repetition_penalty``, ``no_repeat_ngram_size``, ``min_length``, suppressed tokens...), so
    inside ``with recorder.watch(model):`` the recorder reads each step's raw logits from the model's forward output
    instead, whatever the generation settings (custom processors also run before the sampling warpers, so
    temperature, top-k and top-p never reach it either). Outside ``watch`` it records the scores it is handed.

    A new ``generate`` call is detected when the input is not the previous step's input plus one token; a prompt that
    is exactly the previous call's whole output therefore resumes the statistics. Call :meth:`reset` to start fresh.
    Beam search (which reorders rows) is not supported.
    """

    def __init__(self, signal: ConfidenceSignal | None = None):
        self.signal = signal or ConfidenceSignal()
        self.generation_index = 0
        self._raw_logits: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []
        self.prompt_length: int | None = None
        self._last_input: torch.Tensor | None = None
        self.generation_index += 1

    @contextmanager
    def watch(self, model: torch.nn.Module) -> Iterator[TokenConfidenceRecorder]:
        """Record the raw logits of ``model`` (a causal LM whose output has ``.logits``) while the block runs::

        with recorder.watch(model):
            model.generate(**inputs, logits_processor=[recorder])
        """

        def keep_last_logits(module, args, output) -> None:
            logits = getattr(output, "logits", None)
            if logits is not None:
                self._raw_logits = logits[:, -1, :]

        handle = model.register_forward_hook(keep_last_logits)
        try:
            yield self
        finally:
            handle.remove()
            self._raw_logits = None

    @property
    def num_steps(self) -> int:
        return len(self.values)

    def continues(self, input_ids: torch.Tensor) -> bool:
        """Whether ``input_ids`` is the last recorded input with one more token."""
        last = self._last_input
        return (
            last is not None
            and input_ids.shape == (last.size(0), last.size(1) + 1)
            and torch.equal(input_ids[:, :-1], last)
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.continues(input_ids):
            self.reset()
            self.prompt_length = input_ids.size(1)
        self._last_input = input_ids
        raw, self._raw_logits = self._raw_logits, None  # consumed: a stale step never serves the next one
        logits = raw if raw is not None and raw.shape == scores.shape else scores
        self.values.append(self.signal(logits).float())
        return scores

    def token_values(self) -> torch.Tensor:
        """``[batch, steps]`` signal of every recorded step (including steps of rows that already ended)."""
        if not self.values:
            return torch.empty(0, 0)
        return torch.stack(self.values, dim=1)


_REASONS = ("", "confident", "low_confidence", "delimiter", "eos", "length")


class EntropyEarlyStopping(StoppingCriteria):
    """Stops generation of each row whose confidence passes a threshold (Think Just Enough / DeepConf).

    Pass both parts to ``generate``::

        stopper = EntropyEarlyStopping(calibrator.threshold(), check_at="delimiter", delimiter="\\n\\n", tokenizer=tok)
        with stopper.recorder.watch(model):  # the model's own distribution, before repetition penalties etc.
            model.generate(**inputs, logits_processor=[stopper.recorder], stopping_criteria=[stopper])

    ``generate`` hands stopping criteria the *processed* scores, and only with ``output_scores=True``; the companion
    :attr:`recorder` reads each step's logits before temperature/top-k/top-p instead. Without it, the criterion falls
    back to ``scores`` when they are passed (then post-warper values, with a warning), else raises.

    Modes:
        * ``"entropy"`` (Think Just Enough): the row's running mean signal over all its generated tokens; stop when it
          is ``<= threshold`` (confident: answer now).
        * ``"deepconf"`` (DeepConf online): the mean signal over the row's last ``window`` tokens (all of them while
          fewer); stop when it is ``< threshold`` (unconfident: abandon the trace). Use a ``topk_confidence`` signal.

    A row is checked once it has generated ``min_new_tokens`` tokens, at every token (``check_at="token"``) or only
    at step delimiters (``"delimiter"``): tokens in ``delimiter_token_ids``, or tokens that complete the text
    ``delimiter`` (decoded with ``tokenizer``, so a ``"\\n\\n"`` generated as two ``"\\n"`` tokens counts). With
    ``stop_at_delimiter`` every row also stops at its first delimiter after ``min_new_tokens`` (the first reasoning
    step of the two-stage pipeline). A NaN signal never triggers a stop.

    After ``generate``, :attr:`num_tokens` holds each row's generated length (the token that ended it included),
    :attr:`stop_reasons` why it ended (``"confident"``, ``"low_confidence"``, ``"delimiter"``, ``"eos"``,
    ``"length"`` for ``max_tokens_per_row``, ``None`` if it ran to ``max_new_tokens``) and :meth:`sequence_signal`
    its mean signal. The counts are exact when no other criterion ends rows early.

    Args:
        threshold: stop threshold in the signal's unit; ``None`` never stops on confidence.
        mode: ``"entropy"`` or ``"deepconf"``.
        signal: the per-token signal; default top-20 entropy in bits (``"entropy"``) or DeepConf confidence.
        recorder: share an existing recorder (its signal wins over ``signal``).
        min_new_tokens: tokens a row generates before any check, >= 1.
        check_at: ``"token"`` or ``"delimiter"``.
        delimiter_token_ids: token ids that end a reasoning step; see :func:`delimiter_token_ids`.
        delimiter: text that ends a reasoning step, e.g. ``"\\n\\n"``; needs ``tokenizer``.
        tokenizer: decodes the newest tokens to find ``delimiter``.
        stop_at_delimiter: stop every row at its first delimiter.
        window: DeepConf window length, >= 1 (the paper uses 2048).
        eos_token_id: id(s) that end a row (so its length and statistics stop there).
        max_tokens_per_row: optional per-row cap on generated tokens (the token-budget mode uses it).
    """

    def __init__(
        self,
        threshold: float | None = None,
        *,
        mode: Literal["entropy", "deepconf"] = "entropy",
        signal: ConfidenceSignal | None = None,
        recorder: TokenConfidenceRecorder | None = None,
        min_new_tokens: int = 1,
        check_at: Literal["token", "delimiter"] = "token",
        delimiter_token_ids: Sequence[int] = (),
        delimiter: str | None = None,
        tokenizer=None,
        stop_at_delimiter: bool = False,
        window: int = 2048,
        eos_token_id: int | Sequence[int] | None = None,
        max_tokens_per_row: Sequence[int] | None = None,
    ):
        if mode not in ("entropy", "deepconf"):
            raise ValueError(f"`mode` must be 'entropy' or 'deepconf', got {mode!r}.")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"`threshold` must be a finite number or None, got {threshold}.")
        if not (isinstance(min_new_tokens, int) and min_new_tokens >= 1):
            raise ValueError(f"`min_new_tokens` must be an integer >= 1, got {min_new_tokens!r}.")
        if check_at not in ("token", "delimiter"):
            raise ValueError(f"`check_at` must be 'token' or 'delimiter', got {check_at!r}.")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"`window` must be an integer >= 1, got {window!r}.")
        delimiter_token_ids = [int(i) for i in delimiter_token_ids]
        if delimiter is not None and (not delimiter or tokenizer is None):
            raise ValueError("`delimiter` must be a non-empty string and needs `tokenizer` to decode tokens.")
        if (check_at == "delimiter" or stop_at_delimiter) and not (delimiter_token_ids or delimiter):
            raise ValueError(
                "Give `delimiter_token_ids` or `delimiter` (with `tokenizer`) with check_at='delimiter' or "
                "stop_at_delimiter."
            )
        if recorder is None:
            default = ConfidenceSignal("topk_confidence") if mode == "deepconf" else ConfidenceSignal()
            recorder = TokenConfidenceRecorder(signal or default)
        if recorder.signal.higher_is_confident != (mode == "deepconf"):
            raise ValueError(
                f"mode={mode!r} needs {'a topk_confidence' if mode == 'deepconf' else 'an entropy'} signal, got "
                f"kind={recorder.signal.kind!r}."
            )
        if max_tokens_per_row is not None and any(int(n) < 1 for n in max_tokens_per_row):
            raise ValueError("`max_tokens_per_row` entries must be >= 1.")
        self.threshold = threshold
        self.mode = mode
        self.recorder = recorder
        self.min_new_tokens = min_new_tokens
        self.check_at = check_at
        self.delimiter_token_ids = delimiter_token_ids
        self.delimiter = delimiter
        self.tokenizer = tokenizer
        self.stop_at_delimiter = stop_at_delimiter
        self.window = window
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = [int(i) for i in eos]
        self.max_tokens_per_row = None if max_tokens_per_row is None else [int(n) for n in max_tokens_per_row]
        self._generation_index = -1
        self._warned_scores = False
        self._init_state(0, torch.device("cpu"))

    def _init_state(self, batch_size: int, device: torch.device) -> None:
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.num_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._reason = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._stop_value = torch.full((batch_size,), float("nan"), dtype=torch.float64, device=device)
        # Cumulative sums of the signal per step, float64 so long generations do not drift.
        self._cumsum = [torch.zeros(batch_size, dtype=torch.float64, device=device)]

    def _completes_delimiter(self, input_ids: torch.LongTensor, active: torch.Tensor, step: int) -> torch.Tensor:
        """Rows whose newest token completes one more occurrence of ``delimiter`` in the generated text."""
        # Enough trailing tokens to hold the delimiter even if every token carries a single character.
        width = min(step, len(self.delimiter) + 1)
        rows = active.nonzero().flatten().tolist()
        tails = input_ids[rows, input_ids.size(1) - width :].tolist()
        texts = self.tokenizer.batch_decode([t for tail in tails for t in (tail, tail[:-1])])
        hits = torch.zeros_like(active)
        for k, row in enumerate(rows):
            hits[row] = texts[2 * k].count(self.delimiter) > texts[2 * k + 1].count(self.delimiter)
        return hits

    @property
    def stop_reasons(self) -> list[str | None]:
        return [_REASONS[r] or None for r in self._reason.tolist()]

    @property
    def stop_values(self) -> torch.Tensor:
        """The statistic (running mean or window mean) at which each row was stopped on confidence, else NaN."""
        return self._stop_value.clone()

    def sequence_signal(self) -> torch.Tensor:
        """Mean signal over each row's generated tokens, float64 ``[batch]`` (NaN for a row with none)."""
        count = self.num_tokens
        sums = torch.stack(self._cumsum, dim=1).gather(1, count.unsqueeze(1)).squeeze(1)
        return torch.where(count > 0, sums / count.clamp_min(1), torch.full_like(sums, float("nan")))

    def token_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [batch, steps], mask [batch, steps])``: the recorded signal and which steps belong to each row."""
        values = self.recorder.token_values()
        steps = torch.arange(values.size(1), device=self.num_tokens.device)
        return values, steps.unsqueeze(0) < self.num_tokens.unsqueeze(1)

    def _record_from_scores(self, input_ids: torch.LongTensor, scores: tuple[torch.Tensor] | None) -> None:
        if scores is None:
            raise RuntimeError(
                "EntropyEarlyStopping has no logits for this step: pass its recorder to generate, "
                "`logits_processor=[stopper.recorder]` (or `output_scores=True, return_dict_in_generate=True`)."
            )
        if not self._warned_scores:
            warnings.warn(
                "EntropyEarlyStopping reads `scores`, which transformers passes after temperature/top-k/top-p; pass "
                "`logits_processor=[stopper.recorder]` to measure the model's own distribution.",
                stacklevel=3,
            )
            self._warned_scores = True
        self.recorder(input_ids[:, :-1], scores[-1])

    def __call__(self, input_ids: torch.LongTensor, scores: tuple[torch.Tensor] | None, **kwargs) -> torch.BoolTensor:
        recorder = self.recorder
        last = recorder._last_input
        if last is None or last.shape != input_ids[:, :-1].shape or not torch.equal(last, input_ids[:, :-1]):
            # The recorder did not see this step's logits: it is not in `logits_processor`.
            self._record_from_scores(input_ids, scores)
        if recorder.generation_index != self._generation_index:
            self._generation_index = recorder.generation_index
            if self.max_tokens_per_row is not None and len(self.max_tokens_per_row) != input_ids.size(0):
                raise ValueError(
                    f"`max_tokens_per_row` has {len(self.max_tokens_per_row)} entries for {input_ids.size(0)} rows."
                )
            self._init_state(input_ids.size(0), input_ids.device)
        step = recorder.num_steps  # the newest token is the step-th generated one
        value = recorder.values[-1].to(device=input_ids.device, dtype=torch.float64)
        self._cumsum.append(self._cumsum[-1] + value)
        active = ~self.done
        self.num_tokens += active.long()
        token = input_ids[:, -1]
        is_eos = torch.isin(token, torch.tensor(self.eos_token_ids, device=token.device))
        is_delim = torch.isin(token, torch.tensor(self.delimiter_token_ids, device=token.device))
        if self.delimiter is not None:
            is_delim = is_delim | self._completes_delimiter(input_ids, active, step)
        eligible = active & ~is_eos & (step >= self.min_new_tokens)
        check = eligible & is_delim if self.check_at == "delimiter" else eligible

        stop = torch.zeros_like(active)
        if self.threshold is not None:
            # An active row has been active at every step, so its statistics are those of the last steps.
            if self.mode == "entropy":
                statistic = self._cumsum[-1] / step
                stop = check & (statistic <= self.threshold)
            else:
                width = min(self.window, step)
                statistic = (self._cumsum[-1] - self._cumsum[-1 - width]) / width
                stop = check & (statistic < self.threshold)
            self._stop_value = torch.where(stop, statistic, self._stop_value)
            self._reason[stop] = _REASONS.index("confident" if self.mode == "entropy" else "low_confidence")
        if self.stop_at_delimiter:
            at_step_end = eligible & is_delim & ~stop
            self._reason[at_step_end] = _REASONS.index("delimiter")
            stop = stop | at_step_end
        ended = active & is_eos
        self._reason[ended] = _REASONS.index("eos")
        if self.max_tokens_per_row is not None:
            limit = torch.tensor(self.max_tokens_per_row, device=token.device)
            capped = active & ~stop & ~ended & (self.num_tokens >= limit)
            self._reason[capped] = _REASONS.index("length")
            ended = ended | capped
        self.done |= stop | ended
        return self.done.clone()


def delimiter_token_ids(tokenizer, delimiter: str = "\n\n") -> list[int]:
    """Ids of every vocabulary token whose text contains ``delimiter`` (e.g. ``"\\n\\n"``, ``".\\n\\n"``).

    A delimiter split over two tokens (``"\\n"`` then ``"\\n"``) is not caught by ids; pass the text as
    ``EntropyEarlyStopping(delimiter=..., tokenizer=...)`` to catch it (SmolLM2 often emits two ``"\\n"``).
    """
    if not delimiter:
        raise ValueError("`delimiter` must be a non-empty string.")
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return [i for i, text in enumerate(texts) if delimiter in text]
