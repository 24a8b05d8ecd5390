"""Label-free training methods side by side on the embedded SmolLM2-135M-Instruct, over several seeds.

Every method trains the same model for the same number of optimizer steps on the same number of sampled completions
per step (``prompts_per_step x num_generations``, at T=1, at most ``max_tokens`` tokens), with the same learning rate
and no KL term, then is evaluated on the same held-out problems, greedy and sampled at T=1, at the same budget:

- ``none``: no training (the seed changes only the sampled evaluation);
- ``em_rl_token_grpo``: EM-RL, token entropy reward, GRPO group baseline (``EntropyGRPOTrainer``);
- ``em_rl_token_rloo``: the same reward with the RLOO baseline (``EntropyRLOOTrainer``);
- ``em_rl_trajectory``: EM-RL, trajectory reward (mean log-probability of the sampled tokens), GRPO;
- ``emft``: EM-FT, the token entropy itself as the loss (``EMFTTrainer``, one sample per prompt, so
  ``prompts_per_step x num_generations`` prompts per step);
- ``forking_0.2``: EM-RL token (GRPO) with the policy gradient on the top 20% highest-entropy tokens only;
- ``majority_vote``: a non-entropy label-free baseline (TTRL-style: reward 1 for a completion whose extracted answer
  is its group's majority answer), GRPO;
- ``supervised``: GRPO with the accuracy reward (labels): the labelled ceiling.

Task: ``ArithmeticTask(prompt_style="short")`` ("What is a + b?", 1 <= a, b <= 20, two worked examples in the chat
before the question), whose answers finish within the budget (measured: 100% of greedy and 98.4% of T=1 base answers
finish within 32 tokens), so an accuracy here is not a truncation effect; every row reports its truncation rate.

Each (method, seed) is written to ``benchmarks/results/bench_label_free.json`` as soon as it finishes, so a rerun
with the same settings resumes where it stopped (``--fresh`` starts over). Summary: mean, sample standard deviation
and range over seeds, the 95% Wilson interval of each run, total CPU time, and a PNG.

    python benchmarks/bench_label_free.py [--steps 8] [--n-eval 64] [--seeds 3] [--other-seeds 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table  # noqa: E402

NAME = "bench_label_free"
MAIN_METHODS = ("none", "em_rl_token_grpo", "supervised")  # at least --seeds seeds each
OTHER_METHODS = ("em_rl_token_rloo", "em_rl_trajectory", "emft", "forking_0.2", "majority_vote")
LABELS = {
    "none": "no training",
    "em_rl_token_grpo": "EM-RL token (GRPO)",
    "em_rl_token_rloo": "EM-RL token (RLOO)",
    "em_rl_trajectory": "EM-RL trajectory (GRPO)",
    "emft": "EM-FT",
    "forking_0.2": "forking 0.2 + EM-RL token",
    "majority_vote": "majority vote (TTRL-style)",
    "supervised": "supervised GRPO (accuracy reward)",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of every trained method")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (group size)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--max-tokens", type=int, default=32, help="completion budget, training and evaluation")
    parser.add_argument("--n-eval", type=int, default=64, help="held-out problems")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of no training, EM-RL token GRPO, supervised")
    parser.add_argument("--other-seeds", type=int, default=1, help="seeds of the other methods")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="discard cached runs")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild table, JSON and PNG from the cache")
    parser.add_argument(
        "--check-reproducibility",
        action="store_true",
        help="run a short EM-RL token (GRPO) case twice in fresh processes and compare weights and outputs bitwise",
    )
    parser.add_argument("--repro-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--readme", action="store_true", help="print the README rows from the cached results")
    return parser.parse_args()


def settings_of(args: argparse.Namespace) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "task": "ArithmeticTask(prompt_style='short'), 1 <= a, b <= 20",
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "completions_per_step": args.prompts_per_step * args.num_generations,
        "learning_rate": args.learning_rate,
        "beta": 0.0,
        "temperature": 1.0,
        "max_tokens": args.max_tokens,
        "n_eval": args.n_eval,
        "threads": args.threads,
    }


def majority_vote_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """TTRL-style label-free reward: 1.0 for a completion whose extracted answer equals the majority answer of the
    completions of the same prompt, else 0.0 (0.0 for all when no completion has an answer).

    TODO: switch to ``trl_entropy.rewards.majority_vote_reward`` once the signals branch lands it.
    """
    from trl_entropy.generate import majority_vote, normalize_answer
    from trl_entropy.tasks import extract_answer

    answers = [normalize_answer(extract_answer(c)) for c in completions]
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(json.dumps(prompt, sort_keys=True), []).append(index)
    rewards = [0.0] * len(completions)
    for indices in groups.values():
        winner = majority_vote([answers[i] for i in indices])
        for i in indices:
            rewards[i] = float(winner is not None and answers[i] == winner)
    return rewards


def train(method: str, seed: int, args: argparse.Namespace, model, tokenizer, train_set):
    """Train ``model`` in place with ``method``; returns the trainer's log history."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from trl_entropy.tasks import accuracy_reward
    from trl_entropy.trainers import (
        EMFTConfig,
        EMFTTrainer,
        EntropyGRPOConfig,
        EntropyGRPOTrainer,
        EntropyRLOOConfig,
        EntropyRLOOTrainer,
    )

    completions = args.prompts_per_step * args.num_generations
    with tempfile.TemporaryDirectory() as output_dir:
        common = dict(
            output_dir=output_dir,
            learning_rate=args.learning_rate,
            beta=0.0,
            temperature=1.0,
            max_completion_length=args.max_tokens,
            max_steps=args.steps,
            per_device_train_batch_size=completions,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=False,
            disable_tqdm=True,
        )
        prompts_only = train_set.select_columns(["prompt"])  # label-free methods never see an answer
        group = dict(num_generations=args.num_generations)
        if method == "em_rl_token_grpo":
            trainer = EntropyGRPOTrainer(
                model=model,
                args=EntropyGRPOConfig(entropy_reward="token", **group, **common),
                train_dataset=prompts_only,
                processing_class=tokenizer,
            )
        elif method == "em_rl_token_rloo":
            trainer = EntropyRLOOTrainer(
                model=model,
                args=EntropyRLOOConfig(entropy_reward="token", **group, **common),
                train_dataset=prompts_only,
                processing_class=tokenizer,
            )
        elif method == "em_rl_trajectory":
            trainer = EntropyGRPOTrainer(
                model=model,
                args=EntropyGRPOConfig(entropy_reward="trajectory", **group, **common),
                train_dataset=prompts_only,
                processing_class=tokenizer,
            )
        elif method == "forking_0.2":
            trainer = EntropyGRPOTrainer(
                model=model,
                args=EntropyGRPOConfig(entropy_reward="token", forking_token_ratio=0.2, **group, **common),
                train_dataset=prompts_only,
                processing_class=tokenizer,
            )
        elif method == "emft":
            trainer = EMFTTrainer(
                model=model,
                args=EMFTConfig(num_samples_per_prompt=1, log_entropy_after=False, **common),
                train_dataset=prompts_only,
                processing_class=tokenizer,
            )
        elif method == "majority_vote":
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=majority_vote_reward,
                args=GRPOConfig(**group, **common),
                train_dataset=prompts_only,
                processing_class=tokenizer,
            )
        elif method == "supervised":
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=accuracy_reward,
                args=GRPOConfig(**group, **common),
                train_dataset=train_set,  # prompt + answer: the labelled ceiling
                processing_class=tokenizer,
            )
        else:
            raise ValueError(f"unknown method {method!r}")
        trainer.train()
        return [
            {k: v for k, v in entry.items() if isinstance(v, int | float)}
            for entry in trainer.state.log_history
            if "loss" in entry
        ]


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    import torch
    from transformers import set_seed

    from trl_entropy.evaluation import evaluate
    from trl_entropy.models import load_default_model
    from trl_entropy.tasks import ArithmeticTask

    task = ArithmeticTask(prompt_style="short")
    held_out = task.dataset(args.n_eval, split="test", seed=0)  # the same problems for every method and seed
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    set_seed(seed)
    model, tokenizer = load_default_model()
    log = []
    train_s = 0.0
    if method != "none":
        train_set = task.dataset(args.steps * args.prompts_per_step * args.num_generations, split="train", seed=seed)
        log = train(method, seed, args, model, tokenizer, train_set)
        train_s = time.perf_counter() - start_wall
    common = dict(max_new_tokens=args.max_tokens, batch_size=args.n_eval, progress=False)
    greedy = evaluate(model, tokenizer, held_out, do_sample=False, seed=None, **common)
    sampled = evaluate(model, tokenizer, held_out, do_sample=True, temperature=1.0, seed=1000 + seed, **common)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "method": method,
        "seed": seed,
        "greedy": greedy.to_dict(),
        "sampled": sampled.to_dict(),
        "greedy_correct": greedy.correct,
        "sampled_correct": sampled.correct,
        "train_s": train_s,
        "wall_s": time.perf_counter() - start_wall,
        "cpu_s": time.process_time() - start_cpu,
        "training_log": log,
    }


