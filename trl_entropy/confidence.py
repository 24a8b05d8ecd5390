"""Entropy confidence: calibrated stop thresholds and early stopping of reasoning.

Implements "Think Just Enough" (Sharma & Chopra, 2025, arXiv 2510.08146): the mean top-k token entropy of the first
reasoning step is a confidence signal; a threshold calibrated on a handful of labelled examples decides whether the
model answers right away or keeps reasoning. Also a DeepConf-style (Fu et al., 2025) sliding-window confidence mode
that abandons traces whose recent tokens are unconfident.

Building blocks, from the smallest:

* :class:`ConfidenceSignal` turns one step's logits into one number per sequence (full entropy, top-k entropy in
  bits, or DeepConf token confidence).
* :class:`EntropyThresholdCalibrator` fits the four thresholds of the paper and says whether the signal separates
  correct from incorrect answers at all.
* :class:`TokenConfidenceRecorder` (a ``LogitsProcessor``) records the signal at every decoding step and
  :class:`EntropyEarlyStopping` (a ``StoppingCriteria``) stops rows from it, inside ``model.generate``.
* :func:`think_just_enough_generate` is the paper's two-stage pipeline, with a token-budget mode;
  :func:`run_calibrate` / :func:`run_early_stop_generate` drive it from the command line.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .ops import (
    cohens_d,
    entropy_from_topk_logprobs,
    threshold_bayes,
    threshold_info,
    threshold_mean,
    threshold_universal,
    token_entropy,
)

logger = logging.getLogger(__name__)

__all__ = [
    "THRESHOLD_METHODS",
    "ConfidenceSignal",
    "welch_p_value",
    "CalibrationStats",
    "EntropyThresholdCalibrator",
    "deepconf_threshold",
    "TokenConfidenceRecorder",
    "EntropyEarlyStopping",
    "delimiter_token_ids",
    "EarlyStopResult",
    "think_just_enough_generate",
    "CalibrateArguments",
    "run_calibrate",
    "EarlyStopGenerateArguments",
    "run_early_stop_generate",
]

THRESHOLD_METHODS = ("mean", "info", "bayes", "universal")
"""Threshold formulas of Think Just Enough, section 3 of REFERENCE.md."""

_CALIBRATION_FORMAT = "trl-entropy/entropy-calibration"
_CALIBRATION_VERSION = 1
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # about -87.3


# ---------------------------------------------------------------------------------------------------------------------
# Per-token signal
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfidenceSignal:
    """How one decoding step's logits become one confidence number per sequence.

    Parameters:
        kind (`str`, defaults to `"topk_entropy"`):
            ``"topk_entropy"``: entropy of the top-``top_k`` probabilities renormalised to sum to 1, in base
            ``base`` (Think Just Enough: k = 20, bits). ``"entropy"``: entropy of the full distribution, in base
            ``base``. ``"topk_confidence"``: DeepConf token confidence ``-mean`` of the top-``top_k`` natural
            log-probabilities (Fu et al., 2025), each floored at ``log(float32 tiny)`` (about -87.3) so a masked
            alternative stays finite; the only kind where *higher* means more confident.
        top_k (`int`, defaults to `20`):
            Number of most likely tokens for the top-k kinds, >= 2. Both papers use 20.
        base (`float`, defaults to `2.0`):
            Logarithm base of the entropy kinds, > 0 and != 1: 2 gives bits as in Think Just Enough, ``math.e`` nats.
    """

    kind: Literal["topk_entropy", "entropy", "topk_confidence"] = "topk_entropy"
    top_k: int = 20
    base: float = 2.0

    def __post_init__(self):
        if self.kind not in ("topk_entropy", "entropy", "topk_confidence"):
            raise ValueError(f"`kind` must be 'topk_entropy', 'entropy' or 'topk_confidence', got {self.kind!r}.")
        if not (isinstance(self.top_k, int) and self.top_k >= 2):
            raise ValueError(f"`top_k` must be an integer >= 2, got {self.top_k!r}.")
        if not (self.base > 0 and self.base != 1 and math.isfinite(self.base)):
            raise ValueError(f"`base` must be a finite number > 0 and != 1, got {self.base}.")

    @property
    def higher_is_confident(self) -> bool:
        """True for DeepConf confidence; False for entropies, where low means confident."""
        return self.kind == "topk_confidence"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The signal of ``logits`` ``[..., V]`` as float32 ``[...]``; NaN where a row of logits holds NaN."""
        if self.kind == "entropy":
            return token_entropy(logits.detach()) / math.log(self.base)
        logprobs = torch.log_softmax(logits.detach().float(), dim=-1)
        top = logprobs.topk(min(self.top_k, logprobs.size(-1)), dim=-1).values
        if self.kind == "topk_entropy":
            return entropy_from_topk_logprobs(top, base=self.base)
        # A masked (-inf) alternative means the distribution is even more peaked: floor it at the smallest normal
        # float32 log-probability, so confidence stays finite and window sums never meet inf - inf. NaN stays NaN.
        return -top.clamp_min(_LOG_TINY).mean(dim=-1)

    def describe(self) -> str:
        unit = {2.0: "bits", math.e: "nats"}.get(self.base, f"log base {self.base:g}")
        if self.kind == "topk_entropy":
            return f"mean top-{self.top_k} token entropy ({unit})"
        if self.kind == "entropy":
            return f"mean full-vocabulary token entropy ({unit})"
        return f"DeepConf token confidence (top-{self.top_k}, nats)"


# ---------------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------------


def welch_p_value(
    x: Sequence[float], y: Sequence[float], method: Literal["auto", "scipy", "normal"] = "auto"
) -> tuple[float, float, str]:
    """Two-sided p-value for a difference of means with unequal variances.

    Args:
        x: first sample (at least 2 values).
        y: second sample (at least 2 values).
        method: ``"scipy"``: Welch's t-test, ``scipy.stats.ttest_ind(equal_var=False)``; ``"normal"``: the same
            statistic referred to a standard normal instead of Student's t (anti-conservative for small samples:
            the p-value is smaller than Welch's); ``"auto"``: scipy when it is installed, else normal.

    Returns:
        ``(statistic, p_value, method_used)`` with ``method_used`` ``"welch_t"`` or ``"normal_approximation"``.
    """
    if method not in ("auto", "scipy", "normal"):
        raise ValueError(f"`method` must be 'auto', 'scipy' or 'normal', got {method!r}.")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Each sample needs at least 2 values, got {len(x)} and {len(y)}.")
    if method in ("auto", "scipy"):
        try:
            from scipy import stats
        except ImportError:
            if method == "scipy":
                raise ImportError("`method='scipy'` needs scipy: pip install scipy") from None
        else:
            result = stats.ttest_ind(list(x), list(y), equal_var=False)
            return float(result.statistic), float(result.pvalue), "welch_t"
    mean_x, mean_y = math.fsum(x) / len(x), math.fsum(y) / len(y)
    var_x = math.fsum((v - mean_x) ** 2 for v in x) / (len(x) - 1)
    var_y = math.fsum((v - mean_y) ** 2 for v in y) / (len(y) - 1)
    se = math.sqrt(var_x / len(x) + var_y / len(y))
    if se == 0:
        return (
            (0.0, 1.0, "normal_approximation")
            if mean_x == mean_y
            else (math.copysign(math.inf, mean_x - mean_y), 0.0, "normal_approximation")
        )
    z = (mean_x - mean_y) / se
    return z, math.erfc(abs(z) / math.sqrt(2.0)), "normal_approximation"


