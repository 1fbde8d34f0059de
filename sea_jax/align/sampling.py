"""Pair sampling for the SEA alignment loss (paper Eq. 7 and the localized strategy, Sec. 3.3).

Two steps turn per-patch semantic labels into the (visual token, label) pairs of Eq. 9:

1. **Window sampling** (per image, :func:`sample_windows`). The h x w patch grid is tiled into
   k x k windows; windows at the right / bottom edge of a grid not divisible by k are *partial* and
   kept (a 27x27 grid with k=2 has 14x14 windows). In every window one patch is picked uniformly
   among the patches with at least one valid label (a window without such a patch yields no
   candidate), then one of that patch's labels with probability ``S_i / sum(S_i)`` over its valid
   labels (Eq. 7).
2. **Global dedup** (over the whole data-parallel batch, :func:`dedup_by_priority`). For every
   distinct label id exactly one of the candidates carrying it is kept, chosen uniformly at random,
   so the contrastive loss never sees two positives with the same label.

Everything has static shapes: candidates are ``[b, n_windows]`` arrays with validity masks.

Randomness and sharding. The caller passes *one* key per training step, derived from (seed, step),
e.g. ``jax.random.fold_in(jax.random.key(seed), step)``, the same on every device. All random bits
of the step are drawn for the *global* candidate array, ``[B, n_windows, k*k + n + 2]`` words
(patch pick, label pick, dedup priority), by a single ``jax.random.bits`` call that every device
evaluates in full (a few MB of integer work) before reading its own images' rows; the dedup runs on
the gathered global label ids (small ints). So the choices depend only on (key, global batch), never
on how the batch is split over devices: 1, 2, 4 or 8 devices give bit-identical choices.

Two ways to call :func:`select_pairs`:
- on global arrays in plain ``jax.jit`` (``axis_name=None``): GSPMD partitions the per-image work
  along the batch and gathers the label ids for the dedup sort itself;
- inside ``jax.shard_map`` on the local block of images (``axis_name`` = the mesh axis or axes the
  batch is split over, e.g. ``("data", "fsdp")``): the device's images are rows
  ``[position * b, (position + 1) * b)`` of the global batch, position being its index along those
  axes, and the dedup all-gathers the label ids explicitly.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

AxisName = str | Sequence[str] | None

# Random words per candidate for the dedup priority (64 bits: ties practically impossible).
_DEDUP_WORDS = 2
# Sort key of candidates that are not valid: after every real label id (ids are >= 0).
_NO_LABEL = np.iinfo(np.int32).max


class WindowSample(NamedTuple):
    """One candidate (patch, label) per window; shapes ``[b, n_windows]``.

    patch_index: ``Int[Array, "b w"]`` flat index into the patch grid (row-major, ``row * w + col``);
        0 where ``valid`` is False (a safe gather index).
    label: ``Int[Array, "b w"]`` word id of the sampled label; -1 where ``valid`` is False.
    valid: ``Bool[Array, "b w"]`` the window has at least one patch with a valid label.
    """

    patch_index: Array
    label: Array
    valid: Array


class Pairs(NamedTuple):
    """Window candidates after the global dedup; shapes ``[b, n_windows]``.

    patch_index, label: as in :class:`WindowSample`.
    candidate: ``Bool[Array, "b w"]`` the window produced a candidate (before dedup).
    keep: ``Bool[Array, "b w"]`` the candidate survived the dedup: over the whole global batch every
        label id appears in exactly one kept entry. ``keep`` implies ``candidate``.
    """

    patch_index: Array
    label: Array
    candidate: Array
    keep: Array


@functools.lru_cache(maxsize=None)
def window_layout(h: int, w: int, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Static tiling of an h x w patch grid into k x k windows, partial edge windows kept.

    Returns:
      patches: ``int32[n_windows, k*k]`` flat patch index of each window slot (0 for empty slots).
      slot_valid: ``bool[n_windows, k*k]`` whether the slot lies inside the grid.
    Windows are ordered row-major over the window grid ``(ceil(h/k), ceil(w/k))``, slots row-major
    inside a window.
    """
    if min(h, w, k) < 1:
        raise ValueError(f"grid {h}x{w} and window {k} must be positive")
    nh, nw = math.ceil(h / k), math.ceil(w / k)
    wy, wx, sy, sx = np.meshgrid(np.arange(nh), np.arange(nw), np.arange(k), np.arange(k), indexing="ij")
    rows, cols = wy * k + sy, wx * k + sx
    inside = (rows < h) & (cols < w)
    patches = np.where(inside, rows * w + cols, 0).reshape(nh * nw, k * k).astype(np.int32)
    slot_valid = inside.reshape(nh * nw, k * k)
    patches.setflags(write=False)
    slot_valid.setflags(write=False)
    return patches, slot_valid


def num_windows(h: int, w: int, k: int = 2) -> int:
    """Number of (possibly partial) k x k windows of an h x w grid."""
    return math.ceil(h / k) * math.ceil(w / k)


