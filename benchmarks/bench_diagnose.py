"""`trl-entropy diagnose` against the measured outcome of label-free training: does its verdict agree?

For every setting of ``benchmarks/bench_label_free.py`` (the ``open`` and ``short`` prompt regimes, 3 seeds each, and
the ``open_2digit`` task variant, 1 seed, added to check the rule on a setting its thresholds were not chosen on),
:func:`trl_entropy.evaluation.diagnose.diagnose` runs on the untrained embedded SmolLM2-135M-Instruct with its
defaults (64
prompts of the setting's training pool, 4 samples each at T=1, 256 tokens), before any training, and its verdict is
set beside the study's outcome of EM-RL token (GRPO) in that setting:

"helped", "hurt" or "no clear effect" as the study's :func:`bench_label_free.effect` reads its paired comparisons with
no training (helped: both mean changes over seeds positive and at least one seed's 95% paired interval above 0).

The verdict agrees when "likely to help" meets "helped", or "unlikely to help" meets "hurt" / "no clear effect". The
table goes to ``docs/diagnose.md`` (``--write-docs``), whatever it shows. Each diagnosis is timed (the command's
5-minute target for 64 prompts on 2 cores); one process, ``--threads`` torch threads.

    python benchmarks/bench_diagnose.py [--threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_free as study  # noqa: E402
from _common import RESULTS_DIR, print_table, write_results  # noqa: E402

NAME = "bench_diagnose"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "diagnose.md"
BEGIN, END = "<!-- bench_diagnose table: begin -->", "<!-- bench_diagnose table: end -->"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/diagnose.md")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild from the cached diagnoses")
    return parser.parse_args()


def outcome(row: dict | None) -> tuple[str, dict]:
    """The study's outcome of EM-RL token in a setting (:func:`bench_label_free.effect` of its paired comparisons with
    no training), with the numbers behind it."""
    if row is None:
        return "not measured", {}
    numbers = {"seeds": len(row["seeds"])}
    for mode in ("greedy", "sampled"):
        paired = row[mode]["paired_vs_none"]
        numbers[f"{mode}_change_mean"] = statistics.fmean(p["change"] for p in paired) if paired else None
        numbers[f"{mode}_seeds_up"], numbers[f"{mode}_seeds_down"] = study.seeds_up_down(paired)
    return study.effect(row["greedy"]["paired_vs_none"], row["sampled"]["paired_vs_none"]), numbers


def agrees(verdict: str, result: str) -> bool | None:
    if result == "not measured" or verdict in ("uncertain", "no verdict without answers"):
        return None
    return (verdict == "likely to help") == (result == "helped")


def diagnose_setting(regime: str, args: argparse.Namespace) -> dict:
    from trl_entropy.cli.diagnose import parse_answer
    from trl_entropy.evaluation.diagnose import diagnose
    from trl_entropy.evaluation.tasks import grade
    from trl_entropy.models import load_default_model

    _, pool = study.problem_split(regime)
    rows = study.problems(regime, pool[: args.num_prompts])
    model, tokenizer = load_default_model()
    model.eval()
    start = time.perf_counter()
    result = diagnose(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        [r["answer"] for r in rows],
        parse_answer=parse_answer,
        is_correct=grade,
    )
    result["seconds"] = time.perf_counter() - start
    result["torch_threads"] = args.threads
    return result


def markdown(table: list[dict]) -> str:
    lines = [
        "| Setting | Verdict (before training) | Greedy - sampled | Confidence AUROC [95% CI] | Diagnosis time | "
        "EM-RL token outcome (study) | Greedy / sampled change, mean over seeds (seeds up / down) | Agrees |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def change(numbers: dict, mode: str) -> str:
        mean = numbers.get(f"{mode}_change_mean")
        if mean is None:
            return "-"
        return f"{100 * mean:+.1f} ({numbers[f'{mode}_seeds_up']}/{numbers[f'{mode}_seeds_down']})"

    for row in table:
        n = row["outcome_numbers"]
        seeds = f"{n.get('seeds', 0)} seed" + ("s" if n.get("seeds", 0) != 1 else "")
        auroc = row["confidence_auroc"]
        low, high = row["confidence_auroc_ci95"]
        agreement = {True: "yes", False: "**no**", None: "-"}[row["agrees"]]
        lines.append(
            f"| {row['setting']} | {row['verdict']} | {100 * row['greedy_minus_sampled']:+.1f} | {auroc:.2f} "
            f"[{low:.2f}, {high:.2f}] | {row['seconds']:.0f} s | {row['outcome']} ({seeds}) | "
            f"{change(n, 'greedy')} / {change(n, 'sampled')} | {agreement} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    cache = RESULTS_DIR / NAME
    cache.mkdir(parents=True, exist_ok=True)
    summary = json.loads((RESULTS_DIR / "bench_label_free.json").read_text())["summary"]
    rows = {(r["regime"], r["method"]): r for r in summary["rows"]}
    table, diagnoses = [], {}
    for regime in study.REGIMES:
        path = cache / f"{regime}.json"
        if path.is_file():
            result = json.loads(path.read_text())
        elif args.summarize_only:
            continue
        else:
            print(f"[{time.strftime('%H:%M:%S')}] diagnose {regime}", flush=True)
            result = diagnose_setting(regime, args)
            path.write_text(json.dumps({k: v for k, v in result.items() if k != "per_sample"}, indent=1) + "\n")
        diagnoses[regime] = result
        verdict = result["verdict"]
        label, numbers = outcome(rows.get((regime, "em_rl_token")))
        style, low, high = study.REGIME_TASKS[regime]
        table.append(
            {
                "setting": f"{regime} (prompt {style}, a + b with {low} <= a, b <= {high})",
                "verdict": verdict["verdict"],
                "greedy_minus_sampled": verdict["numbers"]["greedy_minus_sampled"],
                "confidence_auroc": verdict["numbers"]["confidence_auroc"],
                "confidence_auroc_ci95": verdict["numbers"]["confidence_auroc_ci95"],
                "greedy_accuracy": result["greedy"]["accuracy"],
                "sampled_accuracy": result["sampled"]["accuracy"],
                "sampled_truncation": result["sampled"]["truncation_rate"],
                "seconds": result["seconds"],
                "outcome": label,
                "outcome_numbers": numbers,
                "agrees": agrees(verdict["verdict"], label),
            }
        )
    payload = {
        "table": table,
        "rule": next(iter(diagnoses.values()))["verdict"]["rule"] if diagnoses else None,
        "settings": {"num_prompts": args.num_prompts, "threads": args.threads, "cpus": os.cpu_count()},
        "diagnoses": diagnoses,
    }
    write_results(NAME, payload)
    print_table(table, ["setting", "verdict", "greedy_minus_sampled", "confidence_auroc", "outcome", "agrees"])
    if args.write_docs:
        text = DOCS.read_text(encoding="utf-8")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOCS.write_text(f"{head}{BEGIN}\n{markdown(table)}\n{END}{tail}", encoding="utf-8")
        print(f"wrote the table into {DOCS}")


if __name__ == "__main__":
    main()
