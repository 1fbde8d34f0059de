"""The run manifest: what produced a run folder, in ``<run folder>/manifest.json``.

Written by the trainer's process 0 when an attempt starts (after restoring, so it knows the step
it resumed from) and again when it ends, with how it ended and its goodput. Fields:

* ``command``: the command line (``argv``: ``sys.argv``; ``shell``: the command as typed, quoted
  for a shell, e.g. ``python -m sea_jax.train --config=...``), ``cwd``,
  ``host``, ``started`` / ``written`` (UTC, ISO 8601), ``resumed_from`` (a step, 0 for a fresh
  start).
* ``code``: sea_jax's ``version`` (the installed package's), and where the source is a git checkout
  its ``git_commit`` and ``git_dirty`` (tracked files changed since that commit); both None
  otherwise (a wheel install on a pod).
* ``python`` and ``packages``: versions of jax, jaxlib, flax, optax, orbax-checkpoint, grain,
  transformers, tensorboardX, wandb (None when not installed), read from the installed packages'
  metadata (nothing is imported for it).
* ``devices``: kind, platform, count, local count; ``process_count``, ``process_index``; ``mesh``
  (axis sizes).
* ``config``: the full resolved config.
* ``end`` (at the end): ``stopped`` ("done" or "preempted"), ``step``, the goodput summary.
* ``previous``: the manifests of the earlier attempts of this run (a resumed run may have been
  started by other code or on other hardware), oldest first, each without its own ``previous``.

Local or ``gs://``; each write is all-or-nothing (:func:`sea_jax.storage.atomic_write`).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from sea_jax import storage

FILENAME = "manifest.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "tensorboardX", "wandb")
_SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: str = _SOURCE) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout whose top folder is ``path`` (the folder holding the
    ``sea_jax`` package); (None, None) when it is not one or git is missing. Dirty means tracked files differ from the commit (untracked files do not
    count, as in ``git describe --dirty``)."""
    try:
        commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD", "--show-toplevel"], capture_output=True,
                                text=True, timeout=30)
        lines = commit.stdout.split()
        # a wheel installed into a virtualenv that sits inside some other repository is not a checkout
        if commit.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[1]) != os.path.realpath(path):
            return None, None
        status = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return lines[0], bool(status.stdout.strip()) if status.returncode == 0 else None


def collect(config, *, mesh_shape: Mapping[str, int], resumed_from: int = 0,
            argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The manifest of this attempt (see the module docstring)."""
    import jax

    commit, dirty = git_state()
    devices = jax.devices()
    # sys.orig_argv is the command as typed (interpreter, "-m sea_jax.train", flags); sys.argv has the
    # module's file path in place of "-m sea_jax.train"
    shell = shlex.join(sys.orig_argv if argv is None else [os.path.basename(sys.executable)] + list(argv))
    argv = list(sys.argv if argv is None else argv)
    return {
        "started": _now(),
        "command": {"argv": argv, "shell": shell, "cwd": os.getcwd()},
        "host": socket.gethostname(),
        "resumed_from": int(resumed_from),
        "code": {"package": "sea_jax", "version": package_version("sea_jax"), "git_commit": commit,
                 "git_dirty": dirty},
        "python": sys.version.split()[0],
        "packages": {name: package_version(name) for name in PACKAGES},
        "devices": {"kind": devices[0].device_kind, "platform": devices[0].platform, "count": len(devices),
                    "local_count": jax.local_device_count()},
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "mesh": {k: int(v) for k, v in dict(mesh_shape).items()},
        "config": json.loads(config.to_json()),
    }


def path_of(run_path: str) -> str:
    """``<run folder>/manifest.json``."""
    return storage.join(run_path, FILENAME)


def read(run_path: str) -> dict[str, Any] | None:
    """The run folder's manifest, None if it has none."""
    p = path_of(run_path)
    return json.loads(storage.read_text(p)) if storage.exists(p) else None


def _write(run_path: str, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(dict(manifest, written=_now()), indent=1, default=str)
    storage.atomic_write(path_of(run_path), lambda f: f.write(text + "\n"))


def start(run_path: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Writes ``manifest`` as the run folder's, the earlier attempts kept under ``previous``;
    returns what was written."""
    old = read(run_path)
    previous: list = []
    if old is not None:
        previous = list(old.pop("previous", [])) + [old]
    out = dict(manifest, previous=previous)
    _write(run_path, out)
    return out


def finish(run_path: str, end: Mapping[str, Any]) -> None:
    """Adds ``end`` (how the attempt ended) to the run folder's manifest."""
    current = read(run_path) or {}
    _write(run_path, dict(current, end=dict(end)))


__all__ = ["collect", "start", "finish", "read", "path_of", "git_state", "package_version", "PACKAGES",
           "FILENAME"]
