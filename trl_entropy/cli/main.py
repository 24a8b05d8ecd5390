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
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from trl import DatasetMixtureConfig, TrlParser

from .arguments import EntropyModelConfig, GenerateModeArguments, TrainScriptArguments

__all__ = ["main", "make_parser"]

USAGE_ERROR = 2  # argparse's exit status for a bad command line; also for a bad config or data file
RUN_ERROR = 1

# Imported lazily, so that `trl-entropy --help` and commands that need little stay fast.
_TRAINERS = {
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
}
_SIMPLE = {
    # command: (module of the arguments class, arguments class, module of the run function, run function)
    "calibrate": ("trl_entropy.cli.arguments", "CalibrateArguments", "trl_entropy.cli.confidence", "run_calibrate"),
    "plot": ("trl_entropy.plots", "PlotArguments", "trl_entropy.plots", "run_plot"),
    "diagnose": ("trl_entropy.cli.arguments", "DiagnoseArguments", "trl_entropy.cli.diagnose", "prepare_diagnosis"),
    "demo": ("trl_entropy.demo", "DemoArguments", "trl_entropy.demo", "run_demo"),
    "generate": ("trl_entropy.cli.arguments", "GenerateArguments", "trl_entropy.cli.generate", "run_generate"),
    "generate --early_stopping": (
        "trl_entropy.cli.arguments",
        "EarlyStopGenerateArguments",
        "trl_entropy.cli.confidence",
        "run_early_stop_generate",
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


class _OneLineParser(TrlParser):
    """A :class:`~trl.TrlParser` whose errors are one line: the option, what it accepts, and what was given; options
    with a deprecated transformers name are read under the current one."""

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        args = [_current_option(item) for item in (sys.argv[1:] if args is None else args)]
        return super().parse_args_and_config(args, *rest, **kwargs)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        return super().set_defaults_with_config(**{_CURRENT_NAMES.get(k, k): v for k, v in kwargs.items()})

    def error(self, message: str) -> NoReturn:
        option = message.split(":", 1)[0].removeprefix("argument ").split("/")[0]
        action = next((a for a in self._actions if option in a.option_strings), None)
        if action is not None and action.help and action.choices is None and "invalid" in message:
            message = f"{message} ({action.help})"
        raise UsageError(f"{message}; see `{self.prog} --help`")


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
    prog = f"trl-entropy {command}"
    if command in _TRAINERS:
        module, config_name, _ = _TRAINERS[command]
        config_class = _import(module, config_name)
        from ..collapse_guard import CollapseGuardArguments

        # `trl grpo`'s dataclasses first, in its order; the collapse guard's options after them.
        dataclass_types = (
            TrainScriptArguments,
            config_class,
            EntropyModelConfig,
            DatasetMixtureConfig,
            CollapseGuardArguments,
        )
        parser = _OneLineParser(dataclass_types, prog=prog, description=_HELP[command])
        # TRL trains in bf16 by default, which needs an accelerator: on a CPU-only machine default to the CPU instead
        # of failing (a --config file or the command line still override it). TRL's checkpointing default goes to
        # the current field name, so that no config is built with the deprecated one.
        checkpointing = config_class.__dataclass_fields__["gradient_checkpointing"].default
        parser.set_defaults_with_config(use_cpu=not _has_accelerator(), activation_checkpointing=checkpointing)
        parser.set_defaults(gradient_checkpointing=None)
        return parser
    key = _command_key(command, argv)
    if key not in _SIMPLE:
        raise ValueError(f"Unknown command {command!r}; choose one of {sorted(_HELP)}.")
    arguments_class = _import(*_SIMPLE[key][:2])
    dataclass_types = (GenerateModeArguments, arguments_class) if command == "generate" else (arguments_class,)
    return _OneLineParser(dataclass_types, prog=prog, description=_HELP[command])


def _parse(command: str, argv: Sequence[str]) -> tuple:
    """Parse ``argv`` (and its ``--config`` file) into the command's dataclasses, refusing unknown options."""
    parser = make_parser(command, argv)
    *parsed, from_config, from_argv = parser.parse_args_and_config(
        list(argv), return_remaining_strings=True, separate_remaining_strings=True
    )
    for origin, remaining in (("the command line", from_argv), ("the config file", from_config)):
        unknown = [item for item in remaining if item.startswith("--")] or remaining
        if unknown:
            renamed = [f"{name} (now {_RENAMED[name]})" for name in unknown if name in _RENAMED]
            detail = f"; renamed: {', '.join(renamed)}" if renamed else ""
            raise UsageError(
                f"unknown option(s) in {origin}: {' '.join(unknown)}{detail}; see `trl-entropy {command} --help`"
            )
    return tuple(parsed)


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
    try:
        parsed = _parse(command, rest)
        if command in _TRAINERS:
            from .train import prepare_training

            job = prepare_training(command, *parsed)
        else:
            module, _, run_module, run_name = _SIMPLE[_command_key(command, rest)]
            run = _import(run_module, run_name)
            if command == "plot":  # reads a file only: every error is the input's
                paths = run(parsed[-1])
                print("\n".join(str(path) for path in paths))
                return 0
            if command == "diagnose":  # the data is read and checked here, before the model loads
                job = run(parsed[-1])
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        _fail(command, err, USAGE_ERROR)

    try:
        if command in _TRAINERS or command == "diagnose":
            job.run()
            return 0
        result = run(parsed[-1])
    except ValueError as err:
        _fail(command, err, RUN_ERROR)
    if command == "generate" and isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if k != "arguments"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
