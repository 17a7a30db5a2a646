"""Automatic feedback: a frozen vision-language model answers a yes/no question about a video.

P(yes) comes from the next-token logits of the answer tokens, not from parsing generated text.
The `transformers` backend loads any local checkpoint that `AutoModelForImageTextToText` and
`AutoProcessor` support and that takes frames as images (llava-hf LLaVA / LLaVA-OneVision);
the tiny preset builds a random LLaVA of the real architecture and loads it the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models import build_word_tokenizer, check_model_dir, save_atomic, torch_dtype
from .schema import RunDir

ANSWER_SUFFIX = " Answer yes or no."
_TINY_JUDGE_WORDS = "yes no does the a an video show camera is with of and in on while".split()
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_judge(judge_cfg: dict):
    """(model, processor): a random LLaVA (tiny CLIP vision tower + tiny Qwen2) with an offline tokenizer."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2Config)

    tokenizer = build_word_tokenizer(_TINY_JUDGE_WORDS, ["<image>", "<|im_start|>", "<|im_end|>"])
    tokenizer.image_token = "<image>"
    size, patch = int(judge_cfg["tiny_image_size"]), int(judge_cfg["tiny_patch_size"])
    torch.manual_seed(int(judge_cfg["tiny_seed"]))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=size, patch_size=patch),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                max_position_embeddings=1024),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=_TINY_CHAT_TEMPLATE)
    return model, processor


def judge_path(score_cfg: dict, run: RunDir) -> Path:
    """`score.judge_path` if set, else (tiny preset) RUN_DIR/models/judge, built once."""
    if score_cfg.get("judge_path"):
        return check_model_dir(score_cfg["judge_path"], "judge model", ("config.json",),
                               "Give a local folder of a llava-hf vision-language model "
                               "(e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf) with --judge_path.")
    if score_cfg.get("judge") != "tiny":
        raise FileNotFoundError(f"judge {score_cfg.get('judge')!r} needs --judge_path to a local model folder")

    def save(directory):
        model, processor = build_tiny_judge(score_cfg)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)

    return save_atomic(save, run.models / "judge")


class TransformersJudge:
    """score(frames, question) -> (P(yes) in [0, 1], answer text)."""

    def __init__(self, path: str | Path, device="cpu", dtype: str = "float32", num_frames: int = 8):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype(dtype))
        self.model.to(device).eval()
        self.device, self.num_frames, self.name = device, int(num_frames), str(path)
        tokenizer = self.processor.tokenizer
        self.yes_ids = self._answer_ids(tokenizer, ("yes", "Yes", " yes", " Yes"))
        self.no_ids = self._answer_ids(tokenizer, ("no", "No", " no", " No"))

    @staticmethod
    def _answer_ids(tokenizer, words) -> list[int]:
        ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in words
               if len(tokenizer.encode(w, add_special_tokens=False)) == 1}
        ids.discard(tokenizer.unk_token_id)
        if not ids:
            raise ValueError(f"judge tokenizer has no single-token answer among {words}")
        return sorted(ids)

    @torch.no_grad()
    def score(self, frames: np.ndarray, question: str) -> tuple[float, str]:
        idx = np.linspace(0, len(frames) - 1, min(self.num_frames, len(frames))).round().astype(int)
        images = [frames[i] for i in idx]
        messages = [{"role": "user", "content": [{"type": "image"}] * len(images)
                     + [{"type": "text", "text": question + ANSWER_SUFFIX}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=images, text=[text], return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logits = self.model(**inputs).logits[0, -1].float()
        answer_logits = torch.logsumexp(logits[self.yes_ids], 0), torch.logsumexp(logits[self.no_ids], 0)
        p_yes = torch.softmax(torch.stack(answer_logits), 0)[0].item()
        return p_yes, "yes" if p_yes >= 0.5 else "no"


def load_judge(score_cfg: dict, run: RunDir, device) -> TransformersJudge:
    return TransformersJudge(judge_path(score_cfg, run), device=device, dtype=score_cfg["dtype"],
                             num_frames=score_cfg["num_frames"])
