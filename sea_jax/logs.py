"""What the terminal shows, and the run's log file that keeps everything else.

A training run logs through absl and Python's ``logging``, and so does every library under it:
Orbax writes about fifty INFO lines per checkpoint save, grain, jax and absl add more, and libtpu
writes straight to the process's stderr when jax looks for a TPU on a CPU host. A person watching a
run wants a few lines; whoever debugs it wants all of them. So there are two outputs:

* **The terminal** (stderr), by ``log.terminal``:

  - ``"brief"`` (default): lines marked for the terminal (the progress lines), INFO lines of
    sea_jax's tools (the trainer, the demo: what runs, compile time, resume, checkpoint saves, the
    end summary) and every WARNING and ERROR from anyone. INFO lines of libraries, sea_jax's own
    library layer included, are not shown.
  - ``"all"``: every INFO line of every library too (what the command printed before).
  - ``"warning"``: marked lines, warnings and errors only.

* **The log file**: every record at INFO and above, from every library, formatted with level, time
  and source line, in ``<run folder>/log.txt`` (process 0; ``log.process<i>.txt`` on the others).
  :func:`run_log` points the file at a run folder for the duration of a run, locally or on
  ``gs://`` (a :class:`sea_jax.storage.AppendLog`: visible in the bucket while the run goes).
  Records logged before a run starts (backend start-up, the demo's preparation) are held in memory
  and written at the top of the next run's log; records logged after it (the demo's report) go to
  the last run's log when the command ends.

Two sources are not Python logging, and are routed here too:

* Native code that writes to file descriptor 2 while jax starts its backends (libtpu's "could not
  determine TPU accelerator type" and its ``Source Location Trace``): :func:`capture_native_stderr`
  sends fd 2 to a temporary file for the duration of a block and logs what was written, as INFO
  records for the log file; if the block raises, the text is printed on the terminal first.
* transformers' import-time advice ("PyTorch was not found ..."), which it prints through its own
  handler: :func:`setup` sets ``TRANSFORMERS_NO_ADVISORY_WARNINGS=1`` (transformers' own switch
  for advisory messages) unless the variable is already set or the terminal shows everything.

:func:`setup` is for command-line entry points; a library caller (a notebook) keeps its own
logging, and :func:`run_log` still writes the run's log file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from sea_jax import storage
from sea_jax.errors import ConfigError

TERMINAL_MODES = ("brief", "all", "warning")
# sea_jax sub-packages whose INFO lines a person reads (the tools layer of docs/design.md).
TOOL_PACKAGES = ("train", "demo", "labels", "probe", "export", "generate", "aot", "eval")
# Set on a record (``extra={TERMINAL: True}``) to show it on the terminal in every mode.
TERMINAL = "sea_jax_terminal"
# Lines held before a run's log file is open; past this the oldest are dropped.
MAX_HELD = 20_000

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_NATIVE = logging.getLogger("sea_jax.native")


def check_mode(mode: str) -> str:
    """``mode`` if it is a ``log.terminal`` value, else a :class:`ConfigError` naming the field."""
    if mode not in TERMINAL_MODES:
        raise ConfigError(f"config.log.terminal={mode!r}: expected one of {list(TERMINAL_MODES)}")
    return mode


def is_tool_record(record: logging.LogRecord) -> bool:
    """True for a record logged by a module of sea_jax's tools or entry points."""
    path = os.path.abspath(record.pathname or "")
    if not path.startswith(_PACKAGE_DIR + os.sep):
        return False
    parts = os.path.relpath(path, _PACKAGE_DIR).split(os.sep)
    return parts[0] in TOOL_PACKAGES or parts[0] in ("cli.py", "__main__.py")


class TerminalFilter(logging.Filter):
    """Lets through the records the terminal shows in ``mode`` (see the module docstring)."""

    def __init__(self, mode: str = "brief"):
        super().__init__()
        self.mode = check_mode(mode)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or getattr(record, TERMINAL, False):
            return True
        if self.mode == "all":
            return record.levelno >= logging.INFO
        if self.mode == "warning":
            return False
        return record.levelno >= logging.INFO and is_tool_record(record)


class TerminalFormatter(logging.Formatter):
    """``HH:MM:SS message`` for INFO; level and source line added for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{stamp} {record.levelname} {record.filename}:{record.lineno}] {msg}"
        return f"{stamp} {msg}"


class FileFormatter(logging.Formatter):
    """absl's layout: ``I1202 17:28:13.084268 loop.py:167] message`` (level letter, date, time,
    source line), so the file reads like the unfiltered output did."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        usec = int((record.created % 1) * 1e6)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return (f"{record.levelname[:1]}{time.strftime('%m%d %H:%M:%S', t)}.{usec:06d} "
                f"{record.filename}:{record.lineno}] {msg}")


