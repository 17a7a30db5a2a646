"""The toy world's VAE: a real `AutoencoderKLWan` whose weights are set by hand so that encode and
decode are the identity on RGB (to ~1e-5): the diffusion transformer works in pixel space, and every
stage still goes through the stock VAE calls. Each channel is carried as a (+x, -x) pair, since
SiLU(x) - SiLU(-x) = x exactly; a constant channel K >> |x| makes the RMS norms a fixed scale.
"""

from __future__ import annotations

import numpy as np
import torch

from gigavideo.errors import ConfigError

_K = 1000.0  # the constant channel


def pixel_vae(channels: int = 3, base_dim: int = 8, latent_std: float = 0.5):
    """An AutoencoderKLWan that maps RGB in [-1, 1] to itself (latents = pixels, normalised by latent_std)."""
    from diffusers import AutoencoderKLWan

    if base_dim < 2 * channels + 1:
        raise ConfigError(f"pixel_vae: base_dim must be at least {2 * channels + 1}")
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
