"""Random-access record sources: LLaVA JSON/JSONL, sea_jax ArrayRecord folders, TFDS datasets.

Every source has ``len()`` and ``source[i] -> (i, raw)``; ``raw`` is what the pipeline's sample
processor of that kind reads (a JSON value, an ArrayRecord entry's bytes, a TFDS example dict).
Sources travel to Grain's worker processes by pickle, so each pickles as *where to read*, not as
its records, and reopens lazily in the worker:

* :class:`JsonSource`: the path and the record count. Each worker process parses the whole file
  again on its first read (for mix665k, ~1 GB of JSON: one parse and one in-memory copy per worker
  per host). The main process parses it once, to count and validate, and keeps no copy unless it
  reads records itself (``data.num_workers == 0``). ``python -m sea_jax.records`` converts a
  JSON once into an ArrayRecord folder that workers read by index instead.
* :class:`ArrayRecordSource`: the shard paths and counts (from the folder's ``info.json``, so
  opening one reads no shard); a record is one indexed read.
* :class:`TfdsSource`: the dataset name, split and folder (``tfds.data_source``, array_record
  files, no TensorFlow).

Paths are local or ``gs://`` (:mod:`sea_jax.storage`). JSON is read whole through
``storage.read_bytes``. ArrayRecord files and TFDS data dirs are read by a C++ reader that opens
local files only: a ``gs://`` one is copied once per host to the local cache
(``storage.local_copy``; ``data.cache_dir``, default ``$SEA_JAX_CACHE_DIR`` or
``~/.cache/sea_jax/gcs``) and read there.
"""
from __future__ import annotations

import json
import posixpath
import threading
from typing import Any

from sea_jax import storage
from sea_jax.data import records as records_lib
from sea_jax.errors import DataFormatError, PathError

# (path, size, mtime) -> record count of a JSON file this process parsed (and so validated): a
# second open of the unchanged file (num_examples, then the iterator) need not parse it again.
_JSON_COUNTS: dict[tuple[str, int, float], int] = {}
_COUNTS_LOCK = threading.Lock()


def load_records(path: str) -> list:
    """Reads a LLaVA JSON list (``.json``) or one record per line (``.jsonl``), local or ``gs://``.

    Raises:
      DataFormatError: naming ``path`` and the line/column of a JSON syntax error, or when a
        ``.json`` file is not a list.
      PathError: ``path`` does not exist.
    """
    if not storage.exists(path):
        raise PathError(f"data file {path!r} does not exist")
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    if path.endswith(".jsonl"):
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}: line {lineno}, column {e.colno}: {e.msg}") from e
        return out
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} "
                              f"(char {e.pos}): {e.msg}") from e
    if not isinstance(out, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(out).__name__}")
    return out


def _signature(path: str) -> tuple[str, int, float]:
    return path, storage.size(path), storage.mtime(path)


