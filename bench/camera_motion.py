#!/usr/bin/env python
"""The camera-motion scorer's dense flow: OpenCV's DIS (what stage 3 uses) vs OpenCV's Farneback vs the
numpy pyramidal Lucas-Kanade the scorer used before, on the same synthetic clips, in one run.

    python bench/camera_motion.py

The first row is the scorer as it was (Lucas-Kanade and a median fit over every pixel); the others feed
stage 3's fit (gigavideo/judges/camera_motion.py: least squares over textured pixels, outliers trimmed), so
they differ only in the flow. All share the classification.
Clip sets (gigavideo/judges/camera_clips.py), each over the 7 labels:
clean (the scorer test's clips), noisy (sensor noise of 10% and 20% of the range), low_texture (heavily
smoothed, 10-20% contrast, a flat band over 60% of the frame), large_motion (8-16 px per frame on 64-px
frames, zooms of 10-20% per frame, over a multi-scale scene). Prints accuracy and clips/s per set, one
thread per method (cv2.setNumThreads(1); numpy is single-threaded).
"""

from __future__ import annotations

import platform
import time

import cv2
import numpy as np

from gigavideo.cli import run_cli
from gigavideo.judges import camera_motion
from gigavideo.judges.camera_clips import camera_clip
from gigavideo.judges.camera_motion import LABELS as KINDS

SPEEDS = ((0.6, 1.015), (1.5, 1.03), (2.5, 1.04), (4.0, 1.06))


def clip_sets(seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    clean = [(k, camera_clip(k, rng, s, z)) for _ in range(2) for k in KINDS for s, z in SPEEDS]
    noisy = [(k, camera_clip(k, rng, s, z, noise=n)) for k in KINDS for s, z in SPEEDS for n in (0.1, 0.2)]
    low_texture = [
        (k, camera_clip(k, rng, s, z, smoothing=12, contrast=c, flat=0.6))
        for k in KINDS
        for s, z in SPEEDS
        for c in (0.1, 0.2)
    ]
    large = ((8, 1.1), (12, 1.15), (16, 1.2))
    large_motion = [
        (k, camera_clip(k, rng, s, z, extent=320, octaves=4)) for _ in range(2) for k in KINDS for s, z in large
    ]
    return {"clean": clean, "noisy": noisy, "low_texture": low_texture, "large_motion": large_motion}


def farneback_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """OpenCV's Farneback with its usual settings (pyramid 0.5, 4 levels, 15-px window, 3 iterations)."""
    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 15, 3, 5, 1.2, 0)


def lucas_kanade_flow(a: np.ndarray, b: np.ndarray, levels: int = 3, iterations: int = 3, radius: int = 2):
    """The scorer's former flow: pyramidal Lucas-Kanade in numpy (2x2 block pyramid, 5x5 windows).
    Frames are grey levels 0-255 (uint8 or float)."""
    pyramid = [(a.astype(np.float32) / 255, b.astype(np.float32) / 255)]
    for _ in range(levels - 1):
        if min(pyramid[-1][0].shape) < 16:
            break
        pyramid.append((_half(pyramid[-1][0]), _half(pyramid[-1][1])))
    u = v = None
    for pa, pb in reversed(pyramid):
        if u is None:
            u, v = np.zeros_like(pa), np.zeros_like(pa)
        else:  # upsample the coarser flow
            u, v = (_upsample(2 * f, pa.shape) for f in (u, v))
        gy, gx = np.gradient(pa)
        sxx, syy, sxy = _box(gx * gx, radius), _box(gy * gy, radius), _box(gx * gy, radius)
        det = sxx * syy - sxy * sxy
        ok = det > 1e-6
        for _ in range(iterations):
            it = _warp(pb, u, v) - pa
            sxt, syt = _box(gx * it, radius), _box(gy * it, radius)
            u = u + np.where(ok, (-syy * sxt + sxy * syt) / np.where(ok, det, 1), 0)
            v = v + np.where(ok, (sxy * sxt - sxx * syt) / np.where(ok, det, 1), 0)
    return np.stack([u, v], -1)


