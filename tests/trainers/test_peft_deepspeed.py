"""LoRA (PEFT) and DeepSpeed ZeRO-2/3 with the entropy trainers, on CPU.

LoRA: only the adapter weights move, and the entropy reward is the adapted policy's (float64 brute force on the
merged model). DeepSpeed: accelerate's `DeepSpeedPlugin` and the trainer configs accept the ZeRO-2/3 files in
`tests/dist_scripts/`, and a real two-process run under each ZeRO stage trains like plain DDP (same rewards, same
global forking selection, same weights). The DeepSpeed tests are skipped, with the reason, when `deepspeed` is not
installed (`pip install deepspeed`; version 0.19 runs ZeRO-2/3 on CPU with the gloo backend).
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from dist_scripts.launcher import LaunchError, launch
from dist_scripts.references import brute_force_forking
from trainer_utils import TINY_KWARGS, RecordingReward, brute_force_rewards, tiny_setup

from trl_entropy.testing import make_tiny_model_and_tokenizer
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

SCRIPTS = Path(__file__).resolve().parents[1] / "dist_scripts"
TINY_KWARGS = {**TINY_KWARGS, "bf16": False}  # float32 passes: rewards comparable to a float64 reference at 1e-4

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install deepspeed); ZeRO tests skipped",
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model's matmuls are too small to gain from threads, and on a busy 2-core machine two OpenMP threads
    per process slow each step down several times over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------------


def base_name(peft_name: str) -> str:
    """PEFT's name of a base weight -> the plain model's, e.g. `...q_proj.base_layer.weight` -> `...q_proj.weight`."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_lora_trains_only_the_adapters_and_rewards_the_adapted_policy(tmp_path, kind):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    model, tokenizer, dataset = tiny_setup()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Random (not zero) adapters from the start, so the adapted policy differs from the base model at step 1.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    recorder = RecordingReward()
    common = dict(
        output_dir=str(tmp_path),
        entropy_reward="token",
        reward_weights=[0.0],
        forking_token_ratio=0.5,
        temperature=0.8,
        **{**TINY_KWARGS, "learning_rate": 5e-2},
    )
    if kind == "grpo":
        trainer = EntropyGRPOTrainer(
            model,
            reward_funcs=recorder,
            args=EntropyGRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    else:
        trainer = EntropyRLOOTrainer(
            model,
            reward_funcs=recorder,
            args=EntropyRLOOConfig(beta=0.0, **common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    adapters_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    adapter_state = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    assert adapters_before and all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())
    trainer.train()

    after = dict(trainer.model.named_parameters())
    for name, tensor in after.items():
        if "lora_" in name:
            continue
        assert torch.equal(tensor, original[base_name(name)]), name  # the base model never moves
    assert any(not torch.equal(after[n], before) for n, before in adapters_before.items())

    # The step's rewards are the adapted policy's (the merged model), not the base model's. The reference is rebuilt
    # from a fresh model: a deepcopy of the trainer's model would not do, since TRL's fused LM head patches the
    # instance's `forward` with a closure over the original model, which a copy keeps calling.
    policy_at_start = get_peft_model(make_tiny_model_and_tokenizer(seed=0)[0], copy.deepcopy(lora))
    set_peft_model_state_dict(policy_at_start, adapter_state)
    policy_at_start = policy_at_start.merge_and_unload()
    prompts, completions = recorder.prompts, recorder.completion_ids
    expected = brute_force_rewards(policy_at_start, tokenizer, prompts, completions, 0.8, "token")
    base_model, _ = make_tiny_model_and_tokenizer(seed=0)
    base_rewards = brute_force_rewards(base_model, tokenizer, prompts, completions, 0.8, "token")
    got = list(trainer._logs["rewards"]["entropy_token"])
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(abs(g - b) for g, b in zip(got, base_rewards)) > 1e-3
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------------------------------


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_plugin_and_configs_accept_the_zero_files(tmp_path, stage):
    from accelerate.utils import DeepSpeedPlugin

    path = SCRIPTS / f"zero{stage}.json"
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    for config_class in (EntropyGRPOConfig, EntropyRLOOConfig):
        args = config_class(output_dir=str(tmp_path), entropy_reward="token", deepspeed=str(path), **TINY_KWARGS)
        assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == stage
        assert args.hf_deepspeed_config.is_zero3() == (stage == 3)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    try:
        # Plain DDP first (stage 0), then ZeRO-2 and ZeRO-3, one after the other in the same two processes.
        launch("deepspeed_checks.py", str(out), "0,2,3", timeout=540)
    except LaunchError as err:
        pytest.fail(str(err))
    return {
        stage: [torch.load(out / f"rank{r}_zero{stage}.pt", weights_only=False) for r in range(2)]
        for stage in (0, 2, 3)
    }


@needs_deepspeed
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_matches_ddp(zero_runs, stage):
    ddp, ranks = zero_runs[0], zero_runs[stage]
    assert [r["zero_stage"] for r in ranks] == [stage, stage]

    # Step 1 generated from the initial weights: the rewards are the float64 brute force, as under DDP.
    prompts = [p for r in ranks for p in r["prompts"][:4]]
    completions = [c for r in ranks for c in r["completion_ids"][:4]]
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    expected = brute_force_rewards(model, tokenizer, prompts, completions, 0.7, "token")
    for r, d in zip(ranks, ddp):
        assert r["first_rewards"]["entropy_token"] == pytest.approx(expected, abs=1e-4)
        assert r["completion_ids"][:4] == d["completion_ids"][:4]

    # The forking selection is the global one at every step.
    for (e0, m0, w0), (e1, m1, w1) in zip(ranks[0]["forking_calls"], ranks[1]["forking_calls"]):
        reference, _, _ = brute_force_forking([e0, e1], [m0, m1], 0.2)
        assert torch.allclose(w0.double(), reference[0], rtol=1e-6)
        assert torch.allclose(w1.double(), reference[1], rtol=1e-6)
    assert len(ranks[0]["forking_calls"]) == 2

    # Same clipping threshold, gradient norms and losses as plain DDP. The run clips at 100, above these steps' norms
    # (3.3, 3.0), so both paths clamp the clipping factor to exactly 1 (deepspeed_checks.py). Under an active clip the
    # factors differ by float32 rounding: the two paths reduce the norm in another order (measured 1-2 ulps, rel
    # <= 1.6e-7, clipping or not) and divide differently. Measured on a CPU without native bf16 (AVX2) at TRL's clip
    # of 1.0: step-1 norms 3.3169265 (DDP) vs 3.3169270 (ZeRO-2) -> clipped gradients up to 4.5e-8 apart (bit-equal
    # before the clip) -> 8,146 weights 1 ulp (<= 1.2e-7) apart after Adam's first step -> step-2 token-entropy rewards
    # (~4.03) 1 ulp (4.8e-7) apart; the tiny model's rewards in a group differ by ~1e-3 only (std 1.2e-3), so GRPO's
    # normalisation makes that 3.3e-4 in the advantages -> step-2 gradients up to 3.6e-5 apart -> Adam, whose update
    # is ~lr = 1e-2 whatever the gradient's size, moves 1,900 weights more than 1e-6 apart, up to 5.9e-5. With native
    # bf16 (AVX-512) the step-1 norms happened to be bit-equal and the weights ended 7.5e-9 apart.
    clip = ddp[0]["max_grad_norm"]
    assert [(r["max_grad_norm"], r["gradient_clipping"]) for r in ranks] == [(clip, clip)] * 2  # "auto" in the file
    norms = [h["grad_norm"] for h in ranks[0]["log_history"] if "loss" in h]
    ddp_norms = [h["grad_norm"] for h in ddp[0]["log_history"] if "loss" in h]
    assert max(norms + ddp_norms) < clip  # the premise: no clipping on either path
    losses = [h["loss"] for h in ranks[0]["log_history"] if "loss" in h]
    ddp_losses = [h["loss"] for h in ddp[0]["log_history"] if "loss" in h]
    assert norms[0] == pytest.approx(ddp_norms[0], rel=1e-6)
    assert losses[0] == pytest.approx(ddp_losses[0], rel=1e-6)
    assert torch.equal(ranks[0]["final_params"], ranks[1]["final_params"])
    assert not torch.equal(ranks[0]["final_params"], ranks[0]["initial_params"])
    if stage == 2:
        # Without the clip ZeRO-2 computes what DDP does: two-rank averages are exact whatever the order, and the
        # fused AdamW runs elementwise on the flat shards. Measured bit-equal weights on both CPU kinds; 1e-6 leaves
        # room for a last-step rounding only, since any earlier difference grows past 1e-5 as above.
        assert norms == pytest.approx(ddp_norms, rel=1e-6)
        assert losses == pytest.approx(ddp_losses, rel=1e-6)
        torch.testing.assert_close(ranks[0]["final_params"], ddp[0]["final_params"], rtol=0, atol=1e-6)
    else:
        # ZeRO-3's step-1 gradients already differ in the last bits from layer 1's attention down (the LM head and
        # layer 1's MLP are bit-equal): measured (AVX2) up to 9e-4 relative, 0.8% on the 22 gradients below 1e-6.
        # Adam's first update, lr * g / (|g| + 1e-8), turns that into step-1 weights up to 1.5e-5 apart; after step
        # 2 (the same amplification as above), measured 9.0e-5 (AVX2) and 1.2e-4 (AVX-512) apart, losses 4e-3 / 6e-4.
        assert losses == pytest.approx(ddp_losses, rel=1e-2)
        torch.testing.assert_close(ranks[0]["final_params"], ddp[0]["final_params"], rtol=0, atol=2e-4)
