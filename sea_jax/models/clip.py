"""CLIP image and text towers in Flax (OpenAI CLIP as Hugging Face ``CLIPModel`` computes it).

The image tower is the vision encoder / patch labeller of the paper's CLIP rows (ViT-L/14 at
336 px as in LLaVA-1.5, and at 1008 px through the S2 wrapper, :mod:`sea_jax.models.s2`); the
text tower embeds the label words. Outputs are SigLIP's :class:`~sea_jax.models.siglip.ImageEncoding`
and :class:`~sea_jax.models.siglip.TextEncoding`, so code written for one tower reads the other.

Parameter tree (names mirror HF's modules, so the converter is a plain renaming; shapes for
width D, text width Dt, joint dimension E, H heads of Dh, MLP width M, n = grid**2 patches)::

    img/embeddings/class_embedding [D]
    img/embeddings/patch_embedding/kernel [p, p, 3, D]      conv, HWIO, no bias (as in CLIP)
    img/embeddings/position_embedding [1 + n, D]            row 0 is the CLS position
    img/pre_layrnorm/{scale,bias} [D]                       (sic: HF's spelling)
    img/encoder/layers_{i}/layer_norm1/{scale,bias}
                          /self_attn/{q_proj,k_proj,v_proj}/kernel [D, H, Dh], bias [H, Dh]
                          /self_attn/out_proj/kernel [H, Dh, D], bias [D]
                          /layer_norm2/{scale,bias}
                          /mlp/fc1/{kernel [D, M], bias}, mlp/fc2/{kernel [M, D], bias}
    img/post_layernorm/{scale,bias} [D]
    img/visual_projection/kernel [D, E]                     no bias
    txt/embeddings/token_embedding/embedding [V, Dt]
    txt/embeddings/position_embedding [L, Dt]
    txt/encoder/layers_{i}/...                              (same block layout)
    txt/final_layer_norm/{scale,bias} [Dt]
    txt/text_projection/kernel [Dt, E]                      no bias
    t []                                                    log temperature (HF ``logit_scale``)

The top-level keys (``img``, ``txt``, ``t``) are SigLIP's, so code that takes ``params["img"]``
for the image tower works with either family. With ``scan=True`` the blocks of a tower are one
``encoder/layers`` module whose leaves carry a leading ``[depth]`` axis. Every leaf carries logical
axis names from the same vocabulary as SigLIP's (``embed``, ``heads``, ``head_dim``, ``mlp``,
``vocab``, ``norm``, ``layers``), so :data:`sea_jax.sharding.DEFAULT_RULES` shard both alike.

Hidden states follow HF ``CLIPVisionModel(output_hidden_states=True)`` exactly (checked against
transformers 5.23), and every one keeps the CLS token at sequence position 0 (``1 + n`` tokens)::

    hidden_states[0]     pre_layrnorm(patch embedding + position embedding, CLS prepended)
    hidden_states[i]     output of encoder layer i-1, i = 1..depth (no post_layernorm)
    hidden_states[-1]    output of the last layer = HF ``last_hidden_state`` (CLIP's vision
                         model does *not* normalize it; only the pooled CLS goes through
                         post_layernorm)
    hidden_states[-2]    LLaVA-1.5's ``mm_vision_select_layer=-2``; LLaVA then drops the CLS
                         (``select_feature="patch"``): ``hidden_states[-2][:, num_prefix_tokens:]``,
                         24 x 24 = 576 tokens for L/14 at 336 px

The text tower numbers its hidden states the same way (``[0]`` = token + position embedding, no
pre-norm in the text tower), all before ``final_layer_norm``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sea_jax import sharding
from sea_jax.models import attention, stack
from sea_jax.models.siglip import ImageEncoding, TextEncoding, l2_normalize

Array = jax.Array

PATCH_FEATURES = ("proj", "encoded")
ACTIVATIONS = ("quick_gelu", "gelu")

# OpenAI CLIP's pixel normalization (CLIPImageProcessor's image_mean / image_std): the towers
# expect (x / 255 - IMAGE_MEAN) / IMAGE_STD, not SigLIP's [-1, 1].
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# HF's legacy eos_token_id: checkpoints converted before transformers PR #24773 say 2 and pool the
# position of the largest token id (OpenAI's EOT, 49407, is the last id of the vocabulary).
LEGACY_EOS_TOKEN_ID = 2

# (width, depth, mlp_dim, heads) of the image tower, (width, depth, mlp_dim, heads) of the text
# tower, projection_dim: OpenAI's released models (Radford et al. 2021, Table 19/20).
_VARIANTS = {
    "B": ((768, 12, 3072, 12), (512, 12, 2048, 8), 512),
    "L": ((1024, 24, 4096, 16), (768, 12, 3072, 12), 768),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of both towers plus numerics. Defaults are OpenAI CLIP ViT-B/16 at 224 px.

    Field names are SigLIPConfig's where they mean the same thing; ``out_dim`` is HF's
    ``projection_dim`` (the joint image-text space), which need not equal either width.

    Attributes beyond SigLIP's:
      activation: MLP activation, "quick_gelu" (OpenAI CLIP, ``x * sigmoid(1.702 x)``) or "gelu"
        (exact erf GELU, e.g. LAION/open_clip conversions).
      eos_token_id: the text tower pools the first position holding this id; the legacy value 2
        instead pools the position of the largest id (HF ``CLIPTextModel``'s two rules).
      logit_scale_init: initial ``t`` = log(1 / 0.07), CLIP's init (HF ``logit_scale_init_value``).
      patch_features: per-patch image features in ``ImageEncoding.patch_embeds``: "proj" = each
        final-layer patch token through post_layernorm and visual_projection ([b, n, out_dim],
        in the joint space, comparable with text embeddings), or "encoded" = post_layernorm
        output without the projection ([b, n, width]; *not* in the joint space, and of a different
        size than text embeddings unless width == out_dim).
    """

    # image tower
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    # text tower
    vocab_size: int = 49_408
    text_len: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_mlp_dim: int = 2048
    text_num_heads: int = 8
    eos_token_id: int = 49_407
    # joint space
    out_dim: int = 512
    logit_scale_init: float = 2.6592
    # shared
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    # numerics / memory
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan: bool = False  # blocks stacked on a leading axis and run with nn.scan
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a name in jax.checkpoint_policies
    patch_features: str = "proj"

    def __post_init__(self):
        for w, h, tower in ((self.width, self.num_heads, "image"), (self.text_width, self.text_num_heads, "text")):
            if w % h:
                raise ValueError(f"{tower} width {w} is not divisible by its {h} heads")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.patch_features not in PATCH_FEATURES:
            raise ValueError(f"patch_features must be one of {PATCH_FEATURES}, got {self.patch_features!r}")
        if not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"remat_policy {self.remat_policy!r} is not in jax.checkpoint_policies")

    @property
    def grid(self) -> int:
        """Patches per side (a VALID conv drops the remainder)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image, grid**2 (the CLS token not counted)."""
        return self.grid**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in every hidden state: CLIP's CLS token."""
        return 1

    def replace(self, **kw) -> CLIPConfig:
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **kw)


