"""Stage 2 across ranks: coverage, kill and resume, what the shards hold, and what stage 4 needs."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_stage

from gigavideo.models.pipeline import decode_latents, encode_video
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json, iter_samples, shard_keys
from gigavideo.rundir.video import decode_mp4, encode_mp4

PROMPTS = ["--num_per_dimension=6", "--real_captions=procedural:2"]
SHARDS = ["--samples_per_shard=2", "--batch_size=2", "--steps=20"]  # slow enough to be killed midway


def torchrun(stage_script, run_dir, *args, nproc=2):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / stage_script),
        f"--run_dir={run_dir}",
        *args,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def rank_keys(run_dir, stage="stage2"):
    folder = RunDir(run_dir).stage(stage)
    return [{k for p in folder.glob(f"r{r:05d}-*.tar") for k in shard_keys(p)} for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_cover_every_prompt_once_and_a_killed_rank_resumes_to_the_same_videos(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run_dir in (whole, killed):
        run_stage("stage1", run_dir, *PROMPTS)
    proc = torchrun("stage2_render/render.py", whole, *SHARDS)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-4000:]
    keys = set(index_json(RunDir(whole), "stage1"))
    ranks = rank_keys(whole)
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1] and ranks[0] | ranks[1] == keys
    manifest = read_manifest(RunDir(whole), "stage2")
    assert manifest["world_size"] == 2 and set(manifest["device_seconds"]) == {"0", "1"}

    proc = torchrun("stage2_render/render.py", killed, *SHARDS)
    out = RunDir(killed).stage("stage2")
    deadline = time.time() + 300
    while not list(out.glob("r00001-*.tar")) and time.time() < deadline:
        time.sleep(0.01)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, "the two rank processes were not found"
    os.kill(int(max(ranks, key=int)), signal.SIGKILL)  # one rank dies; torchrun then stops the other
    proc.wait(timeout=120)
    assert not RunDir(killed).is_complete("stage2")
    partial = len(list(out.glob("*.tar")))
    assert 0 < partial < len(list(RunDir(whole).stage("stage2").glob("*.tar")))
    proc = torchrun("stage2_render/render.py", killed, *SHARDS)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-4000:]
    assert read_manifest(RunDir(killed), "stage2")["num_samples"] == len(keys)  # duplicates would be refused
    expected = {s["__key__"]: s for s in iter_samples(RunDir(whole), "stage2")}
    for sample in iter_samples(RunDir(killed), "stage2"):
        np.testing.assert_array_equal(sample["latents.npy"], expected[sample["__key__"]]["latents.npy"])
        assert sample["mp4"] == expected[sample["__key__"]]["mp4"], sample["__key__"]


def test_stored_latents_decode_to_the_stored_video_and_real_latents_encode_from_it(scored_run):
    from diffusers import AutoencoderKLWan

    run = RunDir(scored_run)
    vae = AutoencoderKLWan.from_pretrained(run.models / "base" / "vae")
    for sample in iter_samples(run, "stage2"):
        frames, _ = decode_mp4(sample["mp4"])
        latents = torch.from_numpy(sample["latents.npy"])
        if sample["json"]["source"] == "synthetic":
            decoded = decode_latents(vae, latents[None])[0]
            assert decoded.shape == frames.shape
            codec_noise = np.abs(decode_mp4(encode_mp4(decoded, 8))[0].astype(int) - decoded).mean()
            assert np.abs(decoded.astype(int) - frames).mean() <= codec_noise + 1.0
        else:
            encoded = encode_video(vae, frames, "cpu")
            assert encoded.shape == latents.shape
            assert (encoded - latents).abs().mean() < 0.05 * latents.abs().mean()


@pytest.mark.slow
def test_stage4_trains_without_building_a_vae_or_a_text_encoder(scored_copy, tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import diffusers, transformers\n"
        "def refuse(self, *a, **k):\n"
        "    raise AssertionError('stage 4 built ' + type(self).__name__)\n"
        "diffusers.AutoencoderKLWan.__init__ = refuse\n"
        "transformers.UMT5EncoderModel.__init__ = refuse\n"
    )
    env = {**os.environ, "PYTHONPATH": str(guard)}
    probe = subprocess.run(
        [sys.executable, "-c", "import diffusers; diffusers.AutoencoderKLWan()"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert "stage 4 built AutoencoderKLWan" in probe.stderr  # the guard works
    run_stage(
        "stage4", scored_copy, "--sample_every=0", env={"PYTHONPATH": str(guard)}
    )  # validation videos need the VAE
    assert RunDir(scored_copy).is_complete("stage4")


@pytest.mark.slow
def test_step_caching_renders_and_bad_render_flags_fail_before_any_work(scored_copy):
    run_stage("stage2", scored_copy, "--overwrite", "--cache=first_block", "--cache_threshold=0.2")
    manifest = read_manifest(RunDir(scored_copy), "stage2")
    assert manifest["render"]["cache"] == "first_block" and manifest["num_samples"] == 12
    for flag, message in (("--cache=magic", "--cache='magic' not in"), ("--num_frames=8", "Wan needs 4k+1 frames")):
        proc = run_stage("stage2", scored_copy, "--overwrite", flag, check=False)
        assert proc.returncode == 2 and message in proc.stderr
        assert RunDir(scored_copy).is_complete("stage2")  # the previous output is untouched


@pytest.mark.slow
def test_base_share_renders_that_share_of_the_prompts_with_the_other_model_and_the_rest_as_before(scored_copy):
    """Later rounds: render.base_share of the synthetic prompts from render.base_path's model (fixed per key),
    the others from model.path's, each with its own seed as before; a missing --base_path fails before any work,
    and a base_path that is the model itself renders as before."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = RunDir(scored_copy)
    before = {s["__key__"]: s for s in iter_samples(run, "stage2", ("json", "latents.npy"))}
    other = scored_copy / "models" / "other"
    shutil.copytree(scored_copy / "models" / "base", other)
    weights_file = other / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(weights_file).items()}, weights_file)  # another model

    missing = run_stage("stage2", scored_copy, "--overwrite", "--base_share=0.5", check=False)
    assert missing.returncode == 2 and "set --base_path" in missing.stderr
    assert run.is_complete("stage2")  # the previous output is untouched

    own = scored_copy / "models" / "base"  # round 1: the base is the model itself, so nothing changes
    run_stage("stage2", scored_copy, "--overwrite", "--base_share=0.5", f"--base_path={own}")
    same = {s["__key__"]: s for s in iter_samples(run, "stage2", ("json", "latents.npy"))}
    assert {s["json"].get("rendered_by") for s in same.values() if s["json"]["source"] == "synthetic"} == {"model"}
    assert all(np.array_equal(same[k]["latents.npy"], before[k]["latents.npy"]) for k in before)

    with_other = ["--base_share=0.5", f"--base_path={other}", "--samples_per_shard=1"]
    run_stage("stage2", scored_copy, "--overwrite", *with_other)
    after = {s["__key__"]: s for s in iter_samples(run, "stage2", ("json", "latents.npy"))}
    assert after.keys() == before.keys()
    by = {k: s["json"]["rendered_by"] for k, s in after.items() if s["json"]["source"] == "synthetic"}
    assert 0 < sum(b == "base" for b in by.values()) < len(by)  # 12 prompts, about half each
    for key, rendered_by in by.items():
        assert after[key]["json"]["seed"] == before[key]["json"]["seed"]
        # other batches than before: the same up to float rounding
        same = np.allclose(after[key]["latents.npy"], before[key]["latents.npy"], atol=1e-4)
        assert same == (rendered_by == "model"), key
        assert after[key]["json"]["model"]["path"] == str(
            other if rendered_by == "base" else run.path / "models" / "base"
        )
    manifest = read_manifest(run, "stage2")
    assert manifest["model"]["base_share"] == 0.5 and manifest["model"]["base_path"] == str(other)

    # Killed once the base's share was written: the rerun renders the rest without loading the base again.
    run.manifest("stage2").unlink()
    shutil.rmtree(run.stage("stage2") / "_parts")
    for shard in run.stage("stage2").glob("*.tar"):  # one sample each
        if by.get(shard_keys(shard)[0]) != "base":
            shard.unlink()
    weights_file.write_bytes(b"not weights")  # loading the base would now fail
    run_stage("stage2", scored_copy, *with_other)
    resumed = {s["__key__"]: s for s in iter_samples(run, "stage2", ("json", "latents.npy"))}
    assert resumed.keys() == after.keys()
    assert all(np.allclose(resumed[k]["latents.npy"], after[k]["latents.npy"], atol=1e-6) for k in after)
    assert {k: s["json"].get("rendered_by") for k, s in resumed.items() if k in by} == by
