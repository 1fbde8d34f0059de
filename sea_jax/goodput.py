"""Where a run's wall time goes, and its goodput.

:class:`Clock` charges wall time to named phases. Phases nest, and time is charged to the
innermost open phase only (exclusive time): the trainer opens ``steps`` around its loop and
``data_wait`` around each ``next(data_iterator)`` inside it, so ``steps`` ends up holding the loop's
time minus the data stalls, checkpoint saves and logging inside it. Time in no phase is ``other``
(start-up, building the data pipeline, writing the manifest).

Phases of the trainer (:mod:`sea_jax.train.loop`):

* ``compile``: lowering and compiling the step; ``load``: reading and placing parameters and the
  SEA tables; ``restore``: reading the newest checkpoint;
* ``data_wait``: the loop blocked in ``next()`` on the input pipeline;
* ``checkpoint``: the blocking part of checkpoint saves (an async save's write to storage overlaps
  training and is not charged), and waiting for the last one at the end;
* ``logging``: opening the trackers (W&B takes seconds), writing metrics, histograms and
  pictures (the probe picture at the end); ``profile``: starting, stopping and copying a profiler
  trace; ``eval``: the in-loop evaluation (``eval.every``, :mod:`sea_jax.eval.inloop`);
* ``steps``: the rest of the loop -- dispatching steps and waiting for their results. This is the
  productive time.

**Goodput** = ``steps`` / wall time since the clock started (the start of ``train()``). Train
steps are dispatched asynchronously, so the device may still be computing while the loop waits for
the next batch: a data wait much shorter than a step is partly hidden behind compute, and counting
it all as lost makes goodput a lower bound. A data-bound run shows ``data_wait`` close to its
step time.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PHASES = ("compile", "load", "restore", "data_wait", "checkpoint", "logging", "profile", "eval", "steps")


class Clock:
    """Exclusive wall time per phase since the clock was made (see the module docstring)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = self.start

    def _charge(self, now: float) -> None:
        if self._stack:
            name = self._stack[-1]
            self.totals[name] = self.totals.get(name, 0.0) + (now - self._mark)
        self._mark = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charges the block's time (less any phase opened inside it) to ``name``."""
        self._charge(time.perf_counter())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()

    def total(self, name: str) -> float:
        """Seconds charged to ``name`` so far (an open phase included up to now)."""
        extra = time.perf_counter() - self._mark if self._stack and self._stack[-1] == name else 0.0
        return self.totals.get(name, 0.0) + extra

    def summary(self) -> dict[str, float]:
        """``goodput`` (``steps`` / wall), ``wall_s``, ``<phase>_s`` for every phase and ``other_s``."""
        now = time.perf_counter()
        wall = now - self.start
        out = {f"{p}_s": self.total(p) for p in PHASES}
        out["other_s"] = max(wall - sum(out.values()), 0.0)
        out["wall_s"] = wall
        out["goodput"] = out["steps_s"] / wall if wall > 0 else 0.0
        return out


def format_summary(s: dict[str, float]) -> str:
    """One line: ``goodput 71.2% of 35.2 s: steps 25.0 s, compile 5.7 s, ...`` (phases that took
    at least 0.05 s, largest first)."""
    parts = sorted(((k[:-2], v) for k, v in s.items() if k.endswith("_s") and k != "wall_s" and v >= 0.05),
                   key=lambda kv: -kv[1])
    return (f"goodput {100 * s['goodput']:.1f}% of {s['wall_s']:.1f} s: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in parts))


__all__ = ["Clock", "PHASES", "format_summary"]
