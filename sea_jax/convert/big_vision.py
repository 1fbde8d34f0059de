"""big_vision ``.npz`` checkpoints <-> the SigLIP parameter tree, through the one converter engine.

A big_vision checkpoint is an ``.npz`` whose keys are the '/'-joined parameter paths, usually
prefixed ``params/`` (``params/img/Transformer/encoderblock_0/LayerNorm_0/scale``). Our tree uses
the same paths, so the mapping is the identity except where layouts differ:

* plain (``encoderblock_{i}``) vs scanned (``encoderblock`` with a leading [depth] axis): each tower
  of the checkpoint is detected separately and converted to the config's layout (a stacked leaf
  reads ``encoderblock_{i}`` for every i; a per-layer leaf reads slice i of ``encoderblock``);
* the image position embedding is resampled when the checkpoint's patch grid differs from the
  config's (big_vision's high-res finetuning, :func:`sea_jax.models.siglip.resample_posemb`).

Loading never unpickles (``allow_pickle=False``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import numpy as np

from sea_jax import sharding
from sea_jax.convert import mapping
from sea_jax.convert.mapping import DictReader, Param
from sea_jax.models import siglip

log = logging.getLogger(__name__)

# Where each tower keeps its blocks (big_vision names the text encoder implicitly: Encoder_0).
ENCODERS = {"img": ("img", "Transformer"), "txt": ("txt", "Encoder_0")}
PREFIX = "params/"


class NpzReader:
    """Lazy reader of an ``.npz`` (no pickle). Remembers the last tensor read, because converting
    a scanned checkpoint to the plain layout reads the same stacked tensor once per layer."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
        if not hasattr(self._z, "files"):
            raise ValueError(f"{path}: a single .npy array, not an .npz checkpoint")
        self._keys = list(self._z.files)
        self._last: tuple[str | None, np.ndarray | None] = (None, None)

    def keys(self):
        return self._keys

    def get(self, name: str) -> np.ndarray:
        if self._last[0] == name:
            return self._last[1]
        if name not in self._z.files:
            raise mapping.MissingTensorError(f"tensor {name!r} not found in {self.path}")
        try:
            x = self._z[name]
        except ValueError as e:  # object arrays need pickle: refuse them, name the key
            raise ValueError(f"{self.path}: cannot read {name!r} without pickle ({e})") from e
        self._last = (name, x)
        return x

    def close(self):
        self._z.close()


class MappedReader:
    """Applies ``fns[name]`` to a tensor as it is read (position-embedding resampling)."""

    def __init__(self, reader, fns: Mapping[str, Callable[[np.ndarray], np.ndarray]]):
        self.reader, self.fns = reader, dict(fns)

    def keys(self):
        return self.reader.keys()

    def get(self, name: str) -> np.ndarray:
        x = self.reader.get(name)
        return self.fns[name](x) if name in self.fns else x


@dataclasses.dataclass(frozen=True)
class _LayerSlice:
    """Slice i of a stacked tensor, [1, *shape] <-> one layer's leaf [*shape]. Checks the shape so a
    config/checkpoint mismatch names the tensor instead of failing inside a reshape."""

    shape: tuple[int, ...]
    name: str

    def to_flax(self, x):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"{self.name}: per-layer shape {tuple(x.shape[1:])} does not match the model's "
                f"{self.shape}; is the config the checkpoint's?"
            )
        return x[0]

    def to_foreign(self, x):
        return np.asarray(x)[None]


def _block_index(part: str) -> int | None:
    if part.startswith("encoderblock_") and part[len("encoderblock_") :].isdigit():
        return int(part[len("encoderblock_") :])
    return None


def big_vision_params(
    cfg: siglip.SigLIPConfig, checkpoint_scan: bool | Mapping[str, bool] | None = None, prefix: str = PREFIX
) -> list[Param]:
    """The mapping between our tree (layout ``cfg.scan``) and a big_vision checkpoint's names.

    Args:
      cfg: the model config (its ``scan`` is our tree's layout).
      checkpoint_scan: the checkpoint's layout, one bool or per tower {"img": .., "txt": ..};
        None = same as ``cfg.scan``.
      prefix: prepended to every checkpoint name ("params/" in big_vision's files, or "").
    """
    if checkpoint_scan is None or isinstance(checkpoint_scan, bool):
        s = cfg.scan if checkpoint_scan is None else checkpoint_scan
        checkpoint_scan = {"img": s, "txt": s}
    depth = {"img": cfg.depth, "txt": cfg.text_depth}
    leaves = flax.traverse_util.flatten_dict(nn.unbox(siglip.abstract_params(cfg)))
    out: list[Param] = []
    for path, leaf in leaves.items():
        tower = path[0]
        in_block = (
            tower in ENCODERS
            and path[:2] == ENCODERS[tower]
            and len(path) > 3
            and (path[2] == "encoderblock" or _block_index(path[2]) is not None)
        )
        ours_scanned = in_block and path[2] == "encoderblock"
        if not in_block or ours_scanned == checkpoint_scan[tower]:  # same name on both sides
            out.append(Param(path, prefix + "/".join(path)))
        elif ours_scanned:  # checkpoint plain: stack encoderblock_{i} for every i
            name = prefix + "/".join(path[:2] + ("encoderblock_{i}",) + path[3:])
            out.append(Param(path, name, stacked=depth[tower]))
        else:  # ours plain, checkpoint scanned: slice i of the stacked tensor
            i = _block_index(path[2])
            name = prefix + "/".join(path[:2] + ("encoderblock",) + path[3:])
            out.append(Param(path, name, _LayerSlice(tuple(leaf.shape), name), part=(0, i, i + 1)))
    # Consecutive reads of the same stacked tensor hit NpzReader's cache; export also keeps at most
    # one tensor's parts pending.
    out.sort(key=lambda p: (p.name, p.part[1] if p.part else 0))
    return out


