"""Report figures with matplotlib (Agg: files only, no display): reward histograms and grouped bar charts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BAR_COLOURS = ["#969696", "#466ebe", "#c8c8c8", "#8caae6", "#e6aa6e", "#c85a28"]


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=size, dpi=100)


def _save(plt, fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path.name


def histogram_png(values, path: Path, title: str, bins: int = 10) -> str:
    """A histogram of values in [0, 1] saved as a PNG; returns the file name."""
    plt, fig, ax = _figure((4.2, 2.6))
    ax.hist(np.clip(values, 0, 1), bins=bins, range=(0, 1), color=BAR_COLOURS[1], edgecolor="white")
    ax.set(title=title, xlabel="reward", ylabel="videos", xlim=(0, 1))
    return _save(plt, fig, path)


def bar_chart_png(
    groups: dict[str, dict[str, float]], path: Path, title: str, intervals: dict[str, dict[str, tuple]] | None = None
) -> str:
    """Grouped bars (one group per dimension, one bar per series, values 0-100) with a legend; a bar with an
    entry in intervals ({group: {series: (low, high)}}) gets that interval as an error bar. Returns the name."""
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    plt, fig, ax = _figure((max(6.4, 1.5 + 0.4 * max(1, len(series)) * max(1, len(groups))), 4.0))
    width = 0.8 / max(1, len(series))
    for s, label in enumerate(series):
        xs, heights, errors = [], [], [[], []]
        for g, values in enumerate(groups.values()):
            if values.get(label) is None:
                continue
            xs.append(g + (s - (len(series) - 1) / 2) * width)
            heights.append(values[label])
            low, high = ((intervals or {}).get(list(groups)[g], {}).get(label)) or (values[label], values[label])
            errors[0].append(values[label] - low)
            errors[1].append(high - values[label])
        ax.bar(xs, heights, width, label=label, color=BAR_COLOURS[s % len(BAR_COLOURS)])
        if any(errors[0]) or any(errors[1]):
            ax.errorbar(xs, heights, yerr=np.abs(errors), fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    ax.set(title=title, ylim=(0, 100), ylabel="score (x100)")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(3, max(1, len(series))))
    return _save(plt, fig, path)
