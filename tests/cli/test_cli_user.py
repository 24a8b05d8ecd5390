"""The ``trl-entropy`` command line as a TRL user meets it (issue 18): a ``trl grpo`` YAML runs unchanged, bad data and
bad options fail in one line before any model loads, model cards name the base model and the entropy method.

A model path that does not exist (``MISSING_MODEL``) shows that an error was raised before the model was loaded: a
check that ran after loading would fail on the model instead.
"""

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from trl_entropy.cli import main, make_parser
from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts

MISSING_MODEL = "/nonexistent/model-folder"


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tmp_path_factory):
    """A tiny sequence-classification reward model, loaded by TRL from a folder as `reward_model_name_or_path`."""
    from transformers import LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-reward-model")
    model, tokenizer = make_tiny_model_and_tokenizer(seed=1)
    config = model.config
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(argv, capsys):
    """``(exit status, stderr lines)`` of ``trl-entropy argv`` run in-process."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err.strip().splitlines()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _one_line_error(status, lines, *fragments):
    """Exit status 2 and one error line (progress bars of `datasets` aside): no traceback, no usage dump."""
    assert status == 2, lines
    assert not any(line.startswith(("Traceback", "usage:")) for line in lines), lines
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


# ---------------------------------------------------------------------------------------------------------------------
# Data checked before the model loads
# ---------------------------------------------------------------------------------------------------------------------


def test_dataset_without_prompt_column_is_refused_before_the_model_loads(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "questions.jsonl", [{"question": "what is 1 + 2 ?", "answer": "3"}] * 4)
    argv = ["grpo", "--dataset_name", data, "--entropy_reward", "token", "--model_name_or_path", MISSING_MODEL]
    status, lines = _run([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    _one_line_error(status, lines, "'prompt'", "questions.jsonl", "question, answer", "rename")


def test_empty_jsonl_is_refused_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    argv = ["rloo", "--dataset_name", str(data), "--entropy_reward", "token", "--model_name_or_path", MISSING_MODEL]
    status, lines = _run([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    _one_line_error(status, lines, "empty.jsonl", "empty", "prompt")


@pytest.mark.parametrize("reward, column", [("accuracy", "'answer'"), ("accuracy_reward", "'solution'")])
def test_reward_without_its_column_is_refused_before_the_model_loads(tmp_path, capsys, reward, column):
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in tiny_prompts(4)]
    data = _write_jsonl(tmp_path / "prompts.jsonl", rows)
    argv = ["grpo", "--dataset_name", data, "--reward_funcs", reward, "--model_name_or_path", MISSING_MODEL]
    status, lines = _run([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    _one_line_error(status, lines, "reward_funcs", reward, column, "prompts.jsonl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitsandbytes quantisation runs on a CUDA machine")
@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantisation_flags_are_refused_on_a_machine_without_cuda(tmp_path, capsys, flag):
    argv = ["grpo", flag, "--entropy_reward", "token", "--model_name_or_path", MISSING_MODEL]
    status, lines = _run([*argv, "--output_dir", str(tmp_path)], capsys)
    _one_line_error(status, lines, flag.lstrip("-"), "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantisation_flag_reaches_the_model_as_trl_grpo_passes_it(tmp_path):
    """On CUDA, `--load_in_4bit` becomes TRL's own BitsAndBytesConfig in `model_init_kwargs` (TRL's
    `get_quantization_config`), which GRPOTrainer uses for the policy and the reference model."""
    pytest.importorskip("bitsandbytes")
    from trl import get_quantization_config

    from trl_entropy.cli import make_parser, prepare_training

    argv = ["--load_in_4bit", "--entropy_reward", "token", "--output_dir", str(tmp_path), "--num_train_prompts", "4"]
    script_args, training_args, model_args, dataset_args, _ = make_parser("grpo").parse_args_and_config(argv)
    job = prepare_training("grpo", script_args, training_args, model_args, dataset_args)
    expected = get_quantization_config(model_args).to_dict()
    assert job.training_args.model_init_kwargs["quantization_config"].to_dict() == expected


def test_trl_chat_reward_with_plain_text_prompts_is_refused_before_the_model_loads(tmp_path, capsys):
    rows = [{"prompt": p, "solution": "7"} for p in tiny_prompts(4)]
    data = _write_jsonl(tmp_path / "prompts.jsonl", rows)
    argv = ["grpo", "--dataset_name", data, "--reward_funcs", "accuracy_reward", "--model_name_or_path", MISSING_MODEL]
    status, lines = _run([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    _one_line_error(status, lines, "accuracy_reward", "chat completions", "plain-text", '"role": "user"')


# ---------------------------------------------------------------------------------------------------------------------
# A `trl grpo` YAML runs unchanged; model cards
# ---------------------------------------------------------------------------------------------------------------------


def test_a_trl_grpo_yaml_runs_unchanged(tmp_path, capsys, tiny_model_dir, tiny_reward_model_dir):
    """A config in TRL's documented format (`datasets` mixture, TRL's reward names, a reward model) trains, saves the
    model and writes a model card, exactly as `trl grpo --config` would take it."""
    rows = [{"prompt": [{"role": "user", "content": p}], "solution": str(i)} for i, p in enumerate(tiny_prompts(8))]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    output_dir = tmp_path / "run"
    config = {
        "model_name_or_path": tiny_model_dir,
        "datasets": [{"path": "json", "data_files": data, "split": "train"}],
        "reward_model_name_or_path": tiny_reward_model_dir,
        "reward_funcs": ["accuracy_reward", "think_format_reward"],
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
        "learning_rate": 1.0e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    status, lines = _run(["grpo", "--config", str(path)], capsys)
    assert status == 0, lines
    assert (output_dir / "model.safetensors").is_file()
    card = (output_dir / "README.md").read_text()
    assert "trl-entropy" in card and "[None]" not in card
    assert f"the local model `{tiny_model_dir}`" in card
    assert f'model="{output_dir}"' in card and 'model="None"' not in card


def test_model_card_names_base_model_method_settings_and_papers(tmp_path, capsys, tiny_model_dir):
    argv = ["grpo", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--num_train_prompts", "8"]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2"]
    argv += ["--max_completion_length", "8", "--save_strategy", "no", "--report_to", "none"]
    argv += ["--entropy_reward", "token", "--forking_token_ratio", "0.5", "--entropy_stats", "false"]
    status, lines = _run(argv, capsys)
    assert status == 0, lines
    card = (tmp_path / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert {"trl", "grpo", "trl-entropy", "forking-tokens"} <= set(header["tags"])
    assert "GRPO with EM-RL with the `token` entropy reward and forking tokens" in card
    for setting in ("| `entropy_reward` | `token` |", "| `forking_token_ratio` | `0.5` |", "| `beta` |"):
        assert setting in card
    for bibtex in ("@article{agarwal2025unreasonable", "@article{wang2025beyond", "@article{shao2024deepseekmath"):
        assert bibtex in card
    assert "https://huggingface.co/papers/2505.15134" in card


@pytest.mark.parametrize(
    "command, extra, method, bibtex",
    [
        (
            "rloo",
            ["--entropy_reward", "trajectory"],
            "RLOO with EM-RL with the `trajectory` entropy reward",
            "ahmadian",
        ),
        ("emft", [], "EM-FT (entropy minimisation on the model's own samples)", "agarwal2025unreasonable"),
    ],
)
def test_rloo_and_emft_model_cards_name_their_method(tmp_path, capsys, tiny_model_dir, command, extra, method, bibtex):
    argv = [command, "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--num_train_prompts", "8"]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--max_completion_length", "8"]
    argv += ["--save_strategy", "no", "--report_to", "none", "--entropy_stats", "false", *extra]
    argv += ["--num_generations", "2"] if command == "rloo" else []
    status, lines = _run(argv, capsys)
    assert status == 0, lines
    card = (tmp_path / "README.md").read_text()
    assert "trl-entropy" in yaml.safe_load(card.split("---")[1])["tags"]
    assert method in card and bibtex in card and "[None]" not in card
    assert card.count("@article{agarwal2025unreasonable") == 1  # the EM paper once, whoever cites it


def test_model_card_base_model_of_the_embedded_model_is_its_hub_id(tmp_path):
    """The embedded SmolLM2 loads from a converted local folder; TRL's card would read "[None]" for it."""
    from types import SimpleNamespace

    from trl_entropy.models import cache_dir
    from trl_entropy.trainers._model_card import base_model_id

    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if not folder.is_dir():
        pytest.skip("the embedded model has not been converted on this machine")
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path=str(folder)))
    assert base_model_id(model) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id(SimpleNamespace(config=SimpleNamespace(_name_or_path="org/model"))) == "org/model"
    assert base_model_id(SimpleNamespace(config=SimpleNamespace(_name_or_path=str(tmp_path)))) is None


