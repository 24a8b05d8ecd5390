"""Drop-in conformance: the entropy trainers against TRL's own GRPOTrainer/RLOOTrainer on the paths TRL's users take.

One test (or parametrised group) per item of issue 13: reward_processing_classes with the entropy reward (1), an
environment that owns its reward (2), a plain TRL config (3), bare objects as TRL's tests build them (4), TRL's own
error without a reward (5), RLOO's forking mask inside RLOO's own sequence objective (7), the forking normalisation
for every GRPO loss type (8) and the RLOO KL recipe (10). TRL's trainer code is the reference throughout.
"""

import copy
import importlib.util
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from trainer_utils import TINY_KWARGS, tiny_setup
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_entropy.ops import high_entropy_mask
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

RLOO_KWARGS = {**TINY_KWARGS, "beta": 0.0}  # RLOO's default KL loads a reference model by name
PAIRS = {
    "grpo": (GRPOConfig, GRPOTrainer, EntropyGRPOConfig, EntropyGRPOTrainer, TINY_KWARGS),
    "rloo": (RLOOConfig, RLOOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer, RLOO_KWARGS),
}


def length_reward(completions, **kwargs):
    return [float(len(c)) / 10 for c in completions]


def other_reward(completions, **kwargs):
    return [1.0 if "1" in str(c) else 0.0 for c in completions]


