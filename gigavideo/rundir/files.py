"""Atomic writes: a file or folder appears complete under its name, or not at all. Disk space: what a
stage still needs, and the one-line message when the disk or the quota is full."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from gigavideo.errors import UserError

log = logging.getLogger("gigavideo")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_still_to_write: dict[str, int | None] = {}  # directory a stage writes -> bytes it estimates are still to come


def write_atomic(
    target: Path, write: Callable[[Path], object], tmp_dir: Path | None = None, keep_existing: bool = False
) -> Path:
    """Run write(tmp) on a temporary path, then rename it onto target, so a killed run never leaves half of it.

    tmp_dir: where the temporary lives (default: beside target). keep_existing: a target that already
    exists is kept and nothing is written (a model folder that another rank built first).
    """
    target = Path(target)
    if keep_existing and target.exists():
        return target
    tmp_parent = Path(tmp_dir) if tmp_dir is not None else target.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    name = target.name if len(target.name.encode()) <= 120 else hashlib.sha256(target.name.encode()).hexdigest()[:24]
    tmp = tmp_parent / f"{name}.tmp-{socket.gethostname()[:40]}-{os.getpid()}"
    _remove(tmp)
    write(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        _remove(tmp)
        if not (keep_existing and target.exists()):  # else another rank got there first
            raise
    return target


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def writing_to(directory: Path) -> None:
    """A stage writes here: where a disk-full error happened when the error does not say."""
    _still_to_write.setdefault(str(directory), None)


def check_space(
    directory: Path, samples_written: int, bytes_written: int, samples_left: int, stage: str, warn: bool
) -> None:
    """From the samples written so far, estimate what the rest needs (for the disk-full message); with `warn`,
    say so when the filesystem cannot hold it."""
    if samples_written <= 0:
        return
    needed = int(bytes_written / samples_written * samples_left)
    _still_to_write[str(directory)] = needed
    free = shutil.disk_usage(directory).free
    if warn and needed > free:
        log.warning(
            "%s: the %d samples still to write need about %s (%s each, from the first %d), but only %s are free "
            "on %s: free space now, or the stage stops when the disk fills (a rerun then resumes)",
            stage,
            samples_left,
            size(needed),
            size(bytes_written / samples_written),
            samples_written,
            size(free),
            directory,
        )


class DiskFull(OSError):
    """A write that failed for want of space, where the library's own error does not say so (torch's writer);
    `what` names what was being written."""

    def __init__(self, what: str, directory: Path):
        super().__init__(errno.ENOSPC, "No space left on device", str(Path(directory) / "-"))
        self.what = what


def expect_to_write(directory: Path, nbytes: int) -> None:
    """About `nbytes` are to be written under directory (for the disk-full message)."""
    _still_to_write[str(directory)] = int(nbytes)


def disk_full_message(err: OSError, run_dir: Path) -> str:
    """One line for a full disk or quota: where, how much is free, and what is still to write (if known)."""
    written = [Path(d) for d in _still_to_write if Path(d).resolve().is_relative_to(Path(run_dir).resolve())]
    where = Path(err.filename).parent if err.filename else (written[-1] if written else Path(run_dir))
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    known = [n for n in (_still_to_write[str(d)] for d in written) if n is not None]
    still = f", about {size(sum(known))} still to write" if known else ""
    kind = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on the device"
    what = f" {err.what}" if getattr(err, "what", None) else ""
    return (
        f"{kind} writing{what} under {where} ({size(free)} free{still}). Everything complete is kept; free space "
        "and rerun the same command to resume."
    )


def read_text_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of each non-empty line of a UTF-8 text file (an input the user gives); a UserError
    names the file and the line of a byte that is not UTF-8."""
    lines = []
    for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise UserError(
                f"{path} line {number}: byte {raw[err.start]:#04x} at column {err.start + 1} is not UTF-8 text"
            ) from None
        if text:
            lines.append((number, text))
    return lines


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty line of a JSONL file; a UserError names the file and the line of
    one that is not a JSON object or lacks a `required` key."""
    rows = []
    for number, text in read_text_lines(path):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict) or any(k not in row for k in required):
            has = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"{path} line {number}: needs {', '.join(required)} (has {has})")
        rows.append((number, row))
    return rows


def read_json_file(path: str | Path):
    """A JSON file the user gives (a DeepSpeed config, a model's config.json); a UserError names the file and line
    where it does not parse."""
    try:
        return json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UserError(f"{path}{where}: not valid JSON ({getattr(err, 'msg', err)})") from None


def read_toml(path: str | Path) -> dict:
    """A TOML file the user gives (a preset, a dimension); a UserError names the file and line where it does not
    parse."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