REPRO_STEPS, REPRO_EVAL = 2, 16


def repro_child(args: argparse.Namespace) -> None:
    """One short EM-RL token (GRPO) run; prints SHA-256 digests of the trained weights, the training log and the
    generated token ids as one JSON line."""
    import hashlib

    import torch
    from transformers import set_seed

    from trl_entropy.evaluation import generate_completions
    from trl_entropy.models import load_default_model
    from trl_entropy.tasks import ArithmeticTask

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    task = ArithmeticTask(prompt_style="short")
    short = argparse.Namespace(**{**vars(args), "steps": REPRO_STEPS})
    set_seed(0)
    model, tokenizer = load_default_model()
    before = digest(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    log = train("em_rl_token_grpo", 0, short, model, tokenizer, task.dataset(16, split="train", seed=0))
    weights = digest(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    prompts = list(task.dataset(REPRO_EVAL, split="test", seed=0)["prompt"])
    # Wall-clock entries (step_time, runtimes) differ from run to run by nature; everything else must not.
    log = [{k: v for k, v in entry.items() if "time" not in k and "per_second" not in k} for entry in log]
    out = {"weights_before": before, "weights_after": weights, "log": digest(json.dumps(log).encode())}
    for mode, sample in (("greedy", False), ("sampled", True)):
        completions = generate_completions(
            model, tokenizer, prompts, max_new_tokens=args.max_tokens, do_sample=sample, seed=1, progress=False
        )
        out[mode] = digest(json.dumps([c.token_ids for c in completions]).encode())
        out[f"{mode}_entropies"] = digest(json.dumps([c.token_entropies for c in completions]).encode())
    out["torch_threads"] = torch.get_num_threads()
    print("REPRO " + json.dumps(out), flush=True)


def check_reproducibility(args: argparse.Namespace) -> dict:
    import subprocess

    command = [sys.executable, __file__, "--repro-child", "--threads", str(args.threads)]
    command += ["--max-tokens", str(args.max_tokens), "--learning-rate", str(args.learning_rate)]
    command += ["--prompts-per-step", str(args.prompts_per_step), "--num-generations", str(args.num_generations)]
    digests = []
    for attempt in range(2):
        print(f"[{time.strftime('%H:%M:%S')}] reproducibility run {attempt + 1}/2", flush=True)
        text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        digests.append(json.loads(next(line for line in text.splitlines() if line.startswith("REPRO "))[6:]))
    keys = [k for k in digests[0] if k != "torch_threads"]
    return {
        "case": f"EM-RL token (GRPO), {REPRO_STEPS} steps, seed 0, then {REPRO_EVAL} held-out problems greedy and "
        "sampled (seed 1), in two fresh processes",
        "threads": args.threads,
        "identical": {k: digests[0][k] == digests[1][k] for k in keys},
        "bit_reproducible": all(digests[0][k] == digests[1][k] for k in keys),
        "digests": digests,
    }


def readme_rows(summary: dict) -> str:
    """Markdown rows for the README's "Measured results" table."""
    s = summary["settings"]

    def cell(row: dict, mode: str) -> str:
        acc, trunc = row[mode]["accuracy"], row[mode]["truncation_rate"]
        spread_text = f" +- {100 * acc['std']:.1f}" if acc["std"] is not None else ""
        return f"{100 * acc['mean']:.1f}%{spread_text} ({100 * trunc['mean']:.1f}%)"

    lines = [
        f"| `bench_label_free` ([JSON](benchmarks/results/bench_label_free.json)): every method {s['steps']} steps x "
        f"{s['completions_per_step']} completions at T=1, lr {s['learning_rate']:g}, then {s['n_eval']} held-out "
        f"a + b (short prompt), budget {s['max_tokens']} tokens; accuracy mean +- std over seeds (truncated) | "
        f"total CPU time {summary['total_cpu_s'] / 60:.1f} min |"
    ]
    for row in summary["rows"]:
        seeds = len(row["seeds"])
        lines.append(
            f"| &nbsp;&nbsp;{row['label']}, {seeds} seed{'s' * (seeds > 1)} | greedy {cell(row, 'greedy')}; "
            f"sampled {cell(row, 'sampled')} |"
        )
    return "\n".join(lines)


def load_cache(path: Path, settings: dict, fresh: bool) -> dict:
    if fresh or not path.is_file():
        return {}
    cached = json.loads(path.read_text())
    if cached.get("settings") != settings:
        raise SystemExit(
            f"{path} holds runs made with other settings ({cached.get('settings')}); rerun with --fresh to discard "
            "them, or with the same settings to resume."
        )
    return cached.get("runs", {})


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarize(runs: dict, settings: dict) -> dict:
    rows = []
    for method in (*MAIN_METHODS, *OTHER_METHODS):
        entries = sorted((r for r in runs.values() if r["method"] == method), key=lambda r: r["seed"])
        if not entries:
            continue
        row = {"method": method, "label": LABELS[method], "seeds": [r["seed"] for r in entries]}
        for mode in ("greedy", "sampled"):
            row[mode] = {
                "accuracy": spread([r[mode]["accuracy"] for r in entries]),
                "truncation_rate": spread([r[mode]["truncation_rate"] for r in entries]),
                "mean_completion_length": spread([r[mode]["mean_completion_length"] for r in entries]),
                "mean_token_entropy": spread([r[mode]["mean_token_entropy"] for r in entries]),
                "accuracy_ci95_per_seed": [r[mode]["accuracy_ci95"] for r in entries],
            }
        row["cpu_s"] = sum(r["cpu_s"] for r in entries)
        rows.append(row)
    return {"rows": rows, "total_cpu_s": sum(r["cpu_s"] for r in runs.values()), "settings": settings}


def flat_table(summary: dict) -> list[dict]:
    """One flat row per method (means and standard deviations over seeds), for docs/benchmarks.md."""
    out = []
    for row in summary["rows"]:
        flat = {"method": row["label"], "seeds": len(row["seeds"])}
        for mode in ("greedy", "sampled"):
            stats = row[mode]
            flat[f"{mode}_accuracy_mean"] = stats["accuracy"]["mean"]
            flat[f"{mode}_accuracy_std"] = stats["accuracy"]["std"]
            flat[f"{mode}_truncated"] = stats["truncation_rate"]["mean"]
            flat[f"{mode}_mean_length"] = stats["mean_completion_length"]["mean"]
            flat[f"{mode}_token_entropy"] = stats["mean_token_entropy"]["mean"]
        flat["cpu_s"] = row["cpu_s"]
        out.append(flat)
    return out


def table_rows(summary: dict) -> list[dict]:
    def fmt(stat: dict, pct: bool = True) -> str:
        scale, unit = (100, "%") if pct else (1, "")
        text = f"{scale * stat['mean']:.1f}{unit}"
        if stat["std"] is not None:
            text += f" +- {scale * stat['std']:.1f}"
        return text

    out = []
    for row in summary["rows"]:
        out.append(
            {
                "method": row["label"],
                "seeds": len(row["seeds"]),
                "greedy acc": fmt(row["greedy"]["accuracy"]),
                "greedy trunc": fmt(row["greedy"]["truncation_rate"]),
                "greedy len": fmt(row["greedy"]["mean_completion_length"], pct=False),
                "sampled acc": fmt(row["sampled"]["accuracy"]),
                "sampled trunc": fmt(row["sampled"]["truncation_rate"]),
                "sampled len": fmt(row["sampled"]["mean_completion_length"], pct=False),
            }
        )
    return out


def plot(summary: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for offset, mode, colour in ((-0.17, "greedy", "tab:blue"), (0.17, "sampled", "tab:orange")):
        for i, row in enumerate(rows):
            stat = row[mode]["accuracy"]
            x = i + offset
            ax.bar(x, stat["mean"], width=0.3, color=colour, alpha=0.35, label=mode if i == 0 else None)
            ax.scatter([x] * len(stat["values"]), stat["values"], color=colour, s=14, zorder=3)
            if stat["std"] is not None:
                ax.errorbar(x, stat["mean"], yerr=stat["std"], color="black", capsize=3, lw=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        [f"{r['label']}\n({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)})" for r in rows],
        fontsize=7,
        rotation=20,
        ha="right",
    )
    s = summary["settings"]
    ax.set_ylabel(f"held-out accuracy (n = {s['n_eval']})")
    ax.set_title(
        f"SmolLM2-135M-Instruct, {s['steps']} steps x {s['completions_per_step']} completions, lr "
        f"{s['learning_rate']:g}, budget {s['max_tokens']} tokens\n(bars: mean over seeds; dots: one seed each; "
        "black: +- 1 standard deviation)",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.repro_child:
        repro_child(args)
        return
    settings = settings_of(args)
    path = RESULTS_DIR / f"{NAME}.json"
    runs = load_cache(path, settings, args.fresh)
    previous = json.loads(path.read_text()) if path.is_file() and runs else {}
    reproducibility = previous.get("reproducibility")
    # Keys this script does not write (e.g. a recorded pilot run) are kept as they are.
    written = ("settings", "table", "stats", "summary", "runs", "plot", "reproducibility")
    kept = {k: v for k, v in previous.items() if k not in written}
    methods = args.methods or [*MAIN_METHODS, *OTHER_METHODS]
    unknown = set(methods) - set(LABELS)
    if unknown:
        raise SystemExit(f"--methods must be among {sorted(LABELS)}, got {sorted(unknown)}")
    # Order: one seed of every method first, so an interrupted run still covers every method.
    plan = []
    for seed in range(max(args.seeds, args.other_seeds)):
        for method in methods:
            if seed < (args.seeds if method in MAIN_METHODS else args.other_seeds):
                plan.append((method, seed))

    def save() -> dict:
        summary = summarize(runs, settings)
        png = plot(summary, RESULTS_DIR / f"{NAME}.png") if runs else None
        payload = {"settings": settings, "table": flat_table(summary), "stats": summary, "runs": runs, **kept}
        if reproducibility is not None:
            payload["reproducibility"] = reproducibility
        if png:
            payload["plot"] = str(png.relative_to(RESULTS_DIR.parent.parent))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written cache
        return summary

    failures: dict[str, str] = {}
    if not args.summarize_only:
        for method, seed in plan:
            key = f"{method}/{seed}"
            if key in runs:
                print(f"[cached] {key}", flush=True)
                continue
            print(f"[{time.strftime('%H:%M:%S')}] running {key}", flush=True)
            try:
                r = run_one(method, seed, args)
            except Exception as err:  # one failing method must not lose the others; it is retried on rerun
                traceback.print_exc()
                failures[key] = f"{type(err).__name__}: {err}"
                continue
            runs[key] = r
            print(
                f"[{time.strftime('%H:%M:%S')}] {key}: greedy {r['greedy']['accuracy']:.3f} "
                f"(trunc {r['greedy']['truncation_rate']:.3f}), sampled {r['sampled']['accuracy']:.3f} "
                f"(trunc {r['sampled']['truncation_rate']:.3f}); train {r['train_s']:.0f} s, "
                f"wall {r['wall_s']:.0f} s, cpu {r['cpu_s']:.0f} s",
                flush=True,
            )
            save()
    if args.check_reproducibility:
        reproducibility = check_reproducibility(args)
        print(json.dumps(reproducibility, indent=2), flush=True)
    summary = save()
    if args.readme:
        print(readme_rows(summary))
    print_table(table_rows(summary), list(table_rows(summary)[0]) if summary["rows"] else [])
    print(f"total CPU time {summary['total_cpu_s'] / 60:.1f} min")
    for key, error in failures.items():
        print(f"FAILED {key}: {error}")


if __name__ == "__main__":
    main()
