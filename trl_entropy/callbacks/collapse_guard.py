"""``CollapseGuardCallback``: watch a label-free run for collapse, warn, stop, or stop and restore the best probe
checkpoint.

The signals are what TRL already logs (averaged over ranks) in ``on_log``'s ``logs``: ``entropy``,
``completions/mean_length``, ``reward_std``, ``frac_reward_zero_std``, and ``sampling_entropy/repetition_rate`` when
:class:`~trl_entropy.callbacks.EntropyStatsCallback` runs before the guard. With a labelled probe set the guard also
evaluates greedy probe accuracy every ``probe_every`` steps (``model`` and ``processing_class`` come in every callback
event's keyword arguments) and keeps a CPU copy of the best probe step's weights. The decision functions live in
:mod:`trl_entropy.callbacks.collapse`.

Example::

    from trl_entropy.callbacks.collapse_guard import CollapseGuardCallback
    from trl_entropy.evaluation.tasks import ArithmeticTask

    probe = ArithmeticTask().dataset(32, split="test", seed=1)
    trainer.add_callback(CollapseGuardCallback(probe_problems=probe, action="stop_and_restore"))
    trainer.train()  # -> output_dir/collapse_guard.jsonl

Several processes: every rank evaluates the probe (a sharded model needs every rank in ``generate``) and keeps its own
full copy of the best weights (under DeepSpeed, the optimizer's fp32 master values, gathered); the main process takes
each decision and broadcasts it, so every rank stops, restores and logs the same thing. A restore puts the best weights
back into the model and, under DeepSpeed ZeRO-1/2/3, into the optimizer's fp32 master copy, and resets the
optimizer's state (Adam's moments and step count; see :meth:`CollapseGuardCallback._act`), on every engine, so that a
checkpoint saved after it resumes to the same weights under DDP and ZeRO. FSDP is refused at ``on_train_begin`` for
``stop_and_restore`` (untested: accelerate never enables it on CPU). Save and resume: ``on_save`` writes the guard's
state to ``collapse_guard_state.json`` in the checkpoint folder and the best weights (once per best step) to
``output_dir/collapse_guard_best.pt``; a resumed run reads both back.

Cost: each probe is timed; probes after the start run only within a budget (``max_probe_time_fraction`` of the
training time, 10% by default), triggered probes at most once per ``triggered_probe_cooldown`` steps, and the fraction
spent is logged as ``collapse_guard/probe_time_fraction``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import torch
from transformers import TrainerCallback

from ..files import append_jsonl_record, atomic_writer, json_safe, truncate_jsonl, write_atomically
from ..weights import reset_optimizer_state, restore_weights, snapshot_weights, weights_engine
from .collapse import CollapseGuardConfig, probe_drop_fired, probe_within_budget, signal_triggers

logger = logging.getLogger(__name__)

__all__ = ["CollapseGuardCallback", "GUARD_STATE_FILE", "BEST_WEIGHTS_FILE", "SIGNAL_KEYS"]

GUARD_STATE_FILE = "collapse_guard_state.json"
BEST_WEIGHTS_FILE = "collapse_guard_best.pt"
SIGNAL_KEYS = (
    "entropy",
    "completions/mean_length",
    "sampling_entropy/repetition_rate",
    "frac_reward_zero_std",
    "reward_std",
)
_OLD_SIGNAL_NAMES = {"sampling_entropy/repetition_rate": "entropy/repetition_rate"}  # in trl-entropy 0.1.0 states


def _as_float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class CollapseGuardCallback(TrainerCallback):
    """Stops (or flags) a label-free run that collapses, optionally restoring the best probe checkpoint.

    Args:
        config: a :class:`~trl_entropy.callbacks.collapse.CollapseGuardConfig`; keyword ``overrides`` replace its
            fields.
        probe_problems: optional labelled problems (a dataset or a list of dicts with ``prompt`` and ``answer``),
            e.g. 32 held-out problems disjoint from the training prompts. Without them only the log signals act.
    """

    def __init__(self, config: CollapseGuardConfig | None = None, probe_problems: Any = None, **overrides: Any):
        config = config or CollapseGuardConfig()
        if overrides:
            known = {f.name for f in fields(CollapseGuardConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise TypeError(f"Unknown CollapseGuardConfig fields: {unknown}.")
            config = CollapseGuardConfig(**{**asdict(config), **overrides})
        self.config = config
        self.probe_problems = None
        if probe_problems is not None:
            rows = probe_problems
            prompts = list(rows["prompt"]) if hasattr(rows, "column_names") else [r["prompt"] for r in rows]
            answers = list(rows["answer"]) if hasattr(rows, "column_names") else [r["answer"] for r in rows]
            if not prompts:
                raise ValueError("`probe_problems` must hold at least one problem.")
            self.probe_problems = [{"prompt": p, "answer": str(a)} for p, a in zip(prompts, answers)]
        self._reset()

    # ---- state ---------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.steps: list[int] = []
        self.history: dict[str, list[float | None]] = {key: [] for key in SIGNAL_KEYS}
        self.probe_steps: list[int] = []
        self.probe_accuracies: list[float] = []
        self.best_accuracy: float | None = None
        self.best_step: int | None = None
        self.fired_step: int | None = None
        self.fired_reason: str | None = None
        self.restored_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._best_written_step: int | None = None
        self._pending_logs: dict[str, float] = {}
        self.probe_seconds = 0.0  # wall time spent in probes
        self.train_seconds = 0.0  # wall time of training so far, probes excluded (carried over a resume)
        self.skipped_probes = 0
        self._clock: float | None = None
        self._probe_seconds_this_run = 0.0  # every probe of this process's run, the start's included
        self._engine = "plain"

    def state_dict(self) -> dict[str, Any]:
        """The guard's JSON-ready state (everything but the best weights)."""
        return {
            "version": 1,
            "steps": list(self.steps),
            "history": {k: list(v) for k, v in self.history.items()},
            "probe_steps": list(self.probe_steps),
            "probe_accuracies": list(self.probe_accuracies),
            "best_accuracy": self.best_accuracy,
            "best_step": self.best_step,
            "fired_step": self.fired_step,
            "fired_reason": self.fired_reason,
            "best_weights_step": self._best_written_step,
            "probe_seconds": self.probe_seconds,
            "train_seconds": self._train_seconds_now(),
            "skipped_probes": self.skipped_probes,
        }

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        self.steps = [int(s) for s in payload.get("steps", [])]
        saved = payload.get("history", {})
        self.history = {
            key: list(saved.get(key, saved.get(_OLD_SIGNAL_NAMES.get(key), [None] * len(self.steps))))
            for key in SIGNAL_KEYS
        }
        self.probe_steps = [int(s) for s in payload.get("probe_steps", [])]
        self.probe_accuracies = [float(a) for a in payload.get("probe_accuracies", [])]
        self.best_accuracy = payload.get("best_accuracy")
        self.best_step = payload.get("best_step")
        self.fired_step = payload.get("fired_step")
        self.fired_reason = payload.get("fired_reason")
        self._best_written_step = payload.get("best_weights_step")
        self.probe_seconds = float(payload.get("probe_seconds", 0.0))
        self.train_seconds = float(payload.get("train_seconds", 0.0))
        self.skipped_probes = int(payload.get("skipped_probes", 0))

    # ---- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._reset()
        if model is not None:
            self._engine = weights_engine(model, args)
            if self._engine == "fsdp" and self.config.action == "stop_and_restore":
                raise ValueError(
                    "The collapse guard's `action='stop_and_restore'` does not support FSDP (untested: accelerate 1.15"
                    " never enables FSDP on CPU); use `action='stop'` or 'warn', or DDP / DeepSpeed ZeRO-1/2/3."
                )
        if state.global_step > 0:
            self._restore(args, state)
        self._clock = time.perf_counter()
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            # Resumed: drop lines logged after the checkpoint; fresh run: start a new file.
            truncate_jsonl(self._log_path(args), state.global_step if state.global_step > 0 else -1)
        if self.probe_problems is not None and state.global_step == 0:
            self._probe(args, state, model, processing_class, "start")  # the starting point is a candidate best

    def on_step_end(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        if self.probe_problems is None:
            return
        if state.global_step % self.config.probe_every == 0 and self._may_probe(args, state, "scheduled"):
            self._probe(args, state, model, processing_class, "scheduled")
            if self.fired_step is None and self._probe_fired():
                self._act(args, state, control, model, ["probe_drop"], optimizer)

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, optimizer=None, **kwargs):
        if logs is None or any(str(key).startswith(("eval_", "test_")) for key in logs) or "loss" not in logs:
            return
        if not self.steps or self.steps[-1] != state.global_step:
            self.steps.append(state.global_step)
            for key in SIGNAL_KEYS:
                self.history[key].append(_as_float(logs.get(key)))
        fired: list[str] = []
        if self.fired_step is None and state.global_step >= self.config.warmup_steps:
            fired = self._broadcast(signal_triggers(self.history, self.config), args)
        if fired:
            if self.probe_problems is not None and self.config.signals_need_probe:
                # The log signals raise a suspicion; the probe decides (it may already have run at this step).
                probed = bool(self.probe_steps) and self.probe_steps[-1] == state.global_step
                if not probed and self._may_probe(args, state, "triggered"):
                    self._probe(args, state, model, processing_class, "triggered")
                    probed = True
                if probed and self._probe_fired():
                    self._act(args, state, control, model, ["probe_drop", *fired], optimizer)
                    fired = ["probe_drop", *fired]
                else:
                    action = "probe" if probed else "none (no probe: cooldown or budget)"
                    self._record(args, state, {"event": "suspect", "signals": fired, "action": action})
                    logger.info("Step %d: collapse signals %s; probe accuracy holds.", state.global_step, fired)
            else:
                self._act(args, state, control, model, fired, optimizer)
        for name in fired:
            self._pending_logs[f"collapse_guard/{name}"] = 1.0
        if self.probe_problems is not None:
            self._pending_logs["collapse_guard/probe_time_fraction"] = self.probe_time_fraction()
            self._pending_logs["collapse_guard/probe_seconds"] = self.probe_seconds
        logs.update(self._pending_logs)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning("No checkpoint folder %s; the collapse guard state is not saved.", folder)
            return
        if self._best_state is not None and self._best_written_step != self.best_step:
            # Atomically (fsync, then rename): a kill mid-write leaves the previous best, never a torn file.
            with atomic_writer(os.path.join(args.output_dir, BEST_WEIGHTS_FILE)) as handle:
                torch.save({"step": self.best_step, "state_dict": self._best_state}, handle)
            self._best_written_step = self.best_step
        data = json.dumps(json_safe(self.state_dict()), allow_nan=False).encode("utf-8")
        write_atomically(os.path.join(folder, GUARD_STATE_FILE), data)

    # ---- cost ----------------------------------------------------------------------------------------------------
    def _train_seconds_now(self) -> float:
        """Training wall time so far, probes excluded."""
        if self._clock is None:
            return self.train_seconds
        return self.train_seconds + (time.perf_counter() - self._clock) - self._probe_seconds_this_run

    def probe_time_fraction(self) -> float:
        """Time spent in probes over the training time so far (probes excluded)."""
        train = self._train_seconds_now()
        return self.probe_seconds / train if train > 0 else 0.0

    def _may_probe(self, args, state, kind: str) -> bool:
        """Whether a ``kind`` ("scheduled" or "triggered") probe runs now: within the time budget, and for a triggered
        one after the cooldown. The main process decides for every rank (a sharded model needs all in ``generate``)."""
        config = self.config
        allowed = probe_within_budget(self.probe_seconds, self._train_seconds_now(), config.max_probe_time_fraction)
        if kind == "triggered" and self.probe_steps:
            allowed = allowed and state.global_step - self.probe_steps[-1] >= config.triggered_probe_cooldown
        allowed = self._broadcast(allowed, args)
        if not allowed:
            self.skipped_probes += 1
            self._record(
                args,
                state,
                {"event": "probe_skipped", "kind": kind, "probe_time_fraction": self.probe_time_fraction()},
            )
        return allowed

    # ---- internals -----------------------------------------------------------------------------------------------
    def _log_path(self, args) -> str:
        return os.path.join(args.output_dir, self.config.log_file)

    def _record(self, args, state, record: dict[str, Any]) -> None:
        if state.is_world_process_zero:
            append_jsonl_record(self._log_path(args), {"step": state.global_step, **record})

    def _broadcast(self, value: Any, args) -> Any:
        """The main process's ``value`` on every rank (a no-op on one process)."""
        if getattr(args, "world_size", 1) <= 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _probe_fired(self) -> bool:
        return self.config.max_probe_drop is not None and probe_drop_fired(
            self.probe_accuracies, self.config.max_probe_drop, self.config.probe_patience
        )

    @torch.no_grad()
    def _probe(self, args, state, model, processing_class, kind: str = "scheduled") -> None:
        from ..evaluation.accuracy import evaluate

        if model is None or processing_class is None:
            raise RuntimeError("The collapse guard's probe needs the `model` and `processing_class` callback kwargs.")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        budget = self.config.probe_max_new_tokens
        start = time.perf_counter()
        result = evaluate(
            model,
            tokenizer,
            self.probe_problems,
            max_new_tokens=budget,
            do_sample=False,
            batch_size=self.config.probe_batch_size,
            seed=None,  # greedy: no draw, and the training RNG stays untouched
            progress=False,
        )
        # Each rank evaluated the same problems with the same weights; the main process's numbers are the record.
        accuracy, truncated_rate = self._broadcast((result.accuracy, result.truncation_rate), args)
        self.probe_steps.append(state.global_step)
        self.probe_accuracies.append(accuracy)
        is_best = self.best_accuracy is None or accuracy >= self.best_accuracy  # ties: the later, more trained one
        if is_best:
            self.best_accuracy, self.best_step = accuracy, state.global_step
            if self.config.action == "stop_and_restore":
                self._best_state = snapshot_weights(model, self._engine)  # full values, every rank
        seconds = time.perf_counter() - start
        if state.global_step > 0:  # the start's probe is the reference of every later one: outside the budget
            self.probe_seconds += seconds
        self._probe_seconds_this_run += seconds
        low, high = result.accuracy_interval()
        self._pending_logs.update(
            {
                "collapse_guard/probe_accuracy": accuracy,
                "collapse_guard/probe_truncated": truncated_rate,
                "collapse_guard/best_probe_accuracy": self.best_accuracy,
            }
        )
        self._record(
            args,
            state,
            {
                "event": "probe",
                "kind": kind,
                "probe_accuracy": accuracy,
                "probe_ci95": [low, high],
                "num_problems": result.num_problems,
                "max_new_tokens": budget,
                "truncated_rate": truncated_rate,
                "mean_length": result.mean_length,
                "best_accuracy": self.best_accuracy,
                "best_step": self.best_step,
                "seconds": seconds,
                "correct": list(result.correct),
                "lengths": [c.num_tokens for c in result.completions],
            },
        )

    def _act(self, args, state, control, model, fired: list[str], optimizer=None) -> None:
        """Fire: warn, stop, or stop and restore. A restore loads the best probe step's weights into the model (and
        under DeepSpeed into the optimizer's fp32 master copy) on every rank and resets the optimizer's state to that
        of a fresh optimizer: the Adam moments at the firing step were accumulated on the trajectory that collapsed,
        and would push the restored weights back along it; a fresh state also costs no copy (keeping the best step's
        optimizer state would double the guard's memory)."""
        self.fired_step = state.global_step
        latest = {key: values[-1] for key, values in self.history.items() if values}
        if "probe_drop" in fired and self.probe_accuracies:
            reason = (
                f"probe accuracy {self.probe_accuracies[-1]:.3f} fell more than {self.config.max_probe_drop:g} below "
                f"the best {self.best_accuracy:.3f} (step {self.best_step})"
            )
            if len(fired) > 1:
                reason += f", after log signals {fired[1:]}"
        else:
            reason = f"log signals {fired}"
        self.fired_reason = reason
        action = self.config.action
        logger.warning("Collapse guard fired at step %d: %s. Action: %s.", state.global_step, reason, action)
        if action in ("stop", "stop_and_restore"):
            control.should_training_stop = True
        restored = None
        if action == "stop_and_restore" and self.best_step is not None:
            best = self._best_state
            if best is None:  # resumed run: the best weights are on disk
                best = self._saved_best_weights(args)
            if best is None:
                logger.warning("No saved weights of the best step %s to restore; stopped only.", self.best_step)
            else:
                restore_weights(model, self._engine, best)
                if optimizer is not None:
                    reset_optimizer_state(optimizer)
                restored = self.restored_step = self.best_step
        self._pending_logs.update({"collapse_guard/fired": 1.0})
        if restored is not None:
            self._pending_logs["collapse_guard/restored_step"] = float(restored)
        self._record(
            args,
            state,
            {
                "event": "fired",
                "signals": fired,
                "reason": reason,
                "action": action,
                "restored_step": restored,
                "best_accuracy": self.best_accuracy,
                "latest_signals": latest,
            },
        )

    def _saved_best_weights(self, args) -> dict[str, torch.Tensor] | None:
        """The best step's weights from ``output_dir/collapse_guard_best.pt``, or None (with a warning that names the
        file) when it is missing, unreadable or holds another step's weights: the guard then stops without restoring,
        rather than killing the run at the moment it should end cleanly."""
        path = os.path.join(args.output_dir, BEST_WEIGHTS_FILE)
        if not os.path.isfile(path):
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or corrupt file: pickle, zip and tensor errors have no common base class
            logger.warning("Collapse guard: %s is unreadable (%s: %s).", path, type(err).__name__, err)
            return None
        if not isinstance(saved, dict):
            logger.warning("Collapse guard: %s holds %s, not the guard's weights.", path, type(saved).__name__)
            return None
        # A later checkpoint of an abandoned branch may have overwritten the file with another step's weights.
        return saved.get("state_dict") if saved.get("step") == self.best_step else None

    def _restore(self, args, state) -> None:
        candidates = []
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str) and os.path.isdir(resume):
            candidates.append(resume)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for folder in candidates:
            path = os.path.join(folder, GUARD_STATE_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    self.load_state_dict(json.load(handle))
                return
        logger.warning(
            "Resuming at step %d without %s: the collapse guard restarts its history.",
            state.global_step,
            GUARD_STATE_FILE,
        )