def test_model_card_base_model_of_a_hub_cache_snapshot_is_its_hub_id(tmp_path):
    """A folder of the Hub's download cache (`snapshot_download`'s layout) names its model; another local folder is
    not a Hub id, which the Hub refuses in `base_model`."""
    from types import SimpleNamespace

    from huggingface_hub.file_download import repo_folder_name

    from trl_entropy.trainers._model_card import base_model_id

    snapshot = tmp_path / repo_folder_name(repo_id="org-name/Model-1.5B", repo_type="model") / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_model_id(SimpleNamespace(config=SimpleNamespace(_name_or_path=str(snapshot)))) == "org-name/Model-1.5B"
    assert base_model_id(SimpleNamespace(config=SimpleNamespace(_name_or_path=str(snapshot.parent)))) is None


def _tiny_trainer_card(model_dir, output_dir, hub_model_id=None):
    """The card an EntropyGRPOTrainer on ``model_dir`` writes (no training: the card needs none)."""
    from datasets import Dataset

    from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

    args = EntropyGRPOConfig(
        output_dir=str(output_dir),
        entropy_reward="token",
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=4,
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    trainer = EntropyGRPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))
    trainer.hub_model_id = hub_model_id  # what `push_to_hub` sets (Trainer.init_hf_repo), offline
    trainer.create_model_card()
    card = (output_dir / "README.md").read_text()
    return yaml.safe_load(card.split("---")[1]), card


