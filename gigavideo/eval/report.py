"""The eval's report: paired judge scores with bootstrap intervals, drift, VBench-2.0 and the paper, per dimension.

Input is one record per (model, video): its judge reward (or why it has none) and its drift
statistics. Output is report.json, report.md, one bar chart per suite and TensorBoard scalars.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gigavideo.eval.figures import bar_chart_png
from gigavideo.eval.stats import paired_bootstrap

LABELS = ("baseline", "finetuned")
DRIFT_KEYS = ("brightness", "contrast", "saturation", "motion")


def load_records(records_dir: Path) -> dict:
    """(label, key) -> record, from every rank's record file (a line cut short by a kill is ignored)."""
    records = {}
    for path in sorted(records_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[(record["label"], record["key"])] = record
    return records


def drift(base_stats: list[dict], tuned_stats: list[dict]) -> dict:
    """Per statistic: the mean over baseline videos, over fine-tuned ones, and the relative change."""
    out = {}
    for key in DRIFT_KEYS:
        b, f = float(np.mean([s[key] for s in base_stats])), float(np.mean([s[key] for s in tuned_stats]))
        out[key] = {"baseline": b, "finetuned": f, "relative_change": (f - b) / b if b else None}
    return out


def realism_distance(stats: list[dict], reference: list[dict]) -> float:
    """How far a set of videos is from real ones: the Frechet distance between diagonal Gaussians fitted
    to their drift statistics, each statistic in units of its spread over the real videos."""
    return _frechet(_matrix(stats), _matrix(reference))


def _matrix(stats: list[dict]) -> np.ndarray:
    return np.array([[s[k] for k in DRIFT_KEYS] for s in stats], dtype=float)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.maximum(b.std(0), 1e-3)
    a, b = a / scale, b / scale
    return float(((a.mean(0) - b.mean(0)) ** 2 + (a.std(0) - b.std(0)) ** 2).sum())


def realism(
    videos: list[dict],
    records: dict,
    reference: list[dict],
    bootstrap_samples: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Realism distance of both models' videos to the real clips, and its relative change; with
    bootstrap_samples, a percentile interval of the relative change (videos resampled in pairs, real
    clips resampled too), so that a change within the estimate's noise reads as one. Only videos with
    statistics on both sides count, so that both distances are over the same prompts and seeds."""
    paired = [v for v in videos if all(records[(label, v["key"])].get("stats") for label in LABELS)]
    if not paired:
        return {label: None for label in LABELS} | {"videos": 0}
    base, tuned = (_matrix([records[(label, v["key"])]["stats"] for v in paired]) for label in LABELS)
    real = _matrix(reference)
    out = {"baseline": _frechet(base, real), "finetuned": _frechet(tuned, real), "videos": len(paired)}
    if out["baseline"]:
        out["relative_change"] = (out["finetuned"] - out["baseline"]) / out["baseline"]
    if out.get("relative_change") is not None and bootstrap_samples and len(paired) > 1:
        rng = np.random.default_rng(seed)
        changes = []
        for _ in range(bootstrap_samples):
            pick, ref = rng.integers(0, len(paired), len(paired)), real[rng.integers(0, len(real), len(real))]
            before, after = _frechet(base[pick], ref), _frechet(tuned[pick], ref)
            changes.append((after - before) / before if before else np.nan)
        lo, hi = np.nanquantile(changes, [(1 - level) / 2, 1 - (1 - level) / 2])
        out |= {"ci_low": float(lo), "ci_high": float(hi), "level": level}
    return out


def dimension_summary(videos: list[dict], records: dict, bootstrap_samples: int, seed: int) -> dict:
    """videos: {key, dimension, ...}; records: (label, key) -> record. Pairs with a score on both sides count."""
    paired = [v for v in videos if all(records[(label, v["key"])].get("reward") is not None for label in LABELS)]
    failed = {label: sum(records[(label, v["key"])].get("reward") is None for v in videos) for label in LABELS}
    summary = {"videos": len(videos), "failed": failed}
    if paired:
        summary |= paired_bootstrap(
            [records[("baseline", v["key"])]["reward"] for v in paired],
            [records[("finetuned", v["key"])]["reward"] for v in paired],
            bootstrap_samples,
            seed,
        )
    stats = {
        label: [records[(label, v["key"])]["stats"] for v in videos if records[(label, v["key"])].get("stats")]
        for label in LABELS
    }
    if all(stats.values()):
        summary["drift"] = drift(stats["baseline"], stats["finetuned"])
    return summary


def chart_series(name: str, result: dict, paper: dict) -> tuple[dict[str, float], dict[str, tuple]]:
    """The bars of one dimension, on VBench-2.0's 0-100 scale, and the fine-tuned bar's interval: the baseline
    plus the 95% interval of the paired difference."""
    bars = (
        {"baseline (judge)": 100 * result["baseline"], "fine-tuned (judge)": 100 * result["finetuned"]}
        if "baseline" in result
        else {}
    )
    intervals = {}
    if "difference" in result:
        intervals["fine-tuned (judge)"] = tuple(100 * (result["baseline"] + result[k]) for k in ("ci_low", "ci_high"))
    official = result.get("vbench2", {})
    if "baseline" in official and "finetuned" in official:
        bars |= {
            "baseline (VBench-2.0)": 100 * official["baseline"],
            "fine-tuned (VBench-2.0)": 100 * official["finetuned"],
        }
        if paper:
            bars |= {"paper: Wan2.1": paper["wan2_1"], "paper: GigaVideo-1": paper["gigavideo_1"]}
    return bars, intervals


def dimension_lines(name: str, r: dict, paper: dict) -> tuple[str, str | None]:
    """A dimension's row of the suite's table, and of its drift table (None without drift)."""
    official = r.get("vbench2", {})
    if "finetuned" in official:
        vb = f"{official['baseline']:.4f} -> {official['finetuned']:.4f}"
    else:
        vb = official.get("error", "not run")[:60]
    pp = f"{paper['wan2_1']:.2f} -> {paper['gigavideo_1']:.2f}" if paper else "-"
    if "difference" in r:
        row = (
            f"| {name} | {r['n']} | {r['baseline']:.4f} | {r['finetuned']:.4f} | "
            f"{r['difference']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {vb} | {pp} |"
        )
    else:
        row = f"| {name} | 0 | - | - | - | - | {vb} | {pp} |"
    if "drift" not in r:
        return row, None
    changes = (r["drift"][k]["relative_change"] for k in DRIFT_KEYS)
    return row, f"| {name} | " + " | ".join(f"{100 * c:+.1f}%" if c is not None else "-" for c in changes) + " |"


def realism_line(body: dict) -> str:
    r = body["realism"]
    interval = f", 95% interval [{100 * r['ci_low']:+.1f}%, {100 * r['ci_high']:+.1f}%]" if "ci_low" in r else ""
    return (
        f"Realism distance to {body['realism_reference']} real clips, over the {r['videos']} videos both models "
        "made (Frechet distance of the drift statistics, lower is closer): baseline "
        f"{r['baseline']:.3f}, fine-tuned {r['finetuned']:.3f} ({100 * r.get('relative_change', 0):+.1f}%{interval})."
    )


def suite_section(suite: str, body: dict, out_dir: Path, papers: dict, writer) -> list[str]:
    """A suite's part of report.md (its table, realism, drift and chart), its TensorBoard scalars and its chart."""
    lines = [f"## Suite `{suite}`", "", *(f"- {note}" for note in body.get("notes", [])), ""]
    lines += ["| dimension | pairs | baseline | fine-tuned | difference | 95% interval | VBench-2.0 | paper |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    drift_lines = ["| dimension | " + " | ".join(DRIFT_KEYS) + " |", "|---" * (len(DRIFT_KEYS) + 1) + "|"]
    bars, intervals = {}, {}
    for name, r in body["dimensions"].items():
        row, drift_row = dimension_lines(name, r, papers.get(name, {}))
        lines.append(row)
        for label in (*LABELS, "difference") if "difference" in r else ():
            writer.add_scalar(f"eval/{suite}/{name}/{label}", r[label], 0)
        if drift_row is not None:
            drift_lines.append(drift_row)
            for key in DRIFT_KEYS:
                writer.add_scalar(f"eval/{suite}/{name}/drift_{key}", r["drift"][key]["finetuned"], 0)
        bars[name], intervals[name] = chart_series(name, r, papers.get(name, {}))
    if body.get("realism", {}).get("videos"):  # none: no video has statistics on both sides
        lines += ["", realism_line(body)]
        for label in LABELS:
            writer.add_scalar(f"eval/{suite}/realism_distance/{label}", body["realism"][label], 0)
    title = f"{suite}: baseline vs fine-tuned (error bar: 95% interval of the difference)"
    body["chart"] = chart = bar_chart_png(bars, out_dir / f"chart-{suite}.png", title, intervals)
    lines += ["", "Drift of the fine-tuned videos from the baseline's (relative change of the mean):", ""]
    return [*lines, *drift_lines, "", f"![{suite}]({chart})", ""]


def write_outputs(report: dict, out_dir: Path, papers: dict[str, dict]) -> None:
    """report.json is written by the caller; this writes report.md, the charts and TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter

    lines = [
        "# GigaVideo-1 eval: baseline vs fine-tuned",
        "",
        f"Judge: `{report['judge']}` (reward in [0, 1]). Differences are paired over the same prompts, "
        f"samples and seeds; intervals are {int(report['protocol']['level'] * 100)}% percentile bootstrap.",
        "",
    ]
    with SummaryWriter(str(out_dir / "tensorboard")) as writer:
        for suite, body in report["suites"].items():
            lines += suite_section(suite, body, out_dir, papers, writer)
    lines += ["## Protocol", "", "```", *(f"{k}: {v}" for k, v in report["protocol"].items()), "```", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
