"""EntropyRLOOTrainer: TRL's RLOOTrainer with EM-RL entropy rewards and forking-token masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trl
from trl import RLOOConfig, RLOOTrainer

from ._entropy import FORKING_NORMALIZATIONS, EntropyMethodsArguments, EntropyTrainerMixin, trainer_entropy_options
from ._model_card import EntropyModelCardMixin
from ._stats import EntropyStatsMixin
from ._trl import RLOO_GENERATE_FIELDS, SUPPORTED_TRL


@dataclass
class EntropyRLOOConfig(EntropyMethodsArguments, RLOOConfig):
    """[`~trl.RLOOConfig`] plus the entropy fields of :class:`~trl_entropy.trainers.EntropyMethodsArguments`.

    The EM paper's strongest label-free result (EM-RL-token, 42.9 average on five maths benchmarks with
    Qwen2.5-Math-7B) uses the RLOO estimator: ``EntropyRLOOConfig(entropy_reward="token", num_generations=4,
    learning_rate=1e-6, temperature=1.0, beta=0.0)``. The paper's KL (0.001, a per-token ``low_var_kl`` loss term)
    has no RLOO counterpart in TRL: RLOO's ``beta`` subtracts ``beta * sum_t (log pi_old - log pi_ref)`` from each
    completion's reward, a summed log-ratio that grows with length while the entropy reward is a per-token mean;
    see docs/methods/em_rl.md for what to set.

    ``forking_token_normalization`` defaults to ``"all"`` here and ``"selected"`` is refused with the mask on: RLOO's
    loss is one importance ratio per completion, with no token count to renormalise (docs/methods/forking_tokens.md).
    """

    forking_token_normalization: str = field(
        default="all",
        metadata={
            "help": "RLOO: 'all' only (the mask restricts which tokens enter the sequence log-probability ratio; "
            "there is no token normaliser to change).",
            "choices": list(FORKING_NORMALIZATIONS),
        },
    )

    def __post_init__(self):
        self._validate_entropy_fields()
        if self.forking_tokens_enabled and self.forking_token_normalization == "selected":
            raise ValueError(
                "`forking_token_normalization='selected'` is not defined for RLOO (its loss has no token normaliser): "
                f"use 'all' with `forking_token_ratio`={self.forking_token_ratio}."
            )
        super().__post_init__()


class EntropyRLOOTrainer(EntropyModelCardMixin, EntropyStatsMixin, EntropyTrainerMixin, RLOOTrainer):
    """Drop-in replacement for [`~trl.RLOOTrainer`] with entropy rewards and forking-token masks.

    A plain [`~trl.RLOOConfig`] is accepted and runs RLOOTrainer unchanged; with an entropy option on the trainer also
    attaches :class:`~trl_entropy.callbacks.EntropyStatsCallback` (the config's ``entropy_stats``). The entropy reward
    is read from the pass RLOO already makes with the policy before the rewards (its ``old_logps``), so it costs no
    extra forward.

    RLOO's loss is sequence-level: one clipped ratio per completion, ``r = exp(sum_t m_t (log pi(y_t) - log
    pi_old(y_t)))`` with ``m`` the completion mask. With ``forking_token_ratio < 1`` the mask restricts which tokens
    enter that sum: RLOO's own ``_compute_loss`` runs unchanged (aux loss, multimodal inputs, metrics), but the
    per-token log-probs it receives are ``log pi(y_t)`` on the forking tokens of the micro-batch and the constant
    ``log pi_old(y_t)`` elsewhere, so an unselected token adds 0 to the log-ratio and no gradient:

        r = exp(sum_{t selected} (log pi(y_t) - log pi_old(y_t))).

    Selecting every token gives RLOOTrainer's loss and gradient exactly. On-policy the gradient is
    ``-(1/B) sum_i A_i sum_{t selected} grad log pi(y_t)``: the RLOO gradient without the unselected tokens' terms
    (``forking_token_normalization="all"``, the only value RLOO accepts).
    """

    _config_class = EntropyRLOOConfig
    _trl_name = "RLOO"
    _generate_fields = RLOO_GENERATE_FIELDS
    _old_per_token_logps: torch.Tensor | None = None
    _forking_loss_batch: dict | None = None  # the micro-batch whose loss pass is running, while the mask is on

    def _needs_old_per_token_logps(self) -> bool:
        return trainer_entropy_options(self).forking_tokens_enabled

    def _on_policy_pass(self, logps: torch.Tensor) -> None:
        self._old_per_token_logps = logps if trainer_entropy_options(self).forking_tokens_enabled else None

    def _add_to_scored_batch(self, output: dict) -> dict:
        if trainer_entropy_options(self).forking_tokens_enabled:
            observed, self._old_per_token_logps = self._old_per_token_logps, None
            # The per-token values must be those RLOO summed into its `old_logps`: check it, bit for bit.
            summed = None if observed is None else (observed * output["completion_mask"]).sum(1)
            if summed is None or not torch.allclose(summed, output["old_logps"], rtol=0, atol=0, equal_nan=True):
                raise RuntimeError(
                    "The forking-token mask needs the per-token log-probs of RLOO's policy pass, and the first policy "
                    f"pass of the batch is not the one RLOO summed into `old_logps`: trl-entropy reads TRL "
                    f"{SUPPORTED_TRL}'s RLOOTrainer, and TRL {trl.__version__} is installed."
                )
            output["old_per_token_logps"] = observed
        return output

    def _compute_loss(self, model, inputs):
        if not trainer_entropy_options(self).forking_tokens_enabled:
            return super()._compute_loss(model, inputs)
        self._forking_loss_batch = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._forking_loss_batch = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        batch, self._forking_loss_batch = self._forking_loss_batch, None  # only the loss pass's one call
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        if batch is None:
            return logps, entropies, aux_loss
        selected, _, _ = self.forking_token_selection(entropies, batch["completion_mask"])
        # Unselected tokens carry the old log-prob, a constant: they add 0 to RLOO's sequence log-ratio.
        return torch.where(selected, logps, batch["old_per_token_logps"].to(logps.dtype)), entropies, aux_loss
