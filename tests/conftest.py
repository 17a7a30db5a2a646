"""Shared fixtures: the real stage scripts run as subprocesses on the tiny preset."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigavideo.rundir.layout import STAGE_SCRIPTS as SCRIPTS

REPO = Path(__file__).resolve().parent.parent
# Small enough for seconds per stage, large enough for several shards per stage.
SMALL = {
    "base": [],
    "stage1": ["--num_per_dimension=3", "--real_captions=procedural:3"],
    "stage2": [],
    "stage3": [],
    "stage4": ["--batch_size=2", "--max_steps=4", "--save_every=2", "--sample_every=2"],
    "eval": ["--prompts_per_dimension=2", "--suites=[heldout,vbench2]", "--vbench2_prompts_per_dimension=1"],
}


def run_stage(
    stage: str,
    run_dir: Path,
    *args: str,
    check: bool = True,
    env: dict | None = None,
    timeout: int = 600,
    small: bool = True,
    wrapper: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a stage script; small: with the SMALL flags a test does not give itself (else the preset's own);
    wrapper: a Python file that runs the script (`wrapper SCRIPT ARGS...`), e.g. tests/no_unpickling.py."""
    given = {a.split("=", 1)[0] for a in args}
    defaults = [a for a in SMALL[stage] if a.split("=", 1)[0] not in given] if small else []
    cmd = [sys.executable, *([str(wrapper)] if wrapper else []), str(REPO / SCRIPTS[stage]), f"--run_dir={run_dir}"]
    cmd += [*defaults, *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        full_env.pop(var, None)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_and_kill(run_dir: Path, args: list[str], latest: Path, step: int) -> None:
    """Start stage 4 in run_dir and SIGKILL it once the checkpoint file `latest` names `step` or a later one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / SCRIPTS["stage4"]), f"--run_dir={run_dir}", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= f"step{step:07d}") and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "stage4" / "manifest.json").is_file(), "the run finished before it could be killed"


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def sample_frames(pipe, seed: int = 0):
    """A short video from a (tiny) pipeline, the same for the same weights and seed: float frames in [0, 1]."""
    import torch

    return pipe(
        prompt="a red square",
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).frames


def scored(run_dir: Path, *args: str) -> Path:
    """Stages 1-3 into run_dir (args: e.g. the preset)."""
    for stage in ("stage1", "stage2", "stage3"):
        run_stage(stage, run_dir, *args)
    return run_dir


@pytest.fixture(scope="session")
def scored_run(tmp_path_factory) -> Path:
    """A run directory with stages 1-3 complete (built once per test session; copy before changing it)."""
    return scored(tmp_path_factory.mktemp("scored") / "run")


@pytest.fixture
def scored_copy(scored_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(scored_run, target)
    return target


@pytest.fixture(scope="session")
def trained_run(scored_run, tmp_path_factory) -> Path:
    """Stages 1-4 and eval complete."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(scored_run, run_dir)
    run_stage("stage4", run_dir)
    run_stage("eval", run_dir)
    return run_dir


@pytest.fixture
def trained_copy(trained_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target
