"""The closed loop: diagnosis, stage 1 on the weakest dimensions, LoRA merged into the next round's base, rounds."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_stage, sample_frames

from gigavideo.rundir.layout import RunDir, read_manifest


@pytest.mark.slow
def test_a_merged_lora_export_renders_what_the_base_with_its_lora_renders(scored_copy, tmp_path):
    from diffusers import WanPipeline
    from safetensors import safe_open

    train = ["--mode=lora", "--max_steps=2", "--lr=1e-2", "--sample_every=0"]
    run = RunDir(scored_copy)
    run_stage("stage4", scored_copy, *train)
    lora = tmp_path / "lora"
    shutil.move(run.export, lora)
    run.manifest("stage4").unlink()
    run_stage("stage4", scored_copy, *train, "--merge_lora=true")  # trained: only the export is assembled again

    assert not (run.export / "pytorch_lora_weights.safetensors").exists()
    merged = WanPipeline.from_pretrained(run.export)  # stock diffusers, no LoRA to load
    with_lora = WanPipeline.from_pretrained(run.models / "base")
    plain = sample_frames(with_lora)
    with_lora.load_lora_weights(lora)
    expected = sample_frames(with_lora)
    assert abs(expected - plain).max() > 1e-3  # the LoRA changes the video, so the comparison below can fail
    assert abs(sample_frames(merged) - expected).max() < 1e-4
    stored = sorted((run.export / "transformer").glob("*.safetensors"))[0]
    with safe_open(str(stored), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F32"  # the tiny base's dtype


@pytest.mark.slow
def test_diagnosis_ranks_what_the_base_cannot_do_weakest_and_stage1_targets_it(tmp_path):
    """A random-weights model cannot move a camera on request: the camera-motion scorer (optical flow, no model)
    gives it nothing, while the judge's yes/no questions get about half. Weak by construction."""
    run_dir = tmp_path / "run"
    dims = "--dimensions=[human_anatomy,camera_motion,mechanics]"
    missing = run_stage("stage1", run_dir, "--dimensions=[auto]", check=False)
    assert missing.returncode == 2 and "eval/evaluate.py --diagnose" in missing.stderr

    run_stage("base", run_dir)
    run_stage("eval", run_dir, "--diagnose", dims, "--suites=[heldout]", "--prompts_per_dimension=2")
    diagnosis = json.loads((run_dir / "diagnosis.json").read_text())
    assert diagnosis["ranking"][0] == "camera_motion"
    scores = {name: d["score"] for name, d in diagnosis["dimensions"].items()}
    weakest = diagnosis["dimensions"]["camera_motion"]["suites"]["heldout"]
    others = [diagnosis["dimensions"][n]["suites"]["heldout"] for n in ("human_anatomy", "mechanics")]
    assert weakest["n"] == 2 and all(weakest["ci_high"] < other["ci_low"] for other in others), scores
    assert diagnosis["dimensions"]["camera_motion"]["weakness_rank"] == 1
    own = diagnosis["videos"]  # its own prompts and seeds, not the eval's (tests/test_eval.py checks them)
    assert own["seed"] != own["eval_seed"] == 1000 and own["prompts_shared_with_eval"] == []

    run_stage("stage1", run_dir, "--dimensions=[auto]", "--num_weak=1")
    manifest = read_manifest(RunDir(run_dir), "stage1")
    assert manifest["targeted"]["dimensions"] == ["camera_motion"]
    assert manifest["targeted"]["diagnosis"]["ranking"] == diagnosis["ranking"]
    assert set(manifest["summary"]) == {"camera_motion", "real"} and manifest["summary"]["camera_motion"]["kept"] == 3


ROUNDS_PRESET = """
extends = "tiny"
[prompts]
dimensions = ["auto"]
num_weak = 1
num_per_dimension = 3
real_captions = "procedural:3"
[train]
mode = "lora"
max_steps = 2
sample_every = 0
[eval]
prompts_per_dimension = 1
"""


