"""EMFTTrainer against float64 brute force: the loss, its gradient, gradient accumulation, the before/after entropy
log, the KL guard, LoRA, and a few real EM-FT steps on the embedded SmolLM2 model."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from trl_entropy.testing import make_tiny_model, make_tiny_tokenizer, tiny_prompts
from trl_entropy.trainers.emft import EMFTConfig, EMFTTrainer

# Sharpens the random tiny model so token entropies spread out and EOS is sometimes sampled (ragged completions).
LM_HEAD_SCALE = 10.0


@pytest.fixture(autouse=True)
def _single_thread():
    """One torch thread: the tiny model's matmuls are far faster on one thread than two, and on a shared 2-core
    machine two threads slowed the SmolLM2 test several-fold (threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharp_tiny_model(seed: int = 0):
    model = make_tiny_model(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


def float64_copy(model) -> torch.nn.Module:
    """A fresh float64 tiny Llama holding ``model``'s current weights (the trainer patches ``forward`` on its own
    instance, so the reference is a separate module running the stock forward)."""
    reference = make_tiny_model(0)
    reference.load_state_dict(model.state_dict())
    return reference.double()


def emft_config(tmp_path, **overrides) -> EMFTConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_completion_length=8,
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return EMFTConfig(**settings)


def tiny_trainer(tmp_path, model=None, **overrides) -> EMFTTrainer:
    return EMFTTrainer(
        model if model is not None else sharp_tiny_model(),
        args=emft_config(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": tiny_prompts(8)}),
        processing_class=make_tiny_tokenizer(),
    )


def first_training_batch(trainer: EMFTTrainer) -> dict:
    """The micro-batch the trainer's first training step would see: sampled prompts and completions."""
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def brute_force_objective(
    policy64, inputs, temperature=1.0, floor=0.0, normalization="token", reference64=None, beta=0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 EM-FT objective from full logits of a plain forward: (objective, per-token entropies)."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].size(1)

    def completion_log_probs(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1]
        return torch.log_softmax(logits.double() / temperature, dim=-1)

    log_p = completion_log_probs(policy64)
    entropies = -(log_p.exp() * log_p).sum(-1)
    per_token = (entropies - floor).clamp(min=0.0)
    if beta:
        sampled = inputs["completion_ids"].unsqueeze(-1)
        policy_lp = log_p.gather(-1, sampled).squeeze(-1)
        with torch.no_grad():
            reference_lp = completion_log_probs(reference64).gather(-1, sampled).squeeze(-1)
        log_ratio = reference_lp - policy_lp
        per_token = per_token + beta * (log_ratio.exp() - log_ratio - 1)
    mask = inputs["completion_mask"].double()
    if normalization == "token":
        return (per_token * mask).sum() / mask.sum(), entropies
    lengths = mask.sum(-1)
    per_sequence = (per_token * mask).sum(-1) / lengths.clamp(min=1)
    return per_sequence[lengths > 0].mean(), entropies


def assert_gradients_match(model32, model64):
    """Every parameter gradient of the trainer's float32 model equals the float64 autograd reference."""
    grads64 = dict(model64.named_parameters())
    compared = 0
    for name, param in model32.named_parameters():
        if param.grad is None:
            continue
        expected = grads64[name].grad
        scale = expected.abs().max().item()
        torch.testing.assert_close(param.grad.double(), expected, rtol=1e-4, atol=1e-5 * scale + 1e-9)
        compared += 1
    assert compared == len(grads64), "every parameter must receive a gradient"


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


def test_one_sample_per_prompt_is_refused_naming_the_trl_version(tmp_path):
    """TRL 1.16's GRPOConfig requires num_generations >= 2; EMFTConfig says so instead of getting 1 past the check
    (the code before this test passed an int subclass whose `<` answered untruly)."""
    with pytest.raises(ValueError, match=r"`num_samples_per_prompt` must be an integer >= 2, got 1.*TRL 1\.16"):
        emft_config(tmp_path, num_samples_per_prompt=1)
    config = emft_config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    assert config.num_samples_per_prompt == 2 and config.num_generations == 2 and type(config.num_generations) is int
    assert config.vllm_importance_sampling_correction is False


def test_several_samples_per_prompt_keep_grpo_divisibility_check(tmp_path):
    config = emft_config(tmp_path, num_samples_per_prompt=4, per_device_train_batch_size=8)
    assert config.num_generations == 4
    with pytest.raises(ValueError, match="divisible by num_generations"):
        emft_config(tmp_path, num_samples_per_prompt=3, per_device_train_batch_size=8)


def test_several_samples_per_prompt_are_drawn_for_each_prompt(tmp_path):
    trainer = tiny_trainer(tmp_path, num_samples_per_prompt=2)
    prompt_rows = [tuple(row.tolist()) for row in first_training_batch(trainer)["prompt_ids"]]
    assert len(prompt_rows) == 8
    assert sorted(prompt_rows.count(row) for row in set(prompt_rows)) == [2, 2, 2, 2]


@pytest.mark.parametrize(
    ("overrides", "parameter"),
    [
        ({"num_samples_per_prompt": 0}, "num_samples_per_prompt"),
        ({"num_samples_per_prompt": 1.5}, "num_samples_per_prompt"),
        ({"num_generations": 4}, "num_generations"),
        ({"entropy_normalization": "batch"}, "entropy_normalization"),
        ({"entropy_floor": -0.1}, "entropy_floor"),
        ({"entropy_floor": math.nan}, "entropy_floor"),
        ({"beta": -1.0}, "beta"),
        ({"entropy_coef": 0.01}, "entropy_coef"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"reward_weights": [1.0]}, "reward_weights"),
    ],
)
def test_config_rejects_bad_values_naming_the_parameter(tmp_path, overrides, parameter):
    with pytest.raises(ValueError, match=parameter):
        emft_config(tmp_path, **overrides)


def test_trainer_requires_an_emft_config(tmp_path):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="EMFTConfig"):
        EMFTTrainer(sharp_tiny_model(), args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True))


# ---------------------------------------------------------------------------------------------------------------------
# Loss and gradient against float64 brute force
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalization", "floor", "temperature"),
    [("token", 0.0, 1.0), ("sequence", 0.0, 1.0), ("token", 2.9, 0.7), ("sequence", 3.7, 1.3)],
)
def test_loss_and_gradient_match_float64_softmax_entropy(tmp_path, normalization, floor, temperature):
    trainer = tiny_trainer(tmp_path, entropy_normalization=normalization, entropy_floor=floor, temperature=temperature)
    inputs = first_training_batch(trainer)
    lengths = inputs["completion_mask"].sum(-1)
    assert lengths.min() < lengths.max(), "ragged completions are needed to exercise the mask"

    reference = float64_copy(trainer.model)
    expected, entropies = brute_force_objective(reference, inputs, temperature, floor, normalization)
    if floor:
        above = entropies[inputs["completion_mask"].bool()] > floor
        assert 0 < above.float().mean() < 1, "the floor must split the tokens for the hinge to be tested"

    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)

    loss.backward()
    expected.backward()
    assert_gradients_match(trainer.model, reference)


