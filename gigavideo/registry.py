"""Plug-ins by name: a registry maps a config value to an object, or to "module:attribute" text
that is imported only when that name is asked for (the toy world plugs in this way, so no
production module imports it)."""

from __future__ import annotations

import importlib

from gigavideo.errors import ConfigError


def resolve(registry: dict, name: str, what: str):
    """The object registered under name; a "module:attribute" string (registered, or given as the
    name itself, for a plug-in outside the repo) is imported now."""
    if name not in registry and ":" not in name:
        raise ConfigError(f"{what} {name!r} not in {sorted(registry)} (or give a plug-in as module:attribute)")
    entry = registry.get(name, name)
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module), attribute)
    return entry
