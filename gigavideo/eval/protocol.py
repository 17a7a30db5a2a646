"""The eval's protocol: the suites' videos (prompts, seeds, VBench-2.0 paths), rendering and scoring one model's
videos resumably, VBench-2.0's own scores, the realism reference, and the report and diagnosis built from the
records."""

from __future__ import annotations

import json
import logging
import os
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

from gigavideo.errors import UserError
from gigavideo.eval import vbench2
from gigavideo.eval.diagnosis import DIAGNOSIS, DIAGNOSIS_FILE, diagnose, diagnosis_table
from gigavideo.eval.gallery import write_gallery
from gigavideo.eval.report import LABELS, dimension_summary, load_records, realism, write_outputs
from gigavideo.judges.scoring import score_videos
from gigavideo.models.families import family_for
from gigavideo.models.rendering import Renderer
from gigavideo.prompts.dimensions import load_style
from gigavideo.prompts.engine import Similarity, engine_prompts
from gigavideo.prompts.llm import TemplateBackend
from gigavideo.rundir.completion import check_failed
from gigavideo.rundir.fields import SampleError, decode_video
from gigavideo.rundir.files import write_atomic, write_json_atomic
from gigavideo.rundir.shards import iter_samples
from gigavideo.rundir.video import VideoError, decode_mp4, encode_mp4, resize_crop_sample, video_statistics
from gigavideo.seeding import derive_seed

log = logging.getLogger("gigavideo.eval")
SUITES = ("heldout", "vbench2")
OFFICIAL = ("auto", "on", "off")


def near_duplicates(similarity: Similarity, prompts: list[str], training, threshold: float) -> list[bool]:
    if not prompts or not len(training):
        return [False] * len(prompts)
    return list(similarity.matrix(similarity.embed(prompts), training).max(axis=1) >= threshold)


def videos_seed(cfg, diagnosis: bool = False) -> int:
    """The seed of the eval's prompts and videos; the diagnosis has its own, derived from it, so the eval stays an
    unbiased measurement of the dimensions the diagnosis chose (its noise did not choose them)."""
    return derive_seed(cfg.eval.seed, DIAGNOSIS) if diagnosis else cfg.eval.seed


def heldout_items(cfg, dim, similarity, training, threshold: float, diagnosis: bool) -> tuple[list[dict], str]:
    """The template engine's prompts for one dimension, without near-duplicates of training prompts. The diagnosis
    draws its own and leaves out every candidate the eval could use, unless the dimension has no others."""
    backend, count = TemplateBackend(*load_style(cfg.prompts.dimensions_dir)), cfg.eval.prompts_per_dimension
    evals = engine_prompts(backend, dim, count * 3, cfg.eval.seed)
    if diagnosis:
        taken = {c["prompt"] for c in evals}
        count = min(count, len(evals))  # as many as the eval renders
        own = engine_prompts(backend, dim, count * 3 + len(taken), videos_seed(cfg, True))
        fresh = [c for c in own if c["prompt"] not in taken]
        shared = [c | {"shared_with_eval": True} for c in own if c["prompt"] in taken]
        items = (fresh + shared)[:count]
        both = len(items) - len(fresh[:count])
        return items, f"{dim.name}: {both} of {len(items)} prompts are also the eval's (the dimension has no others)"
    close = near_duplicates(similarity, [c["prompt"] for c in evals], training, threshold)
    kept = [c for c, near in zip(evals, close, strict=True) if not near]
    return kept[:count], (
        f"{dim.name}: {sum(close)} of {len(evals)} candidate prompts left out as "
        f"near-duplicates of training prompts ({similarity.kind} >= {threshold})"
    )


