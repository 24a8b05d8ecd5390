"""Parsing and dispatch of ``trl-entropy``: one subcommand per job, options from the dataclasses of
:mod:`trl_entropy.cli.arguments` through :class:`trl.TrlParser`, YAML files through ``--config``.

Errors a user can fix print one line, ``trl-entropy <command>: error: <what, allowed, given>``, never a usage dump or
a traceback: exit status 2 for a bad option, config or data file (all caught before any model loads), 1 for a
failure after the model has loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

# TRL's parser, the argument classes and torch are imported where a command needs them, so that `trl-entropy --help`
# starts as fast as `trl --help` (tests/cli/test_cli.py checks what it imports; benchmarks/bench_cli_help.py times it).
if TYPE_CHECKING:
    from trl import TrlParser

__all__ = ["main", "make_parser"]

USAGE_ERROR = 2  # argparse's exit status for a bad command line; also for a bad config or data file
RUN_ERROR = 1

# The one trainer registry of the CLI: command -> (module, config class, trainer class), imported lazily so that
# `trl-entropy --help` and commands that need little stay fast (cli/train.py builds the trainer from it too).
TRAINERS = {
    "grpo": ("trl_entropy.trainers", "EntropyGRPOConfig", "EntropyGRPOTrainer"),
    "rloo": ("trl_entropy.trainers", "EntropyRLOOConfig", "EntropyRLOOTrainer"),
    "emft": ("trl_entropy.trainers.emft", "EMFTConfig", "EMFTTrainer"),
}
_HELP = {
    "grpo": "EM-RL / forking-token training with EntropyGRPOTrainer (runs a `trl grpo` config unchanged).",
    "rloo": "EM-RL / forking-token training with EntropyRLOOTrainer (runs a `trl rloo` config unchanged).",
    "emft": "EM-FT: entropy-minimisation fine-tuning on the model's own samples (prompts only).",
    "generate": "Generate with EM-INF / adaptive temperature, or with entropy early stopping (--early_stopping).",
    "calibrate": "Calibrate an entropy early-stopping threshold on a few labelled problems.",
    "plot": "PNG plots from the entropy_stats.jsonl of a training run.",
    "diagnose": "Before training: measure whether label-free training can help this model on this data (verdict).",
    "demo": "Label-free EM-RL on the embedded model: accuracy and entropy before/after, Markdown report.",
    "env": "Print the versions and machine facts to paste into a bug report (as `trl env`, with trl-entropy's own).",
}
_SIMPLE = {
    # command: (module of the arguments class, arguments class, module of the run function, run function); a
    # `prepare_*` function checks the input and returns a job whose `run()` loads the model
    "calibrate": (
        "trl_entropy.cli.arguments",
        "CalibrateArguments",
        "trl_entropy.cli.confidence",
        "prepare_calibrate",
    ),
    "plot": ("trl_entropy.cli.arguments", "PlotArguments", "trl_entropy.cli.plot", "run_plot"),
    "diagnose": ("trl_entropy.cli.arguments", "DiagnoseArguments", "trl_entropy.cli.diagnose", "prepare_diagnosis"),
    "demo": ("trl_entropy.cli.arguments", "DemoArguments", "trl_entropy.cli.demo", "run_demo"),
    "env": ("trl_entropy.cli.env", "EnvArguments", "trl_entropy.cli.env", "run_env"),
    "generate": ("trl_entropy.cli.arguments", "GenerateArguments", "trl_entropy.cli.generate", "prepare_generate"),
    "generate --early_stopping": (
        "trl_entropy.cli.arguments",
        "EarlyStopGenerateArguments",
        "trl_entropy.cli.confidence",
        "prepare_early_stop_generate",
    ),
}
# Options that had another name in an earlier release: named in the error, so that old configs are easy to fix.
_RENAMED = {"--num_examples": "--num_problems", "--output_path": "--output_file"}


class UsageError(Exception):
    """A mistake in the command line, the config file or the data, reported in one line with exit status 2."""


# transformers 5 renamed these TrainingArguments fields and warns on every config built with the old names, which TRL
# 1.16's configs still default; a command line or YAML file that uses them is read under the current names.
_CURRENT_NAMES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _current_option(item: str) -> str:
    flag, sep, value = item.partition("=")
    name = flag.removeprefix("--")
    return f"--{_CURRENT_NAMES[name]}{sep}{value}" if flag.startswith("--") and name in _CURRENT_NAMES else item


def _import(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"this installation has no `{module}.{name}` ({err})") from err


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _wants_early_stopping(argv: Sequence[str]) -> bool:
    """Read ``--early_stopping`` before the full parse, from the command line or the ``--config`` YAML file."""
    from transformers import HfArgumentParser

    from .arguments import GenerateModeArguments

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
    """The :class:`~trl.TrlParser` of ``command`` (``argv`` picks the generate pipeline).

    The training commands parse the dataclasses of ``trl grpo`` / ``trl rloo`` in the same order (script arguments,
    the trainer config, :class:`~trl.ModelConfig`, :class:`~trl.DatasetMixtureConfig`), so a ``trl`` YAML config is
    read unchanged."""
    from ._parser import OneLineParser

    prog = f"trl-entropy {command}"
    if command in TRAINERS:
        from trl import DatasetMixtureConfig

        from .arguments import EntropyModelConfig, TrainScriptArguments

        module, config_name, _ = TRAINERS[command]
        config_class = _import(module, config_name)
        from .arguments import CollapseGuardArguments

        # `trl grpo`'s dataclasses first, in its order; the collapse guard's options after them.
        dataclass_types = (
            TrainScriptArguments,
            config_class,
            EntropyModelConfig,
            DatasetMixtureConfig,
            CollapseGuardArguments,
        )
        parser = OneLineParser(dataclass_types, prog=prog, description=_HELP[command])
        # TRL trains in bf16 by default, which needs an accelerator: on a CPU-only machine default to the CPU instead
        # of failing, in bf16 only where the CPU has it natively (elsewhere bf16 autocast runs ~10x slower: float32);
        # a --config file or the command line still override both. TRL's checkpointing default goes to the current
        # field name, so that no config is built with the deprecated one.
        from ..hardware import default_bf16

        checkpointing = config_class.__dataclass_fields__["gradient_checkpointing"].default
        use_cpu = not _has_accelerator()
        parser.set_defaults_with_config(
            use_cpu=use_cpu, bf16=default_bf16(use_cpu), activation_checkpointing=checkpointing
        )
        parser.set_defaults(gradient_checkpointing=None)
        return parser
    key = _command_key(command, argv)
    if key not in _SIMPLE:
        raise ValueError(f"Unknown command {command!r}; choose one of {sorted(_HELP)}.")
    arguments_class = _import(*_SIMPLE[key][:2])
    if command == "generate":
        from .arguments import GenerateModeArguments

        dataclass_types = (GenerateModeArguments, arguments_class)
    else:
        dataclass_types = (arguments_class,)
    return OneLineParser(dataclass_types, prog=prog, description=_HELP[command])


def _is_option(item: str) -> bool:
    return item.startswith("-") and not item.lstrip("-").replace(".", "", 1).isdigit()  # "-1" is a value


def _split_launcher_options(remaining: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(launcher, rest)``: the leftovers of the dataclass parse that ``accelerate launch`` takes (its own options
    and TRL's ``--accelerate_config``, each with its values), and the others. ``trl grpo`` hands the same leftovers to
    ``accelerate launch``."""
    if not remaining:
        return [], []
    from accelerate.commands.launch import launch_command_parser

    accelerate_options = (name for action in launch_command_parser()._actions for name in action.option_strings)
    known = {"--accelerate_config", *accelerate_options}
    launcher: list[str] = []
    rest: list[str] = []
    target = rest  # a value before any option is not a launcher option's
    for item in remaining:
        if _is_option(item):
            target = launcher if item.split("=", 1)[0] in known else rest
        target.append(item)
    return launcher, rest


