"""The collapse guard on every rank of a 2-process CPU launch (torchrun, gloo); launched by
tests/callbacks/test_collapse_guard.py.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 collapse_guard_checks.py OUT_DIR``

The two ranks get different probe labels on purpose: rank 0's are the untrained model's own greedy answers (100% at
the start, falling as training moves the answers), rank 1's can never be right (0% throughout, so on its own it would
never fire). The guard takes rank 0's decisions on both ranks; each rank saves what it saw to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for trainer_utils

from trainer_utils import GUARD_LOG_TRIGGERS_OFF as OFF  # noqa: E402
from trainer_utils import TINY_KWARGS, WeightRecorder, tiny_setup  # noqa: E402

from trl_entropy.callbacks.collapse_guard import CollapseGuardCallback  # noqa: E402
from trl_entropy.evaluation import generate_completions  # noqa: E402
from trl_entropy.evaluation.tasks import extract_answer  # noqa: E402
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = PartialState(cpu=True).process_index
    model, tokenizer, dataset = tiny_setup(16)
    prompts = list(dataset["prompt"])
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=6, progress=False)
    answers = [extract_answer(c.text) for c in completions]
    probe = [{"prompt": p, "answer": a if rank == 0 else "999"} for p, a in zip(prompts, answers) if a is not None]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = EntropyGRPOConfig(
        output_dir=str(out / "run"), entropy_reward="token", **{**TINY_KWARGS, "max_steps": 12, "learning_rate": 0.05}
    )
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    recorder = WeightRecorder()
    trainer.add_callback(recorder)
    guard = CollapseGuardCallback(
        probe_problems=probe,
        action="stop_and_restore",
        probe_every=1,
        probe_max_new_tokens=6,
        max_probe_drop=0.2,
        max_probe_time_fraction=None,  # the tiny model's probe costs more than its training steps
        **OFF,
    )
    trainer.add_callback(guard)
    trainer.train()
    best = initial if guard.best_step == 0 else recorder.weights.get(guard.best_step)
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(
        {
            "global_step": trainer.state.global_step,
            "fired_step": guard.fired_step,
            "best_step": guard.best_step,
            "restored_step": guard.restored_step,
            "probe_accuracies": guard.probe_accuracies,
            "restored_equals_best": best is not None and all(torch.equal(final[k], best[k]) for k in best),
            "final": final,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
