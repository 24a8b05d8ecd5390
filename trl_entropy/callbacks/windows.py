"""The per-window state of :class:`~trl_entropy.callbacks.EntropyStatsCallback`: what one logging window of one rank
accumulates (the exact entropy distribution, the forking tokens, the n-gram repetition counters) and how the windows of
all ranks merge, so that what is logged is exact over the whole run, not an average of per-rank summaries."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..distribution import EntropyDistribution, TokenEntropyCounter, merge_distributions, merge_token_counters
from ..ops import high_entropy_mask

__all__ = ["merge_window_states", "repeated_ngram_counts"]

# ---- pure helpers ---------------------------------------------------------------------------------------------------
_HASH_PRIME_A, _HASH_BASE_A = 2_147_483_647, 1_000_003
_HASH_PRIME_B, _HASH_BASE_B = 2_147_483_629, 911_382_323


@torch.no_grad()
def repeated_ngram_counts(token_ids: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeated and total n-grams within each row of ``token_ids`` ``[B, T]``, summed over rows.

    An n-gram counts when all its tokens are under ``mask``; it is repeated when the same n-gram already occurred
    earlier in the same row, so ``repeated / total = 1 - distinct / total`` (the rep-n of Welleck et al., 2020).
    Returns two 0-dim int64 tensors on the input device, without a host synchronisation. N-grams are compared
    through two independent 31-bit polynomial hashes (collision probability about 2^-62 per pair).
    """
    if token_ids.dim() != 2 or mask.shape != token_ids.shape:
        raise ValueError(
            f"`token_ids` must be [B, T] and `mask` of the same shape, got {tuple(token_ids.shape)} and "
            f"{tuple(mask.shape)}."
        )
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
    zero = torch.zeros((), dtype=torch.int64, device=token_ids.device)
    if token_ids.shape[1] < n or token_ids.numel() == 0:
        return zero, zero.clone()
    windows = token_ids.long().unfold(1, n, 1)  # [B, T - n + 1, n]
    valid = mask.bool().unfold(1, n, 1).all(dim=-1)
    hash_a = torch.zeros(windows.shape[:2], dtype=torch.int64, device=token_ids.device)
    hash_b = torch.zeros_like(hash_a)
    for j in range(n):
        token = windows[..., j]
        hash_a = (hash_a * _HASH_BASE_A + token % _HASH_PRIME_A) % _HASH_PRIME_A
        hash_b = (hash_b * _HASH_BASE_B + token % _HASH_PRIME_B) % _HASH_PRIME_B
    keys = torch.where(valid, hash_a * 2**31 + hash_b, torch.full_like(hash_a, -1))  # invalid n-grams sort first
    ordered = keys.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    return repeated.sum(), valid.sum()


# ---- per-window state -----------------------------------------------------------------------------------------------
class _EntropyWindow:
    """Everything observed since the last logging step on one rank (device tensors until read)."""

    def __init__(self, vocab_size: int, bins: int):
        self.vocab_size = vocab_size
        self.distribution = EntropyDistribution(math.log(vocab_size), bins=bins)
        self.tokens = TokenEntropyCounter(vocab_size)
        self.reset()

    def reset(self) -> None:
        self.distribution.reset()
        self.tokens.reset()
        self._counters: dict[str, torch.Tensor | int] = {
            "repeated_ngrams": 0,
            "total_ngrams": 0,
            "completion_tokens": 0,
            "completions": 0,
        }

    @torch.no_grad()
    def observe(
        self,
        entropies: torch.Tensor,
        mask: torch.Tensor,
        token_ids: torch.Tensor | None,
        forking_ratio: float,
        ngram: int,
    ) -> None:
        entropies = entropies.detach()
        mask = mask.bool()
        valid = mask & torch.isfinite(entropies)
        self.distribution.update(entropies, mask)
        if token_ids is not None:
            selected = high_entropy_mask(entropies, valid, forking_ratio)
            self.tokens.update(token_ids, selected, torch.where(valid, entropies, torch.zeros_like(entropies)))
            repeated, total = repeated_ngram_counts(token_ids, mask, ngram)
            self._counters["repeated_ngrams"] = self._counters["repeated_ngrams"] + repeated
            self._counters["total_ngrams"] = self._counters["total_ngrams"] + total
        self._counters["completion_tokens"] = self._counters["completion_tokens"] + mask.sum()
        self._counters["completions"] = self._counters["completions"] + mask.shape[0]

    def state_dict(self) -> dict[str, Any]:
        counters = {k: int(v) for k, v in self._counters.items()}
        return {"distribution": self.distribution.state_dict(), "tokens": self.tokens.state_dict(), **counters}


@torch.no_grad()
def merge_window_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge per-rank window states (each from one rank's ``state_dict()``) into host objects:
    ``{"distribution": EntropyDistribution, "tokens": TokenEntropyCounter, "repeated_ngrams", "total_ngrams",
    "completion_tokens", "completions"}``. The result does not depend on how the data was split across ranks."""
    if not states:
        raise ValueError("`states` must hold at least one window state.")
    merged: dict[str, Any] = {
        "distribution": merge_distributions([EntropyDistribution.from_state_dict(s["distribution"]) for s in states]),
        "tokens": merge_token_counters([TokenEntropyCounter.from_state_dict(s["tokens"]) for s in states]),
    }
    for key in ("repeated_ngrams", "total_ngrams", "completion_tokens", "completions"):
        merged[key] = sum(int(s[key]) for s in states)
    return merged


def _merged_to_state_dict(merged: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "distribution": merged["distribution"].state_dict(),
        "tokens": merged["tokens"].state_dict(),
        **{k: merged[k] for k in ("repeated_ngrams", "total_ngrams", "completion_tokens", "completions")},
    }
