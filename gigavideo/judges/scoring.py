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
