"""Checks of the data, the model folder and the checkpoint a command will read, run before any model loads. Each
failure is one ``ValueError`` line naming the option, the file (and line or row), what is allowed and what was found,
instead of a ``KeyError``, a ``DatasetGenerationError``, an ``IndexError`` inside TRL or a ``TypeError`` inside a
reward in the middle of the first training step.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "check_checkpoint",
    "check_config_option",
    "check_data_file",
    "check_model_inputs",
    "check_model_source",
    "check_prompt_lengths",
    "check_prompts",
    "check_training_dataset",
    "model_context_length",
    "prompt_problem",
    "read_json_records",
    "reward_columns",
]

# What TRL's GRPOTrainer / RLOOTrainer pass to every reward function besides the dataset columns.
_TRAINER_REWARD_KWARGS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
)


# TRL's named rewards that read `completion[0]["content"]`: they need prompts in the conversational format.
_CHAT_ONLY_TRL_REWARDS = frozenset({"accuracy_reward", "reasoning_accuracy_reward", "think_format_reward"})


def _reads_chat_completions(reward_func: Any) -> bool:
    module = getattr(reward_func, "__module__", "") or ""
    return module.startswith("trl.rewards") and getattr(reward_func, "__name__", None) in _CHAT_ONLY_TRL_REWARDS


def prompt_problem(prompt: Any) -> str | None:
    """What is wrong with one ``prompt`` value, or None when TRL can use it: a non-blank string, or a non-empty list of
    chat messages, each a mapping with a string ``role`` and a ``content`` (a string, or a list of content parts)."""
    if isinstance(prompt, str):
        return None if prompt.strip() else f"an empty string {prompt!r}"
    if isinstance(prompt, list):
        if not prompt:
            return "an empty message list []"
        for index, message in enumerate(prompt):
            if not isinstance(message, dict):
                return (
                    f"a message list whose message {index} is {type(message).__name__} {message!r:.60}, not a mapping"
                )
            if not isinstance(message.get("role"), str):
                keys = ", ".join(map(str, message)) or "none"
                return f"a message list whose message {index} has no string 'role' (keys: {keys})"
            if not isinstance(message.get("content"), str | list):
                content = message.get("content")
                return f"a message list whose message {index} has no 'content' string or list (got {content!r:.60})"
        return None
    return f"{type(prompt).__name__} {prompt!r:.60}"


_PROMPT_FORMS = 'a non-empty string or a list of messages [{"role": "user", "content": "..."}]'


def _decode(raw: bytes, path: str, line: int, option: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"`{option}`: {path} line {line} is not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1});"
            " save the file as UTF-8."
        ) from None


def read_json_records(path: str, option: str = "dataset_name") -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of every record of a ``.json`` / ``.jsonl`` file as ``datasets`` reads it (JSON lines, or
    one JSON array of objects), ``where`` being ``"<path> line <n>"``; a ValueError names the option, the file and the
    line of the first line that is not UTF-8, not JSON or not an object."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if path.lower().endswith(".json") and raw.lstrip()[:1] == b"[":  # one JSON array: datasets' other json layout
        for number, line in enumerate(raw.split(b"\n"), start=1):
            _decode(line, path, number, option)
        text = raw.decode("utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{option}`: {path} line {err.lineno} is not valid JSON ({err.msg}).") from None
        for index, record in enumerate(records):
            where = f"{path} record {index}"
            if not isinstance(record, dict):
                raise ValueError(f"`{option}`: {where} is {type(record).__name__}, not a JSON object.")
            yield where, record
        return
    for number, line in enumerate(raw.split(b"\n"), start=1):
        text = _decode(line, path, number, option)
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"`{option}`: {path} line {number} is not valid JSON ({err.msg} at column {err.colno}): write one "
                'JSON object per line, e.g. {"prompt": "What is 2 + 3?", "answer": "5"}.'
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"`{option}`: {path} line {number} is {type(record).__name__}, not a JSON object.")
        yield f"{path} line {number}", record


def check_data_file(
    path: str, option: str = "dataset_name", prompt_column: str = "prompt", required: Sequence[str] = ()
) -> int:
    """Refuse a data file that does not exist, holds no record (``datasets`` fails on it with a bare
    ``StopIteration``), is not UTF-8, or (``.json`` / ``.jsonl``) has a line that is not a JSON object, a
    ``prompt_column`` value TRL can not use (:func:`prompt_problem`) or lacks a ``required`` field. Returns the number
    of records (0 for ``.csv`` / ``.parquet``, whose rows ``datasets`` checks)."""
    if not os.path.isfile(path):
        raise ValueError(f"`{option}`: no such data file {path!r}.")
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if not head.strip():
        raise ValueError(
            f"`{option}`: the data file {path} is empty; write one record per line with a 'prompt' field, "
            'e.g. {"prompt": "What is 2 + 3?", "answer": "5"}.'
        )
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".csv":
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                _decode(line, path, number, option)
    if suffix not in (".json", ".jsonl"):
        return 0
    count = 0
    for where, record in read_json_records(path, option):
        count += 1
        if prompt_column in record:
            problem = prompt_problem(record[prompt_column])
            if problem is not None:
                raise ValueError(f"`{option}`: {where}: {prompt_column!r} is {problem}; it must be {_PROMPT_FORMS}.")
        for name in required:
            if record.get(name) is None:
                raise ValueError(
                    f"`{option}`: {where} has no {name!r} field (fields: {', '.join(record) or 'none'}); every record "
                    f"needs {', '.join(map(repr, required))}."
                )
    if count == 0:
        raise ValueError(f"`{option}`: the data file {path} holds no record.")
    return count


def check_prompts(prompts: Sequence[Any], where: str, option: str = "dataset_name", column: str = "prompt") -> None:
    """Refuse the first prompt TRL can not use (:func:`prompt_problem`), naming its row (0-based, as
    ``dataset[i]``)."""
    for index, prompt in enumerate(prompts):
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(
                f"`{option}`: row {index} of {where}: {column!r} is {problem}; it must be {_PROMPT_FORMS}."
            )


def _looks_like_a_path(name: str) -> bool:
    # A hub id is "name" or "namespace/name"; anything else with a separator, or absolute / relative, is a folder.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def check_model_source(name_or_path: str, option: str = "model_name_or_path") -> None:
    """Refuse a local model folder that does not exist or has no ``config.json`` (a hub id, or the embedded
    ``smollm2``, passes: it is resolved when the model loads)."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(
                f"`{option}`: the folder {name_or_path} has no config.json: give a model folder written by "
                "`save_pretrained`, a hub id such as 'org/name', or 'smollm2'."
            )
    elif _looks_like_a_path(name_or_path):
        raise ValueError(
            f"`{option}`: no such model folder {name_or_path!r}: give a model folder written by `save_pretrained`, a "
            "hub id such as 'org/name', or 'smollm2'."
        )


