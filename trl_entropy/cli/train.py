"""What ``trl-entropy grpo|rloo|emft`` runs: TRL's ``trl grpo`` / ``trl rloo`` script with the entropy trainers.

The steps and their order are TRL's (``trl/scripts/grpo.py``): reward model and reward functions (TRL's registry of
named rewards, plus ``accuracy`` and dotted import paths), ``model_init_kwargs`` from the model options, the
quantisation config, the dataset (``dataset_name`` or a ``datasets`` mixture), train, save, push to the Hub with the
dataset name, ``trainer.end()``. Everything that can be checked without the model is checked in
:func:`prepare_training`, before the model loads.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trl import DatasetMixtureConfig

from ..data_checks import check_checkpoint, check_data_file, check_model_inputs, check_training_dataset
from .arguments import EntropyModelConfig, TrainScriptArguments
from .main import TRAINERS

__all__ = ["TrainingJob", "default_choices_line", "prepare_training", "reward_registry", "run_train"]

_FILE_DATASETS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def reward_registry() -> dict[str, Callable]:
    """Reward names ``--reward_funcs`` accepts: TRL's own (those of ``trl grpo``, with its settings;
    ``accuracy_reward`` reads a ``solution`` column), ``answer_accuracy`` (the built-in tasks' grader of the
    ``answer`` column, :func:`trl_entropy.evaluation.tasks.accuracy_reward`; ``accuracy`` is its earlier name), and
    this package's label-free rewards (:mod:`trl_entropy.rewards`): ``entropy_token_reward``,
    ``entropy_trajectory_reward``, ``self_certainty_reward`` and ``majority_vote_reward`` (TTRL-style, on the number
    each completion ends with)."""
    from trl.rewards import (
        accuracy_reward,
        get_soft_overlong_punishment,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    from ..evaluation.tasks import accuracy_reward as answer_accuracy_reward
    from ..evaluation.tasks import extract_answer
    from ..rewards import entropy_token_reward, entropy_trajectory_reward, majority_vote_reward, self_certainty_reward

    return {
        "answer_accuracy": answer_accuracy_reward,
        "accuracy": answer_accuracy_reward,
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
        "entropy_token_reward": entropy_token_reward,
        "entropy_trajectory_reward": entropy_trajectory_reward,
        "self_certainty_reward": self_certainty_reward,
        "majority_vote_reward": majority_vote_reward(extract_answer),
    }


def _reward_function(name: str, registry: dict[str, Callable]) -> Callable:
    if name in registry:
        return registry[name]
    if "." in name:
        module_path, attribute = name.rsplit(".", 1)
        sys.path.insert(0, os.getcwd())  # so that a reward module next to the user's config is found
        try:
            return getattr(importlib.import_module(module_path), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"`reward_funcs`: could not import {name!r}: {err}") from err
    raise ValueError(f"`reward_funcs`: unknown reward {name!r}; choose from {list(registry)} or a dotted import path.")


def _quantization_config(model_args: EntropyModelConfig, method: str):
    """TRL's BitsAndBytes config for ``--load_in_4bit`` / ``--load_in_8bit``, or a one-line refusal where it can not
    run (bitsandbytes needs CUDA)."""
    from trl import get_quantization_config

    flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit" if model_args.load_in_8bit else None
    if flag is None:
        return None
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"`{flag}` needs a CUDA GPU (bitsandbytes), and this machine has none; drop `--{flag}`.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"`{flag}` needs bitsandbytes: `pip install bitsandbytes`, or drop `--{flag}`.")
    return get_quantization_config(model_args)


@contextlib.contextmanager
def _no_progress_bars():
    """``datasets``' progress bars off while the training data loads (restored after)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _builtin_tasks() -> tuple[str, ...]:
    """The names of :data:`trl_entropy.evaluation.tasks.TASKS`: generated offline, seeded, with an ``answer``
    column."""
    from ..evaluation.tasks import TASKS

    return tuple(TASKS)


