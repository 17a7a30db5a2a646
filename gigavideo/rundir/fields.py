"""The shard schema: each stage's fields, their encoding and decoding, and the checks on a sample
(required members, known sources, names safe to join into a path)."""

from __future__ import annotations

import io
import json
import logging
import re

import numpy as np

from gigavideo.errors import UserError

log = logging.getLogger("gigavideo.rundir")


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
        if data is LINKED:
            raise SampleError(key, shard, member, "is a symlink or hardlink in the tar, which no stage writes: refused")
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


NOT_LOADED = object()  # a field present in the shard but not read (see `fields`)
LINKED = object()  # a member that is a link: refused when decoded, so that its sample is counted, not lost


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
