"""Shared body of bench_grpo_overhead.py and bench_rloo_overhead.py: build the variants, interleave, report."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import median, print_table, write_results
from _interleave import run_interleaved


def rule_reward(completions, **kwargs):
    """A trivial verifiable-style reward: does the completion contain a digit."""
    text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in text]


def make_naive_entropy_reward(model, tokenizer, temperature: float):
    """A reward function that recomputes the mean token entropy with one extra forward pass: what a user writes
    without trl-entropy, since reward functions never see the policy's logits."""
    from trl_entropy import masked_sequence_reduce, token_entropy

    @torch.no_grad()
    def naive_entropy(prompts, completion_ids, **kwargs):
        prompt_ids = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts
        ]
        width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
        rows, attention = [], []
        for p, c in zip(prompt_ids, completion_ids):
            pad = width - len(p) - len(c)
            rows.append(list(p) + list(c) + [tokenizer.pad_token_id] * pad)
            attention.append([1] * (len(p) + len(c)) + [0] * pad)
        logits = model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(attention)).logits
        entropy = token_entropy(logits[:, :-1], temperature)
        mask = torch.zeros_like(entropy)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1
        return (-masked_sequence_reduce(entropy, mask)).tolist()

    naive_entropy.__name__ = "naive_entropy"
    return naive_entropy


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="first steps per variant left out")
    parser.add_argument("--completions", type=int, default=8, help="completions per step")
    parser.add_argument("--tokens", type=int, default=32, help="max completion tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def paired_step_config(args: argparse.Namespace) -> dict:
    """Trainer-config fields of a paired step-time run: learning rate 0 (every variant keeps the same weights and so
    samples the same completions), one completion group per step, no logging or saving overhead, CPU fp32."""
    return dict(
        per_device_train_batch_size=args.completions,
        num_generations=args.completions,
        max_completion_length=args.tokens,
        max_steps=args.warmup + args.steps,
        learning_rate=0.0,
        temperature=1.0,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL would otherwise autocast to bf16 on CPU
        seed=0,
        disable_tqdm=True,
    )


def run_overhead(name: str, family: str, args: argparse.Namespace) -> None:
    """Interleave plain TRL, the entropy reward, the forking mask and the naive extra-forward reward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.models import default_model_path
    from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

    plain_config, plain_trainer, entropy_config, entropy_trainer = {
        "grpo": (GRPOConfig, GRPOTrainer, EntropyGRPOConfig, EntropyGRPOTrainer),
        "rloo": (RLOOConfig, RLOOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer),
    }[family]
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = ArithmeticTask().dataset(64, "train")
    out = Path("/tmp") / name
    common = paired_step_config(args)

    def model():
        return AutoModelForCausalLM.from_pretrained(path)

    def build(trainer_class, config_class, reward, tag, **extra):
        config = config_class(output_dir=str(out / tag), **common, **extra)
        return trainer_class(model(), reward, config, train_dataset=dataset, processing_class=tokenizer)

    trainers = {
        family: build(plain_trainer, plain_config, rule_reward, "plain"),
        # The statistics callback off: the rows measure the reward and the mask (bench_callback measures the callback).
        "em_token": build(entropy_trainer, entropy_config, None, "em", entropy_reward="token", entropy_stats=False),
        "forking_0.2": build(
            entropy_trainer, entropy_config, rule_reward, "fork", forking_token_ratio=0.2, entropy_stats=False
        ),
    }
    naive = build(plain_trainer, plain_config, rule_reward, "naive")  # reward replaced below: it needs the model
    naive_reward = make_naive_entropy_reward(naive.model, tokenizer, 1.0)
    naive.reward_funcs[0] = naive_reward
    naive.reward_func_names[0] = naive_reward.__name__
    trainers["naive_extra_forward"] = naive

    summary = run_interleaved(trainers, warmup=args.warmup)
    base = summary[family]
    rows = [
        {
            "variant": variant,
            "median_step_s": s["median_step_s"],
            "time_ratio": s["median_step_s"] / base["median_step_s"],
            # Step i of every variant sampled the same completions: the per-step ratio cancels slow load drifts.
            "paired_time_ratio": median([t / b for t, b in zip(s["step_seconds"], base["step_seconds"])]),
            "median_step_extra_mib": s["median_step_extra_mib"],
            "memory_ratio": s["median_step_extra_mib"] / max(base["median_step_extra_mib"], 1e-9),
        }
        for variant, s in summary.items()
    ]
    print_table(
        rows, ["variant", "median_step_s", "time_ratio", "paired_time_ratio", "median_step_extra_mib", "memory_ratio"]
    )
    write_results(
        name,
        {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "completions_per_step": args.completions,
            "max_completion_tokens": args.tokens,
            "measured_steps": args.steps,
            "warmup_steps": args.warmup,
            "results": rows,
            "raw": summary,
        },
    )
