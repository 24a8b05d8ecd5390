"""Does `trl-entropy diagnose` predict, out of sample, whether label-free training helps? Eight settings, two rules.

A setting is a task x prompt style x model of ``benchmarks/bench_label_free.py`` (``SETTINGS``: "a + b" with the
question alone or two worked examples first, two-digit operands, subtraction, two-step word problems, on the embedded
SmolLM2-135M-Instruct, and "a + b" on Gemma 3 270M). For each one, on the untrained model, before any training:

- **static** quantities: :func:`trl_entropy.evaluation.diagnose.diagnose` with its defaults (64 prompts of the
  setting's training pool, 1 greedy + 4 samples at T=1, 256 tokens): greedy minus sampled accuracy and the AUROC of
  minus sequence entropy for correctness, and today's verdict (its fixed thresholds);
- a **probe** (:func:`trl_entropy.trainers.probe.training_probe`), in the spirit of Model Collapse Step (arXiv
  2603.08660): 8 steps of EM-RL token under the study's
  protocol (2 prompts x 4 completions, lr 2e-5, 32 tokens) on 16 other pool prompts, and the change of greedy and
  sampled accuracy (mean of the two) on 32 further pool prompts at the setting's first evaluation budget: the held-out
  trend of a short label-free training run, and what it costs.

The outcome is the study's: EM-RL token (GRPO) over >= 2 seeds (3 where two seeds' effects disagree), paired against
no training on the 128 held-out problems (:func:`bench_label_free.effect`; its "no clear effect" is "mixed" here). Each
candidate rule of :mod:`trl_entropy.evaluation.validation` (static, static + probe, probe alone) is scored leave one
setting out: its thresholds chosen on the other settings, the held-out setting predicted; the agreements are counted
with their exact 95% interval, against a coin flip and against always predicting the other settings' majority outcome.
Today's fixed rule is scored too (its thresholds were set on ``open`` and ``short`` before the others were measured).

Diagnoses and probes are cached in ``benchmarks/results/bench_diagnose/``; the JSON is
``benchmarks/results/bench_diagnose.json`` and ``--write-docs`` writes the tables and the conclusion, whatever they
show, into ``docs/diagnose.md``. One process, ``--threads`` torch threads; ``--worker`` claims a setting's pieces with
lock files, so two processes can share them.

    python benchmarks/bench_diagnose.py --threads 1 --worker & python benchmarks/bench_diagnose.py --threads 1 --worker
    python benchmarks/bench_diagnose.py --summarize-only --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_free as study  # noqa: E402
from _common import RESULTS_DIR, print_table, write_results  # noqa: E402

from trl_entropy.hardware import machine_record  # noqa: E402

NAME = "bench_diagnose"
CACHE = RESULTS_DIR / NAME
DOCS = Path(__file__).resolve().parents[1] / "docs" / "diagnose.md"
BEGIN, END = "<!-- bench_diagnose table: begin -->", "<!-- bench_diagnose table: end -->"
PROBE = {
    "method": "em_rl_token",
    "steps": 8,
    "train_prompts": 16,
    "held_out_prompts": 32,
    "seed": 0,
    "pool_offset": 64,
}
"""The probe: ``steps`` EM-RL token steps (the study's protocol otherwise) on pool prompts ``[pool_offset,
pool_offset + train_prompts)``, judged on the next ``held_out_prompts`` (never diagnose's first 64)."""
OUTCOME = {"helped": "helped", "hurt": "hurt", "no clear effect": "mixed"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help="compute the missing diagnoses and probes")
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/diagnose.md")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild from the cached diagnoses and probes")
    return parser.parse_args()


def setting_label(regime: str) -> str:
    task, style, model = study.SETTINGS[regime]
    return f"{task} / {style} / {model}"


# ---- measurements ---------------------------------------------------------------------------------------------------


def diagnose_setting(regime: str, num_prompts: int, threads: int) -> dict:
    from trl_entropy.cli.diagnose import parse_answer
    from trl_entropy.evaluation.diagnose import diagnose
    from trl_entropy.evaluation.tasks import grade
    from trl_entropy.models import load_model

    _, pool = study.problem_split(regime)
    rows = pool[:num_prompts]
    model, tokenizer = load_model(study.SETTINGS[regime][2])
    model.eval()
    start = time.perf_counter()
    result = diagnose(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        [r["answer"] for r in rows],
        parse_answer=parse_answer,
        is_correct=grade,
        progress=False,
    )
    result["seconds"] = time.perf_counter() - start
    result["torch_threads"] = threads
    return {k: v for k, v in result.items() if k != "per_sample"}


