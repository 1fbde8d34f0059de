"""How a mixture is drawn: each source's selection, and one random-access stream over all sources.

Everything is a Grain ``MapDataset`` (element ``i`` computable on its own), so the pipeline deals
the stream into shards and worker processes exactly as it deals a single source, and a resumed
iterator only needs its position: the checkpointed state holds no per-source cursor, and
element ``i`` is the same in every run with the same seed and sources. Elements are
``(k, item)``: the source index and that source's element.

Selections (:func:`selection`): ``first:N`` / ``end:N`` are index ranges; ``random:N`` is the N
records with the smallest hash of ``(seed, source, index)``, in file order (fixed for a seed,
independent of the numpy version).

Concatenated mixture (no weights, :func:`build`): the selections one after the other, then
Grain's ``shuffle(seed)`` and ``repeat``: one epoch = every selected record once, in a fresh order
per epoch. With one source this is exactly ``MapDataset.source(src).shuffle(seed).repeat()``, the
pipeline of a single-source config.

Weighted mixture (:class:`WeightedDraws`): draw ``g`` of the whole run comes from source ``k``
with probability ``w_k / sum(w)``, decided by a hash of ``(seed, g)`` (splitmix64, so the same in
every process and numpy version), independently for every draw: the proportions over any stretch
of the run are multinomial around the weights, not those of one pattern repeated. Each source
reads its own stream: its selection shuffled with a seed of its own, a fresh order each pass
(Grain's ``shuffle`` then ``repeat``). Where draw ``g`` of source ``k`` reads in that stream needs
the number of earlier draws of ``k``: the draws are cut into blocks of :data:`BLOCK` whose
per-source counts are summed once, in order, as far as the stream has been read (1.5 s per 10^8
draws on a 2-core host, paid again by a process that resumes far into a run), and a block's draws are
recomputed on demand (cached).

Exhaustion and epochs of a weighted mixture. ``restart`` source: its stream index is its number
of earlier draws, pass after pass. ``stop`` sources: an epoch ends right after the draw that takes
the last selected record of the first ``stop`` source to run out, so that source is read exactly
once per epoch; the next epoch starts every ``stop`` source on a fresh pass (a new order). Without
``stop`` sources an epoch is ``sum(selected)`` draws. ``num_epochs = E`` ends the stream after E
epochs; epochs with ``stop`` sources vary a little in length (the draws are random), and
``period`` is the first one's.
"""
from __future__ import annotations

import bisect
import collections
import hashlib
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np

from sea_jax.data.mixture import Sampling

BLOCK = 1 << 14  # draws per block of the weighted pattern (prefix counts every BLOCK draws)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
_CACHED_BLOCKS = 8


