"""The toy world: a pixel-space VAE that stock diffusers loads, a judge that is right, and the method's effect."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_stage

from gigavideo.eval.report import realism, realism_distance
from gigavideo.rundir.video import video_statistics
from gigavideo.toy.clips import COLOURS, DIRECTIONS, SHADES, SIZE_WORDS, Scene, make_clip, render_scene
from gigavideo.toy.judge import ToyJudge
from gigavideo.toy.vae import pixel_vae


def test_pixel_vae_round_trips_rgb_through_stock_diffusers(tmp_path):
    from diffusers import AutoencoderKLWan

    from gigavideo.models.pipeline import decode_latents, encode_video

    pixel_vae().save_pretrained(tmp_path / "vae")
    vae = AutoencoderKLWan.from_pretrained(tmp_path / "vae").eval()
    frames, _ = make_clip(3, 32, 32, 5)
    with torch.no_grad():
        latents = encode_video(vae, frames, "cpu")
        back = decode_latents(vae, latents[None])[0]
    assert latents.shape == (3, 5, 32, 32)  # no compression: the transformer sees pixels
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 1


@pytest.mark.parametrize("size", [16, 32])
def test_toy_judge_answers_every_colour_and_direction_from_pixels(size):
    judge = ToyJudge()
    for colour in COLOURS:
        for direction in DIRECTIONS:
            frames = render_scene(Scene(colour, direction), size, size, 5)
            for asked in DIRECTIONS:
                p = judge.answer(frames, f"Is it true that a {colour} square moves {asked}?")["p_yes"]
                assert (p > 0.9) if asked == direction else (p < 0.05), (colour, direction, asked, p)
            other = next(c for c in COLOURS if c != colour)
            assert judge.answer(frames, f"Is it true that the video shows a {colour} square?")["p_yes"] > 0.9
            assert judge.answer(frames, f"Is it true that the video shows a {other} square?")["p_yes"] < 0.05
    blank = np.full((5, 32, 32, 3), 128, np.uint8)
    assert judge.answer(blank, "Is it true that a red square moves up?")["answer"] == "no"


@pytest.mark.parametrize("frame", [16, 32])
def test_toy_judge_tells_small_from_large_squares_as_captions_name_them(frame):
    judge = ToyJudge()
    for side in range(2, frame // 2 + 1):
        scene = Scene("blue", "left", size=side / frame)
        frames = render_scene(scene, frame, frame, 5)
        for word in SIZE_WORDS:
            p = judge.answer(frames, f"Is it true that the video shows a {word} blue square?")["p_yes"]
            if scene.size_word is not None:
                assert (p > 0.85) if scene.size_word == word else (p < 0.01), (frame, side, word, p)
            elif abs(scene.size - 0.34) < 0.04:  # the middle of the band that captions leave unnamed
                assert p < 0.35, (frame, side, word, p)
    captions = [make_clip(i, 16, 16, 5, caption_rates={"size": 0.0})[1] for i in range(50)]
    assert not any(word in c for c in captions for word in SIZE_WORDS)
    named = [make_clip(i, 16, 16, 5)[1] for i in range(50)]
    assert sum("small" in c for c in named) > 5 and sum("large" in c for c in named) > 5


@pytest.mark.parametrize("frame", [16, 32])
def test_toy_judge_tells_the_shade_of_every_colour_as_captions_name_it(frame):
    judge = ToyJudge()
    for colour in COLOURS:
        other = next(c for c in COLOURS if c != colour)
        for shade in (None, *SHADES):
            frames = render_scene(Scene(colour, "up", shade=shade), frame, frame, 5)
            for asked in SHADES:
                p = judge.answer(frames, f"Is it true that the video shows a {asked} {colour} square?")["p_yes"]
                assert (p > 0.9) if asked == shade else (p < 0.05), (colour, shade, asked, p)
            assert judge.answer(frames, f"Is it true that the video shows a {colour} square?")["p_yes"] > 0.9
            assert judge.answer(frames, f"Is it true that the video shows a {other} square?")["p_yes"] < 0.05
    captions = [make_clip(i, 16, 16, 5, caption_rates={"shade": 0.0})[1] for i in range(60)]
    assert not any(f" {word} " in c for c in captions for word in SHADES)  # "soft light" is the style
    named = [make_clip(i, 16, 16, 5)[1] for i in range(60)]
    assert all(sum(f" {word} " in c for c in named) > 10 for word in SHADES)
    light_only = [make_clip(i, 16, 16, 5, caption_rates={"shade": 0.0, "light": 1.0})[1] for i in range(60)]
    assert sum(" light " in c for c in light_only) > 10 and not any(" dark " in c for c in light_only)
    with pytest.raises(ValueError, match="unknown attributes \\['colour'\\]"):
        make_clip(0, caption_rates={"colour": 0.5})


def test_realism_distance_is_small_within_the_world_and_grows_with_drift():
    real = [video_statistics(make_clip(i, 16, 16, 5, seed=0)[0]) for i in range(64)]
    same = [video_statistics(make_clip(i, 16, 16, 5, seed=1)[0]) for i in range(64)]
    washed = [video_statistics((make_clip(i, 16, 16, 5, seed=1)[0] * 0.6 + 90).astype(np.uint8)) for i in range(64)]
    assert realism_distance(same, real) < 0.5 < 5 < realism_distance(washed, real)


def test_realism_change_comes_with_an_interval_that_tells_drift_from_noise():
    real = [video_statistics(make_clip(i, 16, 16, 5, seed=0)[0]) for i in range(64)]
    videos = [{"key": str(i)} for i in range(64)]
    same = {
        (label, str(i)): {"stats": video_statistics(make_clip(i, 16, 16, 5, seed=s)[0])}
        for i in range(64)
        for label, s in (("baseline", 1), ("finetuned", 2))
    }
    noise = realism(videos, same, real, bootstrap_samples=300)
    assert noise["ci_low"] < 0 < noise["ci_high"]
    washed = dict(same) | {
        ("finetuned", str(i)): {
            "stats": video_statistics((make_clip(i, 16, 16, 5, seed=2)[0] * 0.6 + 90).astype(np.uint8))
        }
        for i in range(64)
    }
    drifted = realism(videos, washed, real, bootstrap_samples=300)
    assert drifted["ci_low"] > 1.0, drifted
    # A video that failed on one side counts on neither: both distances stay over the same videos.
    failed = dict(washed) | {("finetuned", str(i)): {"stats": None} for i in range(32)}
    half = realism(videos, failed, real)
    assert half["videos"] == 32
    assert half["baseline"] == pytest.approx(realism(videos[32:], washed, real)["baseline"])
    assert realism(videos, {k: {"stats": None} for k in washed}, real) == {
        "baseline": None,
        "finetuned": None,
        "videos": 0,
    }


def test_a_cached_tiny_base_built_from_other_settings_is_refused_not_reused(tmp_path):
    from gigavideo.config import load_config
    from gigavideo.models.base import base_model_path
    from gigavideo.rundir.layout import RunDir

    run = RunDir(tmp_path / "run")
    cfg = load_config("tiny", "render")
    path = base_model_path(cfg, run)
    assert base_model_path(cfg, run) == path  # the same settings: the cached copy
    cfg.model["tiny_seed"] = int(cfg.model["tiny_seed"]) + 1
    with pytest.raises(ValueError, match="other model settings"):
        base_model_path(cfg, run)


SHORT_PRETRAINING = """
pretrain = { steps = 120, clips = 64, batch_size = 4, lr = 1e-3, caption_dropout = 0.1, \
caption_rates = { motion = 0.0, size = 0.0, shade = 0.1 }, size_range = [0.3125, 0.3125], height = 16, width = 16, \
num_frames = 5, seed = 0 }
checkpoint_every = 20
""".replace("\\\n", "")


@pytest.mark.slow
def test_toy_base_is_an_explicit_step_and_its_pretraining_killed_midway_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from gigavideo.config import load_config
    from gigavideo.models.base import base_model_path
    from gigavideo.rundir.layout import RunDir

    preset = tmp_path / "short-toy.toml"
    preset.write_text((REPO / "configs" / "toy.toml").read_text() + SHORT_PRETRAINING)  # [toy] is its last table
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    # A stage finds no base until the base step made it, and says what to run.
    with pytest.raises(FileNotFoundError, match="scripts/prepare_base.py"):
        base_model_path(load_config(str(preset), "render"), RunDir(killed))

    cmd = [sys.executable, str(REPO / "scripts" / "prepare_base.py"), f"--run_dir={killed}", f"--config={preset}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "models" / "base.partial" / "pretrain-state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert state.exists() and not (killed / "models" / "base").exists(), "killed before any checkpoint, or after"
    run_stage("base", killed, f"--config={preset}")  # resumes
    run_stage("base", whole, f"--config={preset}")
    assert json.loads((killed / "models/base/pretraining.json").read_text())["steps"] == 120
    assert not (killed / "models" / "base.partial").exists()
    resumed = load_file(killed / "models/base/transformer/diffusion_pytorch_model.safetensors")
    uninterrupted = load_file(whole / "models/base/transformer/diffusion_pytorch_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.slow
def test_the_method_raises_the_weak_dimension_beyond_noise_on_the_toy_preset(tmp_path):
    """The whole toy preset, as `make demo` runs it (about 8 minutes on 2 cores, half of it pre-training)."""
    run_dir = tmp_path / "run"
    for stage in ("base", "stage1", "stage2", "stage3", "stage4", "eval"):
        run_stage(stage, run_dir, "--config=toy", small=False, timeout=1200)
    heldout = json.loads((run_dir / "eval" / "report.json").read_text())["suites"]["heldout"]
    weak = heldout["dimensions"]["object_shade"]
    assert weak["ci_low"] > 0, weak  # the paired 95% interval of the change lies above zero
