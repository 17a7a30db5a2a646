#!/usr/bin/env python
"""The toy world's ablations, side by side: does the method fix the weak dimension, and at what cost to realism?

One shared run does what every variant has in common (the base model's pre-training, stage 1,
stage 2 and stage 3); then each variant runs stage 4 and the eval in its own copy, with the
same seeds. The baseline's eval videos are rendered once and handed to every variant (the eval
resumes from them). Prints one table, also written to OUT/ablations.md and .json: the held-out
judge score of the weak dimension (object_shade) before and after, with the paired
difference and its 95% bootstrap interval; the control dimension (object_identity); the
realism distance to the real clips; wall time.

    python bench/toy_ablations.py --out=runs/toy-ablations
    python bench/toy_ablations.py --variants=method,sft --max_steps=200
    python bench/toy_ablations.py --variants=method --seeds=0,1,2,3   # the spread over training seeds
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gigavideo.cli import run_cli
from gigavideo.config import load_config
from gigavideo.rundir.layout import STAGE_SCRIPTS

REPO = Path(__file__).resolve().parent.parent

# Each variant changes one thing in the preset's stage 4, which is the method. The paper does not say how it
# maps rewards to weights, so raw and normalized are tried beside the preset's own mapping.
VARIANTS = {
    "method": ("the method (the preset's stage 4)", []),
    "sft": ("uniform weights (SFT)", ["--weight_mapping=uniform"]),
    "no_realism": ("no realism loss", ["--realism_weight=0"]),
    "raw": ("raw reward weights", ["--weight_mapping=raw"]),
    "normalized": ("normalized reward weights", ["--weight_mapping=normalized"]),
}
WEAK, CONTROL = "object_shade", "object_identity"


def run(stage: str, run_dir: Path, config: str, *flags: str) -> float:
    start = time.time()
    cmd = [sys.executable, str(REPO / STAGE_SCRIPTS[stage]), f"--run_dir={run_dir}", f"--config={config}", *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} failed in {run_dir}:\n{done.stderr[-4000:]}")
    return time.time() - start


def hand_over_baseline(source: Path, target: Path) -> None:
    """The baseline's eval videos and records: identical for every variant (same base model, same seeds)."""
    (target / "eval" / "records").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "eval" / "videos" / "baseline", target / "eval" / "videos" / "baseline")
    shutil.copy(source / "eval" / "settings-baseline.json", target / "eval")
    lines = [
        line
        for p in sorted((source / "eval" / "records").glob("*.jsonl"))
        for line in p.read_text().splitlines()
        if json.loads(line)["label"] == "baseline"
    ]
    (target / "eval" / "records" / "baseline.jsonl").write_text("\n".join(lines) + "\n")


def row(name: str, seed: int, report: dict, seconds: float) -> dict:
    heldout = report["suites"]["heldout"]
    weak, control = heldout["dimensions"][WEAK], heldout["dimensions"].get(CONTROL, {})
    return {
        "variant": name,
        "seed": seed,
        "description": VARIANTS[name][0],
        "weak": weak,
        "control": control,
        "realism": heldout.get("realism", {}),
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    lines = [
        f"| variant | seed | {WEAK}: before | after | difference [95% CI] | {CONTROL}: before -> after | "
        "realism distance: before -> after | stage 4 + eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, c, real = r["weak"], r["control"], r["realism"]
        control = f"{100 * c['baseline']:.1f} -> {100 * c['finetuned']:.1f}" if "baseline" in c else "-"
        realism = (
            f"{real['baseline']:.3f} -> {real['finetuned']:.3f} ({100 * real['relative_change']:+.0f}%"
            + (f" [{100 * real['ci_low']:+.0f}, {100 * real['ci_high']:+.0f}]" if "ci_low" in real else "")
            + ")"
            if "relative_change" in real
            else "-"
        )
        lines.append(
            f"| {r['description']} | {r['seed']} | {100 * w['baseline']:.1f} | {100 * w['finetuned']:.1f} | "
            f"{100 * w['difference']:+.1f} [{100 * w['ci_low']:+.1f}, {100 * w['ci_high']:+.1f}] | "
            f"{control} | {realism} | {r['seconds']:.0f} s |"
        )
    for name in dict.fromkeys(r["variant"] for r in rows):
        changes = [100 * r["weak"]["difference"] for r in rows if r["variant"] == name]
        if len(changes) > 1:
            lines.append(
                f"\n{VARIANTS[name][0]}: {WEAK} {np.mean(changes):+.1f} on average over {len(changes)} "
                f"seeds (from {min(changes):+.1f} to {max(changes):+.1f})"
            )
    return "\n".join(lines)


def main(
    out: str = "runs/toy-ablations",
    config: str = "toy",
    variants: str = ",".join(VARIANTS),
    seeds: str = "0",
    **train_flags,
):
    """Run the shared stages once, then stage 4 + eval per variant and training seed (--seeds=0,1,2: the
    spread from run to run); extra flags (e.g. --max_steps=200) go to stage 4."""
    names = [v for v in (variants.split(",") if isinstance(variants, str) else variants) if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seed_list = [int(x) for x in (str(seeds).split(",") if isinstance(seeds, (str, int)) else seeds)]
    out = Path(out)
    shared, timings = out / "shared", {}
    for stage in ("base", "stage1", "stage2", "stage3"):
        timings[stage] = run(stage, shared, config)
        print(f"{stage}: {timings[stage]:.0f} s", flush=True)  # base: the toy base model's pre-training, once
    extra = [f"--{k}={v}" for k, v in train_flags.items()]
    rows, first = [], None
    for name in names:
        for seed in seed_list:
            target = out / (name if seed_list == [0] else f"{name}-seed{seed}")
            if not (target / "eval" / "manifest.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(shared, target, ignore=shutil.ignore_patterns("eval", "stage4"))
                if first is not None:
                    hand_over_baseline(first, target)
            seconds = run("stage4", target, config, *VARIANTS[name][1], f"--seed={seed}", *extra) + run(
                "eval", target, config
            )
            first = first or target
            rows.append(row(name, seed, json.loads((target / "eval" / "report.json").read_text()), seconds))
            print(f"{name} (seed {seed}): done in {seconds:.0f} s", flush=True)
    tc = load_config(config, "train", train_flags).train
    text = (
        f"Toy world ablations ({config} preset; shared stages 1-3: {sum(timings.values()):.0f} s). The method: "
        f"{tc.weight_mapping} weights (T={tc.weight_temperature}), realism weight {tc.realism_weight}, "
        f"{tc.mode} fine-tuning, {tc.max_steps} steps. Held-out judge scores x100.\n\n{table(rows)}\n"
    )
    (out / "ablations.md").write_text(text)
    (out / "ablations.json").write_text(json.dumps({"timings": timings, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    run_cli(main, "train")
