"""``python -m sea_jax.train`` with everything it can record turned on, on the tiny assets of
tests/test_train.py: a quiet terminal with progress lines and the goodput summary, every library's
lines in ``log.txt``, the manifest, TensorBoard events (scalars, histograms, the probe picture) read
back with TensorBoard's reader, a profile of the configured steps only, W&B offline files, data
wait from a deliberately slow source; then a resume after losing the newest checkpoint, which
must read as one trajectory everywhere and log into the same W&B run."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_observe import _trace_steps, accumulate, wandb_history
from test_train import ROOT, _args, _env, assets  # noqa: F401 - the module's tiny models and data

from sea_jax import manifest

SLOW = 0.15  # seconds the data source sleeps before each batch
STEPS = 6


def _slow_cli(args, log, env):
    """The training CLI in a subprocess whose data iterator sleeps SLOW s before each batch (the
    pipeline's own iterator, subclassed in place: checkpoints still save its state)."""
    code = (
        "import runpy, sys, time\n"
        "from sea_jax.data import pipeline\n"
        "make = pipeline.make_train_iterator\n"
        "def slow_make(*a, **k):\n"
        "    it, stats = make(*a, **k)\n"
        "    class Slow(type(it)):\n"
        "        def __next__(self):\n"
        f"            time.sleep({SLOW})\n"
        "            return super().__next__()\n"
        "    it.__class__ = Slow\n"
        "    return it, stats\n"
        "pipeline.make_train_iterator = slow_make\n"
        f"sys.argv = ['sea_jax.train'] + {list(args)!r}\n"
        "runpy.run_module('sea_jax.train', run_name='__main__', alter_sys=True)\n"
    )
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=400)
    out = open(log).read()
    assert p.returncode == 0, out[-4000:]
    return out


def _jsonl(run):
    return [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]


def _observe_args(a, wd, **extra):
    over = {"train.num_steps": STEPS, "train.checkpoint_every": 2, "train.log_every": 1, "train.progress": True,
            "log.progress_every": 2, "log.profile_start": 3, "log.profile_steps": 2, "log.wandb": True,
            "log.wandb_mode": "offline", "log.wandb_project": "sea-test", "log.probe_images": 2}
    over.update(extra)
    return _args(a, wd, 1, data=a["clean"], **over)


