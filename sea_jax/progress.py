"""The training progress a person watches: a bar on a terminal, plain lines in a log.

On a TTY (stderr is a terminal) a tqdm bar counts steps and shows the last logged values of
:data:`KEYS` (loss, align loss, tau, tokens/s, MFU, data wait). Without one (a pod's log, a file,
``kubectl logs``) a bar's carriage returns make one endless line, so instead one plain line is
logged every ``every`` steps (on the steps that are logged; 0 = every logged step) and at the end::

    step 120/1000 (12%) | loss 5.741 | align 1.626 | tau 0.0700 | tok/s 2.47e+04 | MFU 41.2% | data wait 3.1 ms (2%)

The plain lines go through ``logging`` marked for the terminal (:data:`sea_jax.logs.TERMINAL`), so
they also land in the run's log file.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from sea_jax.logs import TERMINAL

# (metric, label on the bar / line)
KEYS = (("loss", "loss"), ("align_loss", "align"), ("tau", "tau"), ("tokens_per_s", "tok/s"), ("mfu", "MFU"),
        ("data_wait", "data wait"))
_LOG = logging.getLogger("sea_jax.progress")


def _value(key: str, row: Mapping[str, Any]) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "data_wait":
        step = row.get("step_time") or 0.0
        share = f" ({100 * v / step:.0f}%)" if step > 0 else ""
        return f"{1e3 * v:.1f} ms{share}"
    if key == "tau":
        return f"{v:.4f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_line(step: int, total: int, row: Mapping[str, Any]) -> str:
    """The plain progress line of ``row`` (keys that are None or absent are left out)."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    for key, label in KEYS:
        text = _value(key, row)
        if text is not None:
            parts.append(f"{label} {text}")
    return " | ".join(parts)


class Progress:
    """The progress display of one run (see the module docstring).

    Args:
      total: steps of the run; initial: steps already done (a resumed run).
      enabled: False = nothing is shown (other processes, ``train.progress=False``).
      every: plain-line period in steps (0 = every logged step).
      tty: whether to draw a bar; None = whether stderr is a terminal.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every: int = 0,
                 tty: bool | None = None):
        self.total, self.every, self.enabled = int(total), int(every), enabled
        self._bar = None
        if not enabled:
            return
        if tty is None:
            tty = sys.stderr.isatty()
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=int(initial), desc="train", unit="step", dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        """Counts ``n`` more steps on the bar."""
        if self._bar is not None:
            self._bar.update(n)

    def show(self, step: int, row: Mapping[str, Any]) -> None:
        """Shows a logged step's values: the bar's postfix, or a plain line when due."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix({label: t for key, label in KEYS if (t := _value(key, row)) is not None},
                                  refresh=False)
        elif self.every <= 0 or step % self.every == 0 or step >= self.total:
            _LOG.info("%s", format_line(step, self.total, row), extra={TERMINAL: True})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["Progress", "format_line", "KEYS"]
