"""Tokenizers for the tiny models, built in memory (no hub): a Unigram over a fixed word list for the tiny
UMT5 text encoder, and word-level ones with chat special tokens for the tiny LLM and judges; the tiny Qwen2
language model's sizes."""

from __future__ import annotations

# Words the tiny tokenizer knows whole; anything else falls back to characters, so every prompt encodes.
TINY_WORDS = (
    "a an the of in on at to and with from by is are his her their its into over under through "
    "man woman child person people dog cat horse bird car ball cup glass water fire ice metal wood "
    "red blue green yellow white black gray orange purple small large square circle shape shapes "
    "walks runs jumps falls rolls moves turns slides spins holds throws pours melts burns breaks "
    "left right up down forward slowly quickly camera pans tilts zooms static shot close wide "
    "light sunlight night day room street kitchen park field sky background video frames"
).split()


TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+="


def build_tiny_tokenizer():
    """A T5 (unigram) tokenizer built offline: whole words for a small vocabulary, characters otherwise."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in TINY_WORDS] + [(c, -10.0) for c in TINY_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


# The language model of every tiny chat model and judge: a 2-layer Qwen2 of width 32.
TINY_QWEN2 = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def build_word_tokenizer(words: list[str], special_tokens: list[str], eos: str | None = None):
    """A word-level fast tokenizer built offline (for tiny judges and chat models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", *special_tokens]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + list(words)))}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token=eos
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer
