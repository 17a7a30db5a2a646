"""The toy world's "real" videos: one coloured square moving across a plain gray background.

A scene is a colour, a shade of it (plain, dark or light), a size and a direction of motion; a
clip renders it and its caption describes it in the prompt engine's format ("On a gray background:
a large dark red square moves up. Static camera, soft light."). The tiny preset uses these clips as
its real videos; the toy preset also pre-trains its base model on them. Real captioners leave out
what they do not find remarkable, and so can these captions (`caption_rates`): a model trained on
captions that seldom name the shade learns colours but draws a dark square for "a dark red square"
hardly more often than a third of the time, the weakness the toy world's fine-tuning has to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gigavideo.errors import ConfigError

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
# Side of the square as a fraction of the frame's shorter side: drawn uniformly from SIZE_RANGE; a caption
# calls it small or large only outside the middle band (where a captioner would not commit either way).
SIZE_RANGE = (0.1875, 0.5)
SIZE_WORDS = {"small": (0.0, 0.26), "large": (0.42, 1.0)}
# A shade mixes the colour towards black or white (the fraction of the colour kept, the mix's end point).
SHADES = {"dark": (0.5, 0), "light": (0.45, 255)}
CAPTIONED = ("motion", "size", "shade")  # what a caption may name besides the colour
STYLE = {"setting": "on a gray background", "camera": "static camera", "light": "soft light"}


@dataclass(frozen=True)
class Scene:
    colour: str
    direction: str
    background: int = 128
    size: float = 0.3125
    shade: str | None = None

    @property
    def rgb(self) -> tuple[int, ...]:
        return shaded(self.colour, self.shade)

    @property
    def size_word(self) -> str | None:
        return next((word for word, (low, high) in SIZE_WORDS.items() if low <= self.size <= high), None)

    def subject(self, mention_size: bool = False, mention_shade: bool = False) -> str:
        size = f"{self.size_word} " if mention_size and self.size_word else ""
        shade = f"{self.shade} " if mention_shade and self.shade else ""
        return f"a {size}{shade}{self.colour} square"


def shaded(colour: str, shade: str | None) -> tuple[int, ...]:
    if shade is None:
        return COLOURS[colour]
    keep, end = SHADES[shade]
    return tuple(int(keep * c + (1 - keep) * end) for c in COLOURS[colour])


def sample_scene(rng: np.random.Generator, size_range=SIZE_RANGE) -> Scene:
    return Scene(
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
        background=int(rng.integers(112, 145)),
        size=float(rng.uniform(*size_range)),
        shade=[None, *SHADES][rng.integers(len(SHADES) + 1)],
    )


def caption(scene: Scene, mention_motion: bool = True, mention_size: bool = False, mention_shade: bool = False) -> str:
    action = f"moves {scene.direction}" if mention_motion else "moves"
    subject = scene.subject(mention_size, mention_shade)
    return (
        f"{STYLE['setting'][0].upper()}{STYLE['setting'][1:]}: {subject} {action}. "
        f"{STYLE['camera'][0].upper()}{STYLE['camera'][1:]}, {STYLE['light']}."
    )


def render_scene(scene: Scene, height: int, width: int, num_frames: int, offset=(0, 0)) -> np.ndarray:
    """uint8 frames (T, H, W, 3): the square crosses the middle of the frame in its direction."""
    size = max(2, round(min(height, width) * scene.size))
    travel = (min(height, width) - size) // 2
    dy, dx = DIRECTIONS[scene.direction]
    frames = np.full((num_frames, height, width, 3), scene.background, dtype=np.uint8)
    for t in range(num_frames):
        shift = (t / max(1, num_frames - 1) - 0.5) * 2 * travel * 0.8
        cy = (height - 1) / 2 + offset[0] + dy * shift
        cx = (width - 1) / 2 + offset[1] + dx * shift
        top, left = (int(np.floor(c - (size - 1) / 2 + 0.5)) for c in (cy, cx))
        frames[t, max(0, top) : top + size, max(0, left) : left + size] = scene.rgb
    return frames


def make_clip(
    index: int,
    height: int = 64,
    width: int = 64,
    num_frames: int = 17,
    seed: int = 0,
    caption_rates: dict | None = None,
    size_range=SIZE_RANGE,
):
    """Returns (uint8 frames (T, H, W, 3), caption); the same (index, seed) gives the same clip.
    caption_rates: {"motion": p, "size": p, "shade": p}, the chance that the caption names the direction
    of motion, the size (when it is small or large) and the shade (when it is dark or light); 1 when not given.
    A shade's own rate ({"dark": p, "light": p}) replaces "shade" for the clips of that shade.
    size_range: the square's side is drawn uniformly from it (a fraction of the frame's shorter side)."""
    unknown = set(caption_rates or {}) - set(CAPTIONED) - set(SHADES)
    if unknown:
        known = ", ".join((*CAPTIONED, *SHADES))
        raise ConfigError(f"caption_rates: unknown attributes {sorted(unknown)}; known: {known}")
    rates = dict.fromkeys(CAPTIONED, 1.0) | (caption_rates or {})
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, size_range)
    rates["shade"] = rates.get(scene.shade, rates["shade"])
    jitter = min(height, width) // 32
    offset = tuple(int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    mentions = (bool(u < float(rates[k])) for u, k in zip(rng.random(len(CAPTIONED)), CAPTIONED, strict=False))
    return render_scene(scene, height, width, num_frames, offset), caption(scene, *mentions)