def _detect_prefix(keys) -> str:
    return PREFIX if any(k.startswith(PREFIX) for k in keys) else ""


def _detect_scan(keys, prefix: str, cfg: siglip.SigLIPConfig) -> dict[str, bool]:
    out = {}
    for tower, enc in ENCODERS.items():
        base = prefix + "/".join(enc) + "/"
        if any(k.startswith(base + "encoderblock/") for k in keys):
            out[tower] = True
        elif any(k.startswith(base + "encoderblock_") for k in keys):
            out[tower] = False
        else:  # tower absent: the missing-key check below names what is needed
            out[tower] = cfg.scan
    return out


def _check_names(params: list[Param], keys, prefix: str, source: str, strict: bool) -> None:
    needed = {n for p in params for n in p.names()}
    have = {k for k in keys if k.startswith(prefix)}
    missing = sorted(needed - have)
    unexpected = sorted(have - needed)
    ignored = sorted(k for k in keys if not k.startswith(prefix))
    if ignored:
        log.info("%s: ignoring %d entries outside %r (e.g. %s)", source, len(ignored), prefix, ignored[:3])

    def show(names):
        return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")

    if missing or (unexpected and strict):
        msg = [f"{source}: checkpoint does not match the SigLIP config"]
        if missing:
            msg.append(f"missing keys: {show(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {show(unexpected)}")
        raise ValueError("; ".join(msg))
    if unexpected:
        log.warning("%s: %d checkpoint entries not used: %s", source, len(unexpected), show(unexpected))


def load_big_vision(
    source: str | Mapping[str, np.ndarray],
    cfg: siglip.SigLIPConfig,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    dtype: Any = np.float32,
    strict: bool = True,
) -> dict:
    """Loads a big_vision SigLIP checkpoint into our tree (layout ``cfg.scan``).

    Args:
      source: path of an ``.npz`` (keys '/'-joined paths, with or without the ``params/`` prefix),
        or an already-flattened mapping of the same form.
      cfg: the model config. Plain/scanned layout of the checkpoint is detected per tower and
        converted; a different image patch grid resamples the position embedding.
      mesh: if given, every leaf is placed directly with its sharding on this mesh.
      dtype: dtype of the returned leaves.
      strict: raise on checkpoint entries the model does not use (else log a warning). Missing
        entries and shape mismatches always raise, naming the key.
    Returns:
      the parameter tree {"img", "txt", "t", "b"} (unboxed: numpy, or jax arrays with ``mesh``).
    """
    if isinstance(source, Mapping):
        reader, name = DictReader(source, "<dict>"), "<dict>"
    else:
        reader, name = NpzReader(os.fspath(source)), os.fspath(source)
    try:
        keys = list(reader.keys())
        prefix = _detect_prefix(keys)
        params = big_vision_params(cfg, _detect_scan(keys, prefix, cfg), prefix)
        _check_names(params, keys, prefix, name, strict)
        pos_name = prefix + "img/pos_embedding"
        pos = np.asarray(reader.get(pos_name))
        if pos.ndim == 3 and pos.shape[1] != cfg.num_patches:
            log.info("%s: resampling the image position embedding %s to %dx%d", name, pos.shape, cfg.grid, cfg.grid)
            reader = MappedReader(reader, {pos_name: lambda x: siglip.resample_posemb(x, cfg.grid)})
        abstract = siglip.abstract_params(cfg)
        shardings = None if mesh is None else sharding.tree_shardings(abstract, mesh, rules)
        return mapping.load(params, reader, shardings=shardings, dtype=dtype, expected=nn.unbox(abstract))
    finally:
        inner = reader.reader if isinstance(reader, MappedReader) else reader
        if isinstance(inner, NpzReader):
            inner.close()


def save_npz(
    path: str, params: Mapping, cfg: siglip.SigLIPConfig, scan: bool | None = None, prefix: str = PREFIX
) -> None:
    """Writes ``params`` (layout ``cfg.scan``) as a big_vision ``.npz``: '/'-joined keys under
    ``prefix``, plain or scanned (``scan``; None = as the tree is). Written atomically."""
    plist = big_vision_params(cfg, scan, prefix)
    tensors = dict(mapping.export(plist, params))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:  # a file object keeps numpy from appending ".npz" to the name
        np.savez(f, **tensors)
    os.replace(tmp, path)