def job_info(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def wait_for_job(job_id: str, seconds: float) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = next((t.split("=", 1)[1] for t in job_info(job_id).split() if t.startswith("JobState=")), None)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", None):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end in {seconds} s")


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM here (run `make slurm-cluster` as root)")
def test_two_rounds_chain_by_dependency_under_sbatch_and_a_rerun_skips_them(tmp_path):
    preset, run_dir = tmp_path / "rounds.toml", tmp_path / "run"
    preset.write_text(ROUNDS_PRESET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"PYTHON": sys.executable, "PRESET": str(preset), "RUN_DIR": str(run_dir), "ROUNDS": "2"}
    env |= {"NPROC_PER_NODE": "1", "SBATCH_ARGS": f"--gpus-per-node=0 --cpus-per-task=2 --output={tmp_path}/%x-%j.out"}
    submitted = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    jobs = [line.split(": job ") for line in submitted.stdout.splitlines() if ": job " in line]
    names = [name for name, _ in jobs]
    steps = ["diagnosis", "stage1", "stage2", "stage3", "stage4", "eval"]
    assert names == steps + steps + ["rounds"]
    for (_, earlier), (_, later) in zip(jobs[1:], jobs[2:], strict=False):  # still waiting, each for the one before
        assert f"Dependency=afterok:{earlier}" in job_info(later)
    assert wait_for_job(jobs[-1][1], 900) == "COMPLETED", [p.read_text()[-2000:] for p in tmp_path.glob("*.out")]

    first, second = RunDir(run_dir).round(1), RunDir(run_dir).round(2)
    assert (first.export / "model_index.json").is_file()  # the LoRA merged into a complete pipeline folder
    assert not (first.export / "pytorch_lora_weights.safetensors").exists()
    assert f'path = "{first.export.resolve()}"' in (second.path / "preset.toml").read_text()
    protocol = json.loads((second.eval / "report.json").read_text())["protocol"]
    assert protocol["baseline"] == str(first.export.resolve())  # round 2 compares against round 1's model
    assert read_manifest(first, "stage1")["targeted"]["dimensions"] == ["camera_motion"]
    report = json.loads((run_dir / "rounds.json").read_text())
    rows = report["suites"]["heldout"]["dimensions"]["camera_motion"]["rounds"]
    assert len(rows) == 2 and all("vs_base" in row and "vs_previous" in row for row in rows)
    assert all(report["cost"][f"round{r}"][step] > 0 for r in (1, 2) for step in steps)
    assert report["targeted"]["round2"]["dimensions"] == ["camera_motion"]  # diagnosed again, on round 1's model
    assert "round 2 |" in (run_dir / "rounds.md").read_text()

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("manifest.json")}
    rerun = subprocess.run(
        ["bash", "slurm/pipeline.sh"], cwd=REPO, env=env | {"LOCAL": "1"}, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "round 1: complete" in rerun.stdout and "round 2: complete" in rerun.stdout
    assert "=== stage" not in rerun.stdout and "=== rounds" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("manifest.json")} == before


def test_every_round_is_anchored_to_round_ones_base_for_the_anchor_variant(tmp_path):
    """train.anchor_weight > 0 keeps each round near the original base, not near the round before's model."""
    from gigavideo.config import load_config

    run_dir = tmp_path / "run"
    for round in (1, 2):
        cmd = [sys.executable, str(REPO / "scripts/prepare_round.py"), f"--run_dir={run_dir}", f"--round={round}"]
        subprocess.run([*cmd, "--config=tiny"], cwd=REPO, check=True, capture_output=True, timeout=300)
        cfg = load_config(str(run_dir / f"round{round}" / "preset.toml"), "train", {"anchor_weight": 0.1})
        assert cfg.train.anchor_path == str((run_dir / "models" / "base").resolve())
        previous = str((run_dir / "round1/stage4/export").resolve())
        assert cfg.model.path == (cfg.train.anchor_path if round == 1 else previous)


def test_weights_by_round_set_each_rounds_realism_and_anchor_weight_and_refuse_a_bad_item(tmp_path):
    from gigavideo.config import load_config
    from gigavideo.errors import ConfigError

    preset = tmp_path / "schedule.toml"
    preset.write_text(
        'extends = "tiny"\n[train]\nrealism_weight_by_round = [0.5, 2.0]\nanchor_weight_by_round = [0.0, 0.25, 1.0]\n'
    )
    run_dir = tmp_path / "run"
    for round, realism, anchor in ((1, 0.5, 0.0), (2, 2.0, 0.25), (3, 2.0, 1.0), (4, 2.0, 1.0)):  # the last item on
        cmd = [sys.executable, str(REPO / "scripts/prepare_round.py"), f"--run_dir={run_dir}", f"--round={round}"]
        subprocess.run([*cmd, f"--config={preset}"], cwd=REPO, check=True, capture_output=True, timeout=300)
        train = load_config(str(run_dir / f"round{round}" / "preset.toml"), "train").train
        assert (train.realism_weight, train.anchor_weight) == (realism, anchor), round
    for name in ("realism_weight_by_round", "anchor_weight_by_round"):
        for bad in ([0.5, -1.0], [0.5, "high"], [float("nan")]):
            with pytest.raises(ConfigError, match=name):
                load_config("tiny", "train", {name: bad})
