"""The report across rounds: every round's model against the previous round (its own eval) and against the
original base (paired over the videos both evals made), the drift and realism per round, and each step's cost."""

from __future__ import annotations

import json
import logging

from gigavideo.eval.diagnosis import DIAGNOSIS
from gigavideo.eval.report import DRIFT_KEYS, drift, load_records
from gigavideo.eval.stats import paired_bootstrap
from gigavideo.rundir.layout import RunDir, read_manifest

log = logging.getLogger("gigavideo.rounds")
COST_STEPS = (DIAGNOSIS, "stage1", "stage2", "stage3", "stage4", "eval")


def round_summary(base_records: dict, records: dict, report: dict, suite: str, dim: str, samples: int, seed: int):
    """One round's row: its model against the previous round (its eval) and against the original base."""
    own = report["suites"][suite]["dimensions"][dim]
    keys = sorted(
        key
        for (label, key), record in records.items()
        if label == "finetuned" and key.startswith(f"{suite}/{dim}/") and record.get("reward") is not None
    )
    paired = [k for k in keys if (base_records.get(("baseline", k)) or {}).get("reward") is not None]
    row = {"score": own.get("finetuned"), "vs_previous": {k: own.get(k) for k in ("difference", "ci_low", "ci_high")}}
    if paired:
        versus = paired_bootstrap(
            [base_records[("baseline", k)]["reward"] for k in paired],
            [records[("finetuned", k)]["reward"] for k in paired],
            samples,
            seed,
        )
        row["vs_base"] = {k: versus[k] for k in ("n", "difference", "ci_low", "ci_high")}
    stats = {
        label: [r["stats"] for (lab, k), r in source.items() if lab == label and k in paired and r.get("stats")]
        for label, source in (("baseline", base_records), ("finetuned", records))
    }
    if all(stats.values()):
        row["drift_vs_base"] = {
            k: v["relative_change"] for k, v in drift(stats["baseline"], stats["finetuned"]).items()
        }
    realism = report["suites"][suite].get("realism") or {}
    row["realism_distance"] = realism.get("finetuned")
    row["realism_vs_previous"] = {k: realism.get(k) for k in ("relative_change", "ci_low", "ci_high")}
    return row


def cost(run: RunDir) -> dict[str, float | None]:
    """Process-seconds per step of one round, from the manifests (None: the step did not run there)."""
    out = {}
    for step in COST_STEPS:
        out[step] = read_manifest(run, step).get("process_seconds") if run.is_complete(step) else None
    return out


def build(run_dir: str, rounds: int, samples: int, seed: int) -> dict:
    runs = [RunDir(run_dir).round(r) for r in range(1, rounds + 1)]
    for run in runs:
        read_manifest(run, "eval")  # a clear error naming the round that has not finished
    reports = [json.loads((run.eval / "report.json").read_text()) for run in runs]
    records = [load_records(run.eval / "records") for run in runs]
    out = {"rounds": rounds, "base": reports[0]["protocol"]["baseline"], "suites": {}, "cost": {}}
    for suite, body in reports[0]["suites"].items():
        dims = {}
        for dim, first in body["dimensions"].items():
            dims[dim] = {
                "base": first.get("baseline"),
                "rounds": [
                    round_summary(records[0], records[r], reports[r], suite, dim, samples, seed)
                    for r in range(rounds)
                    if dim in reports[r]["suites"].get(suite, {}).get("dimensions", {})
                ],
            }
        out["suites"][suite] = {
            "dimensions": dims,
            "base_realism_distance": (body.get("realism") or {}).get("baseline"),
        }
    out["cost"] = {f"round{r}": cost(run) for r, run in enumerate(runs, 1)}
    out["targeted"] = {f"round{r}": targeted(run) for r, run in enumerate(runs, 1)}
    return out


def targeted(run: RunDir) -> dict:
    """The dimensions a round's stage 1 targeted, and the diagnosis (ranking and scores) it chose them from."""
    chosen = read_manifest(run, "stage1").get("targeted", {})
    diagnosis = chosen.get("diagnosis")
    scores = {n: d["score"] for n, d in diagnosis["dimensions"].items()} if diagnosis else None
    return {
        "dimensions": chosen.get("dimensions"),
        "ranking": diagnosis and diagnosis["ranking"],
        "diagnosis_scores": scores,
    }


def _number(value, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _interval(d: dict | None) -> str:
    if not d or d.get("difference", d.get("relative_change")) is None:
        return "-"
    if "relative_change" in d:
        return f"{100 * d['relative_change']:+.1f}%" + (
            f" [{100 * d['ci_low']:+.1f}%, {100 * d['ci_high']:+.1f}%]" if d.get("ci_low") is not None else ""
        )
    return f"{d['difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def markdown(report: dict) -> str:
    lines = [
        f"# GigaVideo-1 over {report['rounds']} rounds",
        "",
        f"Base model: `{report['base']}`. Round R trains on round R-1's model's own videos. Differences are "
        "paired over the same prompts and seeds, with 95% percentile bootstrap intervals; realism distance: lower "
        "is closer to the real clips.",
        "",
    ]
    for suite, body in report["suites"].items():
        lines += [
            f"## Suite `{suite}`",
            "",
            "| dimension | model | score | vs previous round | vs base | drift vs base ("
            + ", ".join(DRIFT_KEYS)
            + ") | realism distance (vs previous) |",
            "|---" * 7 + "|",
        ]
        for dim, d in body["dimensions"].items():
            lines.append(
                f"| {dim} | base | {_number(d['base'])} | | | | {_number(body['base_realism_distance'], '.3f')} |"
            )
            for r, row in enumerate(d["rounds"], 1):
                shifts = row.get("drift_vs_base")
                drift_text = (
                    ", ".join(f"{100 * v:+.1f}%" if v is not None else "-" for v in shifts.values()) if shifts else "-"
                )
                lines.append(
                    f"| {dim} | round {r} | {_number(row['score'])} | {_interval(row['vs_previous'])} | "
                    f"{_interval(row.get('vs_base'))} | {drift_text} | {_number(row['realism_distance'], '.3f')} "
                    f"({_interval(row['realism_vs_previous'])}) |"
                )
        lines.append("")
    lines += [
        "Each round's videos beside its base's: "
        + ", ".join(f"[{name}]({name}/eval/gallery.html)" for name in report["cost"]),
        "",
        "## What each round targeted",
        "",
        "| round | diagnosis of its base (weakest first) | targeted |",
        "|---|---|---|",
    ]
    for name, t in report["targeted"].items():
        ranking = ", ".join(f"{n} {t['diagnosis_scores'][n]:.3f}" for n in t["ranking"]) if t["ranking"] else "(pinned)"
        lines.append(f"| {name} | {ranking} | {', '.join(t['dimensions'] or [])} |")
    lines += [
        "",
        "## Cost (process-seconds: wall time summed over ranks; GPU-seconds with one process per GPU)",
        "",
        "| round | " + " | ".join(COST_STEPS) + " | data (stages 1-3) / training (stage 4) |",
        "|---" * (len(COST_STEPS) + 2) + "|",
    ]
    for name, steps in report["cost"].items():
        data = sum(steps[s] or 0 for s in ("stage1", "stage2", "stage3"))
        ratio = f"{data / steps['stage4']:.1f}x" if steps.get("stage4") else "-"
        lines.append(f"| {name} | " + " | ".join(_number(steps[s], ".0f") for s in COST_STEPS) + f" | {ratio} |")
    return "\n".join(lines) + "\n"
