#!/usr/bin/env python
"""Eval: the baseline and the fine-tuned model on held-out prompts, per dimension.

Held-out prompts come from the prompt engine with the eval seed, minus any prompt used in
training. Both models render every prompt with the same per-video seeds; videos are saved in
VBench-2.0's layout (`videos/{model}/{dimension}/{prompt[:180]}-{index}.mp4`); the stage-3 judge
scores both, and the report gives the paired difference with a bootstrap 95% interval.
Writes RUN_DIR/eval/report.json and report.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from gigavideo.cli import pick_device, run_cli, start_stage  # noqa: E402
from gigavideo.distributed import rank_and_world  # noqa: E402
from gigavideo.judge import judge_path, load_judge, normalized_reward  # noqa: E402
from gigavideo.models import base_model_path, load_pipeline  # noqa: E402
from gigavideo.llm import TemplateBackend  # noqa: E402
from gigavideo.prompt_engine import engine_prompts  # noqa: E402
from gigavideo.prompts import CAMERAS, LIGHTING, SETTINGS, resolve_dimensions  # noqa: E402
from gigavideo.rendering import Renderer, seed_for  # noqa: E402
from gigavideo.schema import index_json, rank_parts, read_manifest, write_json_atomic  # noqa: E402
from gigavideo.stats import paired_bootstrap  # noqa: E402
from gigavideo.video import encode_mp4  # noqa: E402

log = logging.getLogger("gigavideo.eval")


def held_out_prompts(cfg, training_prompts: set[str]) -> list[dict]:
    """The template engine with the eval seed, minus any prompt used in training."""
    backend = TemplateBackend(SETTINGS, CAMERAS, LIGHTING)
    items = []
    for dim in resolve_dimensions(cfg.eval.dimensions, cfg.prompts.dimensions_dir):
        prompts = [p for p in engine_prompts(backend, dim, cfg.eval.prompts_per_dimension * 3, cfg.eval.seed)
                   if p["prompt"] not in training_prompts][: cfg.eval.prompts_per_dimension]
        items += [{"dimension": dim.name, "prompt": p["prompt"], "question": p["question"]} for p in prompts]
    return items


def video_name(prompt: str, index: int) -> str:
    """VBench-2.0's file name: the prompt's first 180 characters, '-', the sample index."""
    return f"{prompt[:180].replace('/', ' ')}-{index}.mp4"


def render_and_score(label, renderer, items, cfg, judge, out_dir) -> list[float]:
    """One score per (prompt, sample index), in that order; the mp4s go to VBench-2.0's layout."""
    scores = []
    for item in tqdm(items, desc=f"eval {label}", unit="prompt"):
        for index in range(cfg.eval.samples_per_prompt):
            key = f"eval-{item['dimension']}-{index}-{item['prompt']}"
            result = renderer.render([key], [item["prompt"]], [seed_for(key, cfg.eval.seed)])[0]
            path = out_dir / label / item["dimension"] / video_name(item["prompt"], index)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_mp4(result["frames"], cfg.render.fps))
            judged = judge.score_many([(result["frames"], item["question"])])[0]
            if isinstance(judged, Exception):
                raise ValueError(f"the judge gave no score for {path.name}: {judged}")
            scores.append(normalized_reward(judged["p_yes"], judged["p_no"]))
    return scores


def build_report(cfg, parts: list[dict], judge_name: str) -> dict:
    videos = sorted((v for part in parts for v in part["videos"]), key=lambda v: (v["dimension"], v["prompt"], v["index"]))
    settings = parts[0]["settings"]
    protocol = {"samples_per_prompt": cfg.eval.samples_per_prompt, "prompt_seed": cfg.eval.seed,
                "video_seed": "sha256(eval seed, dimension, index, prompt)", "level": 0.95, **settings}
    report = {"judge": judge_name, "protocol": protocol, "dimensions": {},
              "prompts": sorted({(v["dimension"], v["prompt"], v["question"]) for v in videos})}
    report["prompts"] = [dict(zip(("dimension", "prompt", "question"), p)) for p in report["prompts"]]
    for name in dict.fromkeys(v["dimension"] for v in videos):
        mine = [v for v in videos if v["dimension"] == name]
        if mine:
            report["dimensions"][name] = paired_bootstrap([v["baseline"] for v in mine], [v["finetuned"] for v in mine],
                                                          cfg.eval.bootstrap_samples, cfg.eval.seed)
    return report


