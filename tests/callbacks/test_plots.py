"""trl_entropy.callbacks.plots: PNG files from an entropy_stats.jsonl, what the figures draw, and errors."""

import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from trl_entropy.callbacks import append_jsonl_record  # noqa: E402
from trl_entropy.callbacks.plots import (  # noqa: E402
    load_entropy_stats,
    plot_collapse_signals,
    plot_histograms,
    plot_quantile_bands,
)
from trl_entropy.cli.arguments import PlotArguments  # noqa: E402
from trl_entropy.cli.plot import run_plot  # noqa: E402
from trl_entropy.distribution import EntropyDistribution  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def synthetic_records(steps: int = 12) -> list[dict]:
    """Records in the callback's format, from sketches of entropies that collapse towards 0 over training."""
    g = torch.Generator().manual_seed(0)
    records = []
    for step in range(1, steps + 1):
        scale = 2.0 * 0.85**step
        values = torch.exp(torch.randn(4000, generator=g) * 2.0 - 3.0) * scale * 10
        values = values.clamp(max=math.log(1000))
        sketch = EntropyDistribution(math.log(1000), bins=50)
        sketch.update(values)
        quantiles = sketch.quantiles(list(QUANTILES) + [0.8])
        counts, edges = sketch.histogram()
        metrics = {"sampling_entropy/mean": sketch.mean, "sampling_entropy/std": sketch.std}
        metrics.update({f"sampling_entropy/p{100 * q:g}": v for q, v in zip(QUANTILES, quantiles)})
        metrics["sampling_entropy/forking_threshold"] = quantiles[-1]
        metrics["sampling_entropy/frac_above_forking_threshold"] = (
            sketch.fraction_above(records[0]["forking"]["threshold"]) if records else 0.2
        )
        metrics["sampling_entropy/repetition_rate"] = 0.01 * step
        metrics["sampling_entropy/completion_length"] = 100.0 - step
        if step > 1:
            metrics["sampling_entropy/trend_slope"] = -0.05
        records.append(
            {
                "step": step,
                "num_tokens": sketch.count,
                "min": sketch.min,
                "max": sketch.max,
                "metrics": metrics,
                "forking": {"ratio": 0.2, "threshold": quantiles[-1], "reference_threshold": quantiles[-1]},
                "top_tokens": [
                    {"id": 7, "token": " wait", "count": 30 - step, "mean_entropy": 2.5},
                    {"id": 9, "token": " so", "count": 10, "mean_entropy": 1.5},
                ],
                "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            }
        )
    return records


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "entropy_stats.jsonl"
    for record in synthetic_records():
        append_jsonl_record(path, record)
    return path


def test_run_plot_writes_pngs_next_to_the_stats(stats_file):
    paths = run_plot(PlotArguments(stats_file=str(stats_file.parent)))
    assert sorted(p.name for p in paths) == [
        "entropy_histograms.png",
        "entropy_quantiles.png",
        "entropy_signals.png",
        "entropy_top_tokens.png",
    ]
    for path in paths:
        assert path.parent == stats_file.parent / "entropy_plots"
        assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 5000


def test_quantile_figure_draws_the_logged_values(stats_file):
    records = load_entropy_stats(stats_file)
    figure = plot_quantile_bands(records)
    ax = figure.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["median"].get_ydata(), [r["metrics"]["sampling_entropy/p50"] for r in records])
    np.testing.assert_allclose(lines["mean"].get_ydata(), [r["metrics"]["sampling_entropy/mean"] for r in records])
    np.testing.assert_allclose(lines["p99"].get_ydata(), [r["metrics"]["sampling_entropy/p99"] for r in records])
    labels = ax.get_legend_handles_labels()[1]
    assert "p10-p90" in labels and "p25-p75" in labels and "forking threshold (top 20%)" in labels


def test_histogram_figure_uses_the_nearest_steps_and_fractions(stats_file):
    records = load_entropy_stats(stats_file)
    figure = plot_histograms(records, steps=[2, 100])
    ax = figure.axes[0]
    assert ax.get_legend_handles_labels()[1] == ["step 2", "step 12"]
    assert ax.get_yscale() == "log"
    drawn = ax.patches[0].get_data().values
    counts = np.asarray(records[1]["histogram"]["counts"], dtype=float)
    np.testing.assert_allclose(np.nan_to_num(drawn), counts / counts.sum())
    default = plot_histograms(records, max_histograms=3)
    first, middle, last = default.axes[0].get_legend_handles_labels()[1]
    assert (first, last) == ("step 1", "step 12") and middle in ("step 6", "step 7")  # evenly spaced


def test_histograms_of_few_tokens_merge_adjacent_bins_exactly():
    (record,) = synthetic_records(1)
    counts = np.zeros(50, dtype=int)
    counts[[0, 1, 2, 7, 30, 49]] = [40, 30, 19, 8, 2, 1]  # 100 tokens: sampling noise at 50 bins
    record["histogram"]["counts"] = counts.tolist()
    data = plot_histograms([record]).axes[0].patches[0].get_data()
    # About 2 sqrt(100) = 20 bins wanted: groups of ceil(50 / 20) = 3 bins, summed exactly.
    np.testing.assert_allclose(np.nan_to_num(data.values), np.add.reduceat(counts, range(0, 50, 3)) / 100)
    assert data.edges[0] == 0.0 and data.edges[-1] == record["histogram"]["edges"][-1]


def test_signal_panels_follow_the_logged_signals(stats_file):
    records = load_entropy_stats(stats_file)
    titles = [ax.get_title() for ax in plot_collapse_signals(records).axes if ax.get_visible()]
    assert titles == [
        "Tokens above the reference forking threshold",
        "Mean-entropy trend",
        "Repeated n-grams within a completion",
        "Completion length",
    ]  # no reward-correlation panel: that signal was never logged


def test_load_skips_torn_lines_and_keeps_the_last_record_per_step(tmp_path):
    path = tmp_path / "entropy_stats.jsonl"
    records = synthetic_records(3)
    for record in records + [dict(records[1], num_tokens=-1)]:
        append_jsonl_record(path, record)
    with open(path, "a") as handle:
        handle.write("\n[1, 2]\n" + '{"step": 4, "met')
    loaded = load_entropy_stats(path)
    assert [r["step"] for r in loaded] == [1, 2, 3]
    assert loaded[1]["num_tokens"] == -1


def test_argument_errors_name_the_parameter(stats_file, tmp_path):
    with pytest.raises(ValueError, match="stats_file"):
        PlotArguments(stats_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="max_histograms"):
        PlotArguments(stats_file=str(stats_file), max_histograms=0)
    with pytest.raises(ValueError, match="dpi"):
        PlotArguments(stats_file=str(stats_file), dpi=10)
    with pytest.raises(ValueError, match="steps"):
        PlotArguments(stats_file=str(stats_file), steps=[])
    empty = tmp_path / "empty" / "entropy_stats.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(ValueError, match="no entropy stats record"):
        run_plot(PlotArguments(stats_file=str(empty)))


def test_missing_matplotlib_names_the_extra(stats_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_quantile_bands(load_entropy_stats(stats_file))
