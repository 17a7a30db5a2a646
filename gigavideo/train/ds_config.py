"""DeepSpeed config files with "auto" fields filled from the training flags, checked before any compute."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gigavideo.config import REPO_ROOT
from gigavideo.errors import ConfigError
from gigavideo.rundir.files import read_json_file
from gigavideo.train.batch import plan_batch

log = logging.getLogger("gigavideo.train.ds_config")


def build_ds_config(train_cfg: dict, world_size: int) -> dict:
    """Fill micro batch, accumulation, global batch (gigavideo/train/batch.py) and bf16 from flags; a value the file
    fixes must agree."""
    path = Path(train_cfg["ds_config"])
    path = path if path.is_absolute() or path.is_file() else REPO_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (see ds_configs/)")
    ds = read_json_file(path)
    plan = plan_batch(train_cfg, world_size)
    wanted = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch_size,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif int(ds[key]) != value:
            raise ConfigError(
                f"{path}: {key}={ds[key]} but the flags give {value} (global batch_size={plan.global_batch_size} = "
                f"{world_size} processes x micro_batch_size={plan.micro_batch_size} x accumulation "
                f'{plan.grad_accum}); set it to "auto" or change the flags'
            )
    bf16 = train_cfg["precision"] == "bf16"
    if train_cfg["precision"] not in ("fp32", "bf16"):
        raise ConfigError(f"precision {train_cfg['precision']!r} not in ('fp32', 'bf16')")
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    elif bool(ds["bf16"]["enabled"]) != bf16:
        raise ConfigError(
            f"{path}: bf16.enabled={ds['bf16']['enabled']} contradicts --precision={train_cfg['precision']}"
        )
    params = ds.get("optimizer", {}).get("params", {})
    for key, flag in (("lr", "lr"), ("weight_decay", "weight_decay")):
        if params.get(key) == "auto":
            params[key] = float(train_cfg[flag])
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: fp16 is not supported for Wan training; use bf16")
    return fixed_cost_settings(ds, world_size, on_cpu=not torch.cuda.is_available())


def fixed_cost_settings(ds: dict, world_size: int, on_cpu: bool) -> dict:
    """ZeRO-2 settings that cost time per step and buy nothing here, dropped (bench/train_step.py measures
    it; the updates and the bytes held are the same, bit for bit):
    - one process has nothing to partition or reduce: ZeRO-2's per-parameter gradient hooks and bucket
      copies cost about 10% of a small model's step, and ZeRO-1 without overlap or contiguous gradients
      installs no hooks (its checkpoints convert with zero_to_fp32 alike);
    - on CPU, contiguous gradients (a copy of every gradient into one buffer, against fragmentation of the
      GPU's caching allocator) only cost a copy, and overlapping communication needs the GPU's streams (on
      CPU it leaves asynchronous all-reduces in flight that have crashed a process at exit).
    ZeRO-3 on CPU with several processes drops overlapping communication too (the same crash at exit). A config
    with offload keeps what it asks for."""
    zero = ds.get("zero_optimization", {})
    offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
    if zero.get("stage") not in (2, 3) or offload:
        return ds
    if zero["stage"] == 2 and world_size == 1:
        log.info("one process: ZeRO-2 runs as ZeRO-1 without gradient hooks (nothing to partition or reduce)")
        zero = zero | {"stage": 1, "overlap_comm": False, "contiguous_gradients": False, "reduce_scatter": False}
    elif on_cpu and world_size > 1:
        zero = zero | {"overlap_comm": False}
        if zero["stage"] == 2:
            zero["contiguous_gradients"] = False
    return ds | {"zero_optimization": zero}
