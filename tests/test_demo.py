"""The demo's generated world, its assets, ``sea_jax.demo.prepare`` and a short stage-1 run on them.

What is shown:
* the world is a function of (seed, index); the per-patch truth agrees with the geometry, checked
  independently of the renderer's id map (every sub-pixel of the patch inside the shape) and with
  the pixels (a patch a shape fully covers has that shape's colour);
* the assets load through the code a real run uses (tokenizers, ``parse_record``, the chat
  encoder, the word-list loader);
* ``prepare`` writes once: a second call rewrites nothing, a different world in the same workdir
  is refused, a half-built folder is replaced;
* ``prepare`` then ``train`` runs stage 1 with SEA on, finite losses;
* the pretraining of the towers (``demo.pretrain``): the sigmoid loss against numpy, its losses go
  down, and its HF folders load as the run's checkpoints;
* the whole demo through the CLI, reduced (fewer images and steps), in under 3 minutes: both
  arms, stage 2, the table, the report files and the picture.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from sea_jax.demo import world as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(arg=None, **demo):
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.demo.update({"num_images": 24, "num_eval": 4, "pretrain": False, **demo})
    c.lock()  # as the CLI hands it over: prepare must not need to add fields
    return c


CFG = W.WorldConfig()


def test_world_is_a_function_of_seed_and_index():
    a, b = W.sample(CFG, 3, 7), W.sample(CFG, 3, 7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.shape_word, b.shape_word)
    assert a.caption == b.caption and a.conversation == b.conversation
    others = [W.sample(CFG, 4, 7), W.sample(CFG, 3, 8)]
    assert all(not np.array_equal(a.image, o.image) for o in others)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert a.shape_word.shape == a.colour_word.shape == a.object_map.shape == (CFG.grid, CFG.grid) == (8, 8)


def _covered(obj, patch_x, patch_y, cfg):
    """Share of the patch's sub-pixels inside ``obj``, from the shape's geometry alone."""
    ss = cfg.supersample
    c = (np.arange(cfg.patch_size * ss) + 0.5) / ss
    x, y = np.meshgrid(patch_x * cfg.patch_size + c, patch_y * cfg.patch_size + c)
    return W.shape_mask(obj.kind, x - obj.x, y - obj.y, obj.r).mean()


def test_patch_truth_matches_geometry_and_pixels():
    words = W.label_words()
    full = empty = 0
    for i in range(30):
        s = W.sample(CFG, 0, i)
        assert 1 <= len(s.scene.objects) <= CFG.max_objects
        # every object wins at least one patch (the caption names nothing invisible)
        assert set(np.unique(s.object_map[s.object_map > 0])) == set(range(1, len(s.scene.objects) + 1))
        for py in range(CFG.grid):
            for px in range(CFG.grid):
                cover = [_covered(o, px, py, CFG) for o in s.scene.objects]
                inside = [k for k, f in enumerate(cover) if f == 1.0]
                if inside:
                    o = s.scene.objects[inside[-1]]  # the topmost shape covering the whole patch
                    assert words[s.shape_word[py, px]] == o.kind, (i, py, px)
                    assert words[s.colour_word[py, px]] == o.colour, (i, py, px)
                    assert s.coverage[py, px] == 1.0
                    # the pixels agree (rows are y): the shape's colour up to the sensor noise
                    patch = s.image[py * 8:(py + 1) * 8, px * 8:(px + 1) * 8].reshape(-1, 3).mean(0)
                    np.testing.assert_allclose(patch, o.rgb, atol=4)
                    full += 1
                elif max(cover, default=0.0) == 0.0:
                    assert words[s.shape_word[py, px]] == words[s.colour_word[py, px]] == s.scene.background
                    assert s.object_map[py, px] == 0
                    empty += 1
    assert full > 50 and empty > 500  # both cases were really exercised


def test_text_describes_the_scene():
    for i in range(20):
        s = W.sample(CFG, 1, i)
        objs = sorted(s.scene.objects, key=lambda o: o.x)
        assert s.caption.endswith(f" on {s.scene.background}")
        # named left to right, each with its size, colour and kind
        pos = [s.caption.index(f"{o.size} {o.colour} {o.kind}") for o in objs]
        assert pos == sorted(pos)
        kinds = {o.kind: o for o in s.scene.objects}
        assert 1 <= len(s.conversation) <= CFG.qa_turns
        for q, a in s.conversation:
            if q == "how many shapes are there?":
                assert a == W.NUMBERS[len(objs) - 1]
            elif q.startswith("what colour is the "):
                assert a == kinds[q[len("what colour is the "):-1]].colour
            elif q.startswith("is there a "):
                assert a == ("yes" if q[len("is there a "):-1] in kinds else "no")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from sea_jax.demo import prepare

    wd = tmp_path_factory.mktemp("demo")
    config = demo_config()
    return wd, config, prepare(config, str(wd))


def test_assets_load_with_the_run_code(prepared):
    from sea_jax import builder
    from sea_jax.align import semantic_labels as L
    from sea_jax.align.loss import tokenize_words
    from sea_jax.data import llava
    from sea_jax.tokenizer import load_tokenizer

    wd, config, c = prepared
    tok = load_tokenizer(c.llm.tokenizer)
    assert "<image>" not in tok.get_vocab()  # the trainer adds it
    assert c.llm.overrides.vocab_size == len(tok) and tok.bos_token == "<bos>" and tok.pad_token == "<pad>"
    records = json.load(open(c.data.json))
    assert len(records) == 24 and c.data.json.endswith("stage1.json")
    for k, r in enumerate(records):
        rec = llava.parse_record(r, k)
        assert os.path.exists(os.path.join(c.data.image_root, rec.image))
        cap = rec.messages[1]["content"]
        assert tok.decode(tok(cap, add_special_tokens=False)["input_ids"]) == cap
    # every word a patch can truly be is one token mid-sentence: Eq. 8's label embedding is one row
    truth_words = [*W.KINDS, *W.COLOURS, *W.BACKGROUNDS]
    wt = tokenize_words(tok, truth_words)
    assert (np.asarray(wt.mask).sum(1) == 1).all()
    assert L.load_word_list(c.labels.word_list) == W.label_words()

    # stage 2: every conversation encodes with the chat template, loss on the answers only
    image = llava.add_image_token(tok)
    enc = llava.Encoder(tok, "chat", image.id, 64, 160)
    conv = json.load(open(os.path.join(os.path.dirname(c.data.json), "stage2.json")))
    assert any(len(r["conversations"]) > 2 for r in conv)  # multi-turn
    for k, r in enumerate(conv):
        rec = llava.parse_record(r, k)
        e = enc.encode(rec)
        supervised = tok.decode(np.asarray(e.input_ids)[np.asarray(e.loss_mask, bool)])
        for m in rec.messages[1::2]:
            assert m["content"] in supervised
        assert "what" not in supervised and "<image>" not in supervised

    sig_tok, _ = builder.load_vision_tokenizer(c)
    assert c.vision.overrides.vocab_size == len(sig_tok)
    ids = sig_tok(["circle", "a small red circle on stripes"], padding="max_length", max_length=16)["input_ids"]
    assert max(max(i) for i in ids) < len(sig_tok) and ids[0] != ids[1]

    truth = np.load(os.path.join(os.path.dirname(c.data.json), "truth.npz"))
    assert truth["shape_word"].shape == (28, 8, 8) and list(truth["split"]) == [0] * 24 + [1] * 4
    np.testing.assert_array_equal(truth["colour_word"][5], W.sample(CFG, 0, 5).colour_word)


def _mtimes(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def test_prepare_is_idempotent_and_refuses_another_world(prepared, tmp_path):
    from sea_jax.demo import prepare
    from sea_jax.demo.prepare import assets_dir

    wd, config, c = prepared
    before = _mtimes(assets_dir(str(wd)))
    again = prepare(config, str(wd))
    assert _mtimes(assets_dir(str(wd))) == before
    assert again.to_dict() == c.to_dict()
    # stage 2 reads the conversations from the same assets
    c2 = prepare(demo_config("stage2"), str(wd))
    assert c2.data.json.endswith("stage2.json") and c2.llm.tokenizer == c.llm.tokenizer
    assert _mtimes(assets_dir(str(wd))) == before
    # a path the user set is kept
    mine = demo_config()
    with mine.unlocked():
        mine.data.json = "/elsewhere/x.json"
    assert prepare(mine, str(wd)).data.json == "/elsewhere/x.json"
    with pytest.raises(ValueError, match="another --workdir"):
        prepare(demo_config(seed=1), str(wd))

    # a crash mid-build leaves no marker: the next call rebuilds instead of trusting it
    other = tmp_path / "wd"
    half = other / "demo_assets" / "world"
    half.mkdir(parents=True)
    (half / "stage1.json").write_text("[")
    c3 = prepare(demo_config(num_images=4, num_eval=1), str(other))
    assert len(json.load(open(c3.data.json))) == 4 and os.path.exists(half / "DONE.json")


def test_prepare_then_train_stage1(prepared):
    from sea_jax import train

    wd, _, c = prepared
    with c.unlocked():
        c.train.update(num_steps=3, batch_size=8, log_every=1, checkpoint_every=0, progress=False,
                       async_checkpoint=False)
    out = train.train(c, str(wd))
    assert out["step"] == 3 and out["stopped"] == "done"
    rows = [json.loads(line) for line in open(os.path.join(wd, "stage1", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite([r["loss"], r["lm_loss"], r["align_loss"]]).all()
        assert r["align_loss"] > 0 and r["unique_labels"] > 0  # SEA really on


def test_sigmoid_loss_and_positives():
    from sea_jax.demo import pretrain

    caps = ["a small red circle on stripes", "a large blue square and a small red star on dots"]
    texts = ["red", "a large blue square", caps[0], "star"]
    np.testing.assert_array_equal(pretrain.positives(caps, texts), [[1, 0, 1, 0], [1, 1, 0, 1]])
    assert pretrain.text_choices(caps[1])[:3] == [caps[1], "a large blue square", "a small red star"]
    assert {"blue", "dots", "star"} <= set(pretrain.text_choices(caps[1]))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    pos = np.asarray([[1, 0, 1], [0, 1, 0], [0, 0, 1]], np.float32)
    t, bias = np.log(10.0), -3.0
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    z = 2 * pos - 1
    want = np.sum(np.log1p(np.exp(-z * (cos * 10.0 + bias)))) / 3
    got = pretrain.sigmoid_loss(a, b, np.asarray([t]), np.asarray([bias]), pos)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_patch_word_loss_is_tokenwise_max_sigmoid():
    """The FILIP-style term of the SigLIP pretraining, against a loop: image i vs word w is scored
    by its best patch, ``t * max_p cos(patch_ip, w) + b``, then SigLIP's sigmoid loss."""
    from sea_jax.demo import pretrain

    rng = np.random.default_rng(2)
    patches, words = rng.normal(size=(3, 5, 4)), rng.normal(size=(6, 4))
    pos = (rng.random((3, 6)) > 0.5).astype(np.float32)
    t, b = np.log(7.0), -2.0
    want = 0.0
    for i in range(3):
        for w in range(6):
            best = max(patches[i, p] @ words[w] / (np.linalg.norm(patches[i, p]) * np.linalg.norm(words[w]))
                       for p in range(5))
            z = 2 * pos[i, w] - 1
            want += np.log1p(np.exp(-z * (7.0 * best + b)))
    got = pretrain.patch_word_loss(patches, words, np.asarray([t]), np.asarray([b]), pos)
    assert float(got) == pytest.approx(want / 3, rel=1e-5)


