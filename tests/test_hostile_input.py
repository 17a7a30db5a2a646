"""A hostile but fair user: values that cannot work, servers that are down, shards whose text is crafted, input
files with bad lines. Nothing finished is lost, nothing is written outside the run directory, a stage in which
(nearly) everything failed does not say it succeeded, and each fault is one line naming what to fix."""

import dataclasses
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_stage

from gigavideo.cli import run_cli
from gigavideo.config import SECTIONS, ConfigError, load_config
from gigavideo.errors import UserError
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json, shard_paths
from gigavideo.rundir.video import encode_mp4
from gigavideo.train.data import DataPosition, decodable_batches


def tree(path: Path) -> dict:
    """Every file under path with its size and modification time: what --overwrite must not touch."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def one_line_error(proc, *expected: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    for text in expected:
        assert text in line, line
    return line


def dead_url() -> str:
    """An http URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def rewrite_shard(path: Path, change) -> None:
    """change(member name, bytes) -> (name, bytes) or None (the member is dropped)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            changed = change(name, data)
            if changed is not None:
                info = tarfile.TarInfo(changed[0])
                info.size = len(changed[1])
                tar.addfile(info, io.BytesIO(changed[1]))


# ---------------------------------------------------------------- 1, 6: values checked before anything


def test_every_number_key_has_a_range_and_a_bad_value_is_refused_naming_the_key_and_the_range():
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            if isinstance(f.default_factory(), (int, float)) and not isinstance(f.default_factory(), bool):
                assert f.metadata.get("check") is not None, f"{name}.{f.name} has no range"
    bad = [  # values as fire gives them from the command line
        ("train.batch_size", 0, "train.batch_size = 0: must be >= 1"),
        ("train.epochs", 0, "train.epochs = 0.0: must be > 0"),
        ("train.max_steps", -3, "train.max_steps = -3: must be >= 0"),
        ("train.micro_batch_size", 0, "train.micro_batch_size = 0: must be >= 1"),
        ("train.lr", -0.001, "train.lr = -0.001: must be > 0"),
        ("train.save_every", 0, "train.save_every = 0: must be >= 1"),
        ("train.max_steps", 2.5, "train.max_steps = 2.5: must be a whole number"),
        ("train.mode", "lorra", "--mode='lorra' not in (full, lora) (train.mode;"),
        (
            "eval.suites",
            ["heldout", "vbench3"],
            "eval.suites = ['heldout', 'vbench3']: 'vbench3' not in (heldout, vbench2)",
        ),
        ("render.steps", 0, "render.steps = 0: must be >= 1"),
        ("render.batch_size", 0, "render.batch_size = 0: must be >= 1"),
        ("score.batch_size", -1, "score.batch_size = -1: must be >= 1"),
        ("eval.samples_per_prompt", 0, "eval.samples_per_prompt = 0: must be >= 1"),
        ("prompts.real_per_synthetic", -2, "prompts.real_per_synthetic = -2.0: must be >= 0, or -1"),
        ("render.max_failed_fraction", 1.5, "render.max_failed_fraction = 1.5: must be >= 0 and <= 1"),
        ("train.lr", float("nan"), "train.lr = nan: must be a finite number"),
    ]
    for key, value, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("tiny", "train", {key: value})
    assert load_config("tiny", "train", {"prompts.real_per_synthetic": "-1"}).prompts.real_per_synthetic == -1


@pytest.mark.slow
def test_a_bad_value_with_overwrite_removes_nothing_and_is_one_line(trained_copy):
    before = tree(trained_copy)
    cases = [  # one per stage that has finished work to lose (every key's check: the test above)
        ("stage2", "--steps=0", "render.steps = 0"),
        ("stage3", "--num_frames=-1", "score.num_frames = -1"),
        ("stage4", "--batch_size=0", "train.batch_size = 0"),
        ("stage4", "--lr=-1e-5", "train.lr = -1e-05"),
        ("eval", "--prompts_per_dimension=0", "eval.prompts_per_dimension = 0"),
    ]
    for stage, flag, message in cases:
        one_line_error(run_stage(stage, trained_copy, flag, "--overwrite", check=False), message, "must be")
    assert tree(trained_copy) == before


# ---------------------------------------------------------------- 2: all failed is a failure


@pytest.mark.slow
def test_a_dead_judge_server_fails_stage3_a_rerun_retries_and_stage4_refuses_what_scored_nothing(scored_copy):
    run = RunDir(scored_copy)
    total = read_manifest(run, "stage3")["num_samples"]
    dead = ["--judge=openai", f"--judge_base_url={dead_url()}", "--judge_model=m", "--judge_http_retries=0"]
    line = one_line_error(run_stage("stage3", scored_copy, *dead, "--overwrite", check=False), "Connection refused")
    assert f"stage3: {total} of {total} samples failed" in line
    assert not run.is_complete("stage3")
    one_line_error(run_stage("stage4", scored_copy, check=False), "stage3 has not completed")
    restored = run_stage("stage3", scored_copy, *dead)  # a plain rerun: the old scores are back, nothing asked
    assert "restored the old outputs of stage3" in restored.stderr and run.is_complete("stage3")

    shutil.rmtree(run.stage("stage3"))  # a first run, with no old scores to restore
    one_line_error(run_stage("stage3", scored_copy, *dead, check=False), f"{total} of {total} samples failed")
    one_line_error(run_stage("stage3", scored_copy, *dead, check=False), f"{total} of {total} samples failed")
    run_stage("stage3", scored_copy)  # the judge is back: every failed sample is scored again
    manifest = read_manifest(run, "stage3")
    assert manifest["num_samples"] == total and manifest["samples_failed"] == 0
    assert all(r["status"] == "ok" for r in index_json(run, "stage3").values())

    # a manifest of an earlier version, or of a stage 3 told to accept anything, that scored nothing
    manifest |= {"samples_failed": total}
    run.manifest("stage3").write_text(json.dumps(manifest))
    one_line_error(run_stage("stage4", scored_copy, check=False), f"stage 3 scored none of its {total} samples")
    assert not (scored_copy / "stage4" / "checkpoints").exists()


@pytest.mark.slow
def test_a_dead_llm_server_fails_stage1_and_a_rerun_makes_the_prompts(tmp_path):
    dead = ["--engine=openai", f"--llm_base_url={dead_url()}", "--llm_model=m", "--llm_http_retries=0"]
    proc = run_stage("stage1", tmp_path / "run", *dead, check=False)
    line = one_line_error(proc, "work units failed", "Connection refused")
    assert "stage1: 6 of 6 work units" in line
    assert not RunDir(tmp_path / "run").is_complete("stage1")
    assert not list((tmp_path / "run" / "stage1" / "candidates").glob("*.tar"))  # none kept as done
    run_stage("stage1", tmp_path / "run", "--engine=template")
    assert read_manifest(RunDir(tmp_path / "run"), "stage1")["summary"]["mechanics"]["kept"] == 3


@pytest.mark.slow
def test_stage2_past_its_failure_bound_writes_no_manifest_and_below_it_lists_the_failures(scored_copy):
    run = RunDir(scored_copy)
    shard = next(
        Path(p) for p in shard_paths(run, "stage1") if any(".real.mp4" in n for n in tarfile.open(p).getnames())
    )
    broken = next(n for n in tarfile.open(shard).getnames() if n.endswith(".real.mp4"))
    rewrite_shard(shard, lambda name, data: (name, b"not an mp4" if name == broken else data))
    key = broken.split(".")[0]
    shutil.rmtree(run.stage("stage2"))
    line = one_line_error(run_stage("stage2", scored_copy, "--max_failed_fraction=0", check=False), "1 of 12 samples")
    assert key in line and not run.is_complete("stage2")
    run_stage("stage2", scored_copy)  # the default bound: one bad real clip of 12 is listed, the rest complete
    manifest = read_manifest(run, "stage2")
    assert [f["key"] for f in manifest["failures"]] == [key] and manifest["num_samples"] == 11


@pytest.mark.slow
def test_a_dead_judge_fails_the_eval_with_no_report(trained_copy):
    shutil.rmtree(trained_copy / "eval")
    dead = ["--score.judge=openai", f"--score.judge_base_url={dead_url()}", "--score.judge_model=m"]
    dead += ["--score.judge_http_retries=0"]
    small = ["--suites=[heldout]", "--prompts_per_dimension=1", "--samples_per_prompt=1"]
    proc = run_stage("eval", trained_copy, *dead, *small, check=False)
    one_line_error(proc, "eval: 3 of 3 baseline videos failed", "Connection refused")
    assert not (trained_copy / "eval" / "report.json").exists() and not RunDir(trained_copy).is_complete("eval")


# ---------------------------------------------------------------- 3, 9: shard text is never a path; bad samples


def test_crafted_shard_text_never_becomes_a_path_and_bad_samples_are_skipped_named_and_counted(scored_copy, tmp_path):
    run = RunDir(scored_copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(REPO / "configs" / "dimensions" / "mechanics.toml", outside / "escape.toml")
    escape = os.path.relpath(outside / "escape", REPO / "configs" / "dimensions")  # ../../../tmp/.../escape
    synthetic = sorted(k for k, m in index_json(run, "stage2").items() if m["source"] == "synthetic")
    crafted, no_mp4 = synthetic[0], synthetic[-1]
    for path in shard_paths(run, "stage2"):

        def change(name, data):
            if name == f"{crafted}.json":
                return name, json.dumps(json.loads(data) | {"dimension": escape}).encode()
            if name == f"{no_mp4}.mp4":
                return None
            return name, data

        rewrite_shard(Path(path), change)
    last = Path(shard_paths(run, "stage2")[-1])
    with tarfile.open(last, "a") as tar:  # a member whose name has no key ("../x.json")
        info = tarfile.TarInfo("../evil.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))

    run_stage("stage3", scored_copy, "--overwrite")
    records = index_json(run, "stage3")
    assert records[crafted]["status"] == "failed" and "is not a dimension name" in records[crafted]["reason"]
    assert records[no_mp4]["status"] == "failed" and "mp4 is missing" in records[no_mp4]["reason"]
    manifest = read_manifest(run, "stage3")
    assert {f["key"] for f in manifest["failures"]} == {crafted, no_mp4, "../evil.json"}  # every one dropped
    assert manifest["samples_failed"] == 2  # of the samples with a record
    assert sum(r["status"] == "ok" for r in records.values()) == len(synthetic) - 2
    assert sorted(p.name for p in outside.iterdir()) == ["escape.toml"]
    assert not list(tmp_path.rglob("*escape*.png"))

    check = subprocess.run(
        [sys.executable, "scripts/check_shards.py", f"--run_dir={scored_copy}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and "Traceback" not in check.stderr, check.stderr[-3000:]
    named = {line.split("\t")[0] for line in check.stdout.splitlines()}
    assert named == {crafted, no_mp4, "../evil.json"}, check.stdout


def test_linked_members_are_refused_and_truncated_or_empty_shards_are_named(tmp_path):
    from gigavideo.rundir.fields import SampleError, SchemaError
    from gigavideo.rundir.shards import iter_shard, shard_keys

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
            link = tarfile.TarInfo(f"{key}.mp4")
            link.type, link.linkname = (tarfile.SYMTYPE, "/etc/passwd") if key == "a" else (tarfile.LNKTYPE, "a.json")
            tar.addfile(link)
    for key in ("a", "b"):
        with pytest.raises(SampleError, match=f"sample '{key}' in .*s.tar: mp4 is a symlink or hardlink"):
            list(iter_shard(str(shard), keys={key}))
    data = shard.read_bytes()
    for name, content in (("cut.tar", data[:700]), ("empty.tar", b"")):
        (tmp_path / name).write_bytes(content)
        for read in (lambda p: list(iter_shard(p)), shard_keys):
            with pytest.raises(SchemaError, match=f"shard .*{name} is truncated or not a tar"):
                read(str(tmp_path / name))


def test_a_dimension_name_from_a_flag_is_checked_before_it_is_a_file_name(tmp_path):
    proc = run_stage("stage1", tmp_path / "run", "--dimensions=../../etc/passwd", check=False)
    one_line_error(proc, "dimension '../../etc/passwd': not a dimension name")


# ---------------------------------------------------------------- 7: input files


def test_bad_lines_in_input_files_are_named_by_file_and_line_before_any_work(tmp_path):
    heldout, captions, csv_captions = tmp_path / "heldout.jsonl", tmp_path / "real.jsonl", tmp_path / "real.csv"
    cases = [
        (
            heldout,
            b'{"prompt": "a cat"}\n{"prompt": "a dog"\n',
            "--heldout_file",
            "heldout.jsonl line 2: not valid JSON",
        ),
        (
            heldout,
            b"a cat runs\na dog\ncaf\xc3\xa9 \xff\n",
            "--heldout_file",
            "heldout.jsonl line 3: byte 0xff at column 7",
        ),
        (heldout, b'{"prompt": "a cat"}\n{"prompt": 42}\n', "--heldout_file", "heldout.jsonl line 2: prompt must be"),
        (captions, b'{"caption": "a", "video": "a.mp4"}\n{"caption": "b"}\n', "--real_captions", "real.jsonl line 2"),
        (
            csv_captions,
            b"caption,video\na,a.mp4\n,b.mp4\n",
            "--real_captions",
            "real.csv line 3: needs caption and video",
        ),
    ]
    for path, content, flag, message in cases:
        path.write_bytes(content)
        proc = run_stage("stage1", tmp_path / "run", f"{flag}={path}", check=False)
        one_line_error(proc, message)
        assert not (tmp_path / "run" / "stage1" / "candidates").exists()  # refused before any generation


@pytest.mark.slow
def test_an_overlong_real_caption_is_dropped_and_counted(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "clip.mp4").write_bytes(encode_mp4(frames, 8))
    from PIL import Image

    Image.fromarray(frames[0]).save(tmp_path / "still.png")
    rows = [
        {"caption": "a red ball rolls across a table", "video": "clip.mp4"},
        {"caption": "word " * 2000, "video": "clip.mp4"},
        {"caption": "a photo, not a video", "video": "still.png"},
    ]
    (tmp_path / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_stage("stage1", tmp_path / "run", f"--real_captions={tmp_path / 'real.jsonl'}")
    manifest = read_manifest(RunDir(tmp_path / "run"), "stage1")
    assert manifest["summary"]["real"]["kept"] == 1
    assert manifest["summary"]["real"]["dropped"]["caption over real_caption_max_chars"] == 1
    assert any("still.png: a still image (1 frame), not a video" in f["reason"] for f in manifest["failures"])


# ---------------------------------------------------------------- 8: a bug keeps its traceback


def test_user_errors_are_one_line_and_a_bug_raising_valueerror_keeps_its_traceback(monkeypatch, capsys):
    def user_fault():
        raise UserError("--thing=3: not a thing")

    def bug():
        raise ValueError("a bug")

    monkeypatch.setattr(sys, "argv", ["stage.py"])
    with pytest.raises(SystemExit) as exit_:
        run_cli(user_fault, "train")
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: --thing=3: not a thing\n")
    with pytest.raises(ValueError, match="a bug"):
        run_cli(bug, "train")


# ---------------------------------------------------------------- 10: samples left out at an epoch's end


def test_samples_left_out_after_an_epochs_last_full_batch_are_named_with_the_next_batch():
    def good(key):
        return {"key": key, "latents": torch.zeros(1), "prompt_embeds": torch.zeros(1), "weight": 1.0, "is_real": False}

    def bad(key):
        return {"key": key, "undecodable": {"key": key, "shard": "s.tar", "member": "latents.npy", "reason": "x"}}

    epoch = [good("a"), bad("pickled"), good("b"), good("c"), bad("truncated")]  # "c" and "truncated" end it
    data = DataPosition(lambda number: decodable_batches(epoch, 2))
    first, second = data.next(), data.next()
    assert first["keys"] == ["a", "b"] and [r["key"] for r in first["undecodable"]] == ["pickled"]
    assert second["keys"] == ["a", "b"] and [r["key"] for r in second["undecodable"]] == ["truncated", "pickled"]
    assert data.state() == {"epoch": 1, "batches": 1}
    replayed = DataPosition(lambda number: decodable_batches(epoch, 2), epoch=0, batches=1)
    assert [r["key"] for r in replayed.next()["undecodable"]] == ["truncated", "pickled"]


# ---------------------------------------------------------------- 12, 13: user errors are one line


def test_meaningless_values_and_broken_presets_are_refused_in_one_line(tmp_path):
    bad = [
        ({"prompts.min_words": 50, "prompts.max_words": 10}, "min_words = 50 > prompts.max_words = 10"),
        ({"prompts.dedup_threshold": -0.5}, "prompts.dedup_threshold = -0.5: must be >= 0"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("tiny", "prompts", overrides)
    preset = tmp_path / "p.toml"
    preset.write_text("extends = 123\n")
    with pytest.raises(ConfigError, match="extends = 123 must be a preset's name or path"):
        load_config(str(preset), "prompts")
    from gigavideo.registry import resolve

    with pytest.raises(ConfigError, match="score.judge 'no_such_module:Judge': no module 'no_such_module'"):
        resolve({}, "no_such_module:Judge", "score.judge")
    with pytest.raises(ConfigError, match="score.judge 'gigavideo.config:NoSuchJudge': module .* has no"):
        resolve({}, "gigavideo.config:NoSuchJudge", "score.judge")


def test_a_run_dir_that_is_empty_or_a_file_and_a_procedural_count_that_is_not_one_are_one_line(tmp_path):
    one_line_error(run_stage("stage1", "", check=False), "--run_dir is empty")
    a_file = tmp_path / "run"
    a_file.write_text("not a directory")
    one_line_error(run_stage("stage1", a_file, check=False), "is a file, not a directory")
    assert a_file.read_text() == "not a directory"
    for count in ("-1", "abc"):
        proc = run_stage("stage1", tmp_path / "run2", f"--real_captions=procedural:{count}", check=False)
        one_line_error(proc, f"'procedural:{count}': N must be a whole number >= 0")


@pytest.mark.slow
def test_more_judge_frames_than_the_clips_have_and_a_missing_official_evaluator_are_one_line(trained_copy):
    before = tree(trained_copy)
    frames = run_stage("stage3", trained_copy, "--overwrite", "--num_frames=1000", check=False)
    one_line_error(frames, "clips have 9 frames")
    official = run_stage("eval", trained_copy, "--overwrite", "--official=on", check=False)
    one_line_error(official, "--official=on but VBench-2.0's evaluator does not import")
    assert tree(trained_copy) == before


@pytest.mark.slow
def test_a_nan_negative_or_text_reward_never_reaches_the_loss(scored_copy):
    """Stage 3's records, edited as a broken judge or a hand could leave them: each such sample is left out of
    training, named and counted; the others train with finite weights."""
    run = RunDir(scored_copy)
    scored = sorted(k for k, r in index_json(run, "stage3").items() if r["status"] == "ok")
    bad = dict(zip(scored[:4], [float("nan"), -5.0, "abc", 1.5], strict=True))
    for path in shard_paths(run, "stage3"):

        def change(name, data):
            key = name.split(".")[0]
            if key in bad and name.endswith(".json"):
                return name, json.dumps(json.loads(data) | {"reward": bad[key]}).encode()  # NaN as JSON allows
            return name, data

        rewrite_shard(Path(path), change)
    proc = run_stage("stage4", scored_copy, "--max_steps=2", "--sample_every=0")
    for key in bad:
        assert f"stage-3 sample '{key}' has reward" in proc.stderr
    data = read_manifest(run, "stage4")["data"]
    assert np.isfinite(data["mean_synthetic_weight"]) and data["excluded_undecodable"] == len(bad)
    assert data["scored"] == len(scored) - len(bad)


@pytest.mark.slow
def test_a_truncated_stage2_shard_is_named_and_its_lost_samples_counted_by_stage3_stage4_and_check_shards(scored_copy):
    run = RunDir(scored_copy)
    shard = Path(shard_paths(run, "stage2")[0])
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert len({m.name.split(".")[0] for m in members}) >= 2
    second = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    shard.write_bytes(shard.read_bytes()[: second.offset])  # a copy cut at a member's end: tar sees no error
    run_stage("stage3", scored_copy, "--overwrite")
    failures = read_manifest(run, "stage3")["failures"]
    assert any(f["key"] == shard.name and "truncated" in f["reason"] and "lost" in f["reason"] for f in failures)
    trained = run_stage("stage4", scored_copy, "--max_steps=2", "--sample_every=0")
    assert shard.name in trained.stderr or read_manifest(run, "stage4")["data"]["excluded_undecodable"] >= 1
    check = subprocess.run(
        [sys.executable, "scripts/check_shards.py", f"--run_dir={scored_copy}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and "Traceback" not in check.stderr and shard.name in check.stdout


def test_a_read_only_run_dir_is_one_line(tmp_path):
    """As root permissions do not stop a write, so the run directory is a read-only mount (skipped where this user
    cannot mount)."""
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(run_dir)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        proc = run_stage("stage1", run_dir, check=False)
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)
    one_line_error(proc, "cannot write", "Read-only file system", "check the run directory's permissions")
