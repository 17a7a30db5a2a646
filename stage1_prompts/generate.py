#!/usr/bin/env python
"""Stage 1: the weakness-targeted prompt data engine.

For each weak dimension a text backend (template grammar, local chat model, or OpenAI-compatible
server) makes analogous prompts from the dimension's description and seed examples, augments
each into a full video prompt, and writes a yes/no verification question. Filters drop malformed,
too short or too long output, prompts too close to a held-out evaluation set, and near-duplicates;
per-dimension quotas cap the rest. Captions of real videos are mixed in and keep their video,
for stage 4's realism constraint. Writes RUN_DIR/stage1/.

Work units (one analogy call and its follow-ups) are split over ranks and written to
RUN_DIR/stage1/candidates/ as they finish, so a killed run resumes; once every unit is done, one
rank selects the final prompts (deterministically) and writes the manifest.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.distributed import my_slice, rank_and_world
from gigavideo.errors import ConfigError, UserError
from gigavideo.eval.diagnosis import DIAGNOSIS_FILE, read_diagnosis, weakest
from gigavideo.models.pipeline import torch_dtype
from gigavideo.prompts.dimensions import load_style, resolve_dimensions
from gigavideo.prompts.engine import Similarity, run_unit, select
from gigavideo.prompts.llm import OpenAIBackend, TemplateBackend, TransformersBackend
from gigavideo.registry import resolve
from gigavideo.rundir.completion import check_failed, process_seconds, rank_parts, write_manifest
from gigavideo.rundir.files import read_jsonl, read_text_lines
from gigavideo.rundir.shards import ShardWriter, iter_shard, rank_prefix, resume_rank
from gigavideo.rundir.video import VideoError, decode_mp4

log = logging.getLogger("gigavideo.stage1")
ENGINES = ("template", "transformers", "openai")


def make_backend(pc, device):
    if pc.engine == "template":
        return TemplateBackend(*load_style(pc.dimensions_dir))
    if pc.engine == "transformers":
        return TransformersBackend(
            pc.llm_path, device, torch_dtype(pc.llm_dtype), pc.llm_batch_size, pc.llm_max_new_tokens, pc.llm_temperature
        )
    if pc.engine == "openai":
        return OpenAIBackend(
            pc.llm_base_url,
            pc.llm_model,
            pc.llm_api_key_env,
            pc.llm_concurrency,
            pc.llm_http_retries,
            pc.llm_timeout,
            pc.llm_temperature,
            backoff=pc.llm_backoff,
        )
    raise ConfigError(f"prompt engine {pc.engine!r} not in {ENGINES}")


def read_heldout(path: str) -> list[str]:
    """The held-out prompts: text, one per line, or JSONL with prompt."""
    lines = read_text_lines(path)
    if lines and lines[0][1].startswith("{"):
        return [row["prompt"] for _, row in read_jsonl(path, ("prompt",))]
    return [text for _, text in lines]


# ---------------------------------------------------------------- real captions


def webdataset_pairs(shards: str, cfg):
    """`wds:SHARDS`: brace-expanded shards whose samples hold an mp4 and a caption (txt, or json's caption)."""
    import braceexpand

    for url in braceexpand.braceexpand(shards):
        for sample in iter_shard(url):
            caption = sample.get("txt") or (sample.get("json") or {}).get("caption")
            yield caption, sample.get("mp4"), f"{url}:{sample['__key__']}"


# real_captions = "NAME:ARGUMENT" names a source; anything else is a JSONL/CSV file.
REAL_CAPTION_SOURCES = {"wds": webdataset_pairs, "procedural": "gigavideo.toy.real_videos:caption_pairs"}


def real_caption_pairs(spec: str, cfg):
    """(caption, mp4 bytes or None, origin) from a registered source ("wds:SHARDS" ...) or a JSONL/CSV file."""
    name, _, argument = spec.partition(":")
    if argument and name in REAL_CAPTION_SOURCES:
        yield from resolve(REAL_CAPTION_SOURCES, name, "real-caption source")(argument, cfg)
        return
    path = Path(spec)
    for _, row in caption_rows(path):
        video = (path.parent / row["video"]).resolve()
        yield row["caption"], video.read_bytes() if video.is_file() else None, str(video)


def caption_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, {caption, video, ...}) of a JSONL or CSV file; a UserError names the file and line of a bad one."""
    if path.suffix != ".csv":
        rows = read_jsonl(path, ("caption", "video"))
    else:
        text = "\n".join(line for _, line in read_text_lines(path))  # checks the encoding, line by line
        reader = csv.DictReader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
        for number, row in rows:
            if not row.get("caption") or not row.get("video"):
                raise UserError(f"{path} line {number}: needs caption and video (has {sorted(k for k in row if k)})")
    for number, row in rows:
        if not isinstance(row["caption"], str) or not isinstance(row["video"], str):
            raise UserError(f"{path} line {number}: caption and video must be text")
    return rows


def real_samples(cfg, limit: int | None, failures: list):
    kept = 0
    for i, (caption, data, origin) in enumerate(real_caption_pairs(cfg.prompts.real_captions, cfg)):
        if limit is not None and kept >= limit:
            return
        key = f"real-{i:06d}"
        try:
            if not caption or not str(caption).strip():
                raise VideoError(f"{origin}: empty caption")
            if len(str(caption)) > cfg.prompts.real_caption_max_chars:
                log.warning("dropping real caption %s: %d characters (%s)", key, len(str(caption)), origin)
                raise VideoError(f"{origin}: caption over real_caption_max_chars")
            if data is None:
                raise VideoError(f"{origin}: no video found")
            decode_mp4(data, origin)  # verify now: a bad real video is dropped here, not in stage 4
        except VideoError as err:
            log.warning("dropping real caption %s: %s", key, err)
            failures.append({"key": key, "reason": str(err)})
            continue
        kept += 1
        yield {
            "__key__": key,
            "real.mp4": data,
            "json": {
                "prompt": str(caption).strip(),
                "question": "",
                "dimension": "real",
                "source": "real",
                "lineage": {"video": origin},
                "generator": {"engine": "real_captions"},
            },
        }


# ---------------------------------------------------------------- final selection


def finalize(cfg, run, dims, units_dir, diagnosis: dict | None, parts: list[dict]) -> dict:
    """Select every dimension's prompts from all units (in key order, so the result is deterministic)."""
    pc = cfg.prompts
    out = run.stage("stage1")
    for stale in out.glob("*.tar*"):
        stale.unlink()
    units = sorted((s for p in sorted(units_dir.glob("*.tar")) for s in iter_shard(str(p))), key=lambda s: s["__key__"])
    similarity = Similarity(pc.embedder_path)
    lexical = similarity.model is None
    limits = {
        "min_words": pc.min_words,
        "max_words": pc.max_words,
        "dedup_threshold": pc.lexical_dedup_threshold if lexical else pc.dedup_threshold,
        "heldout_threshold": pc.lexical_heldout_threshold if lexical else pc.heldout_threshold,
    }
    heldout = similarity.embed(read_heldout(pc.heldout_file)) if pc.heldout_file else []
    summary, failures = {}, []
    generator = {
        "engine": pc.engine,
        "seed": pc.seed,
        "similarity": similarity.kind,
        "model": pc.llm_path or pc.llm_model or None,
        "temperature": pc.llm_temperature,
    }
    with ShardWriter(out, "stage1", "prompts", pc.samples_per_shard) as writer:
        for dim in dims:
            drops = Counter()
            candidates = []
            for unit in (u["json"] for u in units if u["json"]["dimension"] == dim.name):
                drops.update(unit["dropped"])
                candidates += [c | {"unit": unit["unit"]} for c in unit["candidates"]]
            kept = select(candidates, pc.num_per_dimension, similarity, limits, heldout, drops)
            for c in kept:
                seed = dim.seeds[c["seed_index"]] if isinstance(c.get("seed_index"), int) else None
                writer.write(
                    {
                        "__key__": f"syn-{dim.name}-{c['unit']:05d}-{c['index']:02d}",
                        "json": {
                            "prompt": c["prompt"],
                            "question": c["question"],
                            "dimension": dim.name,
                            "source": "synthetic",
                            "generator": generator,
                            "lineage": {
                                "seed": seed,
                                "subject": c["subject"],
                                "action": c["action"],
                                "unit": c["unit"],
                                "steps": ["analogy", "augment", "question"],
                            },
                        },
                    }
                )
            summary[dim.name] = {
                "kept": len(kept),
                "candidates": len(candidates),
                "dropped": dict(sorted(drops.items())),
            }
            if len(kept) < pc.num_per_dimension:
                log.warning(
                    "%s: kept %d of the %d asked for; raise --oversample", dim.name, len(kept), pc.num_per_dimension
                )
        n_synthetic = sum(s["kept"] for s in summary.values())
        limit = None if pc.real_per_synthetic < 0 else math.floor(pc.real_per_synthetic * n_synthetic)
        real = list(real_samples(cfg, limit, failures)) if pc.real_captions else []
        for sample in real:
            writer.write(sample)
    summary["real"] = {
        "kept": len(real),
        "dropped": dict(Counter(f["reason"].split(":")[-1].strip() for f in failures)),
    }
    targeted = {"dimensions": [d.name for d in dims]}
    if diagnosis is not None:  # --dimensions=auto: what the choice was made from
        targeted["diagnosis"] = {"file": str(run.path / DIAGNOSIS_FILE), **diagnosis}
    write_manifest(
        out,
        "stage1",
        {
            "summary": summary,
            "failures": failures,
            "generator": generator,
            "config": dict(pc),
            "targeted": targeted,
            "process_seconds": process_seconds(parts),
        },
    )
    return summary


