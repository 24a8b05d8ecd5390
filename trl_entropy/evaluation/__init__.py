"""Evaluation: held-out accuracy and entropy (:mod:`.accuracy`), generation with scoring and answer parsing
(:mod:`.generate`), the built-in tasks (:mod:`.tasks`), the pre-training diagnosis (:mod:`.diagnose`) and its
leave-one-out validation (:mod:`.validation`). The package's names are those of :mod:`.accuracy`."""

from .accuracy import (
    TRUNCATION_WARNING_RATE,
    Completion,
    EvaluationResult,
    continue_completions,
    evaluate,
    evaluate_ladder,
    generate_completions,
    plot_entropy_histograms,
    truncation_rate,
    wilson_interval,
)

__all__ = [
    "TRUNCATION_WARNING_RATE",
    "Completion",
    "truncation_rate",
    "EvaluationResult",
    "wilson_interval",
    "generate_completions",
    "continue_completions",
    "evaluate",
    "evaluate_ladder",
    "plot_entropy_histograms",
]
