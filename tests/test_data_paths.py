"""Image paths that leave their image root: ``..``, absolute paths, URLs, NUL bytes and symlinks
out of a local root are refused by their text (and, locally, their real path) before anything is
opened. In the pipeline such a record is skipped (``image_outside_root``), counted, named in the
log, and the file it names is never opened, even when it exists and is a valid image; the
ArrayRecord converter never reads it either. (Under ``gs://`` roots: tests/test_data_gcs.py.)"""
from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from sea_jax import storage
from sea_jax.data import images as image_lib
from sea_jax.data import records as records_lib
from sea_jax.records import convert
from test_data_pipeline import _config, _iter, tok  # noqa: F401

CONV = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]


@pytest.fixture
def tree(tmp_path):
    """root/ with img/ok.png, a symlink inside pointing inside, links pointing out; a valid image
    outside the root (secret.png) and a folder outside (outside/)."""
    root = tmp_path / "root"
    os.makedirs(root / "img")
    os.makedirs(tmp_path / "outside")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "img" / "ok.png")
    Image.new("RGB", (4, 4), (250, 0, 0)).save(tmp_path / "secret.png")
    Image.new("RGB", (4, 4), (0, 250, 0)).save(tmp_path / "outside" / "x.png")
    os.symlink(root / "img" / "ok.png", root / "img" / "alias.png")  # inside -> inside
    os.symlink(tmp_path / "secret.png", root / "img" / "leak.png")  # a file link out
    os.symlink(tmp_path / "outside", root / "out")  # a folder link out
    return tmp_path


@pytest.mark.parametrize("rel, why", [
    ("../secret.png", "climbs out"),
    ("img/../../secret.png", "climbs out"),
    ("img/leak.png", "outside the image root"),  # a symlink out
    ("out/x.png", "outside the image root"),  # through a linked folder
    ("/etc/passwd", "is absolute"),
    ("gs://bucket/secret.png", "is a URL"),
    ("file:///etc/passwd", "is a URL"),
    ("img/ok.png\x00.txt", "NUL byte"),
    ("", "non-empty string"),
    (3, "non-empty string"),
])
def test_local_root_refuses(tree, rel, why):
    with pytest.raises(image_lib.ImagePathError, match=why):
        image_lib.resolve_under_root(str(tree / "root"), rel)


def test_local_root_allows_paths_that_stay_inside(tree, monkeypatch):
    root = str(tree / "root")
    assert image_lib.resolve_under_root(root, "img/ok.png") == os.path.join(root, "img/ok.png")
    assert image_lib.resolve_under_root(root, "img/alias.png") == os.path.join(root, "img/alias.png")
    assert image_lib.resolve_under_root(root, "img/../img/ok.png") == os.path.join(root, "img/../img/ok.png")
    # the root itself may be reached through a symlink
    os.symlink(root, tree / "root_link")
    assert image_lib.resolve_under_root(str(tree / "root_link"), "img/ok.png").endswith("root_link/img/ok.png")
    # "" = the working directory
    monkeypatch.chdir(root)
    assert image_lib.resolve_under_root("", "img/ok.png") == "img/ok.png"
    with pytest.raises(image_lib.ImagePathError):
        image_lib.resolve_under_root("", "../secret.png")


@pytest.mark.parametrize("rel, why", [
    ("../secret.png", "climbs out"),
    ("a/../b.png", "'..' segment"),  # inside, but a key is not resolved by anyone: refused on gs://
    ("/secret.png", "is absolute"),
    ("gs://other/secret.png", "is a URL"),
    (".", "the image root itself"),
])
def test_gs_root_refuses(rel, why):
    with pytest.raises(image_lib.ImagePathError, match=why):
        image_lib.resolve_under_root("gs://bucket/root", rel)


def test_gs_root_normalises_keys():
    assert image_lib.resolve_under_root("gs://bucket/root/", "img//a.png") == "gs://bucket/root/img/a.png"
    assert image_lib.resolve_under_root("gs://bucket/root", "./img/a.png") == "gs://bucket/root/img/a.png"


