"""Every example script runs end to end with tiny settings, and every notebook executes (on the tiny test model)."""

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRAINING_FLAGS = ["--max_steps", "1", "--num_prompts", "8", "--per_device_train_batch_size", "4"]
TRAINING_FLAGS += ["--max_completion_length", "8"]

pytestmark = pytest.mark.slow


def _run_script(name, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_every_example_script_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    tested = {"em_rl_grpo.py", "em_rl_rloo.py", "forking_tokens.py", "em_ft.py", "em_inf.py", "early_stopping.py"}
    assert scripts == tested


@pytest.mark.parametrize(
    "script, extra, expected",
    [
        ("em_rl_grpo.py", ["--num_generations", "2"], "mean token entropy: first step"),
        ("em_rl_rloo.py", ["--num_generations", "2"], "entropy reward (minus mean token entropy)"),
        ("forking_tokens.py", ["--num_generations", "2"], "fraction of completion tokens that received the gradient"),
        ("em_ft.py", [], "nats across the optimizer step"),
    ],
)
def test_training_example(script, extra, expected, tiny_model_dir, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--output_dir", str(output_dir), *TRAINING_FLAGS, *extra]
    _run_script(script, argv, monkeypatch)
    assert expected in capsys.readouterr().out
    records = [json.loads(line) for line in (output_dir / "entropy_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]


def test_forking_tokens_example_trains_on_a_fifth_of_the_tokens(tiny_model_dir, tmp_path, monkeypatch, capsys):
    argv = ["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *TRAINING_FLAGS]
    _run_script("forking_tokens.py", [*argv, "--num_generations", "2"], monkeypatch)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fraction of completion tokens"))
    fraction = float(line.rsplit(":", 1)[1])
    # 4 completions x at most 8 tokens: ceil(0.2 * n) of n valid tokens is selected, between 20% and 20% + 1/n.
    assert 0.2 <= fraction <= 0.2 + 1 / 4


def test_em_inf_example(tiny_model_dir, tmp_path, monkeypatch, capsys):
    argv = ["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--num_problems", "3"]
    _run_script("em_inf.py", [*argv, "--max_new_tokens", "4"], monkeypatch)
    out = capsys.readouterr().out
    assert "plain" in out and "EM-INF" in out and "EM-INF optimised" in out
    for name in ("plain", "em_inf"):
        assert len((tmp_path / f"{name}.jsonl").read_text().splitlines()) == 3


def test_early_stopping_example(tiny_model_dir, monkeypatch, capsys):
    argv = ["--model_name_or_path", tiny_model_dir, "--num_calibration", "4", "--num_problems", "3"]
    _run_script("early_stopping.py", [*argv, "--max_step_tokens", "4", "--max_new_tokens", "8"], monkeypatch)
    out = capsys.readouterr().out
    assert "full reasoning: accuracy" in out and "early stopping (tau=" in out


# Small settings for the tiny test model, injected after each notebook's cell tagged "parameters" (papermill's
# convention): the reader sees the real settings only. Every name must be one the parameters cell defines.
NOTEBOOK_SETTINGS = {
    "em_rl_label_free.ipynb": {"MAX_STEPS": 1, "NUM_EVAL": 4, "TRAIN_TOKENS": 8, "EVAL_TOKENS": 8},
    "entropy_at_inference.ipynb": {"NUM_PROBLEMS": 4, "MAX_TOKENS": 8},
}
NOTEBOOKS = sorted(p.name for p in (EXAMPLES / "notebooks").glob("*.ipynb"))


def _read_notebook(name):
    nbformat = pytest.importorskip("nbformat")
    return nbformat, nbformat.read(EXAMPLES / "notebooks" / name, as_version=4)


def test_every_notebook_has_test_settings():
    assert set(NOTEBOOK_SETTINGS) == set(NOTEBOOKS)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_opens_with_an_install_cell_and_shows_no_progress_bar_fragments(notebook):
    _, nb = _read_notebook(notebook)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # A reader in a fresh environment installs from the clone first; the suite runs in an installed one and skips it
    # (nbclient skips cells tagged "skip-execution").
    assert '%pip install --quiet -e "../..[' in code[0].source and "skip-execution" in code[0].metadata["tags"]
    assert "parameters" in code[1].metadata.get("tags", [])
    assert "os.environ" not in "".join(c.source for c in code)
    streams = [o for c in code for o in c.get("outputs", []) if o["output_type"] == "stream"]
    assert not [o for o in streams if o["name"] == "stderr"]  # saved tqdm fragments


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_executes(notebook, tiny_model_dir, tmp_path, monkeypatch):
    nbformat, nb = _read_notebook(notebook)
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    settings = {"MODEL": tiny_model_dir, **NOTEBOOK_SETTINGS[notebook]}
    defined = {line.split("=")[0].strip() for line in nb.cells[index].source.splitlines() if "=" in line}
    assert set(settings) <= defined
    overrides = "\n".join(f"{name} = {value!r}" for name, value in settings.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell; the install cell is skipped
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert os.listdir(tmp_path / "outputs")  # the notebook wrote its files under the working directory
