"""What a run reads: its sources, read from the config, checked, each with its selection and weight.

Three ways to say it, one result (:class:`Mixture`, a tuple of :class:`SourceSpec`):

1. The single-source fields, as before: ``data.kind`` with ``data.json`` (LLaVA JSON/JSONL),
   ``data.records`` (an ArrayRecord folder from ``python -m sea_jax.records``) or ``data.tfds_*``,
   plus ``data.image_root``, ``data.template``, ``data.pad_to_square``. A run with only these
   fields reads exactly what it read before mixtures existed.
2. ``data.mixture``: a YAML or JSON file (local or ``gs://``), LLaVA-NeXT's data YAML plus our
   fields::

       on_exhausted: restart          # optional defaults for every entry: on_exhausted,
       image_root: /data/images       # image_root, template, pad_to_square
       datasets:
         - json_path: llava_v1_5_mix665k.json       # relative to the mixture file's folder
           sampling_strategy: "random:50%"          # all | first:N | end:N | random:N, N or P%
           weight: 3
         - kind: array_record
           path: gs://bucket/sharegpt4v_records     # a `python -m sea_jax.records` folder
           image_root: gs://bucket/sharegpt4v       # for records whose image is not embedded
           weight: 1
           on_exhausted: stop
         - kind: tfds
           tfds_name: my_captions
           tfds_data_dir: /data/tfds
           template: plain
           weight: 0.5

3. ``data.sources``: the same entries as a tuple of dicts in a Python config file (the file is
   the command-line-friendly form: ``--config.data.mixture=mix.yaml``).

Entry fields (anything else is an error naming the entry): ``name`` (metrics and logs; default
the file's or dataset's name, made unique), ``kind`` (``llava_json``, the default, ``array_record``
or ``tfds``), ``path`` or ``json_path``, ``image_root``, ``template``, ``pad_to_square`` (default
the ``data.*`` fields of the same name), ``sampling_strategy`` (default ``all``), ``weight``,
``on_exhausted`` (default ``data.on_exhausted``), ``tfds_name``, ``tfds_split``,
``tfds_data_dir``, ``tfds_image_key``, ``tfds_caption_key``, ``tfds_conversations_key`` (default
the ``data.tfds_*`` fields). Relative paths in a mixture file are relative to its folder.

What the fields mean (the mixing itself is :mod:`sea_jax.data.mixing`):

* ``sampling_strategy`` picks which records of the source take part (LLaVA-NeXT's): ``all``,
  ``first:N``, ``end:N`` (the last N), ``random:N`` (a fixed subset drawn with ``config.seed``);
  N is a count or a percentage ``P%`` of the source (rounded up, as LLaVA-NeXT). Its size is the
  source's *sample count*.
* No entry has a ``weight``: the selections are concatenated and shuffled together, every
  selected record once per epoch (LLaVA-NeXT). One entry has a weight: every entry must, and each
  draw of the stream comes from source k with probability ``weight_k / sum(weights)``.
* ``on_exhausted`` (weighted mixtures): when a source has given all its selected records,
  ``restart`` starts it again in a fresh order; ``stop`` ends the mixture's epoch there (every
  ``stop`` source then starts a fresh pass, and an iterator with ``num_epochs`` ends).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from sea_jax import storage
from sea_jax.config import PLACEHOLDER, is_set
from sea_jax.errors import ConfigError, DataFormatError, PathError

KINDS = ("llava_json", "array_record", "tfds")
EXHAUSTION = ("restart", "stop")
TEMPLATES = ("plain", "chat")
ENTRY_KEYS = frozenset({
    "name", "kind", "path", "json_path", "image_root", "template", "pad_to_square", "sampling_strategy", "weight",
    "on_exhausted", "tfds_name", "tfds_split", "tfds_data_dir", "tfds_image_key", "tfds_caption_key",
    "tfds_conversations_key"})
FILE_KEYS = frozenset({"datasets", "on_exhausted", "image_root", "template", "pad_to_square"})
_PATH_KEYS = ("path", "json_path", "image_root", "tfds_data_dir")
_SAMPLING = re.compile(r"^(first|end|random):(\d+(?:\.\d+)?)(%?)$")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A parsed ``sampling_strategy``: ``how`` in all/first/end/random, ``amount`` a count or a
    percentage (``percent``)."""

    how: str
    amount: float = 0.0
    percent: bool = False

    def count(self, n: int, where: str) -> int:
        """Records selected out of ``n``. Raises ConfigError naming ``where`` when N is 0 or above n."""
        if self.how == "all":
            return n
        if self.percent:
            if not 0 < self.amount <= 100:
                raise ConfigError(f"{where}: sampling_strategy percentage {self.amount}% is not in (0, 100]")
            return max(1, math.ceil(self.amount * n / 100))
        k = int(self.amount)
        if k != self.amount or not 0 < k <= n:
            raise ConfigError(f"{where}: sampling_strategy asks for {self.amount:g} records of a source of {n}")
        return k

    def __str__(self) -> str:
        if self.how == "all":
            return "all"
        return f"{self.how}:{self.amount:g}{'%' if self.percent else ''}"


