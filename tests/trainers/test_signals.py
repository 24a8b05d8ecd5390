"""The signal pipeline: reward functions that declare per-token signals get them, exact against a float64
recomputation and with no extra model forward, on GRPO and RLOO, from every source; environment tokens are masked."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from datasets import Dataset
from trainer_utils import TINY_KWARGS, ScoringSourceMixin, SourceRecorder, tiny_setup
from transformers import TrainerCallback

from trl_entropy.rewards import entropy_token_reward
from trl_entropy.signals import SIGNAL_NAMES, CompletionSignals, declared_signals, signal_observers
from trl_entropy.testing import make_tiny_model_and_tokenizer
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer
from trl_entropy.trainers._entropy import EntropyReward

TEMPERATURE = 0.7

# ---- pure pieces -------------------------------------------------------------------------------------------------


def test_declared_signals_reads_explicit_parameters_only():
    def everything(completions, token_entropy, token_logprob, *, token_self_certainty=None, token_mask=None, **kw):
        return []

    def nothing(completions, **kwargs):
        return []

    class Callable:
        def __call__(self, completions, token_logprob, **kwargs):
            return []

    assert declared_signals(everything) == (*SIGNAL_NAMES, "token_mask")
    assert declared_signals(nothing) == ()
    assert declared_signals(Callable()) == ("token_logprob",)
    assert declared_signals(torch.nn.Linear(2, 1)) == ()
    assert declared_signals(EntropyReward("token")) == ("token_entropy", "token_mask")
    assert declared_signals(EntropyReward("trajectory")) == ("token_logprob", "token_mask")


def test_completion_signals_validate_and_pad():
    ids = [[5, 6, 7], [8]]
    mask = [torch.tensor([True, False, True]), torch.tensor([True])]
    signals = CompletionSignals(ids, mask, token_entropy=[torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])])
    values, padded_mask = signals.padded("token_entropy")
    assert values.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert padded_mask.tolist() == [[True, False, True], [True, False, False]]
    assert signals.available() == ("token_mask", "token_entropy")
    with pytest.raises(ValueError, match="token_logprob"):
        signals.padded("token_logprob")
    with pytest.raises(ValueError, match="token_entropy"):
        CompletionSignals(ids, mask, token_entropy=[torch.tensor([1.0]), torch.tensor([4.0])])
    with pytest.raises(ValueError, match="source"):
        CompletionSignals(ids, mask, source="vllm")


def test_signal_observers_need_both_attributes_and_known_names():
    class Observer(TrainerCallback):
        requested_signals = ("token_entropy",)

        def on_signals(self, signals, trainer):
            pass

    class Bad(Observer):
        requested_signals = ("token_entropies",)

    assert signal_observers([TrainerCallback(), Observer()])[0].__class__ is Observer
    with pytest.raises(ValueError, match="token_entropies"):
        signal_observers([Bad()])


# ---- real runs against float64 ---------------------------------------------------------------------------------


@torch.no_grad()
def float64_signals(model, tokenizer, prompt: str, completion: list[int], temperature: float):
    """Per-token entropy, sampled-token log-prob and self-certainty of one completion, float64, full logits."""
    reference = copy.deepcopy(model).double().eval()
    for module in reference.modules():  # TRL patches `forward` on the instance (fused head); run the plain one
        module.__dict__.pop("forward", None)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    logits = reference(torch.tensor([prompt_ids + list(completion)])).logits[0]
    logits = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion)] / temperature
    log_p = torch.log_softmax(logits, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    logprob = log_p.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
    certainty = -torch.log(torch.tensor(float(log_p.size(-1)), dtype=torch.float64)) - log_p.mean(-1)
    return {"token_entropy": entropy, "token_logprob": logprob, "token_self_certainty": certainty}


class SignalReward:
    """A user reward that declares signals (weight 0) and keeps what it got."""

    def __init__(self, names):
        self.names = names
        self.calls = []
        self.__name__ = "user_signals"
        # What the trainer reads: `def user_signals(prompts, completions, completion_ids, <names>, **kwargs)`.
        explicit = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("prompts", *names)]
        self.__signature__ = inspect.Signature([*explicit, inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append({"prompts": prompts, "completion_ids": completion_ids, "kwargs": kwargs})
        return [0.0] * len(prompts)


class PlainReward:
    __name__ = "plain"

    def __init__(self):
        self.keys = set()

    def __call__(self, prompts, completions, **kwargs):
        self.keys.update(kwargs)
        return [0.0] * len(prompts)


class ScoringGRPOTrainer(ScoringSourceMixin, EntropyGRPOTrainer):
    pass


class ScoringRLOOTrainer(ScoringSourceMixin, EntropyRLOOTrainer):
    pass


def run_one_step(tmp_path, kind, extra, reward, sources=None):
    """One training step; returns the trainer, the tokenizer, the source of the batch's signals (None: none were
    computed) and the number of model forward passes."""
    model, tokenizer, dataset = tiny_setup()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    config_class, trainer_class = {
        "grpo": (EntropyGRPOConfig, EntropyGRPOTrainer),
        "rloo": (EntropyRLOOConfig, EntropyRLOOTrainer),
        "grpo-scoring": (EntropyGRPOConfig, ScoringGRPOTrainer),
        "rloo-scoring": (EntropyRLOOConfig, ScoringRLOOTrainer),
    }[kind]
    args = config_class(
        output_dir=str(tmp_path),
        learning_rate=0.0,
        temperature=TEMPERATURE,
        reward_weights=[0.0],
        **{**TINY_KWARGS, **extra},
    )
    recorder = SourceRecorder()
    trainer = trainer_class(model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    if trainer._requested_signals() is not None:  # an observer only where signals are computed anyway
        trainer.add_callback(recorder)
    trainer.train()
    assert len(set(recorder.sources)) <= 1
    return trainer, tokenizer, (recorder.sources or [None])[0], len(forwards)


SIGNALS_AND_MASK = ("token_entropy", "token_logprob", "token_mask")
CASES = [
    ("grpo", {}, SIGNALS_AND_MASK, "generation"),
    ("grpo", {"num_iterations": 2}, SIGNALS_AND_MASK, "generation"),
    ("grpo-scoring", {"num_iterations": 2}, SIGNALS_AND_MASK, "old_logps"),
    ("rloo", {"beta": 0.0}, SIGNALS_AND_MASK, "generation"),
    ("rloo-scoring", {"beta": 0.0}, SIGNALS_AND_MASK, "old_logps"),
    ("rloo", {"beta": 0.0}, ("token_entropy", "token_logprob", "token_self_certainty"), "generation"),
]


@pytest.mark.parametrize("kind,extra,names,source", CASES)
def test_declared_signals_are_exact_and_cost_no_forward(tmp_path, kind, extra, names, source):
    reward = SignalReward(names)
    trainer, tokenizer, got_source, forwards = run_one_step(tmp_path / "signals", kind, extra, reward)
    assert got_source == source
    baseline = PlainReward()
    *_, baseline_source, baseline_forwards = run_one_step(tmp_path / "plain", kind, extra, baseline)
    assert baseline_source is None and forwards == baseline_forwards  # zero extra model forward passes
    assert not baseline.keys & {*SIGNAL_NAMES, "token_mask"}  # a reward declaring nothing gets (and costs) nothing

    (call,) = reward.calls
    checked = 0
    for i, (prompt, completion) in enumerate(zip(call["prompts"], call["completion_ids"])):
        reference = float64_signals(trainer.model, tokenizer, prompt, completion, TEMPERATURE)
        for name in names:
            value = call["kwargs"][name][i]
            if name == "token_mask":
                assert value.dtype == torch.bool and value.tolist() == [True] * len(completion)
                continue
            assert value.shape == (len(completion),)
            assert (value.double() - reference[name]).abs().max().item() < 1e-5, (name, i)
            checked += value.numel()
    assert checked > 0


def test_dataset_column_named_like_a_declared_signal_is_refused(tmp_path):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    dataset = Dataset.from_dict({"prompt": ["what is 1 ?"] * 4, "token_entropy": [0.0] * 4})
    args = EntropyGRPOConfig(output_dir=str(tmp_path), **TINY_KWARGS)
    with pytest.raises(ValueError, match=r"column\(s\) \['token_entropy'\]"):
        EntropyGRPOTrainer(
            model, reward_funcs=entropy_token_reward, args=args, train_dataset=dataset, processing_class=tokenizer
        )


# ---- environment tokens ----------------------------------------------------------------------------------------

ENV_TOKENS = 3  # environment feedback appended after the policy's tokens


def env_rollout(prompts, trainer):
    """A TRL `rollout_func`: the policy samples up to 3 tokens, then the environment appends 3 tokens of its own,
    marked 0 in `env_mask` (TRL's tool/environment mask)."""
    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    feedback = tokenizer("the answer is", add_special_tokens=False)["input_ids"][:ENV_TOKENS]
    prompt_ids, completion_ids, env_mask = [], [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                do_sample=True,
                temperature=trainer.temperature,
                max_new_tokens=3,
                min_new_tokens=3,
            )
        sampled = out[0, len(ids) :].tolist()
        prompt_ids.append(ids)
        completion_ids.append(sampled + feedback)
        env_mask.append([1] * len(sampled) + [0] * len(feedback))
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "logprobs": [[0.0] * len(c) for c in completion_ids],
        "env_mask": env_mask,
    }


