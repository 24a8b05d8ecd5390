"""trl-entropy: entropy-based, label-free methods for Hugging Face TRL.

Every public name loads on first access (the maths of :mod:`trl_entropy.ops`, model loading, the trainers, callback,
logits processors and calibration), so ``import trl_entropy`` imports neither torch nor TRL: ``trl-entropy --help``
and ``trl-entropy env`` start fast.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the lazy names are, for type checkers and the API reference
    from .confidence.thresholds import threshold_bayes, threshold_info, threshold_mean, threshold_universal
    from .models import DEFAULT_MODEL, load_default_model, load_model
    from .ops import (
        entropy_from_topk_logprobs,
        entropy_gradient,
        high_entropy_mask,
        masked_sequence_reduce,
        selected_token_count,
        self_certainty,
        token_entropy,
    )
    from .stats import cohens_d

__version__ = "0.1.0"

# Public name -> submodule that defines it, loaded on first attribute access.
_LAZY = {
    **dict.fromkeys(("DEFAULT_MODEL", "load_default_model", "load_model"), "models"),
    **dict.fromkeys(
        (
            "entropy_from_topk_logprobs",
            "entropy_gradient",
            "high_entropy_mask",
            "masked_sequence_reduce",
            "selected_token_count",
            "self_certainty",
            "token_entropy",
        ),
        "ops",
    ),
    **dict.fromkeys(
        ("threshold_bayes", "threshold_info", "threshold_mean", "threshold_universal"), "confidence.thresholds"
    ),
    "cohens_d": "stats",
    "EntropyGRPOConfig": "trainers",
    "EntropyGRPOTrainer": "trainers",
    "EntropyRLOOConfig": "trainers",
    "EntropyRLOOTrainer": "trainers",
    "EMFTConfig": "trainers",
    "EMFTTrainer": "trainers",
    "EntropyStatsCallback": "callbacks",
    "CompletionSignals": "signals",
    "CollapseGuardCallback": "callbacks",
    "CollapseGuardConfig": "callbacks",
    "EMInfLogitsProcessor": "decoding",
    "AdaptiveTemperatureLogitsProcessor": "decoding",
    "EntropyThresholdCalibrator": "confidence",
    "EntropyEarlyStopping": "confidence",
    "ArithmeticTask": "evaluation.tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "load_default_model",
    "load_model",
    "cohens_d",
    "entropy_from_topk_logprobs",
    "entropy_gradient",
    "high_entropy_mask",
    "masked_sequence_reduce",
    "selected_token_count",
    "self_certainty",
    "threshold_bayes",
    "threshold_info",
    "threshold_mean",
    "threshold_universal",
    "token_entropy",
    "EntropyGRPOConfig",
    "EntropyGRPOTrainer",
    "EntropyRLOOConfig",
    "EntropyRLOOTrainer",
    "EMFTConfig",
    "EMFTTrainer",
    "EntropyStatsCallback",
    "CompletionSignals",
    "CollapseGuardCallback",
    "CollapseGuardConfig",
    "EMInfLogitsProcessor",
    "AdaptiveTemperatureLogitsProcessor",
    "EntropyThresholdCalibrator",
    "EntropyEarlyStopping",
    "ArithmeticTask",
]
