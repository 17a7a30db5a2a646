"""Will it fit: the per-GPU memory of stage 4 (training), stage 2 (rendering) and stage 3 (a local judge) at
a preset's shapes, before any compute, and the cheapest setting that fits when the asked one does not.

Model states (parameters, gradients, optimizer states under ZeRO-0/2/3 and offload) come from
DeepSpeed's own estimators. Activations, the frozen components and the VAE decode are predicted from
the architecture and the video's shape; they are predictions until a GPU has measured them.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gigavideo.config import REPO_ROOT
from gigavideo.errors import UserError
from gigavideo.models.families import family_for
from gigavideo.models.pipeline import latent_shape, transformer_parameters

GIB = 2**30
RESERVED = 2 * GIB  # CUDA context, NCCL buffers and allocator slack, per GPU
UMT5_VOCAB = 256384  # the real text encoder's vocabulary (the tiny presets' is a few hundred)
DS_CONFIGS = {
    (2, False): "ds_configs/zero2.json",
    (3, False): "ds_configs/zero3.json",
    (3, True): "ds_configs/zero3_offload.json",
}


@dataclass(frozen=True)
class TrainSetting:
    """What a user can change to make stage 4 fit, cheapest first in `alternatives`."""

    zero: int
    offload: bool
    checkpointing: bool
    mode: str
    micro_batch: int  # per rank: the global batch stays as set, the accumulation makes up the rest
    validation: bool

    def flags(self, ds_config: str) -> str:
        return (
            f"--ds_config={ds_config} --gradient_checkpointing={self.checkpointing} --mode={self.mode} "
            f"--micro_batch_size={self.micro_batch}" + ("" if self.validation else " --sample_every=0")
        )


def ds_file(path: str) -> dict:
    """A shipped DeepSpeed config's zero_optimization section."""
    return json.loads((REPO_ROOT / path).read_text()).get("zero_optimization", {})


def ds_zero(ds_config: dict) -> tuple[int, bool]:
    zero = ds_config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    return int(zero.get("stage", 0)), offload


