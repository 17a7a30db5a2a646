"""mp4 in and out with PyAV (no torchvision): H.264 bytes <-> uint8 frames (T, H, W, 3)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from gigavideo.errors import UserError


class VideoError(UserError):
    pass


def encode_mp4(frames: np.ndarray, fps: int, pix_fmt: str = "yuv420p") -> bytes:
    """frames: uint8 (T, H, W, 3) with even H and W, or floats in [0, 1]. pix_fmt: yuv420p plays everywhere;
    yuv444p keeps each pixel's colour (4:2:0 averages it over 2x2 pixels, which at 16x16 blurs a small square)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise VideoError(f"expected frames (T, H, W, 3), got shape {frames.shape}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        # MB-tree rate control made x264's output differ from run to run in a process that had run torch (a few
        # clips in a hundred, found in stage 1's real clips); without it the same frames always give the same bytes.
        stream.options = {"crf": "18", "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes, name: str = "video") -> tuple[np.ndarray, float]:
    """Returns (uint8 frames (T, H, W, 3), fps). Corrupt or empty input raises VideoError naming it."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, ValueError) as err:
        raise VideoError(f"{name}: cannot decode mp4 ({err})") from err
    if not frames:
        raise VideoError(f"{name}: mp4 has no frames")
    return np.stack(frames), fps


def resize_crop_sample(frames: np.ndarray, height: int, width: int, num_frames: int) -> np.ndarray:
    """Fit a real clip to the training shape: uniform frame sampling, resize to cover, centre crop."""
    from PIL import Image

    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    out = []
    for frame in frames[idx]:
        h, w = frame.shape[:2]
        scale = max(height / h, width / w)
        nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
        img = Image.fromarray(frame).resize((nw, nh), Image.BICUBIC)
        top, left = (nh - height) // 2, (nw - width) // 2
        out.append(np.asarray(img)[top : top + height, left : left + width])
    return np.stack(out)


def video_statistics(frames: np.ndarray) -> dict:
    """Simple drift monitors of uint8 frames (T, H, W, 3): reward-weighted training is known to drift
    towards over-exposed or over-saturated output, which these make visible."""
    rgb = frames.astype(np.float32) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    top, low = rgb.max(-1), rgb.min(-1)
    return {
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "saturation": float(((top - low) / np.maximum(top, 1e-6)).mean()),
        "motion": float(np.abs(np.diff(luma, axis=0)).mean()) if len(frames) > 1 else 0.0,
    }


def gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    """An animated GIF (what TensorBoard shows as a moving image without moviepy)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / max(1, fps)), loop=0)
    return buf.getvalue()