@dataclass(frozen=True)
class CalibrationStats:
    """Result of :meth:`EntropyThresholdCalibrator.fit`. Standard deviations are sample (ddof = 1) values."""

    n_correct: int
    n_incorrect: int
    mu_correct: float
    sigma_correct: float
    mu_incorrect: float
    sigma_incorrect: float
    cohens_d: float
    t_statistic: float
    p_value: float
    p_value_method: str
    thresholds: dict[str, float]
    separates: bool


def _as_float_list(values: Any, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().reshape(-1).tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a sequence of numbers: {err}") from None
    return out


def _as_bool_list(values: Any, name: str) -> list[bool]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or v in (0, 1):
            out.append(bool(v))
        else:
            raise ValueError(f"`is_correct` must hold booleans or 0/1, got {v!r} at index {i}.")
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


class EntropyThresholdCalibrator:
    """Calibrate the Think-Just-Enough stop threshold from a few examples with known correctness.

    ``fit`` splits the sequence entropies into correct and incorrect answers, computes their means and sample standard
    deviations, Cohen's d, a two-sided p-value (Welch's t-test through scipy when installed, else a normal
    approximation: :attr:`CalibrationStats.p_value_method` says which) and the four thresholds ``mean``, ``info``,
    ``bayes`` and ``universal``. A sequence is *confident* when its entropy is ``<=`` the threshold.

    The signal *separates* when correct answers have the lower entropy (d < 0) and ``p < alpha``. The paper found no
    separation on a non-reasoning model (Llama-3.3-70B, d = -0.19, p = 0.23); :meth:`summary` says so plainly, and
    stopping on a threshold that does not separate can cut the reasoning of answers that would have been wrong.

    Args:
        alpha: significance level of the separation test, in (0, 1).
        method: threshold :meth:`threshold` returns by default, one of :data:`THRESHOLD_METHODS`.
        p_value_method: ``"auto"``, ``"scipy"`` or ``"normal"``; see :func:`welch_p_value`.
        signal: how the entropies were measured; saved with the calibration so generation uses the same signal.
    """

    def __init__(
        self,
        alpha: float = 0.05,
        method: str = "mean",
        p_value_method: Literal["auto", "scipy", "normal"] = "auto",
        signal: ConfidenceSignal | None = None,
    ):
        if not (0.0 < alpha < 1.0):
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha}.")
        if method not in THRESHOLD_METHODS:
            raise ValueError(f"`method` must be one of {THRESHOLD_METHODS}, got {method!r}.")
        if p_value_method not in ("auto", "scipy", "normal"):
            raise ValueError(f"`p_value_method` must be 'auto', 'scipy' or 'normal', got {p_value_method!r}.")
        signal = signal or ConfidenceSignal()
        if signal.higher_is_confident:
            raise ValueError(
                "`signal` must be an entropy (kind 'topk_entropy' or 'entropy'); calibrate DeepConf confidence with "
                "`deepconf_threshold`."
            )
        self.alpha = alpha
        self.method = method
        self.p_value_method = p_value_method
        self.signal = signal
        self.sequence_entropies: list[float] | None = None
        self.is_correct: list[bool] | None = None
        self._stats: CalibrationStats | None = None

    # -- fitting ------------------------------------------------------------------------------------------------------

    def fit(self, sequence_entropies: Any, is_correct: Any) -> EntropyThresholdCalibrator:
        """Fit from per-example sequence entropies and correctness labels; returns ``self``.

        Raises:
            ValueError: lengths differ, an entry is NaN or infinite, a group (correct or incorrect) has fewer than
                2 examples, or a group has zero variance (the thresholds and the test are then undefined).
        """
        entropies = _as_float_list(sequence_entropies, "sequence_entropies")
        labels = _as_bool_list(is_correct, "is_correct")
        if len(entropies) != len(labels):
            raise ValueError(
                f"`sequence_entropies` and `is_correct` must have one length, got {len(entropies)} and {len(labels)}."
            )
        bad = [i for i, v in enumerate(entropies) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"`sequence_entropies` must be finite; entries {bad[:10]} are NaN or infinite.")
        correct = [v for v, ok in zip(entropies, labels) if ok]
        incorrect = [v for v, ok in zip(entropies, labels) if not ok]
        for name, group in (("correct", correct), ("incorrect", incorrect)):
            if len(group) < 2:
                raise ValueError(
                    f"Calibration needs at least 2 {name} examples, got {len(group)} of {len(labels)}: the "
                    f"{name} group's mean and standard deviation are undefined. Use more (or harder/easier) examples."
                )
        mu_c, sigma_c = _mean_std(correct)
        mu_i, sigma_i = _mean_std(incorrect)
        for name, sigma in (("correct", sigma_c), ("incorrect", sigma_i)):
            if sigma == 0:
                raise ValueError(
                    f"The {name} group has zero variance (all its entropies are equal): Cohen's d and the Bayes "
                    "threshold are undefined. Check that the entropies were measured per example."
                )
        d = cohens_d(mu_c, sigma_c, len(correct), mu_i, sigma_i, len(incorrect))
        t_stat, p_value, p_method = welch_p_value(correct, incorrect, self.p_value_method)
        thresholds = {
            "mean": threshold_mean(mu_c),
            "info": threshold_info(mu_c, sigma_c, d),
            "bayes": threshold_bayes(mu_c, sigma_c, mu_i, sigma_i),
            "universal": threshold_universal(mu_c, sigma_c, mu_i, d),
        }
        self.sequence_entropies, self.is_correct = entropies, labels
        self._stats = CalibrationStats(
            n_correct=len(correct),
            n_incorrect=len(incorrect),
            mu_correct=mu_c,
            sigma_correct=sigma_c,
            mu_incorrect=mu_i,
            sigma_incorrect=sigma_i,
            cohens_d=d,
            t_statistic=t_stat,
            p_value=p_value,
            p_value_method=p_method,
            thresholds=thresholds,
            separates=bool(d < 0 and p_value < self.alpha),
        )
        return self

    # -- results ------------------------------------------------------------------------------------------------------

    @property
    def stats(self) -> CalibrationStats:
        if self._stats is None:
            raise RuntimeError("The calibrator is not fitted: call `fit(sequence_entropies, is_correct)` first.")
        return self._stats

    @property
    def is_fitted(self) -> bool:
        return self._stats is not None

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.stats.thresholds)

    @property
    def separates(self) -> bool:
        return self.stats.separates

    def threshold(self, method: str | None = None) -> float:
        """The threshold of ``method`` (default: the calibrator's ``method``)."""
        method = method or self.method
        if method not in THRESHOLD_METHODS:
            raise ValueError(f"`method` must be one of {THRESHOLD_METHODS}, got {method!r}.")
        return self.stats.thresholds[method]

    def is_confident(self, sequence_entropies: Any, method: str | None = None) -> list[bool]:
        """Whether each entropy is ``<=`` the threshold; NaN is never confident."""
        tau = self.threshold(method)
        return [v <= tau for v in _as_float_list(sequence_entropies, "sequence_entropies")]

    def summary(self) -> str:
        """A human-readable report of the fit, stating whether the signal separates correct from incorrect."""
        s = self.stats
        test = "Welch t-test (scipy)" if s.p_value_method == "welch_t" else "normal approximation of Welch's test"
        lines = [
            f"Entropy calibration on {s.n_correct + s.n_incorrect} examples ({self.signal.describe()}):",
            f"  correct   n={s.n_correct:<3d} mean={s.mu_correct:.4f} std={s.sigma_correct:.4f}",
            f"  incorrect n={s.n_incorrect:<3d} mean={s.mu_incorrect:.4f} std={s.sigma_incorrect:.4f}",
            f"  Cohen's d = {s.cohens_d:+.3f}, p = {s.p_value:.3g} ({test}), alpha = {self.alpha:g}",
            "  thresholds: "
            + ", ".join(f"{k}={v:.4f}" for k, v in s.thresholds.items())
            + f" (default: {self.method})",
        ]
        if s.separates:
            lines.append("  The signal SEPARATES: correct answers have significantly lower entropy.")
        elif s.cohens_d >= 0:
            lines.append(
                "  The signal DOES NOT SEPARATE: correct answers do not have lower entropy (d >= 0). Early stopping "
                "on this threshold would stop the wrong sequences; do not use it."
            )
        else:
            lines.append(
                f"  The signal DOES NOT SEPARATE at alpha={self.alpha:g} (p = {s.p_value:.3g}): the difference may be "
                "chance. Early stopping on this threshold is not supported by the data (more examples may help)."
            )
        return "\n".join(lines)

    # -- persistence --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": _CALIBRATION_FORMAT,
            "version": _CALIBRATION_VERSION,
            "alpha": self.alpha,
            "method": self.method,
            "p_value_method": self.p_value_method,
            "signal": asdict(self.signal),
            "data": {"sequence_entropies": self.sequence_entropies, "is_correct": self.is_correct},
            "stats": asdict(self.stats),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as JSON atomically (a temp file in the same folder, then ``os.replace``)."""
        payload = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def from_dict(cls, payload: Any, source: str = "calibration") -> EntropyThresholdCalibrator:
        """Rebuild a fitted calibrator, validating the schema and the consistency of the stored statistics."""

        def fail(msg: str) -> ValueError:
            return ValueError(f"Invalid {source}: {msg}")

        if not isinstance(payload, dict):
            raise fail(f"expected a JSON object, got {type(payload).__name__}.")
        if payload.get("format") != _CALIBRATION_FORMAT:
            raise fail(f"`format` must be {_CALIBRATION_FORMAT!r}, got {payload.get('format')!r}.")
        if payload.get("version") != _CALIBRATION_VERSION:
            raise fail(
                f"unsupported `version` {payload.get('version')!r} (this release reads {_CALIBRATION_VERSION})."
            )
        missing = {"alpha", "method", "p_value_method", "signal", "data", "stats"} - set(payload)
        if missing:
            raise fail(f"missing keys {sorted(missing)}.")
        try:
            signal = ConfidenceSignal(**payload["signal"])
            calibrator = cls(payload["alpha"], payload["method"], payload["p_value_method"], signal)
        except (TypeError, ValueError) as err:
            raise fail(str(err)) from None
        data, stats = payload["data"], payload["stats"]
        if not isinstance(data, dict) or not isinstance(stats, dict):
            raise fail("`data` and `stats` must be JSON objects.")
        expected = {f for f in CalibrationStats.__dataclass_fields__}
        if set(stats) != expected:
            raise fail(f"`stats` keys must be {sorted(expected)}, got {sorted(stats)}.")
        try:
            # Refit from the stored examples: a hand-edited or truncated file then fails loudly, not silently.
            refit = cls(calibrator.alpha, calibrator.method, "normal", signal).fit(
                data.get("sequence_entropies"), data.get("is_correct")
            )
        except (TypeError, ValueError) as err:
            raise fail(f"stored examples are invalid: {err}") from None
        for key in ("n_correct", "n_incorrect", "mu_correct", "sigma_correct", "mu_incorrect", "sigma_incorrect"):
            if not isinstance(stats[key], int | float) or not math.isclose(
                stats[key], getattr(refit.stats, key), rel_tol=1e-9, abs_tol=1e-12
            ):
                raise fail(f"`stats.{key}` = {stats[key]!r} does not match the stored examples.")
        if not isinstance(stats["thresholds"], dict) or set(stats["thresholds"]) != set(THRESHOLD_METHODS):
            raise fail(f"`stats.thresholds` must have the keys {list(THRESHOLD_METHODS)}.")
        for key, value in stats["thresholds"].items():
            if not isinstance(value, int | float) or not math.isclose(
                value, refit.stats.thresholds[key], rel_tol=1e-9, abs_tol=1e-12
            ):
                raise fail(f"`stats.thresholds.{key}` = {value!r} does not match the stored examples.")
        p_value = stats["p_value"]
        if not isinstance(p_value, int | float) or not (0.0 <= p_value <= 1.0):
            raise fail(f"`stats.p_value` must be in [0, 1], got {p_value!r}.")
        if stats["p_value_method"] not in ("welch_t", "normal_approximation"):
            raise fail("`stats.p_value_method` must be 'welch_t' or 'normal_approximation'.")
        calibrator.sequence_entropies, calibrator.is_correct = refit.sequence_entropies, refit.is_correct
        # The p-value is kept as saved (scipy may be missing here); everything else is the refit's exact values.
        calibrator._stats = CalibrationStats(
            **{
                **asdict(refit.stats),
                "t_statistic": float(stats["t_statistic"]),
                "p_value": float(p_value),
                "p_value_method": stats["p_value_method"],
                "separates": bool(refit.stats.cohens_d < 0 and p_value < calibrator.alpha),
            }
        )
        return calibrator

    @classmethod
    def load(cls, path: str | os.PathLike) -> EntropyThresholdCalibrator:
        """Read a calibration written by :meth:`save`; a clear ``ValueError`` for corrupt or invalid files."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"No calibration file at {path}; create one with `trl-entropy calibrate`."
            ) from None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"Corrupt calibration file {path}: not valid JSON ({err}).") from None
        return cls.from_dict(payload, source=f"calibration file {path}")


