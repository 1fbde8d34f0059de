"""Side jobs of the training loop, as hooks: the loop runs steps, hooks do everything else.

A hook is ``fn(info: StepInfo)`` registered with ``hooks.add(fn, every=n)``; it runs after every
``n``-th step and after the last one. A hook ends the run early by raising :class:`StopTraining`
(the preemption hook does, after saving). The trainer's own hooks live here: logging
(:class:`LogHook`, metrics, histograms and the progress display), periodic checkpoints
(:func:`checkpoint_hook`), preemption (:func:`preemption_hook`) and a profiler trace of a window
of steps (:class:`ProfileHook`); later side jobs (evaluation) are added the same way. The probe's
picture at the end of a run (:func:`probe_picture`) runs after the last checkpoint, not as a hook.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from sea_jax import checkpoint as ckpt_lib
from sea_jax import storage


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
    """Logs the metrics of a step every ``train.log_every`` steps.

    A row holds the step's own metrics (loss, lm_loss, align_loss, tau, lr, grad_norm,
    unique_labels, ...), the data statistics (skipped/<reason>, skipped_total, truncated,
    samples, ...) and, averaged over the steps since the previous row:

    * ``step_time``: wall seconds per step; ``data_wait``: of which the loop was blocked on the
      input pipeline (the clock's ``data_wait`` phase); ``compute_time`` = the difference;
    * computed tokens (``batch_size x`` the step's sequence length, its length bucket) and real
      ones (non-pad, the step's ``real_tokens``): ``tokens_per_s`` and ``real_tokens_per_s``,
      ``padding_fraction`` (1 - real / computed), ``seq_len`` (the logged step's bucket);
    * ``tflops_per_device`` and ``mfu``: the analytic FLOPs of the steps run (``flops_for`` their
      length) against the chip's ``peak`` TFLOP/s (None when unknown); ``mfu_real``: the same
      counting only real tokens' share of each step (per-token FLOPs at the step's length times
      real tokens), the figure that padding cannot inflate.

    With ``histograms``, also histograms (TensorBoard, W&B) of the per-step ``unique_labels`` and
    ``candidates`` of the steps since the previous row (collected by :meth:`collect`, which must
    run after every step), and of the logged step's batch ``label_scores`` (this process's rows,
    labelled slots only; present when labels come with the batch, ``sea.label_source="batch"``).
    """

    WINDOW_KEYS = ("unique_labels", "candidates")

    def __init__(self, tracker, progress, clock, flops_for: Callable[[int], float], peak_tflops: float | None,
                 batch_size: int, data_stats: Callable[[], dict], histograms: bool = True):
        self.tracker, self.progress, self.clock = tracker, progress, clock
        self.flops_for, self.peak, self.batch_size = flops_for, peak_tflops, batch_size
        self.data_stats, self.histograms = data_stats, histograms
        self.last: dict[str, Any] = {}
        self._window: list[dict[str, Any]] = []
        self._steps: list[tuple[int, Any]] = []  # (sequence length, real tokens) of each step since the last row
        self.restart_clock(0)

    def restart_clock(self, step: int) -> None:
        """Measures step time from now on (after compiling, restoring)."""
        self._t, self._step, self._wait = time.time(), step, self.clock.total("data_wait")

    def collect(self, info: StepInfo) -> None:
        """Keeps this step's window metrics (device scalars: no wait for the step here)."""
        self._steps.append((int(np.shape(info.batch["input_ids"])[1]), info.metrics.get("real_tokens")))
        if self.histograms:
            self._window.append({k: info.metrics[k] for k in self.WINDOW_KEYS if k in info.metrics})

    def __call__(self, info: StepInfo) -> None:
        m, window, steps = jax.device_get((info.metrics, self._window, self._steps))  # waits: productive time
        self._window, self._steps = [], []
        n = max(info.step - self._step, 1)
        dt = (time.time() - self._t) / n
        wait = (self.clock.total("data_wait") - self._wait) / n
        self.restart_clock(info.step)
        with self.clock.phase("logging"):
            seq = int(np.shape(info.batch["input_ids"])[1])
            steps = steps or [(seq, m.get("real_tokens"))]
            flops = sum(self.flops_for(length) for length, _ in steps)
            computed = sum(self.batch_size * length for length, _ in steps)
            real = sum(int(r) if r is not None else self.batch_size * length for length, r in steps)
            real_flops = sum(self.flops_for(length) * (int(r) / (self.batch_size * length) if r is not None else 1.0)
                             for length, r in steps)
            span = dt * len(steps)
            tflops = flops / span / jax.device_count() / 1e12
            tflops_real = real_flops / span / jax.device_count() / 1e12
            row = {k: np.asarray(v).item() for k, v in m.items()}
            row.update(step_time=dt, data_wait=wait, compute_time=max(dt - wait, 0.0), seq_len=seq,
                       tokens_per_s=computed / span, real_tokens_per_s=real / span,
                       padding_fraction=1.0 - real / max(computed, 1), tflops_per_device=tflops,
                       mfu=(tflops / self.peak) if self.peak else None,
                       mfu_real=(tflops_real / self.peak) if self.peak else None)
            row.update(self.data_stats())  # skipped/<reason>, skipped_total, truncated, ...
            self.tracker.log(info.step, row)
            if self.histograms:
                self._log_histograms(info, window)
            self.progress.show(info.step, row)
        self.last = row
        if not math.isfinite(row.get("loss", 0.0)):
            logging.error("step %d: loss is %s", info.step, row.get("loss"))

    def _log_histograms(self, info: StepInfo, window: list[dict[str, Any]]) -> None:
        for key in self.WINDOW_KEYS:
            values = [np.asarray(w[key]).item() for w in window if key in w]
            if values:
                self.tracker.histogram(f"histogram/{key}", info.step, np.asarray(values))
        scores = info.batch.get("label_scores")
        if scores is not None:
            scores = np.asarray(scores)
            self.tracker.histogram("histogram/label_scores", info.step, scores[scores > 0])


class ProfileHook:
    """A ``jax.profiler`` trace of the steps ``first .. first + count - 1`` (1-based step numbers),
    into ``out_dir`` (``<run folder>/profile``; TensorBoard's profile plugin and xprof read it).

    The trace starts after step ``first - 1`` (at once when the run starts, or resumes, right
    before ``first``) and stops after step ``first + count - 1`` or the run's last step, each time
    once the device has finished the steps before, so the trace holds those steps and no others.
    A resumed run already past ``first`` takes no trace. A ``gs://`` ``out_dir`` is traced to a
    local temporary folder and copied there when the trace stops.
    """

    def __init__(self, out_dir: str, first: int, count: int, done: int, clock=None, state: Any = None):
        self.out_dir, self.first, self.stop_after = out_dir, int(first), int(first) + max(int(count), 1) - 1
        self.clock = clock
        self.active = False
        self._local: str | None = None
        self.traces = 0
        if int(done) + 1 == self.first:
            self._start(state)

    def _phase(self):
        return self.clock.phase("profile") if self.clock is not None else contextlib.nullcontext()

    def _start(self, state: Any) -> None:
        with self._phase():
            if state is not None:
                jax.block_until_ready(state)
            self._local = tempfile.mkdtemp(prefix="sea_jax_profile_") if storage.is_remote(self.out_dir) \
                else self.out_dir
            storage.makedirs(self._local)
            jax.profiler.start_trace(self._local)
            self.active = True
            logging.info("profiling steps %d-%d into %s", self.first, self.stop_after, self.out_dir)

    def _stop(self, state: Any) -> None:
        with self._phase():
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            self.traces += 1
            if self._local != self.out_dir:
                storage.copytree(self._local, self.out_dir)
                shutil.rmtree(self._local, ignore_errors=True)
            logging.info("profile of steps %d-%d written to %s", self.first, self.stop_after, self.out_dir)

    def __call__(self, info: StepInfo) -> None:
        if self.active and (info.step >= self.stop_after or info.last):
            self._stop(info.state)
        elif not self.active and not self.traces and info.step + 1 == self.first and not info.last:
            self._start(info.state)

    def close(self) -> None:
        """Stops a trace still running (the run ended early, e.g. preempted)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def probe_picture(workdir: str, stage: int, num_images: int, run_path: str) -> np.ndarray:
    """The probe's picture (:func:`sea_jax.probe.run_probe`: each visual token's recalled word,
    green where right) of the run's newest checkpoint on its first ``num_images`` images, saved as
    ``<run folder>/probe.png`` and ``probe.json``; returns it as uint8 ``[H, W, 3]`` for the
    tracker."""
    from PIL import Image

    from sea_jax import probe

    with tempfile.TemporaryDirectory(prefix="sea_jax_probe_") as tmp:
        out = f"{tmp}/probe.png"
        probe.run_probe(workdir, stage=stage, out=out, num_images=num_images, plot_images=min(num_images, 4))
        for name in ("probe.png", "probe.json"):
            storage.copy(f"{tmp}/{name}", storage.join(run_path, name))
        with Image.open(out) as im:
            return np.asarray(im.convert("RGB"))


def checkpoint_hook(save: Callable[[int], None]) -> Callable[[StepInfo], None]:
    """Saves at the hook's period; the final step is saved by the trainer after the loop."""
    def hook(info: StepInfo) -> None:
        if not info.last:
            save(info.step)
    return hook


def eval_hook(evaluate: Callable[[int, Mapping, Mapping], dict], frozen: Mapping, tracker, clock) -> Callable[[StepInfo], None]:
    """Runs ``evaluate(step, params, tables)`` (:class:`sea_jax.eval.inloop.InLoopEval`) on the
    current parameters (the frozen parts and the state's trainable ones) and logs its ``eval/*``
    metrics as a row of their own. Reads parameters only: training continues bit for bit."""
    def hook(info: StepInfo) -> None:
        with clock.phase("eval"):
            metrics = evaluate(info.step, {**frozen, **info.state.params}, frozen)
        logging.info("step %d: %s", info.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        tracker.log(info.step, metrics)
    return hook


def preemption_hook(flag: ckpt_lib.PreemptionFlag, save: Callable[[int], None]) -> Callable[[StepInfo], None]:
    """After every step: if any process got SIGTERM, save this step and stop (exit status 0)."""
    def hook(info: StepInfo) -> None:
        if ckpt_lib.any_process(flag.is_set):
            logging.warning("preemption signal: saving step %d and exiting", info.step)
            save(info.step)
            raise StopTraining("preempted")
    return hook


__all__ = ["StepInfo", "StopTraining", "Hooks", "LogHook", "ProfileHook", "checkpoint_hook", "eval_hook", "preemption_hook",
           "probe_picture"]
