"""A stage-2 sample whose arrays cannot be decoded does not end training: stage 4 names it (key, shard, reason),
leaves it out of its batch, counts it against --max_bad_samples, and a resumed run skips the same ones."""

import io
import re
import shutil
import tarfile

import numpy as np
import pytest
from conftest import REPO, run_stage, scalars, train_and_kill

from gigavideo.rundir.fields import SampleError, decode_array
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json, shard_paths

NO_UNPICKLING = REPO / "tests" / "no_unpickling.py"
ARGS = ["--batch_size=1", "--epochs=100", "--max_steps=16", "--save_every=4", "--sample_every=0", "--shuffle_buffer=4"]


class Payload:
    """Unpickling this creates a directory: proof that something unpickled the array it sits in."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        import os

        return os.makedirs, (self.proof,)


def npy(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def trainable(run: RunDir) -> set[str]:
    scored = {k for k, r in index_json(run, "stage3").items() if r["status"] == "ok"}
    return {k for k, m in index_json(run, "stage2").items() if m["source"] == "real" or k in scored}


def poison(run_dir, proof) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """Four trainable samples of one stage-2 shard made undecodable, one way each: (key -> (shard, reason),
    the keys that trained before)."""
    run = RunDir(run_dir)
    keys = trainable(run)
    shard = max(
        shard_paths(run, "stage2"), key=lambda p: len({m.split(".")[0] for m in tarfile.open(p).getnames()} & keys)
    )
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victims = sorted({m.name.split(".")[0] for m, _ in members} & keys)[:4]
    assert len(victims) == 4, f"{shard} holds {len(victims)} trainable samples"
    pickled, truncated, reshaped, missing = victims
    changes = {
        f"{pickled}.latents.npy": lambda d: npy(np.array([Payload(proof)], dtype=object), allow_pickle=True),
        f"{truncated}.latents.npy": lambda d: d[: len(d) // 2],
        f"{reshaped}.latents.npy": lambda d: npy(np.load(io.BytesIO(d))[:, :, :-1]),
        f"{missing}.prompt_embeds.npy": None,
    }
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name in changes and changes[member.name] is None:
                continue
            if member.name in changes:
                data = changes[member.name](data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    reasons = ("latents.npy holds Python objects", "latents.npy is truncated", "latents.npy has shape")
    named = zip(victims, (*reasons, "prompt_embeds.npy is missing"), strict=True)
    return {k: (str(shard), reason) for k, reason in named}, keys


def test_the_decoding_path_says_what_is_wrong_and_never_unpickles(tmp_path):
    good = np.zeros((2, 3), np.float32)
    expect = {"dtype": "float32", "shape": [2, 3]}
    assert np.array_equal(decode_array(npy(good), "k", "s.tar", "x.npy", expect), good)
    cases = [
        (npy(np.array([Payload(tmp_path / "proof")], dtype=object), True), "holds Python objects"),
        (npy(good)[:-5], r"is truncated: 19 data bytes, \(2, 3\) of float32 needs 24"),
        (npy(good) + b"extra", "has bytes past its data"),
        (npy(good.astype(np.float64)), "has dtype float64, the manifest says float32"),
        (npy(np.zeros((2, 4), np.float32)), r"has shape \(2, 4\), the manifest says \(2, 3\)"),
        (b"\x80\x04not an array", "is not a readable .npy array"),
    ]
    for data, reason in cases:
        with pytest.raises(SampleError, match=f"sample 'k' in s.tar: x.npy {reason}"):
            decode_array(data, "k", "s.tar", "x.npy", expect)
    assert not (tmp_path / "proof").exists()


@pytest.mark.slow
def test_undecodable_samples_are_named_counted_and_left_out_and_a_resumed_run_matches(scored_run, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(scored_run, whole)
    victims, keys = poison(whole, tmp_path / "unpickled")
    shutil.copytree(whole, killed)
    proc = run_stage("stage4", whole, *ARGS, env={"GIGAVIDEO_LOG": "DEBUG"}, wrapper=NO_UNPICKLING)

    for key, (shard, reason) in victims.items():  # each named once, with its shard and reason
        named = re.findall(rf"sample '{key}' in {re.escape(shard)} left out of training: {reason}", proc.stderr)
        assert len(named) == 1, (key, proc.stderr[-3000:])
    manifest = read_manifest(RunDir(whole), "stage4")
    assert manifest["undecodable_samples"] == 4 and {r["key"] for r in manifest["undecodable"]} == set(victims)
    assert scalars(RunDir(whole).tensorboard, "train/undecodable_samples")[-1][1] == 4
    trained = set(re.findall(r"'([^']+)'", " ".join(re.findall(r"micro-batch \d+: (\[.*?\])", proc.stderr))))
    assert trained == keys - set(victims)  # every other sample trained (16 steps > 1 epoch)
    assert not (tmp_path / "unpickled").exists()

    train_and_kill(killed, ARGS, RunDir(killed).checkpoints / "latest", 8)
    run_stage("stage4", killed, *ARGS)
    assert scalars(RunDir(killed).tensorboard, "train/loss") == scalars(RunDir(whole).tensorboard, "train/loss")
    assert read_manifest(RunDir(killed), "stage4")["undecodable_samples"] == 4  # those met before the kill too


@pytest.mark.slow
def test_past_max_bad_samples_the_run_stops_and_names_the_first_bad_keys(scored_copy, tmp_path):
    victims, _ = poison(scored_copy, tmp_path / "unpickled")
    proc = run_stage("stage4", scored_copy, *ARGS, "--max_bad_samples=2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = next(line for line in proc.stderr.splitlines() if "more than --max_bad_samples=2" in line)
    count = int(re.search(r"(\d) samples could not be trained on \(\1 undecodable", message).group(1))
    assert count >= 3 and sum(key in message for key in victims) == 3  # "This rank's first" three
    assert "scripts/check_shards.py" in message
    assert not (scored_copy / "stage4" / "manifest.json").exists()
