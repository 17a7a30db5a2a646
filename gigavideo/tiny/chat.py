"""A random-weight Qwen2 chat model of a few words, for stage 1's transformers backend in tests."""

from __future__ import annotations

import torch


def build_tiny_chat_model(words: list[str], seed: int = 0):
    """(model, tokenizer): a random Qwen2 causal LM with a word-level tokenizer and a chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gigavideo.tiny.tokenizers import TINY_QWEN2, build_word_tokenizer

    tokenizer = build_word_tokenizer(words, ["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        **TINY_QWEN2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config), tokenizer
