"""Step time and peak memory of an EM-FT training step against an SFT step of the same token count.

Both run on the embedded SmolLM2-135M-Instruct through the same transformers ``Trainer`` loop (same AdamW, same
precision, same gradient-checkpointing setting), on ``--batch`` ArithmeticTask prompts:

* **EM-FT** (:class:`trl_entropy.trainers.emft.EMFTTrainer`): sample ``--completion-length`` tokens per prompt
  (``min_new_tokens`` pins the length so the token count is fixed), then minimise their mean token entropy. The step
  is split into *generation* (sampling and batching), *optimisation* (entropy loss forward + backward + optimizer
  step) and the optional *entropy-after* pass (one forward without gradient, ``log_entropy_after=True``).
* **SFT** (TRL ``SFTTrainer``): cross-entropy on the same prompts followed by ``--completion-length`` completion
  tokens (random token ids: a dense model's cost does not depend on which tokens they are), loss on the completion
  only. Same ``batch x (prompt + completion)`` tokens per step.

Each measurement runs in a fresh subprocess, so the peak RSS it reports belongs to that variant alone; "peak extra"
is the peak RSS minus the RSS once the model and trainer are built (it includes the AdamW state, allocated on the
first step, for both variants). The variants are interleaved over ``--repeats``; each child runs one warm-up step
then ``--steps`` timed steps and reports medians. The machine load average is recorded, because a shared CPU box
slows both variants alike but adds noise.

    python benchmarks/bench_emft.py [--batch 8] [--completion-length 32] [--steps 3] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_mib, median, peak_rss_mib, print_table, write_results  # noqa: E402

VARIANTS = ("emft", "sft")


def _common_args(output_dir: str, args) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=1e-6,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=args.gradient_checkpointing,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )


def _step_timer():
    """A callback that records the wall time of every optimizer step (``on_step_begin`` to ``on_step_end``)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def run_emft(args, output_dir: str) -> dict:
    from transformers import TrainerCallback

    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.models import load_default_model
    from trl_entropy.trainers.emft import EMFTConfig, EMFTTrainer

    class TimedEMFTTrainer(EMFTTrainer):
        """Accumulates the seconds spent in sampling and in the entropy-after pass of each step."""

        phase_seconds = {"generation": 0.0, "entropy_after": 0.0}

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.phase_seconds["generation"] += time.perf_counter() - start

        def _window_entropy_after(self):
            start = time.perf_counter()
            try:
                return super()._window_entropy_after()
            finally:
                self.phase_seconds["entropy_after"] += time.perf_counter() - start

    model, tokenizer = load_default_model()
    prompts = ArithmeticTask().dataset(args.batch * (args.steps + 1), split="train")
    config = EMFTConfig(
        **_common_args(output_dir, args),
        max_completion_length=args.completion_length,
        generation_kwargs={"min_new_tokens": args.completion_length},
        log_entropy_after=True,
    )
    timer = _step_timer()
    trainer = TimedEMFTTrainer(
        model, args=config, train_dataset=prompts, processing_class=tokenizer, callbacks=[timer]
    )

    phases = []

    class PhaseSplitter(TrainerCallback):
        """Closes each step's phase times; added after the step timer, so it runs after it."""

        def on_step_end(self, args_, state, control, **kwargs):
            phases.append(dict(trainer.phase_seconds))
            trainer.phase_seconds.update(generation=0.0, entropy_after=0.0)

    trainer.add_callback(PhaseSplitter())
    tokens = []
    original = trainer._compute_loss

    def counting_compute_loss(model_, inputs):
        tokens.append(int(inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()))
        return original(model_, inputs)

    trainer._compute_loss = counting_compute_loss
    baseline = current_rss_mib()
    trainer.train()
    peak_extra = peak_rss_mib() - baseline

    rows = []
    for total, phase, n_tokens in list(zip(timer.seconds, phases, tokens))[1:]:  # drop the warm-up step
        optimisation = total - phase["generation"] - phase["entropy_after"]
        rows.append(
            {
                "total_s": total,
                "optimisation_s": optimisation,
                "tokens": n_tokens,
                **{f"{k}_s": v for k, v in phase.items()},
            }
        )
    return {
        "step_s": median([r["total_s"] for r in rows]),
        "generation_s": median([r["generation_s"] for r in rows]),
        "optimisation_s": median([r["optimisation_s"] for r in rows]),
        "entropy_after_s": median([r["entropy_after_s"] for r in rows]),
        "tokens_per_step": median([r["tokens"] for r in rows]),
        "peak_extra_mib": peak_extra,
    }


