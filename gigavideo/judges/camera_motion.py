"""Camera-motion scorer: dense optical flow, fitted to a global pan / tilt / zoom model.

No weights are needed. For each pair of consecutive frames a dense flow field is estimated by
OpenCV's DIS optical flow; a global model u = tx + s (x - cx), v = ty + s (y - cy) is fitted to it
where the frame has texture (robust least squares). Averaged over the video, the translation says
pan (content moving right = camera panning left) or tilt (content moving down = camera tilting
up), and the divergence s says zoom (content expanding = zooming in). The label is compared with
the motion the prompt asks for.
"""

from __future__ import annotations

import re

import cv2
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


def gray_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> uint8 (T, h, w) luma, shrunk (area-averaged) so the short side is at most `size`."""
    gray = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])
    factor = min(gray.shape[1:]) / size
    if factor <= 1:
        return gray
    shape = (round(gray.shape[2] / factor), round(gray.shape[1] / factor))  # (w, h), as OpenCV takes it
    return np.stack([cv2.resize(g, shape, interpolation=cv2.INTER_AREA) for g in gray])


def dis_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow (h, w, 2) with a(x, y) ~ b(x + u, y + v): OpenCV's DIS (its MEDIUM preset, 4-px patches).

    Chosen over Farneback and over our former numpy Lucas-Kanade by `bench/camera_motion.py` (docs/stages.md: Stage 3).
    Small patches give a deeper pyramid on small frames, which is what lets it follow large motions.
    """
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setPatchSize(4)
    dis.setPatchStride(2)
    return dis.calc(a, b, None)


def textured(gray: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Where flow can be trusted: the structure tensor's smaller eigenvalue is at least `fraction` of the
    frame's strong corners' (its 99th percentile). Flat sky, walls and blown-out regions are left out."""
    eigen = cv2.cornerMinEigenVal(gray, 5)
    return eigen > fraction * np.percentile(eigen, 99)


def fit_global(u: np.ndarray, v: np.ndarray, x: np.ndarray, y: np.ndarray, rounds: int = 3, keep: float = 0.75):
    """(tx, ty, s) of u = tx + s x, v = ty + s y (x, y from the frame centre), least squares on the pixels
    whose residual is within the best `keep` fraction, refitted `rounds` times (objects moving on their own
    are outliers). Fitted jointly, so a zoom seen only in part of the frame is not taken for a pan."""
    weight = np.ones_like(u, dtype=np.float64)
    for _ in range(rounds):
        n, sx, sy = weight.sum(), (weight * x).sum(), (weight * y).sum()
        sxx_yy = (weight * (x * x + y * y)).sum()
        su, sv, sxu_yv = (weight * u).sum(), (weight * v).sum(), (weight * (x * u + y * v)).sum()
        normal = np.array([[n, 0, sx], [0, n, sy], [sx, sy, sxx_yy]])
        tx, ty, s = np.linalg.solve(normal + 1e-9 * np.eye(3), [su, sv, sxu_yv])
        residual = np.hypot(u - tx - s * x, v - ty - s * y)
        weight = (residual <= np.quantile(residual, keep)).astype(np.float64)
    return float(tx), float(ty), float(s)


def global_motion(frames: np.ndarray, size: int = 64, flow=dis_flow) -> dict:
    """Mean per-frame translation (as a fraction of the width) and divergence over the video.

    `flow(a, b)` is the dense-flow method (uint8 frames in, (h, w, 2) out); the bench swaps it."""
    gray = gray_frames(frames, size)
    h, w = gray.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    xs, ys = xs - (w - 1) / 2, ys - (h - 1) / 2
    margin = max(2, min(h, w) // 10)
    inner = np.zeros((h, w), bool)
    inner[margin : h - margin, margin : w - margin] = True
    tx, ty, div = [], [], []
    for a, b in zip(gray[:-1], gray[1:], strict=False):
        # a(x) ~ b(x + flow): the flow says where content went from frame a to frame b.
        uv = flow(a, b).astype(np.float64)
        use = inner & textured(a)
        if use.sum() < 0.02 * inner.sum():  # next to no texture: trust every pixel rather than a handful
            use = inner
        t_x, t_y, s = fit_global(uv[..., 0][use], uv[..., 1][use], xs[use], ys[use])
        tx.append(t_x / w)
        ty.append(t_y / w)
        div.append(s)
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
