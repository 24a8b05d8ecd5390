"""What the trainers read from TRL's private hooks, written down once, for the pinned TRL minor version.

The trainers override private TRL methods (their names and return values change between minor releases), so the
package refuses any other TRL minor version at import instead of misreading a hook's result at run time.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import trl
from packaging.version import Version

SUPPORTED_TRL = "1.16"
"""The TRL minor version whose private hooks the trainers override."""
SUPPORTED_TRL_RANGE = ">=1.16,<1.17"
"""The same, as the requirement ``pyproject.toml`` pins."""


def check_trl_version(version: str = trl.__version__) -> None:
    """Raise ImportError unless ``version`` is a release of :data:`SUPPORTED_TRL`."""
    parsed = Version(version)
    if f"{parsed.major}.{parsed.minor}" != SUPPORTED_TRL:
        raise ImportError(
            f"trl-entropy's trainers override private hooks of TRL {SUPPORTED_TRL}, but TRL {version} is installed: "
            f"`pip install 'trl{SUPPORTED_TRL_RANGE}'`."
        )


# What `_generate(prompts)` returns in TRL 1.16, by trainer (a plain tuple, documented only by TRL's code).
GRPO_GENERATE_FIELDS = (
    "prompt_ids",
    "completion_ids",
    "tool_mask",
    "completions",
    "logprobs",
    "extra_fields",
    "images",
    "tool_images",
)
RLOO_GENERATE_FIELDS = ("prompt_ids", "completion_ids", "completions")


def generate_fields(result: Sequence[Any], names: Sequence[str], trainer_name: str) -> dict[str, Any]:
    """``result`` of ``<trainer_name>._generate`` as a dict keyed by ``names``; a RuntimeError naming the TRL versions
    when its length is not that of TRL 1.16's tuple (another TRL release changed the hook)."""
    if not isinstance(result, tuple) or len(result) != len(names):
        size = len(result) if isinstance(result, tuple) else type(result).__name__
        raise RuntimeError(
            f"{trainer_name}._generate returned {size} values; trl-entropy reads TRL {SUPPORTED_TRL}'s {len(names)} "
            f"({', '.join(names)}), and TRL {trl.__version__} is installed."
        )
    return dict(zip(names, result))


@functools.cache
def multimodal_forward_names() -> tuple[str, ...]:
    """The keyword arguments of TRL's ``GRPOTrainer._get_per_token_logps_and_entropies`` that carry multimodal inputs
    (``pixel_values``, ``image_grid_thw``, ...): what TRL's own loss passes from a batch to the model, read from the
    hook's signature so that a field TRL adds is passed too."""
    from trl import GRPOTrainer

    text_only = {
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    }
    parameters = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    return tuple(name for name in parameters if name not in text_only)
