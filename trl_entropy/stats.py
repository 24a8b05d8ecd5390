"""Small statistics for honest evaluation: paired comparisons of two models on the same problems, and how well a
confidence score separates correct from incorrect answers. Pure functions of plain lists; no model, no torch.

- :func:`paired_bootstrap_interval`: percentile bootstrap interval of an accuracy change on the same problems.
- :func:`mcnemar_exact_p`: exact two-sided McNemar test of that change (a binomial test on the discordant pairs).
- :func:`auroc` / :func:`auroc_interval` / :func:`mann_whitney_p`: area under the ROC curve of a score for a binary
  outcome (the Mann-Whitney U statistic), its Hanley-McNeil 95% interval and the two-sided p-value of U.
- :func:`pass_at_k` (unbiased, Chen et al., 2021, arXiv 2107.03374) and :func:`majority_at_k`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from statistics import NormalDist

__all__ = [
    "auroc",
    "cohens_d",
    "auroc_interval",
    "majority_at_k",
    "mann_whitney_p",
    "mcnemar_exact_p",
    "paired_bootstrap_interval",
    "pass_at_k",
]


def _check_pairs(before: Sequence[bool], after: Sequence[bool]) -> None:
    if len(before) != len(after) or not before:
        raise ValueError(
            f"`before` and `after` must be non-empty and of equal length, got {len(before)}, {len(after)}."
        )


def paired_bootstrap_interval(
    before: Sequence[bool], after: Sequence[bool], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(after) - mean(before)`` over problems resampled with replacement.

    The two lists grade the same problems, so resampling problems (not completions) keeps each problem's pair
    together: the interval accounts for easy and hard problems moving together.
    """
    _check_pairs(before, after)
    if not (0 < confidence < 1):
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    if resamples < 1:
        raise ValueError(f"`resamples` must be >= 1, got {resamples}.")
    rng = random.Random(seed)
    differences = [int(a) - int(b) for b, a in zip(before, after)]
    n = len(differences)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[min(resamples - 1, int(math.floor(tail * resamples)))]
    high = means[min(resamples - 1, int(math.ceil((1 - tail) * resamples)) - 1)]
    return low, high


def mcnemar_exact_p(before: Sequence[bool], after: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for a change of accuracy on the same problems.

    Only the discordant problems count: ``b`` right before and wrong after, ``c`` wrong before and right after. Under
    no change each is equally likely, so ``p = min(1, 2 P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``; 1.0
    with no discordant problem.
    """
    _check_pairs(before, after)
    b = sum(1 for x, y in zip(before, after) if x and not y)
    c = sum(1 for x, y in zip(before, after) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _scores_by_outcome(scores: Sequence[float], positive: Sequence[bool]) -> tuple[list[float], list[float]]:
    if len(scores) != len(positive):
        raise ValueError(f"`scores` and `positive` must have the same length, got {len(scores)}, {len(positive)}.")
    if any(not math.isfinite(s) for s in scores):
        raise ValueError("`scores` must be finite numbers.")
    pos = [float(s) for s, p in zip(scores, positive) if p]
    neg = [float(s) for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        raise ValueError(f"the AUROC needs both outcomes, got {len(pos)} positive and {len(neg)} negative examples.")
    return pos, neg


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for predicting ``positive``: the probability that a random positive
    example scores higher than a random negative one, ties counting one half (``U / (n_pos n_neg)``). 0.5 is chance;
    below 0.5 the score ranks the wrong way. Needs at least one example of each outcome."""
    pos, neg = _scores_by_outcome(scores, positive)
    ranks = _midranks([*pos, *neg])
    u = sum(ranks[: len(pos)]) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def _midranks(values: Sequence[float]) -> list[float]:
    """1-based ranks with ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in range(start, end + 1):
            ranks[order[i]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def auroc_interval(scores: Sequence[float], positive: Sequence[bool], confidence: float = 0.95) -> tuple[float, float]:
    """Hanley-McNeil (1982) confidence interval of :func:`auroc`, clipped to [0, 1].

    ``se^2 = (A(1-A) + (n_p - 1)(Q1 - A^2) + (n_n - 1)(Q2 - A^2)) / (n_p n_n)`` with ``Q1 = A/(2-A)`` and
    ``Q2 = 2A^2/(1+A)``; normal approximation.
    """
    if not (0 < confidence < 1):
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    pos, neg = _scores_by_outcome(scores, positive)
    area = auroc(scores, positive)
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    n_p, n_n = len(pos), len(neg)
    variance = (area * (1 - area) + (n_p - 1) * (q1 - area**2) + (n_n - 1) * (q2 - area**2)) / (n_p * n_n)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(max(variance, 0.0))
    return max(0.0, area - half), min(1.0, area + half)


def mann_whitney_p(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that positive and negative examples score alike (normal
    approximation with tie correction, no continuity correction; ``scipy.stats.mannwhitneyu(method="asymptotic",
    use_continuity=False)``). 1.0 when every score is equal."""
    pos, neg = _scores_by_outcome(scores, positive)
    n_p, n_n = len(pos), len(neg)
    n = n_p + n_n
    ranks = _midranks([*pos, *neg])
    u = sum(ranks[:n_p]) - n_p * (n_p + 1) / 2
    ties = Counter([*pos, *neg]).values()
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1))
    variance = n_p * n_n / 12 * ((n + 1) - tie_term)
    if variance <= 0:
        return 1.0
    z = (u - n_p * n_n / 2) / math.sqrt(variance)
    return min(1.0, 2 * (1 - NormalDist().cdf(abs(z))))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from ``num_samples`` samples of which ``num_correct`` are correct:
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021), the probability that at least one of ``k`` samples drawn
    without replacement is correct."""
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
    if not (isinstance(num_correct, int) and 0 <= num_correct <= num_samples):
        raise ValueError(f"`num_correct` must be an integer in [0, {num_samples}], got {num_correct!r}.")
    if not (isinstance(k, int) and 1 <= k <= num_samples):
        raise ValueError(f"`k` must be an integer in [1, {num_samples}], got {k!r}.")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def majority_at_k(answers: Sequence[Hashable | None], reference: Hashable) -> bool:
    """Whether the most common answer among ``answers`` (unparsed ones, None, do not vote; ties go to the answer seen
    first) equals ``reference``; False when no answer parsed."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    return votes.most_common(1)[0][0] == reference


def cohens_d(mu_c: float, sigma_c: float, n_c: int, mu_i: float, sigma_i: float, n_i: int) -> float:
    """Cohen's d ``(mu_c - mu_i) / s_pooled`` with the pooled standard deviation of two groups.

    ``s_pooled = sqrt(((n_c - 1) sigma_c^2 + (n_i - 1) sigma_i^2) / (n_c + n_i - 2))``, with sample (ddof=1)
    standard deviations. Negative when correct answers have the lower entropy, as expected.
    """
    if n_c + n_i <= 2:
        raise ValueError("Cohen's d needs at least 3 examples in total.")
    pooled = math.sqrt(((n_c - 1) * sigma_c**2 + (n_i - 1) * sigma_i**2) / (n_c + n_i - 2))
    if pooled == 0:
        raise ValueError("Cohen's d is undefined: both groups have zero variance.")
    return (mu_c - mu_i) / pooled
