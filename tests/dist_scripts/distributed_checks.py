"""Checks run on every rank of a multi-process CPU launch (torchrun, gloo); launched by
tests/trainers/test_distributed.py.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_checks.py OUT_DIR``

Each check saves what it observed on this rank to ``OUT_DIR/rank<r>_<check>.pt``; the test recomputes the same
quantities in one process on the concatenated data and compares. Every check runs on every rank in the same order,
so the collectives inside the trainers stay matched. A failure raises, which makes torchrun exit non-zero.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for trainer_utils

from trainer_utils import TINY_KWARGS, RecordingReward, tiny_setup  # noqa: E402

from trl_entropy.callbacks import EntropyStatsCallback  # noqa: E402
from trl_entropy.trainers import (  # noqa: E402
    EntropyGRPOConfig,
    EntropyGRPOTrainer,
    EntropyRLOOConfig,
    EntropyRLOOTrainer,
)

VOCAB_LOG = math.log(57)

# Direct calls of `forking_token_weights`: per-rank shapes [B, T] (ranks may differ), value kind and ranks whose mask
# is all zeros. The data of every rank comes from one seeded generator, so both ranks could rebuild it; they save it.
DIRECT_CASES = [
    dict(name="continuous", ratio=0.2, mode="top", norm="selected", scope="global", shapes=[(3, 7), (2, 5)]),
    dict(name="ties", ratio=0.3, mode="top", norm="all", scope="global", shapes=[(2, 6), (3, 6)], ties=True),
    dict(name="bottom", ratio=0.2, mode="bottom", norm="selected", scope="global", shapes=[(2, 6), (2, 4)]),
    dict(name="rank1_empty", ratio=0.2, mode="top", norm="selected", scope="global", shapes=[(2, 6), (2, 6)],
         empty=[1]),
    dict(name="rank0_empty_narrow", ratio=0.5, mode="top", norm="selected", scope="global", shapes=[(1, 1), (3, 5)],
         empty=[0]),
    dict(name="all_empty", ratio=0.2, mode="top", norm="selected", scope="global", shapes=[(2, 3), (2, 3)],
         empty=[0, 1]),
    dict(name="nan_tokens", ratio=0.25, mode="top", norm="selected", scope="global", shapes=[(3, 6), (2, 6)],
         nan=True),
    dict(name="local", ratio=0.2, mode="top", norm="selected", scope="local", shapes=[(3, 7), (2, 5)]),
]  # fmt: skip


def case_data(case: dict, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Entropies and right-padded masks of every rank for one case."""
    g = torch.Generator().manual_seed(1000 + index)
    data = []
    for rank, (rows, width) in enumerate(case["shapes"]):
        if case.get("ties"):
            entropies = torch.randint(0, 4, (rows, width), generator=g).float() / 2
        else:
            entropies = torch.rand(rows, width, generator=g) * VOCAB_LOG
        lengths = torch.randint(1, width + 1, (rows,), generator=g)
        mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
        if rank in case.get("empty", []):
            mask.zero_()
        if case.get("nan") and rank == 0:
            entropies[0, 0] = float("nan")
            entropies[1, 1] = float("nan")
        data.append((entropies, mask))
    return data


class RecordingGRPOTrainer(EntropyGRPOTrainer):
    """Keeps every forking-mask call (inputs and weights) of this rank."""

    def forking_token_weights(self, entropies, mask):
        weights = super().forking_token_weights(entropies, mask)
        self.__dict__.setdefault("forking_calls", []).append(
            (entropies.detach().clone(), mask.detach().clone(), weights.detach().clone())
        )
        return weights


class SignalRecorder(TrainerCallback):
    """An observer of the trainer's per-token signals: keeps this rank's training batches (what the stats callback
    sees)."""

    requested_signals = ("token_entropy",)

    def __init__(self):
        self.batches = []

    def on_signals(self, signals, trainer):
        if trainer.model.training:
            entropies, mask = signals.padded("token_entropy")
            self.batches.append((entropies, mask, None))


