"""Hugging Face <-> sea_jax for the decoder LLMs (Gemma, Gemma 2, Llama 2/3, Phi-3).

Each family is described once, as a list of :class:`~sea_jax.convert.mapping.Param`
(:func:`hf_param_mapping`); :func:`load_hf_llm` and :func:`save_hf_llm` run it through the one
converter engine (:mod:`sea_jax.convert.mapping`) in either direction. Phi-3's fused ``qkv_proj``
and ``gate_up_proj`` are slices (``Param.part``) of one tensor, so the Flax tree keeps separate
q/k/v and gate/up leaves (one model code for every family) and export re-fuses them.

Configs go through ``transformers``' own config classes (:func:`config_from_hf`), so legacy
fields (``rope_scaling``, ``rope_theta`` at top level, Gemma's ``hidden_act="gelu"``) are read
exactly as ``transformers`` reads them.

The multimodal (Llava) converter extends this through :func:`load_params` / :func:`export_tensors`
(or :func:`hf_param_mapping` directly) with its own ``prefix`` (``"model.language_model."``) and
head name.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from sea_jax import sharding
from sea_jax.convert import mapping
from sea_jax.convert.mapping import Linear, Param
from sea_jax.models import llm
from sea_jax.models.llm import LLMConfig, RopeScaling

FAMILIES = ("gemma", "gemma2", "llama", "phi3")
_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_ACT_FROM_HF = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "silu": "silu", "swish": "silu", "gelu": "gelu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "gelu": "gelu"}
# Fields of LLMConfig that are runtime choices, not part of a checkpoint's architecture.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat")


# ----------------------------------------------------------------------------------------------
# Configs


def _hf_config(hf: Any):
    """A ``transformers`` config object from a config.json dict (or the object itself)."""
    import transformers

    if isinstance(hf, transformers.PreTrainedConfig):
        return hf
    d = dict(hf)
    model_type = d.pop("model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a supported decoder LLM; supported: {FAMILIES}")
    for k in ("transformers_version", "_name_or_path"):
        d.pop(k, None)
    return transformers.AutoConfig.for_model(model_type, **d)


def config_from_hf(hf: Mapping | Any, **overrides) -> LLMConfig:
    """LLMConfig from a HF ``config.json`` dict or ``transformers`` config of a supported family.

    ``overrides`` replace LLMConfig fields (e.g. ``dtype=jnp.float32, scan_layers=False``).
    Raises on features this model does not implement (biases, dynamic/yarn RoPE, ...), rather than
    silently computing something else.
    """
    c = _hf_config(hf)
    family = c.model_type
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not a supported decoder LLM; supported: {FAMILIES}")
    for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if getattr(c, flag, None):
            raise NotImplementedError(f"{family} config with {flag}=True is not supported")

    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rp = dict(c.rope_parameters or {})
    rope_type = rp.get("rope_type", "default")
    scaling = None
    if rope_type == "linear":
        scaling = RopeScaling("linear", factor=float(rp["factor"]))
    elif rope_type == "llama3":
        scaling = RopeScaling(
            "llama3", factor=float(rp["factor"]), low_freq_factor=float(rp["low_freq_factor"]),
            high_freq_factor=float(rp["high_freq_factor"]),
            original_max_positions=int(rp["original_max_position_embeddings"]),
        )
    elif rope_type == "longrope":
        scaling = RopeScaling(
            "longrope",
            factor=None if rp.get("factor") is None else float(rp["factor"]),
            original_max_positions=int(rp["original_max_position_embeddings"]),
            short_factor=tuple(float(x) for x in rp["short_factor"]),
            long_factor=tuple(float(x) for x in rp["long_factor"]),
            attention_factor=None if rp.get("attention_factor") is None else float(rp["attention_factor"]),
        )
    elif rope_type != "default":
        raise NotImplementedError(f"RoPE type {rope_type!r} is not supported (default, linear, llama3, longrope)")

    # HF 5.x: Gemma's MLP reads hidden_act (legacy "gelu" already mapped to the tanh form by
    # GemmaConfig); Gemma 2 reads hidden_activation.
    act_name = c.hidden_activation if family == "gemma2" else c.hidden_act
    if act_name not in _ACT_FROM_HF:
        raise NotImplementedError(f"activation {act_name!r} not supported ({sorted(_ACT_FROM_HF)})")
    eos = c.eos_token_id
    gemma_like = family in ("gemma", "gemma2")
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=c.vocab_size,
        hidden=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=c.num_key_value_heads or heads,
        head_dim=head_dim,
        mlp_dim=c.intermediate_size,
        activation=_ACT_FROM_HF[act_name],
        norm_eps=float(c.rms_norm_eps),
        norm_plus_one=gemma_like,
        scale_embeddings=gemma_like,
        tie_embeddings=bool(c.tie_word_embeddings),
        rope_theta=float(rp.get("rope_theta", 10_000.0)),
        rope_scaling=scaling,
        rope_partial_factor=float(rp.get("partial_rotary_factor", 1.0) or 1.0),
        max_positions=int(c.max_position_embeddings),
        bos_token_id=c.bos_token_id,
        eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=c.pad_token_id,
    )
    if family == "gemma2":
        kw.update(
            query_pre_attn_scalar=float(c.query_pre_attn_scalar),
            attn_logit_softcap=None if c.attn_logit_softcapping is None else float(c.attn_logit_softcapping),
            final_logit_softcap=None if c.final_logit_softcapping is None else float(c.final_logit_softcapping),
            sliding_window=c.sliding_window,
            layer_types=tuple(c.layer_types),
            post_norms=True,
        )
    elif family == "phi3":
        kw.update(sliding_window=c.sliding_window)
    return LLMConfig(**{**kw, **overrides})


def config_to_hf(cfg: LLMConfig, dtype: Any = None) -> dict:
    """A ``config.json`` dict that ``transformers`` loads into the same architecture.

    Built through ``transformers``' config class (so the dict is in the installed version's
    format) and checked by converting it back: a config HF cannot express raises ValueError.
    ``dtype`` (the weights' dtype) is recorded as the config's ``dtype``.
    """
    import transformers

    fam = cfg.family
    if fam not in FAMILIES:
        raise ValueError(f"family {fam!r} has no HF export; supported: {FAMILIES}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is not None:
        rope["rope_type"] = s.kind
        if s.kind == "linear":
            rope["factor"] = s.factor
        elif s.kind == "llama3":
            rope.update(factor=s.factor, low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_positions)
        else:
            rope.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor),
                        original_max_position_embeddings=s.original_max_positions)
            if s.factor is not None:
                rope["factor"] = s.factor
            if s.attention_factor is not None:
                rope["attention_factor"] = s.attention_factor
    if cfg.rope_partial_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.rope_partial_factor
    kw: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        architectures=[_ARCHITECTURES[fam]],
    )
    act = _ACT_TO_HF[cfg.activation]
    if fam == "phi3":
        if cfg.head_dim * cfg.n_heads != cfg.hidden:
            raise ValueError("HF Phi3 derives head_dim = hidden / heads; this config differs")
        kw.update(hidden_act=act, sliding_window=cfg.sliding_window,
                  original_max_position_embeddings=s.original_max_positions if s is not None and s.original_max_positions else cfg.max_positions)
    else:
        kw["head_dim"] = cfg.head_dim
    if fam in ("llama", "gemma"):
        kw["hidden_act"] = act
    if fam == "gemma2":
        kw.update(
            # HF's strict config types this field int.
            hidden_activation=act, query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
            attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
            sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types or ()) or None,
        )
    if dtype is not None:
        kw["dtype"] = np.dtype(dtype).name
    hf = transformers.AutoConfig.for_model(fam, **kw).to_dict()
    back = config_from_hf(hf)
    want = dataclasses.replace(cfg, **{f: getattr(back, f) for f in _RUNTIME_FIELDS})
    if back != want:
        diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(back, f.name) and f.name not in _RUNTIME_FIELDS}
        raise ValueError(f"config not expressible as HF {fam}: (ours, HF's) differ in {diff}")
    return hf


def _int_if_whole(x):
    return int(x) if x is not None and float(x).is_integer() else x


# ----------------------------------------------------------------------------------------------
# Parameter mapping


def hf_param_mapping(cfg: LLMConfig, prefix: str = "model.", lm_head: str = "lm_head.weight") -> list[Param]:
    """The family's mapping, for ``cfg.scan_layers``' layout (stacked ``layers/...`` or ``layers_{i}``).

    Args:
      prefix: HF name prefix of the decoder (``"model."`` for *ForCausalLM; Llava nests it).
      lm_head: HF name of the output projection (unused when embeddings are tied).
    """
    H, K, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    layer: list[tuple[tuple[str, ...], str, Any, tuple[int, int, int] | None]] = []
    if cfg.family == "phi3":
        qkv = "self_attn.qkv_proj.weight"
        layer += [
            (("attn", "q", "kernel"), qkv, Linear(out_shape=(H, D)), (0, 0, H * D)),
            (("attn", "k", "kernel"), qkv, Linear(out_shape=(K, D)), (0, H * D, (H + K) * D)),
            (("attn", "v", "kernel"), qkv, Linear(out_shape=(K, D)), (0, (H + K) * D, (H + 2 * K) * D)),
            (("mlp", "gate", "kernel"), "mlp.gate_up_proj.weight", Linear(), (0, 0, F)),
            (("mlp", "up", "kernel"), "mlp.gate_up_proj.weight", Linear(), (0, F, 2 * F)),
        ]
    else:
        layer += [
            (("attn", "q", "kernel"), "self_attn.q_proj.weight", Linear(out_shape=(H, D)), None),
            (("attn", "k", "kernel"), "self_attn.k_proj.weight", Linear(out_shape=(K, D)), None),
            (("attn", "v", "kernel"), "self_attn.v_proj.weight", Linear(out_shape=(K, D)), None),
            (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", Linear(), None),
            (("mlp", "up", "kernel"), "mlp.up_proj.weight", Linear(), None),
        ]
    layer += [
        (("attn", "o", "kernel"), "self_attn.o_proj.weight", Linear(in_shape=(H, D)), None),
        (("mlp", "down", "kernel"), "mlp.down_proj.weight", Linear(), None),
        (("pre_attn_norm", "scale"), "input_layernorm.weight", mapping.Identity(), None),
    ]
    if cfg.post_norms:  # Gemma 2 naming: post_attention_layernorm is really *post*-attention
        layer += [
            (("post_attn_norm", "scale"), "post_attention_layernorm.weight", mapping.Identity(), None),
            (("pre_mlp_norm", "scale"), "pre_feedforward_layernorm.weight", mapping.Identity(), None),
            (("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight", mapping.Identity(), None),
        ]
    else:  # Llama naming: post_attention_layernorm is the norm in front of the MLP
        layer += [(("pre_mlp_norm", "scale"), "post_attention_layernorm.weight", mapping.Identity(), None)]

    out = [
        Param(("embedder", "embedding"), f"{prefix}embed_tokens.weight"),
        Param(("final_norm", "scale"), f"{prefix}norm.weight"),
    ]
    if not cfg.tie_embeddings:
        out.append(Param(("lm_head", "kernel"), lm_head, Linear()))
    for path, name, transform, part in layer:
        if cfg.scan_layers:
            out.append(Param(("layers",) + path, f"{prefix}layers.{{i}}.{name}", transform, stacked=cfg.n_layers, part=part))
        else:
            for i in range(cfg.n_layers):
                out.append(Param((f"layers_{i}",) + path, f"{prefix}layers.{i}.{name}", transform, part=part))
    return out


# ----------------------------------------------------------------------------------------------
# Import / export


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    with open(path) as f:
        return json.load(f)


def load_params(
    cfg: LLMConfig,
    reader: mapping.TensorReader,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    prefix: str = "model.",
    lm_head: str = "lm_head.weight",
    warn_unused: bool = True,
) -> dict:
    """The LLM's parameters from any tensor reader (the Llava importer passes its own prefix).

    Each leaf is assembled on the host and placed directly with its target sharding (``mesh`` +
    ``rules``; without a mesh, on the first local device), so the model is never held twice.
    """
    abstract = llm.abstract_variables(cfg)["params"]
    expected = nn.unbox(abstract)
    shardings = sharding.placements(abstract, mesh, rules)
    params_map = hf_param_mapping(cfg, prefix=prefix, lm_head=lm_head)
    params = mapping.load(params_map, reader, shardings=shardings, dtype=np.dtype(cfg.param_dtype), expected=expected)
    if warn_unused:
        ignore = lambda n: n.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and n == lm_head)  # noqa: E731
        mapping.warn_unused(params_map, reader, f"{cfg.family} checkpoint", ignore, stacklevel=4)
    return params


def load_hf_llm(
    folder: str,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    **overrides,
) -> tuple[LLMConfig, dict]:
    """Builds the Flax LLM's parameters from a local HF folder (config.json + safetensors,
    single-file or sharded with an index; float32 or bf16).

    Tensor by tensor, each placed directly with its sharding (see :func:`load_params`).
    ``overrides`` replace LLMConfig fields (``dtype``, ``scan_layers``, ``remat``, ...).

    Returns:
      (config, params): ``LLM(config).apply({"params": params}, ...)``.
    """
    cfg = config_from_hf(read_hf_config(folder), **overrides)
    params = load_params(cfg, mapping.SafetensorsReader(folder), mesh=mesh, rules=rules)
    return cfg, params


def export_tensors(cfg: LLMConfig, params: Mapping, dtype: Any = np.float32, prefix: str = "model.",
                   lm_head: str = "lm_head.weight"):
    """Yields (HF name, array) one tensor at a time (Phi-3's fused tensors re-fused); the Llava
    exporter chains this with the vision tensors into one ``mapping.save_safetensors``."""
    if "params" in params and "embedder" not in params:
        params = params["params"]
    return mapping.export(hf_param_mapping(cfg, prefix=prefix, lm_head=lm_head), params, dtype=np.dtype(dtype))


def save_hf_llm(cfg: LLMConfig, params: Mapping, folder: str, dtype: Any = np.float32,
                max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes ``config.json`` and (sharded) safetensors that ``AutoModelForCausalLM.from_pretrained``
    loads. ``params`` is the (possibly sharded, possibly ``{"params": ...}``-wrapped) tree, written
    one tensor at a time in ``dtype``. Returns the safetensors file names."""
    hf = config_to_hf(cfg, dtype)
    files = mapping.save_safetensors(export_tensors(cfg, params, dtype), folder, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return files


def model_from_hf(folder: str, mesh=None, **overrides) -> tuple[llm.LLM, dict]:
    """Convenience: ``(LLM module, {"params": params})`` from a HF folder."""
    cfg, params = load_hf_llm(folder, mesh=mesh, **overrides)
    return llm.LLM(cfg), {"params": params}


__all__ = [
    "FAMILIES",
    "config_from_hf",
    "config_to_hf",
    "hf_param_mapping",
    "load_params",
    "load_hf_llm",
    "export_tensors",
    "save_hf_llm",
    "model_from_hf",
    "read_hf_config",
]
