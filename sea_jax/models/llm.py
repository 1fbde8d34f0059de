"""Decoder-only LLMs as one Flax linen model: Gemma, Gemma 2, Llama 2 (Vicuna), Llama 3, Phi-3.

Variants differ only by :class:`LLMConfig`; the forward pass follows Hugging Face ``transformers``
(5.23) operation by operation, so converted checkpoints give the same logits (see
``tests/test_convert_llm.py``):

- RMSNorm in float32; Llama/Phi-3 round to the compute dtype *before* multiplying by ``w``, Gemma
  multiplies by ``1 + w`` in float32 and rounds once (``norm_plus_one``).
- RoPE with the ``rotate_half`` convention (first half / second half of each head, not interleaved
  pairs), inverse frequencies computed in float32 like HF, optional llama3 / linear / longrope
  scaling and partial rotary dims (``rope_partial_factor``).
- Grouped-query attention: query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``
  (HF's ``repeat_kv``), logits ``(q . k) * scale`` then optional tanh soft-capping, softmax in float32.
- Masks are built from token *indices* (causal: ``kv <= q``; sliding window: ``kv > q - window``;
  padding: ``attention_mask[b, kv]``), positions for RoPE default to ``arange`` (plus the cache
  offset), exactly as HF does when ``position_ids`` is not given, including under left padding.
- Gemma's ``sqrt(hidden)`` embedding scale belongs to the token-embedding lookup, as in
  ``transformers`` 5.x (``GemmaTextScaledWordEmbedding``): ``input_ids`` are scaled,
  ``inputs_embeds`` are used as given. :meth:`LLM.embed` returns raw rows, or HF's scaled rows with
  ``scaled=True``.

Parameters are float32 masters (``param_dtype``) cast to the compute ``dtype`` at use. Every
parameter carries logical axis names (``nn.with_logical_partitioning``) and the main activations
are pinned with :func:`sea_jax.sharding.constrain`, so one rule table decides the parallelism.

Parameter tree (``scan_layers=True``; unscanned layers are ``layers_0`` ... ``layers_{n-1}`` without
the leading layer axis)::

    embedder/embedding                [vocab, embed]
    layers/attn/{q,k,v}/kernel        [layers, embed, heads|kv_heads, head_dim]
    layers/attn/o/kernel              [layers, heads, head_dim, embed]
    layers/mlp/{gate,up}/kernel       [layers, embed, mlp]
    layers/mlp/down/kernel            [layers, mlp, embed]
    layers/{pre_attn,pre_mlp}_norm/scale      [layers, embed]
    layers/{post_attn,post_mlp}_norm/scale    [layers, embed]   (Gemma 2 only)
    final_norm/scale                  [embed]
    lm_head/kernel                    [embed, vocab]          (untied models only)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from sea_jax import sharding
from sea_jax.sharding import constrain

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, with HF's ``rope_parameters`` semantics.

    kind: ``"linear"`` (inv_freq / factor), ``"llama3"`` (Llama 3.1 band-wise smoothing, uses factor,
    low/high_freq_factor, original_max_positions) or ``"longrope"`` (Phi-3 long context: per-frequency
    short/long factors, switched on the *current* sequence length like HF, cos/sin scaled by
    ``attention_factor``; ``factor`` and ``attention_factor`` default as in HF).
    """

    kind: str
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_positions: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in ("linear", "llama3", "longrope"):
            raise ValueError(f"rope scaling {self.kind!r} not supported (linear, llama3, longrope)")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """One decoder LLM. Field names are ours; :mod:`sea_jax.convert.hf_llm` maps HF configs.

    Attributes:
      vocab_size, hidden, n_layers, n_heads, n_kv_heads, head_dim, mlp_dim: sizes
        (``n_kv_heads`` 1 = MQA, < n_heads = GQA; ``head_dim`` need not be hidden / n_heads).
      family: HF naming the converter uses: "gemma", "gemma2", "llama", "phi3". The forward pass
        depends only on the flags below, never on the family.
      activation: gate activation of the gated MLP: "gelu_tanh" (GeGLU), "silu" (SwiGLU), "gelu".
      norm_eps: RMSNorm epsilon.
      norm_plus_one: Gemma's RMSNorm ``x * (1 + w)`` (weights stored zero-centred).
      scale_embeddings: multiply token embeddings by sqrt(hidden) (Gemma).
      tie_embeddings: logits use the embedding table (no ``lm_head``).
      rope_theta, rope_scaling, rope_partial_factor: RoPE base, scaling, fraction of head_dim rotated.
      max_positions: HF ``max_position_embeddings`` (longrope's default factor uses it).
      query_pre_attn_scalar: attention scale is ``query_pre_attn_scalar ** -0.5`` (Gemma 2), else
        ``head_dim ** -0.5``.
      attn_logit_softcap, final_logit_softcap: ``c * tanh(x / c)`` on attention / output logits.
      sliding_window: window of "sliding_attention" layers (a query sees the last ``window`` tokens).
      layer_types: per layer "full_attention" / "sliding_attention"; None = all sliding when
        ``sliding_window`` is set (Phi-3), else all full.
      post_norms: Gemma 2 sandwich norms (RMSNorm after attention and after the MLP).
      dtype: compute dtype; param_dtype: master weights.
      scan_layers: stack the layers on a leading axis and run them with ``nn.scan`` (fast compile).
      remat: "none", "full" (save nothing), "dots" (save matmul outputs), "dots_no_batch"
        (save weight matmuls only): ``jax.checkpoint`` policy per layer.
      bos_token_id, eos_token_id, pad_token_id: carried for export (config.json).
    """

    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    family: str = "llama"
    activation: str = "silu"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    rope_partial_factor: float = 1.0
    max_positions: int = 4096
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    post_norms: bool = False
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(_ACTIVATIONS)}")
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not in {sorted(_REMAT_POLICIES)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"{len(self.layer_types)} layer_types for {self.n_layers} layers")
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ValueError(f"unknown layer types {sorted(bad)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need sliding_window")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim {self.rotary_dim} (head_dim * rope_partial_factor) must be even")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_partial_factor)

    @property
    def layer_windows(self) -> np.ndarray:
        """int32 [n_layers]: each layer's attention window, 0 for full attention."""
        types = self.layer_types
        if types is None:
            types = ("sliding_attention" if self.sliding_window else "full_attention",) * self.n_layers
        return np.asarray([self.sliding_window if t == "sliding_attention" else 0 for t in types], np.int32)


_ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # HF "gelu_pytorch_tanh"
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}

_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------------------------
# Presets (sizes from the public HF config.json of each checkpoint)


def gemma_2b(**overrides) -> LLMConfig:
    """google/gemma-2b: MQA (1 kv head), GeGLU, 2,506,172,416 parameters."""
    return LLMConfig(**{**_GEMMA, **dict(hidden=2048, n_layers=18, n_heads=8, n_kv_heads=1, mlp_dim=16384), **overrides})


def gemma_7b(**overrides) -> LLMConfig:
    """google/gemma-7b."""
    return LLMConfig(**{**_GEMMA, **dict(hidden=3072, n_layers=28, n_heads=16, n_kv_heads=16, mlp_dim=24576), **overrides})


def gemma2_2b(**overrides) -> LLMConfig:
    """google/gemma-2-2b: soft-capping, alternating sliding (4096) / global layers, sandwich norms."""
    base = dict(
        _GEMMA, family="gemma2", hidden=2304, n_layers=26, n_heads=8, n_kv_heads=4, mlp_dim=9216,
        query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096, post_norms=True,
        layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(26)),
    )
    return LLMConfig(**{**base, **overrides})


def vicuna_7b(**overrides) -> LLMConfig:
    """lmsys/vicuna-7b-v1.5 (Llama-2-7B architecture)."""
    return LLMConfig(**{**_LLAMA2, **dict(hidden=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008), **overrides})


def vicuna_13b(**overrides) -> LLMConfig:
    """lmsys/vicuna-13b-v1.5 (Llama-2-13B architecture)."""
    return LLMConfig(**{**_LLAMA2, **dict(hidden=5120, n_layers=40, n_heads=40, n_kv_heads=40, mlp_dim=13824), **overrides})


def llama3_8b(**overrides) -> LLMConfig:
    """meta-llama/Meta-Llama-3-8B(-Instruct): GQA 32/8, theta 500k, 128k vocab."""
    base = dict(
        family="llama", vocab_size=128256, hidden=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        mlp_dim=14336, activation="silu", norm_eps=1e-5, rope_theta=500_000.0, max_positions=8192,
        bos_token_id=128000, eos_token_id=128001,
    )
    return LLMConfig(**{**base, **overrides})


def llama31_8b(**overrides) -> LLMConfig:
    """meta-llama/Llama-3.1-8B: Llama 3 with llama3 RoPE scaling to 128k positions."""
    scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)
    return llama3_8b(**{**dict(rope_scaling=scaling, max_positions=131072), **overrides})


