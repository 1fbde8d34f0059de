"""SigLIP image and text towers in Flax, with big_vision's parameter tree.

The parameter tree is exactly big_vision's (``models/vit.py``, ``models/proj/image_text/
text_transformer.py`` and ``two_towers.py``), so its ``.npz`` checkpoints load with no renaming::

    img/embedding/{kernel [p, p, 3, D], bias [D]}             conv patch embedding (HWIO)
    img/pos_embedding [1, N, D]                                learned, N = (image_size // p) ** 2
    img/Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}
                                    /MultiHeadDotProductAttention_0/{query,key,value}/kernel [D, H, Dh]
                                                                   /{query,key,value}/bias [H, Dh]
                                                                   /out/kernel [H, Dh, D], out/bias [D]
                                    /LayerNorm_1, /MlpBlock_0/Dense_0 [D, M], /MlpBlock_0/Dense_1 [M, D]
    img/Transformer/encoder_norm/{scale,bias}
    img/MAPHead_0/{probe [1, 1, D], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
    txt/Embed_0/embedding [V, Dt]
    txt/pos_embedding [1, L, Dt]
    txt/Encoder_0/encoderblock_{i}/...   txt/Encoder_0/encoder_norm   (same block layout as img)
    txt/head/{kernel [Dt, E], bias [E]}
    t [1]   log temperature (HF ``logit_scale``)
    b [1]   logit bias      (HF ``logit_bias``)

With ``scan=True`` the blocks are one ``encoderblock`` module whose leaves carry a leading
``[depth]`` axis (big_vision's scanned layout). Every leaf carries logical axis names
(``nn.with_logical_partitioning``), which do not change the tree paths.

Hidden-state numbering follows Hugging Face exactly, so an index means the same thing on both
sides (LLaVA's ``vision_feature_layer``)::

    hidden_states[0]      patch embedding + position embedding (input of encoderblock_0)
    hidden_states[i]      output of encoderblock_{i-1}, i = 1..depth (before encoder_norm)
    hidden_states[-1]     output of the last block (before encoder_norm)
    hidden_states[-2]     output of the penultimate block, encoderblock_{depth-2}: what LLaVA's
                          ``vision_feature_layer=-2`` selects, SEA's default adapter input
    encoded               encoder_norm(hidden_states[-1])  (HF ``last_hidden_state``)

(big_vision's ``out["encoder"]["block{k:02d}"]`` is ``hidden_states[k + 1]``; for So400m,
depth 27, there are 28 hidden states and ``hidden_states[-2] == hidden_states[26]``.)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sea_jax import sharding
from sea_jax.models import attention, stack

Array = jax.Array

PATCH_FEATURES = ("map", "encoded")

# big_vision's vit.decode_variant (Table 2 of arXiv:2106.04560 plus So400m of arXiv:2305.13035):
# (width, depth, mlp_dim, num_heads). SigLIP uses the same variant for both towers.
_VARIANTS = {
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
}


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    """Architecture of both towers plus numerics. Defaults are SigLIP B/16 at 224 px.

    The joint image-text space has dimension ``width``: the image embedding is the MAP head's
    output (SigLIP has no image projection) and the text head projects to ``out_dim``, which must
    therefore equal ``width``.
    """

    # image tower
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    # text tower
    vocab_size: int = 32_000
    text_len: int = 64
    text_width: int = 768
    text_depth: int = 12
    text_mlp_dim: int = 3072
    text_num_heads: int = 12
    out_dim: int = 768
    # shared
    layer_norm_eps: float = 1e-6
    temperature_init: float = 10.0  # t = log(temperature_init), big_vision's SigLIP init
    bias_init: float = -10.0
    # numerics / memory
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan: bool = False  # big_vision's scanned layout (encoderblock stacked on a leading axis)
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a name in jax.checkpoint_policies
    # per-patch joint-space features: "map" (each patch alone through the MAP head) or "encoded"
    patch_features: str = "map"

    def __post_init__(self):
        if self.out_dim != self.width:
            raise ValueError(
                f"out_dim ({self.out_dim}) must equal the image width ({self.width}): SigLIP's joint "
                "space is the MAP head's output, there is no image projection"
            )
        for w, h, tower in ((self.width, self.num_heads, "image"), (self.text_width, self.text_num_heads, "text")):
            if w % h:
                raise ValueError(f"{tower} width {w} is not divisible by its {h} heads")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.patch_features not in PATCH_FEATURES:
            raise ValueError(f"patch_features must be one of {PATCH_FEATURES}, got {self.patch_features!r}")
        if not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"remat_policy {self.remat_policy!r} is not in jax.checkpoint_policies")

    @property
    def grid(self) -> int:
        """Patches per side; a VALID conv drops the remainder (So400m/14 at 384 px: 27)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the hidden states: none (SigLIP has no CLS token)."""
        return 0

    def replace(self, **kw) -> "SigLIPConfig":
        return dataclasses.replace(self, **kw)


def siglip_config(variant: str, image_size: int | None = None, **overrides) -> SigLIPConfig:
    """A named SigLIP variant, e.g. ``siglip_config("So400m/14", image_size=384)``.

    ``variant`` is ``"<B|L|So400m>/<patch>"``; both towers use that size, as the released SigLIP
    checkpoints do (vocabulary 32k, 64 text tokens). ``image_size`` defaults to 224; the released
    checkpoints exist at 224, 256 and 384 px (and B/16 at 512). ``overrides`` set any other field.
    """
    name, _, patch = variant.partition("/")
    if name not in _VARIANTS or not patch.isdigit():
        raise ValueError(f"unknown SigLIP variant {variant!r}; expected one of {[f'{k}/<patch>' for k in _VARIANTS]}")
    width, depth, mlp, heads = _VARIANTS[name]
    kw: dict[str, Any] = dict(
        image_size=224 if image_size is None else int(image_size),
        patch_size=int(patch),
        width=width,
        depth=depth,
        mlp_dim=mlp,
        num_heads=heads,
        text_width=width,
        text_depth=depth,
        text_mlp_dim=mlp,
        text_num_heads=heads,
        out_dim=width,
    )
    kw.update(overrides)
    return SigLIPConfig(**kw)


# ----------------------------------------------------------------------------------------------
# Outputs


class ImageEncoding(NamedTuple):
    """What the image tower gives (b images, n = grid**2 patches, D = width).

    Attributes:
      pooled: [b, D] MAP head output, the image embedding in the joint space, *not* normalized
        (HF ``pooler_output`` / ``SiglipModel.get_image_features``).
      patch_embeds: [b, n, D] per-patch features in the joint space, not normalized: each
        final-layer patch token alone through the MAP head ("map"), or ``encoded`` ("encoded").
      encoded: [b, n, D] encoder output after ``encoder_norm`` (HF ``last_hidden_state``).
      hidden_states: ``depth + 1`` arrays [b, n, D] numbered as in HF (see module docstring):
        [0] is the embedding, [i] the output of ``encoderblock_{i-1}``; None if not requested.
    """

    pooled: Array
    patch_embeds: Array
    encoded: Array
    hidden_states: tuple[Array, ...] | None


class TextEncoding(NamedTuple):
    """What the text tower gives (b texts of l tokens).

    Attributes:
      embedding: [b, out_dim] text embedding in the joint space, not normalized (HF
        ``get_text_features``): ``head(encoded[:, -1])``.
      encoded: [b, l, Dt] encoder output after ``encoder_norm``.
      hidden_states: ``text_depth + 1`` arrays [b, l, Dt], numbered as for the image tower.
    """

    embedding: Array
    encoded: Array
    hidden_states: tuple[Array, ...] | None


class SigLIPOutput(NamedTuple):
    """Both towers and the pairwise logits ``cos(img_i, txt_j) * exp(t) + b`` [b_img, b_txt]
    (HF ``logits_per_image``)."""

    image: ImageEncoding
    text: TextEncoding
    logits: Array


# ----------------------------------------------------------------------------------------------
# Building blocks


def _p(init, names):
    return nn.with_logical_partitioning(init, names)


class MlpBlock(nn.Module):
    """Dense -> GELU (tanh approximation, = HF ``gelu_pytorch_tanh``) -> Dense. [..., l, D] -> same."""

    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bias_init = nn.initializers.normal(stddev=1e-6)
        x = nn.Dense(
            self.mlp_dim,
            kernel_init=_p(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=_p(bias_init, ("mlp",)),
            name="Dense_0",
            **kw,
        )(x)
        x = sharding.constrain(x, ("batch", "length", "act_mlp"))
        x = nn.gelu(x, approximate=True)
        x = nn.Dense(
            d,
            kernel_init=_p(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=_p(bias_init, ("embed",)),
            name="Dense_1",
            **kw,
        )(x)
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class Attention(nn.Module):
    """Multi-head dot-product attention with flax ``MultiHeadDotProductAttention``'s parameter
    names and shapes (query/key/value kernels [D, H, Dh], out kernel [H, Dh, D]).

    Written out rather than using flax's module so every weight carries logical axis names, the
    softmax runs in float32 whatever the compute dtype, and the MAP head can reuse the value and
    output projections alone (:meth:`value_out`).
    """

    width: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        hd = self.width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        xavier = nn.initializers.xavier_uniform()

        def proj():
            return nn.DenseGeneral(
                (self.num_heads, hd),
                axis=-1,
                kernel_init=_p(xavier, ("embed", "heads", "head_dim")),
                bias_init=_p(nn.initializers.zeros, ("heads", "head_dim")),
                **kw,
            )

        self.query, self.key, self.value = proj(), proj(), proj()
        self.out = nn.DenseGeneral(
            self.width,
            axis=(-2, -1),
            kernel_init=_p(xavier, ("heads", "head_dim", "embed")),
            bias_init=_p(nn.initializers.zeros, ("embed",)),
            **kw,
        )

    def __call__(self, xq: Array, xkv: Array) -> Array:
        """xq [b, q, D] attends to xkv [b, k, D]; returns [b, q, D]. No mask (SigLIP uses none)."""
        heads = ("batch", "length", "act_heads", None)
        q = sharding.constrain(self.query(xq), heads)
        k = sharding.constrain(self.key(xkv), heads)
        v = sharding.constrain(self.value(xkv), heads)
        q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        logits = attention.scores(q, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = attention.mix(w, v)
        o = sharding.constrain(o, heads)
        return sharding.constrain(self.out(o), ("batch", "length", "act_embed"))

    def value_out(self, x: Array) -> Array:
        """Attention of each token over itself alone: the softmax over one key is 1, so the result
        is ``out(value(x))`` for every token independently. [b, n, D] -> [b, n, D]."""
        v = sharding.constrain(self.value(x), ("batch", "length", "act_heads", None))
        return sharding.constrain(self.out(v), ("batch", "length", "act_embed"))


def _posemb_init(d: int):
    return _p(nn.initializers.normal(stddev=1 / math.sqrt(d)), (None, None, "embed"))


def _layer_norm(eps, dtype, param_dtype, name):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_p(nn.initializers.ones, ("norm",)),
        bias_init=_p(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then + MLP(LN(.)). [b, l, D] -> ([b, l, D], y).

    Returns ``(x, x)`` when ``collect`` else ``(x, None)``: the second value is the per-layer
    output that ``nn.scan`` stacks into hidden states.
    """

    width: int
    mlp_dim: int
    num_heads: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    collect: bool = True

    @nn.compact
    def __call__(self, x: Array):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        y = _layer_norm(self.eps, name="LayerNorm_0", **kw)(x)
        y = Attention(self.width, self.num_heads, name="MultiHeadDotProductAttention_0", **kw)(y, y)
        x = x + y
        y = _layer_norm(self.eps, name="LayerNorm_1", **kw)(x)
        y = MlpBlock(self.mlp_dim, name="MlpBlock_0", **kw)(y)
        x = sharding.constrain(x + y, ("batch", "length", "act_embed"))
        return x, (x if self.collect else None)


