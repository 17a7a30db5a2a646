"""The toy world: a pixel-space VAE that stock diffusers loads, a judge that is right, and the method's effect."""


import numpy as np
import pytest
import torch

from gigavideo.eval_report import realism_distance
from gigavideo.procedural import COLOURS, DIRECTIONS, Scene, make_clip, render_scene
from gigavideo.toy import ToyJudge, pixel_vae
from gigavideo.video import video_statistics


def test_pixel_vae_round_trips_rgb_through_stock_diffusers(tmp_path):
    from diffusers import AutoencoderKLWan

    from gigavideo.models import decode_latents, encode_video

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


def test_realism_distance_is_small_within_the_world_and_grows_with_drift():
    real = [video_statistics(make_clip(i, 16, 16, 5, seed=0)[0]) for i in range(64)]
    same = [video_statistics(make_clip(i, 16, 16, 5, seed=1)[0]) for i in range(64)]
    washed = [video_statistics((make_clip(i, 16, 16, 5, seed=1)[0] * 0.6 + 90).astype(np.uint8)) for i in range(64)]
    assert realism_distance(same, real) < 0.5 < 5 < realism_distance(washed, real)
