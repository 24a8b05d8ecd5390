"""The ``trl-entropy`` command line, following TRL's CLI conventions: one subcommand per job, options from
dataclasses through :class:`trl.TrlParser` (``--help`` lists every option), and YAML config files through ``--config``
(command-line options override the file; an ``env:`` mapping in it sets environment variables).

Subcommands::

    trl-entropy grpo      EM-RL / forking tokens with EntropyGRPOTrainer (a `trl grpo` config runs unchanged)
    trl-entropy rloo      EM-RL / forking tokens with EntropyRLOOTrainer (a `trl rloo` config runs unchanged)
    trl-entropy emft      EM-FT (entropy-minimisation fine-tuning on the model's own samples)
    trl-entropy generate  generation with EM-INF / adaptive temperature, or entropy early stopping (--early_stopping)
    trl-entropy calibrate calibrate an early-stopping entropy threshold
    trl-entropy plot      PNG plots from a training run's entropy_stats.jsonl
    trl-entropy demo      label-free EM-RL on the embedded model, before/after report
    trl-entropy env       the versions and machine facts a bug report needs (as `trl env`)

Multi-GPU: ``accelerate launch --config_file examples/accelerate/multi_gpu.yaml -m trl_entropy.cli grpo ...``.

One layer per module: :mod:`.arguments` (the options of every command), :mod:`.main` (parsing, one-line errors,
dispatch; it imports TRL, transformers and torch only where a command needs them, so that ``trl-entropy --help`` is
fast), :mod:`._parser` (the one-line-error :class:`~trl.TrlParser`), :mod:`.train` (the training script), :mod:`.env`
(``trl-entropy env``); the other commands run functions of the modules they name.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .main import main, make_parser

# Public name -> submodule that defines it, loaded on first access: `trl-entropy --help` and `trl-entropy env` import
# neither TRL's trainers nor torch.
_LAZY = {
    "TrainScriptArguments": "arguments",
    "EntropyModelConfig": "arguments",
    "GenerateModeArguments": "arguments",
    "GenerateArguments": "arguments",
    "CalibrateArguments": "arguments",
    "EarlyStopGenerateArguments": "arguments",
    "prepare_training": "train",
    "run_train": "train",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and the API reference
    from .arguments import (
        CalibrateArguments,
        EarlyStopGenerateArguments,
        EntropyModelConfig,
        GenerateArguments,
        GenerateModeArguments,
        TrainScriptArguments,
    )
    from .train import prepare_training, run_train


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TrainScriptArguments",
    "EntropyModelConfig",
    "GenerateModeArguments",
    "GenerateArguments",
    "CalibrateArguments",
    "EarlyStopGenerateArguments",
    "main",
    "make_parser",
    "prepare_training",
    "run_train",
]
