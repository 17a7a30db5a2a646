"""How a local judge reads a clip: the model inputs for a batch of (frames, question), per judge class.

LLaVA-OneVision / LLaVA-Video (`LlavaOnevisionForConditionalGeneration`, the paper's judge
`llava-hf/LLaVA-Video-7B-Qwen2-hf`) reads the clip as one video: its frames, resized to the vision tower's
size and normalised with the checkpoint's video preprocessor settings, go in `pixel_values_videos`, and the
prompt holds one `<video>` token per pooled patch (the tower's patch grid pooled 2x2, per frame) plus one
newline token: 196 x frames + 1 for LLaVA-Video at 384 px, where a frame given as an image costs 729.
transformers' video processors need torchvision, which the CPU torch here lacks: the tensors are built from
the checkpoint's own settings, as its video processor builds them, and the model checks the token count.

A LLaVA-1.5 checkpoint (`LlavaForConditionalGeneration`) has no video input: its frames go as images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from gigavideo.errors import ConfigError

VIDEO_SETTINGS = ("video_preprocessor_config.json", "preprocessor_config.json")
# score.num_frames = 0: what each family's model card or processor documents.
LLAVA_VIDEO_FRAMES = 64  # LLaVA-Video-7B-Qwen2's card: up to 64 frames, sampled uniformly (64 x 196 + 1 tokens)
QWEN_FPS = 2.0  # Qwen2/2.5/3-VL's video processors: 2 frames a second of the clip, within a pixel budget
DEFAULT_CLIP_FPS = 16  # Wan's, where no stage-2 manifest says the clips' rate
LLAVA_IMAGE_FRAMES = 8  # LLaVA-1.5 has no video input: frames as images (576 tokens each at 336 px)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def checkpoint_settings(path: Path) -> tuple[object, dict]:
    """(its tokenizer, padding on the left so that the last position is every row's next token; its video
    preprocessor settings, or its image preprocessor's where it has no video ones)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    settings = next((json.loads((path / f).read_text()) for f in VIDEO_SETTINGS if (path / f).is_file()), {})
    return tokenizer, settings


def sample_indices(length: int, count: int) -> np.ndarray:
    """`count` frame indices spread uniformly over a clip of `length` (repeated where the clip is shorter)."""
    return np.linspace(0, length - 1, count).round().astype(int)


class LlavaOnevisionVideo:
    """The clip as one video (see the module's docstring)."""

    form = "video"

    def __init__(self, path: Path, config, num_frames: int):
        self.tokenizer, settings = checkpoint_settings(path)
        vision = config.vision_config
        size = settings.get("size") or {}
        self.height = int(size.get("height", size.get("shortest_edge", vision.image_size)))
        self.width = int(size.get("width", size.get("shortest_edge", vision.image_size)))
        self.mean = np.array(settings.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.std = np.array(settings.get("image_std", CLIP_STD), dtype=np.float32)
        self.num_frames = int(num_frames) or LLAVA_VIDEO_FRAMES
        pooled = math.ceil((vision.image_size // vision.patch_size) / 2)  # the 2x2 pooling of the patch grid
        self.video_tokens = self.num_frames * pooled * pooled + 1  # + the newline token
        self.video_token = self.tokenizer.convert_ids_to_tokens(config.video_token_index)

    def describe(self) -> dict:
        return {
            "input": self.form,
            "frames": self.num_frames,
            "resolution": [self.height, self.width],
            "visual_tokens_per_question": self.video_tokens,
        }

    def pixels(self, frames: np.ndarray) -> np.ndarray:
        """(T, C, H, W) float32: resized (bicubic), scaled to [0, 1], normalised."""
        from PIL import Image

        chosen = frames[sample_indices(len(frames), self.num_frames)]
        resized = [np.asarray(Image.fromarray(f).resize((self.width, self.height), Image.BICUBIC)) for f in chosen]
        scaled = np.stack(resized).astype(np.float32) / 255.0
        return ((scaled - self.mean) / self.std).transpose(0, 3, 1, 2)

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(self.video_token) != 1:
            raise ConfigError(f"the judge's chat template puts {text.count(self.video_token)} video tokens in a prompt")
        return text.replace(self.video_token, self.video_token * self.video_tokens)

    def inputs(self, batch: list[tuple[np.ndarray, str]]) -> dict:
        encoded = self.tokenizer([self.prompt(q) for _, q in batch], return_tensors="pt", padding=True)
        videos = torch.from_numpy(np.stack([self.pixels(frames) for frames, _ in batch]))
        return {**encoded, "pixel_values_videos": videos}


class QwenVLVideo:
    """Qwen2-VL / Qwen2.5-VL: the clip as one video of patches (patch 14, temporal patch 2, 2x2 merge), each frame
    resized to multiples of 28 within the checkpoint's pixel budget; one `<|video_pad|>` per merged patch; the
    model is given `video_grid_thw` and `mm_token_type_ids` (2 at the video tokens), as its processor gives them."""

    form = "video"

    def __init__(self, path: Path, config, num_frames: int, clip_fps: float = DEFAULT_CLIP_FPS):
        self.tokenizer, settings = checkpoint_settings(path)
        self.patch, self.merge = int(settings.get("patch_size", 14)), int(settings.get("merge_size", 2))
        self.temporal = int(settings.get("temporal_patch_size", 2))
        size = settings.get("size") or {}
        self.min_pixels = int(settings.get("min_pixels", size.get("shortest_edge", 56 * 56)))
        self.max_pixels = int(settings.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)))
        self.mean = np.array(settings.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.std = np.array(settings.get("image_std", CLIP_STD), dtype=np.float32)
        self.fixed_frames = int(num_frames) + int(num_frames) % self.temporal  # whole temporal patches; 0: by time
        self.sample_fps, self.clip_fps = float(settings.get("fps", QWEN_FPS)), float(clip_fps)
        self.num_frames = self.fixed_frames  # of the last clip read
        self.video_token_id = config.video_token_id
        self.video_token = self.tokenizer.convert_ids_to_tokens(config.video_token_id)
        self.shape: tuple[int, int] | None = None  # the resized frame size of the last clip read

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """Qwen-VL's smart resize: multiples of patch x merge, the pixel count within [min_pixels, max_pixels]."""
        factor = self.patch * self.merge
        h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h, w = (
                max(factor, math.floor(height / beta / factor) * factor),
                max(factor, math.floor(width / beta / factor) * factor),
            )
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return h, w

    def describe(self) -> dict:
        h, w = self.shape or (None, None)
        tokens = None if self.shape is None else self.tokens(h, w)
        return {
            "input": self.form,
            "frames": self.num_frames,
            **({} if self.fixed_frames else {"frames_per_second": self.sample_fps}),
            "resolution": [h, w],
            "visual_tokens_per_question": tokens,
        }

    def frames_for(self, length: int) -> int:
        """score.num_frames, or (0) the processor's rate over the clip's duration, in whole temporal patches."""
        if self.fixed_frames:
            return self.fixed_frames
        count = max(self.temporal, round(length / self.clip_fps * self.sample_fps))
        return count + count % self.temporal

    def tokens(self, height: int, width: int) -> int:
        return (self.num_frames // self.temporal) * (height // self.patch) * (width // self.patch) // self.merge**2

    def patches(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(patches, [t, h, w] grid) of one clip, flattened in the order of Qwen-VL's processor."""
        from PIL import Image

        h, w = self.shape = self.resized(*frames.shape[1:3])
        self.num_frames = self.frames_for(len(frames))
        chosen = frames[sample_indices(len(frames), self.num_frames)]
        video = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in chosen])
        video = ((video.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(0, 3, 1, 2)
        p, m, tp = self.patch, self.merge, self.temporal
        grid = [self.num_frames // tp, h // p, w // p]
        x = video.reshape(grid[0], tp, 3, grid[1] // m, m, p, grid[2] // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x).reshape(grid[0] * grid[1] * grid[2], 3 * tp * p * p), grid

    def template_block(self) -> str:
        """What the chat template writes for a video, which `placeholder` replaces."""
        return self.video_token

    def placeholder(self, frames: np.ndarray, grid: list[int]) -> str:
        return self.video_token * self.tokens(*self.shape)

    def inputs(self, batch: list[tuple[np.ndarray, str]]) -> dict:
        patches, grids, texts = [], [], []
        for frames, question in batch:
            flat, grid = self.patches(frames)
            patches.append(flat)
            grids.append(grid)
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if text.count(self.template_block()) != 1:
                raise ConfigError(f"the judge's chat template does not write one {self.template_block()} for a video")
            texts.append(text.replace(self.template_block(), self.placeholder(frames, grid)))
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {
            **encoded,
            "mm_token_type_ids": (encoded["input_ids"] == self.video_token_id).long() * 2,
            "pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
            "video_grid_thw": torch.tensor(grids),
        }


class Qwen3VLVideo(QwenVLVideo):
    """Qwen3-VL: as Qwen2.5-VL (patch 16 in its settings), but each temporal patch is its own vision block after
    its timestamp (`<0.1 seconds><|vision_start|>...<|vision_end|>`), as its processor writes it: the template's
    one block is replaced whole. The times are the sampled frames' own, at the clips' rate (stage 2's manifest)."""

    def template_block(self) -> str:
        return f"<|vision_start|>{self.video_token}<|vision_end|>"

    def placeholder(self, frames: np.ndarray, grid: list[int]) -> str:
        times = sample_indices(len(frames), self.num_frames).reshape(-1, self.temporal).mean(axis=1) / self.clip_fps
        per_frame = self.video_token * (grid[1] * grid[2] // self.merge**2)
        return "".join(f"<{t:.1f} seconds><|vision_start|>{per_frame}<|vision_end|>" for t in times)


class FramesAsImages:
    """The sampled frames as separate images, one image token block each, through the checkpoint's image
    processor: how a LLaVA-1.5 judge (no video input) reads a clip, and how any video judge did before it read
    video (score.judge_input = images; bench/judge.py compares the two). LLaVA-OneVision takes several images
    per prompt at base resolution (no anyres tiles): its tower's patch grid plus a newline token each."""

    form = "images"

    def __init__(self, path: Path, config, num_frames: int):
        from transformers import AutoImageProcessor

        self.tokenizer, _ = checkpoint_settings(path)
        self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        self.config, self.num_frames = config, int(num_frames) or LLAVA_IMAGE_FRAMES
        token_id = getattr(config, "image_token_id", None)
        self.image_token_id = config.image_token_index if token_id is None else token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        vision = config.vision_config
        self.resolution = [vision.image_size, vision.image_size] if hasattr(vision, "image_size") else None
        self.tokens_per_frame = None if self.resolution is None else self.fixed_tokens_per_frame()

    def fixed_tokens_per_frame(self) -> int:
        vision = self.config.vision_config
        grid = (vision.image_size // vision.patch_size) ** 2
        if self.config.model_type == "llava_onevision":
            return grid + 1  # + its newline token
        return grid  # LLaVA-1.5: CLIP's class token dropped ("default" feature selection)

    def describe(self) -> dict:
        tokens = None if self.tokens_per_frame is None else self.num_frames * self.tokens_per_frame
        return {
            "input": self.form,
            "frames": self.num_frames,
            "resolution": self.resolution,
            "visual_tokens_per_question": tokens,
        }

    def inputs(self, batch: list[tuple[np.ndarray, str]]) -> dict:
        frames = [clip[i] for clip, _ in batch for i in sample_indices(len(clip), self.num_frames)]
        encoded = dict(self.image_processor(images=frames, return_tensors="pt"))
        if "image_grid_thw" in encoded:  # Qwen-VL: each image at its own resized size
            t, h, w = (int(n) for n in encoded["image_grid_thw"][0])
            merge = self.image_processor.merge_size
            self.tokens_per_frame = t * h * w // merge**2
            self.resolution = [h * self.image_processor.patch_size, w * self.image_processor.patch_size]
        texts = []
        for _, question in batch:
            content = [{"type": "image"}] * self.num_frames + [{"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if text.count(self.image_token) != self.num_frames:
                raise ConfigError(f"the judge's chat template does not write one {self.image_token} an image")
            texts.append(text.replace(self.image_token, self.image_token * self.tokens_per_frame))
        tokens = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        if "image_grid_thw" in encoded:
            tokens["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).long()
        if self.config.model_type == "llava_onevision":
            encoded["batch_num_images"] = torch.tensor([self.num_frames] * len(batch))
        return tokens | encoded


# config.json's model_type -> how that judge class reads a clip
READERS = {
    "llava_onevision": LlavaOnevisionVideo,
    "qwen2_vl": QwenVLVideo,
    "qwen2_5_vl": QwenVLVideo,
    "qwen3_vl": Qwen3VLVideo,
    "llava": FramesAsImages,
}
SUPPORTED = (
    "LlavaOnevisionForConditionalGeneration (LLaVA-OneVision, LLaVA-Video: video), Qwen2VLForConditionalGeneration, "
    "Qwen2_5_VLForConditionalGeneration and Qwen3VLForConditionalGeneration (video), LlavaForConditionalGeneration "
    "(LLaVA-1.5: frames as images)"
)


def check_judge_folder(path: Path) -> dict:
    """The judge folder's config.json, refused in one line when its class cannot be read here or needs remote code."""
    config = json.loads((path / "config.json").read_text())
    if "auto_map" in config:
        raise ConfigError(
            f"judge {path}: its config.json maps to remote code (auto_map), which is never run; supported: {SUPPORTED}"
        )
    if config.get("model_type") not in READERS:
        raise ConfigError(f"judge {path} is a {config.get('model_type')!r} model; supported: {SUPPORTED}")
    return config


def reader_for(path: Path, config, num_frames: int, clip_fps: float, form: str = "video"):
    """How the judge in `path` reads a clip; num_frames 0: its family's documented sampling (clip_fps: the clips'
    frame rate, for the families that sample by time); form "images": its frames as separate images."""
    reader = READERS[config.model_type]  # the folder was checked (check_judge_folder) before its model loaded
    if form == "images":
        return FramesAsImages(path, config, num_frames)
    if issubclass(reader, QwenVLVideo):
        return reader(path, config, num_frames, clip_fps)
    return reader(path, config, num_frames)