def test_kl_guard_matches_float64_reference(tmp_path):
    model_dir = tmp_path / "tiny"
    sharp_tiny_model().save_pretrained(model_dir)
    trainer = EMFTTrainer(
        str(model_dir),
        args=emft_config(tmp_path, beta=0.5),
        train_dataset=Dataset.from_dict({"prompt": tiny_prompts(8)}),
        processing_class=make_tiny_tokenizer(),
    )
    assert trainer.ref_model is not None
    # Move the policy away from the reference, or the KL and its gradient would be zero.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    inputs = first_training_batch(trainer)

    policy64 = float64_copy(trainer.model)
    reference64 = float64_copy(trainer.ref_model)
    expected, _ = brute_force_objective(policy64, inputs, reference64=reference64, beta=0.5)
    entropy_only, _ = brute_force_objective(float64_copy(trainer.model), inputs)
    assert expected.item() - entropy_only.item() > 1e-4, "the KL term must contribute"

    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    assert_gradients_match(trainer.model, policy64)


def test_loss_is_computed_from_the_trainer_entropy_method(tmp_path):
    """Observers of ``_get_per_token_logps_and_entropies`` (e.g. an entropy-statistics callback) see the training
    pass with ``compute_entropy=True`` and gradients on, and the loss is built from what that method returns."""
    trainer = tiny_trainer(tmp_path)
    inputs = first_training_batch(trainer)
    plain_loss = trainer.compute_loss(trainer.model, inputs).item()

    calls = []
    method = trainer._get_per_token_logps_and_entropies

    def doubled_entropies(*args, **kwargs):
        calls.append((kwargs.get("compute_entropy"), torch.is_grad_enabled()))
        logps, entropies, aux = method(*args, **kwargs)
        return logps, 2 * entropies, aux

    trainer._get_per_token_logps_and_entropies = doubled_entropies
    doubled_loss = trainer.compute_loss(trainer.model, inputs).item()
    assert calls == [(True, True)]
    assert doubled_loss == pytest.approx(2 * plain_loss, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Training loop: gradient accumulation, before/after log, LoRA
# ---------------------------------------------------------------------------------------------------------------------


def one_sgd_step(tmp_path, per_device_train_batch_size, gradient_accumulation_steps, **overrides):
    """One plain-SGD update (lr 1 unless overridden, no clipping) on the 8 prompts; returns (trainer, initial
    parameters)."""
    model = sharp_tiny_model()
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    settings = dict(optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1)
    settings.update(overrides)
    trainer = tiny_trainer(
        tmp_path / f"b{per_device_train_batch_size}",
        model=model,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        **settings,
    )
    trainer.train()
    return trainer, initial


def sampled_rows(trainer) -> list[tuple]:
    rows = []
    for batch in trainer._buffered_inputs:
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        rows += [tuple(row.tolist()) for row in ids]
    return sorted(rows)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_gradient_accumulation_gives_the_full_batch_update(tmp_path, normalization):
    full, initial = one_sgd_step(tmp_path, 8, 1, entropy_normalization=normalization)
    full_update = {n: p.detach() - initial[n] for n, p in full.model.named_parameters()}
    assert max(u.abs().max().item() for u in full_update.values()) > 1e-4
    for batch_size, accumulation in [(4, 2), (2, 4)]:
        split, initial = one_sgd_step(tmp_path, batch_size, accumulation, entropy_normalization=normalization)
        assert sampled_rows(split) == sampled_rows(full), "both runs must train on the same samples"
        for name, param in split.model.named_parameters():
            torch.testing.assert_close(param.detach() - initial[name], full_update[name], rtol=1e-4, atol=1e-7)


def test_generation_batch_spread_over_several_updates(tmp_path):
    """With steps_per_generation=2 and no accumulation, each update sees half of the generation batch and its loss
    is the per-sequence mean over that half only (exact for "sequence": every completion is non-empty)."""
    trainer, initial = one_sgd_step(
        tmp_path, 4, 1, steps_per_generation=2, entropy_normalization="sequence", learning_rate=0.0
    )
    first_half = trainer._buffered_inputs[0]
    assert first_half["completion_ids"].size(0) == 4
    before_model = make_tiny_model(0).double()
    before_model.load_state_dict({name: value.double() for name, value in initial.items()})
    with torch.no_grad():
        expected, _ = brute_force_objective(before_model, first_half, normalization="sequence")
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_entropy_before_and_after_are_logged_on_the_step_batch(tmp_path):
    trainer, initial = one_sgd_step(tmp_path, 4, 2, learning_rate=0.5)
    log = trainer.state.log_history[0]
    assert "completions/mean_length" in log
    assert not any(key.startswith("reward") for key in log), "EM-FT has no reward to log"

    # The window is both micro-batches of the step; float64 brute force before and after the update.
    batches = trainer._buffered_inputs
    inputs = {key: torch.cat([b[key] for b in batches]) for key in ("prompt_ids", "prompt_mask", "completion_mask")}
    inputs["completion_ids"] = torch.cat([b["completion_ids"] for b in batches])
    before_model = make_tiny_model(0).double()
    before_model.load_state_dict({name: value.double() for name, value in initial.items()})
    mask = inputs["completion_mask"].double()
    with torch.no_grad():
        _, entropies_before = brute_force_objective(before_model, inputs)
        _, entropies_after = brute_force_objective(float64_copy(trainer.model), inputs)
    expected_before = ((entropies_before * mask).sum() / mask.sum()).item()
    expected_after = ((entropies_after * mask).sum() / mask.sum()).item()
    assert log["emft/entropy_before"] == pytest.approx(expected_before, rel=1e-5)
    assert log["emft/entropy_after"] == pytest.approx(expected_after, rel=1e-5)
    assert log["emft/entropy_change"] == pytest.approx(expected_after - expected_before, abs=1e-4)
    assert expected_after < expected_before


def test_entropy_stats_callback_sees_exactly_the_training_passes(tmp_path):
    """EntropyStatsCallback taps the loss pass of every micro-batch, and not the no-grad entropy-after pass."""
    from trl_entropy.callbacks import EntropyStatsCallback

    trainer = tiny_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1)
    trainer.add_callback(EntropyStatsCallback(trainer, plot_on_train_end=False))
    trainer.train()
    log = trainer.state.log_history[0]
    completion_tokens = sum(int(batch["completion_mask"].sum()) for batch in trainer._buffered_inputs)
    assert log["sampling_entropy/num_tokens"] == completion_tokens
    assert log["sampling_entropy/mean"] == pytest.approx(log["emft/entropy_before"], rel=1e-5)
    assert "emft/entropy_after" in log