@functools.lru_cache(maxsize=16)
def _transformer_shapes(arch_json: str) -> tuple[tuple[int, ...], tuple[tuple[str, int, int], ...]]:
    """A transformer built once on the meta device: its parameter sizes, and every Linear's (name, in, out)."""
    from diffusers import WanTransformer3DModel

    arch = {k: tuple(v) if k == "patch_size" else v for k, v in json.loads(arch_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = WanTransformer3DModel(**arch)
    linears = tuple(
        (name, m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    )
    return tuple(p.numel() for p in model.parameters()), linears


def parameter_sizes(arch: dict, mode: str, targets: list[str], rank: int) -> tuple[list[int], list[int]]:
    """The sizes of the trained and of the frozen parameter tensors (LoRA: r x in and out x r per targeted
    Linear, the base frozen)."""
    base, linears = _transformer_shapes(json.dumps(arch, sort_keys=True))
    if mode == "full":
        return list(base), []
    adapters = [
        size
        for name, d_in, d_out in linears
        if any(name == t or name.endswith("." + t) for t in targets)
        for size in (rank * d_in, d_out * rank)
    ]
    return adapters, list(base)


def largest_layer(arch: dict) -> int:
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    return max(dim * arch["ffn_dim"], dim * dim)


def component_parameters(cfg) -> dict[str, int]:
    """Parameters of the text encoder and the VAE the preset describes (0 where arch_vae is not a Wan VAE's)."""
    m = cfg.model
    vocab = UMT5_VOCAB if m.kind == "wan" or m.path else 512
    text = {"vocab_size": vocab, "d_model": m.arch_transformer["text_dim"], **m.arch_text_encoder}
    return _component_parameters(json.dumps(text, sort_keys=True), json.dumps(m.arch_vae, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _component_parameters(text_json: str, vae_json: str) -> dict[str, int]:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        text = UMT5EncoderModel(UMT5Config(**json.loads(text_json)))
        try:
            vae = sum(p.numel() for p in AutoencoderKLWan(**json.loads(vae_json)).parameters())
        except TypeError:
            vae = 0  # another VAE (the toy world's pixel VAE)
    return {"text_encoder": sum(p.numel() for p in text.parameters()), "vae": vae}


def tokens_per_sample(cfg) -> int:
    _, frames, height, width = latent_shape(
        cfg.model.arch_vae, cfg.render.height, cfg.render.width, cfg.render.num_frames
    )
    p_t, p_h, p_w = cfg.model.arch_transformer["patch_size"]
    return (frames // p_t) * (height // p_h) * (width // p_w)


def activation_bytes(cfg, micro_batch: int, checkpointing: bool, element_bytes: int) -> int:
    """Activations kept for the backward pass of one micro-batch, at their peak.

    Per video token, a Wan block keeps about 22 x dim + 2 x ffn values (norms, q/k/v with their norms and
    rotary, attention out, cross-attention, the FFN). With gradient checkpointing only each block's input
    is kept, plus one block recomputed at a time and, during its backward pass, its FFN's hidden gradient (ffn).
    Per text token, the condition embedder keeps 3 x dim and each block's cross-attention 3 x dim (its keys,
    their norm, its values): every block's without checkpointing, one block's with it. Measured on CPU at
    the tiny and the real 1.3B widths (tests/test_memory.py), within 25%.
    """
    arch = cfg.model.arch_transformer
    dim, layers, tokens = (
        arch["num_attention_heads"] * arch["attention_head_dim"],
        arch["num_layers"],
        tokens_per_sample(cfg),
    )
    per_block = (22 * dim + 2 * arch["ffn_dim"]) * element_bytes + family_for(cfg.model).modulation_bytes_per_token(dim)
    if checkpointing:
        video = layers * dim * element_bytes + per_block + arch["ffn_dim"] * element_bytes
    else:
        video = layers * per_block
    text = cfg.model.max_sequence_length * dim * element_bytes * (3 + 3 * (1 if checkpointing else layers))
    return micro_batch * (tokens * video + text)


def model_state_bytes(
    trained: list[int],
    frozen: list[int],
    setting: TrainSetting,
    zero_cfg: dict,
    nodes: int,
    per_node: int,
    bf16: bool,
    arch: dict,
) -> dict:
    """Per GPU: the trained parameters' model states at their peak (the backward pass, once the optimizer
    has state) and the frozen parameters.

    Without offload these are the bytes DeepSpeed holds, per trained parameter, as measured per rank on
    CPU with two ranks (tests/test_memory.py keeps them honest): ZeRO-0 16; ZeRO-2 bf16 2 + 14/N, fp32
    4 + 16/N (and the hook-free ZeRO-1 that ZeRO-2 becomes with one process, N = 1, alike); ZeRO-3 bf16
    16/N, fp32 20/N for a partitioned tensor, and bf16 4 + 12/N, fp32 8 + 12/N for one under
    stage3_param_persistence_threshold, which every rank keeps whole, plus the reduce bucket.
    DeepSpeed's own estimators (used with offload) also count a 4-byte gradient copy per parameter that
    it no longer holds at the peak.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus, width = nodes * per_node, 2 if bf16 else 4
    threshold = int(zero_cfg.get("stage3_param_persistence_threshold", 100000))
    kept = sum(n for n in trained if n < threshold)  # ZeRO-3 keeps these whole on every rank
    total = sum(trained)
    if setting.offload and setting.zero == 3:
        _, states, _ = estimate_zero3_model_states_mem_needs(
            total, min(largest_layer(arch), total), per_node, nodes, True, True, True, 1.0
        )
    elif setting.offload:
        _, states = estimate_zero2_model_states_mem_needs(total, per_node, nodes, True, 1.0)
    elif setting.zero == 0:
        states = 16 * total
    elif setting.zero == 3:
        whole, split = (4, 16) if bf16 else (8, 20)
        states = whole * kept + 12 * kept / gpus + split * (total - kept) / gpus
        states += int(zero_cfg.get("reduce_bucket_size", 500_000_000)) * width  # the contiguous gradient bucket
    else:
        states = (2 + 14 / gpus) * total if bf16 else (4 + 16 / gpus) * total
    frozen_bytes = sum(frozen) * width
    if setting.zero == 3:
        small = sum(n for n in frozen if n < threshold)
        frozen_bytes = (small + (0 if setting.offload else (sum(frozen) - small) / gpus)) * width
    return {"model_states": int(states), "frozen_parameters": int(frozen_bytes)}


def plan_training(cfg, setting: TrainSetting, nodes: int, per_node: int, zero_cfg: dict | None = None) -> dict:
    """Bytes per GPU of stage 4 under `setting`."""
    arch, tc, family = cfg.model.arch_transformer, cfg.train, family_for(cfg.model)
    bf16 = tc.precision == "bf16"
    if zero_cfg is None:  # a shipped config of that ZeRO stage (ZeRO-0 has none: nothing to read)
        shipped = DS_CONFIGS.get((setting.zero, setting.offload))
        zero_cfg = ds_file(shipped) if shipped else {"stage": setting.zero}
    targets = list(tc.lora_targets or family.lora_targets)
    trained, frozen = parameter_sizes(arch, setting.mode, targets, tc.lora_rank)
    params, trainable = sum(trained) + sum(frozen), sum(trained)
    parts = model_state_bytes(trained, frozen, setting, zero_cfg, nodes, per_node, bf16, arch)
    parts["activations"] = activation_bytes(cfg, setting.micro_batch, setting.checkpointing, 2 if bf16 else 4)
    if setting.validation:  # validation: the VAE (rank 0) and the family's other transformers, frozen
        others = len(family.components) - 1
        parts["validation_models"] = others * params * 2 + component_parameters(cfg)["vae"] * 4
    if tc.anchor_weight > 0:  # the frozen anchor transformer, whole on every rank, in the compute dtype
        parts["anchor_model"] = params * (2 if bf16 else 4)
    parts["reserved"] = RESERVED
    return {
        "setting": asdict(setting),
        "bytes": parts,
        "total": sum(parts.values()),
        "parameters": params,
        "trainable": trainable,
    }


def alternatives(setting: TrainSetting) -> list[tuple[float, TrainSetting]]:
    """Every setting within reach, with a cost: the slowdown or change of method it brings."""
    micros = sorted({m for m in (setting.micro_batch, 4, 2, 1) if setting.micro_batch % m == 0}, reverse=True)
    found = []
    choices = itertools.product(DS_CONFIGS, (False, True), ("full", "lora"), micros, (True, False))
    for (zero, offload), checkpointing, mode, micro, validation in choices:
        if (mode == "full" and setting.mode == "lora") or (validation and not setting.validation):
            continue  # never suggest more than asked
        cost = (
            (zero > setting.zero) * 1.0
            + (offload and not setting.offload) * 3.0
            + (checkpointing and not setting.checkpointing) * 1.0
            + (mode != setting.mode) * 10.0  # LoRA instead of full changes the method: the last resort
            + (setting.micro_batch // micro - 1) * 0.5
            + (setting.validation and not validation) * 0.5  # no validation videos while training
        )
        found.append((cost, TrainSetting(zero, offload, checkpointing, mode, micro, validation)))
    return sorted(found, key=lambda c: c[0])


def asked_setting(cfg, ds_config: dict) -> TrainSetting:
    """The setting stage 4's flags and DeepSpeed config ask for."""
    tc = cfg.train
    zero, offload = ds_zero(ds_config)
    return TrainSetting(
        zero,
        offload,
        tc.gradient_checkpointing,
        tc.mode,
        tc.micro_batch_size,
        tc.sample_every > 0,
    )


def train_plan(cfg, ds_config: dict, nodes: int, per_node: int, gpu_mem_gib: float) -> dict:
    """The asked setting's plan and verdict; when it does not fit, the cheapest setting that does."""
    asked = asked_setting(cfg, ds_config)
    plan = plan_training(cfg, asked, nodes, per_node, ds_config.get("zero_optimization", {}))
    limit = int(gpu_mem_gib * GIB)
    plan |= {"stage": "stage4", "gpu_bytes": limit, "gpus": nodes * per_node, "fits": plan["total"] <= limit}
    plan["headroom"] = limit - plan["total"]
    if not plan["fits"]:
        for _, setting in alternatives(asked):
            candidate = plan_training(cfg, setting, nodes, per_node)
            if candidate["total"] <= limit:
                plan["fitting"] = candidate | {"flags": setting.flags(DS_CONFIGS[setting.zero, setting.offload])}
                break
    return plan


def render_plan(cfg, nodes: int, per_node: int, gpu_mem_gib: float) -> dict:
    """Bytes per GPU of stage 2: the frozen models, the sampler's peak, and the VAE decode (tiled or not)."""
    m, r, family = cfg.model, cfg.render, family_for(cfg.model)
    weight = 2 if m.dtype in ("bfloat16", "float16") else 4
    arch = m.arch_transformer
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    components = component_parameters(cfg)
    models = {
        "transformers": len(family.components) * transformer_parameters(arch) * weight,
        "text_encoder": components["text_encoder"] * weight,
        "vae": components["vae"] * weight,
    }
    guidance = 2 if r.guidance_scale > 1 else 1
    sampling = r.batch_size * guidance * tokens_per_sample(cfg) * (arch["ffn_dim"] + 4 * dim) * weight
    # The decoder's widest activations: a few tensors of base_dim channels over 4 frames at full size.
    base_dim = m.arch_vae.get("decoder_base_dim") or m.arch_vae.get("base_dim", 96)
    tile = (256 * 256) if r.vae_tiling else r.height * r.width
    decode = 12 * base_dim * 4 * min(tile, r.height * r.width) * weight * (1 if r.vae_slicing else r.batch_size)
    decode += r.batch_size * r.num_frames * r.height * r.width * 3 * (4 + 1)  # the decoded videos, float and uint8
    held = max(models.values()) if r.cpu_offload else sum(models.values())  # offload: one model on the GPU at a time
    # Sampling and the decode come one after the other: the larger of the two is the peak.
    peak = "sampling" if sampling >= decode else "vae_decode"
    parts = {"models": held, f"{peak} (peak)": max(sampling, decode), "reserved": RESERVED}
    total = sum(parts.values())
    limit = int(gpu_mem_gib * GIB)
    return {
        "stage": "stage2",
        "bytes": parts,
        "models": models,
        "peaks": {"sampling": sampling, "vae_decode": decode, "vae_tiling": r.vae_tiling},
        "total": total,
        "gpu_bytes": limit,
        "gpus": nodes * per_node,
        "fits": total <= limit,
        "headroom": limit - total,
    }


def judge_plan(config, visual_tokens: int, text_tokens: int, batch_size: int, dtype: str, gpu_mem_gib: float) -> dict:
    """Bytes per GPU of stage 3 with a local judge (`config`: its transformers config, e.g. a checkpoint's, or
    LlavaOnevisionConfig() for the class of LLaVA-Video-7B): its weights, counted on the meta device, and the peak
    of one no-grad forward over `batch_size` questions of visual + text tokens (the language model's widest
    layer; the next token's logits only)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    weight = 2 if dtype in ("bfloat16", "float16") else 4
    parameters = sum(p.numel() for p in model.parameters())
    text = config.text_config
    tokens = batch_size * (visual_tokens + text_tokens)
    # a decoder layer holds its input and output, q/k/v and attention output (fused attention: no L x L matrix),
    # and the MLP's gate, up and activated product
    language = tokens * (6 * text.hidden_size + 3 * text.intermediate_size) * weight
    parts = {"weights": parameters * weight, "forward (peak)": language, "reserved": RESERVED}
    total, limit = sum(parts.values()), int(gpu_mem_gib * GIB)
    return {
        "stage": "stage3",
        "bytes": parts,
        "parameters": parameters,
        "tokens_per_question": visual_tokens + text_tokens,
        "total": total,
        "gpu_bytes": limit,
        "gpus": 1,
        "fits": total <= limit,
        "headroom": limit - total,
    }


def size(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:8.2f} MiB"


def describe(plan: dict) -> str:
    """The plan as text, in GiB per GPU (per process, of the machine's memory, on a CPU)."""
    if plan.get("device") == "cpu":
        memory = f"{plan['gpu_bytes'] / GIB:.1f} GiB of this machine's memory for each of {plan['gpus']} processes"
        lines = [f"{plan['stage']} memory plan per process ({memory}; predicted):"]
    else:
        memory = f"{plan['gpus']} GPUs of {plan['gpu_bytes'] / GIB:.0f} GiB"
        lines = [f"{plan['stage']} memory plan per GPU ({memory}; predicted):"]
    for name, value in plan["bytes"].items():
        if isinstance(value, dict):
            continue
        lines.append(f"  {name:<20} {size(value)}")
    lines.append(
        f"  {'total':<20} {size(plan['total'])}: "
        + ("fits" if plan["fits"] else "DOES NOT FIT")
        + f" ({size(plan['headroom']).strip()} headroom)"
    )
    if "fitting" in plan:
        lines.append(
            f"  cheapest setting that fits ({size(plan['fitting']['total']).strip()}): {plan['fitting']['flags']}"
        )
    elif not plan["fits"] and plan["stage"] == "stage4":
        lines.append("  no setting within reach fits: use more GPUs or GPUs with more memory")
    return "\n".join(lines)


def to_json(plan: dict) -> str:
    return json.dumps(plan, indent=1, sort_keys=True)


class MemoryPlanError(UserError):
    """A setting the plan says cannot fit (a user error: exit code 2 with the plan, no traceback)."""


def planned_gpu_memory_gib(model_cfg) -> float:
    """The memory one process may use: model.gpu_mem_gib, else the memory of the GPU this process sees, else (on a
    CPU) the machine's memory shared by this node's processes."""
    if model_cfg.gpu_mem_gib > 0:
        return model_cfg.gpu_mem_gib
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return machine_memory() / GIB / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def device_of(model_cfg) -> dict:
    return {"device": "cpu" if on_cpu(model_cfg) else "gpu"}


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def on_cpu(model_cfg) -> bool:
    return model_cfg.gpu_mem_gib <= 0 and not torch.cuda.is_available()


def enforce(plan: dict, force: bool, log) -> None:
    """Print the plan; refuse, before any compute, a setting it says cannot fit (unless --force)."""
    text = describe(plan)
    if plan["fits"]:
        log.info("%s", text)
    elif force:
        log.warning("%s\n--force: running anyway", text)
    else:
        raise MemoryPlanError(f"{text}\nRefused before any compute; pass --force to run anyway.")


def cluster_shape(world: int) -> tuple[int, int]:
    """(nodes, GPUs per node) of this run, from torchrun's LOCAL_WORLD_SIZE."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, world // per_node), per_node


def check_training_memory(cfg, ds_config: dict, world: int, log) -> None:
    """Stage 4: plan for the GPUs seen (or model.gpu_mem_gib), print it, refuse what cannot fit."""
    plan = train_plan(cfg, ds_config, *cluster_shape(world), planned_gpu_memory_gib(cfg.model))
    enforce(plan | device_of(cfg.model), cfg.model.force, log)


class PeakMemory:
    """The measured peak of a training phase, to put beside the plan. On a GPU: the allocator's peak. On a CPU
    (Linux): the resident set's high-water mark, reset by `start` (so loading the model in another precision
    does not count), above the resident set before the model was built (`__init__`)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.before = 0 if self.cuda else _resident("VmRSS")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.before is not None:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            except OSError:
                self.before = None

    def peak(self) -> dict | None:
        if self.cuda:
            return {"bytes": torch.cuda.max_memory_allocated(), "measured_by": "torch.cuda.max_memory_allocated"}
        high = _resident("VmHWM")
        if self.before is None or high is None:
            return None
        return {"bytes": high - self.before, "measured_by": "resident set high-water mark above the process before"}


def _resident(field: str) -> int | None:
    """A /proc/self/status memory field in bytes (None where there is no /proc)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":")), None)


def training_memory_record(cfg, ds_config: dict, world: int, peak: PeakMemory) -> dict:
    """For the stage-4 manifest: the planned bytes per GPU (less the fixed reserve) and the measured peak."""
    plan = plan_training(cfg, asked_setting(cfg, ds_config), *cluster_shape(world), ds_config.get("zero_optimization"))
    planned = {k: v for k, v in plan["bytes"].items() if k != "reserved"}
    return {"planned": planned, "planned_total": sum(planned.values()), "measured_peak": peak.peak()}


def check_rendering_memory(cfg, world: int, log) -> None:
    """Stage 2: the same for rendering."""
    plan = render_plan(cfg, *cluster_shape(world), planned_gpu_memory_gib(cfg.model))
    enforce(plan | device_of(cfg.model), cfg.model.force, log)


def check_judging_memory(cfg, run, log) -> None:
    """Stage 3 with a local judge: its weights and one batch's forward at the tokens its reader gives a clip of
    stage 2's size, refused before the judge loads. The question stands in as 48 words."""
    gib = planned_gpu_memory_gib(cfg.model)
    if cfg.score.judge not in ("transformers", "tiny"):
        return
    import numpy as np
    from transformers import AutoConfig

    from gigavideo.judges.inputs import reader_for
    from gigavideo.judges.judge import clip_fps, judge_path
    from gigavideo.rundir.layout import read_manifest

    folder = judge_path(cfg.score, run)
    config = AutoConfig.from_pretrained(str(folder))
    reader = reader_for(folder, config, cfg.score.num_frames, clip_fps(run), cfg.score.judge_input)
    shape = read_manifest(run, "stage2").get("render") or cfg.render
    clip = np.zeros((shape["num_frames"], shape["height"], shape["width"], 3), dtype=np.uint8)
    tokens = reader.inputs([(clip, " ".join(["word"] * 48))])["input_ids"].shape[1]
    visual = reader.describe()["visual_tokens_per_question"]
    plan = judge_plan(config, visual, tokens - visual, cfg.score.batch_size, cfg.score.dtype, gib)
    enforce(plan | device_of(cfg.model), cfg.model.force, log)
