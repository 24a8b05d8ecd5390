"""What the trainers read from TRL, and what they tell it: signals that do not depend on the source the trainer picked
(truncated completions masked out of TRL's pass), configs that build the same trainer again, TRL's hooks read as TRL
1.16 defines them or refused naming the version, and the list of overridden TRL methods kept in the docs."""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

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
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_entropy.testing import make_tiny_model_and_tokenizer
from trl_entropy.trainers import (
    EMFTConfig,
    EMFTTrainer,
    EntropyGRPOConfig,
    EntropyGRPOTrainer,
    EntropyRLOOConfig,
    EntropyRLOOTrainer,
)
from trl_entropy.trainers._entropy import EntropyTrainerMixin
from trl_entropy.trainers._model_card import EntropyModelCardMixin
from trl_entropy.trainers._trl import GRPO_GENERATE_FIELDS, check_trl_version, generate_fields

ROOT = Path(__file__).resolve().parents[2]


def length_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


class ScoringGRPOTrainer(ScoringSourceMixin, EntropyGRPOTrainer):
    pass


class ScoringRLOOTrainer(ScoringSourceMixin, EntropyRLOOTrainer):
    pass


# Completions of mixed lengths: TRL's generation kwargs raise the end token's score after the second token.
MIXED_LENGTHS = {
    **TINY_KWARGS,
    "per_device_train_batch_size": 8,
    "max_completion_length": 8,
    "mask_truncated_completions": True,
    "temperature": 1.0,
    "learning_rate": 0.0,
    "generation_kwargs": {"exponential_decay_length_penalty": (2, 1.6)},
}
TRUNCATION_CASES = [
    (GRPOConfig, GRPOTrainer, EntropyGRPOConfig, EntropyGRPOTrainer, {"num_iterations": 2}, "generation"),
    (GRPOConfig, GRPOTrainer, EntropyGRPOConfig, ScoringGRPOTrainer, {"num_iterations": 2}, "old_logps"),
    (RLOOConfig, RLOOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer, {"beta": 0.0}, "generation"),
    (RLOOConfig, RLOOTrainer, EntropyRLOOConfig, ScoringRLOOTrainer, {"beta": 0.0}, "old_logps"),
]


@pytest.mark.parametrize("trl_config,trl_trainer,config_class,trainer_class,extra,source", TRUNCATION_CASES)
def test_entropy_reward_at_weight_zero_changes_nothing_with_truncated_completions_masked(
    tmp_path, trl_config, trl_trainer, config_class, trainer_class, extra, source
):
    """The measured case of the issue: TRL's rule reward and advantages are unchanged by an entropy reward of weight 0,
    and the entropy reward of a truncated completion is its exact entropy. The code before this test read TRL's
    old-log-probs pass (GRPO with num_iterations=2, RLOO always), where TRL masks the truncated completions out: NaN,
    every reward column of those rows NaN, advantages all 0."""
    runs = {}
    for name, config, trainer in (("trl", trl_config, trl_trainer), ("ours", config_class, trainer_class)):
        model, tokenizer, dataset = tiny_setup()
        entropy = {"entropy_reward": "token", "entropy_reward_weight": 0.0} if name == "ours" else {}
        sources, recorder = SourceRecorder(), RecordingReward()
        args = config(output_dir=str(tmp_path / name), **MIXED_LENGTHS, **extra, **entropy)
        trainer = trainer(
            model,
            reward_funcs=[length_reward, recorder],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[sources] if name == "ours" else None,
        )
        trainer.train()
        runs[name] = (trainer, recorder, sources)
    (trl, _, _), (ours, recorder, sources) = runs["trl"], runs["ours"]
    lengths = trl._logs["rewards"]["length_reward"]
    assert 8.0 in lengths and min(lengths) < 8.0  # some completions truncated, some finished
    assert list(ours._logs["rewards"]["length_reward"]) == list(lengths)
    assert list(ours._logs["advantages"]) == pytest.approx(list(trl._logs["advantages"]), abs=1e-6)
    assert set(sources.sources) == {source}
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    n = len(recorder.completion_ids)
    expected = brute_force_rewards(model, tokenizer, recorder.prompts, recorder.completion_ids, 1.0, "token")
    assert list(ours._logs["rewards"]["entropy_token"])[:n] == pytest.approx(expected, abs=1e-4)


