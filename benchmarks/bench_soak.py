"""Soak test: a long tiny-model run with every entropy feature on, watching for leaks.

EntropyGRPOTrainer (and EntropyRLOOTrainer) train the tiny random Llama for ``--steps`` steps with the entropy reward,
the forking-token mask (global scope), ``EntropyStatsCallback`` logging at every step (JSONL, TensorBoard histograms),
and a checkpoint every ``--save-steps``. After every step a probe records the resident set size (after a garbage
collection), the number of open file descriptors (``/proc/self/fd``) and of Python threads.

Reported per trainer:

* ``rss_slope_mib_per_100_steps``: least-squares slope of RSS against the step, after ``--warmup`` steps (allocator,
  caches and the first checkpoint's one-time imports settle first), in MiB per 100 steps; flat memory means close to 0;
* file descriptors and threads before ``train()``, the most seen during it, and after it returned (``*_leaked`` is
  after minus before);
* ``gc_objects_slope_per_100_steps``: the same slope for the number of Python objects tracked by the garbage
  collector (sampled every 10 steps), which catches a leak of small objects that RSS hides;
* ``input_embedding_hooks_before`` / ``_after``: forward hooks on the input embedding. transformers 5's
  ``activation_checkpointing_enable`` registers a new one on every call and TRL re-enables checkpointing after every
  generation (``gradient_checkpointing=True`` is TRL's default), so this count grows by two per step: an upstream
  leak, not this package's;
* ``log_history_kib_per_100_steps``: memory held by the Trainer's ``state.log_history`` (one dict per log, kept by
  design), the expected part of the RSS slope with ``logging_steps=1``.

Run: ``python benchmarks/bench_soak.py`` (about 3-6 minutes on 2 CPU cores). Writes
``benchmarks/results/bench_soak.json`` and, with matplotlib, ``benchmarks/results/bench_soak.png``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, current_rss_mib, print_table, write_results  # noqa: E402

from trl_entropy.callbacks import EntropyStatsCallback  # noqa: E402
from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts  # noqa: E402
from trl_entropy.trainers import (  # noqa: E402
    EntropyGRPOConfig,
    EntropyGRPOTrainer,
    EntropyRLOOConfig,
    EntropyRLOOTrainer,
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def deep_size_bytes(value, seen: set | None = None) -> int:
    """Approximate memory held by nested dicts/lists/tuples and their scalars (sys.getsizeof, shared objects once)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(deep_size_bytes(k, seen) + deep_size_bytes(v, seen) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        size += sum(deep_size_bytes(v, seen) for v in value)
    return size


def slope_per_100(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``steps``, per 100 steps."""
    if len(steps) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64), 1)[0] * 100)


class SoakProbe(TrainerCallback):
    """Records RSS, open file descriptors and threads after every optimiser step."""

    def __init__(self, gc_every: int = 10):
        self.gc_every = gc_every
        self.rows: list[dict] = []
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        gc.collect()
        now = time.perf_counter()
        row = {
            "step": state.global_step,
            "rss_mib": current_rss_mib(),
            "fds": open_fds(),
            "threads": threading.active_count(),
            "step_time_s": None if self._last is None else now - self._last,
        }
        if state.global_step % self.gc_every == 0:
            row["gc_objects"] = len(gc.get_objects())
        self.rows.append(row)
        self._last = now


def soak(kind: str, steps: int, save_steps: int, warmup: int, output_dir: str, seed: int) -> dict:
    model, tokenizer = make_tiny_model_and_tokenizer(seed=seed)
    dataset = Dataset.from_dict({"prompt": tiny_prompts(64, seed=seed)})
    common = dict(
        output_dir=output_dir,
        entropy_reward="token",
        forking_token_ratio=0.2,
        forking_token_scope="global",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        temperature=1.0,
        learning_rate=1e-3,
        max_steps=steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        report_to=["tensorboard"],
        use_cpu=True,
        bf16=False,
        seed=seed,
        disable_tqdm=False,
    )
    if kind == "grpo":
        trainer = EntropyGRPOTrainer(
            model, args=EntropyGRPOConfig(**common), train_dataset=dataset, processing_class=tokenizer
        )
    else:
        trainer = EntropyRLOOTrainer(
            model, args=EntropyRLOOConfig(beta=0.0, **common), train_dataset=dataset, processing_class=tokenizer
        )
    trainer.add_callback(EntropyStatsCallback(trainer, plot_on_train_end=False))
    probe = SoakProbe()
    trainer.add_callback(probe)

    embedding = trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings()
    hooks_before = len(embedding._forward_hooks)
    gc.collect()
    before = {"fds": open_fds(), "threads": threading.active_count(), "rss_mib": current_rss_mib()}
    threads_before = {t.name for t in threading.enumerate()}
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    hooks_after = len(embedding._forward_hooks)
    # The Trainer keeps every log in `state.log_history` by design: growth that is not a leak.
    log_history_kib = deep_size_bytes(trainer.state.log_history) / 1024
    del trainer, embedding
    gc.collect()
    after = {"fds": open_fds(), "threads": threading.active_count(), "rss_mib": current_rss_mib()}

    rows = probe.rows
    settled = [r for r in rows if r["step"] > warmup]
    sampled = [r for r in settled if "gc_objects" in r]
    step_times = [r["step_time_s"] for r in settled if r["step_time_s"] is not None]
    stats_lines = len((Path(output_dir) / "entropy_stats.jsonl").read_text().splitlines())
    return {
        "trainer": kind,
        "steps": len(rows),
        "stats_file_lines": stats_lines,
        "elapsed_s": elapsed,
        "median_step_s": float(np.median(step_times)) if step_times else float("nan"),
        "rss_before_mib": before["rss_mib"],
        "rss_after_warmup_mib": settled[0]["rss_mib"] if settled else float("nan"),
        "rss_end_mib": rows[-1]["rss_mib"],
        "rss_max_mib": max(r["rss_mib"] for r in rows),
        "rss_slope_mib_per_100_steps": slope_per_100([r["step"] for r in settled], [r["rss_mib"] for r in settled]),
        "gc_objects_slope_per_100_steps": slope_per_100(
            [r["step"] for r in sampled], [r["gc_objects"] for r in sampled]
        ),
        "fds_before": before["fds"],
        "fds_max_during": max(r["fds"] for r in rows),
        "fds_after": after["fds"],
        "fds_leaked": after["fds"] - before["fds"],
        "threads_before": before["threads"],
        "threads_max_during": max(r["threads"] for r in rows),
        "threads_after": after["threads"],
        "threads_leaked": after["threads"] - before["threads"],
        "threads_started_and_kept": sorted({t.name for t in threading.enumerate()} - threads_before),
        # transformers' `activation_checkpointing_enable` adds an input-embedding hook on every call and TRL toggles
        # checkpointing around each generation (gradient_checkpointing=True is TRL's default): an upstream leak.
        "log_history_kib_per_100_steps": log_history_kib / len(rows) * 100,
        "input_embedding_hooks_before": hooks_before,
        "input_embedding_hooks_after": hooks_after,
        "trace": rows,
    }


def plot(results: list[dict], path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return None
    figure = Figure(figsize=(11, 3.5), layout="constrained")
    axes = figure.subplots(1, 3)
    for result in results:
        trace = result["trace"]
        steps = [r["step"] for r in trace]
        axes[0].plot(steps, [r["rss_mib"] for r in trace], label=result["trainer"])
        axes[1].plot(steps, [r["fds"] for r in trace], label=result["trainer"])
        axes[2].plot(steps, [r["threads"] for r in trace], label=result["trainer"])
    for ax, title in zip(axes, ("RSS (MiB)", "open file descriptors", "Python threads")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    figure.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument(
        "--warmup",
        type=int,
        default=110,
        help="Steps left out of the slopes (past the first checkpoint, whose first save imports and caches code).",
    )
    parser.add_argument("--trainers", default="grpo,rloo", help="Comma-separated: grpo, rloo.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # One thread: the tiny model's matmuls gain nothing from more, and on a busy machine OpenMP spinning makes a step
    # many times slower, which would drown the measurements in noise.
    torch.set_num_threads(1)

    results = []
    for kind in args.trainers.split(","):
        with tempfile.TemporaryDirectory(prefix=f"soak-{kind}-") as output_dir:
            print(f"== {kind}: {args.steps} steps", flush=True)
            results.append(soak(kind, args.steps, args.save_steps, args.warmup, output_dir, args.seed))

    columns = [
        "trainer",
        "steps",
        "median_step_s",
        "rss_after_warmup_mib",
        "rss_end_mib",
        "rss_slope_mib_per_100_steps",
        "log_history_kib_per_100_steps",
        "gc_objects_slope_per_100_steps",
        "fds_before",
        "fds_max_during",
        "fds_after",
        "threads_before",
        "threads_max_during",
        "threads_after",
        "input_embedding_hooks_after",
    ]
    print()
    print_table(results, columns)
    png = plot(results, RESULTS_DIR / "bench_soak.png")
    payload = {
        "benchmark": "bench_soak",
        "config": {
            "steps": args.steps,
            "save_steps": args.save_steps,
            "warmup": args.warmup,
            "features": "entropy_reward=token, forking_token_ratio=0.2 (global), EntropyStatsCallback every step, "
            "TensorBoard, checkpoints",
            "model": "trl_entropy.testing tiny Llama (2 layers, hidden 32, vocab 57)",
            "batch": "per_device_train_batch_size=8, num_generations=4, max_completion_length=16",
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "results": [{k: v for k, v in r.items() if k != "trace"} for r in results],
        # Every 10th step of the per-step probe (the PNG shows all of them).
        "traces": {r["trainer"]: [row for row in r["trace"] if row["step"] % 10 == 0] for r in results},
        "png": str(png) if png else None,
    }
    write_results("bench_soak", payload)


if __name__ == "__main__":
    main()
