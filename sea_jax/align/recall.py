"""Which word does a visual token "mean"? The recalled-word measurement of the paper's Figures
1-2, as pure functions.

The *recalled word* of a token is the word whose Eq. 8 embedding (mean of the LLM's input-embedding
rows of its tokens) is nearest by cosine; a token is right when its recalled word is among its
targets (the patch's semantic labels, or in the demo its true words). :mod:`sea_jax.probe` applies
these to a trained run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def recall_words(tokens: Array | np.ndarray, table: Array | np.ndarray, valid: Array | np.ndarray | None = None,
                 *, chunk: int = 4096) -> np.ndarray:
    """Nearest word by cosine for every token.

    Args:
      tokens: float ``[n, d]`` visual tokens (any norm).
      table: float ``[W, d]`` word embeddings (Eq. 8 rows; any norm).
      valid: bool ``[W]``; words with ``False`` (no tokens: a zero row) are never recalled.
      chunk: tokens per matmul, bounding memory to ``[chunk, W]``.

    Returns:
      int32 ``[n]`` word ids; ties go to the lower id (``argmax``'s first index).
    """
    tokens = jnp.asarray(tokens, jnp.float32)
    table = jnp.asarray(table, jnp.float32)
    if tokens.ndim != 2 or table.ndim != 2 or tokens.shape[1] != table.shape[1]:
        raise ValueError(f"tokens [n, d] and table [W, d] expected, got {tokens.shape} and {table.shape}")
    mask = jnp.ones(table.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    return np.concatenate([np.asarray(_recall(tokens[s:s + chunk], table, mask))
                           for s in range(0, tokens.shape[0], chunk)] or [np.zeros(0, np.int32)])


@jax.jit
def _recall(tokens: Array, table: Array, mask: Array) -> Array:
    norm = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))  # noqa: E731
    sim = jnp.einsum("nd,wd->nw", norm(tokens), norm(table), precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(jnp.where(mask[None], sim, -jnp.inf), axis=-1).astype(jnp.int32)


def word_hits(recalled: np.ndarray, targets: np.ndarray, target_valid: np.ndarray | None = None) -> np.ndarray:
    """Whether each recalled word is one of its token's target words.

    Args:
      recalled: int ``[...]`` recalled word ids.
      targets: int ``[..., k]`` target word ids per token (SigLIP labels, or true words).
      target_valid: bool ``[..., k]``; invalid targets never match (default all valid).

    Returns:
      bool ``[...]``.
    """
    recalled, targets = np.asarray(recalled), np.asarray(targets)
    if targets.shape[:-1] != recalled.shape:
        raise ValueError(f"targets {targets.shape} do not match recalled {recalled.shape} + [k]")
    match = targets == recalled[..., None]
    if target_valid is not None:
        match &= np.asarray(target_valid, bool)
    return match.any(-1)


def alignment_accuracy(recalled: np.ndarray, targets: np.ndarray, target_valid: np.ndarray | None = None,
                       where: np.ndarray | None = None) -> float:
    """Share of tokens (those with ``where`` True, default all) whose recalled word is among their
    targets (:func:`word_hits`); NaN when no token is selected."""
    hits = word_hits(recalled, targets, target_valid)
    if where is not None:
        hits = hits[np.asarray(where, bool)]
    return float(hits.mean()) if hits.size else float("nan")



class PatchTruth:
    """True words of every patch of some images, for ``truth_accuracy`` (the demo world knows them).

    Attributes:
      images: n image paths.
      words: the vocabulary ``ids`` index.
      ids: int32 [n, g, g, k] true word ids per patch (any of the k counts as right; repeat a word
        to fill k).
      objects: bool [n, g, g] patches of objects (vs background), or None.

    Stored as an ``.npz`` with arrays ``image`` (paths, relative to the file's folder or absolute),
    ``words``, ``ids`` and optionally ``objects`` (:meth:`save` / :meth:`load`).
    """

    def __init__(self, images, words, ids, objects=None):
        self.images, self.words = [str(p) for p in images], [str(w) for w in words]
        self.ids = np.asarray(ids, np.int32)
        self.objects = None if objects is None else np.asarray(objects, bool)
        if self.ids.ndim != 4 or self.ids.shape[0] != len(self.images):
            raise ValueError(f"ids must be [n, g, g, k] for {len(self.images)} images, got {self.ids.shape}")
        if self.objects is not None and self.objects.shape != self.ids.shape[:3]:
            raise ValueError(f"objects {self.objects.shape} do not match ids {self.ids.shape}")

    def head(self, n: int) -> "PatchTruth":
        return PatchTruth(self.images[:n], self.words, self.ids[:n], None if self.objects is None else self.objects[:n])

    def onto(self, words) -> np.ndarray:
        """``ids`` re-indexed into another vocabulary by spelling (-1 where a word is missing)."""
        where = {w: i for i, w in enumerate(words)}
        table = np.asarray([where.get(w, -1) for w in self.words], np.int32)
        return table[self.ids]

    def save(self, path: str) -> None:
        import os

        base = os.path.dirname(os.path.abspath(path))
        arrays = {"image": np.asarray([os.path.relpath(p, base) for p in self.images], dtype=np.str_),
                  "words": np.asarray(self.words, dtype=np.str_), "ids": self.ids}
        if self.objects is not None:
            arrays["objects"] = self.objects
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str) -> "PatchTruth":
        import os

        base = os.path.dirname(os.path.abspath(path))
        with np.load(path, allow_pickle=False) as z:
            images = [os.path.normpath(os.path.join(base, p)) for p in z["image"].tolist()]
            return cls(images, z["words"].tolist(), z["ids"], z["objects"] if "objects" in z else None)


__all__ = ["recall_words", "word_hits", "alignment_accuracy", "PatchTruth"]