def key_of(*parts: object) -> int:
    """A 64-bit key from ``parts`` (ints and strings), the same in every process and version."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hashes(key: int, start: int, count: int) -> np.ndarray:
    """uint64 hashes of positions ``start .. start + count - 1`` under ``key`` (splitmix64 stream)."""
    pos = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(np.uint64(key) + pos * _GAMMA)


def uniforms(key: int, start: int, count: int) -> np.ndarray:
    """float64 in [0, 1) for positions ``start ..`` under ``key`` (53 bits of :func:`hashes`)."""
    return (hashes(key, start, count) >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def selection(sampling: Sampling, n: int, key: int, where: str) -> np.ndarray | None:
    """Indices (ascending) of the records ``sampling`` selects out of ``n``; None = all of them."""
    if sampling.how == "all":
        return None
    k = sampling.count(n, where)
    if sampling.how == "first":
        return np.arange(k, dtype=np.int64)
    if sampling.how == "end":
        return np.arange(n - k, n, dtype=np.int64)
    h = hashes(key, 0, n)
    return np.sort(np.argpartition(h, k - 1)[:k]).astype(np.int64) if k < n else np.arange(n, dtype=np.int64)


class Selected(grain.MapDataset):
    """``parent`` restricted to ``indices``: element ``i`` is ``parent[indices[i]]``."""

    def __init__(self, parent: grain.MapDataset, indices: np.ndarray):
        super().__init__(parent)
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[int(self._indices[index % len(self._indices)])]

    def __str__(self) -> str:
        return f"Selected({len(self._indices)})"


class Concatenated(grain.MapDataset):
    """The parents one after the other; element ``i`` is ``(k, parents[k][i - offset_k])``."""

    def __init__(self, parents: Sequence[grain.MapDataset]):
        super().__init__(list(parents))
        self._ends = np.cumsum([len(p) for p in parents]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = int(index) % len(self)
        k = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[k - 1]) if k else 0
        return k, self.parents[k][index - start]

    def __str__(self) -> str:
        return f"Concatenated({len(self.parents)} sources)"


class WeightedDraws(grain.MapDataset):
    """Weighted draws over source streams (see the module docstring).

    Args:
      streams: one infinite stream per source (its selection, shuffled, repeated).
      sizes: selected records per source (a stream's pass length).
      weights: > 0, any scale.
      on_exhausted: per source, ``restart`` or ``stop``.
      key: the draw stream's key (from the seed).
      num_epochs: None = endless; k = k epochs.

    Attributes:
      period: draws in the first epoch (every epoch without ``stop`` sources).
    """

    def __init__(self, streams: Sequence[grain.MapDataset], sizes: Sequence[int], weights: Sequence[float],
                 on_exhausted: Sequence[str], key: int, num_epochs: int | None = None):
        super().__init__(list(streams))
        self._k = len(streams)
        p = np.asarray(weights, np.float64)
        self._cum = np.cumsum(p / p.sum())
        self._cum[-1] = 1.0  # rounding must not leave draws above the last edge
        self._key = int(key)
        self._sizes = np.asarray(sizes, np.int64)
        self._stop = np.asarray([e == "stop" for e in on_exhausted])
        self._lock = threading.RLock()
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._prefix = np.zeros((1, self._k), np.int64)  # row b: draws of each source before block b
        self._bounds = [0]  # draw where each epoch starts (grown on demand)
        self.period = self.epoch_start(1)
        self._length = sys.maxsize if num_epochs is None else self.epoch_start(int(num_epochs))

    # -- the draw stream -----------------------------------------------------------------------

    def _sources(self, b: int) -> np.ndarray:
        u = uniforms(self._key, b * BLOCK, BLOCK)
        return np.minimum(np.searchsorted(self._cum, u, side="right"), self._k - 1).astype(np.int64)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each draw, its rank among that source's draws in the block) of block b."""
        with self._lock:
            hit = self._cache.get(b)
            if hit is not None:
                self._cache.move_to_end(b)
                return hit
            src = self._sources(b)
            order = np.argsort(src, kind="stable")
            counts = np.bincount(src, minlength=self._k)
            starts = np.cumsum(counts) - counts
            rank = np.empty(BLOCK, np.int64)
            rank[order] = np.arange(BLOCK, dtype=np.int64) - np.repeat(starts, counts)
            self._cache[b] = (src, rank)
            while len(self._cache) > _CACHED_BLOCKS:
                self._cache.popitem(last=False)
            return src, rank

    def _before_block(self, b: int) -> np.ndarray:
        """Draws of each source before block b (the prefix is extended in order, once)."""
        with self._lock:
            have = len(self._prefix) - 1
            if b > have:
                rows = [np.bincount(self._sources(x), minlength=self._k) for x in range(have, b)]
                self._prefix = np.concatenate([self._prefix, self._prefix[-1] + np.cumsum(rows, axis=0)])
            return self._prefix[b]

    def drawn_before(self, g: int) -> np.ndarray:
        """Draws of each source before draw ``g``."""
        b, o = divmod(int(g), BLOCK)
        out = self._before_block(b).copy()
        if o:
            out += np.bincount(self._block(b)[0][:o], minlength=self._k)
        return out

    # -- epochs ----------------------------------------------------------------------------------

    def _epoch_end(self, start: int) -> int:
        """Where the epoch beginning at draw ``start`` ends: after its first stop source's last
        record, or ``sum(sizes)`` draws later without stop sources."""
        if not self._stop.any():
            return start + int(self._sizes.sum())
        need = np.where(self._stop, self._sizes, np.iinfo(np.int64).max)
        seen = np.zeros(self._k, np.int64)
        b, o = divmod(start, BLOCK)
        while True:
            src = self._block(b)[0][o:]
            counts = np.bincount(src, minlength=self._k)
            done = np.flatnonzero(seen + counts >= need)
            if len(done):
                ends = [int(np.flatnonzero(src == k)[need[k] - seen[k] - 1]) for k in done]
                return b * BLOCK + o + min(ends) + 1
            seen += counts
            b, o = b + 1, 0

    def epoch_start(self, m: int) -> int:
        """The first draw of epoch ``m`` (epoch 0 starts at 0)."""
        with self._lock:
            while len(self._bounds) <= m:
                self._bounds.append(self._epoch_end(self._bounds[-1]))
            return self._bounds[m]

    def _epoch_of(self, g: int) -> int:
        if not self._stop.any():
            return g // int(self._sizes.sum())
        with self._lock:
            while self._bounds[-1] <= g:
                self.epoch_start(len(self._bounds))
            return bisect.bisect_right(self._bounds, g) - 1

    # -- access ----------------------------------------------------------------------------------

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, position in its stream)`` of draw ``index``."""
        g = int(index)
        b, o = divmod(g, BLOCK)
        src, rank = self._block(b)
        k = int(src[o])
        before = int(self._before_block(b)[k]) + int(rank[o])  # k's draws before g, whole stream
        if not self._stop[k]:
            return k, before  # restart: the stream goes on, pass after pass
        m = self._epoch_of(g)
        in_epoch = before - int(self.drawn_before(self.epoch_start(m))[k])
        return k, m * int(self._sizes[k]) + in_epoch  # stop: a fresh pass each epoch

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        k, j = self.locate(index)
        return k, self.parents[k][j]

    def __str__(self) -> str:
        return f"WeightedDraws({self._k} sources, first epoch {self.period} draws)"

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        state["_cache"] = collections.OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()


def stream_seed(seed: int, k: int) -> int:
    """The shuffle seed of source k's stream in a weighted mixture (Grain wants < 2**32)."""
    return key_of(seed, "source", k) % (2 ** 32)


def build(datasets: Sequence[grain.MapDataset], weights: Sequence[float] | None, on_exhausted: Sequence[str],
          seed: int, num_epochs: int | None) -> tuple[grain.MapDataset, int]:
    """The mixture's stream of ``(k, item)`` and its epoch length in draws.

    ``datasets``: each source's selection (unshuffled). ``weights`` None = concatenated (shuffled
    together with ``seed``, every record once per epoch); else weighted draws.
    """
    sizes = [len(d) for d in datasets]
    if weights is None:
        return Concatenated(datasets).shuffle(seed=int(seed)).repeat(num_epochs), int(sum(sizes))
    streams = [d.shuffle(seed=stream_seed(seed, k)).repeat(None) for k, d in enumerate(datasets)]
    draws = WeightedDraws(streams, sizes, weights, on_exhausted, key_of(seed, "mixture"), num_epochs)
    return draws, draws.period


__all__ = ["BLOCK", "key_of", "hashes", "uniforms", "selection", "Selected", "Concatenated", "WeightedDraws",
           "stream_seed", "build"]