def test_evaluation_loss_is_the_token_mean_entropy(tmp_path):
    """In evaluation (no accumulation, no update) the token-normalised loss is the batch's mean token entropy."""
    trainer = EMFTTrainer(
        sharp_tiny_model(),
        args=emft_config(tmp_path, per_device_eval_batch_size=4),
        train_dataset=Dataset.from_dict({"prompt": tiny_prompts(8)}),
        eval_dataset=Dataset.from_dict({"prompt": tiny_prompts(4, seed=1)}),
        processing_class=make_tiny_tokenizer(),
    )
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_entropy"], rel=1e-5)
    assert "emft/entropy_after" not in trainer._metrics["train"], "evaluation must not touch the training window"


def test_lora_trains_only_the_adapter(tmp_path):
    from peft import LoraConfig, PeftModel

    trainer = EMFTTrainer(
        sharp_tiny_model(),
        args=emft_config(tmp_path, per_device_train_batch_size=4, max_steps=2),
        train_dataset=Dataset.from_dict({"prompt": tiny_prompts(8)}),
        processing_class=make_tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    assert isinstance(trainer.model, PeftModel)
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, param in trainer.model.named_parameters() if not torch.equal(param, initial[name])}
    adapter = {name for name in initial if "lora_" in name}
    assert adapter and changed, "the adapter must train"
    assert changed <= adapter, f"non-adapter parameters changed: {sorted(changed - adapter)}"
    assert any("lora_B" in name for name in changed)
    assert math.isfinite(trainer.state.log_history[-2]["emft/entropy_after"])


