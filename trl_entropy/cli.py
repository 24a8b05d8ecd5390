"""The ``trl-entropy`` command line, following TRL's CLI conventions: one subcommand per job, options from
dataclasses through :class:`trl.TrlParser` (``--help`` lists every option), and YAML config files through ``--config``
(command-line options override the file; an ``env:`` mapping in it sets environment variables).

Subcommands::

    trl-entropy grpo      EM-RL / forking tokens with EntropyGRPOTrainer
    trl-entropy rloo      EM-RL / forking tokens with EntropyRLOOTrainer
    trl-entropy emft      EM-FT (entropy-minimisation fine-tuning on the model's own samples)
    trl-entropy generate  generation with EM-INF / adaptive temperature, or entropy early stopping (--early_stopping)
    trl-entropy calibrate calibrate an early-stopping entropy threshold
    trl-entropy plot      PNG plots from a training run's entropy_stats.jsonl
    trl-entropy demo      label-free EM-RL on the embedded model, before/after report

Multi-GPU: ``accelerate launch --config_file examples/accelerate/multi_gpu.yaml -m trl_entropy.cli grpo ...``.
This module only parses and dispatches; the work is done by the modules each command names.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, TrlParser

from .models import DEFAULT_MODEL

__all__ = ["TrainScriptArguments", "EntropyModelConfig", "GenerateModeArguments", "main", "make_parser", "run_train"]

_FILE_DATASETS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TrainScriptArguments(ScriptArguments):
    """Data and reward options of ``trl-entropy grpo|rloo|emft`` (TRL's ``ScriptArguments`` plus these fields).

    Parameters:
        dataset_name (`str`, *optional*, defaults to `"arithmetic"`):
            `"arithmetic"` (the built-in "What is a + b?" task, offline), a hub dataset id or local folder
            (`datasets.load_dataset`), or a `.json`/`.jsonl`/`.csv`/`.parquet` file. It needs a `prompt` column.
        num_train_prompts (`int`, *optional*, defaults to `1024`):
            Number of prompts drawn for the built-in `arithmetic` task, >= 1 (ignored for other datasets).
        reward_funcs (`list[str]` or `None`, *optional*, defaults to `None`):
            Reward functions: `accuracy` (:func:`trl_entropy.tasks.accuracy_reward`, reads the `answer` column) or a
            dotted import path `my_module.my_reward`. Optional with `--entropy_reward`; not allowed for `emft`.
        entropy_stats (`bool`, *optional*, defaults to `True`):
            Attach :class:`~trl_entropy.callbacks.EntropyStatsCallback` (entropy quantiles, forking tokens and collapse
            signals at every log, `entropy_stats.jsonl` and PNG plots in the output folder).
    """

    dataset_name: str | None = field(
        default="arithmetic",
        metadata={
            "help": "'arithmetic' (built in, offline), a hub dataset id or folder, or a .json/.jsonl/.csv/.parquet "
            "file, with a 'prompt' column."
        },
    )
    num_train_prompts: int = field(
        default=1024, metadata={"help": "Prompts drawn for the built-in 'arithmetic' task (>= 1)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: 'accuracy' (needs an 'answer' column) or a dotted import path. Optional when "
            "--entropy_reward is set."
        },
    )
    entropy_stats: bool = field(
        default=True, metadata={"help": "Log entropy statistics with EntropyStatsCallback (JSONL + PNG plots)."}
    )

    def __post_init__(self):
        if self.num_train_prompts < 1:
            raise ValueError(f"`num_train_prompts` must be >= 1, got {self.num_train_prompts}.")
        if not self.dataset_name:
            raise ValueError("`dataset_name` must be 'arithmetic', a hub dataset id, a folder or a data file.")


@dataclass
class EntropyModelConfig(ModelConfig):
    """TRL's :class:`~trl.ModelConfig` (model loading and LoRA options) with the embedded model as the default.

    Parameters:
        model_name_or_path (`str`, *optional*, defaults to `"smollm2"`):
            `"smollm2"` (the embedded SmolLM2-135M-Instruct, offline), a hub model id or a local folder.
    """

    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL,
        metadata={"help": "'smollm2' (embedded SmolLM2-135M-Instruct, offline), a hub model id or a local folder."},
    )


@dataclass
class GenerateModeArguments:
    """Which generation pipeline ``trl-entropy generate`` runs.

    Parameters:
        early_stopping (`bool`, *optional*, defaults to `False`):
            `False`: batched generation, optionally with EM-INF or the adaptive temperature
            (:func:`trl_entropy.generate.run_generate`). `True`: Think-Just-Enough entropy early stopping with a
            calibrated threshold (:func:`trl_entropy.confidence.run_early_stop_generate`); see
            `trl-entropy generate --early_stopping --help` for its options.
    """

    early_stopping: bool = field(
        default=False,
        metadata={
            "help": "Run entropy early stopping (Think Just Enough) instead of EM-INF / plain generation. "
            "`trl-entropy generate --early_stopping --help` lists its options."
        },
    )


# ---------------------------------------------------------------------------------------------------------------------
# Training: grpo / rloo / emft
# ---------------------------------------------------------------------------------------------------------------------


def _reward_function(name: str) -> Callable:
    if name == "accuracy":
        from .tasks import accuracy_reward

        return accuracy_reward
    if "." in name:
        module_path, attribute = name.rsplit(".", 1)
        sys.path.insert(0, os.getcwd())  # so that a reward module next to the user's config is found
        try:
            return getattr(importlib.import_module(module_path), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"`reward_funcs`: could not import {name!r}: {err}") from err
    raise ValueError(f"`reward_funcs` entries must be 'accuracy' or a dotted import path, got {name!r}.")


def _load_datasets(script_args: TrainScriptArguments, seed: int, with_eval: bool):
    """``(train, eval or None)`` datasets for the training commands."""
    from datasets import load_dataset

    if script_args.dataset_name == "arithmetic":
        from .tasks import ArithmeticTask

        task = ArithmeticTask()
        train = task.dataset(script_args.num_train_prompts, split="train", seed=seed)
        evaluation = task.dataset(max(8, script_args.num_train_prompts // 8), split="test", seed=seed)
        return train, evaluation if with_eval else None
    name = script_args.dataset_name
    builder = _FILE_DATASETS.get(os.path.splitext(name)[1].lower())
    if builder is not None:
        data = load_dataset(builder, data_files=name)
    else:
        data = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    train = data[script_args.dataset_train_split]
    evaluation = data[script_args.dataset_test_split] if with_eval and script_args.dataset_test_split in data else None
    return train, evaluation


def run_train(
    method: str,
    script_args: TrainScriptArguments,
    training_args: Any,
    model_args: EntropyModelConfig,
    guard_args: Any = None,
) -> Any:
    """Train with ``method`` in ``{"grpo", "rloo", "emft"}``, save the model to ``training_args.output_dir`` and return
    the trainer. This is what ``trl-entropy grpo|rloo|emft`` runs."""
    from trl import get_peft_config

    from .models import resolve_model_path

    if method not in _TRAINERS:
        raise ValueError(f"`method` must be one of {sorted(_TRAINERS)}, got {method!r}.")
    trainer_class = getattr(importlib.import_module(_TRAINERS[method][0]), _TRAINERS[method][2])
    reward_funcs = [_reward_function(name) for name in script_args.reward_funcs or []]
    if method == "emft" and reward_funcs:
        raise ValueError("`reward_funcs` must be empty for `emft`: EM-FT trains on entropy alone, with no reward.")

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": getattr(training_args, "trust_remote_code", False),
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    train, evaluation = _load_datasets(script_args, training_args.seed, training_args.eval_strategy != "no")
    kwargs = {
        "model": resolve_model_path(model_args.model_name_or_path),
        "args": training_args,
        "train_dataset": train,
        "eval_dataset": evaluation,
        "peft_config": get_peft_config(model_args),
    }
    if method != "emft":
        kwargs["reward_funcs"] = reward_funcs or None
    trainer = trainer_class(**kwargs)
    if script_args.entropy_stats:
        try:
            from .callbacks import EntropyStatsCallback
        except ImportError:
            trainer.accelerator.print("EntropyStatsCallback is not available; training without entropy statistics.")
        else:
            trainer.add_callback(EntropyStatsCallback(trainer))
    if guard_args is not None and guard_args.collapse_guard:  # after the stats: it reads their repetition rate
        trainer.add_callback(guard_args.build(script_args.dataset_name, training_args.seed))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# Commands: name -> (module, dataclasses, runner)
# ---------------------------------------------------------------------------------------------------------------------

# Imported lazily, so that `trl-entropy --help` and commands that need little stay fast.
_TRAINERS = {
    "grpo": ("trl_entropy.trainers", "EntropyGRPOConfig", "EntropyGRPOTrainer"),
    "rloo": ("trl_entropy.trainers", "EntropyRLOOConfig", "EntropyRLOOTrainer"),
    "emft": ("trl_entropy.trainers.emft", "EMFTConfig", "EMFTTrainer"),
}
_HELP = {
    "grpo": "EM-RL / forking-token training with EntropyGRPOTrainer.",
    "rloo": "EM-RL / forking-token training with EntropyRLOOTrainer.",
    "emft": "EM-FT: entropy-minimisation fine-tuning on the model's own samples (prompts only).",
    "generate": "Generate with EM-INF / adaptive temperature, or with entropy early stopping (--early_stopping).",
    "calibrate": "Calibrate an entropy early-stopping threshold on a few labelled problems.",
    "plot": "PNG plots from the entropy_stats.jsonl of a training run.",
    "demo": "Label-free EM-RL on the embedded model: accuracy and entropy before/after, Markdown report.",
}
_SIMPLE = {
    # command: (module, arguments dataclass, run function)
    "calibrate": ("trl_entropy.confidence", "CalibrateArguments", "run_calibrate"),
    "plot": ("trl_entropy.plots", "PlotArguments", "run_plot"),
    "demo": ("trl_entropy.demo", "DemoArguments", "run_demo"),
    "generate": ("trl_entropy.generate", "GenerateArguments", "run_generate"),
    "generate --early_stopping": ("trl_entropy.confidence", "EarlyStopGenerateArguments", "run_early_stop_generate"),
}


def _import(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"trl-entropy: this installation has no `{module}.{name}` ({err}).") from err


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _wants_early_stopping(argv: Sequence[str]) -> bool:
    """Read ``--early_stopping`` before the full parse, from the command line or the ``--config`` YAML file."""
    from transformers import HfArgumentParser

    config_value = False
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        with open(argv[argv.index("--config") + 1]) as handle:
            config = yaml.safe_load(handle) or {}
        config_value = bool(config.get("early_stopping", False)) if isinstance(config, dict) else False
    parser = HfArgumentParser(GenerateModeArguments, add_help=False)
    parser.set_defaults(early_stopping=config_value)
    namespace, _ = parser.parse_known_args(list(argv))
    return bool(namespace.early_stopping)


def _command_key(command: str, argv: Sequence[str]) -> str:
    if command == "generate" and _wants_early_stopping(argv):
        return "generate --early_stopping"
    return command


def make_parser(command: str, argv: Sequence[str] = ()) -> TrlParser:
    """The :class:`~trl.TrlParser` of ``command`` (``argv`` picks the generate pipeline)."""
    prog = f"trl-entropy {command}"
    if command in _TRAINERS:
        module, config_name, _ = _TRAINERS[command]
        config_class = _import(module, config_name)
        from .collapse_guard import CollapseGuardArguments

        parser = TrlParser(
            (TrainScriptArguments, config_class, EntropyModelConfig, CollapseGuardArguments),
            prog=prog,
            description=_HELP[command],
        )
        # TRL trains in bf16 by default, which needs an accelerator: on a CPU-only machine default to the CPU instead
        # of failing (a --config file or the command line still override it).
        parser.set_defaults_with_config(use_cpu=not _has_accelerator())
        return parser
    key = _command_key(command, argv)
    if key not in _SIMPLE:
        raise ValueError(f"Unknown command {command!r}; choose one of {sorted(_HELP)}.")
    arguments_class = _import(*_SIMPLE[key][:2])
    dataclass_types = (GenerateModeArguments, arguments_class) if command == "generate" else (arguments_class,)
    return TrlParser(dataclass_types, prog=prog, description=_HELP[command])


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-entropy",
        description="Entropy-based, label-free methods for TRL. `trl-entropy <command> --help` lists a command's "
        "options; every command also reads a YAML file with --config.",
        allow_abbrev=False,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"trl-entropy {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for name, text in _HELP.items():
        subparsers.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trl-entropy`` console script. Returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_level_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # --help / --version exit here; anything else is an error
        top.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _HELP:
        top.error(f"unknown command {command!r} (choose from {', '.join(_HELP)})")
    parsed = make_parser(command, rest).parse_args_and_config(rest)
    if command in _TRAINERS:
        script_args, training_args, model_args, guard_args = parsed
        run_train(command, script_args, training_args, model_args, guard_args)
        return 0
    module, _, run_name = _SIMPLE[_command_key(command, rest)]
    result = _import(module, run_name)(parsed[-1])
    if command == "plot":
        print("\n".join(str(path) for path in result))
    elif command == "generate" and isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if k != "arguments"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
