"""Out-of-sample agreement of a rule that predicts, before training, whether label-free training will help.

A rule here is a conjunction of thresholds on measured quantities ("features"): it predicts **helps** when every
feature is at or above its threshold, else **does not help**. Each candidate rule's thresholds are chosen on some
settings and judged on another (leave one setting out), so the reported agreement is out of sample:

- :data:`STATIC_RULE`: today's rule of :func:`trl_entropy.evaluation.diagnose.verdict` as a binary prediction: greedy
minus
  sampled accuracy and the AUROC of minus sequence entropy for correctness (its fixed thresholds 0.10 and 0.60 are
  :data:`STATIC_RULE_THRESHOLDS`; here they are re-chosen in every fold);
- :data:`PROBE_RULE`: the same two quantities plus the held-out trend of a short label-free training probe (a few
  training steps on a few prompts, in the spirit of Model Collapse Step, arXiv 2603.08660);
- :data:`PROBE_ONLY_RULE`: the probe's trend alone.

The outcome of a setting is ``"helped"``, ``"hurt"`` or ``"mixed"`` (the study's paired comparison against no training
decides it); a prediction agrees when it predicts helps and the outcome is helped, or predicts does not help and the
outcome is hurt or mixed (a mixed outcome is not a help a user can count on).

Threshold choice in a fold (deterministic): each feature's candidates are minus infinity (the feature is ignored),
the midpoints between consecutive distinct values of the training settings, and plus infinity (never helps); among the
combinations with the most training agreements, the one that predicts helps on the fewest training settings (a
verdict of help needs the evidence), then the largest thresholds in feature order (the most conservative). A missing
(NaN) feature passes only the threshold minus infinity.

Pure functions of plain values; no model, no torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..stats import wilson_interval

__all__ = [
    "OUTCOMES",
    "PROBE_ONLY_RULE",
    "PROBE_RULE",
    "RULES",
    "STATIC_RULE",
    "STATIC_RULE_THRESHOLDS",
    "LeaveOneOutResult",
    "Rule",
    "Setting",
    "agrees",
    "binomial_p_at_least",
    "choose_thresholds",
    "clopper_pearson_interval",
    "compare_rules",
    "leave_one_setting_out",
    "predict",
]

OUTCOMES = ("helped", "hurt", "mixed")
HELPS, NO_HELP = "helps", "does not help"


@dataclass(frozen=True)
class Rule:
    """A candidate rule: predicts helps when every feature in ``features`` is >= its threshold.

    Attributes:
        name: short name used in tables.
        features: the keys of :attr:`Setting.features` it reads, in threshold order.
        description: one line saying what it measures and what it costs.
    """

    name: str
    features: tuple[str, ...]
    description: str = ""

    def __post_init__(self):
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"`features` must be non-empty and distinct, got {self.features}.")


STATIC_RULE = Rule(
    "static",
    ("greedy_minus_sampled", "confidence_auroc"),
    "greedy minus sampled accuracy and the confidence AUROC, measured once on the untrained model (diagnose)",
)
STATIC_RULE_THRESHOLDS = (0.10, 0.60)
"""The thresholds of :data:`STATIC_RULE` in :func:`trl_entropy.evaluation.diagnose.verdict` (``MODE_GAP_HELPS``,
``CONFIDENCE_AUROC``), for scoring today's fixed rule beside the re-chosen ones."""
PROBE_RULE = Rule(
    "static+probe",
    ("greedy_minus_sampled", "confidence_auroc", "probe_trend"),
    "the static quantities and the held-out accuracy trend of a short label-free training probe",
)
PROBE_ONLY_RULE = Rule("probe", ("probe_trend",), "the held-out accuracy trend of a short label-free training probe")
RULES = (STATIC_RULE, PROBE_RULE, PROBE_ONLY_RULE)


