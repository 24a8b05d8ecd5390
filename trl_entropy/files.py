"""Crash-safe files: JSON lines appended in one write, files replaced atomically, JSON without NaN.

Shared by the callbacks (statistics, collapse guard), the calibration and the ``generate`` command, so that every file
the package writes survives an interrupted run the same way."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["append_jsonl_record", "json_safe", "truncate_jsonl", "write_atomically"]


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


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once: a temporary file in the same folder, fsync'ed, then ``os.replace``;
    on any failure the old file stays as it was and the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; keep the file as readable as the rest of the checkpoint
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
