"""The toy world's clips as a real-caption source of stage 1: `real_captions = "procedural:N"`."""

from __future__ import annotations

from gigavideo.errors import ConfigError
from gigavideo.rundir.video import encode_mp4
from gigavideo.toy.clips import make_clip
from gigavideo.toy.config import toy_settings


def caption_pairs(count: str, cfg):
    """The real-caption source `real_captions = "procedural:N"`: N clips at the render size, with their captions,
    as (caption, mp4 bytes, origin); [toy] captions and size_range say what the captions name and how big."""
    if not count.isdigit():
        raise ConfigError(f"real_captions = 'procedural:{count}': N must be a whole number >= 0")
    toy, render = toy_settings(cfg), cfg.render
    for i in range(int(count)):
        frames, text = make_clip(
            i, render.height, render.width, render.num_frames, caption_rates=toy.captions, size_range=toy.size_range
        )
        yield text, encode_mp4(frames, 8, render.pix_fmt), f"procedural:{i}"
