"""How a local judge reads a clip: the model inputs for a batch of (frames, question), made by the checkpoint's own
processor (transformers' AutoProcessor): its resizing, normalising, token expansion and grids are the library's.
Which frames it sees is ours, as each family's model card or processor documents:

- LLaVA-OneVision / LLaVA-Video (`LlavaOnevisionForConditionalGeneration`, the paper's judge
  `llava-hf/LLaVA-Video-7B-Qwen2-hf`): the clip as one video of score.num_frames frames sampled uniformly (0: the
  card's 64), 196 visual tokens a frame plus a newline at 384 px, where a frame given as an image costs 729.
- Qwen2-VL, Qwen2.5-VL, Qwen3-VL: one video of score.num_frames frames (0: the processors' 2 a second of the
  clip), in whole temporal patches; the frames' times (Qwen2.5-VL's temporal positions, Qwen3-VL's timestamps)
  are their own at the clips' frame rate, which stage 2's manifest gives.
- LLaVA-1.5 (`LlavaForConditionalGeneration`, no video input), or score.judge_input = images: the sampled frames
  as separate images (score.num_frames, 0: 8).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from gigavideo.errors import ConfigError

LLAVA_VIDEO_FRAMES = 64  # LLaVA-Video-7B-Qwen2's card: up to 64 frames, sampled uniformly (64 x 196 + 1 tokens)
DEFAULT_CLIP_FPS = 16  # Wan's, where no stage-2 manifest says the clips' rate
LLAVA_IMAGE_FRAMES = 8  # LLaVA-1.5 has no video input: frames as images (576 tokens each at 336 px)
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VIDEO = ("llava_onevision", *QWEN)  # the classes that read a clip as a video
SUPPORTED = (
    "LlavaOnevisionForConditionalGeneration (LLaVA-OneVision, LLaVA-Video: video), Qwen2VLForConditionalGeneration, "
    "Qwen2_5_VLForConditionalGeneration and Qwen3VLForConditionalGeneration (video), LlavaForConditionalGeneration "
    "(LLaVA-1.5: frames as images)"
)


def sample_indices(length: int, count: int) -> np.ndarray:
    """`count` frame indices spread uniformly over a clip of `length` (repeated where the clip is shorter)."""
    return np.linspace(0, length - 1, count).round().astype(int)


class ClipReader:
    """The frames a judge sees of each clip (sampled as its card says), through its own processor."""

    def __init__(self, path: Path, config, num_frames: int, clip_fps: float = DEFAULT_CLIP_FPS, form: str = "video"):
        from transformers import AutoProcessor

        if importlib.util.find_spec("torchvision") is None:
            raise ConfigError(
                "the judge's processor needs torchvision: install the one built for your torch (make setup installs "
                "torch 2.14.1 with torchvision 0.29.1)"
            )
        try:
            self.processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"judge {path}: its processor does not load ({err}); a checkpoint has its files") from err
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the last position is every row's next token
        self.model_type, self.clip_fps = config.model_type, float(clip_fps)
        self.form = "video" if form == "video" and config.model_type in VIDEO else "images"
        kind = "video" if self.form == "video" else "image"
        token_id = getattr(config, f"{kind}_token_id", None)
        self.token_id = getattr(config, f"{kind}_token_index", None) if token_id is None else token_id
        self.fixed_frames = int(num_frames)
        self.seen: dict = {"frames": self.frames_for(0)}  # how the last clip read was seen

    def frames_for(self, length: int) -> int:
        """The frames sampled from a clip of `length` frames."""
        if self.form == "images":
            return self.fixed_frames or LLAVA_IMAGE_FRAMES
        if self.model_type not in QWEN:
            return self.fixed_frames or LLAVA_VIDEO_FRAMES
        temporal = self.processor.video_processor.temporal_patch_size
        count = self.fixed_frames or max(temporal, round(length / self.clip_fps * self.processor.video_processor.fps))
        return count + count % temporal  # whole temporal patches

    def describe(self) -> dict:
        """How the judge saw a clip (form, frames, resolution, visual tokens a question): in the manifests."""
        by_time = self.form == "video" and self.model_type in QWEN and not self.fixed_frames
        rate = {"frames_per_second": self.processor.video_processor.fps} if by_time else {}
        return {"input": self.form, "frames": self.seen["frames"], **rate} | {
            "resolution": self.seen.get("resolution"),
            "visual_tokens_per_question": self.seen.get("tokens"),
        }

    def prompt(self, question: str, frames: int) -> str:
        media = [{"type": "video"}] if self.form == "video" else [{"type": "image"}] * frames
        messages = [{"role": "user", "content": [*media, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, batch: list[tuple[np.ndarray, str]]) -> dict:
        from transformers.video_utils import VideoMetadata

        chosen = [sample_indices(len(clip), self.frames_for(len(clip))) for clip, _ in batch]
        texts = [self.prompt(question, len(i)) for (_, question), i in zip(batch, chosen, strict=True)]
        if self.form == "images":
            media = {"images": [[clip[j] for j in i] for (clip, _), i in zip(batch, chosen, strict=True)]}
        else:
            media = {"videos": [clip[i] for (clip, _), i in zip(batch, chosen, strict=True)], "do_sample_frames": False}
            media["video_metadata"] = [
                VideoMetadata(total_num_frames=len(clip), fps=self.clip_fps, frames_indices=i.tolist())
                for (clip, _), i in zip(batch, chosen, strict=True)
            ]
            if self.model_type in QWEN:
                media["cap_pixels_per_frame"] = True  # as Qwen's reference reader (qwen-vl-utils) sizes frames
        encoded = dict(self.processor(text=texts, padding=True, return_tensors="pt", **media))
        self.seen = {
            "frames": len(chosen[0]),
            "resolution": self.resolution(encoded),
            "tokens": int((encoded["input_ids"][0] == self.token_id).sum()),
        }
        return encoded

    def resolution(self, encoded: dict) -> list[int]:
        """The size the first clip's frames were resized to: its patch grid, or its pixel tensor's last two sides."""
        grid = encoded.get("video_grid_thw", encoded.get("image_grid_thw"))
        if grid is not None:
            processor = self.processor.video_processor if self.form == "video" else self.processor.image_processor
            return [int(grid[0][1]) * processor.patch_size, int(grid[0][2]) * processor.patch_size]
        pixels = encoded.get("pixel_values_videos", encoded.get("pixel_values"))
        return [int(pixels.shape[-2]), int(pixels.shape[-1])]


def check_judge_folder(path: Path) -> dict:
    """The judge folder's config.json, refused in one line when its class cannot be read here or needs remote code."""
    config = json.loads((path / "config.json").read_text())
    if "auto_map" in config:
        raise ConfigError(
            f"judge {path}: its config.json maps to remote code (auto_map), which is never run; supported: {SUPPORTED}"
        )
    if config.get("model_type") not in (*VIDEO, "llava"):
        raise ConfigError(f"judge {path} is a {config.get('model_type')!r} model; supported: {SUPPORTED}")
    return config


def reader_for(path: Path, config, num_frames: int, clip_fps: float, form: str = "video") -> ClipReader:
    """How the judge in `path` reads a clip; num_frames 0: its family's documented sampling (clip_fps: the clips'
    frame rate, for the families that sample by time); form "images" (and LLaVA-1.5): its frames as separate images."""
    return ClipReader(path, config, num_frames, clip_fps, form)
