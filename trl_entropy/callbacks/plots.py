"""PNG figures of the entropy statistics that :class:`~trl_entropy.callbacks.EntropyStatsCallback` writes to
``entropy_stats.jsonl``: quantile bands over steps, histograms at chosen steps (log-scale counts: most tokens sit near
0 nats with a long tail), collapse signals and the most frequent forking tokens.

Needs matplotlib (``pip install matplotlib``, or the ``[plots]`` extra). Figures are built with matplotlib's object
API, so importing this module never changes the global pyplot backend.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "load_checked_stats",
    "write_plots",
    "load_entropy_stats",
    "plot_collapse_signals",
    "plot_histograms",
    "plot_quantile_bands",
    "plot_top_tokens",
]

INSTALL_HINT = "pip install matplotlib"
# The callback's scalar prefix (trl_entropy.callbacks.METRIC_PREFIX, not imported: this module runs without torch) and
# the one trl-entropy 0.1.0 wrote, which load_entropy_stats reads under the current names.
_PREFIX = "sampling_entropy/"
_LEGACY_PREFIX = "entropy/"
_QUANTILE_KEY = re.compile(r"^sampling_entropy/p(\d+(?:\.\d+)?)$")
_SIGNALS = (
    (f"{_PREFIX}frac_above_forking_threshold", "Tokens above the reference forking threshold", "fraction of tokens"),
    (f"{_PREFIX}trend_slope", "Mean-entropy trend", "nats per step"),
    (f"{_PREFIX}repetition_rate", "Repeated n-grams within a completion", "fraction of n-grams"),
    (f"{_PREFIX}completion_length", "Completion length", "tokens"),
    (f"{_PREFIX}reward_correlation", "corr(entropy reward, accuracy reward)", "Pearson r"),
)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"Plotting entropy statistics needs matplotlib; install it with `{INSTALL_HINT}`.") from err
    return Figure


# Keys of every record EntropyStatsCallback writes, with the type each must have.
_STATS_KEYS = {"metrics": dict, "histogram": dict, "num_tokens": int}


def _is_stats_record(record: dict[str, Any]) -> bool:
    return all(isinstance(record.get(key), kind) for key, kind in _STATS_KEYS.items())


def _current_metric_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """A record's scalars under the current names: trl-entropy 0.1.0 wrote ``entropy/<name>`` for what is now
    ``sampling_entropy/<name>`` (the record's ``metrics`` hold the callback's scalars only)."""
    renamed = {}
    for key, value in metrics.items():
        current = _PREFIX + key[len(_LEGACY_PREFIX) :] if key.startswith(_LEGACY_PREFIX) else key
        renamed.setdefault(current, value)
    return renamed


def load_entropy_stats(path: str | Path) -> list[dict[str, Any]]:
    """The records of an ``entropy_stats.jsonl`` file sorted by step (the last record wins for a repeated step),
    with the scalars of files written by trl-entropy 0.1.0 (``entropy/mean``...) under their current names
    (``sampling_entropy/mean``...). Blank, torn or malformed lines are skipped with a warning."""
    records: dict[int, dict[str, Any]] = {}
    skipped = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                skipped += 1
                continue
            if isinstance(record.get("metrics"), dict):
                record["metrics"] = _current_metric_names(record["metrics"])
            records[record["step"]] = record
    if skipped:
        logger.warning("Skipped %d malformed line(s) in %s.", skipped, path)
    return [records[step] for step in sorted(records)]


def load_checked_stats(path: str | Path) -> list[dict[str, Any]]:
    """The records of an ``entropy_stats.jsonl``, refusing in one line an empty file or one another writer made."""
    records = load_entropy_stats(path)
    if not records:
        raise ValueError(f"`stats_file` {path} holds no entropy stats record.")
    foreign = [r for r in records if not _is_stats_record(r)]
    if foreign:
        # Another JSONL with a "step" field (a trainer log, a generation output) would draw blank figures.
        keys = ", ".join(sorted(foreign[0])[:8])
        raise ValueError(
            f"`stats_file` {path} is not an entropy_stats.jsonl of EntropyStatsCallback: "
            f"{len(foreign)} of {len(records)} records lack {' / '.join(repr(k) for k in _STATS_KEYS)} (step "
            f"{foreign[0]['step']} has: {keys})."
        )
    return records


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of metric ``key`` over the records that have a finite value for it."""
    steps, values = [], []
    for record in records:
        value = record.get("metrics", {}).get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return np.asarray(steps), np.asarray(values)


