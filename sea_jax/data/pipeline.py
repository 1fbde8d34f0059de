"""The training input pipeline (Grain): records -> fixed-shape, per-process batches.

Entry points::

    iterator, stats = make_train_iterator(config, tokenizer, image_token_id, num_image_tokens,
                                          image_size)
    batch = next(iterator)            # dict of numpy arrays, see below
    state = iterator.get_state()      # JSON-serialisable dict; Orbax: grain.checkpoint.CheckpointSave(iterator)
    iterator.set_state(state)         # the following batches are exactly those of an uninterrupted run
    steps_per_epoch = num_examples(config) // config.train.batch_size

Batch (``b`` = per-process batch = ``config.train.batch_size // process_count``, ``L`` =
``config.data.max_length``, ``H = W`` = ``image_size``, ``p, n`` = the labels' patches and top-n):

====================  ==============  ==========================================================
``images``            float32 [b,H,W,3]  SigLIP-normalised, in [-1, 1]; zeros for text-only rows
``input_ids``         int32 [b, L]    right-padded with the tokenizer's pad id (0 if none)
``attention_mask``    int32 [b, L]    1 on real tokens
``loss_mask``         bool [b, L]     True where the token at t is a target (predicted from < t)
``has_image``         bool [b]        False for text-only rows (no image tokens in their ids)
``label_ids``         int32 [b, p, n] only with ``sea.label_source == "batch"``; -1 = no label
``label_scores``      float32 [b,p,n] idem; <= 0 where there is no label
``sample_id``         numpy str [b]   host-only (logs); :func:`device_batch` drops it
====================  ==============  ==========================================================

How the data is laid out, and why:

* Order. Records are shuffled with ``config.seed`` (a fresh permutation each epoch: Grain's
  ``shuffle`` before ``repeat``), then dealt round-robin into ``S = config.data.num_shards`` shards
  (0 = one per process). Process ``i`` of ``P`` owns shards ``[i*S/P, (i+1)*S/P)``; each shard is
  processed, filtered and batched on its own (``B/S`` rows per global batch) and a process's batch
  is the concatenation of its shards' rows. The global batch (process 0's rows, then process 1's,
  ...: what ``jax.make_array_from_process_local_data`` builds) therefore depends on ``S`` and the
  seed only, not on ``P`` or on worker counts: a 1-process run with ``num_shards=2`` sees exactly
  the global batches of a 2-process run. Without bad samples, global batch k is records
  ``[k*B, (k+1)*B)`` of the shuffled stream whatever ``S`` is (their order inside the batch
  follows the shards).
* Skips. A bad sample (:data:`sea_jax.data.llava.SKIP_REASONS`) is removed before batching, so
  batches stay full; the batcher pulls further records instead. Skips travel with the batch
  through the worker processes and are counted and logged (logger ``sea_jax.data``, with the
  sample id) when the trainer takes that batch, so counts are exact, deterministic, and part of the
  checkpointed iterator state. Within an epoch a bad record is counted once; it is counted again
  each time a later epoch reaches it.
* Workers. Per shard: ``config.data.num_workers`` processes (Grain ``mp_prefetch``, 0 = in the
  main process), each decoding with ``config.data.num_threads`` threads; processed single samples
  come back in the shuffled order whatever the worker count (the batching happens after the
  workers), and ``config.data.prefetch`` batches are prepared ahead in a thread.
* Precomputed labels (``sea.label_source == "batch"``): the shards written by
  ``python -m sea_jax.labels`` are memory-mapped and joined by image path (labels depend on the
  image only), then by sample id. A row without labels (text-only, or an image the labeller could
  not read) gets ids -1 and is counted as ``no_labels``.

A malformed JSON file raises :class:`DataFormatError` naming the file, line and column.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import threading
import zipfile
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sea_jax.data import images as image_lib
from sea_jax.data.llava import SKIP_REASONS, Encoder, SkipSample, parse_record, record_id
from sea_jax.errors import DataFormatError, PathError

log = logging.getLogger("sea_jax.data")

HOST_KEYS = ("sample_id",)


# ----------------------------------------------------------------------------------------------
# Sources


def load_records(path: str) -> list:
    """Reads a LLaVA JSON list (``.json``) or one record per line (``.jsonl``).

    Raises:
      DataFormatError: naming ``path`` and the line/column of a JSON syntax error, or when a
        ``.json`` file is not a list.
      FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.exists(path):
        raise PathError(f"data file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}: line {lineno}, column {e.colno}: {e.msg}") from e
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} "
                              f"(char {e.pos}): {e.msg}") from e
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


