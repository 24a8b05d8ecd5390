"""Training callbacks: entropy statistics (:mod:`.entropy_stats`), the collapse triggers (:mod:`.collapse`), the
collapse guard (:mod:`.collapse_guard`) and the plots of a run's statistics file (:mod:`.plots`)."""

from .collapse import (
    ACTIONS,
    CollapseGuardConfig,
    entropy_decay_fired,
    entropy_floor_fired,
    identical_completions_fired,
    length_collapse_fired,
    probe_drop_fired,
    probe_within_budget,
    repetition_fired,
    signal_triggers,
)
from .collapse_guard import (
    BEST_WEIGHTS_FILE,
    GUARD_STATE_FILE,
    SIGNAL_KEYS,
    CollapseGuardCallback,
)
from .entropy_stats import (
    STATE_FILE_NAME,
    STATS_FILE_NAME,
    EntropyStatsCallback,
    EntropyStatsConfig,
    append_jsonl_record,
    linear_trend_slope,
    merge_window_states,
    pearson_correlation,
    repeated_ngram_counts,
    truncate_jsonl,
)

__all__ = [
    "EntropyStatsCallback",
    "EntropyStatsConfig",
    "STATE_FILE_NAME",
    "STATS_FILE_NAME",
    "append_jsonl_record",
    "linear_trend_slope",
    "merge_window_states",
    "pearson_correlation",
    "repeated_ngram_counts",
    "truncate_jsonl",
    "ACTIONS",
    "CollapseGuardConfig",
    "entropy_floor_fired",
    "entropy_decay_fired",
    "length_collapse_fired",
    "repetition_fired",
    "identical_completions_fired",
    "probe_drop_fired",
    "probe_within_budget",
    "signal_triggers",
    "CollapseGuardCallback",
    "GUARD_STATE_FILE",
    "BEST_WEIGHTS_FILE",
    "SIGNAL_KEYS",
]
