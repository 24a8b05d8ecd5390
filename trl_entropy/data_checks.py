"""Checks of a training dataset against what the trainer and the reward functions will read, run before any model
loads. Each failure is one ``ValueError`` line naming the column, where the data came from and the fix, instead of a
``KeyError`` (or a ``StopIteration``, or a ``TypeError`` inside a reward) in the middle of the first training step.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["check_data_file", "check_training_dataset", "reward_columns"]

# What TRL's GRPOTrainer / RLOOTrainer pass to every reward function besides the dataset columns.
_TRAINER_REWARD_KWARGS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
)


# TRL's named rewards that read `completion[0]["content"]`: they need prompts in the conversational format.
_CHAT_ONLY_TRL_REWARDS = frozenset({"accuracy_reward", "reasoning_accuracy_reward", "think_format_reward"})


def _reads_chat_completions(reward_func: Any) -> bool:
    module = getattr(reward_func, "__module__", "") or ""
    return module.startswith("trl.rewards") and getattr(reward_func, "__name__", None) in _CHAT_ONLY_TRL_REWARDS


def check_data_file(path: str) -> None:
    """Refuse a data file that does not exist or holds no record (``datasets`` fails on it with a bare
    ``StopIteration``)."""
    if not os.path.isfile(path):
        raise ValueError(f"`dataset_name`: no such data file {path!r}.")
    with open(path, "rb") as handle:
        if not handle.read(1 << 16).strip():
            raise ValueError(
                f"`dataset_name`: the data file {path} is empty; write one record per line with a 'prompt' field, "
                'e.g. {"prompt": "What is 2 + 3?", "answer": "5"}.'
            )


def reward_columns(reward_func: Any) -> list[str]:
    """Dataset columns a reward function needs: its parameters that have no default, are not ``*args`` /
    ``**kwargs`` and are not among what the trainer passes itself (``prompts``, ``completions``, ...). A model id
    (a reward model) or an object whose signature can not be read needs none."""
    if isinstance(reward_func, str) or not callable(reward_func):
        return []
    try:
        parameters = inspect.signature(reward_func).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty
        and p.name not in _TRAINER_REWARD_KWARGS
    ]


def _name(reward_func: Any) -> str:
    return (
        reward_func if isinstance(reward_func, str) else getattr(reward_func, "__name__", type(reward_func).__name__)
    )


def check_training_dataset(
    dataset: Any, source: str, split: str, reward_funcs: Sequence[Any | Callable] = (), prompt_column: str = "prompt"
) -> None:
    """Refuse a training split without rows, without a ``prompt`` column, or without a column a reward reads.

    Args:
        dataset: the split (a :class:`datasets.Dataset`; a streaming dataset whose columns are unknown passes).
        source: where it came from (file, folder or hub id), for the message.
        split: its split name, for the message.
        reward_funcs: the reward functions (or reward-model ids) the trainer will call.
        prompt_column: the column the trainer reads prompts from.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # streaming: the columns are only known once iterated
        return
    where = f"split {split!r} of {source}"
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"`dataset_name`: {where} has no rows.")
    if prompt_column not in columns:
        raise ValueError(
            f"`dataset_name`: {where} has no {prompt_column!r} column (columns: {', '.join(columns) or 'none'}); "
            f"rename the column holding the prompts to {prompt_column!r} (`dataset.rename_column(old, "
            f"{prompt_column!r})`)."
        )
    first_prompt = dataset[0][prompt_column] if hasattr(dataset, "__getitem__") else None
    for reward_func in reward_funcs:
        if isinstance(first_prompt, str) and _reads_chat_completions(reward_func):
            raise ValueError(
                f"`reward_funcs`: TRL's {_name(reward_func)} reads chat completions, but {where} has plain-text "
                f"prompts; write each {prompt_column!r} as a list of messages, "
                '[{"role": "user", "content": "..."}], or choose another reward.'
            )
        missing = [c for c in reward_columns(reward_func) if c not in columns]
        if missing:
            raise ValueError(
                f"`reward_funcs`: {_name(reward_func)} reads the column(s) {', '.join(map(repr, missing))}, which "
                f"{where} lacks (columns: {', '.join(columns)}); add them to the data or choose another reward."
            )
