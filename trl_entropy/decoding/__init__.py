"""Decoding: the package's one decoding loop and its per-step entropy recorder (:mod:`.loop`), the inference-time
logit adjustments EM-INF and adaptive temperature (:mod:`.em_inf`) and their logits processors (:mod:`.processors`)."""

from .em_inf import EMInfResult, adaptive_temperature, em_inf_gradient, em_inf_logits
from .loop import (
    Completion,
    Decoder,
    GenerationEntropyRecorder,
    end_token_ids,
    render_prompt,
    truncation_rate,
)
from .processors import (
    VLLM_EXTRA_ARGS_KEY,
    AdaptiveTemperatureConfig,
    AdaptiveTemperatureLogitsProcessor,
    EMInfConfig,
    EMInfLogitsProcessor,
    EMInfRequestLogitsProcessor,
    apply_em_inf_to_rows,
    em_inf_config_from_extra_args,
    make_vllm_logits_processor_class,
)

__all__ = [
    "EMInfResult",
    "adaptive_temperature",
    "em_inf_gradient",
    "em_inf_logits",
    "Completion",
    "Decoder",
    "GenerationEntropyRecorder",
    "end_token_ids",
    "render_prompt",
    "truncation_rate",
    "EMInfConfig",
    "EMInfLogitsProcessor",
    "AdaptiveTemperatureConfig",
    "AdaptiveTemperatureLogitsProcessor",
    "EMInfRequestLogitsProcessor",
    "em_inf_config_from_extra_args",
    "apply_em_inf_to_rows",
    "make_vllm_logits_processor_class",
    "VLLM_EXTRA_ARGS_KEY",
]
