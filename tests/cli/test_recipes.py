"""The recipes of ``recipes/`` (one YAML per method in its paper's setting) and TRL's launcher keys (issue 29).

Every key of every recipe is read by the command's own parser with the value written in the file; each training
recipe trains for one step offline, and the EM-INF recipe generates, on a tiny local model and data, the recipe's
other keys unchanged. ``trl-entropy grpo`` takes ``accelerate_config`` / ``num_processes`` as ``trl grpo`` does: it
builds the same ``accelerate launch`` command line from the same YAML, and both train (subprocesses).
"""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from trl_entropy.cli import main
from trl_entropy.cli.main import _accelerate_launch_args, _parse_command
from trl_entropy.testing import tiny_prompts

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*/*/config_*.yaml"))
TRAINING = ("grpo", "rloo", "emft")
LAUNCHER_KEYS = ("accelerate_config", "num_processes")


def _command(recipe: Path) -> str:
    """The `trl-entropy` command of a recipe: `recipes/<model>/<command>/config_<name>.yaml`."""
    return recipe.parent.name


def _id(recipe: Path) -> str:
    return str(recipe.relative_to(ROOT / "recipes"))


def _keys(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text(encoding="utf-8"))


def _values(parsed) -> dict:
    """Every field of the parsed dataclasses by name (the first dataclass that has it, as the parser fills it)."""
    values = {}
    for obj in parsed:
        for field in fields(obj):
            values.setdefault(field.name, getattr(obj, field.name))
    return values


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Chat prompts with a `solution` column, the layout of the recipes' Hub data (TRL's accuracy_reward reads it)."""
    path = tmp_path_factory.mktemp("tiny-data") / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": p}], "solution": str(i)} for i, p in enumerate(tiny_prompts(8))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# What the recipes hold
# ---------------------------------------------------------------------------------------------------------------------


def test_one_recipe_per_method():
    methods = set()
    for recipe in RECIPES:
        keys, command = _keys(recipe), _command(recipe)
        if command == "generate":
            methods.add("em_inf" if keys.get("em_inf") else "generate")
        elif command == "emft":
            methods.add("emft")
        elif keys.get("forking_token_ratio", 1.0) < 1.0:
            methods.add(f"{command}/forking_tokens")
        else:
            methods.add(f"{command}/{keys['entropy_reward']}")
    assert methods == {"grpo/token", "grpo/trajectory", "rloo/token", "emft", "grpo/forking_tokens", "em_inf"}


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_recipe_header_names_paper_table_and_its_launch_line(recipe):
    text = recipe.read_text(encoding="utf-8")
    header = text[: text.index("\n\n")]
    assert all(line.startswith("#") for line in header.splitlines())
    assert "arXiv 2505.15134" in header or "arXiv 2506.01939" in header
    assert "Follows" in header and "What differs from the paper" in header
    assert f"trl-entropy {_command(recipe)} --config {recipe.relative_to(ROOT)}" in header
    # Which values are the paper's and which are choices: the values carry the header's tags.
    assert "[paper]" in text and "[choice]" in text


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_every_recipe_key_is_read_with_its_value(recipe):
    """The command's parser accepts the file as it is (the CLI refuses unknown keys) and every dataclass field gets the
    value written in the YAML; the launcher keys are set apart for `accelerate launch`."""
    keys, command = _keys(recipe), _command(recipe)
    parsed, from_config, from_argv = _parse_command(command, ["--config", str(recipe)])
    values = _values(parsed)
    launcher = {key: keys.pop(key) for key in LAUNCHER_KEYS if key in keys}
    assert {key: values.get(key, "<not a field>") for key in keys} == keys
    assert from_argv == []
    assert from_config == [item for key, value in launcher.items() for item in (f"--{key}", str(value))]
    if command in TRAINING:
        # The paper's engine: vLLM inside the training processes, fully sharded training (TRL's zero3.yaml).
        assert values["use_vllm"] is True and values["vllm_mode"] == "colocate"
        launch = _accelerate_launch_args(command, ["--config", str(recipe)], from_config, from_argv)
        accelerate_config = yaml.safe_load(Path(launch[launch.index("--config_file") + 1]).read_text())
        assert accelerate_config["distributed_type"] == "DEEPSPEED"
        assert accelerate_config["deepspeed_config"]["zero_stage"] == 3


# ---------------------------------------------------------------------------------------------------------------------
# One step of each recipe on a tiny model
# ---------------------------------------------------------------------------------------------------------------------

# Keys overridden on the command line, and why; every other key of the recipe is used as written.
HARDWARE_OVERRIDES = [  # hardware this machine lacks
    "--use_vllm", "false",  # vLLM needs a GPU (and is not installed here)
    "--bf16", "false",  # float32 on the CPU
    "--dtype", "float32",
]  # fmt: skip
# The launcher keys stay in the file: the run happens as in a process that `accelerate launch` started (the variable
# below is what accelerate sets there), where they are ignored, as TRL's own training scripts ignore them.
LAUNCHED_ENV = {"ACCELERATE_MIXED_PRECISION": "no"}


def _size_overrides(keys: dict, model_dir: str, data: str, output_dir: Path) -> list[str]:
    """Model, data and budget of a tiny run: one optimizer step over one generation batch of one group, 4 tokens."""
    group = keys.get("num_generations") or keys.get("num_samples_per_prompt")
    argv = ["--model_name_or_path", model_dir, "--dataset_name", data, "--output_dir", str(output_dir)]
    argv += ["--max_steps", "1", "--max_completion_length", "4", "--per_device_train_batch_size", str(group)]
    argv += ["--gradient_accumulation_steps", "1", "--report_to", "none"]
    return argv + (["--steps_per_generation", "1"] if "steps_per_generation" in keys else [])


@pytest.mark.parametrize("recipe", [r for r in RECIPES if _command(r) in TRAINING], ids=_id)
def test_training_recipe_runs_one_step(recipe, tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    keys, command = _keys(recipe), _command(recipe)
    for name, value in LAUNCHED_ENV.items():
        monkeypatch.setenv(name, value)
    output_dir = tmp_path / "run"
    argv = [command, "--config", str(recipe), *HARDWARE_OVERRIDES]
    assert main([*argv, *_size_overrides(keys, tiny_model_dir, tiny_data, output_dir)]) == 0

    assert (output_dir / "model.safetensors").is_file()
    # The trainer ran with the recipe's method settings: its saved arguments hold the values of the YAML file.
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    overrides = HARDWARE_OVERRIDES + _size_overrides(keys, "", "", output_dir)
    overridden = {item.removeprefix("--") for item in overrides if item.startswith("--")}
    method = {key: value for key, value in keys.items() if hasattr(args, key) and key not in overridden}
    assert {key: getattr(args, key) for key in method} == method
    assert args.max_steps == 1 and args.use_vllm is False


def test_em_inf_recipe_generates(tiny_model_dir, tmp_path, capsys):
    (recipe,) = [r for r in RECIPES if _command(r) == "generate"]
    keys = _keys(recipe)
    output = tmp_path / "em_inf.jsonl"
    # Model and problems overridden (the built-in offline task for MATH-500 from the Hub), 2 problems of 4 tokens.
    overrides = ["--model_name_or_path", tiny_model_dir, "--task", "arithmetic", "--num_problems", "2"]
    overrides += ["--max_new_tokens", "4", "--output_file", str(output)]
    assert main(["generate", "--config", str(recipe), *overrides]) == 0
    capsys.readouterr()

    assert len(output.read_text().splitlines()) == 2
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    used = summary["arguments"]
    overridden = {item.removeprefix("--") for item in overrides[::2]}
    assert {key: used[key] for key in keys if key not in overridden} == {
        key: value for key, value in keys.items() if key not in overridden
    }
    assert summary["em_inf_stats"]["rows"] > 0  # EM-INF ran at the decoding steps


# ---------------------------------------------------------------------------------------------------------------------
# TRL's launcher keys: `accelerate_config`, `num_processes` and the other options of `accelerate launch`
# ---------------------------------------------------------------------------------------------------------------------


def _launcher_yaml(tmp_path: Path, model_dir: str, data: str, **launcher) -> Path:
    """A `trl grpo` config (TRL's `datasets` format and reward name) with launcher keys, for both CLIs."""
    config = {
        "model_name_or_path": model_dir,
        "datasets": [{"path": "json", "data_files": data, "split": "train"}],
        "reward_funcs": ["accuracy_reward"],
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 4,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        **launcher,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_launch_command_line_is_trl_grpos(tmp_path, tiny_model_dir, tiny_data):
    """From the same YAML and command line, `trl-entropy grpo` builds the `accelerate launch` arguments that `trl grpo`
    builds (TRL's own parser and functions as the reference), its script aside."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence
    from trl.scripts.grpo import make_parser as trl_grpo_parser

    path = _launcher_yaml(tmp_path, tiny_model_dir, tiny_data, accelerate_config="multi_gpu", num_processes=1)
    argv = ["--config", str(path), "--main_process_port", "29511", "--learning_rate", "1e-5"]
    *_, trl_config, trl_argv = trl_grpo_parser().parse_args_and_config(
        list(argv), return_remaining_strings=True, separate_remaining_strings=True
    )
    trl_launch = resolve_accelerate_config_argument(trl_config + trl_argv)
    trl_script_args = _subtract_subsequence(argv, trl_argv)

    _, from_config, from_argv = _parse_command("grpo", argv)
    launch = _accelerate_launch_args("grpo", argv, from_config, from_argv)
    script = launch.index("--module")
    assert launch[:script] == trl_launch
    assert launch[script:] == ["--module", "trl_entropy.cli", "grpo", *trl_script_args]
    assert trl_launch[:2] == ["--config_file", str(Path(trl_launch[1]))] and trl_launch[1].endswith("multi_gpu.yaml")


def test_unknown_key_beside_launcher_keys_is_still_refused(tmp_path, tiny_model_dir, tiny_data, capsys):
    path = _launcher_yaml(tmp_path, tiny_model_dir, tiny_data, num_processes=1, not_an_option=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--config", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "trl-entropy grpo: error: unknown option(s) in the config file: --not_an_option; see `trl-entropy grpo --help`"
    )


@pytest.mark.parametrize(
    "launcher, fragments",
    [
        ({"accelerate_config": "no_such_config"}, ["`accelerate_config`: ", "no_such_config"]),
        ({"num_processes": "two"}, ["launcher option", "--num_processes", "invalid int value: 'two'"]),
    ],
)
def test_bad_launcher_value_is_one_line_before_launching(
    tmp_path, tiny_model_dir, tiny_data, capsys, launcher, fragments
):
    path = _launcher_yaml(tmp_path, tiny_model_dir, tiny_data, **launcher)
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--config", str(path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("trl-entropy grpo: error: ") and not any("Traceback" in line for line in lines)
    assert all(fragment in lines[-1] for fragment in fragments), lines[-1]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_launcher_keys_train_as_with_trl_grpo(tmp_path, tiny_model_dir, tiny_data):
    """`trl grpo --config r.yaml` and `trl-entropy grpo --config r.yaml`, with `accelerate_config: multi_gpu` and
    `num_processes: 1` in r.yaml, both train under `accelerate launch` and save the model (subprocesses)."""
    path = _launcher_yaml(tmp_path, tiny_model_dir, tiny_data, accelerate_config="multi_gpu", num_processes=1)
    trl = Path(sys.executable).with_name("trl")
    runs = {
        "trl": [str(trl), "grpo"],
        "trl-entropy": [sys.executable, "-m", "trl_entropy.cli", "grpo"],
    }
    for name, program in runs.items():
        done = _run([*program, "--config", str(path), "--output_dir", str(tmp_path / name)], tmp_path)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        assert (tmp_path / name / "model.safetensors").is_file(), name


def test_launched_run_returns_the_processs_error(tmp_path, tiny_model_dir):
    """A data error in the launched process: its one-line error, and its exit status 2 from `trl-entropy`."""
    path = _launcher_yaml(tmp_path, tiny_model_dir, "", num_processes=1, datasets=[])
    config = {**yaml.safe_load(path.read_text()), "dataset_name": str(tmp_path / "missing.jsonl")}
    path.write_text(yaml.safe_dump(config))
    done = _run([sys.executable, "-m", "trl_entropy.cli", "grpo", "--config", str(path)], tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "missing.jsonl" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
