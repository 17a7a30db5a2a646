#!/usr/bin/env python
"""The GPU check: Wan2.1-1.3B's architecture (random weights, bf16) at 832x480x81 on one GPU, one table.

    bash bench/gpu_check.sh              # on a GPU: under 8 minutes
    bash bench/gpu_check.sh --dry_run    # on CPU, tiny preset and size: the same code path, in seconds

Stage 4: step time, tokens/s, MFU and peak memory beside the memory planner's prediction, for full
fine-tuning (the preset's ZeRO config, gradient checkpointing) and for LoRA. Stage 2: seconds per video at
50 steps with classifier-free guidance, without and with step caching (--cache=first_block), and how far
caching moved the latents. Attention backends (gigavideo/models/attention.py): each one that can run on this GPU,
stage 4's LoRA step and stage 2's sampling, as a speed-up over native, and how far each moved the latents.
Text embeddings are random: the 5.7B text encoder is not what is timed.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from gigavideo.cli import run_cli
from gigavideo.config import load_config
from gigavideo.distributed import single_process_defaults
from gigavideo.memory import GIB, asked_setting, plan_training, render_plan, tokens_per_sample
from gigavideo.models import attention
from gigavideo.models.families import family_for
from gigavideo.models.pipeline import latent_shape, torch_dtype
from gigavideo.models.rendering import configure_pipeline
from gigavideo.train.ds_config import build_ds_config
from gigavideo.train.loop import prepare_for_training
from gigavideo.train.loss import batch_loss


def progress(what: str, row: dict) -> None:
    """One line per measurement as it is made, so a run cut short by its time limit still reports."""
    shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items() if k != "latents"}
    print(f"[gpu_check] {what}: {shown}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # the previous row's engine and models, so that this row's peak is its own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


def random_transformer(cfg, device, dtype, keep_fp32: bool = False):
    """The preset's transformer with random weights, built on the device. keep_fp32: the modules diffusers
    keeps in float32 when loading in bf16 (as stage 2 loads it) stay float32; DeepSpeed's bf16 casts all."""
    from diffusers import WanTransformer3DModel

    arch = dict(cfg.model.arch_transformer, patch_size=tuple(cfg.model.arch_transformer["patch_size"]))
    with torch.device(device):
        model = WanTransformer3DModel(**arch)
    model.to(dtype)
    keep = set(model._keep_in_fp32_modules or []) if keep_fp32 else set()
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.float()  # random weights: what was rounded to bf16 does not matter, the kernels' dtype does
    return model


def train_row(cfg, device, steps: int, peak_tflops: float, backend: str = "native") -> dict:
    """Stage 4's engine (the preset's DeepSpeed config, bf16) on one random batch: median step time."""
    import deepspeed

    mode = cfg.train.mode
    family = family_for(cfg.model)
    ds_config = build_ds_config(cfg.train, 1)
    reset_peak(device)
    model = random_transformer(cfg, device, torch.bfloat16)
    attention.use([model], backend, device, torch.bfloat16)
    model = prepare_for_training(model, cfg.train, family, family.experts()[0])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=float(cfg.train.lr))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable, config=ds_config)
    r, batch = cfg.render, int(cfg.train.micro_batch_size)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(batch, *latent_shape(cfg.model.arch_vae, r.height, r.width, r.num_frames), generator=gen)
    embeds = torch.randn(batch, cfg.model.max_sequence_length, cfg.model.arch_transformer["text_dim"], generator=gen)
    t, weights = torch.full((batch,), 0.5), torch.ones(batch, device=device)

    def step():
        loss, _ = batch_loss(engine, z0, embeds, weights, t, torch.randn_like(z0), torch.bfloat16)
        engine.backward(loss)
        engine.step()

    step()  # warm-up: kernels, the optimizer's state
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    tokens = tokens_per_sample(cfg) * batch
    parameters = sum(p.numel() for p in model.parameters())
    # Model FLOPs: forward 2 x parameters per token plus attention; backward twice that for full fine-tuning,
    # once for LoRA (no weight gradients of the frozen base); the checkpointing recompute is not counted.
    arch = cfg.model.arch_transformer
    attention_flops = (
        4 * arch["num_layers"] * tokens_per_sample(cfg) ** 2 * arch["num_attention_heads"] * arch["attention_head_dim"]
    )
    forward = batch * (2 * parameters * tokens_per_sample(cfg) + attention_flops)
    flops = forward * (3 if mode == "full" else 2)
    plan = plan_training(cfg, asked_setting(cfg, ds_config), 1, 1, ds_config.get("zero_optimization"))
    planned = sum(v for k, v in plan["bytes"].items() if k not in ("reserved", "validation_models"))
    row = {
        "mode": mode,
        "zero": engine.zero_optimization_stage(),
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": flops / seconds / (peak_tflops * 1e12),
        "peak_gib": peak_gib(device),
        "planned_gib": planned / GIB,
    }
    progress(f"stage 4, {backend} attention", row)
    return row


