"""Where a run's metrics go: ``metrics.jsonl``, TensorBoard event files, Weights & Biases.

:class:`Tracker` fans one call out to the sinks the ``log`` config turns on, on the process that
logs (process 0; the others get a tracker whose calls do nothing, so the loop needs no
``if process_index == 0``). Every sink works with a local run folder and with ``gs://`` (through
:mod:`sea_jax.storage`), and a resumed run reads as one trajectory in each:

* :class:`JsonlLog` -- ``<run>/metrics.jsonl``, one JSON row per logged step (floats; None where a
  value is unavailable, e.g. MFU on CPU; NaN stays NaN). A :class:`storage.AppendLog` flushed per
  row, so on ``gs://`` the object in the bucket grows while the run goes. On resume from step s,
  rows after s (logged by an attempt killed after its last checkpoint, recomputed by this one) are
  dropped first.
* :class:`TensorBoard` -- ``<run>/tensorboard/events.out.tfevents.*`` through tensorboardX (no
  TensorFlow): scalars, histograms, images. A resumed attempt writes a new event file that starts
  with ``SessionLog.START`` at step s + 1, which makes TensorBoard's reader drop the earlier
  attempt's events from step s + 1 on. On ``gs://`` the event file is a
  :class:`storage.AppendLog` that tensorboardX writes into, registered as tensorboardX's writer for
  the ``gs`` prefix (its own GCS writer needs google-cloud-storage and re-uploads the whole file at
  every flush; ours re-uploads below 1 MiB and composes above). tensorboardX's thread flushes it
  every ``flush_secs``: that is how stale the bucket's copy can be while the run goes.
* :class:`Wandb` -- optional (``log.wandb``); ``wandb`` is imported only then. Project, entity and
  run name from the config; the run id is kept in ``<run>/wandb_id.txt`` so every attempt of a run
  (resumes, preemptions) logs into the same W&B run. ``log.wandb_mode="offline"`` needs no
  network: the files stay under the wandb folder for ``wandb sync``.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from sea_jax import storage
from sea_jax.errors import ConfigError

WANDB_MODES = ("", "online", "offline", "disabled")
TENSORBOARD_FLUSH_SECS = 30


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def truncate_after(path: str, step: int) -> None:
    """Drops the rows of ``path`` logged after ``step`` (and rows cut by a kill mid-write), so the
    log reads as one trajectory after a resume. Local or ``gs://``; all-or-nothing."""
    if not storage.exists(path):
        return
    lines = storage.read_text(path).splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write
            continue
    if keep != lines:
        storage.atomic_write(path, lambda f: f.writelines(keep))


class JsonlLog:
    """``metrics.jsonl``: one JSON row per :meth:`write`, visible in place after each row."""

    def __init__(self, path: str, initial_step: int = 0):
        self.path = path
        truncate_after(path, initial_step)
        self._log = storage.AppendLog(path)

    def write(self, row: Mapping[str, Any]) -> None:
        self._log.write_json(dict(row))

    def close(self) -> None:
        self._log.close()


