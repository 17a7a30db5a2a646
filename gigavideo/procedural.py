"""The toy world's "real" videos: one coloured square moving across a plain gray background.

A scene is a colour, a size and a direction of motion; a clip renders it and its caption
describes it in the prompt engine's format ("On a gray background: a large red square moves up.
Static camera, soft light."). The tiny preset uses these clips as its real videos; the toy
preset also pre-trains its base model on them. Real captioners leave out what they do not
find remarkable, and so can these captions (`caption_rates`): a model trained on captions
that never name the size learns colours but draws squares of any size whatever the prompt
says, the weakness the toy world's fine-tuning has to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
# Side of the square as a fraction of the frame's shorter side: drawn uniformly from SIZE_RANGE; a caption
# calls it small or large only outside the middle band (where a captioner would not commit either way).
SIZE_RANGE = (0.1875, 0.5)
SIZE_WORDS = {"small": (0.0, 0.26), "large": (0.42, 1.0)}
STYLE = {"setting": "on a gray background", "camera": "static camera", "light": "soft light"}


@dataclass(frozen=True)
class Scene:
    colour: str
    direction: str
    background: int = 128
    size: float = 0.3125

    @property
    def size_word(self) -> str | None:
        return next((word for word, (low, high) in SIZE_WORDS.items() if low <= self.size <= high), None)

    def subject(self, mention_size: bool = False) -> str:
        size = f"{self.size_word} " if mention_size and self.size_word else ""
        return f"a {size}{self.colour} square"


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))], background=int(rng.integers(112, 145)),
                 size=float(rng.uniform(*SIZE_RANGE)))


def caption(scene: Scene, mention_motion: bool = True, mention_size: bool = False) -> str:
    action = f"moves {scene.direction}" if mention_motion else "moves"
    return (f"{STYLE['setting'][0].upper()}{STYLE['setting'][1:]}: {scene.subject(mention_size)} {action}. "
            f"{STYLE['camera'][0].upper()}{STYLE['camera'][1:]}, {STYLE['light']}.")


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
        frames[t, max(0, top):top + size, max(0, left):left + size] = COLOURS[scene.colour]
    return frames


def make_clip(index: int, height: int = 64, width: int = 64, num_frames: int = 17, seed: int = 0,
              caption_rates: dict | None = None):
    """Returns (uint8 frames (T, H, W, 3), caption); the same (index, seed) gives the same clip.
    caption_rates: {"motion": p, "size": p}, the chance that the caption names the direction of
    motion and the size (when it is small or large); both 1 when not given."""
    rates = {"motion": 1.0, "size": 1.0} | (caption_rates or {})
    unknown = set(rates) - {"motion", "size"}
    if unknown:
        raise ValueError(f"caption_rates: unknown attributes {sorted(unknown)}; known: motion, size")
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    jitter = min(height, width) // 32
    offset = tuple(int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    mention_motion, mention_size = (bool(u < float(rates[k])) for u, k in zip(rng.random(2), ("motion", "size")))
    return render_scene(scene, height, width, num_frames, offset), caption(scene, mention_motion, mention_size)
