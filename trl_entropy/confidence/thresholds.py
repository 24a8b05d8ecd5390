"""The four calibrated stop thresholds of "Think Just Enough" (Sharma & Chopra, 2025, arXiv 2510.08146).

``mu_c``, ``sigma_c``: mean and standard deviation of the sequence entropy of correct answers; ``mu_i``, ``sigma_i``:
of incorrect ones; ``d``: their Cohen's d (:func:`trl_entropy.stats.cohens_d`).
"""

from __future__ import annotations

import math

__all__ = ["threshold_mean", "threshold_info", "threshold_bayes", "threshold_universal"]


def threshold_mean(mu_c: float) -> float:
    """``tau_mean = mu_c``: stop when the entropy is no higher than a typical correct answer's."""
    return mu_c


def threshold_info(mu_c: float, sigma_c: float, d: float) -> float:
    """``tau_info = mu_c + sigma_c * ln(1 + |d|)``: loosen the mean threshold as the groups separate more."""
    return mu_c + sigma_c * math.log1p(abs(d))


def threshold_bayes(mu_c: float, sigma_c: float, mu_i: float, sigma_i: float) -> float:
    """Equal-prior Gaussian decision boundary between the correct and incorrect groups.

    The root between ``mu_c`` and ``mu_i`` of ``a tau^2 + b tau + c = 0`` with ``a = 1/sigma_c^2 - 1/sigma_i^2``,
    ``b = 2 (mu_i/sigma_i^2 - mu_c/sigma_c^2)``, ``c = mu_c^2/sigma_c^2 - mu_i^2/sigma_i^2 - 2 ln(sigma_i/sigma_c)``;
    ``(mu_c + mu_i) / 2`` when the variances are equal. If no root lies between the means (heavily unequal
    variances), the root nearest their midpoint is returned.
    """
    if sigma_c <= 0 or sigma_i <= 0:
        raise ValueError(f"`sigma_c` and `sigma_i` must be > 0, got {sigma_c} and {sigma_i}.")
    a = 1.0 / sigma_c**2 - 1.0 / sigma_i**2
    b = 2.0 * (mu_i / sigma_i**2 - mu_c / sigma_c**2)
    c = mu_c**2 / sigma_c**2 - mu_i**2 / sigma_i**2 - 2.0 * math.log(sigma_i / sigma_c)
    midpoint = 0.5 * (mu_c + mu_i)
    if abs(a) < 1e-12 * max(1.0 / sigma_c**2, 1.0 / sigma_i**2):
        return midpoint if b == 0 else -c / b
    disc = b * b - 4 * a * c
    if disc < 0:
        return midpoint
    roots = [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1.0, -1.0)]
    low, high = min(mu_c, mu_i), max(mu_c, mu_i)
    between = [r for r in roots if low <= r <= high]
    candidates = between or roots
    return min(candidates, key=lambda r: abs(r - midpoint))


def threshold_universal(mu_c: float, sigma_c: float, mu_i: float, d: float) -> float:
    """``tau_universal = mu_c + |d|/(1+|d|) * (mu_i - mu_c) * max(0, 1 - sigma_c/mu_c)``."""
    if mu_c == 0:
        return mu_c
    return mu_c + abs(d) / (1 + abs(d)) * (mu_i - mu_c) * max(0.0, 1.0 - sigma_c / mu_c)
