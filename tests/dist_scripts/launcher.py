"""Runs a script on several CPU processes with ``torch.distributed.run`` (gloo), from a pytest test, with a timeout.

``accelerate launch --cpu --num_processes 2`` starts one process only; torchrun starts the processes itself and
accelerate's ``PartialState(cpu=True)`` then joins the gloo process group from its environment variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


class LaunchError(RuntimeError):
    """The launch failed or timed out; the message carries the end of its output."""


def _tail(text: str, lines: int = 80) -> str:
    """The last ``lines`` lines, after every line that names an error (training logs would push it out of view)."""
    all_lines = text.splitlines()
    errors = [line for line in all_lines if "Error" in line or "Traceback" in line or "error:" in line]
    return "\n".join([*errors[-40:], "--- end of output:", *all_lines[-lines:]])


def launch(script: str, *args: str, nproc: int = 2, timeout: float = 300.0, env: dict[str, str] | None = None) -> str:
    """Run ``tests/dist_scripts/<script>`` on ``nproc`` processes; return the combined output.

    The launcher runs in its own session, so a hang (a collective one rank never joins) ends with the whole process
    group killed after ``timeout`` seconds and a :class:`LaunchError`, instead of a blocked test run.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port: launches of parallel test runs do not collide
        f"--nproc_per_node={nproc}",
        str(SCRIPTS / script),
        *args,
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers: the session this call started
        output, _ = process.communicate()
        raise LaunchError(
            f"{script} did not finish within {timeout:.0f} s (a hang?). Output:\n{_tail(output)}"
        ) from err
    if process.returncode != 0:
        raise LaunchError(f"{script} exited with {process.returncode}. Output:\n{_tail(output)}")
    return output
