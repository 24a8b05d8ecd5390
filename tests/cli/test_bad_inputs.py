"""Bad input and faults (issue 27, items 3 and 4): every case is one stderr line that names the option or file, what is
allowed and what was given, with a non-zero exit status, and no traceback; the cases whose input is known before the
model loads are refused before it loads.

How "before the model loads" is shown: every command line names a model that can not load (``MISSING_MODEL``, a
folder that does not exist, or for the context-length cases a model folder holding a config and a tokenizer but no
weights). A check that ran after loading would fail on the model instead, with another message; the model check itself
(``model_name_or_path``: no such model folder) runs last among the checks, so a case that reached it would show that
message instead of the expected one.

The command lines run as the console script runs them, in processes of their own (``dist_scripts/cli_cases.py``: one
interpreter imports the CLI once and forks a child per command line, whose exit status and stderr are its own), and
two of them through ``python -m trl_entropy.cli`` itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_entropy.files import atomic_writer, disk_full_message, write_atomically

REPO = Path(__file__).resolve().parents[2]
MISSING_MODEL = "/nonexistent/model-folder"
MSG_FORMS = "a non-empty string or a list of messages"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    return env


def _write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def _assert_one_line(result: dict, command: str, fragments: list[str], status: int = 2) -> None:
    stderr = result["stderr"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, (result["argv"], stderr)
    assert result["status"] == status and len(lines) == 1, (result["argv"], result["status"], stderr)
    assert lines[0].startswith(f"trl-entropy {command}: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def weightless_model_dir(tmp_path_factory):
    """The tiny model's config (context 64 tokens) and tokenizer, without weights: any load of the model fails."""
    from trl_entropy.testing import make_tiny_model_and_tokenizer

    path = tmp_path_factory.mktemp("weightless-model")
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    model.config.max_position_embeddings = 64
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert not list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    return str(path)


