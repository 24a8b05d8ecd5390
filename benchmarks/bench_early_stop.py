"""Think Just Enough: entropy early stopping, tokens saved and accuracy kept, on two settings.

1. The embedded SmolLM2-135M-Instruct (``load_default_model()``) on held-out two-digit additions ("What is a + b?
   Think step by step.", 10 <= a, b <= 99). The threshold is calibrated (``run_calibrate``, the ``trl-entropy
   calibrate`` entry point) on 20 training problems: mean top-20 entropy (bits) of the first reasoning step (up to
   the first "\\n\\n") against the correctness of the final answer; then the held-out problems are solved without
   early stopping and with it.
2. A controlled setting where confident and unconfident problems are known by construction: a 2-layer Llama
   (hidden size 64, from ``trl_entropy.testing``) is trained for 1000 steps on "what is a + b ?" traces of 60
   problems of three kinds (20 each). *Known*: a confident first step with the right sum, then two verification
   steps (30% of traces skip them, so answering early is in distribution). *Hard*: a random guess first, then a
   correction ("no ...") with the right sum, so extended reasoning is what makes them right. *Unknown*: random
   numbers throughout, so the model can not be right. The threshold is calibrated on 20 of the problems and
   evaluated on the other 40 (held out from calibration; the model was trained on all 60, which is the point: it
   knows what it knows).

For each setting the table has one row per way of solving: no early stopping (baseline), stopping after the first
step for every problem ("always stop", the case with no signal at all), and the four calibrated thresholds (mean,
info, bayes, universal). All runs are greedy, so a problem's first step is identical in every run; the threshold
rows are composed per problem from the two live runs (answer after the first step if its entropy is below the
threshold, else the baseline's continued reasoning), and the default threshold ("mean") is also run live and checked
to match its composed row exactly. Runs are interleaved chunk by chunk; tokens are output tokens per problem, the
forced answer prompt included. The paper (Sharma & Chopra, 2025) reports 25-50% fewer tokens at unchanged accuracy
on reasoning models, and no separation on a non-reasoning one (Llama-3.3-70B: d = -0.19, p = 0.23).

    python benchmarks/bench_early_stop.py [--num-calibrate 20] [--num-eval 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table, write_results  # noqa: E402

from trl_entropy.evaluation import wilson_interval  # noqa: E402

NAME = "bench_early_stop"
COLUMNS = [
    "setting",
    "method",
    "tau",
    "answered_early",
    "accuracy",
    "acc_95ci",
    "tokens",
    "token_saving",
    "acc_change",
    "truncated",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-calibrate", type=int, default=20, help="calibration problems (the paper uses 5-20)")
    parser.add_argument("--num-eval", type=int, default=32, help="held-out SmolLM2 problems")
    parser.add_argument("--max-step-tokens", type=int, default=48, help="longest first reasoning step (SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="output tokens per problem (SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--train-steps", type=int, default=1000, help="training steps of the controlled tiny model")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    return parser.parse_args()


def summarize(setting: str, method: str, tau, rows: list[dict], baseline: dict | None) -> dict:
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    tokens = sum(r["num_tokens"] for r in rows)
    low, high = wilson_interval(int(correct), n) if n else (math.nan, math.nan)
    out = {
        "setting": setting,
        "method": method,
        "tau": "-" if tau is None else round(tau, 4),
        "answered_early": f"{sum(r['confident'] for r in rows)}/{n}",
        "accuracy": correct / n,
        "acc_95ci": f"[{low:.2f}, {high:.2f}]",
        "tokens": tokens / n,
        "total_tokens": tokens,
        # Fraction of outputs cut off at --max-new-tokens (their answer may be missing).
        "truncated": sum(r.get("truncated", False) for r in rows) / n if n else math.nan,
        "num_problems": n,
    }
    if baseline is not None:
        out["token_saving"] = 1 - tokens / baseline["total_tokens"]
        out["acc_change"] = out["accuracy"] - baseline["accuracy"]
    return out


def compose(baseline: list[dict], always: list[dict], tau: float) -> list[dict]:
    """What the two-stage pipeline does at threshold ``tau``: answer early where the first step is confident."""
    return [a if a["confident"] and a["step_signal"] <= tau else b for b, a in zip(baseline, always)]


def solve_interleaved(model, tokenizer, prompts, answers, taus: dict, chunk: int, **pipeline_kwargs):
    """Run every threshold of ``taus`` (name -> tau or None) chunk by chunk, so no run gets a warmer machine."""
    from trl_entropy.confidence import think_just_enough_generate
    from trl_entropy.evaluation.tasks import grade

    rows = {name: [] for name in taus}
    seconds = {name: 0.0 for name in taus}
    eos = model.generation_config.eos_token_id
    end_ids = (set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}) - {None}
    for start in range(0, len(prompts), chunk):
        for name, tau in taus.items():
            t0 = time.perf_counter()
            results = think_just_enough_generate(
                model, tokenizer, prompts[start : start + chunk], tau, show_progress=False, **pipeline_kwargs
            )
            seconds[name] += time.perf_counter() - t0
            for r, answer in zip(results, answers[start : start + chunk]):
                row = asdict(r)
                ids = row.pop("completion_ids")
                # Cut off at the budget: reasoning that does not end with an end-of-sequence token (a row answered
                # early ends with its forced answer, which has its own small budget).
                row["truncated"] = not r.confident and (not ids or ids[-1] not in end_ids)
                rows[name].append({**row, "answer": answer, "correct": grade(r.completion, answer)})
        print(f"  solved {min(start + chunk, len(prompts))}/{len(prompts)} problems", flush=True)
    return rows, seconds


def separation_on(rows: list[dict]) -> dict:
    """Cohen's d and p of the first-step entropy against baseline correctness, on the evaluation problems."""
    from trl_entropy.confidence import EntropyThresholdCalibrator

    try:
        cal = EntropyThresholdCalibrator().fit([r["step_signal"] for r in rows], [r["correct"] for r in rows])
    except ValueError as err:
        return {"error": str(err)}
    return {"cohens_d": cal.stats.cohens_d, "p_value": cal.stats.p_value, "separates": cal.separates}


