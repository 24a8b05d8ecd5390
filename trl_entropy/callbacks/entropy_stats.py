"""Per-token entropy distributions during GRPO / RLOO / EM-FT training, logged at every logging step.

:class:`EntropyStatsCallback` watches the trainers of this package (``EntropyGRPOTrainer``, ``EntropyRLOOTrainer``,
``EMFTTrainer``, which attach one themselves when an entropy method is on: their config's ``entropy_stats``). It reads
the per-token entropies of each generation batch, at the sampling temperature, that the trainer already has (see
below), and reports, aggregated over all ranks: mean, std and quantiles of the token entropy, the fraction of tokens
above the forking threshold (Wang et al., 2025, arXiv 2506.01939), the most frequent forking tokens, a histogram for
every logging backend that has one, and collapse signals (entropy trend, n-gram repetition, completion length,
correlation between an entropy reward and an accuracy reward; Agarwal et al., 2025, arXiv 2505.15134, report entropy
collapse and repetition as the failure modes of confidence rewards).

Names. Every scalar is ``sampling_entropy/<name>`` (:data:`METRIC_PREFIX`): the entropy of the distribution each
completion token was sampled from, once per generation batch. TRL's own ``entropy`` is a different measurement, the
mean token entropy of each training forward pass (per micro-batch, after any update within a reused generation batch);
docs/metrics.md lists both, with the rewards' ``rewards/entropy_token/mean``.

Where the entropies come from. The callback is an observer of the trainers of this package
(:mod:`trl_entropy.signals`): it declares ``requested_signals = ("token_entropy",)`` and ``on_signals(signals,
trainer)``, which ``EntropyGRPOTrainer``, ``EntropyRLOOTrainer`` and ``EMFTTrainer`` call once per generation batch, on
every rank, with the per-token entropies at the sampling temperature of the completions just sampled and the mask of
the tokens the policy generated (tool and environment tokens left out). The trainer computes them from the cheapest
exact source (the generation's own logits, or TRL's old-log-probs pass; one forward only for vLLM, tools or a
``rollout_func``), replaces no method and the callback never runs the model. Training-mode batches are observed,
evaluation batches are not. A plain TRL ``GRPOTrainer``/``RLOOTrainer`` passes no signals: the callback then stops
at the end of the first step with a one-line error, unless entropies were fed by hand through
:meth:`EntropyStatsCallback.observe` (the public path for any other trainer).

Cost and memory. Each generation batch adds its valid entropies to the window (8 bytes per token on the host, see
:mod:`trl_entropy.distribution`), a ``vocab_size`` counter of forking tokens and a few counts; all statistics are exact
and everything is dropped at every log.

Ordering. The callback moves itself to the front of the trainer's callback list, so the scalars it adds to ``logs``
reach every reporting callback (TensorBoard, W&B, the console) that runs after it; it also adds them to the last entry
of ``state.log_history``.

Files (main process only). One JSON line per logging step in ``output_dir/entropy_stats.jsonl`` (appended with a single
write, then flushed and fsync'ed); ``entropy_stats_state.json`` in each checkpoint folder (trend history, reference
threshold and the observations not yet logged). On ``resume_from_checkpoint`` the state is reloaded and the JSONL is
cut back to the checkpoint's step, so no line is duplicated; a fresh run (step 0) starts a new JSONL. At the end of
training, PNG plots go to ``output_dir/entropy_plots/`` when matplotlib is installed.

Resuming. The checkpoint folder is ``args.resume_from_checkpoint`` when it is set and holds the resumed step, else
``output_dir/checkpoint-<step>``: set ``args.resume_from_checkpoint`` when resuming from a folder elsewhere.

Multi-rank. At each log every rank's window is collected with ``accelerate.utils.gather_object`` and merged with
:func:`merge_window_states`, so every rank computes the same numbers; ``on_log`` runs on every rank, which keeps the
collective in step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback

from ..distribution import EntropyDistribution, TokenEntropyCounter
from ..files import STATS_FILE_NAME, append_jsonl_record, json_safe, truncate_jsonl, write_atomically
from ..signals import CompletionSignals, SignalSource
from ..stats import linear_trend_slope, pearson_correlation
from .stats_config import _DEFAULT_FORKING_RATIO, EntropyStatsConfig
from .windows import _EntropyWindow, _merged_to_state_dict, merge_window_states, repeated_ngram_counts

logger = logging.getLogger(__name__)

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
]

STATE_FILE_NAME = "entropy_stats_state.json"
_ENTROPY_REWARD_HINTS = ("entropy", "certainty", "confidence")
_ACCURACY_REWARD_HINTS = ("accuracy", "correct")
METRIC_PREFIX = "sampling_entropy"
"""Prefix of every scalar the callback logs: the entropy of the distribution each completion token was sampled from,
beside TRL's own ``entropy`` (the training forward pass); docs/metrics.md."""
LEGACY_METRIC_PREFIX = "entropy"
"""Their prefix in trl-entropy 0.1.0 (``entropy/mean``...): the JSONL files of that version still plot."""
_HISTOGRAM_TAG = f"train/{METRIC_PREFIX}/histogram"
_TOP_TOKENS_TAG = f"train/{METRIC_PREFIX}/top_tokens"


