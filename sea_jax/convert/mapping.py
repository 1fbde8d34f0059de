"""The one bidirectional converter between sea_jax parameter trees and named tensors.

A model family describes itself once, as a list of :class:`Param` entries: which leaf of the Flax
tree corresponds to which named tensor of the other format (Hugging Face, big_vision) and how the
array is laid out on each side (:class:`Transform`). The same list drives import (``load``) and
export (``export``), so the two directions cannot drift apart.

Import goes leaf by leaf: each leaf is assembled on the host from the tensors it needs (read lazily
from safetensors / npz), then placed directly with its target sharding, so a 7B model never has
two full host copies. Export likewise gathers and writes one leaf at a time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

Path = tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Layout transforms


class Transform(Protocol):
    """A bijection between the foreign layout of one tensor and the Flax layout of one leaf."""

    def to_flax(self, x: np.ndarray) -> np.ndarray: ...

    def to_foreign(self, x: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Identity:
    """Same layout on both sides (embeddings, norms, biases)."""

    def to_flax(self, x):
        return x

    def to_foreign(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class Reshape:
    """Same memory order, different shape (e.g. a bias [H*D] <-> [H, D])."""

    flax_shape: tuple[int, ...]
    foreign_shape: tuple[int, ...]

    def to_flax(self, x):
        return np.reshape(x, self.flax_shape)

    def to_foreign(self, x):
        return np.reshape(x, self.foreign_shape)


@dataclasses.dataclass(frozen=True)
class Linear:
    """A PyTorch ``nn.Linear`` weight [out, in] <-> a Flax kernel [*in_shape, *out_shape].

    ``in_shape`` / ``out_shape`` split the flat dims, e.g. q_proj: out_shape=(heads, head_dim);
    o_proj: in_shape=(heads, head_dim). Defaults keep them flat.
    """

    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None

    def to_flax(self, x):
        x = np.asarray(x).T
        in_shape = self.in_shape or (x.shape[0],)
        out_shape = self.out_shape or (x.shape[1],)
        return np.reshape(x, tuple(in_shape) + tuple(out_shape))

    def to_foreign(self, x):
        n_in = len(self.in_shape) if self.in_shape else 1
        flat = np.reshape(x, (math.prod(x.shape[:n_in]), math.prod(x.shape[n_in:])))
        return flat.T


@dataclasses.dataclass(frozen=True)
class Transpose:
    """Axis permutation: flax = foreign.transpose(perm) (e.g. conv kernels OIHW <-> HWIO)."""

    perm: tuple[int, ...]

    def to_flax(self, x):
        return np.transpose(x, self.perm)

    def to_foreign(self, x):
        return np.transpose(x, np.argsort(self.perm))


@dataclasses.dataclass(frozen=True)
class Chain:
    """Transforms applied in order foreign -> flax (and reversed for export)."""

    steps: tuple[Any, ...]

    def to_flax(self, x):
        for s in self.steps:
            x = s.to_flax(x)
        return x

    def to_foreign(self, x):
        for s in reversed(self.steps):
            x = s.to_foreign(x)
        return x


@dataclasses.dataclass(frozen=True)
class Param:
    """One Flax leaf <-> one foreign tensor (or a slice of one).

    Attributes:
      path: the leaf's path in the parameter tree, e.g. ("layers", "attn", "q", "kernel").
      name: the foreign tensor name. With ``stacked`` set it contains ``{i}``, the layer index.
      transform: layout bijection, applied per layer when stacked.
      stacked: number of layers stacked on a leading Flax axis (scanned layers), else None.
      part: (axis, start, stop) when the leaf is a slice of a fused foreign tensor (Phi-3's
        qkv_proj, gate_up_proj), the slice taken in the *foreign* layout before ``transform``.
    """

    path: Path
    name: str
    transform: Any = Identity()
    stacked: int | None = None
    part: tuple[int, int, int] | None = None

    def names(self) -> list[str]:
        if self.stacked is None:
            return [self.name]
        return [self.name.format(i=i) for i in range(self.stacked)]


# ----------------------------------------------------------------------------------------------
# Readers


class TensorReader(Protocol):
    def keys(self) -> Iterable[str]: ...

    def get(self, name: str) -> np.ndarray: ...


class MissingTensorError(KeyError):
    """A tensor the model needs is not in the checkpoint (the message names it and the source)."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class SafetensorsReader:
    """Lazy reader of a Hugging Face folder's safetensors (single file or sharded with index)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing from {folder}: {missing}")
            self._where = dict(weight_map)
        elif os.path.exists(single):
            files = ["model.safetensors"]
            self._where = None
        else:
            raise FileNotFoundError(
                f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors "
                "checkpoints are read; convert .bin files with transformers first)"
            )
        self._handles = {}
        for fname in files:
            path = os.path.join(folder, fname)
            try:
                self._handles[fname] = safe_open(path, framework="np")
            except Exception as e:  # safetensors raises its own SafetensorError on a bad header
                raise ValueError(f"{path}: unreadable safetensors file ({e})") from e
        if self._where is None:
            self._where = {k: files[0] for k in self._handles[files[0]].keys()}

    def keys(self):
        return self._where.keys()

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise MissingTensorError(f"tensor {name!r} not found in {self.folder}")
        fname = self._where[name]
        try:
            return self._handles[fname].get_tensor(name)
        except TypeError:
            # safetensors' numpy backend refuses dtypes numpy lacks (BF16: nearly every released
            # LLM checkpoint); read those bytes directly through ml_dtypes instead.
            return _read_raw_tensor(os.path.join(self.folder, fname), name)
        except Exception as e:  # a truncated shard fails here, name the file
            raise ValueError(f"{os.path.join(self.folder, fname)}: cannot read tensor {name!r} ({e})") from e


_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file whose dtype numpy lacks, memory-mapped (read lazily)."""
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    entry = header[name]
    if entry["dtype"] not in _RAW_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[entry["dtype"]]))
    start, stop = entry["data_offsets"]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(stop - start,))
    return raw.view(dtype).reshape(entry["shape"])