def test_model_card_of_a_local_model_not_on_the_hub(tmp_path, tiny_model_dir):
    """TRL's card read `pipeline(model="None")` for a model not pushed to the Hub; this one loads the output folder,
    names the local base model (not in `base_model`, which the Hub accepts for Hub ids only) and states the method
    once (the method section lists the settings; the citation heading names it as TRL's does)."""
    header, card = _tiny_trainer_card(tiny_model_dir, tmp_path / "out")
    assert 'model="None"' not in card and f'pipeline("text-generation", model="{tmp_path / "out"}"' in card
    assert f"load it from the folder it was saved to, `{tmp_path / 'out'}`" in card
    assert "base_model" not in header and f"fine-tuned version of the local model `{tiny_model_dir}`" in card
    method = "EM-RL with the `token` entropy reward"
    assert card.count(f"This model was trained with GRPO with {method}") == 1
    assert card.count(method) == 2  # the training sentence and TRL's "Cite ... as:" heading, no third time
    assert "Trained with trl-entropy's `EntropyGRPOTrainer`, with these settings:" in card


def test_model_card_of_a_pushed_model_from_a_hub_snapshot(tmp_path, tiny_model_dir):
    import shutil

    from huggingface_hub.file_download import repo_folder_name

    snapshot = tmp_path / repo_folder_name(repo_id="org/tiny-base", repo_type="model") / "snapshots" / "0123abc"
    shutil.copytree(tiny_model_dir, snapshot)
    header, card = _tiny_trainer_card(str(snapshot), tmp_path / "out", hub_model_id="user/tiny-em-rl")
    assert header["base_model"] == "org/tiny-base"
    assert "fine-tuned version of [org/tiny-base](https://huggingface.co/org/tiny-base)" in card
    assert 'pipeline("text-generation", model="user/tiny-em-rl"' in card and "not on the Hub" not in card