def vbench2_items(cfg, dim, similarity, training, threshold: float, diagnosis: bool) -> tuple[list[dict], str]:
    """VBench-2.0's first prompts of one dimension; the diagnosis takes the next ones where the suite has them."""
    count = cfg.eval.vbench2_prompts_per_dimension
    if diagnosis:
        suite = vbench2.suite_prompts(dim.name)
        count = count or len(suite)  # 0: every prompt, all of them the eval's
        fresh = suite[count : 2 * count]
        items = fresh + [i | {"shared_with_eval": True} for i in suite[: count - len(fresh)]]
        return items, f"{dim.name}: {len(items) - len(fresh)} of {len(items)} prompts are also the eval's"
    items = vbench2.suite_prompts(dim.name, count)
    close = sum(near_duplicates(similarity, [i["prompt"] for i in items], training, threshold))
    leak = f"{close} VBench-2.0 prompts are near-duplicates of training prompts: the benchmark has leaked into training"
    return items, f"{dim.name}: {leak}" if close else ""


def eval_videos(cfg, dims, training_prompts: list[str], diagnosis: bool = False) -> tuple[list[dict], dict]:
    """Every (suite, dimension, prompt, index) to render, in a fixed order, and notes for the report.
    diagnosis: the diagnosis's videos, with their own seed and, where the suite has more, their own prompts."""
    similarity = Similarity(cfg.prompts.embedder_path)
    threshold = cfg.prompts.heldout_threshold if similarity.model is not None else cfg.prompts.lexical_heldout_threshold
    training, seed = similarity.embed(training_prompts), videos_seed(cfg, diagnosis)
    videos, notes = [], {suite: [] for suite in cfg.eval.suites}
    for suite in cfg.eval.suites:
        for dim in dims:
            if suite == "heldout":
                items, note = heldout_items(cfg, dim, similarity, training, threshold, diagnosis)
                samples, folder = cfg.eval.samples_per_prompt, dim.name
            else:
                items, note = vbench2_items(cfg, dim, similarity, training, threshold, diagnosis)
                samples, folder = vbench2.samples_per_prompt(dim.name), vbench2.vbench_name(dim.name)
            notes[suite] += [note] if note else []
            for item in items:
                for index in range(samples):
                    key = f"{suite}/{dim.name}/{index}/{item['prompt']}"
                    videos.append(
                        item
                        | {
                            "key": key,
                            "suite": suite,
                            "dimension": dim.name,
                            "index": index,
                            "scorer": dim.scorer,
                            "seed": derive_seed(seed, key),
                            "path": f"{suite}/{folder}/{vbench2.video_name(item['prompt'], index)}",
                        }
                    )
    return videos, notes


def record_render_settings(renderer: Renderer, label: str, out: Path) -> None:
    """Records the settings this label renders with; a rerun must use the ones the videos on disk were made with."""
    path, settings = out / f"settings-{label}.json", renderer.settings()
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise UserError(
            f"{path}: the eval in {out} was started with other render settings "
            f"({path.read_text().strip()}); pass --overwrite to start it again with these"
        )
    write_json_atomic(path, settings)


def render_and_score(label, pipe, todo, cfg, judge, detector, out: Path, device, records_file) -> None:
    """Render the videos of `todo` that are not on disk yet (into OUT/videos/LABEL), then score every one of
    them from its file."""
    renderer = Renderer(
        pipe, family_for(cfg.model), cfg.render, cfg.model.max_sequence_length, device, flow_shift=cfg.model.flow_shift
    )
    record_render_settings(renderer, label, out)
    root, partial = out / "videos" / label, out / "partial"
    batches = iter(todo)
    if records_file.is_file() and (data := records_file.read_bytes()) and not data.endswith(b"\n"):
        with open(records_file, "ab") as record_file:
            record_file.write(b"\n")  # end the line a kill cut short, so the next record starts on its own line
    with tqdm(total=len(todo), desc=f"eval {label}", unit="video") as progress, open(records_file, "a") as record_file:
        while chunk := list(islice(batches, cfg.render.batch_size)):
            missing = [v for v in chunk if not (root / v["path"]).exists()]
            if missing:
                rendered = renderer.render(
                    [v["key"] for v in missing], [v["prompt"] for v in missing], [v["seed"] for v in missing]
                )
                for v, result in zip(missing, rendered, strict=False):
                    data = encode_mp4(result["frames"], cfg.render.fps, cfg.render.pix_fmt)
                    # nothing but complete videos in VBench-2.0's folders: the temporary file lives elsewhere
                    write_atomic(root / v["path"], lambda tmp, data=data: tmp.write_bytes(data), tmp_dir=partial)
            for v in chunk:
                record = {"label": label, "key": v["key"], "reward": None}
                try:
                    frames, _ = decode_mp4((root / v["path"]).read_bytes(), str(root / v["path"]))
                    result = score_videos([(frames, v, v["scorer"])], judge, cfg.score, detector)[0]
                    record |= {"stats": video_statistics(frames)} | (
                        {"reason": result} if isinstance(result, str) else {"reward": result["reward"]}
                    )
                except VideoError as err:
                    record["reason"] = f"video: {err}"
                if record["reward"] is None:
                    log.warning("%s %s: no score (%s)", label, v["path"], record["reason"])
                record_file.write(json.dumps(record) + "\n")
                record_file.flush()
                os.fsync(record_file.fileno())
            progress.update(len(chunk))
    renderer.truncation()