def print_summary(summary: dict) -> None:
    print(f"{'dimension':32s} {'kept':>6s} {'dropped':>8s}  reasons")
    for name, s in summary.items():
        dropped = sum(s["dropped"].values())
        reasons = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        print(f"{name:32s} {s['kept']:6d} {dropped:8d}  {reasons}")


# ---------------------------------------------------------------- main


def targeted_dimensions(pc, run) -> tuple[list, dict | None]:
    """The dimensions to make prompts for, and the diagnosis they were chosen from (--dimensions=auto)."""
    if list(pc.dimensions) != ["auto"]:
        return resolve_dimensions(pc.dimensions, pc.dimensions_dir), None
    diagnosis = read_diagnosis(run)
    names = weakest(diagnosis, pc.num_weak, str(run.path / DIAGNOSIS_FILE))
    log.info("--dimensions=auto: the %d weakest of the diagnosis %s: %s", pc.num_weak, diagnosis["ranking"], names)
    return resolve_dimensions(names, pc.dimensions_dir), diagnosis


def preflight(cfg, run):
    pc = cfg.prompts
    targeted = targeted_dimensions(pc, run)
    if pc.engine == "transformers" and not Path(pc.llm_path or "/nonexistent").is_dir():
        raise FileNotFoundError(f"--llm_path={pc.llm_path!r}: the transformers engine needs a local chat model folder")
    if pc.engine == "openai":
        OpenAIBackend(pc.llm_base_url, pc.llm_model)  # checks the flags
    elif pc.engine not in ENGINES:
        raise ConfigError(f"prompt engine {pc.engine!r} not in {ENGINES}")
    if pc.heldout_file and not Path(pc.heldout_file).is_file():
        raise FileNotFoundError(f"held-out prompts file {pc.heldout_file} not found")
    if pc.heldout_file:
        read_heldout(pc.heldout_file)  # every line checked now, not after the generation
    spec = pc.real_captions
    if spec and spec.partition(":")[0] not in REAL_CAPTION_SOURCES:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"real captions file {spec} not found (expected JSONL or CSV with caption, video)")
        caption_rows(Path(spec))
    return targeted


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Generate prompts, questions and real-caption pairs into RUN_DIR/stage1.

    e.g. --num_per_dimension=200 --engine=openai
    """
    started = start_stage("stage1", "prompts", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, (dims, diagnosis) = started
    pc = cfg.prompts
    rank, world = rank_and_world()
    units_per_dimension = math.ceil(pc.num_per_dimension * pc.oversample / pc.prompts_per_call)
    units = {f"unit-{d.name}-{u:05d}": (d, u) for d in dims for u in range(units_per_dimension)}
    units_dir = run.stage("stage1") / "candidates"
    done = resume_rank(units_dir, rank)
    todo = [k for k in my_slice(list(units), rank, world) if k not in done]
    log.info(
        "stage1: %d work units (%d per dimension), %d for this rank still to do",
        len(units),
        units_per_dimension,
        len(todo),
    )
    failures = []  # units the backend failed (server down): not written, so a rerun tries them again
    if todo:
        backend = make_backend(pc, pick_device(cfg.model.device))
        with ShardWriter(units_dir, "stage1_units", rank_prefix(rank), pc.units_per_shard) as writer:
            for key in tqdm(todo, desc=f"prompts rank {rank}", unit="call", position=rank):
                dim, unit = units[key]
                result = run_unit(backend, dim, unit, pc.prompts_per_call, pc.seed, pc.max_retries)
                if not result["candidates"] and any(d.endswith("backend_error") for d in result["dropped"]):
                    failures.append({"key": key, "reason": f"the LLM gave no answer: {backend.last_error}"})
                    continue
                writer.write({"__key__": key, "json": result})
    parts = rank_parts(units_dir, rank, world, {"units": len(todo), "failures": failures})
    if parts is None:
        return  # another rank selects the final prompts
    failed = [f for part in parts for f in part.get("failures", [])]
    check_failed("stage1", failed, len(units), pc.max_failed_fraction, "work units")
    summary = finalize(cfg, run, dims, units_dir, diagnosis, parts)
    print_summary(summary)


if __name__ == "__main__":
    run_cli(main, "prompts")
