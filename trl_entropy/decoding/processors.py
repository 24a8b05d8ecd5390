"""EM-INF (inference-time entropy minimisation, Agarwal et al., 2025) as a transformers logits processor, the paper's
adaptive-temperature baseline, and adapters for vLLM's logits-processor interfaces.

The maths lives in :func:`trl_entropy.decoding.em_inf.em_inf_logits` and
:func:`trl_entropy.decoding.em_inf.adaptive_temperature`; the classes
here only hold settings and plug those functions into a decoding loop.

Example::

    from transformers import LogitsProcessorList
    from trl_entropy.decoding.processors import EMInfLogitsProcessor

    # The released script's settings: EM-INF, then sampling at temperature 0.1.
    processors = LogitsProcessorList([EMInfLogitsProcessor(threshold=0.3, steps=3, lr=0.1, kl_weight=0.05)])
    model.generate(**inputs, logits_processor=processors, do_sample=True, temperature=0.1)

Ordering: ``model.generate`` runs the processors passed in ``logits_processor`` after its own non-sampling
processors (repetition penalty, min length...) and before the sampling warpers built from the generation config
(temperature, top-k, top-p), so EM-INF sees untempered logits, as in the released script. A top-k/top-p processor put
before EM-INF in the list leaves ``-inf`` entries, which EM-INF keeps at ``-inf``.

vLLM (not a dependency; imported only when an adapter that needs it is used):

* V1 engine (batch level): ``LLM(model, logits_processors=[EMInfVLLMLogitsProcessor])`` (or the string
  ``"trl_entropy.decoding.processors:EMInfVLLMLogitsProcessor"``), then enable it per request with
  ``SamplingParams(extra_args={"em_inf": True})`` or ``extra_args={"em_inf": {"threshold": 0.3, "steps": 5}}``.
  vLLM's V1 sampler applies such non-argmax-invariant processors before penalties, temperature and top-k/top-p.
  It targets ``vllm.v1.sample.logits_processor.LogitsProcessor`` (vLLM >= 0.10.2); vLLM's newer "Model Runner V2"
  uses a different interface that this adapter does not cover.
* Per-request callables (vLLM V0's ``SamplingParams(logits_processors=[...])``, or inside vLLM V1's
  ``AdapterLogitsProcessor.new_req_logits_processor``): :class:`EMInfRequestLogitsProcessor`, a
  ``(output_token_ids, logits) -> logits`` callable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import LogitsProcessor

from .em_inf import EMInfResult, adaptive_temperature, em_inf_logits

__all__ = [
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

VLLM_EXTRA_ARGS_KEY = "em_inf"
"""Key of ``SamplingParams.extra_args`` that turns EM-INF on for a vLLM request (``True`` or a dict of settings)."""


def _check_number(name: str, value, lower: float, allowed: str, strict: bool = False) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number < lower or (strict and number == lower):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


@dataclass(frozen=True)
class EMInfConfig:
    """Settings of EM-INF (Agarwal et al., 2025, "The Unreasonable Effectiveness of Entropy Minimization in LLM
    Reasoning", Sec. 3.3). Defaults are those of the released script.

    Parameters:
        threshold (`float`, *optional*, defaults to `0.3`):
            Entropy `delta` (nats) under which a row is not optimised any further. `>= 0`; the paper finds
            `0.1 < delta < 0.5` works best; `0` runs every step on every row.
        steps (`int`, *optional*, defaults to `3`):
            Maximum optimiser steps per decoding step and row. `>= 0`; the released script uses 3 and the paper
            reports 5-15 works best; `0` disables EM-INF.
        lr (`float`, *optional*, defaults to `0.1`):
            Learning rate on the logits, `> 0` (paper: 0.1).
        kl_weight (`float`, *optional*, defaults to `0.05`):
            Weight of `KL(p_original || softmax(z))` added to the entropy, which keeps the result near the model's
            distribution. `>= 0` (released script: 0.05).
        optimizer (`str`, *optional*, defaults to `"adam"`):
            `"adam"` (the paper's) or `"sgd"`.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`):
            Adam's moment decay rates, each in `[0, 1)` (PyTorch's defaults, as in the released script).
        eps (`float`, *optional*, defaults to `1e-8`):
            Adam's denominator term, `> 0`.
    """

    threshold: float = field(
        default=0.3,
        metadata={
            "help": "Entropy (nats) under which a row is not optimised any further (delta). >= 0; the paper finds "
            "0.1-0.5 works best; 0 runs every step on every row."
        },
    )
    steps: int = field(
        default=3,
        metadata={
            "help": "Maximum optimiser steps per decoding step and row. >= 0; the released script uses 3, the paper "
            "reports 5-15 works best; 0 disables EM-INF."
        },
    )
    lr: float = field(default=0.1, metadata={"help": "Optimiser learning rate on the logits. > 0; paper: 0.1."})
    kl_weight: float = field(
        default=0.05,
        metadata={
            "help": "Weight of KL(p_original || p) added to the entropy, which keeps the result close to the model's "
            "distribution. >= 0; released script: 0.05."
        },
    )
    optimizer: Literal["adam", "sgd"] = field(
        default="adam", metadata={"help": "Optimiser on the logits: 'adam' (the paper's) or 'sgd'."}
    )
    betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata={"help": "Adam's moment decay rates, each in [0, 1) (PyTorch defaults)."}
    )
    eps: float = field(default=1e-8, metadata={"help": "Adam's denominator term, > 0 (PyTorch default)."})

    def __post_init__(self):
        _check_number("threshold", self.threshold, 0.0, "a finite number >= 0 (nats; paper: 0.1-0.5)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"`steps` must be an integer >= 0 (paper: 5-15, released script: 3), got {self.steps!r}.")
        _check_number("lr", self.lr, 0.0, "a finite number > 0 (paper: 0.1)", strict=True)
        _check_number("kl_weight", self.kl_weight, 0.0, "a finite number >= 0 (released script: 0.05)")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {self.optimizer!r}.")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {self.betas}.")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if not (self.eps > 0):
            raise ValueError(f"`eps` must be > 0, got {self.eps}.")

    def apply(self, logits: torch.Tensor) -> EMInfResult:
        """Run :func:`trl_entropy.decoding.em_inf.em_inf_logits` on ``logits`` ``[..., V]`` with these settings."""
        return em_inf_logits(logits, **asdict(self))


@dataclass
class _EMInfStats:
    calls: int = 0
    rows: int = 0
    rows_optimised: int = 0
    steps: int = 0
    entropy_before_sum: float = 0.0
    entropy_after_sum: float = 0.0

    def update(self, result: EMInfResult) -> None:
        finite = torch.isfinite(result.entropy_before)
        self.calls += 1
        self.rows += int(finite.sum())
        self.rows_optimised += int((result.steps_taken > 0).sum())
        self.steps += int(result.steps_taken.sum())
        self.entropy_before_sum += float(result.entropy_before[finite].sum())
        self.entropy_after_sum += float(result.entropy_after[finite].sum())

    def as_dict(self) -> dict[str, float]:
        rows = max(self.rows, 1)
        return {
            "calls": self.calls,
            "rows": self.rows,
            "fraction_rows_optimised": self.rows_optimised / rows,
            "mean_steps_per_row": self.steps / rows,
            "mean_entropy_before": self.entropy_before_sum / rows,
            "mean_entropy_after": self.entropy_after_sum / rows,
        }


class EMInfLogitsProcessor(LogitsProcessor):
    """EM-INF as a transformers :class:`~transformers.LogitsProcessor`: at every decoding step, each sequence's
    next-token logits take up to ``steps`` optimiser steps on ``H(softmax(z)) + kl_weight * KL(p0 || softmax(z))``,
    stopping as soon as their entropy is below ``threshold`` (Agarwal et al., 2025).

    Rows are independent (a row's output never depends on the rest of the batch), the optimisation runs in float32
    with a closed-form gradient and hand-written Adam/SGD, the output has the input's dtype, ``-inf`` entries stay
    ``-inf``, and a row's entropy never increases. See :func:`trl_entropy.decoding.em_inf.em_inf_logits` for the
    guarantees,
    including when the argmax token can change.

    Args:
        threshold: entropy (nats) below which a row is left alone. Paper: 0.1-0.5; released script: 0.3.
        steps: maximum optimiser steps per decoding step. Paper: 5-15; released script: 3.
        lr: learning rate on the logits (0.1).
        kl_weight: weight of the KL to the original distribution (released script: 0.05).
        optimizer: ``"adam"`` (the paper's) or ``"sgd"``.
        betas: Adam's moment decay rates.
        eps: Adam's denominator term.
        track_stats: accumulate :attr:`stats` (fraction of rows optimised, mean steps, entropy before/after). Costs
            a host synchronisation per decoding step on GPU; off by default.
        config: an :class:`EMInfConfig` to use instead of the individual settings.
    """

    def __init__(
        self,
        threshold: float = 0.3,
        steps: int = 3,
        lr: float = 0.1,
        kl_weight: float = 0.05,
        optimizer: Literal["adam", "sgd"] = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        track_stats: bool = False,
        config: EMInfConfig | None = None,
    ):
        self.config = config or EMInfConfig(threshold, steps, lr, kl_weight, optimizer, betas, eps)
        self.track_stats = track_stats
        self._stats = _EMInfStats()

    @classmethod
    def from_config(cls, config: EMInfConfig, track_stats: bool = False) -> EMInfLogitsProcessor:
        """Build the processor from an :class:`EMInfConfig`."""
        return cls(config=config, track_stats=track_stats)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        result = self.config.apply(scores)
        if self.track_stats:
            self._stats.update(result)
        return result.logits

    @property
    def stats(self) -> dict[str, float]:
        """Running statistics since construction or :meth:`reset_stats` (needs ``track_stats=True``): number of
        calls and rows, fraction of rows optimised, mean optimiser steps per row, mean entropy before/after (nats)."""
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        """Clear :attr:`stats`."""
        self._stats = _EMInfStats()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


@dataclass(frozen=True)
class AdaptiveTemperatureConfig:
    """Settings of the adaptive-temperature baseline of Agarwal et al. (2025): per step and sequence, the temperature
    ``T`` in ``[t_min, t_max]`` that brings the entropy to ``max(threshold, alpha * H_0)``, found by bisection.

    Parameters:
        threshold (`float`, *optional*, defaults to `0.3`):
            Entropy floor `delta` of the target (nats), `>= 0`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Target fraction of the initial entropy `H_0`, in `(0, 1]` (paper: 0.4-0.6).
        t_min (`float`, *optional*, defaults to `0.01`):
            Lowest temperature searched, `> 0` (paper: 0.01).
        t_max (`float`, *optional*, defaults to `1.0`):
            Highest temperature searched, `> t_min` (paper: 1).
        tol (`float`, *optional*, defaults to `0.1`):
            Accepted distance (nats) between the reached and the target entropy, `> 0` (paper: 0.1).
        max_iter (`int`, *optional*, defaults to `30`):
            Maximum bisection steps, `>= 1` (30 halvings narrow `[0.01, 1]` to about `1e-9`).
    """

    threshold: float = field(
        default=0.3, metadata={"help": "Entropy floor delta of the target (nats), >= 0. Paper: as EM-INF's delta."}
    )
    alpha: float = field(
        default=0.5, metadata={"help": "Target fraction of the initial entropy, in (0, 1]. Paper: 0.4-0.6."}
    )
    t_min: float = field(default=0.01, metadata={"help": "Lowest temperature searched, > 0. Paper: 0.01."})
    t_max: float = field(default=1.0, metadata={"help": "Highest temperature searched, > t_min. Paper: 1."})
    tol: float = field(
        default=0.1, metadata={"help": "Accepted distance (nats) between reached and target entropy, > 0. Paper: 0.1."}
    )
    max_iter: int = field(default=30, metadata={"help": "Maximum bisection steps, >= 1."})

    def __post_init__(self):
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"`threshold` must be a finite number >= 0 (nats), got {self.threshold}.")
        if not (0.0 < self.alpha <= 1.0):
            raise ValueError(f"`alpha` must be in (0, 1] (paper: 0.4-0.6), got {self.alpha}.")
        if not (0.0 < self.t_min < self.t_max and math.isfinite(self.t_max)):
            raise ValueError(f"`t_min` and `t_max` must satisfy 0 < t_min < t_max, got {self.t_min}, {self.t_max}.")
        if not (self.tol > 0):
            raise ValueError(f"`tol` must be > 0 (paper: 0.1), got {self.tol}.")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"`max_iter` must be an integer >= 1, got {self.max_iter!r}.")

    def temperatures(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-row temperatures for ``logits`` ``[..., V]`` (see
        :func:`trl_entropy.decoding.em_inf.adaptive_temperature`)."""
        return adaptive_temperature(logits, **asdict(self))


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """The paper's adaptive-temperature baseline as a :class:`~transformers.LogitsProcessor`: each sequence's logits
    are divided by their own temperature ``T`` in ``[t_min, t_max]``, found by vectorised bisection so that
    ``H(softmax(z / T))`` is within ``tol`` of ``max(threshold, alpha * H(softmax(z)))``. Rows already below the
    target keep ``T = 1``. Output dtype = input dtype; ``-inf`` stays ``-inf``.

    Args:
        threshold: entropy floor of the target (nats).
        alpha: target fraction of the initial entropy (paper: 0.4-0.6).
        t_min: lowest temperature searched (0.01).
        t_max: highest temperature searched (1.0).
        tol: tolerance of the bisection on the entropy (0.1 nats).
        max_iter: maximum bisection steps.
        config: an :class:`AdaptiveTemperatureConfig` to use instead of the individual settings.
    """

    def __init__(
        self,
        threshold: float = 0.3,
        alpha: float = 0.5,
        t_min: float = 0.01,
        t_max: float = 1.0,
        tol: float = 0.1,
        max_iter: int = 30,
        config: AdaptiveTemperatureConfig | None = None,
    ):
        self.config = config or AdaptiveTemperatureConfig(threshold, alpha, t_min, t_max, tol, max_iter)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        temperature = self.config.temperatures(scores)
        return (scores.float() / temperature.unsqueeze(-1)).to(scores.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# ---------------------------------------------------------------------------------------------------------------------
# vLLM adapters. The maths is the same pure function; nothing below imports vLLM unless the V1 class is requested.
# ---------------------------------------------------------------------------------------------------------------------


class EMInfRequestLogitsProcessor:
    """Per-request EM-INF callable with vLLM's request-level signature ``(output_token_ids, logits) -> logits``.

    ``logits`` is the ``[V]`` row of one request (or ``[N, V]``); the token ids are ignored (EM-INF only looks at the
    distribution). Usable as vLLM V0's ``SamplingParams(logits_processors=[EMInfRequestLogitsProcessor()])`` or
    returned from a vLLM V1 ``AdapterLogitsProcessor.new_req_logits_processor``.

    Args:
        config: EM-INF settings (defaults: the released script's).
    """

    def __init__(self, config: EMInfConfig | None = None):
        self.config = config or EMInfConfig()

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        return self.config.apply(logits).logits


def em_inf_config_from_extra_args(extra_args: Mapping[str, Any] | None) -> EMInfConfig | None:
    """The EM-INF settings a vLLM request asks for through ``SamplingParams.extra_args``, or None if it does not.

    ``extra_args["em_inf"]`` may be ``True`` (default settings), a mapping of :class:`EMInfConfig` fields, or
    ``False``/``None``/absent (EM-INF off). Raises ``ValueError`` on unknown fields or invalid values, which vLLM
    reports to the client when called from ``validate_params``.
    """
    if not extra_args or VLLM_EXTRA_ARGS_KEY not in extra_args:
        return None
    value = extra_args[VLLM_EXTRA_ARGS_KEY]
    if value is None or value is False:
        return None
    if value is True:
        return EMInfConfig()
    if not isinstance(value, Mapping):
        raise ValueError(
            f"`extra_args[{VLLM_EXTRA_ARGS_KEY!r}]` must be True, False or a dict of EMInfConfig fields, "
            f"got {value!r}."
        )
    known = set(EMInfConfig.__dataclass_fields__)
    unknown = set(value) - known
    if unknown:
        raise ValueError(
            f"Unknown EM-INF setting(s) {sorted(unknown)} in `extra_args[{VLLM_EXTRA_ARGS_KEY!r}]`; "
            f"allowed: {sorted(known)}."
        )
    return EMInfConfig(**value)


def apply_em_inf_to_rows(logits: torch.Tensor, row_configs: Mapping[int, EMInfConfig]) -> torch.Tensor:
    """Apply EM-INF in place to the rows of a batch ``[N, V]`` listed in ``row_configs`` (row index -> settings),
    leaving the other rows untouched. Rows sharing the same settings are processed together in one vectorised call.
    This is the batch-level step of :func:`make_vllm_logits_processor_class`'s ``apply``.

    Returns:
        ``logits`` (modified in place).
    """
    groups: dict[EMInfConfig, list[int]] = {}
    for row, config in row_configs.items():
        if not 0 <= row < logits.size(0):
            raise IndexError(f"Row {row} is outside the batch of {logits.size(0)} rows.")
        groups.setdefault(config, []).append(row)
    for config, rows in groups.items():
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[index] = config.apply(logits.index_select(0, index)).logits
    return logits


_VLLM_CLASS = None


def make_vllm_logits_processor_class() -> type:
    """Build (once) the vLLM V1 batch-level logits processor class; needs ``vllm`` (>= 0.10.2) installed.

    The class keeps a ``row -> EMInfConfig`` map of the requests that enabled EM-INF (through
    ``SamplingParams.extra_args["em_inf"]``, see :func:`em_inf_config_from_extra_args`), updated from vLLM's
    ``BatchUpdate`` with vLLM's own ``process_dict_updates``, and applies :func:`apply_em_inf_to_rows` at each step.
    It is also reachable as ``trl_entropy.decoding.processors.EMInfVLLMLogitsProcessor``.
    """
    global _VLLM_CLASS
    if _VLLM_CLASS is not None:
        return _VLLM_CLASS
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor as VLLMLogitsProcessor
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates
    except ImportError as err:
        raise ImportError(
            "The vLLM EM-INF adapter needs vLLM >= 0.10.2 (V1 engine): `pip install 'vllm>=0.10.2'`. Without "
            "vLLM, use EMInfLogitsProcessor with transformers' generate, or EMInfRequestLogitsProcessor."
        ) from err

    class EMInfVLLMLogitsProcessor(VLLMLogitsProcessor):
        """EM-INF for vLLM's V1 engine; enable per request with ``SamplingParams(extra_args={"em_inf": True})``."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            em_inf_config_from_extra_args(getattr(sampling_params, "extra_args", None))

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self.row_configs: dict[int, EMInfConfig] = {}

        def is_argmax_invariant(self) -> bool:
            # EM-INF can change the greedy token (see trl_entropy.decoding.em_inf.em_inf_logits), so vLLM must run it
            # for greedy
            # requests too.
            return False

        def update_state(self, batch_update) -> None:
            process_dict_updates(
                self.row_configs,
                batch_update,
                lambda params, _prompt_ids, _output_ids: em_inf_config_from_extra_args(params.extra_args),
            )

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.row_configs:
                return logits
            return apply_em_inf_to_rows(logits, self.row_configs)

    # Pickled by reference (vLLM ships logits-processor classes to its worker processes).
    EMInfVLLMLogitsProcessor.__module__ = __name__
    EMInfVLLMLogitsProcessor.__qualname__ = "EMInfVLLMLogitsProcessor"
    _VLLM_CLASS = EMInfVLLMLogitsProcessor
    return _VLLM_CLASS


def __getattr__(name: str):
    # Lazy attribute, so that importing this module never imports vLLM, while
    # "trl_entropy.decoding.processors:EMInfVLLMLogitsProcessor" still resolves for vLLM's loader.
    if name == "EMInfVLLMLogitsProcessor":
        return make_vllm_logits_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
