"""What EntropyGRPOTrainer and EntropyRLOOTrainer share: the config fields, the entropy reward and the forking-token
mask. The maths lives in :mod:`trl_entropy.ops`; this module only wires it into TRL's hooks."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..hardware import warn_if_slow_bf16
from ..ops import high_entropy_mask
from ..rewards import entropy_token_reward, entropy_trajectory_reward, self_certainty_reward
from ._signal_hooks import CompletionSignalsMixin
from ._stats import EntropyStatsArguments

ENTROPY_REWARDS = ("none", "token", "trajectory", "self_certainty")
FORKING_MODES = ("top", "bottom")
FORKING_SCOPES = ("global", "local")
FORKING_NORMALIZATIONS = ("selected", "all")

logger = logging.getLogger(__name__)


@dataclass
class EntropyMethodsArguments(EntropyStatsArguments):
    """Entropy fields shared by :class:`EntropyGRPOConfig` and :class:`EntropyRLOOConfig` (with ``entropy_stats``, see
    :class:`~trl_entropy.trainers._stats.EntropyStatsArguments`).

    Parameters:
        entropy_reward (`str`, *optional*, defaults to `"none"`):
            Label-free reward computed from the policy's own distribution at the sampling temperature, over completion
            tokens only (Agarwal et al., 2025, "The Unreasonable Effectiveness of Entropy Minimization in LLM
            Reasoning"). One of:

            - `"none"`: no entropy reward;
            - `"token"`: EM-RL-token, minus the mean token entropy `-(1/|y|) sum_t H_t`;
            - `"trajectory"`: EM-RL-sequence, the mean log-probability of the sampled tokens `(1/|y|) sum_t log
              pi(y_t | y_<t)` (length-normalised as in the official code);
            - `"self_certainty"`: Intuitor's mean `KL(U || pi)` per token (Zhao et al., 2025), for comparison.

            An empty completion has no tokens to score, and a completion whose logits hold NaN or inf has no finite
            entropy: its reward is `None` (NaN) and the whole completion is unscorable (every reward column set to
            NaN, with a warning), so TRL gives it advantage 0 and leaves it out of the logged reward means rather
            than counting the missing entropy reward as 0, the best possible value.
        entropy_reward_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the entropy reward next to the user's reward functions, through TRL's own reward weighting
            (appended to `reward_weights`). Any finite value; 0 logs the reward without training on it.
        forking_token_ratio (`float`, *optional*, defaults to `1.0`):
            Fraction `rho` in `(0, 1]` of completion tokens that receive the policy gradient: the `ceil(rho * n)`
            highest-entropy "forking" tokens (Wang et al., 2025, "Beyond the 80/20 Rule"). 1.0 disables the mask;
            the paper uses 0.2 and finds 0.1 and 0.5 worse on 14B/32B models.
        forking_token_mode (`str`, *optional*, defaults to `"top"`):
            `"top"` trains on the highest-entropy tokens; `"bottom"` on the complement (the paper's ablation: the
            lowest `1 - rho`, which degrades performance). Needs `forking_token_ratio < 1`.
        forking_token_scope (`str`, *optional*, defaults to `"global"`):
            `"global"`: one exact top-k over the tokens of the micro-batch on all ranks together (what a single-GPU
            run would select); `"local"`: per rank, as the paper's code.
        forking_token_normalization (`str`, *optional*, defaults to `"selected"`):
            `"selected"`: the loss is normalised as the trainer's loss type would normalise it if the unselected
            tokens were padding: a token-mean loss (GRPO `loss_type` `"dapo"`, `"bnpo"`, `"cispo"`, `"vespo"`)
            becomes the mean over the selected tokens (paper Eq. 6), so the gradient keeps its scale; a
            sequence-mean loss (`"grpo"`, `"sapo"`) the mean over each completion's selected tokens; `"dr_grpo"`
            keeps its constant normaliser. `"all"`: the selected tokens' loss is normalised by all completion tokens,
            like TRL's `top_entropy_quantile` (the gradient shrinks by about `rho`). RLOO's loss is a sequence
            log-probability ratio with no token normaliser: it accepts only `"all"` (its default), see
            docs/methods/forking_tokens.md for the full table.
    """

    entropy_reward: str = field(
        default="none",
        metadata={
            "help": "Label-free entropy reward: 'none', 'token' (EM-RL), 'trajectory' (EM-RL-seq) or "
            "'self_certainty' (Intuitor).",
            "choices": list(ENTROPY_REWARDS),
        },
    )
    entropy_reward_weight: float = field(
        default=1.0, metadata={"help": "Weight of the entropy reward next to the user's reward functions (finite)."}
    )
    forking_token_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Fraction in (0, 1] of highest-entropy completion tokens that get the policy gradient "
            "(80/20 paper: 0.2). 1.0 disables the mask."
        },
    )
    forking_token_mode: str = field(
        default="top",
        metadata={
            "help": "'top' (forking tokens) or 'bottom' (the complement, an ablation).",
            "choices": list(FORKING_MODES),
        },
    )
    forking_token_scope: str = field(
        default="global",
        metadata={
            "help": "'global': one threshold over all ranks' tokens; 'local': per rank.",
            "choices": list(FORKING_SCOPES),
        },
    )
    forking_token_normalization: str = field(
        default="selected",
        metadata={
            "help": "'selected': normalise the loss as if the unselected tokens were padding (token-mean loss "
            "types: the mean over selected tokens, paper Eq. 6); 'all': by all completion tokens (TRL's "
            "top_entropy_quantile). RLOO: 'all' only.",
            "choices": list(FORKING_NORMALIZATIONS),
        },
    )

    def _validate_entropy_fields(self) -> None:
        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")

        validate_sampling_fields(self)
        for name in ("entropy_reward_weight", "forking_token_ratio"):
            require_number(self, name)
        one_of("entropy_reward", ENTROPY_REWARDS)
        one_of("forking_token_mode", FORKING_MODES)
        one_of("forking_token_scope", FORKING_SCOPES)
        one_of("forking_token_normalization", FORKING_NORMALIZATIONS)
        if not math.isfinite(self.entropy_reward_weight):
            raise ValueError(f"`entropy_reward_weight` must be a finite number, got {self.entropy_reward_weight}.")
        if not (0.0 < self.forking_token_ratio <= 1.0):
            raise ValueError(f"`forking_token_ratio` must be in (0, 1], got {self.forking_token_ratio}.")
        if self.forking_token_mode == "bottom" and self.forking_token_ratio == 1.0:
            raise ValueError(
                "`forking_token_mode='bottom'` trains on the tokens outside the top `forking_token_ratio`, so it "
                "needs "
                "`forking_token_ratio` in (0, 1); with 1.0 it would select nothing."
            )
        if getattr(self, "deepspeed", None) and importlib.util.find_spec("deepspeed") is None:
            # transformers would fail later with an unrelated-looking TypeError.
            raise ImportError("`deepspeed` is set but DeepSpeed is not installed: `pip install deepspeed`.")
        if self.forking_token_ratio < 1.0 and getattr(self, "top_entropy_quantile", 1.0) < 1.0:
            raise ValueError(
                "Set either TRL's `top_entropy_quantile` or `forking_token_ratio`, not both: they are two versions of "
                "the same high-entropy token mask (use `forking_token_ratio`, exact top-k with a choice of scope and "
                "normalisation)."
            )

    @property
    def forking_tokens_enabled(self) -> bool:
        return self.forking_token_ratio < 1.0


def require_number(config: Any, name: str) -> None:
    """A TypeError naming ``name`` unless the field is a real number (a bool or a string such as ``"0.2"`` is not:
    Python would compare it wrongly or fail later with a bare ``TypeError``)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")


def _require_integer(config: Any, name: str, low: int, why: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer >= {low}, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}{why}, got {value}.")


def validate_sampling_fields(config: Any) -> None:
    """Range checks of TRL's own GRPO/RLOO fields that TRL 1.16 leaves unchecked (or checks by dividing by them),
    run before TRL's ``__post_init__``, so that a bad value fails in one line naming the field, at config time, not
    as a ``ZeroDivisionError`` in TRL's config or a transformers error in the first ``generate`` after the model
    loaded. Shared by the GRPO, RLOO and EM-FT configs."""
    require_number(config, "temperature")
    if not (math.isfinite(config.temperature) and config.temperature > 0):
        raise ValueError(
            f"`temperature` (sampling temperature) must be a finite number > 0, got {config.temperature}."
        )
    if config.max_completion_length is not None:
        _require_integer(config, "max_completion_length", 1, " (tokens generated per completion)")
    if getattr(config, "num_generations", None) is not None:
        # TRL divides the generation batch by it before checking its own minimum of 2.
        _require_integer(config, "num_generations", 2, " (completions per prompt; the group baseline needs 2)")
    require_number(config, "beta")
    if not (math.isfinite(config.beta) and config.beta >= 0):
        raise ValueError(f"`beta` (the KL coefficient) must be a finite number >= 0, got {config.beta}.")
    if hasattr(config, "top_entropy_quantile"):
        require_number(config, "top_entropy_quantile")
        if not (0.0 <= config.top_entropy_quantile <= 1.0):
            raise ValueError(
                f"`top_entropy_quantile` (TRL's rho) must be in [0, 1] (1.0 keeps every token), got "
                f"{config.top_entropy_quantile}."
            )


_ENTROPY_OFF = EntropyMethodsArguments()


def config_entropy_options(args: Any) -> EntropyMethodsArguments:
    """``args`` when it carries the entropy fields, else their defaults (every entropy option off), so a plain
    ``GRPOConfig``/``RLOOConfig`` gets TRL's own behaviour."""
    return args if isinstance(args, EntropyMethodsArguments) else _ENTROPY_OFF


def trainer_entropy_options(trainer: Any) -> EntropyMethodsArguments:
    """The entropy fields a trainer runs with (:func:`config_entropy_options` of its ``args``; the defaults also for an
    object built without ``__init__``, as TRL's own unit tests build them)."""
    return config_entropy_options(getattr(trainer, "args", None))


def forking_normalization_weights(
    selected: torch.Tensor, mask: torch.Tensor, normalization: str, aggregation: str, n_valid: int, n_selected: int
) -> torch.Tensor:
    """Float weights ``[B, T]`` that turn a loss aggregated over ``mask`` into the same loss over ``selected`` only.

    ``aggregation`` says how the trainer's loss normalises: ``"token"`` (a sum over tokens divided by a token count:
    the weight ``n_valid / n_selected`` makes it the mean over selected tokens, paper Eq. 6), ``"sequence"`` (each
    completion's mean over its tokens: the weight ``n_valid_i / n_selected_i`` per row makes it the mean over the
    row's selected tokens; a row with none selected contributes 0, as an empty completion does) or ``"constant"`` (a
    normaliser that counts no tokens: weight 1). ``normalization="all"`` gives weight 1 on selected tokens always.
    Unselected tokens get 0.
    """
    weights = selected.to(torch.float32)
    if normalization == "all" or aggregation == "constant":
        return weights
    if aggregation == "token":
        return weights * (n_valid / n_selected) if n_selected > 0 else weights
    row_valid = mask.to(torch.float32).sum(-1)
    row_selected = weights.sum(-1)
    scale = torch.where(row_selected > 0, row_valid / row_selected.clamp(min=1.0), torch.zeros_like(row_valid))
    return weights * scale.unsqueeze(-1)


_BUILTIN_REWARDS = {
    "token": entropy_token_reward,
    "trajectory": entropy_trajectory_reward,
    "self_certainty": self_certainty_reward,
}


class EntropyReward:
    """The reward function that ``entropy_reward`` appends: one of :mod:`trl_entropy.rewards`' functions under the
    logged name ``entropy_token``, ``entropy_trajectory`` or ``self_certainty``.

    It declares the signals its function declares (same signature), so the trainer computes exactly those and passes
    them like to any other reward function; the only difference is the name TRL logs it under
    (``rewards/<name>/mean``).
    """

    def __init__(self, variant: str):
        if variant not in _BUILTIN_REWARDS:
            raise ValueError(f"`entropy_reward` must be one of {list(_BUILTIN_REWARDS)}, got {variant!r}.")
        self.variant = variant
        self.func = _BUILTIN_REWARDS[variant]
        self.__name__ = f"entropy_{variant}" if variant != "self_certainty" else "self_certainty"
        self.__signature__ = inspect.signature(self.func)

    def __call__(self, *args, **kwargs) -> list[float | None]:
        return self.func(*args, **kwargs)


class EntropyTrainerMixin(CompletionSignalsMixin):
    """Adds the entropy reward and the forking-token mask to a TRL online trainer (GRPO or RLOO).

    Subclasses set ``_config_class`` and implement nothing else for the reward. The entropy fields are read
    through :func:`trainer_entropy_options`, so a plain TRL config runs TRL's trainer unchanged. The mixin overrides
    only ``__init__`` (appends the entropy reward, one of :mod:`trl_entropy.rewards`' functions) and
    ``_calculate_rewards`` (an unscorable entropy reward makes the whole row unscorable); the per-token signals
    that reward reads come from :class:`~trl_entropy.trainers._signal_hooks.CompletionSignalsMixin`, like those of
    any user reward function that declares them.
    """

    _config_class: type = None  # set by subclasses
    _trl_name: str = ""
    # Class-level defaults, so an override called on an object built without `__init__` (as TRL's own unit tests
    # do) finds the state of a trainer with every entropy option off.
    entropy_reward_func: EntropyReward | None = None

    @classmethod
    def _trl_config_class(cls) -> type:
        """The TRL config the entropy config extends (``GRPOConfig`` / ``RLOOConfig``): what TRL's trainer reads."""
        return next(base for base in cls._config_class.__bases__ if base is not EntropyMethodsArguments)

    def __init__(self, model, reward_funcs=None, args=None, *pos_args, **kwargs):
        expected = self._trl_config_class()
        if args is not None and not isinstance(args, expected):
            # Another trainer's config (or a dict) would fail deep inside TRL with an AttributeError.
            raise TypeError(
                f"`args` of {type(self).__name__} must be an {self._config_class.__name__} (or TRL's "
                f"{expected.__name__}), got {type(args).__module__}.{type(args).__qualname__}."
            )
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = self._config_class(f"{str(model_name).split('/')[-1]}-{self._trl_name}")
        warn_if_slow_bf16(args)
        settings = config_entropy_options(args)
        if settings.entropy_reward == "none":
            # Every entropy option off: TRL's constructor as is, with its own checks and errors.
            super().__init__(model, reward_funcs, args, *pos_args, **kwargs)
            self._check_signal_columns(getattr(self, "train_dataset", None), getattr(self, "eval_dataset", None))
            return
        user_funcs = reward_funcs_of(reward_funcs)
        self.entropy_reward_func = EntropyReward(settings.entropy_reward)
        user_weights = args.reward_weights
        # TRL reads one weight per reward function from the config it is given: a shallow copy carries the entropy
        # reward's, so the caller's config object is left as it is.
        args = copy.copy(args)
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(user_funcs)
        if len(weights) != len(user_funcs):
            raise ValueError(
                f"`reward_weights` has {len(weights)} entries for {len(user_funcs)} reward functions; the entropy "
                "reward's weight is `entropy_reward_weight`, do not list it in `reward_weights`."
            )
        args.reward_weights = [*weights, args.entropy_reward_weight]
        # Bind to TRL's own signature, so `reward_processing_classes` is found also when passed by position.
        bound = inspect.signature(super().__init__).bind(
            model, [*user_funcs, self.entropy_reward_func], args, *pos_args, **kwargs
        )
        processing_classes = bound.arguments.get("reward_processing_classes")
        if processing_classes is not None:
            if not isinstance(processing_classes, list):
                processing_classes = [processing_classes]
            if len(processing_classes) != len(user_funcs):
                raise ValueError(
                    f"The number of reward processing classes ({len(processing_classes)}) must match the number of "
                    f"reward functions ({len(user_funcs)}); the entropy reward needs no entry."
                )
            bound.arguments["reward_processing_classes"] = [*processing_classes, None]  # the entropy reward's
        super().__init__(*bound.args, **bound.kwargs)
        # TRL has built `self.reward_weights` (the entropy reward's weight last); the trainer's config keeps the
        # caller's `reward_weights`, so `trainer.args` and the saved `training_args.bin` build the same trainer again.
        self.args.reward_weights = user_weights
        self._check_signal_columns(getattr(self, "train_dataset", None), getattr(self, "eval_dataset", None))

    # ------------------------------------------------------------------------------------------------------------
    # The entropy reward (the signals themselves come from CompletionSignalsMixin)
    # ------------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)  # [N, funcs], gathered over all ranks
        entropy_reward_func = getattr(self, "entropy_reward_func", None)
        if entropy_reward_func is None:
            return rewards_per_func
        column = next(i for i, f in enumerate(self.reward_funcs) if f is entropy_reward_func)
        unscorable = torch.isnan(rewards_per_func[:, column])
        if unscorable.any():
            # TRL sums rewards with nansum, so a None entropy reward would count as 0, the best possible value,
            # whenever another reward function scored the completion. Mark the whole row unscorable instead: TRL
            # then gives it advantage 0 and leaves it out of the baseline and the logged reward means.
            rewards_per_func[unscorable] = torch.nan
            if self.accelerator.is_main_process:
                logger.warning(
                    "%d of %d completions have no finite %s reward (empty, or NaN/inf logits): they are left out of "
                    "this batch's update and of the logged reward means.",
                    int(unscorable.sum()),
                    unscorable.numel(),
                    entropy_reward_func.__name__,
                )
        return rewards_per_func

    # ------------------------------------------------------------------------------------------------------------
    # The forking-token mask
    # ------------------------------------------------------------------------------------------------------------

    def _forking_aggregation(self) -> str:
        """How the trainer's loss normalises over tokens: ``"token"``, ``"sequence"`` or ``"constant"`` (see
        :func:`forking_normalization_weights`)."""
        return "token"

    def forking_token_selection(self, entropies: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``(selected [B, T] bool, n_valid, n_selected)``: the forking tokens of this micro-batch (exact top-k, over
        all ranks for ``forking_token_scope="global"``), with the counts the selection was made over. Logs
        ``forking/selected_fraction`` and ``forking/min_selected_entropy``."""
        settings = trainer_entropy_options(self)
        valid = mask.bool()
        if settings.forking_token_scope == "local" or self.accelerator.num_processes == 1:
            selected = high_entropy_mask(
                entropies.detach(), valid, settings.forking_token_ratio, settings.forking_token_mode
            )
            n_valid, n_selected = int(valid.sum()), int(selected.sum())
        else:
            selected, n_valid, n_selected = self._global_forking_mask(entropies.detach(), valid)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["forking/selected_fraction"].append(n_selected / max(n_valid, 1))
        # Every rank joins the gather, also one with nothing selected (it sends +inf), so none waits forever.
        chosen = entropies.detach()[selected]
        local_min = chosen.min() if chosen.numel() else torch.tensor(float("inf"), device=entropies.device)
        threshold = self.accelerator.gather(local_min.reshape(1).float()).min().item()
        if math.isfinite(threshold):
            self._metrics[mode]["forking/min_selected_entropy"].append(threshold)
        return selected, n_valid, n_selected

    def forking_token_weights(self, entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Float weights ``[B, T]`` that restrict the token loss to the forking tokens of this micro-batch.

        Under ``forking_token_normalization="selected"`` the selected tokens are weighted so that the loss is the
        trainer's own loss over the selected tokens, as if the others were padding (see
        :func:`forking_normalization_weights`); under ``"all"`` they get 1. The others get 0. Counts are global
        over ranks for ``forking_token_scope="global"``.
        """
        selected, n_valid, n_selected = self.forking_token_selection(entropies, mask)
        weights = forking_normalization_weights(
            selected,
            mask,
            trainer_entropy_options(self).forking_token_normalization,
            self._forking_aggregation(),
            n_valid,
            n_selected,
        )
        return weights.to(entropies.dtype)

    def _global_forking_mask(self, entropies: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Exact top-k over all ranks' valid tokens: every rank gathers all valid entropies (padded), selects on the
        whole set with the same deterministic tie-breaking, and keeps its own slice."""
        local = entropies[valid].float()
        count = torch.tensor([local.numel()], device=entropies.device)
        counts = self.accelerator.gather(count)
        padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=0.0)
        gathered = self.accelerator.gather(padded).view(self.accelerator.num_processes, -1)
        width = gathered.size(1)
        gathered_mask = torch.arange(width, device=gathered.device).unsqueeze(0) < counts.unsqueeze(1)
        settings = trainer_entropy_options(self)
        if int(counts.sum()) == 0:
            return torch.zeros_like(valid), 0, 0
        selected_all = high_entropy_mask(
            gathered, gathered_mask, settings.forking_token_ratio, settings.forking_token_mode
        )
        mine = selected_all[self.accelerator.process_index, : local.numel()]
        selected = torch.zeros_like(valid)
        selected[valid] = mine
        return selected, int(counts.sum()), int(selected_all.sum())


def reward_funcs_of(reward_funcs: Any) -> list[Callable]:
    """Normalise TRL's ``reward_funcs`` argument (None, one callable or a list) to a list."""
    if reward_funcs is None:
        return []
    return list(reward_funcs) if isinstance(reward_funcs, list) else [reward_funcs]


__all__ = [
    "EntropyMethodsArguments",
    "EntropyReward",
    "EntropyTrainerMixin",
    "config_entropy_options",
    "trainer_entropy_options",
    "forking_normalization_weights",
    "require_number",
    "validate_sampling_fields",
]
