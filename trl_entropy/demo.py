"""``trl-entropy demo``: label-free EM-RL on a small model, measured before and after, in a few minutes on a CPU.

The demo takes the embedded SmolLM2-135M-Instruct and the built-in "What is a + b?" task, measures held-out accuracy
(greedy, and sampled at the training temperature) and the mean token entropy of the completions, trains with EM-RL
(Agarwal et al., 2025, arXiv 2505.15134: the reward is minus the mean token entropy of each sampled completion, no
labels, no reward model) through :class:`~trl_entropy.trainers.EntropyGRPOTrainer`, measures again and writes
``<output_dir>/report.md`` with a before/after table and entropy plots.

Why it can work without labels: sampling at a temperature spreads probability over many answers, most of them wrong,
while the model's mode is right more often. EM-RL rewards the completions the model is most confident about, which
moves probability mass towards the mode, so sampled accuracy moves towards greedy accuracy. Labels are used only to
*grade* the held-out problems, never in training (the training prompts carry no answer column).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .stats import paired_bootstrap_interval

logger = logging.getLogger(__name__)

__all__ = ["DemoArguments", "run_demo", "render_report", "truncation_warnings"]

_HUB_TASKS = ("gsm8k", "math500")


@dataclass
class DemoArguments:
    """Arguments of ``trl-entropy demo``. The defaults are the settings measured in the README.

    Parameters:
        model_name_or_path (`str`, *optional*, defaults to `"smollm2"`):
            Model to train: `"smollm2"` (the embedded SmolLM2-135M-Instruct, offline), a hub id or a local folder.
        task (`str`, *optional*, defaults to `"arithmetic"`):
            `"arithmetic"` (built in: "What is a + b?", 1 <= a, b <= 20, offline), or `"gsm8k"` / `"math500"`
            (through `datasets.load_dataset`, needs the hub or a populated cache; they need a larger model and a
            larger `max_completion_length` than the defaults, which are sized for the arithmetic task on a CPU).
        output_dir (`str`, *optional*, defaults to `"trl-entropy-demo"`):
            Folder for the report, the results JSON, the plots and the training logs.
        prompt_style (`str`, *optional*, defaults to `"short"`):
            Prompt of the arithmetic task (:class:`~trl_entropy.tasks.ArithmeticTask`): `"short"` opens the chat with
            two worked examples ("What is 3 + 4?" -> "3 + 4 = 7") so that answers finish within the budget (measured
            with the embedded model: 100% of greedy and 98.4% of T=1 answers within 32 tokens); `"open"` asks the
            question alone, and the model then explains at length (T=1: mean 107 tokens), so a short budget cuts
            most answers off and the report measures truncation rather than arithmetic (it warns).
        num_eval_problems (`int`, *optional*, defaults to `128`):
            Held-out problems, each solved once per decoding setting, >= 1.
        num_train_prompts (`int`, *optional*, defaults to `512`):
            Unlabelled training prompts, >= 1 (training stops at `max_steps` whichever comes first).
        max_steps (`int`, *optional*, defaults to `30`):
            Optimizer steps of EM-RL, >= 1.
        prompts_per_step (`int`, *optional*, defaults to `2`):
            Prompts per optimizer step, >= 1; each gets `num_generations` completions.
        num_generations (`int`, *optional*, defaults to `8`):
            Completions per prompt (the GRPO group whose mean reward is the baseline), >= 2.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of training and of the sampled evaluation, > 0. The entropy reward is measured at it.
        learning_rate (`float`, *optional*, defaults to `1e-5`):
            AdamW learning rate, > 0. The paper uses 1e-6 on a 7B model for hundreds of steps; a short run on a 135M
            model needs a larger one, but not too large: with the open prompt, 5e-5 collapsed the entropy within 30
            steps to a degenerate answer ("a + b = a") and held-out accuracy fell to 0%; with the short prompt, a pilot
            of `benchmarks/bench_label_free.py` at 3e-5 (8 steps of 8 completions) cut EM-RL's greedy accuracy from
            54.7% to 20.3% and drove supervised GRPO's training reward to 0 by step 3, while at 1e-5 supervised GRPO
            gains.
        beta (`float`, *optional*, defaults to `0.0`):
            KL weight to the initial model, >= 0 (the paper: 0.001). 0 loads no reference model (faster on CPU).
        max_completion_length (`int`, *optional*, defaults to `32`):
            Longest completion in training and evaluation, in tokens, >= 1. The report gives the fraction of answers
            cut off at it and warns when more than 5% of the base model's answers are: an accuracy change is then
            partly a change of length (an earlier version of this demo, at 48 tokens with the open prompt, "gained"
            +37.5 greedy points that shrank to +7.0 at 256 tokens).
        entropy_reward (`str`, *optional*, defaults to `"token"`):
            EM-RL variant: `"token"` (minus the mean token entropy), `"trajectory"` (mean log-probability of the
            sampled tokens) or `"self_certainty"`.
        eval_batch_size (`int`, *optional*, defaults to `64`):
            Problems per `generate` call in evaluation, >= 1.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the problems, of sampling and of training.
        num_threads (`int` or `None`, *optional*, defaults to `None`):
            CPU threads for torch (`torch.set_num_threads`); None keeps torch's choice.
        quick (`bool`, *optional*, defaults to `False`):
            Smoke-test mode: 2 training steps and 8 held-out problems (overrides `max_steps` and `num_eval_problems`).
        save_model (`bool`, *optional*, defaults to `False`):
            Save the trained model to `<output_dir>/model`.
        collapse_guard (`bool`, *optional*, defaults to `False`):
            Watch training with :class:`~trl_entropy.collapse_guard.CollapseGuardCallback` (its defaults; for the
            arithmetic task a probe of 32 test-split problems drawn with `seed + 1`): stop and restore the best probe
            checkpoint on collapse.
    """

    model_name_or_path: str = field(
        default="smollm2", metadata={"help": "'smollm2' (embedded SmolLM2-135M-Instruct), a hub id or a local path."}
    )
    task: str = field(
        default="arithmetic",
        metadata={"help": "'arithmetic' (built in, offline), 'gsm8k' or 'math500' (need the hub)."},
    )
    output_dir: str = field(default="trl-entropy-demo", metadata={"help": "Folder for report.md, JSON and plots."})
    prompt_style: str = field(
        default="short",
        metadata={"help": "Arithmetic prompt: 'short' (two worked examples, answers finish) or 'open'."},
    )
    num_eval_problems: int = field(default=128, metadata={"help": "Held-out problems, >= 1."})
    num_train_prompts: int = field(default=512, metadata={"help": "Unlabelled training prompts, >= 1."})
    max_steps: int = field(default=30, metadata={"help": "EM-RL optimizer steps, >= 1."})
    prompts_per_step: int = field(default=2, metadata={"help": "Prompts per optimizer step, >= 1."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (GRPO group size), >= 2."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of training and of the sampled evaluation, > 0."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate, > 0."})
    beta: float = field(default=0.0, metadata={"help": "KL weight to the initial model, >= 0 (0: no reference)."})
    max_completion_length: int = field(default=32, metadata={"help": "Longest completion in tokens, >= 1."})
    entropy_reward: str = field(
        default="token", metadata={"help": "EM-RL variant: 'token', 'trajectory' or 'self_certainty'."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Problems per generate call in evaluation, >= 1."})
    seed: int = field(default=0, metadata={"help": "Seed of problems, sampling and training."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's default)."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: 2 steps, 8 held-out problems."})
    save_model: bool = field(default=False, metadata={"help": "Save the trained model to <output_dir>/model."})
    collapse_guard: bool = field(default=False, metadata={"help": "Stop and restore the best probe step on collapse."})

    def __post_init__(self):
        if self.task != "arithmetic" and self.task not in _HUB_TASKS:
            raise ValueError(f"`task` must be 'arithmetic', 'gsm8k' or 'math500', got {self.task!r}.")
        if self.prompt_style not in ("open", "short"):
            raise ValueError(f"`prompt_style` must be 'open' or 'short', got {self.prompt_style!r}.")
        for name in (
            "num_eval_problems",
            "num_train_prompts",
            "max_steps",
            "prompts_per_step",
            "max_completion_length",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if not (isinstance(self.num_generations, int) and self.num_generations >= 2):
            raise ValueError(
                f"`num_generations` must be an integer >= 2 (a group baseline), got {self.num_generations}."
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate}.")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"`beta` must be a finite number >= 0, got {self.beta}.")
        if self.entropy_reward not in ("token", "trajectory", "self_certainty"):
            raise ValueError(
                f"`entropy_reward` must be 'token', 'trajectory' or 'self_certainty', got {self.entropy_reward!r}."
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"`num_threads` must be >= 1 or None, got {self.num_threads}.")
        if self.quick:
            self.max_steps = 2
            self.num_eval_problems = 8


def _load_problems(args: DemoArguments):
    """``(held-out problems with answers, training prompts without answers)``."""
    from .tasks import ArithmeticTask, load_task

    if args.task == "arithmetic":
        task = ArithmeticTask(prompt_style=args.prompt_style)
        held_out = task.dataset(args.num_eval_problems, split="test", seed=args.seed)
        train = task.dataset(args.num_train_prompts, split="train", seed=args.seed)
    else:
        held_out = load_task(args.task, n=args.num_eval_problems, split="test")
        try:
            train = load_task(args.task, n=args.num_train_prompts, split="train")
        except ValueError:  # no train split (MATH-500): train on other problems of the same split
            pool = load_task(args.task, split="test")
            end = min(len(pool), args.num_eval_problems + args.num_train_prompts)
            train = pool.select(range(args.num_eval_problems, end))
    # Label-free: the trainer never sees an answer.
    return held_out, train.select_columns(["prompt"])


def _evaluate_both(model, tokenizer, problems, args: DemoArguments, stage: str) -> dict[str, Any]:
    from .evaluation import TRUNCATION_WARNING_RATE, evaluate

    common = {
        "max_new_tokens": args.max_completion_length,
        "batch_size": args.eval_batch_size,
        "entropy_temperature": args.temperature,
    }
    greedy = evaluate(model, tokenizer, problems, do_sample=False, seed=args.seed, desc=f"{stage}: greedy", **common)
    sampled = evaluate(
        model,
        tokenizer,
        problems,
        do_sample=True,
        temperature=args.temperature,
        seed=args.seed + 1,
        desc=f"{stage}: sampled T={args.temperature:g}",
        **common,
    )
    for result in (greedy, sampled):
        print(f"[{stage}] {result.summary()}")
        if stage == "before" and result.truncation_rate > TRUNCATION_WARNING_RATE:
            logger.warning(
                "%.1f%% of the base model's answers are cut off at %d tokens: the accuracy change will partly measure "
                "truncation (see the report). Raise `max_completion_length`.",
                100 * result.truncation_rate,
                args.max_completion_length,
            )
    return {"greedy": greedy, "sampled": sampled}


def _train(model, tokenizer, train_prompts, args: DemoArguments):
    from .trainers import EntropyGRPOConfig, EntropyGRPOTrainer

    config = EntropyGRPOConfig(
        output_dir=os.path.join(args.output_dir, "training"),
        entropy_reward=args.entropy_reward,
        temperature=args.temperature,
        learning_rate=args.learning_rate,
        beta=args.beta,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,  # TRL turns it on; a 135M model fits easily and recomputation costs ~30%
    )
    trainer = EntropyGRPOTrainer(model=model, args=config, train_dataset=train_prompts, processing_class=tokenizer)
    try:
        from .callbacks import EntropyStatsCallback
    except ImportError:  # the callback ships with the package; a partial install still trains
        logger.warning("EntropyStatsCallback is not available: no entropy_stats.jsonl, no training plots.")
    else:
        trainer.add_callback(EntropyStatsCallback(trainer))
    if args.collapse_guard:  # after the stats callback, whose repetition rate it reads
        from .collapse_guard import CollapseGuardArguments

        # The probe: 32 arithmetic problems when the task is arithmetic, else the log signals alone.
        trainer.add_callback(CollapseGuardArguments(collapse_guard=True).build(args.task, args.seed))
    trainer.train()
    return trainer


def _training_plots(training_dir: Path) -> list[Path]:
    """The callback's PNGs, drawing them from its JSONL when it did not."""
    plot_dir = training_dir / "entropy_plots"
    pngs = sorted(plot_dir.glob("*.png"))
    if pngs or not (training_dir / "entropy_stats.jsonl").is_file():
        return pngs
    try:
        from .plots import PlotArguments, run_plot

        return run_plot(PlotArguments(stats_file=str(training_dir), output_dir=str(plot_dir)))
    except Exception as err:  # plots are a bonus: a missing matplotlib must not lose the measured results
        logger.warning("Training plots skipped: %s", err)
        return []