def _axis_position(axis_name: AxisName) -> Array:
    """This device's linear index along ``axis_name`` (a name or a tuple of names), the same order
    ``all_gather(..., tiled=True)`` concatenates blocks in."""
    return jnp.int32(0) if axis_name is None else jax.lax.axis_index(axis_name)


def _open_unit_interval(bits: Array) -> Array:
    """uint32 bits -> float32 uniforms in the open interval (0, 1): the top 24 bits plus one half,
    times 2^-24, so log(u) and log(-log(u)) are finite (Gumbel noise). Ties between 24-bit draws
    (probability ~ 2^-24 per pair) are the only deviation from exact uniformity."""
    return ((bits >> 8).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-24)


def _step_bits(key: Array, num_images: int, n_windows: int, width: int) -> Array:
    """All random bits of a step: ``uint32[num_images, n_windows, width]`` for the *global* batch.

    One flat ``jax.random.bits`` call, reshaped: partitionable threefry is slow to compile on XLA:CPU,
    for a multi-dimensional shape ~20x slower than for a flat one, and a fold_in per image would add
    one more threefry. Every device computes the whole array (256 x 196 x ~16 words, a few MB of
    cheap integer work) and reads its own images' rows, so the bits of image i never depend on how
    the batch is split.
    """
    return _flat_bits(key, (num_images, n_windows, width))


def _flat_bits(key: Array, shape: tuple[int, ...]) -> Array:
    return jax.random.bits(key, (math.prod(shape),), jnp.uint32).reshape(shape)