def _load_datasets(
    script_args: TrainScriptArguments, dataset_args: DatasetMixtureConfig, seed: int, with_eval: bool
) -> tuple[Any, Any, str]:
    """``(train, eval or None, source)``, where ``source`` names the data in messages."""
    from datasets import load_dataset

    if dataset_args.datasets:  # TRL's mixture format wins over `dataset_name`, as in `trl grpo`
        from trl import get_dataset

        data = get_dataset(dataset_args)
        source = "the `datasets` mixture (" + ", ".join(d.path for d in dataset_args.datasets) + ")"
    elif script_args.dataset_name in _builtin_tasks():
        from ..evaluation.tasks import build_task

        task = build_task(script_args.dataset_name, prompt_style=script_args.prompt_style)
        train = task.dataset(script_args.num_train_prompts, split="train", seed=seed)
        evaluation = task.dataset(max(8, script_args.num_train_prompts // 8), split="test", seed=seed)
        return train, evaluation if with_eval else None, f"the built-in {script_args.dataset_name!r} task"
    else:
        source = script_args.dataset_name
        builder = _FILE_DATASETS.get(os.path.splitext(source)[1].lower())
        with _no_progress_bars():  # a bad file must get its one-line error alone on stderr
            if builder is not None:
                check_data_file(source)
                try:
                    data = load_dataset(builder, data_files=source)
                except Exception as err:  # datasets wraps the reader's error: name the file and the cause
                    cause = err.__cause__ or err
                    raise ValueError(
                        f"`dataset_name`: datasets could not read {source} ({type(cause).__name__}: {cause})."
                    ) from err
            else:
                data = load_dataset(source, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    split = script_args.dataset_train_split
    if split not in data:
        raise ValueError(f"`dataset_train_split`: {source} has no split {split!r} (splits: {', '.join(data)}).")
    evaluation = data[script_args.dataset_test_split] if with_eval and script_args.dataset_test_split in data else None
    return data[split], evaluation, source


def default_choices_line(
    method: str,
    script_args: TrainScriptArguments,
    model_args: EntropyModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> str | None:
    """The line a run prints at start when it trains on the demo defaults, the embedded model or the built-in task,
    which `trl grpo` would refuse as missing options; None when it names its own model and data."""
    from ..models import DEFAULT_MODEL

    parts = []
    if model_args.model_name_or_path == DEFAULT_MODEL:
        parts.append(f" the embedded SmolLM2-135M-Instruct (--model_name_or_path {DEFAULT_MODEL}, the default)")
    if script_args.dataset_name == "arithmetic" and not (dataset_args and dataset_args.datasets):
        parts.append(" on the built-in arithmetic task (--dataset_name arithmetic, the default)")
    if not parts:
        return None
    options = "both options" if len(parts) == 2 else "this option"
    return (
        f"Training{''.join(parts)}: trl-entropy's demo defaults, where `trl grpo` requires {options}; "
        f"see `trl-entropy {method} --help`."
    )


@dataclass
class TrainingJob:
    """A checked training run: everything but the model, which loads in :meth:`run`."""

    method: str
    script_args: TrainScriptArguments
    training_args: Any
    model_args: EntropyModelConfig
    trainer_kwargs: dict[str, Any]
    guard_args: Any = None  # CollapseGuardArguments, or None

    def run(self) -> Any:
        """Build the trainer (the model loads here), train, save, push to the Hub if asked, and return the trainer."""
        import transformers
        from packaging.version import Version

        from ..hardware import precision_line

        module, _, name = TRAINERS[self.method]
        trainer = getattr(importlib.import_module(module), name)(**self.trainer_kwargs)
        trainer.accelerator.print(precision_line(self.training_args))
        # EntropyStatsCallback is the trainer's own (the config's `entropy_stats`, as from Python); the guard reads its
        # repetition rate, and the callback moves itself first in the list, so the order of addition does not matter.
        if self.guard_args is not None and self.guard_args.collapse_guard:
            trainer.add_callback(self.guard_args.build(self.script_args.dataset_name, self.training_args.seed))
        args = self.training_args
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model(args.output_dir)
        trainer.create_model_card(dataset_name=self.script_args.dataset_name)
        trainer.accelerator.print(f"Model saved to {args.output_dir}.")
        if args.push_to_hub:
            trainer.push_to_hub(dataset_name=self.script_args.dataset_name)
            trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
        if Version(transformers.__version__) >= Version("5.18.0"):  # as `trl grpo`: finish trackers, process group
            trainer.end()
        return trainer


def prepare_training(
    method: str,
    script_args: TrainScriptArguments,
    training_args: Any,
    model_args: EntropyModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
    guard_args: Any = None,
) -> TrainingJob:
    """Resolve the rewards, the quantisation and the data of a training run and check them, without loading the
    model. Raises ``ValueError`` (one line: the option, what it accepts, the value) on anything wrong."""
    from trl import get_peft_config

    if method not in TRAINERS:
        raise ValueError(f"`method` must be one of {sorted(TRAINERS)}, got {method!r}.")
    dataset_args = dataset_args or DatasetMixtureConfig()
    defaults_line = default_choices_line(method, script_args, model_args, dataset_args)
    if defaults_line and os.environ.get("RANK", "0") == "0":  # once per run, not once per process of a launch
        print(defaults_line, flush=True)
    registry = reward_registry()
    reward_funcs: list[Any] = [_reward_function(name, registry) for name in script_args.reward_funcs or []]
    if script_args.reward_model_name_or_path:
        reward_funcs.insert(0, script_args.reward_model_name_or_path)
    if method == "emft" and reward_funcs:
        raise ValueError(
            "`reward_funcs` and `reward_model_name_or_path` must be empty for `emft`: EM-FT trains on entropy alone."
        )

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": getattr(training_args, "trust_remote_code", False),
    }
    quantization_config = _quantization_config(model_args, method)
    if quantization_config is not None:
        # Through `model_init_kwargs`, which GRPO/RLOO/EM-FT all read for the policy and the reference model; this is
        # where GRPOTrainer puts its `quantization_config` argument too.
        model_init_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    train, evaluation, source = _load_datasets(
        script_args, dataset_args, training_args.seed, training_args.eval_strategy != "no"
    )
    check_training_dataset(train, source, script_args.dataset_train_split, reward_funcs)
    if guard_args is not None:
        guard_args.check_probe()
    check_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if method != "emft" and not reward_funcs and getattr(training_args, "entropy_reward", "none") == "none":
        raise ValueError(  # TRL refuses this only once the model has loaded
            "no reward: give `--reward_funcs` (or `--reward_model_name_or_path`), or a label-free `--entropy_reward` "
            "('token', 'trajectory' or 'self_certainty')."
        )
    prompts = train["prompt"] if hasattr(train, "__getitem__") and hasattr(train, "column_names") else None
    where = f"split {script_args.dataset_train_split!r} of {source}"
    model_path = check_model_inputs(model_args.model_name_or_path, prompts, where, training_args.max_completion_length)
    kwargs = {
        "model": model_path,
        "args": training_args,
        "train_dataset": train,
        "eval_dataset": evaluation,
        "peft_config": get_peft_config(model_args),
    }
    if method != "emft":
        kwargs["reward_funcs"] = reward_funcs or None
    return TrainingJob(method, script_args, training_args, model_args, kwargs, guard_args)


def run_train(
    method: str,
    script_args: TrainScriptArguments,
    training_args: Any,
    model_args: EntropyModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
    guard_args: Any = None,
) -> Any:
    """Train with ``method`` in ``{"grpo", "rloo", "emft"}``, save the model to ``training_args.output_dir`` and
    return the trainer. This is what ``trl-entropy grpo|rloo|emft`` runs."""
    return prepare_training(method, script_args, training_args, model_args, dataset_args, guard_args).run()