def parse_sampling(text: Any, where: str) -> Sampling:
    """``"all"``, ``"first:N"``, ``"end:N"``, ``"random:N"`` (N a count, or ``P%``) -> :class:`Sampling`.

    Raises:
      ConfigError: naming ``where`` for anything else.
    """
    s = str(text).strip().replace(" ", "")
    if s == "all":
        return Sampling("all")
    m = _SAMPLING.match(s)
    if not m:
        raise ConfigError(f"{where}: sampling_strategy {text!r} is not all | first:N | end:N | random:N "
                          "(N a count or a percentage such as 10%)")
    return Sampling(m.group(1), float(m.group(2)), bool(m.group(3)))


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source of a run.

    Attributes:
      name: unique within the mixture (metrics ``source/<name>/...``, logs).
      kind: ``llava_json`` | ``array_record`` | ``tfds``.
      path: the JSON/JSONL file or the ArrayRecord folder/file/glob ("" for tfds).
      image_root: folder (or ``gs://`` prefix) the records' image paths are relative to.
      template: ``plain`` | ``chat``; pad_to_square: LLaVA-1.5's expand-to-square before resizing.
      sampling: which records take part.
      weight: draw probability weight, or None (concatenated mixture).
      on_exhausted: ``restart`` | ``stop`` (weighted mixtures).
      tfds_*: the dataset and its feature names (kind ``tfds``).
      where: how messages name this entry (``config.data``, ``mix.yaml: datasets[2]``).
    """

    name: str
    kind: str
    path: str
    image_root: str
    template: str
    pad_to_square: bool
    sampling: Sampling
    weight: float | None
    on_exhausted: str
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    tfds_image_key: str = "image"
    tfds_caption_key: str = "caption"
    tfds_conversations_key: str = "conversations"
    where: str = "config.data"


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The sources of a run; ``weighted`` when they carry weights (else concatenated)."""

    sources: tuple[SourceSpec, ...]
    weighted: bool
    origin: str

    @property
    def single(self) -> bool:
        """Read from the single-source ``data.*`` fields (the run reads what it read before mixtures)."""
        return self.origin == "config.data"


# ----------------------------------------------------------------------------------------------
# Reading


def read_file(path: str) -> tuple[list[Any], dict[str, Any]]:
    """The ``datasets`` list and the file-level defaults of a mixture file (``.yaml``/``.yml``/``.json``).

    Raises:
      PathError: the file does not exist.
      DataFormatError: it does not parse (naming line and column).
      ConfigError: it is not ``{datasets: [...], ...}`` or has unknown top-level keys.
    """
    if not storage.exists(path):
        raise PathError(f"config.data.mixture={path!r} does not exist")
    text = storage.read_text(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise DataFormatError(f"{path}: {at}{getattr(e, 'problem', None) or e}") from e
    elif ext == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: line {e.lineno}, column {e.colno}: {e.msg}") from e
    else:
        raise ConfigError(f"config.data.mixture={path!r}: expected a .yaml, .yml or .json file")
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list) or not doc["datasets"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'datasets' list")
    unknown = sorted(set(doc) - FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {unknown}; allowed: {sorted(FILE_KEYS)}")
    return doc["datasets"], {k: v for k, v in doc.items() if k != "datasets"}


def _rebase(value: str, base: str) -> str:
    """A path written in the mixture file at folder ``base``: relative -> under ``base``."""
    if not value or "://" in value or os.path.isabs(value) or value.startswith(PLACEHOLDER):
        return value
    return posixpath.join(base, value) if storage.is_remote(base) else os.path.join(base, value)


def _default_name(kind: str, path: str, tfds_name: str, tfds_split: str) -> str:
    if kind == "tfds":
        return f"{tfds_name}/{tfds_split}" if tfds_name else "tfds"
    base = posixpath.basename(path.rstrip("/").replace(os.sep, "/")) or "data"
    for ext in (".jsonl", ".json", ".array_record"):
        base = base.removesuffix(ext)
    return base or "data"


def _entry(raw: Any, where: str, dc, defaults: Mapping[str, Any], base: str | None) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of source fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; allowed: {sorted(ENTRY_KEYS)}")
    if "path" in raw and "json_path" in raw:
        raise ConfigError(f"{where}: give 'path' or 'json_path', not both")
    e = dict(raw)
    if "json_path" in e:
        e["path"] = e.pop("json_path")
    for key in _PATH_KEYS:
        if key in e:
            if not isinstance(e[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {e[key]!r}")
            if base is not None:
                e[key] = _rebase(e[key], base)
    if base is not None and isinstance(defaults.get("image_root"), str):
        defaults = dict(defaults, image_root=_rebase(defaults["image_root"], base))
    pick = lambda key, fallback: e.get(key, defaults.get(key, fallback))  # noqa: E731
    return {
        "name": e.get("name"),
        "kind": e.get("kind", "llava_json"),
        "path": e.get("path", ""),
        "image_root": pick("image_root", dc.image_root),
        "template": pick("template", dc.template),
        "pad_to_square": pick("pad_to_square", dc.pad_to_square),
        "sampling_strategy": e.get("sampling_strategy", "all"),
        "weight": e.get("weight"),
        "on_exhausted": pick("on_exhausted", None),
        "tfds_name": e.get("tfds_name", dc.tfds_name),
        "tfds_split": e.get("tfds_split", dc.tfds_split),
        "tfds_data_dir": e.get("tfds_data_dir", dc.tfds_data_dir),
        "tfds_image_key": e.get("tfds_image_key", dc.tfds_image_key),
        "tfds_caption_key": e.get("tfds_caption_key", dc.tfds_caption_key),
        "tfds_conversations_key": e.get("tfds_conversations_key", dc.get("tfds_conversations_key", "conversations")),
    }


def _spec(e: dict[str, Any], where: str, default_exhaustion: str, need_tfds_name: bool = True) -> SourceSpec:
    if e["kind"] not in KINDS:
        raise ConfigError(f"{where}: kind {e['kind']!r}; expected one of {list(KINDS)}")
    if e["template"] not in TEMPLATES:
        raise ConfigError(f"{where}: template {e['template']!r}; expected one of {list(TEMPLATES)}")
    if not isinstance(e["pad_to_square"], bool):
        raise ConfigError(f"{where}: pad_to_square must be true or false, got {e['pad_to_square']!r}")
    for key in ("tfds_name", "tfds_split", "tfds_image_key", "tfds_caption_key", "tfds_conversations_key",
                "image_root"):
        if not isinstance(e[key], str):
            raise ConfigError(f"{where}: {key} must be a string, got {e[key]!r}")
    if e["kind"] == "tfds" and not e["tfds_name"] and need_tfds_name:
        raise ConfigError(f"{where}: a tfds source needs tfds_name")
    if e["kind"] != "tfds" and not e["path"]:
        raise ConfigError(f"{where}: a {e['kind']} source needs path (or json_path)")
    weight = e["weight"]
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}: weight must be a number > 0, got {weight!r}")
        weight = float(weight)
    exhausted = e["on_exhausted"] if e["on_exhausted"] is not None else default_exhaustion
    if exhausted not in EXHAUSTION:
        raise ConfigError(f"{where}: on_exhausted {exhausted!r}; expected one of {list(EXHAUSTION)}")
    name = e["name"]
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"{where}: name must be a non-empty string, got {name!r}")
    return SourceSpec(
        name=name or _default_name(e["kind"], e["path"], e["tfds_name"], e["tfds_split"]),
        kind=e["kind"], path=e["path"], image_root=e["image_root"], template=e["template"],
        pad_to_square=e["pad_to_square"], sampling=parse_sampling(e["sampling_strategy"], where), weight=weight,
        on_exhausted=exhausted, tfds_name=e["tfds_name"], tfds_split=e["tfds_split"],
        tfds_data_dir=e["tfds_data_dir"], tfds_image_key=e["tfds_image_key"], tfds_caption_key=e["tfds_caption_key"],
        tfds_conversations_key=e["tfds_conversations_key"], where=where)


def _unique_names(specs: list[SourceSpec]) -> list[SourceSpec]:
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        out.append(s if n == 0 else dataclasses.replace(s, name=f"{s.name}_{n + 1}"))
    if len({s.name for s in out}) != len(out):
        raise ConfigError("source names collide after numbering duplicates; give each source a 'name'")
    return out


def single_source(config) -> SourceSpec:
    """The source described by the single-source ``data.*`` fields."""
    dc = config.data
    path = {"llava_json": dc.json, "array_record": dc.get("records", "")}.get(dc.kind, "")
    e = {"name": None, "kind": dc.kind, "path": path, "image_root": dc.image_root, "template": dc.template,
         "pad_to_square": dc.pad_to_square, "sampling_strategy": "all", "weight": None, "on_exhausted": None,
         "tfds_name": dc.tfds_name, "tfds_split": dc.tfds_split, "tfds_data_dir": dc.tfds_data_dir,
         "tfds_image_key": dc.tfds_image_key, "tfds_caption_key": dc.tfds_caption_key,
         "tfds_conversations_key": dc.get("tfds_conversations_key", "conversations")}
    if dc.kind == "llava_json" and not dc.json:
        raise ConfigError("config.data.json is empty (or set config.data.mixture / config.data.sources)")
    if dc.kind == "array_record" and not path:
        raise ConfigError("config.data.records is empty: data.kind='array_record' reads a `python -m sea_jax.records` "
                          "folder")
    # kind="tfds" without tfds_name: an open source given to the pipeline (tests) stands in; the
    # pipeline refuses it otherwise.
    return _spec(e, "config.data", "restart", need_tfds_name=False)


def from_config(config) -> Mixture:
    """The run's :class:`Mixture`: ``data.mixture`` (a file), else ``data.sources`` (a tuple of
    dicts), else the single-source fields.

    Raises:
      ConfigError: both ``data.mixture`` and ``data.sources`` are set, an entry is wrong (named),
        weights are given for some sources only, or ``on_exhausted`` is set without weights.
      PathError / DataFormatError: the mixture file is missing / does not parse.
    """
    dc = config.data
    mixture_path = dc.get("mixture", "")
    in_config = tuple(dc.get("sources", ()) or ())
    if mixture_path and in_config:
        raise ConfigError("set config.data.mixture (a file) or config.data.sources (in the config), not both")
    if not mixture_path and not in_config:
        return Mixture((single_source(config),), weighted=False, origin="config.data")
    default_exhaustion = dc.get("on_exhausted", "restart")
    if mixture_path:
        if not is_set(mixture_path):
            raise PathError(f"config.data.mixture={mixture_path!r} is a placeholder; set --config.data.mixture=...")
        raw, defaults = read_file(mixture_path)
        base = posixpath.dirname(mixture_path) if storage.is_remote(mixture_path) else \
            os.path.dirname(os.path.abspath(mixture_path))
        origin = mixture_path
        where = [f"{mixture_path}: datasets[{i}]" for i in range(len(raw))]
        default_exhaustion = defaults.get("on_exhausted", default_exhaustion)
    else:
        raw, defaults, base, origin = list(in_config), {}, None, "config.data.sources"
        where = [f"config.data.sources[{i}]" for i in range(len(raw))]
    entries = [_entry(r, w, dc, defaults, base) for r, w in zip(raw, where)]
    specs = [_spec(e, w, default_exhaustion) for e, w in zip(entries, where)]
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        missing = [s.where for s, w in zip(specs, weighted) if not w]
        raise ConfigError(f"{origin}: some sources have a weight and {missing} do not; give every source a weight, "
                          "or none (then every selected record is read once per epoch)")
    if not any(weighted) and any(e["on_exhausted"] is not None for e in entries):
        raise ConfigError(f"{origin}: on_exhausted applies to weighted mixtures only (no source has a weight)")
    return Mixture(tuple(_unique_names(specs)), weighted=all(weighted), origin=origin)


# ----------------------------------------------------------------------------------------------
# Paths, checked before a run starts


def path_problems(config) -> list[str]:
    """Every data path of the run that is unset, a placeholder or missing (local or ``gs://``),
    one message each, naming the config field or mixture entry. An empty list = all there.

    For the single-source fields the messages are the trainer's own (``config.data.json='x'
    does not exist``; ``...; set --config.data.json=...``). A mixture that does not even parse
    gives its one error message."""
    dc = config.data
    problems: list[str] = []

    def need(field: str, path: str, kind: str = "path") -> None:
        if not is_set(path):
            shown = f"={path!r}" if path else " is empty"
            problems.append(f"config.{field}{shown}; set --config.{field}=...")
            return
        try:
            ok = storage.isdir(path) if kind == "dir" else storage.exists(path)
        except ValueError as e:  # another scheme:// than gs://
            problems.append(f"config.{field}={path!r}: {e}")
            return
        if not ok:
            problems.append(f"config.{field}={path!r} " + ("is not a folder" if kind == "dir" and storage.exists(path)
                                                             else "does not exist"))

    if not dc.get("mixture", "") and not tuple(dc.get("sources", ()) or ()):
        if dc.kind == "llava_json":
            need("data.json", dc.json)
            need("data.image_root", dc.image_root, "dir")
        elif dc.kind == "array_record":
            need("data.records", dc.get("records", ""))
            if dc.image_root:
                need("data.image_root", dc.image_root, "dir")
        elif dc.kind == "tfds":
            if not dc.tfds_name:
                problems.append("config.data.tfds_name is empty; set --config.data.tfds_name=...")
            if dc.tfds_data_dir:
                need("data.tfds_data_dir", dc.tfds_data_dir, "dir")
        return problems
    try:
        mix = from_config(config)
    except (ConfigError, PathError, DataFormatError) as e:
        return [str(e)]
    for s in mix.sources:
        checks = []
        if s.kind != "tfds":
            checks.append(("path", s.path, "path"))
        elif s.tfds_data_dir:
            checks.append(("tfds_data_dir", s.tfds_data_dir, "dir"))
        if s.image_root and s.kind != "tfds":
            checks.append(("image_root", s.image_root, "dir"))
        for key, path, kind in checks:
            if not is_set(path):
                problems.append(f"{s.where}: {key} {path!r} is a placeholder; set it")
                continue
            try:
                ok = storage.isdir(path) if kind == "dir" else (storage.exists(path) or any(c in path for c in "*?["))
            except ValueError as e:
                problems.append(f"{s.where}: {key} {path!r}: {e}")
                continue
            if not ok:
                problems.append(f"{s.where}: {key} {path!r} " + ("is not a folder" if kind == "dir" else "does not exist"))
    return problems


__all__ = ["KINDS", "EXHAUSTION", "Sampling", "SourceSpec", "Mixture", "parse_sampling", "read_file",
           "single_source", "from_config", "path_problems"]
