#!/usr/bin/env python
"""Write docs/config.md, the configuration reference, from the typed config (gigavideo/config.py): every key of
every section, its default, the values it may take and its help. A test fails when the file is out of date.

    python scripts/config_reference.py            # rewrite docs/config.md
    python scripts/config_reference.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from gigavideo.cli import run_cli
from gigavideo.config import PLUGIN_SECTIONS, SECTIONS, section_class

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config.md"
HEADER = """# Configuration reference

Generated from `gigavideo/config.py` by `python scripts/config_reference.py`; do not edit by hand
(`tests/test_config_and_cli.py` fails when this file is out of date).

A value comes from the key's default, then the preset (`--config=NAME`: `configs/NAME.toml`, which lists only
what it changes), then flags. Every key of a stage's section, and of `[model]`, is a flag of that stage's script
(`--steps=50`); a key of another section is given with its section (`--train.lr=1e-6`). Every value is checked
against its type and the values below before any model is built and before `--overwrite` sets anything aside
(a value that fails later loses nothing either: `--overwrite` keeps the old outputs until the new run completes).
"""


def shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def section_table(name: str) -> list[str]:
    cls = section_class(name)
    lines = [f"## [{name}]", "", (cls.__doc__ or "").strip().split("\n")[0], ""]
    lines += ["| key | default | values | help |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        default = f.default_factory()
        values = str(check) if check else {bool: "true | false"}.get(type(default), type(default).__name__)
        cells = [f"`{f.name}`", f"`{shown(default)}`", values, f.metadata.get("doc", "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, ""]


def reference() -> str:
    lines = [HEADER]
    for name in [*SECTIONS, *PLUGIN_SECTIONS]:
        lines += section_table(name)
    return "\n".join(lines).rstrip() + "\n"


def main(check: bool = False) -> None:
    """Write docs/config.md; --check: exit 1 where it is out of date, writing nothing."""
    text = reference()
    if check:
        if not REFERENCE.is_file() or REFERENCE.read_text() != text:
            print(f"{REFERENCE} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            sys.exit(1)
        return
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    run_cli(main)
