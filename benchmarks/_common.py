"""Shared helpers for the benchmark scripts: JSON output, a plain-text table and peak-memory probes."""

from __future__ import annotations

import json
import os
import resource
import statistics
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident set size of this process since the last :func:`reset_peak_rss` (Linux VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (writing 5 to /proc/self/clear_refs), so a later
    :func:`peak_rss_mib` measures only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def current_rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(name: str, payload: dict) -> Path:
    """Print ``payload`` as JSON and write it to ``benchmarks/results/<name>.json``, with the machine it ran on
    (CPU model, native bf16 or not, torch threads: :func:`trl_entropy.hardware.machine_record`) under ``hardware``
    unless the payload records it itself."""
    from trl_entropy.hardware import machine_record

    payload = {"hardware": machine_record(), **payload} if "machine" not in payload else payload
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    text = json.dumps(payload, indent=2, sort_keys=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    print(text)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A fixed-width table of ``rows`` restricted to ``columns``."""

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
