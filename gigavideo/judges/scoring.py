"""Scoring one decoded video: the judge's answers to its questions, the dimension's specialist, the reward.

Shared by stage 3 (training rewards) and the eval (held-out and VBench-2.0 prompts), so both
score a video the same way. `meta` holds the prompt and its questions; a prompt may carry its
expectation explicitly (`expected_motion`, `expected_instances`, as VBench-2.0's auxiliary info
does), otherwise the specialist reads it from the prompt text.
"""

from __future__ import annotations

from itertools import islice

import numpy as np

from gigavideo.judges import camera_motion, instances
from gigavideo.judges.judge import JudgeAnswerError, normalized_reward
from gigavideo.rundir.fields import SampleError, decode_video, is_name

AGGREGATES = ("specialist_first", "mean", "min")


def detector_for(dims, sc):
    """The instance detector the score settings name, loaded only when a dimension is scored by instances."""
    if any(d.scorer == "instance_preservation" for d in dims):
        return instances.load_detector(sc.detector, sc.detector_weights)
    return None


def questions_of(meta: dict) -> list[str]:
    return meta.get("questions") or [meta["question"]]


def specialist_scores(scorer: str, frames, meta: dict, sc, detector) -> dict:
    if scorer == "camera_motion":
        wanted = meta.get("expected_motion") or camera_motion.expected_motion(meta["prompt"])
        if wanted not in camera_motion.LABELS:
            return {}  # no motion asked for, or one the flow model cannot tell (orbit, oblique)
        motion = camera_motion.global_motion(frames)
        label = camera_motion.classify(motion, sc.camera_translation, sc.camera_zoom)
        return {"camera_motion": {"score": float(label == wanted), "measured": label, "expected": wanted, **motion}}
    if scorer == "instance_preservation" and detector is not None:
        text = meta.get("expected_instances") or meta.get("lineage", {}).get("subject") or meta["prompt"]
        value, evidence = instances.score(detector, frames, text)
        return {"instance_preservation": {"score": value, **evidence}}
    return {}


def aggregate(scores: dict, how: str) -> float:
    vlm = [s["reward"] for name, s in scores.items() if name.startswith("vlm")]
    special = [s["score"] for name, s in scores.items() if not name.startswith("vlm")]
    if how == "specialist_first":
        return float(np.mean(special if special else vlm))
    return float(np.mean(vlm + special) if how == "mean" else min(vlm + special))


def score_videos(videos: list[tuple[np.ndarray, dict, str]], judge, sc, detector) -> list[dict | str]:
    """For each (frames, meta, scorer): {"scores", "reward", p_yes, p_no, answer}, or the reason it failed.

    The judge sees every question of every video in one call (it batches them itself).
    """
    items = [(frames, q) for frames, meta, _ in videos for q in questions_of(meta)]
    answers = iter(judge.score_many(items) if items else [])
    results = []
    for frames, meta, scorer in videos:
        judged = list(islice(answers, len(questions_of(meta))))
        failed = next((a for a in judged if isinstance(a, JudgeAnswerError)), None)
        if failed is not None:
            results.append(f"answer: {failed}")
            continue
        scores = {f"vlm:{i}": a | {"reward": normalized_reward(a["p_yes"], a["p_no"])} for i, a in enumerate(judged)}
        scores.update(specialist_scores(scorer, frames, meta, sc, detector))
        first = scores["vlm:0"]
        results.append(
            {
                "scores": scores,
                "reward": aggregate(scores, sc.aggregate),
                "p_yes": first["p_yes"],
                "p_no": first["p_no"],
                "answer": first["answer"],
            }
        )
    return results


MIN_FRAMES = 2


def score_chunk(chunk, judge, dims, sc, detector) -> list[dict]:
    """Records for a list of stage-2 samples; the judge sees all their questions in one batch."""
    records, decoded = {}, []
    for sample in chunk:
        key, meta = sample["__key__"], sample["json"]
        records[key] = {
            "dimension": meta["dimension"],
            "question": meta["question"],
            "questions": questions_of(meta),
            "judge": judge.name,
            "status": "failed",
            "reason": None,
            "scores": {},
            "reward": None,
        }
        try:
            frames = decode_video(sample)
        except SampleError as err:
            records[key]["reason"] = f"video: {err}"
            continue
        if len(frames) < MIN_FRAMES:
            records[key]["reason"] = f"video: {key}: only {len(frames)} frames (need {MIN_FRAMES})"
            continue
        decoded.append((key, (frames, meta, dims[meta["dimension"]].scorer)))
    results = score_videos([video for _, video in decoded], judge, sc, detector)
    for (key, _), result in zip(decoded, results, strict=False):
        if isinstance(result, str):
            records[key]["reason"] = result
        else:
            records[key].update(status="ok", **result)
    return [records[s["__key__"]] for s in chunk]


def unreadable_record(err: SampleError, judge) -> dict:
    """The record of a stage-2 sample that cannot be read (a member missing, its json broken): failed, with why."""
    meta = err.meta or {}
    dimension = meta.get("dimension")
    return {
        "dimension": dimension if is_name(dimension) else "unreadable",
        "question": meta.get("question"),
        "judge": judge.name,
        "status": "failed",
        "reason": f"sample: {err.member} {err.reason}",
        "scores": {},
        "reward": None,
    }
