"""One-time conversion of a LLaVA JSON/JSONL into a sea_jax ArrayRecord folder (records by index).

Why: every Grain worker process parses a JSON source whole (mix665k: ~1 GB of JSON, one parse and
one in-memory copy per worker per host). After :func:`convert`, a worker opens the folder's
``info.json`` and reads one record per sample; with ``embed_images`` a record also carries its
image's bytes, so training reads one file per sample instead of one per record and image (useful
for many small images in a bucket). ``benchmarks/data_startup.py`` measures startup time and
resident memory per worker both ways (``benchmarks/results/data_startup.md``).

The layout is :mod:`sea_jax.data.records`: entry ``i`` is record ``i`` of the JSON, so the
converted folder gives exactly the batches the JSON gives (same seed, same skips). Records are
copied as they are, bad ones included (they are skipped at training time, as from the JSON). An
image is embedded only when its path stays inside ``image_root`` (the path rule of
:func:`sea_jax.data.images.resolve_under_root`; a path that leaves it is counted, never opened)
and the file exists; it is stored as read, not decoded. Paths: JSON, image root and output may be
local or ``gs://``; a ``gs://`` output is written locally first and uploaded, shards first and
``info.json`` last, so a reader never sees a folder whose ``info.json`` names missing shards. A
local output appears whole (written beside it, then renamed).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

from sea_jax import storage
from sea_jax.data import images as image_lib
from sea_jax.data import records as records_lib
from sea_jax.data.sources import load_records
from sea_jax.errors import ConfigError, DataFormatError, PathError

log = logging.getLogger("sea_jax.records")

# Records whose images are fetched together (bounds the image bytes held at once).
_CHUNK = 256


def _image_of(record: Any, index: int, image_root: str) -> tuple[bytes | None, str]:
    """(image bytes or None, what happened: embedded | text_only | invalid | outside_root | missing)."""
    if not isinstance(record, dict) or record.get("image") is None:
        return None, "text_only" if isinstance(record, dict) else "invalid"
    rel = record["image"]
    if not isinstance(rel, str) or not rel:
        return None, "invalid"
    try:
        path = image_lib.resolve_under_root(image_root, rel)
    except image_lib.ImagePathError as e:
        log.warning("record %d: not embedding its image: %s", index, e)
        return None, "outside_root"
    try:
        return storage.read_bytes(path), "embedded"
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # Left out: training then looks the path up under the source's image root and counts it
        # as the JSON run would (missing_image / corrupt_image).
        log.warning("record %d: image %s not embedded (%s)", index, path, type(e).__name__)
        return None, "missing"


def convert(json_path: str, out: str, *, image_root: str = "", embed_images: bool = False,
            records_per_shard: int = 65536, num_threads: int = 16, options: str = records_lib.WRITER_OPTIONS,
            overwrite: bool = False) -> dict[str, Any]:
    """Writes ``out`` (a folder, local or ``gs://``) from the LLaVA JSON/JSONL ``json_path``.

    Args:
      json_path: the records.
      out: the folder to create (see the module docstring for the layout).
      image_root: where the records' image paths point (needed with ``embed_images``).
      embed_images: store each record's image bytes inside its entry.
      records_per_shard: entries per ArrayRecord file.
      num_threads: concurrent image reads (``storage.read_bytes``; a bucket wants many).
      options: ArrayRecord writer options; ``group_size:1`` is what random access needs.
      overwrite: replace an existing ``out``.

    Returns:
      the ``info.json`` written (:func:`sea_jax.data.records.check_info` lists its keys) plus
      ``seconds`` and ``bytes``.

    Raises:
      PathError: ``json_path`` is missing, or ``out`` exists without ``overwrite``.
      DataFormatError: the JSON does not parse or holds no record.
      ConfigError: ``embed_images`` without ``image_root``, or bad sizes / writer options.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    t0 = time.time()
    if embed_images and not image_root:
        raise ConfigError("--embed_images needs --image_root (where the records' image paths point)")
    if records_per_shard < 1 or num_threads < 1:
        raise ConfigError(f"records_per_shard={records_per_shard} and num_threads={num_threads} must be >= 1")
    if "group_size:1," not in f"{options},":
        raise ConfigError(f"writer options {options!r} lack group_size:1: random reads would decode whole groups")
    if storage.exists(out) and not overwrite:
        raise PathError(f"{out} exists; pass --overwrite to replace it")
    records = load_records(json_path)
    if not records:
        raise DataFormatError(f"{json_path}: holds no record")
    n = len(records)
    num_shards = math.ceil(n / records_per_shard)
    counts: Counter[str] = Counter()
    shards, total = [], 0
    remote = storage.is_remote(out)
    staging = tempfile.mkdtemp(prefix="sea_jax_records_") if remote else \
        f"{os.path.abspath(out).rstrip(os.sep)}.partial-{uuid.uuid4().hex}"
    try:
        os.makedirs(staging, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            for s in range(num_shards):
                lo, hi = s * records_per_shard, min((s + 1) * records_per_shard, n)
                name = records_lib.shard_name(s, num_shards)
                try:
                    writer = ArrayRecordWriter(os.path.join(staging, name), options)
                except ValueError as e:
                    raise ConfigError(f"ArrayRecord writer options {options!r}: {e}") from e
                try:
                    for start in range(lo, hi, _CHUNK):
                        idx = range(start, min(start + _CHUNK, hi))
                        if embed_images:
                            fetched = list(pool.map(lambda i: _image_of(records[i], i, image_root), idx))
                        else:
                            fetched = [(None, "not_embedded")] * len(idx)
                        for i, (image, what) in zip(idx, fetched):
                            counts[what] += 1
                            writer.write(records_lib.encode(records[i], image))
                finally:
                    writer.close()
                shards.append({"file": name, "num_records": hi - lo})
                total += os.path.getsize(os.path.join(staging, name))
                log.info("shard %d/%d written (%d records)", s + 1, num_shards, hi - lo)
        info = records_lib.make_info(source=json_path, shards=shards, embedded=embed_images,
                                     image_root=image_root if embed_images else "",
                                     images={k: counts.get(k, 0) for k in
                                             ("embedded", "missing", "outside_root", "text_only", "invalid")},
                                     options=options)
        text = json.dumps(info, indent=1)
        if remote:
            if storage.exists(out):
                storage.rmtree(out)
            for shard in shards:  # shards first, info.json last: a reader sees all or nothing
                storage.copy(os.path.join(staging, shard["file"]), storage.join(out, shard["file"]))
            storage.write_text(storage.join(out, records_lib.INFO_NAME), text)
        else:
            with open(os.path.join(staging, records_lib.INFO_NAME), "w", encoding="utf-8") as f:
                f.write(text)
            if os.path.exists(out):
                shutil.rmtree(out)
            os.replace(staging, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
    return dict(info, seconds=round(time.time() - t0, 3), bytes=total)


__all__ = ["convert"]
