"""Checkpoints of a training run: Orbax ``CheckpointManager`` (async), preemption, fallback.

Only checkpointing lives here; where the folder is comes from :mod:`sea_jax.rundir`
(``RunDir.checkpoints``). Layout of ``<run folder>/checkpoints/<step>/`` (one Orbax composite
checkpoint per saved step):

* ``params/``     the *trainable* parameters only (frozen parts are reloaded from the config's
                  checkpoints: saving a frozen 7B LLM every N steps would be waste).
* ``opt_state/``  the optimizer state of those parameters.
* ``meta/``       JSON: step, seed (every random choice is ``fold_in(key(seed), step)``, so the
                  seed *is* the RNG state), process count, data statistics at that step.
* ``data/``       the Grain iterator's state, one ``process_<i>-of-<n>.json`` per process (each
                  host reads its own shard of the data), by Grain's Orbax handler
                  (``grain.checkpoint.CheckpointSave``). It is a blocking item of the composite
                  save: the state is read inside :meth:`Checkpointer.save`, while the iterator is
                  exactly at the saved step, not later in the async thread.

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when every
process has finished (the commit), so a run killed mid-save leaves only a temp folder that is never
listed as a step (and is deleted by the next run). A finalized checkpoint damaged later (a truncated
or deleted file) fails to restore; :meth:`Checkpointer.restore` then logs the reason, falls back to
the previous step and renames the unrestorable newer ones out of the way; if no step restores it
raises rather than silently starting over. (Not every missing file is damage: without
``_METADATA`` Orbax still restores a step from its array store, given the target tree.)

Preemption: :class:`PreemptionFlag` turns SIGTERM into a flag the loop polls after each step; the
loop saves and exits cleanly (exit status 0) before the grace period ends.
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sea_jax.errors import UserError

PARAMS, OPT_STATE, META, DATA = "params", "opt_state", "meta", "data"


# ----------------------------------------------------------------------------------------------
# Preemption


class PreemptionFlag:
    """SIGTERM (TPU/GKE preemption notice, ``kill``) -> ``flag.is_set``; the loop saves and exits.

    The handler only sets an event: saving from inside a signal handler could interleave with a
    step or an in-flight async save. The previous handler is restored by :meth:`uninstall`.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self.signum: int | None = None

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():  # signal() only works there
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        self.signum = signum
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (all processes must take the same branch:
    a save is a collective). One tiny all-gather; single-process runs skip it."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


# ----------------------------------------------------------------------------------------------
# The checkpointer


@dataclasses.dataclass
class Restored:
    """What :meth:`Checkpointer.restore` returns."""

    step: int
    params: Any
    opt_state: Any
    meta: dict


class Checkpointer:
    """A run's checkpoints under ``directory`` (``<run>/checkpoints``).

    Args:
      directory: a local path or ``gs://bucket/prefix``: Orbax writes arrays through tensorstore's
        GCS driver and its metadata through ``etils.epath`` (gcsfs backend), and finalises a save
        by its commit marker rather than by renaming a folder as on a local disk.
      keep: newest checkpoints kept (older ones deleted after a new one is committed).
      async_save: write in a background thread; the call returns once arrays are copied to host.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # a killed save's temp folder is removed on the next start
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                PARAMS: ocp.StandardCheckpointHandler(),
                OPT_STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
                DATA: grain_ckpt.CheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any], data_iterator: Any) -> bool:
        """Starts saving ``step`` (async); returns whether a save was started.

        ``data_iterator`` (a ``grain.DatasetIterator``) must be where step ``step`` will read its
        batch: its state is written before this returns.
        """
        args = ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            OPT_STATE: ocp.args.StandardSave(opt_state),
            META: ocp.args.JsonSave(dict(meta, step=int(step))),
            DATA: grain_ckpt.CheckpointSave(data_iterator),
        })
        return self._mngr.save(int(step), args=args, force=True)

    def restore(self, abstract_params: Any, abstract_opt_state: Any, data_iterator: Any) -> Restored | None:
        """The newest checkpoint that restores completely, or None if there is none.

        ``data_iterator`` is set (in place) to the restored step's position.

        ``abstract_*``: trees of ``jax.ShapeDtypeStruct`` with shardings (the restored arrays get
        them). A checkpoint that fails to restore (damaged on disk, incompatible) is logged with
        its error and skipped for the previous one; if every one fails, the last error is raised
        (an unusable workdir must not silently restart from scratch).
        """
        steps = self.all_steps()
        last_error: Exception | None = None
        for step in reversed(steps):
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(**{
                    PARAMS: ocp.args.StandardRestore(abstract_params),
                    OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
                    META: ocp.args.JsonRestore(),
                    DATA: grain_ckpt.CheckpointRestore(data_iterator),
                }))
            except UserError:
                # the run's own inputs disagree with the checkpoint (e.g. the data iterator's state
                # was saved for another data mixture): the user's to fix, not a damaged step
                raise
            # Orbax/tensorstore raise ValueError, FileNotFoundError, OSError, KeyError, ... for a
            # damaged step depending on which file is hit; any of them means "not this one".
            except Exception as e:  # noqa: BLE001
                logging.warning("checkpoint step %d in %s does not restore (%s: %s); trying the previous one",
                                step, self.directory, type(e).__name__, e)
                last_error = e
                continue
            bad = [s for s in steps if s > step]
            if bad:
                self._set_aside(bad)
            return Restored(step, out[PARAMS], out[OPT_STATE], dict(out[META]))
        if last_error is not None:
            raise RuntimeError(f"no checkpoint in {self.directory} restores (steps {steps})") from last_error
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unrestorable steps to ``<step>.unrestorable-<time>`` (kept for inspection, no
        longer a step): the resumed run will save those step numbers again. Renamed, not deleted,
        in case the failure was a transient read error rather than damage."""
        if jax.process_index() == 0:
            stamp = int(time.time())
            for s in steps:
                src = self.directory / str(s)
                if src.exists():
                    dst = self.directory / f"{s}.unrestorable-{stamp}"
                    logging.warning("setting aside unrestorable checkpoint %s as %s", src, dst)
                    src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sea_jax.checkpoint: unrestorable steps set aside")
        self._mngr.reload()

    def restore_params(self, step: int | None = None) -> tuple[int, dict]:
        """(step, trainable params as numpy) of ``step`` (default: the newest that restores),
        without the optimizer state, onto no particular device (for export / init_from)."""
        steps = self.all_steps() if step is None else [int(step)]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        last_error: Exception | None = None
        for s in reversed(steps):
            try:
                meta = self._mngr.item_metadata(s)[PARAMS]
                tree = getattr(meta, "tree", meta)
                # numpy targets: StandardRestore then reads every leaf onto the host, whatever
                # mesh the run that saved it had
                target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
                out = self._mngr.restore(s, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
                return s, out[PARAMS]
            except Exception as e:  # noqa: BLE001 -- see restore()
                logging.warning("checkpoint step %d params do not restore (%s: %s)", s, type(e).__name__, e)
                last_error = e
        raise RuntimeError(f"no checkpoint in {self.directory} restores (steps {steps})") from last_error

    def wait(self) -> None:
        """Blocks until the in-flight save is committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


__all__ = ["Checkpointer", "Restored", "PreemptionFlag", "any_process"]
