"""Before any training: can label-free training help this model on this data? Measure what decides it.

Label-free rewards (EM-RL's minus entropy, a majority vote) move the policy towards what it is already confident
about. That helps when the model's most confident answer is better than its typical sample, and when its confidence
tells right from wrong; it cannot help when the typical sample is already the confident answer (No Free Lunch, arXiv
2506.17219; Spurious Rewards, arXiv 2506.10947). :func:`diagnose` measures, on a few prompts:

- with answers: greedy accuracy, sampled accuracy at the training temperature, majority@k and pass@k over ``k`` samples
  per prompt, the answer parse rate, the mean length and the truncation rate at the budget, and how well the model's
  own confidence separates its correct from its incorrect samples (sequence entropy and mean log-probability: Cohen's
  d, AUROC with its 95% interval, the Mann-Whitney p-value);
- always (label-free): how often samples agree with their prompt's majority answer, how many distinct answers a prompt
  gets, the spread of sequence entropy, and how often the greedy answer is the majority answer.

:func:`verdict` turns them into a prediction with the rule and the numbers behind it (see :data:`RULE`). Plain values
in and out: the prompts, answers and the functions that parse and grade answers are the caller's (``trl-entropy
diagnose`` passes the built-in task's); no command line and no task here.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ..files import package_json
from ..stats import auroc, auroc_interval, cohens_d, majority_at_k, mann_whitney_p, pass_at_k, wilson_interval
from .accuracy import Completion, generate_completions

__all__ = [
    "MIN_VERDICT_PROMPTS",
    "RULE",
    "TOO_FEW_SAMPLES",
    "VALIDATION_FILE",
    "confidence_separation",
    "diagnose",
    "label_free_agreement",
    "min_prompts_for_effect",
    "validation_statement",
    "verdict",
]

MODE_GAP_HELPS = 0.10
"""Greedy minus sampled accuracy (absolute) at or above which the model's confident answer is clearly better than its
sample: sharpening towards it has room to gain."""
MODE_GAP_NONE = 0.05
"""Below this gap there is little to gain from sharpening."""
CONFIDENCE_AUROC = 0.60
"""AUROC of the confidence score (minus sequence entropy) for correctness at or above which confidence tracks
correctness."""

RULE = (
    f"likely to help if greedy - sampled accuracy >= {MODE_GAP_HELPS:.0%} and the AUROC of minus sequence entropy for "
    f"correctness >= {CONFIDENCE_AUROC:.2f} (its 95% interval above 0.5); unlikely to help if greedy - sampled < "
    f"{MODE_GAP_NONE:.0%} or the AUROC's 95% interval includes or lies below 0.5; uncertain otherwise"
)
"""The rule :func:`verdict` applies (checked against ``benchmarks/bench_label_free.py``: docs/diagnose.md)."""


def min_prompts_for_effect(effect: float, accuracy: float = 0.5, confidence: float = 0.95) -> int:
    """The fewest problems ``n`` at which the Wilson interval of an accuracy of ``accuracy`` measured on ``n``
    problems reaches no further than ``effect`` from it (half-width ``z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) <=
    effect``). Near 50% accuracy, the least favourable case, a gap of ``effect`` is then about one 95% half-width of
    the greedy accuracy (the sampled accuracy, over ``k`` samples per problem, is more precise): the smallest gap the
    rule acts on is just told apart from no gap."""
    if not (0 < effect < 1):
        raise ValueError(f"`effect` must be in (0, 1), got {effect}.")
    if not (0 <= accuracy <= 1):
        raise ValueError(f"`accuracy` must be in [0, 1], got {accuracy}.")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    n = 1
    while z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n) > effect:
        n += 1
    return n


MIN_VERDICT_PROMPTS = min_prompts_for_effect(MODE_GAP_HELPS)
"""Fewest prompts that carry a verdict: 93, where the 95% Wilson interval of an accuracy near 50% is +-10 points
(:data:`MODE_GAP_HELPS`, the gap the rule needs); at 64 prompts it is +-11.9 points, at 8 +-28 points. Below it
:func:`verdict` with ``min_prompts`` gives the numbers and :data:`TOO_FEW_SAMPLES`."""
TOO_FEW_SAMPLES = "too few samples for a verdict"

VALIDATION_FILE = "diagnose_validation.json"
"""The rule's out-of-sample validation shipped with the package (written by ``benchmarks/bench_diagnose.py``): how
many held-out settings it agreed on, with its interval, and whether that beats chance."""


def validation_statement() -> str | None:
    """One sentence on how far the verdict can be trusted: the rule's leave-one-setting-out agreement on the settings
    of ``benchmarks/bench_diagnose.py`` (None when the package ships no validation)."""
    validation = package_json(VALIDATION_FILE)
    return None if validation is None else validation["statement"]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def confidence_separation(confidence: Sequence[float], correct: Sequence[bool]) -> dict[str, Any] | None:
    """How well ``confidence`` (higher: more confident) separates correct from incorrect answers: Cohen's d (correct
    minus incorrect, pooled standard deviation), the AUROC for predicting correctness with its Hanley-McNeil 95%
    interval, and the two-sided Mann-Whitney p-value. None when either group has fewer than 2 finite values or every
    value is equal."""
    pairs = [(c, bool(k)) for c, k in zip(confidence, correct) if math.isfinite(c)]
    right = [c for c, k in pairs if k]
    wrong = [c for c, k in pairs if not k]
    if len(right) < 2 or len(wrong) < 2 or len({c for c, _ in pairs}) < 2:
        return None
    scores, labels = [c for c, _ in pairs], [k for _, k in pairs]
    right_stats = (statistics.fmean(right), statistics.stdev(right), len(right))
    wrong_stats = (statistics.fmean(wrong), statistics.stdev(wrong), len(wrong))
    try:
        d = cohens_d(*right_stats, *wrong_stats)
    except ValueError:  # both groups constant
        d = math.nan
    low, high = auroc_interval(scores, labels)
    return {
        "cohens_d": d,
        "auroc": auroc(scores, labels),
        "auroc_ci95": [low, high],
        "mann_whitney_p": mann_whitney_p(scores, labels),
        "mean_correct": statistics.fmean(right),
        "mean_incorrect": statistics.fmean(wrong),
        "num_correct": len(right),
        "num_incorrect": len(wrong),
    }


def label_free_agreement(answers: Sequence[Sequence[Hashable | None]]) -> dict[str, float]:
    """Per prompt, the parsed answers of its samples (None: unparsed): the fraction of parsed samples equal to their
    prompt's majority answer, the mean number of distinct parsed answers per prompt, and the fraction of prompts with
    no parsed answer."""
    agree, parsed, distinct, empty = 0, 0, [], 0
    for group in answers:
        votes = Counter(a for a in group if a is not None)
        if not votes:
            empty += 1
            continue
        winner = votes.most_common(1)[0][0]
        agree += votes[winner]
        parsed += sum(votes.values())
        distinct.append(len(votes))
    return {
        "majority_agreement": agree / parsed if parsed else math.nan,
        "mean_distinct_answers": statistics.fmean(distinct) if distinct else math.nan,
        "prompts_without_answer": empty / len(answers) if answers else math.nan,
    }


def verdict(metrics: dict[str, Any], min_prompts: int | None = None) -> dict[str, Any]:
    """The prediction of :data:`RULE` from :func:`diagnose`'s metrics: ``{"verdict", "rule", "numbers", "reason",
    "validation"}`` (``validation``: :func:`validation_statement`).
    Without answers there is no verdict (the label-free quantities alone do not tell a confident right answer from a
    confident wrong one), and it says so. With ``min_prompts`` (e.g. :data:`MIN_VERDICT_PROMPTS`), fewer measured
    prompts (``metrics["settings"]["num_prompts"]``) give the numbers and :data:`TOO_FEW_SAMPLES` instead of a
    verdict."""
    if not metrics.get("has_answers"):
        return {
            "verdict": "no verdict without answers",
            "rule": RULE,
            "numbers": {},
            "reason": "the rule needs accuracies and the confidence-correctness AUROC, which need answers; the "
            "label-free quantities are reported alone",
        }
    gap = metrics["greedy"]["accuracy"] - metrics["sampled"]["accuracy"]
    separation = metrics["confidence"]["sequence_entropy"]
    area = separation["auroc"] if separation else math.nan
    low = separation["auroc_ci95"][0] if separation else math.nan
    high = separation["auroc_ci95"][1] if separation else math.nan
    numbers = {"greedy_minus_sampled": gap, "confidence_auroc": area, "confidence_auroc_ci95": [low, high]}
    num_prompts = metrics.get("settings", {}).get("num_prompts")
    if min_prompts is not None and num_prompts is not None and num_prompts < min_prompts:
        reason = (
            f"{num_prompts} prompts (greedy - sampled {gap:+.1%}, AUROC {area:.2f} [{low:.2f}, {high:.2f}]); a "
            f"verdict needs at least {min_prompts}, where an accuracy's 95% interval is within "
            f"+-{MODE_GAP_HELPS:.0%}, the gap the rule acts on"
        )
        return {
            "verdict": TOO_FEW_SAMPLES,
            "rule": RULE,
            "numbers": numbers,
            "reason": reason,
            "validation": validation_statement(),
        }
    if not math.isfinite(area):
        label, reason = "uncertain", "confidence separation not measurable (too few correct or incorrect samples)"
    elif gap >= MODE_GAP_HELPS and area >= CONFIDENCE_AUROC and low > 0.5:
        label = "likely to help"
        reason = (
            f"the greedy answer is right {gap:+.1%} more often than a sample, and confident samples are more often "
            f"right (AUROC {area:.2f} [{low:.2f}, {high:.2f}])"
        )
    elif gap < MODE_GAP_NONE or low <= 0.5:
        label = "unlikely to help"
        why = []
        if gap < MODE_GAP_NONE:
            why.append(f"a sample is about as good as the greedy answer ({gap:+.1%})")
        if low <= 0.5:
            why.append(f"confidence does not reliably track correctness (AUROC {area:.2f} [{low:.2f}, {high:.2f}])")
        reason = "; ".join(why)
    else:
        label = "uncertain"
        reason = f"gap {gap:+.1%}, AUROC {area:.2f} [{low:.2f}, {high:.2f}]: between the rule's thresholds"
    return {"verdict": label, "rule": RULE, "numbers": numbers, "reason": reason, "validation": validation_statement()}


def _decoding_summary(completions: Sequence[Completion], correct: Sequence[bool] | None, parsed: Sequence) -> dict:
    out = {
        "num_completions": len(completions),
        "parse_rate": sum(p is not None for p in parsed) / len(completions),
        "mean_length": _mean([c.num_tokens for c in completions]),
        "truncation_rate": sum(c.truncated for c in completions) / len(completions),
        "mean_token_entropy": _mean([c.mean_entropy for c in completions]),
    }
    if correct is not None:
        n, k = len(correct), sum(correct)
        out.update(accuracy=k / n, accuracy_ci95=list(wilson_interval(k, n)))
    return out


def diagnose(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    answers: Sequence[str] | None = None,
    *,
    parse_answer: Callable[[str], Hashable | None],
    is_correct: Callable[[str, str], bool] | None = None,
    num_samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    segment_tokens: int | None = 32,
) -> dict[str, Any]:
    """Measure, before training, what decides whether label-free training can help (module docstring), on
    ``prompts`` with ``model``: one greedy completion and ``num_samples`` completions at ``temperature`` per prompt, at
    most ``max_new_tokens`` tokens each.

    Args:
        answers: the reference answer of each prompt, or None (label-free quantities only).
        parse_answer: completion text -> its answer (hashable, None when there is none), for votes and parse rates.
        is_correct: ``(completion text, reference) -> bool``; required with ``answers``.
        num_samples: samples per prompt (``k`` of majority@k and pass@k), >= 2.
        progress: tqdm bars in tokens, with a rate and an ETA, one per decoding.
        segment_tokens: see :class:`trl_entropy.decoding.Decoder` (ended completions are dropped from their batch
            every ``segment_tokens`` tokens; None: one ``generate`` call per batch).

    Returns:
        A JSON-ready dict: ``greedy``, ``sampled`` (accuracy and its Wilson interval, parse rate, mean length,
        truncation rate, token entropy), ``majority_at_k``, ``pass_at_k``, ``confidence`` (separation by sequence
        entropy and by mean log-probability), ``label_free``, ``verdict`` and the settings.
    """
    if not prompts:
        raise ValueError("`prompts` must hold at least one prompt.")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"`answers` must have one entry per prompt, got {len(answers)} for {len(prompts)}.")
    if answers is not None and is_correct is None:
        raise ValueError("`is_correct` is required with `answers`.")
    if not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(f"`num_samples` must be an integer >= 2, got {num_samples!r}.")
    common = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, segment_tokens=segment_tokens
    )
    desc = f"greedy, {len(prompts)} prompts"
    greedy = generate_completions(model, tokenizer, list(prompts), do_sample=False, seed=None, desc=desc, **common)
    repeated = [p for p in prompts for _ in range(num_samples)]
    desc = f"{num_samples} samples x {len(prompts)} prompts, T={temperature:g}"
    sampled = generate_completions(
        model, tokenizer, repeated, do_sample=True, temperature=temperature, seed=seed, desc=desc, **common
    )
    greedy_parsed = [parse_answer(c.text) for c in greedy]
    sampled_parsed = [parse_answer(c.text) for c in sampled]
    groups = [sampled_parsed[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
    label_free = label_free_agreement(groups)
    majority = [Counter(a for a in g if a is not None).most_common(1) for g in groups]
    label_free["greedy_is_majority"] = _mean(
        [float(m[0][0] == g) for m, g in zip(majority, greedy_parsed) if m and g is not None]
    )
    entropies = [c.mean_entropy for c in sampled]
    label_free["sequence_entropy_std"] = statistics.pstdev([e for e in entropies if math.isfinite(e)] or [0.0])
    within = [statistics.pstdev(entropies[i * num_samples : (i + 1) * num_samples]) for i in range(len(prompts))]
    label_free["mean_within_prompt_entropy_std"] = _mean(within)

    result: dict[str, Any] = {
        "greedy_texts": [c.text for c in greedy],
        "settings": {
            "num_prompts": len(prompts),
            "num_samples": num_samples,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
        },
        "has_answers": answers is not None,
        "label_free": label_free,
    }
    if answers is None:
        result["greedy"] = _decoding_summary(greedy, None, greedy_parsed)
        result["sampled"] = _decoding_summary(sampled, None, sampled_parsed)
    else:
        greedy_correct = [is_correct(c.text, str(a)) for c, a in zip(greedy, answers)]
        sampled_correct = [is_correct(c.text, str(answers[i // num_samples])) for i, c in enumerate(sampled)]
        result["greedy"] = _decoding_summary(greedy, greedy_correct, greedy_parsed)
        result["sampled"] = _decoding_summary(sampled, sampled_correct, sampled_parsed)
        per_prompt = [sampled_correct[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
        result["pass_at_k"] = _mean([pass_at_k(num_samples, sum(c), num_samples) for c in per_prompt])
        reference = [parse_answer(str(a)) for a in answers]
        result["majority_at_k"] = _mean([float(majority_at_k(g, r)) for g, r in zip(groups, reference)])
        result["confidence"] = {
            "sequence_entropy": confidence_separation([-e for e in entropies], sampled_correct),
            "mean_logprob": confidence_separation([c.mean_logprob for c in sampled], sampled_correct),
        }
        result["per_prompt"] = [
            {"greedy_correct": ok, "greedy_length": c.num_tokens, "greedy_truncated": c.truncated}
            for c, ok in zip(greedy, greedy_correct)
        ]
        result["per_sample"] = [
            {
                "prompt": i // num_samples,
                "correct": ok,
                "sequence_entropy": c.mean_entropy,
                "mean_logprob": c.mean_logprob,
                "length": c.num_tokens,
                "truncated": c.truncated,
            }
            for i, (c, ok) in enumerate(zip(sampled, sampled_correct))
        ]
    result["verdict"] = verdict(result)
    return result