def official_scores(cfg, videos, run) -> dict:
    """{dimension: {baseline, finetuned} or {error}} from VBench-2.0's own evaluator, where it runs."""
    if "vbench2" not in cfg.eval.suites or cfg.eval.official == "off":
        return {}
    why_not = vbench2.evaluator_available() or (None if torch.cuda.is_available() else "no CUDA device")
    if why_not:
        log.info("VBench-2.0's evaluator not run: %s", why_not)
        return {}
    results = {}
    for name in dict.fromkeys(v["dimension"] for v in videos if v["suite"] == "vbench2"):
        folder = vbench2.vbench_name(name)
        try:
            results[name] = {
                label: vbench2.evaluate(
                    run.eval / "videos" / label / "vbench2" / folder,
                    name,
                    run.eval / "vbench2_results",
                    f"{label}_{folder}",
                )["score"]
                for label in LABELS
            }
        except RuntimeError as err:
            log.error("%s", err)
            results[name] = {"error": str(err)}
    return results


def real_statistics(run, render) -> list[dict]:
    """Drift statistics of stage 1's real videos at the render size: the reference of the realism distance."""
    stats = []
    for sample in iter_samples(run, "stage1", fields=["json", "real.mp4"]):
        if "real.mp4" in sample:
            try:
                frames = decode_video(sample, "real.mp4")
            except SampleError as err:
                log.warning("realism reference: skipping a real video that does not decode: %s", err)
                continue
            stats.append(video_statistics(resize_crop_sample(frames, render.height, render.width, render.num_frames)))
    return stats


def build_report(cfg, videos, records, notes, protocol, official, dims, reference) -> dict:
    report = {"judge": protocol["judge"], "protocol": protocol, "suites": {}}
    for suite in cfg.eval.suites:
        body = report["suites"][suite] = {"notes": notes[suite], "dimensions": {}, "prompts": [], "failed": []}
        if reference:
            body["realism"] = realism(
                [v for v in videos if v["suite"] == suite],
                records,
                reference,
                cfg.eval.bootstrap_samples,
                cfg.eval.seed,
            )
            body["realism_reference"] = len(reference)
        for dim in dims:
            mine = [v for v in videos if v["suite"] == suite and v["dimension"] == dim.name]
            result = dimension_summary(mine, records, cfg.eval.bootstrap_samples, cfg.eval.seed)
            if suite == "vbench2" and dim.name in official:
                result["vbench2"] = official[dim.name]
            body["dimensions"][dim.name] = result
            body["prompts"] += [
                {"dimension": dim.name, "prompt": v["prompt"], "questions": v.get("questions") or [v["question"]]}
                for v in mine
                if v["index"] == 0
            ]
            body["failed"] += [
                {"label": label, "video": v["path"], "reason": records[(label, v["key"])]["reason"]}
                for v in mine
                for label in LABELS
                if records[(label, v["key"])]["reward"] is None
            ]
    return report


