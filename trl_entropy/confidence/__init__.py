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
* :func:`think_just_enough_generate` is the paper's two-stage pipeline, with a token-budget mode.

One layer per module: :mod:`.signals` (per-token maths), :mod:`.calibration` (statistics), :mod:`.stopping` (hooks
inside ``generate``), :mod:`.pipeline` (the two-stage method). What ``trl-entropy calibrate`` and ``generate
--early_stopping`` run (model and task loading, grading, files) lives beside the CLI, in
:mod:`trl_entropy.cli.confidence`; this package knows no command line and no task.
"""

from .calibration import (
    THRESHOLD_METHODS,
    CalibrationStats,
    EntropyThresholdCalibrator,
    deepconf_threshold,
    welch_p_value,
)
from .pipeline import EarlyStopResult, think_just_enough_generate
from .signals import ConfidenceSignal
from .stopping import EntropyEarlyStopping, TokenConfidenceRecorder, delimiter_token_ids

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
]
