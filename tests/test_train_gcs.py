"""A run kept entirely in a bucket: ``python -m sea_jax.train`` / ``sea_jax.export`` /
``sea_jax.labels`` with every path ``gs://``, against the local GCS emulator (``tests/gcs_server.py``).

What is shown, on the assets and the uninterrupted reference run of ``test_train``:
* stage 1 with workdir, data JSON, images, word list and both model checkpoints in the bucket;
  metrics rows readable from the bucket while the run goes; kill -9 after a checkpoint; the same
  command resumes, and the final parameters equal the *local* reference run's bit for bit;
* stage 2 from that run's adapter, in the bucket;
* ``sea_jax.export`` from the gs:// workdir to a gs:// folder: transformers loads it and gives
  our logits; ``sea_jax.probe`` reads the run and writes its picture and JSON into the bucket;
* ``sea_jax.labels`` writes its shards to the bucket, and a second run finds them done;
* a workdir in a missing bucket fails before anything compiles, naming the path (exit 2).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from sea_jax import storage
from test_train import (ROOT, STEPS, _assert_trees_equal, _env, _params, _resume_args, assets,  # noqa: F401
                        reference)


def _upload(a, base):
    """The assets in the bucket under ``base``; returns the same dict with gs:// paths."""
    out = dict(a)
    for key in ("llm", "siglip", "images"):
        storage.copytree(a[key], storage.join(base, key))
        out[key] = storage.join(base, key)
    for key in ("words", "clean", "stage2"):
        dst = storage.join(base, os.path.basename(a[key]))
        storage.copy(a[key], dst)
        out[key] = dst
    return out


def _gs_args(g, workdir, stage=1, **extra):
    """``test_train``'s resume-test arguments with every path in the bucket (the word-table cache
    too, which the local runs keep in a shared folder)."""
    args = _resume_args(g, workdir, **{"labels.cache_dir": storage.join(workdir, "word_cache"), **extra})
    if stage == 2:
        args = [a.replace("tiny.py", "tiny.py:stage2") if a.startswith("--config=") else a for a in args]
        args = [f"--config.data.json={g['stage2']}" if a.startswith("--config.data.json=") else a for a in args]
    return args


def _popen(args, log, env, module="sea_jax.train"):
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _ok(p, log, timeout=400):
    rc = p.wait(timeout=timeout)
    out = open(log).read()
    assert rc == 0, out[-4000:]
    return out


def _ckpt_steps(ckdir):
    if not storage.isdir(ckdir):
        return []
    return sorted(int(n) for n in storage.listdir(ckdir) if n.isdigit())


def _rows(path):
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def test_a_run_in_a_bucket_resumes_bit_exact_and_exports(assets, reference, gcs, tmp_path):  # noqa: F811
    g = _upload(assets, f"gs://{gcs.bucket}/inputs")
    env = os.environ | _env() | gcs.env
    wd = f"gs://{gcs.bucket}/runs/r1"
    run = storage.join(wd, "stage1")
    ckdir, metrics = storage.join(run, "checkpoints"), storage.join(run, "metrics.jsonl")

    # A: metrics visible in the bucket while the run goes; kill -9 once a checkpoint is committed
    p = _popen(_gs_args(g, wd), tmp_path / "a.log", env)
    seen_while_running, t0 = [], time.time()
    while time.time() - t0 < 300:
        assert p.poll() is None, open(tmp_path / "a.log").read()[-4000:]
        if not seen_while_running:
            seen_while_running = _rows(metrics)
        if _ckpt_steps(ckdir) and seen_while_running:
            break
        time.sleep(0.2)
    # a step folder is listed as soon as Orbax starts writing it; wait for the next one so that
    # at least one is complete, then kill
    first = _ckpt_steps(ckdir)[0]
    while max(_ckpt_steps(ckdir)) == first and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "finished before the kill; the test needs more steps"
    p.kill()
    p.wait()
    assert seen_while_running and seen_while_running[0]["step"] == 1
    assert not storage.exists(storage.join(wd, "gs:"))  # nothing named like a mangled URL

    # B: the same command resumes from the bucket and ends where the local reference ends
    out = _ok(_popen(_gs_args(g, wd), tmp_path / "b.log", env), tmp_path / "b.log")
    assert "resumed from step" in out
    step, params = _params(run)
    ref_step, ref_params = _params(reference)
    assert step == ref_step == STEPS
    _assert_trees_equal(params, ref_params)
    for name in ("config.json", "manifest.json", "log.txt"):
        assert storage.exists(storage.join(run, name)), name
    assert storage.isdir(storage.join(run, "tokenizer"))
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(storage.join(run, "tensorboard")))
    assert storage.listdir(storage.join(wd, "word_cache"))  # the word-table cache is in the bucket too

    # stage 2 from the bucket's stage-1 adapter
    _ok(_popen(_gs_args(g, wd, stage=2, **{"train.num_steps": 4, "train.checkpoint_every": 0}), tmp_path / "s2.log",
               env), tmp_path / "s2.log")
    _, p2 = _params(storage.join(wd, "stage2"))
    assert sorted(p2) == ["adapter", "llm"]

    # export from the gs:// workdir to a gs:// folder; transformers gives our logits
    hf_out = f"gs://{gcs.bucket}/exports/r1"
    exp = subprocess.run([sys.executable, "-m", "sea_jax.export", f"--workdir={wd}", f"--out={hf_out}",
                          "--dtype=float32"], cwd=ROOT, env=os.environ | _env(devices=1) | gcs.env,
                         capture_output=True, text=True, timeout=300)
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-4000:]
    local = str(tmp_path / "hf")
    storage.copytree(hf_out, local)
    _check_export_logits(local, wd, assets)

    # the probe reads the gs:// run and its gs:// data, and writes its picture and JSON beside it
    probe = subprocess.run([sys.executable, "-m", "sea_jax.probe", f"--workdir={wd}", "--stage=1",
                            "--num_images=4", "--plot_images=2"], cwd=ROOT,
                           env=os.environ | _env(devices=1) | gcs.env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-4000:]
    summary = json.loads(storage.read_text(storage.join(wd, "probe.json")))
    assert summary["png"] == storage.join(wd, "probe.png") and storage.size(summary["png"]) > 1000
    assert 0.0 <= summary["run"]["label_accuracy"] <= 1.0


