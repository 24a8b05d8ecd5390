"""Step time of a user-written entropy reward (declaring ``token_entropy``) against plain GRPO, on the default model.

Variants, interleaved step by step in one run (see _interleave.py), same rule reward and generation settings:
    grpo                 GRPOTrainer with a trivial rule reward (the baseline);
    user_entropy_reward  EntropyGRPOTrainer with the rule reward plus a user-written reward
                         ``def mean_entropy(completions, token_entropy, token_mask, **kwargs)``: the trainer captures
                         the entropies during generation (no extra forward);
    undeclared_reward    EntropyGRPOTrainer with the rule reward plus a user reward that declares no signal
                         (``**kwargs`` only): no signal is computed, so it should cost nothing.
Target: user_entropy_reward paired time ratio <= 1.02.

    nice -n 5 python benchmarks/bench_user_reward.py [--steps 8] [--warmup 2] [--completions 8] [--tokens 32]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import median, print_table, write_results  # noqa: E402
from _interleave import run_interleaved  # noqa: E402
from _overhead import paired_step_config, parse_args, rule_reward  # noqa: E402


def mean_entropy(completions, token_entropy, token_mask, **kwargs):
    """A user's own confidence reward: minus the mean entropy of the tokens the policy generated."""
    return [-h[m].mean().item() if m.any() else None for h, m in zip(token_entropy, token_mask)]


def length_penalty(completions, **kwargs):
    """A user reward that declares no signal."""
    return [-0.001 * len(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


def main() -> None:
    args = parse_args(__doc__)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.models import default_model_path
    from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = ArithmeticTask().dataset(64, "train")
    out = Path("/tmp") / "bench_user_reward"
    common = paired_step_config(args)

    def build(trainer_class, config_class, rewards, tag):
        config = config_class(output_dir=str(out / tag), **common)
        model = AutoModelForCausalLM.from_pretrained(path)
        return trainer_class(model, rewards, config, train_dataset=dataset, processing_class=tokenizer)

    trainers = {
        "grpo": build(GRPOTrainer, GRPOConfig, [rule_reward], "plain"),
        "user_entropy_reward": build(EntropyGRPOTrainer, EntropyGRPOConfig, [rule_reward, mean_entropy], "user"),
        "undeclared_reward": build(EntropyGRPOTrainer, EntropyGRPOConfig, [rule_reward, length_penalty], "none"),
    }
    assert trainers["user_entropy_reward"]._entropy_source() == "generation"
    assert trainers["undeclared_reward"]._entropy_source() is None
    summary = run_interleaved(trainers, warmup=args.warmup)
    base = summary["grpo"]
    rows = [
        {
            "variant": variant,
            "median_step_s": s["median_step_s"],
            "time_ratio": s["median_step_s"] / base["median_step_s"],
            # Step i of every variant sampled the same completions: the per-step ratio cancels slow load drifts.
            "paired_time_ratio": median([t / b for t, b in zip(s["step_seconds"], base["step_seconds"])]),
        }
        for variant, s in summary.items()
    ]
    print_table(rows, ["variant", "median_step_s", "time_ratio", "paired_time_ratio"])
    write_results(
        "bench_user_reward",
        {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "completions_per_step": args.completions,
            "max_completion_tokens": args.tokens,
            "measured_steps": args.steps,
            "warmup_steps": args.warmup,
            "target": "user_entropy_reward paired_time_ratio <= 1.02",
            "results": rows,
            "raw": summary,
        },
    )


if __name__ == "__main__":
    main()
