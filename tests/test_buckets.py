"""Length-aware batches: sea_jax.data.buckets and the pipeline's grouping (data.group_batches)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from sea_jax.data import buckets
from sea_jax.errors import ConfigError
from test_data_pipeline import _config, _iter, _take, tok  # noqa: F401 - the tokenizer fixture


def test_parse_buckets():
    assert buckets.parse_buckets("", 2048) == (2048,)
    assert buckets.parse_buckets("1024, 768,1024", 2048) == (768, 1024, 2048)
    assert buckets.parse_buckets((512, 2048), 2048) == (512, 2048)
    for bad in ("0", "4096", "12a"):
        with pytest.raises(ConfigError, match="data.length_buckets"):
            buckets.parse_buckets(bad, 2048)


def test_bucket_for_and_trim():
    bs = (8, 16, 32)
    assert [buckets.bucket_for(bs, n) for n in (0, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    with pytest.raises(ValueError):
        buckets.bucket_for(bs, 33)
    mask = np.zeros((2, 32), np.int32)
    mask[0, :5], mask[1, :12] = 1, 1
    batch = {"input_ids": mask * 7, "attention_mask": mask, "loss_mask": mask.astype(bool),
             "images": np.ones((2, 3, 3, 3)), "sample_id": np.asarray(["a", "b"])}
    assert buckets.longest(batch) == 12
    cut = buckets.trim(batch, 16)
    assert cut["input_ids"].shape == (2, 16) and cut["attention_mask"].sum() == 17
    assert cut["images"] is batch["images"] and cut["sample_id"] is batch["sample_id"]
    with pytest.raises(ValueError, match="longer"):
        buckets.trim(batch, 8)  # would drop real tokens


def test_group_window_sorts_cuts_and_permutes_by_seed_and_window():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=64).tolist()
    out = buckets.group_window(lengths, 8, seed=1, window=0)
    assert sorted(i for b in out for i in b) == list(range(64))  # every row once
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in out)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # disjoint length ranges
    assert out == buckets.group_window(lengths, 8, seed=1, window=0)  # deterministic
    orders = {tuple(map(tuple, buckets.group_window(lengths, 8, seed=1, window=w))) for w in range(6)}
    assert len(orders) > 1  # the batch order changes with the window
    with pytest.raises(ValueError):
        buckets.group_window(lengths[:63], 8, 0, 0)


def _varied_dataset(root, n=48):
    """Captions of 1 to 24 words: rows of very different lengths."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(5)
    records = []
    for i in range(n):
        name = f"img/{i}.png"
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(os.path.join(root, name))
        words = " ".join(["cat"] * int(rng.integers(1, 25)))
        records.append({"id": f"s{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": words}]})
    records.insert(7, {"id": "bad", "image": "img/none.png", "conversations": records[0]["conversations"]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _spread(batches):
    lens = [b["attention_mask"].sum(axis=1) for b in batches]
    return float(np.mean([x.max() - x.min() for x in lens]))


def test_grouped_batches_are_homogeneous_and_serve_every_sample(tmp_path, tok):  # noqa: F811
    path = _varied_dataset(str(tmp_path))
    plain, _ = _iter(_config(path, str(tmp_path), batch=4, max_length=64), tok, num_epochs=1)
    grouped, stats = _iter(_config(path, str(tmp_path), batch=4, max_length=64, group_batches=4), tok, num_epochs=1)
    a, b = list(plain), list(grouped)
    assert sorted(s for x in a for s in x["sample_id"]) == sorted(s for x in b for s in x["sample_id"])
    assert len(b) == 12 and stats.skipped["missing_image"] == 1
    assert _spread(b) < 0.5 * _spread(a), (_spread(b), _spread(a))
    # the useful-token fraction at the batch's own bucket rises
    bs = (16, 24, 32, 48, 64)

    def useful(batches):
        real = sum(int(x["attention_mask"].sum()) for x in batches)
        computed = sum(4 * buckets.bucket_for(bs, buckets.longest(x)) for x in batches)
        return real / computed

    assert useful(b) > useful(a)


def test_grouped_iterator_resumes_exactly_mid_window(tmp_path, tok):  # noqa: F811
    path = _varied_dataset(str(tmp_path))
    c = _config(path, str(tmp_path), batch=4, max_length=64, group_batches=3)
    it, stats = _iter(c, tok)
    _take(it, 4)  # into the second window (of 3 batches)
    state = it.get_state()
    counts = dict(stats.as_dict())
    want = _take(it, 7)  # across two window boundaries
    it2, stats2 = _iter(c, tok)
    it2.set_state(state)
    got = _take(it2, 7)
    for x, y in zip(want, got):
        assert x["sample_id"].tolist() == y["sample_id"].tolist()
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["images"], y["images"])
    assert stats2.as_dict() == stats.as_dict() != counts  # skip and sample counts continue exactly


def test_grouping_does_not_depend_on_the_process_count(tmp_path, tok):  # noqa: F811
    path = _varied_dataset(str(tmp_path))
    one, _ = _iter(_config(path, str(tmp_path), batch=4, max_length=64, group_batches=2, num_shards=2), tok)
    p0, _ = _iter(_config(path, str(tmp_path), batch=4, max_length=64, group_batches=2, num_shards=2), tok,
                  process_index=0, process_count=2)
    p1, _ = _iter(_config(path, str(tmp_path), batch=4, max_length=64, group_batches=2, num_shards=2), tok,
                  process_index=1, process_count=2)
    for _ in range(6):
        whole, a, b = next(one), next(p0), next(p1)
        assert whole["sample_id"].tolist() == a["sample_id"].tolist() + b["sample_id"].tolist()


def test_a_state_from_another_grouping_is_refused(tmp_path, tok):  # noqa: F811
    path = _varied_dataset(str(tmp_path))
    it, _ = _iter(_config(path, str(tmp_path), batch=4, max_length=64), tok)
    _take(it, 1)
    other, _ = _iter(_config(path, str(tmp_path), batch=4, max_length=64, group_batches=2), tok)
    with pytest.raises(ConfigError, match="group_batches"):
        other.set_state(it.get_state())
