"""benchmarks/bench_gpu.py --tiny: the GPU benchmark's code, run end to end on CPU with small shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "bench_gpu_tiny.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())

    settings = data["settings"]
    assert settings["tiny_cpu_smoke_run"] is True and settings["device_type"] == "cpu"
    assert settings["skipped_sections"] == []
    failed = {k: v["error"] for k, v in data.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed

    ops = data["ops"]
    names = [row["op"] for row in ops["results"]]
    assert {"token_entropy", "trl_entropy_from_logits", "token_entropy_fwd_bwd", "naive_softmax_log_softmax"} <= set(
        names
    )
    assert all(row["median_ms"] > 0 and row["extra_mib"] is None for row in ops["results"])  # no CUDA memory on CPU
    checks = ops["checks"]
    assert checks["backend"] == "torch_chunked" and checks["meets_target"] is None
    assert checks["max_abs_diff_vs_chunked_nats"] < 1e-5
    # TRL's CPU fallback computes the bf16 softmax in bf16: close, not equal.
    assert checks["max_abs_diff_vs_trl_nats"] < 0.1

    grpo = [row["variant"] for row in data["grpo"]["results"]]
    assert grpo == [
        "grpo_plain",
        "entropy_reward_token",
        "entropy_reward_trajectory",
        "forking_0.2",
        "trl_top_entropy_quantile_0.2",
    ]
    # TRL's RLOOTrainer has no entropy mask of its own.
    assert [row["variant"] for row in data["rloo"]["results"]] == ["rloo_plain", *grpo[1:4]]
    assert [row["variant"] for row in data["emft"]["results"]] == ["sft", "emft"]
    for section in ("grpo", "rloo", "emft"):
        for row in data[section]["results"]:
            assert row["median_step_s"] > 0 and row["paired_time_ratio"] > 0
    decode = {row["variant"]: row for row in data["decode"]["results"]}
    assert set(decode) == {"plain_sampling", "em_inf", "adaptive_temperature"}
    assert all(row["tokens_per_s"] > 0 for row in decode.values())
