"""Crash-safe files: JSON lines appended in one write, files replaced atomically, JSON without NaN; and the JSON files
shipped inside the package.

Shared by the callbacks (statistics, collapse guard), the calibration and the ``generate`` command, so that every file
the package writes survives an interrupted run the same way."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import IO, Any

import numpy as np

__all__ = [
    "STATS_FILE_NAME",
    "append_jsonl_record",
    "atomic_writer",
    "disk_full_message",
    "json_safe",
    "package_json",
    "truncate_jsonl",
    "write_atomically",
]

# The entropy statistics file EntropyStatsCallback writes in output_dir and `trl-entropy plot` reads.
STATS_FILE_NAME = "entropy_stats.jsonl"


def json_safe(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become None, numpy scalars become Python numbers."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_jsonl_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line with a single ``O_APPEND`` write, then fsync, so a crash leaves either the
    whole line or (at worst) a torn last line that :func:`truncate_jsonl` drops."""
    line = (json.dumps(json_safe(record), allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file handle whose content replaces ``path`` all at once when the block ends: a temporary file in the
    same folder, fsync'ed, then ``os.replace``; on any failure the old file stays as it was and the temporary file is
    removed. For writers that stream to a file (``torch.save``) without holding the bytes twice in memory."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; keep the file as readable as the rest of the checkpoint
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once (see :func:`atomic_writer`)."""
    with atomic_writer(path) as handle:
        handle.write(data)


# What a full disk looks like when it is not an OSError: PyTorch's zip writer (torch.save of an optimizer or RNG state)
# reports a short write as a RuntimeError "... unexpected pos <n> vs <m>" or "... file write failed".
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")


def _is_disk_full(error: BaseException) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # the cause chain: transformers re-raises some errors
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and any(text in str(error) for text in _TORCH_WRITE_FAILURES):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def disk_full_message(error: BaseException, folder: str | os.PathLike) -> str | None:
    """One line for an ``error`` that a full disk (or an exhausted quota) caused while writing under ``folder``: the
    folder, the free space left on its file system and what to do; ``None`` for any other error."""
    if not _is_disk_full(error):
        return None
    existing = os.path.abspath(folder)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        usage = shutil.disk_usage(existing)
        space = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:
        space = "free space unknown"
    return (
        f"no space left on the device of the output directory {os.path.abspath(folder)} ({space}): free some space or "
        f"choose another output directory ({type(error).__name__}: {error})"
    )


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> int:
    """Keep only the complete, parseable lines of ``path`` whose ``"step"`` is ``<= max_step`` (rewritten atomically);
    returns how many lines were kept. A missing file is left missing."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as handle:
        raw_lines = handle.read().split(b"\n")
    kept = []
    # The last element is the text after the final newline: empty, or a torn line from an interrupted write.
    for raw in raw_lines[:-1]:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= max_step:
            kept.append(raw + b"\n")
    write_atomically(path, b"".join(kept))
    return len(kept)


def package_json(name: str) -> Any | None:
    """The JSON file ``name`` shipped inside the ``trl_entropy`` package (package data written by a benchmark), parsed;
    None when the installed package does not ship it."""
    try:
        text = resources.files("trl_entropy").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return None
    return json.loads(text)
