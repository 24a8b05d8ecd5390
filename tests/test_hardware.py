"""The training dtype on a CPU: bf16 where the CPU has it natively, float32 where it has not (both CPU kinds: the one
without native bf16 is emulated in a subprocess by capping oneDNN's and ATen's instruction sets to AVX2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from trl_entropy.hardware import (
    cpu_has_native_bf16,
    cpu_name,
    default_bf16,
    machine_record,
    precision_line,
    training_dtype,
)

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

# What the CLI parses for `grpo` with the given options, and the hardware module's view, in a fresh interpreter.
_PROBE = """
import json, sys, torch
from trl_entropy.cli.main import make_parser
from trl_entropy.hardware import cpu_has_native_bf16
parsed = make_parser("grpo").parse_args_and_config(["--output_dir", "out", *sys.argv[1:]])
print(json.dumps({"bf16": parsed[1].bf16, "use_cpu": parsed[1].use_cpu, "native": cpu_has_native_bf16(),
                  "torch_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def _probe(*options: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *options],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cpu_bf16_check_is_torchs_own():
    assert cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert isinstance(cpu_name(), str) and cpu_name()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults apply to a machine without an accelerator")
def test_default_bf16_on_cpu_follows_native_support():
    assert default_bf16(use_cpu=True) == cpu_has_native_bf16()
    assert default_bf16(use_cpu=None) == cpu_has_native_bf16()
    assert default_bf16(use_cpu=False) is True  # an accelerator: TRL's own default


def test_training_dtype_and_precision_line():
    assert training_dtype(SimpleNamespace(bf16=True, fp16=False)) == "bfloat16"
    assert training_dtype(SimpleNamespace(bf16=False, fp16=True)) == "float16"
    assert training_dtype(SimpleNamespace(bf16=False, fp16=False)) == "float32"
    native = cpu_has_native_bf16()
    line = precision_line(SimpleNamespace(bf16=native, fp16=False, use_cpu=True))
    assert "\n" not in line and cpu_name() in line
    assert ("bfloat16" if native else "float32") in line and "as asked" not in line
    forced = precision_line(SimpleNamespace(bf16=not native, fp16=False, use_cpu=True))
    assert "as asked" in forced


def test_machine_record_names_cpu_threads_and_dtype():
    record = machine_record(SimpleNamespace(bf16=False, fp16=False))
    assert record["cpu"] == cpu_name()
    assert record["cpu_native_bf16"] == cpu_has_native_bf16()
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["training_dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults apply to a machine without an accelerator")
def test_cli_trains_in_float32_without_native_bf16_and_bf16_with_it():
    avx2 = _probe(env=AVX2_ONLY)
    assert avx2["capability"] == "AVX2" and avx2["torch_native"] is False and avx2["native"] is False
    assert avx2["use_cpu"] is True and avx2["bf16"] is False
    assert _probe("--bf16", "true", env=AVX2_ONLY)["bf16"] is True  # an explicit choice wins
    here = _probe()
    assert here["bf16"] is here["torch_native"]
    assert _probe("--bf16", "false")["bf16"] is False


_WARN_PROBE = """
import logging, sys
from types import SimpleNamespace
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(name)s: %(message)s")
from trl_entropy.hardware import warn_if_slow_bf16
print(warn_if_slow_bf16(SimpleNamespace(use_cpu=True, bf16=True)), warn_if_slow_bf16(SimpleNamespace(use_cpu=True,
      bf16=False)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning concerns CPU training")
@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(emulated):
    result = subprocess.run(
        [sys.executable, "-c", _WARN_PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(AVX2_ONLY if emulated else {})},
        timeout=120,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    native = cpu_has_native_bf16() and not emulated
    assert lines[-1] == ("False False" if native else "True False")
    warnings = [line for line in lines if "without native bf16" in line]
    assert len(warnings) == (0 if native else 1)
    assert all("bf16=False" in line for line in warnings)
