"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU processes (torchrun, gloo); launched by tests/trainers/test_peft_deepspeed.py.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 deepspeed_checks.py OUT_DIR STAGES``
with ``STAGES`` e.g. ``2,3`` (one run per stage, one after the other in the same processes).

Two real training steps of EntropyGRPOTrainer (entropy reward, global forking tokens) under the ZeRO config
``zero<STAGE>.json`` next to this file. Each rank saves what it generated, the rewards TRL logged, every forking-mask
call and a checksum of the (gathered) final weights to ``OUT_DIR/rank<r>_zero<STAGE>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for trainer_utils

from distributed_checks import RecordingGRPOTrainer, StepRewards  # noqa: E402
from trainer_utils import TINY_KWARGS, RecordingReward, tiny_setup  # noqa: E402

from trl_entropy.trainers import EntropyGRPOConfig  # noqa: E402

# Gradient clipping threshold, well above the gradient norms of these two steps (3.3 and 3.0): both paths compute and
# log the norm and clamp the clipping factor to exactly 1, so they apply the same update. With TRL's default of 1.0
# the clipping is active and the two paths scale the gradients by factors a few float32 ulps apart: DDP by
# `max_norm / (norm + 1e-6)` with torch's norm of per-tensor norms, ZeRO-2 by `1 / ((norm + 1e-6) / max_norm)` with the
# sum of squares of each rank's shard norms. test_peft_deepspeed.py says what that does to the weights.
MAX_GRAD_NORM = 100.0


def run_stage(out: Path, stage: int, state: PartialState) -> None:
    model, tokenizer, dataset = tiny_setup()
    initial = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    recorder = RecordingReward()
    args = EntropyGRPOConfig(
        output_dir=str(out / f"zero{stage}"),
        entropy_reward="token",
        reward_weights=[0.0],
        forking_token_ratio=0.2,
        temperature=0.7,
        deepspeed=str(Path(__file__).resolve().parent / f"zero{stage}.json") if stage else None,
        **{**TINY_KWARGS, "max_steps": 2, "learning_rate": 1e-2, "bf16": False, "max_grad_norm": MAX_GRAD_NORM},
    )
    trainer = RecordingGRPOTrainer(
        model, reward_funcs=recorder, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.accelerator.num_processes == 2
    step_rewards = StepRewards(trainer)
    trainer.add_callback(step_rewards)
    trainer.train()
    assert trainer.is_deepspeed_enabled == bool(stage)
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if stage else 0
    # The ZeRO file's `"gradient_clipping": "auto"` must have become the trainer's max_grad_norm.
    clipping = trainer.model_wrapped.gradient_clipping() if stage else args.max_grad_norm
    # ZeRO-3 shards the weights: gather them to compare the ranks.
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
            final = torch.cat([p.detach().reshape(-1).double() for p in unwrapped.parameters()])
    else:
        final = torch.cat([p.detach().reshape(-1).double() for p in unwrapped.parameters()])
    torch.save(
        {
            "zero_stage": zero_stage,
            "max_grad_norm": args.max_grad_norm,
            "gradient_clipping": clipping,
            "prompts": recorder.prompts,
            "completion_ids": recorder.completion_ids,
            "first_rewards": step_rewards.first,
            "log_history": trainer.state.log_history,
            "forking_calls": trainer.forking_calls,
            "initial_params": initial,
            "final_params": final,
        },
        out / f"rank{state.process_index}_zero{stage}.pt",
    )


def main() -> None:
    out = Path(sys.argv[1])
    state = PartialState(cpu=True)
    for stage in sys.argv[2].split(","):
        run_stage(out, int(stage), state)
        state.wait_for_everyone()
    # Tear the process group down, then leave without the interpreter's teardown: at exit, DeepSpeed's and gloo's
    # background threads can abort the process ("terminate called without an active exception", seen on a loaded
    # machine) after every result was written and closed.
    state.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