# ---------------------------------------------------------------------------------------------------------------------
# A few real EM-FT steps on the embedded default model
# ---------------------------------------------------------------------------------------------------------------------


def held_out_token_entropy(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> float:
    """Float64 mean token entropy of ``model``'s next-token distributions over fixed completion tokens."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    keep = completion_ids.size(1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1].double()
    log_p = torch.log_softmax(logits, dim=-1)
    entropies = -(log_p.exp() * log_p).sum(-1)
    mask = completion_mask.double()
    return ((entropies * mask).sum() / mask.sum()).item()


@pytest.mark.slow
def test_emft_lowers_held_out_entropy_on_smollm2(tmp_path):
    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.models import load_default_model

    model, tokenizer = load_default_model()
    task = ArithmeticTask()
    held_out = task.dataset(8, split="test")

    # Held-out completions sampled once from the initial model; entropy is measured on these same tokens before
    # and after training, so the comparison is paired.
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in held_out["prompt"]]
    prompts = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        generated = model.generate(**prompts, do_sample=True, temperature=1.0, max_new_tokens=16, top_k=0)
    completion_ids = generated[:, prompts["input_ids"].size(1) :]
    # Tokens after the first EOS are padding.
    is_eos = completion_ids == tokenizer.eos_token_id
    completion_mask = (is_eos.cumsum(-1) - is_eos.long() == 0).long()
    sample = (prompts["input_ids"], prompts["attention_mask"], completion_ids, completion_mask)
    before = held_out_token_entropy(model, *sample)

    trainer = EMFTTrainer(
        model,
        args=emft_config(
            tmp_path,
            per_device_train_batch_size=8,
            max_completion_length=16,
            learning_rate=2e-5,
            max_steps=4,
        ),
        train_dataset=task.dataset(8, split="train"),
        processing_class=tokenizer,
    )
    trainer.train()
    after = held_out_token_entropy(trainer.model, *sample)

    steps = [log for log in trainer.state.log_history if "emft/entropy_change" in log]
    assert len(steps) == 4
    assert sum(log["emft/entropy_change"] < 0 for log in steps) >= 3, steps
    assert after < before - 0.05, (before, after)
