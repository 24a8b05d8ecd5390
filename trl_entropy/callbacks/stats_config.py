"""The settings of :class:`~trl_entropy.callbacks.EntropyStatsCallback` (what it logs, how finely, where)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..files import STATS_FILE_NAME

__all__ = ["EntropyStatsConfig"]

# The paper's forking ratio (Wang et al., 2025): the callback's default when neither it nor the trainer sets one.
_DEFAULT_FORKING_RATIO = 0.2


@dataclass
class EntropyStatsConfig:
    """Settings of :class:`EntropyStatsCallback`.

    Parameters:
        quantiles (`tuple[float, ...]`, *optional*, defaults to `(0.1, 0.25, 0.5, 0.75, 0.9, 0.99)`):
            Entropy quantiles to log as ``sampling_entropy/p10`` etc., each in (0, 1).
        bins (`int`, *optional*, defaults to `100`):
            Linear histogram bins over ``[0, log V]`` sent to the logging backends and the JSONL, in [1, 512].
        top_tokens (`int`, *optional*, defaults to `20`):
            Number of most frequent forking tokens to record per logging step, in [0, 1000].
        forking_token_ratio (`float` or `None`, *optional*, defaults to `None`):
            Fraction rho of highest-entropy tokens that count as forking tokens, in (0, 1]. `None` takes the trainer's
            ``args.forking_token_ratio``, else TRL's ``args.top_entropy_quantile``, when below 1 (1 means the mask is
            off), else 0.2 (the value of Wang et al., 2025).
        forking_threshold (`float` or `None`, *optional*, defaults to `None`):
            Fixed entropy threshold (nats, >= 0) for ``sampling_entropy/frac_above_forking_threshold``. `None`
            freezes the ``1 - rho`` entropy quantile of the first logging step, so the fraction starts near rho and
            falls as the policy's entropy collapses.
        trend_window (`int`, *optional*, defaults to `10`):
            Number of logging steps over which ``sampling_entropy/trend_slope`` (least-squares slope of the mean
            entropy, nats per step) is fitted, in [2, 100000].
        repetition_ngram (`int`, *optional*, defaults to `4`):
            n of the n-grams in ``sampling_entropy/repetition_rate`` (repeated n-grams within a completion over all
            n-grams), in [1, 64].
        entropy_reward_key (`str` or `None`, *optional*, defaults to `None`):
            Column of the trainer's logged rewards (or extra logged columns) that holds the entropy reward. `None`
            picks the first name containing "entropy", "certainty" or "confidence".
        accuracy_reward_key (`str` or `None`, *optional*, defaults to `None`):
            Column that holds an accuracy-type reward. `None` picks the first name containing "accuracy" or "correct".
            ``sampling_entropy/reward_correlation`` (Pearson) is logged when both columns exist.
        vocab_size (`int` or `None`, *optional*, defaults to `None`):
            Vocabulary size (>= 2); sets the histogram range ``[0, log V]`` and the token counter. `None` reads it
            from the trainer's model config and tokenizer.
        stats_file (`str`, *optional*, defaults to `"entropy_stats.jsonl"`):
            JSONL file, relative to ``args.output_dir`` unless absolute.
        plot_on_train_end (`bool`, *optional*, defaults to `True`):
            Write PNG plots to ``output_dir/entropy_plots`` at the end of training (needs matplotlib).
    """

    quantiles: tuple[float, ...] = field(
        default=(0.1, 0.25, 0.5, 0.75, 0.9, 0.99), metadata={"help": "Entropy quantiles to log, each in (0, 1)."}
    )
    bins: int = field(default=100, metadata={"help": "Linear histogram bins over [0, log V], in [1, 512]."})
    top_tokens: int = field(default=20, metadata={"help": "Forking tokens to record per log, in [0, 1000]."})
    forking_token_ratio: float | None = field(
        default=None, metadata={"help": "Forking-token fraction rho in (0, 1]; None: from the trainer args or 0.2."}
    )
    forking_threshold: float | None = field(
        default=None, metadata={"help": "Fixed forking threshold in nats (>= 0); None: first log's 1-rho quantile."}
    )
    trend_window: int = field(default=10, metadata={"help": "Logging steps in the entropy trend fit, [2, 100000]."})
    repetition_ngram: int = field(default=4, metadata={"help": "n of the repetition-rate n-grams, in [1, 64]."})
    entropy_reward_key: str | None = field(default=None, metadata={"help": "Logged column of the entropy reward."})
    accuracy_reward_key: str | None = field(default=None, metadata={"help": "Logged column of the accuracy reward."})
    vocab_size: int | None = field(default=None, metadata={"help": "Vocabulary size (>= 2); None: from the model."})
    stats_file: str = field(default=STATS_FILE_NAME, metadata={"help": "JSONL file, relative to output_dir."})
    plot_on_train_end: bool = field(default=True, metadata={"help": "Write PNG plots at the end of training."})

    def __post_init__(self):
        self.quantiles = tuple(float(q) for q in self.quantiles)
        if not self.quantiles or not all(0.0 < q < 1.0 for q in self.quantiles):
            raise ValueError(f"`quantiles` must be a non-empty sequence of values in (0, 1), got {self.quantiles}.")
        _check_int("bins", self.bins, 1, 512)
        _check_int("top_tokens", self.top_tokens, 0, 1000)
        _check_int("trend_window", self.trend_window, 2, 100_000)
        _check_int("repetition_ngram", self.repetition_ngram, 1, 64)
        if self.forking_token_ratio is not None and not (0.0 < self.forking_token_ratio <= 1.0):
            raise ValueError(f"`forking_token_ratio` must be in (0, 1], got {self.forking_token_ratio}.")
        if self.forking_threshold is not None and not (
            math.isfinite(self.forking_threshold) and self.forking_threshold >= 0
        ):
            raise ValueError(f"`forking_threshold` must be a finite number >= 0, got {self.forking_threshold}.")
        if self.vocab_size is not None:
            _check_int("vocab_size", self.vocab_size, 2, 2**40)
        if not self.stats_file:
            raise ValueError("`stats_file` must be a non-empty file name.")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got {value!r}.")
