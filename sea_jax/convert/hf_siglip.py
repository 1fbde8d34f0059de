"""Hugging Face ``SiglipModel`` <-> our big_vision-layout SigLIP tree, as one ``list[Param]``.

The same list drives import (:func:`load_hf_siglip`) and export (:func:`save_hf_siglip`) through
:mod:`sea_jax.convert.mapping`. Layout differences it encodes:

* ``nn.Linear`` weights are [out, in]; ours are Flax kernels [in, out], with the attention
  projections split per head: query/key/value [D, H, Dh], out [H, Dh, D];
* the patch embedding is a Conv2d weight OIHW; ours is HWIO;
* position embeddings are ``nn.Embedding`` tables [N, D]; ours are [1, N, D];
* the MAP head's attention is ``torch.nn.MultiheadAttention`` with a fused ``in_proj_weight``
  [3D, D] (rows q, k, v); ours are three separate projections (``Param.part`` slices);
* ``logit_scale`` is our ``t`` (log temperature), ``logit_bias`` our ``b``.

:func:`siglip_vision_params` gives the image tower alone with the names used inside
``SiglipVisionModel`` (``embeddings.*``, ``encoder.layers.{i}.*``, ``post_layernorm.*``,
``head.*``), to which an exporter prepends where the tower lives (``vision_model.`` in
``SiglipModel``; the vision tower's prefix inside ``LlavaForConditionalGeneration``).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from sea_jax import sharding
from sea_jax.convert import mapping
from sea_jax.convert.big_vision import MappedReader
from sea_jax.convert.mapping import Identity, Linear, Param, Reshape, SafetensorsReader, Transpose
from sea_jax.models import siglip
from sea_jax.models.siglip import SigLIPConfig

log = logging.getLogger(__name__)

Path = tuple[str, ...]

# HF activations equal to our MLP's GELU (tanh approximation).
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")


def _encoder_params(
    enc_path: Path, layers_name: str, width: int, heads: int, depth: int, scan: bool
) -> list[Param]:
    """Blocks of one tower: ``enc_path/encoderblock_{i}`` (or stacked ``encoderblock``) <->
    ``{layers_name}.{i}.*`` (HF ``SiglipEncoderLayer``)."""
    hd = width // heads
    if scan:
        blocks = [(enc_path + ("encoderblock",), layers_name + ".{i}", depth)]
    else:
        blocks = [(enc_path + (f"encoderblock_{i}",), f"{layers_name}.{i}", None) for i in range(depth)]
    out: list[Param] = []
    for path, name, stacked in blocks:

        def p(sub: str, hf: str, t: Any = Identity()):
            return Param(path + tuple(sub.split("/")), f"{name}.{hf}", t, stacked)

        out += [
            p("LayerNorm_0/scale", "layer_norm1.weight"),
            p("LayerNorm_0/bias", "layer_norm1.bias"),
            p("LayerNorm_1/scale", "layer_norm2.weight"),
            p("LayerNorm_1/bias", "layer_norm2.bias"),
            p("MlpBlock_0/Dense_0/kernel", "mlp.fc1.weight", Linear()),
            p("MlpBlock_0/Dense_0/bias", "mlp.fc1.bias"),
            p("MlpBlock_0/Dense_1/kernel", "mlp.fc2.weight", Linear()),
            p("MlpBlock_0/Dense_1/bias", "mlp.fc2.bias"),
            p("MultiHeadDotProductAttention_0/out/kernel", "self_attn.out_proj.weight", Linear(in_shape=(heads, hd))),
            p("MultiHeadDotProductAttention_0/out/bias", "self_attn.out_proj.bias"),
        ]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            mha = f"MultiHeadDotProductAttention_0/{ours}"
            out += [
                p(f"{mha}/kernel", f"self_attn.{theirs}.weight", Linear(out_shape=(heads, hd))),
                p(f"{mha}/bias", f"self_attn.{theirs}.bias", Reshape((heads, hd), (width,))),
            ]
    return out


def siglip_vision_params(
    cfg: SigLIPConfig, name_prefix: str = "", path_prefix: Path = ("img",), include_head: bool = True
) -> list[Param]:
    """The image tower: our ``path_prefix/...`` <-> HF ``{name_prefix}embeddings.*`` etc.

    Args:
      name_prefix: where ``SiglipVisionModel``'s modules live in the HF checkpoint ("" for a
        ``SiglipVisionModel``, "vision_model." inside ``SiglipModel``).
      path_prefix: where the image tower lives in our tree.
      include_head: map the MAP head (HF ``vision_use_head=True``).
    """
    d, h = cfg.width, cfg.num_heads
    hd, n = d // h, cfg.num_patches

    def p(sub: str, hf: str, t: Any = Identity(), part=None):
        return Param(path_prefix + tuple(sub.split("/")), name_prefix + hf, t, None, part)

    out = [
        p("embedding/kernel", "embeddings.patch_embedding.weight", Transpose((2, 3, 1, 0))),  # OIHW -> HWIO
        p("embedding/bias", "embeddings.patch_embedding.bias"),
        p("pos_embedding", "embeddings.position_embedding.weight", Reshape((1, n, d), (n, d))),
        p("Transformer/encoder_norm/scale", "post_layernorm.weight"),
        p("Transformer/encoder_norm/bias", "post_layernorm.bias"),
    ]
    out += [
        _prefixed(q, path_prefix, name_prefix)
        for q in _encoder_params(("Transformer",), "encoder.layers", d, h, cfg.depth, cfg.scan)
    ]
    if include_head:
        out += [
            p("MAPHead_0/probe", "head.probe"),
            p("MAPHead_0/LayerNorm_0/scale", "head.layernorm.weight"),
            p("MAPHead_0/LayerNorm_0/bias", "head.layernorm.bias"),
            p("MAPHead_0/MlpBlock_0/Dense_0/kernel", "head.mlp.fc1.weight", Linear()),
            p("MAPHead_0/MlpBlock_0/Dense_0/bias", "head.mlp.fc1.bias"),
            p("MAPHead_0/MlpBlock_0/Dense_1/kernel", "head.mlp.fc2.weight", Linear()),
            p("MAPHead_0/MlpBlock_0/Dense_1/bias", "head.mlp.fc2.bias"),
            p("MAPHead_0/MultiHeadDotProductAttention_0/out/kernel", "head.attention.out_proj.weight", Linear((h, hd))),
            p("MAPHead_0/MultiHeadDotProductAttention_0/out/bias", "head.attention.out_proj.bias"),
        ]
        # torch.nn.MultiheadAttention fuses q, k, v as rows [0:D], [D:2D], [2D:3D] of in_proj.
        for j, ours in enumerate(("query", "key", "value")):
            part = (0, j * d, (j + 1) * d)
            mha = f"MAPHead_0/MultiHeadDotProductAttention_0/{ours}"
            out += [
                p(f"{mha}/kernel", "head.attention.in_proj_weight", Linear(out_shape=(h, hd)), part),
                p(f"{mha}/bias", "head.attention.in_proj_bias", Reshape((h, hd), (d,)), part),
            ]
    return out


def _prefixed(p: Param, path_prefix: Path, name_prefix: str) -> Param:
    """``p`` with ``path_prefix`` prepended to its path and ``name_prefix`` to its name."""
    return Param(path_prefix + p.path, name_prefix + p.name, p.transform, p.stacked, p.part)


def siglip_text_params(
    cfg: SigLIPConfig, name_prefix: str = "text_model.", path_prefix: Path = ("txt",)
) -> list[Param]:
    """The text tower: our ``txt/...`` <-> HF ``text_model.*`` (``SiglipTextModel``)."""
    d, L = cfg.text_width, cfg.text_len

    def p(sub: str, hf: str, t: Any = Identity()):
        return Param(path_prefix + tuple(sub.split("/")), name_prefix + hf, t)

    out = [
        p("Embed_0/embedding", "embeddings.token_embedding.weight"),
        p("pos_embedding", "embeddings.position_embedding.weight", Reshape((1, L, d), (L, d))),
        p("Encoder_0/encoder_norm/scale", "final_layer_norm.weight"),
        p("Encoder_0/encoder_norm/bias", "final_layer_norm.bias"),
        p("head/kernel", "head.weight", Linear()),
        p("head/bias", "head.bias"),
    ]
    out += [
        _prefixed(q, path_prefix, name_prefix)
        for q in _encoder_params(("Encoder_0",), "encoder.layers", d, cfg.text_num_heads, cfg.text_depth, cfg.scan)
    ]
    return out


def siglip_params(cfg: SigLIPConfig) -> list[Param]:
    """The whole ``SiglipModel``: vision_model.*, text_model.*, logit_scale (t), logit_bias (b)."""
    return (
        siglip_vision_params(cfg, "vision_model.")
        + siglip_text_params(cfg)
        + [Param(("t",), "logit_scale"), Param(("b",), "logit_bias")]
    )


# ----------------------------------------------------------------------------------------------
# Configs


def _image_size(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise NotImplementedError(f"non-square image_size {v} is not supported")
        v = v[0]
    return int(v)


def config_from_hf(hf: Mapping | Any, **overrides) -> SigLIPConfig:
    """A :class:`SigLIPConfig` from a HF ``SiglipConfig`` (dict, e.g. a parsed config.json, or the
    config object). A ``SiglipVisionConfig`` alone sets the image tower and leaves the text tower
    at its defaults. ``overrides`` set our own fields (scan, dtype, image_size, ...)."""
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    if d.get("model_type") == "siglip_vision_model":
        v, t = d, None
    elif d.get("model_type", "siglip") == "siglip":
        v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    else:
        raise ValueError(f"not a SigLIP config: model_type {d.get('model_type')!r}")
    for tower, c in (("vision", v), ("text", t or {})):
        act = c.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _TANH_GELU:
            raise NotImplementedError(f"{tower} hidden_act {act!r}: only the tanh GELU ({_TANH_GELU}) is implemented")
    if not v.get("vision_use_head", True):
        raise NotImplementedError("vision_use_head=False: the SigLIP image tower here always has its MAP head")
    if v.get("num_channels", 3) != 3:
        raise NotImplementedError(f"num_channels={v['num_channels']}: only RGB images are supported")
    eps = v.get("layer_norm_eps", 1e-6)
    if t is not None and t.get("layer_norm_eps", 1e-6) != eps:
        raise NotImplementedError("different layer_norm_eps in the two towers")
    width = v.get("hidden_size", 768)
    kw: dict[str, Any] = dict(
        image_size=_image_size(v.get("image_size", 224)),
        patch_size=_image_size(v.get("patch_size", 16)),
        width=width,
        depth=v.get("num_hidden_layers", 12),
        mlp_dim=v.get("intermediate_size", 3072),
        num_heads=v.get("num_attention_heads", 12),
        layer_norm_eps=eps,
        out_dim=width,
    )
    if t is not None:
        tw = t.get("hidden_size", 768)
        kw.update(
            vocab_size=t.get("vocab_size", 32000),
            text_len=t.get("max_position_embeddings", 64),
            text_width=tw,
            text_depth=t.get("num_hidden_layers", 12),
            text_mlp_dim=t.get("intermediate_size", 3072),
            text_num_heads=t.get("num_attention_heads", 12),
            out_dim=t.get("projection_size") or tw,
        )
    kw.update(overrides)
    return SigLIPConfig(**kw)


def vision_config_to_hf(cfg: SigLIPConfig) -> dict:
    """HF ``SiglipVisionConfig`` dict of the image tower (also the ``vision_config`` of a Llava)."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": True,
    }


