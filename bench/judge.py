#!/usr/bin/env python
"""What the judge costs a question, by how it reads the clip, in one run:

1. Visual tokens per question of the real judges at the paper's render size (832x480, 81 frames at 16 fps,
   sampled to each family's default), computed by the same readers stage 3 uses (gigavideo/judges/inputs.py)
   from each checkpoint's processor settings (no weights needed): LLaVA-Video-7B as one video against its
   frames given as images (base resolution, no anyres tiles: a lower bound), Qwen2.5-VL-7B likewise.
2. Measured on the tiny random judges of the real classes on this CPU: tokens and seconds per question, frames
   as images against one video.
3. Request bytes per question for the server judge: one mp4 video_url against one PNG a frame.

    python bench/judge.py [--questions=16]
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoProcessor, Qwen2VLVideoProcessor

from gigavideo.cli import run_cli
from gigavideo.judges.camera_clips import camera_clip
from gigavideo.judges.inputs import LLAVA_VIDEO_FRAMES
from gigavideo.judges.judge import OpenAIJudge, TransformersJudge
from gigavideo.tiny.judges import build_tiny_judge, build_tiny_qwen_vl_judge

# The real checkpoints' processor settings that decide the token count (their configs on the hub).
LLAVA_VIDEO_7B = {"image_size": 384, "patch_size": 14}  # SigLIP-so400m: 27x27 patches; video: pooled 2x2
QWEN25_VL_VIDEO = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "fps": 2.0}
QWEN25_VL_VIDEO |= {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}}  # its video processor's


def render_sized_clip(frames: int = 81, height: int = 480, width: int = 832) -> np.ndarray:
    """A textured pan at the paper's render size (a stand-in for a render: texture is what PNG cannot squeeze)."""
    square = camera_clip(
        "pan_right", np.random.default_rng(0), speed=4.0, frames=frames, size=width, extent=width + 400
    )
    return square[:, :height]


def real_judge_tokens(clip: np.ndarray, folder: Path) -> dict:
    grid = LLAVA_VIDEO_7B["image_size"] // LLAVA_VIDEO_7B["patch_size"]
    pooled = -(-grid // 2)
    llava = {"video": LLAVA_VIDEO_FRAMES * pooled**2 + 1, "images": LLAVA_VIDEO_FRAMES * (grid**2 + 1)}  # + newlines
    processor = AutoProcessor.from_pretrained(str(folder))
    processor.video_processor = Qwen2VLVideoProcessor(**QWEN25_VL_VIDEO)  # the 7B's settings
    processor.save_pretrained(folder)
    reader = TransformersJudge(folder, num_frames=0, clip_fps=16).reader
    reader.inputs([(clip, "Does the video show this?")])
    qwen = reader.describe()
    per_frame = qwen["visual_tokens_per_question"] * QWEN25_VL_VIDEO["temporal_patch_size"] // qwen["frames"]
    return {
        "LLaVA-Video-7B (64 frames)": llava | {"ratio": round(llava["images"] / llava["video"], 2)},
        f"Qwen2.5-VL-7B ({qwen['frames']} frames at 2 fps, {qwen['resolution']})": {
            "video": qwen["visual_tokens_per_question"],
            "images": qwen["frames"] * per_frame,
            "ratio": round(qwen["frames"] * per_frame / qwen["visual_tokens_per_question"], 2),
        },
    }


def tiny_judges(folder: Path, questions: int) -> dict:
    clip = render_sized_clip(33, 64, 64)
    builders = {
        "LLaVA-OneVision": lambda d: build_tiny_judge({"tiny_image_size": 32, "tiny_patch_size": 8, "tiny_seed": 0}, d),
        "Qwen2.5-VL": lambda d: build_tiny_qwen_vl_judge(d, "2.5"),
        "Qwen3-VL": lambda d: build_tiny_qwen_vl_judge(d, "3"),
    }
    out = {}
    for name, build in builders.items():
        target = folder / name
        target.mkdir()
        build(target)
        items = [(clip, f"Does the video show a square? ({i})") for i in range(questions)]
        row = {}
        for form in ("images", "video"):
            judge = TransformersJudge(target, num_frames=8, batch_size=4, form=form)
            judge.score_many(items[:4])  # warm-up
            start = time.perf_counter()
            judge.score_many(items)
            seconds = (time.perf_counter() - start) / questions
            row[form] = judge.input | {"seconds_per_question": round(seconds, 4)}
        tokens, seconds = (
            [row[f][k] for f in ("images", "video")] for k in ("visual_tokens_per_question", "seconds_per_question")
        )
        out[name] = row | {
            "images / video": {"tokens": round(tokens[0] / tokens[1], 2), "seconds": round(seconds[0] / seconds[1], 2)}
        }
    return out


def request_bytes(clip: np.ndarray) -> dict:
    sizes = {}
    for form in ("video", "images"):
        judge = OpenAIJudge("http://unused/v1", "m", num_frames=32, form=form, clip_fps=16)
        sizes[form] = len(json.dumps(judge.media(clip)))
    return sizes | {"ratio": round(sizes["images"] / sizes["video"], 1)}


def main(questions: int = 16) -> None:
    print(f"# {platform.node()} ({platform.processor() or platform.machine()}), {time.strftime('%Y-%m-%d')}")
    clip = render_sized_clip()
    with tempfile.TemporaryDirectory() as tmp:
        qwen = Path(tmp) / "qwen-settings"
        qwen.mkdir()
        build_tiny_qwen_vl_judge(qwen, "2.5")  # its reader, given the 7B's processor settings
        report = {
            "visual tokens per question, 832x480x81 at 16 fps": real_judge_tokens(clip, qwen),
            "tiny judges on this CPU (8 frames of a 64x64 clip)": tiny_judges(Path(tmp), questions),
            "server request bytes per question (32 frames of 832x480)": request_bytes(clip),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_cli(main)
