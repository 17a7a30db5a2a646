"""Stage 4's data: stage-2 latents and text embeddings joined with stage-3 rewards by key.

Weights are computed offline, once, before training (the paper's offline reweighting): a
synthetic sample's weight is its reward through the chosen mapping; a real-caption sample's
weight is the realism weight. Synthetic samples without a score are excluded and counted.
"""

from __future__ import annotations

import json
import logging
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from gigavideo.errors import ConfigError, StageFailed
from gigavideo.models.pipeline import pad_prompt_embeds
from gigavideo.rundir.fields import SampleError, SchemaError, array_spec, decode_sample
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json, shard_paths
from gigavideo.seeding import derive_seed
from gigavideo.train.loss import reward_weights

log = logging.getLogger("gigavideo.train.data")


def is_reward(value) -> bool:
    """A judge's reward: a finite number in [0, 1] (P(yes) and the specialists' scores)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def training_weights(run: RunDir, train_cfg: dict) -> tuple[dict[str, float], dict, list[dict]]:
    """key -> loss weight for every stage-2 sample that trains, counts of what was excluded, and the samples
    left out already here for lacking a member or a readable json (SampleError records)."""
    unreadable = []
    renders = index_json(run, "stage2", on_error=lambda err: unreadable.append(err.record()))
    scores = index_json(run, "stage3")
    rewards = {
        k: scores[k]["reward"]
        for k, m in renders.items()
        if m["source"] == "synthetic" and k in scores and scores[k]["status"] == "ok"
    }
    for key, reward in list(rewards.items()):
        if not is_reward(reward):  # never a NaN, negative or text weight in the loss
            del rewards[key]
            reason = f"has reward {str(reward)[:40]!r}, not a number in [0, 1]: refused"
            unreadable.append({"key": key, "shard": "stage3", "member": "json", "reason": reason})
            log.warning("stage-3 sample %r %s", key, reason)
    groups: dict[str, dict[str, float]] = {}
    for k, r in rewards.items():
        group = renders[k]["dimension"] if train_cfg["weight_groups"] == "dimension" else "all"
        groups.setdefault(group, {})[k] = r
    mapping = train_cfg["weight_mapping"], train_cfg["weight_temperature"], train_cfg["weight_threshold"]
    weights = {}
    for group in groups.values():
        weights.update(reward_weights(group, *mapping))
    real = [k for k, m in renders.items() if m["source"] == "real"]
    if train_cfg["realism_weight"] > 0:
        weights.update(dict.fromkeys(real, train_cfg["realism_weight"]))
    synthetic = [k for k, m in renders.items() if m["source"] == "synthetic"]
    stats = {
        "synthetic": len(synthetic),
        "scored": len(rewards),
        "real": len(real),
        "excluded_unscored": len(synthetic) - len(rewards),
        "excluded_real": len(real) if train_cfg["realism_weight"] <= 0 else 0,
        "excluded_undecodable": len(unreadable),
        "mean_synthetic_weight": float(np.mean([weights[k] for k in rewards])) if rewards else None,
        "mean_weight_per_group": {g: float(np.mean([weights[k] for k in ks])) for g, ks in sorted(groups.items())},
    }
    if not weights:
        raise SchemaError(f"nothing to train on in {run.path}: {stats}")
    return weights, stats, unreadable


def _decode(raw: dict, weights: dict, max_sequence_length: int, arrays: dict) -> dict:
    """A training sample, or {"undecodable": what was wrong} when a member cannot be decoded (the schema's
    one decoding path: never unpickled, dtype and shape checked against stage 2's manifest)."""
    try:
        sample = decode_sample(raw, "stage2", arrays)
    except SampleError as err:
        return {"key": raw.get("__key__"), "undecodable": err.record()}
    return {
        "key": sample["__key__"],
        "latents": torch.from_numpy(sample["latents.npy"]),
        "prompt_embeds": torch.from_numpy(pad_prompt_embeds(sample["prompt_embeds.npy"], max_sequence_length)),
        "weight": float(weights[sample["__key__"]]),
        "is_real": sample["json"]["source"] == "real",
    }


def collate(samples: list[dict]) -> dict:
    return {
        "keys": [s["key"] for s in samples],
        "latents": torch.stack([s["latents"] for s in samples]),
        "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),
        "weights": torch.tensor([s["weight"] for s in samples], dtype=torch.float32),
        "is_real": torch.tensor([s["is_real"] for s in samples]),
    }


def decodable_batches(samples, size: int):
    """Full batches of the samples that decode; each batch carries, in "undecodable", the samples left out
    since the previous one. A batch is the same on a replay, so a resumed run skips the same samples. The
    samples left out after the last full batch come last, in a batch with no keys (DataPosition passes them on)."""
    batch, undecodable = [], []
    for sample in samples:
        if "undecodable" in sample:
            undecodable.append(sample["undecodable"])
            continue
        batch.append(sample)
        if len(batch) == size:
            yield collate(batch) | {"undecodable": undecodable}
            batch, undecodable = [], []
    if undecodable:
        yield {"keys": [], "undecodable": undecodable}


def training_loader(run: RunDir, train_cfg: dict, weights: dict, max_sequence_length: int, world_size: int, epoch: int):
    """One epoch of this rank's batches, in an order fixed by (seed, epoch).

    Shards are split over ranks, then over dataloader workers; shard order and a shuffle buffer
    are seeded per epoch, so a resumed run can replay an epoch up to where it stopped.
    """
    shards = shard_paths(run, "stage2")
    workers = train_cfg["num_workers"]
    needed = world_size * max(1, workers)
    if len(shards) < needed:
        raise SchemaError(
            f"stage2 has {len(shards)} shards but {world_size} ranks x {max(1, workers)} workers "
            f"need at least {needed}: rerun stage 2 with a smaller --samples_per_shard, "
            f"or lower --num_workers"
        )
    seed = derive_seed(train_cfg["seed"], "epoch", epoch)
    arrays = array_spec(read_manifest(run, "stage2"))
    dataset = (
        wds.WebDataset(
            shards,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            shardshuffle=len(shards),
            seed=seed,
            empty_check=False,
            handler=stop_at_a_cut,
        )
        .select(lambda s: s["__key__"] in weights)
        .shuffle(train_cfg["shuffle_buffer"], seed=seed)
        .map(partial(_decode, weights=weights, max_sequence_length=max_sequence_length, arrays=arrays))
        .compose(partial(decodable_batches, size=train_cfg["micro_batch_size"]))
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def stop_at_a_cut(exn: Exception) -> bool:
    """webdataset's handler: a shard cut short is read up to the cut (training_weights has named and counted what
    it lost); any other error is raised."""
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return False  # this shard ends here; the next one is read
    raise exn


class DataPosition:
    """Where a rank is in its data: (epoch, batches taken in that epoch); saved in every checkpoint."""

    def __init__(self, make_loader, epoch: int = 0, batches: int = 0):
        self.make_loader, self.epoch, self.batches = make_loader, epoch, batches
        self._iter = self._open(skip=batches)

    def _open(self, skip: int):
        it = iter(self.make_loader(self.epoch))
        for _ in range(skip):  # replay the epoch up to the saved position
            next(it)
        return it

    def next(self) -> dict:
        """The next full batch, into the next epoch where this one has ended; the samples left out at an epoch's
        end (after its last full batch) ride on it, so that every one is named and counted."""
        left_out, opened = [], False
        while True:
            for batch in self._iter:
                self.batches += 1
                if batch["keys"]:
                    return batch | {"undecodable": left_out + batch["undecodable"]}
                left_out += batch["undecodable"]
            if opened:
                raise RuntimeError("this rank's shards gave no full batch; lower --micro_batch_size")
            self.epoch, self.batches, opened = self.epoch + 1, 0, True
            self._iter = self._open(skip=0)

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}


def check_latents(run, base: Path) -> None:
    """The stage-2 latents must live in the base VAE's latent space (same channels and statistics)."""
    stored = read_manifest(run, "stage2").get("latents")
    vae = json.loads((base / "vae" / "config.json").read_text())
    if stored and (stored["latents_mean"], stored["latents_std"]) != (vae["latents_mean"], vae["latents_std"]):
        raise ConfigError(
            f"{run.stage('stage2')} holds latents of a {stored['channels']}-channel VAE with other statistics than "
            f"the base model's VAE ({base / 'vae'}, {len(vae['latents_mean'])} channels): stage 2 was rendered "
            "with another model. Render again with this preset (stage 2 --overwrite) or train with that model's."
        )


def check_scored(stage3: dict, run) -> None:
    """Rewards are the method: a stage 3 that scored nothing (its judge server was down, say) trains nothing."""
    failed = stage3.get("samples_failed", len(stage3.get("failures", [])))
    if stage3["num_samples"] - failed <= 0:
        raise StageFailed(
            f"{run.manifest('stage3')}: stage 3 scored none of its {stage3['num_samples']} samples, so there is no "
            "reward to train on; fix the judge and run stage 3 again (--overwrite)"
        )
