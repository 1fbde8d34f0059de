"""Observability pieces on their own: the tracker's sinks read back with TensorBoard's own reader
and from wandb's offline files, local and on the gs:// emulator while the writer is open; the
clock's data wait and goodput; the profiler's step window; the progress lines; the terminal vs
log-file routing; the manifest. End-to-end CLI runs are in ``tests/test_observe_cli.py``."""
import glob
import io
import json
import logging
import os
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sea_jax import config as config_lib
from sea_jax import goodput, logs, manifest, progress, storage, tracking
from sea_jax.errors import ConfigError
from sea_jax.train import hooks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_config(**kw):
    c = config_lib.base_config().log
    c.update(kw)
    return c


def accumulate(logdir):
    """TensorBoard's own reader over every event file of ``logdir`` (purging orphaned events as
    TensorBoard does after a restart)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------------------------
# tracking: metrics.jsonl and TensorBoard


def test_tensorboard_scalars_histogram_image_read_back_by_tensorboard(tmp_path):
    t = tracking.Tracker(str(tmp_path), log_config(), 0)
    for s in (1, 2, 3):
        t.log(s, {"loss": jnp.asarray(2.0 / s), "mfu": None, "bad": float("nan"), "n": np.int32(s)})
    t.histogram("histogram/unique_labels", 3, np.asarray([5, 7, 7, 9]))
    t.histogram("histogram/empty", 3, np.zeros(0))  # nothing to show: no event
    picture = np.zeros((20, 30, 3), np.uint8)
    picture[:, :10, 0] = 255
    t.image("probe", 3, picture)
    t.summary({"goodput/goodput": 0.5}, 3)
    t.close()

    rows = tracking.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows[0] == {"step": 1, "loss": 2.0, "mfu": None, "bad": rows[0]["bad"], "n": 1}
    assert np.isnan(rows[0]["bad"])  # a diverged value stays visible in the jsonl

    acc = accumulate(tmp_path / "tensorboard")
    tags = acc.Tags()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3))]
    assert "mfu" not in tags["scalars"] and "bad" not in tags["scalars"]  # None and NaN are not plotted
    assert acc.Scalars("goodput/goodput")[0].value == 0.5
    (h,) = acc.Histograms("histogram/unique_labels")
    assert h.step == 3 and h.histogram_value.num == 4 and h.histogram_value.min == 5 and h.histogram_value.max == 9
    assert h.histogram_value.sum == 28
    assert "histogram/empty" not in tags["histograms"]
    (im,) = acc.Images("probe")
    assert (im.step, im.width, im.height) == (3, 30, 20)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(im.encoded_image_string))), picture)


def test_resume_reads_as_one_trajectory_in_jsonl_and_tensorboard(tmp_path):
    first = tracking.Tracker(str(tmp_path), log_config(), 0)
    for s in range(1, 7):  # killed after step 6; its newest checkpoint is step 4
        first.log(s, {"loss": float(s)})
    first.close()
    time.sleep(1.1)  # a later event file, as a real restart gives
    again = tracking.Tracker(str(tmp_path), log_config(), 4)
    for s in range(5, 9):
        again.log(s, {"loss": 10.0 + s})
    again.close()
    rows = tracking.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [1, 2, 3, 4, 15, 16, 17, 18]
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 2
    acc = accumulate(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 15), (6, 16),
                                                                (7, 17), (8, 18)]


def test_truncate_drops_cut_lines_and_later_steps(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a"')
    tracking.truncate_after(str(p), 2)
    assert p.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'


def test_disabled_tracker_writes_nothing(tmp_path):
    off = tracking.Tracker(str(tmp_path / "other"), log_config(wandb=True), 0, enabled=False)
    off.log(1, {"loss": 1.0})
    off.histogram("h", 1, np.ones(3))
    off.close()
    assert not (tmp_path / "other").exists()


def test_gs_run_folder_metrics_events_manifest_visible_while_running(gcs):
    run = f"gs://{gcs.bucket}/observe/stage1"
    t = tracking.Tracker(run, log_config(), 0, flush_secs=0.3)
    for s in (1, 2):
        t.log(s, {"loss": 1.0 / s})
    t.histogram("histogram/unique_labels", 2, np.asarray([3.0, 4.0]))
    # metrics.jsonl: flushed per row, in the bucket before the writer closes
    assert [r["step"] for r in tracking.read_jsonl(f"{run}/metrics.jsonl")] == [1, 2]
    # the event file: in the bucket within tensorboardX's flush period, while the writer is open
    deadline = time.time() + 20
    while True:
        files = storage.glob(f"{run}/tensorboard/events.out.tfevents.*")
        if files and storage.size(files[0]) > 150:
            break
        assert time.time() < deadline, files
        time.sleep(0.1)
    t.close()
    local = storage.local_copy(f"{run}/tensorboard")
    acc = accumulate(local)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert acc.Histograms("histogram/unique_labels")[0].histogram_value.num == 2

    # a resumed attempt on gs:// continues the jsonl after truncating it
    t2 = tracking.Tracker(run, log_config(), 1)
    t2.log(2, {"loss": 0.25})
    t2.close()
    assert [r["loss"] for r in tracking.read_jsonl(f"{run}/metrics.jsonl")] == [1.0, 0.25]

    # the manifest and the run log on gs://
    m = manifest.start(run, {"started": "x", "config": {}})
    assert manifest.read(run)["started"] == "x" and m["previous"] == []
    manifest.start(run, {"started": "y"})
    manifest.finish(run, {"stopped": "done", "step": 2})
    got = manifest.read(run)
    assert got["started"] == "y" and got["previous"][0]["started"] == "x" and got["end"]["step"] == 2
    logger = logging.getLogger("sea_jax.test_observe")
    logger.setLevel(logging.INFO)
    with logs.run_log(logs.run_log_path(run, 0)):
        logger.warning("visible at once")
        assert "visible at once" in storage.read_text(f"{run}/log.txt")
        logger.info("flushed by the end")
    assert "flushed by the end" in storage.read_text(f"{run}/log.txt")


# ----------------------------------------------------------------------------------------------
# Weights & Biases (offline only: no network here)


def wandb_records(path):
    """The records of an offline ``run-<id>.wandb`` file: the LevelDB log format (32 KiB blocks,
    7-byte record headers, fragments FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) after wandb's 7-byte
    file header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, i, part, out = 32768, 7, b"", []
    while i + 7 <= len(data):
        left = block - i % block
        if left < 7:
            i += left
            continue
        _, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if kind == 0 and n == 0:
            i += left
            continue
        chunk, i = data[i + 7:i + 7 + n], i + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            part = chunk
        elif kind == 3:
            part += chunk
        elif kind == 4:
            out.append(part + chunk)
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def wandb_history(path):
    """({step: {key: value}} of the logged rows, the run record) of an offline run file."""
    rows, run = {}, None
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
        elif kind == "run":
            run = r.run
    return rows, run


