"""EntropyGRPOTrainer: TRL's GRPOTrainer with EM-RL entropy rewards and forking-token masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import GRPOConfig, GRPOTrainer

from ._entropy import EntropyMethodsArguments, EntropyTrainerMixin, trainer_entropy_options
from ._model_card import EntropyModelCardMixin
from ._stats import EntropyStatsMixin
from ._trl import GRPO_GENERATE_FIELDS, LOSS_AGGREGATION, SUPPORTED_TRL


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
        if self.forking_tokens_enabled and self.forking_token_normalization == "selected":
            aggregation = LOSS_AGGREGATION.get(self.loss_type)
            if aggregation is None:
                raise ValueError(
                    f"`forking_token_normalization='selected'` is defined for the loss types of TRL {SUPPORTED_TRL} "
                    f"({', '.join(LOSS_AGGREGATION)}), got loss_type={self.loss_type!r}: use "
                    "`forking_token_normalization='all'`."
                )
            if aggregation == "sequence" and (self.entropy_coef != 0.0 or self.use_adaptive_entropy):
                # TRL's entropy bonus averages over `mask * weights`; per-row weights would turn it into a weighted
                # mean, not its mean over the selected tokens.
                raise ValueError(
                    "GRPO's entropy bonus (`entropy_coef`, `use_adaptive_entropy`) with `forking_token_ratio` < 1 and "
                    f"`forking_token_normalization='selected'` needs a token-mean loss type, got loss_type="
                    f"{self.loss_type!r}: use `forking_token_normalization='all'` or a loss type among "
                    f"{[name for name, kind in LOSS_AGGREGATION.items() if kind != 'sequence']}."
                )
        super().__post_init__()


class EntropyGRPOTrainer(EntropyModelCardMixin, EntropyStatsMixin, EntropyTrainerMixin, GRPOTrainer):
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

    With an entropy option on it also attaches :class:`~trl_entropy.callbacks.EntropyStatsCallback` (the config's
    ``entropy_stats``, docs/metrics.md); with every entropy option off it runs GRPOTrainer's code unchanged.
    """

    _config_class = EntropyGRPOConfig
    _trl_name = "GRPO"
    _generate_fields = GRPO_GENERATE_FIELDS

    def __init__(self, model, reward_funcs=None, args: EntropyGRPOConfig | None = None, *pos_args, **kwargs):
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)
        if trainer_entropy_options(self).forking_tokens_enabled:
            # GRPO calls `get_high_entropy_mask` only when this is < 1; the exact selection is ours (below).
            self.top_entropy_quantile = self.args.forking_token_ratio

    def _forking_aggregation(self) -> str:
        # Only read under "selected", whose loss types the config checked; "all" weights every selected token 1.
        return LOSS_AGGREGATION.get(self.loss_type, "constant")

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """The forking-token mask, as float weights ``[B, T]`` (TRL's own method returns a bool mask).

        The contract with TRL 1.16's caller (``GRPOTrainer._compute_loss``, tested in
        ``tests/trainers/test_dropin.py``): it
        calls this hook when ``self.top_entropy_quantile < 1``, which this trainer sets to ``forking_token_ratio``
        (the fraction of tokens kept, TRL's meaning of that attribute), multiplies the per-token loss by the result,
        and averages the entropy bonus over ``mask * result``. Weights instead of a bool mask carry the
        ``forking_token_normalization`` of the selected tokens (:func:`forking_normalization_weights`): 0 on an
        unselected token, 1 (``"all"``) or the loss type's renormaliser (``"selected"``) on a selected one.
        ``threshold`` (TRL's quantile) is not used: the selection is the exact top-``ceil(rho n)``.
        """
        # Mask off: TRL's own `top_entropy_quantile` (also for an object built without __init__).
        if not trainer_entropy_options(self).forking_tokens_enabled:
            return super().get_high_entropy_mask(entropies, mask, threshold)
        return self.forking_token_weights(entropies, mask)
