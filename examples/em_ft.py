"""EM-FT: entropy-minimisation fine-tuning (Agarwal et al., 2025, arXiv 2505.15134, section 2).

The model samples one completion per unlabelled prompt and is trained to minimise the mean entropy of its own
next-token distributions over those tokens, differentiated directly: no labels, no rewards, no policy gradient.
`emft/entropy_before` and `emft/entropy_after` are the batch's entropy before and after each optimizer step.

    python examples/em_ft.py                                        # embedded SmolLM2-135M-Instruct, 1-2 min on CPU
    python examples/em_ft.py --entropy_floor 0.2 --beta 0.01        # guards against collapse for longer runs

Every EMFTConfig option is a command-line flag: see `--help`.
"""

from dataclasses import dataclass, field

import torch
from trl import TrlParser

from trl_entropy.evaluation.tasks import ArithmeticTask
from trl_entropy.hardware import default_bf16
from trl_entropy.models import load_model
from trl_entropy.trainers.emft import EMFTConfig, EMFTTrainer


@dataclass
class ExampleArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded), a hub id or a path."})
    num_prompts: int = field(default=64, metadata={"help": "Unlabelled 'What is a + b?' prompts."})


DEFAULTS = {
    "output_dir": "outputs/em-ft",
    "num_samples_per_prompt": 2,  # the paper samples one; TRL 1.16's GRPOConfig needs >= 2
    "temperature": 1.0,
    "learning_rate": 1e-5,
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
    parser = TrlParser((ExampleArguments, EMFTConfig))
    parser.set_defaults_with_config(**DEFAULTS)
    example_args, training_args = parser.parse_args_and_config(argv)

    model, tokenizer = load_model(example_args.model_name_or_path)
    prompts = ArithmeticTask().dataset(example_args.num_prompts, split="train").select_columns(["prompt"])
    trainer = EMFTTrainer(model=model, args=training_args, train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

    for entry in trainer.state.log_history:
        if "emft/entropy_before" in entry:
            print(
                f"step {entry['step']}: entropy {entry['emft/entropy_before']:.3f} -> "
                f"{entry.get('emft/entropy_after', float('nan')):.3f} nats across the optimizer step"
            )


if __name__ == "__main__":
    main()
