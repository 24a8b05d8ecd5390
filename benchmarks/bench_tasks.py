"""Base accuracy of the built-in tasks (``trl_entropy.evaluation.tasks.TASKS``) on the offline models, greedy, one
torch thread.

Each task's held-out split (``seed``), one greedy completion per problem through the public
:func:`trl_entropy.evaluation.evaluate`, at a budget where answers finish (the truncation rate says whether they did):
accuracy with its 95% Wilson interval, truncation rate, mean length and wall time. Writes
``benchmarks/results/bench_tasks.json`` (merged with earlier runs: one entry per model x task x prompt style).

    python benchmarks/bench_tasks.py --models smollm2 gemma3-270m --styles short --n 64 --budget 48
    python benchmarks/bench_tasks.py --models smollm2 --styles open --n 32 --budget 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table, write_results  # noqa: E402

EXAMPLES_PATH = RESULTS_DIR / "bench_tasks" / "examples.json"

from trl_entropy.evaluation import evaluate  # noqa: E402
from trl_entropy.evaluation.tasks import TASKS, build_task  # noqa: E402
from trl_entropy.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--styles", nargs="+", default=["short"], choices=["open", "short"])
    parser.add_argument("--n", type=int, default=64, help="held-out problems per task")
    parser.add_argument("--budget", type=int, default=48, help="max_new_tokens")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = RESULTS_DIR / "bench_tasks.json"
    saved = json.loads(path.read_text())["rows"] if path.is_file() else []
    examples = json.loads(EXAMPLES_PATH.read_text()) if EXAMPLES_PATH.is_file() else {}
    previous = [
        {**r, "examples": examples.get(f"{r['model']} / {r['task']} / {r['prompt_style']}", [])} for r in saved
    ]
    rows = []
    for model_name in args.models:
        start = time.perf_counter()
        model, tokenizer = load_model(model_name)
        load_s = time.perf_counter() - start
        for style in args.styles:
            for task_name in args.tasks:
                problems = build_task(task_name, prompt_style=style).dataset(args.n, split="test", seed=args.seed)
                start = time.perf_counter()
                result = evaluate(
                    model, tokenizer, problems, max_new_tokens=args.budget, batch_size=args.batch_size, progress=False
                )
                low, high = result.accuracy_interval()
                row = {
                    "model": model_name,
                    "task": task_name,
                    "prompt_style": style,
                    "n": result.num_problems,
                    "correct": result.num_correct,
                    "accuracy": result.accuracy,
                    "accuracy_ci95": [low, high],
                    "budget": args.budget,
                    "truncation_rate": result.truncation_rate,
                    "mean_length": result.mean_length,
                    "eval_s": time.perf_counter() - start,
                    "model_load_s": load_s,
                    "seed": args.seed,
                    "examples": [
                        {"question": q, "answer": a, "greedy": c.text}
                        for q, a, c in list(zip(problems["question"], problems["answer"], result.completions))[:3]
                    ],
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        del model
    keys = {(r["model"], r["task"], r["prompt_style"]) for r in rows}
    merged = [r for r in previous if (r["model"], r["task"], r["prompt_style"]) not in keys] + rows
    merged.sort(key=lambda r: (r["model"], r["prompt_style"], r["task"]))
    write_results(
        "bench_tasks",
        {
            "protocol": "greedy, one completion per held-out problem, trl_entropy.evaluation.evaluate, "
            f"{args.threads} torch thread(s), float32",
            "rows": [{k: v for k, v in r.items() if k != "examples"} for r in merged],
        },
    )
    # The first answers of each setting, beside the results (their texts hold numbers that are no measurement).
    EXAMPLES_PATH.parent.mkdir(parents=True, exist_ok=True)
    EXAMPLES_PATH.write_text(
        json.dumps({f"{r['model']} / {r['task']} / {r['prompt_style']}": r["examples"] for r in merged}, indent=1)
        + "\n"
    )
    print_table(
        [
            {
                **r,
                "accuracy": f"{r['accuracy']:.1%} [{r['accuracy_ci95'][0]:.1%}, {r['accuracy_ci95'][1]:.1%}]",
                "truncated": f"{r['truncation_rate']:.1%}",
            }
            for r in merged
        ],
        ["model", "task", "prompt_style", "n", "budget", "accuracy", "truncated", "mean_length", "eval_s"],
    )


if __name__ == "__main__":
    main()
