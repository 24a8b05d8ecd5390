"""Per-token confidence signals: one decoding step's logits to one number per sequence (Think Just Enough's top-k
entropy in bits, the full entropy, DeepConf's token confidence)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..ops import entropy_from_topk_logprobs, token_entropy

__all__ = ["ConfidenceSignal"]

_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # about -87.3


@dataclass(frozen=True)
class ConfidenceSignal:
    """How one decoding step's logits become one confidence number per sequence.

    Parameters:
        kind (`str`, defaults to `"topk_entropy"`):
            ``"topk_entropy"``: entropy of the top-``top_k`` probabilities renormalised to sum to 1, in base
            ``base`` (Think Just Enough: k = 20, bits). ``"entropy"``: entropy of the full distribution, in base
            ``base``. ``"topk_confidence"``: DeepConf token confidence ``-mean`` of the top-``top_k`` natural
            log-probabilities (Fu et al., 2025), each floored at ``log(float32 tiny)`` (about -87.3) so a masked
            alternative stays finite; the only kind where *higher* means more confident.
        top_k (`int`, defaults to `20`):
            Number of most likely tokens for the top-k kinds, >= 2. Both papers use 20.
        base (`float`, defaults to `2.0`):
            Logarithm base of the entropy kinds, > 0 and != 1: 2 gives bits as in Think Just Enough, ``math.e`` nats.
    """

    kind: Literal["topk_entropy", "entropy", "topk_confidence"] = "topk_entropy"
    top_k: int = 20
    base: float = 2.0

    def __post_init__(self):
        if self.kind not in ("topk_entropy", "entropy", "topk_confidence"):
            raise ValueError(f"`kind` must be 'topk_entropy', 'entropy' or 'topk_confidence', got {self.kind!r}.")
        if not (isinstance(self.top_k, int) and self.top_k >= 2):
            raise ValueError(f"`top_k` must be an integer >= 2, got {self.top_k!r}.")
        if not (self.base > 0 and self.base != 1 and math.isfinite(self.base)):
            raise ValueError(f"`base` must be a finite number > 0 and != 1, got {self.base}.")

    @property
    def higher_is_confident(self) -> bool:
        """True for DeepConf confidence; False for entropies, where low means confident."""
        return self.kind == "topk_confidence"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The signal of ``logits`` ``[..., V]`` as float32 ``[...]``; NaN where a row of logits holds NaN."""
        if self.kind == "entropy":
            return token_entropy(logits.detach()) / math.log(self.base)
        logprobs = torch.log_softmax(logits.detach().float(), dim=-1)
        top = logprobs.topk(min(self.top_k, logprobs.size(-1)), dim=-1).values
        if self.kind == "topk_entropy":
            return entropy_from_topk_logprobs(top, base=self.base)
        # A masked (-inf) alternative means the distribution is even more peaked: floor it at the smallest normal
        # float32 log-probability, so confidence stays finite and window sums never meet inf - inf. NaN stays NaN.
        return -top.clamp_min(_LOG_TINY).mean(dim=-1)

    def describe(self) -> str:
        unit = {2.0: "bits", math.e: "nats"}.get(self.base, f"log base {self.base:g}")
        if self.kind == "topk_entropy":
            return f"mean top-{self.top_k} token entropy ({unit})"
        if self.kind == "entropy":
            return f"mean full-vocabulary token entropy ({unit})"
        return f"DeepConf token confidence (top-{self.top_k}, nats)"