def deepconf_threshold(warmup_confidences: Any, keep_ratio: float = 0.1) -> float:
    """DeepConf online stop threshold: the ``1 - keep_ratio`` quantile of warm-up traces' lowest-group confidences.

    Traces whose window confidence falls below it are stopped; ``keep_ratio = 0.1`` is DeepConf-low (keep the most
    confident 10%), ``0.9`` DeepConf-high (Fu et al., 2025).
    """
    values = [v for v in _as_float_list(warmup_confidences, "warmup_confidences") if math.isfinite(v)]
    if not values:
        raise ValueError("`warmup_confidences` must contain at least one finite value.")
    if not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"`keep_ratio` must be in (0, 1], got {keep_ratio}.")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), 1.0 - keep_ratio))


# ---------------------------------------------------------------------------------------------------------------------
# Online recording and stopping inside `model.generate`
# ---------------------------------------------------------------------------------------------------------------------


class TokenConfidenceRecorder(LogitsProcessor):
    """Records a :class:`ConfidenceSignal` of each decoding step's logits; leaves the logits unchanged.

    transformers applies custom logits processors after the built-in logit modifiers (repetition penalty, min
    length, suppressed tokens) and *before* the sampling warpers (temperature, top-k, top-p), so the recorder sees the
    model's own distribution at temperature 1 whatever the sampling settings, as the papers measure it.

    A new ``generate`` call is detected when the input is not the previous step's input plus one token; a prompt that
    is exactly the previous call's whole output therefore resumes the statistics. Call :meth:`reset` to start fresh.
    Beam search (which reorders rows) is not supported.
    """

    def __init__(self, signal: ConfidenceSignal | None = None):
        self.signal = signal or ConfidenceSignal()
        self.generation_index = 0
        self.reset()

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []
        self.prompt_length: int | None = None
        self._last_input: torch.Tensor | None = None
        self.generation_index += 1

    @property
    def num_steps(self) -> int:
        return len(self.values)

    def continues(self, input_ids: torch.Tensor) -> bool:
        """Whether ``input_ids`` is the last recorded input with one more token."""
        last = self._last_input
        return (
            last is not None
            and input_ids.shape == (last.size(0), last.size(1) + 1)
            and torch.equal(input_ids[:, :-1], last)
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.continues(input_ids):
            self.reset()
            self.prompt_length = input_ids.size(1)
        self._last_input = input_ids
        self.values.append(self.signal(scores).float())
        return scores

    def token_values(self) -> torch.Tensor:
        """``[batch, steps]`` signal of every recorded step (including steps of rows that already ended)."""
        if not self.values:
            return torch.empty(0, 0)
        return torch.stack(self.values, dim=1)


_REASONS = ("", "confident", "low_confidence", "delimiter", "eos", "length")


class EntropyEarlyStopping(StoppingCriteria):
    """Stops generation of each row whose confidence passes a threshold (Think Just Enough / DeepConf).

    Pass both parts to ``generate``::

        stopper = EntropyEarlyStopping(calibrator.threshold(), check_at="delimiter", delimiter="\\n\\n", tokenizer=tok)
        model.generate(**inputs, logits_processor=[stopper.recorder], stopping_criteria=[stopper])

    ``generate`` hands stopping criteria the *processed* scores, and only with ``output_scores=True``; the companion
    :attr:`recorder` reads each step's logits before temperature/top-k/top-p instead. Without it, the criterion falls
    back to ``scores`` when they are passed (then post-warper values, with a warning), else raises.

    Modes:
        * ``"entropy"`` (Think Just Enough): the row's running mean signal over all its generated tokens; stop when it
          is ``<= threshold`` (confident: answer now).
        * ``"deepconf"`` (DeepConf online): the mean signal over the row's last ``window`` tokens (all of them while
          fewer); stop when it is ``< threshold`` (unconfident: abandon the trace). Use a ``topk_confidence`` signal.

    A row is checked once it has generated ``min_new_tokens`` tokens, at every token (``check_at="token"``) or only
    at step delimiters (``"delimiter"``): tokens in ``delimiter_token_ids``, or tokens that complete the text
    ``delimiter`` (decoded with ``tokenizer``, so a ``"\\n\\n"`` generated as two ``"\\n"`` tokens counts). With
    ``stop_at_delimiter`` every row also stops at its first delimiter after ``min_new_tokens`` (the first reasoning
    step of the two-stage pipeline). A NaN signal never triggers a stop.

    After ``generate``, :attr:`num_tokens` holds each row's generated length (the token that ended it included),
    :attr:`stop_reasons` why it ended (``"confident"``, ``"low_confidence"``, ``"delimiter"``, ``"eos"``,
    ``"length"`` for ``max_tokens_per_row``, ``None`` if it ran to ``max_new_tokens``) and :meth:`sequence_signal`
    its mean signal. The counts are exact when no other criterion ends rows early.

    Args:
        threshold: stop threshold in the signal's unit; ``None`` never stops on confidence.
        mode: ``"entropy"`` or ``"deepconf"``.
        signal: the per-token signal; default top-20 entropy in bits (``"entropy"``) or DeepConf confidence.
        recorder: share an existing recorder (its signal wins over ``signal``).
        min_new_tokens: tokens a row generates before any check, >= 1.
        check_at: ``"token"`` or ``"delimiter"``.
        delimiter_token_ids: token ids that end a reasoning step; see :func:`delimiter_token_ids`.
        delimiter: text that ends a reasoning step, e.g. ``"\\n\\n"``; needs ``tokenizer``.
        tokenizer: decodes the newest tokens to find ``delimiter``.
        stop_at_delimiter: stop every row at its first delimiter.
        window: DeepConf window length, >= 1 (the paper uses 2048).
        eos_token_id: id(s) that end a row (so its length and statistics stop there).
        max_tokens_per_row: optional per-row cap on generated tokens (the token-budget mode uses it).
    """

    def __init__(
        self,
        threshold: float | None = None,
        *,
        mode: Literal["entropy", "deepconf"] = "entropy",
        signal: ConfidenceSignal | None = None,
        recorder: TokenConfidenceRecorder | None = None,
        min_new_tokens: int = 1,
        check_at: Literal["token", "delimiter"] = "token",
        delimiter_token_ids: Sequence[int] = (),
        delimiter: str | None = None,
        tokenizer=None,
        stop_at_delimiter: bool = False,
        window: int = 2048,
        eos_token_id: int | Sequence[int] | None = None,
        max_tokens_per_row: Sequence[int] | None = None,
    ):
        if mode not in ("entropy", "deepconf"):
            raise ValueError(f"`mode` must be 'entropy' or 'deepconf', got {mode!r}.")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"`threshold` must be a finite number or None, got {threshold}.")
        if not (isinstance(min_new_tokens, int) and min_new_tokens >= 1):
            raise ValueError(f"`min_new_tokens` must be an integer >= 1, got {min_new_tokens!r}.")
        if check_at not in ("token", "delimiter"):
            raise ValueError(f"`check_at` must be 'token' or 'delimiter', got {check_at!r}.")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"`window` must be an integer >= 1, got {window!r}.")
        delimiter_token_ids = [int(i) for i in delimiter_token_ids]
        if delimiter is not None and (not delimiter or tokenizer is None):
            raise ValueError("`delimiter` must be a non-empty string and needs `tokenizer` to decode tokens.")
        if (check_at == "delimiter" or stop_at_delimiter) and not (delimiter_token_ids or delimiter):
            raise ValueError(
                "Give `delimiter_token_ids` or `delimiter` (with `tokenizer`) with check_at='delimiter' or "
                "stop_at_delimiter."
            )
        if recorder is None:
            default = ConfidenceSignal("topk_confidence") if mode == "deepconf" else ConfidenceSignal()
            recorder = TokenConfidenceRecorder(signal or default)
        if recorder.signal.higher_is_confident != (mode == "deepconf"):
            raise ValueError(
                f"mode={mode!r} needs {'a topk_confidence' if mode == 'deepconf' else 'an entropy'} signal, got "
                f"kind={recorder.signal.kind!r}."
            )
        if max_tokens_per_row is not None and any(int(n) < 1 for n in max_tokens_per_row):
            raise ValueError("`max_tokens_per_row` entries must be >= 1.")
        self.threshold = threshold
        self.mode = mode
        self.recorder = recorder
        self.min_new_tokens = min_new_tokens
        self.check_at = check_at
        self.delimiter_token_ids = delimiter_token_ids
        self.delimiter = delimiter
        self.tokenizer = tokenizer
        self.stop_at_delimiter = stop_at_delimiter
        self.window = window
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = [int(i) for i in eos]
        self.max_tokens_per_row = None if max_tokens_per_row is None else [int(n) for n in max_tokens_per_row]
        self._generation_index = -1
        self._warned_scores = False
        self._init_state(0, torch.device("cpu"))

    def _init_state(self, batch_size: int, device: torch.device) -> None:
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.num_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._reason = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._stop_value = torch.full((batch_size,), float("nan"), dtype=torch.float64, device=device)
        # Cumulative sums of the signal per step, float64 so long generations do not drift.
        self._cumsum = [torch.zeros(batch_size, dtype=torch.float64, device=device)]

    def _completes_delimiter(self, input_ids: torch.LongTensor, active: torch.Tensor, step: int) -> torch.Tensor:
        """Rows whose newest token completes one more occurrence of ``delimiter`` in the generated text."""
        # Enough trailing tokens to hold the delimiter even if every token carries a single character.
        width = min(step, len(self.delimiter) + 1)
        rows = active.nonzero().flatten().tolist()
        tails = input_ids[rows, input_ids.size(1) - width :].tolist()
        texts = self.tokenizer.batch_decode([t for tail in tails for t in (tail, tail[:-1])])
        hits = torch.zeros_like(active)
        for k, row in enumerate(rows):
            hits[row] = texts[2 * k].count(self.delimiter) > texts[2 * k + 1].count(self.delimiter)
        return hits

    @property
    def stop_reasons(self) -> list[str | None]:
        return [_REASONS[r] or None for r in self._reason.tolist()]

    @property
    def stop_values(self) -> torch.Tensor:
        """The statistic (running mean or window mean) at which each row was stopped on confidence, else NaN."""
        return self._stop_value.clone()

    def sequence_signal(self) -> torch.Tensor:
        """Mean signal over each row's generated tokens, float64 ``[batch]`` (NaN for a row with none)."""
        count = self.num_tokens
        sums = torch.stack(self._cumsum, dim=1).gather(1, count.unsqueeze(1)).squeeze(1)
        return torch.where(count > 0, sums / count.clamp_min(1), torch.full_like(sums, float("nan")))

    def token_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [batch, steps], mask [batch, steps])``: the recorded signal and which steps belong to each row."""
        values = self.recorder.token_values()
        steps = torch.arange(values.size(1), device=self.num_tokens.device)
        return values, steps.unsqueeze(0) < self.num_tokens.unsqueeze(1)

    def _record_from_scores(self, input_ids: torch.LongTensor, scores: tuple[torch.Tensor] | None) -> None:
        if scores is None:
            raise RuntimeError(
                "EntropyEarlyStopping has no logits for this step: pass its recorder to generate, "
                "`logits_processor=[stopper.recorder]` (or `output_scores=True, return_dict_in_generate=True`)."
            )
        if not self._warned_scores:
            warnings.warn(
                "EntropyEarlyStopping reads `scores`, which transformers passes after temperature/top-k/top-p; pass "
                "`logits_processor=[stopper.recorder]` to measure the model's own distribution.",
                stacklevel=3,
            )
            self._warned_scores = True
        self.recorder(input_ids[:, :-1], scores[-1])

    def __call__(self, input_ids: torch.LongTensor, scores: tuple[torch.Tensor] | None, **kwargs) -> torch.BoolTensor:
        recorder = self.recorder
        last = recorder._last_input
        if last is None or last.shape != input_ids[:, :-1].shape or not torch.equal(last, input_ids[:, :-1]):
            # The recorder did not see this step's logits: it is not in `logits_processor`.
            self._record_from_scores(input_ids, scores)
        if recorder.generation_index != self._generation_index:
            self._generation_index = recorder.generation_index
            if self.max_tokens_per_row is not None and len(self.max_tokens_per_row) != input_ids.size(0):
                raise ValueError(
                    f"`max_tokens_per_row` has {len(self.max_tokens_per_row)} entries for {input_ids.size(0)} rows."
                )
            self._init_state(input_ids.size(0), input_ids.device)
        step = recorder.num_steps  # the newest token is the step-th generated one
        value = recorder.values[-1].to(device=input_ids.device, dtype=torch.float64)
        self._cumsum.append(self._cumsum[-1] + value)
        active = ~self.done
        self.num_tokens += active.long()
        token = input_ids[:, -1]
        is_eos = torch.isin(token, torch.tensor(self.eos_token_ids, device=token.device))
        is_delim = torch.isin(token, torch.tensor(self.delimiter_token_ids, device=token.device))
        if self.delimiter is not None:
            is_delim = is_delim | self._completes_delimiter(input_ids, active, step)
        eligible = active & ~is_eos & (step >= self.min_new_tokens)
        check = eligible & is_delim if self.check_at == "delimiter" else eligible

        stop = torch.zeros_like(active)
        if self.threshold is not None:
            # An active row has been active at every step, so its statistics are those of the last steps.
            if self.mode == "entropy":
                statistic = self._cumsum[-1] / step
                stop = check & (statistic <= self.threshold)
            else:
                width = min(self.window, step)
                statistic = (self._cumsum[-1] - self._cumsum[-1 - width]) / width
                stop = check & (statistic < self.threshold)
            self._stop_value = torch.where(stop, statistic, self._stop_value)
            self._reason[stop] = _REASONS.index("confident" if self.mode == "entropy" else "low_confidence")
        if self.stop_at_delimiter:
            at_step_end = eligible & is_delim & ~stop
            self._reason[at_step_end] = _REASONS.index("delimiter")
            stop = stop | at_step_end
        ended = active & is_eos
        self._reason[ended] = _REASONS.index("eos")
        if self.max_tokens_per_row is not None:
            limit = torch.tensor(self.max_tokens_per_row, device=token.device)
            capped = active & ~stop & ~ended & (self.num_tokens >= limit)
            self._reason[capped] = _REASONS.index("length")
            ended = ended | capped
        self.done |= stop | ended
        return self.done.clone()


def delimiter_token_ids(tokenizer, delimiter: str = "\n\n") -> list[int]:
    """Ids of every vocabulary token whose text contains ``delimiter`` (e.g. ``"\\n\\n"``, ``".\\n\\n"``).

    A delimiter split over two tokens (``"\\n"`` then ``"\\n"``) is not caught by ids; pass the text as
    ``EntropyEarlyStopping(delimiter=..., tokenizer=...)`` to catch it (SmolLM2 often emits two ``"\\n"``).
    """
    if not delimiter:
        raise ValueError("`delimiter` must be a non-empty string.")
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return [i for i, text in enumerate(texts) if delimiter in text]


# ---------------------------------------------------------------------------------------------------------------------
# The two-stage pipeline
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EarlyStopResult:
    """One problem's outcome in :func:`think_just_enough_generate`.

    Attributes:
        completion: the decoded output (first step, then the forced answer prompt and answer, or the continuation).
        completion_ids: its token ids, forced answer-prompt tokens included.
        num_tokens: ``len(completion_ids)``: every output token, forced ones included (so savings are not inflated).
        first_step_tokens: tokens of the first reasoning step (two-stage) or before the confident stop (online).
        step_signal: mean signal over the first step (two-stage) or the running mean at the stop (online); NaN when
            there is no value.
        confident: whether the row was stopped as confident and answered directly.
        outcome: ``"answered_early"``, ``"extended"`` (continued reasoning), ``"ended_in_first_step"`` (EOS during
            the first step) or ``"finished"`` (online mode, no confident stop).
    """

    completion: str
    completion_ids: list[int]
    num_tokens: int
    first_step_tokens: int
    step_signal: float
    confident: bool
    outcome: str


def _encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def _generate_rows(
    model,
    rows: list[list[int]],
    pad_token_id: int,
    max_new_tokens: list[int],
    make_stopper,
    batch_size: int,
    generation_kwargs: dict,
    progress,
) -> list[tuple[list[int], float, str | None, float]]:
    """Generate a continuation of each token row, left-padded in batches.

    Returns per row ``(new_ids, mean_signal, stop_reason, stop_value)``; ``make_stopper(caps)`` builds the
    :class:`EntropyEarlyStopping` of a batch whose rows may generate at most ``caps`` tokens each.
    """
    device = next(model.parameters()).device
    out: list[tuple[list[int], float, str | None, float]] = []
    for start in range(0, len(rows), batch_size):
        batch, caps = rows[start : start + batch_size], max_new_tokens[start : start + batch_size]
        width = max(len(r) for r in batch)
        input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
        stopper = make_stopper(caps)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max(caps),
            logits_processor=[stopper.recorder],
            stopping_criteria=[stopper],
            pad_token_id=pad_token_id,
            **generation_kwargs,
        )[:, width:]
        signal = stopper.sequence_signal().tolist()
        reasons, values = stopper.stop_reasons, stopper.stop_values.tolist()
        for i in range(len(batch)):
            n = int(stopper.num_tokens[i]) if stopper.num_tokens.numel() else 0
            out.append((generated[i, :n].tolist(), signal[i] if n else float("nan"), reasons[i], values[i]))
        progress.update(len(batch))
    return out


def think_just_enough_generate(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    threshold: float | None = None,
    *,
    mode: Literal["two_stage", "online"] = "two_stage",
    signal: ConfidenceSignal | None = None,
    step_delimiter: str = "\n\n",
    step_delimiter_ids: Sequence[int] | None = None,
    min_step_tokens: int = 4,
    max_step_tokens: int = 128,
    max_new_tokens: int = 512,
    answer_prompt: str = "Therefore, the final answer is",
    max_answer_tokens: int = 16,
    token_budget: int | None = None,
    batch_size: int = 8,
    generation_kwargs: dict | None = None,
    show_progress: bool = True,
) -> list[EarlyStopResult]:
    """Think Just Enough: answer right away when the first reasoning step is confident, else keep reasoning.

    ``mode="two_stage"`` (the paper): (1) generate the first reasoning step, up to the first ``step_delimiter``
    after ``min_step_tokens`` tokens or ``max_step_tokens``; (2) if its mean signal is ``<= threshold``, append
    ``answer_prompt`` and generate a short answer, else continue reasoning. ``mode="online"``: one pass in which an
    :class:`EntropyEarlyStopping` checks the running mean at every step delimiter; confident rows are then answered
    directly. ``threshold=None`` never stops early: the baseline with identical decoding.

    Token budget (two-stage only): ``token_budget`` is the average number of output tokens per problem. The prompts
    share a pool of ``token_budget * len(prompts)`` tokens; what the first steps and early answers leave is split
    equally between the problems that continue reasoning, so tokens saved on confident problems go to uncertain ones.
    Without it, each problem may use up to ``max_new_tokens`` output tokens.

    Args:
        model: a causal LM; tokenizer: its tokenizer (``pad_token`` set).
        prompts: plain strings, or chat messages rendered with the tokenizer's chat template.
        threshold: stop threshold in the signal's unit (e.g. ``calibrator.threshold()``), or None.
        signal: token signal, an entropy kind (default top-20 entropy in bits, as the paper).
        step_delimiter / step_delimiter_ids: end of a reasoning step, as text found in the decoded tokens, or as ids.
        answer_prompt: text forced after a confident first step to elicit the answer.
        max_answer_tokens: tokens generated after ``answer_prompt``.
        batch_size: rows per ``generate`` call.
        generation_kwargs: extra ``generate`` arguments (``do_sample``, ``temperature``...).
        show_progress: tqdm bars over problems, one per stage.

    Returns:
        One :class:`EarlyStopResult` per prompt, in order.
    """
    from tqdm.auto import tqdm

    if mode not in ("two_stage", "online"):
        raise ValueError(f"`mode` must be 'two_stage' or 'online', got {mode!r}.")
    for name, value in (
        ("min_step_tokens", min_step_tokens),
        ("max_step_tokens", max_step_tokens),
        ("max_new_tokens", max_new_tokens),
        ("max_answer_tokens", max_answer_tokens),
        ("batch_size", batch_size),
    ):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if max_step_tokens > max_new_tokens:
        raise ValueError(f"`max_step_tokens` ({max_step_tokens}) must be <= `max_new_tokens` ({max_new_tokens}).")
    if token_budget is not None and (mode != "two_stage" or token_budget < 1):
        raise ValueError(f"`token_budget` must be an integer >= 1 and needs mode='two_stage', got {token_budget!r}.")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"`threshold` must be finite or None, got {threshold}.")
    signal = signal or ConfidenceSignal()
    if signal.higher_is_confident:
        raise ValueError("`signal` must be an entropy kind: low entropy means confident in Think Just Enough.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer needs a pad token (`tokenizer.pad_token = tokenizer.eos_token`).")
    if step_delimiter_ids is not None:
        delimiter = {"delimiter_token_ids": list(step_delimiter_ids)}
        if not delimiter["delimiter_token_ids"]:
            raise ValueError("`step_delimiter_ids` must be non-empty.")
    elif step_delimiter:
        delimiter = {"delimiter": step_delimiter, "tokenizer": tokenizer}
    else:
        raise ValueError("`step_delimiter` must be a non-empty string (or give `step_delimiter_ids`).")
    eos_ids = _eos_ids(model, tokenizer)
    generation_kwargs = dict(generation_kwargs or {})
    pad = tokenizer.pad_token_id
    n = len(prompts)
    prompt_ids = [_encode_prompt(tokenizer, p) for p in prompts]

    def stopper_factory(**kwargs):
        return lambda caps: EntropyEarlyStopping(
            recorder=TokenConfidenceRecorder(signal),
            **delimiter,
            eos_token_id=eos_ids,
            max_tokens_per_row=caps,
            **kwargs,
        )

    def run(rows, caps, desc, **kwargs):
        with tqdm(total=len(rows), desc=desc, disable=not show_progress or not rows, leave=False) as bar:
            return _generate_rows(
                model, rows, pad, caps, stopper_factory(**kwargs), batch_size, generation_kwargs, bar
            )

    # Stage 1: the first reasoning step (two-stage) or the whole online pass.
    if mode == "two_stage":
        first = run(
            prompt_ids, [max_step_tokens] * n, "first step", min_new_tokens=min_step_tokens, stop_at_delimiter=True
        )
    else:
        first = run(
            prompt_ids,
            [max_new_tokens] * n,
            "online",
            threshold=threshold,
            min_new_tokens=min_step_tokens,
            check_at="delimiter",
        )
    step_ids = [ids for ids, *_ in first]
    if mode == "two_stage":
        step_signal = [value for _, value, _, _ in first]
        ended = [reason == "eos" for _, _, reason, _ in first]
        confident = [
            threshold is not None and not e and math.isfinite(v) and v <= threshold for v, e in zip(step_signal, ended)
        ]
    else:
        confident = [reason == "confident" for _, _, reason, _ in first]
        step_signal = [stop if c else value for (_, value, _, stop), c in zip(first, confident)]
        ended = [not c for c in confident]

    # Stage 2a: answer directly after a confident step.
    answers: dict[int, list[int]] = {}
    confident_rows = [i for i in range(n) if confident[i]]
    if confident_rows:
        forced = {}
        for i in confident_rows:
            text = answer_prompt if first[i][2] == "delimiter" or mode == "online" else step_delimiter + answer_prompt
            forced[i] = tokenizer(text, add_special_tokens=False)["input_ids"]
        outputs = run(
            [prompt_ids[i] + step_ids[i] + forced[i] for i in confident_rows],
            [max_answer_tokens] * len(confident_rows),
            "answer",
            stop_at_delimiter=True,
        )
        for i, (ids, *_) in zip(confident_rows, outputs):
            answers[i] = forced[i] + ids

    # Stage 2b: continue reasoning on the uncertain rows.
    continuations: dict[int, list[int]] = {}
    extend_rows = [i for i in range(n) if not confident[i] and not ended[i]] if mode == "two_stage" else []
    if extend_rows:
        if token_budget is not None:
            used = sum(len(ids) for ids in step_ids) + sum(len(a) for a in answers.values())
            share = max(0, token_budget * n - used) // len(extend_rows)
            caps = {i: share for i in extend_rows}
        else:
            caps = {i: max_new_tokens - len(step_ids[i]) for i in extend_rows}
        extend_rows = [i for i in extend_rows if caps[i] >= 1]
        outputs = run(
            [prompt_ids[i] + step_ids[i] for i in extend_rows], [caps[i] for i in extend_rows], "extended reasoning"
        )
        for i, (ids, *_) in zip(extend_rows, outputs):
            continuations[i] = ids

    results = []
    for i in range(n):
        ids = step_ids[i] + answers.get(i, []) + continuations.get(i, [])
        if confident[i]:
            outcome = "answered_early"
        elif mode == "online":
            outcome = "finished"
        elif ended[i]:
            outcome = "ended_in_first_step"
        else:
            outcome = "extended"
        results.append(
            EarlyStopResult(
                completion=tokenizer.decode(ids, skip_special_tokens=True),
                completion_ids=ids,
                num_tokens=len(ids),
                first_step_tokens=len(step_ids[i]),
                step_signal=float(step_signal[i]),
                confident=confident[i],
                outcome=outcome,
            )
        )
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Command-line entry points (`trl-entropy calibrate` / `trl-entropy generate`)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _EarlyStopTaskArguments:
    """Model, task and decoding settings shared by `calibrate` and `generate`."""

    model_name_or_path: str = field(
        default="smollm2",
        metadata={"help": "Model: 'smollm2' (embedded SmolLM2-135M-Instruct, offline), a hub id or a local folder."},
    )
    task: str = field(
        default="arithmetic",
        metadata={"help": "Problems: 'arithmetic' (built in, offline), or 'gsm8k' / 'math500' (need the hub)."},
    )
    num_examples: int = field(default=20, metadata={"help": "Number of problems, >= 1."})
    split: str = field(default="train", metadata={"help": "Task split: 'train' or 'test' for 'arithmetic'."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic problems and of sampling."})
    arithmetic_low: int = field(default=10, metadata={"help": "Smallest arithmetic operand, >= 0."})
    arithmetic_high: int = field(default=99, metadata={"help": "Largest arithmetic operand, >= arithmetic_low."})
    arithmetic_operations: str = field(
        default="+", metadata={"help": "Arithmetic operators to draw from, a string over '+-*' (e.g. '+*')."}
    )
    instruction: str = field(
        default="Think step by step.",
        metadata={"help": "Text appended to each question, so that there is reasoning to cut (may be empty)."},
    )
    signal_kind: str = field(
        default="topk_entropy",
        metadata={"help": "Token signal: 'topk_entropy' (Think Just Enough) or 'entropy' (full vocabulary)."},
    )
    top_k: int = field(default=20, metadata={"help": "k of the top-k entropy, >= 2; the paper uses 20."})
    base: float = field(
        default=2.0, metadata={"help": "Log base of the entropy, > 0 and != 1; 2 (bits) in the paper."}
    )
    step_delimiter: str = field(
        default="\n\n",
        metadata={"help": "Text that ends a reasoning step; escapes such as '\\n' are decoded (command line)."},
    )
    min_step_tokens: int = field(default=4, metadata={"help": "Tokens before a step delimiter counts, >= 1."})
    max_step_tokens: int = field(default=128, metadata={"help": "Longest first reasoning step, >= 1."})
    max_new_tokens: int = field(
        default=384, metadata={"help": "Most output tokens per problem without early stopping, >= max_step_tokens."}
    )
    batch_size: int = field(default=8, metadata={"help": "Problems per generate call, >= 1."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature, > 0 (with do_sample)."})

    def __post_init__(self):
        for name in ("num_examples", "min_step_tokens", "max_step_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.max_step_tokens > self.max_new_tokens:
            raise ValueError(
                f"`max_step_tokens` ({self.max_step_tokens}) must be <= `max_new_tokens` ({self.max_new_tokens})."
            )
        if self.arithmetic_low < 0 or self.arithmetic_high < self.arithmetic_low:
            raise ValueError("`arithmetic_low` must be >= 0 and `arithmetic_high` >= `arithmetic_low`.")
        if not self.arithmetic_operations or set(self.arithmetic_operations) - set("+-*"):
            raise ValueError(
                f"`arithmetic_operations` must be a string over '+-*', got {self.arithmetic_operations!r}."
            )
        if not (self.temperature > 0):
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if "\\" in self.step_delimiter:  # "\\n\\n" typed on a command line means two newlines
            self.step_delimiter = codecs.decode(self.step_delimiter, "unicode_escape")
        if not self.step_delimiter:
            raise ValueError("`step_delimiter` must be a non-empty string.")
        if self.signal_kind not in ("topk_entropy", "entropy"):
            raise ValueError(f"`signal_kind` must be 'topk_entropy' or 'entropy', got {self.signal_kind!r}.")
        ConfidenceSignal(self.signal_kind, self.top_k, self.base)  # validates top_k and base

    @property
    def signal(self) -> ConfidenceSignal:
        return ConfidenceSignal(self.signal_kind, self.top_k, self.base)

    def generation_kwargs(self) -> dict:
        return {"do_sample": True, "temperature": self.temperature} if self.do_sample else {"do_sample": False}


@dataclass
class CalibrateArguments(_EarlyStopTaskArguments):
    """Arguments of ``trl-entropy calibrate``: measure first-step entropy and correctness on a few problems
    (Think Just Enough calibrates on 5-20) and save the fitted thresholds as JSON.

    Each problem runs the full pipeline without early stopping; its label is whether the final answer is correct.
    """

    alpha: float = field(default=0.05, metadata={"help": "Significance level of the separation test, in (0, 1)."})
    method: str = field(
        default="mean",
        metadata={"help": "Default threshold saved with the calibration: 'mean', 'info', 'bayes' or 'universal'."},
    )
    p_value_method: str = field(
        default="auto", metadata={"help": "'auto' (scipy Welch t-test if installed), 'scipy' or 'normal'."}
    )
    output_path: str = field(default="calibration.json", metadata={"help": "Where to write the calibration JSON."})

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.alpha < 1):
            raise ValueError(f"`alpha` must be in (0, 1), got {self.alpha}.")
        if self.method not in THRESHOLD_METHODS:
            raise ValueError(f"`method` must be one of {THRESHOLD_METHODS}, got {self.method!r}.")
        if self.p_value_method not in ("auto", "scipy", "normal"):
            raise ValueError(f"`p_value_method` must be 'auto', 'scipy' or 'normal', got {self.p_value_method!r}.")


@dataclass
class EarlyStopGenerateArguments(_EarlyStopTaskArguments):
    """Arguments of ``trl-entropy generate``: solve problems with entropy early stopping, grade them, and compare
    tokens and accuracy with the same decoding without early stopping."""

    num_examples: int = field(default=64, metadata={"help": "Number of problems, >= 1."})
    split: str = field(default="test", metadata={"help": "Task split: held-out 'test' by default."})
    calibration_path: str | None = field(
        default=None, metadata={"help": "Calibration JSON from `calibrate`; its signal settings are used."}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "Explicit stop threshold (signal units); overrides the calibration's."}
    )
    method: str | None = field(
        default=None, metadata={"help": "Which calibrated threshold: 'mean', 'info', 'bayes', 'universal'."}
    )
    mode: str = field(
        default="two_stage",
        metadata={"help": "'two_stage' (decide after the first step, the paper) or 'online' (check every step)."},
    )
    answer_prompt: str = field(
        default="Therefore, the final answer is", metadata={"help": "Text forced to elicit the answer after a stop."}
    )
    max_answer_tokens: int = field(default=16, metadata={"help": "Tokens generated after `answer_prompt`, >= 1."})
    token_budget: int | None = field(
        default=None,
        metadata={"help": "Average output tokens per problem; saved tokens go to uncertain problems (two_stage)."},
    )
    compare_baseline: bool = field(default=True, metadata={"help": "Also run without early stopping and compare."})
    require_separation: bool = field(
        default=False, metadata={"help": "Refuse a calibration whose signal does not separate correct answers."}
    )
    output_path: str | None = field(
        default="early_stop_results.json", metadata={"help": "Where to write per-problem results and metrics."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.calibration_path is None and self.threshold is None:
            raise ValueError("Give `calibration_path` (from `trl-entropy calibrate`) or an explicit `threshold`.")
        if self.method is not None and self.method not in THRESHOLD_METHODS:
            raise ValueError(f"`method` must be one of {THRESHOLD_METHODS}, got {self.method!r}.")
        if self.mode not in ("two_stage", "online"):
            raise ValueError(f"`mode` must be 'two_stage' or 'online', got {self.mode!r}.")
        if self.max_answer_tokens < 1:
            raise ValueError(f"`max_answer_tokens` must be >= 1, got {self.max_answer_tokens}.")
        if self.token_budget is not None and (self.token_budget < 1 or self.mode != "two_stage"):
            raise ValueError("`token_budget` must be >= 1 and needs mode='two_stage'.")


def _json_safe(value: Any) -> Any:
    """NaN/inf become null, so the results file is valid JSON (a NaN entropy means "no signal", not a number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _load_problems(args: _EarlyStopTaskArguments) -> tuple[list[list[dict]], list[str]]:
    from .tasks import ArithmeticTask, load_task

    if args.task == "arithmetic":
        task = ArithmeticTask(args.arithmetic_low, args.arithmetic_high, tuple(args.arithmetic_operations))
        data = task.dataset(args.num_examples, split=args.split, seed=args.seed)
    else:
        data = load_task(args.task, n=args.num_examples, split=args.split, seed=args.seed)
    # The task's own system prompt asks for the bare number; here the model should reason, so only the question.
    prompts = [[{"role": "user", "content": f"{q} {args.instruction}".strip()}] for q in data["question"]]
    return prompts, [str(a) for a in data["answer"]]


def _pipeline_kwargs(args: _EarlyStopTaskArguments) -> dict:
    return {
        "signal": args.signal,
        "step_delimiter": args.step_delimiter,
        "min_step_tokens": args.min_step_tokens,
        "max_step_tokens": args.max_step_tokens,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "generation_kwargs": args.generation_kwargs(),
    }


def _load_model(args: _EarlyStopTaskArguments):
    from .models import load_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_name_or_path)
    model.eval()
    return model, tokenizer