def _logged_quantiles(records: Sequence[dict[str, Any]]) -> list[float]:
    found = set()
    for record in records:
        for key in record.get("metrics", {}):
            match = _QUANTILE_KEY.match(key)
            if match:
                found.add(float(match.group(1)))
    return sorted(found)


def _label(percent: float) -> str:
    return f"p{percent:g}"


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _markers(steps: np.ndarray) -> dict[str, Any]:
    # Markers only when points are few enough to tell apart.
    return {"marker": "o", "markersize": 3} if len(steps) <= 30 else {}


def plot_quantile_bands(records: Sequence[dict[str, Any]], log_y: bool = False):
    """Entropy quantiles over steps: shaded bands between symmetric quantiles (p10-p90, p25-p75), the median, the
    mean, the forking threshold, and any unpaired quantile (e.g. p99) as a line."""
    figure = _figure_class()(figsize=(8, 4.5), layout="constrained")
    ax = figure.add_subplot()
    percents = _logged_quantiles(records)
    paired = set()
    bands = [(p, 100 - p) for p in percents if p < 50 and (100 - p) in percents]
    for index, (low, high) in enumerate(bands):  # outer bands first, lighter
        steps, lower = _series(records, f"{_PREFIX}{_label(low)}")
        steps_high, upper = _series(records, f"{_PREFIX}{_label(high)}")
        if len(steps) and np.array_equal(steps, steps_high):
            alpha = 0.18 + 0.22 * index / max(len(bands) - 1, 1)
            ax.fill_between(
                steps, lower, upper, color="tab:blue", alpha=alpha, lw=0, label=f"{_label(low)}-{_label(high)}"
            )
            paired.update({low, high})
    styles = {50.0: {"color": "tab:blue", "lw": 2, "label": "median"}}
    for percent in percents:
        if percent in paired:
            continue
        steps, values = _series(records, f"{_PREFIX}{_label(percent)}")
        style = styles.get(percent, {"color": "tab:purple", "lw": 1, "ls": ":", "label": _label(percent)})
        ax.plot(steps, values, **style, **_markers(steps))
    steps, values = _series(records, f"{_PREFIX}mean")
    ax.plot(steps, values, color="black", lw=1.2, ls="--", label="mean", **_markers(steps))
    steps, values = _series(records, f"{_PREFIX}forking_threshold")
    if len(steps):
        ratio = records[-1].get("forking", {}).get("ratio")
        label = f"forking threshold (top {100 * ratio:g}%)" if isinstance(ratio, (int, float)) else "forking threshold"
        ax.plot(steps, values, color="tab:red", lw=1, ls="-.", label=label)
    ax.set_xlabel("training step")
    _integer_steps(ax)
    ax.set_ylabel("token entropy (nats)")
    ax.set_title("Token entropy over training")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return figure


def _pick_steps(records: Sequence[dict[str, Any]], steps: Sequence[int] | None, count: int) -> list[dict[str, Any]]:
    with_histogram = [r for r in records if r.get("histogram", {}).get("counts")]
    if not with_histogram:
        return []
    if steps:
        available = np.asarray([r["step"] for r in with_histogram])
        chosen = {int(np.abs(available - s).argmin()) for s in steps}
    else:
        chosen = {int(round(i)) for i in np.linspace(0, len(with_histogram) - 1, min(count, len(with_histogram)))}
    return [with_histogram[i] for i in sorted(chosen)]


