"""EM-INF on the embedded SmolLM2-135M-Instruct: decode throughput cost, and accuracy vs generated-token cost on
held-out arithmetic problems next to greedy, plain sampling, the adaptive-temperature baseline and self-consistency@4.

1. Throughput: the same batch of prompts decoded greedily for a fixed number of tokens (EOS suppressed), without
   EM-INF, with EM-INF at the released script's settings (threshold 0.3, 3 Adam steps, lr 0.1, KL 0.05) and with
   EM-INF forced on every row and step (threshold 0), interleaved over repeats; medians reported.
2. Accuracy: ``ArithmeticTask(prompt_style="short").dataset(n, "test")`` ("What is a + b?", 1 <= a, b <= 20, two
   worked examples before the question) at a budget where the answers finish (32 tokens: 100% of greedy and 98.4% of
   T=1 base answers finish within it), graded with math-verify; 95% Wilson intervals; token cost = generated tokens
   per problem, all samples counted (EOS included); truncated = fraction of completions cut off at the budget. An
   earlier version used the open prompt at 40 tokens, where 86% of greedy answers were cut off, so it compared
   cut-off answers.

The paper (Agarwal et al., 2025) reports EM-INF matching or beating self-consistency at about a third of its compute.

    python benchmarks/bench_eminf.py [--n 64] [--max-new-tokens 32] [--batch-size 32] [--threads 2]

With ``--skip-throughput`` the throughput section of the previous results file is kept as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, median, print_table, write_results  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="held-out problems for the accuracy table")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion budget (answers finish within 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--throughput-batch", type=int, default=16, help="prompts in the throughput batch")
    parser.add_argument("--throughput-tokens", type=int, default=24, help="decoded tokens per throughput run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved throughput repeats")
    parser.add_argument(
        "--temperature", type=float, default=0.6, help="temperature of plain sampling and self-consistency"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    return parser.parse_args()


def throughput(model, tokenizer, prompts, args) -> dict:
    import torch
    from transformers import LogitsProcessorList

    from trl_entropy.decoding.processors import EMInfLogitsProcessor

    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    n_tokens = args.throughput_tokens
    variants = {
        "plain": lambda: [],
        "em_inf": lambda: [EMInfLogitsProcessor(track_stats=True)],
        "em_inf_always_on": lambda: [EMInfLogitsProcessor(threshold=0.0, track_stats=True)],
    }
    seconds = {name: [] for name in variants}
    stats = {}

    def run(name):
        processors = variants[name]()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,  # same work for every variant: no early EOS
                do_sample=False,
                logits_processor=LogitsProcessorList(processors),
                pad_token_id=tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - start
        assert out.size(1) - inputs["input_ids"].size(1) == n_tokens
        if processors:
            stats[name] = processors[0].stats
        return elapsed

    for name in variants:  # warm-up
        run(name)
    for repeat in range(args.repeats):
        for name in variants:  # interleaved
            seconds[name].append(run(name))
            print(f"  throughput repeat {repeat + 1}/{args.repeats} {name}: {seconds[name][-1]:.2f} s", flush=True)

    # The processor alone on one step's logits, for scale.
    logits = model(**inputs).logits[:, -1].float()
    proc_ms = {}
    for name, threshold in (("em_inf", 0.3), ("em_inf_always_on", 0.0)):
        processor = EMInfLogitsProcessor(threshold=threshold)
        processor(None, logits)  # warm-up
        times = []
        for _ in range(10):
            start = time.perf_counter()
            processor(None, logits)
            times.append(time.perf_counter() - start)
        proc_ms[name] = 1e3 * median(times)

    generated = len(prompts) * n_tokens
    rows = []
    for name in variants:
        t = median(seconds[name])
        rows.append(
            {
                "variant": name,
                "median_s": t,
                "tokens_per_s": generated / t,
                "throughput_ratio": median(seconds["plain"]) / t,
                "processor_ms_per_step": proc_ms.get(name, 0.0),
                "fraction_rows_optimised": stats.get(name, {}).get("fraction_rows_optimised", 0.0),
                "mean_steps_per_row": stats.get(name, {}).get("mean_steps_per_row", 0.0),
            }
        )
    return {
        "batch": len(prompts),
        "decoded_tokens_per_sequence": n_tokens,
        "repeats": args.repeats,
        "seconds": seconds,
        "rows": rows,
        "em_inf_stats": stats,
    }


def accuracy_table(model, tokenizer, args) -> dict:
    from trl_entropy.decoding.processors import AdaptiveTemperatureLogitsProcessor, EMInfLogitsProcessor
    from trl_entropy.evaluation.generate import generate_completions, render_prompt, score_completions
    from trl_entropy.evaluation.tasks import ArithmeticTask, extract_answer, grade

    data = ArithmeticTask(prompt_style="short").dataset(args.n, "test", seed=args.seed)
    prompts = [render_prompt(tokenizer, p) for p in data["prompt"]]
    answers = list(data["answer"])
    t = args.temperature
    methods = [
        # name, decoding description, generate kwargs, processor factory
        ("greedy", "greedy", dict(do_sample=False), None),
        (f"sampling T={t:g}", f"sample T={t:g}", dict(do_sample=True, temperature=t), None),
        ("EM-INF + greedy", "EM-INF, greedy", dict(do_sample=False), EMInfLogitsProcessor),
        (
            "EM-INF + T=0.1",
            "EM-INF, sample T=0.1 (released)",
            dict(do_sample=True, temperature=0.1),
            EMInfLogitsProcessor,
        ),
        (
            "adaptive temp.",
            "adaptive T (alpha 0.5), sample",
            dict(do_sample=True, temperature=1.0),
            AdaptiveTemperatureLogitsProcessor,
        ),
        (
            f"SC@4 T={t:g}",
            f"4 samples T={t:g}, majority vote",
            dict(do_sample=True, temperature=t, num_samples=4),
            None,
        ),
    ]
    rows, per_problem = [], {}
    for name, decoding, kwargs, factory in methods:
        processors = [factory()] if factory else []
        start = time.perf_counter()
        completions = generate_completions(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            logits_processors=processors,
            seed=args.seed,
            desc=name,
            **kwargs,
        )
        seconds = time.perf_counter() - start
        records, summary = score_completions(completions, answers, parse_answer=extract_answer, is_correct=grade)
        per_problem[name] = [bool(r["correct"]) for r in records]
        low, high = summary["accuracy_ci95"]
        rows.append(
            {
                "method": name,
                "decoding": decoding,
                "n": summary["num_problems"],
                "accuracy": summary["accuracy"],
                "ci95_low": low,
                "ci95_high": high,
                "tokens_per_problem": summary["mean_generated_tokens_per_problem"],
                "answer_rate": summary["answer_rate"],
                # Completions cut off at the budget (no EOS within it): their answer may be missing.
                "truncated": summary["truncation_rate"],
                "mean_completion_length": summary["mean_completion_length"],
                "seconds": seconds,
            }
        )
        print(
            f"  {name}: accuracy {summary['accuracy']:.3f} [{low:.3f}, {high:.3f}], "
            f"{summary['mean_generated_tokens_per_problem']:.1f} tokens/problem, {seconds:.1f} s",
            flush=True,
        )
    sc_name = methods[-1][0]
    sc = next(r for r in rows if r["method"] == sc_name)
    for r in rows:
        r["token_cost_vs_sc4"] = r["tokens_per_problem"] / sc["tokens_per_problem"]
    em = next(r for r in rows if r["method"] == "EM-INF + T=0.1")
    em_correct, sc_correct = per_problem["EM-INF + T=0.1"], per_problem[sc_name]
    claim = {
        "em_inf_accuracy": em["accuracy"],
        "sc4_accuracy": sc["accuracy"],
        "em_inf_token_cost_vs_sc4": em["token_cost_vs_sc4"],
        "em_inf_matches_or_beats_sc4": em["accuracy"] >= sc["accuracy"],
        "em_inf_within_a_third_of_sc4_tokens": em["token_cost_vs_sc4"] <= 1 / 3,
        "paired_em_inf_only_correct": sum(e and not s for e, s in zip(em_correct, sc_correct)),
        "paired_sc4_only_correct": sum(s and not e for e, s in zip(em_correct, sc_correct)),
    }
    return {
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "prompt_style": "short",
        "sampling_temperature": args.temperature,
        "seed": args.seed,
        "rows": rows,
        "claim": claim,
    }


def plot(accuracy: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = ["o", "s", "D", "^", "v", "P", "X"]
    # Methods can land on the same point (EM-INF + greedy decodes exactly like greedy when no step is optimised):
    # later points are drawn smaller and filled, earlier ones larger and hollow, so every method stays visible.
    rows = accuracy["rows"]

    def same_point(a: dict, b: dict) -> bool:
        return (
            abs(a["accuracy"] - b["accuracy"]) < 1e-9 and abs(a["tokens_per_problem"] - b["tokens_per_problem"]) < 0.5
        )

    for i, r in enumerate(rows):
        err = [[r["accuracy"] - r["ci95_low"]], [r["ci95_high"] - r["accuracy"]]]
        twins = [other["method"] for other in rows[:i] if same_point(other, r)]
        earlier = len(twins)
        later = any(same_point(other, r) for other in rows[i + 1 :])
        ax.errorbar(
            r["tokens_per_problem"],
            r["accuracy"],
            yerr=err,
            fmt=markers[i % len(markers)],
            markersize=max(3, 11 - 4 * earlier),
            markerfacecolor="none" if later else None,  # hollow, so the point drawn on top of it shows through
            capsize=3,
            label=r["method"] + (f" (same point as {', '.join(twins)})" if twins else ""),
        )
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel(f"accuracy (n = {accuracy['n']}, 95% Wilson CI)")
    ax.set_title(
        f"SmolLM2-135M-Instruct, held-out 'What is a + b?', budget {accuracy['max_new_tokens']} tokens",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from trl_entropy.evaluation.generate import render_prompt
    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.models import load_default_model

    started = time.perf_counter()
    model, tokenizer = load_default_model()
    model.eval()
    payload = {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "threads": args.threads,
        "em_inf_settings": {"threshold": 0.3, "steps": 3, "lr": 0.1, "kl_weight": 0.05, "optimizer": "adam"},
    }
    previous = RESULTS_DIR / "bench_eminf.json"
    if args.skip_throughput and previous.is_file():
        kept = json.loads(previous.read_text()).get("throughput")
        if kept is not None:
            payload["throughput"] = {**kept, "note": "kept from the previous run (--skip-throughput)"}
    if not args.skip_throughput:
        prompts = [
            render_prompt(tokenizer, p) for p in ArithmeticTask().dataset(args.throughput_batch, "test")["prompt"]
        ]
        print("throughput (greedy, fixed length, interleaved):", flush=True)
        payload["throughput"] = throughput(model, tokenizer, prompts, args)
        print_table(
            payload["throughput"]["rows"],
            [
                "variant",
                "median_s",
                "tokens_per_s",
                "throughput_ratio",
                "processor_ms_per_step",
                "fraction_rows_optimised",
                "mean_steps_per_row",
            ],
        )
    if not args.skip_accuracy:
        print(f"accuracy on {args.n} held-out problems, max_new_tokens={args.max_new_tokens}:", flush=True)
        payload["accuracy"] = accuracy_table(model, tokenizer, args)
        print_table(
            payload["accuracy"]["rows"],
            [
                "method",
                "decoding",
                "n",
                "accuracy",
                "ci95_low",
                "ci95_high",
                "tokens_per_problem",
                "token_cost_vs_sc4",
                "answer_rate",
                "truncated",
                "mean_completion_length",
                "seconds",
            ],
        )
        png = plot(payload["accuracy"], RESULTS_DIR / "bench_eminf.png")
        if png:
            payload["plot"] = str(png.relative_to(RESULTS_DIR.parent.parent))
    payload["total_seconds"] = time.perf_counter() - started
    write_results("bench_eminf", payload)


if __name__ == "__main__":
    main()