def probe_setting(regime: str, threads: int) -> dict:
    """The probe of :data:`PROBE` (:func:`trl_entropy.trainers.probe.training_probe`) on the untrained model of
    ``regime``: accuracies before and after, their change."""
    from transformers import set_seed

    from trl_entropy.models import load_model
    from trl_entropy.trainers.probe import training_probe

    _, pool = study.problem_split(regime)
    start = PROBE["pool_offset"]
    train = pool[start : start + PROBE["train_prompts"]]
    held_out = pool[start + PROBE["train_prompts"] : start + PROBE["train_prompts"] + PROBE["held_out_prompts"]]
    set_seed(PROBE["seed"])
    model, tokenizer = load_model(study.SETTINGS[regime][2])
    p = study.PROTOCOL
    progress = study.Progress(f"{regime}/probe")
    result = training_probe(
        model,
        tokenizer,
        [row["prompt"] for row in train],
        held_out,
        steps=PROBE["steps"],
        prompts_per_step=p["prompts_per_step"],
        num_generations=p["num_generations"],
        learning_rate=p["learning_rate"],
        max_completion_length=p["train_max_tokens"],
        eval_max_new_tokens=study.eval_budgets(regime)[0],
        temperature=p["temperature"],
        seed=PROBE["seed"],
        bf16=study.TRAINING_BF16,
        batch_size=p["eval_batch_size"],
        callbacks=[progress],
    )
    return {
        "probe": PROBE,
        "budget": result["settings"]["eval_max_new_tokens"],
        "before": result["before"],
        "after": result["after"],
        "changes": result["changes"],
        "probe_trend": result["trend"],
        "seconds": result["seconds"],
        "step_times": progress.step_times,
        "torch_threads": threads,
    }


def work(args: argparse.Namespace) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    for regime in study.REGIMES:
        for kind, compute in (
            ("diagnosis", lambda r: diagnose_setting(r, args.num_prompts, args.threads)),
            ("probe", lambda r: probe_setting(r, args.threads)),
        ):
            path = cache_path(regime, kind)
            if path.is_file() or not study._claim(path):
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {kind} {regime}", flush=True)
            try:
                result = {**compute(regime), "hardware": machine_record()}
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(result, indent=1) + "\n")
                os.replace(tmp, path)
                print(f"[{time.strftime('%H:%M:%S')}] {kind} {regime} done in {result['seconds']:.0f} s", flush=True)
            except Exception:  # one failing setting must not lose the others; it is retried on rerun
                traceback.print_exc()
            finally:
                path.with_suffix(".lock").unlink(missing_ok=True)


def cache_path(regime: str, kind: str) -> Path:
    return CACHE / (f"{regime}.json" if kind == "diagnosis" else f"{regime}_probe.json")


# ---- outcome and validation -----------------------------------------------------------------------------------------


def outcome(runs: dict, regime: str) -> dict:
    """The study's outcome of EM-RL token in ``regime`` over its seeds, each seed's own effect, and whether two seeds
    disagree (then the plan needs a third)."""
    greedy = study.paired_against(runs, regime, "em_rl_token", "none", "greedy")
    sampled = study.paired_against(runs, regime, "em_rl_token", "none", "sampled")
    if not greedy:
        return {"outcome": None, "seeds": 0}
    per_seed = [study.effect([g], [s]) for g, s in zip(greedy, sampled)]
    return {
        "outcome": OUTCOME[study.effect(greedy, sampled)],
        "seeds": len(greedy),
        "per_seed_effect": per_seed,
        "seeds_disagree": len(set(per_seed)) > 1,
        "greedy_changes": [p["change"] for p in greedy],
        "sampled_changes": [p["change"] for p in sampled],
        "greedy_ci95": [p["bootstrap_ci95"] for p in greedy],
        "sampled_ci95": [p["bootstrap_ci95"] for p in sampled],
    }


def fixed_rule_agreement(rows: list[dict]) -> dict:
    """Today's rule with its fixed thresholds (:data:`trl_entropy.evaluation.validation.STATIC_RULE_THRESHOLDS`) as
    a binary prediction on every setting, and on the settings it was not set on."""
    from trl_entropy.evaluation.validation import (
        STATIC_RULE,
        STATIC_RULE_THRESHOLDS,
        agrees,
        clopper_pearson_interval,
        predict,
    )

    out = {}
    for name, subset in (("all", rows), ("not set on", [r for r in rows if r["regime"] not in ("open", "short")])):
        hits = [agrees(predict(STATIC_RULE, STATIC_RULE_THRESHOLDS, r["features"]), r["outcome"]) for r in subset]
        k, n = sum(hits), len(hits)
        out[name] = {"agreements": k, "n": n, "exact_ci95": list(clopper_pearson_interval(k, n)) if n else None}
    return out


