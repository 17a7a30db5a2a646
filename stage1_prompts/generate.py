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

import logging
import math
from pathlib import Path

from tqdm import tqdm

from gigavideo.cli import pick_device, run_cli, start_stage
from gigavideo.distributed import my_share, rank_and_world
from gigavideo.errors import ConfigError
from gigavideo.eval.diagnosis import DIAGNOSIS_FILE, read_diagnosis, weakest
from gigavideo.prompts.dimensions import resolve_dimensions
from gigavideo.prompts.engine import run_unit
from gigavideo.prompts.llm import ENGINES, OpenAIBackend, make_backend
from gigavideo.prompts.real_captions import (
    REAL_CAPTION_SOURCES,
    caption_rows,
)
from gigavideo.prompts.selection import finalize, print_summary, read_heldout
from gigavideo.rundir.completion import finish_rank
from gigavideo.rundir.shards import ShardWriter, rank_prefix, resume_rank

log = logging.getLogger("gigavideo.stage1")


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


def make_candidates(pc, units: dict, todo: list[str], units_dir: Path, rank: int, device) -> list[dict]:
    """The engine's steps for each work unit of this rank (analogy, augmentation, question), written as they
    finish; returns the units the backend failed (a server down), left unwritten so that a rerun tries them."""
    failures = []
    backend = make_backend(pc, device)
    with ShardWriter(units_dir, "stage1_units", rank_prefix(rank), pc.units_per_shard) as writer:
        for key in tqdm(todo, desc=f"prompts rank {rank}", unit="call", position=rank):
            dim, unit = units[key]
            result = run_unit(backend, dim, unit, pc.prompts_per_call, pc.seed, pc.max_retries)
            if not result["candidates"] and any(d.endswith("backend_error") for d in result["dropped"]):
                failures.append({"key": key, "reason": f"the LLM gave no answer: {backend.last_error}"})
                continue
            writer.write({"__key__": key, "json": result})
    return failures


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
    todo = [k for k in my_share(list(units), rank, world) if k not in done]
    log.info(
        "stage1: %d work units (%d per dimension), %d for this rank still to do",
        len(units),
        units_per_dimension,
        len(todo),
    )
    failures = make_candidates(pc, units, todo, units_dir, rank, pick_device(cfg.model.device)) if todo else []
    targeted = {"dimensions": [d.name for d in dims]}
    if diagnosis is not None:  # --dimensions=auto: what the choice was made from
        targeted["diagnosis"] = {"file": str(run.path / DIAGNOSIS_FILE), **diagnosis}
    manifest = finish_rank(
        run.stage("stage1"),
        "stage1",
        rank,
        world,
        {"work_units": len(units), "failures": failures},
        tally=lambda failed: (failed, len(units)),
        max_failed_fraction=pc.max_failed_fraction,
        finalize=lambda parts: finalize(cfg, run, dims, units_dir, targeted),  # one rank selects the final prompts
        parts_dir=units_dir,
        what="work units",
    )
    if manifest is not None:
        print_summary(manifest["summary"])


if __name__ == "__main__":
    run_cli(main, "prompts")