def _parse_command(command: str, argv: Sequence[str]) -> tuple[tuple, list[str], list[str]]:
    """Parse ``argv`` (and its ``--config`` file) into the command's dataclasses, refusing unknown options. Returns
    the dataclasses and, for the training commands, the launcher options (``accelerate_config``, ``num_processes``
    and the other options of ``accelerate launch``) found in the config file and on the command line."""
    parser = make_parser(command, argv)
    *parsed, from_config, from_argv = parser.parse_args_and_config(
        list(argv), return_remaining_strings=True, separate_remaining_strings=True
    )
    launcher = {}
    for origin, remaining in (("the command line", from_argv), ("the config file", from_config)):
        launcher[origin], remaining = _split_launcher_options(remaining) if command in TRAINERS else ([], remaining)
        unknown = [item for item in remaining if item.startswith("--")] or remaining
        if unknown:
            renamed = [f"{name} (now {_RENAMED[name]})" for name in unknown if name in _RENAMED]
            detail = f"; renamed: {', '.join(renamed)}" if renamed else ""
            raise UsageError(
                f"unknown option(s) in {origin}: {' '.join(unknown)}{detail}; see `trl-entropy {command} --help`"
            )
    return tuple(parsed), launcher["the config file"], launcher["the command line"]


def _parse(command: str, argv: Sequence[str]) -> tuple:
    """Parse ``argv`` (and its ``--config`` file) into the command's dataclasses, refusing unknown options (launcher
    options are accepted for the training commands and left out)."""
    return _parse_command(command, argv)[0]


def _launched_by_accelerate() -> bool:
    # Every `accelerate launch` launcher (simple, multi-GPU, DeepSpeed, FSDP) sets this in the processes it starts:
    # there the launcher keys have done their work and are ignored, as TRL's training scripts ignore them.
    return "ACCELERATE_MIXED_PRECISION" in os.environ


