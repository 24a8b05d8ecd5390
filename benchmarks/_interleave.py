"""Run several TRL trainers step by step in turn, in one process, and time each step.

Each trainer trains in its own thread; a baton callback lets exactly one step run at a time, in round-robin order,
so every variant sees the same machine state. Before each step the global RNG is reseeded with the step number, and
with ``learning_rate=0`` all variants keep identical weights: they then sample identical completions, and the step
times are paired. The transient memory of a step is its peak RSS (VmHWM, reset at the step's start) minus the RSS
at its start.
"""

from __future__ import annotations

import threading
import time

import torch
from _common import current_rss_mib, median, peak_rss_mib, reset_peak_rss
from transformers import TrainerCallback


class _Baton:
    def __init__(self, names: list[str]):
        self.names, self.turn, self.done = names, 0, set()
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)

    def pass_on(self) -> None:
        with self.cond:
            for _ in range(len(self.names)):
                self.turn = (self.turn + 1) % len(self.names)
                if self.names[self.turn] not in self.done:
                    break
            self.cond.notify_all()

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
        if self.names[self.turn] == name:
            self.pass_on()


class _StepTimer(TrainerCallback):
    def __init__(self, name: str, baton: _Baton, records: dict):
        self.name, self.baton, self.records = name, baton, records

    def on_step_begin(self, args, state, control, **kwargs):
        self.baton.wait(self.name)
        torch.manual_seed(1000 + state.global_step)
        reset_peak_rss()
        self._rss, self._start = current_rss_mib(), time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start
        self.records[self.name].append({"seconds": seconds, "extra_mib": peak_rss_mib() - self._rss})
        self.baton.pass_on()


def train_in_turn(trainers: dict, baton: _Baton, label: str = "") -> None:
    """Train every trainer in its own thread, the baton callbacks letting one step run at a time; re-raise the first
    failure of any thread once all have stopped."""
    errors = []

    def train(name):
        try:
            trainers[name].train()
        except BaseException as err:  # surface failures of any thread
            errors.append((name, err))
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=train, args=(n,)) for n in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{label + ': ' if label else ''}{errors[0][0]} failed") from errors[0][1]


def run_interleaved(trainers: dict, warmup: int) -> dict:
    """Train every trainer (same ``max_steps``) in turn, one step each; return per-variant medians."""
    names = list(trainers)
    baton = _Baton(names)
    records = {name: [] for name in names}
    for name, trainer in trainers.items():
        trainer.add_callback(_StepTimer(name, baton, records))
    train_in_turn(trainers, baton)
    summary = {}
    for name, steps in records.items():
        kept = steps[warmup:]
        summary[name] = {
            "steps": len(kept),
            "median_step_s": median([s["seconds"] for s in kept]),
            "median_step_extra_mib": median([s["extra_mib"] for s in kept]),
            "max_step_extra_mib": max(s["extra_mib"] for s in kept),
            "step_seconds": [round(s["seconds"], 4) for s in kept],
        }
    return summary
