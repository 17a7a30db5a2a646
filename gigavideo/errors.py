"""The exception types of faults a user causes and can fix (a flag, a preset, an input file, a run directory, a
server): the stage scripts print them as one line. Anything else, a bug included, keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A fault of the input, not of the code: the message says what is wrong, where, and what to do.
    (A ValueError too, so that code which already catches ValueError around a check keeps working.)"""


class ConfigError(UserError):
    """A preset or flag value that cannot work: names the key and what it may be."""


class StageFailed(UserError):
    """Too many of a stage's samples failed: no manifest is written, so the stage is not taken as done."""
