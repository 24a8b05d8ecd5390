"""Forking tokens: train only on the highest-entropy 20% of completion tokens (Wang et al., 2025, "Beyond the 80/20
Rule", arXiv 2506.01939).

A verifiable reward (the answer is checked with math-verify) drives GRPO as usual, but the policy-gradient loss keeps
only the exact top-`ceil(rho * n)` entropy tokens of each micro-batch, the "forks" where the model chooses a path; the
loss is renormalised by the number of selected tokens (paper Eq. 6). `forking_token_mode="bottom"` is the paper's
ablation (train on the other 80%), which degrades results.

    python examples/forking_tokens.py                               # embedded SmolLM2-135M-Instruct, 1-2 min on CPU
    python examples/forking_tokens.py --forking_token_ratio 0.5 --forking_token_scope local
"""

from dataclasses import dataclass, field

import torch
from trl import TrlParser

from trl_entropy.evaluation.tasks import ArithmeticTask, accuracy_reward
from trl_entropy.hardware import default_bf16
from trl_entropy.models import load_model
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer


@dataclass
class ExampleArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded), a hub id or a path."})
    num_prompts: int = field(default=64, metadata={"help": "'What is a + b?' training problems (with answers)."})


DEFAULTS = {
    "output_dir": "outputs/forking-tokens",
    "forking_token_ratio": 0.2,  # the paper's rho
    "forking_token_mode": "top",
    "forking_token_normalization": "selected",  # paper Eq. 6; "all" is TRL's top_entropy_quantile scaling
    "temperature": 1.0,
    "beta": 0.0,
    "learning_rate": 2e-5,
    "num_generations": 4,
    "per_device_train_batch_size": 8,
    "max_completion_length": 32,
    "max_steps": 6,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": not torch.cuda.is_available(),  # TRL defaults to bf16, which needs an accelerator
    "bf16": default_bf16(),  # on a CPU, bf16 only where it is native: elsewhere float32 runs several times faster
}


def main(argv=None):
    parser = TrlParser((ExampleArguments, EntropyGRPOConfig))
    parser.set_defaults_with_config(**DEFAULTS)
    example_args, training_args = parser.parse_args_and_config(argv)

    model, tokenizer = load_model(example_args.model_name_or_path)
    # The "answer" column reaches accuracy_reward as a keyword argument.
    problems = ArithmeticTask().dataset(example_args.num_prompts, split="train")
    trainer = EntropyGRPOTrainer(
        model=model,
        reward_funcs=accuracy_reward,
        args=training_args,
        train_dataset=problems,
        processing_class=tokenizer,
    )
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "forking/selected_fraction" in entry]
    fractions = ", ".join(f"{entry['forking/selected_fraction']:.3f}" for entry in logs)
    print(f"fraction of completion tokens that received the gradient at each step: {fractions}")
    accuracy = [
        entry["rewards/accuracy_reward/mean"]
        for entry in trainer.state.log_history
        if "rewards/accuracy_reward/mean" in entry
    ]
    print(f"training accuracy reward: first step {accuracy[0]:.3f}, last step {accuracy[-1]:.3f}")


if __name__ == "__main__":
    main()
