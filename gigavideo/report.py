"""Small report figures drawn with PIL (no plotting library needed): histograms and grouped bar charts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def histogram_png(values, path: Path, title: str, bins: int = 10, size=(420, 260)) -> str:
    """A histogram of values in [0, 1] saved as a PNG; returns the file name."""
    counts, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0, 1))
    width, height = size
    left, bottom, top = 40, height - 30, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    bar = (width - left - 10) / bins
    peak = max(1, counts.max())
    for i, count in enumerate(counts):
        x0 = left + i * bar
        y0 = bottom - (bottom - top) * count / peak
        draw.rectangle([x0 + 1, y0, x0 + bar - 1, bottom], fill=(70, 110, 190))
        if count:
            draw.text((x0 + 2, y0 - 12), str(int(count)), fill="black")
    draw.line([left, bottom, width - 10, bottom], fill="black")
    for i in range(0, bins + 1, 2):
        draw.text((left + i * bar - 6, bottom + 6), f"{edges[i]:.1f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path.name


BAR_COLOURS = [(150, 150, 150), (70, 110, 190), (200, 200, 200), (140, 170, 230), (230, 170, 110), (200, 90, 40)]


def bar_chart_png(groups: dict[str, dict[str, float]], path: Path, title: str, size=(0, 300)) -> str:
    """Grouped bars (one group per dimension, one bar per series, values 0-100) with a legend; returns the name."""
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    bar = 14
    group_width = max(bar * len(series) + 16, 110)
    width = max(size[0], 60 + group_width * len(groups), 420)
    height = size[1] + 16 * len(series)
    left, top, bottom = 40, 30, size[1] - 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    for tick in range(0, 101, 25):
        y = bottom - (bottom - top) * tick / 100
        draw.line([left - 4, y, width - 10, y], fill=(225, 225, 225))
        draw.text((8, y - 6), str(tick), fill="black")
    for g, (name, values) in enumerate(groups.items()):
        x = left + 8 + g * group_width
        for s, label in enumerate(series):
            if values.get(label) is None:
                continue
            value = float(np.clip(values[label], 0, 100))
            draw.rectangle(
                [x + s * bar, bottom - (bottom - top) * value / 100, x + (s + 1) * bar - 2, bottom],
                fill=BAR_COLOURS[s % len(BAR_COLOURS)],
            )
        draw.text((x, bottom + 6), name[: group_width // 6 - 1], fill="black")
    draw.line([left, bottom, width - 10, bottom], fill="black")
    for s, label in enumerate(series):
        y = size[1] - 28 + 16 * s
        draw.rectangle([left, y, left + 10, y + 10], fill=BAR_COLOURS[s % len(BAR_COLOURS)])
        draw.text((left + 16, y), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path.name
