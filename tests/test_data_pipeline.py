"""sea_jax.data.pipeline on a generated LLaVA dataset (JSON + PNG files written here)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from sea_jax.config import base_config
from sea_jax.data import pipeline
from test_data_llava import make_tokenizer

N_IMG = 4
SIZE = 8
GOOD = 12


def _write_dataset(root, faults=True):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(GOOD):
        name = f"img/{i}.png"
        Image.fromarray(rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8)).save(os.path.join(root, name))
        if i % 4 == 3:  # some text-only records
            records.append({"id": f"good{i}", "conversations": [
                {"from": "human", "value": "How many birds are there?"},
                {"from": "gpt", "value": f"There are {i} birds."}]})
        else:
            records.append({"id": f"good{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the image?"},
                {"from": "gpt", "value": f"A red cat number {i}."}]})
    if faults:
        with open(os.path.join(root, "img/corrupt.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\nnot really a png")
        conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
        records += [
            {"id": "bad_missing", "image": "img/nope.png", "conversations": conv},
            {"id": "bad_corrupt", "image": "img/corrupt.png", "conversations": conv},
            {"id": "bad_fields", "image": "img/0.png", "conversation": conv},
            {"id": "bad_empty", "image": "img/0.png", "conversations": [conv[0], {"from": "gpt", "value": ""}]},
            {"id": "bad_long", "conversations": [{"from": "human", "value": "What? " * 40},
                                                 {"from": "gpt", "value": "A cat."}]},
        ]
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("bytelevel")


@pytest.fixture(scope="module")
def chat_tok():
    from test_data_llava import TEMPLATES

    t = make_tokenizer("bytelevel", bos=TEMPLATES["llama3"]["bos"], eos=TEMPLATES["llama3"]["eos"])
    t.chat_template = TEMPLATES["llama3"]["template"]
    return t


def _config(json_path, root, batch=4, template="plain", **data):
    c = base_config()
    c.seed = 3
    c.train.batch_size = batch
    c.data.json = json_path
    c.data.image_root = root
    c.data.template = template
    c.data.max_length = 48
    c.data.num_workers = 0
    c.data.num_threads = 2
    c.data.prefetch = 1
    c.sea.label_source = "on_the_fly"
    for k, v in data.items():
        c.data[k] = v
    return c


def _iter(c, tok, **kw):
    img = tok.convert_tokens_to_ids("<image>")
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.make_train_iterator(c, tok, img, N_IMG, SIZE, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_faults_skipped_counted_logged(tmp_path, chat_tok, caplog):
    # The chat template, where a long prompt pushes every answer token out of the context.
    tok = chat_tok
    path = _write_dataset(str(tmp_path))
    c = _config(path, str(tmp_path), template="chat")
    with caplog.at_level(logging.WARNING, logger="sea_jax.data"):
        it, stats = _iter(c, tok, num_epochs=1)
        batches = list(it)
    assert len(batches) == GOOD // 4
    for b in batches:
        assert b["images"].shape == (4, SIZE, SIZE, 3) and b["images"].dtype == np.float32
        assert b["input_ids"].shape == (4, 48) and b["input_ids"].dtype == np.int32
        assert b["attention_mask"].dtype == np.int32 and b["loss_mask"].dtype == bool
        assert b["has_image"].shape == (4,)
        assert np.abs(b["images"]).max() <= 1.0
        # text-only rows: zero image, no image token
        img = tok.convert_tokens_to_ids("<image>")
        for r in range(4):
            n_img = int((b["input_ids"][r] == img).sum())
            assert n_img == (N_IMG if b["has_image"][r] else 0)
            if not b["has_image"][r]:
                assert not b["images"][r].any()
        assert not (b["loss_mask"] & (b["attention_mask"] == 0)).any()
    ids = sorted(s for b in batches for s in b["sample_id"].tolist())
    assert ids == sorted(f"good{i}" for i in range(GOOD))
    assert stats.skipped == {"bad_record": 1, "empty_response": 1, "missing_image": 1, "corrupt_image": 1,
                             "image_truncated": 0, "target_truncated": 1, "template_mismatch": 0,
                             "image_outside_root": 0}
    assert stats.samples == GOOD and stats.batches == 3
    logged = caplog.text
    for sid in ("bad_missing", "bad_corrupt", "bad_fields", "bad_empty", "bad_long"):
        assert f"skipped sample {sid} " in logged
    assert logged.count("skipped sample") == 5


def test_plain_rows_exact(tmp_path, tok):
    path = _write_dataset(str(tmp_path), faults=False)
    c = _config(path, str(tmp_path))
    it, _ = _iter(c, tok, num_epochs=1)
    b = next(it)
    img = tok.convert_tokens_to_ids("<image>")
    for r, sid in enumerate(b["sample_id"].tolist()):
        i = int(sid[4:])
        cap = f"There are {i} birds." if i % 4 == 3 else f"A red cat number {i}."
        cap_ids = tok(cap, add_special_tokens=False)["input_ids"]
        want = ([img] * N_IMG if i % 4 != 3 else []) + cap_ids + [tok.eos_token_id]
        t = len(want)
        assert b["input_ids"][r, :t].tolist() == want
        assert (b["input_ids"][r, t:] == tok.pad_token_id).all() and b["attention_mask"][r].sum() == t
        assert b["loss_mask"][r].tolist() == [False] * (t - len(cap_ids) - 1) + [True] * (len(cap_ids) + 1) + [False] * (48 - t)
        if i % 4 != 3:
            from sea_jax.data.images import load_and_preprocess

            np.testing.assert_array_equal(b["images"][r], load_and_preprocess(os.path.join(tmp_path, f"img/{i}.png"), SIZE))


def test_malformed_json_names_file_and_position(tmp_path, tok):
    path = os.path.join(tmp_path, "broken.json")
    with open(path, "w") as f:
        f.write('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]')
    with pytest.raises(pipeline.DataFormatError, match=r"broken\.json.*line 3, column 14"):
        _iter(_config(path, str(tmp_path)), tok)


def test_order_deterministic_and_epochs_differ(tmp_path, tok):
    path = _write_dataset(str(tmp_path), faults=False)
    c = _config(path, str(tmp_path))
    a = [b["sample_id"].tolist() for b in _take(_iter(c, tok)[0], 6)]
    b = [b["sample_id"].tolist() for b in _take(_iter(c, tok)[0], 6)]
    assert a == b
    epoch1, epoch2 = sum(a[:3], []), sum(a[3:], [])
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2
    c.seed = 4
    assert [b["sample_id"].tolist() for b in _take(_iter(c, tok)[0], 3)] != a[:3]


@pytest.mark.parametrize("faults", [False, True])
def test_process_slices_union_is_global_batch(tmp_path, tok, faults):
    path = _write_dataset(str(tmp_path), faults=faults)
    # With skips the global batches depend on the shard count: fix it to 2 in both runs.
    extra = {"num_shards": 2} if faults else {}
    c = _config(path, str(tmp_path), **extra)
    single = _take(_iter(c, tok)[0], 4)
    halves = [_take(_iter(c, tok, process_index=p, process_count=2)[0], 4) for p in range(2)]
    for k in range(4):
        h0, h1 = halves[0][k], halves[1][k]
        assert h0["input_ids"].shape == (2, 48)
        assert not set(h0["sample_id"].tolist()) & set(h1["sample_id"].tolist())
        if faults:  # same shards in both runs: the concatenation is the single-process batch
            for key in ("input_ids", "loss_mask", "images", "sample_id"):
                np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), single[k][key])
        else:  # 1 shard vs 2: the same records, dealt round-robin
            np.testing.assert_array_equal(h0["sample_id"], single[k]["sample_id"][0::2])
            np.testing.assert_array_equal(h1["sample_id"], single[k]["sample_id"][1::2])


def test_checkpoint_restore_same_batches(tmp_path, tok):
    path = _write_dataset(str(tmp_path))
    c = _config(path, str(tmp_path))
    it, stats = _iter(c, tok)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (Orbax / grain handler)
    saved_stats = dict(stats.as_dict())
    rest = _take(it, 4)
    it2, stats2 = _iter(c, tok)
    it2.set_state(state)
    assert stats2.as_dict() == saved_stats
    again = _take(it2, 4)
    for x, y in zip(rest, again):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert stats2.as_dict() == stats.as_dict()


def test_precomputed_labels_joined(tmp_path, tok):
    path = _write_dataset(str(tmp_path), faults=False)
    label_dir = os.path.join(tmp_path, "labels")
    os.makedirs(label_dir)
    p, n = N_IMG, 3
    # Two shards as sea_jax.labels writes them; image i gets ids i*100 + patch*10 + j.
    images = [f"img/{i}.png" for i in range(GOOD) if i % 4 != 3]
    shards, where = [], {}
    for s, chunk in enumerate([images[:4], images[4:]]):
        ids = np.asarray([[[int(x.split("/")[1][:-4]) * 100 + q * 10 + j for j in range(n)] for q in range(p)]
                          for x in chunk], np.int32)
        ids[:, 0, 2] = -1
        scores = (ids.astype(np.float32) / 1000 + 0.5).astype(np.float16)
        name = f"shard-{s:05d}-of-00002.npz"
        np.savez(os.path.join(label_dir, name), ids=ids, scores=scores, image=np.asarray(chunk))
        shards.append(name)
        where.update({x: [s, r] for r, x in enumerate(chunk)})
    with open(os.path.join(label_dir, "index.json"), "w") as f:
        json.dump({"shards": shards, "images": where, "samples": {}}, f)
    c = _config(path, str(tmp_path))
    c.sea.label_source = "batch"
    c.labels.output_dir = label_dir
    it, stats = _iter(c, tok, num_epochs=1)
    seen = 0
    for b in it:
        assert b["label_ids"].shape == (4, p, n) and b["label_ids"].dtype == np.int32
        assert b["label_scores"].dtype == np.float32
        for r, sid in enumerate(b["sample_id"].tolist()):
            i = int(sid[4:])
            if i % 4 == 3:
                assert (b["label_ids"][r] == -1).all() and (b["label_scores"][r] == 0).all()
                continue
            want = np.asarray([[i * 100 + q * 10 + j for j in range(n)] for q in range(p)], np.int32)
            want[0, 2] = -1
            np.testing.assert_array_equal(b["label_ids"][r], want)
            np.testing.assert_allclose(b["label_scores"][r][want >= 0],
                                       (want[want >= 0] / 1000 + 0.5).astype(np.float16).astype(np.float32))
            assert b["label_scores"][r][0, 2] == 0
            seen += 1
    assert seen == len(images) and stats.no_labels == 0


def test_tfds_style_source_captions(tmp_path, tok):
    rng = np.random.default_rng(1)
    examples = [{"image": rng.integers(0, 255, (9, 7, 3), dtype=np.uint8), "caption": f"A red cat {i}.".encode()}
                for i in range(6)]
    examples[2]["caption"] = b"   "
    c = _config("", str(tmp_path), batch=2, kind="tfds", tfds_name="fake")
    it, stats = _iter(c, tok, source=examples, num_epochs=1)
    batches = list(it)
    assert len(batches) == 2 and stats.skipped["empty_response"] == 1
    assert all(b["has_image"].all() for b in batches)
    assert pipeline.num_examples(c, source=examples) == 6


def test_data_that_rejects_every_sample_is_an_error_not_a_hang():
    """A context too short for any sample: every record is skipped; the iterator stops with a
    DataFormatError naming the reasons instead of searching forever."""
    from sea_jax.data import pipeline
    from sea_jax.errors import DataFormatError

    import grain

    bad = grain.MapDataset.range(10**9).map(
        lambda i: {"skip": "target_truncated", "sample_id": f"s{i}", "detail": "too long", "source": 0})
    it = iter(pipeline._batch_dataset([bad.to_iter_dataset()], 2, lambda rows: {}, max_skips=50))
    with pytest.raises(DataFormatError, match=r"51 bad samples in a row.*target_truncated.*data.max_length"):
        next(it)
