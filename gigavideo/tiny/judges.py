"""Random, CPU-sized judges of the real classes, each saved as a downloaded checkpoint is (weights, and its processor:
tokenizer with its chat template, image and video processors), so they load through AutoModelForImageTextToText and
AutoProcessor (gigavideo/judges/inputs.py) exactly as the real ones do."""

from __future__ import annotations

from pathlib import Path

import torch

from gigavideo.tiny.tokenizers import TINY_QWEN2, build_word_tokenizer

_TINY_JUDGE_WORDS = "yes no does the a an video show camera is with of and in on while".split()
_TINY_CHAT_TEMPLATE = (  # LLaVA-Video's (Qwen2 chat) shape: the video first, then the question
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<video>\n{% elif c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_judge(judge_cfg: dict, directory: Path) -> None:
    """A random LLaVA-OneVision (tiny SigLIP tower + tiny Qwen2), the class of the paper's LLaVA-Video judge, saved
    in `directory` as a downloaded checkpoint is: weights, and its processor (tokenizer with its chat template,
    image and video processors)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_word_tokenizer(_TINY_JUDGE_WORDS, ["<image>", "<video>", "<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    size, patch = int(judge_cfg["tiny_image_size"]), int(judge_cfg["tiny_patch_size"])
    torch.manual_seed(int(judge_cfg["tiny_seed"]))
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=size,
            patch_size=patch,
        ),
        text_config=Qwen2Config(vocab_size=len(tokenizer), **TINY_QWEN2, max_position_embeddings=4096),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[size, size]],
    )
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(directory)
    settings = {"size": {"height": size, "width": size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # SigLIP's
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**settings, image_grid_pinpoints=[[size, size]]),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(**settings),
        num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=_TINY_CHAT_TEMPLATE,
    ).save_pretrained(directory)


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (  # Qwen2.5-VL's shape: a vision block per video, then the question
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# What differs between the tiny Qwen-VL judges: the model class, its vision tower and its processor's patch size.
QWEN_VERSIONS = {
    "2.5": {
        "model": "Qwen2_5_VLForConditionalGeneration",
        "config": "Qwen2_5_VLConfig",
        "vision": {"patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]},
        "rope": {"mrope_section": [2, 3, 3]},
        "processor": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    },
    "3": {
        "model": "Qwen3VLForConditionalGeneration",
        "config": "Qwen3VLConfig",
        "vision": {"patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        "rope": {"mrope_section": [2, 3, 3], "mrope_interleaved": True},
        "processor": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
    },
}


def build_tiny_qwen_vl_judge(directory: Path, version: str = "2.5", seed: int = 0) -> None:
    """A random Qwen2.5-VL or Qwen3-VL (2-layer vision tower, 2x2 merge, temporal patch 2; a 2-layer language
    model with multimodal RoPE), saved with its processor (CLIP mean/std, a small pixel budget)."""
    import transformers

    spec = QWEN_VERSIONS[version]
    tokenizer = build_word_tokenizer(_TINY_JUDGE_WORDS, QWEN_SPECIALS, eos="<|im_end|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(seed)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32}
    config = getattr(transformers, spec["config"])(
        vision_config=vision | {"spatial_merge_size": 2, "temporal_patch_size": 2} | spec["vision"],
        text_config={
            "vocab_size": len(tokenizer),
            **TINY_QWEN2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0} | spec["rope"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    getattr(transformers, spec["model"])(config).save_pretrained(directory)
    patch = spec["vision"]["patch_size"]
    settings = {
        "size": {"shortest_edge": (2 * patch) ** 2, "longest_edge": (4 * patch) ** 2},  # the pixel budget
        "image_mean": [0.48145466, 0.4578275, 0.40821073],  # CLIP's
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    processor, image_processor, video_processor = (getattr(transformers, name) for name in spec["processor"])
    processor(
        image_processor=image_processor(**settings),
        tokenizer=tokenizer,
        video_processor=video_processor(**settings, fps=2.0),
        chat_template=QWEN_CHAT_TEMPLATE,
    ).save_pretrained(directory)