def _quantile_name(q: float) -> str:
    return f"p{100 * q:g}"


def _is_training_log(logs: Mapping[str, Any]) -> bool:
    return not any(str(key).startswith(("eval_", "test_")) for key in logs)


def _processing_class(trainer: Any) -> Any:
    return getattr(trainer, "processing_class", None)


def _tokenizer_of(trainer: Any) -> Any:
    processing_class = _processing_class(trainer)
    return getattr(processing_class, "tokenizer", processing_class)


_NEEDS_SIGNALS = (
    "{name} passes no per-token entropies to EntropyStatsCallback: use EntropyGRPOTrainer, EntropyRLOOTrainer or "
    "EMFTTrainer (drop-in subclasses of TRL's trainers), or feed `EntropyStatsCallback.observe` yourself."
)


def _passes_signals(trainer: Any) -> bool:
    return isinstance(trainer, SignalSource)


def _infer_vocab_size(model: Any, processing_class: Any) -> int:
    sizes = []
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if isinstance(getattr(text_config, "vocab_size", None), int):
            sizes.append(text_config.vocab_size)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is not None:
        try:
            sizes.append(len(tokenizer))
        except TypeError:
            pass
    if not sizes or max(sizes) < 2:
        raise ValueError(
            "Could not read the vocabulary size from the trainer's model or tokenizer; pass `vocab_size`."
        )
    return max(sizes)


def _resume_checkpoint(args: Any, global_step: int) -> str | None:
    """The folder training resumed from: ``args.resume_from_checkpoint`` when it holds ``global_step``'s state, else
    ``output_dir/checkpoint-<global_step>`` when that exists."""
    given = getattr(args, "resume_from_checkpoint", None)
    if isinstance(given, (str, os.PathLike)) and os.path.isfile(os.path.join(given, "trainer_state.json")):
        with open(os.path.join(given, "trainer_state.json"), encoding="utf-8") as handle:
            if json.load(handle).get("global_step") == global_step:
                return os.fspath(given)
    default = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    return default if os.path.isdir(default) else None


