#!/usr/bin/env python
"""Does a second round add? Variants of round 2 against round 1 and against one longer round, over training
seeds, in the toy world (docs/toy-and-rounds.md).

Per seed (the stage-1, stage-2 and training seeds; the pre-trained base and the eval's prompts and seeds are
the same for every seed):
- `plain`: `ROUNDS=2 PRESET=toy-rounds bash slurm/pipeline.sh` (what `make demo-rounds` runs) with that seed;
- each other variant: the same round 1 (copied), then round 2 with the variant's config keys, which apply
  from round 2 on (round 1 is shared, so every variant's round 2 - round 1 is paired on the same model);
- `one round, 2x`: one round with twice the stage-1/2 videos and twice the training steps (the same compute
  as two rounds).

One table, also written to OUT/toy_rounds.md and .json: per variant, the weakest dimension's round 2 - round 1
(paired over every seed's held-out prompts and seeds, with its 95% interval), the realism distance against
the base's, the control dimension's round 2 - round 1, and round 2 - the one longer round on the weakest
dimension; then per seed. Finished runs are reused, so adding a seed or a variant only runs what is new.

    python bench/toy_rounds.py --out=runs/toy-rounds --seeds=0,1,2
    python bench/toy_rounds.py --variants=plain,anchor   # a subset
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gigavideo.cli import run_cli
from gigavideo.eval.report import load_records
from gigavideo.eval.stats import paired_bootstrap
from gigavideo.rundir.files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
PRESET = "toy-rounds"
CONTROL = "object_identity"
# Config keys each variant sets from round 2 on (round 1 is the same for all: its base is the model), over PLAIN,
# which turns off what the rounds preset's default turns on. docs/toy-and-rounds.md says why each.
PLAIN = "[render]\nbase_share = 0.0\n[train]\nanchor_weight_by_round = []\n"
VARIANTS = {
    "plain": "",
    "anchor": "[train]\nanchor_weight = 1.0\n",
    "realism by round": "[train]\nrealism_weight_by_round = [0.25, 1.0]\n",
    "per-dimension advantage": '[train]\nweight_mapping = "advantage"\nweight_groups = "dimension"\n',
    "half from the base": "[render]\nbase_share = 0.5\n",
    "three quarters from the base": "[render]\nbase_share = 0.75\n",
    "all from the base": "[render]\nbase_share = 1.0\n",
    "anchor 0.25 on half from the base": "[render]\nbase_share = 0.5\n[train]\nanchor_weight = 0.25\n",
}
DOUBLE = "[prompts]\nnum_per_dimension = 1536\n[train]\nmax_steps = 2000\nsave_every = 200\nsample_every = 200\n"


def pipeline(run_dir: Path, preset: Path, rounds: int) -> None:
    env = {**os.environ, "LOCAL": "1", "ROUNDS": str(rounds), "PRESET": str(preset), "RUN_DIR": str(run_dir)}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pipeline in {run_dir} failed:\n{done.stderr[-4000:]}")


def write_preset(path: Path, seed: int, extra: str) -> Path:
    seeds = "".join(f"[{s}]\nseed = {1000 * seed}\n" for s in ("prompts", "render", "train"))
    text = f'extends = "{PRESET}"\n' + merge_sections(seeds + extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def merge_sections(text: str) -> str:
    """TOML with each [section] and each key once: repeated sections gathered under the first, the last value of a
    repeated key kept."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line, {})
        elif line:
            current[line.split("=", 1)[0].strip()] = line
    return "".join(f"{name}\n" + "".join(f"{line}\n" for line in keys.values()) for name, keys in sections.items())


def copy_missing(source: Path, target: Path) -> None:
    if not target.exists():
        shutil.copytree(source, target, symlinks=True)


def run_seed(out: Path, seed: int, variants: list[str]) -> dict[str, Path]:
    """Every run of one seed (reused when finished); returns name -> run directory."""
    top = out / f"seed{seed}"
    runs = {"plain": top / "plain"}
    base = out / "base"  # pre-trained once, for every seed
    if base.is_dir():
        copy_missing(base, runs["plain"] / "models" / "base")
    pipeline(runs["plain"], write_preset(top / "presets" / "plain.toml", seed, PLAIN), 2)
    copy_missing(runs["plain"] / "models" / "base", base)
    for name in variants:
        if name == "plain":
            continue
        runs[name] = top / name.replace(" ", "-")
        copy_missing(runs["plain"] / "models", runs[name] / "models")
        copy_missing(runs["plain"] / "round1", runs[name] / "round1")
        pipeline(runs[name], write_preset(top / "presets" / f"{runs[name].name}.toml", seed, PLAIN + VARIANTS[name]), 2)
    runs["one round, 2x"] = top / "double"
    copy_missing(runs["plain"] / "models", runs["one round, 2x"] / "models")
    pipeline(runs["one round, 2x"], write_preset(top / "presets" / "double.toml", seed, DOUBLE), 1)
    return runs


