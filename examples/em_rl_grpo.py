"""EM-RL with GRPO: label-free reinforcement learning whose only reward is the model's own confidence.

Each prompt gets `num_generations` sampled completions; the reward of a completion is minus the mean entropy of the
model's next-token distributions over its tokens (EM-RL-token, Agarwal et al., 2025, arXiv 2505.15134), and GRPO
turns rewards into advantages against the group mean. No answer is ever read: the training prompts carry no label.

    python examples/em_rl_grpo.py                                   # embedded SmolLM2-135M-Instruct, 1-2 min on CPU
    python examples/em_rl_grpo.py --model_name_or_path Qwen/Qwen2.5-Math-1.5B --max_steps 200 --bf16 true

Every EntropyGRPOConfig option (TRL's GRPOConfig plus the entropy fields) is a command-line flag: see `--help`.
"""

from dataclasses import dataclass, field

import torch
from trl import TrlParser

from trl_entropy.evaluation.tasks import ArithmeticTask
from trl_entropy.hardware import default_bf16
from trl_entropy.models import load_model
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer


@dataclass
class ExampleArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded), a hub id or a path."})
    num_prompts: int = field(default=64, metadata={"help": "Unlabelled 'What is a + b?' training prompts."})


# Small settings for a CPU: every one can be overridden on the command line or in a --config YAML file.
DEFAULTS = {
    "output_dir": "outputs/em-rl-grpo",
    "entropy_reward": "token",  # EM-RL-token; "trajectory" is EM-RL-sequence
    "temperature": 1.0,  # the entropy reward is measured at the sampling temperature
    "beta": 0.0,  # no KL reference model: faster on a CPU (the paper uses 0.001)
    "learning_rate": 2e-5,
    "num_generations": 4,
    "per_device_train_batch_size": 8,  # 2 prompts x 4 completions per step
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
    prompts = ArithmeticTask().dataset(example_args.num_prompts, split="train").select_columns(["prompt"])
    # The trainer attaches EntropyStatsCallback itself (entropy quantiles, JSONL and PNG plots in output_dir).
    trainer = EntropyGRPOTrainer(model=model, args=training_args, train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "entropy" in entry]
    print(f"mean token entropy: first step {logs[0]['entropy']:.3f} nats, last step {logs[-1]['entropy']:.3f} nats")
    print(f"entropy statistics and plots in {training_args.output_dir}")


if __name__ == "__main__":
    main()
