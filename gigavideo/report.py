"""Small report figures drawn with PIL (no plotting library needed)."""

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
