"""trl_entropy.rewards: the built-in confidence rewards against a float64 recomputation of the previous implementation
(masked mean, None for empty or non-finite), RENT and the majority vote against hand-computed values."""

from __future__ import annotations

import math
import re

import pytest
import torch

from trl_entropy.rewards import (
    completion_text,
    entropy_token_reward,
    entropy_trajectory_reward,
    majority_vote_reward,
    rent_reward,
    self_certainty_reward,
)
from trl_entropy.signals import declared_signals
from trl_entropy.trainers._entropy import EntropyReward


def fixed_batch():
    """Per-token values of five completions: ordinary, with masked (tool) tokens, empty, NaN, inf."""
    g = torch.Generator().manual_seed(0)
    values = [
        torch.rand(7, generator=g) * 4,
        torch.rand(5, generator=g) * 4,
        torch.zeros(0),
        torch.tensor([1.0, math.nan, 2.0]),
        torch.tensor([1.0, math.inf]),
    ]
    mask = [
        torch.ones(7, dtype=torch.bool),
        torch.tensor([True, False, False, True, True]),
        torch.zeros(0, dtype=torch.bool),
        torch.ones(3, dtype=torch.bool),
        torch.ones(2, dtype=torch.bool),
    ]
    return values, mask


def previous_rewards(sign: float, values, mask):
    """The values the trainers gave before this module (main's `sequence_rewards`), recomputed in float64: the masked
    mean times `sign`, None when the completion has no valid token or a non-finite one."""
    out = []
    for v, m in zip(values, mask):
        kept = [float(x) for x, keep in zip(v.double().tolist(), m.tolist()) if keep]
        mean = math.fsum(kept) / len(kept) if kept else math.nan
        out.append(sign * mean if math.isfinite(mean) else None)
    return out


@pytest.mark.parametrize(
    "reward,signal,sign",
    [
        (entropy_token_reward, "token_entropy", -1.0),
        (entropy_trajectory_reward, "token_logprob", 1.0),
        (self_certainty_reward, "token_self_certainty", 1.0),
    ],
)
def test_builtin_rewards_keep_their_values(reward, signal, sign):
    values, mask = fixed_batch()
    got = reward([""] * len(values), **{signal: values, "token_mask": mask})
    expected = previous_rewards(sign, values, mask)
    assert [g is None for g in got] == [e is None for e in expected] == [False, False, True, True, True]
    for g, e in zip(got, expected):
        if e is not None:
            assert g == pytest.approx(e, rel=1e-6)


def test_entropy_reward_sugar_is_these_functions():
    """`entropy_reward="token"` etc. append exactly these functions, under their historical logged names."""
    for variant, func, name in [
        ("token", entropy_token_reward, "entropy_token"),
        ("trajectory", entropy_trajectory_reward, "entropy_trajectory"),
        ("self_certainty", self_certainty_reward, "self_certainty"),
    ]:
        sugar = EntropyReward(variant)
        assert sugar.func is func and sugar.__name__ == name
        assert declared_signals(sugar) == declared_signals(func)


def test_rewards_without_signals_say_they_need_an_entropy_trainer():
    with pytest.raises(ValueError, match="needs the `token_entropy` signal.*EntropyGRPOTrainer"):
        entropy_token_reward(["a"])  # what a plain TRL trainer would pass


def parse_number(text: str):
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def test_rent_hand_computed():
    reward = rent_reward(parse_number, unparsed_entropy=10.0)
    assert declared_signals(reward) == ("token_entropy", "token_mask")
    completions = ["so it is 42", "no idea", [{"role": "assistant", "content": "7"}], "it is 3"]
    entropy = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1]), torch.tensor([0.5, 1.5]), torch.zeros(0)]
    mask = [
        torch.tensor([True, True, False]),
        torch.tensor([True]),
        torch.tensor([True, True]),
        torch.zeros(0, dtype=torch.bool),
    ]
    got = reward(completions, token_entropy=entropy, token_mask=mask)
    # (1 + 2) / 2 = 1.5; "no idea" does not parse: the fixed 10 nats; (0.5 + 1.5) / 2 = 1; parsed but empty: None.
    assert got == [-1.5, -10.0, -1.0, None]


def test_rent_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unparsed_entropy"):
        rent_reward(parse_number, unparsed_entropy=-1.0)
    with pytest.raises(ValueError, match="unparsed_entropy"):
        rent_reward(parse_number, unparsed_entropy=math.inf)
    with pytest.raises(ValueError, match="parse_answer"):
        rent_reward("boxed", unparsed_entropy=1.0)


def test_majority_vote_hand_computed():
    reward = majority_vote_reward(parse_number, num_generations=4)
    assert declared_signals(reward) == ()  # the label-free baseline that needs no signal
    completions = [
        *["x = 1", "1", "it is 2", "no answer"],  # majority "1"; unparsed gets 0
        *["3", "4", "4", "3"],  # a tie: the answer seen first in the group wins
        *["none", "at", "all", "here"],  # no parsed answer: 0 everywhere
    ]
    assert reward(completions) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_majority_vote_groups_by_prompt_without_num_generations():
    reward = majority_vote_reward(parse_number)
    prompts = ["p1", "p1", "p1", "p2", "p2"]
    completions = ["5", "6", "6", "6", "5"]
    assert reward(completions, prompts=prompts) == [0.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="num_generations"):
        majority_vote_reward(parse_number, num_generations=3)(completions)
    with pytest.raises(ValueError, match="num_generations"):
        majority_vote_reward(parse_number, num_generations=0)


def test_completion_text_reads_both_formats():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "chat"}]) == "chat"