class RecordingRLOOTrainer(EntropyRLOOTrainer):
    def forking_token_selection(self, entropies, mask):
        selected, n_valid, n_selected = super().forking_token_selection(entropies, mask)
        self.__dict__.setdefault("forking_calls", []).append(
            (entropies.detach().clone(), mask.detach().clone(), selected.detach().clone().float())
        )
        return selected, n_valid, n_selected


class StepRewards(TrainerCallback):
    """Copies the (all-rank) entropy rewards TRL logged for the first generation batch before later steps drop them."""

    def __init__(self, trainer):
        self.trainer, self.first = trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first is None:
            self.first = {k: list(v) for k, v in self.trainer._logs["rewards"].items()}


def param_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def grad_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in model.parameters()]
    )


def save(out: Path, state: PartialState, name: str, payload: dict) -> None:
    torch.save(payload, out / f"rank{state.process_index}_{name}.pt")


def check_forking_direct(out: Path, state: PartialState) -> None:
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(
        output_dir=str(out / "direct"), entropy_reward="token", forking_token_ratio=0.2, **TINY_KWARGS
    )
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    trainer.model.train()
    results = {}
    for index, case in enumerate(DIRECT_CASES):
        trainer.args.forking_token_ratio = case["ratio"]
        trainer.args.forking_token_mode = case["mode"]
        trainer.args.forking_token_normalization = case["norm"]
        trainer.args.forking_token_scope = case["scope"]
        entropies, mask = case_data(case, index)[state.process_index]
        metrics = trainer._metrics["train"]
        n_min_before = len(metrics["forking/min_selected_entropy"])
        weights = trainer.forking_token_weights(entropies, mask)
        min_logged = metrics["forking/min_selected_entropy"][n_min_before:]
        results[case["name"]] = {
            "settings": {key: case[key] for key in ("ratio", "mode", "norm", "scope")},
            "entropies": entropies,
            "mask": mask,
            "weights": weights,
            "selected_fraction": metrics["forking/selected_fraction"][-1],
            "min_selected_entropy": min_logged[-1] if min_logged else None,
        }
    save(out, state, "forking_direct", results)


def scored_batch(trainer, dataset, rank: int) -> dict:
    inputs = [dataset[rank]] * trainer.num_generations  # one prompt per rank, all its generations
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this check does not run
    return trainer._generate_and_score_completions(inputs)


def check_scored_loss(out: Path, state: PartialState) -> None:
    """One scored micro-batch per rank, the trainer's loss and its gradient averaged over ranks (what DDP applies)."""
    results = {}
    for kind in ("grpo", "rloo"):
        for empty_rank1 in (False, True):
            model, tokenizer, dataset = tiny_setup()
            # float64: the float32 gradient of this near-uniform tiny model carries ~1e-3 relative rounding error
            # whatever the batching, which would hide a small normalisation error.
            model.double()
            common = dict(entropy_reward="token", forking_token_ratio=0.2, forking_token_scope="global")
            if kind == "grpo":
                args = EntropyGRPOConfig(output_dir=str(out / "loss"), **common, **TINY_KWARGS)
                trainer = RecordingGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
            else:
                args = EntropyRLOOConfig(output_dir=str(out / "loss"), **common, **{**TINY_KWARGS, "beta": 0.0})
                trainer = RecordingRLOOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
            batch = scored_batch(trainer, dataset, state.process_index)
            if empty_rank1:
                # As `mask_truncated_completions` does to a micro-batch whose completions were all cut off.
                if state.process_index == 1:
                    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
                if "num_items_in_batch" in batch:
                    local = batch["completion_mask"].sum()
                    batch["num_items_in_batch"] = trainer.accelerator.gather(local.reshape(1)).sum()
                if "old_logps" in batch:  # RLOO's sequence old log-prob, as TRL computes it under that mask
                    batch["old_logps"] = (batch["old_per_token_logps"] * batch["completion_mask"]).sum(1)
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
            local_grad = grad_vector(trainer.model)
            mean_grad = trainer.accelerator.reduce(local_grad.clone(), reduction="mean")
            keep = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            results[(kind, empty_rank1)] = {
                "batch": keep,
                "loss": loss.item(),
                "local_grad": local_grad,
                "mean_grad": mean_grad,
                "forking_calls": trainer.forking_calls,
            }
    save(out, state, "scored_loss", results)


