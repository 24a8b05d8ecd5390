"""Write docs/benchmarks.md from the measured results in benchmarks/results/*.json.

    python docs/gen_benchmarks.py            # rewrite docs/benchmarks.md
    python docs/gen_benchmarks.py --check    # exit 1 if docs/benchmarks.md is not what the JSON files give

Every figure on the page is read from a JSON file: nothing is typed in by hand. Each file gets a section with how it
was measured (the docstring of the script that wrote it, ``benchmarks/<name>.py``), the PNG figures it wrote next to
its JSON (``<name>.png``, ``<name>_*.png``, copied to ``docs/assets/benchmarks/``), its results as tables, and its
settings and raw runs in collapsed blocks. The layout is generic, so a new benchmark needs no change here:

* a list of objects becomes a table, one row per object, one column per (flattened) key;
* an object whose values are all objects becomes a table, one row per key;
* an object of plain values becomes a two-column table;
* a list of lists becomes a table with numbered columns;
* headline keys (``table``, ``summary``, ``results``, ``ratios``) come before the other entries of their object;
* top-level plain values and the ``settings``-like keys go to the "Settings" block; ``runs``/``examples``-like keys
  and lists of lists to the "Raw data" block (both collapsed).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
SCRIPTS_DIR = ROOT / "benchmarks"
OUTPUT = ROOT / "docs" / "benchmarks.md"

SETTINGS_KEYS = (
    "settings",
    "config",
    "configuration",
    "machine",
    "hardware",
    "environment",
    "args",
    "arguments",
    "setup",
)
PRIMARY_KEYS = ("table", "summary", "results", "ratios", "headline")
RAW_KEYS = ("runs", "raw", "samples", "timings", "trials", "per_repeat", "history", "examples")
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj):`~?([^`]+)`")
_UNIT_SUFFIXES = (("_mib", " (MiB)"), ("_gib", " (GiB)"), ("_ms", " (ms)"), ("_s", " (s)"))

INTRO = """\
# Benchmarks

Measured costs of the entropy machinery. **Every figure on this page is read from the JSON files in
`benchmarks/results/`** by `docs/gen_benchmarks.py`; none is typed in by hand.

How they were measured:

- **Machine**: a shared development box with **2 CPU cores** and no GPU, so absolute times are those of a small CPU
  machine, and noisy. Benchmarks that train or generate use the embedded SmolLM2-135M-Instruct (134.5M parameters,
  vocabulary 49,152). Newer JSON files record the CPU model, whether it has native bf16, the torch threads and the
  training dtype (`hardware` / `machine`); the study (`bench_label_free`) trained under TRL's bf16 default, the
  step-time benchmarks in float32, unless their settings say otherwise.
- **Ratios are measured side by side in one run**: the variants being compared are interleaved (step by step, or run
  by run in fresh subprocesses), so that a change in the machine's load affects both sides alike. Unless its name
  says otherwise, a ratio is the candidate's figure divided by the baseline's: below 1 is cheaper.
- **Memory** is the peak resident memory (RSS) of the process, or its increase over a stated starting point, as each
  benchmark says.
- Each section starts with the benchmark script's own description of its protocol, and lists the settings recorded in
  its JSON file.

To reproduce: run the script (`python benchmarks/<name>.py`, options in its section), which writes
`benchmarks/results/<name>.json`, then `python docs/gen_benchmarks.py`.