class DictReader:
    """Reader over an in-memory mapping (tests, npz files already opened)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "<dict>"):
        self._t = tensors
        self.source = source

    def keys(self):
        return self._t.keys()

    def get(self, name):
        if name not in self._t:
            raise MissingTensorError(f"tensor {name!r} not found in {self.source}")
        return np.asarray(self._t[name])


# ----------------------------------------------------------------------------------------------
# Import / export


def _set(tree: dict, path: Path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def _read(p: Param, reader: TensorReader, name: str) -> np.ndarray:
    x = reader.get(name)
    if p.part is not None:
        axis, start, stop = p.part
        x = np.take(x, np.arange(start, stop), axis=axis)
    return p.transform.to_flax(x)


def load(
    params: Sequence[Param],
    reader: TensorReader,
    shardings: Any | None = None,
    dtype: Any = np.float32,
    expected: Any | None = None,
) -> dict:
    """Builds the parameter tree from ``reader`` leaf by leaf.

    Args:
      params: the family's mapping.
      reader: where the tensors come from.
      shardings: optional tree (same structure as the result) of ``jax.sharding.Sharding``; each
        leaf is placed directly with its sharding (also across hosts). Without it leaves are numpy.
      dtype: dtype of every leaf (master weights are float32).
      expected: optional tree of abstract leaves (``jax.eval_shape`` of init); shapes are checked
        against it so a config/checkpoint mismatch is named, not broadcast.
    Returns:
      nested dict of arrays.
    """
    out: dict = {}
    for p in params:
        if p.stacked is None:
            host = _read(p, reader, p.name)
        else:
            host = np.stack([_read(p, reader, n) for n in p.names()])
        host = np.asarray(host, dtype=dtype)
        if expected is not None:
            want = tuple(_get(expected, p.path).shape)
            if tuple(host.shape) != want:
                raise ValueError(
                    f"{p.name}: shape {host.shape} after conversion does not match the model's "
                    f"{'/'.join(p.path)} {want}; is the config the checkpoint's?"
                )
        if shardings is not None:
            sh = _get(shardings, p.path)
            value = jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx])
        else:
            value = host
        _set(out, p.path, value)
    return out


def to_host(x) -> np.ndarray:
    """One leaf as a full host array, gathering across processes when it is not addressable here."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def export(params: Sequence[Param], tree: Mapping, dtype: Any | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (foreign name, array) one tensor at a time; fused tensors once all parts are seen."""
    pending: dict[str, list[tuple[tuple[int, int, int], np.ndarray]]] = {}
    n_parts: dict[str, int] = {}
    for p in params:
        if p.part is not None:
            for n in p.names():
                n_parts[n] = n_parts.get(n, 0) + 1
    for p in params:
        leaf = to_host(_get(tree, p.path))
        per_layer = [leaf] if p.stacked is None else [leaf[i] for i in range(p.stacked)]
        for name, x in zip(p.names(), per_layer):
            y = p.transform.to_foreign(np.asarray(x))
            if dtype is not None:
                y = y.astype(dtype)
            if p.part is None:
                yield name, np.ascontiguousarray(y)
                continue
            pending.setdefault(name, []).append((p.part, y))
            if len(pending[name]) == n_parts[name]:
                parts = sorted(pending.pop(name), key=lambda t: t[0][1])
                axis = parts[0][0][0]
                yield name, np.ascontiguousarray(np.concatenate([y for _, y in parts], axis=axis))
    if pending:
        raise ValueError(f"fused tensors with missing parts: {sorted(pending)}")