class JsonSource:
    """Random access to the records of a LLaVA JSON; element ``i`` is ``(i, record)``.

    Pickles as its path only (Grain sends the pipeline to worker processes; 665k records are read
    again there rather than pickled).
    """

    def __init__(self, path: str):
        self.path = path
        self._records = load_records(path)
        self._len = len(self._records)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        if self._records is None:
            self._records = load_records(self.path)
            if len(self._records) != self._len:
                raise RuntimeError(f"{self.path} changed while training ({len(self._records)} != {self._len} records)")
        return int(index), self._records[index]

    def __getstate__(self):
        return {"path": self.path, "_len": self._len, "_records": None}


class TfdsSource:
    """Random access to a TFDS dataset through ``tfds.data_source`` (array_record, no tf.data).

    Element ``i`` is ``(i, example)``; the example needs the image feature (uint8 [h, w, c] or
    encoded bytes) and the caption feature (str/bytes, or a list of them: the first is used).
    """

    def __init__(self, name: str, split: str, data_dir: str = "", source=None):
        self.name, self.split, self.data_dir = name, split, data_dir
        self._source = source if source is not None else self._open()
        self._len = len(self._source)
        self._picklable_source = source  # an explicit (test / custom) source travels as is

    def _open(self):
        import tensorflow_datasets as tfds

        return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir or None)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        if self._source is None:
            self._source = self._open()
        return int(index), self._source[int(index)]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = self._picklable_source
        return state


# ----------------------------------------------------------------------------------------------
# Precomputed labels


def _mmap_npz_member(path: str, name: str) -> np.ndarray:
    """Array ``name`` of an ``.npz`` written by ``np.savez`` (stored, not deflated), memory-mapped
    so a random sample costs one row read, not the whole shard."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as z:
            return z[name]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the zip local file header: name and extra-field lengths at 26..30
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class LabelStore:
    """Labels written by ``python -m sea_jax.labels`` (``index.json`` + shards), joined by image
    path, then sample id. Picklable (maps are reopened lazily in each worker)."""

    def __init__(self, label_dir: str):
        index_path = os.path.join(label_dir, "index.json")
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{index_path} is missing: run `python -m sea_jax.labels` to completion first")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        self.label_dir = label_dir
        self.shards: list[str] = index["shards"]
        self.by_image: dict[str, list[int]] = index["images"]
        self.by_sample: dict[str, list[int]] = index.get("samples", {})
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        ids, _ = self._shard(0)
        self.num_patches, self.top_n = int(ids.shape[1]), int(ids.shape[2])

    def _shard(self, s: int):
        if s not in self._maps:
            path = os.path.join(self.label_dir, self.shards[s])
            self._maps[s] = (_mmap_npz_member(path, "ids"), _mmap_npz_member(path, "scores"))
        return self._maps[s]

    def lookup(self, sample_id: str, image: str | None) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids int32 [p, n], scores float32 [p, n])`` with ids -1 / scores 0 where dropped, or
        None when this sample's image was not labelled."""
        loc = self.by_image.get(image) if image is not None else None
        if loc is None:
            loc = self.by_sample.get(sample_id) if image is not None else None
        if loc is None:
            return None
        ids, scores = self._shard(int(loc[0]))
        row_ids = np.asarray(ids[int(loc[1])], np.int32)
        row_scores = np.asarray(scores[int(loc[1])], np.float32)
        return row_ids, np.where(row_ids >= 0, row_scores, np.float32(0.0))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


# ----------------------------------------------------------------------------------------------
# Per-sample processing (runs in Grain worker threads / processes)


