"""Run under torchrun: build stage 4's engine (gigavideo/train/trainer.py's build_engine) for the tiny preset
and print, per rank, the bytes of every live tensor at the peak of the second step (its backward pass,
with the optimizer's state from the first), less what was there before the model (JSON, one line per rank).

    python -m torch.distributed.run --nproc_per_node=2 tests/measure_model_states.py RUN_DIR --ds_config=...
"""

import gc
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def live_bytes() -> int:
    import torch

    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and not obj.is_meta:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def main(run_dir: str, *flags: str):
    from gigavideo.distributed import import_deepspeed
    from gigavideo.train import trainer as train

    import_deepspeed()  # with the CPU accelerator where there is no CUDA device
    import deepspeed
    import torch
    import torch.distributed as dist

    from gigavideo.config import load_config
    from gigavideo.models.families import family_for
    from gigavideo.train.ds_config import build_ds_config

    deepspeed.init_distributed(dist_backend="gloo")
    overrides = dict(f.lstrip("-").split("=", 1) for f in flags)
    cfg = load_config("tiny", "train", overrides)
    family, base = family_for(cfg.model), Path(run_dir) / "base"
    if dist.get_rank() == 0 and not base.exists():
        family.build_tiny_pipeline().transformer.save_pretrained(base / "transformer")
    dist.barrier()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    latents, embeds = torch.randn(1, 16, 3, 8, 8, dtype=dtype), torch.randn(1, 10, 32, dtype=dtype)
    gc.collect()
    before = live_bytes()
    engine, _ = train.build_engine(
        cfg, base, family, family.experts()[0], build_ds_config(cfg.train, dist.get_world_size())
    )
    for step in range(2):
        out = engine(
            hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds, return_dict=False
        )[0]
        engine.backward(out.float().pow(2).mean())
        del out
        if step == 1:
            gc.collect()
            held = live_bytes() - before - sum(b.numel() * b.element_size() for b in engine.module.buffers())
        engine.step()
    print(json.dumps({"rank": dist.get_rank(), "bytes": held}), flush=True)
    dist.barrier()
    dist.destroy_process_group()  # no collective left in flight at exit


if __name__ == "__main__":
    main(*sys.argv[1:])