def _cases(root: Path, weightless: str) -> list[tuple[list[str], list[str]]]:
    """``(argv, fragments)``: each command line and what its one error line must contain."""
    data = root / "data"
    bad_json = _write(data / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b",\n')
    latin1 = _write(data / "latin1.jsonl", '{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    no_answer = _write(data / "no_answer.jsonl", '{"prompt": "What is 1 + 1?"}\n')
    syntax = _write(data / "syntax.yaml", "learning_rate: [1e-6\n")
    tag = _write(data / "tag.yaml", 'learning_rate: !!python/object/apply:os.system ["echo pwned"]\n')
    long_prompt = " ".join(["what is 1 + 2 ?"] * 20)  # 120 words: more than the 64-token context
    long_data = _write(
        data / "long.jsonl",
        json.dumps({"prompt": "what is 1 + 2 ?"}) + "\n" + json.dumps({"prompt": long_prompt}) + "\n",
    )
    prompts = {
        "empty_string": ('{"prompt": ""}', "'prompt' is an empty string"),
        "empty_list": ('{"prompt": []}', "'prompt' is an empty message list []"),
        "int": ('{"prompt": 5}', "'prompt' is int 5"),
        "null": ('{"prompt": null}', "'prompt' is NoneType None"),
        "no_content": ('{"prompt": [{"role": "user"}]}', "message 0 has no 'content'"),
        "no_role": ('{"prompt": [{"content": "hi"}]}', "message 0 has no string 'role'"),
    }
    out = str(root / "out")
    checkpoint = root / "run" / "checkpoint-2"
    _write(checkpoint / "trainer_state.json", '{"global_step": 2, "log_hist')
    guard_checkpoint = root / "guard-run" / "checkpoint-2"
    _write(guard_checkpoint / "trainer_state.json", '{"global_step": 2}')
    _write(guard_checkpoint / "collapse_guard_state.json", "\x00\x00garbage")
    train = ["--output_dir", out, "--model_name_or_path", MISSING_MODEL]
    cases = [
        # TRL's config divides by num_generations before checking it
        (["grpo", "--num_generations", "0", *train], ["`num_generations`", ">= 2", "got 0"]),
        (["rloo", "--num_generations", "0", *train], ["`num_generations`", ">= 2", "got 0"]),
        # malformed data files
        (["grpo", "--dataset_name", bad_json, *train], ["`dataset_name`", "bad.jsonl line 2", "not valid JSON"]),
        (["diagnose", "--dataset_name", bad_json, "--model_name_or_path", MISSING_MODEL], ["bad.jsonl line 2"]),
        (["grpo", "--dataset_name", latin1, *train], ["`dataset_name`", "latin1.jsonl line 2", "not UTF-8", "0xe9"]),
        # --config files
        (["grpo", "--config", syntax, *train], ["`--config`", "syntax.yaml line 2", "not valid YAML"]),
        (["grpo", "--config", tag, *train], ["`--config`", "tag.yaml", "python/object/apply", "safe_load"]),
        (["generate", "--config", tag], ["`--config`", "tag.yaml", "python/object/apply"]),
        (["grpo", "--config", str(data / "missing.yaml"), *train], ["`--config`", "no such file", "missing.yaml"]),
        # the collapse guard's probe
        (["grpo", "--collapse_guard", "--collapse_guard_probe", str(data / "missing.jsonl"), *train],
         ["`collapse_guard_probe`", "no such data file", "missing.jsonl"]),
        (["grpo", "--collapse_guard", "--collapse_guard_probe", no_answer, *train],
         ["`collapse_guard_probe`", "no_answer.jsonl line 1", "no 'answer'"]),
        # generate's inputs
        (["generate", "--prompts_file", str(data / "missing.jsonl"), "--model_name_or_path", MISSING_MODEL],
         ["`prompts_file`", "no such data file", "missing.jsonl"]),
        (["generate", "--prompts_file", latin1, "--model_name_or_path", MISSING_MODEL],
         ["`prompts_file`", "latin1.jsonl line 2", "not UTF-8"]),
        (["generate", "--task", "bogus", "--model_name_or_path", MISSING_MODEL],
         ["`task`", "arithmetic", "'bogus'"]),
        (["generate", "--early_stopping", "--calibration_path", str(data / "missing.json"),
          "--model_name_or_path", MISSING_MODEL], ["`calibration_path`", "no such file", "missing.json"]),
        # ranges of sampling options, before the model loads
        (["grpo", "--temperature", "0", *train], ["`temperature`", "> 0", "got 0.0"]),
        (["grpo", "--temperature", "-1", *train], ["`temperature`", "> 0", "got -1.0"]),
        (["emft", "--temperature", "0", *train], ["`temperature`", "> 0", "got 0.0"]),
        (["grpo", "--max_completion_length", "0", *train], ["`max_completion_length`", ">= 1", "got 0"]),
        (["rloo", "--max_completion_length", "0", *train], ["`max_completion_length`", ">= 1", "got 0"]),
        (["grpo", "--beta", "-1", *train], ["`beta`", ">= 0", "got -1.0"]),
        (["grpo", "--top_entropy_quantile", "1.5", *train], ["`top_entropy_quantile`", "[0, 1]", "got 1.5"]),
        (["generate", "--early_stopping", "--threshold", "-5", "--model_name_or_path", MISSING_MODEL],
         ["`threshold`", ">= 0", "got -5.0"]),
        # prompts longer than the model's context (read from config.json; the folder has no weights)
        (["grpo", "--dataset_name", long_data, "--max_completion_length", "8", "--entropy_reward", "token",
          "--output_dir", out,
          "--model_name_or_path", weightless],
         ["`dataset_name`", "row 1 of split 'train'", "long.jsonl", "context of 64", "`max_completion_length`=8"]),
        (["generate", "--prompts_file", long_data, "--max_new_tokens", "8", "--model_name_or_path", weightless],
         ["`prompts_file`", "row 1 of", "context of 64 tokens", "`max_new_tokens`=8"]),
        # corrupt checkpoint state files on resume
        (["grpo", "--resume_from_checkpoint", str(checkpoint), *train],
         ["`resume_from_checkpoint`", "checkpoint-2/trainer_state.json", "corrupt"]),
        (["grpo", "--resume_from_checkpoint", str(guard_checkpoint), *train],
         ["`resume_from_checkpoint`", "collapse_guard_state.json", "corrupt"]),
        # no reward at all (TRL refuses it only once the model has loaded)
        (["rloo", *train], ["no reward", "`--reward_funcs`", "`--entropy_reward`"]),
        # a model folder that does not exist (the last check before loading)
        (["grpo", "--entropy_reward", "token", *train],
         ["`model_name_or_path`", "no such model folder", MISSING_MODEL]),
    ]  # fmt: skip
    for name, (line, fragment) in prompts.items():
        path = _write(data / f"{name}.jsonl", '{"prompt": "what is 1 + 2 ?"}\n' + line + "\n")
        command = "rloo" if name == "empty_list" else "grpo"
        cases.append(
            (
                [command, "--dataset_name", path, *train],
                ["`dataset_name`", f"{name}.jsonl line 2", fragment, MSG_FORMS],
            )
        )
    return cases


def test_every_bad_input_is_one_line_before_the_model_loads(tmp_path, weightless_model_dir):
    cases = _cases(tmp_path, weightless_model_dir)
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([argv for argv, _ in cases]))
    script = REPO / "tests" / "dist_scripts" / "cli_cases.py"
    done = subprocess.run(
        [sys.executable, str(script), str(spec)], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert done.returncode == 0 and "RESULT" in done.stdout, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.split("RESULT", 1)[1].splitlines() if line.strip()]
    assert len(results) == len(cases) == 35
    failures = []
    for result, (argv, fragments) in zip(results, cases):
        try:
            _assert_one_line(result, argv[0], fragments)
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize("case", ["num_generations", "yaml_tag"])
def test_the_console_module_prints_the_same_single_line(tmp_path, case):
    """The same refusals through ``python -m trl_entropy.cli``, a fresh interpreter as a user starts it."""
    argv = [sys.executable, "-m", "trl_entropy.cli", "grpo", "--output_dir", str(tmp_path / "out")]
    if case == "num_generations":
        argv += ["--num_generations", "0"]
        fragments = ["`num_generations`", ">= 2", "got 0"]
    else:
        argv += ["--config", _write(tmp_path / "tag.yaml", "beta: !!python/object/apply:os.system ['echo pwned']\n")]
        fragments = ["`--config`", "tag.yaml", "python/object/apply"]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)
    _assert_one_line({"argv": argv, "status": done.returncode, "stderr": done.stderr}, "grpo", fragments)
    assert "pwned" not in done.stdout


