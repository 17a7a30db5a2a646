"""The contract between stages: run-directory layout, shard fields, manifests.

Run directory (RUN_DIR)::

    models/base/              model.kind tiny or toy: the base pipeline (diffusers format), built by the base
                              step (scripts/prepare_base.py); toy: models/base.partial/ while pre-training
    models/judge/             score.judge = tiny: the random-initialised judge
    stage1/  *.tar + manifest.json   prompts (synthetic, and real captions with their real video)
    stage2/  *.tar + manifest.json   renders: mp4, latents, text embeddings
    stage3/  *.tar + manifest.json   judge scores and rewards
    stage4/checkpoints/      DeepSpeed checkpoints (convert with zero_to_fp32.py); stepNNNNNNN_universal: one
                              converted for a resume with another number of ranks (gigavideo/train/checkpoint.py)
    stage4/tensorboard/      TensorBoard events
    stage4/export/           diffusers pipeline folder (full fine-tune)
    stage4/manifest.json     written after the export
    eval/report.json, eval/report.md, eval/videos/{baseline,finetuned}/...

Shards are plain WebDataset tars (`tar tf` lists `KEY.json KEY.mp4 ...`). Every sample has a
stable `__key__` (no dots) shared by all stages, so stages join exactly by key. A shard is
written as `NAME.tar.tmp` and renamed when complete; `manifest.json` is written last and marks
the stage complete. Fields per stage (`*` = optional):

    stage1: json {prompt, dimension, source, question, lineage, generator}, real.mp4* (source=real)
            (stage1/candidates/ holds the engine's raw output per work unit: json {dimension, unit,
            candidates, dropped}; the final prompts are selected from it once every unit is done)
    stage2: json {prompt, dimension, source, question, seed, render, model, seconds},
            mp4 (rendered video, or the real clip at training shape for source=real),
            latents.npy (normalised VAE latents, C,T,H,W), prompt_embeds.npy (tokens, dim; unpadded)
    stage3: json {status: ok|failed, reason, p_yes, answer, reward, judge}  (synthetic samples only; one that
            stage 2 could not give whole fails with reason "sample: ...", under dimension "unreadable")

A manifest is written only when no more than max_failed_fraction of the stage's samples failed (`check_failed`);
stages 2 and 3 record `samples_failed` of `samples_total`. A name read from a shard (a dimension) joins a path
only when it is letters, digits, '_' and '-' (`is_name`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from gigavideo.errors import StageFailed, UserError
from gigavideo.rundir.files import write_json_atomic

log = logging.getLogger("gigavideo.rundir.schema")
STAGES = ("stage1", "stage2", "stage3")
SET_ASIDE = ".set-aside-"  # NAME.set-aside-WHY: kept for inspection, never read by a stage
REQUIRED_FILES = {
    "stage1_units": ("json",),
    "stage1": ("json",),
    "stage2": ("json", "mp4", "latents.npy", "prompt_embeds.npy"),
    "stage3": ("json",),
}
REQUIRED_JSON = {
    "stage1_units": ("dimension", "unit", "candidates", "dropped"),
    "stage1": ("prompt", "dimension", "source", "question", "lineage"),
    "stage2": ("prompt", "dimension", "source", "question", "seed", "render"),
    "stage3": ("status", "reward"),
}
SOURCES = ("synthetic", "real")
MANIFEST = "manifest.json"
PROCESS_STARTED = time.time()  # (about) when this process started: a stage's cost is its processes' wall time
# The script that produces each stage's output, relative to the repository root.
STAGE_SCRIPTS = {
    "base": "scripts/prepare_base.py",
    "stage1": "stage1_prompts/generate.py",
    "stage2": "stage2_render/render.py",
    "stage3": "stage3_score/score.py",
    "stage4": "stage4_train/train.py",
    "eval": "eval/evaluate.py",
}


class SchemaError(UserError):
    """A shard or sample breaks the contract; the message names the key and the shard."""


class SampleError(SchemaError):
    """One member of one sample cannot be decoded (the rest of its shard may be fine): names the key, the shard,
    the member and what was wrong."""

    def __init__(self, key: str, shard: str, member: str, reason: str):
        self.key, self.shard, self.member, self.reason = key, str(shard), member, reason
        self.meta: dict | None = None  # the sample's json where it decoded (e.g. its source, for a missing mp4)
        super().__init__(f"sample {key!r} in {shard}: {member} {reason}")

    def record(self) -> dict:
        return {"key": self.key, "shard": self.shard, "member": self.member, "reason": self.reason}


class StageNotReady(FileNotFoundError):
    pass


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def stage(self, name: str) -> Path:
        return self.path / name

    def manifest(self, name: str) -> Path:
        return self.stage(name) / MANIFEST

    def is_complete(self, name: str) -> bool:
        return self.manifest(name).is_file()

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def checkpoints(self) -> Path:
        return self.path / "stage4" / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "stage4" / "tensorboard"

    @property
    def export(self) -> Path:
        return self.path / "stage4" / "export"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def round(self, number: int) -> RunDir:
        """Round NUMBER of `ROUNDS=N slurm/pipeline.sh`: a run directory of its own inside this one."""
        return RunDir(self.path / f"round{number}")


# ---------------------------------------------------------------- encoding


def encode_field(name: str, value) -> bytes:
    if name.endswith("json"):
        return json.dumps(value, sort_keys=True).encode()
    if name.endswith(".npy"):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return buf.getvalue()
    if name.endswith("txt"):
        return str(value).encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise SchemaError(f"field {name!r}: cannot encode {type(value).__name__}; give bytes")


def decode_sample(raw: dict, stage: str | None = None, arrays: dict | None = None) -> dict:
    """A sample as read from a shard (bytes per member, `__key__`, `__url__`) decoded member by member, then
    validated against `stage`'s schema. The one decoding path of every reader (stages 3 and 4, validation,
    the eval); a member that cannot be decoded raises SampleError. `arrays`: member -> the dtype and shape it
    must have (`array_spec`), checked from the .npy header before any data is read."""
    key, shard = raw.get("__key__", "<no key>"), raw.get("__url__", "?")
    sample = {}
    for member, data in raw.items():
        if member.startswith("__") or data is NOT_LOADED:
            sample[member] = data
        else:
            sample[member] = decode_member(member, data, key, shard, (arrays or {}).get(member))
    try:
        return validate(sample, stage) if stage else sample
    except SampleError as err:
        err.meta = sample["json"] if isinstance(sample.get("json"), dict) else None
        raise


def decode_member(member: str, data: bytes, key: str, shard: str, expect: dict | None = None):
    if member.endswith("json"):
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SampleError(key, shard, member, f"is not valid JSON ({err})") from None
    if member.endswith(".npy"):
        return decode_array(data, key, shard, member, expect)
    if member.endswith("txt"):
        return data.decode(errors="replace")
    return data


def decode_array(data: bytes, key: str, shard: str, member: str, expect: dict | None = None) -> np.ndarray:
    """A .npy member, never unpickled: an object array is refused from its header, as are a dtype or shape other
    than `expect`'s ({"dtype": "float32", "shape": [16, 3, 8, 8]}, None for any length) and a truncated file."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran_order, dtype = read_header[version](buf)
    except (ValueError, KeyError, EOFError) as err:
        raise SampleError(
            key, shard, member, f"is not a readable .npy array ({err or 'unsupported version'})"
        ) from None
    if dtype.hasobject:
        raise SampleError(key, shard, member, "holds Python objects (a pickled array): refused, never unpickled")
    if expect:
        want = np.dtype(expect["dtype"])
        if dtype != want:
            raise SampleError(key, shard, member, f"has dtype {dtype}, the manifest says {want}")
        want_shape = expect["shape"]
        if len(shape) != len(want_shape) or any(w not in (None, s) for s, w in zip(shape, want_shape, strict=False)):
            shown = tuple("any" if w is None else w for w in want_shape)
            raise SampleError(key, shard, member, f"has shape {shape}, the manifest says {shown}")
    need, have = int(np.prod(shape)) * dtype.itemsize, len(data) - buf.tell()
    if have != need:
        what = "is truncated" if have < need else "has bytes past its data"
        raise SampleError(key, shard, member, f"{what}: {have} data bytes, {shape} of {dtype} needs {need}")
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=buf.tell())
    return array.reshape(shape, order="F" if fortran_order else "C").copy()


