"""Label-free reward functions in the style of TRL's ``trl.rewards``: small pure functions, TRL's reward signature.

The confidence rewards read the per-token signals the trainers of this package pass to any reward function that
declares them (see :mod:`trl_entropy.signals`): ``token_entropy``, ``token_logprob``, ``token_self_certainty`` and
``token_mask`` (False on tool/environment tokens), one 1-D tensor per completion. Every value is the masked mean over
the tokens the policy generated. A completion with no such token (empty), or with a non-finite value (NaN/inf logits),
gets ``None``: TRL then counts it as unscorable rather than giving it a made-up score.

```python
from trl_entropy import EntropyGRPOTrainer
from trl_entropy.rewards import entropy_token_reward, majority_vote_reward

trainer = EntropyGRPOTrainer(model, reward_funcs=[entropy_token_reward, majority_vote_reward(parse_answer)], ...)
```

``EntropyGRPOConfig(entropy_reward="token")`` is sugar for appending :func:`entropy_token_reward` (and
``"trajectory"`` / ``"self_certainty"`` for the two others).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import stats
from .ops import masked_sequence_reduce

__all__ = [
    "completion_text",
    "entropy_token_reward",
    "entropy_trajectory_reward",
    "majority_vote_reward",
    "rent_reward",
    "self_certainty_reward",
]


def _require(value: Any, name: str, reward: str) -> Any:
    if value is None:
        raise ValueError(
            f"`{reward}` needs the `{name}` signal, which TRL's own trainers do not pass: use it with "
            "EntropyGRPOTrainer or EntropyRLOOTrainer."
        )
    return value


def _masked_means(values: Sequence[torch.Tensor], mask: Sequence[torch.Tensor]) -> list[float]:
    """Float32 masked mean of each completion's values (NaN when no token is under the mask)."""
    width = max([int(v.numel()) for v in values] + [0])
    padded = torch.zeros(len(values), width)
    keep = torch.zeros(len(values), width, dtype=torch.bool)
    for row, (value, valid) in enumerate(zip(values, mask)):
        padded[row, : value.numel()] = value.float().cpu()
        keep[row, : valid.numel()] = valid.bool().cpu()
    return masked_sequence_reduce(padded, keep, "mean").tolist()


