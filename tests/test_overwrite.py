"""`--overwrite` is a transaction: the old outputs of the stage and of the stages after it are set aside, removed
only once the new run completes, and restored by a plain rerun when it did not (a late error, a kill -9). Stages
know what they were built from: a stage whose inputs were redone is not "already complete", and no stage reads
an upstream stage built from other inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS, SMALL, run_stage

from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.transaction import (
    OVERWRITTEN,
    Overwrite,
    changed_inputs,
    content_id,
    manifest_file_hash,
    manifest_id,
)


def tree(path: Path) -> dict:
    """Every file of a run with its bytes' size and modification time (the locks aside)."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*")
        if p.is_file() and ".locks" not in p.parts
    }


def fake_run(root: Path) -> RunDir:
    """A run directory with stages 1-4 complete, each a folder of files (what the transaction moves)."""
    run = RunDir(root)
    for name in ("stage1", "stage2", "stage3", "stage4", "eval"):
        run.stage(name).mkdir(parents=True)
        (run.stage(name) / "data.bin").write_bytes(os.urandom(64))
        (run.stage(name) / "manifest.json").write_text(json.dumps({"stage": name, "old": True}))
    return run


def new_stage2_run(run: RunDir, complete: bool) -> None:
    run.stage("stage2").mkdir(exist_ok=True)
    (run.stage("stage2") / "part.tar.tmp").write_bytes(b"new")
    if complete:
        (run.stage("stage2") / "manifest.json").write_text(json.dumps({"stage": "stage2", "new": True}))


@pytest.mark.parametrize("killed_after", ["journal", "stage_moved", "all_moved", "new_partial", "new_complete"])
def test_a_journal_left_at_any_point_leads_to_the_old_outputs_or_the_complete_new_run(tmp_path, killed_after):
    run = fake_run(tmp_path / "run")
    before = tree(run.path)
    redo = Overwrite(run, "stage2")
    if killed_after == "journal":  # what begin writes before it moves anything
        moved = ["stage2", "stage3", "stage4", "eval"]
        old = manifest_file_hash(run, "stage2")
        redo.journal.write_text(json.dumps({"stage": "stage2", "moved": moved, "old_manifest": old}))
    else:
        redo.begin("--overwrite", "test")
        if killed_after == "stage_moved":  # the later moves had not happened yet
            for name in ("stage3", "stage4", "eval"):
                os.replace(redo.aside(name), run.stage(name))
        if killed_after in ("new_partial", "new_complete"):
            new_stage2_run(run, complete=killed_after == "new_complete")
    Overwrite(run, "stage2").recover()  # what a plain rerun does first
    assert not redo.journal.exists() and not list(run.path.glob(f"*{OVERWRITTEN}"))
    if killed_after == "new_complete":  # the new run completed: the old outputs downstream of it are gone
        assert json.loads(run.manifest("stage2").read_text()) == {"stage": "stage2", "new": True}
        assert sorted(p.name for p in run.path.iterdir()) == ["stage1", "stage2"]
    else:
        assert tree(run.path) == before


def test_recorded_inputs_tell_a_stage_whose_inputs_were_redone(tmp_path):
    from gigavideo.errors import UserError
    from gigavideo.rundir.transaction import check_upstream_current, record_inputs

    run = fake_run(tmp_path / "run")
    for name in ("stage2", "stage3", "stage4"):
        record_inputs(run, name)
        manifest = json.loads(run.manifest(name).read_text())
        manifest["inputs"] = json.loads((run.stage(name) / "_inputs.json").read_text())["inputs"]
        run.manifest(name).write_text(json.dumps(manifest))
    assert changed_inputs(run, "stage3") == [] and changed_inputs(run, "stage4") == []
    run.manifest("stage2").write_text(json.dumps({"stage": "stage2", "redone": True}))  # stage 2 redone
    assert changed_inputs(run, "stage3") == ["stage2"] and changed_inputs(run, "stage4") == ["stage2"]
    with pytest.raises(UserError, match="stage3 in .* was built from an earlier stage2"):
        check_upstream_current(run, "stage4")  # new latents would be joined with old rewards