RENDER_VARIANTS = ({"cache": "none"}, {"cache": "first_block"}, {"cache": "none", "vae_tiling": True})


def render_label(variant: dict) -> str:
    return ", ".join([f"cache={variant['cache']}"] + ["vae_tiling"] * bool(variant.get("vae_tiling")))


def planned_render_gib(cfg) -> float:
    """The memory plan's stage 2 for what is loaded here: transformer and VAE (no text encoder), and the larger
    of the sampler's peak and the VAE decode's."""
    plan = render_plan(cfg, 1, 1, 1)
    return (
        plan["models"]["transformers"]
        + plan["models"]["vae"]
        + max(plan["peaks"]["sampling"], plan["peaks"]["vae_decode"])
    ) / GIB


def render_rows(cfg, device, steps: int, variants=RENDER_VARIANTS, backend="native", decode=True) -> list[dict]:
    """Seconds per video (sampling + VAE decode) for each variant of the render settings (step caching, tiled
    decode), the same seed; the VAE in the model's dtype, as stage 2 loads it."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    transformer = random_transformer(cfg, device, torch.bfloat16, keep_fp32=True)
    attention.use([transformer], backend, device, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, cfg.model.max_sequence_length, cfg.model.arch_transformer["text_dim"], generator=gen)
    rows, reference = [], None
    for variant in variants:
        variant_cfg = load_config(cfg.preset, "render", variant)
        r = variant_cfg.render
        if transformer.is_cache_enabled:  # the previous variant's step caching
            transformer.disable_cache()
        vae = AutoencoderKLWan(**cfg.model.arch_vae).to(device, torch_dtype(cfg.model.dtype))
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=1.0
        )
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        configure_pipeline(pipe, r, cfg.model.flow_shift, device)
        kwargs = dict(
            prompt_embeds=embeds.to(device, torch.bfloat16),
            negative_prompt_embeds=torch.zeros_like(embeds).to(device, torch.bfloat16),
            height=r.height,
            width=r.width,
            num_frames=r.num_frames,
            guidance_scale=r.guidance_scale,
        )
        pipe(**kwargs, num_inference_steps=2, output_type="latent")  # warm-up
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        latents = pipe(
            **kwargs, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(1)
        ).frames
        sync(device)
        sampling = time.perf_counter() - start
        start = time.perf_counter()
        if decode:
            with torch.no_grad():
                vae.decode(latents.to(vae.dtype), return_dict=False)
        sync(device)
        row = {"variant": render_label(variant), "sampling_s": sampling, "decode_s": time.perf_counter() - start}
        row["peak_gib"], row["planned_gib"] = peak_gib(device), planned_render_gib(variant_cfg)
        row["latents"] = latents.float().cpu()
        if reference is None:
            reference, row["moved"] = row["latents"], 0.0
        else:
            row["moved"] = float((row["latents"] - reference).abs().mean() / reference.abs().mean())
        progress(f"stage 2, {backend} attention", row)
        rows.append(row)
        del pipe, vae
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def backend_rows(cfg, lora_cfg, device, train_steps: int, render_steps: int, peak_tflops: float) -> list[dict]:
    """Each attention backend that can run here (native first, the reference; not the slow reference math
    kernel on a GPU): stage 4's LoRA step, stage 2's sampling seconds (no caching, no decode), and how far
    its latents moved from native's."""
    usable = [n for n in attention.BACKENDS if attention.why_not(n, device, torch.bfloat16) is None]
    usable = sorted((n for n in usable if device.type == "cpu" or n != "_native_math"), key=lambda n: n != "native")
    rows, reference = [], None
    for name in usable:
        row = {"backend": name, "step_s": train_row(lora_cfg, device, train_steps, peak_tflops, name)["step_s"]}
        render = render_rows(cfg, device, render_steps, RENDER_VARIANTS[:1], backend=name, decode=False)[0]
        row["sampling_s"], latents = render["sampling_s"], render["latents"]
        reference = latents if reference is None else reference
        row["moved"] = float((latents - reference).abs().mean() / reference.abs().mean())
        rows.append(row)
    return rows