_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context_length(model_path: str) -> tuple[int, str] | None:
    """``(tokens, field)``: the context length of a model read from its config (``config.json``, no weights), or
    None when the config can not be read offline or names no context length."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def check_prompt_lengths(
    prompts: Sequence[Any],
    model_path: str,
    max_new_tokens: int | None,
    where: str,
    option: str = "dataset_name",
    budget_option: str = "max_completion_length",
) -> None:
    """Refuse the first prompt whose tokens plus ``max_new_tokens`` exceed the model's context length, read from its
    config without loading the weights (transformers would only print a reminder, and positions past the context give
    garbage). Prompts are rendered as TRL renders them (chat template with a generation prompt for message lists).
    Skipped when the config or the tokenizer can not be read offline (the model load then reports it)."""
    context = model_context_length(model_path)
    if context is None:
        return
    limit, field_name = context
    budget = max_new_tokens or 0
    from transformers import AutoTokenizer

    tokenizer = None
    for index, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else None
        if text is not None and len(text.encode("utf-8")) + 2 + budget <= limit:
            continue  # every token covers >= 1 byte, plus at most 2 special tokens: short enough without tokenizing
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_path)
            except (OSError, ValueError, KeyError):
                return
        if text is None:
            if not getattr(tokenizer, "chat_template", None):
                text = "\n".join(str(m.get("content", "")) for m in prompt)
            else:
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            if len(text.encode("utf-8")) + 2 + budget <= limit:
                continue
        length = len(tokenizer(text)["input_ids"])
        if length + budget > limit:
            raise ValueError(
                f"`{option}`: row {index} of {where} has a prompt of {length} tokens, which with `{budget_option}`="
                f"{budget} makes {length + budget}, more than the model's context of {limit} tokens ({field_name} in "
                f"{model_path}); shorten or drop that prompt, or lower `{budget_option}`."
            )


def check_checkpoint(resume_from_checkpoint: Any, output_dir: str) -> None:
    """Refuse a ``resume_from_checkpoint`` that names no checkpoint folder, or whose ``*_state.json`` files
    (``trainer_state.json``, the callbacks' states) are not valid JSON: a corrupt one would fail after the model
    loaded, naming no file. ``True`` (or ``"true"``) means the last ``checkpoint-N`` of ``output_dir``."""
    if resume_from_checkpoint in (None, False, "") or str(resume_from_checkpoint).lower() == "false":
        return
    folder = str(resume_from_checkpoint)
    if resume_from_checkpoint is True or folder.lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        folder = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if folder is None:
            raise ValueError(f"`resume_from_checkpoint`: no checkpoint-N folder to resume from in {output_dir}.")
    if not os.path.isdir(folder):
        raise ValueError(f"`resume_from_checkpoint`: no such checkpoint folder {folder!r}.")
    for path in sorted(glob.glob(os.path.join(folder, "*_state.json"))):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"`resume_from_checkpoint`: {path} is corrupt ({err}); resume from an earlier checkpoint-N folder, or "
                "delete this checkpoint."
            ) from None


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
    """Refuse a training split without rows, without a ``prompt`` column, with a prompt TRL can not use
    (:func:`prompt_problem`), or without a column a reward reads.

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
    if hasattr(dataset, "__getitem__"):  # every row: "" and [] fail inside TRL's generate, ints and None after loading
        check_prompts(dataset[prompt_column], where, column=prompt_column)
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


def check_config_option(argv: Sequence[str]) -> None:
    """Refuse a ``--config`` without a file, a file that does not exist or is not UTF-8, a YAML syntax error, a tag
    that ``yaml.safe_load`` (what TRL's parser reads the file with) does not construct, such as
    ``!!python/object/apply``, or a document that is not a mapping: one line naming the file (and the line)."""
    if "--config" not in argv:
        return
    index = list(argv).index("--config")
    if index + 1 >= len(argv) or str(argv[index + 1]).startswith("--"):
        raise ValueError("`--config` needs a YAML file: `--config config.yaml`.")
    path = str(argv[index + 1])
    if not os.path.isfile(path):
        raise ValueError(f"`--config`: no such file {path!r}.")
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise ValueError(f"`--config`: {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except yaml.constructor.ConstructorError as err:
        mark = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise ValueError(
            f"`--config`: {path}{mark}: {err.problem}; the file is read with yaml.safe_load, which builds no Python "
            "objects: use plain values (numbers, strings, lists, mappings)."
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"`--config`: {path}{where} is not valid YAML ({problem}).") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"`--config`: {path} must hold a YAML mapping of option names to values, got {type(config).__name__}."
        )


def check_model_inputs(
    model_name_or_path: str,
    prompts: Sequence[Any] | None,
    where: str,
    max_new_tokens: int | None,
    option: str = "dataset_name",
    budget_option: str = "max_completion_length",
    model_option: str = "model_name_or_path",
) -> str:
    """The last checks before a command loads its model: the model folder exists (:func:`check_model_source`) and
    every prompt fits its context with the completion budget (:func:`check_prompt_lengths`, reading only the config
    and the tokenizer). Returns the resolved model path (the embedded model's converted folder for ``smollm2``)."""
    from .models import resolve_model_path

    check_model_source(model_name_or_path, model_option)
    model_path = resolve_model_path(model_name_or_path)
    if prompts is not None:
        check_prompt_lengths(prompts, model_path, max_new_tokens, where, option, budget_option)
    return model_path