@dataclass(frozen=True)
class Setting:
    """One setting (task x prompt style x model): the rule inputs measured before training and the outcome.

    Attributes:
        name: e.g. ``"arithmetic/open/smollm2"``.
        features: measured quantities (NaN when not measurable).
        outcome: ``"helped"``, ``"hurt"`` or ``"mixed"``.
    """

    name: str
    features: Mapping[str, float]
    outcome: str

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"`outcome` of setting {self.name!r} must be one of {OUTCOMES}, got {self.outcome!r}.")


def predict(rule: Rule, thresholds: Sequence[float], features: Mapping[str, float]) -> str:
    """``"helps"`` when every feature of ``rule`` is >= its threshold (a missing or NaN feature passes only minus
    infinity), else ``"does not help"``."""
    if len(thresholds) != len(rule.features):
        raise ValueError(f"`thresholds` must have {len(rule.features)} values for rule {rule.name!r}.")
    for name, threshold in zip(rule.features, thresholds):
        if threshold == -math.inf:
            continue
        value = features.get(name, math.nan)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= threshold):
            return NO_HELP
    return HELPS


def agrees(prediction: str, outcome: str) -> bool:
    """Whether ``prediction`` matches ``outcome``: helps with helped, does not help with hurt or mixed."""
    return (prediction == HELPS) == (outcome == "helped")


def _candidates(values: Sequence[float]) -> list[float]:
    distinct = sorted({v for v in values if isinstance(v, (int, float)) and math.isfinite(v)})
    return [-math.inf, *((a + b) / 2 for a, b in zip(distinct, distinct[1:])), math.inf]


def choose_thresholds(rule: Rule, settings: Sequence[Setting]) -> tuple[tuple[float, ...], int]:
    """The thresholds of ``rule`` that agree with the most ``settings`` (ties broken as the module docstring says),
    and that number of agreements."""
    if not settings:
        raise ValueError("`settings` must hold at least one setting to choose thresholds on.")
    grids = [_candidates([s.features.get(f, math.nan) for s in settings]) for f in rule.features]
    best_key, best = None, None
    for thresholds in itertools.product(*grids):
        predictions = [predict(rule, thresholds, s.features) for s in settings]
        agreement = sum(agrees(p, s.outcome) for p, s in zip(predictions, settings))
        key = (agreement, -predictions.count(HELPS), thresholds)  # max: most agreement, fewest helps, largest
        if best_key is None or key > best_key:
            best_key, best = key, thresholds
    return tuple(best), best_key[0]


def clopper_pearson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion, by bisection on the binomial tail
    probabilities (no scipy): ``low`` solves ``P(X >= k | low) = alpha/2``, ``high`` solves ``P(X <= k | high) =
    alpha/2``; 0 and 1 at the ends."""
    if not (isinstance(n, int) and n >= 1 and isinstance(successes, int) and 0 <= successes <= n):
        raise ValueError(f"`successes` must be an integer in [0, n] and `n` >= 1, got {successes!r}, {n!r}.")
    alpha = 1 - confidence

    def cdf(k: int, p: float) -> float:  # P(X <= k)
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    def solve(f, target: float) -> float:  # f decreasing in p on [0, 1]
        low, high = 0.0, 1.0
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if f(mid) > target else (low, mid)
        return (low + high) / 2

    lower = 0.0 if successes == 0 else solve(lambda p: cdf(successes - 1, p), 1 - alpha / 2)
    upper = 1.0 if successes == n else solve(lambda p: cdf(successes, p), alpha / 2)
    return lower, upper


def binomial_p_at_least(successes: int, n: int, p: float = 0.5) -> float:
    """One-sided exact binomial p-value ``P(X >= successes)`` for ``X ~ Binomial(n, p)``."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(successes, n + 1))


