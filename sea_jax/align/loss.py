"""SEA alignment objective: label embeddings (Eq. 8), symmetric InfoNCE (Eq. 9), L_lm + lambda L_a (Eq. 11).

Label embeddings. t_i is the mean of the LLM's input-embedding rows of word w_i's tokens, the word
tokenized as it appears mid-sentence (no BOS/EOS), raw rows (no sqrt(d) scaling), i.e. the space the
adapter writes visual tokens into. With the LLM frozen (stage 1) this is a [W, D] table computed once
(:func:`tokenize_words` + :func:`label_embedding_table`).

Contrastive loss. Over the N kept (token, label) pairs, with phi the cosine similarity and
tau = max(exp(log_tau), tau_min):

    L_a = -1/(2N) sum_i [ log softmax_j(phi(x_i, t_j)/tau)_i + log softmax_j(phi(t_i, x_j)/tau)_i ]

N = 0 gives L_a = 0 with zero (finite) gradients.

Scale. A stage-1 step has 256 images x 196 windows, about 50k candidates; the N x N logits never sit
whole on one device. Candidates stay where their images are: each device holds its rows' visual tokens
x and label embeddings t. Inside ``shard_map`` (:func:`infonce_local`) a device all-gathers the
*normalized* t of every candidate and the keep mask ([C, D] and [C]; visual tokens are not gathered)
and scores its c = C/devices rows against every column, one block of ``col_block`` columns at a time
in a rematerialized scan (so even the [c, C] row block is never materialized, forward or backward):
the row-wise log-sum-exp is complete locally (online, over blocks), the column-wise one is complete
per block over the local rows and merged across devices with a ``pmax`` (shift, gradient stopped:
it cancels mathematically) and a ``psum_scatter`` that hands each device the sums of the columns it
owns. Each device adds the terms of the candidates it owns (row term, column term, diagonal) and a
``psum`` totals them. Per-device memory: O(C x D) for the gathered label embeddings plus
O(c x col_block) for logits; the compiled temp size at 256 x 196 candidates, D = 2048 on 8 devices is
~0.8 GB against 10 GB for N x N (tests/test_align_loss.py). Not-kept candidates stay in the arrays
as masked rows/columns (static shapes), so C is the candidate count and N <= C.

Calling it. Either inside your own ``jax.shard_map`` (:func:`infonce_local` /
:func:`alignment_loss_local`, with the candidate axis names), or on global arrays inside ``jax.jit``
(:func:`symmetric_infonce` / :func:`alignment_loss`, which run the ``shard_map`` over the mesh).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sea_jax import sharding
from sea_jax.align.sampling import AxisName, Pairs

DEFAULT_TAU_MIN = 0.01
# docs/design.md: the paper's "tau = 0" is the initial value of log_tau, i.e. tau = 1.
DEFAULT_LOG_TAU_INIT = 0.0


# ----------------------------------------------------------------------------------------------
# Eq. 8: label-embedding table


class WordTokens(NamedTuple):
    """Tokenized word list, padded.

    ids: ``int32[W, T]`` token ids, 0-padded.
    mask: ``bool[W, T]`` real tokens.
    valid: ``bool[W]`` the word has at least one token (always all True with ``on_empty="error"``).
    """

    ids: np.ndarray
    mask: np.ndarray
    valid: np.ndarray


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def tokenize_words(
    tokenizer: Any,
    words: Sequence[str],
    *,
    context: str = "a",
    max_tokens: int | None = None,
    on_empty: str = "error",
) -> WordTokens:
    """Token ids of each word as it appears mid-sentence, without BOS/EOS.

    Method: encode ``context + " " + word`` and ``context`` (both ``add_special_tokens=False``) and
    keep the tokens after the context's; any special token id left (tokenizers that append EOS
    regardless) is dropped. Encoding a context is what makes one rule right for every family, where
    encoding the bare word (or " word") is not:
    - SentencePiece with a dummy prefix (Llama 1/2, Vicuna, Mistral, Phi-3): ``"word"`` already
      becomes ``"▁word"``, but ``" word"`` may become ``"▁" "▁word"`` (legacy mode) or ``"▁▁word"``.
    - SentencePiece without a dummy prefix (Gemma): ``"word"`` gives the sentence-initial pieces
      (no ``▁``), a different id from the mid-sentence ``"▁word"``.
    - Byte-level BPE (Llama 3, GPT-2 style): ``"word"`` vs ``"Ġword"``, the latter mid-sentence.
    With a context all three yield the mid-sentence form: ``"▁word"``, ``"▁word"``, ``"Ġword"``.

    Args:
      tokenizer: a Hugging Face tokenizer (callable returning ``input_ids``).
      words: the word list W.
      context: text preceding the word; it must tokenize to a prefix of ``context + " " + word``.
      max_tokens: pad/limit length T; a word with more tokens raises (no silent truncation).
        Default: the longest word's length.
      on_empty: a word with no tokens (empty or whitespace only; words are stripped): ``"error"``
        raises listing them, ``"mask"`` returns it with ``valid=False`` (its table row is then
        zero; drop it from the label vocabulary).
    """
    if on_empty not in ("error", "mask"):
        raise ValueError(f"on_empty must be 'error' or 'mask', got {on_empty!r}")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    prefix = _encode(tokenizer, context)
    rows: list[list[int]] = []
    for word in words:
        word = word.strip()  # surrounding whitespace is not part of a word (and "  " is no word)
        if not word:
            rows.append([])
            continue
        full = _encode(tokenizer, f"{context} {word}")
        if full[: len(prefix)] != prefix:
            raise ValueError(
                f"context {context!r} does not tokenize to a prefix of {context + ' ' + word!r} "
                f"({prefix} vs {full}); choose another context"
            )
        rows.append([t for t in full[len(prefix):] if t not in special])
    empty = [w for w, r in zip(words, rows) if not r]
    if empty and on_empty == "error":
        raise ValueError(f"{len(empty)} word(s) tokenize to nothing: {empty[:10]!r}")
    longest = max((len(r) for r in rows), default=0)
    t_len = max(longest, 1) if max_tokens is None else int(max_tokens)
    if longest > t_len:
        too_long = [w for w, r in zip(words, rows) if len(r) > t_len]
        raise ValueError(f"{len(too_long)} word(s) exceed max_tokens={t_len}: {too_long[:10]!r}")
    ids = np.zeros((len(rows), t_len), np.int32)
    mask = np.zeros((len(rows), t_len), bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = True
    return WordTokens(ids=ids, mask=mask, valid=mask.any(-1))


def label_embedding_table(
    embedding: Array,
    token_ids: Array,
    token_mask: Array | None = None,
    *,
    lengths: Array | None = None,
    batch_size: int = 1024,
    dtype: Any = None,
) -> Array:
    """Eq. 8: t_w = mean of the embedding rows of word w's tokens.

    Args:
      embedding: ``Float[Array, "V D"]`` the LLM's input-embedding table (raw rows; HF Gemma's
        sqrt(hidden) multiplier is applied in the model, not here).
      token_ids: ``Int[Array, "W T"]`` padded token ids per word.
      token_mask: ``Bool[Array, "W T"]`` real tokens; or give ``lengths`` (``Int[Array, "W"]``, the
        first ``lengths[w]`` ids are real). Neither: all T ids are real.
      batch_size: words per chunk, so the ``[chunk, T, D]`` gather stays small for 40k-word lists.
      dtype: output dtype (default ``embedding.dtype``); the mean is accumulated in float32.

    Returns:
      ``Float[Array, "W D"]``; a word with no tokens gets a zero row.
    """
    w, t = token_ids.shape
    if token_mask is not None and lengths is not None:
        raise ValueError("give token_mask or lengths, not both")
    if lengths is not None:
        token_mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
    elif token_mask is None:
        token_mask = jnp.ones((w, t), bool)
    out_dtype = embedding.dtype if dtype is None else dtype

    def one(args):
        ids, m = args
        m = m.astype(jnp.float32)
        rows = jnp.take(embedding, ids, axis=0).astype(jnp.float32)  # [T, D]
        return (jnp.sum(rows * m[:, None], 0) / jnp.maximum(m.sum(), 1.0)).astype(out_dtype)

    return jax.lax.map(one, (jnp.asarray(token_ids), jnp.asarray(token_mask)), batch_size=min(batch_size, max(w, 1)))


# ----------------------------------------------------------------------------------------------
# Eq. 9: symmetric InfoNCE, distributed


class InfoNCE(NamedTuple):
    """loss: scalar L_a; n_pairs: int32 N (kept pairs over the global batch); tau: the temperature."""

    loss: Array
    n_pairs: Array
    tau: Array


class AlignOut(NamedTuple):
    """Alignment loss and its metrics (all scalars, replicated).

    loss: L_a. n_pairs: N, kept pairs = distinct labels in the global batch. n_candidates: window
    candidates before the dedup. tau: the clamped temperature.
    """

    loss: Array
    n_pairs: Array
    n_candidates: Array
    tau: Array


def temperature(log_tau: Array, tau_min: float = DEFAULT_TAU_MIN) -> Array:
    """tau = max(exp(log_tau), tau_min) in float32 (zero gradient below the clamp)."""
    return jnp.maximum(jnp.exp(jnp.asarray(log_tau, jnp.float32)), tau_min)


def _l2_normalize(v: Array) -> Array:
    # rsqrt of max(|v|^2, eps^2) = 1 / max(|v|, eps): finite value *and* gradient for zero rows
    # (padding of masked candidates), same as torch.nn.functional.normalize(eps=1e-12).
    v = v.astype(jnp.float32)
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), 1e-24))


DEFAULT_COL_BLOCK = 4096


def _column_block(total: int, target: int) -> tuple[int, int]:
    """(block size, padded column count): the largest divisor of ``total`` in [target/2, target]
    (no padding), else ``target`` with the columns padded up to a multiple of it."""
    if total <= target:
        return total, total
    for b in range(target, target // 2 - 1, -1):
        if total % b == 0:
            return b, total
    return target, -(-total // target) * target


def infonce_local(
    x: Array,
    t: Array,
    keep: Array,
    log_tau: Array,
    *,
    axis_name: AxisName = None,
    tau_min: float = DEFAULT_TAU_MIN,
    precision: Any = None,
    col_block: int = DEFAULT_COL_BLOCK,
) -> InfoNCE:
    """Symmetric InfoNCE (Eq. 9) on this device's candidates; usable inside ``jax.shard_map``.

    Args:
      x: ``Float[Array, "c d"]`` visual tokens of this device's candidates (adapter output at the
        sampled patches).
      t: ``Float[Array, "c d"]`` the label embedding t of each candidate (label-table rows).
      keep: ``Bool[Array, "c"]`` kept pairs (after the global dedup: labels of kept pairs are
        distinct across the whole batch; this function relies on that and does not check it).
      log_tau: scalar, replicated; tau = max(exp(log_tau), tau_min).
      axis_name: the mesh axis name(s) the candidates are split over inside ``shard_map``, in global
        order (blocks concatenated like ``all_gather(..., tiled=True)``); every device holds the same
        number c of candidates. None: all candidates are local (single device / plain jit).
      tau_min: lower clamp of tau.
      precision: matmul precision of the logits (default: JAX's default). Logits are cosines / tau,
        so with tau near 0.01 a bf16-pass matmul's ~1e-3 error becomes ~0.1 in the logits; pass
        ``jax.lax.Precision.HIGHEST`` on TPU if that matters more than speed.
      col_block: columns per block of the logits. The [c, C] logits are produced block by block in
        a rematerialized scan, so forward and backward hold [c, col_block] at a time, not [c, C].

    Returns:
      :class:`InfoNCE` with the same (replicated) values on every device. Differentiable w.r.t. x,
      t and log_tau.
    """
    keep = keep.astype(bool)
    c, d = x.shape
    tau = temperature(log_tau, tau_min)
    inv_tau = 1.0 / tau
    # Normalize in float32, then compute in the inputs' dtype (bf16 inputs: half the all-gather and
    # memory) with float32 accumulation.
    dtype = jnp.result_type(x.dtype, t.dtype)
    xn, tn = _l2_normalize(x).astype(dtype), _l2_normalize(t).astype(dtype)
    if axis_name is None:
        tn_all, keep_all = tn, keep
    else:
        tn_all = jax.lax.all_gather(tn, axis_name, axis=0, tiled=True)
        keep_all = jax.lax.all_gather(keep, axis_name, axis=0, tiled=True)
    n_cols = tn_all.shape[0]
    block, padded = _column_block(n_cols, max(int(col_block), 1))
    if padded != n_cols:  # padded columns are masked out (keep False)
        tn_all = jnp.pad(tn_all, ((0, padded - n_cols), (0, 0)))
        keep_all = jnp.pad(keep_all, (0, padded - n_cols))
    t_blocks = tn_all.reshape(padded // block, block, d)
    k_blocks = keep_all.reshape(padded // block, block)

    # One pass over column blocks. Rows: online log-sum-exp (running max m, running sum s rescaled
    # when m grows). Columns: each block holds *all* local rows of its columns, so the local
    # column-wise log-sum-exp is complete per block; devices are merged after the scan.
    # Every max/shift is stop_gradient'ed: a shift cancels in shift + log(sum exp(z - shift)), so
    # treating it as a constant gives the exact gradient (and pmax has no differentiation rule).
    # Masks are applied *before* exp (exp(-inf) = 0): masking after exp would let a masked overflow
    # (inf) become inf * 0 = NaN in the backward pass. Empty rows/columns use shift 0.
    @jax.checkpoint  # backward recomputes each block: [c, block] live at a time, not [c, C]
    def block_step(carry, blk):
        m, s = carry
        t_blk, k_blk = blk
        z = jnp.dot(xn, t_blk.T, precision=precision, preferred_element_type=jnp.float32) * inv_tau
        mask = keep[:, None] & k_blk[None, :]
        zm = jax.lax.stop_gradient(jnp.where(mask, z, -jnp.inf))
        m_new = jnp.maximum(m, jnp.max(zm, axis=1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        s = s * rescale + jnp.sum(jnp.exp(jnp.where(mask, z - m_safe[:, None], -jnp.inf)), axis=1)
        c_max = jnp.max(zm, axis=0)
        c_safe = jnp.where(jnp.isfinite(c_max), c_max, 0.0)
        c_sum = jnp.sum(jnp.exp(jnp.where(mask, z - c_safe[None, :], -jnp.inf)), axis=0)
        c_lse = jnp.where(c_sum > 0, jnp.log(jnp.where(c_sum > 0, c_sum, 1.0)) + c_safe, -jnp.inf)
        return (m_new, s), c_lse

    # Carries built from x, so inside shard_map they carry x's device-varying type (a fresh
    # constant would be device-invariant and not match the scan's output carry).
    zero = jnp.zeros_like(x[:, 0], jnp.float32)
    init = (zero - jnp.inf, zero)
    if t_blocks.shape[0] == 1:  # one block: no loop (cheaper to compile, same math)
        (m, s), col_lse_local = block_step(init, (t_blocks[0], k_blocks[0]))
    else:
        (m, s), col_lse_local = jax.lax.scan(block_step, init, (t_blocks, k_blocks))
    row_lse = jnp.log(jnp.where(keep, s, 1.0)) + jnp.where(jnp.isfinite(m), m, 0.0)
    col_lse_local = col_lse_local.reshape(padded)[:n_cols]  # [C]: over this device's rows only

    if axis_name is None:
        col_lse = col_lse_local
    else:
        # log-sum-exp across devices: shift by the cross-device max, then a reduce-scatter hands
        # each device the complete sums of the c columns it owns.
        shift = jax.lax.pmax(jax.lax.stop_gradient(col_lse_local), axis_name)
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        part = jnp.exp(col_lse_local - shift)  # exp(-inf) = 0 for columns empty on this device
        col_sum = jax.lax.psum_scatter(part, axis_name, scatter_dimension=0, tiled=True)
        my_shift = jax.lax.dynamic_slice_in_dim(shift, jax.lax.axis_index(axis_name) * c, c)
        col_lse = jnp.log(jnp.where(keep, col_sum, 1.0)) + my_shift

    # phi is symmetric, so both directions share the diagonal phi(x_i, t_i) / tau.
    diag = jnp.sum(xn.astype(jnp.float32) * tn.astype(jnp.float32), -1) * inv_tau
    total = jnp.sum(jnp.where(keep, row_lse + col_lse - 2.0 * diag, 0.0))
    n = jnp.sum(keep.astype(jnp.int32))
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
        n = jax.lax.psum(n, axis_name)
    loss = total / (2.0 * jnp.maximum(n, 1).astype(jnp.float32))
    return InfoNCE(loss=loss, n_pairs=n, tau=tau)


def pair_axes(mesh: Mesh, size: int, axis_names: Sequence[str] | None = None) -> tuple[str, ...]:
    """Mesh axes to split ``size`` candidates over: ``axis_names`` (default: every mesh axis, in mesh
    order), keeping greedily those whose running product divides ``size``. Using the tensor axis too
    cuts the per-device [c, C] logits further; inputs replicated over it are split for free."""
    names = tuple(mesh.axis_names) if axis_names is None else tuple(axis_names)
    kept: list[str] = []
    prod = 1
    for name in names:
        n = mesh.shape[name]
        if n > 1 and size % (prod * n) == 0:
            kept.append(name)
            prod *= n
    return tuple(kept)


def symmetric_infonce(
    x: Array,
    t: Array,
    keep: Array,
    log_tau: Array,
    *,
    mesh: Mesh | None = None,
    axis_names: Sequence[str] | None = None,
    tau_min: float = DEFAULT_TAU_MIN,
    precision: Any = None,
    col_block: int = DEFAULT_COL_BLOCK,
) -> InfoNCE:
    """Eq. 9 on global arrays: runs :func:`infonce_local` under ``jax.shard_map`` over ``mesh``.

    Args:
      x: ``Float[Array, "C d"]`` visual tokens of all candidates, in global candidate order.
      t: ``Float[Array, "C d"]`` their label embeddings.
      keep: ``Bool[Array, "C"]`` kept pairs.
      log_tau: scalar.
      mesh: default the :func:`sea_jax.sharding.activation_sharding` mesh; with no mesh at all the
        loss is computed on one device.
      axis_names: mesh axes to split the candidates over (see :func:`pair_axes`).
      tau_min, precision, col_block: see :func:`infonce_local`.
    Callable inside ``jax.jit``; differentiable w.r.t. x, t and log_tau.
    """
    mesh = mesh if mesh is not None else sharding.active_mesh()
    axes = () if mesh is None else pair_axes(mesh, x.shape[0], axis_names)
    if not axes:
        return infonce_local(
            x, t, keep, log_tau, axis_name=None, tau_min=tau_min, precision=precision, col_block=col_block
        )

    def body(x, t, keep, log_tau):
        return infonce_local(
            x, t, keep, log_tau, axis_name=axes, tau_min=tau_min, precision=precision, col_block=col_block
        )

    rows = P(axes)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(axes, None), P(axes, None), rows, P()),
        out_specs=InfoNCE(P(), P(), P()),
    )
    return fn(x, t, keep, jnp.asarray(log_tau, jnp.float32))


def gather_pair_inputs(visual_tokens: Array, pairs: Pairs, label_table: Array) -> tuple[Array, Array, Array, Array]:
    """Flattened per-candidate inputs of the loss.

    Args:
      visual_tokens: ``Float[Array, "b p d"]`` adapter output per patch.
      pairs: :class:`~sea_jax.align.sampling.Pairs` with ``[b, w]`` fields.
      label_table: ``Float[Array, "W d"]`` Eq. 8 table.
    Returns:
      x ``[b*w, d]``, t ``[b*w, d]``, keep ``[b*w]``, candidate ``[b*w]``, in image-major order.
    """
    b, w = pairs.patch_index.shape
    x = jnp.take_along_axis(visual_tokens, pairs.patch_index[:, :, None], axis=1)  # [b, w, d]
    t = jnp.take(label_table, jnp.maximum(pairs.label, 0), axis=0)  # [b, w, d]; -1 -> row 0, masked
    d = visual_tokens.shape[-1]
    return x.reshape(b * w, d), t.reshape(b * w, d), pairs.keep.reshape(-1), pairs.candidate.reshape(-1)


def alignment_loss(
    visual_tokens: Array,
    pairs: Pairs,
    label_table: Array,
    log_tau: Array,
    *,
    mesh: Mesh | None = None,
    axis_names: Sequence[str] | None = None,
    tau_min: float = DEFAULT_TAU_MIN,
    precision: Any = None,
    col_block: int = DEFAULT_COL_BLOCK,
) -> AlignOut:
    """L_a for a batch, on global arrays (plain ``jit``): gathers the sampled tokens and label rows,
    then :func:`symmetric_infonce` under ``shard_map``.

    Args:
      visual_tokens: ``Float[Array, "B p d"]`` adapter output (global batch, any batch sharding).
      pairs: :func:`~sea_jax.align.sampling.select_pairs` output for the same batch.
      label_table: ``Float[Array, "W d"]`` (replicated or 'words'-sharded; GSPMD does the lookup).
      log_tau: scalar; mesh / axis_names / tau_min / precision / col_block: see
        :func:`symmetric_infonce`.
    """
    x, t, keep, cand = gather_pair_inputs(visual_tokens, pairs, label_table)
    out = symmetric_infonce(
        x, t, keep, log_tau, mesh=mesh, axis_names=axis_names, tau_min=tau_min, precision=precision,
        col_block=col_block,
    )
    return AlignOut(out.loss, out.n_pairs, jnp.sum(cand.astype(jnp.int32)), out.tau)


def alignment_loss_local(
    visual_tokens: Array,
    pairs: Pairs,
    label_table: Array,
    log_tau: Array,
    *,
    axis_name: AxisName,
    tau_min: float = DEFAULT_TAU_MIN,
    precision: Any = None,
    col_block: int = DEFAULT_COL_BLOCK,
) -> AlignOut:
    """:func:`alignment_loss` inside ``jax.shard_map``: this device's images ``[b, p, d]`` and
    their pairs (from ``select_pairs(..., axis_name=axis_name)``); ``label_table`` must be the whole
    table on every device (replicated in_spec). Outputs are replicated over ``axis_name``."""
    x, t, keep, cand = gather_pair_inputs(visual_tokens, pairs, label_table)
    out = infonce_local(
        x, t, keep, log_tau, axis_name=axis_name, tau_min=tau_min, precision=precision, col_block=col_block
    )
    n_cand = jnp.sum(cand.astype(jnp.int32))
    if axis_name is not None:
        n_cand = jax.lax.psum(n_cand, axis_name)
    return AlignOut(out.loss, out.n_pairs, n_cand, out.tau)


# ----------------------------------------------------------------------------------------------
# Eq. 11


def sea_objective(lm_loss: Array, align: AlignOut | Array, lam: float | Array) -> tuple[Array, Mapping[str, Array]]:
    """L = L_lm + lambda * L_a, and the step's loss metrics.

    Args:
      lm_loss: scalar next-token loss (Eq. 10).
      align: :class:`AlignOut` (or a bare scalar L_a, then only loss metrics are returned).
      lam: lambda (DESIGN default 1.0).
    Returns:
      (loss, metrics) with metrics ``loss``, ``lm_loss``, ``align_loss`` and, for an AlignOut,
      ``tau``, ``unique_labels`` and ``pairs_kept`` (equal by construction: the dedup keeps one pair
      per distinct label) and ``candidates`` (window candidates before the dedup).
    """
    a_loss = align.loss if isinstance(align, AlignOut) else jnp.asarray(align)
    loss = lm_loss + lam * a_loss
    metrics: dict[str, Array] = {"loss": loss, "lm_loss": lm_loss, "align_loss": a_loss}
    if isinstance(align, AlignOut):
        metrics.update(
            tau=align.tau,
            unique_labels=align.n_pairs,
            pairs_kept=align.n_pairs,
            candidates=align.n_candidates,
        )
    return loss, metrics