def test_pretrain_towers(prepared, tmp_path):
    """A few pretraining steps on the small world: both losses go down, the folders load as the
    run's checkpoints (with their tokenizers), a second prepare rewrites nothing."""
    import shutil

    from sea_jax import builder
    from sea_jax.convert import hf_siglip
    from sea_jax.demo import prepare
    from sea_jax.demo.prepare import assets_dir, read_marker

    wd, _, _ = prepared
    shutil.copytree(os.path.join(assets_dir(str(wd)), "world"), os.path.join(assets_dir(str(tmp_path)), "world"))
    config = demo_config(pretrain=True, siglip_steps=24, llm_steps=24, pretrain_batch=8, siglip_lr=3e-3, llm_lr=1e-2)
    c = prepare(config, str(tmp_path))
    for part in ("siglip", "llm"):
        info = read_marker(os.path.join(assets_dir(str(tmp_path)), part))["info"]
        assert info["loss_last"] < 0.9 * info["loss_first"], (part, info)
    assert c.vision.checkpoint.endswith("siglip") and c.llm.checkpoint.endswith("llm")
    sig_cfg, params = hf_siglip.load_hf_siglip(c.vision.checkpoint)
    assert sig_cfg.image_size == 64 and sig_cfg.width == 64 and float(params["b"][0]) != -10.0  # trained
    before = _mtimes(assets_dir(str(tmp_path)))
    assert prepare(config, str(tmp_path)).to_dict() == c.to_dict()
    assert _mtimes(assets_dir(str(tmp_path))) == before
    # the trainer builds its model from the folders: configs, tokenizers, vocabulary + <image>
    mcfg = builder.model_config(c, builder.read_sources(c))
    assert mcfg.vision.width == 64 and mcfg.llm.hidden == 64
    from sea_jax.tokenizer import load_tokenizer

    assert mcfg.image_token_id == mcfg.llm.vocab_size - 1 == len(load_tokenizer(c.llm.checkpoint))
    tok, _ = builder.load_vision_tokenizer(c)
    assert len(tok) == sig_cfg.vocab_size


