"""The ``trl-entropy`` command line: every option in ``--help``, YAML configs, and real (tiny) runs of the commands."""

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from safetensors.torch import load_file

import trl_entropy.cli.arguments as cli_arguments
from trl_entropy.cli import EntropyModelConfig, TrainScriptArguments, main, make_parser

COMMANDS = ("grpo", "rloo", "emft", "generate", "calibrate", "plot", "diagnose", "demo", "env")
ROOT = Path(__file__).resolve().parents[2]


def _help_text(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


COMMAND_ARGUMENTS = {
    "grpo": "TrainScriptArguments",
    "rloo": "TrainScriptArguments",
    "emft": "TrainScriptArguments",
    "generate": "GenerateArguments",
    "generate --early_stopping": "EarlyStopGenerateArguments",
    "calibrate": "CalibrateArguments",
    "plot": "PlotArguments",
    "demo": "DemoArguments",
}


def _dataclass_types(command, argv=()):
    """The dataclasses a command's parser was built from (read back from the parser itself)."""
    return make_parser(command, argv).dataclass_types


def test_top_level_help_lists_every_command(capsys):
    text = _help_text(capsys, [])
    for command in COMMANDS:
        assert command in text


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2
    assert "nonsense" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["grpo"], ["rloo"], ["emft"], ["generate"], ["generate", "--early_stopping"], ["calibrate"], ["plot"], ["demo"]],
)
def test_help_lists_every_option(capsys, argv):
    """Every field of every dataclass behind the command appears as a --flag in its help."""
    text = _help_text(capsys, argv)
    types = _dataclass_types(argv[0], argv[1:])
    # the command's own options class (cli/arguments.py, named independently of the registry) is among them
    assert getattr(cli_arguments, COMMAND_ARGUMENTS[" ".join(argv)]) in types
    names = [f.name for cls in types for f in dataclasses.fields(cls) if f.init]
    missing = [name for name in names if f"--{name}" not in text]
    assert not missing, f"options missing from `trl-entropy {' '.join(argv)} --help`: {missing}"


@pytest.mark.parametrize(
    "argv, options",
    [
        (
            ["grpo"],
            ["--entropy_reward", "--entropy_reward_weight", "--forking_token_ratio", "--forking_token_mode"],
        ),
        (["rloo"], ["--entropy_reward", "--forking_token_ratio", "--forking_token_scope"]),
        (["emft"], ["--entropy_floor", "--entropy_normalization", "--num_samples_per_prompt"]),
        (["generate"], ["--em_inf", "--em_inf_threshold", "--em_inf_steps", "--adaptive_temperature"]),
        (["generate", "--early_stopping"], ["--calibration_path", "--threshold", "--signal_kind"]),
        (["calibrate"], ["--signal_kind", "--top_k", "--method"]),
        (["demo"], ["--entropy_reward", "--temperature", "--quick", "--task"]),
    ],
)
def test_help_shows_the_entropy_options(capsys, argv, options):
    text = _help_text(capsys, argv)
    for option in options:
        assert option in text


def test_training_commands_share_model_and_data_options():
    for command in ("grpo", "rloo", "emft"):
        types = _dataclass_types(command)
        assert TrainScriptArguments in types and EntropyModelConfig in types
    script_args, _, model_args, *_ = make_parser("grpo").parse_args_and_config(["--output_dir", "unused"])
    assert model_args.model_name_or_path == "smollm2"
    assert script_args.dataset_name == "arithmetic"


def test_yaml_config_round_trip(tmp_path, monkeypatch):
    """Values from a YAML file reach the dataclasses; the command line overrides the file; `env` is exported."""
    monkeypatch.delenv("TRL_ENTROPY_CLI_TEST", raising=False)
    settings = {
        "entropy_reward": "trajectory",
        "entropy_reward_weight": 0.5,
        "forking_token_ratio": 0.3,
        "forking_token_scope": "local",
        "learning_rate": 3.0e-6,
        "num_generations": 4,
        "num_train_prompts": 12,
        "reward_funcs": ["accuracy"],
        "model_name_or_path": "some/model",
        "use_peft": True,
        "lora_r": 8,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**settings, "env": {"TRL_ENTROPY_CLI_TEST": "from-yaml"}}))
    parsed = make_parser("grpo").parse_args_and_config(
        ["--config", str(path), "--output_dir", str(tmp_path), "--lora_r", "4"]
    )
    values = {f.name: getattr(obj, f.name) for obj in parsed for f in dataclasses.fields(obj) if f.init}
    for key, value in settings.items():
        expected = 4 if key == "lora_r" else value
        assert values[key] == expected, key
    assert os.environ["TRL_ENTROPY_CLI_TEST"] == "from-yaml"

    # Round trip: the parsed values, written back to YAML and parsed again, give the same configuration.
    again_path = tmp_path / "again.yaml"
    again_path.write_text(yaml.safe_dump({k: values[k] for k in [*settings, "output_dir"]}))
    again = make_parser("grpo").parse_args_and_config(["--config", str(again_path)])
    again_values = {f.name: getattr(obj, f.name) for obj in again for f in dataclasses.fields(obj) if f.init}
    for key in [*settings, "output_dir"]:
        assert again_values[key] == values[key], key