# ---------------------------------------------------------------------------------------------------------------------
# The Python API: the same checks, the same messages
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny():
    from trl_entropy.testing import make_tiny_model_and_tokenizer

    return make_tiny_model_and_tokenizer(seed=0)


def _config(config_class, tmp_path, **kwargs):
    return config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kwargs)


@pytest.mark.parametrize("pair", ["grpo_with_rloo_config", "rloo_with_grpo_config", "grpo_with_dict"])
def test_a_trainer_given_another_trainers_config_names_args(tmp_path, tiny, pair):
    from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

    model, tokenizer = tiny
    trainer_class, expected, args = {
        "grpo_with_rloo_config": (EntropyGRPOTrainer, "GRPOConfig", _config(EntropyRLOOConfig, tmp_path)),
        "rloo_with_grpo_config": (EntropyRLOOTrainer, "RLOOConfig", _config(EntropyGRPOConfig, tmp_path)),
        "grpo_with_dict": (EntropyGRPOTrainer, "GRPOConfig", {"output_dir": str(tmp_path)}),
    }[pair]
    with pytest.raises(TypeError) as info:
        trainer_class(model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                      processing_class=tokenizer)  # fmt: skip
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"`args` of {trainer_class.__name__} must be")
    assert expected in message and type(args).__name__ in message


