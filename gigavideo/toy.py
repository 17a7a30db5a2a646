"""The toy world's models: a pixel-space VAE, the base model's pre-training, and a judge that reads pixels.

- `pixel_vae`: a real `AutoencoderKLWan` whose weights are set by hand so that encode and decode
  are the identity on RGB (to ~1e-5): the diffusion transformer works in pixel space, and every
  stage still goes through the stock VAE calls. Each channel is carried as a (+x, -x) pair, since
  SiLU(x) - SiLU(-x) = x exactly; a constant channel K >> |x| makes the RMS norms a fixed scale.
- `pretrain_base`: flow-matching pre-training of the tiny Wan transformer on the procedural
  clips (gigavideo/procedural.py), whose captions need not name the size or the direction of motion.
- `ToyJudge`: the stage-3 judge interface, answering yes/no questions about colour, shade,
  size and direction of motion from the pixels (saturated-pixel segmentation, its mean colour, its
  area and the centroid's track).
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import torch

from .procedural import COLOURS, DIRECTIONS, SHADES, SIZE_RANGE, SIZE_WORDS, make_clip, shaded

log = logging.getLogger("gigavideo.toy")
_K = 1000.0  # the constant channel of the pixel VAE


def pixel_vae(channels: int = 3, base_dim: int = 8, latent_std: float = 0.5):
    """An AutoencoderKLWan that maps RGB in [-1, 1] to itself (latents = pixels, normalised by latent_std)."""
    from diffusers import AutoencoderKLWan

    if base_dim < 2 * channels + 1:
        raise ValueError(f"pixel_vae: base_dim must be at least {2 * channels + 1}")
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=channels,
        dim_mult=[1],
        num_res_blocks=1,
        temperal_downsample=[],
        latents_mean=[0.0] * channels,
        latents_std=[latent_std] * channels,
        in_channels=channels,
        out_channels=channels,
        scale_factor_temporal=1,
        scale_factor_spatial=1,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder in (vae.encoder, vae.decoder):
            for norm in (m for name, m in coder.named_modules() if name.endswith("norm_out")):
                norm.gamma.fill_(_K / np.sqrt(base_dim))  # undo the RMS scale: |h| is ~K
            taps = coder.conv_in.weight  # (out, in, t, y, x); the causal conv's current frame is t = -1
            for c in range(channels):
                taps[c, c, -1, 1, 1], taps[channels + c, c, -1, 1, 1] = 1.0, -1.0
            coder.conv_in.bias[2 * channels] = _K
        for c in range(channels):
            vae.encoder.conv_out.weight[c, c, -1, 1, 1] = 1.0  # mean = SiLU(x) - SiLU(-x)
            vae.encoder.conv_out.weight[c, channels + c, -1, 1, 1] = -1.0
            vae.encoder.conv_out.bias[channels + c] = -30.0  # log-variance: a deterministic posterior
            vae.decoder.conv_out.weight[c, c, -1, 1, 1] = 1.0
            vae.decoder.conv_out.weight[c, channels + c, -1, 1, 1] = -1.0
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight[:, :, 0, 0, 0] = torch.eye(conv.weight.shape[0])
    return vae


def pretrain_base(pipe, pretrain: dict, max_sequence_length: int, flow_shift: float) -> dict:
    """Flow-matching pre-training of pipe.transformer on procedural clips; returns a summary."""
    from .loss import noisy_latents_and_target, sample_timesteps
    from .models import normalize_latents

    torch.manual_seed(int(pretrain["seed"]))
    clips = [
        make_clip(
            i,
            pretrain["height"],
            pretrain["width"],
            pretrain["num_frames"],
            int(pretrain["seed"]),
            pretrain["caption_rates"],
            pretrain.get("size_range", SIZE_RANGE),
        )
        for i in range(int(pretrain["clips"]))
    ]
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([frames for frames, _ in clips])).permute(0, 4, 1, 2, 3) / 127.5 - 1
        latents = torch.cat(
            [
                normalize_latents(pipe.vae.encode(pixels[i : i + 250]).latent_dist.mode(), pipe.vae.config)
                for i in range(0, len(clips), 250)
            ]
        )
        texts = sorted({text for _, text in clips} | {""})  # few distinct captions: embed each once
        table = pipe.encode_prompt(
            texts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device="cpu"
        )[0]
        embeds = table[[texts.index(text) for _, text in clips]]
        empty = table[texts.index("")]
    drop = torch.rand(len(clips)) < float(pretrain["caption_dropout"])  # so classifier-free guidance has a "no text"
    embeds[drop] = empty
    model = pipe.transformer.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(pretrain["lr"]), weight_decay=0.0)
    start, losses = time.time(), []
    steps, batch = int(pretrain["steps"]), int(pretrain["batch_size"])
    for step in range(steps):
        idx = torch.randint(0, len(clips), (batch,))
        t = sample_timesteps(batch, "logit_normal", flow_shift)
        noisy, target = noisy_latents_and_target(latents[idx], torch.randn_like(latents[idx]), t)
        pred = model(noisy, timestep=t * 1000, encoder_hidden_states=embeds[idx], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:  # cosine decay to a tenth
            group["lr"] = float(pretrain["lr"]) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info(
                "toy pre-training step %d/%d  loss %.4f  (%.0f s)",
                step + 1,
                steps,
                np.mean(losses[-100:]),
                time.time() - start,
            )
    model.eval()
    return {"steps": steps, "final_loss": float(np.mean(losses[-100:])), "seconds": time.time() - start}


# ---------------------------------------------------------------------------------------------- the judge


def track(frames: np.ndarray, saturation: int = 40) -> dict:
    """Segment the saturated (coloured) pixels of each frame: mean colour and the centroid's track."""
    f = frames.astype(np.float32)
    mask = (f.max(-1) - f.min(-1)) > saturation
    visible = mask.reshape(len(frames), -1).sum(1) >= 3
    centroids = np.array(
        [np.argwhere(m).mean(0) if v else (np.nan, np.nan) for m, v in zip(mask, visible, strict=True)]
    )
    colour = f[mask].mean(0) if mask.any() else np.zeros(3)
    side = np.sqrt(np.median(mask.reshape(len(frames), -1).sum(1))) / min(frames.shape[1:3])
    return {"visible": float(visible.mean()), "colour": colour, "centroids": centroids, "side": float(side)}


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