class JsonSource:
    """Random access to the records of a LLaVA JSON/JSONL; element ``i`` is ``(i, record)``.

    Args:
      path: the file, local or ``gs://``.
      keep: keep the parsed records now (a process that reads them). False: only count them (the
        main process of a pipeline with worker processes); they are read on the first access.

    Pickles as its path and count; the receiving process parses the file on its first read.

    Raises:
      PathError, DataFormatError: as :func:`load_records`.
    """

    def __init__(self, path: str, *, keep: bool = True):
        self.path = path
        self._lock = threading.Lock()
        self._records: list | None = None
        sig = _signature(path) if storage.exists(path) else None
        with _COUNTS_LOCK:
            known = _JSON_COUNTS.get(sig) if sig is not None else None
        if keep or known is None:
            loaded = load_records(path)  # PathError / DataFormatError, at start rather than in a worker
            known = len(loaded)
            with _COUNTS_LOCK:
                _JSON_COUNTS[_signature(path)] = known
            self._records = loaded if keep else None
        self._len = known

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        records = self._records
        if records is None:
            with self._lock:  # Grain's reader threads: one parse per process, not one per thread
                if self._records is None:
                    loaded = load_records(self.path)
                    if len(loaded) != self._len:
                        raise RuntimeError(f"{self.path} changed while training ({len(loaded)} != {self._len} records)")
                    self._records = loaded
                records = self._records
        return int(index), records[index]

    def __getstate__(self):
        return {"path": self.path, "_len": self._len, "_records": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _array_record_files(path: str) -> tuple[list[str], list[int] | None, dict[str, Any] | None]:
    """(files in record order, their record counts or None, the info dict or None) of ``path``:
    a folder written by ``python -m sea_jax.records`` (its ``info.json`` lists the shards), another
    folder (its ``*.array_record*`` files, sorted), a glob pattern, or one file."""
    info_path = storage.join(path, records_lib.INFO_NAME)
    if storage.isfile(info_path):
        try:
            info = records_lib.check_info(json.loads(storage.read_text(info_path)), info_path)
        except (json.JSONDecodeError, records_lib.RecordFormatError) as e:
            raise DataFormatError(f"{info_path}: {e}") from e
        files = [storage.join(path, s["file"]) for s in info["shards"]]
        return files, [int(s["num_records"]) for s in info["shards"]], info
    if storage.isdir(path):
        files = storage.glob(storage.join(path, "*.array_record*"))
        if not files:
            raise PathError(f"ArrayRecord folder {path!r} has no {records_lib.INFO_NAME} and no *.array_record files")
        return files, None, None
    if any(c in path for c in "*?["):
        files = storage.glob(path)
        if not files:
            raise PathError(f"ArrayRecord pattern {path!r} matches no file")
        return files, None, None
    if not storage.isfile(path):
        raise PathError(f"ArrayRecord path {path!r} does not exist")
    return [path], None, None


class ArrayRecordSource:
    """Random access to ArrayRecord entries; element ``i`` is ``(i, entry bytes)``.

    ``path``: a folder written by ``python -m sea_jax.records`` (entries in
    :mod:`sea_jax.data.records` layout), a folder of ``*.array_record`` files, a glob or one file;
    local or ``gs://`` (copied to ``cache_dir`` once per host, see the module docstring).
    ``info`` is the folder's ``info.json`` (None for other layouts). Pickles as the local paths.
    """

    def __init__(self, path: str, cache_dir: str = ""):
        import grain

        files, counts, self.info = _array_record_files(path)
        self.path = path
        local = [storage.local_copy(f, cache_dir or None) for f in files]
        # "file[0:n]" read instructions: the counts are known, so no shard is opened here.
        paths = [f"{p}[0:{n}]" for p, n in zip(local, counts)] if counts is not None else local
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        return int(index), self._source[int(index)]


class TfdsSource:
    """Random access to a TFDS dataset through ``tfds.data_source`` (array_record, no tf.data).

    Element ``i`` is ``(i, example)`` (a dict of numpy values / bytes). ``data_dir`` may be
    ``gs://``: the dataset's folder is copied to ``cache_dir`` (see the module docstring).
    ``source``: an already-open random-access source (tests, custom data), used as is.
    """

    def __init__(self, name: str, split: str, data_dir: str = "", source=None, cache_dir: str = ""):
        self.name, self.split = name, split
        self.data_dir = self._local_data_dir(name, data_dir, cache_dir) if source is None else data_dir
        self._source = source if source is not None else self._open()
        self._len = len(self._source)
        self._picklable_source = source  # an explicit (test / custom) source travels as is

    @staticmethod
    def _local_data_dir(name: str, data_dir: str, cache_dir: str) -> str:
        if not data_dir or not storage.is_remote(data_dir):
            return data_dir
        # "name/config:1.0.0" lives in data_dir/name/config/1.0.0; copy the dataset's folder.
        folder = name.split(":")[0].split("/")[0]
        local = storage.local_copy(storage.join(data_dir, folder), cache_dir or None)
        return posixpath.dirname(local.rstrip("/"))

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


__all__ = ["load_records", "JsonSource", "ArrayRecordSource", "TfdsSource"]
