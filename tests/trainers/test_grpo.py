"""EntropyGRPOTrainer on the tiny model: rewards vs brute force, the forking-token mask, drop-in identity, config."""

import math

import pytest
import torch
from trainer_utils import (
    TINY_KWARGS,
    RecordingReward,
    ScoringSourceMixin,
    SourceRecorder,
    brute_force_rewards,
    tiny_setup,
)
from transformers import LogitsProcessorList
from trl import GRPOConfig, GRPOTrainer

from trl_entropy.decoding import GenerationEntropyRecorder
from trl_entropy.ops import high_entropy_mask, selected_token_count, token_entropy
from trl_entropy.testing import make_tiny_model_and_tokenizer
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer


class ScoringSourceGRPOTrainer(ScoringSourceMixin, EntropyGRPOTrainer):
    """Takes the path of vLLM runs: signals from TRL's policy pass when it makes one, else one forward."""


# (variant, extra config, trainer class, expected source). With transformers' generate the decoding logits are the
# source whatever passes TRL makes; otherwise TRL's pass when it makes one (GRPO: reused generation batches).
REWARD_CASES = [
    ("token", {}, EntropyGRPOTrainer, "generation"),
    ("token", {"num_iterations": 2}, EntropyGRPOTrainer, "generation"),
    ("token", {"num_iterations": 2}, ScoringSourceGRPOTrainer, "old_logps"),
    ("token", {}, ScoringSourceGRPOTrainer, "forward"),
    ("trajectory", {}, EntropyGRPOTrainer, "generation"),
    ("trajectory", {"num_iterations": 2}, ScoringSourceGRPOTrainer, "old_logps"),
    ("trajectory", {}, ScoringSourceGRPOTrainer, "forward"),
    ("self_certainty", {}, EntropyGRPOTrainer, "generation"),
    ("self_certainty", {"num_iterations": 2}, ScoringSourceGRPOTrainer, "forward"),  # not in TRL's pass
    ("self_certainty", {}, ScoringSourceGRPOTrainer, "forward"),
]


