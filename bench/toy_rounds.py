#!/usr/bin/env python
"""Two offline rounds against one round with the same compute, on the toy world (docs/toy-and-rounds.md).

- `rounds`: `ROUNDS=2 PRESET=toy-rounds bash slurm/pipeline.sh` (what `make demo-rounds` runs);
- `double`: one round of the same preset with twice the stage-1/2 videos and twice the training steps.

Both start from the same pre-trained base (pre-trained once, then copied) and their evals use the same
prompts and seeds, so the double round's model and round 2's are compared pairwise too. Prints one table,
also written to OUT/toy_rounds.md and .json: per weak dimension and the control, each model's score, the
differences with their 95% intervals, the realism distance, the share of blank videos (no square drawn,
by the toy judge's segmentation) and the process-seconds of each run.

    python bench/toy_rounds.py --out=runs/toy-rounds
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fire

from gigavideo.eval.report import load_records
from gigavideo.eval.stats import paired_bootstrap
from gigavideo.rundir.files import write_json_atomic
from gigavideo.rundir.video import decode_mp4
from gigavideo.toy.judge import track

REPO = Path(__file__).resolve().parent.parent
PRESET = "toy-rounds"


def pipeline(run_dir: Path, preset: str, rounds: int) -> None:
    env = {**os.environ, "LOCAL": "1", "ROUNDS": str(rounds), "PRESET": preset, "RUN_DIR": str(run_dir)}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pipeline in {run_dir} failed:\n{done.stderr[-4000:]}")


def blank_share(videos: Path) -> float:
    """The share of a folder's mp4s in which the toy judge's segmentation finds no square in most frames."""
    paths = sorted(videos.rglob("*.mp4"))
    blank = [track(decode_mp4(p.read_bytes(), str(p))[0])["visible"] < 0.5 for p in paths]
    return sum(blank) / len(blank)


def rewards(records: dict, label: str, dim: str) -> dict[str, float]:
    return {
        key: r["reward"]
        for (lab, key), r in records.items()
        if lab == label and key.startswith(f"heldout/{dim}/") and r["reward"] is not None
    }


def seconds(run: Path) -> float:
    total = 0.0
    for manifest in run.rglob("manifest.json"):
        if manifest.parent.name in ("diagnosis", "stage1", "stage2", "stage3", "stage4", "eval"):
            total += json.loads(manifest.read_text()).get("process_seconds") or 0.0
    return total


def main(out: str = "runs/toy-rounds", bootstrap_samples: int = 2000):
    out_dir = Path(out)
    rounds_dir, double_dir = out_dir / "rounds", out_dir / "double"
    pipeline(rounds_dir, PRESET, 2)
    double_preset = out_dir / "double.toml"
    double_preset.write_text(
        f'extends = "{PRESET}"\n[prompts]\nnum_per_dimension = 1536\n[train]\nmax_steps = 2000\n'
        "save_every = 200\nsample_every = 200\n"
    )
    if not (double_dir / "models" / "base").is_dir():
        shutil.copytree(rounds_dir / "models" / "base", double_dir / "models" / "base")
    pipeline(double_dir, str(double_preset), 1)

    evals = {
        "base": (rounds_dir / "round1", "baseline"),
        "round 1": (rounds_dir / "round1", "finetuned"),
        "round 2": (rounds_dir / "round2", "finetuned"),
        "one round, 2x data and steps": (double_dir / "round1", "finetuned"),
    }
    records = {name: load_records(run / "eval" / "records") for name, (run, _) in evals.items()}
    dims = json.loads((rounds_dir / "round1" / "eval" / "report.json").read_text())["protocol"]["dimensions"]
    result = {"dimensions": {}, "blank": {}, "realism": {}, "seconds": {}}
    for dim in dims:
        scores = {name: rewards(records[name], label, dim) for name, (_, label) in evals.items()}
        row = {name: sum(s.values()) / len(s) for name, s in scores.items()}
        for a, b in (
            ("base", "round 1"),
            ("round 1", "round 2"),
            ("base", "round 2"),
            ("base", "one round, 2x data and steps"),
            ("one round, 2x data and steps", "round 2"),
        ):
            keys = sorted(set(scores[a]) & set(scores[b]))
            row[f"{b} - {a}"] = paired_bootstrap(
                [scores[a][k] for k in keys], [scores[b][k] for k in keys], bootstrap_samples
            )
        result["dimensions"][dim] = row
    for name, (run, label) in evals.items():
        result["blank"][name] = blank_share(run / "eval" / "videos" / label / "heldout")
        realism = json.loads((run / "eval" / "report.json").read_text())["suites"]["heldout"]["realism"]
        result["realism"][name] = realism[label]
    result["seconds"] = {"two rounds": seconds(rounds_dir), "one round, 2x data and steps": seconds(double_dir)}

    lines = ["| dimension | " + " | ".join(evals) + " | difference [95% interval] |", "|---" * (len(evals) + 2) + "|"]
    for dim, row in result["dimensions"].items():
        diffs = "; ".join(
            f"{k}: {v['difference']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]"
            for k, v in row.items()
            if isinstance(v, dict)
        )
        lines.append(f"| {dim} | " + " | ".join(f"{row[n]:.4f}" for n in evals) + f" | {diffs} |")
    lines.append("| blank videos | " + " | ".join(f"{100 * result['blank'][n]:.1f}%" for n in evals) + " | |")
    lines.append("| realism distance | " + " | ".join(f"{result['realism'][n]:.3f}" for n in evals) + " | |")
    lines += ["", "process-seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())]
    text = "\n".join(lines) + "\n"
    (out_dir / "toy_rounds.md").write_text(text)
    write_json_atomic(out_dir / "toy_rounds.json", result)
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