The CPU sections come first; the [GPU section](#gpu) (`benchmarks/results/gpu/`) is at the end.
"""

GPU_INTRO = """\
# GPU

Measured by `benchmarks/bench_gpu.py` on one GPU (its name heads each section below; `benchmarks/results/gpu/*.json`).
It compares `token_entropy` and `self_certainty` with TRL's fused Triton kernel, GRPO and RLOO step time and peak CUDA
memory of the entropy variants, EM-FT against SFT, and EM-INF / adaptive-temperature decoding against plain sampling,
on a random model in the shape of Qwen2.5-0.5B, in one run sized for 6 minutes (a section not started after
`--budget-s`, 330 s, is skipped and listed as such).

To run it where the GPU image has PyTorch, Triton and transformers but no trl or datasets: fetch the four missing
wheels once on a machine with PyPI access, from the repository root,

```bash
echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
```

then, on the GPU machine, from the repository root with `.whl` carried along, one command installs them (into a
temporary site folder, see `benchmarks/run_gpu.sh`), runs the CUDA tests (`tests/test_ops_cuda.py`) and the
benchmark, writing everything to `$OUT`:

```bash
bash benchmarks/run_gpu.sh
```

Then copy `$OUT/bench_gpu.json` to `benchmarks/results/gpu/` and run `python docs/gen_benchmarks.py`.
"""

GPU_NOT_MEASURED = """\
**Not measured yet**: no GPU has run `benchmarks/bench_gpu.py` for this project so far, so this page shows no GPU
figure (none is estimated). The CPU path of every op is the one measured above.
"""


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------


def repository_path(text: str) -> str:
    """An absolute path written by a benchmark, relative to the repository it lies in (``benchmarks/...``), so the page
    does not show the folders of the machine it was generated on; any other text unchanged."""
    if not text.startswith("/"):
        return text
    parts = Path(text).parts
    for anchor in ("benchmarks", "docs", "examples"):
        if anchor in parts:
            return str(Path(*parts[len(parts) - 1 - parts[::-1].index(anchor) :]))
    return Path(text).name


def format_value(value: Any) -> str:
    """One JSON value as table-cell text: floats with 4 significant digits, lists comma-separated, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return repository_path(str(value)).replace("|", "\\|").replace("\n", " ")


def column_title(key: str) -> str:
    """``token_entropy_extra_mib`` -> ``token entropy extra (MiB)``; dotted paths keep their dots."""
    for suffix, unit in _UNIT_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)].replace("_", " ") + unit
    return key.replace("_", " ")


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects become dotted keys; lists stay values (shown comma-separated)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def records_table(records: list[dict[str, Any]], first_column: str | None = None) -> str:
    """A table with one row per record; ``first_column`` names a leading column taken from the ``_name`` key."""
    flat = [flatten(r) for r in records]
    columns: list[str] = []
    for row in flat:
        columns += [k for k in row if k not in columns and k != "_name"]
    header = ([first_column] if first_column else []) + [column_title(c) for c in columns]
    body = []
    for row in flat:
        cells = [format_value(row.get(c)) for c in columns]
        body.append(([f"`{row['_name']}`"] if first_column else []) + cells)
    return markdown_table(header, body)


def scalars_table(mapping: dict[str, Any]) -> str:
    rows = [[f"`{k}`", format_value(v)] for k, v in flatten(mapping).items()]
    return markdown_table(["key", "value"], rows)


def rows_table(rows: list[list[Any]]) -> str:
    """A list of lists: one table row per inner list, columns numbered."""
    width = max(len(r) for r in rows)
    body = [[format_value(r[i]) if i < len(r) else "—" for i in range(width)] for r in rows]
    return markdown_table([f"[{i}]" for i in range(width)], body)


def is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, list) and is_plain(v) for v in value)


def is_plain(value: Any) -> bool:
    return not isinstance(value, (dict, list)) or (
        isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)
    )


def is_text(value: Any) -> bool:
    return isinstance(value, str) and "\n" in value


def _primary_first(mapping: dict[str, Any]) -> dict[str, Any]:
    """The headline entries (``table``, ``summary``...) before the details, otherwise in file order."""
    return dict(sorted(mapping.items(), key=lambda item: item[0].lower() not in PRIMARY_KEYS))


def render_value(value: Any, title: str, raw: list[str]) -> list[str]:
    """Markdown blocks (a bold title, then tables) for one JSON value. Raw material (``runs``-like keys, lists of
    lists) is appended to ``raw`` instead, for the collapsed block."""
    label = [f"**`{title}`**"] if title else []
    if is_records(value):
        return [*label, records_table(value)]
    if is_rows(value):
        raw += [*label, rows_table(value)]
        return []
    if isinstance(value, dict) and value:
        texts = {k: v for k, v in value.items() if is_text(v)}  # multi-line text: shown as a block, not in a cell
        plain = {k: v for k, v in value.items() if is_plain(v) and k not in texts}
        nested = {k: v for k, v in value.items() if k not in plain and k not in texts}
        blocks: list[str] = []
        if (
            nested
            and all(
                isinstance(v, dict) and all(is_plain(x) or isinstance(x, dict) for x in v.values())
                for v in nested.values()
            )
            and not plain
            and not texts
        ):
            records = [{"_name": k, **v} for k, v in nested.items()]
            return [*label, records_table(records, first_column="name")]
        if plain:
            blocks += [*label, scalars_table(plain)]
        for key, text in texts.items():
            blocks += [f"**`{title}.{key}`**" if title else f"**`{key}`**", "```text\n" + text.strip("\n") + "\n```"]
        for key, child in _primary_first(nested).items():
            child_title = f"{title}.{key}" if title else key
            if key.lower() in RAW_KEYS:
                raw += render_value(child, child_title, raw)
            else:
                blocks += render_value(child, child_title, raw)
        return blocks
    if is_text(value):
        return [*label, "```text\n" + value.strip("\n") + "\n```"]
    return [*label, format_value(value)]


def indented(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line.strip() else "" for line in text.splitlines())


# ---------------------------------------------------------------------------------------------------------------------
# One benchmark section
# ---------------------------------------------------------------------------------------------------------------------


