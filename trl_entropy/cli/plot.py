"""``trl-entropy plot``: the PNG figures of a training run's ``entropy_stats.jsonl`` (the figures themselves are
:mod:`trl_entropy.callbacks.plots`')."""

from __future__ import annotations

from pathlib import Path

from ..callbacks.plots import (
    load_checked_stats,
    plot_collapse_signals,
    plot_histograms,
    plot_quantile_bands,
    plot_top_tokens,
)
from .arguments import PlotArguments

__all__ = ["run_plot"]


def run_plot(args: PlotArguments) -> list[Path]:
    """Write the PNG figures for ``args`` and return their paths."""
    records = load_checked_stats(args.stats_file)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "entropy_quantiles.png": plot_quantile_bands(records, log_y=args.log_y),
        "entropy_histograms.png": plot_histograms(records, args.steps, args.max_histograms),
        "entropy_signals.png": plot_collapse_signals(records),
        "entropy_top_tokens.png": plot_top_tokens(records),
    }
    paths = []
    for name, figure in figures.items():
        path = output_dir / name
        figure.savefig(path, dpi=args.dpi)
        paths.append(path)
    return paths