# ---------------------------------------------------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["grpo", "--forking_token_ratio", "1.5"], ["forking_token_ratio", "(0, 1]", "1.5"]),
        (["grpo", "--entropy_reward", "bogus"], ["--entropy_reward", "'bogus'", "'token'", "choose from"]),
        (["grpo", "--learning_rate", "fast"], ["--learning_rate", "'fast'", "invalid float"]),
        (["grpo", "--reward_funcs", "nonsense"], ["reward_funcs", "'nonsense'", "accuracy_reward"]),
        (["emft", "--reward_funcs", "accuracy"], ["reward_funcs", "emft"]),
        (["calibrate", "--num_problems", "3"], ["num_problems", ">= 4", "3"]),
        (["calibrate", "--num_examples", "8"], ["--num_examples", "--num_problems"]),
        (["generate", "--output_path", "x.jsonl"], ["--output_path", "--output_file"]),
        (["generate", "--num_problems", "0"], ["num_problems", ">= 1", "0"]),
    ],
)
def test_errors_are_one_line_with_parameter_range_and_value(tmp_path, capsys, argv, fragments):
    extra = ["--output_dir", str(tmp_path)] if argv[0] in ("grpo", "emft") else []
    status, lines = _run([*argv, *extra, "--model_name_or_path", MISSING_MODEL], capsys)
    _one_line_error(status, lines, f"trl-entropy {argv[0]}: error:", *fragments)


def test_unknown_key_in_a_yaml_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"entropy_reward": "token", "learning_rat": 1e-6, "output_dir": str(tmp_path)}))
    status, lines = _run(["grpo", "--config", str(path)], capsys)
    _one_line_error(status, lines, "config file", "--learning_rat")


@pytest.mark.parametrize("case", ["no_prompt_column", "bad_option"])
def test_a_bad_input_error_is_alone_on_stderr(tmp_path, case):
    """The installed script, as a user runs it: exactly one line on stderr. The code before this test printed
    transformers' `gradient_checkpointing` FutureWarning (TRL's configs default the deprecated name) and a `datasets`
    progress bar before the error: 6 lines."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("PYTHONWARNINGS", None)
    data = _write_jsonl(tmp_path / "questions.jsonl", [{"question": "what is 1 + 2 ?", "answer": "3"}] * 4)
    argv = [sys.executable, "-m", "trl_entropy.cli", "grpo", "--output_dir", str(tmp_path / "out")]
    argv += ["--dataset_name", data] if case == "no_prompt_column" else ["--forking_token_ratio", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("trl-entropy grpo: error: ")


def test_no_deprecated_transformers_name_reaches_a_config(tmp_path):
    """`trl-entropy grpo` builds its config under transformers' current name (`activation_checkpointing`), keeping
    TRL's default and reading a command line or YAML that uses the old name."""
    import warnings

    from trl_entropy.cli.main import _parse

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = _parse("grpo", ["--output_dir", str(tmp_path)])[1]
        assert config.activation_checkpointing is True  # TRL's GRPO default
        config = _parse("grpo", ["--output_dir", str(tmp_path), "--gradient_checkpointing", "false"])[1]
        assert config.activation_checkpointing is False and config.gradient_checkpointing is False
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"gradient_checkpointing": False, "output_dir": str(tmp_path)}))
        assert _parse("grpo", ["--config", str(path)])[1].activation_checkpointing is False


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The installed `trl-entropy` script, as a user runs it in a shell."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [
        sys.executable,
        "-m",
        "trl_entropy.cli",
        "grpo",
        "--forking_token_ratio",
        "2",
        "--output_dir",
        str(tmp_path),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "Warning" not in line and line.strip()]
    assert errors[-1].startswith("trl-entropy grpo: error: `forking_token_ratio`")
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr


# ---------------------------------------------------------------------------------------------------------------------
# plot, calibrate
# ---------------------------------------------------------------------------------------------------------------------


