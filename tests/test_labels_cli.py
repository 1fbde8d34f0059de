"""``python -m sea_jax.labels`` end to end on a generated dataset, checked against transformers.

Assets built here: a tiny random HF ``SiglipModel`` saved with ``save_pretrained``, and -- since no
model hub is reachable -- a tokenizer made by training a tiny SentencePiece model on generated text
and wrapping it in ``transformers.SiglipTokenizer`` (the real SigLIP tokenizer class, so its
lowercasing / EOS / fixed-length padding is exercised), saved into the same folder. The data is a
LLaVA-format JSON over PNG/JPEG files written here: one record without an image, one corrupt file,
one image shared by two records.

Expected labels come from PyTorch: the HF processor's pixels, ``SiglipModel``'s text features for
the word table, its vision tower + the per-patch MAP head for the patches, and ``torch.topk``.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sea_jax import labels as cli

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "labels_tiny.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("dog cat tree house car boat sky water grass road person bird horse flower cloud sun "
         "window door table chair red blue green white black light dark small large old").split()
N = 5  # top_n of the tiny config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import sentencepiece as spm
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    root = tmp_path_factory.mktemp("labels_cli")
    rng = np.random.default_rng(0)
    # tokenizer: SentencePiece trained on sentences over the words
    sentences = [" ".join(rng.choice(WORDS, size=6)) for _ in range(400)]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model_file, vocab_size=60,
        hard_vocab_limit=False, model_type="unigram", minloglevel=2,
    )
    ckpt = root / "siglip"
    ckpt.mkdir()
    (root / "spiece.model").write_bytes(model_file.getvalue())
    tok = SiglipTokenizer(vocab_file=str(root / "spiece.model"), model_max_length=8)
    tok.save_pretrained(ckpt)

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64, max_position_embeddings=8, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(ckpt)

    (root / "words.txt").write_text("\n".join(WORDS) + "\n")
    img_dir = root / "images"
    (img_dir / "sub").mkdir(parents=True)
    shapes = [(40, 30, "RGB"), (32, 32, "RGB"), (50, 64, "L"), (20, 36, "RGBA"), (33, 33, "RGB"),
              (64, 48, "RGB")]
    names = []
    for i, (h, w, mode) in enumerate(shapes):
        ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, size=(h, w, ch), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if ch == 1 else arr)
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.png"
        img.save(img_dir / name)
        names.append(name)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(img_dir / "photo.jpg")
    names.append("photo.jpg")
    (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    records = [{"id": f"s{i}", "image": n, "conversations": []} for i, n in enumerate(names)]
    records.insert(2, {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}]})
    records.insert(4, {"id": "broken", "image": "corrupt.png", "conversations": []})
    records.append({"id": "again", "image": names[1], "conversations": []})  # shared image
    (root / "data.json").write_text(json.dumps(records))
    return {"root": root, "ckpt": str(ckpt), "model": model, "tokenizer": tok, "images": str(img_dir),
            "json": str(root / "data.json"), "words": str(root / "words.txt"), "names": names}


def _overrides(a, workdir, **extra):
    args = {
        "vision.checkpoint": a["ckpt"], "labels.word_list": a["words"], "data.json": a["json"],
        "data.image_root": a["images"], "labels.cache_dir": str(a["root"] / "cache"),
    }
    args.update(extra)
    return [f"--config={CONFIG}", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in args.items()]


def _config(a, **extra):
    """The tiny config with the overrides applied, for in-process runs."""
    sys.path.insert(0, os.path.dirname(CONFIG))
    try:
        import labels_tiny
    finally:
        sys.path.pop(0)
    c = labels_tiny.get_config()
    c.vision.checkpoint, c.labels.word_list = a["ckpt"], a["words"]
    c.data.json, c.data.image_root = a["json"], a["images"]
    c.labels.cache_dir = str(a["root"] / "cache")
    for k, v in extra.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "sea_jax.labels", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def expected(assets):
    """Labels per image path from PyTorch: (ids with -1 for dropped, scores float32)."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    model, tok = assets["model"], assets["tokenizer"]
    with torch.no_grad():
        ids = tok(WORDS, padding="max_length", max_length=8, truncation=True, return_tensors="pt")["input_ids"]
        table = model.get_text_features(input_ids=ids)
        if not isinstance(table, torch.Tensor):  # transformers 5 returns a model output
            table = table.pooler_output
        table = torch.nn.functional.normalize(table, dim=-1)
        proc = SiglipImageProcessorPil(size={"height": 32, "width": 32})
        out = {}
        for name in assets["names"]:
            pix = proc(images=Image.open(os.path.join(assets["images"], name)), return_tensors="pt")["pixel_values"]
            x = model.vision_model(pixel_values=pix).last_hidden_state
            head = model.vision_model.head
            d = x.shape[-1]
            y = head.attention.out_proj(torch.nn.functional.linear(
                x, head.attention.in_proj_weight[2 * d:], head.attention.in_proj_bias[2 * d:]))
            feats = torch.nn.functional.normalize(y + head.mlp(head.layernorm(y)), dim=-1)
            scores, top = torch.topk(feats[0] @ table.T, N, dim=-1)
            out[name] = (np.where(scores.numpy() > 0, top.numpy(), -1), scores.numpy())
    return out