def check_train_run(out: Path, state: PartialState) -> None:
    """Two real training steps: entropy reward, global forking tokens, the stats callback and a checkpoint."""
    model, tokenizer, dataset = tiny_setup()
    initial = param_vector(model)
    recorder = RecordingReward()
    args = EntropyGRPOConfig(
        output_dir=str(out / "train_run"),
        entropy_reward="token",
        reward_weights=[0.0],
        forking_token_ratio=0.2,
        temperature=0.7,
        **{**TINY_KWARGS, "max_steps": 2, "learning_rate": 1e-2, "save_strategy": "steps", "save_steps": 2},
    )
    trainer = RecordingGRPOTrainer(
        model, reward_funcs=recorder, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    step_rewards = StepRewards(trainer)
    trainer.add_callback(step_rewards)
    signal_recorder = SignalRecorder()
    trainer.add_callback(signal_recorder)
    trainer.add_callback(EntropyStatsCallback(trainer, plot_on_train_end=False))
    trainer.train()
    save(
        out,
        state,
        "train_run",
        {
            "prompts": recorder.prompts,
            "completion_ids": recorder.completion_ids,
            "first_rewards": step_rewards.first,
            "log_history": trainer.state.log_history,
            "forking_calls": trainer.forking_calls,
            "observed_signals": signal_recorder.batches,
            "initial_params": initial,
            "final_params": param_vector(trainer.accelerator.unwrap_model(trainer.model)),
        },
    )


def check_truncated_rank(out: Path, state: PartialState) -> None:
    """A real step where every completion of rank 1 is cut off at max length and masked out of the loss: rank 0 forces
    EOS at the last position, rank 1 never samples EOS."""
    results = {}
    eos = 1
    generation_kwargs = {"forced_eos_token_id": eos} if state.process_index == 0 else {"suppress_tokens": [eos]}
    for kind in ("grpo", "rloo"):
        model, tokenizer, dataset = tiny_setup()
        initial = param_vector(model)
        common = dict(
            entropy_reward="token",
            forking_token_ratio=0.2,
            mask_truncated_completions=True,
            generation_kwargs=generation_kwargs,
            **{**TINY_KWARGS, "learning_rate": 1e-2},
        )
        if kind == "grpo":
            args = EntropyGRPOConfig(output_dir=str(out / f"truncated_{kind}"), **common)
            trainer = RecordingGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
        else:
            args = EntropyRLOOConfig(output_dir=str(out / f"truncated_{kind}"), beta=0.0, **common)
            trainer = RecordingRLOOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        results[kind] = {
            "log_history": trainer.state.log_history,
            "forking_calls": trainer.forking_calls,
            "initial_params": initial,
            "final_params": param_vector(trainer.accelerator.unwrap_model(trainer.model)),
        }
    save(out, state, "truncated_rank", results)


CHECKS = {
    "forking_direct": check_forking_direct,
    "scored_loss": check_scored_loss,
    "train_run": check_train_run,
    "truncated_rank": check_truncated_rank,
}


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CHECKS)
    state = PartialState(cpu=True)
    if state.num_processes != 2:
        raise SystemExit(f"Run with 2 processes, got {state.num_processes}.")
    torch.set_num_threads(1)
    for name in names:
        CHECKS[name](out, state)
        state.wait_for_everyone()
        if state.is_main_process:
            print(f"check {name}: done", flush=True)
    # Tear the process group down before the interpreter does: at exit, its background threads can abort the process
    # ("terminate called without an active exception") after every result was written.
    state.destroy_process_group()


if __name__ == "__main__":
    main()