def test_wandb_offline_files_hold_the_metrics_and_the_id_survives_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = log_config(tensorboard=False, wandb=True, wandb_mode="offline", wandb_project="proj", wandb_name="arm-a")
    run = tmp_path / "wd" / "stage1"
    t = tracking.Tracker(str(run), cfg, 0, config_dict={"seed": 3})
    first_id = t.wandb.run_id
    t.log(1, {"loss": 2.5, "mfu": None})
    t.log(2, {"loss": 1.5})
    t.histogram("histogram/unique_labels", 2, np.asarray([1.0, 2.0]))
    t.close()
    t = tracking.Tracker(str(run), cfg, 2)  # the resumed attempt
    assert t.wandb.run_id == first_id == (run / "wandb_id.txt").read_text().strip()
    t.log(3, {"loss": 0.5})
    t.close()
    files = glob.glob(str(run / "wandb" / "offline-run-*" / f"run-{first_id}.wandb"))
    assert len(files) == 2  # one offline folder per attempt, both of the same run id
    # In attempt order by their first step: folder names cannot tell. Two attempts in the same
    # second get "offline-run-<time>-<id>" and "...-<id>-1", and the second sorts first as a path.
    (rows1, run1), (rows2, run2) = sorted(map(wandb_history, files), key=lambda h: min(h[0]))
    assert run1.run_id == run2.run_id == first_id and run1.project == "proj" and run1.display_name == "arm-a"
    assert rows1[1]["loss"] == 2.5 and rows1[2]["loss"] == 1.5 and "mfu" not in rows1[1]
    # wandb stores a histogram as nested keys: bin counts (summing to the values' count) and edges
    assert rows1[2]["histogram/unique_labels/_type"] == "histogram"
    assert sum(rows1[2]["histogram/unique_labels/values"]) == 2
    assert rows2[3]["loss"] == 0.5


