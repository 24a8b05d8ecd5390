"""What a causal LM computed at each decoding step of ``generate``, recorded as it runs: the entropy, the sampled
token's log-probability and the self-certainty of ``softmax(logits / T)``, from the raw logits (before any logits
processor), in ``O(batch x steps)`` memory instead of keeping every step's ``[batch, vocabulary]`` logits.

Used by the trainers (the ``"generation"`` signal source) and by evaluation.
"""

from __future__ import annotations

import torch

from .ops import self_certainty, token_entropy
from .signals import SIGNAL_NAMES

__all__ = ["GenerationEntropyRecorder"]


class GenerationEntropyRecorder:
    """Records, during ``model.generate``, the requested signals from each decoding step's raw logits.

    A forward hook on the causal LM sees each step's logits ``[B, 1, V]`` (before any logits processor); the entropy
    and self-certainty of ``softmax(logits / T)`` are reduced to ``[B]`` at once, so memory stays ``O(B * steps)``
    plus one ``[B, V]`` row of log-probs for ``token_logprob``: the token sampled at step ``s`` is fed back as the
    input of step ``s + 1``, where its log-prob is read.
    """

    def __init__(self, module: torch.nn.Module, temperature: float, signals: tuple[str, ...]):
        unknown = sorted(set(signals) - set(SIGNAL_NAMES))
        if unknown:
            raise ValueError(f"Unknown signals {unknown}; allowed: {list(SIGNAL_NAMES)}.")
        self.module, self.temperature, self.signals = module, temperature, tuple(signals)
        self.steps: dict[str, list[torch.Tensor]] = {name: [] for name in self.signals}
        self._previous_logprobs: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> GenerationEntropyRecorder:
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        logits = getattr(output, "logits", None)
        if logits is None:  # not a generation step (e.g. a fused-head scoring call)
            return
        scaled = logits[:, -1, :].float() / self.temperature
        if "token_entropy" in self.steps:
            self.steps["token_entropy"].append(token_entropy(scaled))
        if "token_self_certainty" in self.steps:
            self.steps["token_self_certainty"].append(self_certainty(scaled))
        if "token_logprob" in self.steps:
            fed = kwargs.get("input_ids", args[0] if args else None)
            if self._previous_logprobs is not None:
                picked = self._previous_logprobs.gather(-1, fed[:, -1:].to(scaled.device)).squeeze(-1)
                self.steps["token_logprob"].append(picked)
            self._previous_logprobs = torch.log_softmax(scaled, dim=-1)

    def per_completion(self, completion_ids: list[list[int]]) -> dict[str, list[torch.Tensor]]:
        """``{signal: [values of completion i]}``, each a float32 CPU tensor of that (EOS-trimmed) completion's
        length."""
        out = {}
        for name, recorded in self.steps.items():
            steps = list(recorded)
            if name == "token_logprob" and self._previous_logprobs is not None:
                # The last sampled token is never fed back: read its log-prob from the completions.
                last = torch.tensor([ids[len(steps)] if len(ids) > len(steps) else 0 for ids in completion_ids])
                device = self._previous_logprobs.device
                steps.append(self._previous_logprobs.gather(-1, last.unsqueeze(-1).to(device)).squeeze(-1))
            stacked = torch.stack(steps, dim=1).float().cpu() if steps else torch.zeros(len(completion_ids), 0)
            out[name] = [stacked[row, : len(ids)].clone() for row, ids in enumerate(completion_ids)]
        return out
