"""A shared cluster's faults: two processes on one stage, stale locks, SIGTERM, a full disk."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SCRIPTS, run_stage

from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import iter_samples, shard_keys


def start(stage: str, run_dir, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID")}
    return subprocess.Popen(
        [sys.executable, str(REPO / SCRIPTS[stage]), f"--run_dir={run_dir}", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def every_key_once(run_dir, stage: str) -> Counter:
    run = RunDir(run_dir)
    counts = Counter(k for s in read_manifest(run, stage)["shards"] for k in shard_keys(run.stage(stage) / s["name"]))
    assert counts and set(counts.values()) == {1}, counts.most_common(3)
    return counts


@pytest.mark.slow
def test_a_second_process_on_the_same_stage_refuses_at_once_naming_the_holder(scored_copy):
    lock = scored_copy / ".locks" / "stage2-rank00000.lock"
    first = start("stage2", scored_copy, "--overwrite")
    wait_for(lambda: lock.is_file() and lock.stat().st_size > 0, 120, "the first process's lock")
    holder = json.loads(lock.read_text())
    started = time.time()
    second = run_stage("stage2", scored_copy, "--overwrite", check=False)  # would remove the first's work
    assert second.returncode == 2 and time.time() - started < 60
    message = second.stderr.strip().splitlines()[-2]
    assert "stage2 (rank 0) is already running" in message and f"pid {holder['pid']}" in message, second.stderr
    assert first.wait(timeout=600) == 0, first.stderr[-3000:]
    assert not lock.exists()  # released at exit
    assert len(every_key_once(scored_copy, "stage2")) == 12


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_is_taken_over(scored_copy):
    lock = scored_copy / ".locks" / "stage2-rank00000.lock"
    first = start("stage2", scored_copy, "--overwrite")
    wait_for(lambda: lock.is_file() and lock.stat().st_size > 0, 120, "the first process's lock")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock.is_file()
    rerun = run_stage("stage2", scored_copy)
    assert f"from a holder that is gone (process {first.pid} has exited)" in rerun.stderr
    assert len(every_key_once(scored_copy, "stage2")) == 12


@pytest.mark.slow
def test_sigterm_checkpoints_exits_3_and_the_resumed_loss_curve_is_an_uninterrupted_one(scored_run, tmp_path):
    from test_stage4 import loss_curve

    args = [
        "--batch_size=1",
        "--epochs=100",
        "--max_steps=200",
        "--save_every=20",
        "--sample_every=0",
        "--shuffle_buffer=4",
    ]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for run_dir in (whole, stopped):
        shutil.copytree(scored_run, run_dir)
    run_stage("stage4", whole, *args)
    latest = RunDir(stopped).checkpoints / "latest"
    proc = start("stage4", stopped, *args)
    wait_for(latest.is_file, 300, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr[-3000:]
    assert "received signal 15" in stderr and (stopped / "stage4" / "stop-request").is_file()
    step = int(latest.read_text().strip()[4:])
    assert 20 <= step < 200 and not (stopped / "stage4" / "manifest.json").exists()
    run_stage("stage4", stopped, *args)
    assert loss_curve(stopped) == loss_curve(whole)
    assert [s for s, _ in loss_curve(stopped)] == list(range(1, 201))
    assert not (stopped / "stage4" / "stop-request").exists()


@pytest.mark.slow
def test_sigterm_leaves_stage2_resumable_with_every_key_once(scored_copy):
    lock = scored_copy / ".locks" / "stage2-rank00000.lock"
    shutil.rmtree(scored_copy / "stage2")
    proc = start("stage2", scored_copy)
    wait_for(lambda: any((scored_copy / "stage2").glob("*.tar")), 300, "a first complete shard")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "received SIGTERM" in stderr, stderr[-3000:]
    assert not lock.exists()  # released on the way out
    run_stage("stage2", scored_copy)
    assert len(every_key_once(scored_copy, "stage2")) == 12


@pytest.fixture
def small_stage2_disk(scored_copy):
    """scored_copy with an empty stage 2 on a 300 KB tmpfs: room for a few of its 12 samples (root only, as in CI)."""
    stage2 = scored_copy / "stage2"
    shutil.rmtree(stage2)
    stage2.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(stage2)]).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    yield stage2
    subprocess.run(["umount", "-l", str(stage2)])


@pytest.mark.slow
def test_a_full_disk_stops_stage2_with_one_line_and_a_rerun_after_freeing_space_completes(
    scored_copy, small_stage2_disk
):
    proc = run_stage("stage2", scored_copy, "--samples_per_shard=2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"error: no space left on the device writing under {small_stage2_disk} (")
    assert " free, about " in lines[-1] and "still to write" in lines[-1] and "rerun" in lines[-1]
    assert "stage2: the " in proc.stderr and "only" in proc.stderr  # the warning after the first batch
    kept = {p.name for p in small_stage2_disk.glob("*.tar")}
    assert kept  # the complete shards stay
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_stage2_disk)], check=True)
    run_stage("stage2", scored_copy, "--samples_per_shard=2")
    assert len(every_key_once(scored_copy, "stage2")) == 12
    assert kept <= {p.name for p in small_stage2_disk.glob("*.tar")}


@pytest.mark.slow
def test_a_disk_that_fills_during_a_stage4_checkpoint_is_one_line_and_latest_stays_loadable(scored_copy):
    """Room for one checkpoint (~0.4 MB) of the tiny model, not two: the second save fails."""
    checkpoints = RunDir(scored_copy).checkpoints
    checkpoints.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(checkpoints)]
    if os.geteuid() != 0 or subprocess.run(mount).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        args = ["--max_steps=4", "--save_every=2", "--sample_every=0"]
        proc = run_stage("stage4", scored_copy, *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(
            f"error: no space left on the device writing checkpoint step0000004 under {checkpoints} ("
        )
        assert " free, about " in line and "rerun" in line
        assert (checkpoints / "latest").read_text().strip() == "step0000002"
        assert not (checkpoints / "step0000004").exists()  # the partial checkpoint is not left to fill the disk
        subprocess.run(["mount", "-o", "remount,size=8m", str(checkpoints)], check=True)
        rerun = run_stage("stage4", scored_copy, *args)
        assert "at step 2" in rerun.stderr and read_manifest(RunDir(scored_copy), "stage4")["steps"] == 4
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)])


@pytest.mark.slow
def test_reruns_heal_duplicate_keys_stray_tmp_shards_and_a_truncated_manifest(scored_copy):
    run = RunDir(scored_copy)
    for stage in ("stage2", "stage3"):
        out = run.stage(stage)
        shards = sorted(out.glob("*.tar"))
        # A second process wrote keys again: a whole shard, and the first sample of another.
        shutil.copy(shards[0], out / "r00007-00000.tar")
        with tarfile.open(shards[-1]) as src, tarfile.open(out / "r00007-00001.tar", "w") as dst:
            first = shard_keys(shards[-1])[0]
            for member in src:
                if member.name.startswith(first + "."):
                    dst.addfile(member, src.extractfile(member))
        (out / "r00003-00002.tar.tmp").write_bytes(b"half a shard")
        manifest = run.manifest(stage).read_text()
        run.manifest(stage).write_text(manifest[: len(manifest) // 2])
    for stage in ("stage2", "stage3"):
        proc = run_stage(stage, scored_copy)
        assert "manifest.json is unreadable: set aside as manifest.json.set-aside-unreadable" in proc.stderr
        assert "removed 1 partial shards" in proc.stderr and "r00003-00002.tar.tmp" in proc.stderr
        assert "r00007-00000.tar: " in proc.stderr and "set aside as r00007-00000.tar.set-aside-duplicate-keys" in (
            proc.stderr
        )
        counts = every_key_once(scored_copy, stage)
        assert len(counts) == (12 if stage == "stage2" else 9)
        out = run.stage(stage)
        assert sorted(p.name for p in out.glob("*set-aside*")) == [
            "manifest.json.set-aside-unreadable",
            "r00007-00000.tar.set-aside-duplicate-keys",
            "r00007-00001.tar.set-aside-duplicate-keys",
        ]
        assert len(read_manifest(run, stage)["set_aside"]) == 2


@pytest.mark.slow
def test_when_one_rank_of_stage4_dies_the_other_fails_within_the_timeout_and_a_rerun_resumes(scored_copy):
    """Two torchrun agents (as on two nodes, outside SLURM, where nothing else stops the survivor)."""
    args = [
        "--epochs=100000",
        "--max_steps=100000",
        "--save_every=5",
        "--sample_every=0",
        "--batch_size=2",
        "--collective_timeout_s=30",
    ]
    port = 29000 + os.getpid() % 1000
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID")}
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=timeout-test",
                str(REPO / SCRIPTS["stage4"]),
                f"--run_dir={scored_copy}",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    latest = RunDir(scored_copy).checkpoints / "latest"
    wait_for(latest.is_file, 300, "the first checkpoint")
    workers = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker under the second agent"
    os.kill(int(workers[0]), signal.SIGKILL)
    died = time.time()
    agents[0].wait(timeout=30 + 120)  # the collective timeout, plus the agent's own shutdown
    agents[1].wait(timeout=120)
    assert agents[0].returncode != 0 and time.time() - died < 150
    step = int(latest.read_text().strip()[4:])
    more = [a for a in args if not a.startswith("--max_steps")] + [f"--max_steps={step + 2}"]
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / SCRIPTS["stage4"]),
            f"--run_dir={scored_copy}",
            *more,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {step}" in rerun.stderr and read_manifest(RunDir(scored_copy), "stage4")["steps"] == step + 2


def kill_mid_stage(stage: str, run_dir, *args: str) -> None:
    """Start a stage and SIGKILL it as soon as this launch has written its first file (a partial shard, an eval's
    render settings): it has begun its work and not finished it, on a machine of any speed. Asserts that the kill
    interrupted it. The stage makes no lasting progress before that file, so every launch has all its work left."""
    out = run_dir / stage

    def files() -> dict:
        found = {}
        for path in out.rglob("*") if out.exists() else []:
            try:
                found[path] = path.stat().st_mtime_ns
            except FileNotFoundError:  # renamed between the listing and the stat
                pass
        return found

    before = files()
    proc = start(stage, run_dir, *args)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and all(before.get(p) == t for p, t in files().items()):
        time.sleep(0.005)
    running = proc.poll() is None
    proc.kill()
    _, stderr = proc.communicate()
    assert running, f"{stage} ended before it could be killed mid-stage:\n{stderr[-3000:]}"
    assert not RunDir(run_dir).is_complete(stage), f"{stage} completed before the kill landed"


def stage_content(run_dir, stage: str) -> dict:
    """What a stage produced, per key, less what legitimately differs between runs (timings)."""
    run = RunDir(run_dir)
    if stage == "eval":
        lines = [
            json.loads(line)
            for path in sorted((run.eval / "records").glob("*.jsonl"))
            for line in path.read_text().splitlines()
            if line.startswith("{") and line.endswith("}")
        ]
        content = {(r["label"], r["key"]): r for r in lines}
        assert len(content) == len(lines), "an eval video recorded twice"
        videos = sorted(p for p in (run.eval / "videos").rglob("*") if p.is_file())
        return content | {str(p.relative_to(run.eval)): p.read_bytes() for p in videos}
    content = {}
    for sample in iter_samples(run, stage):
        key = sample.pop("__key__")
        sample.pop("__url__")
        sample["json"].pop("seconds", None)
        text = re.sub(r'"[^"]*/(models/[^"]*)"', r'"RUN_DIR/\1"', json.dumps(sample["json"]))
        sample["json"] = json.loads(text)  # the model paths name the run directory it was copied from
        assert key not in content, f"{key} twice in {stage}"
        content[key] = {k: v.tobytes() if hasattr(v, "tobytes") else v for k, v in sample.items()}
    return content


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3", "eval"])
def test_chaos_five_kill9s_mid_stage_then_a_rerun_give_the_uninterrupted_content(stage, trained_run, tmp_path):
    from conftest import SMALL

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / stage)
    for _ in range(5):
        kill_mid_stage(stage, run_dir, *SMALL[stage])
    run_stage(stage, run_dir)
    assert stage_content(run_dir, stage) == stage_content(trained_run, stage)


def test_an_empty_lock_file_over_a_minute_old_is_taken_over_and_a_live_holder_refuses(tmp_path):
    from gigavideo.rundir.locks import StageLocked, acquire, release, this_process

    lock = tmp_path / ".locks" / "stage3-rank00002.lock"
    lock.parent.mkdir()
    lock.write_text("")  # its writer died between creating and writing it
    os.utime(lock, (time.time() - 120, time.time() - 120))
    assert acquire(tmp_path, "stage3", 2) == lock
    mine = json.loads(lock.read_text())
    assert mine["pid"] == os.getpid()
    with pytest.raises(StageLocked, match=rf"stage3 \(rank 2\) is already running in .*pid {os.getpid()}"):
        acquire(tmp_path, "stage3", 2)  # this process is alive: never taken over
    release(lock, this_process() | {"since": mine["since"]})
    assert not lock.exists()


def stage4_command(run_dir, nproc: int, *args: str) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, str(REPO / SCRIPTS["stage4"]), f"--run_dir={run_dir}", *args]


def stage4_killed_after(run_dir, nproc: int, args: list[str], step: int) -> int:
    """Stage 4 on nproc processes, killed (every process of it) once it has saved a checkpoint after
    `step`; returns the step `latest` names then. The kill may land anywhere, a save included."""
    latest = RunDir(run_dir).checkpoints / "latest"

    def saved() -> int:
        return int(latest.read_text().strip()[4:]) if latest.is_file() else 0

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID")}
    log = Path(run_dir).parent / f"stage4-{nproc}-after-{step}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(stage4_command(run_dir, nproc, *args), cwd=REPO, env=env, stdout=out, stderr=out)
        wait_for(lambda: saved() > step or proc.poll() is not None, 600, f"a checkpoint after step {step}")
        for pid in [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]:  # torchrun's workers too
            try:
                if f"--run_dir={run_dir}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        proc.wait()
    assert saved() > step, f"stage 4 ended before saving after step {step}:\n{log.read_text()[-3000:]}"
    assert not RunDir(run_dir).is_complete("stage4"), "stage 4 finished before it could be killed"
    return saved()


@pytest.mark.slow
def test_stage4_resumes_with_another_number_of_processes_and_refuses_another_mode_in_one_line(scored_copy):
    """1 process, then 2 (a requeue got more GPUs), then 1 again; a change a checkpoint cannot take is refused."""
    args = ["--epochs=100", "--max_steps=40", "--save_every=2", "--sample_every=0", "--batch_size=2"]
    first = stage4_killed_after(scored_copy, 1, args, 0)
    second = stage4_killed_after(scored_copy, 2, args, first)  # resumed from 1 rank's checkpoint
    checkpoints = RunDir(scored_copy).checkpoints
    assert (checkpoints / f"step{first:07d}_universal").is_dir()

    lora = run_stage("stage4", scored_copy, *args, "--mode=lora", check=False)
    assert lora.returncode == 2 and "Traceback" not in lora.stderr, lora.stderr[-3000:]
    line = next(line for line in lora.stderr.splitlines() if line.startswith("error: "))
    assert f"step{second:07d} was written with mode='full'; this run asks for mode='lora'" in line

    resumed = run_stage("stage4", scored_copy, *args)  # 1 process, from the 2 ranks' checkpoint
    assert "written by 2 data-parallel ranks and this run has 1" in resumed.stderr
    assert f"at step {second}" in resumed.stderr
    manifest = read_manifest(RunDir(scored_copy), "stage4")
    assert manifest["steps"] == 40 and manifest["world_size"] == 1 and np.isfinite(manifest["final_loss"])
    # the global batch held over 1, 2 and 1 processes: 40 steps of 2 samples
    assert manifest["batch"]["global_batch_size"] == 2 and manifest["batch"]["samples_seen"] == 80


@pytest.mark.slow
def test_a_stop_request_under_the_launcher_with_two_processes_is_one_line_not_a_traceback(scored_copy):
    """slurm/_common.sh starts torchrun through gigavideo.launch: every process exiting 3 after a stop request is
    reported in one line with that exit code, and the job requeues on it."""
    args = ["--epochs=100", "--max_steps=200", "--save_every=2", "--sample_every=0"]
    cmd = [sys.executable, "-m", "gigavideo.launch", "--standalone", "--nproc_per_node=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(
        [*cmd, str(REPO / "stage4_train" / "train.py"), f"--run_dir={scored_copy}", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for((RunDir(scored_copy).checkpoints / "latest").is_file, 300, "the first checkpoint")
    (scored_copy / "stage4" / "stop-request").touch()  # as slurm/stage4.sh does on SLURM's warning
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr[-3000:]
    assert "launch: the processes stopped on request (exit 3)" in stderr and "ChildFailedError" not in stderr