def test_wandb_off_never_imports_it_and_missing_wandb_is_a_user_error(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['wandb'] = None  # as if not installed: importing it raises ImportError\n"
        "from sea_jax import config, tracking\n"
        "from sea_jax.errors import ConfigError\n"
        f"t = tracking.Tracker({str(tmp_path / 'a')!r}, config.base_config().log, 0)\n"
        "t.log(1, {'loss': 1.0}); t.close()\n"
        "c = config.base_config().log; c.wandb = True\n"
        "try:\n"
        f"    tracking.Tracker({str(tmp_path / 'b')!r}, c, 0)\n"
        "except ConfigError as e:\n"
        "    print('user error:', e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "user error: config.log.wandb=True needs the wandb package" in p.stdout
    with pytest.raises(ConfigError, match="wandb_mode"):
        tracking.check_wandb_config(log_config(wandb_mode="sometimes"))


# ----------------------------------------------------------------------------------------------
# goodput and data wait


def test_clock_charges_exclusive_time_and_goodput():
    clock = goodput.Clock()
    with clock.phase("compile"):
        time.sleep(0.05)
    with clock.phase("steps"):
        for _ in range(3):
            with clock.phase("data_wait"):
                time.sleep(0.04)
            time.sleep(0.02)  # the "step"
    time.sleep(0.03)  # in no phase: other
    s = clock.summary()
    assert s["compile_s"] == pytest.approx(0.05, abs=0.03)
    assert s["data_wait_s"] == pytest.approx(0.12, abs=0.04)
    assert s["steps_s"] == pytest.approx(0.06, abs=0.04)  # the loop less its data stalls
    assert s["other_s"] == pytest.approx(0.03, abs=0.03)
    assert s["goodput"] == pytest.approx(s["steps_s"] / s["wall_s"])
    assert sum(v for k, v in s.items() if k.endswith("_s") and k != "wall_s") == pytest.approx(s["wall_s"], abs=1e-3)
    line = goodput.format_summary(s)
    assert line.startswith(f"goodput {100 * s['goodput']:.1f}% of ") and "data wait" in line


class _Recorder:
    def __init__(self):
        self.rows, self.hists = [], []
        self.enabled = True

    def log(self, step, row):
        self.rows.append(dict(row, step=step))

    def histogram(self, tag, step, values):
        self.hists.append((tag, step, np.asarray(values)))


def test_log_hook_measures_data_wait_from_a_slow_source():
    """A loop like the trainer's over a source that takes 80 ms per batch and a 'step' of 20 ms:
    the logged data_wait is the source's time, compute_time the rest."""
    clock = goodput.Clock()
    rec = _Recorder()
    shown = progress.Progress(4, enabled=False)
    log = hooks.LogHook(rec, shown, clock, lambda length: 1e9, None, 2, lambda: {"samples": 8})

    def source():
        while True:
            time.sleep(0.08)
            yield {"input_ids": np.zeros((2, 5), np.int32), "label_scores": np.asarray([[[0.5, 0.0]], [[0.2, -1.0]]])}

    it = source()
    side = hooks.Hooks()
    side.add(log.collect)
    side.add(log, every=2)
    with clock.phase("steps"):
        for step in range(1, 5):
            with clock.phase("data_wait"):
                batch = next(it)
            time.sleep(0.02)
            m = {"loss": jnp.asarray(1.0), "unique_labels": jnp.asarray(step + 2)}
            side.run(hooks.StepInfo(step, 4, None, m, batch))
    assert [r["step"] for r in rec.rows] == [2, 4]
    for r in rec.rows:
        assert r["data_wait"] == pytest.approx(0.08, abs=0.03)
        assert r["compute_time"] == pytest.approx(r["step_time"] - r["data_wait"])
        assert r["data_wait"] > 0.4 * r["step_time"]  # a data-bound run says so
        assert r["tokens_per_s"] == pytest.approx(2 * 5 / r["step_time"]) and r["samples"] == 8
    s = clock.summary()
    assert s["data_wait_s"] == pytest.approx(4 * 0.08, abs=0.08) and s["goodput"] < 0.4
    by_tag = {(tag, step): v for tag, step, v in rec.hists}
    np.testing.assert_array_equal(by_tag[("histogram/unique_labels", 2)], [3, 4])
    np.testing.assert_array_equal(by_tag[("histogram/unique_labels", 4)], [5, 6])
    np.testing.assert_array_equal(by_tag[("histogram/label_scores", 4)], [0.5, 0.2])  # labelled slots only


def test_log_hook_counts_real_and_computed_tokens_over_buckets():
    """Steps of two bucket lengths between two rows: computed tokens are batch x each step's length,
    real ones the steps' ``real_tokens``; FLOPs are summed per step at its own length; mfu_real
    counts only the real tokens' share."""
    clock = goodput.Clock()
    rec = _Recorder()
    flops = {4: 100.0, 8: 300.0}
    log = hooks.LogHook(rec, progress.Progress(2, enabled=False), clock, flops.__getitem__, 1e-12, 2,
                        lambda: {}, histograms=False)
    side = hooks.Hooks()
    side.add(log.collect)
    side.add(log, every=2)
    for step, (length, real) in enumerate([(4, 6), (8, 4)], start=1):
        batch = {"input_ids": np.zeros((2, length), np.int32)}
        side.run(hooks.StepInfo(step, 2, None, {"loss": jnp.asarray(1.0), "real_tokens": jnp.asarray(real)}, batch))
    (row,) = rec.rows
    span = 2 * row["step_time"]
    assert row["seq_len"] == 8
    assert row["tokens_per_s"] == pytest.approx((2 * 4 + 2 * 8) / span)
    assert row["real_tokens_per_s"] == pytest.approx(10 / span)
    assert row["padding_fraction"] == pytest.approx(1 - 10 / 24)
    devices = jax.device_count()
    assert row["tflops_per_device"] == pytest.approx(400 / span / devices / 1e12)
    assert row["mfu"] == pytest.approx(400 / span / devices)  # peak 1e-12 TFLOP/s = 1 FLOP/s
    assert row["mfu_real"] == pytest.approx((100 * 6 / 8 + 300 * 4 / 16) / span / devices)


# ----------------------------------------------------------------------------------------------
# profiler window


def _trace_steps(out_dir):
    """Step numbers of the ``train`` step annotations in each trace under ``out_dir``."""
    import gzip

    found = []
    for p in sorted(glob.glob(os.path.join(out_dir, "plugins", "profile", "*", "*.trace.json.gz"))):
        trace = json.load(gzip.open(p))
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        found.append(sorted({int(e["args"]["step_num"]) for e in events
                             if e.get("name") == "train" and "step_num" in e.get("args", {})}))
    return found


def _profiled_loop(out_dir, first, count, total, done=0):
    f = jax.jit(lambda x: x @ x / 10.0)
    state = jnp.ones((64, 64))
    prof = hooks.ProfileHook(out_dir, first, count, done, state=state)
    for step in range(done + 1, total + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state = f(state)
        prof(hooks.StepInfo(step, total, state, {}, {}))
    prof.close()
    return prof


def test_profile_trace_holds_the_window_and_nothing_outside(tmp_path):
    _profiled_loop(str(tmp_path / "a"), first=3, count=2, total=6)
    assert _trace_steps(str(tmp_path / "a")) == [[3, 4]]
    # a window that starts with the run's first step, and one cut by the run's end
    _profiled_loop(str(tmp_path / "b"), first=1, count=2, total=4)
    assert _trace_steps(str(tmp_path / "b")) == [[1, 2]]
    _profiled_loop(str(tmp_path / "c"), first=3, count=5, total=4)
    assert _trace_steps(str(tmp_path / "c")) == [[3, 4]]
    # a resumed run already past the window takes no trace
    prof = _profiled_loop(str(tmp_path / "d"), first=2, count=2, total=6, done=3)
    assert prof.traces == 0 and not (tmp_path / "d").exists()


def test_profile_to_gs_is_copied_when_the_trace_stops(gcs, tmp_path):
    out = f"gs://{gcs.bucket}/observe-profile/stage1/profile"
    _profiled_loop(out, first=2, count=1, total=3)
    local = storage.local_copy(out, cache_dir=str(tmp_path / "cache"))
    assert _trace_steps(local) == [[2]]


# ----------------------------------------------------------------------------------------------
# progress display


def test_plain_progress_lines_without_a_tty(caplog):
    row = {"loss": 5.741, "align_loss": 1.626, "tau": 0.07, "tokens_per_s": 24680.0, "mfu": 0.412,
           "data_wait": 0.0031, "step_time": 0.155, "lm_loss": 4.1}
    assert progress.format_line(120, 1000, row) == (
        "step 120/1000 (12%) | loss 5.741 | align 1.626 | tau 0.0700 | tok/s 2.468e+04 | MFU 41.2% "
        "| data wait 3.1 ms (2%)")
    assert progress.format_line(1, 4, {"loss": 2.0, "mfu": None}) == "step 1/4 (25%) | loss 2"
    p = progress.Progress(10, every=4, tty=False)
    with caplog.at_level(logging.INFO, logger="sea_jax.progress"):
        for s in range(1, 11):
            p.advance()
            p.show(s, {"loss": float(s)})
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "sea_jax.progress"]
    assert [ln.split(" (")[0] for ln in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert all(getattr(r, logs.TERMINAL) for r in caplog.records if r.name == "sea_jax.progress")
    # on a terminal: a bar whose postfix holds the same values, and no plain lines
    caplog.clear()
    bar = progress.Progress(1000, initial=119, tty=True)
    with caplog.at_level(logging.INFO, logger="sea_jax.progress"):
        bar.advance()
        bar.show(120, row)
    assert bar._bar.n == 120 and not caplog.records
    assert bar._bar.postfix == ("loss=5.741, align=1.626, tau=0.0700, tok/s=2.468e+04, MFU=41.2%, "
                                "data wait=3.1 ms (2%)")
    bar.close()


# ----------------------------------------------------------------------------------------------
# terminal vs log file


def _record(path, level=logging.INFO, **extra):
    r = logging.LogRecord("x", level, path, 1, "hello", None, None)
    r.__dict__.update(extra)
    return r


def test_terminal_filter_modes():
    pkg = os.path.join(ROOT, "sea_jax")
    trainer, library = os.path.join(pkg, "train", "loop.py"), os.path.join(pkg, "builder.py")
    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    brief, every, quiet = logs.TerminalFilter("brief"), logs.TerminalFilter("all"), logs.TerminalFilter("warning")
    assert brief.filter(_record(trainer)) and not brief.filter(_record(library)) and not brief.filter(_record(orbax))
    assert brief.filter(_record(orbax, logging.WARNING))
    assert brief.filter(_record(library, **{logs.TERMINAL: True}))
    assert every.filter(_record(orbax)) and not every.filter(_record(orbax, logging.DEBUG))
    assert not quiet.filter(_record(trainer)) and quiet.filter(_record(orbax, logging.ERROR))
    with pytest.raises(ConfigError, match="log.terminal"):
        logs.TerminalFilter("loud")


def test_run_log_gets_everything_and_holds_early_records(tmp_path):
    handler = logs.RunLogHandler()
    lib = logging.getLogger("orbax.fake")
    lib.setLevel(logging.INFO)
    lib.addHandler(handler)
    try:
        lib.info("before the run")  # held until a run's log opens
        handler.open(str(tmp_path / "s1" / "log.txt"))
        lib.info("during the run %d", 1)
        handler.detach()
        lib.info("after the run")  # goes to the last run's log at close
        handler.close()
    finally:
        lib.removeHandler(handler)
    text = (tmp_path / "s1" / "log.txt").read_text().splitlines()
    assert [ln.split("] ", 1)[1] for ln in text] == ["before the run", "during the run 1", "after the run"]
    assert text[0].startswith("I") and "test_observe.py:" in text[0]


def test_capture_native_stderr_sends_fd2_to_the_log(capfd, caplog):
    with caplog.at_level(logging.INFO, logger="sea_jax.native"):
        with logs.capture_native_stderr():
            os.write(2, b"E0000 libtpu: could not determine TPU accelerator type\n")
    assert "libtpu" not in capfd.readouterr().err
    assert ["native: E0000 libtpu: could not determine TPU accelerator type"] == [
        r.getMessage() for r in caplog.records if r.name == "sea_jax.native"]
    with pytest.raises(RuntimeError):
        with logs.capture_native_stderr():
            os.write(2, b"why it failed\n")
            raise RuntimeError("no backend")
    assert "why it failed" in capfd.readouterr().err  # shown when the block fails


def test_setup_keeps_transformers_advice_off_the_terminal(tmp_path):
    """A fresh install has no torch: transformers advises "PyTorch was not found" at import.
    torch is hidden here from transformers' availability check (importlib.util.find_spec); after
    logs.setup the advice is not printed."""
    hide_torch = (
        "import importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, package=None: (\n"
        "    None if name.split('.')[0] == 'torch' else real(name, package))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    plain = subprocess.run([sys.executable, "-c", hide_torch + "import transformers\n"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    routed = subprocess.run([sys.executable, "-c", hide_torch + "from sea_jax import logs\nlogs.setup()\n"
                             "import transformers\n"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "PyTorch was not found" in plain.stderr, plain.stderr[-2000:]  # the control: the message exists
    assert routed.returncode == 0, routed.stderr[-2000:]
    assert "PyTorch was not found" not in routed.stderr


# ----------------------------------------------------------------------------------------------
# manifest


def test_manifest_fields_and_previous_attempts(tmp_path):
    c = config_lib.base_config()
    m = manifest.collect(c, mesh_shape={"data": 8, "fsdp": 1, "tensor": 1}, resumed_from=0,
                         argv=["-m", "sea_jax.train", "--workdir=/tmp/x y"])
    assert m["command"]["argv"][-1] == "--workdir=/tmp/x y" and "'--workdir=/tmp/x y'" in m["command"]["shell"]
    assert m["code"]["version"] == "0.1.0"
    commit, dirty = manifest.git_state()
    assert m["code"]["git_commit"] == commit and m["code"]["git_dirty"] == dirty
    if commit is not None:
        assert len(commit) == 40 and isinstance(dirty, bool)
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "tensorboardX"):
        assert m["packages"][name], name
    assert m["packages"]["jax"] == jax.__version__
    assert m["devices"]["count"] == jax.device_count() and m["devices"]["kind"] == jax.devices()[0].device_kind
    assert m["process_count"] == 1 and m["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert m["config"]["train"]["batch_size"] == c.train.batch_size and m["python"] == sys.version.split()[0]
    assert manifest.git_state(str(tmp_path)) == (None, None)  # not a checkout


@pytest.mark.parametrize("field, value, message", [
    ("terminal", "loud", "config.log.terminal='loud'"),
    ("wandb_mode", "sometimes", "config.log.wandb_mode='sometimes'"),
    ("profile_start", -1, "config.log.profile_start=-1"),
    ("profile_steps", 0, "config.log.profile_steps=0"),
    ("progress_every", -2, "config.log.progress_every=-2"),
])
def test_bad_log_fields_are_user_errors(field, value, message):
    from sea_jax.train.loop import check_log_config

    c = config_lib.base_config()
    check_log_config(c)  # the defaults are fine
    c.log[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_log_config(c)