def _finite_or_none(values: Sequence[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def entropy_token_reward(
    completions: list,
    token_entropy: list[torch.Tensor] | None = None,
    token_mask: list[torch.Tensor] | None = None,
    **kwargs,
) -> list[float | None]:
    """EM-RL-token: minus the mean token entropy of the completion, ``-(1/|y|) sum_t H_t`` (Agarwal et al., 2025, "The
    Unreasonable Effectiveness of Entropy Minimization in LLM Reasoning", arXiv 2505.15134; the official code averages
    over tokens). Entropies are at the sampling temperature, over the tokens the policy generated."""
    values = _require(token_entropy, "token_entropy", "entropy_token_reward")
    mask = _require(token_mask, "token_mask", "entropy_token_reward")
    return _finite_or_none([-v for v in _masked_means(values, mask)])


def entropy_trajectory_reward(
    completions: list,
    token_logprob: list[torch.Tensor] | None = None,
    token_mask: list[torch.Tensor] | None = None,
    **kwargs,
) -> list[float | None]:
    """EM-RL-sequence: the mean log-probability of the sampled tokens, ``(1/|y|) sum_t log pi(y_t | y_<t)``
    (Agarwal et al., 2025, arXiv 2505.15134, Eq. 3 length-normalised as in the official code)."""
    values = _require(token_logprob, "token_logprob", "entropy_trajectory_reward")
    mask = _require(token_mask, "token_mask", "entropy_trajectory_reward")
    return _finite_or_none(_masked_means(values, mask))


def self_certainty_reward(
    completions: list,
    token_self_certainty: list[torch.Tensor] | None = None,
    token_mask: list[torch.Tensor] | None = None,
    **kwargs,
) -> list[float | None]:
    """Intuitor's self-certainty: the mean over tokens of ``KL(U || pi(. | y_<t))`` (Zhao et al., 2025, "Learning to
    Reason without External Rewards", arXiv 2505.19590)."""
    values = _require(token_self_certainty, "token_self_certainty", "self_certainty_reward")
    mask = _require(token_mask, "token_mask", "self_certainty_reward")
    return _finite_or_none(_masked_means(values, mask))


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a conversation whose last message is the answer."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else str(content)
    return str(completion)


def rent_reward(parse_answer: Callable[[str], Any], unparsed_entropy: float) -> Callable[..., list[float | None]]:
    """RENT, reinforcement learning via entropy minimisation (Prabhudesai et al., 2025, "Maximizing Confidence Alone
    Improves Reasoning", arXiv 2505.22660), with a format penalty.

    Returns a reward function: ``-(1/|y|) sum_t H_t`` (as :func:`entropy_token_reward`) when ``parse_answer`` finds an
    answer in the completion's text, and ``-unparsed_entropy`` when it returns None. A fixed high entropy for answers
    that do not parse keeps the policy from buying confidence with unanswerable text (repetition, truncation), the
    failure mode peers report for pure confidence rewards.

    Args:
        parse_answer: the completion's text -> its answer, or None when there is none (e.g. no ``\\boxed{}``).
        unparsed_entropy: entropy in nats charged to an unparsed completion, a finite number >= 0; ``log V`` (the
            largest possible entropy: 10.80 for a 49152-token vocabulary) ranks it below every parsed answer.
    """
    if not callable(parse_answer):
        raise ValueError(f"`parse_answer` must be a callable text -> answer, got {type(parse_answer).__name__}.")
    if not (isinstance(unparsed_entropy, (int, float)) and math.isfinite(unparsed_entropy) and unparsed_entropy >= 0):
        raise ValueError(f"`unparsed_entropy` must be a finite number >= 0 (nats), got {unparsed_entropy!r}.")

    def rent(
        completions: list,
        token_entropy: list[torch.Tensor] | None = None,
        token_mask: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> list[float | None]:
        confidence = entropy_token_reward(completions, token_entropy=token_entropy, token_mask=token_mask)
        parsed = [parse_answer(completion_text(c)) is not None for c in completions]
        return [value if ok else -float(unparsed_entropy) for value, ok in zip(confidence, parsed)]

    rent.__name__ = "rent"
    return rent


def _groups(prompts: Sequence[Any] | None, count: int, num_generations: int | None) -> list[range]:
    if num_generations is not None:
        if count % num_generations:
            raise ValueError(
                f"`num_generations`={num_generations} does not divide the batch of {count} completions: the group of "
                "each prompt must be whole (pass the trainer's `num_generations`)."
            )
        return [range(start, start + num_generations) for start in range(0, count, num_generations)]
    if prompts is None:
        raise ValueError("`majority_vote_reward` needs `num_generations` or TRL's `prompts` to find the groups.")
    groups, start = [], 0
    for i in range(1, count + 1):
        if i == count or prompts[i] != prompts[start]:
            groups.append(range(start, i))
            start = i
    return groups


def majority_vote_reward(
    parse_answer: Callable[[str], Any], num_generations: int | None = None
) -> Callable[..., list[float]]:
    """TTRL-style majority vote (Zuo et al., 2025, "TTRL: Test-Time Reinforcement Learning", arXiv 2504.16084): 1 when
    the completion's parsed answer equals the most common parsed answer of its group, else 0. The label-free baseline
    that uses no confidence signal.

    Groups are the completions of one prompt. With ``num_generations`` they are the consecutive blocks of that size
    (TRL keeps the ``num_generations`` samples of a prompt next to each other); without it, the runs of consecutive
    completions that share the same ``prompts`` entry (the argument TRL passes every reward function), which also
    works for evaluation's ``num_generations_eval``. Either way a group must lie on one rank: with several processes,
    make ``per_device_train_batch_size`` a multiple of ``num_generations``. Unparsed answers (None) do not vote and
    get 0; a tie goes to the answer that appears first in the group; a group with no parsed answer gets 0 everywhere.

    Args:
        parse_answer: the completion's text -> a hashable answer, or None when there is none.
        num_generations: group size (>= 1), or None to group by prompt.
    """
    if not callable(parse_answer):
        raise ValueError(f"`parse_answer` must be a callable text -> answer, got {type(parse_answer).__name__}.")
    if num_generations is not None and not (isinstance(num_generations, int) and num_generations >= 1):
        raise ValueError(f"`num_generations` must be an integer >= 1 or None, got {num_generations!r}.")

    def majority_vote(completions: list, prompts: list | None = None, **kwargs) -> list[float]:
        answers = [parse_answer(completion_text(c)) for c in completions]
        rewards = [0.0] * len(completions)
        for group in _groups(prompts, len(completions), num_generations):
            winner = stats.majority_vote([answers[i] for i in group])
            if winner is None:
                continue
            for i in group:
                rewards[i] = float(answers[i] is not None and answers[i] == winner)
        return rewards

    majority_vote.__name__ = "majority_vote"
    return majority_vote
