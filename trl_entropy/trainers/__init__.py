"""Trainers: EntropyGRPOTrainer, EntropyRLOOTrainer (EM-RL and forking tokens) and EMFTTrainer (EM-FT)."""

from ._entropy import EntropyMethodsArguments, EntropyReward
from ._trl import check_trl_version
from .emft import EMFTConfig, EMFTTrainer
from .grpo import EntropyGRPOConfig, EntropyGRPOTrainer
from .rloo import EntropyRLOOConfig, EntropyRLOOTrainer

check_trl_version()  # the trainers override private hooks of one TRL minor version: refuse any other at import

__all__ = [
    "EMFTConfig",
    "EMFTTrainer",
    "EntropyMethodsArguments",
    "EntropyReward",
    "EntropyGRPOConfig",
    "EntropyGRPOTrainer",
    "EntropyRLOOConfig",
    "EntropyRLOOTrainer",
]