def write_markdown(path: Path, report: dict) -> None:
    lines = ["# GigaVideo-1 eval: baseline vs fine-tuned", "",
             f"Judge: `{report['judge']}`. Paired over held-out prompts x samples; "
             f"{int(report['protocol']['level'] * 100)}% bootstrap interval of the difference.", "",
             "| dimension | n | baseline | fine-tuned | difference | 95% interval |", "|---|---|---|---|---|---|"]
    for name, r in report["dimensions"].items():
        lines.append(f"| {name} | {r['n']} | {r['baseline']:.4f} | {r['finetuned']:.4f} | "
                     f"{r['difference']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] |")
    lines += ["", "Protocol:", "", "```", *(f"{k}: {v}" for k, v in report["protocol"].items()), "```", ""]
    path.write_text("\n".join(lines))


def preflight(cfg, run):
    """The export, the judge and the base model must exist before any work (or any --overwrite)."""
    read_manifest(run, "stage4")
    if cfg.score.judge != "openai":
        judge_path(cfg.score, run)
    return base_model_path(cfg.model, run)


def main(run_dir: str = "runs/demo", config: str = "tiny", overwrite: bool = False, **overrides):
    """Compare the base model with RUN_DIR/stage4/export on held-out prompts into RUN_DIR/eval (e.g. --prompts_per_dimension=50)."""
    started = start_stage("eval", "eval", run_dir, config, overwrite, overrides, preflight)
    if started is None:
        return
    cfg, run, base = started
    device = pick_device(cfg.model.device)
    training_prompts = {m["prompt"] for m in index_json(run, "stage1").values()}
    items = held_out_prompts(cfg, training_prompts)
    judge = load_judge(cfg.score, run, device)
    rank, world = rank_and_world()
    mine = items[rank::world]
    scores, settings = {}, {}
    for label, path in (("baseline", base), ("finetuned", run.export)):
        renderer = Renderer(load_pipeline(path, cfg.model.dtype, device), cfg.render, cfg.model.max_sequence_length,
                            device)
        settings[label] = renderer.settings()
        scores[label] = render_and_score(label, renderer, mine, cfg, judge, run.eval / "videos")
        del renderer
    if settings["baseline"] != settings["finetuned"]:
        raise ValueError(f"baseline and fine-tuned render settings differ: {settings}")
    per_video = [item | {"index": i} for item in mine for i in range(cfg.eval.samples_per_prompt)]
    videos = [{"dimension": v["dimension"], "prompt": v["prompt"], "question": v["question"], "index": v["index"],
               "baseline": b, "finetuned": f} for v, b, f in zip(per_video, scores["baseline"], scores["finetuned"])]
    info = {"settings": settings["baseline"] | {"baseline": str(base), "finetuned": str(run.export)},
            "videos": videos}
    parts = rank_parts(run.eval, rank, world, info)
    if parts is None:
        return  # another rank completes the report
    report = build_report(cfg, parts, judge.name)
    write_json_atomic(run.eval / "report.json", report)
    write_markdown(run.eval / "report.md", report)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run.eval / "tensorboard")) as writer:
        for name, r in report["dimensions"].items():
            for label in ("baseline", "finetuned", "difference"):
                writer.add_scalar(f"eval/{name}/{label}", r[label], 0)
    write_json_atomic(run.manifest("eval"), {"stage": "eval", "report": str(run.eval / "report.json"),
                                             "world_size": world})
    log.info("eval report: %s\n%s", run.eval / "report.md", (run.eval / "report.md").read_text())


if __name__ == "__main__":
    run_cli(main, "eval")
