"""The `[toy]` config section: the toy world's knobs (registered in gigavideo.config.PLUGIN_SECTIONS)."""

from __future__ import annotations

from dataclasses import dataclass

from gigavideo.config import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Entries, Table, key
from gigavideo.toy.clips import CAPTIONED, SIZE_RANGE


def toy_settings(cfg):
    """The [toy] section of a config, or its defaults where the preset has none (the tiny preset's clips)."""
    from gigavideo.config import defaults

    return cfg.get("toy") or defaults("toy")


@dataclass
class ToyConfig(Table):
    """[toy]: the toy world's clips (the real videos of real_captions = "procedural:N") and its base model."""

    captions: dict = key(
        dict.fromkeys(CAPTIONED, 1.0),
        "procedural clips: how often a caption names the direction of motion, the size, the shade",
    )
    size_range: list = key(list(SIZE_RANGE), "procedural clips: the square's side, a fraction of the frame (uniform)")
    pretrain: dict = key(
        {
            "steps": 2500,
            "clips": 2000,
            "batch_size": 32,
            "lr": 1e-3,
            "caption_dropout": 0.1,
            "caption_rates": {"motion": 0.0, "size": 0.0, "shade": 0.1},
            "size_range": [0.3125, 0.3125],
            "height": 16,
            "width": 16,
            "num_frames": 5,
            "seed": 0,
        },
        "model.kind = toy: the base model's pre-training on the world's clips (scripts/prepare_base.py)",
        check=Entries(
            dict.fromkeys(("steps", "clips", "batch_size", "height", "width", "num_frames"), AT_LEAST_1)
            | {"lr": POSITIVE, "caption_dropout": FRACTION, "seed": AT_LEAST_0}
        ),
    )
    checkpoint_every: int = key(
        250, "pre-training checkpoints (RUN_DIR/models/base.partial) every N steps", check=AT_LEAST_1
    )