def _check_export_logits(folder, wd, assets):  # noqa: F811
    import jax
    import jax.numpy as jnp
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sea_jax.builder import load_trained
    from sea_jax.models.mllm import MLLM

    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=Image.open(assets["root"] / "images" / "img3.png"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        want = hf(**inputs).logits.numpy()
    ours = load_trained(wd)
    got = MLLM(ours.cfg)(jax.tree.map(jnp.asarray, ours.params),
                         jnp.asarray(inputs["pixel_values"].permute(0, 2, 3, 1).numpy()),
                         jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy())).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_labels_write_shards_to_a_bucket_and_resume(assets, gcs, tmp_path):  # noqa: F811
    g = _upload(assets, f"gs://{gcs.bucket}/label_inputs")
    wd = f"gs://{gcs.bucket}/labels_run"
    args = [f"--config={os.path.join(ROOT, 'tests', 'configs', 'labels_tiny.py')}", f"--workdir={wd}",
            f"--config.vision.checkpoint={g['siglip']}", f"--config.labels.word_list={g['words']}",
            f"--config.data.json={g['clean']}", f"--config.data.image_root={g['images']}",
            "--config.labels.shard_size=16"]
    env = os.environ | _env() | gcs.env
    out1 = _ok(_popen(args, tmp_path / "l1.log", env, "sea_jax.labels"), tmp_path / "l1.log")
    out_dir = storage.join(wd, "labels")
    names = storage.listdir(out_dir)
    shards = [n for n in names if n.startswith("shard-")]
    assert len(shards) == 3 and {"index.json", "meta.json", "words.txt", "summary.json"} <= set(names), names
    index = json.loads(storage.read_text(storage.join(out_dir, "index.json")))
    assert index
    # one shard lost (a preempted labeller): the next run writes only that one
    storage.remove(storage.join(out_dir, shards[1]))
    out2 = _ok(_popen(args, tmp_path / "l2.log", env, "sea_jax.labels"), tmp_path / "l2.log")
    assert storage.exists(storage.join(out_dir, shards[1]))
    assert json.loads(storage.read_text(storage.join(out_dir, "index.json"))) == index
    assert out1 != out2


def test_missing_bucket_fails_before_compiling(assets, gcs, tmp_path):  # noqa: F811
    wd = "gs://no-such-bucket-sea/run"
    p = subprocess.run([sys.executable, "-m", "sea_jax.train", *_resume_args(assets, wd)], cwd=ROOT,
                       env=os.environ | _env() | gcs.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    err = p.stdout + p.stderr
    assert "gs://no-such-bucket-sea/run" in err and "not writable" in err
    assert "Traceback" not in err and "compil" not in err.lower()