def _labels_by_image(out_dir):
    index = json.loads(open(os.path.join(out_dir, "index.json")).read())
    shards = [np.load(os.path.join(out_dir, s)) for s in index["shards"]]
    return {path: (shards[s]["ids"][r], shards[s]["scores"][r]) for path, (s, r) in index["images"].items()}


def _check_against_expected(got, expected):
    assert set(got) == set(expected)
    for name, (ids, scores) in got.items():
        e_ids, e_scores = expected[name]
        assert ids.dtype == np.int32 and scores.dtype == np.float16 and ids.shape == (16, N)
        np.testing.assert_array_equal(ids, e_ids, err_msg=name)
        np.testing.assert_allclose(scores.astype(np.float32), e_scores, atol=2e-3, err_msg=name)


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    proc = _run_cli(_overrides(assets, workdir))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return workdir / "labels", out


def test_cli_end_to_end(assets, expected, reference_run):
    out_dir, log = reference_run
    files = sorted(os.listdir(out_dir))
    # 7 unique good images + 1 corrupt = 8 unique images in shards of 3
    assert files == ["index.json", "meta.json", "shard-00000-of-00003.npz", "shard-00001-of-00003.npz",
                     "shard-00002-of-00003.npz", "summary.json", "summary.png", "words.txt"]
    assert open(out_dir / "words.txt").read().split() == WORDS
    _check_against_expected(_labels_by_image(out_dir), expected)
    assert "skipping image corrupt.png (samples ['broken'])" in log

    index = json.loads((out_dir / "index.json").read_text())
    assert index["samples"]["again"] == index["samples"]["s1"] == index["images"][assets["names"][1]]
    assert "broken" not in index["samples"] and "text-only" not in index["samples"]
    assert len(index["samples"]) == 8

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["records_without_image"] == 1 and summary["num_records"] == 10
    assert summary["bad_images"] == 1 and summary["bad_image_list"][0]["samples"] == ["broken"]
    assert summary["images_labelled"] == 7 and summary["num_images"] == 8
    all_ids = np.stack([e[0] for e in expected.values()])
    used = np.unique(all_ids[all_ids >= 0])
    assert summary["words_used"] == len(used)
    assert summary["utilization"] == pytest.approx(len(used) / len(WORDS))
    assert summary["labels_kept"] == int((all_ids >= 0).sum()) == sum(summary["score_hist"]["counts"])
    kept_scores = np.concatenate([e[1][e[0] >= 0] for e in expected.values()])
    assert summary["kept_score_mean"] == pytest.approx(kept_scores.mean(), abs=2e-3)
    with Image.open(out_dir / "summary.png") as png:
        assert png.format == "PNG" and png.size[0] > 500