def run_sft(args, output_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.models import load_default_model

    model, tokenizer = load_default_model()
    prompts = ArithmeticTask().dataset(args.batch * (args.steps + 1), split="train")["prompt"]
    generator = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "labels": []}
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        completion = torch.randint(0, len(tokenizer), (args.completion_length,), generator=generator).tolist()
        rows["input_ids"].append(list(prompt_ids) + completion)
        rows["labels"].append([-100] * len(prompt_ids) + completion)
    config = SFTConfig(**_common_args(output_dir, args))
    timer = _step_timer()
    trainer = SFTTrainer(
        model, args=config, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer, callbacks=[timer]
    )
    tokens = []
    original = trainer.compute_loss

    def counting_compute_loss(model_, inputs, *a, **kw):
        tokens.append(int(inputs["input_ids"].numel()))
        return original(model_, inputs, *a, **kw)

    trainer.compute_loss = counting_compute_loss
    baseline = current_rss_mib()
    trainer.train()
    peak_extra = peak_rss_mib() - baseline
    steps = timer.seconds[1:]
    return {
        "step_s": median(steps),
        "optimisation_s": median(steps),
        "tokens_per_step": median(tokens[1:]),
        "peak_extra_mib": peak_extra,
    }


def child(variant: str, args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output_dir:
        result = (run_emft if variant == "emft" else run_sft)(args, output_dir)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="prompts (= completions) per step")
    parser.add_argument("--completion-length", type=int, default=32, help="completion tokens per prompt")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="enable it in both variants")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return

    from tqdm import tqdm

    forwarded = ["--batch", str(args.batch), "--completion-length", str(args.completion_length)]
    forwarded += ["--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
    forwarded += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    schedule = [v for _ in range(args.repeats) for v in VARIANTS]  # interleaved: emft, sft, emft, sft, ...
    for variant in tqdm(schedule, desc="runs"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, *forwarded], capture_output=True, text=True, env=env
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"{variant} run failed:\n{out.stderr[-4000:]}")
        runs[variant].append(json.loads(lines[-1][len("RESULT ") :]))

    summary = {}
    for variant, results in runs.items():
        summary[variant] = {key: median([r[key] for r in results]) for key in results[0]}
    emft, sft = summary["emft"], summary["sft"]
    ratios = {
        "emft_step_over_sft_step": emft["step_s"] / sft["step_s"],
        "emft_optimisation_over_sft_step": emft["optimisation_s"] / sft["step_s"],
        "emft_generation_share_of_step": emft["generation_s"] / emft["step_s"],
        "emft_peak_over_sft_peak": emft["peak_extra_mib"] / sft["peak_extra_mib"],
    }
    rows = [
        {
            "variant": "EM-FT",
            "step_s": emft["step_s"],
            "generation_s": emft["generation_s"],
            "optimisation_s": emft["optimisation_s"],
            "entropy_after_s": emft["entropy_after_s"],
            "tokens/step": int(emft["tokens_per_step"]),
            "peak_extra_MiB": emft["peak_extra_mib"],
        },
        {
            "variant": "SFT",
            "step_s": sft["step_s"],
            "generation_s": 0.0,
            "optimisation_s": sft["optimisation_s"],
            "entropy_after_s": 0.0,
            "tokens/step": int(sft["tokens_per_step"]),
            "peak_extra_MiB": sft["peak_extra_mib"],
        },
    ]
    print_table(rows, list(rows[0]))
    print("\n".join(f"{k}: {v:.3g}" for k, v in ratios.items()))
    import torch

    write_results(
        "bench_emft",
        {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "settings": {
                "batch": args.batch,
                "completion_length": args.completion_length,
                "timed_steps_per_run": args.steps,
                "repeats": args.repeats,
                "threads": args.threads or torch.get_num_threads(),
                "gradient_checkpointing": args.gradient_checkpointing,
                "precision": "float32",
                "device": "cpu",
                "cpu_count": os.cpu_count(),
                "load_average_before_after": [load_before, os.getloadavg()[0]],
            },
            "summary": summary,
            "ratios": ratios,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
