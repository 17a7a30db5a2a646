"""Instance-preservation scorer: the number of named objects must stay the same in every frame.

Counting goes through a detector plug-in, `count(frames, name) -> list[int]` per frame:

- `yolo_world`: an open-vocabulary YOLO-World model from a local weights file, through the
  `ultralytics` library (an optional extra: `pip install ultralytics`).
- `blobs`: connected regions of saturated colour on a plain background (no weights); right for
  the procedural clips of the tiny preset and for synthetic tests, not for natural video.

The score is the fraction of frames whose count equals the count the prompt asks for ("three
ducks" -> 3), or, when the prompt gives none, the count of the first frame.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gigavideo.errors import ConfigError

NUMBERS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "a pair of": 2,
    "a couple of": 2,
}


def expected_count(text: str) -> tuple[int | None, str | None]:
    """(count, object name) from a phrase like "three red balloons", else (None, None)."""
    pattern = r"\b(" + "|".join(map(re.escape, NUMBERS)) + r"|\d+)\s+([a-z -]+)"
    match = re.search(pattern, text.lower())
    if not match:
        return None, None
    word, following = match.group(1), match.group(2).split()[:3]
    noun = next((w for w in following if w.endswith("s") and len(w) > 3), following[0] if following else None)
    if noun and noun.endswith("s") and not noun.endswith("ss"):
        noun = noun[:-1]  # "balloons" -> "balloon": the detector's class name
    return (int(word) if word.isdigit() else NUMBERS[word]), noun


class BlobDetector:
    """Counts connected regions of saturated colour (4-connectivity) bigger than `min_area` pixels."""

    name = "blobs"

    def __init__(self, saturation: float = 0.35, min_area: int = 6):
        self.saturation, self.min_area = saturation, min_area

    def count(self, frames: np.ndarray, name: str | None = None) -> list[int]:
        return [self._count(frame) for frame in frames]

    def _count(self, frame: np.ndarray) -> int:
        rgb = frame.astype(np.float32) / 255.0
        mask = (rgb.max(-1) - rgb.min(-1)) > self.saturation
        labels = np.zeros(mask.shape, dtype=np.int32)
        count = 0
        for y, x in zip(*np.nonzero(mask), strict=False):
            if labels[y, x]:
                continue
            count += 1
            stack, area = [(y, x)], 0
            labels[y, x] = count
            while stack:
                cy, cx = stack.pop()
                area += 1
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
            if area < self.min_area:
                count -= 1
                labels[labels == count + 1] = -1
        return count


class YoloWorldDetector:
    """YOLO-World from a local weights file (e.g. yolov8s-worldv2.pt) through `ultralytics`."""

    name = "yolo_world"

    def __init__(self, weights: str, confidence: float = 0.25, device=None):
        if not weights or not Path(weights).is_file():
            raise FileNotFoundError(
                f"YOLO-World weights {weights!r} not found: download e.g. yolov8s-worldv2.pt "
                "on a machine with internet and pass --detector_weights=/path/to/it"
            )
        try:
            from ultralytics import YOLOWorld
        except ImportError:
            raise ImportError("the yolo_world detector needs the optional extra: pip install ultralytics") from None
        self.model, self.confidence, self.device = YOLOWorld(weights), confidence, device

    def count(self, frames: np.ndarray, name: str | None = None) -> list[int]:
        if not name:
            raise ValueError("the yolo_world detector needs an object name from the prompt")
        self.model.set_classes([name])
        results = self.model.predict(list(frames[..., ::-1]), conf=self.confidence, device=self.device, verbose=False)
        return [len(r.boxes) for r in results]


def load_detector(kind: str, weights: str = "", device=None):
    if kind == "blobs":
        return BlobDetector()
    if kind == "yolo_world":
        return YoloWorldDetector(weights, device=device)
    raise ConfigError(f"detector {kind!r} not in (blobs, yolo_world)")


def score(detector, frames: np.ndarray, text: str) -> tuple[float, dict]:
    """Fraction of frames with the expected number of objects, and the evidence."""
    wanted, name = expected_count(text)
    counts = detector.count(frames, name)
    target = wanted if wanted is not None else counts[0]
    return float(np.mean([c == target for c in counts])), {"expected": wanted, "object": name, "counts": counts}
