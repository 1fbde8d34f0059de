"""What every command-line entry point shares: usage, user errors, exit codes.

* ``python -m sea_jax.X --help`` prints the tool's usage (its docstring and its flags) and exits 0.
* A :class:`sea_jax.errors.UserError` (a missing or placeholder path, a bad config value, a
  malformed data file, a refused override), a bad flag or a config file that does not load ends
  the command with ``error: <message>`` on stderr and exit status 2, without a traceback.
* Anything else is an internal error: it keeps its traceback (exit status 1).

absl tools call :func:`run_absl` with their ``main(argv)``; argparse tools call :func:`run`.

``run_absl(..., route_logs=True)`` (``python -m sea_jax.train``) also routes the process's logging
(:mod:`sea_jax.logs`): the terminal shows what ``--config.log.terminal`` says (default "brief": the
tool's own lines, progress and every warning), everything goes to the run's ``log.txt``, and the
native start-up chatter of jax's backends goes to the log file instead of the terminal.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from sea_jax.errors import UserError

HELP = ("-h", "--help", "--helpshort", "--helpfull", "-help")
USER_ERROR = 2


def fail(message: object) -> None:
    """Prints ``error: message`` (one line per line of the message) and exits with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR)


def _absl_usage(doc: str) -> str:
    from absl import flags

    main_flags = flags.FLAGS.main_module_help()
    return doc.strip() + ("\n\nflags:\n" + main_flags if main_flags.strip() else "") + "\n"


def _route_logs() -> None:
    """:func:`sea_jax.logs.setup` with the ``--config``'s ``log.terminal`` (default "brief"), then
    jax's backends started with native stderr captured into the log file. A multi-process run's
    ``jax.distributed`` is started first (it must precede the backends)."""
    from absl import flags

    from sea_jax import logs

    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    log = getattr(config, "log", None) if config is not None else None
    logs.setup(logs.check_mode(log.terminal) if log is not None else "brief")
    import atexit

    atexit.register(logs.shutdown)
    import jax

    from sea_jax import sharding

    with logs.capture_native_stderr():
        sharding.init_distributed()
        jax.devices()


def run_absl(main: Callable[[list[str]], int | None], doc: str, route_logs: bool = False) -> None:
    """Runs an absl ``main(argv)`` (flags already defined) with the rules above; ``route_logs``:
    see the module docstring."""
    from absl import app, flags

    def parse(argv: list[str]) -> list[str]:
        if any(a in HELP for a in argv[1:]):
            print(_absl_usage(doc))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
            for name in flags.FLAGS:  # config_flags defers a config file's failure to the first read
                getattr(flags.FLAGS[name].value, "lock", None)
            return rest
        except (flags.Error, UserError) as e:
            fail(e)
        except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
            fail(f"no config field {e}: a --config.X override names a field the schema lacks "
                 "(every field is in sea_jax/config.py)")
        # A config file is the user's code: whatever it raises while loading is theirs to fix.
        except Exception as e:  # noqa: BLE001
            fail(f"cannot read the flags or the config file: {type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
        try:
            if route_logs:
                _route_logs()
            rc = main(argv)
        except UserError as e:
            fail(e)
        sys.exit(rc or 0)

    app.run(wrapped, flags_parser=parse)


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Runs an argparse-style ``main(argv) -> exit code`` with the rules above (argparse itself
    exits 2 on a bad flag and 0 on ``--help``)."""
    try:
        rc = main(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        fail(e)
    sys.exit(rc or 0)


__all__ = ["fail", "run_absl", "run", "USER_ERROR"]
