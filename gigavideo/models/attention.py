"""The attention kernel every transformer runs with: `model.attention_backend`, through diffusers' dispatcher.

diffusers routes each attention call by the name set with `transformer.set_attention_backend(name)`. This
module checks a name against the device, the dtype and what is installed before any compute, resolves
`auto`, sets it on every transformer of a pipeline or stage 4, and reads back what a model really has
registered (which is what the manifests record: kernels can change the bits of the output).

`auto` takes the first of AUTO_ORDER that can run here. The order is the kernels' published speed on
Hopper and Ampere, fastest first; `bash bench/gpu_check.sh` times each on the GPU it runs on (docs/attention.md:
Attention backends). SageAttention is never chosen by `auto`: it quantizes Q and K to int8, so it changes
the outputs more than a rounding; name it to use it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from gigavideo.config import ConfigError

log = logging.getLogger("gigavideo.models.attention")


@dataclass(frozen=True)
class Backend:
    install: str = ""  # what provides it, as a pip line ("" = torch itself)
    module: str = ""  # the module that must import
    cuda: bool = False  # needs a CUDA device
    half: bool = False  # needs bf16 or fp16 inputs
    capability: tuple[int, int] = (0, 0)  # the least CUDA compute capability
    hopper_only: bool = False


BACKENDS = {
    "native": Backend(),  # torch's scaled_dot_product_attention, which picks its own kernel
    "_native_cudnn": Backend(cuda=True, half=True, capability=(8, 0)),  # torch's cuDNN attention
    "_native_flash": Backend(cuda=True, half=True, capability=(8, 0)),  # torch's built-in FlashAttention-2
    "_native_efficient": Backend(cuda=True),  # torch's memory-efficient attention
    "_native_math": Backend(),  # torch's reference math kernel: slowest, on any device
    "flash": Backend("pip install 'flash-attn>=2.6.3' --no-build-isolation", "flash_attn", True, True, (8, 0)),
    "_flash_3": Backend(
        "FlashAttention-3: build flash-attention/hopper from source (github.com/Dao-AILab/flash-attention)",
        "flash_attn_interface",
        True,
        True,
        (9, 0),
        hopper_only=True,
    ),
    "xformers": Backend("pip install xformers==0.0.35 --no-deps", "xformers", cuda=True),
    "sage": Backend("pip install 'sageattention>=2.1.1'", "sageattention", True, True, (8, 0)),
}
AUTO_ORDER = ("_flash_3", "flash", "_native_cudnn", "xformers", "native")


def why_not(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend `name` cannot run on this device and dtype (None when it can)."""
    backend = BACKENDS[name]
    if backend.module and importlib.util.find_spec(backend.module) is None:
        return f"its package is not installed ({backend.install})"
    if backend.cuda and device.type != "cuda":
        return f"it needs a CUDA GPU (this run is on {device.type})"
    if backend.half and dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bfloat16 or float16 (this run computes in {str(dtype).removeprefix('torch.')})"
    if backend.cuda:
        have = torch.cuda.get_device_capability(device)
        if have < backend.capability or (backend.hopper_only and have[0] != 9):
            need = "9.0 (Hopper)" if backend.hopper_only else "{}.{} or newer".format(*backend.capability)
            return f"it needs a GPU of compute capability {need}; this one is {have[0]}.{have[1]}"
    return None


def resolve(name: str, device, dtype) -> str:
    """The backend to run: `name` itself once checked, or for `auto` the first of AUTO_ORDER that can run.
    A ConfigError, before any compute, for a name that is unknown or cannot run here."""
    device, dtype = torch.device(device), _dtype(dtype)
    if name == "auto":
        return next(n for n in AUTO_ORDER if why_not(n, device, dtype) is None)
    if name not in BACKENDS:
        raise ConfigError(f"model.attention_backend={name!r}: not one of auto, {', '.join(BACKENDS)}")
    reason = why_not(name, device, dtype)
    if reason:
        raise ConfigError(f"model.attention_backend={name!r} cannot run here: {reason}")
    return name


def use(models, name: str, device, dtype) -> str:
    """Resolve `name` and set it on every transformer in `models`; returns the backend they now run."""
    chosen = resolve(name, device, dtype)
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    previous = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # its "experimental feature" warning, once per call
    try:
        for model in models:
            model.set_attention_backend(chosen)
    except RuntimeError as err:  # diffusers' own check (e.g. a package version too old)
        raise ConfigError(f"model.attention_backend={chosen!r}: {err}") from err
    finally:
        diffusers_logger.setLevel(previous)
    log.info("attention backend: %s%s", chosen, " (auto)" if name == "auto" else "")
    return chosen


def pipeline_transformers(pipe) -> list:
    """The pipeline's transformers: `transformer`, and `transformer_2` where the family has a second expert."""
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


def registered_in(models) -> str:
    """The one backend all of `models` run (their `registered`); an error if they differ."""
    values = {registered(m) for m in models}
    if len(values) != 1:
        raise RuntimeError(f"the pipeline's transformers run different attention backends: {sorted(values)}")
    return values.pop()


def registered(model) -> str:
    """The backend `model`'s attention processors are set to; "unset" where set_attention_backend never ran
    (diffusers then uses whichever backend was last set anywhere in the process)."""
    from diffusers.models.attention import AttentionModuleMixin

    names = {
        getattr(module.processor, "_attention_backend", None)
        for module in model.modules()
        if isinstance(module, AttentionModuleMixin)
    }
    values = {getattr(n, "value", n) or "unset" for n in names}
    if len(values) != 1:
        raise RuntimeError(f"{type(model).__name__}: its attention layers run different backends: {sorted(values)}")
    return values.pop()


def _dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
