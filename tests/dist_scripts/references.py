"""Single-process references shared by the multi-process tests (pure Python, independent of the library)."""

from __future__ import annotations

import math

import torch


def brute_force_forking(entropies, masks, ratio, mode="top", normalization="selected"):
    """Forking-token weights over all ranks' valid tokens together, in rank then row-major order, in pure Python.

    ``k = ceil(ratio * n)`` of the ``n`` valid, non-NaN tokens (at least 1); ties go to the earlier token; ``"bottom"``
    keeps the other valid tokens; ``"selected"`` weights are ``n_valid / n_selected`` (``n_valid`` counts every token
    under the mask), ``"all"`` weights are 1. Returns ``(per-rank float64 weights, selected fraction, smallest
    selected entropy or None)``.
    """
    tokens, n_valid = [], 0
    for rank, (e, m) in enumerate(zip(entropies, masks)):
        for index, (value, valid) in enumerate(zip(e.flatten().tolist(), m.flatten().tolist())):
            if valid:
                n_valid += 1
                if not math.isnan(value):
                    tokens.append((value, rank, index))
    k = max(1, math.ceil(round(ratio * len(tokens), 9))) if tokens else 0
    order = sorted(range(len(tokens)), key=lambda j: (-tokens[j][0], j))
    chosen = set(order[:k]) if mode == "top" else set(order[k:])
    scale = n_valid / len(chosen) if normalization == "selected" and chosen else 1.0
    weights = [torch.zeros(e.shape, dtype=torch.float64) for e in entropies]
    for j in chosen:
        _, rank, index = tokens[j]
        weights[rank].view(-1)[index] = scale
    smallest = min((tokens[j][0] for j in chosen), default=None)
    return weights, len(chosen) / max(n_valid, 1), smallest
