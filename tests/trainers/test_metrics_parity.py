"""The Python API and ``trl-entropy grpo|rloo|emft`` log the same entropy metrics for the same config (issue 29).

Both runs train the same tiny model on the same JSONL prompts with the same options, once through the trainer classes
(no callback added by hand) and once through the command line, each reporting to TensorBoard. What is compared is
what a user sees: the TensorBoard tags (scalars, histograms, text), the keys of ``entropy_stats.jsonl`` and the PNG
plots, read back from disk by the same code for both runs.
"""

import json
from pathlib import Path

import pytest
from datasets import load_dataset

from trl_entropy.cli import main
from trl_entropy.testing import tiny_prompts

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

COMMON = {
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "max_completion_length": 6,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "tensorboard",
    "seed": 0,
    "use_cpu": True,
    "bf16": False,
    "activation_checkpointing": False,
}
CASES = {
    "grpo": {"entropy_reward": "token", "forking_token_ratio": 0.5, "num_generations": 2},
    "rloo": {"entropy_reward": "trajectory", "num_generations": 2, "beta": 0.0},
    "emft": {},
}
# What each method must log at least (TensorBoard prefixes training scalars with "train/").
EXPECTED_SCALARS = {
    "grpo": {"train/entropy", "train/sampling_entropy/mean", "train/sampling_entropy/p90",
             "train/rewards/entropy_token/mean", "train/forking/selected_fraction"},
    "rloo": {"train/entropy", "train/sampling_entropy/mean", "train/sampling_entropy/p90",
             "train/rewards/entropy_trajectory/mean"},
    "emft": {"train/entropy", "train/sampling_entropy/mean", "train/sampling_entropy/p90",
             "train/emft/entropy_before"},
}  # fmt: skip


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny_prompts(8)))
    return str(path)


def _python_run(method: str, model_dir: str, data_file: str, output_dir: Path) -> None:
    from trl_entropy.trainers import (
        EMFTConfig,
        EMFTTrainer,
        EntropyGRPOConfig,
        EntropyGRPOTrainer,
        EntropyRLOOConfig,
        EntropyRLOOTrainer,
    )

    config_class, trainer_class = {
        "grpo": (EntropyGRPOConfig, EntropyGRPOTrainer),
        "rloo": (EntropyRLOOConfig, EntropyRLOOTrainer),
        "emft": (EMFTConfig, EMFTTrainer),
    }[method]
    args = config_class(output_dir=str(output_dir), **COMMON, **CASES[method])
    dataset = load_dataset("json", data_files=data_file)["train"]
    trainer_class(model=model_dir, args=args, train_dataset=dataset).train()


def _cli_run(method: str, model_dir: str, data_file: str, output_dir: Path) -> None:
    argv = [method, "--model_name_or_path", model_dir, "--dataset_name", data_file, "--output_dir", str(output_dir)]
    for name, value in {**COMMON, **CASES[method]}.items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    assert main(argv) == 0


def _logged(output_dir: Path) -> dict[str, set[str]]:
    """Everything a run logged, read from its files: TensorBoard tags by kind, JSONL metric keys, PNG names."""
    (event_file,) = output_dir.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    records = [json.loads(line) for line in (output_dir / "entropy_stats.jsonl").read_text().splitlines()]
    return {
        "scalars": set(tags["scalars"]),
        "histograms": set(tags["histograms"]),
        "tensors": set(tags["tensors"]),  # text summaries (the forking-token table)
        "jsonl": {key for record in records for key in record["metrics"]},
        "jsonl_steps": {str(record["step"]) for record in records},
        "plots": {path.name for path in (output_dir / "entropy_plots").glob("*.png")},
    }


def _entropy_related(logged: dict[str, set[str]]) -> dict[str, set[str]]:
    """The entropy-related part of ``_logged``: names with "entropy" or "forking" (the forking-token mask's)."""
    related = {}
    for kind, names in logged.items():
        whole = kind.startswith(("jsonl", "plots"))  # every JSONL key and plot is the entropy callback's
        related[kind] = {name for name in names if whole or "entropy" in name or "forking" in name}
    return related


@pytest.mark.parametrize("method", sorted(CASES))
def test_python_api_and_cli_log_the_same_entropy_metrics(method, tiny_model_dir, prompts_file, tmp_path):
    _python_run(method, tiny_model_dir, prompts_file, tmp_path / "python")
    _cli_run(method, tiny_model_dir, prompts_file, tmp_path / "cli")
    from_python, from_cli = _logged(tmp_path / "python"), _logged(tmp_path / "cli")

    assert _entropy_related(from_python) == _entropy_related(from_cli)
    assert EXPECTED_SCALARS[method] <= from_python["scalars"]
    assert "train/sampling_entropy/histogram" in from_python["histograms"]
    assert from_python["jsonl_steps"] == {"1", "2"}
    assert from_python["plots"]  # the end-of-training PNGs, from both (matplotlib is a test dependency)
    # The callback's scalars all carry the prefix that names their source; none under TRL's bare `entropy/`.
    assert all(key.startswith("sampling_entropy/") for key in from_python["jsonl"])
    assert not any(tag.startswith("train/entropy/") for tag in from_python["scalars"] | from_cli["scalars"])
