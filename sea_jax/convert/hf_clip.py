"""Hugging Face ``CLIPModel`` <-> our CLIP tree (:mod:`sea_jax.models.clip`), as one ``list[Param]``.

The same list drives import (:func:`load_hf_clip`) and export (:func:`save_hf_clip`) through
:mod:`sea_jax.convert.mapping`. Our names mirror HF's modules, so the mapping is a renaming plus
these layout changes:

* ``nn.Linear`` weights are [out, in]; ours are Flax kernels [in, out], with the attention
  projections split per head: q/k/v [D, H, Dh] (biases [H, Dh]), out_proj [H, Dh, D];
* the patch embedding is a Conv2d weight OIHW (no bias); ours is HWIO;
* ``logit_scale`` is our ``t``; ``visual_projection`` / ``text_projection`` live at the top of
  ``CLIPModel`` but inside our ``img`` / ``txt`` subtrees (each tower's projection is part of it).

:func:`clip_vision_params` gives the image tower alone with the names used inside
``CLIPVisionModel`` (``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.{i}.*``,
``post_layernorm.*``), to which an exporter prepends where the tower lives: ``vision_model.`` in
``CLIPModel``; in a Llava, whose CLIP tower is a ``CLIPVisionModel``, ``vision_tower.`` is what
transformers 5.23 writes and ``vision_tower.vision_model.`` what older llava-hf checkpoints hold
(5.23's ``CLIPVisionModel`` has no ``vision_model`` wrapper but loads both spellings). A
``CLIPVisionModel`` has no ``visual_projection``: leave ``projection=None`` there and take our
``img/visual_projection`` from the CLIP checkpoint when the labeller needs it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from sea_jax import sharding
from sea_jax.convert import mapping
from sea_jax.convert.mapping import (
    Identity,
    Linear,
    Param,
    Reshape,
    SafetensorsReader,
    Transpose,
)
from sea_jax.models import clip
from sea_jax.models.clip import CLIPConfig

log = logging.getLogger(__name__)

Path = tuple[str, ...]


def _encoder_params(
    path_prefix: Path, name_prefix: str, width: int, heads: int, depth: int, scan: bool
) -> list[Param]:
    """One tower's layers: ``path_prefix/encoder/layers_{i}`` (or stacked ``layers``) <->
    ``{name_prefix}encoder.layers.{i}.*`` (HF ``CLIPEncoderLayer``)."""
    hd = width // heads
    enc = path_prefix + ("encoder",)
    if scan:
        blocks = [(enc + ("layers",), name_prefix + "encoder.layers.{i}", depth)]
    else:
        blocks = [(enc + (f"layers_{i}",), f"{name_prefix}encoder.layers.{i}", None) for i in range(depth)]
    out: list[Param] = []
    for path, name, stacked in blocks:

        def p(sub: str, hf: str, t: Any = Identity()):
            return Param(path + tuple(sub.split("/")), f"{name}.{hf}", t, stacked)

        out += [
            p("layer_norm1/scale", "layer_norm1.weight"),
            p("layer_norm1/bias", "layer_norm1.bias"),
            p("layer_norm2/scale", "layer_norm2.weight"),
            p("layer_norm2/bias", "layer_norm2.bias"),
            p("mlp/fc1/kernel", "mlp.fc1.weight", Linear()),
            p("mlp/fc1/bias", "mlp.fc1.bias"),
            p("mlp/fc2/kernel", "mlp.fc2.weight", Linear()),
            p("mlp/fc2/bias", "mlp.fc2.bias"),
            p("self_attn/out_proj/kernel", "self_attn.out_proj.weight", Linear(in_shape=(heads, hd))),
            p("self_attn/out_proj/bias", "self_attn.out_proj.bias"),
        ]
        for proj in ("q_proj", "k_proj", "v_proj"):
            out += [
                p(f"self_attn/{proj}/kernel", f"self_attn.{proj}.weight", Linear(out_shape=(heads, hd))),
                p(f"self_attn/{proj}/bias", f"self_attn.{proj}.bias", Reshape((heads, hd), (width,))),
            ]
    return out


def clip_vision_params(
    cfg: CLIPConfig, name_prefix: str = "", path_prefix: Path = ("img",), projection: str | None = None
) -> list[Param]:
    """The image tower: our ``path_prefix/...`` <-> HF ``{name_prefix}embeddings.*`` etc.

    Args:
      name_prefix: where ``CLIPVisionModel``'s modules live in the HF checkpoint ("" for a
        ``CLIPVisionModel``, "vision_model." inside ``CLIPModel``, the vision tower's prefix
        inside a Llava).
      path_prefix: where the image tower lives in our tree.
      projection: full HF name of the visual projection weight ("visual_projection.weight" in
        ``CLIPModel`` / ``CLIPVisionModelWithProjection``), or None where there is none
        (``CLIPVisionModel``, Llava): our ``visual_projection`` leaf is then not mapped.
    """
    d = cfg.width

    def p(sub: str, hf: str, t: Any = Identity()):
        return Param(path_prefix + tuple(sub.split("/")), name_prefix + hf, t)

    out = [
        p("embeddings/class_embedding", "embeddings.class_embedding"),
        p("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight", Transpose((2, 3, 1, 0))),
        p("embeddings/position_embedding", "embeddings.position_embedding.weight"),
        p("pre_layrnorm/scale", "pre_layrnorm.weight"),
        p("pre_layrnorm/bias", "pre_layrnorm.bias"),
        p("post_layernorm/scale", "post_layernorm.weight"),
        p("post_layernorm/bias", "post_layernorm.bias"),
    ]
    out += _encoder_params(path_prefix, name_prefix, d, cfg.num_heads, cfg.depth, cfg.scan)
    if projection is not None:
        out.append(Param(path_prefix + ("visual_projection", "kernel"), projection, Linear()))
    return out


def clip_text_params(
    cfg: CLIPConfig, name_prefix: str = "text_model.", path_prefix: Path = ("txt",),
    projection: str | None = "text_projection.weight",
) -> list[Param]:
    """The text tower: our ``txt/...`` <-> HF ``text_model.*`` (``CLIPTextModel``) and, when
    ``projection`` names it, ``text_projection.weight``."""
    d = cfg.text_width

    def p(sub: str, hf: str, t: Any = Identity()):
        return Param(path_prefix + tuple(sub.split("/")), name_prefix + hf, t)

    out = [
        p("embeddings/token_embedding/embedding", "embeddings.token_embedding.weight"),
        p("embeddings/position_embedding", "embeddings.position_embedding.weight"),
        p("final_layer_norm/scale", "final_layer_norm.weight"),
        p("final_layer_norm/bias", "final_layer_norm.bias"),
    ]
    out += _encoder_params(path_prefix, name_prefix, d, cfg.text_num_heads, cfg.text_depth, cfg.scan)
    if projection is not None:
        out.append(Param(path_prefix + ("text_projection", "kernel"), projection, Linear()))
    return out


def clip_params(cfg: CLIPConfig) -> list[Param]:
    """The whole ``CLIPModel``: vision_model.*, visual_projection, text_model.*,
    text_projection, logit_scale (our ``t``)."""
    return (
        clip_vision_params(cfg, "vision_model.", projection="visual_projection.weight")
        + clip_text_params(cfg)
        # Reshape to () also reads a [1]-shaped logit_scale (some conversions store one).
        + [Param(("t",), "logit_scale", Reshape((), ()))]
    )


# ----------------------------------------------------------------------------------------------
# Configs


def _size(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise NotImplementedError(f"non-square size {v} is not supported")
        v = v[0]
    return int(v)


def _sub(d: Mapping, key: str) -> dict:
    # Configs written by transformers < 4.27 keep the towers under "<key>_dict"; newer ones
    # under "<key>" (some files carry both, the newer being authoritative).
    return dict(d.get(key) or d.get(f"{key}_dict") or {})


def config_from_hf(hf: Mapping | Any, **overrides) -> CLIPConfig:
    """A :class:`CLIPConfig` from a HF ``CLIPConfig`` (dict, e.g. a parsed config.json, or the
    config object). A ``CLIPVisionConfig`` alone (``model_type="clip_vision_model"``, e.g. a
    Llava's ``vision_config``) sets the image tower, ``out_dim`` from its ``projection_dim``, and
    leaves the text tower at its defaults. ``overrides`` set our own fields (scan, dtype, ...)."""
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    mt = d.get("model_type", "clip")
    if mt == "clip_vision_model":
        v, t = d, None
    elif mt == "clip":
        v, t = _sub(d, "vision_config"), _sub(d, "text_config")
    else:
        raise ValueError(f"not a CLIP config: model_type {mt!r}")
    act = v.get("hidden_act", "quick_gelu")
    if act not in clip.ACTIVATIONS:
        raise NotImplementedError(f"vision hidden_act {act!r}: only {clip.ACTIVATIONS} are implemented")
    if t is not None and t.get("hidden_act", "quick_gelu") != act:
        raise NotImplementedError(f"the towers use different activations ({act!r}, {t.get('hidden_act')!r})")
    if v.get("num_channels", 3) != 3:
        raise NotImplementedError(f"num_channels={v['num_channels']}: only RGB images are supported")
    eps = v.get("layer_norm_eps", 1e-5)
    if t is not None and t.get("layer_norm_eps", 1e-5) != eps:
        raise NotImplementedError("different layer_norm_eps in the two towers")
    kw: dict[str, Any] = dict(
        image_size=_size(v.get("image_size", 224)),
        patch_size=_size(v.get("patch_size", 32)),
        width=v.get("hidden_size", 768),
        depth=v.get("num_hidden_layers", 12),
        mlp_dim=v.get("intermediate_size", 3072),
        num_heads=v.get("num_attention_heads", 12),
        layer_norm_eps=eps,
        activation=act,
        out_dim=v.get("projection_dim", 512),
    )
    if t is not None:
        eos = t.get("eos_token_id", 49407)
        if not isinstance(eos, int):
            raise NotImplementedError(f"text eos_token_id {eos!r}: HF CLIPTextModel pools by a single id")
        kw.update(
            vocab_size=t.get("vocab_size", 49408),
            text_len=t.get("max_position_embeddings", 77),
            text_width=t.get("hidden_size", 512),
            text_depth=t.get("num_hidden_layers", 12),
            text_mlp_dim=t.get("intermediate_size", 2048),
            text_num_heads=t.get("num_attention_heads", 8),
            eos_token_id=eos,
            out_dim=d.get("projection_dim", 512),
            logit_scale_init=d.get("logit_scale_init_value", 2.6592),
        )
    kw.update(overrides)
    return CLIPConfig(**kw)


def vision_config_to_hf(cfg: CLIPConfig) -> dict:
    """HF ``CLIPVisionConfig`` dict of the image tower (also the ``vision_config`` of a Llava)."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "projection_dim": cfg.out_dim,
    }


