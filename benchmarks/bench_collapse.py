"""Collapse guard on EM-RL: the embedded SmolLM2-135M-Instruct, same seed, with and without the guard.

EM-RL (``EntropyGRPOTrainer``, ``entropy_reward="token"``: the reward is minus the mean token entropy, no labels) on
"What is a + b?" prompts at two learning rates: 5e-5 (the demo's note: the entropy collapses to a degenerate answer)
and the demo's 2e-5. Each learning rate is trained twice from the same seed:

- ``warn``: the guard only observes (``action="warn"``): it evaluates the probe and logs when it would fire, and
  changes nothing (the probe is greedy with no RNG draw, so the weights follow the unguarded run exactly; tested in
  ``tests/callbacks/test_collapse_guard.py``). This is the run "without the guard", with the probe curve drawn.
- ``stop_and_restore``: the guard with its default thresholds stops training and loads the best probe weights back.

The probe: 32 labelled problems, disjoint from the training prompts, greedy, every ``probe_every`` steps. The final
held-out accuracy: ``--num-heldout`` other problems (disjoint from both), greedy, at the same token budget, with the
truncation rate and the 95% Wilson interval. Each run's result is cached in ``benchmarks/results/bench_collapse/`` so
a rerun resumes; ``--skip-identical`` skips a ``stop_and_restore`` run whose ``warn`` twin never fired (the two runs
are then the same computation).

The guard's cost: every probe is timed (``seconds`` in the guard's JSONL, by kind: the start, scheduled every
``probe_every`` steps, or triggered by a log signal) against the training time, probes excluded, with the guard's
default budget (probes at most 10% of the training time) and triggered-probe cooldown (5 steps). The 2e-5 run is
repeated over 3 seeds (``guard_overhead``): the fraction with all probes, and with the scheduled ones only (what the
guard costs without triggered probes; the probes are greedy and draw no random number, so training is the same
computation either way).

How small a probe can be (``probe_size``): each probe records which of its 32 problems were right and each answer's
length, so the decision is replayed on the observed runs for the first ``n`` problems at a budget of ``b`` tokens (an
answer longer than ``b`` counts as unfinished, hence wrong; greedy answers that finish within ``b`` are the same at
96), for several margins and patiences: does it fire on the runs that ended below the base model (collapsed), and
when, and on those that did not (a false alarm).

The committed results were measured with (on a 2-core CPU shared with other jobs, 1 torch thread per process)::

    python benchmarks/bench_collapse.py --num-generations 4 --max-completion-length 32 --num-heldout 96 \
        --eval-max-new-tokens 96 --threads 1

(``--deadline`` stops a run's training at that UTC time on a shared machine; ``steps_run`` shows it cut none.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table, write_results  # noqa: E402

NAME = "bench_collapse"
# (learning rate, guard action, seed): the guarded 5e-5 run first (it stops early), its observed twin (the collapse
# curve, for the probe-size replay), then the guarded 2e-5 run over 3 seeds (the guard's overhead).
RUNS = (
    ("5e-5", "stop_and_restore", 0),
    ("5e-5", "warn", 0),
    ("2e-5", "stop_and_restore", 0),
    ("2e-5", "stop_and_restore", 1),
    ("2e-5", "observe", 0),
    ("2e-5", "observe", 1),
    ("2e-5", "observe", 2),
)
# "observe": action "warn" with every probe run (no time budget), so that the healthy runs' probe curves are complete
# for the replay of smaller probes and other margins, and the unbudgeted cost is measured.
COLUMNS = [
    "lr",
    "guard",
    "seed",
    "steps_run",
    "fired_step",
    "restored_step",
    "heldout_acc",
    "acc_95ci",
    "truncated",
    "base_acc_256",
    "probe_time_fraction",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--num-probe", type=int, default=32)
    parser.add_argument("--num-heldout", type=int, default=128)
    parser.add_argument("--eval-max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--base-max-new-tokens",
        type=int,
        default=256,
        help="budget of a second base-model evaluation where its answers finish (the trained runs finish at 96)",
    )
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default="all", help="comma-separated run names (e.g. 5e-5_warn_seed0) or 'all'")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM after which a run stops training (shared machine)")
    parser.add_argument("--out", default=str(RESULTS_DIR / NAME))
    return parser.parse_args()


def problem_sets(args, seed: int):
    """Training prompts (no answers), probe and held-out problems of ``seed``, pairwise disjoint by question."""
    from trl_entropy.evaluation.tasks import ArithmeticTask

    task = ArithmeticTask()
    train = task.dataset(args.steps * args.prompts_per_step, split="train", seed=seed)
    seen = set(train["question"])
    pool = task.dataset(2000, split="test", seed=seed + 1)
    probe, heldout = [], []
    for row in pool:
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        (probe if len(probe) < args.num_probe else heldout).append(row)
        if len(heldout) == args.num_heldout:
            break
    if len(heldout) < args.num_heldout:
        raise ValueError(f"only {len(heldout)} held-out problems are disjoint from training and probe")
    return train.select_columns(["prompt"]), probe, heldout


def heldout_eval(model, tokenizer, problems, args, budget: int | None = None) -> dict:
    from trl_entropy.evaluation import evaluate

    budget = budget or args.eval_max_new_tokens
    result = evaluate(model, tokenizer, problems, max_new_tokens=budget, do_sample=False, seed=None, progress=False)
    low, high = result.accuracy_interval()
    return {
        "accuracy": result.accuracy,
        "num_correct": result.num_correct,
        "num_problems": result.num_problems,
        "accuracy_ci95": [low, high],
        "max_new_tokens": budget,
        "truncated_rate": result.truncation_rate,
        "mean_length": result.mean_length,
        "examples": [c.text for c in result.completions[:4]],
    }


class _Deadline(TrainerCallback):
    """Ends training at a wall-clock time (UTC ``HH:MM``) on a shared machine, so the run still gets its final
    evaluation; the result then says how many of the planned steps ran (``steps_run``)."""

    def __init__(self, deadline: str):
        hours, minutes = (int(x) for x in deadline.split(":"))
        self.end = datetime.now(UTC).replace(hour=hours, minute=minutes, second=0, microsecond=0).timestamp()

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() >= self.end:
            control.should_training_stop = True


def run_one(lr: str, guard: str, seed: int, args, sets, out: Path) -> dict:
    import torch
    from transformers import set_seed

    from trl_entropy import load_default_model
    from trl_entropy.callbacks import EntropyStatsCallback
    from trl_entropy.callbacks.collapse_guard import CollapseGuardCallback
    from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

    train, probe, heldout = sets
    folder = out / run_name(lr, guard, seed)
    start = time.perf_counter()
    set_seed(seed)
    model, tokenizer = load_default_model()
    config = EntropyGRPOConfig(
        output_dir=str(folder),
        entropy_reward="token",
        temperature=1.0,
        learning_rate=float(lr),
        beta=0.0,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,
    )
    trainer = EntropyGRPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    trainer.add_callback(EntropyStatsCallback(trainer, plot_on_train_end=False))
    guard_cb = CollapseGuardCallback(
        probe_problems=probe,
        action="warn" if guard == "observe" else guard,
        probe_every=args.probe_every,
        probe_max_new_tokens=args.eval_max_new_tokens,
        **({"max_probe_time_fraction": None} if guard == "observe" else {}),
    )
    trainer.add_callback(guard_cb)
    if args.deadline:
        trainer.add_callback(_Deadline(args.deadline))
    trainer.train()
    train_s = time.perf_counter() - start
    final = heldout_eval(trainer.model, tokenizer, heldout, args)
    keys = (
        "step",
        "entropy",
        "completions/mean_length",
        "reward_std",
        "frac_reward_zero_std",
        "sampling_entropy/repetition_rate",
    )
    log = [{k: e.get(k) for k in keys} for e in trainer.state.log_history if "loss" in e]
    events = [json.loads(line) for line in (folder / guard_cb.config.log_file).read_text().splitlines() if line]
    probes = [e for e in events if e["event"] == "probe"]
    return {
        "lr": float(lr),
        "guard": guard,
        "seed": seed,
        "steps_run": trainer.state.global_step,
        "steps_planned": args.steps,
        "fired_step": guard_cb.fired_step,
        "fired_reason": guard_cb.fired_reason,
        "restored_step": guard_cb.restored_step,
        "best_probe_accuracy": guard_cb.best_accuracy,
        "best_probe_step": guard_cb.best_step,
        "probe": [{"step": s, "accuracy": a} for s, a in zip(guard_cb.probe_steps, guard_cb.probe_accuracies)],
        "guard_events": events,
        "training_log": log,
        "final_heldout": final,
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
        "guard_cost": {
            "train_seconds_without_probes": guard_cb._train_seconds_now(),
            "probe_seconds_by_kind": {
                kind: sum(e["seconds"] for e in probes if e["kind"] == kind)
                for kind in ("start", "scheduled", "triggered")
            },
            "probes_by_kind": {
                kind: sum(e["kind"] == kind for e in probes) for kind in ("start", "scheduled", "triggered")
            },
            "skipped_probes": guard_cb.skipped_probes,
            "probe_time_fraction": guard_cb.probe_time_fraction(),
        },
    }


def run_name(lr: str, guard: str, seed: int) -> str:
    return f"{lr}_{guard}_seed{seed}"


def guard_overhead(results: dict) -> dict:
    """The guard's time over the observed 2e-5 runs (every probe run, no budget): probes (after the start) over
    training time, with all probes and with the scheduled ones only."""
    runs = [r for r in results.values() if r["lr"] == 2e-5 and r["guard"] == "observe"]
    rows = []
    for run in sorted(runs, key=lambda r: r["seed"]):
        cost = run["guard_cost"]
        train = cost["train_seconds_without_probes"]
        by_kind = cost["probe_seconds_by_kind"]
        rows.append(
            {
                "seed": run["seed"],
                "train_s": train,
                "scheduled_probes": cost["probes_by_kind"]["scheduled"],
                "triggered_probes": cost["probes_by_kind"]["triggered"],
                "skipped_probes": cost["skipped_probes"],
                "start_probe_s": by_kind["start"],
                "fraction_all_probes": (by_kind["scheduled"] + by_kind["triggered"]) / train,
                "fraction_scheduled_only": by_kind["scheduled"] / train,
            }
        )
    summary = {}
    for key in ("fraction_all_probes", "fraction_scheduled_only"):
        values = [r[key] for r in rows]
        if values:
            summary[key] = {"mean": sum(values) / len(values), "max": max(values), "values": values}
    return {"runs": rows, "summary": summary}


def probe_size(results: dict, bases: dict) -> list[dict]:
    """Replay of the probe-drop decision on the observed runs (every probe recorded), with the first ``n`` probe
    problems at a budget of ``b`` tokens (an answer longer than ``b`` counts as wrong), for margins and patiences.

    A run counts as collapsed when its final held-out accuracy is below the base model's (where the base answers
    finish, 256 tokens), else as healthy: the replay says on how many of each the decision would fire, and at which
    step on the collapsed ones."""
    from trl_entropy.callbacks.collapse import probe_drop_fired

    def series(run, n, b):
        probes = [e for e in run["guard_events"] if e["event"] == "probe" and "correct" in e]
        return [
            (e["step"], sum(c and length <= b for c, length in zip(e["correct"][:n], e["lengths"][:n])) / n)
            for e in probes
        ]

    def first_firing(points, max_drop, patience):
        for i in range(1, len(points)):
            if probe_drop_fired([a for _, a in points[: i + 1]], max_drop, patience):
                return points[i][0]
        return None

    observed = [r for r in results.values() if r["guard"] in ("observe", "warn")]
    collapsed = [r for r in observed if r["final_heldout"]["accuracy"] < bases[r["seed"]][1]["accuracy"]]
    healthy = [r for r in observed if r not in collapsed]
    rows = []
    for max_drop in (0.15, 0.2, 0.25):
        for patience in (1, 2):
            for n in (16, 24, 32):
                for b in (48, 96):
                    on_collapsed = [first_firing(series(r, n, b), max_drop, patience) for r in collapsed]
                    on_healthy = [first_firing(series(r, n, b), max_drop, patience) for r in healthy]
                    rows.append(
                        {
                            "max_probe_drop": max_drop,
                            "probe_patience": patience,
                            "problems": n,
                            "budget": b,
                            "collapsed_runs": len(collapsed),
                            "fires_on_collapsed": sum(f is not None for f in on_collapsed),
                            "firing_steps_on_collapsed": on_collapsed,
                            "healthy_runs": len(healthy),
                            "fires_on_healthy": sum(f is not None for f in on_healthy),
                        }
                    )
    return rows


def first_firings(run: dict) -> dict:
    """Replay of each default log-signal trigger on the run's logged signals: the first step it fires at, or None
    (the pure functions of ``trl_entropy.callbacks.collapse`` on growing prefixes, as the guard calls them)."""
    from trl_entropy.callbacks.collapse import CollapseGuardConfig, signal_triggers
    from trl_entropy.callbacks.collapse_guard import SIGNAL_KEYS

    config = CollapseGuardConfig()
    history: dict[str, list] = {key: [] for key in SIGNAL_KEYS}
    first: dict[str, int | None] = dict.fromkeys(
        ("entropy_floor", "entropy_decay", "length_collapse", "repetition", "identical_completions")
    )
    for entry in run["training_log"]:
        for key in SIGNAL_KEYS:
            history[key].append(entry.get(key))
        for name in signal_triggers(history, config):
            if first[name] is None:
                first[name] = entry["step"]
    return first


def plot(results: dict, base: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    ax_probe, ax_entropy = figure.subplots(1, 2)
    colours = {5e-5: "tab:red", 2e-5: "tab:blue"}
    for run in results.values():
        lr, guard = run["lr"], run["guard"]
        style = "--" if guard == "warn" else "-"
        label = f"lr {lr:g}, seed {run['seed']}, {'observe only' if guard == 'warn' else 'guard: stop_and_restore'}"
        ax_probe.plot(
            [p["step"] for p in run["probe"]],
            [p["accuracy"] for p in run["probe"]],
            style,
            color=colours[lr],
            marker="o",
            markersize=3,
            label=label,
        )
        steps = [e["step"] for e in run["training_log"]]
        ax_entropy.plot(steps, [e["entropy"] for e in run["training_log"]], style, color=colours[lr], label=label)
        if run.get("restored_step") is not None:
            restored = {p["step"]: p["accuracy"] for p in run["probe"]}[run["restored_step"]]
            ax_probe.plot([run["fired_step"]], [restored], "*", color=colours[lr], markersize=12)
        if run["fired_step"] is not None:
            for ax in (ax_probe, ax_entropy):
                ax.axvline(run["fired_step"], color=colours[lr], linestyle=":" if guard == "warn" else "-", alpha=0.5)
    ax_probe.axhline(base["accuracy"], color="grey", linewidth=0.8)
    ax_probe.set_xlabel("step")
    ax_probe.set_ylabel(f"probe accuracy (greedy, {len(results) and base['max_new_tokens']} tokens)")
    ax_probe.set_ylim(0, 1)
    ax_probe.set_title("Probe accuracy (grey: base model, held-out; star: restored)")
    ax_entropy.set_yscale("log")
    ax_entropy.set_xlabel("step")
    ax_entropy.set_ylabel("training token entropy (nats, log scale)")
    ax_entropy.set_title("Entropy; vertical lines: guard fired")
    ax_entropy.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def base_evaluations(args, sets, out: Path, seed: int) -> tuple[dict, dict]:
    """The base model on ``seed``'s held-out problems at the probe budget and where its answers finish (cached)."""
    results = []
    for budget, name in ((args.eval_max_new_tokens, f"base_seed{seed}.json"),
                         (args.base_max_new_tokens, f"base_{args.base_max_new_tokens}_seed{seed}.json")):  # fmt: skip
        path = out / name
        if not path.is_file():
            from trl_entropy import load_default_model

            model, tokenizer = load_default_model()
            path.write_text(json.dumps(heldout_eval(model, tokenizer, sets[2], args, budget=budget), indent=2))
            del model
        results.append(json.loads(path.read_text()))
        print(f"base seed {seed} at {budget} tokens: {results[-1]['accuracy']:.3f}", flush=True)
    return results[0], results[1]


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [r for r in RUNS if args.runs == "all" or run_name(*r) in args.runs.split(",")]
    results, bases = {}, {}
    for lr, guard, seed in plan:
        sets = problem_sets(args, seed)
        if seed not in bases:
            bases[seed] = base_evaluations(args, sets, out, seed)
        name = run_name(lr, guard, seed)
        path = out / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
            continue
        print(f"running {name}", flush=True)
        results[name] = run_one(lr, guard, seed, args, sets, out)
        path.write_text(json.dumps(results[name], indent=2, default=float))
        print(
            f"{name}: {json.dumps({k: results[name][k] for k in ('steps_run', 'fired_step', 'fired_reason')})}",
            flush=True,
        )

    rows = []
    for run in results.values():
        final = run["final_heldout"]
        low, high = final["accuracy_ci95"]
        rows.append(
            {
                "lr": f"{run['lr']:g}",
                "guard": run["guard"],
                "seed": run["seed"],
                "steps_run": run["steps_run"],
                "fired_step": run["fired_step"],
                "restored_step": run["restored_step"],
                "heldout_acc": final["accuracy"],
                "acc_95ci": f"[{low:.3f}, {high:.3f}]",
                "truncated": final["truncated_rate"],
                "base_acc_256": bases[run["seed"]][1]["accuracy"],
                "probe_time_fraction": run["guard_cost"]["probe_time_fraction"],
            }
        )
    png = RESULTS_DIR / f"{NAME}.png"
    if results:
        plot(results, bases[0][0] if 0 in bases else next(iter(bases.values()))[0], png)
    payload = {
        "table": rows,
        "guard_overhead": guard_overhead(results),
        "probe_size": probe_size(results, bases),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "base_heldout": {f"seed{seed}": {"probe_budget": b[0], "long_budget": b[1]} for seed, b in bases.items()},
        "runs": {
            name: {
                **{k: v for k, v in run.items() if k not in ("training_log", "guard_events")},
                # Steps where log signals fired while the probe held (the guard then probed, or skipped the probe).
                "suspicions": [[e["step"], e["signals"]] for e in run["guard_events"] if e["event"] == "suspect"],
                "first_signal_firings": first_firings(run),
                "min_entropy": min(e["entropy"] for e in run["training_log"]),
                "final_entropy": run["training_log"][-1]["entropy"],
            }
            for name, run in results.items()
        },
        "png": str(png.relative_to(RESULTS_DIR.parent.parent)) if results else None,
        "machine": f"{os.cpu_count()} logical CPUs, torch threads {args.threads}",
    }
    write_results(NAME, payload)
    print_table(rows, COLUMNS)
    print(json.dumps(payload["guard_overhead"]["summary"], indent=1))
    print_table(payload["probe_size"], list(payload["probe_size"][0]))


if __name__ == "__main__":
    main()
