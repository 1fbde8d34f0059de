"""sea_jax MLLM <-> Hugging Face ``LlavaForConditionalGeneration`` folders (export and import):
the parameter mapping and the config. The tokenizer, processor and generation-config files of the
folder are :mod:`sea_jax.convert.llava_files`.

The Llava mapping is composed from the family mappings, run through the one converter engine
(:mod:`sea_jax.convert.mapping`); nothing here converts a tensor by itself:

* vision tower: :func:`~sea_jax.convert.hf_siglip.siglip_vision_params` (our ``vision/img/...``),
* adapter: ``adapter/linear_{1,2}`` <-> ``multi_modal_projector.linear_{1,2}`` (``nn.Linear``),
* LLM: :func:`~sea_jax.convert.hf_llm.hf_param_mapping` (our ``llm/...``).

Tensor names. ``transformers`` 5.23 builds ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*`` and ``lm_head.weight`` in memory, but ``save_pretrained`` writes the
legacy on-disk names ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``
and ``language_model.lm_head.weight`` (what llava-hf checkpoints on the Hub, vLLM and older
``transformers`` read). Export writes the on-disk names (``NAMING_DISK``); import accepts both.

Exported folder (loads offline with ``AutoModelForImageTextToText`` + ``AutoProcessor``)::

    config.json                      LlavaConfig: SigLIP vision_config, the LLM text_config,
                                     image_token_index, vision_feature_layer,
                                     vision_feature_select_strategy="full", image_seq_length
    generation_config.json           bos / eos / pad
    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json  ``<image>`` an added special token
    chat_template.jinja              the chat template (accepts string or [{"type": "image"}, ...] contents)
    processor_config.json            LlavaProcessor: patch_size, num_additional_image_tokens=0,
                                     vision_feature_select_strategy, image_token, and (transformers 5)
                                     the image processor settings
    preprocessor_config.json         the same image processor settings for loaders that read this file

Image preprocessing. Training uses :func:`sea_jax.data.images.preprocess_image`: optional LLaVA
``expand2square`` with the mean colour ``int(0.5 * 255) = 127``, PIL bicubic resize, x / 255,
(x - 0.5) / 0.5. ``LlavaImageProcessor`` reproduces exactly that with ``do_pad`` (pad to square with
``int(mean * 255)``, same centring offsets), ``size = {height, width}``, ``do_center_crop=False``.
Its PIL backend (``LlavaImageProcessorPil``) is bit-compatible with training; when torchvision is
installed ``AutoProcessor`` picks the torchvision backend, whose antialiased bicubic differs by a few
1e-3: pass ``backend="pil"`` to ``AutoProcessor.from_pretrained`` for exact pixels (the backend
cannot be pinned from the folder in transformers 5.23).

What is not exported: the SigLIP *text* tower and ``log_tau`` (not part of a Llava; the text tower
labels patches during training only). :func:`import_llava` therefore returns ``vision = {"img": ...}``.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sea_jax import sharding
from sea_jax.convert import hf_clip, hf_llm, hf_siglip, llava_files, mapping
from sea_jax.convert.mapping import Identity, Linear, Param
from sea_jax.models import clip
from sea_jax.models.mllm import MLLMConfig
from sea_jax.models.mllm import abstract_params as mllm_abstract_params


IMAGE_TOKEN = llava_files.IMAGE_TOKEN
# config.json key recording that Gemma's visual-token scale was folded into the adapter
FOLDED_SCALE_KEY = "sea_jax_folded_visual_token_scale"

# (vision tower, projector, decoder, lm_head) name prefixes of the two namings.
NAMING_DISK = ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight")
NAMING_MEMORY = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight")
_NAMINGS = {"disk": NAMING_DISK, "memory": NAMING_MEMORY}

# ----------------------------------------------------------------------------------------------
# Mapping and config


def adapter_params(cfg: MLLMConfig, name_prefix: str = "multi_modal_projector.", path_prefix=("adapter",)) -> list[Param]:
    """``adapter/linear_{1,2}/{kernel,bias}`` <-> ``{name_prefix}linear_{1,2}.{weight,bias}``."""
    if cfg.adapter != "mlp2x_gelu":
        raise NotImplementedError(
            f"adapter {cfg.adapter!r}: HF Llava's projector is Linear-GELU-Linear (mlp2x_gelu) only; "
            "export a 'linear' adapter with export_adapter instead"
        )
    out = []
    for i in (1, 2):
        out += [
            Param(path_prefix + (f"linear_{i}", "kernel"), f"{name_prefix}linear_{i}.weight", Linear()),
            Param(path_prefix + (f"linear_{i}", "bias"), f"{name_prefix}linear_{i}.bias", Identity()),
        ]
    return out


def llava_param_mapping(cfg: MLLMConfig, naming: str = "disk") -> list[Param]:
    """The whole Llava as one ``list[Param]`` over our tree ``{"vision": {"img"}, "adapter", "llm"}``.

    Args:
      naming: "disk" (what ``save_pretrained`` writes) or "memory" (module names in transformers 5).
    """
    vis, proj, lm, head = _NAMINGS[naming]
    if isinstance(cfg.vision, clip.CLIPConfig):
        # HF Llava's CLIP tower is a CLIPVisionModel: no visual projection (our labels' projection
        # is not exported; an imported CLIP Llava gets a zero one, see load_llava_params)
        tower = hf_clip.clip_vision_params(cfg.vision, name_prefix=vis, path_prefix=("img",), projection=None)
    else:
        tower = hf_siglip.siglip_vision_params(cfg.vision, name_prefix=vis, path_prefix=("img",), include_head=True)
    vision = [Param(("vision",) + p.path, p.name, p.transform, p.stacked, p.part) for p in tower]
    language = [
        Param(("llm",) + p.path, p.name, p.transform, p.stacked, p.part)
        for p in hf_llm.hf_param_mapping(cfg.llm, prefix=lm, lm_head=head)
    ]
    return vision + adapter_params(cfg, name_prefix=proj) + language


def _check_exportable(cfg: MLLMConfig) -> None:
    if cfg.s2 is not None:
        raise NotImplementedError(
            "transformers has no Llava class that computes S2 multi-scale features: export the parts instead "
            "(sea_jax.convert.hf_llava.export_parts: the LLM, the vision tower, the adapter and s2.json; "
            "python -m sea_jax.export does this for an S2 run)")
    n_hidden = cfg.vision.depth + 1
    if not -n_hidden <= cfg.vision_feature_layer < n_hidden:
        raise ValueError(f"vision_feature_layer {cfg.vision_feature_layer} outside the tower's {n_hidden} hidden states")
    if not 0 <= cfg.image_token_id < cfg.llm.vocab_size:
        raise ValueError(
            f"image_token_id {cfg.image_token_id} has no row in the LLM's embedding (vocab_size "
            f"{cfg.llm.vocab_size}); resize the embedding to include the <image> token before exporting"
        )


def llava_config(cfg: MLLMConfig, tokenizer: Any | None = None, dtype: Any = np.float32) -> dict:
    """The ``config.json`` dict of the exported ``LlavaForConditionalGeneration``.

    Built through ``transformers.LlavaConfig`` (so it is in the installed version's format):
    SigLIP or CLIP ``vision_config``, the LLM ``text_config`` (with the tokenizer's pad id when the
    LLM config has none), ``image_token_index`` = ``cfg.image_token_id``, ``vision_feature_layer``,
    ``vision_feature_select_strategy`` "full" for SigLIP (no CLS token) or "default" for CLIP (CLS
    dropped, LLaVA-1.5), ``sea_jax_folded_visual_token_scale`` when Gemma's input scale was folded
    into the adapter (:func:`fold_visual_scale`),
    ``image_seq_length`` = patches per image, ``projector_hidden_act="gelu"`` (exact GELU, as our
    adapter), ``multimodal_projector_bias=True``.
    """
    import transformers

    _check_exportable(cfg)
    text = hf_llm.config_to_hf(cfg.llm, dtype)
    if text.get("pad_token_id") is None and tokenizer is not None and tokenizer.pad_token_id is not None:
        text["pad_token_id"] = tokenizer.pad_token_id
    is_clip = isinstance(cfg.vision, clip.CLIPConfig)
    extra = {FOLDED_SCALE_KEY: cfg.visual_token_scale} if cfg.visual_token_scale != 1.0 else {}
    c = transformers.LlavaConfig(
        vision_config=(hf_clip.vision_config_to_hf if is_clip else hf_siglip.vision_config_to_hf)(cfg.vision),
        text_config=text,
        image_token_index=cfg.image_token_id,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default" if is_clip else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=cfg.num_image_tokens,
        tie_word_embeddings=cfg.llm.tie_embeddings,
        **extra,
    )
    c.architectures = ["LlavaForConditionalGeneration"]
    c.dtype = np.dtype(dtype).name
    return c.to_dict()


def config_from_llava(hf: Mapping, source: str = "config.json", **llm_overrides) -> MLLMConfig:
    """MLLMConfig from a Llava ``config.json`` dict; raises on what our model does not compute."""
    if hf.get("model_type") != "llava":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r}, expected 'llava' (LlavaForConditionalGeneration)")
    for key in ("vision_config", "text_config"):
        if not isinstance(hf.get(key), Mapping):
            raise ValueError(f"{source}: no {key}")
    strategy = hf.get("vision_feature_select_strategy", "default")
    tower = hf["vision_config"].get("model_type") if isinstance(hf.get("vision_config"), Mapping) else None
    want = {"siglip_vision_model": "full", "clip_vision_model": "default"}
    if tower not in want:
        raise NotImplementedError(f"{source}: vision tower {tower!r}; SigLIP and CLIP are supported")
    if strategy != want[tower]:
        raise NotImplementedError(f"{source}: vision_feature_select_strategy {strategy!r} with a {tower}; "
                                  f"supported: {want[tower]!r} (every patch token, no CLS)")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise NotImplementedError(f"{source}: projector_hidden_act {hf['projector_hidden_act']!r}; the adapter uses exact GELU")
    if not hf.get("multimodal_projector_bias", True):
        raise NotImplementedError(f"{source}: a projector without biases is not supported")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise NotImplementedError(f"{source}: vision_feature_layer {layer!r}; only a single layer is supported")
    image_token = hf.get("image_token_id", hf.get("image_token_index"))
    if image_token is None:
        raise ValueError(f"{source}: no image_token_index")
    vision = (hf_clip if tower == "clip_vision_model" else hf_siglip).config_from_hf(hf["vision_config"])
    text = dict(hf["text_config"])
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    llm_cfg = hf_llm.config_from_hf(text, **llm_overrides)
    return MLLMConfig(llm=llm_cfg, vision=vision, image_token_id=int(image_token), vision_feature_layer=layer,
                      adapter="mlp2x_gelu", scale_visual_tokens=FOLDED_SCALE_KEY in hf)


def fold_visual_scale(cfg: MLLMConfig, params: Mapping, unfold: bool = False) -> Mapping:
    """``params`` with the adapter's last Linear (weight and bias) multiplied by the visual-token
    scale (``unfold``: divided by it), so a model trained with ``scale_visual_tokens`` (the paper:
    Gemma's visual tokens scaled like its text rows) gives the same logits as an HF Llava that
    writes the adapter's output unscaled (transformers 5). A no-op at scale 1."""
    scale = cfg.visual_token_scale
    if scale == 1.0:
        return params
    f = (1.0 / scale) if unfold else scale
    last = "linear_2" if "linear_2" in params["adapter"] else "linear_1"
    # numpy or (sharded) jax leaves alike; the factor in the leaf's dtype
    layer = {k: v * np.asarray(f, np.asarray(v).dtype if isinstance(v, np.ndarray) else v.dtype)
             for k, v in params["adapter"][last].items()}
    return {**params, "adapter": {**params["adapter"], last: layer}}


# ----------------------------------------------------------------------------------------------
# Export


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(jnp.dtype(dtype))


def _remove_stale_weights(out_dir: str) -> None:
    # A previous export with another shard count would leave files the new index does not list.
    for f in glob.glob(os.path.join(out_dir, "model*.safetensors")) + glob.glob(os.path.join(out_dir, "model.safetensors.index.json")):
        os.remove(f)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def export_llava(
    cfg: MLLMConfig,
    params: Mapping,
    tokenizer: Any,
    out_dir: str,
    dtype: Any = np.float32,
    pad_to_square: bool = False,
    chat_template: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    eos_is_end_of_turn: bool = False,
) -> list[str]:
    """Writes ``params`` as a ``LlavaForConditionalGeneration`` folder (see the module docstring).

    Args:
      cfg: the model's config.
      params: ``{"vision": {"img": ..., (txt, t, b ignored)}, "adapter": ..., "llm": ..., (log_tau
        ignored)}``; numpy or (sharded, possibly multi-host) jax arrays.
      tokenizer: the LLM's ``transformers`` tokenizer (``<image>`` is added if missing, see
        :func:`prepare_tokenizer`).
      out_dir: the folder (created; previous ``model*.safetensors`` in it are replaced).
      dtype: weight dtype on disk (``np.float32`` / ``"bfloat16"``).
      pad_to_square: the training stage padded images to squares (LLaVA-1.5 stage 2).
      chat_template: overrides the tokenizer's chat template.
      max_shard_bytes: safetensors shard size.
      eos_is_end_of_turn: the exported tokenizer's EOS is the chat template's end-of-turn token
        (:func:`sea_jax.convert.llava_files.prepare_tokenizer`), for lmms-eval's ``llava_hf``.

    Tensors are gathered and written one at a time (at most one shard in host memory). Every
    process must call this (gathering is collective); only process 0 writes.

    Returns:
      the safetensors file names.
    """
    np_dtype = _np_dtype(dtype)
    hf_config = llava_config(cfg, tokenizer, np_dtype)
    tok = llava_files.prepare_tokenizer(tokenizer, cfg, chat_template, eos_is_end_of_turn)
    tensors = mapping.export(llava_param_mapping(cfg, "disk"), fold_visual_scale(cfg, params), dtype=np_dtype)
    if jax.process_index() != 0:
        for _ in tensors:  # take part in every gather, write nothing
            pass
        return []
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_weights(out_dir)
    files = mapping.save_safetensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    _write_json(os.path.join(out_dir, "config.json"), hf_config)
    llava_files.write_generation_config(cfg, tok, out_dir)
    processor = llava_files.make_processor(cfg, tok, pad_to_square)
    processor.save_pretrained(out_dir)
    # transformers 5 nests the image processor in processor_config.json; older loaders (and
    # vLLM's) read preprocessor_config.json, so it is written as well.
    processor.image_processor.save_pretrained(out_dir)
    return files


# LLaVA (haotian-liu/LLaVA) saves the stage-1 projector as ``mm_projector.bin``: the state dict of
# ``model.mm_projector`` = nn.Sequential(Linear, GELU, Linear) for mlp2x_gelu (entries 0 and 2) or a
# bare nn.Linear for "linear", under the names below.
def _adapter_names(kind: str) -> list[tuple[tuple[str, ...], str, Any]]:
    if kind == "mlp2x_gelu":
        layers = (("linear_1", "model.mm_projector.0"), ("linear_2", "model.mm_projector.2"))
    elif kind == "linear":
        layers = (("linear_1", "model.mm_projector"),)
    else:
        raise ValueError(f"adapter kind {kind!r} unknown")
    out = []
    for ours, theirs in layers:
        out += [((ours, "kernel"), f"{theirs}.weight", Linear()), ((ours, "bias"), f"{theirs}.bias", Identity())]
    return out


def adapter_mapping(kind: str) -> list[Param]:
    """Our ``adapter`` subtree <-> LLaVA's ``mm_projector`` names."""
    return [Param(path, name, t) for path, name, t in _adapter_names(kind)]


ADAPTER_FILE = "mm_projector.safetensors"


def export_adapter(cfg: MLLMConfig, adapter: Mapping, out_dir: str, dtype: Any = np.float32) -> str:
    """Writes the adapter alone, LLaVA's ``mm_projector.bin`` role (stage-1 output), as
    ``{out_dir}/mm_projector.safetensors`` with LLaVA's names (``model.mm_projector.0.weight``,
    ``.0.bias``, ``.2.weight``, ``.2.bias`` for mlp2x_gelu; ``model.mm_projector.weight/.bias`` for
    linear), PyTorch layout [out, in]. The safetensors metadata records LLaVA's config fields
    (``mm_projector_type``, ``mm_hidden_size``, ``hidden_size``, ``mm_vision_select_layer``).

    LLaVA's own loader (``torch.load`` of a .bin) needs ``safetensors.torch.load_file`` instead;
    the names and layout are the same. Returns the file path.
    """
    if jax.process_index() != 0:
        for _ in mapping.export(adapter_mapping(cfg.adapter), adapter):
            pass
        return ""
    tensors = dict(mapping.export(adapter_mapping(cfg.adapter), adapter, dtype=_np_dtype(dtype)))
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ADAPTER_FILE)
    meta = {
        "format": "pt",
        "mm_projector_type": cfg.adapter,
        "mm_hidden_size": str(cfg.adapter_in_dim),  # 3 x width with S2
        "hidden_size": str(cfg.llm.hidden),
        "mm_vision_select_layer": str(cfg.vision_feature_layer),
    }
    save_file(tensors, path, metadata=meta)
    return path


S2_FILE = "s2.json"


def export_parts(
    cfg: MLLMConfig,
    params: Mapping,
    tokenizer: Any,
    out_dir: str,
    dtype: Any = np.float32,
    pad_to_square: bool = False,
    chat_template: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes a model that no single transformers class computes (S2 multi-scale features) as its
    loadable parts, the closest thing to a Llava folder:

    * ``llm/``: the LLM as ``AutoModelForCausalLM`` loads it, with the tokenizer as trained
      (``<image>`` added, the chat template);
    * ``vision/``: the tower as ``CLIPModel`` / ``SiglipModel`` loads it;
    * ``mm_projector.safetensors``: the adapter (:func:`export_adapter`; input 3 x width with S2),
      with Gemma's visual-token scale folded in as in :func:`export_llava`;
    * ``s2.json``: how to put them together: the S2 scales, the hidden state the adapter reads,
      the prefix tokens dropped, the image size, mean / std and padding, ``<image>``'s id and the
      number of image tokens (LLaVA-S2's ``s2wrapper`` over the vision model gives the features).

    ``params`` must be host (numpy) arrays, as :func:`sea_jax.builder.load_trained` gives them.
    Returns the files written (paths under ``out_dir``).
    """
    np_dtype = _np_dtype(dtype)
    folded = fold_visual_scale(cfg, params)
    llm_dir, vision_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "vision")
    os.makedirs(llm_dir, exist_ok=True)
    os.makedirs(vision_dir, exist_ok=True)
    files = [os.path.join(llm_dir, f) for f in hf_llm.save_hf_llm(cfg.llm, folded["llm"], llm_dir, np_dtype,
                                                                  max_shard_bytes)]
    tok = llava_files.prepare_tokenizer(tokenizer, cfg, chat_template)
    tok.save_pretrained(llm_dir)
    if isinstance(cfg.vision, clip.CLIPConfig):
        written = hf_clip.save_hf_clip(cfg.vision, folded["vision"], vision_dir, np_dtype, max_shard_bytes)
    else:
        written = hf_siglip.save_hf_siglip(vision_dir, cfg.vision, folded["vision"], np_dtype, max_shard_bytes)
    files += [os.path.join(vision_dir, f) for f in written]
    files.append(export_adapter(cfg, folded["adapter"], out_dir, np_dtype))
    spec = cfg.pixel_spec
    meta = {
        "s2_scales": list(cfg.s2.scales) if cfg.s2 is not None else None,
        "vision_feature_layer": cfg.vision_feature_layer,
        "num_prefix_tokens": cfg.vision.num_prefix_tokens,
        "image_size": cfg.image_size,
        "image_mean": list(spec.mean), "image_std": list(spec.std), "pad_to_square": bool(pad_to_square),
        "image_token_id": cfg.image_token_id,
        "num_image_tokens": cfg.num_image_tokens,
        "adapter": cfg.adapter,
        "visual_token_scale_folded": float(cfg.visual_token_scale),
    }
    path = os.path.join(out_dir, S2_FILE)
    _write_json(path, meta)
    return files + [path]


def load_adapter(path: str, kind: str | None = None) -> tuple[str, dict]:
    """Reads :func:`export_adapter`'s file (or a folder holding it): (kind, adapter params)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter file {path}")
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kind = kind or meta.get("mm_projector_type") or ("mlp2x_gelu" if "model.mm_projector.2.weight" in tensors else "linear")
    return kind, mapping.load(adapter_mapping(kind), mapping.DictReader(tensors, path))


# ----------------------------------------------------------------------------------------------
# Import


def read_llava_config(folder: str) -> dict:
    """The folder's ``config.json``; FileNotFoundError / ValueError naming the file otherwise."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: config.json is missing (expected a Hugging Face Llava folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _detect_naming(reader: mapping.TensorReader, folder: str) -> str:
    keys = set(reader.keys())
    for naming, (_, _, lm, _) in _NAMINGS.items():
        if f"{lm}embed_tokens.weight" in keys:
            return naming
    raise mapping.MissingTensorError(
        f"{folder}: no language-model embedding (looked for {NAMING_DISK[2]}embed_tokens.weight and "
        f"{NAMING_MEMORY[2]}embed_tokens.weight); not a Llava checkpoint or an incomplete one"
    )


def load_llava_params(
    cfg: MLLMConfig,
    folder: str,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    dtype: Any = np.float32,
) -> dict:
    """The parameters of ``cfg`` from the folder's safetensors, leaf by leaf, each placed directly
    with its sharding (logical rules on ``mesh``; without a mesh, on the first local device)."""
    reader = mapping.SafetensorsReader(folder)
    naming = _detect_naming(reader, folder)
    plist = llava_param_mapping(cfg, naming)
    abstract = mllm_abstract_params(cfg)
    expected = nn.unbox(abstract)
    shardings = sharding.placements(abstract, mesh, rules)
    head = _NAMINGS[naming][3]
    params = mapping.load(plist, reader, shardings=shardings, dtype=dtype, expected=expected)
    ignore = lambda n: n.endswith("rotary_emb.inv_freq") or (cfg.llm.tie_embeddings and n == head)  # noqa: E731
    mapping.warn_unused(plist, reader, folder, ignore)
    if isinstance(cfg.vision, clip.CLIPConfig) and "visual_projection" not in params["vision"]["img"]:
        # A Llava's CLIPVisionModel has no visual projection: only semantic labels read it, and they
        # need the CLIP checkpoint (its text tower too); zeros keep the tree the model's.
        proj = expected["vision"]["img"]["visual_projection"]
        where = shardings["vision"]["img"]["visual_projection"]
        params["vision"]["img"]["visual_projection"] = jax.tree.map(
            lambda x, sh: jax.device_put(np.zeros(x.shape, dtype), sh), proj, where)
    return fold_visual_scale(cfg, params, unfold=True)


def import_llava(
    folder: str,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    weights_dtype: Any = np.float32,
    **llm_overrides,
) -> tuple[MLLMConfig, dict, Any]:
    """A sea_jax model from a Llava folder (ours or any SigLIP + Gemma/Llama/Phi-3 Llava).

    Args:
      folder: the HF folder (config.json, safetensors, tokenizer files).
      mesh, rules: place each leaf directly with its logical sharding.
      weights_dtype: dtype of the returned leaves (float32 master weights).
      llm_overrides: LLMConfig runtime fields (``dtype`` = compute dtype, default bfloat16;
        ``scan_layers``, ``remat``).

    Returns:
      (cfg, params, tokenizer) with ``params = {"vision": {"img"}, "adapter", "llm"}``.

    Raises (each naming the folder and what is missing): FileNotFoundError for a missing folder,
    config.json, safetensors or a shard listed in the index, or tokenizer files;
    :class:`~sea_jax.convert.mapping.MissingTensorError` for a tensor the model needs; ValueError
    for unreadable (truncated) shards, a corrupt index, or a tokenizer whose ``<image>`` id is not
    the config's.
    """
    from sea_jax.tokenizer import load_tokenizer

    hf = read_llava_config(folder)
    cfg = config_from_llava(hf, os.path.join(folder, "config.json"), **llm_overrides)
    params = load_llava_params(cfg, folder, mesh=mesh, rules=rules, dtype=weights_dtype)
    tok = load_tokenizer(folder)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != cfg.image_token_id:
        raise ValueError(
            f"{folder}: the tokenizer maps {IMAGE_TOKEN} to {image_id}, config.json says image_token_index "
            f"{cfg.image_token_id}"
        )
    return cfg, params, tok


__all__ = [
    "IMAGE_TOKEN",
    "FOLDED_SCALE_KEY",
    "fold_visual_scale",
    "NAMING_DISK",
    "NAMING_MEMORY",
    "adapter_params",
    "llava_param_mapping",
    "llava_config",
    "config_from_llava",
    "export_llava",
    "export_adapter",
    "export_parts",
    "S2_FILE",
    "load_adapter",
    "adapter_mapping",
    "read_llava_config",
    "load_llava_params",
    "import_llava",
]