LATE_FAILURES = {  # valid-looking values that fail only after the stage has started
    "stage1": ["--real_captions=procedural:abc"],
    "stage2": ["--device=cuda:7"],
    "stage3": ["--device=cuda:7"],
    "stage4": ["--device=cuda:7"],
    "eval": ["--device=cuda:7"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(LATE_FAILURES))
def test_an_overwrite_that_fails_late_loses_nothing_and_a_plain_rerun_restores_the_outputs_byte_for_byte(
    stage, trained_copy
):
    before = tree(trained_copy)
    failed = run_stage(stage, trained_copy, "--overwrite", *LATE_FAILURES[stage], check=False)
    assert failed.returncode != 0, failed.stderr[-2000:]
    assert not RunDir(trained_copy).is_complete(stage)  # it had started: the old outputs were set aside
    rerun = run_stage(stage, trained_copy)
    assert "restored the old outputs" in rerun.stderr and "already complete" in rerun.stderr
    assert tree(trained_copy) == before


@pytest.mark.slow
def test_a_kill_9_during_an_overwrite_then_a_plain_rerun_gives_back_the_old_outputs(trained_copy):
    before = tree(trained_copy)
    cmd = [sys.executable, str(REPO / SCRIPTS["stage2"]), f"--run_dir={trained_copy}", *SMALL["stage2"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*cmd, "--overwrite"], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    journal = trained_copy / ".overwrite-stage2.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and json.loads(journal.read_text() or "{}").get("begun"):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert journal.is_file() and not RunDir(trained_copy).is_complete("stage2")
    run_stage("stage2", trained_copy)
    assert tree(trained_copy) == before


@pytest.mark.slow
def test_stage2_redone_with_other_settings_makes_stage3_redo_itself_and_stage4_never_joins_them(scored_copy):
    run = RunDir(scored_copy)
    old_rewards = read_manifest(run, "stage3")
    run_stage("stage2", scored_copy, "--overwrite", "--steps=2")
    assert not run.is_complete("stage3")  # set aside with stage 2's old outputs, removed now that it completed
    assert not list(scored_copy.glob(f"*{OVERWRITTEN}"))
    rerun = run_stage("stage3", scored_copy)
    assert "already complete" not in rerun.stderr
    assert read_manifest(run, "stage3")["inputs"] == {"stage2": manifest_id(run, "stage2")}
    assert read_manifest(run, "stage3")["completed_at"] >= old_rewards["completed_at"]

    # Stage 2 healed by a rerun (its manifest rewritten, how it ran changed): nothing downstream is stale.
    manifest = json.loads(run.manifest("stage2").read_text())
    healed = {**manifest, "completed_at": "later", "world_size": 3}
    run.manifest("stage2").write_text(json.dumps(healed | {"id": content_id(healed, run.path)}))
    assert "already complete" in run_stage("stage3", scored_copy).stderr
    # Stage 2 redone behind the stages' back with other settings: stage 4 refuses the stale rewards, and stage 3
    # says it is redoing itself instead of "already complete".
    other = {**manifest, "render": {**manifest["render"], "steps": 99}}
    run.manifest("stage2").write_text(json.dumps(other | {"id": content_id(other, run.path)}))
    refused = run_stage("stage4", scored_copy, check=False)
    assert refused.returncode == 2 and "stage3 in" in refused.stderr and "earlier stage2" in refused.stderr
    redone = run_stage("stage3", scored_copy)
    assert "stage2 redone since it was built" in redone.stderr
    run_stage("stage4", scored_copy)


def test_a_stage_folder_that_is_a_symlink_is_moved_and_restored_as_a_link_and_its_target_never_touched(tmp_path):
    run = fake_run(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    os.replace(run.stage("stage3"), elsewhere)
    run.stage("stage3").symlink_to(elsewhere)
    target = tree(elsewhere)
    redo = Overwrite(run, "stage2")
    redo.begin("--overwrite", "test")
    assert redo.aside("stage3").is_symlink()
    Overwrite(run, "stage2").recover()  # the new run failed: back as it was
    assert run.stage("stage3").is_symlink() and tree(elsewhere) == target
    redo.begin("--overwrite", "test")
    new_stage2_run(run, complete=True)
    Overwrite(run, "stage2").recover()  # the new run completed: the link goes, not what it points to
    assert not os.path.lexists(run.stage("stage3")) and tree(elsewhere) == target


@pytest.mark.slow
def test_every_stage_writes_its_manifest_last(trained_run):
    """A kill between a stage's last output and its manifest must leave the stage incomplete, so that a rerun
    writes what is missing: nothing in a stage's folder is newer than its manifest."""
    for stage in ("stage1", "stage2", "stage3", "stage4", "eval"):
        folder = trained_run / stage
        manifest = (folder / "manifest.json").stat().st_mtime_ns
        newer = [
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime_ns > manifest
        ]
        assert not newer, f"{stage}: written after its manifest: {newer}"


def test_a_stage_is_not_redone_while_another_stages_redo_is_pending(tmp_path):
    from gigavideo.errors import UserError

    run = fake_run(tmp_path / "run")
    Overwrite(run, "stage2").begin("--overwrite", "test")  # then killed
    before = tree(run.path)
    with pytest.raises(UserError, match="stage2 in .* was being redone and did not complete"):
        Overwrite(run, "stage1").begin("--overwrite", "test")
    assert tree(run.path) == before


def test_a_redo_whose_old_outputs_cannot_be_kept_beside_the_new_run_is_refused_before_anything_moves(
    tmp_path, monkeypatch
):
    import shutil
    from collections import namedtuple

    from gigavideo.errors import UserError

    run = fake_run(tmp_path / "run")
    before = tree(run.path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 10))  # 10 bytes free
    with pytest.raises(UserError, match="redoing stage2 keeps its old outputs .* only 10 B are free"):
        Overwrite(run, "stage2").begin("--overwrite", "test")
    assert tree(run.path) == before and not Overwrite(run, "stage2").journal.exists()