class RunLogHandler(logging.Handler):
    """Writes every record it gets to the current log file (:meth:`open`); holds them in memory
    while none is open.

    Locally each record is flushed at once. On ``gs://`` a flush re-uploads (or composes) the
    object, so records are flushed when a WARNING or worse arrives, when ``flush_secs`` have passed
    since the last flush, and on :meth:`close`/:meth:`open` of another file.
    """

    def __init__(self, flush_secs: float = 10.0):
        super().__init__(logging.INFO)
        self.setFormatter(FileFormatter())
        self.flush_secs = flush_secs
        self.path: str | None = None
        self._log: storage.AppendLog | None = None
        self._held: list[str] = []
        self._last_flush = 0.0

    def open(self, path: str) -> None:
        """Sends records to ``path`` (appended to; held records first), closing the previous file."""
        with self.lock:
            self._close_log()
            self._log = storage.AppendLog(path, autoflush=False)
            self.path = path
            if self._held:
                self._log.write("".join(self._held))
                self._held.clear()
            self._flush_log()

    def detach(self) -> None:
        """Closes the current file; later records are held until :meth:`open` or :meth:`close`."""
        with self.lock:
            self._close_log()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except (TypeError, ValueError):  # a bad %-format in someone's log call: keep going
            self.handleError(record)
            return
        if self._log is None:
            self._held.append(line)
            if len(self._held) > MAX_HELD:
                del self._held[: len(self._held) - MAX_HELD]
            return
        self._log.write(line)
        if (not storage.is_remote(self._log.path) or record.levelno >= logging.WARNING
                or time.monotonic() - self._last_flush >= self.flush_secs):
            self._flush_log()

    def flush(self) -> None:
        with self.lock:
            if self._log is not None:
                self._flush_log()

    def close(self) -> None:
        """Flushes and closes the file; records still held go to the last file used, if any."""
        with self.lock:
            self._close_log()
            if self._held and self.path is not None:
                with storage.AppendLog(self.path, autoflush=False) as log:
                    log.write("".join(self._held))
            self._held.clear()
        super().close()

    def _flush_log(self) -> None:
        self._log.flush()
        self._last_flush = time.monotonic()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


_state: dict[str, logging.Handler | None] = {"terminal": None, "file": None}
_setup_lock = threading.Lock()


def setup(mode: str = "brief") -> None:
    """Routes this process's logging (for a command-line entry point; call after absl parsed its
    flags): the terminal shows what ``mode`` says, every INFO+ record goes to the run log file.

    absl's own stderr handler is replaced by ours, so absl's ``--logtostderr``/``--log_dir`` no
    longer apply; ``log.terminal=all`` shows what absl showed. Calling it again changes the mode.
    """
    check_mode(mode)
    if mode != "all":
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    root = logging.getLogger()
    with _setup_lock:
        from absl import logging as absl_logging

        absl_handler = absl_logging.get_absl_handler()
        if absl_handler in root.handlers:
            root.removeHandler(absl_handler)
        if _state["terminal"] is None:
            terminal = logging.StreamHandler(sys.stderr)
            terminal.setFormatter(TerminalFormatter())
            root.addHandler(terminal)
            _state["terminal"] = terminal
            file_handler = RunLogHandler()
            root.addHandler(file_handler)
            _state["file"] = file_handler
        terminal = _state["terminal"]
        for f in list(terminal.filters):
            terminal.removeFilter(f)
        terminal.addFilter(TerminalFilter(mode))
        # Records below the root's level are never made; INFO is what the log file keeps. (absl's
        # own logger keeps the level its --verbosity flag gave it.)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)


def shutdown() -> None:
    """Flushes and closes the run log (held records go to the last run's log); for entry points,
    at exit. Undoes :func:`setup`'s handlers."""
    root = logging.getLogger()
    with _setup_lock:
        for key in ("file", "terminal"):
            h = _state[key]
            if h is not None:
                root.removeHandler(h)
                h.close()
                _state[key] = None


def run_log_path(run_path: str, process_index: int) -> str:
    """``<run folder>/log.txt`` for process 0, ``log.process<i>.txt`` for the others (hosts of one
    run must not write one object)."""
    name = "log.txt" if process_index == 0 else f"log.process{process_index}.txt"
    return storage.join(run_path, name)


@contextlib.contextmanager
def run_log(path: str) -> Iterator[str]:
    """Every INFO+ record logged inside the block goes to ``path`` (appended; local or gs://).

    After :func:`setup`, the process's log handler is pointed at ``path`` and stays there after
    the block (see the module docstring); otherwise a handler is added to the root logger for the
    block only.
    """
    handler = _state["file"]
    if isinstance(handler, RunLogHandler):
        handler.open(path)
        try:
            yield path
        finally:
            handler.flush()
        return
    own = RunLogHandler()
    own.open(path)
    root = logging.getLogger()
    root.addHandler(own)
    try:
        yield path
    finally:
        root.removeHandler(own)
        own.close()


@contextlib.contextmanager
def capture_native_stderr(logger: logging.Logger = _NATIVE) -> Iterator[None]:
    """Sends file descriptor 2 to a temporary file inside the block, then logs each captured line
    at INFO on ``logger`` (the log file's, not the terminal's, in "brief" mode). If the block
    raises, the captured text is written to the real stderr before the exception goes on, since
    it may say why. Python writes to ``sys.stderr`` inside the block are captured too."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            if text and failed:
                sys.stderr.write(text)
                sys.stderr.flush()
            for line in text.splitlines():
                if line.strip():
                    logger.info("native: %s", line)


__all__ = ["TERMINAL_MODES", "TERMINAL", "TerminalFilter", "RunLogHandler", "setup", "shutdown", "run_log",
           "run_log_path", "capture_native_stderr", "check_mode", "is_tool_record"]
