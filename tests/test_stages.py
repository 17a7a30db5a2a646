"""Stages 1-3 through their real scripts: join by key, skip when done, resume after a kill, clear errors."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from conftest import run_stage

from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json, iter_samples, shard_paths
from gigavideo.rundir.video import decode_mp4


def test_each_stage_reads_the_previous_one_by_key(scored_run):
    run = RunDir(scored_run)
    prompts = index_json(run, "stage1")
    renders = {s["__key__"]: s for s in iter_samples(run, "stage2")}
    scores = index_json(run, "stage3")
    assert len(prompts) == 3 * 3 + 3 and set(renders) == set(prompts)
    synthetic = {k for k, m in prompts.items() if m["source"] == "synthetic"}
    assert set(scores) == synthetic
    for key, sample in renders.items():
        assert sample["json"]["prompt"] == prompts[key]["prompt"]
        assert sample["latents.npy"].shape == (16, 3, 8, 8)  # 9 frames 64x64 -> T=3, 8x8
        assert sample["prompt_embeds.npy"].ndim == 2 and sample["prompt_embeds.npy"].shape[1] == 32
        frames, fps = decode_mp4(sample["mp4"])
        assert frames.shape == (9, 64, 64, 3) and fps == 8
    for key, record in scores.items():
        assert record["status"] == "ok" and 0 <= record["reward"] <= 1
        assert record["question"] == prompts[key]["question"]
    assert len(read_manifest(run, "stage2")["shards"]) >= 3  # several shards, as ranks and workers need


@pytest.mark.slow
def test_stage1_is_deterministic(tmp_path):
    for name in ("a", "b"):
        run_stage("stage1", tmp_path / name)
    a, b = (index_json(RunDir(tmp_path / n), "stage1") for n in ("a", "b"))
    assert a == b
    # The real clips too, byte for byte (x264's MB-tree once made a few differ after torch had run).
    a, b = ({s["__key__"]: s.get("real.mp4") for s in iter_samples(RunDir(tmp_path / n), "stage1")} for n in ("a", "b"))
    assert a == b and sum(v is not None for v in a.values()) >= 3


def test_a_completed_stage_is_skipped_on_rerun(scored_copy):
    manifest = RunDir(scored_copy).manifest("stage2")
    before = manifest.stat().st_mtime_ns
    proc = run_stage("stage2", scored_copy)
    assert "already complete" in proc.stderr and manifest.stat().st_mtime_ns == before


@pytest.mark.slow
def test_stage2_killed_midway_finishes_with_every_sample_exactly_once(scored_copy):
    run = RunDir(scored_copy)
    original = {s["__key__"]: s["latents.npy"] for s in iter_samples(run, "stage2")}
    shards = sorted(run.stage("stage2").glob("*.tar"))
    kept, lost = shards[:-2], shards[-2:]
    kept_mtimes = [p.stat().st_mtime_ns for p in kept]
    # The kill: no manifest, the last shards never renamed (one half-written .tmp left behind).
    run.manifest("stage2").unlink()
    for path in lost:
        path.unlink()
    (run.stage("stage2") / "r00000-00099.tar.tmp").write_bytes(b"half a tar")
    (run.stage("stage2") / "r00003-00000.tar.tmp").write_bytes(b"from an older run with 4 ranks")
    run_stage("stage2", scored_copy)
    assert [p.stat().st_mtime_ns for p in kept] == kept_mtimes  # finished work is not redone
    assert not list(run.stage("stage2").glob("*.tmp"))
    resumed = {s["__key__"]: s["latents.npy"] for s in iter_samples(run, "stage2")}
    assert sorted(resumed) == sorted(original)
    assert read_manifest(run, "stage2")["num_samples"] == len(original)  # the manifest rejects duplicates
    for key in original:  # the per-key seed reproduces each video
        np.testing.assert_allclose(resumed[key], original[key], atol=1e-4)


def test_missing_model_path_is_a_clear_error_before_any_work(scored_run, tmp_path):
    shutil.copytree(scored_run / "stage1", tmp_path / "stage1")  # stage 2's input
    proc = run_stage("stage2", tmp_path, "--model_path=/nonexistent/wan", check=False)
    assert proc.returncode == 2
    assert "Wan base model not found at /nonexistent/wan" in proc.stderr
    assert "Wan2.1-T2V-1.3B-Diffusers" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(RunDir(tmp_path).stage("stage2").glob("*.tar*"))
    proc = run_stage("stage2", tmp_path, "--config=wan2.1-t2v-1.3b", check=False)
    assert proc.returncode == 2 and "no base model: set --model_path" in proc.stderr


def test_a_stage_before_its_input_says_what_to_run(tmp_path):
    proc = run_stage("stage2", tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "stage1_prompts/generate.py" in proc.stderr


def test_a_corrupt_video_gets_no_score_and_the_rest_are_scored(scored_copy):
    run = RunDir(scored_copy)
    shard = shard_paths(run, "stage2")[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{victim}.mp4":
                data = b"\x00not an mp4"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    run_stage("stage3", scored_copy, "--overwrite")
    scores = index_json(run, "stage3")
    assert scores[victim]["status"] == "failed" and victim in scores[victim]["reason"]
    assert "cannot decode mp4" in scores[victim]["reason"] and scores[victim]["reward"] is None
    assert all(r["status"] == "ok" for k, r in scores.items() if k != victim)
    report = json.loads((run.stage("stage3") / "report.json").read_text())
    assert sum(d["failed"].get("video", 0) for d in report.values()) == 1
    failures = read_manifest(run, "stage3")["failures"]
    assert [f["key"] for f in failures] == [victim]
    assert os.path.exists(shard)


def test_overwrite_with_a_bad_model_path_keeps_the_previous_output(scored_copy):
    run = RunDir(scored_copy)
    before = sorted(p.name for p in run.stage("stage2").iterdir())
    proc = run_stage("stage2", scored_copy, "--overwrite", "--model_path=/nonexistent/wan", check=False)
    assert proc.returncode == 2 and "not found at /nonexistent/wan" in proc.stderr
    assert sorted(p.name for p in run.stage("stage2").iterdir()) == before
    assert run.is_complete("stage2")
