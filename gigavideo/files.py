"""Atomic writes: a file or folder appears complete under its name, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path


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
    tmp = tmp_parent / f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
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