def save_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]],
    folder: str,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes tensors as HF-style (sharded) safetensors with an index; returns the file names.

    Holds at most one shard in memory. A single shard is written as ``model.safetensors``.
    """
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    files: list[str] = []
    weight_map: dict[str, str] = {}
    cur: dict[str, np.ndarray] = {}
    cur_bytes = 0
    total = 0

    def flush():
        nonlocal cur, cur_bytes
        if not cur:
            return
        fname = f"model-{len(files) + 1:05d}.safetensors.tmp"
        save_file(cur, os.path.join(folder, fname), metadata=meta)
        files.append(fname)
        for k in cur:
            weight_map[k] = fname
        cur, cur_bytes = {}, 0

    for name, x in tensors:
        if name in weight_map or name in cur:
            raise ValueError(f"tensor {name!r} written twice")
        if cur and cur_bytes + x.nbytes > max_shard_bytes:
            flush()
        cur[name] = x
        cur_bytes += x.nbytes
        total += x.nbytes
    flush()
    # Final names are only known once the shard count is; temporary names keep a failed export from
    # ever looking complete.
    if len(files) == 1:
        final = {files[0]: "model.safetensors"}
    else:
        final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for tmp, name in final.items():
        os.replace(os.path.join(folder, tmp), os.path.join(folder, name))
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return list(final.values())


def unused(params: Sequence[Param], reader: TensorReader, ignore: Callable[[str], bool] = lambda n: False) -> list[str]:
    """Tensor names in the checkpoint that no Param reads (to warn about silently dropped weights)."""
    used = {n for p in params for n in p.names()}
    return sorted(k for k in reader.keys() if k not in used and not ignore(k))


def warn_unused(
    params: Sequence[Param], reader: TensorReader, source: str, ignore: Callable[[str], bool] = lambda n: False,
    stacklevel: int = 3,
) -> None:
    """Warns (naming ``source`` and the first ten) about checkpoint tensors no Param reads, so a
    mapping that silently drops weights is seen, while buffers like ``rotary_emb.inv_freq`` are not."""
    import warnings

    extra = unused(params, reader, ignore)
    if extra:
        warnings.warn(f"{source}: {len(extra)} tensors not used by the model: {extra[:10]}", stacklevel=stacklevel)