def summarize(args: argparse.Namespace) -> dict:
    from trl_entropy.evaluation.validation import Setting, compare_rules

    runs = study.load_runs()
    rows = []
    for regime in study.REGIMES:
        diagnosis_path, probe_path = cache_path(regime, "diagnosis"), cache_path(regime, "probe")
        if not (diagnosis_path.is_file() and probe_path.is_file()):
            continue
        diagnosis, probe = json.loads(diagnosis_path.read_text()), json.loads(probe_path.read_text())
        result = outcome(runs, regime)
        numbers = diagnosis["verdict"]["numbers"]
        task, style, model = study.SETTINGS[regime]
        rows.append(
            {
                "regime": regime,
                "setting": setting_label(regime),
                "task": task,
                "prompt_style": style,
                "model": model,
                "features": {
                    "greedy_minus_sampled": numbers["greedy_minus_sampled"],
                    "confidence_auroc": numbers["confidence_auroc"],
                    "probe_trend": probe["probe_trend"],
                },
                "confidence_auroc_ci95": numbers["confidence_auroc_ci95"],
                "greedy_accuracy": diagnosis["greedy"]["accuracy"],
                "sampled_accuracy": diagnosis["sampled"]["accuracy"],
                "sampled_truncation": diagnosis["sampled"]["truncation_rate"],
                "todays_verdict": diagnosis["verdict"]["verdict"],
                "diagnose_seconds": diagnosis["seconds"],
                "probe_changes": probe["changes"],
                "probe_budget": probe["budget"],
                "probe_seconds": probe["seconds"],
                **result,
            }
        )
    measured = [r for r in rows if r["outcome"] is not None and r["seeds"] >= 2]
    settings = [Setting(r["setting"], r["features"], r["outcome"]) for r in measured]
    validation = compare_rules(settings) if len(settings) >= 2 else None
    return {
        "rows": rows,
        "validated_on": [r["setting"] for r in measured],
        "validation": validation,
        "fixed_rule": fixed_rule_agreement(measured),
        "probe": PROBE,
        "settings": {"num_prompts": args.num_prompts, "threads": args.threads, "cpus": os.cpu_count()},
        "needs_third_seed": [r["regime"] for r in rows if r.get("seeds_disagree") and r["seeds"] < 3],
    }


# ---- docs -----------------------------------------------------------------------------------------------------------


def conclusion(payload: dict) -> str:
    """One paragraph saying what the leave-one-setting-out table shows (generated, whatever it shows)."""
    validation = payload["validation"]
    if validation is None:
        return "Too few settings measured for a leave-one-setting-out validation."
    results = {r["rule"]: r for r in validation["results"]}
    best = results[validation["best_rule"]]
    low, high = best["exact_ci95"]
    n = best["n"]
    parts = [
        f"Out of sample, the best rule is **{best['rule']}**: {best['agreements']} of {n} settings agree (exact 95% "
        f"interval {low:.0%} to {high:.0%}; p = {best['p_vs_chance']:.2g} against a coin flip; always predicting the "
        f"other settings' majority outcome agrees on {best['majority_baseline']} of {n})."
    ]
    others = ", ".join(f"{r['rule']} {r['agreements']}/{r['n']}" for r in validation["results"] if r is not best)
    if others:
        parts.append(f"The other rules: {others}.")
    fixed = payload["fixed_rule"]
    parts.append(
        f"Today's fixed thresholds agree on {fixed['all']['agreements']} of {fixed['all']['n']} settings, "
        f"{fixed['not set on']['agreements']} of {fixed['not set on']['n']} among those they were not set on."
    )
    if validation["beats_chance"]:
        parts.append("Its exact interval lies above one half: on these settings the rule predicts better than chance.")
    else:
        parts.append(
            f"No rule's exact interval lies above one half: on {n} settings **no rule is shown to predict better than "
            "chance**, and `diagnose` says so beside its verdict."
        )
    return " ".join(parts)


def package_validation(payload: dict) -> dict | None:
    """What ``trl-entropy diagnose`` prints beside its verdict (``trl_entropy/diagnose_validation.json``): today's
    rule's out-of-sample agreement, the best candidate's, and whether any beats chance, in one sentence."""
    validation = payload["validation"]
    if validation is None:
        return None
    results = {r["rule"]: r for r in validation["results"]}
    static, best = results["static"], results[validation["best_rule"]]
    n = static["n"]
    models = sorted({r["model"] for r in payload["rows"] if r["setting"] in payload["validated_on"]})
    tasks = sorted({r["task"] for r in payload["rows"] if r["setting"] in payload["validated_on"]})

    def share(result: dict) -> str:
        low, high = result["exact_ci95"]
        return f"{result['agreements']} of {n} (95% CI {low:.0%}-{high:.0%})"

    fixed = payload["fixed_rule"]["not set on"]
    statement = (
        f"out of sample, on {n} settings ({len(tasks)} tasks, {len(models)} models: docs/diagnose.md), this verdict's "
        f"fixed thresholds agreed with EM-RL's measured outcome on {fixed['agreements']} of the {fixed['n']} settings "
        f"they were not set on, and the same rule with its thresholds chosen on the other settings on {share(static)}"
    )
    if best is not static:
        statement += f"; with a short training probe ({best['rule']}) on {share(best)}"
    statement += (
        ": better than chance."
        if validation["beats_chance"]
        else ": not shown to be better than chance; read the verdict as a measured hint, not a prediction."
    )
    return {
        "source": "benchmarks/bench_diagnose.py",
        "settings": payload["validated_on"],
        "rules": {
            r["rule"]: {k: r[k] for k in ("agreements", "n", "exact_ci95", "p_vs_chance")}
            for r in validation["results"]
        },
        "best_rule": validation["best_rule"],
        "beats_chance": validation["beats_chance"],
        "statement": statement[0].upper() + statement[1:],
    }


