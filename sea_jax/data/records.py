"""The sea_jax ArrayRecord layout: a LLaVA JSON's records by index, optionally with image bytes.

``python -m sea_jax.records`` writes it once from a LLaVA JSON/JSONL; the pipeline's
``array_record`` sources read it (:class:`sea_jax.data.sources.ArrayRecordSource`). Entry ``i`` of
the shards, in order, is record ``i`` of the JSON, so a shuffle with the same seed deals the same
records and a converted dataset gives exactly the batches its JSON gives.

A folder::

    info.json                             # what is below: see :func:`read_info`
    records-00000-of-00007.array_record   # ArrayRecord files, group_size 1 (one record per chunk,
    ...                                   # so a random read decodes one record, not a group)

One entry (:func:`encode` / :func:`decode`)::

    b"SEAR"  version (1 byte, 1)  json_length (uint32 little endian)  json  image_bytes

``json`` is the record exactly as the JSON file held it (re-serialised with ``json.dumps``, ASCII
escapes, so any string survives), including records the pipeline will skip as bad: a bad record
stays a bad record. ``image_bytes`` is the file the record's ``image`` names, as read at
conversion (not decoded, not re-encoded: the pipeline decodes those bytes as it would decode the
file), or empty when images were not embedded, the record has none, the file was missing, or its
path leaves the image root (those paths are never opened).
"""
from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = b"SEAR"
VERSION = 1
INFO_NAME = "info.json"
FORMAT = "sea_jax.records"
# ArrayRecord writer options: one record per chunk group (Grain's advice for random access).
WRITER_OPTIONS = "group_size:1"
_HEADER = struct.Struct("<4sBI")


class RecordFormatError(ValueError):
    """An entry that is not in this layout (a truncated or foreign file)."""


def shard_name(index: int, count: int) -> str:
    """File name of shard ``index`` of ``count``."""
    return f"records-{index:05d}-of-{count:05d}.array_record"


def encode(record: Any, image: bytes | None = None) -> bytes:
    """One entry: the record (any JSON value) and the bytes of its image (or none)."""
    body = json.dumps(record).encode("ascii")
    return _HEADER.pack(MAGIC, VERSION, len(body)) + body + (image or b"")


def decode(entry: bytes) -> tuple[Any, bytes | None]:
    """``(record, image bytes or None)`` of an entry.

    Raises:
      RecordFormatError: the entry is not in this layout or its JSON does not parse.
    """
    entry = bytes(entry)
    if len(entry) < _HEADER.size:
        raise RecordFormatError(f"entry of {len(entry)} bytes is shorter than the header")
    magic, version, length = _HEADER.unpack_from(entry)
    if magic != MAGIC or version != VERSION:
        raise RecordFormatError(f"entry starts with {entry[:5]!r}, not {MAGIC!r} version {VERSION}")
    end = _HEADER.size + length
    if end > len(entry):
        raise RecordFormatError(f"entry is truncated: the JSON needs {length} bytes, {len(entry) - _HEADER.size} left")
    try:
        record = json.loads(entry[_HEADER.size:end].decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordFormatError(f"entry JSON does not parse: {e}") from e
    image = entry[end:]
    return record, (image if image else None)


def make_info(*, source: str, shards: list[dict[str, Any]], embedded: bool, image_root: str,
              images: dict[str, int], options: str) -> dict[str, Any]:
    """The ``info.json`` content (see :func:`read_info`)."""
    return {"format": FORMAT, "version": VERSION, "source": source,
            "num_records": sum(int(s["num_records"]) for s in shards), "shards": shards,
            "embedded_images": bool(embedded), "image_root": image_root, "images": dict(images),
            "writer_options": options}


def check_info(info: Any, where: str) -> dict[str, Any]:
    """Validates a parsed ``info.json``; returns it.

    Keys: ``format`` (``"sea_jax.records"``), ``version``, ``source`` (the JSON it came from),
    ``num_records``, ``shards`` (``[{"file", "num_records"}]`` in record order),
    ``embedded_images``, ``image_root`` (where embedded images were read), ``images`` (counts:
    ``embedded``, ``missing``, ``outside_root``, ``text_only``), ``writer_options``.

    Raises:
      RecordFormatError: naming ``where`` when a key is missing or the counts disagree.
    """
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise RecordFormatError(f"{where}: not a {FORMAT} info file")
    if info.get("version") != VERSION:
        raise RecordFormatError(f"{where}: version {info.get('version')!r}, this sea_jax reads {VERSION}")
    shards = info.get("shards")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_records"), int)
            for s in shards):
        raise RecordFormatError(f"{where}: 'shards' must be a non-empty list of {{file, num_records}}")
    if sum(s["num_records"] for s in shards) != info.get("num_records"):
        raise RecordFormatError(f"{where}: the shards hold {sum(s['num_records'] for s in shards)} records, "
                                f"num_records says {info.get('num_records')}")
    return info


__all__ = ["MAGIC", "VERSION", "INFO_NAME", "FORMAT", "WRITER_OPTIONS", "RecordFormatError", "shard_name", "encode",
           "decode", "make_info", "check_info"]