def config_to_hf(cfg: CLIPConfig) -> dict:
    """HF ``CLIPConfig`` dict (what ``config.json`` holds) for ``cfg``."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "initializer_factor": 1.0,
        "projection_dim": cfg.out_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "vision_config": vision_config_to_hf(cfg),
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.text_width,
            "intermediate_size": cfg.text_mlp_dim,
            "num_hidden_layers": cfg.text_depth,
            "num_attention_heads": cfg.text_num_heads,
            "max_position_embeddings": cfg.text_len,
            "hidden_act": cfg.activation,
            "layer_norm_eps": cfg.layer_norm_eps,
            "attention_dropout": 0.0,
            "projection_dim": cfg.out_dim,
            "eos_token_id": cfg.eos_token_id,
        },
    }


# ----------------------------------------------------------------------------------------------
# Folders


def load_hf_clip(
    folder: str,
    mesh=None,
    *,
    cfg: CLIPConfig | None = None,
    rules=sharding.DEFAULT_RULES,
    dtype: Any = np.float32,
    strict: bool = True,
    **overrides,
) -> tuple[CLIPConfig, dict]:
    """Loads a local HF ``CLIPModel`` folder (config.json + safetensors) into our tree.

    Args:
      folder: the folder.
      mesh: if given, leaves are placed directly with their shardings on it.
      cfg: the config to build (default: from config.json), with ``overrides`` applied (e.g.
        ``scan=True`` or ``dtype="bfloat16"``). An architectural difference from the checkpoint
        raises, naming the tensor (position embeddings are not resampled: CLIP's S2 use tiles
        the image at the tower's own size instead).
      strict: raise if the checkpoint has tensors the model does not use.
    Returns:
      (cfg, params) with params {"img", "txt", "t"} (numpy, or jax arrays with ``mesh``).
    """
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf_cfg = json.load(f)
    if hf_cfg.get("model_type") != "clip":
        raise ValueError(f"{path}: model_type {hf_cfg.get('model_type')!r}, expected a 'clip' (CLIPModel) folder")
    cfg = (cfg or config_from_hf(hf_cfg)).replace(**overrides)
    plist = clip_params(cfg)
    reader = SafetensorsReader(folder)
    extra = mapping.unused(plist, reader)
    if extra:
        msg = f"{folder}: tensors not used by the model: {extra[:12]}{' ...' if len(extra) > 12 else ''}"
        if strict:
            raise ValueError(msg + "; is the config the checkpoint's?")
        log.warning(msg)
    abstract = clip.abstract_params(cfg)
    shardings = None if mesh is None else sharding.tree_shardings(abstract, mesh, rules)
    expected = nn.unbox(abstract)
    params = mapping.load(plist, reader, shardings=shardings, dtype=dtype, expected=expected)
    if jax.tree.structure(params) != jax.tree.structure(expected):
        # A leaf the mapping never fills would otherwise surface as a KeyError deep inside apply.
        raise ValueError(f"{folder}: the CLIP mapping does not cover the model's parameter tree")
    return cfg, params


def save_hf_clip(
    cfg: CLIPConfig, params: Mapping, folder: str, dtype: Any | None = None, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Writes ``params`` as a HF ``CLIPModel`` folder (config.json + safetensors) that
    ``CLIPModel.from_pretrained(folder)`` loads; returns the safetensors file names.

    ``dtype`` casts every tensor (e.g. ``np.float16``); None keeps the parameters' dtype.
    """

    def tensors():
        for name, x in mapping.export(clip_params(cfg), params, dtype):
            # mapping.export passes every tensor through np.ascontiguousarray, which makes 0-d
            # arrays [1]; HF's logit_scale is 0-d and from_pretrained rejects a [1] one.
            yield name, (x.reshape(()) if name == "logit_scale" else x)

    files = mapping.save_safetensors(tensors(), folder, max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)
    return files