def clip_config(variant: str, image_size: int | None = None, **overrides) -> CLIPConfig:
    """A named OpenAI CLIP, e.g. ``clip_config("L/14", image_size=336)`` (LLaVA-1.5's tower).

    ``variant`` is ``"<B|L>/<patch>"``: "B/16", "B/32" (image tower ViT-B, text 512 wide,
    projection 512) or "L/14" (image tower ViT-L, text 768/12 layers/12 heads, projection 768).
    ``image_size`` defaults to 224; OpenAI released L/14 also at 336 px. ``overrides`` set any
    other field (``scan``, ``dtype``, ...).
    """
    name, _, patch = variant.partition("/")
    if name not in _VARIANTS or not patch.isdigit():
        raise ValueError(f"unknown CLIP variant {variant!r}; expected one of {[f'{k}/<patch>' for k in _VARIANTS]}")
    (w, d, m, h), (tw, td, tm, th), proj = _VARIANTS[name]
    kw: dict[str, Any] = dict(
        image_size=224 if image_size is None else int(image_size),
        patch_size=int(patch),
        width=w,
        depth=d,
        mlp_dim=m,
        num_heads=h,
        text_width=tw,
        text_depth=td,
        text_mlp_dim=tm,
        text_num_heads=th,
        out_dim=proj,
    )
    kw.update(overrides)
    return CLIPConfig(**kw)