def phi3_mini(**overrides) -> LLMConfig:
    """microsoft/Phi-3-mini-4k-instruct: MHA, head_dim 96, sliding window 2047 on every layer."""
    base = dict(
        family="phi3", vocab_size=32064, hidden=3072, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=96,
        mlp_dim=8192, activation="silu", norm_eps=1e-5, rope_theta=10_000.0, max_positions=4096,
        sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    )
    return LLMConfig(**{**base, **overrides})


_GEMMA = dict(
    family="gemma", vocab_size=256000, head_dim=256, activation="gelu_tanh", norm_eps=1e-6, norm_plus_one=True,
    scale_embeddings=True, tie_embeddings=True, rope_theta=10_000.0, max_positions=8192,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
_LLAMA2 = dict(
    family="llama", vocab_size=32000, head_dim=128, activation="silu", norm_eps=1e-5, rope_theta=10_000.0,
    max_positions=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

PRESETS = {
    "gemma_2b": gemma_2b,
    "gemma_7b": gemma_7b,
    "gemma2_2b": gemma2_2b,
    "vicuna_7b": vicuna_7b,
    "vicuna_13b": vicuna_13b,
    "llama3_8b": llama3_8b,
    "llama31_8b": llama31_8b,
    "phi3_mini": phi3_mini,
}


def preset(name: str, **overrides) -> LLMConfig:
    """A preset config by name (``PRESETS``), with field overrides (e.g. ``scan_layers=False``)."""
    if name not in PRESETS:
        raise KeyError(f"no LLM preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: LLMConfig) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Inverse frequencies, float32 [rotary_dim // 2], as HF computes them (float32 arithmetic).

    Returns (inv_freq, long_inv_freq or None, attention_factor). ``long_inv_freq`` is longrope's
    set for sequences longer than ``original_max_positions``; cos and sin are multiplied by
    ``attention_factor`` (1 except longrope).
    """
    dim = cfg.rotary_dim
    f32 = np.float32
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    base = f32(cfg.rope_theta) ** exponents
    inv = (f32(1.0) / base).astype(f32)
    s = cfg.rope_scaling
    if s is None:
        return inv, None, 1.0
    if s.kind == "linear":
        return (inv / f32(s.factor)).astype(f32), None, 1.0
    if s.kind == "llama3":
        factor, lo, hi, old = f32(s.factor), f32(s.low_freq_factor), f32(s.high_freq_factor), f32(s.original_max_positions)
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv).astype(f32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(f32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(f32)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, scaled).astype(f32), None, 1.0
    # longrope
    orig = s.original_max_positions
    factor = s.factor if s.factor is not None else cfg.max_positions / orig
    attn = s.attention_factor
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    short = (f32(1.0) / (np.asarray(s.short_factor, f32) * base)).astype(f32)
    long = (f32(1.0) / (np.asarray(s.long_factor, f32) * base)).astype(f32)
    return short, long, float(attn)


def rope_cos_sin(
    cfg: LLMConfig, positions: Int[Array, "b l"], dtype
) -> tuple[Float[Array, "b l r"], Float[Array, "b l r"]]:
    """cos and sin [b, l, rotary_dim] (frequencies repeated twice, HF layout), cast to ``dtype``."""
    inv, long_inv, attn_factor = rope_inv_freq(cfg)
    inv = jnp.asarray(inv)
    if long_inv is not None:
        # HF picks the set from the longest position in the call (torch.max(position_ids) + 1).
        is_long = jnp.max(positions) + 1 > cfg.rope_scaling.original_max_positions
        inv = jnp.where(is_long, jnp.asarray(long_inv), inv)
    freqs = positions[..., None].astype(jnp.float32) * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb) * attn_factor
    sin = jnp.sin(emb) * attn_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: Float[Array, "b l h d"], cos: Float[Array, "b l r"], sin: Float[Array, "b l r"]) -> Float[Array, "b l h d"]:
    """``x * cos + rotate_half(x) * sin`` on the first r dims of each head (the rest pass through)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


# ----------------------------------------------------------------------------------------------
# KV cache (for decoding; the generation code owns its use)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``max_len`` token slots.

    Attributes:
      k, v: [n_layers, b, max_len, n_kv_heads, head_dim] (RoPE already applied to k).
      index: int32 scalar, slots already written; a call with l tokens writes [index, index + l).
    """

    k: Float[Array, "n b s k d"]
    v: Float[Array, "n b s k d"]
    index: Int[Array, ""]


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype: Any | None = None) -> KVCache:
    """An empty cache. With it, ``attention_mask`` passed to the model covers all max_len slots."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Modules


def _normal(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """``einsum(eq, x, kernel)`` with a logically partitioned kernel (no bias: none of the families has one)."""

    cfg: LLMConfig
    shape: tuple[int, ...]
    names: tuple[str, ...]
    eq: str
    accumulate: Any = None  # einsum preferred_element_type (float32 for the LM head)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(_normal(), self.names), self.shape, self.cfg.param_dtype)
        return jnp.einsum(self.eq, x, kernel.astype(self.cfg.dtype), preferred_element_type=self.accumulate)


class RMSNorm(nn.Module):
    cfg: LLMConfig

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        cfg = self.cfg
        init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), cfg.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
        if cfg.norm_plus_one:
            # Gemma: (x * (1 + w)) in float32, rounded once (HF PR 29402).
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        # Llama / Phi-3: round the normalised activations first, then scale in the compute dtype.
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class Embedder(nn.Module):
    cfg: LLMConfig

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(_normal(), ("vocab", "embed")), (cfg.vocab_size, cfg.hidden), cfg.param_dtype
        )

    def encode(self, ids: Int[Array, "b l"], scaled: bool) -> Float[Array, "b l d"]:
        cfg = self.cfg
        x = jnp.take(self.embedding, ids, axis=0).astype(cfg.dtype)
        if scaled and cfg.scale_embeddings:
            # HF: weight dtype times sqrt(hidden) rounded to that dtype (e.g. 45.25 in bf16 for 2048).
            x = x * jnp.asarray(math.sqrt(cfg.hidden), cfg.dtype)
        return x

    def decode(self, x: Float[Array, "b l d"]) -> Float[Array, "b l v"]:
        return jnp.einsum("bld,vd->blv", x, self.embedding.astype(self.cfg.dtype), preferred_element_type=jnp.float32)


@flax.struct.dataclass
class _Context:
    """What every layer sees (broadcast over the layer scan)."""

    cos: Float[Array, "b l r"]  # RoPE tables, computed once for all layers
    sin: Float[Array, "b l r"]
    q_idx: Int[Array, "l"]  # token index of each query (cache offset included)
    kv_valid: Bool[Array, "b s"]  # padding mask over key slots
    cache_index: Int[Array, ""] | None


def _attention_mask(ctx: _Context, window: Int[Array, ""], sliding: bool) -> Bool[Array, "b l s"]:
    s = ctx.kv_valid.shape[1]
    kv_idx = jnp.arange(s, dtype=jnp.int32)
    allowed = kv_idx[None, :] <= ctx.q_idx[:, None]
    if sliding:
        # window == 0 marks a full-attention layer (layers share one scanned body).
        in_window = kv_idx[None, :] > ctx.q_idx[:, None] - window
        allowed = allowed & ((window <= 0) | in_window)
    return allowed[None, :, :] & ctx.kv_valid[:, None, :]


class Attention(nn.Module):
    cfg: LLMConfig

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b l d"],
        ctx: _Context,
        window: Int[Array, ""],
        cache_k: Float[Array, "b s k d"] | None,
        cache_v: Float[Array, "b s k d"] | None,
    ):
        cfg = self.cfg
        H, K, D, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden
        G = H // K
        q = Dense(cfg, (E, H, D), ("embed", "heads", "head_dim"), "ble,ehd->blhd", name="q")(x)
        k = Dense(cfg, (E, K, D), ("embed", "kv_heads", "head_dim"), "ble,ehd->blhd", name="k")(x)
        v = Dense(cfg, (E, K, D), ("embed", "kv_heads", "head_dim"), "ble,ehd->blhd", name="v")(x)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))

        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)

        new_kv = None
        if cache_k is not None:
            start = (0, ctx.cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            k = constrain(k, ("batch", "length", "act_kv_heads", None))
            v = constrain(v, ("batch", "length", "act_kv_heads", None))
            new_kv = (k, v)
            k, v = k.astype(cfg.dtype), v.astype(cfg.dtype)

        b, l = q.shape[:2]
        # GQA without materialising repeated keys: head h = kv_head * G + g, as HF's repeat_kv.
        # One einsum on the tokens-major layout, unlike the towers (sea_jax.models.attention):
        # the TPU compiler lays it out in 2 GiB less HBM per chip at gemma2b's stage 1 (AOT, v4-8),
        # and with Gemma's one kv head the CPU backend runs it as fast as head-major.
        qg = q.reshape(b, l, K, G, D)
        scale = (cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else D) ** -0.5
        logits = jnp.einsum("blkgd,bskd->bkgls", qg, k) * jnp.asarray(scale, cfg.dtype)
        if cfg.attn_logit_softcap is not None:
            cap = cfg.attn_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        mask = _attention_mask(ctx, window, sliding=bool(cfg.layer_windows.any()))
        # Finite fill: a query with no visible key (left padding) gets a uniform row, never NaN.
        logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, l, H, D)
        out = constrain(out, ("batch", "length", "act_heads", None))
        y = Dense(cfg, (H, D, E), ("heads", "head_dim", "embed"), "blhd,hde->ble", name="o")(out)
        return y, new_kv