class SampleProcessor:
    """``(index, raw) -> element``: a processed sample dict, or ``{"skip": reason, ...}``.

    Text checks come first (cheap), then the image; the decision depends on the record and the
    files only, so it is the same in every run.
    """

    def __init__(self, encoder: Encoder, *, kind: str, image_root: str, image_size: int, pad_to_square: bool,
                 labels: LabelStore | None, tfds_image_key: str = "image", tfds_caption_key: str = "caption",
                 tfds_prefix: str = ""):
        self.encoder = encoder
        self.kind = kind
        self.image_root = image_root
        self.image_size = int(image_size)
        self.pad_to_square = bool(pad_to_square)
        self.labels = labels
        self.tfds_image_key, self.tfds_caption_key, self.tfds_prefix = tfds_image_key, tfds_caption_key, tfds_prefix
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, item) -> dict[str, Any]:
        index, raw = item
        sid = record_id(raw, index) if self.kind == "llava_json" else self._tfds_id(index, raw)
        try:
            return self._process(index, raw)
        except SkipSample as e:
            return {"skip": e.reason, "sample_id": sid, "detail": e.detail}

    def _tfds_id(self, index, raw) -> str:
        tid = raw.get("tfds_id") if isinstance(raw, dict) else None
        if isinstance(tid, bytes):
            tid = tid.decode("utf-8", "replace")
        return str(tid) if tid else f"{self.tfds_prefix}{index}"

    def _encode(self, fn, *args):
        # The Rust tokenizer is not re-entrant ("Already borrowed"): one thread at a time; the
        # image decoding, the expensive part, stays parallel.
        with self._lock:
            return fn(*args)

    def _process(self, index: int, raw) -> dict[str, Any]:
        if self.kind == "llava_json":
            record = parse_record(raw, index)
            enc = self._encode(self.encoder.encode, record)
            pixels = self._load_file(record.image) if record.image is not None else None
            sid, image_key = record.sample_id, record.image
        else:
            sid = self._tfds_id(index, raw)
            caption = raw.get(self.tfds_caption_key) if isinstance(raw, dict) else None
            if isinstance(caption, (list, tuple, np.ndarray)) and not isinstance(caption, (str, bytes)):
                caption = caption[0] if len(caption) else ""
            if isinstance(caption, (bytes, np.bytes_)):
                caption = bytes(caption).decode("utf-8", "replace")
            if not isinstance(caption, str) or self.tfds_image_key not in raw:
                raise SkipSample("bad_record", f"needs '{self.tfds_image_key}' and a string '{self.tfds_caption_key}'")
            enc = self._encode(self.encoder.encode_caption, sid, caption)
            pixels = self._tfds_pixels(raw[self.tfds_image_key])
            image_key = None
        out = {
            "sample_id": sid,
            "input_ids": enc.input_ids,
            "loss_mask": enc.loss_mask,
            "truncated": enc.truncated,
            "image": pixels,
        }
        if self.labels is not None:
            found = self.labels.lookup(sid, image_key) if (pixels is not None and image_key is not None) else None
            out["labels"] = found
        return out

    def _load_file(self, rel: str) -> np.ndarray:
        path = os.path.join(self.image_root, rel)
        if not os.path.exists(path):
            raise SkipSample("missing_image", f"{path} does not exist")
        try:
            return image_lib.load_and_preprocess(path, self.image_size, pad_to_square=self.pad_to_square)
        except image_lib.ImageLoadError as e:
            raise SkipSample("corrupt_image", str(e)) from e

    def _tfds_pixels(self, image) -> np.ndarray:
        import io

        from PIL import Image

        try:
            if isinstance(image, (bytes, np.bytes_)):
                with Image.open(io.BytesIO(bytes(image))) as img:
                    img.load()
                    pil = image_lib.to_rgb(img).copy()
                return image_lib.preprocess_image(pil, self.image_size, pad_to_square=self.pad_to_square)
            arr = np.asarray(image)
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.dtype != np.uint8:
                raise SkipSample("corrupt_image", f"image array {arr.dtype} {arr.shape}")
            pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            return image_lib.preprocess_image(pil, self.image_size, pad_to_square=self.pad_to_square)
        except (OSError, ValueError) as e:
            raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Batching (after the workers, in the main process)