def rewards(run: Path, label: str, dim: str) -> dict[str, float]:
    records = load_records(run / "eval" / "records")
    return {
        key: r["reward"]
        for (lab, key), r in records.items()
        if lab == label and key.startswith(f"heldout/{dim}/") and r["reward"] is not None
    }


def realism(run: Path, label: str) -> float:
    return json.loads((run / "eval" / "report.json").read_text())["suites"]["heldout"]["realism"][label]


def pairs(before: dict[str, float], after: dict[str, float]) -> list[tuple[float, float]]:
    """(before, after) for every eval sample both have: the same prompt and seed."""
    return [(before[k], after[k]) for k in sorted(set(before) & set(after))]


def paired(both: list[tuple[float, float]], samples: int) -> dict:
    return paired_bootstrap([a for a, _ in both], [b for _, b in both], samples)


def measure(all_runs: dict[int, dict[str, Path]], variants: list[str], samples: int) -> dict:
    """Per variant, pooled over seeds (every seed's pairs together), and per seed."""
    result = {"variants": {}, "seeds": {}}
    for name in variants:
        pooled = {"weakest": [], "control": [], "vs_double": [], "realism": []}
        for seed, runs in all_runs.items():
            round1, round2, double = runs["plain"] / "round1", runs[name] / "round2", runs["one round, 2x"] / "round1"
            weakest = json.loads((round1 / "diagnosis.json").read_text())["ranking"][0]
            compared = {
                "weakest": pairs(rewards(round1, "finetuned", weakest), rewards(round2, "finetuned", weakest)),
                "control": pairs(rewards(round1, "finetuned", CONTROL), rewards(round2, "finetuned", CONTROL)),
                "vs_double": pairs(rewards(double, "finetuned", weakest), rewards(round2, "finetuned", weakest)),
            }
            row = {"weakest_dimension": weakest} | {part: paired(p, samples) for part, p in compared.items()}
            base = realism(round1, "baseline")
            row["realism_vs_base"] = realism(round2, "finetuned") / base - 1
            row["double_realism_vs_base"] = realism(double, "finetuned") / base - 1
            for part, p in compared.items():
                pooled[part] += p
            pooled["realism"].append(row["realism_vs_base"])
            result["seeds"].setdefault(str(seed), {})[name] = row
        summary = {part: paired(pooled[part], samples) for part in ("weakest", "control", "vs_double")}
        summary["realism_vs_base"] = sum(pooled["realism"]) / len(pooled["realism"])
        result["variants"][name] = summary | {"seeds": len(all_runs)}
    return result


def interval(d: dict) -> str:
    return f"{100 * d['difference']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def table(result: dict) -> str:
    header = (
        "| round 2 variant | weakest: round 2 - round 1 | realism distance vs base | control: round 2 - round 1 "
        "| weakest: round 2 - one round of 2x |"
    )
    lines = [header, "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(
            f"| {name} | {interval(v['weakest'])} | {100 * v['realism_vs_base']:+.1f}% | {interval(v['control'])} "
            f"| {interval(v['vs_double'])} |"
        )
    lines += [
        "",
        "| seed | variant | weakest | round 2 - round 1 | realism vs base | one round of 2x: realism vs base |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for seed, rows in result["seeds"].items():
        for name, row in rows.items():
            lines.append(
                f"| {seed} | {name} | {row['weakest_dimension']} | {interval(row['weakest'])} | "
                f"{100 * row['realism_vs_base']:+.1f}% | {100 * row['double_realism_vs_base']:+.1f}% |"
            )
    return "\n".join(lines) + "\n"


def main(
    out: str = "runs/toy-rounds",
    seeds=(0, 1, 2),
    variants: str = ",".join(VARIANTS),
    bootstrap_samples: int = 2000,
    table_name: str = "toy_rounds",
):
    """Run what is missing, then print the table (module docstring), also written to OUT/TABLE_NAME.md and .json.
    Rewards x100 in the table."""
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--variants: {unknown} not among {list(VARIANTS)}")
    seeds = [int(s) for s in (str(seeds).split(",") if isinstance(seeds, str | int) else seeds)]
    out_dir = Path(out)
    all_runs = {seed: run_seed(out_dir, seed, names) for seed in seeds}
    result = measure(all_runs, names, bootstrap_samples)
    text = table(result)
    (out_dir / f"{table_name}.md").write_text(text)
    write_json_atomic(out_dir / f"{table_name}.json", result)
    print(text)


if __name__ == "__main__":
    run_cli(main)
