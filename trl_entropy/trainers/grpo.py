"""EntropyGRPOTrainer: TRL's GRPOTrainer with EM-RL entropy rewards and forking-token masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import GRPOConfig, GRPOTrainer

from ._entropy import EntropyMethodsArguments, EntropyTrainerMixin, entropy_settings
from ._model_card import EntropyModelCardMixin

# How each GRPO `loss_type` of TRL 1.16 normalises its token losses, which decides what
# `forking_token_normalization="selected"` does (see `forking_normalization_weights`).
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


@dataclass
class EntropyGRPOConfig(EntropyMethodsArguments, GRPOConfig):
    """[`~trl.GRPOConfig`] plus the entropy fields of :class:`~trl_entropy.trainers.EntropyMethodsArguments`.

    Every GRPO option keeps its meaning. Label-free EM-RL as in Agarwal et al. (2025):
    ``EntropyGRPOConfig(entropy_reward="token", temperature=1.0, beta=0.001, ...)`` with no reward functions;
    forking tokens as in Wang et al. (2025): ``forking_token_ratio=0.2``. TRL's ``top_entropy_quantile`` is the
    older form of the same mask and can not be combined with ``forking_token_ratio``.

    The forking-token mask needs token-level importance sampling (``importance_sampling_level="token"``): with
    ``"sequence"`` (GSPO, and ``loss_type="luspo"``, which requires it) every token's log-prob enters the sequence
    ratio, so a token mask can not restrict the gradient; that pair is refused.
    """

    def __post_init__(self):
        self._validate_entropy_fields()
        if self.forking_tokens_enabled and self.importance_sampling_level == "sequence":
            raise ValueError(
                "`forking_token_ratio` < 1 needs `importance_sampling_level='token'`: with 'sequence' every token's "
                "log-prob enters the sequence ratio, so the mask can not restrict the gradient (got "
                f"forking_token_ratio={self.forking_token_ratio}, importance_sampling_level='sequence')."
            )
        super().__post_init__()


class EntropyGRPOTrainer(EntropyModelCardMixin, EntropyTrainerMixin, GRPOTrainer):
    """Drop-in replacement for [`~trl.GRPOTrainer`] with entropy rewards and forking-token masks.

    The constructor is GRPOTrainer's (a plain [`~trl.GRPOConfig`] is accepted and runs GRPOTrainer unchanged),
    except that ``reward_funcs`` may be omitted when ``args.entropy_reward`` is set (label-free training). The
    algorithm, step by step:

    1. generate completions as GRPO does, recording each step's entropy (or log-prob) from the logits generation
       already produces, or reusing GRPO's old-log-probs pass when it makes one (vLLM falls back to one chunked
       forward);
    2. turn it into a per-completion reward (``entropy_reward``) weighted next to the user's rewards by TRL;
    3. compute GRPO advantages and loss; if ``forking_token_ratio < 1`` the token loss is restricted to the exact
       top-``ceil(rho * n)`` entropy tokens of the micro-batch (through GRPO's ``get_high_entropy_mask`` hook),
       normalised per ``forking_token_normalization`` for the ``loss_type`` (table in
       docs/methods/forking_tokens.md).

    With every entropy option off it runs GRPOTrainer's code unchanged.
    """

    _config_class = EntropyGRPOConfig
    _trl_name = "GRPO"

    def __init__(self, model, reward_funcs=None, args: EntropyGRPOConfig | None = None, *pos_args, **kwargs):
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)
        if entropy_settings(self).forking_tokens_enabled:
            # GRPO calls `get_high_entropy_mask` only when this is < 1; the exact selection is ours (below).
            self.top_entropy_quantile = self.args.forking_token_ratio

    def _forking_aggregation(self) -> str:
        return LOSS_AGGREGATION[self.loss_type]

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        if not entropy_settings(self).forking_tokens_enabled:  # TRL's own `top_entropy_quantile` (or a bare object)
            return super().get_high_entropy_mask(entropies, mask, threshold)
        return self.forking_token_weights(entropies, mask)
