"""Shared pieces of the trainer tests: configs for the tiny model, a recording reward and float64 references."""

from __future__ import annotations

import copy
import math

import torch
from datasets import Dataset
from transformers import TrainerCallback

from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts

TINY_KWARGS = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=6,
    max_steps=1,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    bf16=False,  # TRL defaults to bf16 autocast even on CPU; the references below are float64
    save_strategy="no",
    seed=0,
    data_seed=0,
)


def tiny_setup(n_prompts: int = 8):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    dataset = Dataset.from_dict({"prompt": tiny_prompts(n_prompts)})
    return model, tokenizer, dataset


class RecordingReward:
    """A real TRL reward function (weight 0 in tests) that keeps what TRL passed it, in call order."""

    __name__ = "recorder"

    def __init__(self):
        self.prompts: list[str] = []
        self.completion_ids: list[list[int]] = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.prompts.extend(prompts)
        self.completion_ids.extend(completion_ids)
        return [0.0] * len(prompts)


class SourceRecorder(TrainerCallback):
    """A signal observer asking for nothing: keeps where each batch's signals came from (`signals.source`)."""

    requested_signals = ()

    def __init__(self):
        self.sources: list[str] = []

    def on_signals(self, signals, trainer):
        self.sources.append(signals.source)


class ScoringSourceMixin:
    """Makes a trainer take the path of generators that return no logits (vLLM, tools, a rollout_func): the signals
    come after generation, from TRL's policy pass when it makes one, else from one forward."""

    def _plain_generate(self):
        return False


@torch.no_grad()
def brute_force_rewards(model, tokenizer, prompts, completion_ids, temperature: float, variant: str) -> list[float]:
    """Per-completion entropy rewards recomputed in float64 from full logits, one sequence at a time."""
    reference = copy.deepcopy(model).double().eval()
    # TRL patches `forward` on the instance with a closure over the original model (its fused LM head); a deep copy
    # keeps that closure. Drop instance-level forwards so the copy runs its own float64 weights.
    for module in reference.modules():
        module.__dict__.pop("forward", None)
    out = []
    for prompt, completion in zip(prompts, completion_ids):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + list(completion)])
        logits = reference(ids).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion)]
        log_p = torch.log_softmax(logits / temperature, dim=-1)
        if not completion:
            out.append(math.nan)
        elif variant == "token":
            out.append(-(-(log_p.exp() * log_p).sum(-1)).mean().item())
        elif variant == "trajectory":
            out.append(log_p.gather(-1, torch.tensor(completion).unsqueeze(-1)).mean().item())
        else:  # self-certainty: KL(U || p) = -log V - mean_j log p_j
            out.append((-math.log(log_p.size(-1)) - log_p.mean(-1)).mean().item())
    return out


# Collapse-guard options that switch every log-signal trigger off (the probe acts alone).
GUARD_LOG_TRIGGERS_OFF = dict(
    min_entropy=None,
    max_entropy_decay=None,
    min_length_ratio=None,
    max_repetition_rate=None,
    max_identical_group_fraction=None,
    min_reward_std=None,
)


class WeightRecorder(TrainerCallback):
    """Keeps a copy of the weights at the end of every step (added before the guard, so it sees them first)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
