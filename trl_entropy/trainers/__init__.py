"""Trainers: EntropyGRPOTrainer, EntropyRLOOTrainer (EM-RL and forking tokens) and EMFTTrainer (EM-FT)."""

from ._entropy import EntropyMethodsArguments, EntropyReward
from .emft import EMFTConfig, EMFTTrainer
from .grpo import EntropyGRPOConfig, EntropyGRPOTrainer
from .rloo import EntropyRLOOConfig, EntropyRLOOTrainer

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