@dataclasses.dataclass
class DataStats:
    """What the pipeline has served so far, as of the last batch the trainer took.

    Attributes:
      batches: batches served.
      samples: rows served (batches x per-process batch).
      skipped: reason -> samples skipped (every reason of ``SKIP_REASONS``, zeros included).
      truncated: served rows cut at max_length (after the image tokens).
      no_labels: served image rows without precomputed labels.
    """

    batches: int = 0
    samples: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    truncated: int = 0
    no_labels: int = 0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-serialisable: ``{"batches", "samples", "truncated", "no_labels",
        "skipped_total", "skipped/<reason>"...}`` (what the trainer logs)."""
        out = {"batches": self.batches, "samples": self.samples, "truncated": self.truncated,
               "no_labels": self.no_labels, "skipped_total": self.skipped_total}
        out.update({f"skipped/{r}": n for r, n in self.skipped.items()})
        return out

    def load(self, d: dict[str, Any]) -> None:
        self.batches, self.samples = int(d["batches"]), int(d["samples"])
        self.truncated, self.no_labels = int(d["truncated"]), int(d["no_labels"])
        self.skipped = {r: int(d.get(f"skipped/{r}", 0)) for r in SKIP_REASONS}


def _batch_dataset(shards: Sequence, rows_per_shard: int, collate):

    class BatchIterDataset(grain.IterDataset):
        """Takes ``rows_per_shard`` good samples from each shard stream (skipping the bad ones,
        which it collects), collates them into one batch."""

        def __init__(self):
            super().__init__(list(shards))

        def __iter__(self):
            return BatchIterator([iter(s) for s in self.parents])

        def __str__(self):
            return f"BatchIterDataset(rows_per_shard={rows_per_shard})"

    class BatchIterator(grain.DatasetIterator):
        def __init__(self, parents):
            super().__init__(parents)

        def __next__(self):
            rows, skipped = [], []
            for it in self._parents:
                got = 0
                while got < rows_per_shard:
                    try:
                        el = next(it)
                    except StopIteration:
                        # The end of a finite (num_epochs) stream: hand the last skips over so
                        # the counts stay exact, then stop.
                        if skipped:
                            return {"skipped": skipped, "end": True}
                        raise
                    if "skip" in el:
                        skipped.append((el["skip"], el["sample_id"], el["detail"]))
                    else:
                        rows.append(el)
                        got += 1
            batch = collate(rows)
            batch["skipped"] = skipped
            return batch

        def get_state(self):
            return {"shards": [it.get_state() for it in self._parents]}

        def set_state(self, state):
            for it, s in zip(self._parents, state["shards"]):
                it.set_state(s)

    return BatchIterDataset()


class Collate:
    """Rows -> fixed-shape batch (see the module docstring for keys, shapes and dtypes)."""

    def __init__(self, max_length: int, image_size: int, pad_id: int, label_shape: tuple[int, int] | None):
        self.max_length, self.image_size, self.pad_id, self.label_shape = max_length, image_size, pad_id, label_shape

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        b, L, s = len(rows), self.max_length, self.image_size
        out = {
            "images": np.zeros((b, s, s, 3), np.float32),
            "input_ids": np.full((b, L), self.pad_id, np.int32),
            "attention_mask": np.zeros((b, L), np.int32),
            "loss_mask": np.zeros((b, L), bool),
            "has_image": np.zeros((b,), bool),
            "sample_id": np.asarray([r["sample_id"] for r in rows], dtype=np.str_),
            "truncated": np.asarray([r["truncated"] for r in rows], bool),
        }
        if self.label_shape is not None:
            out["label_ids"] = np.full((b, *self.label_shape), -1, np.int32)
            out["label_scores"] = np.zeros((b, *self.label_shape), np.float32)
            out["no_labels"] = np.zeros((b,), bool)
        for i, r in enumerate(rows):
            t = len(r["input_ids"])
            out["input_ids"][i, :t] = r["input_ids"]
            out["attention_mask"][i, :t] = 1
            out["loss_mask"][i, :t] = r["loss_mask"]
            if r["image"] is not None:
                out["images"][i] = r["image"]
                out["has_image"][i] = True
            if self.label_shape is not None:
                if r["labels"] is not None:
                    out["label_ids"][i], out["label_scores"][i] = r["labels"]
                elif r["image"] is not None:
                    out["no_labels"][i] = True
        return out


class DataIterator(grain.DatasetIterator):
    """The trainer's iterator: batches as in the module docstring, plus exact skip accounting.

    A ``grain.DatasetIterator`` (so ``grain.checkpoint.CheckpointSave(iterator)`` works in Orbax);
    ``get_state()`` is a JSON-serialisable dict ``{"pipeline": <Grain state>, "stats": <stats>}``.
    ``stats`` (a :class:`DataStats`) is updated when a batch is taken.
    """

    def __init__(self, inner, stats: DataStats):
        super().__init__(inner)
        self.stats = stats

    def __next__(self) -> dict[str, Any]:
        batch = next(self._parent)
        self._account(batch.pop("skipped"))
        if batch.get("end"):
            raise StopIteration
        self.stats.batches += 1
        self.stats.samples += len(batch["sample_id"])
        self.stats.truncated += int(batch.pop("truncated").sum())
        if "no_labels" in batch:
            self.stats.no_labels += int(batch.pop("no_labels").sum())
        return batch

    def _account(self, skipped) -> None:
        for reason, sid, detail in skipped:
            self.stats.skipped[reason] += 1
            log.warning("skipped sample %s (%s): %s", sid, reason, detail)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "stats": self.stats.as_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.stats.load(state["stats"])

    def close(self) -> None:
        self._parent.close()
        super().close()


def device_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The batch without its host-only fields (:data:`HOST_KEYS`), ready for the device."""
    return {k: v for k, v in batch.items() if k not in HOST_KEYS}


# ----------------------------------------------------------------------------------------------
# Entry points