def test_cli_run_records_everything_and_a_resume_reads_as_one_trajectory(assets, tmp_path):  # noqa: F811
    wd = tmp_path / "wd"
    run = wd / "stage1"
    env = _env(WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)  # offline comes from the config
    args = _observe_args(assets, wd)
    out = _slow_cli(args, tmp_path / "a.log", env)

    # --- the terminal: what a person reads; library chatter in log.txt ---------------------------
    assert "compiled the train step" in out and "checkpoint at step 2" in out
    assert "checkpoint_manager.py" not in out and "composite_checkpoint_handler" not in out  # Orbax INFO
    progress_lines = [ln for ln in out.splitlines() if " step " in ln and "/6 (" in ln]
    assert [ln.split(" step ")[1].split(" ")[0] for ln in progress_lines] == ["2/6", "4/6", "6/6"]
    assert all("loss " in ln and "align " in ln and "tau " in ln and "tok/s " in ln and "data wait " in ln
               for ln in progress_lines)
    assert "goodput " in out and "stage 1 done at step 6/6" in out
    assert len(out.splitlines()) < 40, out
    log_txt = (run / "log.txt").read_text()
    assert "checkpoint_manager.py" in log_txt and "compiled the train step" in log_txt
    assert "step 6/6" in log_txt

    # --- data wait and goodput -------------------------------------------------------------------
    rows = _jsonl(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["data_wait"] >= 0.8 * SLOW, r
        assert r["compute_time"] == pytest.approx(r["step_time"] - r["data_wait"])
        for key in ("loss", "lm_loss", "align_loss", "tau", "unique_labels", "lr", "grad_norm", "step_time",
                    "tokens_per_s", "tflops_per_device", "mfu", "skipped_total", "truncated", "samples"):
            assert key in r, key
    summary = json.loads(out.strip().splitlines()[-1])  # the CLI's final JSON line
    g = summary["goodput"]
    assert g["data_wait_s"] >= 0.8 * SLOW * STEPS and g["compile_s"] > 0 and g["checkpoint_s"] > 0
    assert 0 < g["goodput"] < 1 and g["goodput"] == pytest.approx(g["steps_s"] / g["wall_s"])

    # --- the manifest ----------------------------------------------------------------------------
    m = manifest.read(str(run))
    assert m["command"]["argv"][1:] == args and "--config.log.profile_start=3" in m["command"]["shell"]
    commit, dirty = manifest.git_state()
    assert m["code"]["git_commit"] == commit and m["code"]["git_dirty"] == dirty and m["code"]["version"]
    assert m["python"] == sys.version.split()[0]
    import jax

    assert m["packages"]["jax"] == jax.__version__
    for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "tensorboardX", "wandb"):
        assert m["packages"][name], name
    assert m["devices"]["count"] == 8 and m["devices"]["platform"] == "cpu" and m["process_count"] == 1
    assert m["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and m["resumed_from"] == 0 and m["previous"] == []
    assert m["config"]["train"]["num_steps"] == STEPS and m["config"]["log"]["wandb"] is True
    assert m["end"]["stopped"] == "done" and m["end"]["step"] == STEPS and m["end"]["goodput"]["goodput"] > 0

    # --- TensorBoard, read by TensorBoard --------------------------------------------------------
    acc = accumulate(run / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [e.step for e in acc.Scalars("data_wait")] == list(range(1, STEPS + 1))
    hist = acc.Histograms("histogram/unique_labels")
    assert [h.step for h in hist] == list(range(1, STEPS + 1))  # one step per window (log_every=1)
    assert [h.histogram_value.sum for h in hist] == [r["unique_labels"] for r in rows]
    (probe,) = acc.Images("probe")
    assert probe.step == STEPS and probe.width > 100 and (run / "probe.png").exists()
    assert acc.Scalars("goodput/goodput")[0].value == pytest.approx(g["goodput"], rel=1e-5)

    # --- the profile: steps 3 and 4, nothing else -------------------------------------------------
    assert _trace_steps(str(run / "profile")) == [[3, 4]]

    # --- W&B offline -----------------------------------------------------------------------------
    run_id = (run / "wandb_id.txt").read_text().strip()
    (first,) = glob.glob(str(run / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    history, wb_run = wandb_history(first)
    assert wb_run.project == "sea-test" and wb_run.display_name == "wd/stage1"
    assert {s: h["loss"] for s, h in history.items()} == {r["step"]: r["loss"] for r in rows}

    # --- resume after losing the newest checkpoint: steps 5 and 6 are recomputed -----------------
    shutil.rmtree(run / "checkpoints" / str(STEPS))
    args_b = _observe_args(assets, wd, **{"log.probe_images": 0})
    out_b = _slow_cli(args_b, tmp_path / "b.log", env)
    assert "resumed from step 4" in out_b
    rows_b = _jsonl(run)
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))  # one trajectory
    assert [r["loss"] for r in rows_b[:4]] == [r["loss"] for r in rows[:4]]
    acc = accumulate(run / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows_b]
    assert (run / "wandb_id.txt").read_text().strip() == run_id  # the same W&B run
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2
    history_b, wb_run_b = wandb_history(files[1])
    assert wb_run_b.run_id == run_id and sorted(history_b) == [5, 6]
    np.testing.assert_allclose([history_b[s]["loss"] for s in (5, 6)], [r["loss"] for r in rows_b[4:]])
    m = manifest.read(str(run))
    assert m["resumed_from"] == 4 and len(m["previous"]) == 1 and m["previous"][0]["resumed_from"] == 0
    assert _trace_steps(str(run / "profile")) == [[3, 4]]  # the resumed run was past the window