def test_cli_reduced_demo_end_to_end(tmp_path):
    """``python -m sea_jax.train --config=configs/demo.py`` -- the README's main command -- with fewer
    images and steps: pretraining, SEA and lambda = 0 stage 1, stage 2 of each, the report."""
    import subprocess
    import sys
    import time

    wd = tmp_path / "demo"
    over = {"demo.num_images": 48, "demo.num_eval": 4, "demo.siglip_steps": 12, "demo.llm_steps": 12,
            "demo.pretrain_batch": 8, "demo.stage2_steps": 4, "demo.plot_images": 2, "demo.show_questions": 3,
            "train.num_steps": 6, "train.batch_size": 8, "train.log_every": 2, "train.checkpoint_every": 0,
            "train.progress": False}
    cmd = [sys.executable, "-m", "sea_jax.train", "--config=configs/demo.py", f"--workdir={wd}",
           *[f"--config.{k}={v}" for k, v in over.items()]]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.time() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert elapsed < 180, f"the reduced demo took {elapsed:.0f} s"

    report = json.load(open(wd / "demo_report.json"))
    arms = report["arms"]
    assert sorted(arms) == ["SEA", "baseline"]
    for name, m in arms.items():
        for key in ("label_accuracy", "truth_accuracy", "caption_loss", "qa_accuracy"):
            assert np.isfinite(m[key]), (name, key)
        assert m["num_images"] == 4 and m["stage"] == 1
    assert arms["SEA"]["lambda"] == 1.0 and arms["baseline"]["lambda"] == 0.0
    # the table the command printed is the one written, and names both arms
    table = open(wd / "demo_report.md").read().strip()
    assert table in res.stdout and "| | SEA | baseline |" in table
    assert len(report["examples"]) == 3 and all(e["truth"] and "SEA" in e for e in report["examples"])
    assert os.path.getsize(wd / "probe.png") > 10_000
    # each arm ran both stages with lambda as the only difference; the assets exist once
    def rows(run):
        return [json.loads(x) for x in open(run / "metrics.jsonl")]
    sea, base = rows(wd / "stage1"), rows(wd / "baseline" / "stage1")
    assert [r["step"] for r in sea] == [r["step"] for r in base] == [2, 4, 6]
    assert all(r["align_loss"] > 0 for r in sea) and all(r.get("align_loss", 0.0) == 0.0 for r in base)
    assert rows(wd / "stage2")[-1]["step"] == rows(wd / "baseline" / "stage2")[-1]["step"] == 4
    assert not os.path.exists(wd / "baseline" / "demo_assets")
    assert json.load(open(wd / "baseline" / "stage1" / "config.json"))["demo"]["assets"] == str(wd / "demo_assets")
