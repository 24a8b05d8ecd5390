"""Evaluation that decodes each token once, against the procedure it replaces, on the same problems in one run.

Two measurements on the embedded SmolLM2-135M-Instruct, each timed for today's procedure and the new one in turn
(old, new, old, new: the same machine state for both):

- the study's base-model evaluation in the open regime (``benchmarks/bench_label_free.py``): the 128 held-out
  problems, greedy and sampled at T=1 (sampling seed 1000), at the first budget of the ladder 96 -> 256 -> 512 where at
  most 5% of the answers are cut off. Old: what the committed study did, :func:`trl_entropy.evaluation.evaluate` at
  each budget from scratch with one ``generate`` call per batch (``segment_tokens=None``), the sampling seed set
  again at each rung. New: :func:`trl_entropy.evaluation.evaluate_ladder` (a rung continues the cut-off answers from
  their KV cache; ended rows are dropped and the rest merged into full batches every 32 tokens).
- ``trl-entropy diagnose``'s defaults: 64 prompts of the open regime's training pool (as ``bench_diagnose.py``), 1
  greedy + 4 samples each at T=1, 256 tokens, batches of 64. Old: :func:`trl_entropy.evaluation.diagnose.diagnose` with
  ``segment_tokens=None`` (one ``generate`` call per batch, as before); new: its defaults.

Greedy completions must be the same tokens in both (the committed study's greedy numbers must not move): the JSON
records whether they are, per problem. Sampled ones are a draw from the same distribution, not the same draw: their
summaries are recorded side by side. Targets (2 cores, alone): study evaluation <= 1/3 of the old time; ``diagnose``
<= 180 s and <= 1/2 of the old time.

    python benchmarks/bench_eval_speed.py --threads 2           # the full measurement (about 1 h on 2 busy cores)
    python benchmarks/bench_eval_speed.py --quick --threads 1   # 16 problems, ladder 32 -> 64 -> 128, 8 prompts
    python benchmarks/bench_eval_speed.py --only diagnose --diagnose-prompts 16   # one part, smaller

A quick or partial run (``--quick``, ``--only``) writes ``bench_eval_speed_partial.json``; only the full run writes
``bench_eval_speed.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_free as study  # noqa: E402
from _common import print_table, write_results  # noqa: E402

NAME = "bench_eval_speed"
MAX_TRUNCATED = study.PROTOCOL["max_truncation_rate"]
FULL = {"problems": 128, "budgets": [96, 256, 512], "diagnose_prompts": 64, "diagnose_tokens": 256}
QUICK = {"problems": 16, "budgets": [32, 64, 128], "diagnose_prompts": 8, "diagnose_tokens": 64}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few problems and a short ladder (a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 cores)")
    parser.add_argument("--only", choices=("study", "diagnose"), default=None, help="time one of the two only")
    parser.add_argument("--diagnose-prompts", type=int, default=None, help="override the number of diagnose prompts")
    parser.add_argument("--diagnose-tokens", type=int, default=None, help="override diagnose's token budget")
    return parser.parse_args()


def old_ladder(model, tokenizer, problems, budgets, do_sample: bool):
    """The committed study's procedure: evaluate at each budget from scratch until at most 5% are cut off."""
    from trl_entropy.evaluation import evaluate

    results = []
    for budget in budgets:
        results.append(
            evaluate(
                model,
                tokenizer,
                problems,
                max_new_tokens=budget,
                do_sample=do_sample,
                temperature=study.PROTOCOL["temperature"],
                seed=1000 if do_sample else None,
                batch_size=study.PROTOCOL["eval_batch_size"],
                progress=False,
                segment_tokens=None,
            )
        )
        if results[-1].truncation_rate <= MAX_TRUNCATED:
            break
    return results


def new_ladder(model, tokenizer, problems, budgets, do_sample: bool):
    from trl_entropy.evaluation import evaluate_ladder

    return evaluate_ladder(
        model,
        tokenizer,
        problems,
        budgets=budgets,
        max_truncated=MAX_TRUNCATED,
        do_sample=do_sample,
        temperature=study.PROTOCOL["temperature"],
        seed=1000 if do_sample else None,
        batch_size=study.PROTOCOL["eval_batch_size"],
        progress=False,
    )


def ladder_record(results, seconds: float) -> dict:
    final = results[-1]
    return {
        "seconds": seconds,
        "budget": final.max_new_tokens,
        "rungs": [r.max_new_tokens for r in results],
        "accuracy": final.accuracy,
        "truncation_rate": final.truncation_rate,
        "mean_length": final.mean_length,
        "mean_token_entropy": final.mean_entropy,
        "generated_tokens": sum(c.num_tokens for c in final.completions),
    }


