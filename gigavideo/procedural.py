"""Procedural "real" clips with captions, so the tiny preset has real videos for the realism term.

A coloured square moves across a plain background; the caption says its colour and direction.
"""

from __future__ import annotations

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def make_clip(index: int, height: int = 64, width: int = 64, num_frames: int = 17, seed: int = 0):
    """Returns (uint8 frames (T, H, W, 3), caption); the same (index, seed) gives the same clip."""
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    size = max(4, min(height, width) // 4)
    background = rng.integers(90, 160)
    dy, dx = DIRECTIONS[direction]
    y0, x0 = (height - size) // 2, (width - size) // 2
    travel = (min(height, width) - size) // 2
    frames = np.full((num_frames, height, width, 3), background, dtype=np.uint8)
    for t in range(num_frames):
        shift = int(round((t / max(1, num_frames - 1) - 0.5) * 2 * travel * 0.9))
        y, x = y0 + dy * shift, x0 + dx * shift
        frames[t, y:y + size, x:x + size] = COLOURS[colour]
    caption = f"A {colour} square moves {direction} across a gray background, static camera."
    return frames, caption
