"""trl-entropy: entropy-based, label-free methods for Hugging Face TRL."""

from .models import DEFAULT_MODEL, load_default_model, load_model
from .ops import (
    cohens_d,
    entropy_from_topk_logprobs,
    entropy_gradient,
    high_entropy_mask,
    masked_sequence_reduce,
    selected_token_count,
    self_certainty,
    threshold_bayes,
    threshold_info,
    threshold_mean,
    threshold_universal,
    token_entropy,
)

__version__ = "0.1.0"

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
]