@pytest.mark.parametrize("variant,extra,trainer_class,source", REWARD_CASES)
def test_entropy_reward_matches_brute_force(tmp_path, variant, extra, trainer_class, source):
    model, tokenizer, dataset = tiny_setup()
    recorder = RecordingReward()
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward=variant,
        reward_weights=[0.0],
        learning_rate=0.0,  # the weights stay those that generated, so the reference can recompute
        temperature=0.7,
        **{**TINY_KWARGS, **extra},
    )
    sources = SourceRecorder()
    trainer = trainer_class(
        model,
        reward_funcs=recorder,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[sources],
    )
    trainer.train()
    assert set(sources.sources) == {source}
    name = trainer.entropy_reward_func.__name__
    got = list(trainer._logs["rewards"][name])
    expected = brute_force_rewards(trainer.model, tokenizer, recorder.prompts, recorder.completion_ids, 0.7, variant)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)
    logged = trainer.state.log_history[0]
    assert logged[f"rewards/{name}/mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_generation_capture_matches_a_forward_pass_per_token():
    model, tokenizer = make_tiny_model_and_tokenizer(seed=1)
    inputs = tokenizer(["what is 1 + 2 ?", "what is 3 ?"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    with GenerationEntropyRecorder(model, temperature=0.9, signals=("token_entropy",)) as recorder:
        out = model.generate(**inputs, do_sample=True, temperature=0.9, max_new_tokens=7, pad_token_id=0)
    completion = out[:, inputs["input_ids"].size(1) :]
    values = torch.stack(recorder.per_completion(completion.tolist())["token_entropy"])
    mask = torch.ones_like(values, dtype=torch.bool)
    with torch.no_grad():
        full = model(out, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(completion)], 1))
    reference = token_entropy(full.logits[:, inputs["input_ids"].size(1) - 1 : -1].double(), 0.9)
    assert mask.all() and values.shape == reference.shape
    assert (values - reference).abs().max().item() < 1e-3


def _scored_batch(trainer, dataset):
    """One generation batch, scored by the trainer (generation, rewards, advantages), as training would get it."""
    rows = [dataset[i] for i in range(trainer.args.per_device_train_batch_size // trainer.num_generations)]
    inputs = [row for row in rows for _ in range(trainer.num_generations)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    return trainer._generate_and_score_completions(inputs)


class KeepLogpsGRPOTrainer(EntropyGRPOTrainer):
    """Keeps the differentiable per-token log-probs and entropies of the loss pass, to inspect their gradients."""

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled() and logps.requires_grad:
            logps.retain_grad()
            self.kept = (logps, entropies)
        return logps, entropies, aux


@pytest.mark.parametrize("ratio,mode", [(0.2, "top"), (0.5, "top"), (0.2, "bottom")])
@pytest.mark.parametrize("normalization", ["selected", "all"])
def test_forking_mask_count_gradient_support_and_loss(tmp_path, ratio, mode, normalization):
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward="token",
        forking_token_ratio=ratio,
        forking_token_mode=mode,
        forking_token_normalization=normalization,
        per_device_train_batch_size=8,
        **{k: v for k, v in TINY_KWARGS.items() if k != "per_device_train_batch_size"},
    )
    trainer = KeepLogpsGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = _scored_batch(trainer, dataset)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    logps, entropies = trainer.kept
    mask = batch["completion_mask"].bool()
    n_valid = int(mask.sum())

    expected_selected = high_entropy_mask(entropies.detach(), mask, ratio, mode)
    k = selected_token_count(n_valid, ratio)
    assert int(expected_selected.sum()) == (k if mode == "top" else n_valid - k)
    # Brute force: the top-k of the valid entropies, in order.
    flat = sorted(
        ((-e, i) for i, (e, m) in enumerate(zip(entropies.detach().flatten().tolist(), mask.flatten())) if m)
    )
    top = {i for _, i in flat[:k]}
    brute = torch.tensor([(i in top) for i in range(mask.numel())]).view(mask.shape)
    assert torch.equal(expected_selected, brute if mode == "top" else mask & ~brute)

    # Gradient flows through the selected tokens only (and through each of them: advantages are non-zero).
    advantages = batch["advantages"].unsqueeze(1).expand_as(mask)
    has_grad = logps.grad != 0
    assert not (has_grad & ~expected_selected).any()
    assert torch.equal(has_grad, expected_selected & (advantages != 0))

    # Hand-computed DAPO loss, on-policy (ratio 1): -sum over selected of A / normaliser.
    n_selected = int(expected_selected.sum())
    summed = -(advantages * expected_selected).sum().item()
    expected_loss = summed / (n_selected if normalization == "selected" else n_valid)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)


def _log_values(history, key):
    return [h[key] for h in history if key in h]


@pytest.mark.parametrize("extra", [{}, {"loss_type": "grpo", "beta": 0.04}])
def test_drop_in_identity_with_entropy_options_off(tmp_path, extra):
    def rule_reward(completions, **kwargs):
        return [float(len(c)) / 10 for c in completions]

    runs = []
    for config_class, trainer_class in ((GRPOConfig, GRPOTrainer), (EntropyGRPOConfig, EntropyGRPOTrainer)):
        model, tokenizer, dataset = tiny_setup()
        if extra.get("beta"):  # a KL reference is loaded by name: give the tiny model one
            model.save_pretrained(tmp_path / "tiny")
            model = str(tmp_path / "tiny")
        kwargs = {**TINY_KWARGS, "max_steps": 3, "learning_rate": 1e-2, **extra}
        args = config_class(output_dir=str(tmp_path / trainer_class.__name__), **kwargs)
        trainer = trainer_class(
            model, reward_funcs=rule_reward, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        runs.append(trainer.state.log_history)
    plain, entropy = runs
    for key in ("loss", "reward", "entropy", "grad_norm"):
        assert _log_values(plain, key) == _log_values(entropy, key), key
    assert len(_log_values(plain, "loss")) == 3


def test_label_free_training_without_reward_funcs(tmp_path):
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(output_dir=str(tmp_path), entropy_reward="token", **{**TINY_KWARGS, "max_steps": 2})
    before = [p.detach().clone() for p in model.parameters()]
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    first = trainer.state.log_history[0]
    # The reward is minus the mean token entropy: TRL's own entropy metric of the same batch, up to token weighting.
    assert first["rewards/entropy_token/mean"] < 0
    assert first["rewards/entropy_token/mean"] == pytest.approx(-first["entropy"], rel=0.05)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_user_config_object_is_not_modified(tmp_path):
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(output_dir=str(tmp_path), entropy_reward="token", **TINY_KWARGS)
    EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert args.reward_weights is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"forking_token_ratio": 0.0}, r"`forking_token_ratio` must be in \(0, 1\]"),
        ({"forking_token_ratio": 1.5}, r"`forking_token_ratio` must be in \(0, 1\]"),
        ({"forking_token_mode": "bottom"}, "forking_token_mode='bottom'"),
        ({"forking_token_mode": "middle"}, "`forking_token_mode` must be one of"),
        ({"forking_token_scope": "world"}, "`forking_token_scope` must be one of"),
        ({"forking_token_normalization": "none"}, "`forking_token_normalization` must be one of"),
        ({"entropy_reward": "tokens"}, "`entropy_reward` must be one of"),
        ({"entropy_reward_weight": math.inf}, "`entropy_reward_weight` must be a finite"),
        ({"forking_token_ratio": 0.2, "top_entropy_quantile": 0.2}, "either TRL's `top_entropy_quantile`"),
    ],
)
def test_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropyGRPOConfig(output_dir=str(tmp_path), **kwargs)


def test_trainer_errors(tmp_path):
    model, tokenizer, dataset = tiny_setup()
    # TRL's own error (tests/trainers/test_dropin.py)
    with pytest.raises(ValueError, match="No reward source provided"):
        EntropyGRPOTrainer(
            model,
            args=EntropyGRPOConfig(output_dir=str(tmp_path), **TINY_KWARGS),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path), entropy_reward="token", reward_weights=[1.0, 2.0], **TINY_KWARGS
    )
    with pytest.raises(ValueError, match="`reward_weights` has 2 entries for 1 reward functions"):
        EntropyGRPOTrainer(
            model, reward_funcs=[RecordingReward()], args=args, train_dataset=dataset, processing_class=tokenizer
        )


def test_recorder_is_removed_and_processors_still_compose():
    """The recording hook comes off after generation and does not disturb other logits processors."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed=2)
    inputs = tokenizer(["what is 4 ?"], return_tensors="pt")
    with GenerationEntropyRecorder(model, 1.0, ("token_entropy",)) as recorder:
        model.generate(
            **inputs, do_sample=False, max_new_tokens=3, pad_token_id=0, logits_processor=LogitsProcessorList()
        )
    assert len(recorder.steps["token_entropy"]) == 3
    model(**inputs)
    assert len(recorder.steps["token_entropy"]) == 3  # no longer recording
