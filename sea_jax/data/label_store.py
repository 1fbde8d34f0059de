"""Precomputed semantic labels (``python -m sea_jax.labels``) looked up per sample for a batch.

The labeller writes ``index.json`` (shard names, image path -> [shard, row], sample id ->
[shard, row]) and ``.npz`` shards holding ``ids`` int32 ``[rows, p, n]`` and ``scores``
``[rows, p, n]``. :class:`LabelStore` joins a sample to its row by image path (labels depend on the
image only), then by sample id, and memory-maps the shards so a lookup reads one row.

The folder may be local or ``gs://``: ``index.json`` is read through :mod:`sea_jax.storage`, and a
shard is copied to the local cache (``storage.local_copy``, once per host, on its first lookup)
because a memory map needs a local file.
"""
from __future__ import annotations

import json
import struct
import zipfile

import numpy as np

from sea_jax import storage
from sea_jax.errors import DataFormatError, PathError


def mmap_npz_member(path: str, name: str) -> np.ndarray:
    """Array ``name`` of a local ``.npz`` written by ``np.savez`` (stored, not deflated),
    memory-mapped so a random sample costs one row read, not the whole shard."""
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
    """Labels of a ``python -m sea_jax.labels`` folder (local or ``gs://``), joined by image path,
    then sample id. Picklable (maps are reopened lazily in each worker).

    Raises:
      PathError: ``index.json`` is missing (the labeller did not finish).
      DataFormatError: ``index.json`` does not parse.
    """

    def __init__(self, label_dir: str, cache_dir: str = ""):
        index_path = storage.join(label_dir, "index.json")
        if not storage.exists(index_path):
            raise PathError(f"{index_path} is missing: run `python -m sea_jax.labels` to completion first")
        try:
            index = json.loads(storage.read_text(index_path))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{index_path}: line {e.lineno}, column {e.colno}: {e.msg}") from e
        self.label_dir = label_dir
        self.cache_dir = cache_dir
        self.shards: list[str] = index["shards"]
        self.by_image: dict[str, list[int]] = index["images"]
        self.by_sample: dict[str, list[int]] = index.get("samples", {})
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        ids, _ = self._shard(0)
        self.num_patches, self.top_n = int(ids.shape[1]), int(ids.shape[2])

    def _shard(self, s: int):
        if s not in self._maps:
            path = storage.local_copy(storage.join(self.label_dir, self.shards[s]), self.cache_dir or None)
            self._maps[s] = (mmap_npz_member(path, "ids"), mmap_npz_member(path, "scores"))
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


__all__ = ["LabelStore", "mmap_npz_member"]
