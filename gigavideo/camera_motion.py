"""Camera-motion scorer: dense optical flow, fitted to a global pan / tilt / zoom model.

No weights are needed. For each pair of consecutive frames a dense flow field is estimated by
coarse-to-fine Lucas-Kanade on small windows; a global model u = tx + s (x - cx),
v = ty + s (y - cy) is fitted to it (median-robust). Averaged over the video, the translation says
pan (content moving right = camera panning left) or tilt (content moving down = camera tilting
up), and the divergence s says zoom (content expanding = zooming in). The label is compared with
the motion the prompt asks for.
"""

from __future__ import annotations

import re

import numpy as np

LABELS = ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out")
_PATTERNS = [
    ("zoom_in", r"zoom(?:s|ing)?\s+in|push(?:es|ing)?\s+in|dolly\s+in"),
    ("zoom_out", r"zoom(?:s|ing)?\s+out|pull(?:s|ing)?\s+(?:back|out)|dolly\s+out"),
    ("pan_left", r"pan(?:s|ning)?\s+(?:to\s+the\s+)?left"),
    ("pan_right", r"pan(?:s|ning)?\s+(?:to\s+the\s+)?right"),
    ("tilt_up", r"tilt(?:s|ing)?\s+up"),
    ("tilt_down", r"tilt(?:s|ing)?\s+down"),
    ("static", r"static\s+(?:camera|shot)|stay(?:s)?\s+static|still\s+camera|camera\s+(?:is\s+)?still"),
]


def expected_motion(text: str) -> str | None:
    """The camera motion a prompt asks for, or None when it names none."""
    for label, pattern in _PATTERNS:
        if re.search(pattern, text.lower()):
            return label
    return None


def _gray(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float (T, h, w) in [0, 1], shrunk by block averaging to at most `size` px."""
    gray = frames.astype(np.float32).mean(-1) / 255.0
    factor = max(1, min(gray.shape[1], gray.shape[2]) // size)
    t, h, w = gray.shape
    h, w = h - h % factor, w - w % factor
    return gray[:, :h, :w].reshape(t, h // factor, factor, w // factor, factor).mean((2, 4))


def _downsample(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return img[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))


def _warp(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear sample of img at (x + u, y + v), clamped at the border."""
    h, w = img.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = np.clip(xs + u, 0, w - 1.001), np.clip(ys + v, 0, h - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    fx, fy = x - x0, y - y0
    return (1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1]) + fy * (
        (1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]
    )


def _box(a: np.ndarray, r: int) -> np.ndarray:
    """Sum over a (2r+1)^2 window (edges clamped), via cumulative sums."""
    p = np.pad(a, r + 1, mode="edge")
    c = p.cumsum(0).cumsum(1)
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k])[: a.shape[0], : a.shape[1]]


def dense_flow(a: np.ndarray, b: np.ndarray, levels: int = 3, iterations: int = 3, radius: int = 2):
    """Flow (u, v) per pixel such that a(x) ~ b(x + u, y + v): pyramidal Lucas-Kanade."""
    pyramid = [(a, b)]
    for _ in range(levels - 1):
        if min(pyramid[-1][0].shape) < 16:
            break
        pyramid.append((_downsample(pyramid[-1][0]), _downsample(pyramid[-1][1])))
    u = v = None
    for pa, pb in reversed(pyramid):
        if u is None:
            u, v = np.zeros_like(pa), np.zeros_like(pa)
        else:  # upsample the coarser flow
            u = 2 * np.kron(u, np.ones((2, 2)))[: pa.shape[0], : pa.shape[1]]
            v = 2 * np.kron(v, np.ones((2, 2)))[: pa.shape[0], : pa.shape[1]]
            u = np.pad(u, ((0, pa.shape[0] - u.shape[0]), (0, pa.shape[1] - u.shape[1])), mode="edge")
            v = np.pad(v, ((0, pa.shape[0] - v.shape[0]), (0, pa.shape[1] - v.shape[1])), mode="edge")
        gy, gx = np.gradient(pa)
        sxx, syy, sxy = _box(gx * gx, radius), _box(gy * gy, radius), _box(gx * gy, radius)
        det = sxx * syy - sxy * sxy
        ok = det > 1e-6
        for _ in range(iterations):
            it = _warp(pb, u, v) - pa
            sxt, syt = _box(gx * it, radius), _box(gy * it, radius)
            du = np.where(ok, (-syy * sxt + sxy * syt) / np.where(ok, det, 1), 0)
            dv = np.where(ok, (sxy * sxt - sxx * syt) / np.where(ok, det, 1), 0)
            u, v = u + du, v + dv
    return u, v


def global_motion(frames: np.ndarray, size: int = 64) -> dict:
    """Mean per-frame translation (as a fraction of the width) and divergence over the video."""
    gray = _gray(frames, size)
    h, w = gray.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs, ys = xs - (w - 1) / 2, ys - (h - 1) / 2
    margin = max(2, min(h, w) // 10)
    inner = (slice(margin, h - margin), slice(margin, w - margin))
    tx, ty, div = [], [], []
    for a, b in zip(gray[:-1], gray[1:], strict=False):
        # a(x) ~ b(x + flow): the flow says where content went from frame a to frame b.
        u, v = dense_flow(a, b)
        u, v, x, y = u[inner], v[inner], xs[inner], ys[inner]
        t_x, t_y = np.median(u), np.median(v)
        radial = ((u - t_x) * x + (v - t_y) * y) / np.maximum(x * x + y * y, 1.0)
        tx.append(t_x / w)
        ty.append(t_y / w)
        div.append(np.median(radial))
    return {"tx": float(np.mean(tx)), "ty": float(np.mean(ty)), "zoom": float(np.mean(div))}


def classify(motion: dict, translation: float = 0.004, zoom: float = 0.004) -> str:
    """pan/tilt/zoom/static from the global motion (thresholds per frame)."""
    tx, ty, z = motion["tx"], motion["ty"], motion["zoom"]
    if abs(z) >= zoom and abs(z) >= max(abs(tx), abs(ty)):
        return "zoom_in" if z > 0 else "zoom_out"
    if max(abs(tx), abs(ty)) < translation:
        return "static"
    if abs(tx) >= abs(ty):
        return "pan_left" if tx > 0 else "pan_right"  # content moves right when the camera pans left
    return "tilt_up" if ty > 0 else "tilt_down"  # content moves down when the camera tilts up


def score(frames: np.ndarray, prompt: str) -> tuple[float | None, str]:
    """(1.0 if the video's camera motion is the one the prompt asks for else 0.0, the measured label).
    None when the prompt asks for no camera motion."""
    label = classify(global_motion(frames))
    wanted = expected_motion(prompt)
    if wanted is None:
        return None, label
    return float(label == wanted), label
