"""The shard contract: atomic shards, manifests, join by key, clear errors for broken samples."""

import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds

from gigavideo.rundir.completion import write_manifest
from gigavideo.rundir.fields import SchemaError
from gigavideo.rundir.layout import RunDir, StageNotReady, read_manifest
from gigavideo.rundir.shards import (
    ShardWriter,
    completed_keys,
    discard_partial_shards,
    iter_samples,
    iter_shard,
    set_aside_duplicates,
    shard_keys,
)


def stage1_sample(key, prompt="a cat"):
    return {
        "__key__": key,
        "json": {"prompt": prompt, "dimension": "d", "source": "synthetic", "question": "q?", "lineage": {}},
    }


def test_shards_open_with_tar_and_plain_webdataset(tmp_path):
    with ShardWriter(tmp_path, "stage1", "p", samples_per_shard=2) as writer:
        for i in range(3):
            sample = stage1_sample(f"k{i}", f"prompt {i}")
            sample["extra.npy"] = np.arange(4, dtype=np.float32) * i
            writer.write(sample)
    assert writer.written == ["p-00000.tar", "p-00001.tar"]
    listing = subprocess.run(["tar", "tf", str(tmp_path / "p-00000.tar")], capture_output=True, text=True).stdout
    assert listing.split() == ["k0.extra.npy", "k0.json", "k1.extra.npy", "k1.json"]
    urls = [str(tmp_path / "p-00000.tar"), str(tmp_path / "p-00001.tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]
    assert samples[2]["json"]["prompt"] == "prompt 2"
    np.testing.assert_array_equal(samples[2]["extra.npy"], np.arange(4) * 2.0)


def test_a_shard_is_invisible_until_complete_and_a_killed_one_is_discarded(tmp_path):
    writer = ShardWriter(tmp_path, "stage1", "p", samples_per_shard=10)
    writer.write(stage1_sample("a"))
    assert list(tmp_path.glob("*.tar")) == [] and len(list(tmp_path.glob("*.tar.tmp"))) == 1
    assert completed_keys(tmp_path) == set()
    writer._tar.close()  # the process dies here
    assert [p.name for p in discard_partial_shards(tmp_path)] == ["p-00000.tar.tmp"]
    resumed = ShardWriter(tmp_path, "stage1", "p", samples_per_shard=10)
    resumed.write(stage1_sample("a"))
    resumed.flush()
    assert completed_keys(tmp_path) == {"a"}


def test_next_stage_reads_by_key_through_the_manifest(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(StageNotReady, match="stage1_prompts/generate.py"):
        read_manifest(run, "stage1")
    with ShardWriter(run.stage("stage1"), "stage1", "p", 2) as writer:
        for key in ("b", "a", "c"):
            writer.write(stage1_sample(key, f"prompt {key}"))
    manifest = write_manifest(run.stage("stage1"), "stage1", {})
    assert manifest["num_samples"] == 3 and [s["samples"] for s in manifest["shards"]] == [2, 1]
    by_key = {s["__key__"]: s["json"]["prompt"] for s in iter_samples(run, "stage1")}
    assert by_key == {"a": "prompt a", "b": "prompt b", "c": "prompt c"}


def test_a_sample_missing_a_field_names_the_key_and_the_shard(tmp_path):
    run = RunDir(tmp_path)
    shard = run.stage("stage2") / "r00000-00000.tar"
    shard.parent.mkdir(parents=True)
    meta = {"prompt": "p", "dimension": "d", "source": "synthetic", "question": "q", "seed": 1, "render": {}}
    with tarfile.open(shard, "w") as tar:
        for name, data in (
            ("good.json", json.dumps(meta).encode()),
            ("good.mp4", b"x"),
            ("good.latents.npy", b"x"),
            ("good.prompt_embeds.npy", b"x"),
            ("broken.json", json.dumps(meta).encode()),
            ("broken.mp4", b"x"),
            ("broken.prompt_embeds.npy", b"x"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_manifest(run.stage("stage2"), "stage2", {})
    with pytest.raises(SchemaError) as err:
        list(iter_samples(run, "stage2", fields=("json",)))
    assert "'broken'" in str(err.value) and str(shard) in str(err.value) and "latents.npy" in str(err.value)


def test_a_sample_missing_a_json_key_is_rejected_at_write_time(tmp_path):
    sample = stage1_sample("k")
    del sample["json"]["question"]
    with pytest.raises(SchemaError, match=r"'k'.*question"):
        ShardWriter(tmp_path, "stage1", "p", 2).write(sample)


def test_keys_must_be_unique_across_shards(tmp_path):
    for prefix in ("r00000", "r00001"):
        with ShardWriter(tmp_path, "stage1", prefix, 2) as writer:
            writer.write(stage1_sample("same"))
    with pytest.raises(SchemaError, match="more than once.*same"):
        write_manifest(tmp_path, "stage1", {})


def test_duplicate_keys_are_set_aside_keeping_the_first_copy_and_the_other_keys(tmp_path):
    for prefix, keys in (("r00000", ["a", "b"]), ("r00001", ["b", "c"]), ("r00002", ["c"])):
        with ShardWriter(tmp_path, "stage1", prefix, 2) as writer:
            for key in keys:
                writer.write(stage1_sample(key, prompt=prefix))
    notes = set_aside_duplicates(tmp_path)
    assert len(notes) == 2 and "its 1 other keys kept in r00001-00000.tar" in notes[0]
    assert [shard_keys(p) for p in sorted(tmp_path.glob("*.tar"))] == [["a", "b"], ["c"]]
    kept = {s["__key__"]: s["json"]["prompt"] for p in sorted(tmp_path.glob("*.tar")) for s in iter_shard(str(p))}
    assert kept == {"a": "r00000", "b": "r00000", "c": "r00001"}  # the first copy of each key, intact
    assert sorted(p.name for p in tmp_path.glob("*set-aside*")) == [
        "r00001-00000.tar.set-aside-duplicate-keys",
        "r00002-00000.tar.set-aside-duplicate-keys",
    ]
    assert write_manifest(tmp_path, "stage1", {})["num_samples"] == 3
