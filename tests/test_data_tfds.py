"""``data.kind="tfds"`` on datasets really written to disk in TFDS's array_record layout (a
``GeneratorBasedBuilder`` prepared here, read back through ``tfds.data_source`` by name and folder,
no TensorFlow): image + caption rows (stage 1) and LLaVA conversations with images and text-only
rows (stage 2), each row equal to the same record read from a LLaVA JSON."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sea_jax.data import pipeline
from test_data_pipeline import _config, _iter, chat_tok, tok  # noqa: F401

CONVERSATIONS = [
    {"id": "c0", "image": 0, "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red cat."},
        {"from": "human", "value": "Is it raining?"}, {"from": "gpt", "value": "No, the sky is clear."}]},
    {"id": "c1", "image": None, "conversations": [
        {"from": "human", "value": "How many birds are there?"}, {"from": "gpt", "value": "There are three."}]},
    {"id": "c2", "image": 1, "conversations": [
        {"from": "human", "value": "Describe the picture briefly."}, {"from": "gpt", "value": "Two dogs."}]},
    {"id": "c3", "image": None, "conversations": [
        {"from": "system", "value": "A chat between a curious human and an assistant."},
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Birds?"}, {"from": "gpt", "value": "Three."}]},
    {"id": "c4", "image": 2, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "   "}]},  # empty answer
    {"id": "c5", "image": 3, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A blue dog."}]},
]


def _png(seed: int, shape=(11, 9, 3)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def _prepare(data_dir: str, kind: str) -> str:
    """Writes a TFDS dataset ("sea_test_conversations" or "sea_test_captions") into data_dir with
    the builder unregistered, so that reading it goes through the files alone, as in a real run."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered

    with registered.skip_registration():
        if kind == "conversations":
            class SeaTestConversations(tfds.core.GeneratorBasedBuilder):
                VERSION = tfds.core.Version("1.0.0")

                def _info(self):
                    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                        "id": tfds.features.Text(),
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "has_image": np.bool_,
                        "conversations": tfds.features.Sequence(
                            {"from": tfds.features.Text(), "value": tfds.features.Text()}),
                    }))

                def _split_generators(self, dl_manager):
                    return {"train": self._generate_examples()}

                def _generate_examples(self):
                    for i, r in enumerate(CONVERSATIONS):
                        # TFDS features are not optional: a text-only row carries a 1x1 image and
                        # has_image = False.
                        image = _png(r["image"]) if r["image"] is not None else _png(99, (1, 1, 3))
                        yield i, {"id": r["id"], "image": image, "has_image": r["image"] is not None,
                                  "conversations": r["conversations"]}

            builder = SeaTestConversations(data_dir=data_dir, file_format="array_record")
        else:
            class SeaTestCaptions(tfds.core.GeneratorBasedBuilder):
                VERSION = tfds.core.Version("1.0.0")

                def _info(self):
                    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "caption": tfds.features.Text(),
                    }))

                def _split_generators(self, dl_manager):
                    return {"train": self._generate_examples()}

                def _generate_examples(self):
                    for i in range(5):
                        yield i, {"image": _png(i), "caption": "   " if i == 3 else f"A red cat number {i}."}

            builder = SeaTestCaptions(data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    return builder.name


def _json_twin(root: str) -> str:
    """The conversations as a LLaVA JSON with PNG files: what the TFDS rows must equal."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    records = []
    for r in CONVERSATIONS:
        rec = {"id": r["id"], "conversations": r["conversations"]}
        if r["image"] is not None:
            name = f"img/{r['image']}.png"
            with open(os.path.join(root, name), "wb") as f:
                f.write(_png(r["image"]))
            rec["image"] = name
        records.append(rec)
    path = os.path.join(root, "twin.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _rows(batches):
    out = {}
    for b in batches:
        for r, sid in enumerate(b["sample_id"].tolist()):
            out[sid] = {k: b[k][r] for k in ("input_ids", "loss_mask", "attention_mask", "images", "has_image")}
    return out


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_stage2_conversations_from_a_tfds_dataset_on_disk(tmp_path, chat_tok, template):  # noqa: F811
    data_dir = str(tmp_path / "tfds")
    name = _prepare(data_dir, "conversations")
    assert os.path.exists(os.path.join(data_dir, name, "1.0.0", f"{name}-train.array_record-00000-of-00001"))
    c = _config("", str(tmp_path), batch=1, template=template, pad_to_square=True, kind="tfds", tfds_name=name,
                tfds_data_dir=data_dir)
    assert pipeline.check_paths(c) == [] and pipeline.num_examples(c) == 6
    it, stats = _iter(c, chat_tok, num_epochs=1)
    from_tfds = _rows(list(it))
    twin = _json_twin(str(tmp_path / "json"))
    it, twin_stats = _iter(_config(twin, str(tmp_path / "json"), batch=1, template=template, pad_to_square=True),
                           chat_tok, num_epochs=1)
    from_json = _rows(list(it))
    assert sorted(from_tfds) == sorted(from_json) == ["c0", "c1", "c2", "c3", "c5"]
    for sid in from_json:
        for k in from_json[sid]:
            np.testing.assert_array_equal(from_tfds[sid][k], from_json[sid][k], err_msg=f"{sid} {k}")
    assert not from_tfds["c1"]["has_image"] and not from_tfds["c3"]["has_image"] and from_tfds["c0"]["has_image"]
    assert stats.skipped == twin_stats.skipped and stats.skipped["empty_response"] == 1


def test_stage1_captions_from_a_tfds_dataset_on_disk(tmp_path, tok):  # noqa: F811
    from sea_jax.data.images import preprocess_image

    data_dir = str(tmp_path / "tfds")
    name = _prepare(data_dir, "captions")
    c = _config("", str(tmp_path), batch=2, kind="tfds", tfds_name=name, tfds_data_dir=data_dir)
    it, stats = _iter(c, tok, num_epochs=1)
    batches = list(it)
    assert len(batches) == 2 and stats.skipped["empty_response"] == 1 and stats.samples == 4
    img = tok.convert_tokens_to_ids("<image>")
    seen = set()
    for b in batches:
        assert b["has_image"].all()
        for r, sid in enumerate(b["sample_id"].tolist()):
            assert sid.startswith(f"{name}/train/")
            ids = b["input_ids"][r][b["attention_mask"][r] == 1].tolist()
            text = tok.decode([i for i in ids if i != img and i != tok.eos_token_id])
            i = int(text.split()[-1].rstrip("."))
            seen.add(i)
            want = preprocess_image(Image.open(io.BytesIO(_png(i))), 8)
            np.testing.assert_array_equal(b["images"][r], want)
    assert seen == {0, 1, 2, 4}


def test_tfds_source_in_a_mixture_with_json(tmp_path, chat_tok):  # noqa: F811
    data_dir = str(tmp_path / "tfds")
    name = _prepare(data_dir, "conversations")
    twin = _json_twin(str(tmp_path / "json"))
    c = _config("", str(tmp_path), batch=2, template="chat")
    c.data.sources = ({"kind": "tfds", "tfds_name": name, "tfds_data_dir": data_dir, "name": "tfds"},
                      {"path": twin, "image_root": str(tmp_path / "json"), "name": "json"})
    it, stats = _iter(c, chat_tok, num_epochs=1)
    served = [s for b in it for s in b["sample_id"].tolist()]
    assert sorted(served) == sorted(["c0", "c1", "c2", "c3", "c5"] * 2)
    d = stats.as_dict()
    assert d["source/tfds/samples"] == d["source/json/samples"] == 5
    assert d["source/tfds/skipped"] == d["source/json/skipped"] == 1


def test_tfds_data_dir_in_a_bucket(tmp_path, chat_tok, gcs):  # noqa: F811
    # The array_record reader opens local files: a gs:// data dir's dataset folder is copied to
    # data.cache_dir once, then read there.
    from sea_jax import storage

    data_dir = str(tmp_path / "tfds")
    name = _prepare(data_dir, "conversations")
    remote = f"gs://{gcs.bucket}/tfds-{os.path.basename(tmp_path)}"
    storage.copytree(data_dir, remote)
    cache = str(tmp_path / "cache")
    c = _config("", str(tmp_path), batch=1, template="chat", kind="tfds", tfds_name=name, tfds_data_dir=remote,
                cache_dir=cache)
    assert pipeline.check_paths(c) == []
    it, _ = _iter(c, chat_tok, num_epochs=1)
    from_bucket = _rows(list(it))
    it, _ = _iter(_config("", str(tmp_path), batch=1, template="chat", kind="tfds", tfds_name=name,
                          tfds_data_dir=data_dir), chat_tok, num_epochs=1)
    from_disk = _rows(list(it))
    assert sorted(from_bucket) == sorted(from_disk) == ["c0", "c1", "c2", "c3", "c5"]
    for sid in from_disk:
        np.testing.assert_array_equal(from_bucket[sid]["input_ids"], from_disk[sid]["input_ids"])
    assert os.path.isdir(os.path.join(cache, gcs.bucket, f"tfds-{os.path.basename(tmp_path)}", name, "1.0.0"))
