"""Collapse detection for label-free training: the configuration and the pure decision functions of the collapse guard.

Confidence rewards collapse: early gains, then accuracy below the start (No Free Lunch, arXiv 2506.17219), sudden
complete collapse in long self-rewarded runs (SRT, arXiv 2505.21444), repetition spam and short outputs. Each trigger
below reads a plain sequence of per-logging-step values (what TRL logs, averaged over ranks) and says whether it fires
now; :class:`~trl_entropy.callbacks.collapse_guard.CollapseGuardCallback` feeds them and acts. Nothing here touches a
model.

Triggers (each can be switched off with ``None``):

- ``entropy_floor``: the token entropy stayed at or below a floor for ``patience`` logging steps (the policy has
  become deterministic: EM-RL has nothing left to sharpen and only degenerate answers remain).
- ``entropy_decay``: the entropy fell faster than an exponential rate over the last ``trend_window`` steps (least
  squares slope of ``log H``), the shape of a sudden collapse rather than of steady sharpening.
- ``length_collapse``: the mean completion length fell below a fraction of its value at the start of training.
- ``repetition``: the n-gram repetition rate (``sampling_entropy/repetition_rate`` of ``EntropyStatsCallback``) rose
  above a ceiling (repetition spam).
- ``identical_completions``: the completions within a group became identical, read as the reward spread: the fraction
  of groups with zero reward spread (``frac_reward_zero_std``) or the batch reward standard deviation (``reward_std``).
- ``probe_drop``: the accuracy on a small labelled probe set fell by more than a margin below the best seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..stats import linear_trend_slope

__all__ = [
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
]

ACTIONS = ("warn", "stop", "stop_and_restore")


@dataclass
class CollapseGuardConfig:
    """Configuration of :class:`~trl_entropy.callbacks.collapse_guard.CollapseGuardCallback`.

    Defaults come from ``benchmarks/bench_collapse.py`` (SmolLM2-135M-Instruct, EM-RL with the token-entropy reward,
    a + b problems, 60 steps, see ``docs/collapse_guard.md``). The per-trigger "Measured" notes below are from its
    first run (one seed: a collapsing 5e-5 run and a healthy 2e-5 run, on which the log signals also fired, so they do
    not separate collapse from sharpening by themselves; the probe does). Its rerun (5e-5 and 2e-5 over 3 seeds, every
    run collapsing without the guard) found the probe firing on all four collapsing runs at steps 5-20. Hence, with a
    probe, a log signal only makes the guard evaluate the probe at once (`signals_need_probe`). A trigger set to
    ``None`` is off.

    Parameters:
        action (`str`, *optional*, defaults to `"stop_and_restore"`):
            What a collapse does: `"warn"` (log it, keep training), `"stop"` (end training at this step) or
            `"stop_and_restore"` (end training and load the weights of the best probe evaluation back into the model;
            without a probe set it behaves as `"stop"`).
        min_entropy (`float` or `None`, *optional*, defaults to `0.05`):
            Entropy floor in nats, >= 0: `entropy_floor` fires when the logged token entropy stays <= it for
            `patience` logging steps. Measured: it fired at step 44 of the healthy 2e-5 run and step 33 of the
            collapsing 5e-5 run (lowest entropies 0.012 and 0.015 nats): a probe trigger, not a verdict.
        max_entropy_decay (`float` or `None`, *optional*, defaults to `0.3`):
            Largest tolerated fall of `log(entropy)` per step, > 0: `entropy_decay` fires when the least-squares slope
            of `log H` over the last `trend_window` logging steps is below `-max_entropy_decay` (0.3: the entropy
            more than halves every 2.3 steps). Measured: first fired at step 15 of the 5e-5 run (the step its probe
            accuracy fell) and at step 34 of the healthy 2e-5 run.
        trend_window (`int`, *optional*, defaults to `5`):
            Logging steps in the entropy trend and in the start-of-training reference of `length_collapse`, in
            [2, 1000].
        min_length_ratio (`float` or `None`, *optional*, defaults to `0.3`):
            In (0, 1): `length_collapse` fires when the mean completion length stays below this fraction of its mean
            over the first `trend_window` logging steps for `patience` steps ("short outputs" collapse). Measured:
            it never fired; both runs' answers shrank from about 24 to 8-11 tokens ("a + b = c", healthy here).
        max_repetition_rate (`float` or `None`, *optional*, defaults to `0.5`):
            In (0, 1]: `repetition` fires when `sampling_entropy/repetition_rate` (repeated n-grams within a
            completion, logged by `EntropyStatsCallback`; absent without it) stays >= it for `patience` steps.
            Measured: at most 0.22 (5e-5) and 0.14 (2e-5) on a + b answers; never fired.
        max_identical_group_fraction (`float` or `None`, *optional*, defaults to `0.5`):
            In (0, 1]: `identical_completions` fires when the fraction of groups whose rewards have zero spread
            (`frac_reward_zero_std`, identical completions get identical entropy rewards) stays >= it for `patience`
            steps.
        min_reward_std (`float` or `None`, *optional*, defaults to `0.01`):
            >= 0: `identical_completions` also fires when the batch reward standard deviation (`reward_std`) stays
            <= it for `patience` steps. Needed because identical completions padded differently can get rewards that
            differ by float rounding, which TRL's exact zero-spread count misses. Measured (both tests together):
            fired at step 16 of the 5e-5 run and step 40 of the healthy 2e-5 run.
        patience (`int`, *optional*, defaults to `3`):
            Consecutive logging steps a level trigger must hold before it fires, in [1, 1000] (one noisy batch of
            2 prompts is not a collapse).
        warmup_steps (`int`, *optional*, defaults to `0`):
            Global steps before which no log-signal trigger fires, >= 0.
        probe_every (`int`, *optional*, defaults to `5`):
            Evaluate the probe set every this many global steps (and at the start), >= 1. Only with a probe set.
        probe_max_new_tokens (`int`, *optional*, defaults to `96`):
            Token budget of the greedy probe evaluation, >= 1. Pick one where the model's answers finish: the guard
            logs the probe's truncation rate (`collapse_guard/probe_truncated`). SmolLM2-135M-Instruct's verbose
            answers before training: 19% cut at 96 tokens on the benchmark's probe (62% at 48 tokens on another draw).
        probe_batch_size (`int`, *optional*, defaults to `32`):
            Probe problems per `generate` call, >= 1.
        max_probe_drop (`float` or `None`, *optional*, defaults to `0.15`):
            In (0, 1]: `probe_drop` fires when probe accuracy is below the best probe accuracy minus this, for
            `probe_patience` consecutive probe evaluations (5 problems of 32). Measured: the largest fall below the
            running best was 0.125 on the healthy 2e-5 run of the first benchmark run (15/32 then 11/32) and 0.219 at
            step 15 of its 5e-5 run: 0.15 sits between, with a thin margin on 32 problems. In the rerun it fired on all
            four collapsing runs (replayed: 24 problems would have too; 16 or a 48-token budget miss one).
        probe_patience (`int`, *optional*, defaults to `1`):
            Consecutive probe evaluations below the margin before `probe_drop` fires, in [1, 100].
        max_probe_time_fraction (`float` or `None`, *optional*, defaults to `0.1`):
            In (0, 1]: the guard's probe budget. A probe (scheduled or triggered) after the start runs only while the
            time spent in probes is at most this fraction of the training time so far (wall clock, probes excluded),
            otherwise it is skipped and logged; the fraction is logged as `collapse_guard/probe_time_fraction`.
            None: no budget.
        triggered_probe_cooldown (`int`, *optional*, defaults to `5`):
            >= 0: a log-signal suspicion triggers an out-of-schedule probe only if no probe ran in the last this many
            global steps (the log signals also fire on healthy runs: measured 14 times from step 34 of the 2e-5
            run, see `benchmarks/bench_collapse.py`).
        signals_need_probe (`bool`, *optional*, defaults to `True`):
            With a probe set: a log-signal trigger only makes the guard evaluate the probe at once (out of schedule)
            and act if `probe_drop` then fires; it is logged, not acted on. This keeps strong but healthy entropy
            minimisation running (measured: the healthy 2e-5 run raised 14 such suspicions, none confirmed). Without
            a probe set, log-signal triggers act directly, and in the benchmark they would have stopped the healthy
            run at step 34: without a probe prefer `action="warn"`.
        log_file (`str`, *optional*, defaults to `"collapse_guard.jsonl"`):
            File in `output_dir` that receives one JSON line per probe evaluation and per firing.
    """

    action: str = field(default="stop_and_restore", metadata={"help": "'warn', 'stop' or 'stop_and_restore'."})
    min_entropy: float | None = field(default=0.05, metadata={"help": "Entropy floor (nats), >= 0; None: off."})
    max_entropy_decay: float | None = field(
        default=0.3, metadata={"help": "Largest tolerated fall of log(entropy) per step, > 0; None: off."}
    )
    trend_window: int = field(default=5, metadata={"help": "Logging steps of the entropy trend, in [2, 1000]."})
    min_length_ratio: float | None = field(
        default=0.3, metadata={"help": "Mean length below this fraction of the start fires, in (0, 1); None: off."}
    )
    max_repetition_rate: float | None = field(
        default=0.5, metadata={"help": "Repetition rate ceiling, in (0, 1]; None: off."}
    )
    max_identical_group_fraction: float | None = field(
        default=0.5, metadata={"help": "Ceiling of the fraction of zero-spread groups, in (0, 1]; None: off."}
    )
    min_reward_std: float | None = field(
        default=0.01, metadata={"help": "Floor of the batch reward std, >= 0; None: off."}
    )
    patience: int = field(default=3, metadata={"help": "Logging steps a trigger must hold, in [1, 1000]."})
    warmup_steps: int = field(default=0, metadata={"help": "Steps before any log-signal trigger, >= 0."})
    probe_every: int = field(default=5, metadata={"help": "Probe evaluation every N steps, >= 1."})
    probe_max_new_tokens: int = field(default=96, metadata={"help": "Token budget of the probe, >= 1."})
    probe_batch_size: int = field(default=32, metadata={"help": "Probe problems per generate call, >= 1."})
    max_probe_drop: float | None = field(
        default=0.15, metadata={"help": "Probe accuracy drop below the best that fires, in (0, 1]; None: off."}
    )
    probe_patience: int = field(default=1, metadata={"help": "Probe evaluations below the margin, in [1, 100]."})
    max_probe_time_fraction: float | None = field(
        default=0.1, metadata={"help": "Probe time budget as a fraction of training time, in (0, 1]; None: none."}
    )
    triggered_probe_cooldown: int = field(
        default=5, metadata={"help": "Steps without a probe before a log signal may trigger one, >= 0."}
    )
    signals_need_probe: bool = field(
        default=True, metadata={"help": "With a probe set, log signals only trigger a probe evaluation."}
    )
    log_file: str = field(default="collapse_guard.jsonl", metadata={"help": "JSONL file in output_dir."})

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"`action` must be one of {ACTIONS}, got {self.action!r}.")
        _check_optional("min_entropy", self.min_entropy, 0.0, math.inf, low_open=False)
        _check_optional("max_entropy_decay", self.max_entropy_decay, 0.0, math.inf, low_open=True)
        _check_optional("min_length_ratio", self.min_length_ratio, 0.0, 1.0, low_open=True, high_open=True)
        _check_optional("max_repetition_rate", self.max_repetition_rate, 0.0, 1.0, low_open=True)
        _check_optional("max_identical_group_fraction", self.max_identical_group_fraction, 0.0, 1.0, low_open=True)
        _check_optional("min_reward_std", self.min_reward_std, 0.0, math.inf, low_open=False)
        _check_optional("max_probe_drop", self.max_probe_drop, 0.0, 1.0, low_open=True)
        _check_optional("max_probe_time_fraction", self.max_probe_time_fraction, 0.0, 1.0, low_open=True)
        for name, low, high in (
            ("trend_window", 2, 1000),
            ("patience", 1, 1000),
            ("warmup_steps", 0, 10**9),
            ("probe_every", 1, 10**9),
            ("probe_max_new_tokens", 1, 10**6),
            ("probe_batch_size", 1, 10**6),
            ("probe_patience", 1, 100),
            ("triggered_probe_cooldown", 0, 10**9),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
                raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got {value!r}.")
        if not self.log_file or "/" in self.log_file:
            raise ValueError(f"`log_file` must be a plain file name, got {self.log_file!r}.")


def _check_optional(
    name: str, value: float | None, low: float, high: float, low_open: bool, high_open: bool = False
) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
        raise ValueError(f"`{name}` must be None or a number in {interval}, got {value!r}.")


# ---- pure triggers --------------------------------------------------------------------------------------------------
def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _held(values: Sequence[float | None], patience: int, condition) -> bool:
    """Whether the last ``patience`` values are all finite and satisfy ``condition``."""
    if len(values) < patience:
        return False
    tail = values[-patience:]
    return all(v is not None and math.isfinite(v) and condition(v) for v in tail)


def entropy_floor_fired(entropy: Sequence[float | None], min_entropy: float, patience: int) -> bool:
    """The last ``patience`` entropies are all ``<= min_entropy``."""
    return _held(entropy, patience, lambda v: v <= min_entropy)


def entropy_decay_fired(entropy: Sequence[float | None], max_decay: float, window: int) -> bool:
    """The least-squares slope of ``log(entropy)`` against the step index over the last ``window`` values is below
    ``-max_decay``. Needs ``window`` finite values; an entropy of exactly 0 counts as 1e-12 nats (log defined)."""
    tail = entropy[-window:]
    if len(tail) < window or any(v is None or not math.isfinite(v) for v in tail):
        return False
    logs = [math.log(max(float(v), 1e-12)) for v in tail]
    slope = linear_trend_slope(list(range(window)), logs)
    return slope is not None and slope < -max_decay


def length_collapse_fired(lengths: Sequence[float | None], min_ratio: float, window: int, patience: int) -> bool:
    """The last ``patience`` mean lengths are all below ``min_ratio`` times the mean of the first ``window`` ones.

    Needs ``window + patience`` values, so the reference and the tested steps never overlap."""
    if len(lengths) < window + patience:
        return False
    reference = _finite(lengths[:window])
    if len(reference) < window:
        return False
    threshold = min_ratio * sum(reference) / window
    return _held(lengths, patience, lambda v: v < threshold)


def repetition_fired(repetition: Sequence[float | None], max_rate: float, patience: int) -> bool:
    """The last ``patience`` repetition rates are all ``>= max_rate``."""
    return _held(repetition, patience, lambda v: v >= max_rate)


def identical_completions_fired(
    zero_std_fraction: Sequence[float | None],
    reward_std: Sequence[float | None],
    max_fraction: float | None,
    min_std: float | None,
    patience: int,
) -> bool:
    """The last ``patience`` zero-spread group fractions are all ``>= max_fraction``, or the last ``patience`` reward
    standard deviations are all ``<= min_std`` (each test off when its threshold is None)."""
    by_fraction = max_fraction is not None and _held(zero_std_fraction, patience, lambda v: v >= max_fraction)
    by_std = min_std is not None and _held(reward_std, patience, lambda v: v <= min_std)
    return by_fraction or by_std


def probe_drop_fired(accuracies: Sequence[float], max_drop: float, patience: int) -> bool:
    """The last ``patience`` probe accuracies are all below ``max(earlier accuracies) - max_drop``.

    The best is taken over the evaluations before the tested ones, so a fall is measured from the peak it fell from.
    A 1e-9 tolerance keeps a drop of exactly ``max_drop`` (e.g. 5/32 with 0.15625) from firing by rounding."""
    if len(accuracies) <= patience:
        return False
    best = max(accuracies[:-patience])
    return all(a < best - max_drop - 1e-9 for a in accuracies[-patience:])


def probe_within_budget(probe_seconds: float, train_seconds: float, max_fraction: float | None) -> bool:
    """Whether the time spent in probes is within ``max_fraction`` of the training time so far (probes excluded);
    always True without a budget (None)."""
    if max_fraction is None:
        return True
    return probe_seconds <= max_fraction * max(train_seconds, 0.0)


def signal_triggers(history: dict[str, Sequence[float | None]], config: CollapseGuardConfig) -> list[str]:
    """Names of the log-signal triggers that fire on ``history`` (per-logging-step values keyed by TRL's metric names:
    ``entropy``, ``completions/mean_length``, ``sampling_entropy/repetition_rate``, ``frac_reward_zero_std``,
    ``reward_std``), in a fixed order."""
    fired = []
    entropy = history.get("entropy", [])
    if config.min_entropy is not None and entropy_floor_fired(entropy, config.min_entropy, config.patience):
        fired.append("entropy_floor")
    if config.max_entropy_decay is not None and entropy_decay_fired(
        entropy, config.max_entropy_decay, config.trend_window
    ):
        fired.append("entropy_decay")
    if config.min_length_ratio is not None and length_collapse_fired(
        history.get("completions/mean_length", []), config.min_length_ratio, config.trend_window, config.patience
    ):
        fired.append("length_collapse")
    if config.max_repetition_rate is not None and repetition_fired(
        history.get("sampling_entropy/repetition_rate", []), config.max_repetition_rate, config.patience
    ):
        fired.append("repetition")
    if identical_completions_fired(
        history.get("frac_reward_zero_std", []),
        history.get("reward_std", []),
        config.max_identical_group_fraction,
        config.min_reward_std,
        config.patience,
    ):
        fired.append("identical_completions")
    return fired