@dataclass
class LeaveOneOutResult:
    """Leave-one-setting-out agreement of one rule.

    Attributes:
        rule: the rule's name.
        predictions: per setting, in input order: ``name``, ``outcome``, ``prediction``, ``agrees``, the
            ``thresholds`` chosen on the other settings and their ``train_agreement`` (out of n - 1).
        agreements: held-out predictions that agree with their outcome.
        n: number of settings.
        wilson_ci95: Wilson 95% interval of ``agreements / n``.
        exact_ci95: Clopper-Pearson 95% interval of ``agreements / n``.
        p_vs_chance: one-sided exact binomial p-value of at least ``agreements`` under a coin flip (p = 1/2).
        majority_baseline: agreements of the label-only baseline that predicts each held-out setting's most common
            class among the other settings (helps vs does not help; a tie predicts does not help).
    """

    rule: str
    predictions: list[dict[str, Any]] = field(repr=False)
    agreements: int
    n: int
    wilson_ci95: tuple[float, float]
    exact_ci95: tuple[float, float]
    p_vs_chance: float
    majority_baseline: int

    @property
    def agreement(self) -> float:
        return self.agreements / self.n

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "agreements": self.agreements,
            "n": self.n,
            "agreement": self.agreement,
            "wilson_ci95": list(self.wilson_ci95),
            "exact_ci95": list(self.exact_ci95),
            "p_vs_chance": self.p_vs_chance,
            "majority_baseline": self.majority_baseline,
            "predictions": self.predictions,
        }


def leave_one_setting_out(rule: Rule, settings: Sequence[Setting]) -> LeaveOneOutResult:
    """For each setting, choose ``rule``'s thresholds on the other settings (:func:`choose_thresholds`) and predict
    the held-out one; count the agreements, with their Wilson and exact 95% intervals, the p-value against a coin
    flip and the majority-class baseline."""
    if len(settings) < 2:
        raise ValueError(f"`settings` must hold at least 2 settings to leave one out, got {len(settings)}.")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError("`settings` must have distinct names.")
    rows, baseline = [], 0
    for i, held_out in enumerate(settings):
        others = [s for j, s in enumerate(settings) if j != i]
        thresholds, train_agreement = choose_thresholds(rule, others)
        prediction = predict(rule, thresholds, held_out.features)
        rows.append(
            {
                "name": held_out.name,
                "outcome": held_out.outcome,
                "prediction": prediction,
                "agrees": agrees(prediction, held_out.outcome),
                "thresholds": list(thresholds),
                "train_agreement": train_agreement,
            }
        )
        helped = sum(s.outcome == "helped" for s in others)
        baseline += agrees(HELPS if helped > len(others) - helped else NO_HELP, held_out.outcome)
    k, n = sum(r["agrees"] for r in rows), len(rows)
    return LeaveOneOutResult(
        rule=rule.name,
        predictions=rows,
        agreements=k,
        n=n,
        wilson_ci95=wilson_interval(k, n),
        exact_ci95=clopper_pearson_interval(k, n),
        p_vs_chance=binomial_p_at_least(k, n),
        majority_baseline=baseline,
    )


def compare_rules(settings: Sequence[Setting], rules: Sequence[Rule] = RULES) -> dict[str, Any]:
    """:func:`leave_one_setting_out` for each rule whose features every setting has (a rule needing a quantity that
    was not measured is skipped and listed), and the best one: the most held-out agreements, ties to the earlier rule
    (the cheaper one comes first in :data:`RULES`). ``beats_chance`` says whether its exact 95% interval lies above
    1/2 (with n settings that needs a p-value below 0.025, e.g. at least 8 of 8, 9 of 10 or 13 of 16 agreements)."""
    results, skipped = [], []
    for rule in rules:
        if all(f in s.features for s in settings for f in rule.features):
            results.append(leave_one_setting_out(rule, settings))
        else:
            skipped.append(rule.name)
    if not results:
        raise ValueError(f"no rule of {[r.name for r in rules]} has all its features in every setting.")
    best = max(results, key=lambda r: (r.agreements, -results.index(r)))
    return {
        "results": [r.to_dict() for r in results],
        "skipped_rules": skipped,
        "best_rule": best.rule,
        "beats_chance": best.exact_ci95[0] > 0.5,
    }