def stage2_arrays(latent_space: dict, render: dict, text_dim: int) -> dict:
    """What every stage-2 sample's arrays are (stage 2 records it in its manifest): normalised latents
    (C, T, H, W) of a video of the render size, and the prompt's text embeddings (tokens, text_dim), float32."""
    temporal, spatial = latent_space["temporal"], latent_space["spatial"]
    frames = (render["num_frames"] - 1) // temporal + 1
    latents = [latent_space["channels"], frames, render["height"] // spatial, render["width"] // spatial]
    return {
        "latents.npy": {"dtype": "float32", "shape": latents},
        "prompt_embeds.npy": {"dtype": "float32", "shape": [None, int(text_dim)]},
    }


def array_spec(manifest: dict) -> dict:
    """What stage 2's arrays must be, from its manifest: member -> {"dtype", "shape"} (None: any length).
    A manifest from before stage 2 recorded them gets the dtype and the number of dimensions only."""
    if "arrays" in manifest:
        return manifest["arrays"]
    return {
        "latents.npy": {"dtype": "float32", "shape": [None] * 4},
        "prompt_embeds.npy": {"dtype": "float32", "shape": [None, None]},
    }


PATH_NAMES = ("stage1", "stage2", "stage3")  # whose `dimension` later stages join into file names
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # what a name read from a shard must be before it joins a path


def is_name(text) -> bool:
    return isinstance(text, str) and len(text) <= 100 and NAME.fullmatch(text) is not None


def validate(sample: dict, stage: str, where: str = "") -> dict:
    """A sample against its stage's schema; a SampleError (naming the key, the shard and the member) otherwise."""
    key = sample.get("__key__", "<no key>")
    where = where or sample.get("__url__", "?")
    if "." in key or "/" in key or not key:
        raise SampleError(
            key, where, "(its member names)", "give no valid key: keys must be non-empty with no '.' or '/'"
        )
    for field in REQUIRED_FILES[stage]:
        if field not in sample:
            has = sorted(k for k in sample if not k.startswith("__"))
            raise SampleError(key, where, field, f"is missing: {stage} requires it (the sample has {has})")
    meta = sample["json"]
    if not isinstance(meta, dict):
        raise SampleError(key, where, "json", f"is a {type(meta).__name__}, not an object")
    missing = [k for k in REQUIRED_JSON[stage] if k not in meta]
    if missing:
        raise SampleError(key, where, "json", f"lacks {missing} required by {stage}")
    if "source" in meta and meta["source"] not in SOURCES:
        raise SampleError(key, where, "json", f"has source {meta['source']!r}, not one of {SOURCES}")
    if stage in PATH_NAMES and "dimension" in meta and not is_name(meta["dimension"]):
        raise SampleError(
            key,
            where,
            "json",
            f"has dimension {str(meta['dimension'])[:120]!r}, which is not a dimension name "
            "(letters, digits, '_' and '-'; it would become a file name)",
        )
    return sample


# ---------------------------------------------------------------- writing


class ShardWriter:
    """Writes one rank's samples into `PREFIX-NNNNN.tar`, each through a `.tmp` name and a rename."""

    def __init__(self, stage_dir: Path, stage: str, prefix: str, samples_per_shard: int):
        self.dir, self.stage, self.prefix = Path(stage_dir), stage, prefix
        self.samples_per_shard = max(1, int(samples_per_shard))
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.dir.glob(f"{prefix}-*.tar"))
        self.next_index = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in existing), default=-1)
        self._tar = None
        self._count = 0
        self.written: list[str] = []
        self.samples_written, self.bytes_written = 0, 0

    def write(self, sample: dict) -> None:
        validate(sample, self.stage, where=f"{self.dir}/{self.prefix}-*")
        if self._tar is None:
            self._path = self.dir / f"{self.prefix}-{self.next_index:05d}.tar"
            self._tar = tarfile.open(str(self._path) + ".tmp", "w")
        now = time.time()
        for name, value in sorted(sample.items()):
            if name.startswith("__"):
                continue
            data = encode_field(name, value)
            info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes_written += len(data) + 1024  # the member and its tar header (512 B, padded to 512)
        self._count += 1
        self.samples_written += 1
        if self._count >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        """Close the current shard and make it visible under its final name."""
        if self._tar is None:
            return
        self._tar.close()
        os.replace(str(self._path) + ".tmp", self._path)
        self.written.append(self._path.name)
        self._tar, self._count = None, 0
        self.next_index += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.flush()
        elif self._tar is not None:  # never leave a half shard that looks complete
            try:
                self._tar.close()
            except OSError:
                pass  # e.g. the disk is full: the .tmp stays, a rerun discards it; the first error is the one to see


