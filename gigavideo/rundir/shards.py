"""Shards: writing (NAME.tar.tmp, renamed when complete), reading and joining by key, and the repairs a
resumed rank makes (partial shards discarded, duplicates set aside, failed records dropped)."""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gigavideo.rundir.fields import (
    LINKED,
    NOT_LOADED,
    SampleError,
    SchemaError,
    array_spec,
    decode_sample,
    encode_field,
    validate,
)
from gigavideo.rundir.layout import SET_ASIDE, RunDir, read_manifest

log = logging.getLogger("gigavideo.rundir")


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
    try:
        with tarfile.open(path) as tar:
            keys = dict.fromkeys(name.split(".", 1)[0] for name in tar.getnames())
    except (tarfile.TarError, EOFError) as err:
        raise unreadable_shard(path, err) from None
    return list(keys)


def unreadable_shard(path, err: Exception) -> SchemaError:
    return SchemaError(
        f"shard {path} is truncated or not a tar ({err or type(err).__name__}): its samples after the last readable "
        "one cannot be read; rerun the stage that wrote it with --overwrite"
    )


def completed_keys(stage_dir: Path) -> set[str]:
    done: set[str] = set()
    for path in sorted(Path(stage_dir).glob("*.tar")):
        done.update(shard_keys(path))
    return done


def shard_paths(run: RunDir, stage: str) -> list[str]:
    manifest = read_manifest(run, stage)
    paths = [str(run.stage(stage) / s["name"]) for s in manifest["shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise SchemaError(f"{run.manifest(stage)} lists shard {p}, which is missing")
    return paths


def iter_shard(path: str, fields: Iterable[str] | None = None, keys: set[str] | None = None) -> Iterator[dict]:
    """Samples of one shard, decoded (`decode_sample`); a member that cannot be decoded raises SampleError."""
    for raw in read_shard(path, fields, keys):
        yield decode_sample(raw)


def read_shard(path: str, fields: Iterable[str] | None = None, keys: set[str] | None = None) -> Iterator[dict]:
    """Samples of one shard as bytes per member; a sample's files must be contiguous, as WebDataset requires.

    With `fields`, only those are read; the others are marked NOT_LOADED (their presence still counts).
    With `keys`, only those samples are yielded (the others are skipped unread).
    """
    try:
        yield from _read_members(path, fields, keys)
    except (tarfile.TarError, EOFError) as err:
        raise unreadable_shard(path, err) from None


def _read_members(path: str, fields, keys) -> Iterator[dict]:
    current: dict | None = None
    with tarfile.open(path) as tar:
        for member in tar:
            linked = member.issym() or member.islnk()
            if not member.isfile() and not linked:
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
            if linked:
                current[field] = LINKED
            elif fields is None or field in fields:
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
    manifest = read_manifest(run, stage)
    arrays = array_spec(manifest) if stage == "stage2" else None
    listed = {shard["name"]: shard.get("samples") for shard in manifest["shards"]}
    for path in shard_paths(run, stage):
        read, cut = 0, None
        try:
            for raw in read_shard(path, fields, keys):
                read += 1
                try:
                    sample = decode_sample(raw, stage, arrays)
                except SampleError as err:
                    if on_error is None:
                        raise
                    on_error(err)
                    continue
                yield sample
        except SchemaError as err:
            if isinstance(err, SampleError):
                raise
            cut = err  # the shard is cut short: what it still held was read
        expected = listed.get(Path(path).name) if keys is None else None
        if cut is None and not (expected and read < expected):  # a cut at a member's end reads as a shorter tar
            continue
        lost = f"{expected - read} of its {expected} samples" if expected else "its samples after the cut"
        why = cut or "the tar ends early (truncated)"
        error = SampleError(Path(path).name, path, "(the rest of the shard)", f"{lost} lost: {why}")
        if on_error is None:
            raise SchemaError(str(error))
        on_error(error)


def index_json(
    run: RunDir, stage: str, fields: Iterable[str] | None = ("json",), on_error: Callable | None = None
) -> dict[str, dict]:
    """key -> json record of a stage, reading no other field's content (`on_error`: as iter_samples')."""
    return {s["__key__"]: s["json"] for s in iter_samples(run, stage, fields, on_error=on_error)}