class Encoder(nn.Module):
    """``depth`` blocks then ``encoder_norm``. x [b, l, D] -> (normed [b, l, D], hidden_states).

    hidden_states: ``depth + 1`` arrays (input, then each block's output), HF numbering; None
    unless ``collect``.
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    collect: bool = True
    keep: int | None = None  # with collect=False: only this hidden state (stack.run_blocks)

    @nn.compact
    def __call__(self, x: Array):
        kw = dict(
            width=self.width,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            eps=self.eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            collect=self.collect,
        )
        x, hidden = stack.run_blocks(Encoder1DBlock, kw, x, depth=self.depth, name="encoderblock", scan=self.scan,
                                     remat=self.remat, remat_policy=self.remat_policy, collect=self.collect,
                                     keep=self.keep)
        x = _layer_norm(self.eps, self.dtype, self.param_dtype, "encoder_norm")(x)
        return x, hidden


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then LN + MLP residual.

    Returns ``(pooled [b, D], per_token [b, n, D] or None)``. ``per_token`` passes each token
    *alone* through the same head: attention over a single key/value is ``out(value(x_i))``,
    followed by the same LayerNorm + MLP residual. So when all n tokens are equal, per_token[:, i]
    equals pooled (the softmax-weighted mean of equal values is that value).
    """

    width: int
    mlp_dim: int
    num_heads: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, per_token: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, _, d = x.shape
        probe_init = _p(nn.initializers.xavier_uniform(), (None, None, "embed"))
        probe = self.param("probe", probe_init, (1, 1, d), self.param_dtype)
        attn = Attention(self.width, self.num_heads, name="MultiHeadDotProductAttention_0", **kw)
        ln = _layer_norm(self.eps, name="LayerNorm_0", **kw)
        mlp = MlpBlock(self.mlp_dim, name="MlpBlock_0", **kw)

        y = attn(jnp.tile(probe.astype(x.dtype), (b, 1, 1)), x)
        pooled = (y + mlp(ln(y)))[:, 0]
        tokens = None
        if per_token:
            y = attn.value_out(x)
            tokens = y + mlp(ln(y))
        return pooled, tokens