@pytest.mark.parametrize("config_name", ["EntropyGRPOConfig", "EntropyRLOOConfig", "EMFTConfig"])
@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"forking_token_ratio": "0.2"}, TypeError, ["`forking_token_ratio` must be a number", "'0.2'"]),
        ({"num_generations": 0}, ValueError, ["`num_generations`", "got 0"]),
        ({"temperature": 0.0}, ValueError, ["`temperature`", "> 0", "got 0.0"]),
        ({"temperature": "1.0"}, TypeError, ["`temperature` must be a number", "'1.0'"]),
        ({"max_completion_length": 0}, ValueError, ["`max_completion_length`", ">= 1", "got 0"]),
        ({"beta": -1.0}, ValueError, ["`beta`", ">= 0", "got -1.0"]),
        ({"top_entropy_quantile": 1.5}, ValueError, ["`top_entropy_quantile`", "[0, 1]", "got 1.5"]),
    ],
)
def test_config_fields_are_checked_where_they_are_defined(tmp_path, config_name, kwargs, error, fragments):
    from trl_entropy import trainers
    from trl_entropy.trainers.emft import EMFTConfig

    config_class = EMFTConfig if config_name == "EMFTConfig" else getattr(trainers, config_name)
    field = next(iter(kwargs))
    if field not in config_class.__dataclass_fields__:
        pytest.skip(f"{config_name} has no `{field}`")
    with pytest.raises(error) as info:
        _config(config_class, tmp_path, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_token_entropy_of_an_empty_vocabulary_is_a_clear_error():
    from trl_entropy.ops import token_entropy

    with pytest.raises(ValueError, match=r"vocabulary dimension of size >= 1.*\(2, 3, 0\)"):
        token_entropy(torch.zeros(2, 3, 0))
    assert token_entropy(torch.zeros(2, 3, 1)).tolist() == [[0.0] * 3] * 2  # one token: entropy 0, the edge that works


def test_the_calibrator_refuses_negative_entropies():
    from trl_entropy.confidence import EntropyThresholdCalibrator

    correct, incorrect = [0.5, 0.6, 0.7, 0.55], [1.4, 1.6, 1.2, 1.5]
    with pytest.raises(ValueError, match=r"must be entropies, >= 0.*entries \[1\].*-0\.3"):
        EntropyThresholdCalibrator(p_value_method="normal").fit(
            [0.5, -0.3, *correct[2:], *incorrect], [1] * 4 + [0] * 4
        )
    # float32 rounding just below zero is an entropy of 0, not an error
    fitted = EntropyThresholdCalibrator(p_value_method="normal").fit(
        [-1e-6, *correct[1:], *incorrect], [1] * 4 + [0] * 4
    )
    assert math.isfinite(fitted.thresholds["mean"])


# ---------------------------------------------------------------------------------------------------------------------
# Faults: a corrupt best-weights file, atomic writes, a full disk
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "not_a_dict"])
def test_a_corrupt_best_weights_file_falls_back_to_stop_only(tmp_path, caplog, corruption):
    """The guard fires after a resume, when the best weights live in ``collapse_guard_best.pt`` only: a corrupt file
    stops training without restoring, with a warning naming the file, as a missing one does."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from trl_entropy.callbacks.collapse_guard import BEST_WEIGHTS_FILE, CollapseGuardCallback

    path = tmp_path / BEST_WEIGHTS_FILE
    weights = {"weight": torch.arange(6.0)}
    with atomic_writer(path) as handle:
        torch.save({"step": 3, "state_dict": weights}, handle)
    intact = path.read_bytes()
    path.write_bytes(
        {"truncated": intact[: len(intact) // 2], "garbage": b"\x80\x04not a pickle"}.get(corruption, b"")
    )
    if corruption == "not_a_dict":
        torch.save([1, 2, 3], path)
    guard = CollapseGuardCallback(action="stop_and_restore")
    guard.best_step, guard.best_accuracy, guard.probe_accuracies = 3, 1.0, [1.0, 0.0]
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SimpleNamespace(output_dir=str(tmp_path), world_size=1)
    state = SimpleNamespace(global_step=7, is_world_process_zero=True)
    control = TrainerControl()
    with caplog.at_level(logging.WARNING, logger="trl_entropy.callbacks.collapse_guard"):
        guard._act(args, state, control, model, ["probe_drop"])
    assert control.should_training_stop and guard.restored_step is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "stopped only" in messages
    if corruption != "not_a_dict":
        assert str(path) in messages and "unreadable" in messages
    event = json.loads((tmp_path / "collapse_guard.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "fired" and event["restored_step"] is None

    # The same file intact restores: the fallback is for the corrupt file only.
    path.write_bytes(intact)
    model = torch.nn.Linear(3, 2)
    guard.fired_step = None
    assert guard._saved_best_weights(args)["weight"].tolist() == weights["weight"].tolist()


def test_atomic_writer_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "collapse_guard_best.pt"
    with atomic_writer(path) as handle:
        torch.save({"step": 1}, handle)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_writer(path) as handle:
            handle.write(b"half a pickle")
            raise RuntimeError("interrupted")
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["collapse_guard_best.pt"]  # no temporary file left


def test_disk_full_message_names_the_folder_and_its_free_space(tmp_path):
    """Real ENOSPC errors from ``/dev/full`` (a device whose every write fails with "no space left"): Python's
    OSError and PyTorch's "unexpected pos" RuntimeError (what ``torch.save`` of a checkpoint raises on a full disk)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    errors = []
    try:
        with open("/dev/full", "wb") as handle:
            handle.write(b"x" * 8192)
            handle.flush()
    except OSError as err:
        errors.append(err)
    try:
        torch.save({"weights": torch.zeros(10_000)}, "/dev/full")
    except RuntimeError as err:
        errors.append(err)
    assert len(errors) == 2 and "unexpected pos" in str(errors[1])
    usage = shutil.disk_usage(tmp_path)
    for error in errors:
        message = disk_full_message(error, tmp_path / "run")
        assert message is not None and "\n" not in message.strip()
        assert str(tmp_path / "run") in message and "free of" in message
        free_mib = float(message.split(" free of")[0].rsplit("(", 1)[1].split()[0])
        unit = message.split(" free of")[0].rsplit()[-1]
        scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
        assert abs(free_mib * scale - usage.free) <= max(0.05 * scale, 1e6 + 0.01 * usage.free)
    assert disk_full_message(RuntimeError("CUDA out of memory"), tmp_path) is None
    assert disk_full_message(OSError(13, "Permission denied"), tmp_path) is None