def test_plot_refuses_a_jsonl_of_another_schema(tmp_path, capsys):
    log = _write_jsonl(tmp_path / "trainer_log.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 4)])
    status, lines = _run(["plot", "--stats_file", log, "--output_dir", str(tmp_path / "plots")], capsys)
    _one_line_error(status, lines, "trainer_log.jsonl", "EntropyStatsCallback", "'histogram'")
    assert not list((tmp_path / "plots").glob("*.png")) if (tmp_path / "plots").exists() else True


def test_calibrate_keeps_the_measurements_and_says_what_to_change(tmp_path, capsys, tiny_model_dir):
    """The tiny random model answers nothing right: the fit fails after generation, the per-problem measurements are
    on disk, and the message says what to change."""
    output = tmp_path / "calibration.json"
    argv = ["calibrate", "--model_name_or_path", tiny_model_dir, "--num_problems", "4", "--output_file", str(output)]
    argv += ["--max_step_tokens", "4", "--max_new_tokens", "6", "--min_step_tokens", "1"]
    status, lines = _run(argv, capsys)
    errors = [line for line in lines if ": error: " in line]
    assert status == 1 and len(errors) == 1 and not any(line.startswith("Traceback") for line in lines), lines
    assert "at least 2 correct" in errors[0] and "0 of 4 correct" in errors[0]
    assert "--max_new_tokens" in errors[0] and "--model_name_or_path" in errors[0]
    rows = [json.loads(line) for line in (tmp_path / "calibration.problems.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any(r["correct"] for r in rows)
    assert all(set(r) >= {"prompt", "answer", "correct", "step_signal", "first_step_tokens"} for r in rows)
    assert not output.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Docs: the commands they show parse; notebooks are linked; no machine path
# ---------------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = sorted(
    [ROOT / "README.md", ROOT / "examples" / "README.md"]
    + list((ROOT / "docs").rglob("*.md"))
    + list((ROOT / "examples").glob("*.py"))
    + list((ROOT / "examples" / "accelerate").glob("*.yaml"))
)
_COMMAND = re.compile(r"^(?:trl-entropy|accelerate launch .*-m trl_entropy\.cli) (\w+)\b(.*)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def _code(path: Path) -> str:
    """The code a reader copies from ``path``: its fenced blocks for Markdown, the whole file otherwise."""
    text = path.read_text(encoding="utf-8")
    return "\n".join(_FENCE.findall(text)) if path.suffix == ".md" else text


def _documented_commands():
    """``(file, command, options)`` of every command line in a code block of the docs, a docstring of an example or
    a comment of an accelerate config."""
    for path in DOC_FILES:
        text = re.sub(r"\\\n#?\s*", " ", _code(path))  # join continuation lines (also inside YAML comments)
        for line in text.splitlines():
            match = _COMMAND.match(line.strip().lstrip("#").strip())
            if match:
                yield str(path.relative_to(ROOT)), match.group(1), match.group(2).split(" #")[0]


@pytest.mark.parametrize("where, command, rest", list(_documented_commands()))
def test_every_documented_command_line_parses(tmp_path, monkeypatch, where, command, rest):
    """Each `trl-entropy ...` line of the README, docs, example docstrings and accelerate configs is accepted as it is
    written (files it names are created empty: parsing does not read them)."""
    argv = shlex.split(rest)
    if any(token.startswith("[") or token.isupper() for token in argv) or "--config" in argv:
        pytest.skip("a usage synopsis or a config file, not a command to copy")
    monkeypatch.chdir(tmp_path)
    for token in argv:
        if token.endswith((".jsonl", ".json")) and "/" not in token:
            (tmp_path / token).write_text('{"prompt": "p"}\n')
    if command == "plot":  # the folder of a training run
        (tmp_path / argv[argv.index("--stats_file") + 1]).mkdir()
        (tmp_path / argv[argv.index("--stats_file") + 1] / "entropy_stats.jsonl").write_text("")
    make_parser(command, argv).parse_args_and_config(argv)


def test_docs_show_no_bare_precision_flag_and_no_required_cpu_flags():
    for path in DOC_FILES:
        assert not re.search(r"--(bf16|fp16|tf32)(?! (true|false))(?=[\s`\\]|$)", _code(path), re.M), path
        assert "--use_cpu --bf16 false" not in path.read_text(encoding="utf-8"), path


def test_readme_and_docs_link_the_notebooks():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    docs = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")
    for notebook in sorted((ROOT / "examples" / "notebooks").glob("*.ipynb")):
        assert f"(examples/notebooks/{notebook.name})" in readme
        assert f"(notebooks/{notebook.name})" in docs
        assert (ROOT / "docs" / "notebooks" / notebook.name).resolve() == notebook.resolve()
    assert "examples.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def test_benchmarks_page_shows_no_absolute_path():
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp|Users)/", page)