# ---- the callback ---------------------------------------------------------------------------------------------------
class EntropyStatsCallback(TrainerCallback):
    """Logs per-token entropy distributions, forking tokens and collapse signals at every logging step.

    Args:
        trainer: the trainer to watch: an ``EntropyGRPOTrainer``, ``EntropyRLOOTrainer`` or ``EMFTTrainer`` (they call
            :meth:`on_signals`). Optional: the trainer hands itself over with the first generation batch.
        config: an :class:`EntropyStatsConfig`; keyword arguments override its fields, e.g.
            ``EntropyStatsCallback(trainer, quantiles=(0.5, 0.9), bins=64, top_tokens=10)``.

    Logged scalars (all under ``sampling_entropy/``, the entropy at sampling, beside TRL's ``entropy`` from the
    training pass; docs/metrics.md): ``mean``, ``std``, one ``pXX`` per quantile, ``forking_threshold`` (the
    current ``1 - rho`` quantile), ``frac_above_forking_threshold`` (against the reference threshold, see
    :class:`EntropyStatsConfig`), ``num_tokens``, ``trend_slope``, ``repetition_rate``, ``completion_length`` and
    ``reward_correlation`` (each of the last four only when defined).

    Example:

    ```python
    # The entropy trainers attach one with default settings when an entropy method is on (the config's
    # `entropy_stats`); a callback of your own replaces it:
    trainer = EntropyGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset)
    trainer.add_callback(EntropyStatsCallback(quantiles=(0.5, 0.9), bins=64))
    trainer.train()  # -> output_dir/entropy_stats.jsonl, output_dir/entropy_plots/*.png
    ```
    """

    def __init__(self, trainer: Trainer | None = None, config: EntropyStatsConfig | None = None, **overrides: Any):
        config = config or EntropyStatsConfig()
        if overrides:
            known = {f.name for f in dataclasses.fields(EntropyStatsConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"Unknown EntropyStatsCallback option(s) {unknown}; allowed: {sorted(known)}.")
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.trainer = trainer
        self._window: _EntropyWindow | None = None
        self._carry_over: dict[str, Any] | None = None  # restored, not yet logged observations (main process only)
        self._history: deque[tuple[int, float]] = deque(maxlen=config.trend_window)
        self._reference_threshold: float | None = config.forking_threshold
        self._forking_ratio = config.forking_token_ratio or _DEFAULT_FORKING_RATIO
        self._observed = False  # whether anything reached the window since training began
        self._warned: set[str] = set()
        if trainer is not None and not _passes_signals(trainer):
            raise TypeError(_NEEDS_SIGNALS.format(name=type(trainer).__name__))

    requested_signals = ("token_entropy",)
    """What the callback asks the trainer for (see :mod:`trl_entropy.signals`)."""

    # ---- binding -------------------------------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> None:
        """Bind to ``trainer`` and move this callback to the front of its callback list (so the scalars it adds to
        ``logs`` reach the reporting callbacks). Done with the first generation batch; call it yourself only to drive
        the callback by hand."""
        self.trainer = trainer
        self._setup(getattr(trainer, "args", None), getattr(trainer, "model", None), _processing_class(trainer))
        callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
        if callbacks and any(cb is self for cb in callbacks) and callbacks[0] is not self:
            # Safe inside the handler's own loop: the callbacks after this one keep their positions.
            callbacks.remove(self)
            callbacks.insert(0, self)

    def _setup(self, args: Any, model: Any, processing_class: Any) -> None:
        self._forking_ratio = self._resolve_forking_ratio(args)
        vocab_size = self.config.vocab_size or _infer_vocab_size(model, processing_class)
        if self._window is None or self._window.vocab_size != vocab_size:
            self._window = _EntropyWindow(vocab_size, self.config.bins)

    def _resolve_forking_ratio(self, args: Any) -> float:
        ratio = self.config.forking_token_ratio
        # A trainer ratio of 1.0 means "mask disabled" (EntropyGRPOConfig, TRL's top_entropy_quantile): skip it.
        for name in ("forking_token_ratio", "top_entropy_quantile"):
            value = getattr(args, name, None)
            if ratio is None and isinstance(value, (int, float)) and 0.0 < value < 1.0:
                ratio = float(value)
        ratio = _DEFAULT_FORKING_RATIO if ratio is None else ratio
        if not (0.0 < ratio <= 1.0):
            raise ValueError(f"The forking-token ratio must be in (0, 1], got {ratio}.")
        return ratio

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ---- observation ---------------------------------------------------------------------------------------------
    def on_signals(self, signals: CompletionSignals, trainer: Trainer) -> None:
        """Observe one generation batch's entropies (called by the trainer on every rank; evaluation batches are
        left out)."""
        if self.trainer is not trainer or self._window is None:  # also a batch generated before `train()` began
            self.attach(trainer)
        model = getattr(trainer, "model", None)
        if (model is not None and not model.training) or signals.token_entropy is None:
            return
        entropies, mask = signals.padded("token_entropy")
        ids = torch.zeros(mask.shape, dtype=torch.long)
        for row, completion in enumerate(signals.completion_ids):
            ids[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        self.observe(entropies, mask, ids)

    def observe(
        self,
        entropies: torch.Tensor,
        completion_mask: torch.Tensor,
        completion_ids: torch.Tensor | None = None,
    ) -> None:
        """Add one micro-batch of per-token entropies ``[B, T]`` (nats), its completion mask and, optionally, its
        completion token ids (for the forking-token counts and the repetition rate). Device tensors are fine; nothing
        is copied to the host until the next log."""
        if entropies.dim() != 2 or completion_mask.shape != entropies.shape:
            raise ValueError(
                f"`entropies` must be [B, T] and `completion_mask` of the same shape, got {tuple(entropies.shape)} "
                f"and {tuple(completion_mask.shape)}."
            )
        if completion_ids is not None and completion_ids.shape != entropies.shape:
            raise ValueError(
                f"`completion_ids` {tuple(completion_ids.shape)} must have the shape of `entropies` "
                f"{tuple(entropies.shape)}."
            )
        if self._window is None:
            if self.config.vocab_size is None:
                raise RuntimeError("Attach the callback to a trainer (or set `vocab_size`) before observing.")
            self._window = _EntropyWindow(self.config.vocab_size, self.config.bins)
        self._observed = True
        self._window.observe(
            entropies, completion_mask, completion_ids, self._forking_ratio, self.config.repetition_ngram
        )

    # ---- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.trainer is not None:
            self.attach(self.trainer)
        else:
            self._setup(args, model, processing_class)
        self._window.reset()
        self._observed = False
        self._carry_over = None
        self._history.clear()
        self._reference_threshold = self.config.forking_threshold
        if state.global_step > 0:
            self._restore(args, state)
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            # Resumed: drop lines logged after the checkpoint; fresh run (step 0): start a new file.
            truncate_jsonl(self.stats_path(args), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if not self._observed:
            # Every training step starts from a generation batch: no signals by now means the trainer passes none.
            name = type(self.trainer).__name__ if self.trainer is not None else "This trainer"
            raise RuntimeError(_NEEDS_SIGNALS.format(name=name))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._window is None or logs is None or not _is_training_log(logs):
            return
        merged = self._gather_window()
        self._window.reset()
        distribution = merged["distribution"]
        if distribution.invalid_count:
            logger.warning(
                "Step %d: %d completion tokens had a non-finite entropy and were left out of the entropy statistics.",
                state.global_step,
                distribution.invalid_count,
            )
        if distribution.count == 0:
            return
        scalars, record = self._summarize(merged, state)
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
        if state.is_world_process_zero:
            record["top_tokens"] = self._decode_top_tokens(merged["tokens"])
            append_jsonl_record(self.stats_path(args), record)
            self._send_histograms(distribution, record, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self._window is None:
            return
        pending = _merged_to_state_dict(self._gather_window(consume=False))  # collective: every rank calls on_save
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            self._warn_once("no-checkpoint", f"No checkpoint folder {folder}; the entropy stats state is not saved.")
            return
        payload = {
            "version": 1,
            "global_step": state.global_step,
            "forking_ratio": self._forking_ratio,
            "reference_threshold": self._reference_threshold,
            "history": [list(point) for point in self._history],
            "pending_window": pending,
        }
        data = json.dumps(json_safe(payload), allow_nan=False).encode("utf-8")
        write_atomically(os.path.join(folder, STATE_FILE_NAME), data)

    def on_train_end(self, args, state, control, **kwargs):
        path = self.stats_path(args)
        if not (state.is_world_process_zero and self.config.plot_on_train_end and os.path.isfile(path)):
            return
        try:
            from .plots import write_plots

            write_plots(path, os.path.join(args.output_dir, "entropy_plots"))
        except ImportError as err:
            logger.info("Entropy plots skipped: %s", err)
        except Exception:  # a plotting problem must not fail a finished training run, but is reported
            logger.warning("Entropy plots failed.", exc_info=True)

    # ---- internals -----------------------------------------------------------------------------------------------
    def stats_path(self, args: Any) -> str:
        """Path of the JSONL file for training arguments ``args``."""
        return os.path.join(args.output_dir, self.config.stats_file)

    def _gather_window(self, consume: bool = True) -> dict[str, Any]:
        """Merge every rank's window (plus any restored carry-over); ``consume`` drops the carry-over once merged."""
        local = [self._window.state_dict()]
        if self._carry_over is not None:
            local.append(self._carry_over)
            if consume:
                self._carry_over = None
        if PartialState().num_processes > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        return merge_window_states(local)

    def _restore(self, args: Any, state: Any) -> None:
        checkpoint = _resume_checkpoint(args, state.global_step)
        path = os.path.join(checkpoint, STATE_FILE_NAME) if checkpoint else None
        if path is None or not os.path.isfile(path):
            logger.warning(
                "Resuming at step %d without %s: the entropy trend and reference threshold restart.",
                state.global_step,
                STATE_FILE_NAME,
            )
            return
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        self._history.extend((int(step), value) for step, value in payload.get("history", []))
        if self.config.forking_threshold is None:
            self._reference_threshold = payload.get("reference_threshold")
        pending = payload.get("pending_window")
        if pending is not None and state.is_world_process_zero:
            if pending["distribution"]["max_value"] == self._window.distribution.max_value:
                self._carry_over = pending
            else:
                logger.warning("The checkpoint's pending entropy observations are for another vocabulary; dropped.")

    def _summarize(self, merged: Mapping[str, Any], state: Any) -> tuple[dict[str, float], dict[str, Any]]:
        distribution: EntropyDistribution = merged["distribution"]
        quantiles = list(self.config.quantiles)
        values = distribution.quantiles(quantiles + [1.0 - self._forking_ratio])
        threshold = values.pop()
        if self._reference_threshold is None:
            self._reference_threshold = threshold
        mean = distribution.mean
        self._history.append((state.global_step, mean))
        steps, means = zip(*self._history)
        slope = linear_trend_slope(steps, means)

        scalars: dict[str, float] = {f"{METRIC_PREFIX}/mean": mean, f"{METRIC_PREFIX}/std": distribution.std}
        scalars.update({f"{METRIC_PREFIX}/{_quantile_name(q)}": v for q, v in zip(quantiles, values)})
        scalars[f"{METRIC_PREFIX}/forking_threshold"] = threshold
        scalars[f"{METRIC_PREFIX}/frac_above_forking_threshold"] = distribution.fraction_above(
            self._reference_threshold
        )
        scalars[f"{METRIC_PREFIX}/num_tokens"] = float(distribution.count)
        if slope is not None:
            scalars[f"{METRIC_PREFIX}/trend_slope"] = slope
        if merged["total_ngrams"]:
            scalars[f"{METRIC_PREFIX}/repetition_rate"] = merged["repeated_ngrams"] / merged["total_ngrams"]
        if merged["completions"]:
            scalars[f"{METRIC_PREFIX}/completion_length"] = merged["completion_tokens"] / merged["completions"]
        correlation = self._reward_correlation()
        if correlation is not None and correlation["pearson"] is not None:
            scalars[f"{METRIC_PREFIX}/reward_correlation"] = correlation["pearson"]

        counts, edges = distribution.histogram()
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "num_tokens": distribution.count,
            "invalid_tokens": distribution.invalid_count,
            "min": distribution.min,
            "max": distribution.max,
            "metrics": dict(scalars),
            "forking": {
                "ratio": self._forking_ratio,
                "threshold": threshold,
                "reference_threshold": self._reference_threshold,
            },
            "trend_points": len(self._history),
            "reward_correlation": correlation,
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        }
        return scalars, record

    def _reward_correlation(self) -> dict[str, Any] | None:
        logged = getattr(self.trainer, "_logs", None)
        if not isinstance(logged, Mapping):
            return None
        columns: dict[str, Any] = {}
        for group in ("extra", "rewards"):  # reward columns win on a name clash
            if isinstance(logged.get(group), Mapping):
                columns.update(logged[group])

        def find(hints: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str | None:
            for name in sorted(columns):
                lowered = name.lower()
                if any(h in lowered for h in hints) and not any(h in lowered for h in exclude):
                    return name
            return None

        entropy_key = self.config.entropy_reward_key or find(_ENTROPY_REWARD_HINTS)
        accuracy_key = self.config.accuracy_reward_key or find(_ACCURACY_REWARD_HINTS, exclude=_ENTROPY_REWARD_HINTS)
        for key in (self.config.entropy_reward_key, self.config.accuracy_reward_key):
            if key is not None and key not in columns and columns:
                self._warn_once(f"missing-{key}", f"Logged column {key!r} not found among {sorted(columns)}.")
        if entropy_key not in columns or accuracy_key not in columns or entropy_key == accuracy_key:
            return None
        x, y = list(columns[entropy_key]), list(columns[accuracy_key])
        pairs = min(len(x), len(y))  # both columns grow together; keep the latest generation batch of each
        pearson = pearson_correlation(x[len(x) - pairs :], y[len(y) - pairs :]) if pairs else None
        return {"entropy_key": entropy_key, "accuracy_key": accuracy_key, "pearson": pearson, "num_pairs": pairs}

    def _decode_top_tokens(self, tokens: TokenEntropyCounter) -> list[dict[str, Any]]:
        tokenizer = _tokenizer_of(self.trainer)
        rows = []
        for token_id, count, mean_entropy in tokens.top(self.config.top_tokens):
            try:
                text = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
            except Exception:  # an id outside the tokenizer's vocabulary (padded embedding rows)
                text = f"<id {token_id}>"
            rows.append({"id": token_id, "token": text, "count": count, "mean_entropy": mean_entropy})
        return rows

    def _send_histograms(self, distribution: EntropyDistribution, record: Mapping[str, Any], step: int) -> None:
        """Send the histogram to every reporting callback of the trainer that can take one."""
        counts, edges = distribution.histogram()
        moments = distribution.moments()
        # transformers' own reporting callbacks, by class (each loads lazily and needs nothing installed to import).
        from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback

        for reporter in getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []):
            if isinstance(reporter, TensorBoardCallback) and reporter.tb_writer is not None:
                writer = reporter.tb_writer
                writer.add_histogram_raw(
                    _HISTOGRAM_TAG,
                    min=moments["min"],
                    max=moments["max"],
                    num=moments["count"],
                    sum=moments["sum"],
                    sum_squares=moments["sum_sq"],
                    bucket_limits=edges[1:].tolist(),
                    bucket_counts=counts.tolist(),
                    global_step=step,
                )
                if record.get("top_tokens"):
                    writer.add_text(_TOP_TOKENS_TAG, _top_tokens_markdown(record["top_tokens"]), step)
            elif isinstance(reporter, WandbCallback):
                try:
                    import wandb
                except ImportError:
                    continue
                if wandb.run is not None:  # the run WandbCallback started (public state of wandb itself)
                    wandb.log({_HISTOGRAM_TAG: wandb.Histogram(np_histogram=(counts, edges))}, commit=False)
            elif isinstance(reporter, TrackioCallback):
                try:
                    import trackio
                except ImportError:
                    continue
                if hasattr(trackio, "Histogram"):
                    try:
                        trackio.log({_HISTOGRAM_TAG: trackio.Histogram(np_histogram=(counts, edges))})
                    except RuntimeError:  # no run started yet (trackio refuses a log before `init`)
                        continue


def _top_tokens_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| token | count | mean entropy |", "|---|---:|---:|"]
    for row in rows:
        text = json.dumps(row["token"], ensure_ascii=False).replace("|", "\\|")
        lines.append(f"| {text} | {row['count']} | {row['mean_entropy']:.3f} |")
    return "\n".join(lines)
