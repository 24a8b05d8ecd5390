"""The package's statistics, one owner for every wing: paired comparisons of two models on the same problems, how
well a confidence score separates correct from incorrect answers, intervals, trends and effect sizes. Pure functions
of plain lists; no model, no torch. scipy computes what it has (the exact binomial test, Mann-Whitney U, Welch's t);
what it lacks is here (Hanley-McNeil, Wilson, the unbiased pass@k).

- :func:`paired_bootstrap_interval`: percentile bootstrap interval of an accuracy change on the same problems.
- :func:`mcnemar_exact_p`: exact two-sided McNemar test of that change (a binomial test on the discordant pairs).
- :func:`auroc` / :func:`auroc_interval` / :func:`mann_whitney_p`: area under the ROC curve of a score for a binary
  outcome (the Mann-Whitney U statistic), its Hanley-McNeil 95% interval and the two-sided p-value of U.
- :func:`pass_at_k` (unbiased, Chen et al., 2021, arXiv 2107.03374), :func:`majority_at_k` and :func:`majority_vote`.
- :func:`wilson_interval` (a binomial proportion), :func:`welch_p_value` (a difference of means), :func:`cohens_d`.
- :func:`linear_trend_slope` and :func:`pearson_correlation` over logged series with gaps (the callbacks' trends).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np

__all__ = [
    "linear_trend_slope",
    "pearson_correlation",
    "welch_p_value",
    "wilson_interval",
    "auroc",
    "cohens_d",
    "auroc_interval",
    "majority_at_k",
    "majority_vote",
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
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(b, c), b + c, 0.5).pvalue)


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
    """Two-sided p-value of the Mann-Whitney U test that positive and negative examples score alike:
    ``scipy.stats.mannwhitneyu(method="asymptotic", use_continuity=False)`` (normal approximation with tie
    correction). 1.0 when every score is equal (scipy's statistic is then undefined)."""
    pos, neg = _scores_by_outcome(scores, positive)
    if len(set(pos + neg)) == 1:
        return 1.0
    from scipy.stats import mannwhitneyu

    result = mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic", use_continuity=False)
    return min(1.0, float(result.pvalue))


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


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most common answer among ``answers``: unparsed ones (None) do not vote, ties go to the answer seen first
    (``Counter`` keeps first-seen order among equal counts); None when no answer parsed. The one majority vote of the
    package: ``majority@k``, ``trl-entropy generate``'s vote and the TTRL reward all call it."""
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def majority_at_k(answers: Sequence[Hashable | None], reference: Hashable) -> bool:
    """Whether :func:`majority_vote` of ``answers`` equals ``reference``; False when no answer parsed."""
    winner = majority_vote(answers)
    return winner is not None and winner == reference


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


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and keeps close to its nominal coverage for small
    ``n`` and proportions near 0 or 1, which is the regime of small held-out sets.

    Args:
        successes: number of successes, in ``[0, n]``.
        n: number of trials, ``>= 1``.
        confidence: two-sided confidence level, in (0, 1).

    Returns:
        ``(low, high)``, with ``0 <= low <= successes / n <= high <= 1``.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
    if not (isinstance(successes, int) and 0 <= successes <= n):
        raise ValueError(f"`successes` must be an integer in [0, n={n}], got {successes!r}.")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp rounding noise: the exact interval always contains p and lies in [0, 1].
    return max(0.0, min(p, centre - half_width)), min(1.0, max(p, centre + half_width))


def welch_p_value(
    x: Sequence[float], y: Sequence[float], method: Literal["auto", "scipy", "normal"] = "auto"
) -> tuple[float, float, str]:
    """Two-sided p-value for a difference of means with unequal variances.

    Args:
        x: first sample (at least 2 values).
        y: second sample (at least 2 values).
        method: ``"scipy"``: Welch's t-test, ``scipy.stats.ttest_ind(equal_var=False)``; ``"normal"``: the same
            statistic referred to a standard normal instead of Student's t (anti-conservative for small samples:
            the p-value is smaller than Welch's); ``"auto"``: scipy when it is installed, else normal.

    Returns:
        ``(statistic, p_value, method_used)`` with ``method_used`` ``"welch_t"`` or ``"normal_approximation"``.
    """
    if method not in ("auto", "scipy", "normal"):
        raise ValueError(f"`method` must be 'auto', 'scipy' or 'normal', got {method!r}.")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Each sample needs at least 2 values, got {len(x)} and {len(y)}.")
    if method in ("auto", "scipy"):
        try:
            from scipy import stats
        except ImportError:
            if method == "scipy":
                raise ImportError("`method='scipy'` needs scipy: pip install scipy") from None
        else:
            result = stats.ttest_ind(list(x), list(y), equal_var=False)
            return float(result.statistic), float(result.pvalue), "welch_t"
    mean_x, mean_y = math.fsum(x) / len(x), math.fsum(y) / len(y)
    var_x = math.fsum((v - mean_x) ** 2 for v in x) / (len(x) - 1)
    var_y = math.fsum((v - mean_y) ** 2 for v in y) / (len(y) - 1)
    se = math.sqrt(var_x / len(x) + var_y / len(y))
    if se == 0:
        return (
            (0.0, 1.0, "normal_approximation")
            if mean_x == mean_y
            else (math.copysign(math.inf, mean_x - mean_y), 0.0, "normal_approximation")
        )
    z = (mean_x - mean_y) / se
    return z, math.erfc(abs(z) / math.sqrt(2.0)), "normal_approximation"


def linear_trend_slope(steps: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``values`` against ``steps`` over the finite values; None with fewer than two points
    or a single distinct step."""
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"`steps` and `values` must have one length, got {x.shape} and {y.shape}.")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or np.ptp(x) == 0:
        return None
    centred = x - x.mean()
    return float((centred * (y - y.mean())).sum() / (centred * centred).sum())


def pearson_correlation(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Pearson correlation over the pairs where both values are finite; None with fewer than three such pairs or when
    either side is constant (undefined)."""
    a = np.asarray([math.nan if v is None else v for v in x], dtype=np.float64)
    b = np.asarray([math.nan if v is None else v for v in y], dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"`x` and `y` must have one length, got {a.shape} and {b.shape}.")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return None
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    scale = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if scale == 0.0:
        return None
    return float(np.clip((a * b).sum() / scale, -1.0, 1.0))
