"""The training input pipeline (Grain): sources -> mixture -> fixed-shape, per-process batches.

Entry points::

    iterator, stats = make_train_iterator(config, tokenizer, image_token_id, num_image_tokens,
                                          image_size)
    batch = next(iterator)            # dict of numpy arrays, see below
    state = iterator.get_state()      # JSON-serialisable dict; Orbax: grain.checkpoint.CheckpointSave(iterator)
    iterator.set_state(state)         # the following batches are exactly those of an uninterrupted run
    steps_per_epoch = num_examples(config) // config.train.batch_size
    problems = check_paths(config)    # every data path that is unset or missing, before a run starts

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

* Sources (:mod:`sea_jax.data.mixture` says what a config may name, :mod:`sea_jax.data.sources`
  how each is read): LLaVA JSON/JSONL, ArrayRecord folders written by ``python -m sea_jax.records``
  (records by index, images optionally inside), TFDS datasets (image + caption, or LLaVA-style
  ``conversations`` with or without an image). Each source has its own image root, template and
  pad-to-square; the tokenizer (and its chat template) is the run's.
* Mixture (:mod:`sea_jax.data.mixing`): one random-access stream over all sources, either the
  selections concatenated and shuffled together (no weights; one source = the single-source
  pipeline exactly), or weighted draws with a ``restart`` / ``stop`` rule per source. Each element
  knows its source, and the served and skipped rows are counted per source.
* Order. The stream is shuffled with ``config.seed`` (a fresh permutation each epoch: Grain's
  ``shuffle`` before ``repeat``), then dealt round-robin into ``S = config.data.num_shards`` shards
  (0 = one per process). Process ``i`` of ``P`` owns shards ``[i*S/P, (i+1)*S/P)``; each shard is
  processed, filtered and batched on its own (``B/S`` rows per global batch) and a process's batch
  is the concatenation of its shards' rows. The global batch (process 0's rows, then process 1's,
  ...: what ``jax.make_array_from_process_local_data`` builds) therefore depends on ``S`` and the
  seed only, not on ``P`` or on worker counts: a 1-process run with ``num_shards=2`` sees exactly
  the global batches of a 2-process run. Without bad samples, global batch k is records
  ``[k*B, (k+1)*B)`` of the shuffled stream whatever ``S`` is (their order inside the batch
  follows the shards).
* Skips. A bad sample (:data:`SKIP_REASONS`) is removed before batching, so batches stay full; the
  batcher pulls further records instead. Skips travel with the batch through the worker
  processes and are counted and logged (logger ``sea_jax.data``, with the sample id and source)
  when the trainer takes that batch, so counts are exact, deterministic, and part of the
  checkpointed iterator state. Within an epoch a bad record is counted once; it is counted again
  each time a later epoch reaches it.
* Images. A record's image path is resolved under its source's image root and refused, never
  opened, when it leaves the root (``..``, an absolute path or URL, a symlink out of a local
  root): skip reason ``image_outside_root``. Local files are decoded from the path; ``gs://``
  ones are fetched with ``storage.read_bytes`` by the decoding threads (a missing object is
  ``missing_image``; any other storage error stops the run rather than being counted as a bad
  record, since a network failure is not a property of the record).
* Workers. Per shard: ``config.data.num_workers`` processes (Grain ``mp_prefetch``, 0 = in the
  main process), each decoding with ``config.data.num_threads`` threads; processed single samples
  come back in the shuffled order whatever the worker count (the batching happens after the
  workers), and ``config.data.prefetch`` batches are prepared ahead in a thread.
* Precomputed labels (``sea.label_source == "batch"``): the shards written by
  ``python -m sea_jax.labels`` are memory-mapped and joined by image path (labels depend on the
  image only), then by sample id (:mod:`sea_jax.data.label_store`). A row without labels
  (text-only, or an image the labeller could not read) gets ids -1 and is counted as ``no_labels``.
* State. ``get_state()`` holds the Grain positions, the statistics and a description of the
  mixture (per source: kind, records, selection, weight, exhaustion rule); restoring a state
  taken with another mixture is refused (:class:`ConfigError`), since the same positions would
  then name other records.

A malformed JSON file raises :class:`DataFormatError` naming the file, line and column.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sea_jax import storage
from sea_jax.data import buckets as buckets_lib
from sea_jax.data import images as image_lib
from sea_jax.data import mixing
from sea_jax.data import mixture as mixture_lib
from sea_jax.data import records as records_lib
from sea_jax.data.label_store import LabelStore
from sea_jax.data.llava import IMAGE_TOKEN, Encoder, SkipSample, parse_record, record_id
from sea_jax.data.llava import SKIP_REASONS as RECORD_SKIP_REASONS
from sea_jax.data.sources import ArrayRecordSource, JsonSource, TfdsSource, load_records
from sea_jax.errors import ConfigError, DataFormatError, PathError

log = logging.getLogger("sea_jax.data")

HOST_KEYS = ("sample_id",)
# Why a sample can be skipped: the record's reasons (sea_jax.data.llava), then the pipeline's own.
SKIP_REASONS: tuple[str, ...] = tuple(dict.fromkeys(RECORD_SKIP_REASONS + (
    "image_outside_root",  # the image path leaves its image root (.., absolute, URL, symlink): never opened
)))

# The Rust tokenizer is not re-entrant ("Already borrowed"), and every source's encoder shares the
# run's tokenizer: one encoding at a time per process; the image decoding, the expensive part,
# stays parallel.
_TOKENIZER_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------
# Per-sample processing (runs in Grain worker threads / processes)


def _text(value) -> str | None:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (str, np.str_)):
        return str(value)
    return None


def _tfds_turns(conv) -> list[dict[str, str]]:
    """TFDS ``conversations`` -> LLaVA turns. Accepts a ``Sequence({"from", "value"})`` feature
    (decoded as a dict of lists), a list of ``{"from", "value"}`` dicts, or a JSON string of one."""
    import json

    text = _text(conv)
    if text is not None:
        try:
            conv = json.loads(text)
        except json.JSONDecodeError as e:
            raise SkipSample("bad_record", f"'conversations' is not JSON: {e}") from e
    if isinstance(conv, dict):
        froms, values = conv.get("from"), conv.get("value")
        if froms is None or values is None or len(froms) != len(values):
            raise SkipSample("bad_record", "'conversations' needs equally long 'from' and 'value'")
        conv = [{"from": f, "value": v} for f, v in zip(froms, values)]
    if not isinstance(conv, (list, tuple)):
        raise SkipSample("bad_record", f"'conversations' is a {type(conv).__name__}")
    turns = []
    for t in conv:
        if not isinstance(t, dict):
            raise SkipSample("bad_record", "a turn of 'conversations' is not a mapping")
        turns.append({"from": _text(t.get("from")), "value": _text(t.get("value"))})
    return turns


def _has_pixels(image) -> bool:
    if image is None:
        return False
    if isinstance(image, (bytes, np.bytes_)):
        return len(image) > 0
    return np.asarray(image).size > 0


class SampleProcessor:
    """``(index, raw) -> element`` for one source: a processed sample dict, or
    ``{"skip": reason, ...}``; both carry ``"source"`` (the source's index in the mixture).

    ``kind``: ``llava_json`` (raw = a JSON record), ``array_record`` (raw = an entry of
    :mod:`sea_jax.data.records`: the record and maybe its image bytes) or ``tfds`` (raw = an example:
    ``conversations`` (+ optional image) is a LLaVA record, else image + caption).

    Text checks come first (cheap), then the image; the decision depends on the record and the
    files only, so it is the same in every run.
    """

    def __init__(self, encoder: Encoder, *, kind: str, image_root: str, image_size: int, pad_to_square: bool,
                 labels: LabelStore | None, source: int = 0, tfds_image_key: str = "image",
                 tfds_caption_key: str = "caption", tfds_conversations_key: str = "conversations",
                 tfds_prefix: str = "", pixels: image_lib.PixelSpec | None = None):
        self.encoder = encoder
        self.kind = kind
        self.image_root = image_root
        self.image_size = int(image_size)
        # the tower's normalisation and resize rule (SigLIP's by default)
        self.pixels = pixels if pixels is not None else image_lib.PixelSpec(self.image_size)
        if self.pixels.size != self.image_size:
            raise ValueError(f"pixels.size {self.pixels.size} != image_size {self.image_size}")
        self.pad_to_square = bool(pad_to_square)
        self.labels = labels
        self.source = int(source)
        self.tfds_image_key, self.tfds_caption_key = tfds_image_key, tfds_caption_key
        self.tfds_conversations_key, self.tfds_prefix = tfds_conversations_key, tfds_prefix

    def __call__(self, item) -> dict[str, Any]:
        index, raw = item
        ctx = {"sid": record_id(raw, index) if self.kind == "llava_json" else f"#{index}"}
        try:
            out = self._process(index, raw, ctx)
        except SkipSample as e:
            out = {"skip": e.reason, "sample_id": ctx["sid"], "detail": e.detail}
        except image_lib.ImagePathError as e:
            out = {"skip": "image_outside_root", "sample_id": ctx["sid"], "detail": str(e)}
        out["source"] = self.source
        return out

    def _tfds_id(self, index, raw) -> str:
        tid = raw.get("tfds_id") if isinstance(raw, dict) else None
        if isinstance(tid, bytes):
            tid = tid.decode("utf-8", "replace")
        return str(tid) if tid else f"{self.tfds_prefix}{index}"

    def _encode(self, fn, *args):
        with _TOKENIZER_LOCK:
            return fn(*args)

    def _process(self, index: int, raw, ctx: dict[str, str]) -> dict[str, Any]:
        if self.kind == "llava_json":
            return self._record(index, raw, image_bytes=None)
        if self.kind == "array_record":
            try:
                record, image_bytes = records_lib.decode(raw)
            except records_lib.RecordFormatError as e:
                raise SkipSample("bad_record", f"ArrayRecord entry {index}: {e}") from e
            ctx["sid"] = record_id(record, index)
            return self._record(index, record, image_bytes=image_bytes)
        ctx["sid"] = sid = self._tfds_id(index, raw)
        if not isinstance(raw, dict):
            raise SkipSample("bad_record", f"example is a {type(raw).__name__}, not a mapping")
        if self.tfds_conversations_key in raw:
            # A LLaVA record in TFDS features: its own "id" if it has one; the image is inline.
            own = _text(raw.get("id"))
            ctx["sid"] = sid = own if own else sid
            image = raw.get(self.tfds_image_key)
            has = _has_pixels(image) and bool(np.asarray(raw.get("has_image", True)))
            record = {"id": sid, "conversations": _tfds_turns(raw[self.tfds_conversations_key])}
            if has:
                record["image"] = f"{self.tfds_prefix}{index}"  # a name for logs, not a path
            return self._record(index, record, image_bytes=None, inline=image if has else None)
        caption = raw.get(self.tfds_caption_key)
        if isinstance(caption, (list, tuple, np.ndarray)) and not isinstance(caption, (str, bytes)):
            caption = caption[0] if len(caption) else ""
        if isinstance(caption, (bytes, np.bytes_)):
            caption = bytes(caption).decode("utf-8", "replace")
        if not isinstance(caption, str) or self.tfds_image_key not in raw:
            raise SkipSample("bad_record", f"needs '{self.tfds_image_key}' and a string '{self.tfds_caption_key}'")
        if self.encoder.template == "plain":
            enc = self._encode(self.encoder.encode_caption, sid, caption)
        else:  # the chat template: a one-turn conversation, the image asking, the caption answering
            rec = parse_record({"id": sid, "image": sid, "conversations": [
                {"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}]}, index)
            enc = self._encode(self.encoder.encode, rec)
        pixels = self._tfds_pixels(raw[self.tfds_image_key])
        return self._row(sid, enc, pixels, None)

    def _record(self, index: int, raw, *, image_bytes: bytes | None, inline=None) -> dict[str, Any]:
        record = parse_record(raw, index)
        enc = self._encode(self.encoder.encode, record)
        if record.image is None:
            pixels = None
        elif inline is not None:
            pixels = self._tfds_pixels(inline)
        elif image_bytes is not None:
            # Embedded at conversion, which never reads a path that leaves the root; a file from
            # elsewhere is held to the same rule.
            image_lib.check_relative(record.image)
            pixels = self._decode(image_bytes, record.image)
        else:
            pixels = self._load_file(record.image)
        return self._row(record.sample_id, enc, pixels, None if inline is not None else record.image)

    def _row(self, sid: str, enc, pixels, image_key: str | None) -> dict[str, Any]:
        out = {
            "sample_id": sid,
            "input_ids": enc.input_ids,
            "loss_mask": enc.loss_mask,
            "truncated": enc.truncated,
            "image": pixels,
        }
        if self.labels is not None:
            out["labels"] = self.labels.lookup(sid, image_key) if (pixels is not None and image_key is not None) \
                else None
        return out

    def _load_file(self, rel: str) -> np.ndarray:
        path = image_lib.resolve_under_root(self.image_root, rel)  # ImagePathError: refused, not opened
        if storage.is_remote(path):
            try:
                data = storage.read_bytes(path)
            except FileNotFoundError as e:
                raise SkipSample("missing_image", f"{path} does not exist") from e
            return self._decode(data, path)
        if not os.path.exists(path):
            raise SkipSample("missing_image", f"{path} does not exist")
        try:
            return image_lib.load_for(self.pixels, path, self.pad_to_square)
        except image_lib.ImageLoadError as e:
            raise SkipSample("corrupt_image", str(e)) from e

    def _decode(self, data: bytes, name: str) -> np.ndarray:
        try:
            pil = image_lib.decode_image(data, name)
        except image_lib.ImageLoadError as e:
            raise SkipSample("corrupt_image", str(e)) from e
        return image_lib.preprocess_for(self.pixels, pil, self.pad_to_square)

    def _tfds_pixels(self, image) -> np.ndarray:
        from PIL import Image

        try:
            if isinstance(image, (bytes, np.bytes_)):
                with Image.open(io.BytesIO(bytes(image))) as img:
                    img.load()
                    pil = image_lib.to_rgb(img).copy()
                return image_lib.preprocess_for(self.pixels, pil, self.pad_to_square)
            arr = np.asarray(image)
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.dtype != np.uint8:
                raise SkipSample("corrupt_image", f"image array {arr.dtype} {arr.shape}")
            pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            return image_lib.preprocess_for(self.pixels, pil, self.pad_to_square)
        except (OSError, ValueError) as e:
            raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from e


class MixtureProcessor:
    """``(k, item) -> processors[k](item)``: each source's element through its own processor."""

    def __init__(self, processors: Sequence[SampleProcessor]):
        self.processors = list(processors)

    def __call__(self, element) -> dict[str, Any]:
        k, item = element
        return self.processors[k](item)


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
      sources: source name -> ``{"samples": rows served, "skipped": samples skipped}``, in mixture
        order (empty = not counted per source).
    """

    batches: int = 0
    samples: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    truncated: int = 0
    no_labels: int = 0
    sources: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-serialisable: ``{"batches", "samples", "truncated", "no_labels",
        "skipped_total", "skipped/<reason>"...}`` (what the trainer logs), and with more than one
        source ``"source/<name>/samples"`` and ``"source/<name>/skipped"`` per source."""
        out = {"batches": self.batches, "samples": self.samples, "truncated": self.truncated,
               "no_labels": self.no_labels, "skipped_total": self.skipped_total}
        out.update({f"skipped/{r}": n for r, n in self.skipped.items()})
        if len(self.sources) > 1:
            for name, c in self.sources.items():
                out[f"source/{name}/samples"] = c["samples"]
                out[f"source/{name}/skipped"] = c["skipped"]
        return out

    def load(self, d: dict[str, Any]) -> None:
        self.batches, self.samples = int(d["batches"]), int(d["samples"])
        self.truncated, self.no_labels = int(d["truncated"]), int(d["no_labels"])
        self.skipped = {r: int(d.get(f"skipped/{r}", 0)) for r in SKIP_REASONS}
        self.sources = {name: {key: int(d.get(f"source/{name}/{key}", 0)) for key in ("samples", "skipped")}
                        for name in self.sources}


def _no_good_samples(skipped) -> None:
    from collections import Counter

    reasons = Counter(r for r, *_ in skipped)
    reason, sid, detail, _ = skipped[-1]
    raise DataFormatError(
        f"the data gave {len(skipped)} bad samples in a row without filling one batch ({dict(reasons)}); "
        f"e.g. sample {sid}: {reason}: {detail}. Fix the data or the settings that reject it "
        "(data.max_length, data.template, data.image_root)")


def _batch_dataset(shards: Sequence, rows_per_shard: int, collate, max_skips: int = 20_000, group: int = 1,
                   seed: int = 0):
    """Batches of ``rows_per_shard`` good rows from each shard stream; with ``group > 1`` rows of
    similar length travel together (:func:`sea_jax.data.buckets.group_window` over windows of
    ``group`` batches)."""

    class BatchIterDataset(grain.IterDataset):
        """Takes ``rows_per_shard`` good samples from each shard stream (skipping the bad ones,
        which it collects), collates them into one batch. More than ``max_skips`` bad samples
        for one batch means the data (or the settings) reject everything: a DataFormatError
        saying why, not an endless search.

        Grouped (``group > 1``): reads a window of ``group`` batches' rows from every shard, sorts
        each shard's by length, and serves the window's batches in an order drawn from
        ``(seed, window)``; a window's skips travel with its first batch. The state is the
        shards' positions at the window's start plus how many of its batches were served: a
        restored iterator reads the window again and drops those, so resume is exact."""

        def __init__(self):
            super().__init__(list(shards))

        def __iter__(self):
            return BatchIterator([iter(s) for s in self.parents])

        def __str__(self):
            return f"BatchIterDataset(rows_per_shard={rows_per_shard}, group={group})"

    class BatchIterator(grain.DatasetIterator):
        def __init__(self, parents):
            super().__init__(parents)
            self._queue: list[dict[str, Any]] = []  # the current window's batches not yet served
            self._start: list[Any] | None = None  # the shards' states at the current window's start
            self._window = 0  # index of the next window to read
            self._served = 0  # batches of the current window served
            self._drop = 0  # after set_state: batches of the re-read window served before the save
            self._ended = False

        def _take(self, it, n: int, skipped: list) -> tuple[list, bool]:
            rows = []
            while len(rows) < n:
                try:
                    el = next(it)
                except StopIteration:
                    return rows, True
                if "skip" in el:
                    skipped.append((el["skip"], el["sample_id"], el["detail"], el["source"]))
                    if len(skipped) > max_skips * max(n // rows_per_shard, 1):
                        _no_good_samples(skipped)
                else:
                    rows.append(el)
            return rows, False

        def __next__(self):
            if group <= 1:
                rows, skipped = [], []
                for it in self._parents:
                    got, ended = self._take(it, rows_per_shard, skipped)
                    if ended:
                        # The end of a finite (num_epochs) stream: hand the last skips over so
                        # the counts stay exact, then stop.
                        if skipped:
                            return {"skipped": skipped, "end": True}
                        raise StopIteration
                    rows += got
                batch = collate(rows)
                batch["skipped"] = skipped
                return batch
            if not self._queue:
                self._fill()
            self._served += 1
            return self._queue.pop(0)

        def _fill(self) -> None:
            if self._ended:
                raise StopIteration
            self._start = [it.get_state() for it in self._parents]
            skipped: list = []
            per_shard, ended = [], False
            for it in self._parents:
                got, end = self._take(it, group * rows_per_shard, skipped)
                per_shard.append(got)
                ended |= end
            k = min(len(r) for r in per_shard) // rows_per_shard
            if k == 0:
                self._ended = True
                if skipped:
                    self._queue, self._served = [{"skipped": skipped, "end": True}], 0
                    return
                raise StopIteration
            self._ended = ended
            orders = [buckets_lib.group_window([len(r["input_ids"]) for r in rows[:k * rows_per_shard]], k, seed,
                                               self._window) for rows in per_shard]
            batches = []
            for j in range(k):
                batch = collate([rows[i] for rows, order in zip(per_shard, orders) for i in order[j]])
                batch["skipped"] = skipped if j == 0 else []
                batches.append(batch)
            self._window += 1
            self._queue, self._served = batches[self._drop:], self._drop
            self._drop = 0

        def get_state(self):
            if group <= 1:
                return {"shards": [it.get_state() for it in self._parents]}
            if self._queue:  # inside a window: where it started, and how far it was served
                return {"shards": self._start, "window": self._window - 1, "served": self._served}
            return {"shards": [it.get_state() for it in self._parents], "window": self._window, "served": 0}

        def set_state(self, state):
            if group > 1 and "window" not in state:
                raise ConfigError("the checkpoint's data state was saved without data.group_batches; "
                                  "resume with the same data.group_batches")
            if group <= 1 and "window" in state:
                raise ConfigError(f"the checkpoint's data state was saved with data.group_batches > 1; "
                                  f"resume with the same data.group_batches (not {group})")
            for it, s in zip(self._parents, state["shards"]):
                it.set_state(s)
            if group > 1:
                self._window, self._drop = int(state["window"]), int(state["served"])
                self._queue, self._served, self._ended = [], 0, False

    return BatchIterDataset()


class Collate:
    """Rows -> fixed-shape batch (see the module docstring for keys, shapes and dtypes), plus the
    host-side counters the iterator pops (``truncated``, ``source``, ``no_labels``)."""

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
            "source": np.asarray([r["source"] for r in rows], np.int32),
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


def _mixture_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two mixture descriptions, ignoring source names (a renamed file)."""
    changes = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in ("mode", "period")
               if saved.get(k) != current.get(k)]
    a, b = saved.get("sources", []), current.get("sources", [])
    if len(a) != len(b):
        changes.append(f"{len(a)} sources -> {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        for k in sorted((set(x) | set(y)) - {"name"}):
            if x.get(k) != y.get(k):
                changes.append(f"source {i} ({y.get('name')}) {k}: {x.get(k)!r} -> {y.get(k)!r}")
    return changes


class DataIterator(grain.DatasetIterator):
    """The trainer's iterator: batches as in the module docstring, plus exact skip accounting.

    A ``grain.DatasetIterator`` (so ``grain.checkpoint.CheckpointSave(iterator)`` works in Orbax);
    ``get_state()`` is a JSON-serialisable dict ``{"pipeline": <Grain state>, "stats": <stats>,
    "mixture": <its description>}``. ``stats`` (a :class:`DataStats`) is updated when a batch is
    taken. ``names`` are the sources' names in mixture order.
    """

    def __init__(self, inner, stats: DataStats, names: Sequence[str] = ("data",),
                 mixture: dict[str, Any] | None = None):
        super().__init__(inner)
        self.stats = stats
        self.names = list(names)
        self.mixture = mixture

    def __next__(self) -> dict[str, Any]:
        batch = next(self._parent)
        self._account(batch.pop("skipped"))
        if batch.get("end"):
            raise StopIteration
        self.stats.batches += 1
        self.stats.samples += len(batch["sample_id"])
        self.stats.truncated += int(batch.pop("truncated").sum())
        per_source = np.bincount(batch.pop("source"), minlength=len(self.names))
        if self.stats.sources:
            for name, n in zip(self.names, per_source):
                self.stats.sources[name]["samples"] += int(n)
        if "no_labels" in batch:
            self.stats.no_labels += int(batch.pop("no_labels").sum())
        return batch

    def _account(self, skipped) -> None:
        for reason, sid, detail, source in skipped:
            self.stats.skipped[reason] += 1
            name = self.names[source]
            if self.stats.sources:
                self.stats.sources[name]["skipped"] += 1
            log.warning("skipped sample %s (%s, source %s): %s", sid, reason, name, detail)

    def get_state(self) -> dict[str, Any]:
        state = {"pipeline": self._parent.get_state(), "stats": self.stats.as_dict()}
        if self.mixture is not None:
            state["mixture"] = self.mixture
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("mixture")
        if saved is not None and self.mixture is not None:
            changes = _mixture_changes(saved, self.mixture)
            if changes:
                raise ConfigError("the data mixture differs from the one this checkpoint was taken with, so its "
                                  "data position would name other records (start a new run for a new mixture): "
                                  + "; ".join(changes))
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


def open_source(spec: mixture_lib.SourceSpec, *, cache_dir: str = "", source=None):
    """The random-access source of one :class:`~sea_jax.data.mixture.SourceSpec`.

    ``source``: an already-open random-access source (tests, custom data) for a ``tfds`` spec."""
    if spec.kind == "llava_json":
        return JsonSource(spec.path, keep=False)
    if spec.kind == "array_record":
        return ArrayRecordSource(spec.path, cache_dir)
    if not spec.tfds_name and source is None:
        raise ConfigError(f"{spec.where}: tfds_name is empty")
    return TfdsSource(spec.tfds_name, spec.tfds_split, spec.tfds_data_dir, source=source, cache_dir=cache_dir)


def make_source(config, *, source=None):
    """The random-access source of a single-source config (``data.kind`` and its fields).

    ``source``: for ``kind="tfds"``, an already-open random-access source (tests, custom data)."""
    return open_source(mixture_lib.single_source(config), cache_dir=config.data.get("cache_dir", ""), source=source)


@dataclasses.dataclass
class _Plan:
    mix: mixture_lib.Mixture
    sources: list
    stream: grain.MapDataset
    period: int
    description: dict[str, Any]


def _plan(config, *, source=None, num_epochs: int | None = None) -> _Plan:
    """The mixture of ``config``: its sources opened, selected and drawn into one stream."""
    mix = mixture_lib.from_config(config)
    if source is not None and not (mix.single and mix.sources[0].kind == "tfds"):
        raise ConfigError("source= stands in for a single-source config with data.kind='tfds' only")
    cache_dir = config.data.get("cache_dir", "")
    seed = int(config.seed)
    opened, datasets, described = [], [], []
    for k, spec in enumerate(mix.sources):
        src = open_source(spec, cache_dir=cache_dir, source=source)
        n = len(src)
        if n == 0:
            raise DataFormatError(f"{spec.where}: the source has no records")
        chosen = mixing.selection(spec.sampling, n, mixing.key_of(seed, "select", k), spec.where)
        ds = grain.MapDataset.source(src)
        if chosen is not None:
            ds = mixing.Selected(ds, chosen)
        opened.append(src)
        datasets.append(ds)
        described.append({"name": spec.name, "kind": spec.kind, "records": n, "sampling": str(spec.sampling),
                          "selected": len(ds), "weight": spec.weight,
                          "on_exhausted": spec.on_exhausted if mix.weighted else None})
    weights = [s.weight for s in mix.sources] if mix.weighted else None
    stream, period = mixing.build(datasets, weights, [s.on_exhausted for s in mix.sources], seed, num_epochs)
    if mix.weighted:
        empty = [s.name for s, c in zip(mix.sources, stream.drawn_before(period)) if c == 0]
        if empty:
            log.warning("data mixture: sources %s get no draw in the first epoch (%d draws): weights too small?",
                        empty, period)
    description = {"mode": "weighted" if mix.weighted else "concatenated", "period": period, "sources": described}
    return _Plan(mix, opened, stream, period, description)


def num_examples(config, *, source=None) -> int:
    """Records in one epoch of the data, bad ones included (steps per epoch = this // global
    batch): a single source's record count; a concatenated mixture's selected records; a weighted
    mixture's draws per epoch (``sum`` of the selections, or fewer when a ``stop`` source runs
    out first)."""
    return _plan(config, source=source).period


def check_paths(config) -> list[str]:
    """Every data path the run needs that is unset, a placeholder or missing, local or ``gs://``,
    one message per problem naming the config field or mixture entry (empty: all there). The
    single-source fields get the trainer's messages (``config.data.json=... does not exist``)."""
    return mixture_lib.path_problems(config)


def _process_info(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return int(process_index), int(process_count)


def _encoder(tokenizer, template: str, image_token_id: int, num_image_tokens: int, max_length: int, where: str):
    try:
        return Encoder(tokenizer, template, image_token_id, num_image_tokens, max_length)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def make_train_iterator(config, tokenizer, image_token_id: int, num_image_tokens: int, image_size: int, *,
                        process_index: int | None = None, process_count: int | None = None,
                        num_epochs: int | None = None, label_dir: str | None = None,
                        source=None, pixels: image_lib.PixelSpec | None = None) -> tuple[DataIterator, DataStats]:
    """Builds this process's training iterator.

    Args:
      config: the run config; reads ``seed``, ``train.batch_size`` (global), ``data.*``
        (the sources: kind, json, records, image_root, tfds_*, template, pad_to_square, or
        mixture / sources / on_exhausted; max_length, num_shards, num_workers, num_threads,
        prefetch, cache_dir) and ``sea.label_source`` / ``labels.output_dir``.
      tokenizer: the LLM tokenizer with ``<image>`` special (``sea_jax.data.llava.add_image_token``).
      image_token_id: its id; num_image_tokens: visual tokens per image (the patch count).
      image_size: pixels per side of ``images``.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_epochs: None = repeat forever (the trainer decides the steps); k = stop after k epochs
        of the mixture (the last partial batch is dropped; its skips are still counted).
      label_dir: precomputed labels; default ``config.labels.output_dir`` when
        ``config.sea.label_source == "batch"``, else no labels.
      source: for a single-source ``data.kind == "tfds"``, an open random-access source instead
        of ``tfds_name``.
      pixels: the vision tower's normalisation and resize rule (``MLLMConfig.pixel_spec``);
        default SigLIP's at ``image_size``.

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

    if label_dir is None and config.sea.label_source == "batch":
        label_dir = config.labels.output_dir
        if not label_dir:
            raise ValueError("sea.label_source='batch' needs labels.output_dir (or label_dir=)")
    labels = LabelStore(label_dir, dc.get("cache_dir", "")) if label_dir else None
    if labels is not None and labels.num_patches != num_image_tokens:
        raise ValueError(f"labels in {label_dir} have {labels.num_patches} patches per image, the model "
                         f"{num_image_tokens} image tokens (labelled at another resolution?)")
    plan = _plan(config, source=source, num_epochs=num_epochs)
    encoders: dict[str, Encoder] = {}
    processors = []
    for k, spec in enumerate(plan.mix.sources):
        if spec.template not in encoders:
            encoders[spec.template] = _encoder(tokenizer, spec.template, image_token_id, num_image_tokens,
                                               int(dc.max_length), spec.where)
        processors.append(SampleProcessor(
            encoders[spec.template], kind=spec.kind, image_root=spec.image_root, image_size=image_size,
            pad_to_square=spec.pad_to_square, labels=labels, source=k, tfds_image_key=spec.tfds_image_key,
            tfds_caption_key=spec.tfds_caption_key, tfds_conversations_key=spec.tfds_conversations_key,
            tfds_prefix=f"{spec.tfds_name}/{spec.tfds_split}/", pixels=pixels))
    process = MixtureProcessor(processors)

    per_process = num_shards // pc
    shard_streams = []
    for s in range(pi * per_process, (pi + 1) * per_process):
        ds = plan.stream[s::num_shards].map(process)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(dc.get("num_threads", 4)),
                                                  prefetch_buffer_size=max(2 * rows, 1)))
        if int(dc.num_workers) > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(dc.num_workers)))
        shard_streams.append(ds)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_shape = (labels.num_patches, labels.top_n) if labels is not None else None
    ds = _batch_dataset(shard_streams, rows, Collate(int(dc.max_length), int(image_size), pad_id, label_shape),
                        group=int(dc.get("group_batches", 0)) or 1, seed=int(config.seed))
    if int(dc.prefetch) > 0:
        import grain.experimental as gx

        ds = gx.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(dc.prefetch))
    names = [s.name for s in plan.mix.sources]
    stats = DataStats(sources={n: {"samples": 0, "skipped": 0} for n in names} if len(names) > 1 else {})
    return DataIterator(iter(ds), stats, names, plan.description), stats


__all__ = ["SKIP_REASONS", "HOST_KEYS", "SampleProcessor", "MixtureProcessor", "DataStats", "Collate", "DataIterator",
           "device_batch", "open_source", "make_source", "num_examples", "check_paths", "make_train_iterator",
           "load_records", "LabelStore", "JsonSource", "TfdsSource", "ArrayRecordSource", "DataFormatError",
           "PathError"]