def make_source(config, *, source=None):
    """The random-access source of ``config.data`` (``llava_json`` or ``tfds``).

    ``source``: for ``kind="tfds"``, an already-open random-access source (tests, custom data)."""
    dc = config.data
    if dc.kind == "llava_json":
        if not dc.json:
            raise ValueError("config.data.json is empty")
        return JsonSource(dc.json)
    if dc.kind == "tfds":
        if not dc.tfds_name and source is None:
            raise ValueError("config.data.tfds_name is empty")
        return TfdsSource(dc.tfds_name, dc.tfds_split, dc.tfds_data_dir, source=source)
    raise ValueError(f"config.data.kind must be 'llava_json' or 'tfds', got {dc.kind!r}")


def num_examples(config, *, source=None) -> int:
    """Records in the dataset, bad ones included (steps per epoch = this // global batch)."""
    return len(make_source(config, source=source))


def _process_info(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return int(process_index), int(process_count)


def make_train_iterator(config, tokenizer, image_token_id: int, num_image_tokens: int, image_size: int, *,
                        process_index: int | None = None, process_count: int | None = None,
                        num_epochs: int | None = None, label_dir: str | None = None,
                        source=None) -> tuple[DataIterator, DataStats]:
    """Builds this process's training iterator.

    Args:
      config: the run config; reads ``seed``, ``train.batch_size`` (global), ``data.*``
        (kind, json, image_root, tfds_*, template, pad_to_square, max_length, num_shards,
        num_workers, num_threads, prefetch) and ``sea.label_source`` / ``labels.output_dir``.
      tokenizer: the LLM tokenizer with ``<image>`` special (``sea_jax.data.llava.add_image_token``).
      image_token_id: its id; num_image_tokens: visual tokens per image (the patch count).
      image_size: pixels per side of ``images``.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_epochs: None = repeat forever (the trainer decides the steps); k = stop after k passes
        (the last partial batch is dropped; its skips are still counted).
      label_dir: precomputed labels; default ``config.labels.output_dir`` when
        ``config.sea.label_source == "batch"``, else no labels.
      source: for ``data.kind == "tfds"``, an open random-access source instead of ``tfds_name``.

    Returns:
      ``(iterator, stats)``; ``stats is iterator.stats``.
    """
    dc = config.data
    pi, pc = _process_info(process_index, process_count)
    num_shards = int(dc.get("num_shards", 0)) or pc
    batch = int(config.train.batch_size)
    if num_shards % pc:
        raise ValueError(f"data.num_shards={num_shards} must be a multiple of the process count {pc}")
    if batch % num_shards:
        raise ValueError(f"train.batch_size={batch} must be a multiple of data.num_shards={num_shards}")
    rows = batch // num_shards

    encoder = Encoder(tokenizer, dc.template, image_token_id, num_image_tokens, int(dc.max_length))
    if label_dir is None and config.sea.label_source == "batch":
        label_dir = config.labels.output_dir
        if not label_dir:
            raise ValueError("sea.label_source='batch' needs labels.output_dir (or label_dir=)")
    labels = LabelStore(label_dir) if label_dir else None
    if labels is not None and labels.num_patches != num_image_tokens:
        raise ValueError(f"labels in {label_dir} have {labels.num_patches} patches per image, the model "
                         f"{num_image_tokens} image tokens (labelled at another resolution?)")
    src = make_source(config, source=source)
    processor = SampleProcessor(
        encoder, kind=dc.kind, image_root=dc.image_root, image_size=image_size,
        pad_to_square=dc.pad_to_square, labels=labels, tfds_image_key=dc.tfds_image_key,
        tfds_caption_key=dc.tfds_caption_key, tfds_prefix=f"{dc.tfds_name}/{dc.tfds_split}/")

    base = grain.MapDataset.source(src).shuffle(seed=int(config.seed)).repeat(num_epochs)
    per_process = num_shards // pc
    shard_streams = []
    for s in range(pi * per_process, (pi + 1) * per_process):
        ds = base[s::num_shards].map(processor)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(dc.get("num_threads", 4)),
                                                  prefetch_buffer_size=max(2 * rows, 1)))
        if int(dc.num_workers) > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(dc.num_workers)))
        shard_streams.append(ds)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_shape = (labels.num_patches, labels.top_n) if labels is not None else None
    ds = _batch_dataset(shard_streams, rows, Collate(int(dc.max_length), int(image_size), pad_id, label_shape))
    if int(dc.prefetch) > 0:
        import grain.experimental as gx

        ds = gx.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(dc.prefetch))
    stats = DataStats()
    return DataIterator(iter(ds), stats), stats