def test_yaml_config_selects_the_early_stopping_pipeline(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"early_stopping": True, "threshold": 1.5}))
    parser = make_parser("generate", ["--config", str(path)])
    names = {f.name for cls in parser.dataclass_types for f in dataclasses.fields(cls)}
    assert {"calibration_path", "threshold"} <= names
    assert "em_inf" not in names


def test_bad_values_are_reported_with_the_parameter_name(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse rejects a value outside the field's choices
        main(["grpo", "--entropy_reward", "bogus", "--output_dir", str(tmp_path)])
    assert "entropy_reward" in capsys.readouterr().err
    with pytest.raises(ValueError, match="forking_token_ratio"):
        make_parser("grpo").parse_args_and_config(["--forking_token_ratio", "1.5", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="num_train_prompts"):
        make_parser("grpo").parse_args_and_config(["--num_train_prompts", "0", "--output_dir", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["emft", "--reward_funcs", "accuracy", "--output_dir", str(tmp_path), "--max_steps", "1"])
    assert exit_info.value.code == 2 and "reward_funcs" in capsys.readouterr().err


def _tiny_training_argv(command, model_dir, output_dir, *extra):
    argv = [
        command,
        "--model_name_or_path",
        model_dir,
        "--output_dir",
        str(output_dir),
        "--num_train_prompts",
        "8",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "8",
        "--learning_rate",
        "1e-2",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        "0",
    ]
    return argv + list(extra)


@pytest.mark.parametrize(
    "command, extra",
    [
        ("grpo", ["--entropy_reward", "token", "--num_generations", "2"]),
        ("rloo", ["--entropy_reward", "trajectory", "--num_generations", "2"]),
        ("emft", []),
    ],
)
def test_tiny_training_run_through_the_cli(tiny_model_dir, tmp_path, command, extra):
    output_dir = tmp_path / command
    assert main(_tiny_training_argv(command, tiny_model_dir, output_dir, *extra)) == 0

    # The trained model is saved and its weights moved away from the initial ones.
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    trained = load_file(output_dir / "model.safetensors")
    assert initial.keys() == trained.keys()
    assert any(not trained[name].equal(initial[name]) for name in initial)

    # EntropyStatsCallback was attached: one JSONL record per logging step, each with the trainer's metric.
    records = [json.loads(line) for line in (output_dir / "entropy_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["num_tokens"] > 0 and r["min"] <= r["metrics"]["sampling_entropy/mean"] <= r["max"] for r in records)


def test_cli_without_entropy_stats_writes_no_jsonl(tiny_model_dir, tmp_path):
    argv = _tiny_training_argv("grpo", tiny_model_dir, tmp_path, "--entropy_reward", "token", "--num_generations", "2")
    assert main([*argv, "--entropy_stats", "false", "--max_steps", "1"]) == 0
    assert not (tmp_path / "entropy_stats.jsonl").exists()
    assert (tmp_path / "model.safetensors").is_file()


def test_plot_command_draws_pngs_from_a_training_run(tiny_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = _tiny_training_argv("grpo", tiny_model_dir, run_dir, "--entropy_reward", "token", "--num_generations", "2")
    main(argv)
    capsys.readouterr()
    plot_dir = tmp_path / "plots"
    assert main(["plot", "--stats_file", str(run_dir), "--output_dir", str(plot_dir)]) == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted(plot_dir.glob("*.png"))
    assert pngs and sorted(map(str, pngs)) == sorted(printed)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_command_with_em_inf(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    argv = ["generate", "--model_name_or_path", tiny_model_dir, "--num_problems", "3", "--max_new_tokens", "4"]
    assert main([*argv, "--em_inf", "--output_file", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    assert summary["num_problems"] == 3 and "arguments" not in summary
    saved = json.loads(output.with_suffix(".summary.json").read_text())
    assert saved["num_problems"] == 3 and saved["arguments"]["em_inf"] is True
    assert saved["em_inf_stats"]["rows"] > 0


def test_generate_command_with_early_stopping(tiny_model_dir, tmp_path):
    output = tmp_path / "early.json"
    argv = ["generate", "--early_stopping", "--model_name_or_path", tiny_model_dir, "--num_problems", "2"]
    argv += ["--threshold", "100.0", "--max_step_tokens", "4", "--max_new_tokens", "8", "--max_answer_tokens", "2"]
    assert main([*argv, "--output_file", str(output)]) == 0
    payload = json.loads(output.read_text())
    # A threshold above any entropy makes every first step confident: nothing goes on to extended reasoning.
    results = payload["results"]
    assert len(results) == 2
    assert all(r["outcome"] in ("answered_early", "ended_in_first_step") for r in results)
    answered = sum(r["outcome"] == "answered_early" for r in results) / 2
    assert payload["metrics"]["early_stopping"]["answered_early"] == answered


# ---------------------------------------------------------------------------------------------------------------------
# `trl-entropy env`, a fast `--help`, help texts, and the line naming the demo defaults (issue 29)
# ---------------------------------------------------------------------------------------------------------------------


def _report_lines(capsys, argv=("env",)):
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()


def _value(lines, label):
    """The value of the report line ``- <label>: <value>`` (exactly one such line)."""
    found = [line.split(": ", 1)[1] for line in lines if line.startswith(f"- {label}: ")]
    assert len(found) == 1, (label, lines)
    return found[0]


def _installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def test_env_reports_the_installed_versions_cpu_and_default_dtype(capsys, tmp_path):
    lines = _report_lines(capsys)
    assert lines[0] == "Copy-paste the following information when reporting an issue:"
    # Versions, as the installed distributions give them (TRL's own report for TRL's packages).
    assert _value(lines, "trl-entropy version").split("+")[0] == _installed("trl-entropy")
    for label, package in [
        ("TRL version", "trl"),
        ("PyTorch version", "torch"),
        ("Transformers version", "transformers"),
        ("Accelerate version", "accelerate"),
        ("Datasets version", "datasets"),
        ("PEFT version", "peft"),
        ("DeepSpeed version", "deepspeed"),
        ("vLLM version", "vllm"),
        ("matplotlib version", "matplotlib"),
    ]:
        assert _value(lines, label).split("+")[0] == _installed(package).split("+")[0], label
    # TRL support: the range pyproject.toml pins, and whether the installed TRL is in it.
    pinned = next(
        Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )
    assert pinned.name == "trl"
    support = _value(lines, "TRL supported by trl-entropy")
    assert set(support.split(";")[0].split(",")) == {str(s) for s in pinned.specifier}
    in_range = pinned.specifier.contains(_installed("trl"), prereleases=True)
    assert support.endswith(f"installed TRL {_installed('trl')}: {'supported' if in_range else 'NOT supported'}")
    trainers = _value(lines, "trl_entropy.trainers")
    assert trainers == "imports" if in_range else trainers.startswith("does not import")
    # The machine: the CPU's name from /proc/cpuinfo, oneDNN's bf16 test, and the dtype `trl-entropy grpo` defaults to.
    if Path("/proc/cpuinfo").is_file():
        model_names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        if model_names:
            assert _value(lines, "CPU").startswith(model_names[0].split(":", 1)[1].strip() + " (")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert _value(lines, "CPU native bf16").startswith("yes" if native else "no")
    training_args = make_parser("grpo").parse_args_and_config(["--output_dir", str(tmp_path)])[1]
    dtype = "bfloat16" if training_args.bf16 else "float32"
    assert _value(lines, "Default training dtype of trl-entropy grpo|rloo|emft here").startswith(dtype + " ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dtype default on a GPU does not depend on the CPU")
def test_env_on_a_cpu_without_native_bf16_reports_float32():
    """The AVX2-only emulation of HELPERS.md: oneDNN reports no native bf16, and the CLI then trains in float32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run(
        [sys.executable, "-m", "trl_entropy.cli", "env"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert _value(lines, "CPU native bf16").startswith("no (torch CPU capability: AVX2)")
    assert _value(lines, "Default training dtype of trl-entropy grpo|rloo|emft here").startswith("float32 on the CPU")
    assert _value(lines, "CPU kernel overrides") == "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"


def test_env_without_trls_report_still_lists_the_versions(capsys, monkeypatch):
    """Where TRL's `print_env` can not run (another TRL release), the versions come from the distributions."""
    monkeypatch.setitem(sys.modules, "trl.scripts.env", None)  # blocks the import, as a TRL without it would
    lines = _report_lines(capsys)
    assert any(line.startswith("- TRL's `trl env` report failed (ModuleNotFoundError") for line in lines)
    for package in ("trl", "torch", "transformers", "accelerate", "datasets", "peft", "deepspeed", "vllm"):
        assert _value(lines, f"{package} version") == _installed(package), package


def test_env_refuses_options_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["env", "--verbose"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err == [
        "trl-entropy env: error: unknown option(s) in the command line: --verbose; see `trl-entropy env --help`"
    ]


def test_top_level_help_imports_neither_torch_nor_transformers():
    """What keeps `trl-entropy --help` as fast as `trl --help` (timed in benchmarks/bench_cli_help.py)."""
    code = (
        "import sys\n"
        "from trl_entropy.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl.trainer') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "env" in result.stdout and "grpo" in result.stdout  # the help itself was printed
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _option_help(text, option):
    """The help paragraph of ``option`` in an argparse help text, on one line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{option} "))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if line.startswith("  -") or not line.startswith(" "):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize(
    "argv, option",
    [
        (["plot"], "--output_dir"),
        (["generate"], "--summary_file"),
        (["diagnose"], "--answer_column"),
        (["grpo"], "--dataset_name"),
        (["grpo"], "--num_train_prompts"),
    ],
)
def test_help_names_each_default_once(capsys, argv, option):
    assert _option_help(_help_text(capsys, argv), option).count("default:") == 1


def test_grpo_help_marks_the_options_of_the_builtin_task(capsys):
    text = _help_text(capsys, ["grpo"])
    for option in ("--num_train_prompts", "--prompt_style"):
        assert "Built-in tasks only (ignored for other data)" in _option_help(text, option), option


def test_training_on_the_demo_defaults_says_so_before_anything_else(capsys, tmp_path):
    """No --model_name_or_path and no --dataset_name: one line at start names the embedded model and the built-in
    task; a reward that can not be imported then fails the run before any model loads."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--output_dir", str(tmp_path), "--reward_funcs", "no_such_module.reward"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "no_such_module.reward" in captured.err
    assert captured.out.strip().splitlines() == [
        "Training the embedded SmolLM2-135M-Instruct (--model_name_or_path smollm2, the default) on the built-in "
        "arithmetic task (--dataset_name arithmetic, the default): trl-entropy's demo defaults, where `trl grpo` "
        "requires both options; see `trl-entropy grpo --help`."
    ]


@pytest.mark.parametrize(
    "argv, names",
    [
        ([], ["smollm2", "arithmetic"]),
        (["--model_name_or_path", "org/model"], ["arithmetic"]),
        (["--dataset_name", "data.jsonl"], ["smollm2"]),
        (["--model_name_or_path", "org/model", "--datasets", '{"path": "json"}'], []),
        (["--model_name_or_path", "org/model", "--dataset_name", "data.jsonl"], []),
    ],
)
def test_the_demo_defaults_line_names_exactly_the_defaults_in_use(tmp_path, argv, names):
    from trl_entropy.cli.train import default_choices_line

    script_args, _, model_args, dataset_args, *_ = make_parser("emft").parse_args_and_config(
        ["--output_dir", str(tmp_path), *argv]
    )
    line = default_choices_line("emft", script_args, model_args, dataset_args)
    if not names:
        assert line is None
        return
    assert line.startswith("Training") and line.endswith("see `trl-entropy emft --help`.")
    assert ("--model_name_or_path smollm2, the default" in line) == ("smollm2" in names)
    assert ("--dataset_name arithmetic, the default" in line) == ("arithmetic" in names)
    assert ("both options" in line) == (len(names) == 2)


def test_reward_registry_offers_the_label_free_rewards_by_name():
    import torch

    from trl_entropy.cli.train import reward_registry

    registry = reward_registry()
    entropy = [torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5, 2.0])]
    mask = [torch.tensor([True, True]), torch.tensor([True, True, False])]
    # Minus the mean entropy over the tokens the mask keeps, worked out by hand.
    assert registry["entropy_token_reward"](["a", "b"], token_entropy=entropy, token_mask=mask) == [-2.0, -0.5]
    # One group of four: the answer 12 has the majority (the number each completion ends with).
    texts = ["so 7 + 5 = 12", "It is 12.", "7 + 5 = 13", "twelve"]
    assert registry["majority_vote_reward"](texts, prompts=["q"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert registry["answer_accuracy"] is registry["accuracy"]