def _half(img):
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return img[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))


def _upsample(flow, shape):
    up = np.kron(flow, np.ones((2, 2)))[: shape[0], : shape[1]]
    return np.pad(up, ((0, shape[0] - up.shape[0]), (0, shape[1] - up.shape[1])), mode="edge")


def _warp(img, u, v):
    """Bilinear sample of img at (x + u, y + v), clamped at the border."""
    h, w = img.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = np.clip(xs + u, 0, w - 1.001), np.clip(ys + v, 0, h - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    fx, fy = x - x0, y - y0
    top = (1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1]
    return (1 - fy) * top + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1])


def _box(a, r):
    """Sum over a (2r+1)^2 window (edges clamped), via cumulative sums."""
    c = np.pad(a, r + 1, mode="edge").cumsum(0).cumsum(1)
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k])[: a.shape[0], : a.shape[1]]


def median_fit_motion(frames: np.ndarray, size: int = 64) -> dict:
    """The scorer before OpenCV: grey = the mean of R, G, B, shrunk by block averaging; Lucas-Kanade flow;
    translation = the median flow over every inner pixel; divergence = the median radial flow left after it."""
    gray = frames.astype(np.float32).mean(-1)
    factor = max(1, min(gray.shape[1:]) // size)
    t, h, w = gray.shape
    h, w = h - h % factor, w - w % factor
    gray = gray[:, :h, :w].reshape(t, h // factor, factor, w // factor, factor).mean((2, 4))
    h, w = gray.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs, ys = xs - (w - 1) / 2, ys - (h - 1) / 2
    margin = max(2, min(h, w) // 10)
    inner = (slice(margin, h - margin), slice(margin, w - margin))
    tx, ty, div = [], [], []
    for a, b in zip(gray[:-1], gray[1:], strict=False):
        flow = lucas_kanade_flow(a, b)
        u, v, x, y = flow[..., 0][inner], flow[..., 1][inner], xs[inner], ys[inner]
        t_x, t_y = np.median(u), np.median(v)
        tx.append(t_x / w)
        ty.append(t_y / w)
        div.append(np.median(((u - t_x) * x + (v - t_y) * y) / np.maximum(x * x + y * y, 1.0)))
    return {"tx": float(np.mean(tx)), "ty": float(np.mean(ty)), "zoom": float(np.mean(div))}


def motion_with(flow):
    return lambda frames: camera_motion.global_motion(frames, flow=flow)


# name -> frames -> global motion; all but the first share stage 3's textured-pixel robust fit
METHODS = {
    "before: numpy Lucas-Kanade, median fit": median_fit_motion,
    "numpy Lucas-Kanade, robust fit": motion_with(lucas_kanade_flow),
    "OpenCV Farneback, robust fit": motion_with(farneback_flow),
    "OpenCV DIS, robust fit (stage 3)": motion_with(camera_motion.dis_flow),
}


def main(seed: int = 0):
    cv2.setNumThreads(1)
    sets = clip_sets(seed)
    print(f"# camera-motion flow on {platform.processor() or platform.machine()}, OpenCV {cv2.__version__}")
    print(f"# clips per set: {', '.join(f'{name} {len(clips)}' for name, clips in sets.items())}; 64x64 px, 9 frames")
    print("| method | " + " | ".join(sets) + " | clips/s |")
    print("|---|" + "---|" * (len(sets) + 1))
    for name, motion in METHODS.items():
        cells, seconds, count = [], 0.0, 0
        for clips in sets.values():
            start = time.perf_counter()
            labels = [camera_motion.classify(motion(c)) for _, c in clips]
            seconds += time.perf_counter() - start
            count += len(clips)
            correct = sum(label == kind for label, (kind, _) in zip(labels, clips, strict=True))
            cells.append(f"{correct / len(clips):.1%}")
        print(f"| {name} | " + " | ".join(cells) + f" | {count / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    run_cli(main)