def test_resume_skips_completed_shards_and_cleans_temps(assets, reference_run, tmp_path):
    out_dir = tmp_path / "labels"
    first = cli.label_dataset(_config(assets, **{"labels.max_shards": 1}), str(tmp_path))
    assert first is None  # not complete yet: no summary
    assert sorted(os.listdir(out_dir)) == ["meta.json", "shard-00000-of-00003.npz", "words.txt"]
    done = os.stat(out_dir / "shard-00000-of-00003.npz")
    # what a run killed inside np.savez leaves behind: a torn temp file, never the final name
    (out_dir / "shard-00001-of-00003.npz.tmp-abc123").write_bytes(b"PK\x03\x04torn")
    summary = cli.label_dataset(_config(assets), str(tmp_path))
    assert summary is not None and summary["images_labelled"] == 7
    assert not [f for f in os.listdir(out_dir) if ".tmp-" in f]
    after = os.stat(out_dir / "shard-00000-of-00003.npz")
    assert (after.st_ino, after.st_mtime_ns) == (done.st_ino, done.st_mtime_ns)  # not relabelled
    ref = _labels_by_image(reference_run[0])
    got = _labels_by_image(out_dir)
    for name in ref:
        np.testing.assert_array_equal(got[name][0], ref[name][0])
        np.testing.assert_array_equal(got[name][1], ref[name][1])
    # changed settings refuse to mix with the existing shards
    with pytest.raises(ValueError, match="top_n"):
        cli.label_dataset(_config(assets, **{"labels.top_n": 3}), str(tmp_path))


def test_processes_split_the_shards(assets, reference_run, tmp_path):
    c0 = _config(assets, **{"labels.process_index": 0, "labels.process_count": 2})
    c1 = _config(assets, **{"labels.process_index": 1, "labels.process_count": 2})
    assert cli.label_dataset(c0, str(tmp_path)) is None  # shards 0 and 2; shard 1 is missing
    assert sorted(f for f in os.listdir(tmp_path / "labels") if f.startswith("shard")) == [
        "shard-00000-of-00003.npz", "shard-00002-of-00003.npz"]
    summary = cli.label_dataset(c1, str(tmp_path))  # completes the set: writes the summary
    assert summary["images_labelled"] == 7
    ref = _labels_by_image(reference_run[0])
    got = _labels_by_image(tmp_path / "labels")
    for name in ref:
        np.testing.assert_array_equal(got[name][0], ref[name][0])


def test_kill_and_resume(assets, expected, tmp_path):
    """SIGKILL a real run mid-dataset, then resume. The kill point is made deterministic by a named
    pipe in place of one image: the run blocks reading it after writing the shards before it."""
    img_root = tmp_path / "images"
    img_root.mkdir()
    for dirpath, _, files in os.walk(assets["images"]):
        rel = os.path.relpath(dirpath, assets["images"])
        os.makedirs(img_root / rel, exist_ok=True)
        for f in files:
            # copies, not symlinks: a symlink leaving the image root is refused (never opened)
            shutil.copy(os.path.join(dirpath, f), img_root / rel / f)
    blocker = assets["names"][4]  # unique image 6 of 8 (the corrupt one is 4th): shard 5
    os.remove(img_root / blocker)
    os.mkfifo(img_root / blocker)
    workdir = tmp_path / "run"
    args = _overrides(assets, workdir, **{"data.image_root": img_root, "labels.shard_size": 1})
    proc = _run_cli(args)
    out_dir = workdir / "labels"
    deadline = time.time() + 300
    want = {f"shard-{s:05d}-of-00008.npz" for s in range(5)}
    while time.time() < deadline and proc.poll() is None:
        if out_dir.exists() and want <= set(os.listdir(out_dir)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0]
    time.sleep(0.5)  # let it reach the pipe
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    shards = sorted(f for f in os.listdir(out_dir) if f.startswith("shard"))
    assert shards == sorted(want)  # killed in the middle: shards 5-7 missing
    assert not (out_dir / "summary.json").exists()

    os.remove(img_root / blocker)
    shutil.copy(os.path.join(assets["images"], blocker), img_root / blocker)
    c = _config(assets, **{"data.image_root": str(img_root), "labels.shard_size": 1})
    summary = cli.label_dataset(c, str(workdir))
    assert summary["images_labelled"] == 7 and summary["bad_images"] == 1
    _check_against_expected(_labels_by_image(out_dir), expected)


