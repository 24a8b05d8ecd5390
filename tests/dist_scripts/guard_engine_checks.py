"""The collapse guard's restore under DDP, DeepSpeed ZeRO-2 and ZeRO-3, for GRPO, RLOO and EM-FT, on 2 CPU processes
(torchrun, gloo); launched by tests/callbacks/test_collapse_guard.py.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 guard_engine_checks.py OUT_DIR STAGES KINDS``
with ``STAGES`` e.g. ``0,2,3`` (0: plain DDP) and ``KINDS`` e.g. ``grpo,rloo,emft``.

Each run: the probe's labels are the untrained model's own greedy answers (100% at step 0, falling as training moves
the answers), so the guard fires and restores. A checkpoint is saved every step, so the firing step's checkpoint is
written after the restore; a second trainer resumes from it for 2 more steps, without the guard. Each rank saves what
it saw to ``OUT_DIR/<kind>_zero<STAGE>_rank<r>.pt``: the guard's steps, the weights after the restore (gathered), the
optimizer's fp32 master values and Adam moments after the restore (DeepSpeed), the best step's recorded weights and
the resumed run's final weights. The weight recorder gathers ZeRO-3 parameters at every step end, as users' callbacks
do (EM-FT's post-step entropy forward used to leave parameters in flight there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for trainer_utils

from trainer_utils import GUARD_LOG_TRIGGERS_OFF as OFF  # noqa: E402
from trainer_utils import TINY_KWARGS, tiny_setup  # noqa: E402

from trl_entropy.callbacks.collapse_guard import CollapseGuardCallback  # noqa: E402
from trl_entropy.evaluation import generate_completions  # noqa: E402
from trl_entropy.evaluation.tasks import extract_answer  # noqa: E402
from trl_entropy.trainers import (  # noqa: E402
    EMFTConfig,
    EMFTTrainer,
    EntropyGRPOConfig,
    EntropyGRPOTrainer,
    EntropyRLOOConfig,
    EntropyRLOOTrainer,
)

HERE = Path(__file__).resolve().parent


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered under ZeRO-3), by name, on CPU."""
    parameters = dict(model.named_parameters())
    if any(hasattr(p, "ds_id") for p in parameters.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(parameters.values())):
            return {n: p.detach().to("cpu", copy=True) for n, p in parameters.items()}
    return {n: p.detach().to("cpu", copy=True) for n, p in parameters.items()}


class GatheringWeightRecorder(TrainerCallback):
    """Keeps every step's weights, gathering ZeRO-3 parameters (``GatheredParameters``) at each step end."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = full_parameters(model)


def build(kind: str, out: Path, stage: int, max_steps: int, callbacks):
    model, tokenizer, dataset = tiny_setup(16)
    common = {
        **TINY_KWARGS,
        "max_steps": max_steps,
        "learning_rate": 0.05,
        "bf16": False,
        "save_strategy": "steps",
        "save_steps": 1,
        "deepspeed": str(HERE / f"zero{stage}.json") if stage else None,
    }
    if kind == "emft":
        common.pop("num_generations")
        args = EMFTConfig(output_dir=str(out), log_entropy_after=True, **common)
        trainer = EMFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    elif kind == "rloo":
        args = EntropyRLOOConfig(output_dir=str(out), entropy_reward="token", beta=0.0, **common)
        trainer = EntropyRLOOTrainer(
            model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
    else:
        args = EntropyGRPOConfig(output_dir=str(out), entropy_reward="token", **common)
        trainer = EntropyGRPOTrainer(
            model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
    return model, tokenizer, dataset, trainer


def master_values(model) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master value of every trainable parameter (empty without DeepSpeed)."""
    parameters = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None for p in parameters.values()):
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).cpu() for n, p in parameters.items() if p.requires_grad}


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The state tensors of the torch optimizer inside accelerate's and DeepSpeed's wrappers."""
    tensors = []
    while optimizer is not None:
        if isinstance(optimizer, torch.optim.Optimizer):
            tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        optimizer = getattr(optimizer, "optimizer", None)
    return tensors


def run(kind: str, stage: int, out: Path, rank: int) -> dict:
    folder = out / f"{kind}_zero{stage}"
    recorder = GatheringWeightRecorder()
    model, tokenizer, dataset = tiny_setup(16)
    prompts = list(dataset["prompt"])
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=6, progress=False)
    probe = [{"prompt": p, "answer": extract_answer(c.text)} for p, c in zip(prompts, completions)]
    probe = [row for row in probe if row["answer"] is not None]
    guard = CollapseGuardCallback(
        probe_problems=probe,
        action="stop_and_restore",
        probe_every=1,
        probe_max_new_tokens=6,
        max_probe_drop=0.2,
        max_probe_time_fraction=None,
        **OFF,
    )
    model, tokenizer, dataset, trainer = build(kind, folder / "guarded", stage, 6, [recorder, guard])
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    restored = full_parameters(trainer.model)
    master = master_values(trainer.model)
    state_tensors = optimizer_state_tensors(trainer.optimizer)
    best = initial if guard.best_step == 0 else recorder.weights.get(guard.best_step)
    checkpoint = folder / "guarded" / f"checkpoint-{guard.fired_step}"

    # Resume from the firing step's checkpoint (written after the restore) for 2 more steps, without the guard.
    _, _, _, resumed = build(kind, folder / "resumed", stage, (guard.fired_step or 0) + 2, [])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    return {
        "stage": stage,
        "kind": kind,
        "fired_step": guard.fired_step,
        "best_step": guard.best_step,
        "restored_step": guard.restored_step,
        "global_step": trainer.state.global_step,
        "probe_accuracies": guard.probe_accuracies,
        "restored": restored,
        "best": best,
        "fired_weights": recorder.weights.get(guard.fired_step),
        "master": master,
        "optimizer_state_tensors": len(state_tensors),
        "optimizer_state_zero": all(not t.any() for t in state_tensors),
        "checkpoint": str(checkpoint),
        "resumed_step": resumed.state.global_step,
        "resumed": full_parameters(resumed.model),
    }


def main() -> None:
    out = Path(sys.argv[1])
    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    for stage in (int(s) for s in sys.argv[2].split(",")):
        for kind in sys.argv[3].split(","):
            result = run(kind, stage, out, state.process_index)
            torch.save(result, out / f"{kind}_zero{stage}_rank{state.process_index}.pt")
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