def _accelerate_launch_args(
    command: str, argv: Sequence[str], from_config: list[str], from_argv: list[str]
) -> list[str]:
    """The arguments of ``accelerate launch`` that run ``trl-entropy <command> argv`` with the launcher options found
    by the parse, built as ``trl grpo`` builds its own: TRL's ``accelerate_config`` (a file, or a config shipped with
    TRL: ``multi_gpu``, ``zero3``...) becomes ``--config_file``, the other launcher options are passed unchanged, and
    the script is ``-m trl_entropy.cli <command>`` with the command line minus its launcher options."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence

    try:
        launch_args = resolve_accelerate_config_argument(from_config + from_argv)
    except ValueError as err:
        raise UsageError(f"`accelerate_config`: {err}") from err
    return [*launch_args, "--module", "trl_entropy.cli", command, *_subtract_subsequence(list(argv), from_argv)]


def _launch(command: str, argv: Sequence[str], from_config: list[str], from_argv: list[str]) -> int:
    """Run ``trl-entropy <command> argv`` again under ``accelerate launch`` (:func:`_accelerate_launch_args`), as
    ``trl grpo`` does with the same keys. Returns the exit status of the launched processes."""
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.exit_on_error = False  # a bad launcher value is the user's: one line, not accelerate's usage dump
    try:
        launch = parser.parse_args(_accelerate_launch_args(command, argv, from_config, from_argv))
    except argparse.ArgumentError as err:
        raise UsageError(f"launcher option {err}") from err
    try:
        launch_command(launch)
    except subprocess.CalledProcessError as err:  # the single-process launcher; the process printed its error
        return err.returncode
    except ChildFailedError as err:  # torchrun (multi-GPU, DeepSpeed, FSDP): the failed ranks printed their errors
        return next(iter(err.failures.values())).exitcode or RUN_ERROR
    return 0


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-entropy",
        description="Entropy-based, label-free methods for TRL. `trl-entropy <command> --help` lists a command's "
        "options; every command also reads a YAML file with --config.",
        allow_abbrev=False,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"trl-entropy {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for name, text in _HELP.items():
        subparsers.add_parser(name, help=text, add_help=False)
    return parser


def _fail(command: str, message: Any, status: int) -> NoReturn:
    text = " ".join(str(message).split())  # one line, whatever the exception's formatting
    print(f"trl-entropy {command}: error: {text}".replace("trl-entropy : ", "trl-entropy: "), file=sys.stderr)
    raise SystemExit(status)


def _output_folder(command: str, parsed: tuple) -> str:
    """Where ``command`` writes: the training config's or the arguments' ``output_dir``, else ``output_file``'s
    folder."""
    arguments = parsed[1] if command in TRAINERS else parsed[-1]
    folder = getattr(arguments, "output_dir", None)
    return folder or os.path.dirname(os.path.abspath(getattr(arguments, "output_file", None) or "."))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trl-entropy`` console script. Returns the process exit status (0); exits with status
    2 on a usage, config or data error, 1 on an error after the model has loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # TRL 1.16 reads this deprecated property of transformers at every generation batch: not the user's to fix.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    top = _top_level_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # --help / --version exit here; anything else is an error
        top.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _HELP:
        _fail("", f"unknown command {command!r} (choose from {', '.join(_HELP)})", USAGE_ERROR)

    # Everything up to here, and the preparation below, happens before any model loads: bad input costs nothing.
    job = None
    try:
        from ..data_checks import check_config_option

        check_config_option(rest)  # a YAML error or a missing file: one line naming the file, before TRL reads it
        parsed, launch_from_config, launch_from_argv = _parse_command(command, rest)
        if (launch_from_config or launch_from_argv) and not _launched_by_accelerate():
            return _launch(command, rest, launch_from_config, launch_from_argv)
        if command in TRAINERS:
            from .train import prepare_training

            job = prepare_training(command, *parsed)
        else:
            module, _, run_module, run_name = _SIMPLE[_command_key(command, rest)]
            run = _import(run_module, run_name)
            if command == "plot":  # reads a file only: every error is the input's
                paths = run(parsed[-1])
                print("\n".join(str(path) for path in paths))
                return 0
            if run_name.startswith("prepare_"):  # the data is read and checked here, before the model loads
                job = run(parsed[-1])
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        _fail(command, err, USAGE_ERROR)

    try:
        if command in TRAINERS or command == "diagnose":
            job.run()
            return 0
        result = job.run() if job is not None else run(parsed[-1])
    except ValueError as err:
        _fail(command, err, RUN_ERROR)
    except (OSError, RuntimeError) as err:  # a full disk: one line naming the output directory and its free space
        from ..files import disk_full_message

        message = disk_full_message(err, _output_folder(command, parsed))
        if message is None:
            raise
        _fail(command, message, RUN_ERROR)
    if command == "generate" and isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if k != "arguments"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
