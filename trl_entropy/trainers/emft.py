"""EM-FT: entropy-minimisation fine-tuning on the model's own samples (Agarwal et al., 2025, arXiv 2505.15134, §2).

The model samples completions for unlabelled prompts and is trained to minimise the mean token entropy of its own
next-token distributions over those completion tokens, differentiated directly: no labels, no rewards, no policy
gradient. :class:`EMFTTrainer` reuses TRL's :class:`~trl.GRPOTrainer` for everything but the objective: prompt
batching, sampling (transformers ``generate`` or vLLM), the reference model, PEFT, logging and gradient accumulation.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ..hardware import warn_if_slow_bf16
from ._entropy import validate_sampling_fields
from ._model_card import EntropyModelCardMixin
from ._signal_hooks import CompletionSignalsMixin
from ._stats import EntropyStatsArguments, EntropyStatsMixin
from ._trl import GRPO_GENERATE_FIELDS, SUPPORTED_TRL, multimodal_forward_names, no_reward

__all__ = ["EMFTConfig", "EMFTTrainer"]

ENTROPY_NORMALIZATIONS = ("token", "sequence")


@dataclass
class EMFTConfig(EntropyStatsArguments, GRPOConfig):
    r"""
    Configuration of :class:`EMFTTrainer`: entropy-minimisation fine-tuning (EM-FT) of Agarwal et al. (2025).

    Everything of :class:`~trl.GRPOConfig` that concerns prompts and sampling applies unchanged (``temperature``,
    ``top_p``, ``max_completion_length``, ``use_vllm``, ``generation_batch_size``, ``steps_per_generation``,
    ``mask_truncated_completions``...). The reward and policy-gradient fields (``loss_type``, ``epsilon``,
    ``scale_rewards``, ``importance_sampling_level``...) are ignored: EM-FT has no reward.

    The objective, per optimisation window, is

        L = mean over completion tokens of [ max(H_t - entropy_floor, 0) + beta * KL_t ]

    where ``H_t`` is the entropy (nats) of ``softmax(logits_t / temperature)`` over the full vocabulary at completion
    position ``t`` (at the sampling ``temperature``, 1.0 by default) and ``KL_t`` TRL's per-token
    estimate of ``KL(policy || reference)`` on the sampled token. With the defaults (``entropy_floor=0``, ``beta=0``)
    this is exactly the paper's EM-FT loss. The completions are fixed data for the loss: the gradient flows through
    the entropies only, never through the sampling.

    Samples per prompt: EMFTTrainer samples through GRPOTrainer, and TRL 1.16's GRPOConfig requires
    ``num_generations >= 2`` (GRPO's group baseline, which EM-FT does not use). The paper's one sample per prompt is
    therefore not available on TRL 1.16; the default is two samples of half as many prompts, the same objective (the
    mean token entropy over the model's own samples) with each prompt's two samples drawn independently.

    Parameters:
        num_samples_per_prompt (`int`, *optional*, defaults to `2`):
            Completions sampled per prompt, ``>= 2`` on TRL 1.16 (see above; the paper samples one). TRL's
            ``num_generations`` is set from it (leave ``num_generations`` unset); the generation batch must be
            divisible by it.
        entropy_normalization (`str`, *optional*, defaults to `"token"`):
            How token entropies are averaged. ``"token"``: one mean over all completion tokens of the batch, so a
            long completion weighs more (the paper's "mean over completion tokens"). ``"sequence"``: the mean of each
            completion's own token mean, so every completion weighs the same whatever its length. The sums are
            divided by the token (or non-empty completion) count of the whole generation batch, gathered over
            processes, as TRL's ``"dapo"`` loss does, so the mean is exact under gradient accumulation and data
            parallelism when ``steps_per_generation == gradient_accumulation_steps`` (the default). Otherwise each
            optimizer step uses its proportional share of that count.
        entropy_floor (`float`, *optional*, defaults to `0.0`):
            Hinge against entropy collapse, in nats, ``>= 0``: a token contributes ``max(H_t - floor, 0)``, so tokens
            already below the floor get no gradient. ``0`` (off) is the paper's loss: it trains only ~40 steps and
            uses no guard. Longer runs risk entropy collapse (confident tokens driven to one-hot, repetition, a
            known failure mode of confidence objectives); a floor of a few tenths of a nat stops the push on tokens
            that are already confident. That range is a starting point, not a tuned value.
        beta (`float`, *optional*, defaults to `0.0`):
            The KL guard (TRL's field, reused): weight ``>= 0`` of TRL's k3 estimate of ``KL(policy || reference)``
            on the sampled tokens, added to every token's objective. ``0`` (the paper, no reference model) loads no
            reference model. With PEFT the reference is the base model with the adapter disabled.
        log_entropy_after (`bool`, *optional*, defaults to `True`):
            After each optimizer step, re-measure the mean token entropy of the step's own batch with the updated
            weights and log it as ``emft/entropy_after`` next to ``emft/entropy_before`` (the loss pass) and their
            difference ``emft/entropy_change``. Costs one extra forward pass without gradient per optimizer step
            (about a third of the optimisation time, far less than sampling). Set ``False`` to skip it.
        entropy_stats (`bool` or `None`, *optional*, defaults to `None`):
            Attach :class:`~trl_entropy.callbacks.EntropyStatsCallback` (`None` or `True`; EM-FT is an entropy method,
            so auto means on) or not (`False`); see :class:`~trl_entropy.trainers._stats.EntropyStatsArguments`.
        vllm_importance_sampling_correction (`bool`, *optional*, defaults to `False`):
            TRL's field with a different default: the EM-FT loss treats the sampled completions as fixed data and
            differentiates only the entropy, so the sampler-vs-trainer log-prob ratio has no use. Turning it on only
            costs an extra forward pass.
    """

    # EM-FT's own fields
    num_samples_per_prompt: int = field(
        default=2,
        metadata={
            "help": "Completions sampled per prompt, >= 2 on TRL 1.16 (its GRPOConfig requires num_generations >= 2; "
            "the paper samples 1). Sets TRL's `num_generations`; the generation batch must be divisible by it."
        },
    )
    entropy_normalization: str = field(
        default="token",
        metadata={
            "help": "'token': one mean over all completion tokens of the batch (paper). 'sequence': mean of each "
            "completion's token mean. Exact under gradient accumulation with the default steps_per_generation.",
            "choices": list(ENTROPY_NORMALIZATIONS),
        },
    )
    entropy_floor: float = field(
        default=0.0,
        metadata={
            "help": "Hinge against collapse, nats >= 0: each token contributes max(H_t - floor, 0). 0 (off) is the "
            "paper's loss; a few tenths of a nat guard longer runs."
        },
    )
    log_entropy_after: bool = field(
        default=True,
        metadata={
            "help": "Re-measure the step's batch entropy after each optimizer step (`emft/entropy_after`); one extra "
            "forward pass without gradient per step."
        },
    )

    # GRPOConfig fields whose meaning or default changes for EM-FT
    num_generations: int | None = field(
        default=None,
        metadata={"help": "Set from `num_samples_per_prompt`; leave unset (or equal to it)."},
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "Off for EM-FT: the loss differentiates only the entropy of fixed samples, so the sampling "
            "log-prob ratio is unused."
        },
    )

    def __post_init__(self):
        samples = self.num_samples_per_prompt
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ValueError(
                f"`num_samples_per_prompt` must be an integer >= 2, got {samples!r}: EMFTTrainer samples through TRL "
                f"{SUPPORTED_TRL}'s GRPOConfig, which requires num_generations >= 2 (the paper's 1 sample per prompt "
                "is not available on it)."
            )
        if self.num_generations is not None and self.num_generations != samples:
            raise ValueError(
                f"`num_generations` is set from `num_samples_per_prompt` in EM-FT; leave it unset, got "
                f"{self.num_generations} (num_samples_per_prompt={samples})."
            )
        validate_sampling_fields(self)  # temperature, max_completion_length, beta, top_entropy_quantile
        if self.entropy_normalization not in ENTROPY_NORMALIZATIONS:
            raise ValueError(
                f"`entropy_normalization` must be one of {ENTROPY_NORMALIZATIONS}, got {self.entropy_normalization!r}."
            )
        if not (math.isfinite(self.entropy_floor) and self.entropy_floor >= 0):
            raise ValueError(f"`entropy_floor` must be a finite number >= 0 (nats), got {self.entropy_floor}.")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"`beta` (the KL weight) must be a finite number >= 0, got {self.beta}.")
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                "`entropy_coef` and `use_adaptive_entropy` (GRPO's entropy bonus) must stay at 0.0 / False in EM-FT, "
                f"whose loss is the entropy itself; got entropy_coef={self.entropy_coef}, "
                f"use_adaptive_entropy={self.use_adaptive_entropy}."
            )
        if self.top_entropy_quantile != 1.0:
            raise ValueError(
                f"`top_entropy_quantile` must be 1.0 in EM-FT (every completion token is minimised), got "
                f"{self.top_entropy_quantile}."
            )
        if self.reward_weights is not None:
            raise ValueError("`reward_weights` must be None: EM-FT uses no reward functions.")

        self.num_generations = samples
        super().__post_init__()


class _EntropyAfterUpdateCallback(TrainerCallback):
    """Hands each optimizer step to :meth:`EMFTTrainer._log_entropy_update` (``on_optimizer_step`` runs after
    ``optimizer.step()`` and before the gradients are zeroed and the step's metrics are logged)."""

    def __init__(self, trainer: EMFTTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._log_entropy_update()


class EMFTTrainer(EntropyModelCardMixin, EntropyStatsMixin, CompletionSignalsMixin, GRPOTrainer):
    """Entropy-minimisation fine-tuning (EM-FT, Agarwal et al., 2025): minimise the mean token entropy of the model's
    own sampled completions, with no labels and no rewards.

    A :class:`~trl.GRPOTrainer` whose reward step is skipped and whose loss is replaced:

    * prompts are batched and completions sampled by TRL (transformers ``generate``, or vLLM with ``use_vllm``);
    * ``_calculate_rewards`` returns zeros without calling anything (TRL still needs a reward source to construct,
      so an internal placeholder is registered);
    * ``_compute_loss`` takes the token entropies from TRL's fused LM head through
      ``_get_per_token_logps_and_entropies(..., compute_entropy=True)`` (differentiable, at ``logits / temperature``,
      no ``[B, T, V]`` logits materialised);
    * callbacks that observe per-token signals (e.g. :class:`~trl_entropy.callbacks.EntropyStatsCallback`, see
      :mod:`trl_entropy.signals`) get them once per generation batch, as from the other trainers of this package.

    Logged metrics, besides TRL's (``completions/mean_length``...): ``entropy`` (mean token entropy of each
    micro-batch), ``emft/entropy_before`` and ``emft/entropy_after`` (the optimisation window's mean token entropy
    before and after the optimizer step, on the same tokens), ``emft/entropy_change``, ``kl`` when ``beta > 0`` and
    ``emft/frac_above_floor`` when ``entropy_floor > 0``.

    Args:
        model: a model id / path, or a :class:`~transformers.PreTrainedModel` (e.g. from
            :func:`trl_entropy.load_default_model`).
        args: an :class:`EMFTConfig`; defaults to ``EMFTConfig("<model>-EMFT")``.
        train_dataset: prompts only, in a ``"prompt"`` column (text or chat messages); other columns are ignored.
        eval_dataset: optional prompts for evaluation; the eval loss is the same entropy objective.
        processing_class: the tokenizer; loaded from ``model`` when omitted.
        callbacks: extra :class:`~transformers.TrainerCallback` objects.
        optimizers: ``(optimizer, lr_scheduler)``, as in :class:`~transformers.Trainer`.
        peft_config: a PEFT config (e.g. ``LoraConfig``) to train an adapter instead of the full model.
    """

    _generate_fields = GRPO_GENERATE_FIELDS
    _tag_names = ["trl", "trl-entropy", "emft"]
    _name = "EM-FT"
    _paper = {
        "title": "The Unreasonable Effectiveness of Entropy Minimization in LLM Reasoning",
        "id": "2505.15134",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{agarwal2025unreasonable,
                title        = {{The Unreasonable Effectiveness of Entropy Minimization in LLM Reasoning}},
                author       = {Shivam Agarwal and Zimin Zhang and Lifan Yuan and Jiawei Han and Hao Peng},
                year         = 2025,
                eprint       = {arXiv:2505.15134},
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: EMFTConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = EMFTConfig(f"{name.rstrip('/').split('/')[-1]}-EMFT")
        elif not isinstance(args, EMFTConfig):
            raise TypeError(f"`args` must be an EMFTConfig, got {type(args).__name__}.")
        warn_if_slow_bf16(args)
        super().__init__(
            model=model,
            reward_funcs=[no_reward],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        # Micro-batches (and their entropy sum / token count) of the current optimisation window, for the
        # before/after entropy log at the optimizer step.
        self._window_batches: list[dict[str, Any]] = []
        self._window_entropy: torch.Tensor | None = None
        self._window_model = None
        self.add_callback(_EntropyAfterUpdateCallback(self))

    def _entropy_methods_on(self) -> bool:
        return True  # EM-FT's loss is the entropy: `entropy_stats=None` attaches EntropyStatsCallback

    # ------------------------------------------------------------------------------------------------------------
    # Rewards: none.
    # ------------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._complete_signals(inputs)  # for the observers; no reward function is called
        # The gathered [global batch, n_funcs] shape TRL expects, all zeros: advantages are zero and unused.
        local = torch.zeros(len(prompts), len(self.reward_funcs), device=self.accelerator.device)
        return self.accelerator.gather(local)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        # TRL's reward statistics are constant zeros here; drop them so logs show only meaningful metrics.
        reward_keys = ["reward", "reward_std", "frac_reward_zero_std"]
        reward_keys += [f"rewards/{name}/{stat}" for name in self.reward_func_names for stat in ("mean", "std")]
        for key in reward_keys:
            self._metrics[mode].pop(key, None)
        # Completions with at least one loss token, over the whole generation batch and all processes: the
        # denominator of the "sequence" normalisation (TRL already provides `num_items_in_batch` for "token").
        mask = output["completion_mask"] * output["tool_mask"] if "tool_mask" in output else output["completion_mask"]
        output["num_sequences_in_batch"] = self.accelerator.gather((mask.sum(-1) > 0).sum()).sum()
        return output

    # ------------------------------------------------------------------------------------------------------------
    # Loss.
    # ------------------------------------------------------------------------------------------------------------

    def _window_share(self, global_count: torch.Tensor, mode: str) -> torch.Tensor:
        """This process's share of a count over the generation batch, for one micro-batch's loss denominator.

        Summing the micro-batch losses of an optimisation window and averaging gradients over processes then gives
        the exact mean over the window (the convention of TRL's "dapo" loss, whose ``loss_is_scaled_for_ga`` tells the
        Trainer not to divide again).
        """
        share = global_count.clamp(min=1) / self.accelerator.num_processes
        if mode == "train":
            accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            share = share * accumulation / self.args.steps_per_generation
        return share

    def _global_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Masked mean over all processes; NaN when there is no valid token (never a fake 0)."""
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]).detach().float(), "sum")
        return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.to(torch.float32)
        # Image inputs, exactly as TRL's own loss passes them from the batch to the model.
        multimodal = {name: inputs.get(name) for name in multimodal_forward_names()}

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **multimodal,
        )

        floor = self.args.entropy_floor
        per_token = (entropies - floor).clamp(min=0.0) if floor > 0 else entropies
        if self.beta != 0.0:
            ref_logps = inputs["ref_per_token_logps"]
            # k3 estimator of KL(policy || reference) on the sampled token (the estimator TRL's GRPO uses).
            per_token_kl = torch.exp(ref_logps - per_token_logps) - (ref_logps - per_token_logps) - 1
            per_token = per_token + self.beta * per_token_kl

        if self.args.entropy_normalization == "token":
            loss = (per_token * mask).sum() / self._window_share(inputs["num_items_in_batch"], mode)
        else:
            per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            loss = per_sequence.sum() / self._window_share(inputs["num_sequences_in_batch"], mode)

        if self.aux_loss_enabled:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())

        self._metrics[mode]["entropy"].append(self._global_mean(entropies, mask))
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self._global_mean(per_token_kl, mask))
        if floor > 0:
            self._metrics[mode]["emft/frac_above_floor"].append(self._global_mean((entropies > floor).float(), mask))

        if mode == "train":
            self._window_model = model
            self._window_batches.append(
                {
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "logits_to_keep": logits_to_keep,
                    "mask": mask,
                    "multimodal": multimodal,
                }
            )
            stats = torch.stack([(entropies.detach() * mask).sum(), mask.sum()])
            self._window_entropy = stats if self._window_entropy is None else self._window_entropy + stats
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # Entropy before / after each optimizer step.
    # ------------------------------------------------------------------------------------------------------------

    def _window_entropy_after(self) -> torch.Tensor:
        """Entropy sum and token count of the window's micro-batches under the just-updated weights."""
        stats = torch.zeros(2, device=self.accelerator.device)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for batch in self._window_batches:
                _, entropies, _ = self._get_per_token_logps_and_entropies(
                    self._window_model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["logits_to_keep"],
                    compute_entropy=True,
                    **batch["multimodal"],
                )
                stats += torch.stack([(entropies * batch["mask"]).sum(), batch["mask"].sum()])
        # ZeRO-3 prefetches parameters along the training forward's trace; this extra forward, outside the training
        # step, can leave some in flight, and a callback that then gathers them fails ("Cannot partition a param in
        # flight"). DeepSpeed's engine waits for and releases them all.
        release = getattr(self.model_wrapped, "empty_partition_cache", None) if self.is_deepspeed_enabled else None
        if release is not None:
            release()
        return stats

    def _log_entropy_update(self) -> None:
        """Log the window's mean token entropy before and after the optimizer step, then reset the window."""
        if not self._window_batches:
            return
        before = self.accelerator.reduce(self._window_entropy, "sum")
        before_mean = (before[0] / before[1]).item() if before[1] > 0 else float("nan")
        self._metrics["train"]["emft/entropy_before"].append(before_mean)
        if self.args.log_entropy_after:
            after = self.accelerator.reduce(self._window_entropy_after(), "sum")
            after_mean = (after[0] / after[1]).item() if after[1] > 0 else float("nan")
            self._metrics["train"]["emft/entropy_after"].append(after_mean)
            self._metrics["train"]["emft/entropy_change"].append(after_mean - before_mean)
        self._window_batches = []
        self._window_entropy = None