ESCAPES = {"up": "../secret.png", "deep": "img/../../secret.png", "link": "img/leak.png", "dir_link": "out/x.png",
           "absolute": None, "url": "gs://bucket/secret.png"}


def _escape_dataset(tree) -> str:
    records = [{"id": "fine", "image": "img/ok.png", "conversations": CONV},
               {"id": "alias", "image": "img/alias.png", "conversations": CONV}]
    for name, rel in ESCAPES.items():
        records.append({"id": name, "image": rel if rel is not None else str(tree / "secret.png"), "conversations": CONV})
    path = tree / "root" / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture
def opened(monkeypatch):
    """Every path PIL or storage.read_bytes is asked to open during the test."""
    seen = []
    real_open, real_read = Image.open, storage.read_bytes

    def spy_open(fp, *a, **k):
        if isinstance(fp, (str, os.PathLike)):
            seen.append(os.fspath(fp))
        return real_open(fp, *a, **k)

    def spy_read(path):
        seen.append(os.fspath(path))
        return real_read(path)

    monkeypatch.setattr(image_lib.Image, "open", spy_open)
    monkeypatch.setattr(storage, "read_bytes", spy_read)
    return seen


def test_pipeline_skips_counts_names_and_never_opens(tree, tok, opened, caplog):  # noqa: F811
    path = _escape_dataset(tree)
    c = _config(path, str(tree / "root"), batch=1)
    with caplog.at_level(logging.WARNING, logger="sea_jax.data"):
        it, stats = _iter(c, tok, num_epochs=1)
        served = sorted(b["sample_id"][0] for b in it)
    assert served == ["alias", "fine"]
    assert stats.skipped["image_outside_root"] == len(ESCAPES) == stats.skipped_total
    for name in ESCAPES:
        assert f"skipped sample {name} (image_outside_root, source data)" in caplog.text
    assert opened and all(os.path.realpath(p).startswith(str(tree / "root")) for p in opened
                          if not p.endswith("data.json")), opened
    assert not [p for p in opened if "secret" in p or "outside" in p or "leak" in p or p.startswith("/etc")]


def test_converter_never_reads_escaping_paths(tree, opened, tok):  # noqa: F811
    path = _escape_dataset(tree)
    out = str(tree / "recs")
    info = convert(path, out, image_root=str(tree / "root"), embed_images=True)
    assert info["images"]["outside_root"] == len(ESCAPES) and info["images"]["embedded"] == 2
    assert not [p for p in opened if "secret" in p or "outside" in p or "leak" in p]
    # ... and reading the converted records refuses them the same way
    c = _config("", str(tree / "root"), batch=1)
    c.data.kind, c.data.records = "array_record", out
    it, stats = _iter(c, tok, num_epochs=1)
    assert sorted(b["sample_id"][0] for b in it) == ["alias", "fine"]
    assert stats.skipped["image_outside_root"] == len(ESCAPES)


def test_embedded_image_under_an_escaping_path_is_refused(tmp_path, tok):  # noqa: F811
    # An ArrayRecord written elsewhere may carry bytes for any path: the rule holds for it too.
    from array_record.python.array_record_module import ArrayRecordWriter

    folder = tmp_path / "recs"
    os.makedirs(folder)
    w = ArrayRecordWriter(str(folder / "a.array_record"), "group_size:1")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="png")
    for sid, rel in (("ok", "img/a.png"), ("up", "../a.png"), ("abs", "/a.png")):
        w.write(records_lib.encode({"id": sid, "image": rel, "conversations": CONV}, buf.getvalue()))
    w.close()
    c = _config("", str(tmp_path), batch=1)
    c.data.kind, c.data.records = "array_record", str(folder)
    it, stats = _iter(c, tok, num_epochs=1)
    batches = list(it)
    assert [b["sample_id"][0] for b in batches] == ["ok"] and batches[0]["has_image"][0]
    assert stats.skipped["image_outside_root"] == 2
    np.testing.assert_array_equal(batches[0]["images"][0], image_lib.preprocess_image(Image.new("RGB", (4, 4)), 8))
