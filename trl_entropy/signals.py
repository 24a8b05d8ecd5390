"""Per-token confidence signals of one generation batch, for reward functions and callbacks.

TRL's reward functions never see the policy's distribution. The trainers of this package (``EntropyGRPOTrainer``,
``EntropyRLOOTrainer``, ``EMFTTrainer``) fill one :class:`CompletionSignals` per generation batch, on every rank, from
the cheapest exact source: the logits generation already computes (``"generation"``), TRL's own old-log-probs pass
over the completions (``"old_logps"``), or, for generators that return no logits (vLLM, tools, a ``rollout_func``),
one chunked policy forward (``"forward"``). Only the signals someone asked for are computed; when nobody asks, nothing
is.

Reward functions ask by declaring the signals as parameters, and receive one 1-D tensor per completion, aligned
with that completion's ``completion_ids``:

```python
def confident(completions, completion_ids, token_entropy, token_mask, **kwargs):
    return [-h[m].mean().item() if m.any() else None for h, m in zip(token_entropy, token_mask)]
```

Callbacks (observers) ask through the trainer's callback list: any callback that defines
``on_signals(self, signals: CompletionSignals, trainer) -> None`` and a ``requested_signals`` attribute (a tuple of
names from :data:`SIGNAL_NAMES`) is called by the trainer once per generation batch, on every rank, right after the
signals are filled and before the rewards are computed. ``trainer`` is the trainer itself, so a callback needs no
other way to find it. Observers are read from ``trainer.callback_handler.callbacks`` at every batch, so callbacks
passed to the constructor and those added with ``add_callback`` both count.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

SIGNAL_NAMES = ("token_entropy", "token_logprob", "token_self_certainty")
"""Signals a reward function or an observer can ask for (all at the sampling temperature, in nats)."""

MASK_NAME = "token_mask"
"""Always available, never computed: True on the tokens the policy generated, False on tool/environment tokens."""

SIGNAL_SOURCES = ("generation", "old_logps", "forward")

__all__ = [
    "SignalSource",
    "MASK_NAME",
    "SIGNAL_NAMES",
    "SIGNAL_SOURCES",
    "CompletionSignals",
    "declared_signals",
    "signal_observers",
]


@dataclass
class CompletionSignals:
    """Per-token signals of the completions of one generation batch on one rank, in the order of ``completion_ids``.

    Every per-token list holds one 1-D CPU tensor per completion, of that completion's length (one value per token of
    ``completion_ids``, tool/environment tokens included; ``token_mask`` says which tokens the policy generated).

    Parameters:
        completion_ids (`list[list[int]]`):
            The completions' token ids, as TRL passes them to reward functions.
        token_mask (`list[torch.Tensor]`):
            Bool, False on tool-result tokens (TRL's ``tool_mask``) and environment tokens (a ``rollout_func``'s
            ``env_mask``): the tokens the policy did not generate and that no confidence signal should score.
        token_entropy (`list[torch.Tensor]` or `None`):
            Float32 entropy ``H_t`` of ``softmax(logits / T)`` at each completion position, in nats, with ``T`` the
            sampling temperature (Agarwal et al., 2025, arXiv 2505.15134). None when nobody asked for it.
        token_logprob (`list[torch.Tensor]` or `None`):
            Float32 log-probability of the sampled token under ``softmax(logits / T)``.
        token_self_certainty (`list[torch.Tensor]` or `None`):
            Float32 self-certainty ``KL(U || softmax(logits / T))`` per position (Zhao et al., 2025, "Learning to
            Reason without External Rewards", arXiv 2505.19590).
        source (`str`):
            Where the values come from: ``"generation"`` (the decoding steps' logits), ``"old_logps"`` (TRL's pass
            over the completions before the rewards) or ``"forward"`` (one extra chunked policy forward).

    A position whose logits hold NaN or inf has a non-finite value; reward functions should treat it as unscorable
    (the built-in rewards return None for such a completion).
    """

    completion_ids: list[list[int]]
    token_mask: list[torch.Tensor]
    token_entropy: list[torch.Tensor] | None = None
    token_logprob: list[torch.Tensor] | None = None
    token_self_certainty: list[torch.Tensor] | None = None
    source: str = "generation"

    def __post_init__(self):
        if self.source not in SIGNAL_SOURCES:
            raise ValueError(f"`source` must be one of {list(SIGNAL_SOURCES)}, got {self.source!r}.")
        lengths = [len(ids) for ids in self.completion_ids]
        for name in (MASK_NAME, *SIGNAL_NAMES):
            values = getattr(self, name)
            if values is None:
                continue
            if [int(v.numel()) for v in values] != lengths:
                raise ValueError(f"`{name}` must hold one value per completion token, lengths {lengths}.")

    def available(self) -> tuple[str, ...]:
        """Names of the signals that were computed, plus ``token_mask``."""
        return (MASK_NAME, *(name for name in SIGNAL_NAMES if getattr(self, name) is not None))

    def padded(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [B, L], mask [B, L])`` of signal ``name``, right-padded with 0; ``mask`` is ``token_mask``
        (False on padding)."""
        values = getattr(self, name)
        if values is None:
            raise ValueError(f"The signal {name!r} was not computed for this batch (available: {self.available()}).")
        width = max([len(ids) for ids in self.completion_ids] + [0])
        out = torch.zeros(len(values), width, dtype=torch.float32 if name != MASK_NAME else torch.bool)
        mask = torch.zeros(len(values), width, dtype=torch.bool)
        for row, (value, keep) in enumerate(zip(values, self.token_mask)):
            out[row, : value.numel()] = value
            mask[row, : keep.numel()] = keep
        return out, mask


class SignalSource:
    """Base of the trainers that fill :class:`CompletionSignals` for the callbacks that ask for them.

    :class:`~trl_entropy.callbacks.EntropyStatsCallback` checks for it instead of importing the trainers, so that the
    callbacks wing does not depend on the trainers wing (which depends on it).
    """


def declared_signals(func: Callable) -> tuple[str, ...]:
    """The signals (names from :data:`SIGNAL_NAMES` plus ``token_mask``) that ``func`` declares as parameters.

    A parameter counts when it is named explicitly (positional-or-keyword or keyword-only); ``**kwargs`` alone asks
    for nothing, so a reward function that declares no signal costs nothing. Objects that are not Python callables
    with a signature (e.g. a reward model, an ``nn.Module``) declare nothing.
    """
    if isinstance(func, torch.nn.Module):
        return ()
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return ()
    named = {
        name
        for name, parameter in parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return tuple(name for name in (*SIGNAL_NAMES, MASK_NAME) if name in named)


def signal_observers(callbacks: Iterable[Any]) -> list[Any]:
    """The callbacks that observe signals: those defining a callable ``on_signals`` and a ``requested_signals``."""
    observers = []
    for callback in callbacks:
        if callable(getattr(callback, "on_signals", None)) and hasattr(callback, "requested_signals"):
            requested = tuple(callback.requested_signals)
            unknown = sorted(set(requested) - set(SIGNAL_NAMES) - {MASK_NAME})
            if unknown:
                raise ValueError(
                    f"{type(callback).__name__}.requested_signals has unknown names {unknown}; allowed: "
                    f"{[*SIGNAL_NAMES, MASK_NAME]}."
                )
            observers.append(callback)
    return observers
