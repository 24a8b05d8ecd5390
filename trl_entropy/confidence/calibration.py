"""Calibration of the stop threshold: the four thresholds of Think Just Enough, the separation test, DeepConf's
online threshold. Pure statistics on lists of numbers; nothing here generates."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..files import write_atomically
from ..stats import cohens_d, welch_p_value
from .signals import ConfidenceSignal
from .thresholds import threshold_bayes, threshold_info, threshold_mean, threshold_universal

__all__ = [
    "THRESHOLD_METHODS",
    "welch_p_value",
    "CalibrationStats",
    "EntropyThresholdCalibrator",
    "deepconf_threshold",
]

THRESHOLD_METHODS = ("mean", "info", "bayes", "universal")
NEGATIVE_ENTROPY_TOLERANCE = 1e-4
"""How far below 0 a measured entropy may lie (float32 rounding of a near-one-hot distribution is ~1e-6)."""
"""Threshold formulas of Think Just Enough, section 3 of REFERENCE.md."""

_CALIBRATION_FORMAT = "trl-entropy/entropy-calibration"
_CALIBRATION_VERSION = 1


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
            ValueError: lengths differ, an entry is NaN, infinite or negative (below ``-1e-4``: float32 rounding aside,
                an entropy is >= 0), a group (correct or incorrect) has fewer than
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
        # An entropy is >= 0; float32 rounding leaves at most a few 1e-6 below it, anything lower is not an entropy
        # (log-probabilities, or a confidence whose higher values mean more confident).
        negative = [i for i, v in enumerate(entropies) if v < -NEGATIVE_ENTROPY_TOLERANCE]
        if negative:
            raise ValueError(
                f"`sequence_entropies` must be entropies, >= 0, got negative values at entries {negative[:10]} (e.g. "
                f"{entropies[negative[0]]:g}): pass entropies, not log-probabilities or confidences."
            )
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
        write_atomically(path, payload.encode("utf-8"))
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