def test_read_llava_json_counts(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([
        {"id": 1, "image": "a.jpg"}, {"id": 2}, {"id": 3, "image": ""}, {"id": 1, "image": "b.jpg"},
        {"image": "a.jpg"},
    ]))
    d = cli.read_llava_json(str(path))
    assert d.images == ["a.jpg", "b.jpg"] and d.no_image == 2 and d.num_records == 5
    assert d.samples == [("1", 0), ("1", 1), ("4", 0)] and d.duplicate_ids == 1
    path.write_text(json.dumps([{"id": 1, "image": ["a.jpg", "b.jpg"]}]))
    with pytest.raises(ValueError, match="'image' must be a string"):
        cli.read_llava_json(str(path))


def test_big_vision_npz_and_sentencepiece_file(assets, expected, tmp_path):
    """The other checkpoint route: a big_vision .npz + variant (tiny dims as overrides) and a bare
    SentencePiece .model as tokenizer give the same labels as the HF folder."""
    import ml_collections

    from sea_jax.convert import big_vision, hf_siglip

    cfg, params = hf_siglip.load_hf_siglip(assets["ckpt"])
    npz = str(tmp_path / "siglip.npz")
    big_vision.save_npz(npz, params, cfg)
    c = _config(assets, **{"vision.image_size": 32})
    c.vision.checkpoint = npz
    c.vision.variant = "B/8"
    c.vision.tokenizer = str(assets["root"] / "spiece.model")
    c.vision.overrides = ml_collections.ConfigDict(dict(
        width=32, depth=2, mlp_dim=64, num_heads=4, text_width=32, text_depth=1, text_mlp_dim=64,
        text_num_heads=4, out_dim=32, vocab_size=64, text_len=8))
    summary = cli.label_dataset(c, str(tmp_path))
    assert summary["images_labelled"] == 7
    _check_against_expected(_labels_by_image(tmp_path / "labels"), expected)


def test_image_paths_leaving_the_root_are_bad_images_never_opened(assets, tmp_path):
    """``..``, an absolute path and a symlink out of the image root: each a bad image, named and
    counted in the summary, none opened (the files outside are valid images, so labelling them
    would succeed if they were read)."""
    root = tmp_path / "images"
    shutil.copytree(assets["images"], root)
    outside = tmp_path / "outside.png"
    shutil.copy(root / assets["names"][0], outside)
    os.symlink(outside, root / "link.png")
    records = json.loads(open(assets["json"]).read())
    records += [{"id": "dotdot", "image": "../outside.png", "conversations": []},
                {"id": "absolute", "image": str(outside), "conversations": []},
                {"id": "symlink", "image": "link.png", "conversations": []}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    summary = cli.label_dataset(_config(assets, **{"data.json": str(data), "data.image_root": str(root)}),
                                str(tmp_path / "run"))
    bad = {tuple(b["samples"]): b["reason"] for b in summary["bad_image_list"]}
    assert set(bad) == {("broken",), ("dotdot",), ("absolute",), ("symlink",)}, bad
    assert "outside the image root" in bad[("symlink",)] and "'..'" not in bad[("broken",)]
    assert "absolute" in bad[("absolute",)].lower() or "outside" in bad[("absolute",)]
    assert summary["images_labelled"] == 7  # the escaping three were not labelled