def _peak_memory_gb() -> float | None:
    """Peak resident memory of this process in GB (None where the platform does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if platform.system() == "Darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def truncation_warnings(results: dict[str, Any]) -> list[str]:
    """Report lines (a warning paragraph, or nothing) for base-model answers cut off at the budget in more than
    :data:`~trl_entropy.evaluation.TRUNCATION_WARNING_RATE` of the problems: the accuracy change is then partly a
    change in how many answers fit the budget, not in how many are right."""
    from .evaluation import TRUNCATION_WARNING_RATE

    lines = []
    for key in ("greedy", "sampled"):
        entry = results["before"][key]
        rate = entry["truncation_rate"]
        if rate > TRUNCATION_WARNING_RATE:
            lines.append(
                f"**Warning: {rate:.1%} of the base model's {key} answers are cut off at {entry['max_new_tokens']} "
                f"tokens (more than {TRUNCATION_WARNING_RATE:.0%}).** Their accuracy change partly measures whether "
                "answers fit the budget, not whether they are right: rerun with a larger `max_completion_length` "
                "(or `prompt_style='short'`) before reading it as a gain."
            )
    return [*lines, ""] if lines else []


def render_report(results: dict[str, Any], images: list[str]) -> str:
    """Markdown report of a demo run (``results`` as written to ``results.json``)."""
    args = results["args"]
    before, after = results["before"], results["after"]
    n = before["greedy"]["num_problems"]
    temperature = args["temperature"]

    def accuracy(entry: dict) -> str:
        low, high = entry["accuracy_ci95"]
        return f"{entry['accuracy']:.1%} [{low:.1%}, {high:.1%}]"

    def change(key: str, stat: str, fmt: str) -> str:
        delta = after[key][stat] - before[key][stat]
        return format(delta, fmt)

    rows = [
        (
            "Accuracy, greedy",
            accuracy(before["greedy"]),
            accuracy(after["greedy"]),
            change("greedy", "accuracy", "+.1%"),
        ),
        (
            f"Accuracy, sampled at T={temperature:g}",
            accuracy(before["sampled"]),
            accuracy(after["sampled"]),
            change("sampled", "accuracy", "+.1%"),
        ),
    ]
    for key, label in (("greedy", "greedy"), ("sampled", f"sampled T={temperature:g}")):
        rows.append(
            (
                f"Mean token entropy (nats), {label}",
                f"{before[key]['mean_token_entropy']:.3f}",
                f"{after[key]['mean_token_entropy']:.3f}",
                change(key, "mean_token_entropy", "+.3f"),
            )
        )
    budget = before["greedy"].get("max_new_tokens", args["max_completion_length"])
    for key, label in (("greedy", "greedy"), ("sampled", f"sampled T={temperature:g}")):
        rows.append(
            (
                f"Truncated at {budget} tokens, {label}",
                f"{before[key]['truncation_rate']:.1%}",
                f"{after[key]['truncation_rate']:.1%}",
                change(key, "truncation_rate", "+.1%"),
            )
        )
    for key, label in (("greedy", "greedy"), ("sampled", f"sampled T={temperature:g}")):
        rows.append(
            (
                f"Mean completion length (tokens), {label}",
                f"{before[key]['mean_completion_length']:.1f}",
                f"{after[key]['mean_completion_length']:.1f}",
                change(key, "mean_completion_length", "+.1f"),
            )
        )
    table = ["| | Before | After | Change |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    paired = results["paired_change_ci95"]
    timing = results["timing"]
    lines = [
        "# trl-entropy demo: label-free EM-RL",
        "",
        f"Model `{args['model_name_or_path']}`, task `{args['task']}`. EM-RL ({args['entropy_reward']} entropy "
        f"reward, no labels, no reward model) with `EntropyGRPOTrainer`: {args['max_steps']} steps x "
        f"{args['prompts_per_step']} prompts x {args['num_generations']} completions at T={temperature:g}, learning "
        f"rate {args['learning_rate']:g}, beta {args['beta']:g}, at most {args['max_completion_length']} completion "
        "tokens.",
        "",
        f"Held-out evaluation: **{n} problems**, one completion each per decoding setting, at most {budget} tokens "
        f"(prompt style `{args.get('prompt_style', 'open')}`); accuracy with its 95% Wilson interval; truncated: "
        "answers cut off at the budget before their end; token entropy H(softmax(z/T)) of the generated tokens at "
        f"the training temperature T={temperature:g}.",
        "",
        *truncation_warnings(results),
        *table,
        "",
        "Change in accuracy, paired over the same problems (95% percentile bootstrap over problems): "
        f"greedy {paired['greedy'][0]:+.1%} to {paired['greedy'][1]:+.1%}, "
        f"sampled {paired['sampled'][0]:+.1%} to {paired['sampled'][1]:+.1%}.",
        "",
        f"Wall time {timing['total_s'] / 60:.1f} min (training {timing['train_s'] / 60:.1f} min, evaluation "
        f"{timing['eval_s'] / 60:.1f} min); process CPU time {timing['cpu_s'] / 60:.1f} min on "
        f"{timing['num_threads']} torch threads ({timing['machine']})"
        + (f", peak memory {timing['peak_memory_gb']:.1f} GB." if timing.get("peak_memory_gb") else "."),
        "",
        "Labels are used only to grade the held-out problems; training prompts carry no answer.",
        "",
    ]
    clipped = [
        e["completions/clipped_ratio"] for e in results.get("training_log", []) if "completions/clipped_ratio" in e
    ]
    if clipped:
        lines += [
            f"Training completions cut off at {args['max_completion_length']} tokens: {clipped[0]:.1%} at step 1, "
            f"{clipped[-1]:.1%} at step {len(clipped)}, {sum(clipped) / len(clipped):.1%} on average.",
            "",
        ]
    rewards = [entry["reward"] for entry in results.get("training_log", []) if "reward" in entry]
    if rewards:
        lines += [
            f"Training reward (minus the mean token entropy of the sampled completions): {rewards[0]:.3f} at step 1, "
            f"{rewards[-1]:.3f} at step {len(rewards)}.",
            "",
        ]
    if images:
        lines += ["## Entropy", ""]
        lines += [f"![{Path(image).stem}]({image})" for image in images]
        lines.append("")
    examples = results.get("examples", [])
    if examples:
        lines += [f"## Sampled completions (T={temperature:g}), before and after", ""]
        for example in examples:
            lines.append(f"- **{example['question']}** (answer {example['answer']})")
            for stage in ("before", "after"):
                text = " ".join(example[stage].split())
                text = text if len(text) <= 160 else text[:157] + "..."
                lines.append(f"  - {stage}: `{text}`")
        lines.append("")
    return "\n".join(lines)


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """Run the demo: evaluate, train with EM-RL, evaluate again, write ``report.md``, ``results.json`` and PNGs to
    ``args.output_dir``. Returns the results dict (also in ``results.json``)."""
    from transformers import set_seed

    from .evaluation import plot_entropy_histograms
    from .models import load_model

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model_name_or_path)
    held_out, train_prompts = _load_problems(args)

    eval_start = time.perf_counter()
    before = _evaluate_both(model, tokenizer, held_out, args, "before")
    eval_s = time.perf_counter() - eval_start

    train_start = time.perf_counter()
    trainer = _train(model, tokenizer, train_prompts, args)
    train_s = time.perf_counter() - train_start
    model = trainer.model

    eval_start = time.perf_counter()
    after = _evaluate_both(model, tokenizer, held_out, args, "after")
    eval_s += time.perf_counter() - eval_start
    if args.save_model:
        trainer.save_model(str(output_dir / "model"))

    images = [str(p.relative_to(output_dir)) for p in _training_plots(output_dir / "training")]
    try:
        histogram = plot_entropy_histograms(
            {
                "before training": before["sampled"].token_entropies,
                "after training": after["sampled"].token_entropies,
            },
            output_dir / "heldout_entropy_histogram.png",
            title=f"Token entropy of held-out completions, sampled at T={args.temperature:g}",
        )
        images.insert(0, histogram.name)
    except ImportError as err:
        logger.warning("Histogram skipped: %s", err)

    results: dict[str, Any] = {
        "args": asdict(args),
        "before": {k: v.to_dict() for k, v in before.items()},
        "after": {k: v.to_dict() for k, v in after.items()},
        "paired_change_ci95": {
            k: paired_bootstrap_interval(before[k].correct, after[k].correct, seed=args.seed) for k in before
        },
        "timing": {
            "total_s": time.perf_counter() - start_wall,
            "train_s": train_s,
            "eval_s": eval_s,
            "cpu_s": time.process_time() - start_cpu,
            "num_threads": torch.get_num_threads(),
            "peak_memory_gb": _peak_memory_gb(),
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        },
        "training_log": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    samples = [
        {"question": q, "answer": a, "before": b.text, "after": c.text}
        for q, a, b, c in zip(
            held_out["question"], held_out["answer"], before["sampled"].completions, after["sampled"].completions
        )
    ]
    results["examples"] = samples[:4]
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (output_dir / "samples.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    report = output_dir / "report.md"
    report.write_text(render_report(results, images))
    print(f"Report written to {report}")
    return results