def _coarsen(counts: Sequence[int], edges: Sequence[float], tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent bins (exact sums) down to about ``2 sqrt(tokens)`` bins, at least 10, so a histogram of few
    tokens is not mostly sampling noise."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    target = int(np.clip(2 * math.sqrt(max(tokens, 1)), 10, len(counts)))
    factor = max(1, math.ceil(len(counts) / target))
    if factor == 1:
        return counts, edges
    padded = np.concatenate([counts, np.zeros((-len(counts)) % factor)])
    merged_edges = edges[::factor] if (len(edges) - 1) % factor == 0 else np.append(edges[::factor], edges[-1])
    return padded.reshape(-1, factor).sum(axis=1), merged_edges


def plot_histograms(records: Sequence[dict[str, Any]], steps: Sequence[int] | None = None, max_histograms: int = 5):
    """Token-entropy histograms at a few steps, as fractions of the step's tokens on a log scale (adjacent bins are
    merged when the steps hold few tokens)."""
    figure = _figure_class()(figsize=(8, 4.5), layout="constrained")
    ax = figure.add_subplot()
    chosen = _pick_steps(records, steps, max_histograms)
    if not chosen:
        ax.text(0.5, 0.5, "no histogram recorded", ha="center", va="center", transform=ax.transAxes)
        return figure
    from matplotlib import colormaps

    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(chosen)))
    fewest = min(sum(r["histogram"]["counts"]) for r in chosen)
    occupied: list[int] = []
    edges = np.zeros(0)
    for color, record in zip(colors, chosen):
        counts, edges = _coarsen(record["histogram"]["counts"], record["histogram"]["edges"], fewest)
        fractions = counts / max(counts.sum(), 1.0)
        occupied.extend(np.flatnonzero(counts).tolist())
        # Empty bins are gaps on a log axis rather than a drop to an arbitrary floor.
        label = f"step {record['step']}"
        ax.stairs(np.where(fractions > 0, fractions, np.nan), edges, color=color, lw=1.6, label=label)
    ax.set_yscale("log")
    ax.set_ylim(top=1.5)  # fractions never exceed 1
    if occupied:
        first, last = min(occupied), max(occupied)
        # The occupied range (from 0 when low bins are used, as for any trained model) plus two empty bins.
        low = 0 if first <= len(edges) // 4 else max(first - 2, 0)
        ax.set_xlim(edges[low], edges[min(last + 3, len(edges) - 1)])
        if last - first < 3:
            # A near-uniform random model puts every token within a hair of log V: say so instead of a lone bar.
            low_value = min(r["min"] for r in chosen if isinstance(r.get("min"), (int, float)))
            high_value = max(r["max"] for r in chosen if isinstance(r.get("max"), (int, float)))
            note = f"all tokens lie in [{low_value:.4g}, {high_value:.4g}] nats;\nthe quantile plot shows their spread"
            ax.text(0.02, 0.95, note, transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xlabel("token entropy (nats)")
    ax.set_ylabel("fraction of tokens (log scale)")
    ax.set_title("Token-entropy distribution")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    return figure


def plot_collapse_signals(records: Sequence[dict[str, Any]]):
    """One small panel per collapse signal that was logged: fraction of tokens above the reference forking threshold,
    entropy trend, repetition rate, completion length and the entropy/accuracy reward correlation."""
    available = [(key, title, unit) for key, title, unit in _SIGNALS if len(_series(records, key)[0])]
    columns = 2
    rows = max(1, math.ceil(len(available) / columns))
    figure = _figure_class()(figsize=(9, 2.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (key, title, unit) in zip(axes, available):
        steps, values = _series(records, key)
        ax.plot(steps, values, color="tab:blue", lw=1.5, **_markers(steps))
        if key in (f"{_PREFIX}trend_slope", f"{_PREFIX}reward_correlation"):
            ax.axhline(0.0, color="gray", lw=0.8)
        if key == f"{_PREFIX}reward_correlation":
            ax.set_ylim(-1.05, 1.05)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        ax.set_xlabel("training step", fontsize=9)
        _integer_steps(ax)
        ax.grid(alpha=0.3)
    for ax in axes[len(available) :]:
        ax.set_visible(False)
    if not available:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no collapse signal recorded", ha="center", va="center", transform=axes[0].transAxes)
    figure.suptitle("Entropy-collapse signals")
    return figure


def plot_top_tokens(records: Sequence[dict[str, Any]], n: int = 20):
    """The tokens most often among each micro-batch's top-rho entropies, summed over all logged steps, with their
    mean entropy."""
    totals: dict[tuple[int, str], list[float]] = {}
    for record in records:
        for row in record.get("top_tokens") or []:
            entry = totals.setdefault((row["id"], row["token"]), [0.0, 0.0])
            entry[0] += row["count"]
            entry[1] += row["count"] * row["mean_entropy"]
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0][0]))[:n]
    figure = _figure_class()(figsize=(8, 0.3 * max(len(ranked), 4) + 1.2), layout="constrained")
    ax = figure.add_subplot()
    if not ranked:
        ax.text(0.5, 0.5, "no forking tokens recorded", ha="center", va="center", transform=ax.transAxes)
        return figure
    labels = [json.dumps(text, ensure_ascii=False) for (_, text), _ in ranked]
    counts = [entry[0] for _, entry in ranked]
    means = [entry[1] / entry[0] for _, entry in ranked]
    positions = np.arange(len(ranked))
    bars = ax.barh(positions, counts, color="tab:orange")
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    for bar, mean in zip(bars, means):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {mean:.2f} nats", va="center", fontsize=7)
    ax.set_xlim(0, max(counts) * 1.18)
    ax.set_xlabel("times among a micro-batch's highest-entropy tokens (summed over each logged step's top list)")
    ax.set_title("Most frequent forking tokens (label: mean entropy)")
    return figure


