"""The data side on ``gs://`` (the local fake-gcs-server of tests/gcs_server.py): a LLaVA JSON and
its images in a bucket give exactly the batches of the same files on disk (images fetched by the
decoding threads through ``storage.read_bytes``); the path rule holds under a ``gs://`` root;
ArrayRecord folders, a mixture file and precomputed labels may live in the bucket too."""
from __future__ import annotations

import json
import os
import re
import uuid

import numpy as np
import pytest
from PIL import Image

from sea_jax import storage
from sea_jax.data import mixture, pipeline
from sea_jax.records import convert
from test_data_pipeline import N_IMG, _config, _iter, _write_dataset, tok  # noqa: F401

CONV = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]


@pytest.fixture
def bucket(gcs, request):
    """A fresh prefix of the emulator's bucket."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")
    return f"gs://{gcs.bucket}/{name}-{uuid.uuid4().hex[:8]}"


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _upload(local_root: str, remote: str, json_name: str = "data.json") -> str:
    storage.copytree(local_root, remote)
    return storage.join(remote, json_name)


def test_json_and_images_in_a_bucket_give_the_local_batches(tmp_path, bucket, tok):  # noqa: F811
    root = str(tmp_path / "data")
    path = _write_dataset(root)
    remote_json = _upload(root, bucket)
    local = _config(path, root, num_shards=2, num_threads=8)
    remote = _config(remote_json, bucket, num_shards=2, num_threads=8)
    assert pipeline.check_paths(remote) == [] and pipeline.num_examples(remote) == 17
    it_l, st_l = _iter(local, tok, num_epochs=2)
    it_r, st_r = _iter(remote, tok, num_epochs=2)
    _same(list(it_l), list(it_r))
    assert st_l.as_dict() == st_r.as_dict()
    assert st_r.skipped["missing_image"] == 2 and st_r.skipped["corrupt_image"] == 2
    bad = _config(storage.join(bucket, "gone.json"), storage.join(bucket, "nowhere"))
    assert pipeline.check_paths(bad) == [f"config.data.json={storage.join(bucket, 'gone.json')!r} does not exist",
                                         f"config.data.image_root={storage.join(bucket, 'nowhere')!r} does not exist"]


def test_gs_root_refuses_escaping_paths_without_reading_them(tmp_path, bucket, tok, monkeypatch):  # noqa: F811
    root = tmp_path / "data"
    os.makedirs(root / "img")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "img" / "0.png")
    storage.copy(str(root / "img" / "0.png"), f"{bucket}/images/img/0.png")
    storage.copy(str(root / "img" / "0.png"), f"{bucket}/secret.png")  # beside the image root
    records = [{"id": "fine", "image": "img/0.png", "conversations": CONV},
               {"id": "normalised", "image": "./img//0.png", "conversations": CONV},
               {"id": "up", "image": "../secret.png", "conversations": CONV},
               {"id": "dotdot_inside", "image": "img/../img/0.png", "conversations": CONV},
               {"id": "absolute", "image": "/secret.png", "conversations": CONV},
               {"id": "url", "image": f"{bucket}/secret.png", "conversations": CONV}]
    storage.write_text(f"{bucket}/data.json", json.dumps(records))
    read = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda p: (read.append(p), real(p))[1])
    c = _config(f"{bucket}/data.json", f"{bucket}/images", batch=1)
    it, stats = _iter(c, tok, num_epochs=1)
    assert sorted(b["sample_id"][0] for b in it) == ["fine", "normalised"]
    assert stats.skipped["image_outside_root"] == 4 == stats.skipped_total
    images = [p for p in read if not p.endswith("data.json")]
    assert images and all(p == f"{bucket}/images/img/0.png" for p in images), images


def test_array_record_folder_in_a_bucket(tmp_path, bucket, tok):  # noqa: F811
    # Converted from a JSON and images in the bucket into the bucket (images embedded), then read:
    # the shards are copied to data.cache_dir once and give the local JSON's batches.
    root = str(tmp_path / "data")
    path = _write_dataset(root)
    remote_json = _upload(root, bucket)
    out = f"{bucket}/records"
    info = convert(remote_json, out, image_root=bucket, embed_images=True, records_per_shard=6)
    assert info["images"]["embedded"] == 12 and len(info["shards"]) == 3
    assert sorted(storage.listdir(out)) == ["info.json"] + [f"records-0000{i}-of-00003.array_record" for i in range(3)]
    cache = str(tmp_path / "cache")
    c = _config("", str(tmp_path / "no_images_here"), num_shards=2, kind="array_record", records=out, cache_dir=cache)
    os.makedirs(tmp_path / "no_images_here")
    it_r, st_r = _iter(c, tok, num_epochs=1)
    it_l, st_l = _iter(_config(path, root, num_shards=2), tok, num_epochs=1)
    _same(list(it_l), list(it_r))
    assert st_l.as_dict() == st_r.as_dict()
    assert sorted(os.listdir(os.path.join(cache, *out[len("gs://"):].split("/")))) == \
        [f"records-0000{i}-of-00003.array_record" for i in range(3)]


def test_mixture_file_and_labels_in_a_bucket(tmp_path, bucket, tok):  # noqa: F811
    import yaml

    root = str(tmp_path / "data")
    _write_dataset(root, faults=False)
    _upload(root, f"{bucket}/a")
    _upload(root, f"{bucket}/b")
    storage.write_text(f"{bucket}/mix.yaml", yaml.safe_dump({"datasets": [
        {"json_path": "a/data.json", "image_root": "a", "weight": 1, "name": "a"},
        {"json_path": "b/data.json", "image_root": "b", "weight": 1, "name": "b", "sampling_strategy": "first:6"}]}))
    # labels for every image, written as sea_jax.labels does, in the bucket
    labels = tmp_path / "labels"
    os.makedirs(labels)
    images = [f"img/{i}.png" for i in range(12) if i % 4 != 3]
    ids = np.asarray([[[i * 10 + q for _ in range(2)] for q in range(N_IMG)] for i in range(len(images))], np.int32)
    np.savez(labels / "shard-00000-of-00001.npz", ids=ids, scores=np.full(ids.shape, 0.5, np.float16),
             image=np.asarray(images))
    (labels / "index.json").write_text(json.dumps({"shards": ["shard-00000-of-00001.npz"],
                                                   "images": {x: [0, r] for r, x in enumerate(images)}}))
    storage.copytree(str(labels), f"{bucket}/labels")
    c = _config("", root, batch=4, cache_dir=str(tmp_path / "cache"))
    c.data.mixture = f"{bucket}/mix.yaml"
    c.sea.label_source = "batch"
    c.labels.output_dir = f"{bucket}/labels"
    assert pipeline.check_paths(c) == []
    it, stats = _iter(c, tok)
    for _ in range(5):
        b = next(it)
        for r, sid in enumerate(b["sample_id"].tolist()):
            i = int(sid[4:])
            if i % 4 == 3:
                assert (b["label_ids"][r] == -1).all()
            else:
                assert b["label_ids"][r][0, 0] == images.index(f"img/{i}.png") * 10
    d = stats.as_dict()
    assert d["source/a/samples"] + d["source/b/samples"] == 20 and d["no_labels"] == 0
    mix = mixture.from_config(c)
    assert [s.path for s in mix.sources] == [f"{bucket}/a/data.json", f"{bucket}/b/data.json"]
    assert [s.image_root for s in mix.sources] == [f"{bucket}/a", f"{bucket}/b"]
