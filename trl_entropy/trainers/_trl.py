"""The TRL contract, in one file: everything the trainers copy or read from TRL's private code, for the pinned TRL
minor version, each entry naming the TRL 1.16 file and function it mirrors.

The trainers override private TRL methods (their names and return values change between minor releases), so the
package refuses any other TRL minor version at import instead of misreading a hook's result at run time. A TRL
upgrade is a review of this file: the tuple layouts, the conditions copied from TRL, the loss aggregations and the
placeholder reward below. docs/compatibility.md drafts the three TRL hooks that would make most of it unnecessary.
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


# What `_generate(prompts)` returns in TRL 1.16, by trainer (a plain tuple, documented only by TRL's code):
# trl/trainer/grpo_trainer.py `GRPOTrainer._generate` and trl/trainer/rloo_trainer.py `RLOOTrainer._generate`.
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


# How each GRPO `loss_type` of TRL 1.16 normalises its token losses (trl/trainer/grpo_trainer.py
# `GRPOTrainer._compute_loss`: "grpo"/"sapo" average each sequence, "dapo"/"bnpo"/"cispo"/"vespo" sum over the batch's
# tokens, "dr_grpo"/"luspo" divide by a constant), which decides what `forking_token_normalization="selected"` does
# (see `forking_normalization_weights`). A loss type TRL adds later is refused with "selected" at config time (its
# normaliser is unknown here); "all" needs no entry.
LOSS_AGGREGATION = {
    "dapo": "token",
    "bnpo": "token",
    "cispo": "token",
    "vespo": "token",
    "grpo": "sequence",
    "sapo": "sequence",
    "dr_grpo": "constant",
    "luspo": "constant",
}


def is_multimodal(inputs: list[dict]) -> bool:
    """Whether a batch carries images: TRL's own test in trl/trainer/grpo_trainer.py
    `GRPOTrainer._generate_and_score_completions` (an ``images`` or ``image`` column)."""
    return any(row.get("images") or row.get("image") is not None for row in inputs if isinstance(row, dict))


def plain_generate(trainer: Any) -> bool:
    """Whether ``trainer``'s completions come from transformers ``generate`` on this process, whose logits a forward
    hook sees: none of the other generators that trl/trainer/grpo_trainer.py `GRPOTrainer._generate` and
    `_generate_single_turn` dispatch to (vLLM, continuous batching, a ``rollout_func``, the tool-call loop)."""
    return not (
        getattr(trainer, "use_vllm", False)
        or getattr(trainer, "use_transformers_continuous_batching", False)
        or getattr(trainer, "rollout_func", None) is not None
        or getattr(trainer, "tools", None)
    )


def scores_the_policy(trainer: Any, model: Any) -> bool:
    """Whether a ``_get_per_token_logps_and_entropies`` pass with ``model`` runs the policy: ``trainer.model``, and for
    a PEFT policy with its adapters active. trl/trainer/grpo_trainer.py `GRPOTrainer._generate_and_score_completions`
    scores a PEFT reference with the same module, adapters disabled or its ``"ref"`` adapter active."""
    if model is not trainer.model:
        return False
    unwrapped = trainer.accelerator.unwrap_model(model)
    if getattr(unwrapped, "peft_config", None) is None:
        return True
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in unwrapped.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer is None or (not layer.disable_adapters and "ref" not in layer.active_adapters)


def no_reward(completions: list, **kwargs) -> list[float]:
    """Placeholder reward for EM-FT: TRL 1.16's `GRPOTrainer.__init__` (trl/trainer/grpo_trainer.py) needs at least one
    reward source, and EM-FT has none; :class:`~trl_entropy.trainers.EMFTTrainer` never calls it."""
    return [0.0] * len(completions)
