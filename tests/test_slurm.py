"""The launchers on a real SLURM cluster (scripts/local_slurm_cluster.sh starts one on this machine)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO

from gigavideo.rundir.layout import RunDir, read_manifest

pytestmark = pytest.mark.slurm

if shutil.which("sbatch") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the SLURM tests: start the cluster with scripts/local_slurm_cluster.sh")
    pytest.skip("no SLURM here (run `make slurm-cluster` as root)", allow_module_level=True)


def sbatch(script, *options, args=(), env=None, timeout=900):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update({"PYTHON": sys.executable, "PRESET": "tiny", **(env or {})})
    submit = ["sbatch", "--parsable", "--gpus-per-node=0", *options, script, *args]
    return submit_and_wait(submit, full_env, timeout)


def submit_and_wait(submit, env, timeout=900):
    """`sbatch --wait`, polling every half second: sbatch's own wait sleeps 2, 8, then 32 s between
    looks, which added up to half a minute to every job here."""
    proc = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True)
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0:
        return job_id, proc
    deadline = time.time() + timeout
    while (state := job_field(job_id, "JobState")) in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        if time.time() > deadline:
            raise AssertionError(f"job {job_id} did not end in {timeout} s")
        time.sleep(0.5)
    exit_code = int(job_field(job_id, "ExitCode").split(":")[0])
    returncode = 0 if state == "COMPLETED" else exit_code or 1
    return job_id, subprocess.CompletedProcess(submit, returncode, proc.stdout, f"{proc.stderr}job {job_id}: {state}")


def sbatch_two_ranks(script, tmp_path, run_dir, args=()):
    """Submit a stage on two SLURM tasks (two torchrun agents of one process each) and wait for it."""
    name = script.split("/")[-1].removesuffix(".sh")
    job_id, proc = sbatch(
        script,
        "--ntasks=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--output={tmp_path}/{name}-%j.out",
        args=args,
        env={"RUN_DIR": str(run_dir), "NPROC_PER_NODE": "1"},
    )
    output = (tmp_path / f"{name}-{job_id}.out").read_text() if job_id else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{output[-5000:]}"
    assert f"launch: job {job_id}, 2 torchrun agents x 1 processes" in output
    return job_id


def keys_by_rank(folder):
    from gigavideo.rundir.shards import shard_keys

    return [{k for p in folder.glob(f"r{r:05d}-*.tar") for k in shard_keys(p)} for r in (0, 1)]


def test_sbatch_stage4_trains_on_two_processes_and_exports(scored_copy, tmp_path):
    log = tmp_path / "stage4-%j.out"
    job_id, proc = sbatch(
        "slurm/stage4.sh",
        "--ntasks=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--output={log}",
        env={"RUN_DIR": str(scored_copy), "NPROC_PER_NODE": "1"},
    )
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
    from gigavideo.tiny.chat import build_tiny_chat_model

    model, tokenizer = build_tiny_chat_model(["a", "fox", "{", "}"])
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    run_dir = tmp_path / "run"
    sbatch_two_ranks(
        "slurm/stage1.sh",
        tmp_path,
        run_dir,
        [
            "--engine=transformers",
            f"--llm_path={tmp_path / 'lm'}",
            "--llm_dtype=float32",
            "--llm_max_new_tokens=8",
            "--dimensions=mechanics,camera_motion",
            "--num_per_dimension=8",
            "--real_captions=",
        ],
    )
    by_rank = keys_by_rank(run_dir / "stage1" / "candidates")
    expected = {f"unit-{d}-{u:05d}" for d in ("mechanics", "camera_motion") for u in range(4)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == expected
    summary = read_manifest(RunDir(run_dir), "stage1")["summary"]
    assert sum(sum(s["dropped"].values()) for s in summary.values()) == 8  # garbage: every unit counted


def test_sbatch_stage2_renders_on_two_ranks_disjointly_and_completely(tmp_path):
    from conftest import run_stage

    from gigavideo.rundir.shards import index_json

    run_dir = tmp_path / "run"
    run_stage("stage1", run_dir)
    sbatch_two_ranks("slurm/stage2.sh", tmp_path, run_dir, ["--samples_per_shard=2"])
    by_rank = keys_by_rank(RunDir(run_dir).stage("stage2"))
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == set(index_json(RunDir(run_dir), "stage1"))
    assert read_manifest(RunDir(run_dir), "stage2")["world_size"] == 2


def test_sbatch_stage3_scores_on_two_ranks_disjointly_and_completely(scored_copy, tmp_path):
    from gigavideo.rundir.shards import index_json

    sbatch_two_ranks("slurm/stage3.sh", tmp_path, scored_copy, ["--overwrite", "--samples_per_shard=2"])
    by_rank = keys_by_rank(RunDir(scored_copy).stage("stage3"))
    synthetic = {k for k, m in index_json(RunDir(scored_copy), "stage2").items() if m["source"] == "synthetic"}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1] and by_rank[0] | by_rank[1] == synthetic
    assert read_manifest(RunDir(scored_copy), "stage3")["world_size"] == 2


def test_sbatch_eval_on_two_ranks_writes_one_report(trained_copy, tmp_path):
    run = RunDir(trained_copy)
    sbatch_two_ranks(
        "slurm/eval.sh",
        tmp_path,
        trained_copy,
        ["--overwrite", "--suites=[heldout,vbench2]", "--prompts_per_dimension=2", "--vbench2_prompts_per_dimension=1"],
    )
    assert read_manifest(run, "eval")["world_size"] == 2
    report = json.loads((run.eval / "report.json").read_text())
    assert {s: [r["n"] for r in body["dimensions"].values()] for s, body in report["suites"].items()} == {
        "heldout": [2, 2, 2],
        "vbench2": [3, 3, 3],
    }
    by_rank = [
        {json.loads(line)["key"] for line in (run.eval / "records" / f"rank{r:05d}.jsonl").open()} for r in (0, 1)
    ]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1] and len(by_rank[0] | by_rank[1]) == 6 + 9
    assert (run.eval / "report.md").is_file() and (run.eval / "chart-heldout.png").is_file()


def job_field(job_id, field):
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return None


def wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    "scancel",
    [
        ["--batch", "--signal=USR1"],  # SLURM's warning before the time limit, to the batch shell
        ["--signal=TERM"],  # preemption, scancel or a node drain: SIGTERM delivered to the job's tasks
    ],
    ids=["usr1-warning", "sigterm"],
)
def test_a_stop_signal_checkpoints_requeues_and_the_job_completes(scored_copy, tmp_path, scancel):
    from test_stage4 import loss_curve

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PYTHON": sys.executable, "PRESET": "tiny", "RUN_DIR": str(scored_copy), "NPROC_PER_NODE": "1"})
    log = tmp_path / "stage4.out"
    job_id = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--gpus-per-node=0",
                "--ntasks=1",
                "--cpus-per-task=2",
                f"--output={log}",
                "--open-mode=append",
                "slurm/stage4.sh",
                "--batch_size=2",
                "--epochs=100",
                "--max_steps=150",
                "--save_every=10",
                "--sample_every=50",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    latest = RunDir(scored_copy).checkpoints / "latest"
    wait_for(latest.is_file, 300, "the first checkpoint")
    subprocess.run(["scancel", *scancel, job_id], check=True)
    wait_for(
        lambda: job_field(job_id, "Restarts") == "1" and job_field(job_id, "JobState") == "PENDING",
        300,
        "the job to requeue",
    )
    stopped_at = int(latest.read_text().strip()[4:])
    assert 10 <= stopped_at < 150
    # Skip SLURM's requeue delay, once the first run has left the node (starting earlier races its cleanup).
    wait_for(
        lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() == "idle",
        120,
        "the node to be idle",
    )
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    wait_for(lambda: job_field(job_id, "JobState") == "COMPLETED", 600, "the requeued job to complete")
    output = log.read_text()
    assert f"requeueing job {job_id}" in output
    assert ("preemption warning" in output) == ("--batch" in scancel)
    assert ("received signal 15" in output) == ("--signal=TERM" in scancel)
    manifest = read_manifest(RunDir(scored_copy), "stage4")
    assert manifest["steps"] == 150 and manifest["slurm_job_id"] == job_id
    assert [s for s, _ in loss_curve(scored_copy)] == list(range(1, 151))


def test_a_job_array_renders_stage2_and_a_failed_task_reruns_alone(scored_copy, tmp_path):
    """Three array tasks, no rendezvous; task 1 is cancelled mid-run, resubmitted alone, and completes the stage."""
    from gigavideo.rundir.shards import shard_keys

    shutil.rmtree(scored_copy / "stage2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PYTHON": sys.executable, "PRESET": "tiny", "RUN_DIR": str(scored_copy)})
    submit = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.out"]
    slow = ["--steps=100"]  # long enough to cancel a task mid-run
    array = subprocess.run(
        [*submit, "--array=0-2", "slurm/stage2.sh", *slow], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert array.returncode == 0, array.stderr
    job = array.stdout.strip().split(";")[0]
    lock = scored_copy / ".locks" / "stage2-rank00001.lock"
    wait_for(lock.is_file, 300, "task 1 to start")
    subprocess.run(["scancel", f"{job}_1"], check=True)
    wait_for(
        lambda: not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip(),
        600,
        "the array to end",
    )
    assert not (scored_copy / "stage2" / "manifest.json").exists()  # task 1's slice is missing
    assert "task 0 of 3 (no rendezvous)" in (tmp_path / f"{job}_0.out").read_text()
    rerun, again = submit_and_wait([*submit, "--array=1", "slurm/stage2.sh", *slow], env)
    output = (tmp_path / f"{rerun}_1.out").read_text()
    assert again.returncode == 0, output[-3000:]
    assert "task 1 of 3 (no rendezvous)" in output  # the array's count, although resubmitted alone
    manifest = read_manifest(RunDir(scored_copy), "stage2")
    assert manifest["world_size"] == 3
    keys = [k for s in manifest["shards"] for k in shard_keys(scored_copy / "stage2" / s["name"])]
    assert len(keys) == len(set(keys)) == 12
    assert {s["name"][:6] for s in manifest["shards"]} == {"r00000", "r00001", "r00002"}


def test_under_sbatch_a_stage_and_the_pipeline_refuse_to_run_without_preset_and_run_dir(tmp_path):
    """Forgetting them on a cluster would train random tiny models into the submit folder: one line says what to set."""
    env = {k: v for k, v in os.environ.items() if k not in ("PRESET", "RUN_DIR") and not k.startswith("SLURM_")}
    job_id, proc = submit_and_wait(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={tmp_path}/%j.out",
            "slurm/stage1.sh",
        ],
        env | {"RUN_DIR": str(tmp_path / "run")},  # PRESET forgotten
        timeout=120,
    )
    output = (tmp_path / f"{job_id}.out").read_text()
    assert proc.returncode != 0 and "error: under sbatch, set PRESET and RUN_DIR" in output, output
    assert not (tmp_path / "run").exists() and not (REPO / "runs" / "demo" / "stage1" / "manifest.json").exists()
    pipeline = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert pipeline.returncode == 2 and "error: to submit the pipeline, set PRESET and RUN_DIR" in pipeline.stderr
    assert ": job " not in pipeline.stdout  # nothing submitted