def read_jsonl(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (local or ``gs://``)."""
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# TensorBoard


class StorageRecordFiles:
    """tensorboardX's writer factory for ``gs://`` paths: the event file is an
    :class:`storage.AppendLog` (``write``/``flush``/``close``, which is all tensorboardX's record
    writer calls). See the module docstring."""

    def open(self, path: str) -> storage.AppendLog:
        return storage.AppendLog(path, autoflush=False)

    def directory_check(self, path: str) -> None:
        del path  # no folders on GCS


def use_storage_for_gs() -> None:
    """Registers :class:`StorageRecordFiles` as tensorboardX's writer for ``gs://`` paths."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory("gs", StorageRecordFiles())


class TensorBoard:
    """Event files in ``logdir`` (local or ``gs://``) through tensorboardX."""

    def __init__(self, logdir: str, initial_step: int = 0, flush_secs: float = TENSORBOARD_FLUSH_SECS):
        from tensorboardX import SummaryWriter

        if storage.is_remote(logdir):
            use_storage_for_gs()
        else:
            os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        # The file name holds the time in seconds and the host; the start step tells two attempts
        # started in the same second apart (the second would truncate the first's file).
        self._w = SummaryWriter(logdir, flush_secs=flush_secs, filename_suffix=f".start{int(initial_step):010d}",
                                purge_step=int(initial_step) + 1 if initial_step else None)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Finite numbers only: None (unavailable) and NaN/inf (shown by metrics.jsonl) are skipped."""
        for tag, v in values.items():
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(float(v)):
                self._w.add_scalar(tag, float(v), int(step))

    def histogram(self, tag: str, step: int, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        if values.size:
            self._w.add_histogram(tag, values, int(step), bins="auto")

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """``image``: uint8 ``[H, W, 3]`` (or 4 channels)."""
        self._w.add_image(tag, np.asarray(image), int(step), dataformats="HWC")

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


# ----------------------------------------------------------------------------------------------
# Weights & Biases


def check_wandb_config(log_config) -> None:
    """:class:`ConfigError` for a ``log.wandb_mode`` wandb does not know."""
    if log_config.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"config.log.wandb_mode={log_config.wandb_mode!r}: expected one of {list(WANDB_MODES)}")


def wandb_dir(log_config, run_path: str) -> str:
    """The local folder wandb writes into: ``log.wandb_dir``, else the run folder when it is local,
    else ``~/.cache/sea_jax/wandb/<bucket path>`` (wandb writes local files only)."""
    if log_config.wandb_dir:
        return log_config.wandb_dir
    if not storage.is_remote(run_path):
        return run_path
    return os.path.join(os.path.expanduser("~"), ".cache", "sea_jax", "wandb", *run_path[len("gs://"):].split("/"))


class Wandb:
    """One W&B run per run folder, resumed by every attempt (see the module docstring)."""

    ID_FILE = "wandb_id.txt"

    def __init__(self, log_config, run_path: str, default_name: str, config_dict: Mapping[str, Any]):
        check_wandb_config(log_config)
        try:
            import wandb
        except ImportError:
            raise ConfigError("config.log.wandb=True needs the wandb package: pip install 'sea_jax[wandb]' "
                              "(or set --config.log.wandb=False)") from None
        self._wandb = wandb
        id_path = storage.join(run_path, self.ID_FILE)
        if storage.exists(id_path):
            self.run_id = storage.read_text(id_path).strip()
        else:
            self.run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits
            storage.atomic_write(id_path, lambda f: f.write(self.run_id + "\n"))
        folder = wandb_dir(log_config, run_path)
        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(
            project=log_config.wandb_project or None, entity=log_config.wandb_entity or None,
            name=log_config.wandb_name or default_name, id=self.run_id, resume="allow", dir=folder,
            mode=log_config.wandb_mode or None, config=dict(config_dict),
            # the trainer prints its own progress; wandb's console capture would duplicate it
            settings=wandb.Settings(silent=True, console="off"))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        row = {k: v for k, v in values.items() if v is not None}
        self.run.log(row, step=int(step))

    def histogram(self, tag: str, step: int, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        if values.size:
            self.run.log({tag: self._wandb.Histogram(values)}, step=int(step))

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.run.log({tag: self._wandb.Image(np.asarray(image))}, step=int(step))

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def close(self) -> None:
        self.run.finish()


# ----------------------------------------------------------------------------------------------
# The run's tracker


def _to_py(v: Any) -> Any:
    if v is None or isinstance(v, (str, bool)):
        return v
    a = np.asarray(v)
    if a.ndim == 0:
        return a.item()  # NaN stays NaN (json writes it): a diverged loss must be visible
    return a.tolist()


class Tracker:
    """The sinks of one run folder (see the module docstring).

    Args:
      run_path: the run folder (local or ``gs://``).
      log_config: the config's ``log`` section (``tensorboard``, ``wandb*``).
      initial_step: the step the run starts from (0, or the resumed checkpoint's).
      enabled: False on the processes that do not log: every call is a no-op.
      config_dict: the run's config, given to W&B.
      flush_secs: how often TensorBoard's writer thread flushes the event file.
    """

    def __init__(self, run_path: str, log_config, initial_step: int = 0, enabled: bool = True,
                 config_dict: Mapping[str, Any] | None = None, flush_secs: float = TENSORBOARD_FLUSH_SECS):
        self.enabled = enabled
        self.jsonl: JsonlLog | None = None
        self.tensorboard: TensorBoard | None = None
        self.wandb: Wandb | None = None
        if not enabled:
            return
        check_wandb_config(log_config)
        self.jsonl = JsonlLog(storage.join(run_path, "metrics.jsonl"), initial_step)
        if bool(log_config.tensorboard):
            self.tensorboard = TensorBoard(storage.join(run_path, "tensorboard"), initial_step, flush_secs)
        if bool(log_config.wandb):
            parts = run_path.rstrip("/").split("/")
            self.wandb = Wandb(log_config, run_path, "/".join(parts[-2:]) or socket.gethostname(),
                               config_dict or {})

    def _sinks(self) -> list:
        return [s for s in (self.tensorboard, self.wandb) if s is not None]

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Writes one row (``{"step": step, **metrics}``, values as Python numbers) to every sink;
        returns the row."""
        if not self.enabled:
            return {}
        row = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
        self.jsonl.write(row)
        scalars = {k: v for k, v in row.items() if k != "step"}
        for sink in self._sinks():
            sink.scalars(step, scalars)
        return row

    def histogram(self, tag: str, step: int, values: np.ndarray) -> None:
        """A histogram of ``values`` (TensorBoard, W&B; not metrics.jsonl)."""
        if self.enabled:
            for sink in self._sinks():
                sink.histogram(tag, step, values)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """A picture, uint8 ``[H, W, C]`` (TensorBoard, W&B)."""
        if self.enabled:
            for sink in self._sinks():
                sink.image(tag, step, image)

    def summary(self, values: Mapping[str, Any], step: int) -> None:
        """End-of-run numbers (goodput): scalars at ``step`` in TensorBoard, the run summary in W&B."""
        if not self.enabled:
            return
        values = {k: _to_py(v) for k, v in values.items()}
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, values)
        if self.wandb is not None:
            self.wandb.summary(values)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        for sink in self._sinks():
            sink.close()


__all__ = ["Tracker", "JsonlLog", "TensorBoard", "Wandb", "StorageRecordFiles", "use_storage_for_gs",
           "truncate_after", "read_jsonl", "wandb_dir", "check_wandb_config", "WANDB_MODES"]
