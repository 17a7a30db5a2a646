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
        try:
            entry = getattr(importlib.import_module(module), attribute)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):  # a module the plug-in imports is missing
                raise
            raise ConfigError(f"{what} {name!r}: no module {err.name!r} to import") from None
        except AttributeError:
            raise ConfigError(f"{what} {name!r}: module {module!r} has no {attribute!r}") from None
    return entry