def table(device_name: str, cfg, train: list[dict], render: list[dict], steps: int, backends, bsteps: int) -> str:
    r = cfg.render
    training = [
        [
            f"{row['mode']}, checkpointing",
            str(row["zero"]),
            f"{row['step_s']:.2f}",
            f"{row['tokens_per_s']:,.0f}",
            f"{row['mfu']:.1%}",
            gib(row["peak_gib"]),
            gib(row["planned_gib"]),
        ]
        for row in train
    ]
    rendering = [
        [
            row["variant"],
            f"{row['sampling_s']:.1f}",
            f"{row['decode_s']:.1f}",
            f"{row['sampling_s'] + row['decode_s']:.1f}",
            gib(row["peak_gib"]),
            gib(row["planned_gib"]),
            f"{row['moved']:.2%}",
        ]
        for row in render
    ]
    lines = [
        f"{device_name}: {Path(cfg.preset).stem} architecture (random weights, bf16), "
        f"{r.width}x{r.height}x{r.num_frames}, {tokens_per_sample(cfg)} tokens per video",
        "",
        *markdown(["stage 4", "ZeRO", "step (s)", "tokens/s", "MFU", "peak memory (GiB)", "planned (GiB)"], training)
        * bool(train),
        "",
        *markdown(
            [
                f"stage 2, {steps} steps, CFG",
                "sampling (s)",
                "VAE decode (s)",
                "s/video",
                "peak memory (GiB)",
                "planned (GiB)",
                "latents moved",
            ],
            rendering,
        )
        * bool(render),
        "",
        *markdown(
            [
                "attention backend",
                "stage-4 LoRA step (s)",
                "speed-up",
                f"stage 2, {bsteps} steps, CFG (s)",
                "speed-up",
                "latents moved",
            ],
            [
                [
                    row["backend"],
                    f"{row['step_s']:.2f}",
                    f"{backends[0]['step_s'] / row['step_s']:.2f}x",
                    f"{row['sampling_s']:.1f}",
                    f"{backends[0]['sampling_s'] / row['sampling_s']:.2f}x",
                    f"{row['moved']:.2%}",
                ]
                for row in backends
            ],
        )
        * bool(backends),
    ]
    return "\n".join(lines)


def main(
    dry_run: bool = False,
    train_steps: int = 3,
    render_steps: int = 50,
    backend_train_steps: int = 2,
    backend_render_steps: int = 10,
    peak_tflops: float = 989.0,
    parts: str = "train,render,backends",
):
    """The tables (module docstring). --dry_run: CPU, tiny preset at its own size, 2 sampler steps. Each
    measurement is also printed as it is made (`[gpu_check] ...`), most telling first: the training steps
    against the memory plan, then sampling, then the attention backends. --parts: which of those to run."""
    import deepspeed

    if dry_run:
        device, preset, render_steps, train_steps, backend_render_steps = torch.device("cpu"), "tiny", 2, 1, 2
    elif torch.cuda.is_available():
        device, preset = torch.device("cuda"), "wan2.1-t2v-1.3b"
    else:
        raise SystemExit("bench/gpu_check.py: no GPU here; --dry_run runs it on CPU at tiny size")
    parts_run = parts.split(",") if isinstance(parts, str) else list(parts)  # fire reads a,b as a tuple
    if unknown := set(parts_run) - {"train", "render", "backends"}:
        raise SystemExit(f"bench/gpu_check.py: --parts={parts}: {sorted(unknown)} not among train,render,backends")
    single_process_defaults()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    settings = {"precision": "bf16", "gradient_checkpointing": True, "sample_every": 0}
    configs = [load_config(preset, "train", settings | {"mode": mode}) for mode in ("full", "lora")]
    cfg = configs[0]
    train = [train_row(c, device, train_steps, peak_tflops) for c in configs] if "train" in parts_run else []
    render = render_rows(cfg, device, render_steps) if "render" in parts_run else []
    backends = []
    if "backends" in parts_run:
        backends = backend_rows(cfg, configs[1], device, backend_train_steps, backend_render_steps, peak_tflops)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(table(name, cfg, train, render, render_steps, backends, backend_render_steps))


if __name__ == "__main__":
    run_cli(main)
