"""Streaming, mergeable summaries of per-token entropy distributions, in constant memory per logging window.

Two structures, both fed on the training device without a host synchronisation and merged across ranks on the host:

- :class:`EntropySketch`: exact moments (count, sum, sum of squares, min, max), a linear histogram over
  ``[0, max_value]`` with exact integer counts (for pictures and logging backends), and quantile summaries that give
  every quantile within ``1 / summary_size`` rank error, whatever the shape of the distribution.
- :class:`TokenEntropyCounter`: per-vocabulary-id counts and entropy sums of selected (e.g. forking) tokens.

Quantile summaries. Each call to :meth:`EntropySketch.update` sorts its chunk's ``n`` valid values on device and keeps
``K + 1`` order statistics (``K = summary_size``) at the evenly spaced ranks ``r_i = round(i (n - 1) / K)``; a chunk
of at most ``K + 1`` values is therefore kept whole. Between two kept ranks fewer than ``n / K`` values are unknown, so
the count of values below any ``x`` is known to within ``n / K`` per chunk and to within ``N / K`` for all chunks
together: a quantile read off the merged summaries is within ``1 / K`` rank error (0.4% for the default ``K = 256``)
of the exact one, deterministically, whatever the distribution. A fixed-bin histogram cannot promise that: a randomly
initialised model puts every token within 1e-3 nats of ``log V``, inside one bin. Merging is a concatenation, so a
sketch merged from per-rank sketches equals the sketch of one process that saw the same chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["EntropySketch", "TokenEntropyCounter", "merge_sketches", "merge_token_counters"]


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps long sums exact enough; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _float32_representable(values: np.ndarray) -> np.ndarray:
    # Bin edges that float32 represents exactly compare identically against float32, bfloat16 and float64 inputs,
    # so the device histogram and a float64 reference agree bin for bin.
    return values.astype(np.float32).astype(np.float64)


class EntropySketch:
    """Mergeable summary of a stream of per-token entropies: exact moments, exact histogram counts and quantiles
    within ``1 / summary_size`` rank error.

    State lives on the device of the first chunk passed to :meth:`update` and is only read back (one transfer per
    tensor) when a statistic is asked for. Memory is ``O(bins + chunks * summary_size)`` and is released by
    :meth:`reset`, which the stats callback calls at every logging step.

    Args:
        max_value: upper end of the histogram range, usually ``log(vocab_size)`` (the largest possible entropy in
            nats). Values above it are counted in the last bin, values below 0 in the first; moments and quantiles
            use the values themselves.
        bins: number of linear histogram bins over ``[0, max_value]``, in ``[1, 512]`` (512 is the W&B limit).
        summary_size: number of intervals ``K`` kept per chunk, in ``[1, 65536]``; quantiles are within ``1 / K``
            rank error.
    """

    def __init__(self, max_value: float, bins: int = 100, summary_size: int = 256):
        if not (isinstance(max_value, (int, float)) and math.isfinite(max_value) and max_value > 0):
            raise ValueError(f"`max_value` must be a finite number > 0, got {max_value!r}.")
        if not (isinstance(bins, int) and 1 <= bins <= 512):
            raise ValueError(f"`bins` must be an integer in [1, 512], got {bins!r}.")
        if not (isinstance(summary_size, int) and 1 <= summary_size <= 65536):
            raise ValueError(f"`summary_size` must be an integer in [1, 65536], got {summary_size!r}.")
        self.max_value = float(max_value)
        self.bins = bins
        self.summary_size = summary_size
        self.edges = _float32_representable(np.linspace(0.0, self.max_value, bins + 1))
        if np.any(np.diff(self.edges) <= 0):
            raise ValueError(f"`max_value`={max_value} is too small for {bins} distinct float32 bin edges.")
        self._device_edges: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.reset()

    # ---- accumulation ----------------------------------------------------------------------------------------------
    def reset(self, device: torch.device | str | None = None) -> None:
        """Forget every value; the next :meth:`update` (or ``device``) decides where the state lives."""
        self._device = torch.device(device) if device is not None else None
        self._state: dict[str, torch.Tensor] | None = None
        self._summary_values: list[torch.Tensor] = []
        self._summary_counts: list[torch.Tensor] = []
        self._cdf_cache: tuple[int, _SummaryCDF] | None = None
        if self._device is not None:
            self._init_state(self._device)

    def _init_state(self, device: torch.device) -> None:
        acc = _accumulator_dtype(device)
        self._device = device
        self._state = {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "invalid": torch.zeros((), dtype=torch.int64, device=device),
            "sum": torch.zeros((), dtype=acc, device=device),
            "sum_sq": torch.zeros((), dtype=acc, device=device),
            "min": torch.full((), math.inf, dtype=acc, device=device),
            "max": torch.full((), -math.inf, dtype=acc, device=device),
            "histogram": torch.zeros(self.bins, dtype=torch.int64, device=device),
        }

    def _inner_edges(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._device_edges:
            self._device_edges[key] = torch.tensor(self.edges[1:-1], dtype=dtype, device=device)
        return self._device_edges[key]

    @torch.no_grad()
    def update(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the values of one chunk (any shape) where ``mask`` is true (all when ``mask`` is None).

        Non-finite values under the mask are not added: they are counted in :attr:`invalid_count` instead, so a NaN
        never reaches a mean or a quantile. Runs on the values' device without a host synchronisation.
        """
        if mask is not None and mask.shape != values.shape:
            raise ValueError(f"`mask` {tuple(mask.shape)} must have the shape of `values` {tuple(values.shape)}.")
        if values.numel() == 0:
            return
        if self._state is None:
            self._init_state(values.device)
        state = self._state
        flat = values.detach().reshape(-1).to(self._device)
        if flat.dtype != torch.float64:
            flat = flat.float()
        finite = torch.isfinite(flat)
        considered = mask.detach().reshape(-1).to(self._device).bool() if mask is not None else torch.ones_like(finite)
        valid = considered & finite
        n_valid = valid.sum()
        state["invalid"] += (considered & ~finite).sum()
        state["count"] += n_valid

        acc = state["sum"].dtype
        zeroed = torch.where(valid, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
        state["sum"] += zeroed.to(acc).sum()
        state["sum_sq"] += zeroed.to(acc).square().sum()

        # Valid values first, ascending; padding and non-finite values sort last as +inf.
        ordered = (
            torch.where(valid, flat, torch.full((), math.inf, dtype=flat.dtype, device=flat.device)).sort().values
        )
        last = ordered.gather(0, (n_valid - 1).clamp(min=0).view(1)).squeeze(0)
        state["min"] = torch.minimum(state["min"], ordered[0].to(acc))
        state["max"] = torch.maximum(state["max"], torch.where(n_valid > 0, last.to(acc), state["max"]))

        bin_index = torch.bucketize(zeroed, self._inner_edges(flat.device, flat.dtype), right=True)
        state["histogram"].index_add_(0, bin_index, valid.long())

        # Order statistics at ranks round(i (n - 1) / K), in exact integer arithmetic (the host recomputes them).
        steps = torch.arange(self.summary_size + 1, device=flat.device, dtype=torch.int64)
        ranks = torch.div(
            steps * (n_valid - 1).clamp(min=0) + self.summary_size // 2, self.summary_size, rounding_mode="floor"
        )
        self._summary_values.append(ordered.gather(0, ranks))
        self._summary_counts.append(n_valid)

    # ---- host-side views -------------------------------------------------------------------------------------------
    def _host_state(self) -> dict[str, Any]:
        if self._state is None:
            return {"count": 0, "invalid": 0, "sum": 0.0, "sum_sq": 0.0, "min": math.inf, "max": -math.inf}
        scalars = torch.stack([self._state[k].double() for k in ("count", "invalid", "sum", "sum_sq", "min", "max")])
        count, invalid, total, total_sq, low, high = scalars.cpu().tolist()
        return {
            "count": int(count),
            "invalid": int(invalid),
            "sum": total,
            "sum_sq": total_sq,
            "min": low,
            "max": high,
        }

    def _cdf(self) -> _SummaryCDF:
        # Rebuilt only when chunks were added since the last call (quantiles and fractions share one).
        key = len(self._summary_values)
        if self._cdf_cache is None or self._cdf_cache[0] != key:
            self._cdf_cache = (key, _SummaryCDF(*self._host_summaries()))
        return self._cdf_cache[1]

    def _host_summaries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values [S, K+1] float64, ranks [S, K+1] int64, counts [S])`` of the non-empty chunks."""
        if not self._summary_values:
            empty = np.zeros((0, self.summary_size + 1))
            return empty, empty.astype(np.int64), np.zeros(0, dtype=np.int64)
        device = self._summary_values[0].device
        # One stacked transfer per tensor kind, not one per chunk.
        values = torch.stack([v.to(device, torch.float64) for v in self._summary_values]).cpu()
        counts = torch.stack([c.to(device) for c in self._summary_counts]).cpu().numpy().astype(np.int64)
        keep = counts > 0
        values, counts = values.numpy()[keep], counts[keep]
        steps = np.arange(self.summary_size + 1, dtype=np.int64)
        ranks = (steps[None, :] * (counts[:, None] - 1) + self.summary_size // 2) // self.summary_size
        return values, ranks, counts

    def moments(self) -> dict[str, float | int]:
        """``{"count", "invalid", "sum", "sum_sq", "min", "max"}`` of the valid values, read back in one transfer
        (``min``/``max`` are +inf/-inf when the sketch is empty)."""
        return self._host_state()

    @property
    def count(self) -> int:
        """Number of valid (finite, unmasked) values added."""
        return self._host_state()["count"]

    @property
    def invalid_count(self) -> int:
        """Number of non-finite values that were under the mask and therefore left out."""
        return self._host_state()["invalid"]

    @property
    def mean(self) -> float:
        """Mean of the valid values (NaN when there is none)."""
        host = self._host_state()
        return host["sum"] / host["count"] if host["count"] else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation of the valid values (NaN when there is none)."""
        host = self._host_state()
        if not host["count"]:
            return math.nan
        mean = host["sum"] / host["count"]
        return math.sqrt(max(host["sum_sq"] / host["count"] - mean * mean, 0.0))

    @property
    def min(self) -> float:
        """Smallest valid value (NaN when there is none)."""
        host = self._host_state()
        return host["min"] if host["count"] else math.nan

    @property
    def max(self) -> float:
        """Largest valid value (NaN when there is none)."""
        host = self._host_state()
        return host["max"] if host["count"] else math.nan

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` as ``numpy.histogram`` returns them: ``bins`` exact integer counts over linear bins
        ``[edges[i], edges[i+1])`` (the last one closed), values clamped into ``[0, max_value]``."""
        if self._state is None:
            return np.zeros(self.bins, dtype=np.int64), self.edges.copy()
        return self._state["histogram"].cpu().numpy().astype(np.int64), self.edges.copy()

    def rank_error_bound(self) -> float:
        """Largest possible rank error of :meth:`quantiles`: the values that no summary pins down between two kept
        order statistics, over the total count (at most ``1 / summary_size``; 0 when every chunk is kept whole)."""
        cdf = self._cdf()
        if cdf.total == 0:
            return 0.0
        gaps = (cdf.ranks.diff(dim=1) - 1).clamp(min=0).amax(dim=1)
        return float(gaps.sum()) / cdf.total

    # ---- quantiles -------------------------------------------------------------------------------------------------
    def quantiles(self, qs: float | Sequence[float]) -> list[float]:
        """Quantiles with ``torch.quantile``'s linear interpolation between order statistics, each within
        :meth:`rank_error_bound` (<= ``1 / summary_size``) rank error. NaN for every ``q`` when the sketch is empty."""
        qs = [qs] if isinstance(qs, (int, float)) else list(qs)
        for q in qs:
            if not (0.0 <= q <= 1.0):
                raise ValueError(f"Each quantile must be in [0, 1], got {q}.")
        cdf = self._cdf()
        if cdf.total == 0:
            return [math.nan] * len(qs)
        positions = [q * (cdf.total - 1) for q in qs]
        lows = [math.floor(p) for p in positions]
        highs = [min(low + 1, cdf.total - 1) for low in lows]
        values = cdf.order_statistics(lows + highs).tolist()
        value_low, value_high = values[: len(qs)], values[len(qs) :]
        return [a + (p - low) * (b - a) for p, low, a, b in zip(positions, lows, value_low, value_high)]

    def fraction_above(self, threshold: float) -> float:
        """Estimated fraction of the valid values strictly above ``threshold`` (within the rank error bound)."""
        cdf = self._cdf()
        if cdf.total == 0:
            return math.nan
        return 1.0 - float(cdf.count_at_most(torch.tensor([float(threshold)], dtype=torch.float64))) / cdf.total

    # ---- serialisation ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of the sketch (host lists, empty chunks dropped)."""
        host = self._host_state()
        values, _, counts = self._host_summaries()
        return {
            "max_value": self.max_value,
            "bins": self.bins,
            "summary_size": self.summary_size,
            "count": host["count"],
            "invalid": host["invalid"],
            "sum": host["sum"],
            "sum_sq": host["sum_sq"],
            "min": host["min"] if host["count"] else None,
            "max": host["max"] if host["count"] else None,
            "histogram": self.histogram()[0].tolist(),
            "summary_values": values.tolist(),
            "summary_counts": counts.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EntropySketch:
        """Rebuild a (host) sketch from :meth:`state_dict`."""
        sketch = cls(state["max_value"], bins=state["bins"], summary_size=state["summary_size"])
        sketch._init_state(torch.device("cpu"))
        sketch._state["count"] += int(state["count"])
        sketch._state["invalid"] += int(state["invalid"])
        sketch._state["sum"] += float(state["sum"])
        sketch._state["sum_sq"] += float(state["sum_sq"])
        if state["count"]:
            sketch._state["min"].fill_(float(state["min"]))
            sketch._state["max"].fill_(float(state["max"]))
        histogram = torch.tensor(state["histogram"], dtype=torch.int64)
        if histogram.shape != (sketch.bins,):
            raise ValueError(f"`histogram` must have {sketch.bins} counts, got {tuple(histogram.shape)}.")
        sketch._state["histogram"] += histogram
        for values, count in zip(state["summary_values"], state["summary_counts"]):
            if len(values) != sketch.summary_size + 1:
                raise ValueError(f"Each summary must hold {sketch.summary_size + 1} values, got {len(values)}.")
            sketch._summary_values.append(torch.tensor(values, dtype=torch.float64))
            sketch._summary_counts.append(torch.tensor(int(count), dtype=torch.int64))
        return sketch

    def same_layout(self, other: EntropySketch) -> bool:
        """Whether ``other`` has the same histogram range, bins and summary size (so the two can be merged)."""
        return (self.max_value, self.bins, self.summary_size) == (other.max_value, other.bins, other.summary_size)


class _SummaryCDF:
    """Count of values ``<= x`` and ``< x`` implied by a set of chunk summaries, and its inverse.

    Within a chunk, the values between two kept order statistics ``(v_i, r_i)`` and ``(v_j, r_j)`` are taken as spread
    evenly over ``[v_i, v_j]``; every estimate is therefore off by at most the number of those values per chunk.
    All methods take a batch of points, so inverting several quantiles costs one bisection.
    """

    def __init__(self, values: np.ndarray, ranks: np.ndarray, counts: np.ndarray):
        # A canonical chunk order makes the float sums, hence the quantiles, independent of the merge order.
        order = np.lexsort(np.vstack([counts[None, :], values.T[::-1]])) if counts.size else np.zeros(0, dtype=int)
        self.values = torch.from_numpy(np.ascontiguousarray(values[order]))
        self.ranks = torch.from_numpy(np.ascontiguousarray(ranks[order])).double()
        self.counts = torch.from_numpy(counts[order]).double()
        self.total = int(counts.sum())
        self.breakpoints = torch.from_numpy(np.unique(values)) if counts.size else torch.zeros(0, dtype=torch.float64)

    def _count(self, xs: torch.Tensor, right: bool) -> torch.Tensor:
        """Estimated count of values ``<= xs`` (``right``) or ``< xs``, for a 1-D batch of points."""
        if self.total == 0:
            return torch.zeros_like(xs)
        num_chunks, width = self.values.shape
        query = xs.view(1, -1).expand(num_chunks, -1).contiguous()
        # right=True: number of kept values <= x; right=False: number of kept values < x.
        index = torch.searchsorted(self.values, query, right=right)
        below = (index - 1).clamp(min=0)
        above = index.clamp(max=width - 1)
        v_below, v_above = self.values.gather(1, below), self.values.gather(1, above)
        r_below, r_above = self.ranks.gather(1, below), self.ranks.gather(1, above)
        span = (v_above - v_below).clamp(min=torch.finfo(torch.float64).tiny)
        fraction = ((query - v_below) / span).clamp(0.0, 1.0)
        inside = r_below + 1 + (r_above - r_below - 1).clamp(min=0) * fraction
        full = self.counts.view(-1, 1).expand_as(inside)
        counts = torch.where(index == 0, torch.zeros_like(inside), torch.where(index == width, full, inside))
        return counts.sum(dim=0)

    def count_at_most(self, xs: torch.Tensor) -> torch.Tensor:
        """Estimated number of values ``<= x`` for each ``x`` in ``xs``."""
        return self._count(xs, right=True)

    def count_below(self, xs: torch.Tensor) -> torch.Tensor:
        """Estimated number of values ``< x`` for each ``x`` in ``xs``."""
        return self._count(xs, right=False)

    def order_statistics(self, ks: Sequence[int]) -> torch.Tensor:
        """Estimated ``k``-th smallest values (0-based): for each ``k``, the smallest ``x`` with
        ``count_at_most(x) >= k + 1``, by one bisection over the breakpoints for all ``ks`` at once."""
        points = self.breakpoints
        target = torch.tensor(ks, dtype=torch.float64) + 1
        low = torch.zeros(len(ks), dtype=torch.int64)
        high = torch.full((len(ks),), len(points) - 1, dtype=torch.int64)
        while bool((low < high).any()):
            middle = (low + high) // 2
            reached = self.count_at_most(points[middle]) >= target
            high = torch.where(reached, middle, high)
            low = torch.where(reached, low, middle + 1)
        previous = points[(low - 1).clamp(min=0)]
        current = points[low]
        reached_before = self.count_at_most(previous)
        reached_just_below = self.count_below(current)
        # Where the target rank falls among values no summary pins down, interpolate linearly between breakpoints.
        gap = reached_just_below - reached_before
        between = (low > 0) & (reached_just_below >= target) & (gap > 0)
        interpolated = previous + (target - reached_before) / gap.clamp(min=1e-300) * (current - previous)
        return torch.where(between, interpolated, current)


def merge_sketches(sketches: Sequence[EntropySketch]) -> EntropySketch:
    """One host sketch holding every value of ``sketches`` (e.g. one per rank): counts, histograms and moments add
    up, chunk summaries are pooled. The result equals the sketch of one process fed the same chunks."""
    if not sketches:
        raise ValueError("`sketches` must hold at least one sketch.")
    first = sketches[0]
    for sketch in sketches[1:]:
        if not first.same_layout(sketch):
            raise ValueError(
                "Sketches must share `max_value`, `bins` and `summary_size` to be merged, got "
                f"{(first.max_value, first.bins, first.summary_size)} and "
                f"{(sketch.max_value, sketch.bins, sketch.summary_size)}."
            )
    merged = EntropySketch(first.max_value, bins=first.bins, summary_size=first.summary_size)
    merged._init_state(torch.device("cpu"))
    for sketch in sketches:
        host = sketch._host_state()
        merged._state["count"] += host["count"]
        merged._state["invalid"] += host["invalid"]
        merged._state["sum"] += host["sum"]
        merged._state["sum_sq"] += host["sum_sq"]
        merged._state["min"] = torch.minimum(merged._state["min"], torch.tensor(host["min"], dtype=torch.float64))
        merged._state["max"] = torch.maximum(merged._state["max"], torch.tensor(host["max"], dtype=torch.float64))
        merged._state["histogram"] += torch.from_numpy(sketch.histogram()[0])
        values, _, counts = sketch._host_summaries()
        merged._summary_values.extend(torch.from_numpy(row.copy()) for row in values)
        merged._summary_counts.extend(torch.tensor(int(c), dtype=torch.int64) for c in counts)
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
        self._entropy_sums = torch.zeros(self.vocab_size, dtype=_accumulator_dtype(device), device=device)

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
