"""Exact per-window distributions of per-token entropies, and per-token-id counts of forking tokens.

- :class:`EntropyDistribution`: every valid value of the logging window, kept on the host (8 bytes per token), so
  moments, quantiles (``torch.quantile``'s linear interpolation), the fraction above a threshold and the histogram are
  exact. A window holds the completion tokens of the generation batches between two logs (e.g. 64 completions x 1024
  tokens x 10 steps = 655,360 values, 5 MiB), and is dropped at every log.
- :class:`TokenEntropyCounter`: per-vocabulary-id counts and entropy sums of selected (e.g. forking) tokens.

Both merge across ranks by concatenation / addition, and the merged result does not depend on how the values were
split: statistics are computed on the sorted values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["EntropyDistribution", "TokenEntropyCounter", "merge_distributions", "merge_token_counters"]


def _float32_representable(values: np.ndarray) -> np.ndarray:
    # Bin edges that float32 represents exactly compare identically against float32, bfloat16 and float64 inputs,
    # so the histogram of float32 entropies and a float64 reference agree bin for bin.
    return values.astype(np.float32).astype(np.float64)


class EntropyDistribution:
    """All valid values of a stream of per-token entropies, with exact statistics.

    Args:
        max_value: upper end of the histogram range, usually ``log(vocab_size)`` (the largest possible entropy in
            nats). Values above it are counted in the last bin, values below 0 in the first; moments and quantiles
            use the values themselves.
        bins: number of linear histogram bins over ``[0, max_value]``, in ``[1, 512]`` (512 is the W&B limit).
    """

    def __init__(self, max_value: float, bins: int = 100):
        if not (isinstance(max_value, (int, float)) and math.isfinite(max_value) and max_value > 0):
            raise ValueError(f"`max_value` must be a finite number > 0, got {max_value!r}.")
        if not (isinstance(bins, int) and 1 <= bins <= 512):
            raise ValueError(f"`bins` must be an integer in [1, 512], got {bins!r}.")
        self.max_value = float(max_value)
        self.bins = bins
        self.edges = _float32_representable(np.linspace(0.0, self.max_value, bins + 1))
        if np.any(np.diff(self.edges) <= 0):
            raise ValueError(f"`max_value`={max_value} is too small for {bins} distinct float32 bin edges.")
        self.reset()

    def reset(self) -> None:
        """Forget every value."""
        self._chunks: list[np.ndarray] = []
        self._invalid = 0
        self._sorted: np.ndarray | None = None

    @torch.no_grad()
    def update(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the values (any shape) where ``mask`` is true (all when ``mask`` is None). Non-finite values under the
        mask are not added: they are counted in :attr:`invalid_count`, so a NaN never reaches a statistic."""
        if mask is not None and mask.shape != values.shape:
            raise ValueError(f"`mask` {tuple(mask.shape)} must have the shape of `values` {tuple(values.shape)}.")
        flat = values.detach().reshape(-1).double().cpu()
        considered = mask.detach().reshape(-1).bool().cpu() if mask is not None else torch.ones_like(flat, dtype=bool)
        finite = torch.isfinite(flat)
        self._invalid += int((considered & ~finite).sum())
        kept = flat[considered & finite].numpy()
        if kept.size:
            self._chunks.append(kept)
            self._sorted = None

    def _values(self) -> np.ndarray:
        """The valid values, sorted (cached until the next update)."""
        if self._sorted is None:
            self._sorted = np.sort(np.concatenate(self._chunks)) if self._chunks else np.zeros(0)
        return self._sorted

    @property
    def count(self) -> int:
        """Number of valid (finite, unmasked) values added."""
        return int(self._values().size)

    @property
    def invalid_count(self) -> int:
        """Number of non-finite values that were under the mask and therefore left out."""
        return self._invalid

    def moments(self) -> dict[str, float | int]:
        """``{"count", "invalid", "sum", "sum_sq", "min", "max"}`` of the valid values (``min``/``max`` are
        +inf/-inf when empty)."""
        values = self._values()
        return {
            "count": int(values.size),
            "invalid": self._invalid,
            "sum": float(values.sum()),
            "sum_sq": float(np.square(values).sum()),
            "min": float(values[0]) if values.size else math.inf,
            "max": float(values[-1]) if values.size else -math.inf,
        }

    @property
    def mean(self) -> float:
        """Mean of the valid values (NaN when there is none)."""
        values = self._values()
        return float(values.mean()) if values.size else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation of the valid values (NaN when there is none)."""
        values = self._values()
        return float(values.std()) if values.size else math.nan

    @property
    def min(self) -> float:
        """Smallest valid value (NaN when there is none)."""
        values = self._values()
        return float(values[0]) if values.size else math.nan

    @property
    def max(self) -> float:
        """Largest valid value (NaN when there is none)."""
        values = self._values()
        return float(values[-1]) if values.size else math.nan

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` as ``numpy.histogram`` returns them: ``bins`` integer counts over linear bins
        ``[edges[i], edges[i+1])`` (the last one closed), values clamped into ``[0, max_value]``."""
        index = np.searchsorted(self.edges[1:-1], self._values(), side="right")
        return np.bincount(index, minlength=self.bins).astype(np.int64), self.edges.copy()

    def quantiles(self, qs: float | Sequence[float]) -> list[float]:
        """Exact quantiles with ``torch.quantile``'s linear interpolation; NaN for every ``q`` when empty."""
        qs = [qs] if isinstance(qs, (int, float)) else list(qs)
        for q in qs:
            if not (0.0 <= q <= 1.0):
                raise ValueError(f"Each quantile must be in [0, 1], got {q}.")
        values = self._values()
        if not values.size:
            return [math.nan] * len(qs)
        out = []
        for q in qs:
            position = q * (values.size - 1)
            low = math.floor(position)
            high = min(low + 1, values.size - 1)
            out.append(float(values[low] + (position - low) * (values[high] - values[low])))
        return out

    def fraction_above(self, threshold: float) -> float:
        """Fraction of the valid values strictly above ``threshold`` (NaN when empty)."""
        values = self._values()
        if not values.size:
            return math.nan
        return float(values.size - np.searchsorted(values, float(threshold), side="right")) / values.size

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (the sorted values as a list)."""
        return {
            "max_value": self.max_value,
            "bins": self.bins,
            "invalid": self._invalid,
            "values": self._values().tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EntropyDistribution:
        """Rebuild a distribution from :meth:`state_dict`."""
        distribution = cls(state["max_value"], bins=state["bins"])
        distribution._invalid = int(state["invalid"])
        values = np.asarray(state["values"], dtype=np.float64)
        if values.size:
            distribution._chunks.append(values)
        return distribution

    def same_layout(self, other: EntropyDistribution) -> bool:
        """Whether ``other`` has the same histogram range and bins (so the two can be merged)."""
        return (self.max_value, self.bins) == (other.max_value, other.bins)


def merge_distributions(distributions: Sequence[EntropyDistribution]) -> EntropyDistribution:
    """One distribution holding every value of ``distributions`` (e.g. one per rank)."""
    if not distributions:
        raise ValueError("`distributions` must hold at least one distribution.")
    first = distributions[0]
    for other in distributions[1:]:
        if not first.same_layout(other):
            raise ValueError(
                "Distributions must share `max_value` and `bins` to be merged, got "
                f"{(first.max_value, first.bins)} and {(other.max_value, other.bins)}."
            )
    merged = EntropyDistribution(first.max_value, bins=first.bins)
    for other in distributions:
        merged._invalid += other._invalid
        if other.count:
            merged._chunks.append(other._values())
    return merged


class TokenEntropyCounter:
    """Per-token-id count and entropy sum of selected tokens (e.g. the forking tokens of each micro-batch).

    Two dense vectors of ``vocab_size`` entries on the device of the first update (about 16 bytes per vocabulary
    entry), so updates never synchronise with the host; :meth:`state_dict` reads back only the non-zero entries.

    Args:
        vocab_size: number of token ids, >= 1. Ids outside ``[0, vocab_size)`` are clamped into it.
    """

    def __init__(self, vocab_size: int):
        if not (isinstance(vocab_size, int) and vocab_size >= 1):
            raise ValueError(f"`vocab_size` must be an integer >= 1, got {vocab_size!r}.")
        self.vocab_size = vocab_size
        self.reset()

    def reset(self) -> None:
        """Forget every count (the buffers are kept and zeroed)."""
        if getattr(self, "_counts", None) is not None:
            self._counts.zero_()
            self._entropy_sums.zero_()
        else:
            self._counts: torch.Tensor | None = None
            self._entropy_sums: torch.Tensor | None = None

    def _init(self, device: torch.device) -> None:
        self._counts = torch.zeros(self.vocab_size, dtype=torch.int64, device=device)
        self._entropy_sums = torch.zeros(
            self.vocab_size, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device
        )

    @torch.no_grad()
    def update(self, token_ids: torch.Tensor, selected: torch.Tensor, entropies: torch.Tensor) -> None:
        """Count ``token_ids`` where ``selected`` is true, adding their entropies. The three share one shape."""
        if not (token_ids.shape == selected.shape == entropies.shape):
            raise ValueError(
                f"`token_ids` {tuple(token_ids.shape)}, `selected` {tuple(selected.shape)} and `entropies` "
                f"{tuple(entropies.shape)} must share one shape."
            )
        if token_ids.numel() == 0:
            return
        if self._counts is None:
            self._init(token_ids.device)
        device = self._counts.device
        ids = token_ids.detach().reshape(-1).to(device).long().clamp(0, self.vocab_size - 1)
        chosen = selected.detach().reshape(-1).to(device).bool()
        values = entropies.detach().reshape(-1).to(device).to(self._entropy_sums.dtype)
        self._counts.index_add_(0, ids, chosen.long())
        self._entropy_sums.index_add_(0, ids, torch.where(chosen, values, torch.zeros_like(values)))

    def state_dict(self) -> dict[str, Any]:
        """Non-zero entries as JSON-serialisable lists: ``{"vocab_size", "ids", "counts", "entropy_sums"}``."""
        if self._counts is None:
            return {"vocab_size": self.vocab_size, "ids": [], "counts": [], "entropy_sums": []}
        ids = torch.nonzero(self._counts).squeeze(1)
        return {
            "vocab_size": self.vocab_size,
            "ids": ids.cpu().tolist(),
            "counts": self._counts[ids].cpu().tolist(),
            "entropy_sums": self._entropy_sums[ids].double().cpu().tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TokenEntropyCounter:
        """Rebuild a (host) counter from :meth:`state_dict`."""
        counter = cls(int(state["vocab_size"]))
        counter._init(torch.device("cpu"))
        ids = torch.tensor(state["ids"], dtype=torch.int64)
        counter._counts.index_add_(0, ids, torch.tensor(state["counts"], dtype=torch.int64))
        counter._entropy_sums.index_add_(0, ids, torch.tensor(state["entropy_sums"], dtype=torch.float64))
        return counter

    def top(self, n: int) -> list[tuple[int, int, float]]:
        """The ``n`` most frequent ids as ``(token_id, count, mean_entropy)``, by count, then mean entropy, then id."""
        state = self.state_dict()
        rows = [(i, c, s / c) for i, c, s in zip(state["ids"], state["counts"], state["entropy_sums"])]
        rows.sort(key=lambda row: (-row[1], -row[2], row[0]))
        return rows[: max(n, 0)]


def merge_token_counters(counters: Sequence[TokenEntropyCounter]) -> TokenEntropyCounter:
    """One host counter with the summed counts and entropy sums of ``counters`` (e.g. one per rank)."""
    if not counters:
        raise ValueError("`counters` must hold at least one counter.")
    vocab_size = counters[0].vocab_size
    if any(c.vocab_size != vocab_size for c in counters):
        raise ValueError(f"Counters must share `vocab_size`, got {sorted({c.vocab_size for c in counters})}.")
    merged = TokenEntropyCounter(vocab_size)
    merged._init(torch.device("cpu"))
    for counter in counters:
        state = counter.state_dict()
        ids = torch.tensor(state["ids"], dtype=torch.int64)
        merged._counts.index_add_(0, ids, torch.tensor(state["counts"], dtype=torch.int64))
        merged._entropy_sums.index_add_(0, ids, torch.tensor(state["entropy_sums"], dtype=torch.float64))
    return merged