@pytest.mark.parametrize("extra,source", [({}, "forward"), ({"num_iterations": 2}, "old_logps")])
def test_environment_tokens_are_left_out_of_the_mask_and_the_entropy_reward(tmp_path, extra, source):
    """Fails on the code before the signal pipeline: it dropped TRL's env_mask and averaged over every token."""
    model, tokenizer, dataset = tiny_setup()
    recorder = SignalReward(("token_entropy", "token_mask"))
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward="token",
        reward_weights=[0.0],
        learning_rate=0.0,
        temperature=TEMPERATURE,
        **{**TINY_KWARGS, **extra},
    )
    sources = SourceRecorder()
    trainer = EntropyGRPOTrainer(
        model,
        reward_funcs=recorder,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=env_rollout,
        callbacks=[sources],
    )
    trainer.train()
    assert set(sources.sources) == {source}
    (call,) = recorder.calls
    got = list(trainer._logs["rewards"]["entropy_token"])
    for i, (prompt, completion) in enumerate(zip(call["prompts"], call["completion_ids"])):
        mask = call["kwargs"]["token_mask"][i]
        assert mask.tolist() == [True] * (len(completion) - ENV_TOKENS) + [False] * ENV_TOKENS
        # The built-in reward is minus the masked mean of exactly the values a user reward receives.
        assert got[i] == pytest.approx(-call["kwargs"]["token_entropy"][i][mask].double().mean().item(), rel=1e-6)
        entropy = float64_signals(trainer.model, tokenizer, prompt, completion, TEMPERATURE)["token_entropy"]
        assert got[i] == pytest.approx(-entropy[: len(completion) - ENV_TOKENS].mean().item(), abs=1e-5)
        assert got[i] != pytest.approx(-entropy.mean().item(), abs=1e-4)  # what averaging over env tokens gives
