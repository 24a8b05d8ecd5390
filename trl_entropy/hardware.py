"""What this machine computes fast: the CPU's name, whether it has native bfloat16, and the training dtype to use.

TRL's configs default to ``bf16=True``. With ``use_cpu=True`` the Trainer then autocasts to bfloat16 on the CPU, which
is fast where the CPU has native bf16 (AVX-512 BF16 or AMX) and several times slower where it has not (an AVX2-only
AMD EPYC: torch falls back to a reference GEMM; measured in ``benchmarks/bench_dtype.py``). :func:`default_bf16` is
the choice the command line, the demo, the benchmarks and the examples make: TRL's default on an accelerator, native
bf16 on a CPU that has it, float32 on one that has not. An explicit ``--bf16 true`` / ``bf16=True`` still forces bf16.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "cpu_has_native_bf16",
    "cpu_name",
    "default_bf16",
    "has_accelerator",
    "machine_record",
    "precision_line",
    "training_dtype",
    "warn_if_slow_bf16",
]


@functools.cache
def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s ``model name``), else :func:`platform.processor`, else ``"unknown"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_has_native_bf16() -> bool:
    """Whether torch's CPU kernels run bfloat16 natively here (oneDNN's own test: AVX-512 BF16, AMX or an ARM
    equivalent). False where the check itself is missing."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def has_accelerator() -> bool:
    """A CUDA or XPU device is visible."""
    import torch

    return bool(torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def default_bf16(use_cpu: bool | None = None) -> bool:
    """The ``bf16`` default for a training config: True (TRL's default) when training on an accelerator; on the CPU
    (``use_cpu=True``, or no accelerator when ``use_cpu`` is None) True only where the CPU has native bf16."""
    on_cpu = (not has_accelerator()) if use_cpu is None else use_cpu
    return cpu_has_native_bf16() if on_cpu else True


def training_dtype(args: Any) -> str:
    """The dtype a ``TrainingArguments`` trains in: ``"bfloat16"``, ``"float16"`` (mixed precision) or
    ``"float32"``."""
    if getattr(args, "bf16", False):
        return "bfloat16"
    if getattr(args, "fp16", False):
        return "float16"
    return "float32"


def precision_line(args: Any) -> str:
    """One line for the start of a run: where it trains, in which dtype, and why."""
    dtype = training_dtype(args)
    if not getattr(args, "use_cpu", False) and has_accelerator():
        return f"Training on the accelerator in {dtype}."
    native = cpu_has_native_bf16()
    reason = "it has native bf16" if native else "it has no native bf16 (bf16 autocast would run several times slower)"
    default = "bfloat16" if native else "float32"
    if dtype == default:
        tail = "; `--bf16 false` forces float32" if native else "; `--bf16 true` forces bf16"
        return f"Training on the CPU ({cpu_name()}) in {dtype}: {reason}{tail}."
    return f"Training on the CPU ({cpu_name()}) in {dtype}, as asked, although {reason}."


def machine_record(training_args: Any = None) -> dict[str, Any]:
    """What every benchmark JSON records about the machine: the CPU, whether it has native bf16, the torch threads,
    the accelerator if any, and (given a training config) the training dtype."""
    import torch

    record: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if training_args is not None:
        record["training_dtype"] = training_dtype(training_args)
    return record


def warn_if_slow_bf16(args: Any) -> bool:
    """Warn (once per call site's config) when ``args`` trains in bf16 on a CPU without native bf16, where every step
    runs several times slower than in float32; return whether it warned. TRL's configs default to ``bf16=True``."""
    on_cpu = bool(getattr(args, "use_cpu", False)) or not has_accelerator()
    if not (on_cpu and getattr(args, "bf16", False)) or cpu_has_native_bf16():
        return False
    logger.warning(
        "Training in bf16 on a CPU without native bf16 (%s): each step runs several times slower than in float32 "
        "(4.4x in benchmarks/bench_dtype.py). Set "
        "`bf16=False` (or `bf16=trl_entropy.hardware.default_bf16()`), unless bf16 numerics are the point.",
        cpu_name(),
    )
    return True