# ---- a trainer's own config builds it again ------------------------------------------------------------------------


def _build(kind: str, model, tokenizer, dataset, args):
    if kind == "emft":
        return EMFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer_class = EntropyGRPOTrainer if kind == "grpo" else EntropyRLOOTrainer
    return trainer_class(
        model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def _config(kind: str, tmp_path):
    if kind == "emft":
        return EMFTConfig(output_dir=str(tmp_path), **{k: v for k, v in TINY_KWARGS.items() if k != "num_generations"})
    config_class = EntropyGRPOConfig if kind == "grpo" else EntropyRLOOConfig
    extra = {"beta": 0.0} if kind == "rloo" else {}
    return config_class(
        output_dir=str(tmp_path),
        entropy_reward="token",
        entropy_reward_weight=2.0,
        reward_weights=[0.5],
        **TINY_KWARGS,
        **extra,
    )


@pytest.mark.parametrize("kind", ["grpo", "rloo", "emft"])
def test_a_trainers_config_and_its_saved_copy_build_the_same_trainer(tmp_path, kind):
    """The code before this test appended the entropy weight to the trainer's config: `trainer.args` then failed with
    "`reward_weights` has 2 entries for 1 reward functions"."""
    model, tokenizer, dataset = tiny_setup()
    args = _config(kind, tmp_path / "first")
    first = _build(kind, model, tokenizer, dataset, args)
    weights = first.reward_weights.tolist()
    if kind != "emft":
        assert weights == [0.5, 2.0] and first.args.reward_weights == [0.5]
    again = _build(kind, model, tokenizer, dataset, first.args)
    assert again.reward_weights.tolist() == weights
    first.save_model(str(tmp_path / "saved"))
    saved = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert _build(kind, model, tokenizer, dataset, saved).reward_weights.tolist() == weights


RESUME = """
import sys, torch
sys.path.insert(0, {tests!r})
from trainer_utils import tiny_setup
from trl_entropy.trainers import EntropyGRPOTrainer

def length_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

checkpoint = {checkpoint!r}
args = torch.load(checkpoint + "/training_args.bin", weights_only=False)
model, tokenizer, dataset = tiny_setup()
trainer = EntropyGRPOTrainer(model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
trainer.train(resume_from_checkpoint=checkpoint)
print("RESUMED", trainer.state.global_step, trainer.reward_weights.tolist())
"""


def test_resuming_from_a_checkpoint_in_a_new_process_with_its_saved_config(tmp_path):
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward="token",
        reward_weights=[0.5],
        **{**TINY_KWARGS, "max_steps": 2, "save_strategy": "steps", "save_steps": 1},
    )
    EntropyGRPOTrainer(
        model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    ).train()
    code = textwrap.dedent(RESUME).format(tests=str(ROOT / "tests"), checkpoint=str(tmp_path / "checkpoint-1"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RESUMED 2 [0.5, 1.0]" in done.stdout


# ---- TRL's hooks, as TRL 1.16 defines them --------------------------------------------------------------------------


def test_another_trl_minor_version_is_refused_at_import():
    check_trl_version("1.16.0")
    check_trl_version("1.16.7")
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(ImportError, match=rf"TRL {re.escape(version)} is installed.*trl>=1\.16,<1\.17"):
            check_trl_version(version)


class TruncatedGenerateGRPOTrainer(GRPOTrainer):
    """What another TRL release could do: `_generate` returning another tuple."""

    def _generate(self, prompts):
        return super()._generate(prompts)[:3]


class OnAnotherTRL(EntropyModelCardMixin, EntropyTrainerMixin, TruncatedGenerateGRPOTrainer):
    _config_class = EntropyGRPOConfig
    _generate_fields = GRPO_GENERATE_FIELDS


def test_generate_result_of_another_layout_is_refused_naming_the_trl_version(tmp_path):
    """The code before this test told GRPO from RLOO by `len(result) > 3`: a 3-tuple from GRPO was read silently as
    RLOO's, with the tool mask dropped."""
    with pytest.raises(RuntimeError, match=r"_generate returned 3 values; trl-entropy reads TRL 1\.16's 8"):
        generate_fields((1, 2, 3), GRPO_GENERATE_FIELDS, "GRPOTrainer")
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(output_dir=str(tmp_path), entropy_reward="token", **TINY_KWARGS)
    trainer = OnAnotherTRL(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(RuntimeError, match=r"TruncatedGenerateGRPOTrainer\._generate returned 3 values.*TRL 1\.16"):
        trainer.train()


def test_a_loss_type_unknown_to_the_forking_normalisation_is_refused_at_config(tmp_path):
    """The code before this test accepted it and raised a bare KeyError at the first training step."""
    with pytest.raises(ValueError, match=r"loss types of TRL 1\.16 .*got loss_type='a_later_loss'.*'all'"):
        EntropyGRPOConfig(output_dir=str(tmp_path), loss_type="a_later_loss", forking_token_ratio=0.2)


def test_the_entropy_bonus_with_per_sequence_forking_weights_is_refused(tmp_path):
    """TRL averages its entropy bonus over `mask * weights`: per-row weights would make it a weighted mean."""
    cpu = {"use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match=r"entropy bonus .*loss_type='grpo'"):
        EntropyGRPOConfig(
            output_dir=str(tmp_path), loss_type="grpo", forking_token_ratio=0.2, entropy_coef=0.01, **cpu
        )
    EntropyGRPOConfig(output_dir=str(tmp_path), loss_type="dapo", forking_token_ratio=0.2, entropy_coef=0.01, **cpu)


def test_forking_weights_keep_trls_meaning_of_top_entropy_quantile(tmp_path):
    """TRL calls `get_high_entropy_mask` when `top_entropy_quantile < 1` and keeps about that fraction of the tokens:
    the trainer sets the attribute to `forking_token_ratio`, and its exact top-k is nested with TRL's quantile
    selection of the same entropies (the sets differ by at most one token, TRL interpolating its quantile)."""
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(output_dir=str(tmp_path), entropy_reward="token", forking_token_ratio=0.25, **TINY_KWARGS)
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.top_entropy_quantile == 0.25
    trainer.model.train()
    generator = torch.Generator().manual_seed(0)
    entropies = torch.rand(4, 9, generator=generator)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    weights = trainer.get_high_entropy_mask(entropies, mask, 1 - trainer.top_entropy_quantile)
    trl_mask = GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, 1 - trainer.top_entropy_quantile)
    ours = weights > 0
    assert weights.dtype == entropies.dtype and not (ours & ~mask.bool()).any()
    assert int(ours.sum()) == math.ceil(0.25 * int(mask.sum()))
    assert (ours & ~trl_mask).sum() == 0 or (trl_mask & ~ours).sum() == 0
    assert abs(int(ours.sum()) - int(trl_mask.sum())) <= 1
    # "selected" normalisation of the default dapo loss: the selected tokens carry n_valid / n_selected.
    assert torch.allclose(weights[ours], torch.full_like(weights[ours], int(mask.sum()) / int(ours.sum())))


def env_free_rollout(prompts, trainer):
    """A TRL `rollout_func` that samples with the policy (a generator whose logits the trainer does not see)."""
    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    prompt_ids, completion_ids = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), do_sample=True, temperature=trainer.temperature, max_new_tokens=4
            )
        prompt_ids.append(ids)
        completion_ids.append(out[0, len(ids) :].tolist())
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "logprobs": [[0.0] * len(c) for c in completion_ids],
    }