def _small_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_during_training_is_one_line_naming_the_output_directory(tmp_path):
    """A real full disk: the output directory is a 160 KiB tmpfs, enough for the tiny model's weights (89 KiB) but not
    for the optimizer state of its first checkpoint. Needs the right to mount (root in a container); skipped
    otherwise."""
    from trl_entropy.testing import make_tiny_model_and_tokenizer

    model_dir = tmp_path / "model"
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "160k"):
        pytest.skip("can not mount a small tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        argv = [sys.executable, "-m", "trl_entropy.cli", "grpo", "--model_name_or_path", str(model_dir)]
        argv += ["--output_dir", str(disk / "run"), "--num_train_prompts", "8", "--max_steps", "1"]
        argv += ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4"]
        argv += ["--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", "--entropy_stats", "false"]
        argv += ["--entropy_reward", "token"]
        done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1, done.stderr[-3000:]  # the training's progress bars aside, one line
    assert errors[0].startswith("trl-entropy grpo: error: no space left on the device of the output directory")
    assert str(disk / "run") in errors[0] and "free of 160.0 KiB" in errors[0]


def test_calibrate_problems_file_is_replaced_whole(tmp_path):
    """``calibrate``'s measurements go through :func:`write_atomically`: an old file is replaced in one step."""
    from trl_entropy.cli.confidence import _write_jsonl

    path = tmp_path / "calibration.problems.jsonl"
    write_atomically(path, b'{"old": true}\n')
    _write_jsonl(path, [{"prompt": "p", "step_signal": math.nan}, {"prompt": "q", "step_signal": 0.5}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"prompt": "p", "step_signal": None},
        {"prompt": "q", "step_signal": 0.5},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.problems.jsonl"]
