"""Side jobs of the training loop, as hooks: the loop runs steps, hooks do everything else.

A hook is ``fn(info: StepInfo)`` registered with ``hooks.add(fn, every=n)``; it runs after every
``n``-th step and after the last one. A hook ends the run early by raising :class:`StopTraining`
(the preemption hook does, after saving). The trainer's own hooks live here: logging
(:class:`LogHook`), periodic checkpoints (:func:`checkpoint_hook`) and preemption
(:func:`preemption_hook`); later side jobs (evaluation, profiling) are added the same way.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from sea_jax import checkpoint as ckpt_lib


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step.

    Attributes:
      step: steps done (1 after the first).
      total: steps of the run.
      state: the train state after the step (device arrays).
      metrics: the step's metrics (device scalars; ``jax.device_get`` them when needed).
      batch: this process's host batch of the step.
    """

    step: int
    total: int
    state: Any
    metrics: Mapping[str, Any]
    batch: Mapping[str, np.ndarray]

    @property
    def last(self) -> bool:
        return self.step >= self.total


class StopTraining(Exception):
    """Raised by a hook to end the run after the current step; ``reason`` is reported."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Hooks:
    """An ordered list of ``(fn, every)``; :meth:`run` calls the ones due at a step."""

    def __init__(self):
        self._hooks: list[tuple[Callable[[StepInfo], None], int]] = []

    def add(self, fn: Callable[[StepInfo], None], every: int = 1) -> None:
        """Runs ``fn`` after every ``every``-th step and after the last one (``every <= 0``: only
        after the last)."""
        self._hooks.append((fn, int(every)))

    def run(self, info: StepInfo) -> None:
        for fn, every in self._hooks:
            if info.last or (every > 0 and info.step % every == 0):
                fn(info)


class LogHook:
    """Logs the metrics of a step: the step's own (loss, lm_loss, align_loss, tau, lr, grad norm,
    unique labels), the time per step since the previous log, tokens/s, TFLOP/s per device and MFU
    (``flops`` per step against the chip's ``peak`` TFLOP/s), and the data statistics."""

    def __init__(self, logger, flops_per_step: float, peak_tflops: float | None, batch_size: int,
                 data_stats: Callable[[], dict]):
        self.logger, self.flops, self.peak, self.batch_size = logger, flops_per_step, peak_tflops, batch_size
        self.data_stats = data_stats
        self.last: dict[str, Any] = {}
        self.restart_clock(0)

    def restart_clock(self, step: int) -> None:
        """Measures step time from now on (after compiling, restoring)."""
        self._t, self._step = time.time(), step

    def __call__(self, info: StepInfo) -> None:
        m = jax.device_get(info.metrics)
        dt = (time.time() - self._t) / max(info.step - self._step, 1)
        self.restart_clock(info.step)
        seq = int(np.shape(info.batch["input_ids"])[1])
        tflops = self.flops / dt / jax.device_count() / 1e12
        row = {k: np.asarray(v).item() for k, v in m.items()}
        row.update(step_time=dt, tokens_per_s=self.batch_size * seq / dt, tflops_per_device=tflops,
                   mfu=(tflops / self.peak) if self.peak else None)
        row.update(self.data_stats())  # skipped/<reason>, skipped_total, truncated, ...
        self.logger.log(info.step, row)
        self.last = row
        if not math.isfinite(row.get("loss", 0.0)):
            logging.error("step %d: loss is %s", info.step, row.get("loss"))


def checkpoint_hook(save: Callable[[int], None]) -> Callable[[StepInfo], None]:
    """Saves at the hook's period; the final step is saved by the trainer after the loop."""
    def hook(info: StepInfo) -> None:
        if not info.last:
            save(info.step)
    return hook


def preemption_hook(flag: ckpt_lib.PreemptionFlag, save: Callable[[int], None]) -> Callable[[StepInfo], None]:
    """After every step: if any process got SIGTERM, save this step and stop (exit status 0)."""
    def hook(info: StepInfo) -> None:
        if ckpt_lib.any_process(flag.is_set):
            logging.warning("preemption signal: saving step %d and exiting", info.step)
            save(info.step)
            raise StopTraining("preempted")
    return hook


__all__ = ["StepInfo", "StopTraining", "Hooks", "LogHook", "checkpoint_hook", "preemption_hook"]