# ---------------------------------------------------------------- resume and manifests


def discard_partial_shards(stage_dir: Path, prefix: str = "") -> list[Path]:
    """Remove `.tmp` shards (of one writer prefix) left by a killed run; their samples are redone."""
    removed = sorted(Path(stage_dir).glob(f"{prefix}*.tar.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.warning(
            "%s: removed %d partial shards of an interrupted run (their samples are redone): %s",
            stage_dir,
            len(removed),
            ", ".join(p.name for p in removed[:5]),
        )
    return removed


def set_aside_duplicates(stage_dir: Path) -> list[str]:
    """Keep one copy of every key: the first in shard order. A shard holding keys that an earlier shard
    holds (two processes wrote them) is set aside as NAME.set-aside-duplicate-keys and, if it holds other
    keys too, written again without the duplicates. Returns one line per shard set aside."""
    seen: set[str] = set()
    notes = []
    for path in sorted(Path(stage_dir).glob("*.tar")):
        keys = shard_keys(path)
        duplicates = {k for k in keys if k in seen}
        seen.update(keys)
        if not duplicates:
            continue
        aside = path.with_name(f"{path.name}{SET_ASIDE}duplicate-keys")
        os.replace(path, aside)
        kept = [k for k in keys if k not in duplicates]
        if kept:
            copy_shard(aside, path, set(kept))
        notes.append(
            f"{path.name}: {len(duplicates)} keys an earlier shard holds set aside as {aside.name}"
            + (f"; its {len(kept)} other keys kept in {path.name}" if kept else "")
        )
        log.warning("%s: %s", stage_dir, notes[-1])
    return notes


def copy_shard(source: Path, target: Path, keys: set[str]) -> None:
    """Write the samples of `source` whose key is in `keys` to `target` (through its .tmp name)."""
    with tarfile.open(source) as src, tarfile.open(str(target) + ".tmp", "w") as dst:
        for member in src:
            if member.name.split(".", 1)[0] in keys:
                dst.addfile(member, src.extractfile(member))
    os.replace(str(target) + ".tmp", target)


def drop_failed_records(stage_dir: Path, prefix: str) -> int:
    """Take the records of status "failed" out of this writer's shards (each rewritten through a .tmp name, or
    removed when nothing else is in it), so that a rerun of an unfinished stage tries those samples again
    (the judge server is back, the cause was fixed). Returns how many were taken out."""
    dropped = 0
    for path in sorted(Path(stage_dir).glob(f"{prefix}-*.tar")):
        records = {s["__key__"]: s.get("json") for s in iter_shard(str(path), ("json",))}
        failed = {k for k, r in records.items() if isinstance(r, dict) and r.get("status") == "failed"}
        if not failed:
            continue
        dropped += len(failed)
        if len(failed) == len(records):
            path.unlink()
        else:
            copy_shard(path, path, set(records) - failed)
    if dropped:
        log.info("%s: %d failed records of an unfinished run are tried again", stage_dir, dropped)
    return dropped


def check_failed(stage: str, failed: list[dict], total: int, max_fraction: float, what: str = "samples") -> None:
    """The rule of every stage: when more than `max_fraction` of its `total` samples (or all of them) failed, the
    stage has failed. A StageFailed names the count and the first failure; the caller writes no manifest, so the
    stage is not taken as done and a rerun tries the failed ones again."""
    if not failed or (len(failed) <= max_fraction * total and len(failed) < total):
        return
    first = failed[0]
    raise StageFailed(
        f"{stage}: {len(failed)} of {total} {what} failed, more than max_failed_fraction = {max_fraction:g} allows; "
        f"the first, {first['key']}: {first['reason']}. No manifest written: fix the cause and rerun (the failed "
        "ones are tried again)."
    )


def set_aside_unreadable_manifest(run: RunDir, stage: str) -> Path | None:
    """A manifest that does not parse (a disk filled while it was written, a copy cut short) is set aside
    as manifest.json.set-aside-unreadable, so that the stage runs again instead of being taken as done."""
    path = run.manifest(stage)
    try:
        if json.loads(path.read_text()).get("stage") == stage:
            return None
    except (OSError, ValueError, AttributeError):
        pass
    aside = path.with_name(f"{path.name}{SET_ASIDE}unreadable")
    os.replace(path, aside)
    log.warning("%s is unreadable: set aside as %s; %s runs again (and resumes)", path, aside.name, stage)
    return aside


def rank_prefix(rank: int) -> str:
    return f"r{rank:05d}"


def resume_rank(stage_dir: Path, rank: int) -> set[str]:
    """Start or resume one rank: drop its partial shards; return the keys already written by any rank.

    A rank touches only its own `.tmp` files, since other ranks may be writing theirs right now.
    """
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    discard_partial_shards(stage_dir, rank_prefix(rank))
    return completed_keys(stage_dir)


def shard_keys(path: Path) -> list[str]:
    """Keys in a complete shard, from the tar listing (no content is read)."""
    with tarfile.open(path) as tar:
        keys = dict.fromkeys(name.split(".", 1)[0] for name in tar.getnames())
    return list(keys)


def completed_keys(stage_dir: Path) -> set[str]:
    done: set[str] = set()
    for path in sorted(Path(stage_dir).glob("*.tar")):
        done.update(shard_keys(path))
    return done


def current_run_id() -> str:
    """Identifies one launch of a stage: torchrun's run id (+ SLURM requeue count), a job array's task, else
    this process."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job, task = os.environ["SLURM_ARRAY_JOB_ID"], os.environ.get("SLURM_ARRAY_TASK_ID", "0")
        return f"array{job}-task{task}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return f"pid{os.getpid()}-{time.time_ns()}"
    return f"{run_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"


_RUN_ID = current_run_id()


def rank_parts(stage_dir: Path, rank: int, world_size: int, info: dict) -> list[dict] | None:
    """Record this rank's result; return every rank's result to exactly one rank once all are in.

    No collective is needed, so ranks may finish hours apart. In one launch (torchrun), parts from an
    earlier launch do not count. The tasks of a SLURM job array are launches of their own (a failed task
    is resubmitted alone), so there every rank's latest part counts. Of the ranks that see all parts,
    only the one that claims the finalize file for that set of parts gets them.
    """
    parts = Path(stage_dir) / "_parts"
    info = {**info, "run_id": _RUN_ID, "process_seconds": round(time.time() - PROCESS_STARTED, 2)}
    write_json_atomic(parts / f"rank{rank:05d}-of-{world_size:05d}.json", info)
    done = [json.loads(p.read_text()) for p in sorted(parts.glob(f"rank*-of-{world_size:05d}.json"))]
    if not _RUN_ID.startswith("array"):
        done = [d for d in done if d.get("run_id") == _RUN_ID]
    if len(done) < world_size:
        return None
    claim = _RUN_ID if not _RUN_ID.startswith("array") else "array-" + "+".join(sorted({d["run_id"] for d in done}))
    claim = claim if len(claim) < 200 else f"array-{hash_text(claim)}"
    try:
        os.close(os.open(parts / f"finalize-{claim}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    return done


def process_seconds(parts: list[dict]) -> float:
    """What a stage cost: the wall time of its processes (of the launch that finished it), summed over ranks;
    with one process per GPU, GPU-seconds."""
    return round(sum(part.get("process_seconds", 0.0) for part in parts), 2)


def hash_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finish_rank(
    stage_dir: Path,
    stage: str,
    rank: int,
    world_size: int,
    info: dict,
    tally: Callable[[list[dict]], tuple[list[dict], int]] | None = None,
    max_failed_fraction: float = 0.5,
) -> bool:
    """Record this rank as done; the rank that finds all ranks done writes the manifest, unless `tally(failures)`
    (-> the stage's failed samples and its total) finds too many failed (`check_failed`: StageFailed).

    Returns True when the manifest was written (the stage is complete).
    """
    parts = rank_parts(stage_dir, rank, world_size, info)
    if parts is None:
        return False
    failures = [f for part in parts for f in part.get("failures", [])]
    counted = {}
    if tally is not None:
        failed, total = tally(failures)
        check_failed(stage, failed, total, max_failed_fraction)
        counted = {"samples_failed": len(failed), "samples_total": total}
    seconds = {r: s for part in parts for r, s in part.get("device_seconds", {}).items()}
    discard_partial_shards(stage_dir)  # every rank of this run is done: any .tmp left is from an older run
    set_aside = set_aside_duplicates(stage_dir)
    write_manifest(
        stage_dir,
        stage,
        {
            **info,
            "failures": failures,
            "world_size": world_size,
            "process_seconds": process_seconds(parts),
            **counted,
            **({"device_seconds": seconds} if seconds else {}),
            **({"set_aside": set_aside} if set_aside else {}),
        },
    )
    return True


def write_manifest(stage_dir: Path, stage: str, info: dict) -> dict:
    shards = [{"name": p.name, "samples": len(shard_keys(p))} for p in sorted(Path(stage_dir).glob("*.tar"))]
    all_keys = Counter(k for p in sorted(Path(stage_dir).glob("*.tar")) for k in shard_keys(p))
    duplicates = sorted(k for k, n in all_keys.items() if n > 1)
    if duplicates:
        raise SchemaError(f"{stage_dir}: keys written more than once: {duplicates[:10]}")
    manifest = {
        "stage": stage,
        "shards": shards,
        "num_samples": sum(all_keys.values()),
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **info,
    }
    write_json_atomic(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(run: RunDir, stage: str) -> dict:
    path = run.manifest(stage)
    if not path.is_file():
        raise StageNotReady(
            f"{stage} has not completed in {run.path} (no {path}); "
            f"run {STAGE_SCRIPTS.get(stage, stage)} --run_dir {run.path} first"
        )
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SchemaError(f"{path} is not readable JSON ({err}); rerun {STAGE_SCRIPTS.get(stage, stage)}") from None


def shard_paths(run: RunDir, stage: str) -> list[str]:
    manifest = read_manifest(run, stage)
    paths = [str(run.stage(stage) / s["name"]) for s in manifest["shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise SchemaError(f"{run.manifest(stage)} lists shard {p}, which is missing")
    return paths


# ---------------------------------------------------------------- reading


NOT_LOADED = object()  # a field present in the shard but not read (see `fields`)


def iter_shard(path: str, fields: Iterable[str] | None = None, keys: set[str] | None = None) -> Iterator[dict]:
    """Samples of one shard, decoded (`decode_sample`); a member that cannot be decoded raises SampleError."""
    for raw in read_shard(path, fields, keys):
        yield decode_sample(raw)


def read_shard(path: str, fields: Iterable[str] | None = None, keys: set[str] | None = None) -> Iterator[dict]:
    """Samples of one shard as bytes per member; a sample's files must be contiguous, as WebDataset requires.

    With `fields`, only those are read; the others are marked NOT_LOADED (their presence still counts).
    With `keys`, only those samples are yielded (the others are skipped unread).
    """
    current: dict | None = None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, field = member.name.partition(".")
            if not key or "/" in key:
                key = member.name  # shown as it is in the tar: validate refuses it, naming the real member
            if keys is not None and key not in keys:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": path}
            if fields is None or field in fields:
                current[field] = tar.extractfile(member).read()
            else:
                current[field] = NOT_LOADED
    if current is not None:
        yield current


def iter_samples(
    run: RunDir,
    stage: str,
    fields: Iterable[str] | None = None,
    keys: set[str] | None = None,
    on_error: Callable[[SampleError], None] | None = None,
) -> Iterator[dict]:
    """Every sample (or those in `keys`) of a stage, decoded (stage 2's arrays checked against its manifest) and
    validated against the stage's schema. A sample that cannot be decoded raises SampleError, or with
    `on_error` is handed to it and skipped, and the rest are read."""
    arrays = array_spec(read_manifest(run, stage)) if stage == "stage2" and run.is_complete(stage) else None
    for path in shard_paths(run, stage):
        for raw in read_shard(path, fields, keys):
            try:
                sample = decode_sample(raw, stage, arrays)
            except SampleError as err:
                if on_error is None:
                    raise
                on_error(err)
                continue
            yield sample


def decode_video(sample: dict, member: str = "mp4") -> np.ndarray:
    """uint8 frames (T, H, W, 3) of a sample's video member; SampleError when it is missing or does not decode."""
    from gigavideo.rundir.video import VideoError, decode_mp4

    key, shard = sample.get("__key__", "<no key>"), sample.get("__url__", "?")
    if member not in sample or sample[member] is NOT_LOADED:
        raise SampleError(key, shard, member, "is missing")
    try:
        frames, _ = decode_mp4(sample[member], member)
    except VideoError as err:
        raise SampleError(key, shard, member, f"does not decode: {str(err).removeprefix(member + ': ')}") from None
    return frames


def index_json(
    run: RunDir, stage: str, fields: Iterable[str] | None = ("json",), on_error: Callable | None = None
) -> dict[str, dict]:
    """key -> json record of a stage, reading no other field's content (`on_error`: as iter_samples')."""
    return {s["__key__"]: s["json"] for s in iter_samples(run, stage, fields, on_error=on_error)}