@pytest.mark.parametrize(
    "extra,lora,source",
    [
        ({"steps_per_generation": 2, "gradient_accumulation_steps": 1}, False, "old_logps"),  # TRL reuses the batch
        ({}, False, "forward"),  # TRL makes no pass before the rewards
        ({"beta": 0.05}, True, "forward"),  # its only pass is the PEFT reference (adapters off): not the policy
    ],
)
def test_trls_pass_is_observed_not_predicted(tmp_path, extra, lora, source):
    from peft import LoraConfig

    model, tokenizer, dataset = tiny_setup()
    recorder, sources = RecordingReward(), SourceRecorder()
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward="token",
        reward_weights=[0.0],
        temperature=0.8,
        **{**TINY_KWARGS, "learning_rate": 0.0, **extra},
    )
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if lora else None
    trainer = EntropyGRPOTrainer(
        model,
        reward_funcs=recorder,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=env_free_rollout,
        callbacks=[sources],
        peft_config=peft_config,
    )
    trainer.train()
    assert set(sources.sources) == {source}
    policy = trainer.model.merge_and_unload() if lora else trainer.model
    n = len(recorder.completion_ids)
    expected = brute_force_rewards(policy, tokenizer, recorder.prompts, recorder.completion_ids, 0.8, "token")
    assert list(trainer._logs["rewards"]["entropy_token"])[:n] == pytest.approx(expected, abs=1e-4)


