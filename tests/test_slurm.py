"""The launchers on a real SLURM cluster (scripts/local_slurm_cluster.sh starts one on this machine)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from gigavideo.schema import RunDir, read_manifest

if shutil.which("sbatch") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the SLURM tests: start the cluster with scripts/local_slurm_cluster.sh")
    pytest.skip("no SLURM here (run `make slurm-cluster` as root)", allow_module_level=True)


def sbatch(script, *options, args=(), env=None, timeout=900):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update({"PYTHON": sys.executable, **(env or {})})
    proc = subprocess.run(["sbatch", "--parsable", "--wait", "--gpus-per-node=0", *options, script, *args],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.stdout.strip().split(";")[0], proc


def test_sbatch_stage4_trains_on_two_processes_and_exports(scored_copy, tmp_path):
    log = tmp_path / "stage4-%j.out"
    job_id, proc = sbatch("slurm/stage4.sh", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
                          f"--output={log}", env={"RUN_DIR": str(scored_copy), "NPROC_PER_NODE": "1"})
    output = (tmp_path / f"stage4-{job_id}.out").read_text() if job_id else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{output[-5000:]}"
    run = RunDir(scored_copy)
    manifest = read_manifest(run, "stage4")
    assert manifest["slurm_job_id"] == job_id  # written by the trainer inside the job: SLURM really ran it
    assert manifest["world_size"] == 2
    assert f"launch: job {job_id}, 2 torchrun agents x 1 processes" in output
    assert (run.export / "transformer" / "config.json").is_file()
    assert json.loads((run.export / "model_index.json").read_text())["_class_name"] == "WanPipeline"


def test_sbatch_stage1_splits_llm_calls_over_two_ranks_disjointly_and_completely(tmp_path):
    from gigavideo.llm import build_tiny_chat_model
    from gigavideo.schema import shard_keys

    model, tokenizer = build_tiny_chat_model(["a", "fox", "{", "}"])
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    run_dir = tmp_path / "run"
    job_id, proc = sbatch("slurm/stage1.sh", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
                          f"--output={tmp_path}/stage1-%j.out",
                          args=["--engine=transformers", f"--llm_path={tmp_path / 'lm'}", "--llm_dtype=float32",
                                "--llm_max_new_tokens=8", "--dimensions=mechanics,camera_motion",
                                "--num_per_dimension=8", "--real_captions="],
                          env={"RUN_DIR": str(run_dir), "NPROC_PER_NODE": "1"})
    output = (tmp_path / f"stage1-{job_id}.out").read_text() if job_id else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{output[-5000:]}"
    assert f"launch: job {job_id}, 2 torchrun agents" in output
    units = run_dir / "stage1" / "candidates"
    by_rank = [{k for p in units.glob(f"r{r:05d}-*.tar") for k in shard_keys(p)} for r in (0, 1)]
    expected = {f"unit-{d}-{u:05d}" for d in ("mechanics", "camera_motion") for u in range(4)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == expected
    summary = read_manifest(RunDir(run_dir), "stage1")["summary"]
    assert sum(sum(s["dropped"].values()) for s in summary.values()) == 8  # garbage: every unit counted


def test_sbatch_stage2_renders_on_two_ranks_disjointly_and_completely(tmp_path):
    from conftest import run_stage
    from gigavideo.schema import index_json, shard_keys

    run_dir = tmp_path / "run"
    run_stage("stage1", run_dir)
    job_id, proc = sbatch("slurm/stage2.sh", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
                          f"--output={tmp_path}/stage2-%j.out", args=["--samples_per_shard=2"],
                          env={"RUN_DIR": str(run_dir), "NPROC_PER_NODE": "1"})
    output = (tmp_path / f"stage2-{job_id}.out").read_text() if job_id else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{output[-5000:]}"
    assert f"launch: job {job_id}, 2 torchrun agents" in output
    folder = RunDir(run_dir).stage("stage2")
    by_rank = [{k for p in folder.glob(f"r{r:05d}-*.tar") for k in shard_keys(p)} for r in (0, 1)]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == set(index_json(RunDir(run_dir), "stage1"))
    assert read_manifest(RunDir(run_dir), "stage2")["world_size"] == 2