def _sample_from_bits(
    bits: Array, label_ids: Array, scores: Array, valid: Array, patches: np.ndarray, slot_valid: np.ndarray
) -> WindowSample:
    """Window sampling given each image's bits ``uint32[b, n_win, >= k*k + n]``."""
    n = label_ids.shape[-1]
    kk = patches.shape[1]
    # Sampling is not differentiable; keep gradients from ever reaching the label scores.
    scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
    label_ok = valid.astype(bool) & (scores > 0)
    u = _open_unit_interval(bits[..., : kk + n])

    def one_image(u, ids, s, ok):
        u_patch, u_label = u[:, :kk], u[:, kk:]
        labelled = ok.any(-1)  # [p]
        slot_ok = labelled[patches] & slot_valid  # [n_win, k*k]
        # Uniform choice among the labelled slots: argmax of iid uniforms restricted to them.
        slot = jnp.argmax(jnp.where(slot_ok, u_patch, -1.0), axis=-1)
        patch = jnp.take_along_axis(patches, slot[:, None], axis=-1)[:, 0]  # [n_win]
        has = slot_ok.any(-1)
        # Eq. 7 by the Gumbel-max trick: argmax(log S_i + G_i) ~ S_i / sum(S_i) over valid labels.
        ok_p, s_p, ids_p = ok[patch], s[patch], ids[patch]  # [n_win, n]
        gumbel = -jnp.log(-jnp.log(u_label))
        logit = jnp.where(ok_p, jnp.log(jnp.where(ok_p, s_p, 1.0)) + gumbel, -jnp.inf)
        j = jnp.argmax(logit, axis=-1)
        label = jnp.take_along_axis(ids_p, j[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return WindowSample(
            patch_index=jnp.where(has, patch, 0).astype(jnp.int32),
            label=jnp.where(has, label, -1),
            valid=has,
        )

    return jax.vmap(one_image)(u, label_ids, scores, label_ok)


def _check_inputs(label_ids, scores, valid, grid) -> None:
    h, w = grid
    if label_ids.ndim != 3 or label_ids.shape[1] != h * w:
        raise ValueError(f"label_ids {label_ids.shape}: expected [b, p, n] with p = h * w for the grid {h}x{w}")
    if scores.shape != label_ids.shape or valid.shape != label_ids.shape:
        raise ValueError(f"label_ids {label_ids.shape}, scores {scores.shape}, valid {valid.shape} differ")


def sample_windows(
    key: Array,
    label_ids: Array,
    scores: Array,
    valid: Array,
    grid: tuple[int, int],
    window: int = 2,
) -> WindowSample:
    """Per image and window: a uniform patch among the labelled ones, then a label by Eq. 7.

    Global arrays only (for the sharded form use :func:`select_pairs` with ``axis_name``, which
    makes the same choices: ``select_pairs(key, ...)`` and ``sample_windows(key, ...)`` agree on
    ``patch_index``, ``label`` and ``valid`` / ``candidate``).

    Args:
      key: step key (any jax PRNG key); the caller derives it from (seed, step).
      label_ids: ``Int[Array, "b p n"]`` top-n word ids per patch, ``p = h * w`` row-major.
      scores: ``Float[Array, "b p n"]`` their similarity scores S.
      valid: ``Bool[Array, "b p n"]`` label validity. Scores <= 0 are treated as invalid whatever
        the mask says (Eq. 7 needs positive weights; the paper drops them).
      grid: patch grid ``(h, w)``.
      window: k, the window side (default 2).

    Returns:
      :class:`WindowSample` with ``[b, n_windows]`` arrays.
    """
    _check_inputs(label_ids, scores, valid, grid)
    patches, slot_valid = window_layout(*grid, window)
    b, _, n = label_ids.shape
    bits = _step_bits(key, b, patches.shape[0], patches.shape[1] + n + _DEDUP_WORDS)
    return _sample_from_bits(bits, label_ids, scores, valid, patches, slot_valid)


def dedup_by_priority(labels: Array, valid: Array, priority: Array) -> Array:
    """Keep, for every distinct label among the valid candidates, the one of highest priority.

    Args:
      labels: ``Int[Array, "..."]`` label id per candidate (global array, any shape).
      valid: ``Bool[Array, "..."]`` candidate validity, same shape.
      priority: ``UInt32[Array, "... m"]`` m random words per candidate, compared lexicographically
        (lowest wins); iid uniform words make the kept candidate of each label uniform among its
        carriers (with m = 2, 64 bits, a tie has probability ~ 2^-64; ties go to the lower index).
    Returns:
      ``Bool[Array, "..."]`` keep mask; ``keep`` implies ``valid``.
    """
    shape = labels.shape
    m = priority.shape[-1]
    labels = labels.reshape(-1).astype(jnp.int32)
    valid = valid.reshape(-1).astype(bool)
    priority = priority.reshape(-1, m)
    c = labels.shape[0]
    if c == 0:
        return jnp.zeros(shape, bool)
    sort_label = jnp.where(valid, labels, _NO_LABEL)
    operands = (sort_label, *(priority[:, i] for i in range(m)), jnp.arange(c, dtype=jnp.int32))
    # Sorted by label, then priority, then index; the first entry of each label run is kept.
    sorted_ = jax.lax.sort(operands, num_keys=m + 2)
    s_label, order = sorted_[0], sorted_[-1]
    first = jnp.concatenate([jnp.ones((1,), bool), s_label[1:] != s_label[:-1]])
    keep_sorted = first & (s_label != _NO_LABEL)
    return jnp.zeros((c,), bool).at[order].set(keep_sorted).reshape(shape)


def dedup_keep_one(key: Array, labels: Array, valid: Array) -> Array:
    """For every distinct label among the valid candidates keep exactly one, uniformly at random.

    Standalone form of the dedup :func:`select_pairs` performs: priorities are 64 random bits per
    candidate drawn from ``key`` for the given (global) candidate array.

    Args:
      key: a jax PRNG key.
      labels: ``Int[Array, "..."]`` label id per candidate (any shape; flattened row-major).
      valid: ``Bool[Array, "..."]`` candidate validity, same shape.

    Returns:
      ``Bool[Array, "..."]`` keep mask, same shape; ``keep`` implies ``valid``.
    """
    priority = _flat_bits(key, labels.shape + (_DEDUP_WORDS,))
    return dedup_by_priority(labels, valid, priority)


def select_pairs(
    key: Array,
    label_ids: Array,
    scores: Array,
    valid: Array,
    grid: tuple[int, int],
    window: int = 2,
    *,
    axis_name: AxisName = None,
) -> Pairs:
    """Window sampling (Eq. 7) followed by the global keep-one-per-label dedup.

    Args:
      key: the step's key, derived by the caller from (seed, step); pass the same key on every
        device. Every random word of the step (window, label and dedup choices) comes from it.
      label_ids, scores, valid: ``[b, p, n]`` per-patch labels of this call's images (global arrays
        when ``axis_name`` is None, the device's local block inside ``shard_map`` otherwise).
      grid: patch grid ``(h, w)``; window: k.
      axis_name: None for global arrays (plain ``jit``, GSPMD); inside ``jax.shard_map`` the mesh
        axis name or tuple of names the image batch is split over, in mesh order as in the
        ``PartitionSpec`` (e.g. ``("data", "fsdp")``). Every device must hold the same number of
        images, contiguous in global order.

    Returns:
      :class:`Pairs` for this call's images (``[b, n_windows]``).
    """
    _check_inputs(label_ids, scores, valid, grid)
    patches, slot_valid = window_layout(*grid, window)
    b, _, n = label_ids.shape
    n_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    kk = patches.shape[1]
    bits_all = _step_bits(key, b * n_devices, patches.shape[0], kk + n + _DEDUP_WORDS)
    offset = _axis_position(axis_name) * b
    bits = jax.lax.dynamic_slice_in_dim(bits_all, offset, b, axis=0)
    ws = _sample_from_bits(bits, label_ids, scores, valid, patches, slot_valid)
    priority = bits_all[..., kk + n:]  # [B, n_win, 2]: the dedup's random words, global
    if axis_name is None:
        keep = dedup_by_priority(ws.label, ws.valid, priority)
    else:
        # Label ids are small ints: gather them all, dedup the global array identically on every
        # device (the priorities are already global), keep this device's rows.
        all_labels = jax.lax.all_gather(ws.label, axis_name, axis=0, tiled=True)
        all_valid = jax.lax.all_gather(ws.valid, axis_name, axis=0, tiled=True)
        keep_all = dedup_by_priority(all_labels, all_valid, priority)
        keep = jax.lax.dynamic_slice_in_dim(keep_all, offset, b, axis=0)
    return Pairs(patch_index=ws.patch_index, label=ws.label, candidate=ws.valid, keep=keep)