def run_calibrate(args: CalibrateArguments) -> EntropyThresholdCalibrator:
    """Calibrate the stop threshold on ``args.num_examples`` problems, save it to ``args.output_path`` and print the
    summary. Returns the fitted calibrator."""
    from .tasks import grade

    model, tokenizer = _load_model(args)
    prompts, answers = _load_problems(args)
    results = think_just_enough_generate(model, tokenizer, prompts, threshold=None, **_pipeline_kwargs(args))
    correct = [grade(r.completion, a) for r, a in zip(results, answers)]
    calibrator = EntropyThresholdCalibrator(args.alpha, args.method, args.p_value_method, args.signal)
    calibrator.fit([r.step_signal for r in results], correct)
    path = calibrator.save(args.output_path)
    print(calibrator.summary())
    print(f"Saved to {path}")
    return calibrator


def run_early_stop_generate(args: EarlyStopGenerateArguments) -> dict:
    """Solve ``args.num_examples`` problems with early stopping (and, with ``compare_baseline``, without), grade
    them, print a comparison and write per-problem results to ``args.output_path``. Returns the metrics."""
    from .tasks import grade

    signal, threshold, calibration = args.signal, args.threshold, None
    if args.calibration_path is not None:
        calibrator = EntropyThresholdCalibrator.load(args.calibration_path)
        signal = calibrator.signal  # the threshold is only meaningful in the signal it was calibrated on
        if not calibrator.separates:
            message = calibrator.summary()
            if args.require_separation:
                raise ValueError(f"The calibration does not separate correct from incorrect answers:\n{message}")
            logger.warning("Early stopping with a calibration that does not separate:\n%s", message)
        if threshold is None:
            threshold = calibrator.threshold(args.method)
        calibration = {"path": args.calibration_path, **asdict(calibrator.stats)}
    model, tokenizer = _load_model(args)
    prompts, answers = _load_problems(args)
    kwargs = {**_pipeline_kwargs(args), "signal": signal, "mode": args.mode, "answer_prompt": args.answer_prompt}
    kwargs.update(max_answer_tokens=args.max_answer_tokens, token_budget=args.token_budget)

    def evaluate(tau: float | None) -> tuple[dict, list[dict]]:
        results = think_just_enough_generate(model, tokenizer, prompts, threshold=tau, **kwargs)
        rows = [{**asdict(r), "answer": a, "correct": grade(r.completion, a)} for r, a in zip(results, answers)]
        for row in rows:
            row.pop("completion_ids")
        metrics = {
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "mean_tokens": sum(r["num_tokens"] for r in rows) / len(rows),
            "total_tokens": sum(r["num_tokens"] for r in rows),
            "answered_early": sum(r["confident"] for r in rows) / len(rows),
        }
        return metrics, rows

    early, early_rows = evaluate(threshold)
    report: dict[str, Any] = {"threshold": threshold, "signal": asdict(signal), "calibration": calibration}
    report["early_stopping"] = early
    print(
        f"early stopping (tau={threshold:.4f}): accuracy {early['accuracy']:.3f}, "
        f"{early['mean_tokens']:.1f} tokens/problem, {early['answered_early']:.0%} answered after the first step"
    )
    if args.compare_baseline:
        base, base_rows = evaluate(None)
        report["baseline"] = base
        report["token_saving"] = 1.0 - early["total_tokens"] / max(1, base["total_tokens"])
        report["accuracy_change"] = early["accuracy"] - base["accuracy"]
        print(
            f"without early stopping:   accuracy {base['accuracy']:.3f}, {base['mean_tokens']:.1f} tokens/problem; "
            f"saving {report['token_saving']:.1%}, accuracy change {report['accuracy_change']:+.3f}"
        )
    if args.output_path:
        payload = {"args": asdict(args), "metrics": report, "results": early_rows}
        Path(args.output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_path).write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False))
    return report
