"""Print the peak bytes of the tensors one training micro-step creates (its activations, their gradients and
every temporary), against the planner's activation figure: stage 4's own model (gigavideo/train/trainer.py's
build_model, from RUN_DIR's base) at the preset's video shape and micro-batch, in the training precision.

    python tests/measure_activations.py RUN_DIR --config=PRESET   -> {"measured": N, "planned": M, "tokens": T}

Each tensor an operator creates is counted from its creation until its storage is freed (a dispatch mode
with weak references), so the figure does not depend on the allocator. The parameters' gradients, which the
plan counts among the model states, are taken off.
"""

import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parent.parent


class LiveTensorBytes(TorchDispatchMode):
    """The live and the peak bytes of storages created by operators under this mode (views of existing
    storages, such as a weight's transpose, are not new memory)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.counted = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or pointer in inputs or pointer in self.counted:
                continue
            self.counted.add(pointer)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self.freed, pointer, size)
        return out

    def freed(self, pointer: int, size: int) -> None:
        self.live -= size
        self.counted.discard(pointer)


def main(run_dir: str, *flags: str):
    from gigavideo.distributed import import_deepspeed
    from gigavideo.train import trainer as train

    import_deepspeed()  # with the CPU accelerator where there is no CUDA device

    from gigavideo.config import load_config
    from gigavideo.memory import activation_bytes, tokens_per_sample
    from gigavideo.models.families import family_for
    from gigavideo.models.pipeline import latent_shape
    from gigavideo.train.loss import batch_loss

    overrides = dict(f.lstrip("-").split("=", 1) for f in flags)
    preset = overrides.pop("config", "tiny")
    cfg = load_config(preset, "train", overrides)
    family = family_for(cfg.model)
    bf16 = cfg.train.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = train.build_model(cfg, Path(run_dir) / "models" / "base", family, family.experts()[0]).to(dtype)
    batch = int(cfg.train.micro_batch_size)
    r = cfg.render
    z0 = torch.randn(batch, *latent_shape(cfg.model.arch_vae, r.height, r.width, r.num_frames))
    embeds = torch.randn(batch, cfg.model.max_sequence_length, cfg.model.arch_transformer["text_dim"])
    t = torch.full((batch,), 0.5)
    with LiveTensorBytes() as live:
        loss, _ = batch_loss(
            model, z0, embeds, torch.ones(batch), t, torch.randn_like(z0), dtype, family.transformer_timestep(t, z0)
        )
        loss.backward()
    gradients = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    planned = activation_bytes(cfg, batch, bool(cfg.train.gradient_checkpointing), 2 if bf16 else 4)
    measured = live.peak - gradients
    print(json.dumps({"measured": measured, "planned": planned, "tokens": tokens_per_sample(cfg)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
