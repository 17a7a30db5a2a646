"""The toy world's "real" videos: one coloured square moving across a plain gray background.

A scene is a colour and a direction of motion; a clip renders it and its caption
describes it in the prompt engine's format ("On a gray background: a red square moves up.
Static camera, soft light."). The tiny preset uses these clips as its real videos; the toy
preset also pre-trains its base model on them. Real captioners rarely name the direction of
motion, and so do these captions (only a `motion_caption_rate` fraction of them do): a model
trained on them learns colours but not directions, the weakness the toy world's
fine-tuning has to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
STYLE = {"setting": "on a gray background", "camera": "static camera", "light": "soft light"}


@dataclass(frozen=True)
class Scene:
    colour: str
    direction: str
    background: int = 128

    @property
    def subject(self) -> str:
        return f"a {self.colour} square"


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(colour=list(COLOURS)[rng.integers(len(COLOURS))], direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))], background=int(rng.integers(112, 145)))


def caption(scene: Scene, mention_motion: bool = True) -> str:
    action = f"moves {scene.direction}" if mention_motion else "moves"
    return (f"{STYLE['setting'][0].upper()}{STYLE['setting'][1:]}: {scene.subject} {action}. "
            f"{STYLE['camera'][0].upper()}{STYLE['camera'][1:]}, {STYLE['light']}.")


def render_scene(scene: Scene, height: int, width: int, num_frames: int, offset=(0, 0)) -> np.ndarray:
    """uint8 frames (T, H, W, 3): the square crosses the middle of the frame in its direction."""
    size = max(4, min(height, width) * 5 // 16)
    travel = (min(height, width) - size) // 2
    dy, dx = DIRECTIONS[scene.direction]
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.full((num_frames, height, width, 3), scene.background, dtype=np.uint8)
    for t in range(num_frames):
        shift = (t / max(1, num_frames - 1) - 0.5) * 2 * travel * 0.8
        cy = (height - 1) / 2 + offset[0] + dy * shift
        cx = (width - 1) / 2 + offset[1] + dx * shift
        inside = (np.abs(yy - cy) <= size / 2 - 0.5) & (np.abs(xx - cx) <= size / 2 - 0.5)
        frames[t][inside] = COLOURS[scene.colour]
    return frames


def make_clip(index: int, height: int = 64, width: int = 64, num_frames: int = 17, seed: int = 0,
              motion_caption_rate: float = 1.0):
    """Returns (uint8 frames (T, H, W, 3), caption); the same (index, seed) gives the same clip."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    jitter = min(height, width) // 32
    offset = tuple(int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    mention = bool(rng.random() < motion_caption_rate)
    return render_scene(scene, height, width, num_frames, offset), caption(scene, mention)
