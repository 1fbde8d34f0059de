"""Length-aware batches with static shapes: a few sequence-length buckets, and rows of similar
length grouped into the same global batch.

Why buckets rather than packing: SEA's L_a needs each row's image and its visual tokens at known
positions, and the LM loss is per sample; packing several samples into one row would need
per-segment attention masks and positions in every attention kernel and in the alignment
gather, while a bucket only shortens the padded length. On LLaVA's data (stage 1: one image
plus a short caption, nearly constant length; stage 2: widely spread), a handful of buckets plus
grouping reaches a useful-token fraction above 0.9 (``benchmarks/length_buckets.py``), which
leaves packing little to gain.

Two pure pieces, used by the pipeline, the trainer and the benchmark alike:

* :func:`group_window`: a window of ``k`` batches' rows of one shard -> ``k`` batches, the rows
  sorted by length and cut into consecutive slices, the slices' order permuted by
  ``(seed, window)``. Every shard uses the same permutation, so the k-th batch of each shard is
  the same length quantile and the global batch (the shards' slices side by side) is homogeneous
  whatever the number of processes.
* :func:`bucket_for` / :func:`trim`: the smallest bucket that holds the longest row of the global
  batch, and the host batch cut to it (padding only at the end, so the cut loses no real token).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sea_jax.errors import ConfigError

# Batch entries with a sequence axis (axis 1), cut to the bucket.
SEQ_KEYS = ("input_ids", "attention_mask", "loss_mask")


def parse_buckets(spec: str | Sequence[int], max_length: int, field: str = "data.length_buckets") -> tuple[int, ...]:
    """The bucket lengths, ascending, ending at ``max_length``.

    ``spec``: comma-separated lengths (``"1024,1536"``) or a sequence; empty = one bucket,
    ``max_length`` (every batch padded to it, the behaviour without buckets). ``max_length`` is
    always added: a row never needs more, since the encoder truncates at it.

    Raises:
      ConfigError: a length that is not a positive integer or exceeds ``max_length``.
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.replace(" ", ",").split(",") if p.strip()]
    else:
        parts = list(spec)
    out = set()
    for p in parts:
        try:
            n = int(p)
        except (TypeError, ValueError):
            raise ConfigError(f"config.{field}: {p!r} is not a length (comma-separated integers)") from None
        if n <= 0 or n > max_length:
            raise ConfigError(f"config.{field}: {n} must be in 1..data.max_length={max_length}")
        out.add(n)
    out.add(int(max_length))
    return tuple(sorted(out))


def bucket_for(buckets: Sequence[int], length: int) -> int:
    """The smallest bucket >= ``length`` (``buckets`` ascending; the last holds every row)."""
    for b in buckets:
        if b >= length:
            return int(b)
    raise ValueError(f"a row of {length} tokens is longer than the largest bucket {buckets[-1]}")


def longest(batch: Mapping[str, Any]) -> int:
    """The longest row of a host batch, in real tokens (its ``attention_mask``)."""
    mask = np.asarray(batch["attention_mask"])
    return int(mask.sum(axis=1).max()) if mask.size else 0


def trim(batch: Mapping[str, Any], length: int) -> dict[str, Any]:
    """``batch`` with its sequence entries (:data:`SEQ_KEYS`) cut to ``length`` columns. Rows are
    right-padded, so this drops padding only; a real token past ``length`` is an error."""
    mask = np.asarray(batch["attention_mask"])
    if mask.shape[1] > length and mask[:, length:].any():
        raise ValueError(f"cannot cut the batch to {length} tokens: a row is longer ({longest(batch)})")
    return {k: (np.asarray(v)[:, :length] if k in SEQ_KEYS else v) for k, v in batch.items()}


def group_window(lengths: Sequence[int], k: int, seed: int, window: int) -> list[list[int]]:
    """``k`` batches of one shard's window of ``len(lengths)`` rows (a multiple of ``k``), as lists
    of positions into ``lengths``: sorted by length (ties keep their order), cut into ``k``
    consecutive slices, the slices permuted by ``(seed, window)`` (the same permutation for every
    shard, so shards' k-th batches are the same length quantile)."""
    n = len(lengths)
    if k < 1 or n % k:
        raise ValueError(f"a window of {n} rows does not split into {k} batches")
    order = sorted(range(n), key=lambda i: lengths[i])  # stable
    rows = n // k
    slices = [order[j * rows:(j + 1) * rows] for j in range(k)]
    perm = np.random.default_rng([int(seed), int(window), 0x5EA]).permutation(k)
    return [slices[j] for j in perm]


def useful_fraction(real_tokens: int, batch_rows: int, length: int) -> float:
    """Real tokens over computed ones (``batch_rows x length``): 1 - the padding fraction."""
    return real_tokens / max(batch_rows * length, 1)


__all__ = ["SEQ_KEYS", "parse_buckets", "bucket_for", "longest", "trim", "group_window", "useful_fraction"]
