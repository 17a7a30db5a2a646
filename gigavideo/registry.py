"""Plug-ins by name: a registry maps a config value to an object, or to "module:attribute" text
that is imported only when that name is asked for (the toy world plugs in this way, so no
production module imports it)."""

from __future__ import annotations

import importlib


def resolve(registry: dict, name: str, what: str):
    """The object registered under name; a "module:attribute" string is imported now."""
    if name not in registry:
        raise ValueError(f"{what} {name!r} not in {sorted(registry)}")
    entry = registry[name]
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module), attribute)
    return entry
