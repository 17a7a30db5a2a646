"""The final selection of stage 1: every dimension's prompts chosen from all work units' candidates (in key order,
so the result is deterministic), filtered against the held-out prompts and each other, and the real captions."""

from __future__ import annotations

import logging
import math
from collections import Counter

from gigavideo.errors import UserError
from gigavideo.prompts.engine import Similarity, select
from gigavideo.prompts.real_captions import (
    real_samples,
)
from gigavideo.rundir.files import read_jsonl, read_text_lines
from gigavideo.rundir.shards import ShardWriter, iter_shard

log = logging.getLogger("gigavideo.stage1")


def read_heldout(path: str) -> list[str]:
    """The held-out prompts: text, one per line, or JSONL with prompt."""
    lines = read_text_lines(path)
    if lines and lines[0][1].startswith("{"):
        rows = read_jsonl(path, ("prompt",))
        for number, row in rows:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise UserError(f"{path} line {number}: prompt must be non-empty text, not {row['prompt']!r}")
        return [row["prompt"] for _, row in rows]
    return [text for _, text in lines]


def generator_record(pc, similarity: Similarity) -> dict:
    """What made the prompts, recorded with each of them."""
    return {
        "engine": pc.engine,
        "seed": pc.seed,
        "similarity": similarity.kind,
        "model": pc.llm_path or pc.llm_model or None,
        "temperature": pc.llm_temperature,
    }


def similarity_limits(pc, similarity: Similarity) -> dict:
    """The filters' bounds; the thresholds of the similarity in use (MiniLM embeddings, or word 3-grams)."""
    lexical = similarity.model is None
    limits = {
        "min_words": pc.min_words,
        "max_words": pc.max_words,
        "dedup_threshold": pc.lexical_dedup_threshold if lexical else pc.dedup_threshold,
        "heldout_threshold": pc.lexical_heldout_threshold if lexical else pc.heldout_threshold,
    }
    for name in ("dedup_threshold", "heldout_threshold"):
        if limits[name] > 1:  # a similarity never exceeds 1
            log.info("%s = %g (%s similarity): above 1, so that filter is off", name, limits[name], similarity.kind)
    return limits


def synthetic_sample(dim, candidate: dict, generator: dict) -> dict:
    c = candidate
    seed = dim.seeds[c["seed_index"]] if isinstance(c.get("seed_index"), int) else None
    lineage = {
        "seed": seed,
        "subject": c["subject"],
        "action": c["action"],
        "unit": c["unit"],
        "steps": ["analogy", "augment", "question"],
    }
    return {
        "__key__": f"syn-{dim.name}-{c['unit']:05d}-{c['index']:02d}",
        "json": {
            "prompt": c["prompt"],
            "question": c["question"],
            "dimension": dim.name,
            "source": "synthetic",
            "generator": generator,
            "lineage": lineage,
        },
    }


def select_dimension(dim, units: list[dict], quota: int, similarity, limits: dict, heldout) -> tuple[list, dict]:
    """(the candidates kept for `dim`, its summary: kept, candidates, dropped by reason)."""
    drops, candidates = Counter(), []
    for unit in (u["json"] for u in units if u["json"]["dimension"] == dim.name):
        drops.update(unit["dropped"])
        candidates += [c | {"unit": unit["unit"]} for c in unit["candidates"]]
    kept = select(candidates, quota, similarity, limits, heldout, drops)
    if len(kept) < quota:
        log.warning("%s: kept %d of the %d asked for; raise --oversample", dim.name, len(kept), quota)
    return kept, {"kept": len(kept), "candidates": len(candidates), "dropped": dict(sorted(drops.items()))}


def finalize(cfg, run, dims, units_dir, targeted: dict) -> dict:
    """Write stage 1's shards: every dimension's selected prompts, then the real captions with their videos;
    returns the manifest's fields."""
    pc, out = cfg.prompts, run.stage("stage1")
    for stale in out.glob("*.tar*"):
        stale.unlink()
    units = sorted((s for p in sorted(units_dir.glob("*.tar")) for s in iter_shard(str(p))), key=lambda s: s["__key__"])
    similarity = Similarity(pc.embedder_path)
    limits, generator = similarity_limits(pc, similarity), generator_record(pc, similarity)
    heldout = similarity.embed(read_heldout(pc.heldout_file)) if pc.heldout_file else []
    summary, failures = {}, []
    with ShardWriter(out, "stage1", "prompts", pc.samples_per_shard) as writer:
        for dim in dims:
            kept, summary[dim.name] = select_dimension(dim, units, pc.num_per_dimension, similarity, limits, heldout)
            for candidate in kept:
                writer.write(synthetic_sample(dim, candidate, generator))
        n_synthetic = sum(s["kept"] for s in summary.values())
        limit = None if pc.real_per_synthetic < 0 else math.floor(pc.real_per_synthetic * n_synthetic)
        real = list(real_samples(cfg, limit, failures)) if pc.real_captions else []
        for sample in real:
            writer.write(sample)
    reasons = Counter(f["reason"].split(":")[-1].strip() for f in failures)
    summary["real"] = {"kept": len(real), "dropped": dict(reasons)}
    return {
        "summary": summary,
        "failures": failures,
        "generator": generator,
        "config": dict(pc),
        "targeted": targeted,
    }


def print_summary(summary: dict) -> None:
    print(f"{'dimension':32s} {'kept':>6s} {'dropped':>8s}  reasons")
    for name, s in summary.items():
        dropped = sum(s["dropped"].values())
        reasons = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        print(f"{name:32s} {s['kept']:6d} {dropped:8d}  {reasons}")