class CLIPOutput(NamedTuple):
    """Both towers and the pairwise logits ``cos(img_i, txt_j) * exp(t)`` [b_img, b_txt]
    (HF ``logits_per_image``; CLIP has no logit bias)."""

    image: ImageEncoding
    text: TextEncoding
    logits: Array


# ----------------------------------------------------------------------------------------------
# Building blocks


def _p(init, names):
    return nn.with_logical_partitioning(init, names)


def _activation(name: str, x: Array) -> Array:
    if name == "quick_gelu":
        # OpenAI's sigmoid approximation of GELU; the checkpoints were trained with it, so the
        # exact GELU would shift every activation.
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)


def _layer_norm(eps, dtype, param_dtype, name):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_p(nn.initializers.ones, ("norm",)),
        bias_init=_p(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (HF ``CLIPMLP``). [b, l, D] -> [b, l, D]."""

    mlp_dim: int
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(stddev=0.02)
        x = nn.Dense(
            self.mlp_dim,
            kernel_init=_p(init, ("embed", "mlp")),
            bias_init=_p(nn.initializers.zeros, ("mlp",)),
            name="fc1",
            **kw,
        )(x)
        x = sharding.constrain(x, ("batch", "length", "act_mlp"))
        x = _activation(self.activation, x)
        x = nn.Dense(
            d,
            kernel_init=_p(init, ("mlp", "embed")),
            bias_init=_p(nn.initializers.zeros, ("embed",)),
            name="fc2",
            **kw,
        )(x)
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class SelfAttention(nn.Module):
    """Multi-head self-attention with HF ``CLIPAttention``'s projections, split per head
    (q/k/v kernels [D, H, Dh], out kernel [H, Dh, D]) so tensor parallelism shards heads.

    ``causal`` masks future positions (the text tower). The softmax runs in float32 whatever the
    compute dtype. [b, l, D] -> [b, l, D].
    """

    width: int
    num_heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hd = self.width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(stddev=0.02)

        def proj(name):
            return nn.DenseGeneral(
                (self.num_heads, hd),
                axis=-1,
                kernel_init=_p(init, ("embed", "heads", "head_dim")),
                bias_init=_p(nn.initializers.zeros, ("heads", "head_dim")),
                name=name,
                **kw,
            )

        heads = ("batch", "length", "act_heads", None)
        q = sharding.constrain(proj("q_proj")(x), heads)
        k = sharding.constrain(proj("k_proj")(x), heads)
        v = sharding.constrain(proj("v_proj")(x), heads)
        logits = attention.scores(q, k, preferred_element_type=jnp.float32) * (hd**-0.5)
        if self.causal:
            l = x.shape[1]
            mask = jnp.tril(jnp.ones((l, l), bool))
            # The diagonal is always visible, so no row is fully masked and finfo.min is safe.
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = sharding.constrain(attention.mix(w, v), heads)
        out = nn.DenseGeneral(
            self.width,
            axis=(-2, -1),
            kernel_init=_p(init, ("heads", "head_dim", "embed")),
            bias_init=_p(nn.initializers.zeros, ("embed",)),
            name="out_proj",
            **kw,
        )(o)
        return sharding.constrain(out, ("batch", "length", "act_embed"))


class EncoderLayer(nn.Module):
    """Pre-LN block (HF ``CLIPEncoderLayer``): x + attn(LN1(x)), then + MLP(LN2(.)).

    [b, l, D] -> ([b, l, D], y) with y the block output when ``collect`` else None: the second
    value is what ``nn.scan`` stacks into hidden states.
    """

    width: int
    mlp_dim: int
    num_heads: int
    eps: float = 1e-5
    activation: str = "quick_gelu"
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    collect: bool = True

    @nn.compact
    def __call__(self, x: Array):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        y = _layer_norm(self.eps, name="layer_norm1", **kw)(x)
        x = x + SelfAttention(self.width, self.num_heads, self.causal, name="self_attn", **kw)(y)
        y = _layer_norm(self.eps, name="layer_norm2", **kw)(x)
        x = x + MLP(self.mlp_dim, self.activation, name="mlp", **kw)(y)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        return x, (x if self.collect else None)


class Encoder(nn.Module):
    """``depth`` layers, no final norm (the two towers normalize differently).

    x [b, l, D] -> (last layer output [b, l, D], hidden_states): ``depth + 1`` arrays (the input,
    then each layer's output), HF numbering; None unless ``collect``.
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    eps: float = 1e-5
    activation: str = "quick_gelu"
    causal: bool = False
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
            activation=self.activation,
            causal=self.causal,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            collect=self.collect,
        )
        x, hidden = stack.run_blocks(EncoderLayer, kw, x, depth=self.depth, name="layers", scan=self.scan,
                                     remat=self.remat, remat_policy=self.remat_policy, collect=self.collect,
                                     keep=self.keep)
        return x, hidden


class VisionEmbeddings(nn.Module):
    """CLS + patch embedding + learned positions (HF ``CLIPVisionEmbeddings``).

    images [b, S, S, 3] -> [b, 1 + n, D], the CLS token first.
    """

    cfg: CLIPConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, p = cfg.width, cfg.patch_size
        x = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            kernel_init=_p(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            dtype=dtype,
            param_dtype=pdtype,
            name="patch_embedding",
        )(images.astype(dtype))
        b, h, w, _ = x.shape
        x = jnp.reshape(x, (b, h * w, d))
        cls = self.param("class_embedding", _p(nn.initializers.normal(d**-0.5), ("embed",)), (d,), pdtype)
        pos = self.param(
            "position_embedding", _p(nn.initializers.normal(0.02), (None, "embed")), (h * w + 1, d), pdtype
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
        return sharding.constrain(x + pos.astype(dtype)[None], ("batch", "length", "act_embed"))


class TextEmbeddings(nn.Module):
    """Token + learned position embedding (HF ``CLIPTextEmbeddings``). ids [b, l] -> [b, l, Dt]."""

    cfg: CLIPConfig

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d = cfg.text_width
        x = nn.Embed(
            cfg.vocab_size,
            d,
            embedding_init=_p(nn.initializers.normal(0.02), ("vocab", "embed")),
            dtype=dtype,
            param_dtype=pdtype,
            name="token_embedding",
        )(ids)
        pos = self.param(
            "position_embedding", _p(nn.initializers.normal(0.01), (None, "embed")), (cfg.text_len, d), pdtype
        )
        # Shorter inputs use the first l positions, as HF does.
        x = x + pos[: ids.shape[1]].astype(dtype)[None]
        return sharding.constrain(x, ("batch", "length", "act_embed"))


def _projection(out_dim: int, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(
        out_dim,
        use_bias=False,
        kernel_init=_p(nn.initializers.lecun_normal(), ("embed", None)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


# ----------------------------------------------------------------------------------------------
# Towers


class ImageTower(nn.Module):
    """HF ``CLIPVisionModel`` plus ``visual_projection``. Call with images [b, S, S, 3] (NHWC,
    normalized with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`) -> :class:`ImageEncoding` with

      pooled [b, out_dim]: visual_projection(post_layernorm(CLS of the last layer)), HF
        ``get_image_features`` (not normalized);
      patch_embeds [b, n, out_dim] ("proj"): every *patch* token (CLS excluded) of the last
        layer through post_layernorm and visual_projection, the per-patch counterpart of
        ``pooled`` used for labels; or [b, n, width] ("encoded"): the same without projection;
      encoded [b, 1 + n, width]: post_layernorm applied to every token of the last layer, CLS
        first (HF applies it to the CLS only; its ``last_hidden_state`` is ``hidden_states[-1]``);
      hidden_states: ``depth + 1`` arrays [b, 1 + n, width], HF numbering (module docstring),
        None when ``hidden_states=False``.
    """

    cfg: CLIPConfig

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
            raise ValueError(f"images must be [b, h, w, 3] (NHWC, CLIP-normalized), got {images.shape}")
        p = cfg.patch_size
        if images.shape[1] // p != cfg.grid or images.shape[2] // p != cfg.grid:
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} px give a {images.shape[1] // p}x"
                f"{images.shape[2] // p} patch grid; the model expects {cfg.grid}x{cfg.grid} "
                f"(image_size {cfg.image_size}); resize the images, or tile them (sea_jax.models.s2)"
            )
        x = VisionEmbeddings(cfg, name="embeddings")(images)
        x = _layer_norm(cfg.layer_norm_eps, dtype, pdtype, "pre_layrnorm")(x)
        last, hidden = Encoder(
            width=cfg.width,
            depth=cfg.depth,
            mlp_dim=cfg.mlp_dim,
            num_heads=cfg.num_heads,
            eps=cfg.layer_norm_eps,
            activation=cfg.activation,
            causal=False,
            dtype=dtype,
            param_dtype=pdtype,
            scan=cfg.scan,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            collect=hidden_states,
            keep=keep_hidden,
            name="encoder",
        )(x)
        # LayerNorm is per token, so normalizing the whole sequence once gives the CLS row HF
        # pools and the patch rows the labels need.
        encoded = _layer_norm(cfg.layer_norm_eps, dtype, pdtype, "post_layernorm")(last)
        encoded = sharding.constrain(encoded, ("batch", "length", "act_embed"))
        proj = _projection(cfg.out_dim, dtype, pdtype, "visual_projection")
        pooled = proj(encoded[:, 0])
        patches = encoded[:, cfg.num_prefix_tokens :]
        if mode == "proj":
            patches = proj(patches)
        return ImageEncoding(pooled=pooled, patch_embeds=patches, encoded=encoded, hidden_states=hidden)


def eos_positions(ids: Array, eos_token_id: int) -> Array:
    """Where HF ``CLIPTextModel`` pools: ids [b, l] -> int [b].

    ``eos_token_id == 2`` (configs older than transformers PR #24773): the position of the
    largest id, OpenAI's rule (its EOT token is the vocabulary's last id); the first one on ties.
    Otherwise the first position equal to ``eos_token_id`` (padding may repeat it), or 0 when a row
    has none (HF's argmax of an all-zero row).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTower(nn.Module):
    """HF ``CLIPTextModel`` plus ``text_projection``. Call with ids [b, l], l <= text_len ->
    :class:`TextEncoding` with

      embedding [b, out_dim]: text_projection of the final-normed token at :func:`eos_positions`
        (HF ``get_text_features``, not normalized);
      encoded [b, l, text_width]: final_layer_norm of the last layer (HF ``last_hidden_state``);
      hidden_states: ``text_depth + 1`` arrays [b, l, text_width], before final_layer_norm.

    There is no padding mask: the attention is causal, so with right padding (CLIP's tokenizer
    pads after the EOT) no token up to the pooled one sees a pad, and the embedding equals HF's
    with or without its ``attention_mask``.
    """

    cfg: CLIPConfig

    @nn.compact
    def __call__(self, ids: Array, *, hidden_states: bool = True) -> TextEncoding:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [b, l], got {ids.shape}")
        if ids.shape[1] > cfg.text_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed the text tower's {cfg.text_len} positions")
        x = TextEmbeddings(cfg, name="embeddings")(ids)
        last, hidden = Encoder(
            width=cfg.text_width,
            depth=cfg.text_depth,
            mlp_dim=cfg.text_mlp_dim,
            num_heads=cfg.text_num_heads,
            eps=cfg.layer_norm_eps,
            activation=cfg.activation,
            causal=True,
            dtype=dtype,
            param_dtype=pdtype,
            scan=cfg.scan,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            collect=hidden_states,
            name="encoder",
        )(x)
        encoded = _layer_norm(cfg.layer_norm_eps, dtype, pdtype, "final_layer_norm")(last)
        pos = eos_positions(ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(encoded, pos[:, None, None], axis=1)[:, 0]
        z = _projection(cfg.out_dim, dtype, pdtype, "text_projection")(pooled)
        return TextEncoding(embedding=z, encoded=encoded, hidden_states=hidden)


class CLIP(nn.Module):
    """The two-tower model: ``img``, ``txt`` and ``t`` (log temperature, HF ``logit_scale``).

    Entry points (``params`` = the tree in the module docstring)::

        CLIP(cfg).apply({"params": params}, images, method="encode_image")   -> ImageEncoding
        CLIP(cfg).apply({"params": params}, ids, method="encode_text")       -> TextEncoding
        CLIP(cfg).apply({"params": params}, images, ids)                     -> CLIPOutput
    """

    cfg: CLIPConfig

    def setup(self):
        self.img = ImageTower(self.cfg)
        self.txt = TextTower(self.cfg)
        t0 = float(self.cfg.logit_scale_init)
        self.t = self.param("t", _p(lambda k, s, d: jnp.full(s, t0, d), ()), (), jnp.float32)

    def encode_image(
        self, images: Array, patch_features: str | None = None, hidden_states: bool = True
    ) -> ImageEncoding:
        """images [b, S, S, 3] -> :class:`ImageEncoding` (see :class:`ImageTower`)."""
        return self.img(images, patch_features=patch_features, hidden_states=hidden_states)

    def encode_text(self, ids: Array, hidden_states: bool = False) -> TextEncoding:
        """ids [b, l] -> :class:`TextEncoding`; ``.embedding`` [b, out_dim] is the text embedding."""
        return self.txt(ids, hidden_states=hidden_states)

    def __call__(self, images: Array, ids: Array) -> CLIPOutput:
        image = self.encode_image(images)
        text = self.encode_text(ids, hidden_states=True)
        zi = l2_normalize(image.pooled.astype(jnp.float32))
        zt = l2_normalize(text.embedding.astype(jnp.float32))
        return CLIPOutput(image=image, text=text, logits=zi @ zt.T * jnp.exp(self.t))


# ----------------------------------------------------------------------------------------------
# Parameters: init, abstract shapes, shardings


def dummy_inputs(cfg: CLIPConfig, batch: int = 1) -> tuple[Array, Array]:
    """Smallest inputs that build every parameter: images [batch, S, S, 3], ids [batch, text_len]."""
    return (
        jnp.zeros((batch, cfg.image_size, cfg.image_size, 3), jnp.float32),
        jnp.zeros((batch, cfg.text_len), jnp.int32),
    )


@functools.lru_cache(maxsize=16)
def _abstract_params(cfg: CLIPConfig):
    return jax.eval_shape(lambda: CLIP(cfg).init(jax.random.key(0), *dummy_inputs(cfg))["params"])


def abstract_params(cfg: CLIPConfig):
    """Shape/dtype tree of the parameters, still boxed with logical names (``jax.eval_shape``).

    The trace is cached per config (a 24-layer tower takes seconds); each call returns a fresh
    tree, so callers may mutate it.
    """
    return jax.tree.map(lambda x: x, _abstract_params(cfg))


def param_shardings(cfg: CLIPConfig, mesh, rules=sharding.DEFAULT_RULES):
    """Unboxed tree of ``NamedSharding`` for every parameter on ``mesh``."""
    return sharding.tree_shardings(abstract_params(cfg), mesh, rules)


def init_params(cfg: CLIPConfig, key: Array, mesh=None, rules=sharding.DEFAULT_RULES):
    """Random parameters (unboxed), created directly with their sharding when ``mesh`` is given."""

    def init():
        return nn.unbox(CLIP(cfg).init(key, *dummy_inputs(cfg))["params"])

    if mesh is None:
        return jax.jit(init)()
    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, rules))()


def num_params(cfg: CLIPConfig) -> int:
    """Number of scalars in the parameter tree (from the abstract shapes, nothing allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_params(cfg))))
