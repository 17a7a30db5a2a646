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


def sbatch(script, *options, env=None, timeout=900):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update({"PYTHON": sys.executable, **(env or {})})
    proc = subprocess.run(["sbatch", "--parsable", "--wait", "--gpus-per-node=0", *options, script],
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
