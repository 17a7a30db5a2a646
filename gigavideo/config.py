"""One configuration object for every stage: a TOML preset file plus command-line overrides.

A preset (`configs/*.toml`) has one table per concern: `[model]` (shared by all stages),
`[prompts]` (stage 1), `[render]` (stage 2), `[score]` (stage 3), `[train]` (stage 4) and
`[eval]`. A stage script passes its own section name; a flag such as `--steps=8` is looked up
first in that section, then in `[model]`; `--train.lr=1e-5` or `--model_path=...` names the
section explicitly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "configs"
SECTIONS = ("model", "prompts", "render", "score", "train", "eval")


class ConfigError(ValueError):
    pass


class Section(dict):
    """A config table whose keys read as attributes (`cfg.render.steps`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; known: {sorted(self)}") from None


def resolve_preset(config: str) -> Path:
    """`tiny` or `configs/tiny.toml` or any path to a TOML file."""
    path = Path(config)
    if not path.is_file():
        path = PRESETS_DIR / f"{config}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
        raise ConfigError(f"config preset {config!r} not found (looked for {path}); presets: {known}")
    return path


def load_config(config: str, section: str, overrides: dict | None = None) -> Section:
    """Load a preset and apply flag overrides; unknown keys are an error, never ignored."""
    path = resolve_preset(config)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; allowed: {list(SECTIONS)}")
    cfg = Section({name: Section(copy.deepcopy(raw.get(name, {}))) for name in SECTIONS})
    cfg["preset"] = str(path)
    for key, value in (overrides or {}).items():
        _apply_override(cfg, section, key, value)
    return cfg


def _apply_override(cfg: Section, section: str, key: str, value) -> None:
    if "." in key:
        table, _, name = key.partition(".")
        if table not in SECTIONS or name not in cfg[table]:
            raise ConfigError(f"unknown flag --{key}: no key {name!r} in [{table}] of {cfg.preset}")
        cfg[table][name] = _coerce(cfg[table][name], value, key)
        return
    for table in (section, "model"):
        if key in cfg[table]:
            cfg[table][key] = _coerce(cfg[table][key], value, key)
            return
    table, _, name = key.partition("_")  # --model_path is model.path
    if table in SECTIONS and name in cfg[table]:
        cfg[table][name] = _coerce(cfg[table][name], value, key)
        return
    known = sorted(cfg[section]) + sorted(f"model.{k}" for k in cfg["model"])
    raise ConfigError(f"unknown flag --{key} for [{section}]; known keys: {known}")


def _coerce(current, value, key):
    """Fire parses flag values; make them match the preset's type so `--steps=4` stays an int."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if isinstance(current, (int, float)) and not isinstance(value, bool):
        try:
            return (
                type(current)(value)
                if not (isinstance(current, int) and isinstance(value, float) and value != int(value))
                else value
            )
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}={value!r}: expected a number like {current!r}") from None
    if isinstance(current, list) and isinstance(value, (tuple, list)):
        return list(value)
    if isinstance(current, list) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def to_json(cfg: Section) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True, default=str)
