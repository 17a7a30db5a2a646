"""Synthetic clips with a known camera motion: a camera window moving over (or zooming into) a random scene.

Used by the camera-motion scorer's test and by `bench/camera_motion.py`. A clip is uint8 (T, size, size, 3).
The scene is smoothed noise in three colour channels; the hard cases add per-frame sensor noise, low
texture (heavier smoothing, low contrast, a flat "sky" band) and large motions (a bigger scene to move over).
"""

from __future__ import annotations

import numpy as np


def _smooth(texture: np.ndarray, times: int) -> np.ndarray:
    for _ in range(times):
        texture = (texture + sum(np.roll(texture, s, a) for s in (1, -1) for a in (0, 1))) / 5
    return texture


def scene(
    rng: np.random.Generator,
    extent: int,
    smoothing: int = 3,
    contrast: float = 1.0,
    flat: float = 0.0,
    octaves: int = 0,
):
    """uint8 (extent, extent, 3): noise box-smoothed `smoothing` times, plus `octaves` coarser layers (2x, 4x ...
    larger blobs, each as strong as the last: the multi-scale structure of real footage), contrast around
    mid-grey, and the top `flat` fraction of rows one colour."""
    texture = _smooth(rng.random((extent, extent)), smoothing)
    for octave in range(1, octaves + 1):
        step = 2**octave
        coarse = rng.random((extent // step + 1, extent // step + 1)).repeat(step, 0).repeat(step, 1)
        texture = texture + _smooth(coarse[:extent, :extent], smoothing * step)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    texture = 0.5 + contrast * (texture - 0.5)
    texture[: int(flat * extent)] = 0.5 + contrast * 0.3
    return (np.stack([texture, texture**2, 1 - texture], -1) * 255).astype(np.uint8)


def camera_clip(
    kind: str,
    rng: np.random.Generator,
    speed: float = 1.5,
    zoom: float = 1.03,
    frames: int = 9,
    size: int = 64,
    extent: int = 160,
    noise: float = 0.0,
    **scene_kwargs,
) -> np.ndarray:
    """A clip of `kind` (one of camera_motion.LABELS): pans and tilts move `speed` px per frame, zooms scale
    by `zoom` per frame; `noise` is the sensor noise's standard deviation as a fraction of the full range."""
    texture = scene(rng, extent, **scene_kwargs)
    centre, offset = extent / 2, (extent - size) / 2
    out = []
    for t in range(frames):
        if kind.startswith("zoom"):
            half = size / 2 / (zoom if kind == "zoom_in" else 1 / zoom) ** t
            ys = xs = np.linspace(centre - half, centre + half, size)
        else:  # the camera moves over a fixed scene
            dx = {"pan_left": -speed, "pan_right": speed}.get(kind, 0) * t
            dy = {"tilt_up": -speed, "tilt_down": speed}.get(kind, 0) * t
            ys, xs = np.arange(size) + offset + dy, np.arange(size) + offset + dx
        clip = lambda c: c.round().astype(int).clip(0, extent - 1)  # noqa: E731
        yy, xx = np.meshgrid(clip(ys), clip(xs), indexing="ij")
        out.append(texture[yy, xx])
    frames_ = np.stack(out)
    if noise:
        frames_ = (frames_ + rng.normal(0, noise * 255, frames_.shape)).clip(0, 255).astype(np.uint8)
    return frames_