def run_diagnose(model, tokenizer, rows, max_new_tokens: int, segment_tokens: int | None) -> tuple[dict, float]:
    from trl_entropy.cli.diagnose import parse_answer
    from trl_entropy.evaluation.diagnose import diagnose
    from trl_entropy.evaluation.tasks import grade

    start = time.perf_counter()
    result = diagnose(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        [r["answer"] for r in rows],
        parse_answer=parse_answer,
        is_correct=grade,
        max_new_tokens=max_new_tokens,
        progress=False,
        segment_tokens=segment_tokens,
    )
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import torch

    from trl_entropy.hardware import machine_record
    from trl_entropy.models import load_default_model

    torch.set_num_threads(args.threads)
    size = dict(QUICK if args.quick else FULL)
    for key in ("diagnose_prompts", "diagnose_tokens"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    held_out, pool = study.problem_split("open")
    problems = held_out[: size["problems"]]
    model, tokenizer = load_default_model()
    model.eval()
    study_runs, rows = {}, []
    payload = {
        "quick": args.quick,
        "machine": machine_record(),
        "settings": {**size, "eval_batch_size": study.PROTOCOL["eval_batch_size"], "max_truncated": MAX_TRUNCATED},
    }
    for mode in ("greedy", "sampled") if args.only != "diagnose" else ():
        do_sample = mode == "sampled"
        runs = {}
        for name, procedure in (("old", old_ladder), ("new", new_ladder)):
            start = time.perf_counter()
            results = procedure(model, tokenizer, problems, size["budgets"], do_sample)
            runs[name] = (results, time.perf_counter() - start)
            print(f"[{time.strftime('%H:%M:%S')}] study {mode} {name}: {runs[name][1]:.1f} s", flush=True)
        record = {name: ladder_record(*runs[name]) for name in runs}
        old_final, new_final = runs["old"][0][-1].completions, runs["new"][0][-1].completions
        same = [a.token_ids == b.token_ids for a, b in zip(old_final, new_final)]
        record["same_tokens"] = sum(same)
        record["all_same_tokens"] = all(same) and len(old_final) == len(new_final)
        record["different_problems"] = [i for i, s in enumerate(same) if not s]
        record["time_ratio"] = record["new"]["seconds"] / record["old"]["seconds"]
        study_runs[mode] = record
        rows.append({"what": f"study {mode}", **_row(record, greedy=not do_sample)})
    if study_runs:
        old_total = sum(study_runs[m]["old"]["seconds"] for m in study_runs)
        new_total = sum(study_runs[m]["new"]["seconds"] for m in study_runs)
        payload["study_evaluation"] = {
            **study_runs,
            "old_seconds": old_total,
            "new_seconds": new_total,
            "time_ratio": new_total / old_total,
            "target_ratio": 1 / 3,
            "greedy_tokens_equal": study_runs["greedy"]["all_same_tokens"],
        }
    if args.only != "study":
        diagnose_rows = pool[: size["diagnose_prompts"]]
        runs = {}
        for name, segment in (("old", None), ("new", 32)):
            runs[name] = run_diagnose(model, tokenizer, diagnose_rows, size["diagnose_tokens"], segment)
            print(f"[{time.strftime('%H:%M:%S')}] diagnose {name}: {runs[name][1]:.1f} s", flush=True)
        record = {
            name: {
                "seconds": seconds,
                "greedy_accuracy": result["greedy"]["accuracy"],
                "sampled_accuracy": result["sampled"]["accuracy"],
                "sampled_truncation_rate": result["sampled"]["truncation_rate"],
                "verdict": result["verdict"]["verdict"],
            }
            for name, (result, seconds) in runs.items()
        }
        old_greedy, new_greedy = (
            [(text, p["greedy_length"]) for text, p in zip(runs[n][0]["greedy_texts"], runs[n][0]["per_prompt"])]
            for n in ("old", "new")
        )
        record["greedy_same_texts"] = sum(a == b for a, b in zip(old_greedy, new_greedy))
        record["greedy_all_same"] = old_greedy == new_greedy
        record["time_ratio"] = record["new"]["seconds"] / record["old"]["seconds"]
        record["target_ratio"], record["target_seconds"] = 1 / 2, 180
        payload["diagnose"] = record
        rows.append({"what": "diagnose", **_row(record, greedy=True)})
    print_table(rows, ["what", "old_s", "new_s", "ratio", "greedy_same"])
    partial = args.quick or args.only or args.diagnose_prompts or args.diagnose_tokens
    write_results(NAME + ("_partial" if partial else ""), payload)


def _row(record: dict, greedy: bool) -> dict:
    """A table row; ``greedy_same``: whether the greedy completions are the same tokens ("-" for sampled ones)."""
    same = record.get("all_same_tokens", record.get("greedy_all_same")) if greedy else "-"
    return {
        "old_s": record["old"]["seconds"],
        "new_s": record["new"]["seconds"],
        "ratio": record["time_ratio"],
        "greedy_same": same,
    }


if __name__ == "__main__":
    main()
