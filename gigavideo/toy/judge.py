"""The toy world's judge: answers yes/no questions about colour, shade, size and direction of motion
from the pixels (saturated-pixel segmentation, its mean colour, its area and the centroid's track).

It has the stage-3 judge interface (`score_many`) and needs no model; `score.judge = "toy"` names it.
"""

from __future__ import annotations

import re

import numpy as np

from gigavideo.toy.clips import COLOURS, DIRECTIONS, SHADES, SIZE_WORDS, shaded


def track(frames: np.ndarray, saturation: int = 40) -> dict:
    """Segment the saturated (coloured) pixels of each frame: mean colour and the centroid's track."""
    f = frames.astype(np.float32)
    mask = (f.max(-1) - f.min(-1)) > saturation
    visible = mask.reshape(len(frames), -1).sum(1) >= 3
    centroids = np.array(
        [np.argwhere(m).mean(0) if v else (np.nan, np.nan) for m, v in zip(mask, visible, strict=True)]
    )
    colour = f[mask].mean(0) if mask.any() else np.zeros(3)
    side = np.sqrt(np.median(mask.reshape(len(frames), -1).sum(1))) / min(frames.shape[1:3])
    return {"visible": float(visible.mean()), "colour": colour, "centroids": centroids, "side": float(side)}


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


APPEARANCES = [(colour, shade) for colour in COLOURS for shade in (None, *SHADES)]


def p_appearance(colour_rgb: np.ndarray, colour: str | None, shade: str | None, temperature: float = 25.0) -> float:
    """P(the named colour and shade) from the segment's mean colour, over every colour x shade the world
    draws; an unnamed colour or shade may be any."""
    distances = np.array([np.linalg.norm(colour_rgb - np.array(shaded(*pair))) for pair in APPEARANCES])
    probs = np.exp(-(distances - distances.min()) / temperature)
    named = [(colour is None or c == colour) and (shade is None or s == shade) for c, s in APPEARANCES]
    return float(probs[named].sum() / probs.sum())


def p_direction(centroids: np.ndarray, name: str, min_travel: float = 2.0) -> float:
    """From the least-squares velocity of the centroid: travel along the direction beats travel across it."""
    ok = ~np.isnan(centroids).any(1)
    if ok.sum() < 2:
        return 0.0
    t = np.arange(len(centroids))[ok]
    velocity = np.array([np.polyfit(t, centroids[ok, k], 1)[0] for k in (0, 1)])
    travel = velocity * (len(centroids) - 1)
    along = float(travel @ np.array(DIRECTIONS[name]))
    across = float(abs(travel @ np.array(DIRECTIONS[name][::-1])))
    return _sigmoid((along - across - min_travel) / 1.0)


def p_size(side: float, name: str, softness: float = 0.02) -> float:
    """The square's side (a fraction of the frame) against the caption bands of procedural.SIZE_WORDS,
    with the decision boundary a little inside the middle band."""
    if name == "small":
        return _sigmoid((SIZE_WORDS["small"][1] + 0.03 - side) / softness)
    return _sigmoid((side - SIZE_WORDS["large"][0] + 0.03) / softness)


class ToyJudge:
    """Answers "Does a large dark red square move up?"-style questions from pixels; P(yes) multiplies the
    named checks (the colour and shade, the size, the direction)."""

    name = "toy"

    @classmethod
    def check(cls, score_cfg, run) -> None:
        """Nothing to check: it needs no model."""

    @classmethod
    def load(cls, score_cfg, run, device) -> ToyJudge:
        return cls()

    _words = re.compile(r"[a-z]+")

    def score_many(self, items: list[tuple[np.ndarray, str]]) -> list[dict]:
        return [self.answer(frames, question) for frames, question in items]

    def answer(self, frames: np.ndarray, question: str) -> dict:
        words = set(self._words.findall(question.lower()))
        seen = track(frames)
        p = 1.0 if seen["visible"] >= 0.5 else 0.0
        colours, shades = words & set(COLOURS), words & set(SHADES)
        if colours or shades:
            p *= p_appearance(seen["colour"], next(iter(colours), None), next(iter(shades), None))
        for direction in words & set(DIRECTIONS):
            p *= p_direction(seen["centroids"], direction)
        for size in words & set(SIZE_WORDS):
            p *= p_size(seen["side"], size)
        p = float(np.clip(p, 1e-4, 1 - 1e-4))
        return {"p_yes": p, "p_no": 1 - p, "answer": "yes" if p >= 0.5 else "no"}
