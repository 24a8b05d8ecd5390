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

Multi-GPU: ``accelerate launch --config_file examples/accelerate/multi_gpu.yaml -m trl_entropy.cli grpo ...``.

One layer per module: :mod:`.arguments` (the options of every command), :mod:`.main` (parsing, one-line errors,
dispatch), :mod:`.train` (the training script); the other commands run functions of the modules they name.
"""

from .arguments import (
    CalibrateArguments,
    EarlyStopGenerateArguments,
    EntropyModelConfig,
    GenerateArguments,
    GenerateModeArguments,
    TrainScriptArguments,
)
from .main import main, make_parser
from .train import prepare_training, run_train

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
