"""EM-RL with RLOO, the estimator of the official EM-RL code (Agarwal et al., 2025, arXiv 2505.15134).

The reward is the model's confidence, minus the mean token entropy of each sampled completion; RLOO's advantage is a
completion's reward minus the mean reward of the *other* completions of its prompt. No labels are used.

    python examples/em_rl_rloo.py                                   # embedded SmolLM2-135M-Instruct, 1-2 min on CPU
    python examples/em_rl_rloo.py --model_name_or_path Qwen/Qwen2.5-Math-7B --learning_rate 1e-6 --bf16 true

The paper's KL (coefficient 0.001, verl's per-token `low_var_kl` loss term) has no RLOO counterpart in TRL: RLOO's
`--beta` subtracts `beta * sum_t (log pi_old - log pi_ref)` from each completion's reward, a summed log-ratio that
grows with length against a length-normalised entropy reward. So `beta` stays 0.0 here (RLOOConfig's default is 0.05);
for the paper's per-token KL use EntropyGRPOTrainer with `beta=0.001` (docs/methods/em_rl.md, "The KL term").

Every EntropyRLOOConfig option (TRL's RLOOConfig plus the entropy fields) is a command-line flag: see `--help`.
"""

from dataclasses import dataclass, field

import torch
from trl import TrlParser

from trl_entropy.evaluation.tasks import ArithmeticTask
from trl_entropy.hardware import default_bf16
from trl_entropy.models import load_model
from trl_entropy.trainers import EntropyRLOOConfig, EntropyRLOOTrainer


@dataclass
class ExampleArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded), a hub id or a path."})
    num_prompts: int = field(default=64, metadata={"help": "Unlabelled 'What is a + b?' training prompts."})


DEFAULTS = {
    "output_dir": "outputs/em-rl-rloo",
    "entropy_reward": "token",
    "temperature": 1.0,  # the paper's rollout temperature
    "beta": 0.0,  # RLOO's beta is a summed log-ratio reward penalty, not the paper's per-token KL: keep it off
    "learning_rate": 2e-5,
    "num_generations": 4,  # the paper samples 4 completions per prompt
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
    parser = TrlParser((ExampleArguments, EntropyRLOOConfig))
    parser.set_defaults_with_config(**DEFAULTS)
    example_args, training_args = parser.parse_args_and_config(argv)

    model, tokenizer = load_model(example_args.model_name_or_path)
    prompts = ArithmeticTask().dataset(example_args.num_prompts, split="train").select_columns(["prompt"])
    trainer = EntropyRLOOTrainer(model=model, args=training_args, train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

    rewards = [
        entry["rewards/entropy_token/mean"]
        for entry in trainer.state.log_history
        if "rewards/entropy_token/mean" in entry
    ]
    print(f"entropy reward (minus mean token entropy): first step {rewards[0]:.3f}, last step {rewards[-1]:.3f}")


if __name__ == "__main__":
    main()
