"""Where label-free training helps: one controlled study, first on the embedded SmolLM2-135M-Instruct in two prompt
regimes, then on eight settings (task x prompt style x model).

The study's task is "What is a + b?" (1 <= a, b <= 20) in two regimes of ``ArithmeticTask``: ``open`` (the question
alone; the model explains at length and its greedy answer is right far more often than its sample) and ``short`` (two
worked examples before the question; answers are one short equation). :data:`SETTINGS` adds six more regimes, each
with no training and EM-RL token over 2 seeds (3 where two disagree), on which ``bench_diagnose.py`` validates
``trl-entropy diagnose``: two-digit operands (open and short), subtraction (open and short) and two-step word problems
(short) on SmolLM2, and "a + b" (short) on Gemma 3 270M (``load_model("gemma3-270m")``). Every
method and regime runs under one protocol:

- training: 30 optimizer steps, each on 8 sampled completions at T=1 (2 prompts x 4 completions; EM-FT, which TRL
  1.16 samples at least twice per prompt, 4 prompts x 2), at most 32 tokens, learning rate 2e-5, no KL term
  (``beta=0``, no reference model). Why: 2 x 4 completions at 2e-5 is bench_collapse's setting: 5e-5 collapsed
  within 15 steps; at 2e-5 one run rose to 65.6% over 60 steps, and of three later seeds two rose on the guard's probe
  (to 44% and 47% by steps 15-20) and all three ended below the base model at step 60; 30 steps is what the CPU
  budget allows for 34 runs, and sits near that rise; 32 tokens is the
  short regime's finishing budget and keeps a step near 10 s. In the open regime most training completions are cut
  off at 32 tokens: that is part of the regime, and the evaluation below is at budgets where answers finish.
- training prompts: 60 per seed, drawn from 272 of the 400 possible problems; the other 128 are the held-out set,
  the same for every method, seed and regime (disjoint by construction). Label-free methods never see an answer.
- evaluation: the 128 held-out problems, greedy and sampled at T=1 (sampling seed 1000 + seed, the same for a method
  and for no training at that seed), at the first budget of a ladder (short: 32, 96, 256 tokens; open: 96, 256, 512)
  where at most 5% of that model's answers are cut off. Each row reports its budget, truncation rate and mean length.
- methods, 3 seeds in both regimes: no training, EM-RL token (GRPO), supervised GRPO (accuracy reward, the labelled
  ceiling), majority vote (TTRL-style, :func:`trl_entropy.rewards.majority_vote_reward`); 3 seeds, open regime: EM-RL
  trajectory; 1 seed, open regime: EM-FT, EM-RL token (RLOO), forking 0.2 + EM-RL token, self-certainty, RENT;
  3 seeds, short regime: forking 0.2 + supervised GRPO (the 80/20 claim as Wang et al. state it: RL with the accuracy
  reward, the gradient on the top-20% entropy tokens, against supervised GRPO on all tokens).
- training dtype: bf16 autocast (TRL's default) for every arm, on CPUs with native bf16; each run records its dtype
  and CPU.
- per row: mean +- std over seeds, each seed's 95% Wilson interval, and the paired comparison with no training at
  the same seed (same problems, same sampling seed): the change, its 95% paired bootstrap interval and the exact
  McNemar p-value.

Every (regime, method, seed) is written to ``benchmarks/results/bench_label_free/`` when it finishes, so a rerun
resumes. Two processes can share the work (``--worker``; each claims a run with a lock file): one torch thread each,
two at most on two cores (more threads than cores slowed a step 2-4x here, see ``step_time_check``). The summary
(``benchmarks/results/bench_label_free.json``, PNG, README rows with ``--readme``) is rebuilt from those files.

    python benchmarks/bench_label_free.py --worker &  python benchmarks/bench_label_free.py --worker
    python benchmarks/bench_label_free.py --summarize-only --readme
    python benchmarks/bench_label_free.py --step-time-check   # per-step time under 1 or 2 processes and threads
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table  # noqa: E402

from trl_entropy.hardware import machine_record  # noqa: E402

NAME = "bench_label_free"
RUNS_DIR = RESULTS_DIR / NAME
# regime -> (task of trl_entropy.evaluation.tasks.TASKS, prompt style, model of trl_entropy.models.load_model). The
# first three are the committed study's; "open_2digit" and the rest are the settings `trl-entropy diagnose`'s rule is
# validated on (benchmarks/bench_diagnose.py): other tasks, and the second offline model.
SETTINGS = {
    "open": ("arithmetic", "open", "smollm2"),
    "short": ("arithmetic", "short", "smollm2"),
    "open_2digit": ("arithmetic_2digit", "open", "smollm2"),
    "short_2digit": ("arithmetic_2digit", "short", "smollm2"),
    "short_subtraction": ("subtraction", "short", "smollm2"),
    "short_word_problems": ("word_problems", "short", "smollm2"),
    "open_subtraction": ("subtraction", "open", "smollm2"),
    # Gemma 3 270M's 262k-token vocabulary makes a training step ~5x SmolLM2's here (~50 s on 1 of 2 busy cores):
    # one setting of it is what the CPU budget allowed.
    "gemma_short": ("arithmetic", "short", "gemma3-270m"),
}
REGIMES = tuple(SETTINGS)
TRAIN_POOL_SIZE = 272
"""Distinct problems a non-arithmetic regime's training prompts are drawn from (as many as "a + b" with 1..20 leaves
after the 128 held out; an arithmetic regime's pool is every operand pair not held out)."""
PROTOCOL = {
    "model": "SmolLM2-135M-Instruct (embedded)",
    "task": "ArithmeticTask, 'What is a + b?', 1 <= a, b <= 20",
    "steps": 30,
    "prompts_per_step": 2,
    "num_generations": 4,
    "completions_per_step": 8,
    "learning_rate": 2e-5,
    "beta": 0.0,
    "temperature": 1.0,
    "train_max_tokens": 32,
    "n_eval": 128,
    "eval_batch_size": 32,
    "eval_budgets": {"short": [32, 96, 256], "open": [96, 256, 512]},
    "max_truncation_rate": 0.05,
    "threads": 1,
}
# The committed runs trained under TRL's default, bf16 autocast on the CPU (they set no `bf16`), on CPUs with native
# bf16. Every arm keeps that dtype, so that no comparison mixes two; each run records it with its CPU. On a CPU without
# native bf16 a step runs ~6-10x slower in bf16 (benchmarks/bench_dtype.py): rerun every arm compared in float32
# there rather than mixing dtypes.
TRAINING_BF16 = True
LABELS = {
    "none": "no training",
    "em_rl_token": "EM-RL token (GRPO)",
    "supervised": "supervised GRPO (accuracy reward)",
    "majority_vote": "majority vote (TTRL-style)",
    "em_rl_trajectory": "EM-RL trajectory (GRPO)",
    "emft": "EM-FT",
    "em_rl_token_rloo": "EM-RL token (RLOO)",
    "forking_0.2": "forking 0.2 + EM-RL token",
    "forking_0.2_supervised": "forking 0.2 + supervised GRPO (accuracy reward)",
    "self_certainty": "self-certainty (Intuitor)",
    "rent": "RENT (entropy + format penalty)",
}
THIRD_SEED = ("open_2digit", "short_2digit", "short_subtraction")
"""Settings whose first two seeds of EM-RL token disagree (one helped or mixed, the other hurt): they get a third."""
# (regime, method) -> number of seeds
PLAN = {
    **{
        (regime, method): 3
        for regime in ("open", "short")
        for method in ("none", "em_rl_token", "supervised", "majority_vote")
    },
    ("open", "em_rl_trajectory"): 3,
    **{("open", m): 1 for m in ("emft", "em_rl_token_rloo", "forking_0.2", "self_certainty", "rent")},
    **{(regime, method): 2 for regime in REGIMES[2:] for method in ("none", "em_rl_token")},
    # a third seed where the first two seeds' effects disagree (bench_diagnose.py's `needs_third_seed`)
    **{(regime, method): 3 for regime in THIRD_SEED for method in ("none", "em_rl_token")},
    # the 80/20 claim as its paper states it: the top-20% entropy tokens of RL with the accuracy reward
    ("short", "forking_0.2_supervised"): 3,
}