def config_to_hf(cfg: SigLIPConfig) -> dict:
    """HF ``SiglipConfig`` dict (what ``config.json`` holds) for ``cfg``."""
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "initializer_factor": 1.0,
        "vision_config": vision_config_to_hf(cfg),
        "text_config": {
            "model_type": "siglip_text_model",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.text_width,
            "intermediate_size": cfg.text_mlp_dim,
            "num_hidden_layers": cfg.text_depth,
            "num_attention_heads": cfg.text_num_heads,
            "max_position_embeddings": cfg.text_len,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": cfg.layer_norm_eps,
            "attention_dropout": 0.0,
            "projection_size": cfg.out_dim,
        },
    }


# ----------------------------------------------------------------------------------------------
# Folders


def load_hf_siglip(
    folder: str,
    mesh=None,
    *,
    cfg: SigLIPConfig | None = None,
    rules=sharding.DEFAULT_RULES,
    dtype: Any = np.float32,
    strict: bool = True,
    **overrides,
) -> tuple[SigLIPConfig, dict]:
    """Loads a local HF ``SiglipModel`` folder (config.json + safetensors) into our tree.

    Args:
      folder: the folder.
      mesh: if given, leaves are placed directly with their shardings on it.
      cfg: the config to build (default: from config.json, with ``overrides`` applied, e.g.
        ``scan=True`` or ``dtype="bfloat16"``). A different ``image_size`` resamples the
        position embedding; any other architectural difference raises, naming the tensor.
      strict: raise if the checkpoint has tensors the model does not use.
    Returns:
      (cfg, params) with params {"img", "txt", "t", "b"} (numpy, or jax arrays with ``mesh``).
    """
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf_cfg = json.load(f)
    if hf_cfg.get("model_type") != "siglip":
        raise ValueError(f"{path}: model_type {hf_cfg.get('model_type')!r}, expected a 'siglip' (SiglipModel) folder")
    ckpt = config_from_hf(hf_cfg)
    cfg = (cfg or ckpt).replace(**overrides)
    plist = siglip_params(cfg)
    reader: Any = SafetensorsReader(folder)
    extra = mapping.unused(plist, reader)
    if extra:
        msg = f"{folder}: tensors not used by the model: {extra[:12]}{' ...' if len(extra) > 12 else ''}"
        if strict:
            raise ValueError(msg + "; is the config the checkpoint's?")
        log.warning(msg)
    if cfg.num_patches != ckpt.num_patches:
        name = "vision_model.embeddings.position_embedding.weight"
        log.info("resampling %s from %dx%d to %dx%d patches", name, ckpt.grid, ckpt.grid, cfg.grid, cfg.grid)
        reader = MappedReader(reader, {name: lambda x: siglip.resample_posemb(x[None], cfg.grid)[0]})
    abstract = siglip.abstract_params(cfg)
    shardings = None if mesh is None else sharding.tree_shardings(abstract, mesh, rules)
    params = mapping.load(plist, reader, shardings=shardings, dtype=dtype, expected=nn.unbox(abstract))
    return cfg, params


def save_hf_siglip(
    folder: str, cfg: SigLIPConfig, params: Mapping, dtype: Any | None = None, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Writes ``params`` as a HF ``SiglipModel`` folder (config.json + safetensors) that
    ``SiglipModel.from_pretrained(folder)`` loads; returns the safetensors file names."""
    files = mapping.save_safetensors(mapping.export(siglip_params(cfg), params, dtype), folder, max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)
    return files