def plot_diagnosis(result: dict[str, Any], path: str | Path) -> Path:
    """The PNG of ``trl-entropy diagnose``: accuracies (greedy, sampled, majority@k, pass@k) or, without answers, the
    label-free agreement; and the sequence entropy of the samples, split by correctness when answers are known."""
    figure = _figure_class()(figsize=(10, 3.8))
    left, right = figure.subplots(1, 2)
    settings = result["settings"]
    k = settings["num_samples"]
    if result["has_answers"]:
        names = ["greedy", f"sampled T={settings['temperature']:g}", f"majority@{k}", f"pass@{k}"]
        values = [result["greedy"]["accuracy"], result["sampled"]["accuracy"], result["majority_at_k"]]
        values.append(result["pass_at_k"])
        left.set_ylabel("accuracy")
    else:
        names = ["agree with majority", "greedy = majority", "parsed (sampled)"]
        free = result["label_free"]
        values = [free["majority_agreement"], free["greedy_is_majority"], result["sampled"]["parse_rate"]]
        left.set_ylabel("fraction")
    left.bar(range(len(values)), values, color=["tab:blue", "tab:orange", "tab:green", "tab:purple"][: len(values)])
    left.set_xticks(range(len(values)))
    left.set_xticklabels(names, fontsize=8)
    left.set_ylim(0, 1)
    left.set_title(
        f"{settings['num_prompts']} prompts, budget {settings['max_new_tokens']} tokens "
        f"({100 * result['sampled']['truncation_rate']:.0f}% of samples cut off)",
        fontsize=8,
    )
    samples = result.get("per_sample")
    if samples:
        for correct, colour in ((True, "tab:green"), (False, "tab:red")):
            values = [
                s["sequence_entropy"]
                for s in samples
                if s["correct"] == correct and np.isfinite(s["sequence_entropy"])
            ]
            if values:
                label = f"{'correct' if correct else 'incorrect'} ({len(values)})"
                right.hist(values, bins=20, alpha=0.5, color=colour, label=label)
        separation = result["confidence"]["sequence_entropy"]
        if separation is not None:
            low, high = separation["auroc_ci95"]
            right.set_title(
                f"AUROC of minus entropy for correctness {separation['auroc']:.2f} [{low:.2f}, {high:.2f}]", fontsize=8
            )
        right.legend(fontsize=8)
    else:
        right.set_title("sequence entropy of the samples (no answers)", fontsize=8)
    right.set_xlabel("sequence entropy (mean token entropy, nats)")
    right.set_ylabel("samples")
    verdict = result["verdict"]
    figure.suptitle(f"trl-entropy diagnose: {verdict['verdict']}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def write_plots(
    stats_file: str | Path,
    output_dir: str | Path,
    steps: Sequence[int] | None = None,
    max_histograms: int = 5,
    log_y: bool = False,
    dpi: int = 120,
) -> list[Path]:
    """Write the four PNG figures of an ``entropy_stats.jsonl`` to ``output_dir`` and return their paths (what
    ``trl-entropy plot`` and :class:`~trl_entropy.callbacks.EntropyStatsCallback` at the end of training write)."""
    records = load_checked_stats(stats_file)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "entropy_quantiles.png": plot_quantile_bands(records, log_y=log_y),
        "entropy_histograms.png": plot_histograms(records, steps, max_histograms),
        "entropy_signals.png": plot_collapse_signals(records),
        "entropy_top_tokens.png": plot_top_tokens(records),
    }
    paths = []
    for name, figure in figures.items():
        path = output_dir / name
        figure.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
