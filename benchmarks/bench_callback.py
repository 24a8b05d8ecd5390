"""EntropyStatsCallback cost: step-time overhead on GRPO steps of the default model, and memory over 200 logs.

1. Overhead. One ``EntropyGRPOTrainer`` (no entropy option: GRPO with a rule reward) on the embedded SmolLM2-135M
   (8 completions x 32 tokens per step, CPU, logging every step, TensorBoard on) alternates steps with and without
   the callback in an ABBA pattern; on "without" steps nobody asks for the entropies, so the trainer computes none. A
   step is timed from one ``on_step_begin`` to the next, so it includes the entropy capture during generation and the
   callback's logging work. Reported: median step time per arm (wall clock, and this process's CPU time, which other
   jobs on a shared machine disturb less), their ratios, and the time spent inside the callback itself (observations
   + ``on_log``).
2. Memory. The generation batches the callback saw in part 1 (entropies, masks, token ids) are replayed, in a fresh
   process, through the callback for 200 logging steps (4 batches each, a TensorBoard histogram and a JSONL line
   every step). After 20 warm-up logs the kernel's peak-RSS mark is reset; pass: the peak over logs 21-200 stays within
   1 MiB of the RSS at log 20.

    python benchmarks/bench_callback.py [--pairs 10] [--log-steps 200] [--threads N] [--keep-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from trl_entropy.callbacks import EntropyStatsCallback, linear_trend_slope
from trl_entropy.evaluation.tasks import ArithmeticTask, accuracy_reward
from trl_entropy.models import load_default_model
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_mib, peak_rss_mib, print_table, reset_peak_rss, write_results  # noqa: E402

COMPLETIONS_PER_STEP = 8
COMPLETION_TOKENS = 32


class ArmSwitch(TrainerCallback):
    """Runs the stats callback only on the steps of the "with" arm and times every step.

    The switch sits first in the callback list (so the stats reach the reporters, as the callback arranges for
    itself) and is the trainer's signal observer on the callback's behalf: on "with" steps it asks for the entropies
    and forwards them, on "without" steps it asks for nothing, so no entropy is computed and no event reaches the
    callback.
    """

    def __init__(self, stats: EntropyStatsCallback, arms: list[bool], progress):
        self.stats, self.arms, self.progress = stats, arms, progress
        self.enabled = False
        self.step_starts: list[float] = []
        self.step_cpu_starts: list[float] = []
        self.inside_seconds = 0.0
        self.recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        observe = stats.observe

        def timed_observe(entropies, mask, ids=None):
            start = time.perf_counter()
            observe(entropies, mask, ids)
            self.inside_seconds += time.perf_counter() - start
            self.recorded.append((entropies.detach().clone(), mask.clone(), ids.clone()))

        stats.observe = timed_observe

    @property
    def requested_signals(self) -> tuple[str, ...]:
        return self.stats.requested_signals if self.enabled else ()

    def on_signals(self, signals, trainer) -> None:
        if self.enabled:
            self.stats.on_signals(signals, trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        self.stats.on_train_begin(args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_starts.append(time.perf_counter())
        self.step_cpu_starts.append(time.process_time())
        index = state.global_step  # the step about to run, 0-based
        self.enabled = self.arms[index] if index < len(self.arms) else False
        self.progress.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.enabled:
            start = time.perf_counter()
            self.stats.on_log(args, state, control, logs=logs, **kwargs)
            self.inside_seconds += time.perf_counter() - start

    def on_train_end(self, args, state, control, **kwargs):
        self.step_starts.append(time.perf_counter())
        self.step_cpu_starts.append(time.process_time())
        self.stats.on_train_end(args, state, control, **kwargs)


def step_times(starts: list[float], arms: list[bool], warmup: int) -> tuple[list[float], list[float]]:
    """Per-step durations of the two arms from the step start times, the warm-up steps left out."""
    durations = [b - a for a, b in zip(starts[:-1], starts[1:])]
    with_arm = [d for i, d in enumerate(durations) if i >= warmup and arms[i]]
    without_arm = [d for i, d in enumerate(durations) if i >= warmup and not arms[i]]
    return with_arm, without_arm


def make_trainer(model, tokenizer, output_dir: str, max_steps: int) -> EntropyGRPOTrainer:
    args = EntropyGRPOConfig(
        output_dir=output_dir,
        report_to=["tensorboard"],
        max_steps=max_steps,
        logging_steps=1,
        per_device_train_batch_size=COMPLETIONS_PER_STEP,
        num_generations=4,
        max_completion_length=COMPLETION_TOKENS,
        # Fixed-length completions keep the generation time, hence the step time, steady between steps.
        generation_kwargs={"min_new_tokens": COMPLETION_TOKENS},
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-6,
        seed=0,
        disable_tqdm=True,
        entropy_stats=False,  # the arms add the callback themselves (the trainer would attach none here anyway)
    )
    dataset = ArithmeticTask().dataset(4 * max_steps, seed=0)
    return EntropyGRPOTrainer(
        model=model, reward_funcs=accuracy_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def overhead(pairs: int, warmup: int, output_dir: str) -> tuple[dict, list]:
    model, tokenizer = load_default_model()
    # Warm-up steps alternate too; then ABBA blocks cancel slow drifts of the machine's speed.
    arms = [bool(i % 2) for i in range(warmup)]
    for block in range(pairs // 2 + pairs % 2):
        arms += [True, False, False, True] if block % 2 == 0 else [False, True, True, False]
    arms = arms[: warmup + 2 * pairs]
    trainer = make_trainer(model, tokenizer, output_dir, len(arms))
    stats = EntropyStatsCallback(trainer)  # its PNG plots of the "with" steps land in output_dir/entropy_plots
    progress = tqdm(total=len(arms), desc="GRPO steps (with/without callback)")
    switch = ArmSwitch(stats, arms, progress)
    trainer.add_callback(switch)
    trainer.callback_handler.callbacks.remove(switch)
    trainer.callback_handler.callbacks.insert(0, switch)
    trainer.train()
    progress.close()
    with_arm, without_arm = step_times(switch.step_starts, arms, warmup)
    cpu_with, cpu_without = step_times(switch.step_cpu_starts, arms, warmup)
    median_with, median_without = statistics.median(with_arm), statistics.median(without_arm)
    cpu_ratio = statistics.median(cpu_with) / statistics.median(cpu_without) - 1.0
    inside_per_step = switch.inside_seconds / sum(arms)
    result = {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "completions_per_step": COMPLETIONS_PER_STEP,
        "completion_tokens": COMPLETION_TOKENS,
        "steps_per_arm": len(with_arm),
        "warmup_steps": warmup,
        "median_step_s_with_callback": median_with,
        "median_step_s_without_callback": median_without,
        "step_time_overhead_ratio": median_with / median_without - 1.0,
        "callback_seconds_per_step": inside_per_step,
        "callback_share_of_step": inside_per_step / median_without,
        "median_step_cpu_s_with_callback": statistics.median(cpu_with),
        "median_step_cpu_s_without_callback": statistics.median(cpu_without),
        "step_cpu_time_overhead_ratio": cpu_ratio,
        "step_times_with": with_arm,
        "step_times_without": without_arm,
        "step_cpu_times_with": cpu_with,
        "step_cpu_times_without": cpu_without,
        "pass_callback_share_le_2pct": inside_per_step / median_without <= 0.02,
        "pass_median_ratio_le_2pct": median_with / median_without - 1.0 <= 0.02,
        "pass_median_cpu_ratio_le_2pct": cpu_ratio <= 0.02,
    }
    return result, switch.recorded


def memory(recorded: list, log_steps: int, per_log: int, output_dir: str) -> dict:
    model, tokenizer = load_default_model()
    trainer = make_trainer(model, tokenizer, output_dir, max_steps=log_steps)
    stats = EntropyStatsCallback(trainer, plot_on_train_end=False)
    trainer.add_callback(stats)
    args, state, control = trainer.args, trainer.state, trainer.control
    trainer.callback_handler.on_train_begin(args, state, control)  # opens the TensorBoard writer, binds the callback
    warm = 20
    rss, log_seconds = [], []
    for step in tqdm(range(1, log_steps + 1), desc="replayed logging steps"):
        state.global_step = step
        for k in range(per_log):
            stats.observe(*recorded[(step * per_log + k) % len(recorded)])
        start = time.perf_counter()
        stats.on_log(args, state, control, logs={"loss": 0.0})
        log_seconds.append(time.perf_counter() - start)
        if step == warm:
            # From here on, the kernel's peak-RSS mark only sees what the remaining logging steps allocate.
            gc.collect()
            reset_peak_rss()
            base = current_rss_mib()
        rss.append(current_rss_mib())
    peak = peak_rss_mib()
    trainer.callback_handler.on_train_end(args, state, control)  # closes the writer
    lines = sum(1 for _ in open(stats.stats_path(args)))
    return {
        "logging_steps": log_steps,
        "micro_batches_per_log": per_log,
        "tokens_per_micro_batch": int(recorded[0][1].sum()),
        "jsonl_lines_written": lines,
        "rss_mib_at_step_20": base,
        "rss_mib_at_end": rss[-1],
        "peak_rss_mib_after_step_20": peak,
        "peak_rss_growth_mib": peak - base,
        "rss_slope_kib_per_step": 1024 * linear_trend_slope(list(range(warm, log_steps + 1)), rss[warm - 1 :]),
        "median_on_log_ms": 1000 * statistics.median(log_seconds),
        "pass_peak_growth_le_1mib": peak - base <= 1.0,
    }


def memory_in_subprocess(recorded: list, options: argparse.Namespace, work_dir: Path) -> dict:
    """Run :func:`memory` in a fresh interpreter, so its RSS holds nothing of part 1."""
    batches = work_dir / "recorded_micro_batches.pt"
    torch.save(recorded, batches)
    command = [sys.executable, __file__, "--memory-child", str(batches), "--log-steps", str(options.log_steps)]
    command += ["--micro-batches-per-log", str(options.micro_batches_per_log), "--keep-dir", str(work_dir)]
    if options.threads:
        command += ["--threads", str(options.threads)]
    completed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10, help="with/without step pairs after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--log-steps", type=int, default=200)
    parser.add_argument("--micro-batches-per-log", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--keep-dir", default=None, help="keep the runs' files (JSONL, TensorBoard, PNG plots) here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    if options.memory_child:
        recorded = torch.load(options.memory_child)
        result = memory(
            recorded, options.log_steps, options.micro_batches_per_log, str(Path(options.keep_dir) / "memory")
        )
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(options.keep_dir or tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        step_result, recorded = overhead(options.pairs, options.warmup, str(work_dir / "overhead"))
        memory_result = memory_in_subprocess(recorded, options, work_dir)
    rows = [
        {"measure": "median step, with callback (s)", "value": step_result["median_step_s_with_callback"]},
        {"measure": "median step, without callback (s)", "value": step_result["median_step_s_without_callback"]},
        {"measure": "median step ratio - 1 (wall)", "value": step_result["step_time_overhead_ratio"]},
        {"measure": "median step ratio - 1 (process CPU)", "value": step_result["step_cpu_time_overhead_ratio"]},
        {"measure": "time inside the callback per step (s)", "value": step_result["callback_seconds_per_step"]},
        {"measure": "callback share of a step", "value": step_result["callback_share_of_step"]},
        {"measure": "median on_log (ms), replay", "value": memory_result["median_on_log_ms"]},
        {"measure": "peak RSS growth, logs 20->200 (MiB)", "value": memory_result["peak_rss_growth_mib"]},
        {"measure": "RSS slope over logs 20->200 (KiB/log)", "value": memory_result["rss_slope_kib_per_step"]},
    ]
    print_table(rows, ["measure", "value"])
    write_results("bench_callback", {"overhead": step_result, "memory": memory_result})


if __name__ == "__main__":
    main()
