"""Captions of real videos, kept paired with their videos (stage 4's realism constraint): from a registered source
("wds:SHARDS", "procedural:N") or a JSONL/CSV file; a caption without a decodable video is dropped and named."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from gigavideo.errors import UserError
from gigavideo.registry import resolve
from gigavideo.rundir.files import read_jsonl, read_text_lines
from gigavideo.rundir.shards import iter_shard
from gigavideo.rundir.video import VideoError, decode_mp4

log = logging.getLogger("gigavideo.stage1")


def webdataset_pairs(shards: str, cfg):
    """`wds:SHARDS`: brace-expanded shards whose samples hold an mp4 and a caption (txt, or json's caption)."""
    import braceexpand

    for url in braceexpand.braceexpand(shards):
        for sample in iter_shard(url):
            caption = sample.get("txt") or (sample.get("json") or {}).get("caption")
            yield caption, sample.get("mp4"), f"{url}:{sample['__key__']}"


# real_captions = "NAME:ARGUMENT" names a source; anything else is a JSONL/CSV file.
REAL_CAPTION_SOURCES = {"wds": webdataset_pairs, "procedural": "gigavideo.toy.real_videos:caption_pairs"}


def real_caption_pairs(spec: str, cfg):
    """(caption, mp4 bytes or None, origin) from a registered source ("wds:SHARDS" ...) or a JSONL/CSV file."""
    name, _, argument = spec.partition(":")
    if argument and name in REAL_CAPTION_SOURCES:
        yield from resolve(REAL_CAPTION_SOURCES, name, "real-caption source")(argument, cfg)
        return
    path = Path(spec)
    for _, row in caption_rows(path):
        video = (path.parent / row["video"]).resolve()
        yield row["caption"], video.read_bytes() if video.is_file() else None, str(video)


def caption_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, {caption, video, ...}) of a JSONL or CSV file; a UserError names the file and line of a bad one."""
    if path.suffix != ".csv":
        rows = read_jsonl(path, ("caption", "video"))
    else:
        text = "\n".join(line for _, line in read_text_lines(path))  # checks the encoding, line by line
        reader = csv.DictReader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
        for number, row in rows:
            if not row.get("caption") or not row.get("video"):
                raise UserError(f"{path} line {number}: needs caption and video (has {sorted(k for k in row if k)})")
    for number, row in rows:
        if not isinstance(row["caption"], str) or not isinstance(row["video"], str):
            raise UserError(f"{path} line {number}: caption and video must be text")
    return rows


def real_samples(cfg, limit: int | None, failures: list):
    kept = 0
    for i, (caption, data, origin) in enumerate(real_caption_pairs(cfg.prompts.real_captions, cfg)):
        if limit is not None and kept >= limit:
            return
        key = f"real-{i:06d}"
        try:
            if not caption or not str(caption).strip():
                raise VideoError(f"{origin}: empty caption")
            if len(str(caption)) > cfg.prompts.real_caption_max_chars:
                log.warning("dropping real caption %s: %d characters (%s)", key, len(str(caption)), origin)
                raise VideoError(f"{origin}: caption over real_caption_max_chars")
            if data is None:
                raise VideoError(f"{origin}: no video found")
            frames, _ = decode_mp4(data, origin)  # verify now: a bad real video is dropped here, not in stage 4
            if len(frames) < 2:
                raise VideoError(f"{origin}: a still image ({len(frames)} frame), not a video")
        except VideoError as err:
            log.warning("dropping real caption %s: %s", key, err)
            failures.append({"key": key, "reason": str(err)})
            continue
        kept += 1
        yield {
            "__key__": key,
            "real.mp4": data,
            "json": {
                "prompt": str(caption).strip(),
                "question": "",
                "dimension": "real",
                "source": "real",
                "lineage": {"video": origin},
                "generator": {"engine": "real_captions"},
            },
        }
