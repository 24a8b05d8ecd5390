"""The documentation site: it builds with ``mkdocs build --strict``, its API reference documents every exported name,
and the benchmarks page holds only figures read from ``benchmarks/results/*.json``."""

import html
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("gen_benchmarks", ROOT / "docs" / "gen_benchmarks.py")
gen_benchmarks = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gen_benchmarks)

_ANCHOR_ID = re.compile(r'\bid="(trl_entropy\.[\w.]+)"')
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?$")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once for this module, with warnings as errors."""
    for package in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(package)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def _api_pages(site: Path) -> dict[str, str]:
    return {str(p.relative_to(site)): p.read_text(encoding="utf-8") for p in (site / "api").rglob("*.html")}


def test_site_builds_strict_with_every_page(site):
    # Every page of the nav was rendered (a page missing from docs/ fails the strict build before this).
    for page in ("index", "quickstart", "callback", "cli", "benchmarks", "distributed"):
        assert (site / ("index.html" if page == "index" else f"{page}/index.html")).is_file(), page
    for method in ("em_rl", "forking_tokens", "em_ft", "em_inf", "early_stopping"):
        text = (site / "methods" / method / "index.html").read_text(encoding="utf-8")
        # The maths went through arithmatex (MathJax markup), not left as raw dollar signs.
        assert 'class="arithmatex"' in text, method


def test_api_reference_documents_every_exported_name(site):
    import trl_entropy
    import trl_entropy.trainers

    anchors = set()
    for text in _api_pages(site).values():
        anchors.update(_ANCHOR_ID.findall(text))
    documented = {anchor.rsplit(".", 1)[-1] for anchor in anchors}
    exported = set(trl_entropy.__all__) | set(trl_entropy.trainers.__all__)
    missing = sorted(exported - documented)
    assert not missing, f"exported but absent from the API reference: {missing}"
    # Each trainer export is documented under the trainers page, where users look for it.
    trainers_page = (site / "api" / "trainers" / "index.html").read_text(encoding="utf-8")
    trainer_anchors = {a.rsplit(".", 1)[-1] for a in _ANCHOR_ID.findall(trainers_page)}
    assert set(trl_entropy.trainers.__all__) <= trainer_anchors


def test_api_reference_renders_docstring_conventions(site):
    # Sphinx roles and Hugging Face links are rewritten by docs/griffe_docstrings.py, never shown raw.
    for name, text in _api_pages(site).items():
        visible = html.unescape(re.sub(r"<[^>]+>", " ", text))
        for raw in (":class:`", ":func:`", ":meth:`", "[`~", "*optional*, defaults to"):
            assert raw not in visible, f"{raw!r} left in {name}"


def test_griffe_rewrite_of_docstrings():
    spec = importlib.util.spec_from_file_location("griffe_docstrings", ROOT / "docs" / "griffe_docstrings.py")
    pytest.importorskip("griffe")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = (
        "See :class:`~trl.GRPOConfig` and :func:`trl_entropy.ops.token_entropy`, or [`~trl.RLOOTrainer`].\n"
        "\n"
        "Parameters:\n"
        '    entropy_reward (`str`, *optional*, defaults to `"none"`):\n'
        "        The reward.\n"
        "    forking_threshold (`float` or `None`, *optional*, defaults to `None`):\n"
        "        A threshold.\n"
    )
    expected = (
        "See `GRPOConfig` and `trl_entropy.ops.token_entropy`, or `RLOOTrainer`.\n"
        "\n"
        "Parameters:\n"
        "    entropy_reward:\n"
        "        The reward.\n"
        "    forking_threshold:\n"
        "        A threshold.\n"
    )
    assert module.rewrite_docstring(source) == expected


def _json_numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return [float(value)]  # e.g. an answer column ("25")
    if isinstance(value, dict):
        return [n for v in value.values() for n in _json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _json_numbers(v)]
    return []


def _table_cells(markdown: str) -> list[list[str]]:
    """Body rows of every Markdown table (header and separator rows dropped)."""
    rows, previous_was_table = [], False
    for line in markdown.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            previous_was_table = False
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not previous_was_table or all(set(c) <= set("-: ") for c in cells):
            previous_was_table = True  # header row or separator row
            continue
        rows.append(cells)
    return rows


def test_benchmarks_page_is_generated_from_the_json_files():
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert page == gen_benchmarks.render_page(), "docs/benchmarks.md is stale: run `python docs/gen_benchmarks.py`"
    images = ROOT / "docs" / "assets" / "benchmarks"
    assert gen_benchmarks.sync_images(ROOT / "benchmarks" / "results", images, check=True) == []
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    gpu_results = sorted((ROOT / "benchmarks" / "results" / "gpu").glob("*.json"))
    numbers = [n for path in results + gpu_results for n in _json_numbers(json.loads(path.read_text()))]
    for path in results + gpu_results:
        assert f"## `{path.stem}`" in page
    # No invented figure: every numeric cell is, to its 4 printed significant digits, a number of some JSON file.
    for cells in _table_cells(page):
        for cell in cells:
            for token in cell.split(", "):
                if _NUMBER.match(token):
                    shown = float(token)
                    assert any(math.isclose(shown, n, rel_tol=6e-4, abs_tol=1e-12) for n in numbers), token