def script_description(name: str) -> str | None:
    """The docstring of ``benchmarks/<name>.py`` (read without importing it), in Markdown."""
    path = SCRIPTS_DIR / f"{name}.py"
    if not path.is_file():
        return None
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    if not docstring:
        return None
    lines = []
    for line in _SPHINX_ROLE.sub(lambda m: f"`{m.group(1)}`", docstring).splitlines():
        # The usage line ("python benchmarks/x.py [--n 64]") as a shell block: indented after a list item it would
        # otherwise continue the item, and its brackets would read as Markdown links.
        if line.strip().startswith(("python ", "accelerate ", "torchrun ")):
            lines += ["", "```bash", line.strip(), "```", ""]
        else:
            lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def result_images(path: Path) -> list[Path]:
    """PNG figures a benchmark wrote next to its JSON file: ``<name>.png`` and ``<name>_*.png``."""
    return sorted(
        p for p in path.parent.glob(f"{path.stem}*.png") if p.stem == path.stem or p.stem.startswith(f"{path.stem}_")
    )


def benchmark_section(path: Path, subdir: str = "") -> str:
    """The Markdown section of one results file; ``subdir`` (e.g. ``"gpu/"``) is its folder under the results."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path} is not valid JSON: {err}") from None
    name = path.stem
    parts = [f"## `{name}`" + (f" on {device_label(data)}" if subdir else "")]
    description = script_description(name)
    if description is None:
        writers = [p.stem for p in SCRIPTS_DIR.glob("*.py") if name.startswith(f"{p.stem}_")]
        writer = max(writers, key=len, default=None)
        description = (
            f"An extra output of `benchmarks/{writer}.py` (see its section)."
            if writer
            else f"No script `benchmarks/{name}.py` describes this file."
        )
    parts.append(description)
    parts.append(f"Source: `benchmarks/results/{subdir}{path.name}`.")
    for image in result_images(path):
        parts.append(f"![{image.stem}](assets/benchmarks/{image.name})")

    raw: list[str] = []
    if not isinstance(data, dict):
        data = {"results": data}
    settings = {k: v for k, v in data.items() if (is_plain(v) and not is_text(v)) or k.lower() in SETTINGS_KEYS}
    for key, value in _primary_first(data).items():
        if key in settings:
            continue
        if key.lower() in RAW_KEYS:
            raw += render_value(value, key, raw)
        else:
            parts += render_value(value, key, raw)
    if settings:
        flat: dict[str, Any] = {}
        for key, value in settings.items():
            flat.update(flatten(value) if isinstance(value, dict) else {key: value})
        parts.append('??? info "Settings"\n\n' + indented(scalars_table(flat)))
    if raw:
        parts.append('??? note "Raw data"\n\n' + indented("\n\n".join(b for b in raw if b)))
    return "\n\n".join(p for p in parts if p)


def device_label(data: Any) -> str:
    """The device a GPU results file names, flagged when it is the CPU smoke run of the GPU benchmark."""
    settings = data.get("settings", {}) if isinstance(data, dict) else {}
    device = settings.get("device", "an unnamed device")
    if settings.get("tiny_cpu_smoke_run") or settings.get("device_type") == "cpu":
        return f"{device}: CPU smoke run with tiny shapes (`--tiny`), not a GPU measurement"
    return str(device)


def gpu_part(results_dir: Path) -> str:
    """The GPU section: how to run the GPU benchmark, then one section per ``results/gpu/*.json`` (or "not measured
    yet")."""
    gpu_dir = results_dir / "gpu"
    files = sorted(gpu_dir.glob("*.json")) if gpu_dir.is_dir() else []
    sections = [benchmark_section(p, subdir="gpu/") for p in files] or [GPU_NOT_MEASURED.strip()]
    return GPU_INTRO + "\n" + "\n\n".join(sections)


def render_page(results_dir: Path = RESULTS_DIR) -> str:
    files = sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []
    sections = [benchmark_section(p) for p in files]
    if not sections:
        sections = ["No results yet: run a script in `benchmarks/`, then `python docs/gen_benchmarks.py`."]
    return INTRO + "\n" + "\n\n".join(sections) + "\n\n" + gpu_part(results_dir) + "\n"


def sync_images(results_dir: Path, images_dir: Path, check: bool) -> list[str]:
    """Copy the result PNGs into the docs (or, with ``check``, list those whose copy is missing or differs)."""
    stale = []
    for json_path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        for image in result_images(json_path):
            target = images_dir / image.name
            if target.is_file() and target.read_bytes() == image.read_bytes():
                continue
            stale.append(str(target))
            if not check:
                images_dir.mkdir(parents=True, exist_ok=True)
                target.write_bytes(image.read_bytes())
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is not up to date")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    page = render_page(args.results_dir)
    images_dir = args.output.parent / "assets" / "benchmarks"
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        stale = sync_images(args.results_dir, images_dir, check=True)
        if current != page or stale:
            print(f"{args.output} is out of date: run `python docs/gen_benchmarks.py`.", file=sys.stderr)
            return 1
        return 0
    sync_images(args.results_dir, images_dir, check=False)
    args.output.write_text(page, encoding="utf-8")
    print(f"wrote {args.output} ({page.count(chr(10) + '## ')} benchmark sections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