def checked_records(stage: str, videos: list[dict], labels, records_dir: Path, max_failed_fraction: float) -> dict:
    """Every rank's records, once all are in: each video has one, and no more failed than the stage allows."""
    records = load_records(records_dir)
    missing = [v["path"] for v in videos for label in labels if (label, v["key"]) not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} {stage} videos have no record (first: {missing[0]}); rerun to finish them")
    for label in labels:
        failed = [
            {"key": f"{label}/{v['path']}", "reason": records[(label, v["key"])]["reason"]}
            for v in videos
            if records[(label, v["key"])]["reward"] is None
        ]
        check_failed(stage, failed, len(videos), max_failed_fraction, f"{label} videos")
    return records


def eval_protocol(cfg, run, dims, base: Path, judge) -> dict:
    """How the comparison was made, for the report: suites, seeds, judge, both models and the render settings."""
    settings = {label: json.loads((run.eval / f"settings-{label}.json").read_text()) for label in LABELS}
    if settings["baseline"] != settings["finetuned"]:
        raise UserError(f"baseline and fine-tuned render settings differ: {settings}")
    return {
        "suites": list(cfg.eval.suites),
        "dimensions": [d.name for d in dims],
        "samples_per_prompt": {"heldout": cfg.eval.samples_per_prompt, "vbench2": "3 (20 for diversity)"},
        "prompt_seed": cfg.eval.seed,
        "video_seed": f"gigavideo.seeding.derive_seed({cfg.eval.seed}, '{{suite}}/{{dimension}}/{{index}}/{{prompt}}')",
        "prompt_variant": "heldout: template-engine prompts as written; vbench2: prompt_en of "
        "VBench2_full_info.json, no prompt extension",
        "dtype": cfg.model.dtype,
        "judge": judge.name,
        "judge_frames": cfg.score.num_frames,
        "judge_input": getattr(judge, "input", None),
        "aggregate": cfg.score.aggregate,
        "baseline": str(base),
        "finetuned": str(run.export),
        "level": 0.95,
        **settings["baseline"],
    }


def write_report(cfg, run, videos, records, notes, dims, base: Path, judge) -> dict:
    """report.json, report.md, the charts and the gallery; returns the manifest's fields."""
    protocol = eval_protocol(cfg, run, dims, base, judge)
    official = official_scores(cfg, videos, run)
    report = build_report(cfg, videos, records, notes, protocol, official, dims, real_statistics(run, cfg.render))
    write_outputs(report, run.eval, {d.name: d.paper for d in dims})
    write_gallery(report, videos, records, run.eval)
    write_json_atomic(run.eval / "report.json", report)
    log.info("eval report: %s\n%s", run.eval / "report.md", (run.eval / "report.md").read_text())
    return {"report": str(run.eval / "report.json")}


def write_diagnosis(cfg, run, videos, records, notes, dims, base, judge) -> dict:
    """RUN_DIR/diagnosis.json; returns the manifest's fields."""
    result = diagnose(dims, videos, records, cfg.eval.bootstrap_samples, cfg.eval.seed)
    result |= {
        "base": str(base),
        "judge": judge.name,
        "judge_input": getattr(judge, "input", None),
        "suites": list(cfg.eval.suites),
        "videos": {  # its own prompts and seeds, so that the eval's are not the ones that chose the dimensions
            "seed": videos_seed(cfg, diagnosis=True),
            "video_seed": f"gigavideo.seeding.derive_seed({videos_seed(cfg, True)}, '{{suite}}/{{dimension}}/"
            "{index}/{prompt}')",
            "eval_seed": cfg.eval.seed,
            "prompts_shared_with_eval": sorted({v["prompt"] for v in videos if v.get("shared_with_eval")}),
            "notes": notes,
        },
        "render": json.loads((run.stage(DIAGNOSIS) / "settings-baseline.json").read_text()),
    }
    write_json_atomic(run.path / DIAGNOSIS_FILE, result)
    log.info("diagnosis of %s: %s\n%s", base, run.path / DIAGNOSIS_FILE, diagnosis_table(result))
    return {"diagnosis": str(run.path / DIAGNOSIS_FILE), "ranking": result["ranking"]}