APPEARANCES = [(colour, shade) for colour in COLOURS for shade in (None, *SHADES)]


def p_appearance(colour_rgb: np.ndarray, colour: str | None, shade: str | None, temperature: float = 25.0) -> float:
    """P(the named colour and shade) from the segment's mean colour, over every colour x shade the world
    draws; an unnamed colour or shade may be any."""
    distances = np.array([np.linalg.norm(colour_rgb - np.array(shaded(*pair))) for pair in APPEARANCES])
    probs = np.exp(-(distances - distances.min()) / temperature)
    named = [(colour is None or c == colour) and (shade is None or s == shade) for c, s in APPEARANCES]
    return float(probs[named].sum() / probs.sum())


def p_direction(centroids: np.ndarray, name: str, min_travel: float = 2.0) -> float:
    """From the least-squares velocity of the centroid: travel along the direction beats travel across it."""
    ok = ~np.isnan(centroids).any(1)
    if ok.sum() < 2:
        return 0.0
    t = np.arange(len(centroids))[ok]
    velocity = np.array([np.polyfit(t, centroids[ok, k], 1)[0] for k in (0, 1)])
    travel = velocity * (len(centroids) - 1)
    along = float(travel @ np.array(DIRECTIONS[name]))
    across = float(abs(travel @ np.array(DIRECTIONS[name][::-1])))
    return _sigmoid((along - across - min_travel) / 1.0)


def p_size(side: float, name: str, softness: float = 0.02) -> float:
    """The square's side (a fraction of the frame) against the caption bands of procedural.SIZE_WORDS,
    with the decision boundary a little inside the middle band."""
    if name == "small":
        return _sigmoid((SIZE_WORDS["small"][1] + 0.03 - side) / softness)
    return _sigmoid((side - SIZE_WORDS["large"][0] + 0.03) / softness)


class ToyJudge:
    """Answers "Does a large dark red square move up?"-style questions from pixels; P(yes) multiplies the
    named checks (the colour and shade, the size, the direction)."""

    name = "toy"
    _words = re.compile(r"[a-z]+")

    def score_many(self, items: list[tuple[np.ndarray, str]]) -> list[dict]:
        return [self.answer(frames, question) for frames, question in items]

    def answer(self, frames: np.ndarray, question: str) -> dict:
        words = set(self._words.findall(question.lower()))
        seen = track(frames)
        p = 1.0 if seen["visible"] >= 0.5 else 0.0
        colours, shades = words & set(COLOURS), words & set(SHADES)
        if colours or shades:
            p *= p_appearance(seen["colour"], next(iter(colours), None), next(iter(shades), None))
        for direction in words & set(DIRECTIONS):
            p *= p_direction(seen["centroids"], direction)
        for size in words & set(SIZE_WORDS):
            p *= p_size(seen["side"], size)
        p = float(np.clip(p, 1e-4, 1 - 1e-4))
        return {"p_yes": p, "p_no": 1 - p, "answer": "yes" if p >= 0.5 else "no"}