def markdown(payload: dict) -> str:
    def pct(value: float) -> str:
        return f"{100 * value:+.1f}"

    lines = [
        "| Setting (task / prompt / model) | Greedy - sampled | Confidence AUROC [95% CI] | Probe trend (greedy, "
        "sampled) | Today's verdict | EM-RL token outcome (seeds: greedy / sampled change) | Diagnose + probe time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in payload["rows"]:
        features = row["features"]
        low, high = row["confidence_auroc_ci95"]
        probe = row["probe_changes"]
        if row["outcome"] is None:
            result = "not measured"
        else:
            seeds = "; ".join(f"{pct(g)} / {pct(s)}" for g, s in zip(row["greedy_changes"], row["sampled_changes"]))
            result = f"{row['outcome']} ({row['seeds']} seeds: {seeds})"
        lines.append(
            f"| {row['setting']} | {pct(features['greedy_minus_sampled'])} | {features['confidence_auroc']:.2f} "
            f"[{low:.2f}, {high:.2f}] | {pct(features['probe_trend'])} ({pct(probe['greedy'])}, "
            f"{pct(probe['sampled'])}) | {row['todays_verdict']} | {result} | {row['diagnose_seconds']:.0f} s + "
            f"{row['probe_seconds']:.0f} s |"
        )
    validation = payload["validation"]
    if validation is not None:
        lines += [
            "",
            "| Rule | What it measures | Held-out agreements | Exact 95% CI | p vs coin flip | Majority-outcome "
            "baseline |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        from trl_entropy.evaluation.validation import RULES

        described = {r.name: r.description for r in RULES}
        for result in validation["results"]:
            low, high = result["exact_ci95"]
            lines.append(
                f"| {result['rule']} | {described.get(result['rule'], '')} | {result['agreements']} / {result['n']} | "
                f"{low:.0%} - {high:.0%} | {result['p_vs_chance']:.2g} | {result['majority_baseline']} / "
                f"{result['n']} |"
            )
        lines += ["", "Per held-out setting (thresholds chosen on the others):", ""]
        lines += [
            "| Setting | Outcome | " + " | ".join(r["rule"] for r in validation["results"]) + " |",
            "| --- | --- | " + " | ".join("---" for _ in validation["results"]) + " |",
        ]
        for i, name in enumerate(payload["validated_on"]):
            cells = []
            for result in validation["results"]:
                p = result["predictions"][i]
                cells.append(f"{p['prediction']}" + ("" if p["agrees"] else " (**no**)"))
            lines.append(f"| {name} | {validation['results'][0]['predictions'][i]['outcome']} | {' | '.join(cells)} |")
    lines += ["", conclusion(payload)]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.worker and not args.summarize_only:
        work(args)
    payload = summarize(args)
    write_results(NAME, payload)
    shipped = package_validation(payload)
    if shipped is not None:
        path = Path(__file__).resolve().parents[1] / "trl_entropy" / "diagnose_validation.json"
        path.write_text(json.dumps(shipped, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(shipped["statement"])
    table = [
        {
            "setting": r["setting"],
            "gap": f"{100 * r['features']['greedy_minus_sampled']:+.1f}",
            "auroc": f"{r['features']['confidence_auroc']:.2f}",
            "probe": f"{100 * r['features']['probe_trend']:+.1f}",
            "today": r["todays_verdict"],
            "outcome": f"{r['outcome']} ({r['seeds']})",
        }
        for r in payload["rows"]
    ]
    if table:
        print_table(table, list(table[0]))
    print(conclusion(payload))
    if payload["needs_third_seed"]:
        print(f"seeds disagree, run a third: {payload['needs_third_seed']}")
    if args.write_docs:
        text = DOCS.read_text(encoding="utf-8")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOCS.write_text(f"{head}{BEGIN}\n{markdown(payload)}\n{END}{tail}", encoding="utf-8")
        print(f"wrote the tables into {DOCS}")


if __name__ == "__main__":
    main()