def eval_budgets(regime: str) -> list[int]:
    """The evaluation budget ladder of a regime (a task variant takes its prompt style's)."""
    return PROTOCOL["eval_budgets"][SETTINGS[regime][1]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run the plan's missing runs (claims each with a lock)")
    parser.add_argument("--only", nargs="*", default=None, help="run keys regime/method/seed to run (default: all)")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild JSON, PNG and table from the runs")
    parser.add_argument("--readme", action="store_true", help="print the README rows")
    parser.add_argument("--step-time-check", action="store_true", help="measure per-step time under thread settings")
    parser.add_argument("--step-time-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


# ---- problems -------------------------------------------------------------------------------------------------------


def problem_split(regime: str = "open") -> tuple[list[dict], list[dict]]:
    """``(held_out, train_pool)`` problem rows of a regime, disjoint. An arithmetic task enumerates its operand pairs
    (400 for "a + b" with 1..20) in a fixed shuffle, holds out the first 128 and pools the rest (the committed study's
    split); another
    task holds out the first 128 distinct questions of its ``test`` split and draws the pool's from ``train``."""
    from trl_entropy.evaluation.tasks import ArithmeticTask, build_task

    name, style, _ = SETTINGS[regime]
    task = build_task(name, prompt_style=style)
    n_eval = PROTOCOL["n_eval"]
    if isinstance(task, ArithmeticTask):
        triples = [
            (a, op, b)
            for op in task.operations
            for a in range(task.low, task.high + 1)
            for b in range(task.low, task.high + 1)
        ]
        random.Random(2026).shuffle(triples)
        rows = [task.problem(*triple) for triple in triples]
        return rows[:n_eval], rows[n_eval:]
    held_out = _distinct(task.dataset(20 * n_eval, split="test", seed=0), n_eval)
    pool = _distinct(task.dataset(20 * TRAIN_POOL_SIZE, split="train", seed=0), TRAIN_POOL_SIZE)
    return held_out, pool


def _distinct(rows, n: int) -> list[dict]:
    out, seen = [], set()
    for row in rows:
        if row["question"] not in seen:
            seen.add(row["question"])
            out.append(row)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct questions, {n} needed")
    return out[:n]


def train_rows(seed: int, regime: str = "open") -> list[dict]:
    """The ``steps x prompts_per_step`` training problems of a seed, drawn from the regime's pool."""
    _, pool = problem_split(regime)
    return random.Random(seed).sample(pool, PROTOCOL["steps"] * PROTOCOL["prompts_per_step"])


# ---- training -------------------------------------------------------------------------------------------------------


def parse_answer(text: str) -> str | None:
    from trl_entropy.evaluation.generate import normalize_answer
    from trl_entropy.evaluation.tasks import extract_answer

    return normalize_answer(extract_answer(text))


class Progress(TrainerCallback):
    """Prints each optimizer step and keeps its wall time (long runs show progress)."""

    def __init__(self, key: str):
        self.key, self.start, self.step_times = key, 0.0, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.start)
        print(
            f"[{time.strftime('%H:%M:%S')}] {self.key} step {state.global_step}/{state.max_steps} "
            f"{self.step_times[-1]:.1f} s",
            flush=True,
        )


def make_trainer(method: str, seed: int, model, tokenizer, train_rows: list[dict], output_dir: str, callbacks):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trl_entropy.evaluation.tasks import accuracy_reward
    from trl_entropy.rewards import majority_vote_reward, rent_reward
    from trl_entropy.trainers import (
        EMFTConfig,
        EMFTTrainer,
        EntropyGRPOConfig,
        EntropyGRPOTrainer,
        EntropyRLOOConfig,
        EntropyRLOOTrainer,
    )

    p = PROTOCOL
    common = dict(
        output_dir=output_dir,
        learning_rate=p["learning_rate"],
        beta=p["beta"],
        temperature=p["temperature"],
        max_completion_length=p["train_max_tokens"],
        max_steps=p["steps"],
        per_device_train_batch_size=p["completions_per_step"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=TRAINING_BF16,
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    group = dict(num_generations=p["num_generations"])
    labelled = Dataset.from_list(train_rows)
    prompts_only = labelled.select_columns(["prompt"])  # label-free methods never see an answer
    kwargs = dict(model=model, processing_class=tokenizer, callbacks=callbacks)
    # `entropy_stats=False` below: the protocol never attached the statistics callback, which the entropy configs
    # now attach by default.
    if method == "em_rl_token":
        return EntropyGRPOTrainer(
            args=EntropyGRPOConfig(entropy_stats=False, entropy_reward="token", **group, **common),
            train_dataset=prompts_only,
            **kwargs,
        )
    if method == "em_rl_trajectory":
        return EntropyGRPOTrainer(
            args=EntropyGRPOConfig(entropy_stats=False, entropy_reward="trajectory", **group, **common),
            train_dataset=prompts_only,
            **kwargs,
        )
    if method == "self_certainty":
        return EntropyGRPOTrainer(
            args=EntropyGRPOConfig(entropy_stats=False, entropy_reward="self_certainty", **group, **common),
            train_dataset=prompts_only,
            **kwargs,
        )
    if method == "forking_0.2":
        config = EntropyGRPOConfig(
            entropy_stats=False, entropy_reward="token", forking_token_ratio=0.2, **group, **common
        )
        return EntropyGRPOTrainer(args=config, train_dataset=prompts_only, **kwargs)
    if method == "em_rl_token_rloo":
        return EntropyRLOOTrainer(
            args=EntropyRLOOConfig(entropy_stats=False, entropy_reward="token", **group, **common),
            train_dataset=prompts_only,
            **kwargs,
        )
    if method == "emft":
        # 4 prompts x 2 samples: the same 8 completions per step (TRL 1.16 samples each prompt at least twice).
        config = EMFTConfig(entropy_stats=False, num_samples_per_prompt=2, log_entropy_after=False, **common)
        return EMFTTrainer(args=config, train_dataset=prompts_only, **kwargs)
    if method == "rent":
        # Unparsed answers are charged log V nats, the largest entropy possible (49152-token vocabulary).
        reward = rent_reward(parse_answer, unparsed_entropy=math.log(len(tokenizer)))
        return EntropyGRPOTrainer(
            reward_funcs=reward,
            args=EntropyGRPOConfig(entropy_stats=False, **group, **common),
            train_dataset=prompts_only,
            **kwargs,
        )
    if method == "majority_vote":
        reward = majority_vote_reward(parse_answer, num_generations=p["num_generations"])
        return GRPOTrainer(
            reward_funcs=reward, args=GRPOConfig(**group, **common), train_dataset=prompts_only, **kwargs
        )
    if method == "forking_0.2_supervised":
        # Wang et al.'s setting: RL with the verifiable (accuracy) reward, the gradient on the top-20% entropy tokens
        config = EntropyGRPOConfig(entropy_stats=False, forking_token_ratio=0.2, **group, **common)
        return EntropyGRPOTrainer(reward_funcs=accuracy_reward, args=config, train_dataset=labelled, **kwargs)
    if method == "supervised":
        return GRPOTrainer(
            reward_funcs=accuracy_reward, args=GRPOConfig(**group, **common), train_dataset=labelled, **kwargs
        )
    raise ValueError(f"unknown method {method!r}")


# ---- evaluation -----------------------------------------------------------------------------------------------------


def evaluate_until_finished(model, tokenizer, held_out: list[dict], regime: str, do_sample: bool, seed: int) -> dict:
    """Evaluate at the first budget of the regime's ladder where at most 5% of the answers are cut off (the last
    rung otherwise, flagged ``finished=False``), decoding each token once
    (:func:`trl_entropy.evaluation.evaluate_ladder`: a rung continues only the answers cut off at the one before).
    Greedy answers are those of a decoding at that budget from the start; sampled ones a draw from the same
    distribution (sampling seed 1000 + seed, set once; the committed runs drew afresh at each rung)."""
    from trl_entropy.evaluation import evaluate_ladder

    results = evaluate_ladder(
        model,
        tokenizer,
        held_out,
        budgets=eval_budgets(regime),
        max_truncated=PROTOCOL["max_truncation_rate"],
        do_sample=do_sample,
        temperature=PROTOCOL["temperature"],
        seed=1000 + seed if do_sample else None,
        batch_size=PROTOCOL["eval_batch_size"],
        progress=False,
    )
    attempts = [
        {"budget": r.max_new_tokens, "accuracy": r.accuracy, "truncation_rate": r.truncation_rate} for r in results
    ]
    result = results[-1]
    summary = result.to_dict()
    summary["finished"] = result.truncation_rate <= PROTOCOL["max_truncation_rate"]
    summary["budget_attempts"] = attempts
    return {
        "summary": summary,
        "correct": list(result.correct),
        "lengths": [c.num_tokens for c in result.completions],
        "examples": [c.text for c in result.completions[:3]],
    }


def run_one(regime: str, method: str, seed: int) -> dict:
    import torch
    from transformers import set_seed

    from trl_entropy.models import load_model

    key = f"{regime}/{method}/{seed}"
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    held_out, _ = problem_split(regime)
    set_seed(seed)
    model, tokenizer = load_model(SETTINGS[regime][2])
    log, progress, train_s = [], Progress(key), 0.0
    if method != "none":
        rows = train_rows(seed, regime)
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = make_trainer(method, seed, model, tokenizer, rows, output_dir, [progress])
            train_start = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - train_start
        log = [
            {k: v for k, v in entry.items() if isinstance(v, int | float)}
            for entry in trainer.state.log_history
            if "loss" in entry
        ]
        model = trainer.model
    eval_start = time.perf_counter()
    shared = run_path(regime, "none", 0)
    if method == "none" and seed > 0 and shared.is_file():
        # Greedy decoding of the untrained model draws no random number: every seed's is seed 0's.
        greedy = {**json.loads(shared.read_text())["greedy"], "shared_with_seed": 0}
    else:
        greedy = evaluate_until_finished(model, tokenizer, held_out, regime, do_sample=False, seed=seed)
    sampled = evaluate_until_finished(model, tokenizer, held_out, regime, do_sample=True, seed=seed)
    eval_s = time.perf_counter() - eval_start
    del model
    return {
        "regime": regime,
        "method": method,
        "seed": seed,
        "protocol": PROTOCOL,
        "greedy": greedy,
        "sampled": sampled,
        "step_times": progress.step_times,
        "train_s": train_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - start_wall,
        "cpu_s": time.process_time() - start_cpu,
        "torch_threads": torch.get_num_threads(),
        "setting": dict(zip(("task", "prompt_style", "model"), SETTINGS[regime])),
        "training_dtype": "bfloat16" if TRAINING_BF16 else "float32",
        "hardware": machine_record(),
        "training_log": log,
    }


# ---- the plan and its runs ------------------------------------------------------------------------------------------


def plan() -> list[tuple[str, str, int]]:
    """Seed-major: every method's first seed before any second seed, so an interrupted study covers every method."""
    keys = []
    for seed in range(max(PLAN.values())):
        for (regime, method), seeds in PLAN.items():
            if seed < seeds:
                keys.append((regime, method, seed))
    return keys


def run_path(regime: str, method: str, seed: int) -> Path:
    return RUNS_DIR / regime / f"{method}_seed{seed}.json"


def _claim(path: Path) -> bool:
    """Claim a run for this process with a lock file (a stale lock of a dead process is taken over)."""
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False  # another live worker has it
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return _claim(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def work(only: list[str] | None) -> list[str]:
    failures = []
    for regime, method, seed in plan():
        key = f"{regime}/{method}/{seed}"
        path = run_path(regime, method, seed)
        if (only and key not in only) or path.is_file() or not _claim(path):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] running {key}", flush=True)
        try:
            result = run_one(regime, method, seed)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written file
            g, s = result["greedy"]["summary"], result["sampled"]["summary"]
            print(
                f"[{time.strftime('%H:%M:%S')}] {key}: greedy {g['accuracy']:.3f} ({g['max_new_tokens']} tok, "
                f"{g['truncation_rate']:.1%} cut), sampled {s['accuracy']:.3f} ({s['max_new_tokens']} tok, "
                f"{s['truncation_rate']:.1%} cut); train {result['train_s']:.0f} s, eval {result['eval_s']:.0f} s",
                flush=True,
            )
        except Exception as err:  # one failing run must not lose the others; it is retried on rerun
            traceback.print_exc()
            failures.append(f"{key}: {type(err).__name__}: {err}")
        finally:
            path.with_suffix(".lock").unlink(missing_ok=True)
    return failures


# ---- summary --------------------------------------------------------------------------------------------------------


def load_runs() -> dict[tuple[str, str, int], dict]:
    runs = {}
    for regime, method, seed in plan():
        path = run_path(regime, method, seed)
        if path.is_file():
            run = json.loads(path.read_text())
            if run.get("protocol") == PROTOCOL:
                runs[(regime, method, seed)] = run
    return runs


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def summarize(runs: dict) -> dict:
    rows = []
    for (regime, method), _ in PLAN.items():
        entries = sorted((r for k, r in runs.items() if k[:2] == (regime, method)), key=lambda r: r["seed"])
        if not entries:
            continue
        row = {"regime": regime, "method": method, "label": LABELS[method], "seeds": [r["seed"] for r in entries]}
        for mode in ("greedy", "sampled"):
            stats = {
                "accuracy": spread([r[mode]["summary"]["accuracy"] for r in entries]),
                "truncation_rate": spread([r[mode]["summary"]["truncation_rate"] for r in entries]),
                "mean_length": spread([r[mode]["summary"]["mean_completion_length"] for r in entries]),
                "token_entropy": spread([r[mode]["summary"]["mean_token_entropy"] for r in entries]),
                "budgets": [r[mode]["summary"]["max_new_tokens"] for r in entries],
                "all_finished": all(r[mode]["summary"]["finished"] for r in entries),
                "wilson_ci95_per_seed": [r[mode]["summary"]["accuracy_ci95"] for r in entries],
            }
            paired = [] if method == "none" else paired_against(runs, regime, method, "none", mode)
            stats["paired_vs_none"] = paired
            row[mode] = stats
        times = [t for r in entries for t in r["step_times"]]
        row["step_time_s"] = {"median": statistics.median(times), "mean": statistics.fmean(times)} if times else None
        row["cpu_s"] = sum(r["cpu_s"] for r in entries)
        rows.append(row)
    return {"rows": rows, "total_cpu_s": sum(r["cpu_s"] for r in runs.values()), "num_runs": len(runs)}


def seeds_up_down(paired: list[dict]) -> tuple[int, int]:
    """How many paired comparisons have their 95% bootstrap interval above 0, and how many below."""
    return sum(p["bootstrap_ci95"][0] > 0 for p in paired), sum(p["bootstrap_ci95"][1] < 0 for p in paired)


def effect(greedy: list[dict], sampled: list[dict]) -> str:
    """What paired comparisons (one per seed, greedy and sampled) show: "helped" when the mean change is positive for
    both and at least one seed's 95% interval lies above 0; "hurt" when a mean change is negative, some interval lies
    below 0 and none above; else "no clear effect" ("not measured" without comparisons)."""
    if not greedy or not sampled:
        return "not measured"
    means = [statistics.fmean(p["change"] for p in paired) for paired in (greedy, sampled)]
    up, down = seeds_up_down(greedy + sampled)
    if all(m > 0 for m in means) and up:
        return "helped"
    if any(m < 0 for m in means) and down and not up:
        return "hurt"
    return "no clear effect"


def paired_against(runs: dict, regime: str, method: str, reference: str, mode: str) -> list[dict]:
    """Paired comparisons of ``method`` with ``reference`` in ``regime``, one per seed both ran (same problems, same
    sampling seed)."""
    from trl_entropy.stats import mcnemar_exact_p, paired_bootstrap_interval

    out = []
    for (r, m, seed), run in sorted(runs.items()):
        other = runs.get((regime, reference, seed))
        if (r, m) != (regime, method) or other is None:
            continue
        before, after = other[mode]["correct"], run[mode]["correct"]
        out.append(
            {
                "seed": seed,
                "change": (sum(after) - sum(before)) / len(before),
                "bootstrap_ci95": list(paired_bootstrap_interval(before, after, seed=seed)),
                "mcnemar_p": mcnemar_exact_p(before, after),
            }
        )
    return out


# (method, what it is compared with, the paper's claim)
CLAIMS = [
    ("em_rl_token", "none", "EM-RL token: minus the token entropy as the only reward raises accuracy (2505.15134)"),
    (
        "em_rl_token",
        "supervised",
        "EM-RL token without labels is comparable to GRPO with the accuracy reward (2505.15134, its headline)",
    ),
    ("em_rl_trajectory", "none", "EM-RL trajectory: the sequence log-probability as the only reward (2505.15134)"),
    ("em_rl_token_rloo", "none", "EM-RL token with RLOO's baseline, the paper's advantage (2505.15134)"),
    ("emft", "none", "EM-FT: minimising the entropy of the model's own samples raises accuracy (2505.15134)"),
    (
        "forking_0.2_supervised",
        "supervised",
        "80/20: RL with the accuracy reward on the top-20% entropy tokens matches or beats all tokens (2506.01939)",
    ),
    (
        "forking_0.2",
        "em_rl_token",
        "(not the paper's setting: the 80/20 mask on EM-RL token's entropy reward instead of the accuracy reward)",
    ),
    ("self_certainty", "none", "Intuitor: self-certainty as the only reward raises accuracy (2505.19590)"),
    ("rent", "none", "RENT: entropy reward (with a format penalty) raises accuracy (2505.22660)"),
    ("majority_vote", "none", "TTRL: the majority answer as the label raises accuracy (2504.16084)"),
    ("supervised", "none", "(the labelled ceiling, not a paper's claim: GRPO with the accuracy reward)"),
]
NOT_A_CLAIM = {("supervised", "none"), ("forking_0.2", "em_rl_token")}
"""Rows of :data:`CLAIMS` that are reference points, not a paper's claim: no "reproduces" verdict."""


def claims(runs: dict, summary: dict) -> list[dict]:
    """Each paper's claim in each regime where the study ran its method and its comparison: the mean paired change
    (greedy, sampled), seeds up / down, and whether it reproduces ("helped" against no training; against another
    method, "matches or beats" / "comparable": not "hurt" against it, same problems and sampling seed). Comparisons
    with no training are the summary's."""
    rows = {(row["regime"], row["method"]): row for row in summary["rows"]}
    out = []
    for method, reference, claim in CLAIMS:
        for regime in REGIMES:
            if reference == "none":
                row = rows.get((regime, method))
                greedy, sampled = (
                    (row["greedy"]["paired_vs_none"], row["sampled"]["paired_vs_none"]) if row else ([], [])
                )
            else:
                greedy = paired_against(runs, regime, method, reference, "greedy")
                sampled = paired_against(runs, regime, method, reference, "sampled")
            if not greedy:
                continue
            result = effect(greedy, sampled)
            reproduces = result != "hurt" if reference != "none" else result == "helped"
            out.append(
                {
                    "claim": claim,
                    "regime": regime,
                    "method": LABELS[method],
                    "compared_with": LABELS[reference],
                    "seeds": len(greedy),
                    "greedy": greedy,
                    "sampled": sampled,
                    "effect": result,
                    "reproduces": None if (method, reference) in NOT_A_CLAIM else reproduces,
                }
            )
    return out


def claims_markdown(rows: list[dict]) -> str:
    """The README's table of the papers' claims, from :func:`claims`."""

    def change(paired: list[dict]) -> str:
        mean = statistics.fmean(p["change"] for p in paired)
        up, down = seeds_up_down(paired)
        return f"{100 * mean:+.1f} ({up} up, {down} down)"

    lines = [
        "| Claim (arXiv) | Regime | Compared with | Seeds | Greedy change, mean (seeds with the paired 95% CI above / "
        "below 0) | Sampled change | Reproduces here |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        verdict = {True: "yes", False: "**no**", None: "-"}[row["reproduces"]]
        lines.append(
            f"| {row['claim']} | {row['regime']} | {row['compared_with']} | {row['seeds']} | {change(row['greedy'])} "
            f"| {change(row['sampled'])} | {verdict} ({row['effect']}) |"
        )
    return "\n".join(lines)


def package_summary(summary: dict) -> dict:
    """The small summary ``trl-entropy demo`` shows beside its own run (``trl_entropy/study_summary.json``)."""
    rows = []
    for row in summary["rows"]:
        entry = {"regime": row["regime"], "method": row["method"], "label": row["label"], "seeds": row["seeds"]}
        for mode in ("greedy", "sampled"):
            stat = row[mode]
            entry[mode] = {
                "mean": stat["accuracy"]["mean"],
                "std": stat["accuracy"]["std"],
                "changes": [p["change"] for p in stat["paired_vs_none"]],
                "budgets": sorted(set(stat["budgets"])),
                "truncation_rate": stat["truncation_rate"]["mean"],
            }
        rows.append(entry)
    return {"source": "benchmarks/bench_label_free.py", "protocol": PROTOCOL, "rows": rows}


def table_rows(summary: dict) -> list[dict]:
    def pct(stat: dict) -> str:
        text = f"{100 * stat['mean']:.1f}"
        return text + (f" +- {100 * stat['std']:.1f}" if stat["std"] is not None else "")

    def change(paired: list[dict]) -> str:
        if not paired:
            return "-"
        return " ".join(f"{100 * p['change']:+.1f}(p={p['mcnemar_p']:.2g})" for p in paired)

    out = []
    for row in summary["rows"]:
        g, s = row["greedy"], row["sampled"]
        out.append(
            {
                "regime": row["regime"],
                "method": row["label"],
                "seeds": len(row["seeds"]),
                "greedy %": pct(g["accuracy"]),
                "greedy vs none": change(g["paired_vs_none"]),
                "g tok/trunc/len": f"{'/'.join(map(str, sorted(set(g['budgets']))))}/"
                f"{100 * g['truncation_rate']['mean']:.1f}%/{g['mean_length']['mean']:.0f}",
                "sampled %": pct(s["accuracy"]),
                "sampled vs none": change(s["paired_vs_none"]),
                "s tok/trunc/len": f"{'/'.join(map(str, sorted(set(s['budgets']))))}/"
                f"{100 * s['truncation_rate']['mean']:.1f}%/{s['mean_length']['mean']:.0f}",
            }
        )
    return out


def readme_rows(summary: dict) -> str:
    """Markdown rows for the README's results table, one per (regime, method)."""
    lines = [
        "| Regime | Method (seeds) | Greedy accuracy, mean +- std | Paired change vs no training, per seed "
        "(McNemar p) | Sampled T=1 accuracy | Paired change | Budget / truncated / mean length (greedy; sampled) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary["rows"]:
        cells = []
        for mode in ("greedy", "sampled"):
            acc = row[mode]["accuracy"]
            text = f"{100 * acc['mean']:.1f}%" + (f" +- {100 * acc['std']:.1f}" if acc["std"] is not None else "")
            paired = row[mode]["paired_vs_none"]
            change = ", ".join(f"{100 * p['change']:+.1f} (p={p['mcnemar_p']:.2g})" for p in paired) or "-"
            cells += [text, change]
        budgets = "; ".join(
            f"{'/'.join(map(str, sorted(set(row[m]['budgets']))))} tok, "
            f"{100 * row[m]['truncation_rate']['mean']:.1f}%, {row[m]['mean_length']['mean']:.0f}"
            for m in ("greedy", "sampled")
        )
        lines.append(
            f"| {row['regime']} | {row['label']} ({len(row['seeds'])}) | {cells[0]} | {cells[1]} | {cells[2]} | "
            f"{cells[3]} | {budgets} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    regimes = [r for r in REGIMES if any(row["regime"] == r for row in summary["rows"])]
    columns = math.ceil(len(regimes) / 2)
    figure = Figure(figsize=(4 * columns, 9.6))
    axes = list(figure.subplots(2, columns, sharey=True, squeeze=False).flat)
    for ax in axes[len(regimes) :]:
        ax.set_axis_off()
    for ax, regime in zip(axes, regimes):
        rows = [r for r in summary["rows"] if r["regime"] == regime]
        for offset, mode, colour in ((-0.18, "greedy", "tab:blue"), (0.18, "sampled", "tab:orange")):
            for i, row in enumerate(rows):
                stat = row[mode]["accuracy"]
                ax.bar(i + offset, stat["mean"], width=0.34, color=colour, alpha=0.35, label=mode if i == 0 else None)
                ax.scatter([i + offset] * len(stat["values"]), stat["values"], color=colour, s=14, zorder=3)
        base = next((r for r in rows if r["method"] == "none"), None)
        if base is not None:
            ax.axhline(base["greedy"]["accuracy"]["mean"], color="tab:blue", linestyle=":", linewidth=1)
            ax.axhline(base["sampled"]["accuracy"]["mean"], color="tab:orange", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['label']} ({len(r['seeds'])})" for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{regime}: {' / '.join(SETTINGS[regime])}", fontsize=9)
        ax.set_ylim(0, 1)
    for ax in axes[::columns]:
        ax.set_ylabel(f"held-out accuracy (n = {PROTOCOL['n_eval']})")
    axes[0].legend(fontsize=8, loc="upper left")
    p = PROTOCOL
    figure.suptitle(
        f"task / prompt style / model: {p['steps']} steps x {p['completions_per_step']} completions, lr "
        f"{p['learning_rate']:g}; budget: the first of a ladder where >= 95% of a model's answers finish, else its "
        "largest (bars: mean over seeds; dots: seeds; "
        "dotted: no training)",
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


# ---- step time ------------------------------------------------------------------------------------------------------

STEP_TIME_STEPS = 6


def step_time_child(spec: str) -> None:
    """One EM-RL token run of STEP_TIME_STEPS steps on the open regime's seed-1 prompts; prints its step times."""
    threads = int(spec)
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import set_seed

    from trl_entropy.models import load_default_model

    set_seed(1)
    model, tokenizer = load_default_model()
    progress = Progress(f"threads={threads or 'default'}")
    with tempfile.TemporaryDirectory() as output_dir:
        rows = train_rows(1)
        trainer = make_trainer("em_rl_token", 1, model, tokenizer, rows, output_dir, [progress])
        trainer.args.max_steps = STEP_TIME_STEPS
        trainer.train()
    print("STEPTIMES " + json.dumps({"threads": torch.get_num_threads(), "step_times": progress.step_times}))


def step_time_check() -> dict:
    """Per-step time of the same EM-RL token configuration, alone and beside a second identical job, with 1 torch
    thread or torch's default (2 on 2 cores) per process: what explains a fivefold spread."""
    cases = {
        "alone, 1 thread": ["1"],
        "alone, default threads": ["0"],
        "2 jobs, 1 thread each": ["1", "1"],
        "1 thread beside a default-thread job": ["1", "0"],
        "2 jobs, default threads each": ["0", "0"],
    }
    results = {}
    for name, specs in cases.items():
        print(f"[{time.strftime('%H:%M:%S')}] step time: {name}", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--step-time-child", spec], stdout=subprocess.PIPE, text=True, env=env
            )  # fmt: skip
            for spec in specs
        ]
        outputs = [p.communicate()[0] for p in procs]
        runs = [
            json.loads(next(line[10:] for line in out.splitlines() if line.startswith("STEPTIMES ")))
            for out in outputs
        ]
        first = runs[0]["step_times"]
        results[name] = {
            "torch_threads": runs[0]["threads"],
            "step_times_s": first,
            "median_s_after_step_1": statistics.median(first[1:]),
        }
    return {
        "steps": STEP_TIME_STEPS,
        "configuration": "EM-RL token (GRPO), open regime, seed 1, 8 x 32 tokens",
        "cases": results,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    args = parse_args()
    if args.step_time_child is not None:
        step_time_child(args.step_time_child)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(PROTOCOL["threads"]))
    import torch

    torch.set_num_threads(PROTOCOL["threads"])
    summary_path = RESULTS_DIR / f"{NAME}.json"
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if args.step_time_check:
        previous["step_time_check"] = step_time_check()
    failures = work(args.only) if args.worker else []
    runs = load_runs()
    summary = summarize(runs)
    png = plot(summary, RESULTS_DIR / f"{NAME}.png") if runs else None
    payload = {
        "settings": PROTOCOL,
        "table": table_rows(summary),
        "claims": claims(runs, summary),
        "summary": summary,
        "total_cpu_hours": summary["total_cpu_s"] / 3600,
        "runs_done": f"{len(runs)} of {len(plan())}",
        "plot": str(png.relative_to(RESULTS_DIR.parent.parent)) if png else None,
    }
    if "step_time_check" in previous:
        payload["step_time_check"] = previous["step_time_check"]
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, summary_path)
    if runs:
        shipped = Path(__file__).resolve().parents[1] / "trl_entropy" / "study_summary.json"
        shipped.write_text(json.dumps(package_summary(summary), indent=1, sort_keys=True) + "\n")
    rows = table_rows(summary)
    if rows:
        print_table(rows, list(rows[0]))
    print(f"{len(runs)} of {len(plan())} runs, total CPU time {summary['total_cpu_s'] / 3600:.2f} h")
    if args.readme:
        print(readme_rows(summary))
        print()
        print(claims_markdown(payload["claims"]))
    for failure in failures:
        print(f"FAILED {failure}")


if __name__ == "__main__":
    main()