def test_gpu_section_says_not_measured_until_a_gpu_file_exists(tmp_path):
    assert "**Not measured yet**" in gen_benchmarks.render_page(tmp_path)
    (tmp_path / "gpu").mkdir()
    payload = {"settings": {"device": "NVIDIA H200", "device_type": "cuda"}, "ops": {"results": [{"median_ms": 2.5}]}}
    (tmp_path / "gpu" / "bench_gpu.json").write_text(json.dumps(payload))
    page = gen_benchmarks.render_page(tmp_path)
    assert "**Not measured yet**" not in page
    assert "## `bench_gpu` on NVIDIA H200" in page and "Source: `benchmarks/results/gpu/bench_gpu.json`." in page
    assert ["2.5"] in _table_cells(page)
    payload["settings"] = {"device": "CPU (x86_64)", "device_type": "cpu", "tiny_cpu_smoke_run": True}
    (tmp_path / "gpu" / "bench_gpu.json").write_text(json.dumps(payload))
    assert "not a GPU measurement" in gen_benchmarks.render_page(tmp_path)


def test_benchmark_tables_follow_the_json_layout(tmp_path):
    records = [
        {"dtype": "float32", "time_s": 1.23456, "peak": {"mib": 512.0, "ratio": 0.5}},
        {"dtype": "bfloat16", "time_s": 2.0, "peak": {"mib": 640.25, "ratio": None}},
    ]
    payload = {
        "results": records,
        "summary": {"a": {"step_s": 3.0, "steps": 4}, "b": {"step_s": 6.5}},
        "report": {"note": "line one\nline two", "pairs": [[0.5, True], [0.25, False]]},
        "settings": {"threads": 2},
        "runs": [{"step_s": 3.0}],
        "repeats": 3,
    }
    (tmp_path / "bench_fake.json").write_text(json.dumps(payload))
    page = gen_benchmarks.render_page(tmp_path)
    rows = _table_cells(page)
    # Results: one row per record, in order, nested objects flattened into columns.
    assert rows[0] == ["float32", "1.235", "512", "0.5"]
    assert rows[1] == ["bfloat16", "2", "640.2", "—"]
    assert "| dtype | time (s) | peak.mib | peak.ratio |" in page
    # An object of objects: one row per key, missing values as a dash.
    assert rows[2] == ["`a`", "3", "4"] and rows[3] == ["`b`", "6.5", "—"]
    # Multi-line text as a block, never inside a table cell.
    assert "```text\nline one\nline two\n```" in page
    # Settings (and top-level plain values), then raw data (runs, lists of lists), in collapsed blocks.
    settings, raw = page.index('??? info "Settings"'), page.index('??? note "Raw data"')
    assert settings < page.index("| `threads` | 2 |") < raw and settings < page.index("| `repeats` | 3 |") < raw
    assert rows[-3:] == [["0.5", "yes"], ["0.25", "no"], ["3"]]
    assert raw < page.index("**`report.pairs`**") and raw < page.index("**`runs`**")


def test_readme_study_tables_are_the_ones_generated_from_the_study_json():
    """The README's study rows and claims table are `bench_label_free.py --readme`'s output for the committed JSON."""
    spec = importlib.util.spec_from_file_location("bench_label_free", ROOT / "benchmarks" / "bench_label_free.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    data = json.loads((ROOT / "benchmarks" / "results" / "bench_label_free.json").read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert study.readme_rows(data["summary"]) in readme, (
        "run `python benchmarks/bench_label_free.py --summarize-only --readme`"
    )
    assert study.claims_markdown(data["claims"]) in readme
    assert f"{data['total_cpu_hours']:.1f} CPU-hours" in readme


def test_diagnose_docs_and_shipped_validation_are_generated_from_bench_diagnose_json():
    """docs/diagnose.md's tables and conclusion, and the sentence `trl-entropy diagnose` prints beside its verdict
    (`trl_entropy/diagnose_validation.json`), are `bench_diagnose.py`'s output for the committed JSON."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_diagnose", ROOT / "benchmarks" / "bench_diagnose.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    data = json.loads((ROOT / "benchmarks" / "results" / "bench_diagnose.json").read_text(encoding="utf-8"))
    docs = (ROOT / "docs" / "diagnose.md").read_text(encoding="utf-8")
    assert bench.markdown(data) in docs, "run `python benchmarks/bench_diagnose.py --summarize-only --write-docs`"
    shipped = json.loads((ROOT / "trl_entropy" / "diagnose_validation.json").read_text(encoding="utf-8"))
    assert shipped == bench.package_validation(data)
    from trl_entropy.evaluation.diagnose import validation_statement

    assert validation_statement() == shipped["statement"]