# ---- the overridden TRL methods, listed in the docs -------------------------------------------------------------


def overridden_trl_methods(trainer_class: type) -> list[str]:
    """Methods of TRL's base class (or of transformers' Trainer) that this package's classes define again."""
    trl_base = next(c for c in trainer_class.__mro__ if c.__module__.startswith("trl."))
    ours = [c for c in trainer_class.__mro__ if c.__module__.startswith("trl_entropy.")]
    names = {
        name
        for cls in ours
        for name, value in vars(cls).items()
        if callable(value) and name != "__init__" and hasattr(trl_base, name)
    }
    return sorted(names)


def test_every_overridden_trl_method_is_listed_in_the_readme_and_compatibility_page():
    expected = {
        cls.__name__: overridden_trl_methods(cls) for cls in (EntropyGRPOTrainer, EntropyRLOOTrainer, EMFTTrainer)
    }
    for page in ("README.md", "docs/compatibility.md"):
        text = (ROOT / page).read_text(encoding="utf-8")
        for name, methods in expected.items():
            line = next((ln for ln in text.splitlines() if ln.startswith(f"- `{name}`:")), None)
            assert line is not None, f"{page} lists no overridden methods of {name}"
            assert re.findall(r"`(\w+)`", line.split(":", 1)[1]) == methods, (page, name)


# ---- library layers know no CLI ------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def _absolute_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, relative imports resolved (``from ..x import y`` in ``a/b.py`` is
    ``trl_entropy.x``; ``from . import y`` names ``trl_entropy.a.y``)."""
    package = ROOT / "trl_entropy"
    parts = ["trl_entropy", *path.relative_to(package).with_suffix("").parts]
    here = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m.startswith("trl_entropy")}


def _wing(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_library_module_imports_the_cli():
    """Every module outside ``trl_entropy/cli`` (the trainers, callbacks, decoding, evaluation, confidence and the
    shared top level) imports nothing from the command line; the stopping rules and generation loops no task."""
    package = ROOT / "trl_entropy"
    library = [p for p in sorted(package.rglob("*.py")) if "cli" not in p.relative_to(package).parts]
    assert len(library) > 30  # the whole library, not a sample
    for path in library:
        bad = sorted(m for m in _absolute_imports(path) if re.match(r"trl_entropy\.cli(\.|$)", m))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    no_task = [*sorted((package / "confidence").glob("*.py")), package / "evaluation" / "generate.py"]
    for path in [*no_task, package / "evaluation" / "diagnose.py"]:
        bad = sorted(m for m in _absolute_imports(path) if re.search(r"(^|\.)tasks(\.|$)", m))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_wings_import_graph_has_no_cycle():
    """The top-level units (a module of ``trl_entropy/`` or a wing package) form a DAG: a wing never imports one
    that imports it (e.g. the callbacks never import the trainers, which attach them)."""
    package = ROOT / "trl_entropy"
    edges: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = ["trl_entropy", *path.relative_to(package).with_suffix("").parts]
        unit = _wing(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        targets = {_wing(m) for m in _absolute_imports(path) if m.count(".") >= 1}
        edges.setdefault(unit, set()).update(t for t in targets if t != unit and t != "trl_entropy")
    state: dict[str, int] = {}

    def visit(unit: str, stack: tuple[str, ...]) -> None:
        state[unit] = 1
        for target in sorted(edges.get(unit, ())):
            assert state.get(target) != 1, f"import cycle: {' -> '.join((*stack, unit, target))}"
            if target not in state:
                visit(target, (*stack, unit))
        state[unit] = 2

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, ())
