"""Diagnosis: where the base model is weak, measured before any training.

`eval/evaluate.py --diagnose` renders the base model alone on the eval's prompt suites and seeds for every
dimension of `eval.dimensions`, scores the videos with the stage-3 judge, and `diagnose` summarises the
scores: per dimension the mean reward with its bootstrap interval, and a weakness rank (1 = weakest) by
the gap between the dimension's `target` (its TOML file; 1 when unset) and that mean. Stage 1 with
`--dimensions=auto --num_weak=K` targets the K weakest; its manifest keeps the diagnosis it used.
"""

from __future__ import annotations

import json

import numpy as np

from gigavideo.errors import ConfigError
from gigavideo.eval.stats import bootstrap_mean
from gigavideo.rundir.layout import RunDir, StageNotReady

DIAGNOSIS = "diagnosis"  # the stage name: RUN_DIR/diagnosis/ holds its videos and records
DIAGNOSIS_FILE = "diagnosis.json"  # RUN_DIR/diagnosis.json: what stage 1 reads


def diagnose(dims, videos: list[dict], records: dict, bootstrap_samples: int, seed: int) -> dict:
    """videos: the eval's {key, suite, dimension, ...}; records: ("baseline", key) -> {reward, ...}."""
    summary = {}
    for dim in dims:
        suites = {}
        for suite in dict.fromkeys(v["suite"] for v in videos):
            rewards = [
                records[("baseline", v["key"])]["reward"]
                for v in videos
                if v["suite"] == suite and v["dimension"] == dim.name
            ]
            scored = [r for r in rewards if r is not None]
            suites[suite] = {"failed": len(rewards) - len(scored)} | (
                bootstrap_mean(scored, bootstrap_samples, seed) if scored else {"n": 0}
            )
        means = [s["mean"] for s in suites.values() if s["n"]]
        score = float(np.mean(means)) if means else None
        summary[dim.name] = {
            "score": score,
            "target": dim.target,
            "gap": None if score is None else dim.target - score,
            "suites": suites,
        }
    ranking = sorted((n for n in summary if summary[n]["score"] is not None), key=lambda n: -summary[n]["gap"])
    for rank, name in enumerate(ranking, 1):
        summary[name]["weakness_rank"] = rank
    return {"dimensions": summary, "ranking": ranking}


def pipeline_steps(cfg) -> list[str]:
    """The steps of slurm/pipeline.sh for a preset: the diagnosis first where stage 1 targets dimensions=auto."""
    auto = list(cfg.prompts.dimensions) == ["auto"]
    return ([DIAGNOSIS] if auto else []) + ["stage1", "stage2", "stage3", "stage4", "eval"]


def weakest(diagnosis: dict, k: int, source: str = DIAGNOSIS_FILE) -> list[str]:
    """The names of the k weakest dimensions of a diagnosis, weakest first."""
    if k < 1:
        raise ConfigError(f"--num_weak={k}: target at least one dimension")
    ranking = diagnosis["ranking"]
    if len(ranking) < k:
        raise ConfigError(f"--num_weak={k}, but {source} ranks only {len(ranking)} dimensions: {ranking}")
    return ranking[:k]


def read_diagnosis(run: RunDir) -> dict:
    path = run.path / DIAGNOSIS_FILE
    if not path.is_file():
        raise StageNotReady(
            f"--dimensions=auto needs the base model's diagnosis, and {path} does not exist; run "
            f"eval/evaluate.py --diagnose --run_dir {run.path} first (slurm/pipeline.sh does when the preset says auto)"
        )
    return json.loads(path.read_text())


def diagnosis_table(diagnosis: dict) -> str:
    lines = [
        "| weakness rank | dimension | score | target | gap | 95% interval (per suite) |",
        "|---|---|---|---|---|---|",
    ]
    order = diagnosis["ranking"] + [n for n in diagnosis["dimensions"] if n not in diagnosis["ranking"]]
    for name in order:
        d = diagnosis["dimensions"][name]
        intervals = ", ".join(
            f"{suite} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] (n={s['n']})" if s["n"] else f"{suite}: no score"
            for suite, s in d["suites"].items()
        )
        score = "-" if d["score"] is None else f"{d['score']:.4f}"
        gap = "-" if d["gap"] is None else f"{d['gap']:+.4f}"
        lines.append(f"| {d.get('weakness_rank', '-')} | {name} | {score} | {d['target']:.2f} | {gap} | {intervals} |")
    return "\n".join(lines)
