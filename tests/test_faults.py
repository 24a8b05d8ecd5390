"""Reliability under faults and bad input: interrupted training and resume, NaN logits in the reward path, empty and
max-length completions, over-long prompts, invalid configs, corrupt files, missing optional packages, atomic writes,
and property-based checks of the maths on non-finite input.

Decided behaviour (documented in ``EntropyMethodsArguments.entropy_reward`` and ``docs/distributed.md``):

* a completion whose entropy reward is not finite (no token, or NaN/inf logits) is *unscorable*: every reward column
  of that row becomes NaN, so TRL gives it advantage 0 and leaves it out of the logged reward means, and a warning
  says how many rows were affected. The other completions' rewards are exact.
* NaN in the training pass itself (a corrupt model) is not hidden: TRL's loss and ``grad_norm`` become NaN.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_utils import (
    TINY_KWARGS,
    RecordingReward,
    ScoringSourceMixin,
    SourceRecorder,
    brute_force_rewards,
    tiny_setup,
)
from transformers import TrainerCallback

from trl_entropy import ops
from trl_entropy.callbacks import EntropyStatsCallback, append_jsonl_record, truncate_jsonl
from trl_entropy.decoding import GenerationEntropyRecorder
from trl_entropy.rewards import entropy_token_reward, entropy_trajectory_reward, self_certainty_reward
from trl_entropy.testing import make_tiny_model_and_tokenizer
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

REPO = Path(__file__).resolve().parents[1]
# TRL's configs default to bf16=True, also on CPU: its old-log-probs pass then runs under bf16 autocast and the
# rewards read from it drift by ~5e-4 from a float64 reference. Exact comparisons run in float32.
TINY_KWARGS = {**TINY_KWARGS, "bf16": False}
ENTROPY_LOGGER = "trl_entropy.trainers._entropy"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model's matmuls are too small to gain from threads, and on a busy 2-core machine two OpenMP threads
    per process slow each step down several times over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint and resume
# ---------------------------------------------------------------------------------------------------------------------


class CrashAtStep(TrainerCallback):
    """Simulates a crash after step ``step`` was logged (and its stats line written), before its checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def resumable_trainer(output_dir: Path, *callbacks) -> EntropyGRPOTrainer:
    model, tokenizer, dataset = tiny_setup(n_prompts=8)
    args = EntropyGRPOConfig(
        output_dir=str(output_dir),
        entropy_reward="token",
        forking_token_ratio=0.2,
        temperature=0.9,
        **{
            **TINY_KWARGS,
            "max_steps": 4,
            "learning_rate": 5e-2,
            "save_strategy": "steps",
            "save_steps": 2,
        },
    )
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.add_callback(EntropyStatsCallback(trainer, plot_on_train_end=False))
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def step_logs(trainer) -> dict[int, dict]:
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def test_resume_after_a_crash_gives_the_same_losses_and_stats_file(tmp_path):
    straight = resumable_trainer(tmp_path / "straight")
    straight.train()
    expected_logs = step_logs(straight)
    expected_lines = (tmp_path / "straight" / "entropy_stats.jsonl").read_text().splitlines()
    assert sorted(expected_logs) == [1, 2, 3, 4] and len(expected_lines) == 4

    crashed = resumable_trainer(tmp_path / "crashed", CrashAtStep(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    stats = tmp_path / "crashed" / "entropy_stats.jsonl"
    assert [json.loads(line)["step"] for line in stats.read_text().splitlines()] == [1, 2, 3]  # 3 is past the save
    with open(stats, "ab") as handle:
        handle.write(b'{"step": 4, "metr')  # and a torn line, as from a kill in the middle of a write
    assert not (tmp_path / "crashed" / "checkpoint-4").exists()

    resumed = resumable_trainer(tmp_path / "crashed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "crashed" / "checkpoint-2"))
    got_logs = step_logs(resumed)
    assert sorted(got_logs) == [1, 2, 3, 4]  # steps 1-2 come back with the checkpoint's trainer state
    for step in (1, 2, 3, 4):
        for key in (
            "loss",
            "grad_norm",
            "rewards/entropy_token/mean",
            "forking/selected_fraction",
            "sampling_entropy/p50",
        ):
            assert got_logs[step][key] == pytest.approx(expected_logs[step][key], rel=1e-5, abs=1e-8), (step, key)

    lines = stats.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # nothing lost, nothing duplicated
    assert lines[:2] == expected_lines[:2]  # the lines before the checkpoint are kept byte for byte
    for got, expected in zip(lines[2:], expected_lines[2:]):
        got, expected = json.loads(got), json.loads(expected)
        assert got["histogram"] == expected["histogram"]
        assert got["trend_points"] == expected["trend_points"]  # the trend history came back from the checkpoint
        assert got["metrics"] == pytest.approx(expected["metrics"], rel=1e-5, abs=1e-8)
    # And the model ends where the uninterrupted run ended.
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# NaN logits in the reward path
# ---------------------------------------------------------------------------------------------------------------------


class ForwardSourceGRPOTrainer(ScoringSourceMixin, EntropyGRPOTrainer):
    """The vLLM path on the plain generator: with no pass of TRL's before the rewards, one chunked forward."""


class ScoringSourceRLOOTrainer(ScoringSourceMixin, EntropyRLOOTrainer):
    """The vLLM path on RLOO: the signals are read from RLOO's own policy pass."""


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def nan_model_setup():
    """The tiny model with the embedding of word "7" set to NaN: every logit after a "7" is NaN. One prompt has it;
    generation never samples it (suppressed) and replaces NaN logits (`remove_invalid_values`) so it can sample."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    poisoned = tokenizer.convert_tokens_to_ids("7")
    with torch.no_grad():
        model.model.embed_tokens.weight[poisoned] = float("nan")
    dataset = Dataset.from_dict({"prompt": ["what is 7 + 3 ?", "what is 4 + 19 ?"]})
    generation_kwargs = {"remove_invalid_values": True, "suppress_tokens": [poisoned]}
    return model, tokenizer, dataset, generation_kwargs


@pytest.mark.parametrize(
    "kind,variant,extra,trainer_class",
    [
        ("grpo", "token", {}, EntropyGRPOTrainer),  # reward recorded during generation
        ("grpo", "trajectory", {"num_iterations": 2}, EntropyGRPOTrainer),  # from GRPO's old-log-probs pass
        ("grpo", "self_certainty", {}, ForwardSourceGRPOTrainer),  # from one forward after generation (vLLM path)
        ("rloo", "token", {"beta": 0.0}, EntropyRLOOTrainer),  # from RLOO's old-log-probs pass
    ],
)
def test_nan_logits_make_a_completion_unscorable_not_best(tmp_path, caplog, kind, variant, extra, trainer_class):
    model, tokenizer, dataset, generation_kwargs = nan_model_setup()
    reference_model = copy.deepcopy(model)  # NaN gradients reach the weights during the step
    recorder = RecordingReward()
    config_class = EntropyGRPOConfig if kind == "grpo" else EntropyRLOOConfig
    args = config_class(
        output_dir=str(tmp_path),
        entropy_reward=variant,
        reward_weights=[0.0, 1.0],  # the recorder, and a constant reward that scores every completion
        forking_token_ratio=0.5,
        temperature=0.8,
        generation_kwargs=generation_kwargs,
        **{**TINY_KWARGS, "per_device_train_batch_size": 8, **extra},
    )
    trainer = trainer_class(
        model,
        reward_funcs=[recorder, constant_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger=ENTROPY_LOGGER):
        trainer.train()  # no crash

    name = trainer.entropy_reward_func.__name__
    poisoned = [("7" in p.split()) for p in recorder.prompts]
    assert sum(poisoned) == 4 and len(poisoned) == 8
    expected = brute_force_rewards(reference_model, tokenizer, recorder.prompts, recorder.completion_ids, 0.8, variant)
    logged_rewards = {key: list(values) for key, values in trainer._logs["rewards"].items()}
    advantages = list(trainer._logs["advantages"])
    for row, bad in enumerate(poisoned):
        if bad:
            assert math.isnan(expected[row])
            # Unscorable: every column NaN (not 0, the best entropy reward), advantage 0.
            assert all(math.isnan(logged_rewards[key][row]) for key in logged_rewards)
            assert advantages[row] == 0.0
        else:
            assert logged_rewards[name][row] == pytest.approx(expected[row], abs=1e-4)
            assert logged_rewards["constant_reward"][row] == 1.0
    assert any(a != 0.0 for a, bad in zip(advantages, poisoned) if not bad)

    logged = trainer.state.log_history[0]
    finite = [e for e in expected if not math.isnan(e)]
    assert logged[f"rewards/{name}/mean"] == pytest.approx(sum(finite) / len(finite), abs=1e-4)
    assert logged["rewards/constant_reward/mean"] == 1.0
    assert logged["reward"] == pytest.approx(1.0 + sum(finite) / len(finite), abs=1e-4)
    assert any("4 of 8 completions have no finite" in r.getMessage() for r in caplog.records)
    # The corrupt training pass is not hidden either.
    assert math.isnan(logged["grad_norm"])


def test_builtin_rewards_treat_every_non_finite_value_as_unscorable():
    values = list(torch.tensor([[1.0, 2.0], [math.nan, 1.0], [math.inf, 1.0], [-math.inf, 1.0], [5.0, math.nan]]))
    # the last row's NaN is padding: ignored
    mask = list(torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.bool))
    empty = [torch.zeros_like(m) for m in mask]
    assert entropy_token_reward([""] * 5, token_entropy=values, token_mask=mask) == [-1.5, None, None, None, -5.0]
    assert entropy_trajectory_reward([""] * 5, token_logprob=values, token_mask=mask) == [1.5, None, None, None, 5.0]
    assert self_certainty_reward([""] * 5, token_self_certainty=values, token_mask=empty) == [None] * 5


# ---------------------------------------------------------------------------------------------------------------------
# Empty, max-length and over-long sequences
# ---------------------------------------------------------------------------------------------------------------------


def make_rollout(eos_only_rows: set[int]):
    """A TRL `rollout_func` (the hook custom backends use; the entropy reward then takes the vLLM fallback path):
    samples with the policy itself, but returns a bare EOS for the rows in ``eos_only_rows``, as a server does when it
    stops at once. (A truly empty completion never reaches the rewards: TRL 1.16's `_generate` reads `ids[-1]` of
    every completion and raises IndexError.)"""

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids, completion_ids = [], []
        for prompt in prompts:  # TRL 1.16 passes each prompt once per generation already
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    do_sample=True,
                    temperature=trainer.temperature,
                    max_new_tokens=trainer.max_completion_length,
                    pad_token_id=tokenizer.pad_token_id,
                )
            row = out[0, len(ids) :].tolist()
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            prompt_ids.append(ids)
            completion_ids.append(row)
        for row in eos_only_rows:
            completion_ids[row] = [tokenizer.eos_token_id]
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": [[0.0] * len(c) for c in completion_ids],
        }

    return rollout


@pytest.mark.parametrize("variant", ["token", "self_certainty"])
def test_custom_backend_with_one_token_and_max_length_completions(tmp_path, variant):
    """The vLLM fallback path in a real run: rewards of a bare-EOS completion and of completions cut at max length
    match brute force."""
    model, tokenizer, dataset = tiny_setup()
    reference_model = copy.deepcopy(model)
    recorder = RecordingReward()
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward=variant,
        reward_weights=[0.0],
        forking_token_ratio=0.5,
        temperature=0.8,
        **{**TINY_KWARGS, "learning_rate": 0.0},
    )
    trainer = EntropyGRPOTrainer(
        model,
        reward_funcs=recorder,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=make_rollout({1}),
    )
    assert trainer._entropy_source() == "scoring"  # no pass of TRL's before the rewards: one forward
    trainer.train()
    lengths = [len(c) for c in recorder.completion_ids]
    assert lengths[1] == 1 and trainer.max_completion_length in lengths
    got = list(trainer._logs["rewards"][trainer.entropy_reward_func.__name__])
    expected = brute_force_rewards(reference_model, tokenizer, recorder.prompts, recorder.completion_ids, 0.8, variant)
    assert got == pytest.approx(expected, abs=1e-4)
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])


def test_recorder_and_forward_path_with_empty_and_full_length_completions(tmp_path):
    """The per-token values of an empty completion are all masked; a max-length completion keeps all its tokens."""
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(output_dir=str(tmp_path), entropy_reward="token", temperature=0.8, **TINY_KWARGS)
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    reference_model = make_tiny_model_and_tokenizer(seed=0)[0]  # the trainer patched `model.forward` in place
    prompt = tokenizer("what is 3 + 4 ?", add_special_tokens=False)["input_ids"]
    full = [5, 9, 12, 40, 41, 7]  # max_completion_length tokens, no EOS: truncated
    short = [5, 1]
    rows = trainer._signals_by_forward([prompt, prompt, prompt], [full, [], short], ("token_entropy",))
    assert [len(r) for r in rows["token_entropy"]] == [6, 0, 2]
    rewards = entropy_token_reward(
        [None] * 3, rows["token_entropy"], [torch.ones(len(r), dtype=bool) for r in rows["token_entropy"]]
    )
    expected = brute_force_rewards(
        reference_model, tokenizer, ["what is 3 + 4 ?"] * 3, [full, [], short], 0.8, "token"
    )
    assert rewards[1] is None and math.isnan(expected[1])
    assert rewards[0] == pytest.approx(expected[0], abs=1e-5) and rewards[2] == pytest.approx(expected[2], abs=1e-5)
    # The generation recorder aligns the same way (no decoding step at all for an empty completion).
    recorder = GenerationEntropyRecorder(model, 0.8, ("token_entropy",))
    rows = recorder.per_completion([[], []])["token_entropy"]
    assert [r.numel() for r in rows] == [0, 0]
    assert entropy_token_reward([None] * 2, rows, [torch.ones(0, dtype=bool)] * 2) == [None, None]


@pytest.mark.parametrize(
    "trainer_class,config_class,extra,source",
    [
        (EntropyGRPOTrainer, EntropyGRPOConfig, {}, "generation"),
        (EntropyRLOOTrainer, EntropyRLOOConfig, {"beta": 0.0}, "generation"),
        (ForwardSourceGRPOTrainer, EntropyGRPOConfig, {"num_iterations": 2}, "old_logps"),
        (ScoringSourceRLOOTrainer, EntropyRLOOConfig, {"beta": 0.0}, "old_logps"),
    ],
)
def test_every_completion_truncated_and_masked(tmp_path, trainer_class, config_class, extra, source):
    """`mask_truncated_completions=True` with no completion reaching EOS: no valid token in the loss. The step runs,
    the loss and gradient are exactly 0 (nothing to learn from) and nothing is selected.

    The reward is the exact entropy of the generated tokens whatever the source: TRL runs its old-log-probs pass with
    the truncated completions' attention masked out, so those rows are scored again with their tokens attended (the
    code before this test read NaN there and made every completion unscorable)."""
    model, tokenizer, dataset = tiny_setup()
    before = copy.deepcopy(model)
    recorder = RecordingReward()
    sources = SourceRecorder()
    args = config_class(
        output_dir=str(tmp_path),
        entropy_reward="token",
        reward_weights=[0.0],
        forking_token_ratio=0.2,
        mask_truncated_completions=True,
        generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id]},
        temperature=0.8,
        **{**TINY_KWARGS, "learning_rate": 1e-2, **extra},
    )
    trainer = trainer_class(
        model, reward_funcs=recorder, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[sources]
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    # RLOO's loss is minus the mean advantage times a ratio of 1 here: 0 up to the rounding of that mean.
    assert abs(logged["loss"]) < 1e-6
    assert logged["forking/selected_fraction"] == 0.0
    assert all(len(ids) == 6 for ids in recorder.completion_ids)
    assert set(sources.sources) == {source}
    got = list(trainer._logs["rewards"]["entropy_token"])[: len(recorder.completion_ids)]
    expected = brute_force_rewards(before, tokenizer, recorder.prompts, recorder.completion_ids, 0.8, "token")
    assert got == pytest.approx(expected, abs=1e-4)
    # Zero gradient: AdamW's first step moves a parameter by lr * sign(grad), so no parameter moved.
    for a, b in zip(before.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_prompts_longer_than_the_context(tmp_path):
    """TRL 1.16 has no prompt truncation. With rotary positions (Llama, Qwen, the models this package targets) a prompt
    past ``max_position_embeddings`` still runs, and the entropy reward is the exact entropy of what the model
    computed; from Python the context length is the user's to enforce on the dataset, as in TRL (the CLI refuses such a
    prompt before loading: tests/test_bad_inputs.py; documented in docs/distributed.md)."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    model.config.max_position_embeddings = 16
    long_prompts = [" ".join(["what is"] + [str(i % 40) for i in range(24)] + ["?"]) for _ in range(2)]
    assert len(tokenizer(long_prompts[0])["input_ids"]) > 16
    reference_model = copy.deepcopy(model)
    recorder = RecordingReward()
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward="token",
        reward_weights=[0.0],
        temperature=0.8,
        **{**TINY_KWARGS, "learning_rate": 0.0},
    )
    trainer = EntropyGRPOTrainer(
        model,
        reward_funcs=recorder,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": long_prompts}),
        processing_class=tokenizer,
    )
    trainer.train()
    expected = brute_force_rewards(reference_model, tokenizer, recorder.prompts, recorder.completion_ids, 0.8, "token")
    assert list(trainer._logs["rewards"]["entropy_token"]) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Invalid configurations
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class", [EntropyGRPOConfig, EntropyRLOOConfig])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"forking_token_ratio": math.nan}, r"`forking_token_ratio` must be in \(0, 1\], got nan"),
        ({"forking_token_ratio": -0.2}, r"`forking_token_ratio` must be in \(0, 1\]"),
        ({"entropy_reward_weight": math.nan}, "`entropy_reward_weight` must be a finite number, got nan"),
        ({"entropy_reward_weight": -math.inf}, "`entropy_reward_weight` must be a finite number"),
        ({"entropy_reward": None}, "`entropy_reward` must be one of"),
        ({"entropy_reward": "TOKEN"}, "`entropy_reward` must be one of"),
        ({"forking_token_mode": "bottom", "forking_token_ratio": 1.0}, "forking_token_mode='bottom'"),
        ({"forking_token_scope": None}, "`forking_token_scope` must be one of"),
    ],
)
def test_invalid_entropy_configs_name_the_parameter(tmp_path, config_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config_class(output_dir=str(tmp_path), **kwargs)


def test_grpo_only_option_is_rejected_clearly_by_rloo(tmp_path):
    """`top_entropy_quantile` (TRL's version of the mask) exists in GRPO only: RLOO rejects it as an unknown field."""
    with pytest.raises(TypeError, match="top_entropy_quantile"):
        EntropyRLOOConfig(output_dir=str(tmp_path), top_entropy_quantile=0.2)


# ---------------------------------------------------------------------------------------------------------------------
# Missing optional dependencies (simulated in a fresh interpreter: sys.modules[name] = None blocks the import)
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_optional_packages_give_clear_errors_or_fallbacks(tmp_path):
    """One interpreter with vllm, deepspeed, matplotlib and wandb all blocked:

    * the package and its trainers import and train (no hard dependency on any of them);
    * the stats callback still writes its JSONL and skips the PNGs (documented fallback), and plotting by hand
      raises an ImportError with the install hint;
    * `use_vllm=True` fails at construction with TRL's install hint; the vLLM EM-INF adapter with ours;
    * a DeepSpeed config fails at config time with an ImportError naming deepspeed (not transformers' TypeError);
    * `report_to="wandb"` fails with transformers' error naming wandb.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    env["OMP_NUM_THREADS"] = "1"  # one thread for the tiny model (see _one_torch_thread)
    script = REPO / "tests" / "dist_scripts" / "missing_optional_deps.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    assert out["trained_steps"] == 1
    assert len((tmp_path / "run" / "entropy_stats.jsonl").read_text().splitlines()) == 1
    assert not list(tmp_path.glob("run/**/*.png"))
    assert out["plot"].startswith("ImportError") and "pip install matplotlib" in out["plot"]
    assert out["use_vllm"].startswith("ImportError") and "vLLM" in out["use_vllm"]
    assert out["vllm_adapter"].startswith("ImportError") and "pip install 'vllm>=0.10.2'" in out["vllm_adapter"]
    assert out["deepspeed"].startswith("ImportError") and "pip install deepspeed" in out["deepspeed"]
    assert "wandb" in out["wandb"].lower() and out["wandb"] != "no error"


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt files and atomic writes
# ---------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _calibration_text() -> str:
    from trl_entropy.confidence import EntropyThresholdCalibrator

    g = torch.Generator().manual_seed(0)
    correct = (0.7 + 0.2 * torch.randn(8, generator=g, dtype=torch.float64)).tolist()
    incorrect = (1.4 + 0.4 * torch.randn(8, generator=g, dtype=torch.float64)).tolist()
    calibrator = EntropyThresholdCalibrator(p_value_method="normal").fit(correct + incorrect, [1] * 8 + [0] * 8)
    return json.dumps(calibrator.to_dict(), indent=2, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corrupted_calibration_file_fails_loudly_or_loads_unchanged(tmp_path_factory, data):
    """Any truncation or single-character corruption of a saved calibration either loads to the very same thresholds
    or raises ValueError naming the file: never another exception, never silently different thresholds."""
    from trl_entropy.confidence import EntropyThresholdCalibrator

    text = _calibration_text()
    original = EntropyThresholdCalibrator.from_dict(json.loads(text)).thresholds
    position = data.draw(st.integers(0, len(text) - 1), label="position")
    if data.draw(st.booleans(), label="truncate"):
        corrupted = text[:position]
    else:
        corrupted = text[:position] + data.draw(st.sampled_from('0159.-e"}], xN'), label="char") + text[position + 1 :]
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    path.write_text(corrupted)
    try:
        loaded = EntropyThresholdCalibrator.load(path)
    except ValueError as err:
        assert str(path) in str(err)
        return
    for method, value in original.items():
        assert loaded.thresholds[method] == pytest.approx(value, rel=1e-9, abs=1e-12), method


def test_stats_file_with_garbage_lines_is_repaired_on_resume(tmp_path):
    """Lines that are not JSON objects with an integer step (garbage, a torn write, a line from a later step) are
    dropped when a run resumes; the file is rewritten atomically (no temp file left behind)."""
    path = tmp_path / "entropy_stats.jsonl"
    for step in (1, 2, 3):
        append_jsonl_record(path, {"step": step, "value": step})
    with open(path, "ab") as handle:
        handle.write(b'\x00\xffnot json\n[1, 2]\n{"step": "4"}\n{"step": 9}\n{"step": 10, "va')
    assert truncate_jsonl(path, 5) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": s, "value": s} for s in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entropy_stats.jsonl"]


def test_atomic_writes_leave_the_old_file_intact_when_the_write_fails(tmp_path, monkeypatch):
    from trl_entropy import files

    path = tmp_path / "state.json"
    files.write_atomically(path, b'{"old": true}')

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        files.write_atomically(path, b'{"new": true, "padding": "' + b"x" * 100_000 + b'"}')
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # the temp file was removed


# ---------------------------------------------------------------------------------------------------------------------
# Properties of the maths on non-finite and padded input (hypothesis)
# ---------------------------------------------------------------------------------------------------------------------

finite_logit = st.floats(-30, 30, allow_nan=False, allow_infinity=False)
special_logit = st.sampled_from([-math.inf, math.inf, math.nan])
logit_row = st.lists(st.one_of(finite_logit, finite_logit, finite_logit, special_logit), min_size=2, max_size=24)


def reference_entropy(row: list[float]) -> float:
    """Float64 entropy of softmax(row) with the limits ops.token_entropy documents: NaN anywhere -> NaN; any +inf ->
    uniform over the +inf entries; -inf entries have zero probability; no finite or +inf entry -> NaN."""
    if any(math.isnan(v) for v in row):
        return math.nan
    n_pos_inf = sum(v == math.inf for v in row)
    if n_pos_inf:
        return math.log(n_pos_inf)
    kept = [v for v in row if v != -math.inf]
    if not kept:
        return math.nan
    top = max(kept)
    weights = [math.exp(v - top) for v in kept]
    total = math.fsum(weights)
    return -math.fsum(w / total * math.log(w / total) for w in weights if w > 0)


@settings(max_examples=150, deadline=None)
@given(st.lists(logit_row, min_size=1, max_size=4), st.integers(1, 64))
def test_token_entropy_of_rows_with_inf_and_nan_matches_the_documented_limits(rows, chunk_elements):
    width = max(len(r) for r in rows)
    rows = [r + [-math.inf] * (width - len(r)) for r in rows]  # -inf padding: zero probability, no effect
    got = ops.token_entropy(torch.tensor(rows), chunk_elements=chunk_elements)
    for value, row in zip(got.tolist(), rows):
        expected = reference_entropy(row)
        if math.isnan(expected):
            assert math.isnan(value)
        else:
            assert value == pytest.approx(expected, abs=2e-4)
            assert -1e-6 <= value <= math.log(width) + 1e-4


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=10), min_size=1, max_size=5),
    st.data(),
)
def test_masked_reductions_ignore_whatever_is_under_padding(rows, data):
    width = max(len(r) for r in rows)
    garbage = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))
    values = torch.tensor([r + [garbage] * (width - len(r)) for r in rows], dtype=torch.float32)
    mask = torch.tensor([[i < len(r) for i in range(width)] for r in rows])
    mask[0, :] = False  # an empty row as well
    for reduction in ("mean", "sum"):
        got = ops.masked_sequence_reduce(values, mask, reduction)
        for row_index, row in enumerate(rows):
            kept = [float(torch.tensor(v, dtype=torch.float32)) for v, m in zip(row, mask[row_index]) if m]
            if not kept:
                assert math.isnan(got[row_index]) if reduction == "mean" else got[row_index] == 0.0
                continue
            expected = math.fsum(kept) / (len(kept) if reduction == "mean" else 1)
            assert got[row_index].item() == pytest.approx(expected, rel=1e-5, abs=1e-3)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.floats(0, 5, allow_nan=False), st.just(math.nan)), min_size=1, max_size=40),
    st.floats(0.01, 1.0),
    st.sampled_from(["top", "bottom"]),
)
def test_forking_mask_never_selects_nan_and_keeps_ceil_rho_n(entropies, ratio, mode):
    e = torch.tensor([entropies])
    mask = torch.ones_like(e, dtype=torch.long)
    selected = ops.high_entropy_mask(e, mask, ratio, mode)[0]
    finite = [not math.isnan(v) for v in entropies]
    n = sum(finite)
    k = max(1, math.ceil(round(ratio * n, 9))) if n else 0
    assert not any(s and not f for s, f in zip(selected.tolist(), finite))
    assert int(selected.sum()) == (k if mode == "top" else n - k)
    if mode == "top" and 0 < k < n:  # every selected entropy >= every unselected finite one
        stored = e[0].tolist()  # the float32 values the mask compared (1e-125 is 0.0 there: a tie, not an order)
        chosen = [v for v, s in zip(stored, selected.tolist()) if s]
        others = [v for v, s, f in zip(stored, selected.tolist(), finite) if f and not s]
        assert min(chosen) >= max(others)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-20, 0, allow_nan=False), min_size=1, max_size=20),
    st.floats(-50, 50, allow_nan=False),
    st.randoms(use_true_random=False),
)
def test_topk_entropy_is_shift_and_order_invariant_and_nan_is_not_confident(logprobs, shift, rng):
    base = ops.entropy_from_topk_logprobs(torch.tensor([logprobs])).item()
    shuffled = list(logprobs)
    rng.shuffle(shuffled)
    assert ops.entropy_from_topk_logprobs(torch.tensor([shuffled])).item() == pytest.approx(base, abs=1e-5)
    shifted = torch.tensor([[v + shift for v in logprobs]])
    assert ops.entropy_from_topk_logprobs(shifted).item() == pytest.approx(base, abs=1e-4)
    assert -1e-6 <= base <= math.log2(len(logprobs)) + 1e-5
    with_nan = torch.tensor([logprobs + [math.nan]])
    assert math.isnan(ops.entropy_from_topk_logprobs(with_nan).item())  # undefined, not 0 ("fully confident")
    assert math.isnan(ops.entropy_from_topk_logprobs(torch.full((1, 3), -math.inf)).item())


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_logit, min_size=2, max_size=30), st.floats(0.2, 3.0))
def test_self_certainty_is_a_kl_divergence(row, temperature):
    """KL(U || p) >= 0, zero only for the uniform distribution, and equal to -log V - mean log p in float64."""
    got = ops.self_certainty(torch.tensor([row]), temperature).item()
    log_p = torch.log_softmax(torch.tensor(row, dtype=torch.float64) / temperature, dim=-1)
    expected = (-math.log(len(row)) - log_p.mean()).item()
    assert got >= -1e-5
    assert got == pytest.approx(expected, abs=1e-4)


def test_confidence_signal_of_a_nan_row_is_nan():
    """ConfidenceSignal's documented contract: NaN where a row of logits holds NaN, for every kind (a NaN must never
    read as "confident" and stop a generation early)."""
    from trl_entropy.confidence import ConfidenceSignal

    logits = torch.tensor([[math.nan, 1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    uniform = {"topk_entropy": 1.0, "entropy": 2.0, "topk_confidence": math.log(4)}  # top-2 of 4 equal logits
    for kind, expected in uniform.items():
        values = ConfidenceSignal(kind, top_k=2)(logits)
        assert math.isnan(values[0]), kind
        assert values[1].item() == pytest.approx(expected, abs=1e-5), kind