# ----------------------------------------------------------------------------------------------
# Towers


class ImageTower(nn.Module):
    """big_vision ``vit`` with ``pool_type="map"`` and no classifier head (as in SigLIP)."""

    cfg: SigLIPConfig

    @nn.compact
    def __call__(
        self, images: Array, *, patch_features: str | None = None, hidden_states: bool = True,
        keep_hidden: int | None = None,
    ) -> ImageEncoding:
        """``keep_hidden``: with ``hidden_states=False``, only that hidden state (an index, HF
        numbering) is computed into ``hidden_states``, the other entries None: the step reads one
        layer, and the stack of all of them is not built."""
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        mode = cfg.patch_features if patch_features is None else patch_features
        if mode not in PATCH_FEATURES:
            raise ValueError(f"patch_features must be one of {PATCH_FEATURES}, got {mode!r}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [b, h, w, 3] (NHWC, values in [-1, 1]), got {images.shape}")
        p = cfg.patch_size
        if images.shape[1] // p != cfg.grid or images.shape[2] // p != cfg.grid:
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} px give a {images.shape[1] // p}x"
                f"{images.shape[2] // p} patch grid; the model expects {cfg.grid}x{cfg.grid} "
                f"(image_size {cfg.image_size}); resize the images or load the checkpoint with a "
                "config of this image_size (position embeddings are resampled on load)"
            )
        x = nn.Conv(
            cfg.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=_p(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=_p(nn.initializers.zeros, ("embed",)),
            dtype=dtype,
            param_dtype=pdtype,
            name="embedding",
        )(images.astype(dtype))
        b, h, w, d = x.shape
        x = jnp.reshape(x, (b, h * w, d))
        pos = self.param("pos_embedding", _posemb_init(d), (1, h * w, d), pdtype)
        x = sharding.constrain(x + pos.astype(dtype), ("batch", "length", "act_embed"))

        encoded, hidden = Encoder(
            width=cfg.width,
            depth=cfg.depth,
            mlp_dim=cfg.mlp_dim,
            num_heads=cfg.num_heads,
            eps=cfg.layer_norm_eps,
            dtype=dtype,
            param_dtype=pdtype,
            scan=cfg.scan,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            collect=hidden_states,
            keep=keep_hidden,
            name="Transformer",
        )(x)
        pooled, per_token = MAPHead(
            width=cfg.width,
            mlp_dim=cfg.mlp_dim,
            num_heads=cfg.num_heads,
            eps=cfg.layer_norm_eps,
            dtype=dtype,
            param_dtype=pdtype,
            name="MAPHead_0",
        )(encoded, per_token=(mode == "map"))
        patch = per_token if mode == "map" else encoded
        return ImageEncoding(pooled=pooled, patch_embeds=patch, encoded=encoded, hidden_states=hidden)


class TextTower(nn.Module):
    """big_vision ``text_transformer`` with ``pool_type="last"`` and a ``head`` Dense."""

    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, ids: Array, *, hidden_states: bool = True) -> TextEncoding:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [b, l], got {ids.shape}")
        l = ids.shape[1]
        if l > cfg.text_len:
            raise ValueError(f"{l} tokens exceed the text tower's {cfg.text_len} positions")
        d = cfg.text_width
        x = nn.Embed(
            cfg.vocab_size,
            d,
            embedding_init=_p(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            dtype=dtype,
            param_dtype=pdtype,
            name="Embed_0",
        )(ids)
        pos = self.param("pos_embedding", _posemb_init(d), (1, cfg.text_len, d), pdtype)
        # Shorter inputs use the first l positions (as HF does). SigLIP was trained on texts padded
        # to text_len and pools the *last* position, so pad to text_len for its embeddings.
        x = sharding.constrain(x + pos[:, :l].astype(dtype), ("batch", "length", "act_embed"))
        encoded, hidden = Encoder(
            width=d,
            depth=cfg.text_depth,
            mlp_dim=cfg.text_mlp_dim,
            num_heads=cfg.text_num_heads,
            eps=cfg.layer_norm_eps,
            dtype=dtype,
            param_dtype=pdtype,
            scan=cfg.scan,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            collect=hidden_states,
            name="Encoder_0",
        )(x)
        z = nn.Dense(
            cfg.out_dim,
            kernel_init=_p(nn.initializers.lecun_normal(), ("embed", None)),
            bias_init=_p(nn.initializers.zeros, (None,)),
            dtype=dtype,
            param_dtype=pdtype,
            name="head",
        )(encoded[:, -1])
        return TextEncoding(embedding=z, encoded=encoded, hidden_states=hidden)


class SigLIP(nn.Module):
    """The two-tower model: ``img``, ``txt``, ``t`` (log temperature) and ``b`` (bias).

    Entry points (``params`` = the tree above)::

        SigLIP(cfg).apply({"params": params}, images, method="encode_image")   -> ImageEncoding
        SigLIP(cfg).apply({"params": params}, ids, method="encode_text")       -> TextEncoding
        SigLIP(cfg).apply({"params": params}, images, ids)                     -> SigLIPOutput

    images: float [b, h, w, 3] already normalized to [-1, 1]; ids: int [b, l], l <= text_len.
    """

    cfg: SigLIPConfig

    def setup(self):
        self.img = ImageTower(self.cfg)
        self.txt = TextTower(self.cfg)
        t0 = math.log(self.cfg.temperature_init)
        b0 = self.cfg.bias_init
        self.t = self.param("t", _p(lambda k, s, d: jnp.full(s, t0, d), (None,)), (1,), jnp.float32)
        self.b = self.param("b", _p(lambda k, s, d: jnp.full(s, b0, d), (None,)), (1,), jnp.float32)

    def encode_image(
        self, images: Array, patch_features: str | None = None, hidden_states: bool = True
    ) -> ImageEncoding:
        """images [b, h, w, 3] in [-1, 1] -> :class:`ImageEncoding`.

        patch_features: "map" or "encoded" (default: ``cfg.patch_features``). hidden_states=False
        skips collecting the per-block outputs (``ImageEncoding.hidden_states`` is then None).
        """
        return self.img(images, patch_features=patch_features, hidden_states=hidden_states)

    def encode_text(self, ids: Array, hidden_states: bool = False) -> TextEncoding:
        """ids [b, l] -> :class:`TextEncoding`; ``.embedding`` [b, out_dim] is the text embedding."""
        return self.txt(ids, hidden_states=hidden_states)

    def __call__(self, images: Array, ids: Array) -> SigLIPOutput:
        image = self.encode_image(images)
        text = self.encode_text(ids, hidden_states=True)
        zi = l2_normalize(image.pooled.astype(jnp.float32))
        zt = l2_normalize(text.embedding.astype(jnp.float32))
        logits = zi @ zt.T * jnp.exp(self.t) + self.b
        return SigLIPOutput(image=image, text=text, logits=logits)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / ||x|| along ``axis`` (eps keeps an all-zero vector finite)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


# ----------------------------------------------------------------------------------------------
# Parameters: init, abstract shapes, shardings


def dummy_inputs(cfg: SigLIPConfig, batch: int = 1) -> tuple[Array, Array]:
    """Smallest inputs that build every parameter: images [batch, S, S, 3], ids [batch, text_len]."""
    return (
        jnp.zeros((batch, cfg.image_size, cfg.image_size, 3), jnp.float32),
        jnp.zeros((batch, cfg.text_len), jnp.int32),
    )


@functools.lru_cache(maxsize=16)
def _abstract_params(cfg: SigLIPConfig):
    return jax.eval_shape(lambda: SigLIP(cfg).init(jax.random.key(0), *dummy_inputs(cfg))["params"])


def abstract_params(cfg: SigLIPConfig):
    """Shape/dtype tree of the parameters, still boxed with logical names (``jax.eval_shape``).

    Tracing a 27-layer tower takes seconds and loaders ask for it repeatedly, so the trace is
    cached per config; each call returns a fresh tree (callers may mutate it).
    """
    return jax.tree.map(lambda x: x, _abstract_params(cfg))


def param_shardings(cfg: SigLIPConfig, mesh, rules=sharding.DEFAULT_RULES):
    """Unboxed tree of ``NamedSharding`` for every parameter on ``mesh``."""
    return sharding.tree_shardings(abstract_params(cfg), mesh, rules)


def init_params(cfg: SigLIPConfig, key: Array, mesh=None, rules=sharding.DEFAULT_RULES):
    """Random parameters (unboxed), created directly with their sharding when ``mesh`` is given."""

    def init():
        return nn.unbox(SigLIP(cfg).init(key, *dummy_inputs(cfg))["params"])

    if mesh is None:
        return jax.jit(init)()
    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, rules))()


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling


def resample_posemb(posemb: np.ndarray, new_grid: int | Sequence[int]) -> np.ndarray:
    """Resamples a learned position embedding [1, g*g, D] to [1, gh*gw, D] (big_vision's
    "high-res finetuning": linear interpolation with the corner patches aligned, i.e.
    ``scipy.ndimage.zoom(grid, zoom, order=1)``). Computed on the host in float64.

    HF instead interpolates bicubically at run time (``interpolate_pos_encoding=True``); this
    resamples once, at load, the way big_vision does.
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"position embedding must be [1, N, D], got {posemb.shape}")
    n, d = posemb.shape[1], posemb.shape[2]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position embedding of {n} positions is not a square grid")
    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    if (gh, gw) == (g, g):
        return posemb
    grid = posemb.reshape(g, g, d).astype(np.float64)

    def interp(x: np.ndarray, axis: int, new: int) -> np.ndarray:
        old = x.shape[axis]
        # Output sample i sits at input coordinate i * (old - 1) / (new - 1): corners aligned.
        c = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
        lo = np.clip(np.floor(c).astype(int), 0, old - 1)
        hi = np.minimum(lo + 1, old - 1)
        frac = (c - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac

    grid = interp(interp(grid, 0, gh), 1, gw)
    return grid.reshape(1, gh * gw, d).astype(posemb.dtype)
