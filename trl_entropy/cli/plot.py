"""``trl-entropy plot``: the PNG figures of a training run's ``entropy_stats.jsonl`` (the figures themselves are
:mod:`trl_entropy.callbacks.plots`')."""

from __future__ import annotations

from pathlib import Path

from ..callbacks.plots import write_plots
from .arguments import PlotArguments

__all__ = ["run_plot"]


def run_plot(args: PlotArguments) -> list[Path]:
    """Write the PNG figures for ``args`` (:func:`trl_entropy.callbacks.plots.write_plots`) and return their paths."""
    return write_plots(
        args.stats_file,
        args.output_dir,
        steps=args.steps,
        max_histograms=args.max_histograms,
        log_y=args.log_y,
        dpi=args.dpi,
    )