class MLP(nn.Module):
    cfg: LLMConfig

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        cfg = self.cfg
        gate = Dense(cfg, (cfg.hidden, cfg.mlp_dim), ("embed", "mlp"), "ble,ef->blf", name="gate")(x)
        up = Dense(cfg, (cfg.hidden, cfg.mlp_dim), ("embed", "mlp"), "ble,ef->blf", name="up")(x)
        h = _ACTIVATIONS[cfg.activation](gate) * up
        h = constrain(h, ("batch", "length", "act_mlp"))
        return Dense(cfg, (cfg.mlp_dim, cfg.hidden), ("mlp", "embed"), "blf,fe->ble", name="down")(h)


class Block(nn.Module):
    """One decoder layer; signature ``(carry, broadcast, per-layer) -> (carry, per-layer)`` for nn.scan."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], ctx: _Context, per_layer):
        cfg = self.cfg
        window, cache_k, cache_v = per_layer
        h = RMSNorm(cfg, name="pre_attn_norm")(x)
        h, new_kv = Attention(cfg, name="attn")(h, ctx, window, cache_k, cache_v)
        if cfg.post_norms:
            h = RMSNorm(cfg, name="post_attn_norm")(h)
        x = constrain(x + h, ("batch", "length", "act_embed"))
        h = RMSNorm(cfg, name="pre_mlp_norm")(x)
        h = MLP(cfg, name="mlp")(h)
        if cfg.post_norms:
            h = RMSNorm(cfg, name="post_mlp_norm")(h)
        x = constrain(x + h, ("batch", "length", "act_embed"))
        return x, new_kv


@flax.struct.dataclass
class LLMOutput:
    """Model outputs.

    Attributes:
      logits: float32 [b, l, vocab] (final soft-capping applied), None with ``compute_logits=False``.
      hidden: [b, l, hidden] final hidden state, after the final norm (what the LM head reads).
      cache: the updated :class:`KVCache` when one was passed, else None.
    """

    logits: Float[Array, "b l v"] | None
    hidden: Float[Array, "b l d"]
    cache: KVCache | None = None


class LLM(nn.Module):
    """The decoder LLM. Use ``model.apply(variables, input_ids=..., attention_mask=...)``.

    Methods (through ``apply(..., method=...)``): :meth:`embed` (token rows), :meth:`head`
    (hidden -> logits), ``__call__``.
    """

    cfg: LLMConfig

    def setup(self):
        cfg = self.cfg
        block = Block
        policy = _REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            # Inside a scan the loop already stops XLA from CSE-ing recomputation away.
            block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
        self.embedder = Embedder(cfg)
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = scanned(cfg)
        else:
            self.layers = [block(cfg) for _ in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            # float32 accumulation and output: logits feed a softmax over a large vocabulary.
            self.lm_head = Dense(cfg, (cfg.hidden, cfg.vocab_size), ("embed", "vocab"), "ble,ev->blv", accumulate=jnp.float32)

    def embed(self, input_ids: Int[Array, "b l"], scaled: bool = False) -> Float[Array, "b l d"]:
        """Embedding rows in the compute dtype.

        ``scaled=False``: raw rows of the table (the space SEA's label embeddings and the adapter
        output live in). ``scaled=True``: what the model itself feeds the first layer for
        ``input_ids``, i.e. HF's ``get_input_embeddings()(ids)`` (times sqrt(hidden) for Gemma).
        """
        return self.embedder.encode(input_ids, scaled)

    def head(self, hidden: Float[Array, "b l d"]) -> Float[Array, "b l v"]:
        """Final-norm hidden states -> float32 logits (tied or untied), soft-capped if configured."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            logits = self.embedder.decode(hidden)
        else:
            logits = self.lm_head(hidden)
        if cfg.final_logit_softcap is not None:
            cap = cfg.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(
        self,
        input_ids: Int[Array, "b l"] | None = None,
        attention_mask: Int[Array, "b s"] | None = None,
        *,
        inputs_embeds: Float[Array, "b l d"] | None = None,
        positions: Int[Array, "b l"] | None = None,
        cache: KVCache | None = None,
        compute_logits: bool = True,
    ) -> LLMOutput:
        """Runs the decoder.

        Args:
          input_ids: token ids; embedded with :meth:`embed` (``scaled=True``).
          attention_mask: 1 = real token, 0 = padding (HF convention), [b, l]; with a cache [b, max_len]
            over all cache slots. None = all real.
          inputs_embeds: instead of ``input_ids``: first-layer inputs, used as given (HF semantics:
            no Gemma scaling here; use ``embed(ids, scaled=True)`` for text rows).
          positions: RoPE positions; default ``arange(l)`` (+ cache index), like HF's default
            ``position_ids`` (so left padding shifts the positions of the real tokens, as in HF).
          cache: a :class:`KVCache` to read and extend (decoding); returned updated in the output.
          compute_logits: False skips the LM head (e.g. chunked losses call :meth:`head` themselves).
        Returns:
          :class:`LLMOutput`.
        """
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            x = self.embed(input_ids, scaled=True)
        else:
            x = inputs_embeds.astype(cfg.dtype)
        b, l = x.shape[:2]
        x = constrain(x, ("batch", "length", "act_embed"))

        offset = jnp.zeros((), jnp.int32) if cache is None else cache.index
        q_idx = offset + jnp.arange(l, dtype=jnp.int32)
        slots = l if cache is None else cache.k.shape[2]
        if attention_mask is None:
            kv_valid = jnp.ones((b, slots), bool)
        else:
            if attention_mask.shape != (b, slots):
                what = "sequence" if cache is None else "cache slots (max_len)"
                raise ValueError(f"attention_mask shape {attention_mask.shape}, expected {(b, slots)} ({what})")
            kv_valid = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.broadcast_to(q_idx[None, :], (b, l))
        cos, sin = rope_cos_sin(cfg, positions.astype(jnp.int32), cfg.dtype)
        ctx = _Context(cos=cos, sin=sin, q_idx=q_idx, kv_valid=kv_valid, cache_index=None if cache is None else cache.index)

        windows = jnp.asarray(cfg.layer_windows)
        if cfg.scan_layers:
            per_layer = (windows, None if cache is None else cache.k, None if cache is None else cache.v)
            x, new_kv = self.layers(x, ctx, per_layer)
            new_k, new_v = (None, None) if cache is None else new_kv
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                per_layer = (windows[i], None if cache is None else cache.k[i], None if cache is None else cache.v[i])
                x, kv = layer(x, ctx, per_layer)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_k, new_v = (jnp.stack(ks), jnp.stack(vs)) if cache is not None else (None, None)

        hidden = self.final_norm(x)
        logits = self.head(hidden) if compute_logits else None
        new_cache = None if cache is None else KVCache(new_k, new_v, cache.index + l)
        return LLMOutput(logits=logits, hidden=hidden, cache=new_cache)


# ----------------------------------------------------------------------------------------------
# Helpers


def _dummy_ids() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def abstract_variables(cfg: LLMConfig) -> dict:
    """``jax.eval_shape`` of init: boxed (logically partitioned) ShapeDtypeStructs, no memory used."""
    model = LLM(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), input_ids=_dummy_ids()))


def param_count(cfg: LLMConfig) -> int:
    """Number of parameters, computed abstractly."""
    shapes = nn.unbox(abstract_variables(cfg)["params"])
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def param_shardings(cfg: LLMConfig, mesh, rules: sharding.LogicalRules = sharding.DEFAULT_RULES):
    """NamedSharding of every parameter (unboxed tree, same structure as ``params``)."""
    return sharding.tree_shardings(abstract_variables(cfg)["params"], mesh, rules)


def init_params(cfg: LLMConfig, key: jax.Array, mesh=None, rules: sharding.LogicalRules = sharding.DEFAULT_RULES) -> dict:
    """Random parameters (unboxed); with ``mesh`` each leaf is created directly in its sharding."""
    model = LLM(cfg)

    def init(k):
        return nn.unbox(model.init(k, input_ids=_dummy_ids())["params"])

    if mesh is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, rules))(key)
