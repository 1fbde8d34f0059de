"""``python -m sea_jax.records`` and ArrayRecord sources: a converted JSON gives exactly the batches
the JSON gives (plain and chat, multi-turn and text-only rows, bad records and images, images
embedded or not, even with the image folder gone), worker processes read it by index, and the
command line answers --help and refuses user mistakes with exit status 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sea_jax.data import pipeline
from sea_jax.data import records as records_lib
from sea_jax.errors import ConfigError, DataFormatError, PathError
from sea_jax.records import convert
from test_data_pipeline import _config, _iter, _take, _write_dataset, chat_tok, tok  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage2_dataset(root) -> str:
    """Multi-turn, text-only and image records, faults included, plus paths that leave the root."""
    path = _write_dataset(root)
    with open(path) as f:
        records = json.load(f)
    Image.new("RGB", (5, 7), (200, 10, 10)).save(os.path.join(os.path.dirname(root), "secret.png"))
    records += [
        {"id": "multi", "image": "img/1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text_multi", "conversations": [
            {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Birds?"}, {"from": "gpt", "value": "Three."}]},
        {"id": "escape", "image": "../secret.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A secret."}]},
        {"id": "absolute", "image": os.path.join(os.path.dirname(root), "secret.png"), "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A secret."}]},
        "not even a record",
    ]
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _records_config(out, image_root, **kw):
    c = _config("", image_root, **kw)
    c.data.kind = "array_record"
    c.data.records = out
    return c


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_converted_records_give_exactly_the_json_batches(tmp_path, tok, chat_tok, template):  # noqa: F811
    t = chat_tok if template == "chat" else tok
    root = str(tmp_path / "data")
    path = _stage2_dataset(root)
    plain_out, embedded_out = str(tmp_path / "recs"), str(tmp_path / "recs_img")
    info = convert(path, plain_out, records_per_shard=7)
    info_img = convert(path, embedded_out, image_root=root, embed_images=True, records_per_shard=5)
    assert info["num_records"] == info_img["num_records"] == 22 and len(info["shards"]) == 4
    assert info_img["images"] == {"embedded": 13, "missing": 1, "outside_root": 2, "text_only": 5, "invalid": 1}
    with open(os.path.join(embedded_out, "info.json")) as f:
        assert json.load(f)["shards"][0]["file"] == "records-00000-of-00005.array_record"

    runs = {}
    for name, c in (("json", _config(path, root, template=template, batch=2, num_shards=2)),
                    ("records", _records_config(plain_out, root, template=template, batch=2, num_shards=2)),
                    ("embedded", _records_config(embedded_out, root, template=template, batch=2, num_shards=2))):
        it, stats = _iter(c, t, num_epochs=2)
        runs[name] = (list(it), stats.as_dict())
        assert pipeline.num_examples(c) == 22
    for name in ("records", "embedded"):
        _same_batches(runs["json"][0], runs[name][0])
        assert runs[name][1] == runs["json"][1]
    d = runs["json"][1]
    assert d["skipped/image_outside_root"] == 4 and d["skipped/bad_record"] == 4  # two epochs
    # embedded images need no image folder: same batches with the folder gone
    shutil.rmtree(os.path.join(root, "img"))
    os.makedirs(tmp_path / "elsewhere")
    it, stats = _iter(_records_config(embedded_out, str(tmp_path / "elsewhere"), template=template, batch=2,
                                      num_shards=2), t, num_epochs=2)
    _same_batches(runs["json"][0], list(it))
    assert stats.as_dict() == runs["json"][1]


def test_entry_layout_and_damaged_entries(tmp_path, tok):  # noqa: F811
    rec = {"id": "x", "conversations": [{"from": "human", "value": "caf\u00e9 \ud800?"}]}
    assert records_lib.decode(records_lib.encode(rec)) == (rec, None)
    assert records_lib.decode(records_lib.encode([1, "a"], b"\x89PNG")) == ([1, "a"], b"\x89PNG")
    for bad in (b"", b"SEAR", b"JUNK\x01\x00\x00\x00\x00", records_lib.encode(rec)[:12], b"SEAR\x01\x02\x00\x00\x00{x"):
        with pytest.raises(records_lib.RecordFormatError):
            records_lib.decode(bad)
    # a damaged entry in a file is a bad record, skipped and counted, not a crash
    from array_record.python.array_record_module import ArrayRecordWriter

    folder = tmp_path / "raw"
    os.makedirs(folder)
    w = ArrayRecordWriter(str(folder / "x.array_record"), "group_size:1")
    good = {"id": "ok", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    for entry in (records_lib.encode(good), b"garbage", records_lib.encode(dict(good, id="ok2"))):
        w.write(entry)
    w.close()
    it, stats = _iter(_records_config(str(folder), str(tmp_path), batch=1), tok, num_epochs=1)
    assert sorted(b["sample_id"][0] for b in it) == ["ok", "ok2"]
    assert stats.skipped["bad_record"] == 1


def test_convert_refuses_user_mistakes(tmp_path):
    root = str(tmp_path / "data")
    path = _write_dataset(root, faults=False)
    with pytest.raises(PathError, match="does not exist"):
        convert(str(tmp_path / "nope.json"), str(tmp_path / "o1"))
    with pytest.raises(ConfigError, match="needs --image_root"):
        convert(path, str(tmp_path / "o2"), embed_images=True)
    with pytest.raises(ConfigError, match="lack group_size:1"):
        convert(path, str(tmp_path / "o3"), options="zstd:3")
    convert(path, str(tmp_path / "o4"))
    with pytest.raises(PathError, match="exists; pass --overwrite"):
        convert(path, str(tmp_path / "o4"))
    info = convert(path, str(tmp_path / "o4"), overwrite=True, records_per_shard=5)
    assert sorted(os.listdir(tmp_path / "o4")) == ["info.json"] + [records_lib.shard_name(i, 3) for i in range(3)]
    assert info["num_records"] == 12 and not info["embedded_images"]
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataFormatError, match="holds no record"):
        convert(str(tmp_path / "empty.json"), str(tmp_path / "o5"))
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]  # nothing left behind


def test_worker_processes_read_json_and_records_by_index(tmp_path, tok):  # noqa: F811
    # Both sources travel to a worker process by pickle (a path and a count, shard paths): the
    # batches equal those decoded in the main process.
    root = str(tmp_path / "data")
    path = _write_dataset(root)
    out = str(tmp_path / "recs")
    convert(path, out, image_root=root, embed_images=True)
    c = _config("", root, batch=4)
    c.data.sources = ({"path": path, "name": "json", "weight": 1.0},
                      {"kind": "array_record", "path": out, "name": "records", "weight": 1.0})
    in_process = _take(_iter(c, tok)[0], 4)
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's worker pool reads its absl flags (a command line parses them)
        flags.FLAGS.mark_as_parsed()
    c.data.num_workers = 1
    it, stats = _iter(c, tok)
    with_worker = _take(it, 4)
    it.close()
    _same_batches(in_process, with_worker)
    assert stats.as_dict()["source/json/samples"] + stats.as_dict()["source/records/samples"] == 16


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sea_jax.records", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))


def test_cli_help_conversion_and_user_errors(tmp_path):
    p = _cli("--help")
    assert p.returncode == 0 and "python -m sea_jax.records" in p.stdout and "--embed_images" in p.stdout
    root = str(tmp_path / "data")
    path = _write_dataset(root)
    out = str(tmp_path / "recs")
    p = _cli(f"--json={path}", f"--out={out}", f"--image_root={root}", "--embed_images")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["num_records"] == 17 and summary["images"]["embedded"] == 12 and summary["shards"] == 1
    p = _cli(f"--json={path}", f"--out={out}")
    assert p.returncode == 2 and "exists; pass --overwrite" in p.stderr and "Traceback" not in p.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"id": "a"},\n  {"id": "b" "x": 1}\n]')
    p = _cli(f"--json={broken}", f"--out={tmp_path / 'o'}")
    assert p.returncode == 2 and "broken.json: malformed JSON at line 3" in p.stderr and "Traceback" not in p.stderr
    p = _cli(f"--out={tmp_path / 'o'}")
    assert p.returncode == 2 and "--json" in p.stderr


def test_json_is_parsed_once_per_process(tmp_path, monkeypatch):
    # The main process parses a JSON once (num_examples counts it; the iterator reuses the count and
    # keeps no copy), and a worker parses it once on its first read, whatever its reader threads.
    import concurrent.futures
    import pickle

    from sea_jax.data import sources

    root = str(tmp_path / "data")
    path = _write_dataset(root)
    import time

    calls = []
    real = sources.load_records

    def slow_load(p):  # a parse long enough for the reader threads to overlap (a real 1 GB JSON: ~18 s)
        calls.append(p)
        time.sleep(0.2)
        return real(p)

    monkeypatch.setattr(sources, "load_records", slow_load)
    c = _config(path, root)
    assert pipeline.num_examples(c) == 17 and len(calls) == 1
    src = sources.JsonSource(path, keep=False)
    assert len(src) == 17 and len(calls) == 1 and src._records is None  # counted before: not parsed again
    worker_copy = pickle.loads(pickle.dumps(src))  # what a Grain worker receives: path and count
    assert len(pickle.dumps(src)) < 500
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: worker_copy[i], range(17)))
    assert len(calls) == 2 and [g[0] for g in got] == list(range(17))
    with open(path, "a") as f:  # a changed file is parsed (and validated) again
        f.write(" ")
    sources.JsonSource(path, keep=False)
    assert len(calls) == 3