# ---------------------------------------------------------------------------------------------------------------------
# 1. reward_processing_classes next to the appended entropy reward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
@pytest.mark.parametrize("as_list", [True, False])
def test_reward_processing_classes_with_entropy_reward(tmp_path, algo, as_list):
    config_class, trl_class, entropy_config, entropy_class, kwargs = PAIRS[algo]
    model, tokenizer, dataset = tiny_setup()
    reward_tokenizer = copy.deepcopy(tokenizer)
    given = [reward_tokenizer] if as_list else reward_tokenizer
    plain = trl_class(
        model,
        reward_funcs=[length_reward],
        args=config_class(output_dir=str(tmp_path / "plain"), **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=given,
    )
    trainer = entropy_class(
        model,
        reward_funcs=[length_reward],
        args=entropy_config(output_dir=str(tmp_path / "entropy"), entropy_reward="token", **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=given,
    )
    # TRL's entries for the user's rewards, then one for the entropy reward (which needs none).
    assert trainer.reward_processing_classes == [*plain.reward_processing_classes, None]
    assert trainer.reward_funcs[-1] is trainer.entropy_reward_func
    # A real mismatch of the user's own lists still raises TRL's message, with the user's counts.
    with pytest.raises(
        ValueError, match=r"reward processing classes \(2\) must match the number of reward functions \(1\)"
    ):
        entropy_class(
            model,
            reward_funcs=[length_reward],
            args=entropy_config(output_dir=str(tmp_path / "bad"), entropy_reward="token", **kwargs),
            train_dataset=dataset,
            processing_class=tokenizer,
            reward_processing_classes=[reward_tokenizer, reward_tokenizer],
        )


# ---------------------------------------------------------------------------------------------------------------------
# 2. An environment that owns its reward (GRPO only: TRL's RLOO has no environments)
# ---------------------------------------------------------------------------------------------------------------------


class CounterEnv:
    """A minimal TRL environment that owns its reward."""

    def reset(self, **kwargs) -> str:
        self.count = 0
        return ""

    def increment(self, step: int) -> str:
        """Add a step to the counter.

        Args:
            step: how much to add.
        """
        self.count += step
        return str(self.count)

    def get_reward(self) -> float:
        return float(self.count)


def _tool_tokenizer():
    _, tokenizer, _ = tiny_setup()
    import trl

    template = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    tokenizer.chat_template = template.read_text()
    return tokenizer


@pytest.mark.parametrize("entropy_reward", ["none", "token"])
def test_environment_that_owns_its_reward(tmp_path, entropy_reward):
    model, _, dataset = tiny_setup()
    tokenizer = _tool_tokenizer()
    common = dict(train_dataset=dataset, processing_class=tokenizer, environment_factory=CounterEnv)
    plain = GRPOTrainer(model, args=GRPOConfig(output_dir=str(tmp_path / "plain"), **TINY_KWARGS), **common)
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path / "entropy"), entropy_reward=entropy_reward, entropy_reward_weight=0.5, **TINY_KWARGS
    )
    trainer = EntropyGRPOTrainer(model, args=args, **common)
    if entropy_reward == "none":
        assert trainer.reward_func_names == plain.reward_func_names == ["CounterEnv"]
        assert torch.equal(trainer.reward_weights, plain.reward_weights)
    else:  # the entropy reward first (it stands for the absent reward_funcs), then TRL's environment reward
        assert trainer.reward_func_names == ["entropy_token", *plain.reward_func_names]
        assert trainer.reward_weights.tolist() == [0.5, *plain.reward_weights.tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# 3. A plain GRPOConfig/RLOOConfig gives exactly TRL's trainer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_plain_trl_config_runs_trl_unchanged(tmp_path, algo):
    config_class, trl_class, _, entropy_class, kwargs = PAIRS[algo]
    runs = []
    for trainer_class in (trl_class, entropy_class):
        model, tokenizer, dataset = tiny_setup()
        args = config_class(
            output_dir=str(tmp_path / trainer_class.__name__), **{**kwargs, "max_steps": 2, "learning_rate": 1e-2}
        )
        trainer = trainer_class(
            model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        runs.append(trainer.state.log_history)
    for key in ("loss", "reward", "entropy", "grad_norm"):
        values = [h[key] for h in runs[0] if key in h]
        assert values and values == [h[key] for h in runs[1] if key in h], key


# ---------------------------------------------------------------------------------------------------------------------
# 4. Overrides on objects TRL's own tests build without `__init__`
# ---------------------------------------------------------------------------------------------------------------------


def test_overrides_need_no_attribute_trl_does_not_need():
    accelerator = Accelerator(cpu=True)
    entropies = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 1.1, 1.2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    results = []
    for cls in (GRPOTrainer, EntropyGRPOTrainer):
        bare = object.__new__(cls)  # what TRL's tests do: only the attributes TRL's method reads
        bare.accelerator = accelerator
        results.append(cls.get_high_entropy_mask(bare, entropies, mask, 0.5))
    assert torch.equal(results[0], results[1])
    for cls in (EntropyGRPOTrainer, EntropyRLOOTrainer):
        bare = object.__new__(cls)
        assert bare._entropy_source() is None  # no entropy reward registered: generation runs TRL's code


# ---------------------------------------------------------------------------------------------------------------------
# 5. No reward at all, entropy off: TRL's own error
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_no_reward_raises_trls_own_error(tmp_path, algo):
    config_class, trl_class, entropy_config, entropy_class, kwargs = PAIRS[algo]
    model, tokenizer, dataset = tiny_setup()
    errors = []
    for trainer_class, cfg in ((trl_class, config_class), (entropy_class, entropy_config)):
        with pytest.raises(Exception) as info:
            trainer_class(
                model,
                reward_funcs=None,
                args=cfg(output_dir=str(tmp_path / trainer_class.__name__), **kwargs),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


# ---------------------------------------------------------------------------------------------------------------------
# 7. RLOO with the forking mask: RLOO's own sequence objective over the selected tokens
# ---------------------------------------------------------------------------------------------------------------------


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _rloo_trainer(tmp_path, name, trainer_class, config_class, **extra):
    model, tokenizer, dataset = tiny_setup()
    args = config_class(output_dir=str(tmp_path / name), **{**RLOO_KWARGS, **extra})
    trainer = trainer_class(
        model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer, dataset


def test_rloo_mask_selecting_every_token_is_rlootrainer(tmp_path):
    masked, dataset = _rloo_trainer(
        tmp_path, "masked", EntropyRLOOTrainer, EntropyRLOOConfig, forking_token_ratio=0.9999
    )
    off, _ = _rloo_trainer(tmp_path, "off", EntropyRLOOTrainer, EntropyRLOOConfig)
    plain, _ = _rloo_trainer(tmp_path, "plain", RLOOTrainer, RLOOConfig)
    masked.model.train()
    batch = masked._generate_and_score_completions([dataset[0]] * masked.num_generations)
    assert batch["advantages"].abs().sum() > 0
    reference_loss, reference_grads = _loss_and_grads(plain, batch)  # TRL's class, same weights, same batch
    for trainer in (masked, off):
        loss, grads = _loss_and_grads(trainer, batch)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-7)
        assert grads.keys() == reference_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-7)
    assert masked._metrics["train"]["forking/selected_fraction"][-1] == 1.0


def test_rloo_mask_keeps_the_moe_aux_loss(tmp_path):
    """A mixture-of-experts policy: RLOO adds its router load-balancing loss inside `_compute_loss`; with every token
    selected the masked trainer's loss and gradients (aux term included) are RLOOTrainer's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    _, tokenizer, dataset = tiny_setup()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    trainers = []
    for name, trainer_class, config_class, extra in (
        ("masked", EntropyRLOOTrainer, EntropyRLOOConfig, {"forking_token_ratio": 0.9999}),
        ("plain", RLOOTrainer, RLOOConfig, {}),
    ):
        torch.manual_seed(0)
        model = MixtralForCausalLM(config)
        args = config_class(output_dir=str(tmp_path / name), **{**RLOO_KWARGS, **extra})
        trainers.append(
            trainer_class(
                model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=tokenizer
            )
        )
    masked, plain = trainers
    assert masked.aux_loss_enabled and plain.aux_loss_enabled
    masked.model.train()
    batch = masked._generate_and_score_completions([dataset[0]] * masked.num_generations)
    reference_loss, reference_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(masked, batch)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-7)
    for name in reference_grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-7)
    assert masked._metrics["train"]["aux_loss"][-1] == plain._metrics["train"]["aux_loss"][-1] > 0


def test_rloo_mask_restricts_the_sequence_log_ratio(tmp_path):
    ratio = 0.4
    masked, dataset = _rloo_trainer(
        tmp_path, "masked", EntropyRLOOTrainer, EntropyRLOOConfig, forking_token_ratio=ratio
    )
    plain, _ = _rloo_trainer(tmp_path, "plain", RLOOTrainer, RLOOConfig)
    masked.model.train()
    batch = masked._generate_and_score_completions([dataset[0]] * masked.num_generations)
    loss, grads = _loss_and_grads(masked, batch)
    # Closed form on-policy (ratio 1, inside the clip range): loss = -mean_i A_i and
    # grad = -(1/B) sum_i A_i sum_{t selected} grad log pi(y_t), the log-probs from TRL's own scoring pass.
    completion_mask = batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    plain.model.train()
    plain.model.zero_grad()
    logps, entropies, _ = plain._get_per_token_logps_and_entropies(
        plain.model, input_ids, attention_mask, completion_mask.size(1), compute_entropy=True
    )
    selected = high_entropy_mask(entropies.detach(), completion_mask, ratio)
    assert 0 < int(selected.sum()) < int(completion_mask.sum())
    advantages = batch["advantages"]
    reference = -(advantages.unsqueeze(1) * logps * selected).sum() / advantages.numel()
    reference.backward()
    torch.testing.assert_close(loss, -advantages.mean(), rtol=1e-5, atol=1e-7)
    for name, param in plain.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7)


def test_rloo_config_refuses_selected_normalisation(tmp_path):
    with pytest.raises(ValueError, match="forking_token_normalization='selected'.*forking_token_ratio"):
        EntropyRLOOConfig(output_dir=str(tmp_path), forking_token_ratio=0.2, forking_token_normalization="selected")
    config = EntropyRLOOConfig(output_dir=str(tmp_path), forking_token_ratio=0.2, use_cpu=True, bf16=False)
    assert config.forking_token_normalization == "all"


# ---------------------------------------------------------------------------------------------------------------------
# 8. forking_token_normalization="selected" for every GRPO loss type
# ---------------------------------------------------------------------------------------------------------------------


def _grpo_loss_types() -> list[str]:
    help_text = next(f for f in fields(GRPOConfig) if f.name == "loss_type").metadata["help"]
    listed = help_text.split("Supported values are")[1].split(". ")[0]
    return re.findall(r"'(\w+)'", listed)


def test_loss_type_list_is_trls():
    assert set(_grpo_loss_types()) == {"grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"}


class KeepEntropiesGRPOTrainer(EntropyGRPOTrainer):
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled() and logps.requires_grad:
            self.kept_entropies = entropies.detach()
        return logps, entropies, aux


def _grpo_batch(trainer, dataset):
    rows = [dataset[i] for i in range(trainer.args.per_device_train_batch_size // trainer.num_generations)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    return trainer._generate_and_score_completions([row for row in rows for _ in range(trainer.num_generations)])


@pytest.mark.parametrize("loss_type", [t for t in _grpo_loss_types() if t != "luspo"])
def test_selected_normalisation_is_the_loss_type_over_the_selected_tokens(tmp_path, loss_type):
    """ "selected" = TRL's own loss of that type with the unselected tokens masked out (through TRL's `tool_mask`,
    which masks the loss and not the attention) and, for the token-count normalisers, the selected count."""
    ratio = 0.5
    kwargs = {**TINY_KWARGS, "per_device_train_batch_size": 8, "loss_type": loss_type}
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(output_dir=str(tmp_path / "e"), forking_token_ratio=ratio, **kwargs)
    trainer = KeepEntropiesGRPOTrainer(
        model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    plain_model, _, _ = tiny_setup()
    plain = GRPOTrainer(
        plain_model,
        reward_funcs=length_reward,
        args=GRPOConfig(output_dir=str(tmp_path / "p"), **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    plain.current_gradient_accumulation_steps = 1
    batch = _grpo_batch(trainer, dataset)
    assert batch["advantages"].abs().sum() > 0
    loss, grads = _loss_and_grads(trainer, batch)

    selected = high_entropy_mask(trainer.kept_entropies, batch["completion_mask"], ratio)
    assert 0 < int(selected.sum()) < int(batch["completion_mask"].sum())
    reference_batch = {**batch, "tool_mask": selected.to(batch["completion_mask"].dtype)}
    reference_batch["num_items_in_batch"] = selected.sum().to(batch["num_items_in_batch"].dtype)
    reference_loss, reference_grads = _loss_and_grads(plain, reference_batch)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-7)
    for name in reference_grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["luspo", "grpo"])
def test_sequence_level_importance_sampling_is_refused_with_the_mask(tmp_path, loss_type):
    with pytest.raises(ValueError, match="forking_token_ratio.*importance_sampling_level"):
        EntropyGRPOConfig(
            output_dir=str(tmp_path),
            loss_type=loss_type,
            importance_sampling_level="sequence",
            forking_token_ratio=0.2,
        )


# ---------------------------------------------------------------------------------------------------------------------
# 10. The RLOO EM-RL recipe: TRL's RLOO beta is a summed log-ratio penalty on the reward
# ---------------------------------------------------------------------------------------------------------------------


def test_rloo_recipe_does_not_set_the_papers_kl_as_rloo_beta():
    """TRL's RLOO ``beta`` subtracts ``beta * sum_t (log pi_old - log pi_ref)`` from each reward (a summed log-ratio
    that grows with length), not the paper's per-token low_var_kl loss term: the recipe must not present 0.001 as
    the paper's setting for it."""
    path = Path(__file__).parents[2] / "examples" / "em_rl_rloo.py"
    spec = importlib.util.spec_from_file_location("em_rl_rloo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.DEFAULTS["beta"] == 0.0
    # The shipped RLOO recipe (tests/cli/test_recipes.py trains it for a step with these values).
    import yaml

    recipe = Path(__file__).parents[2] / "recipes" / "Qwen2.5-Math-7B" / "rloo" / "config_em_rl_token.yaml"
    values = yaml.safe_load(recipe.read_text())
    assert values["beta"] == 0.0 and values["entropy_reward"] == "token"
