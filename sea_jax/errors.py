"""Errors that are the user's to fix, as opposed to bugs.

A :class:`UserError` means the command was given something it cannot use: a path that is missing
or still a placeholder, a config value out of range, a malformed data file, an override the model
refuses. Command-line entry points (:mod:`sea_jax.cli`) print its message on one line and exit
with status 2, with no traceback; every other exception is an internal error and keeps its
traceback. Each message names the config field, file, line or sample that needs fixing.

The classes also derive from the built-in exception a caller would expect (``FileNotFoundError``
for a path, ``ValueError`` for a value), so library callers can keep catching those.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave (config, path, data, flag) that cannot be used as it is."""


class ConfigError(UserError, ValueError):
    """A config field holds a value that is out of range, of the wrong kind, or refused."""


class PathError(UserError, FileNotFoundError):
    """A path named by the config or a flag is empty, a placeholder, or does not exist."""


class DataFormatError(UserError, ValueError):
    """A data file that cannot be parsed at all (a bad *record* is skipped and counted instead)."""


__all__ = ["UserError", "ConfigError", "PathError", "DataFormatError"]