def evaluate_setting(setting, calibrator, model, tokenizer, prompts, answers, chunk, **pipeline_kwargs) -> dict:
    taus = {"baseline": None, "always_stop": 1e9, "mean_live": calibrator.threshold("mean")}
    rows, seconds = solve_interleaved(model, tokenizer, prompts, answers, taus, chunk, **pipeline_kwargs)
    baseline = summarize(setting, "no early stop", None, rows["baseline"], None)
    table = [baseline, summarize(setting, "always stop", None, rows["always_stop"], baseline)]
    composed = {}
    for method in ("mean", "info", "bayes", "universal"):
        tau = calibrator.threshold(method)
        composed[method] = compose(rows["baseline"], rows["always_stop"], tau)
        table.append(summarize(setting, method, tau, composed[method], baseline))
    live = summarize(setting, "mean (live run)", calibrator.threshold("mean"), rows["mean_live"], baseline)
    table.append(live)
    strip = ("completion", "answer")
    consistent = [{k: v for k, v in r.items() if k not in strip} for r in rows["mean_live"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in composed["mean"]
    ]
    return {
        "table": table,
        "calibration": {**asdict(calibrator.stats), "summary": calibrator.summary()},
        "held_out_separation": separation_on(rows["baseline"]),
        "live_run_matches_composition": consistent,
        "seconds": seconds,
        "examples": {name: rows[name][:3] for name in ("baseline", "mean_live")},
        "step_signals": [(r["step_signal"], r["correct"]) for r in rows["baseline"]],
        "_rows": {"baseline": rows["baseline"], "always stop": rows["always_stop"], "mean": rows["mean_live"]},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Setting 1: SmolLM2-135M-Instruct on two-digit additions
# ---------------------------------------------------------------------------------------------------------------------


def smollm2_setting(args) -> dict:
    from trl_entropy.cli.arguments import CalibrateArguments
    from trl_entropy.cli.confidence import run_calibrate
    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.models import load_default_model

    instruction = "Think step by step."
    calibrate_args = CalibrateArguments(
        num_problems=args.num_calibrate,
        split="train",
        arithmetic_low=10,
        arithmetic_high=99,
        instruction=instruction,
        max_step_tokens=args.max_step_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        output_file=str(RESULTS_DIR / f"{NAME}_calibration.json"),
    )
    t0 = time.perf_counter()
    print(f"[smollm2] calibrating on {args.num_calibrate} training problems", flush=True)
    try:
        calibrator = run_calibrate(calibrate_args)
    except ValueError as err:  # e.g. fewer than 2 correct answers: report it instead of a threshold
        return {"calibration_error": str(err)}
    calibrate_seconds = time.perf_counter() - t0

    model, tokenizer = load_default_model()
    model.eval()
    data = ArithmeticTask(10, 99).dataset(args.num_eval, split="test")
    prompts = [[{"role": "user", "content": f"{q} {instruction}"}] for q in data["question"]]
    print(f"[smollm2] solving {args.num_eval} held-out problems", flush=True)
    result = evaluate_setting(
        "smollm2",
        calibrator,
        model,
        tokenizer,
        prompts,
        list(data["answer"]),
        args.batch_size,
        max_step_tokens=args.max_step_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    result["calibrate_seconds"] = calibrate_seconds
    result.pop("_rows")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Setting 2: a controlled task on the tiny model
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_problems(seed: int = 0, per_kind: int = 20):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, 21) for b in range(1, 21) if a + b <= 40]
    rng.shuffle(pairs)
    kinds = {
        "known": pairs[:per_kind],
        "hard": pairs[per_kind : 2 * per_kind],
        "unknown": pairs[2 * per_kind : 3 * per_kind],
    }
    return [(a, b, kind) for kind, group in kinds.items() for a, b in group]


def synthetic_prompt(a: int, b: int) -> str:
    return f"what is {a} + {b} ? = "  # what the tiny tokenizer's chat template renders


def synthetic_trace(a: int, b: int, kind: str, rng: random.Random) -> str:
    s = a + b
    if kind == "known":  # confident and right at once; 30% of traces skip the verification, so answering early is
        # in distribution, but greedy decoding still verifies
        first = f"{a} + {b} is {s} ?"
        return (
            f"{first} the answer {s}"
            if rng.random() < 0.3
            else f"{first} {s} - {b} is {a} ? {s} - {a} is {b} ? the answer {s}"
        )
    if kind == "hard":  # an unconfident guess, then a correction: extended reasoning is what makes it right
        return f"{a} + {b} is {rng.randint(0, 40)} ? no {a} + {b} is {s} ? {s} - {b} is {a} ? the answer {s}"
    r = [rng.randint(0, 40) for _ in range(4)]  # the model cannot know: random throughout
    return f"{a} + {b} is {r[0]} ? {r[0]} - {b} is {r[1]} ? {r[1]} - {a} is {r[2]} ? the answer {r[3]}"


def train_controlled_model(problems, steps: int, seed: int = 0):
    import torch

    from trl_entropy.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    rng = random.Random(seed)
    data = []
    for a, b, kind in problems:
        prompt = tokenizer(synthetic_prompt(a, b))["input_ids"]
        for _ in range(60):
            completion = tokenizer(synthetic_trace(a, b, kind, rng))["input_ids"] + [tokenizer.eos_token_id]
            data.append((prompt + completion, [-100] * len(prompt) + completion))
    rng.shuffle(data)
    model = make_tiny_model(seed=seed, hidden_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    batch_size = 64
    for step in range(steps):
        batch = [data[(step * batch_size + i) % len(data)] for i in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention_mask = (input_ids != 0).long()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    model.eval()
    return model, tokenizer, loss.item()


def synthetic_setting(args) -> dict:
    import torch

    from trl_entropy.confidence import EntropyThresholdCalibrator, think_just_enough_generate
    from trl_entropy.evaluation.tasks import grade

    problems = synthetic_problems()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matmuls are too small to gain from threads; they only add overhead
    t0 = time.perf_counter()
    print(f"[synthetic] training the tiny model for {args.train_steps} steps", flush=True)
    model, tokenizer, final_loss = train_controlled_model(problems, args.train_steps)
    train_seconds = time.perf_counter() - t0
    kwargs = dict(
        step_delimiter="?",
        min_step_tokens=2,
        max_step_tokens=8,
        max_new_tokens=40,
        answer_prompt="the answer",
        max_answer_tokens=2,
        batch_size=32,
    )
    order = list(range(len(problems)))
    random.Random(1).shuffle(order)
    calib = [problems[i] for i in order[: args.num_calibrate]]
    held_out = [problems[i] for i in order[args.num_calibrate :]]

    def prompts_answers(items):
        return [synthetic_prompt(a, b) for a, b, _ in items], [str(a + b) for a, b, _ in items]

    prompts, answers = prompts_answers(calib)
    results = think_just_enough_generate(model, tokenizer, prompts, None, show_progress=False, **kwargs)
    correct = [grade(r.completion, a) for r, a in zip(results, answers)]
    calibrator = EntropyThresholdCalibrator().fit([r.step_signal for r in results], correct)
    calibrator.save(RESULTS_DIR / f"{NAME}_synthetic_calibration.json")
    print(calibrator.summary(), flush=True)
    prompts, answers = prompts_answers(held_out)
    result = evaluate_setting("synthetic", calibrator, model, tokenizer, prompts, answers, 32, **kwargs)
    # Per kind of problem: who is answered early, and what that does to accuracy and tokens.
    kinds = [kind for _, _, kind in held_out]
    all_rows = result.pop("_rows")
    by_kind = {}
    for kind in ("known", "hard", "unknown"):
        by_kind[kind] = {"problems": kinds.count(kind)}
        for name, rows in all_rows.items():
            mine = [r for r, k in zip(rows, kinds) if k == kind]
            by_kind[kind][name] = {
                "answered_early": sum(r["confident"] for r in mine),
                "accuracy": sum(r["correct"] for r in mine) / max(1, len(mine)),
                "tokens": sum(r["num_tokens"] for r in mine) / max(1, len(mine)),
                "mean_step_entropy": sum(r["step_signal"] for r in mine) / max(1, len(mine)),
            }
    result.update(by_kind=by_kind, train_seconds=train_seconds, final_train_loss=final_loss)
    torch.set_num_threads(threads)
    return result


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    settings = [name for name in ("smollm2", "synthetic") if "step_signals" in results.get(name, {})]
    if not settings:
        return None
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, name in zip(axes[0], settings):
        signals = results[name]["step_signals"]
        good = [s for s, ok in signals if ok]
        bad = [s for s, ok in signals if not ok]
        bins = 20
        ax.hist([good, bad], bins=bins, label=["correct", "incorrect"], color=["tab:green", "tab:red"], alpha=0.7)
        for method, style in (("mean", "-"), ("info", "--"), ("bayes", ":"), ("universal", "-.")):
            tau = results[name]["calibration"]["thresholds"][method]
            ax.axvline(tau, color="k", linestyle=style, label=f"tau_{method} = {tau:.3f}")
        cal = results[name]["calibration"]
        ax.set_title(
            f"{name}: held-out problems, baseline correctness\n"
            f"thresholds calibrated on {cal['n_correct'] + cal['n_incorrect']} others: "
            f"d = {cal['cohens_d']:+.2f}, p = {cal['p_value']:.2g}",
            fontsize=10,
        )
        ax.set_xlabel("mean top-20 token entropy of the first step (bits)")
        ax.set_ylabel("problems")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    results: dict = {"config": vars(args)}
    previous_path = RESULTS_DIR / f"{NAME}.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    for name, skipped in (("synthetic", args.skip_synthetic), ("smollm2", args.skip_smollm2)):
        if skipped and name in previous:  # a skipped setting keeps its previous results, marked as such
            results[name] = {**previous[name], "kept_from_previous_run": True}
    if not args.skip_synthetic:
        results["synthetic"] = synthetic_setting(args)
    if not args.skip_smollm2:
        results["smollm2"] = smollm2_setting(args)
    results["wall_seconds"] = time.perf_counter() - start
    png = plot(results, RESULTS_DIR / f"{NAME}.png")
    if png:
        results["plot"] = str(png.relative_to(RESULTS_DIR.parent.parent))
    rows = [row for name in ("smollm2", "synthetic") for row in results.get(name, {}).get("table", [])]
    print()
    print_table(rows, COLUMNS)
    for name in ("smollm2", "synthetic"):
        part = results.get(name, {})
        if "calibration_error" in part:
            print(f"\n{name}: calibration refused: {part['calibration_error']}")
        elif part:
            print(f"\n{name}: {part['calibration']['summary']}")
            print(f"  held-out separation: {part['held_out_separation']}")
            print(f"  live 'mean' run matches its composed row: {part['live_run_matches_composition']}")
    print(f"\nwall time {results['wall_seconds']:.0f} s")
    write_results(NAME, results)


if __name__ == "__main__":
    main()
