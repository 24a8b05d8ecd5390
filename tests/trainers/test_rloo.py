"""EntropyRLOOTrainer on the tiny model: rewards vs brute force, drop-in identity."""

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
from trl import RLOOConfig, RLOOTrainer

from trl_entropy.trainers import EntropyRLOOConfig, EntropyRLOOTrainer

# RLOO's default KL (beta=0.05) loads a reference model by name; most tests use none.
TINY_KWARGS = {**TINY_KWARGS, "beta": 0.0}


class ScoringSourceRLOOTrainer(ScoringSourceMixin, EntropyRLOOTrainer):
    """Takes the path of vLLM runs: RLOO always makes its policy pass before the rewards, which is then read."""


@pytest.mark.parametrize(
    "variant,trainer_class,source",
    [
        ("token", EntropyRLOOTrainer, "generation"),
        ("token", ScoringSourceRLOOTrainer, "old_logps"),
        ("trajectory", ScoringSourceRLOOTrainer, "old_logps"),
        ("self_certainty", EntropyRLOOTrainer, "generation"),
        ("self_certainty", ScoringSourceRLOOTrainer, "forward"),
        ("token", ScoringSourceRLOOTrainer, "old_logps+lora-kl"),
    ],
)
def test_entropy_reward_matches_brute_force(tmp_path, variant, trainer_class, source):
    model, tokenizer, dataset = tiny_setup()
    kwargs, trainer_kwargs = dict(TINY_KWARGS), {}
    if source.endswith("+lora-kl"):
        # With LoRA the KL reference is the same model with adapters off, scored right after the policy's pass:
        # the reward must come from the policy's. Random adapter weights make the two differ.
        from peft import LoraConfig

        trainer_kwargs["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        kwargs["beta"], source = 0.05, "old_logps"
    recorder = RecordingReward()
    args = EntropyRLOOConfig(
        output_dir=str(tmp_path),
        entropy_reward=variant,
        reward_weights=[0.0],
        learning_rate=0.0,
        temperature=0.8,
        **kwargs,
    )
    sources = SourceRecorder()
    trainer = trainer_class(
        model,
        reward_funcs=recorder,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[sources],
        **trainer_kwargs,
    )
    trainer.train()
    assert set(sources.sources) == {source}
    got = list(trainer._logs["rewards"][trainer.entropy_reward_func.__name__])
    expected = brute_force_rewards(trainer.model, tokenizer, recorder.prompts, recorder.completion_ids, 0.8, variant)
    assert len(got) == 4
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)


# The forking-token mask inside RLOO's sequence objective is tested against RLOOTrainer in
# tests/trainers/test_dropin.py.


def test_drop_in_identity_with_entropy_options_off(tmp_path):
    def rule_reward(completions, **kwargs):
        return [float(len(c)) / 10 for c in completions]

    runs = []
    for config_class, trainer_class in ((RLOOConfig, RLOOTrainer), (EntropyRLOOConfig, EntropyRLOOTrainer)):
        model, tokenizer, dataset = tiny_setup()
        args = config_class(
            output_dir=str(tmp_path / trainer_class.__name__), **{**TINY_KWARGS, "max_steps": 3, "learning_rate": 1e-2}
        )
        trainer = trainer_class(
            model, reward_funcs=rule_reward, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        runs.append(trainer.state.log_history)
    for key in ("loss", "reward", "entropy", "grad_norm"):
        plain = [h[key] for h in runs[0] if key in h]
        assert plain == [h[key] for h in runs[1] if key in h], key
        assert len(plain) == 3 or key not in ("loss",)


def test_label_free_rloo_without_reward_funcs(tmp_path):
    model, tokenizer, dataset = tiny_setup()
    args = EntropyRLOOConfig(
        output_dir=str(tmp_path), entropy_reward="token", forking_token_ratio=0.2, **{**TINY_KWARGS, "max_steps": 2}
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer = EntropyRLOOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["rewards/entropy_token/mean"] == pytest.approx(-first["entropy"], rel=0.05)
    assert 0 < first["forking/selected_fraction"] <= 0.3
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_rloo_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`forking_token_ratio` must be in \(0, 1\]"):
        EntropyRLOOConfig(output_dir=str(tmp_path), forking_token_ratio=2.0)
    with pytest.raises(ValueError, match="`entropy_reward` must be one of"):
        EntropyRLOOConfig(output_dir=str(tmp_path), entropy_reward="seq")
