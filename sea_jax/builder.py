"""The one road from a config to a model: configs, abstract and placed parameters, tokenizers,
SEA's tables, the step's inputs. Every tool (train, aot, export, probe, labels, generate, the
demo) builds through here; nothing else turns a config into a model.

The road, in order (each step usable alone, so ``sea_jax.aot`` stops before any weight is read)::

    sources = read_sources(config)              I/O: the checkpoints' config.json, tokenizer size
    mcfg    = model_config(config, sources)     pure: MLLMConfig (LLM, vision tower, <image> id)
    shapes  = abstract_params(mcfg, mesh)       ShapeDtypeStructs with their shardings
    params  = load_params(config, mcfg, mesh)   placed arrays, equal in tree/shape/dtype/sharding
    tables  = sea_tables(config, ...)           Eq. 8 label table / word tokens, the word table
    inputs  = abstract_step_inputs(...)         (state, frozen, batch) of the train step, abstractly

Architecture rule (LLM and vision tower alike):

* a **checkpoint** set (``llm.checkpoint`` / ``vision.checkpoint``, an HF folder): its
  ``config.json`` is the architecture. ``llm.preset`` and the architecture fields of
  ``*.overrides`` then describe nothing and are not used (a warning lists the ignored overrides);
  the numerics fields (``dtype``, ``remat``, ``scan``; see :data:`LLM_RUNTIME` /
  :data:`VISION_RUNTIME`) apply. A big_vision ``.npz`` carries no config: ``vision.variant`` +
  ``vision.overrides`` describe it (and the load checks every tensor's shape).
* **no checkpoint** (empty or a recipe placeholder): ``llm.preset`` / ``vision.variant`` plus all
  of ``*.overrides`` describe a random-init model (AOT sizing, tests).
* ``vision.image_size`` is the tower's input size either way (a checkpoint trained at another
  size has its position embeddings resampled).
* ``<image>``: added to the LLM tokenizer as a special token; its id is the tokenizer's length
  (or its existing id) and the embedding grows to hold it when it falls outside, new rows = the
  mean row (HF ``resize_token_embeddings(mean_resizing=True)``). Without a tokenizer (AOT of a
  recipe whose paths are placeholders) the preset's released tokenizer length is used
  (:data:`PRESET_TOKENIZER_LEN`), or ``llm.overrides.vocab_size`` for a shrunk preset.

Random init: every part from the config's seed (vision ``seed+1``, LLM ``seed+2``, adapter
``seed+3``). Stage 2 takes adapter and tau from the stage-1 run (``train.init_from``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sea_jax import config as config_lib
from sea_jax import sharding, storage
from sea_jax.errors import ConfigError, PathError
from sea_jax.models import llm as llm_lib
from sea_jax.models import siglip
from sea_jax.models.adapter import Adapter
from sea_jax.models.mllm import MLLMConfig, head_capacity
from sea_jax.models.mllm import abstract_params as mllm_abstract_params
from sea_jax.train_step import StepConfig, TrainState, batch_shardings, make_optimizer

PARTS = ("vision", "adapter", "llm", "log_tau")

# len(tokenizer) of each preset's released tokenizer: where <image> lands when no tokenizer is at
# hand (AOT of a recipe with placeholder paths). Gemma 256000 (= its rows, so <image> adds one),
# Llama 2 / Vicuna 32000, Llama 3 128256, Phi-3-mini 32011 (its embedding has 32064 rows: room).
PRESET_TOKENIZER_LEN = {
    "gemma_2b": 256_000, "gemma_7b": 256_000, "gemma2_2b": 256_000,
    "vicuna_7b": 32_000, "vicuna_13b": 32_000,
    "llama3_8b": 128_256, "llama31_8b": 128_256,
    "phi3_mini": 32_011,
}

# Fields an override may set on a checkpoint's architecture (numerics and memory, not shapes).
LLM_RUNTIME = ("dtype", "param_dtype", "scan_layers", "remat")
VISION_RUNTIME = ("dtype", "param_dtype", "scan", "remat", "remat_policy", "patch_features")


# ----------------------------------------------------------------------------------------------
# Sources: what must be read from disk to know the architecture


@dataclasses.dataclass(frozen=True)
class Sources:
    """The facts :func:`model_config` needs from disk, read once by :func:`read_sources`.

    Attributes:
      llm_hf: the LLM checkpoint's config.json, or None (preset).
      vision_hf: the vision checkpoint's config.json (HF folder), or None (.npz or random init).
      tokenizer_len: ``len(tokenizer)`` of the LLM tokenizer before ``<image>`` is added.
      image_token_id: the id ``<image>`` already has in that tokenizer, or None (it is appended).
    """

    llm_hf: dict | None
    vision_hf: dict | None
    tokenizer_len: int
    image_token_id: int | None = None


# Files of a model folder that are weights: everything else (config, tokenizer) is small.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".npz", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


def local_path(path: str, weights: bool = True) -> str:
    """``path`` itself when local; for ``gs://`` a host-local copy of the file or folder
    (:func:`sea_jax.storage.local_copy`: cached by the objects' sizes and generations, so a
    restarted run downloads nothing again). ``weights=False`` copies only a folder's small files
    (config and tokenizer files, not :data:`WEIGHT_SUFFIXES`): what reading a tokenizer needs.

    Model checkpoints are read by libraries that want local files (safetensors' memory map,
    tokenizers, numpy's ``.npz``), hence the copy; the run's own outputs are written to the bucket
    directly (:mod:`sea_jax.storage`, Orbax)."""
    if not storage.is_remote(path):
        return path
    if weights or not storage.isdir(path):
        return storage.local_copy(path)
    names = [n for n in storage.listdir(path) if not n.endswith(WEIGHT_SUFFIXES)]
    copies = [storage.local_copy(storage.join(path, n)) for n in names if storage.isfile(storage.join(path, n))]
    if not copies:
        raise PathError(f"{path}: no config or tokenizer files in this folder")
    return os.path.dirname(copies[0])


def _read_json(path: str, field: str) -> dict:
    if not storage.exists(path):
        raise PathError(f"config.{field}: {path} does not exist (expected a Hugging Face model folder)")
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"config.{field}: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def read_vision_hf(config) -> dict | None:
    """The vision checkpoint's config.json when it is an HF folder, else None."""
    vis = config.vision.checkpoint
    if config_lib.is_set(vis) and storage.isdir(vis):
        return _read_json(storage.join(vis, "config.json"), "vision.checkpoint")
    return None


def read_sources(config, tokenizer: Any | None = None) -> Sources:
    """Reads the checkpoints' ``config.json`` and the tokenizer's size (no weights).

    ``tokenizer``: the LLM tokenizer if already loaded (with or without ``<image>``); otherwise
    it is read when ``llm.tokenizer`` or ``llm.checkpoint`` is a real path, else the preset's
    :data:`PRESET_TOKENIZER_LEN` is used.
    """
    llm_hf = _read_json(storage.join(config.llm.checkpoint, "config.json"), "llm.checkpoint") \
        if config_lib.is_set(config.llm.checkpoint) else None
    vision_hf = read_vision_hf(config)
    if tokenizer is None and (config_lib.is_set(config.llm.tokenizer) or config_lib.is_set(config.llm.checkpoint)):
        tokenizer = load_llm_tokenizer(config, add_image_token=False)
    if tokenizer is not None:
        token = config.model.image_token
        existing = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        # an <image> the tokenizer already has does not count towards the length it had without it
        n = len(tokenizer) - (1 if existing is not None and existing == len(tokenizer) - 1 else 0)
        return Sources(llm_hf, vision_hf, n, existing if existing is not None and existing < n else None)
    # No tokenizer: a preset shrunk to `overrides.vocab_size` rows is taken to have a tokenizer of
    # that size; a full preset, its released tokenizer's.
    overrides = _overrides(config.llm)
    if llm_hf is None and "vocab_size" in overrides:
        return Sources(llm_hf, vision_hf, int(overrides["vocab_size"]))
    preset = config.llm.preset
    if preset not in PRESET_TOKENIZER_LEN:
        raise PathError("config.llm.tokenizer: no tokenizer to size <image> with; set --config.llm.tokenizer=... "
                        f"(or a preset with a known tokenizer: {sorted(PRESET_TOKENIZER_LEN)})")
    return Sources(llm_hf, vision_hf, PRESET_TOKENIZER_LEN[preset])


# ----------------------------------------------------------------------------------------------
# Model configs (pure)


def _overrides(section) -> dict:
    return dict(section.overrides.to_dict() if hasattr(section.overrides, "to_dict") else section.overrides or {})


def _ignored(name: str, overrides: Mapping, runtime: Sequence[str], checkpoint_cfg: Any) -> dict:
    """The overrides a checkpoint takes (numerics); a warning names the architecture overrides
    whose value differs from the checkpoint's (those equal to it describe the same model)."""
    used = {k: v for k, v in overrides.items() if k in runtime}
    differ = sorted(k for k, v in overrides.items() if k not in runtime and getattr(checkpoint_cfg, k, None) != v)
    if differ:
        logging.warning("config.%s.overrides %s not used: the checkpoint's config.json gives the architecture",
                        name, differ)
    return used


def base_llm_config(config, sources: Sources) -> llm_lib.LLMConfig:
    """The LLM's architecture before ``<image>`` (the checkpoint's, or the preset's), with the
    config's numerics."""
    numerics = dict(dtype=jnp.dtype(config.llm.dtype), scan_layers=bool(config.llm.scan_layers), remat=config.llm.remat)
    overrides = _overrides(config.llm)
    if sources.llm_hf is not None:
        from sea_jax.convert import hf_llm

        used = _ignored("llm", overrides, LLM_RUNTIME, hf_llm.config_from_hf(sources.llm_hf))
        return hf_llm.config_from_hf(sources.llm_hf, **numerics, **used)
    if not config.llm.preset:
        raise PathError("config.llm.checkpoint is empty and no config.llm.preset is given; "
                        "set --config.llm.checkpoint=... (an HF folder)")
    if config.llm.preset not in llm_lib.PRESETS:
        raise ConfigError(f"config.llm.preset={config.llm.preset!r}: expected one of {sorted(llm_lib.PRESETS)}")
    try:
        return llm_lib.preset(config.llm.preset, **numerics, **overrides)
    except TypeError as e:
        raise ConfigError(f"config.llm.overrides: {e}") from None


def vision_config(config, sources: Sources | None = None):
    """The vision tower's config (SigLIP or CLIP, ``vision.tower``; the checkpoint's, or the
    variant's) at ``vision.image_size``, with the labels' per-patch feature (``labels.feature``).
    Without ``sources`` the vision checkpoint's config.json is read here."""
    from sea_jax.models import clip
    from sea_jax.models.mllm import patch_feature_mode

    vision_hf = read_vision_hf(config) if sources is None else sources.vision_hf
    tower = config.vision.tower
    size = int(config.vision.image_size)
    overrides = _overrides(config.vision)
    numerics = dict(dtype=config.vision.dtype)
    if size:
        numerics["image_size"] = size
    try:
        if tower == "clip":
            from sea_jax.convert import hf_clip

            if vision_hf is not None:
                used = _ignored("vision", overrides, VISION_RUNTIME, hf_clip.config_from_hf(vision_hf))
                cfg = hf_clip.config_from_hf(vision_hf, **numerics, **used)
            elif config_lib.is_set(config.vision.checkpoint) and config.vision.checkpoint.endswith(".npz"):
                raise ConfigError("config.vision.checkpoint: a CLIP tower loads from a HF CLIPModel folder, not a .npz")
            else:
                cfg = clip.clip_config(config.vision.variant, **{**numerics, **overrides})
        elif vision_hf is not None:
            from sea_jax.convert import hf_siglip

            used = _ignored("vision", overrides, VISION_RUNTIME, hf_siglip.config_from_hf(vision_hf))
            cfg = hf_siglip.config_from_hf(vision_hf, **numerics, **used)
        else:
            cfg = siglip.siglip_config(config.vision.variant, **{**numerics, **overrides})
        return cfg.replace(patch_features=patch_feature_mode(cfg, config.labels.feature))
    except TypeError as e:
        raise ConfigError(f"config.vision.overrides: {e}") from None
    except ValueError as e:
        raise ConfigError(f"config.vision: {e}") from None


def s2_config(config):
    """The S2 scales of ``vision.s2_scales`` (an empty tuple: no S2)."""
    from sea_jax.models.s2 import S2Config

    scales = tuple(int(x) for x in config.vision.s2_scales)
    if not scales:
        return None
    try:
        return S2Config(scales)
    except ValueError as e:
        raise ConfigError(f"config.vision.s2_scales: {e}") from None


def image_token(config, sources: Sources, llm_vocab: int) -> tuple[int, int]:
    """(``<image>`` id, LLM vocabulary rows that hold it) under the builder's rule."""
    image_id = sources.image_token_id if sources.image_token_id is not None else sources.tokenizer_len
    return int(image_id), max(int(llm_vocab), int(image_id) + 1)


def model_config(config, sources: Sources) -> MLLMConfig:
    """The multimodal model's config: LLM (vocabulary holding ``<image>``), vision tower, wiring."""
    llm = base_llm_config(config, sources)
    image_id, vocab = image_token(config, sources, llm.vocab_size)
    try:
        return MLLMConfig(
            llm=dataclasses.replace(llm, vocab_size=vocab), vision=vision_config(config, sources), image_token_id=image_id,
            vision_feature_layer=int(config.model.vision_feature_layer), adapter=config.model.adapter,
            s2=s2_config(config), scale_visual_tokens=bool(config.model.scale_visual_tokens))
    except ValueError as e:
        raise ConfigError(f"config.vision: {e}") from None


def step_config(config) -> StepConfig:
    """The train step's config (:meth:`StepConfig.from_config`)."""
    return StepConfig.from_config(config)


# ----------------------------------------------------------------------------------------------
# Tokenizers


def load_llm_tokenizer(config, add_image_token: bool = True):
    """The LLM tokenizer (``llm.tokenizer`` or the checkpoint folder) with the chat template of
    ``data.chat_template`` ("" = its own, ``"vicuna_v1"`` = LLaVA's Vicuna format, else a jinja
    string) and, unless told not to, ``<image>`` added as a special token."""
    from sea_jax.data import llava
    from sea_jax.tokenizer import load_tokenizer

    path = config.llm.tokenizer or config.llm.checkpoint
    if not config_lib.is_set(path):
        raise PathError("config.llm.tokenizer is empty and so is config.llm.checkpoint; set --config.llm.tokenizer=...")
    tok = load_tokenizer(local_path(path, weights=False))
    chat = config.data.chat_template
    if chat == "vicuna_v1":
        tok.chat_template = llava.VICUNA_V1_TEMPLATE
    elif chat:
        tok.chat_template = chat
    if add_image_token:
        llava.add_image_token(tok, config.model.image_token)
    return tok


def load_vision_tokenizer(config):
    """(tokenizer, identity) of the vision tower's text side: a HF tokenizer folder, or a
    SentencePiece ``.model`` read as ``SiglipTokenizer`` (its lowercasing and punctuation rules);
    ``vision.tokenizer`` or the checkpoint folder. The identity keys the word-table cache."""
    from sea_jax.align import semantic_labels as L

    path = config.vision.tokenizer or config.vision.checkpoint
    if config_lib.is_set(path):
        path = local_path(path, weights=False)
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # only the tokenizer's own files: the weights in the same folder are the checkpoint's identity
        names = sorted(n for n in os.listdir(path) if not n.endswith((".safetensors", ".bin", ".npz")))
        parts = [f"{n}:{L.file_identity(os.path.join(path, n))}" for n in names
                 if os.path.isfile(os.path.join(path, n)) and n != "config.json"]
    elif path.endswith(".model") and os.path.isfile(path):
        from transformers import SiglipTokenizer

        tok = SiglipTokenizer(vocab_file=path)
        parts = [L.file_identity(path)]
    else:
        raise PathError(f"config.vision.tokenizer: {path!r} is neither a HF tokenizer folder nor a SentencePiece "
                        ".model file; set --config.vision.tokenizer=...")
    return tok, parts


def tokenizer_identity(parts: list[str], max_length: int, prompt: str) -> str:
    """The word-table cache's tokenizer key: the tokenizer files, padding length and prompt."""
    return json.dumps({"files": parts, "max_length": max_length, "prompt": prompt})


# ----------------------------------------------------------------------------------------------
# Abstract parameters


def _adapter(mcfg: MLLMConfig) -> Adapter:
    return Adapter(out_dim=mcfg.llm.hidden, kind=mcfg.adapter, dtype=mcfg.llm.dtype)


def _adapter_input(mcfg: MLLMConfig) -> jax.Array:
    return jnp.zeros((1, mcfg.num_image_tokens, mcfg.adapter_in_dim), jnp.float32)


def param_shardings(mcfg: MLLMConfig, mesh: Mesh) -> dict:
    """Sharding of every parameter (logical-axis rules), ``log_tau`` replicated."""
    out = sharding.tree_shardings(mllm_abstract_params(mcfg), mesh)
    out["log_tau"] = NamedSharding(mesh, PartitionSpec())
    return out


def abstract_params(mcfg: MLLMConfig, mesh: Mesh) -> dict:
    """``{"vision": {"img"}, "adapter", "llm", "log_tau"}`` as ShapeDtypeStructs with shardings."""
    shapes = nn.unbox(mllm_abstract_params(mcfg))
    shapes["log_tau"] = jax.ShapeDtypeStruct((), jnp.float32)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        param_shardings(mcfg, mesh))


def abstract_of(tree) -> Any:
    """The ShapeDtypeStructs (with shardings) of placed arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------------------------
# Loading


def load_vision(config, mcfg_vision, mesh: Mesh) -> tuple[dict, str]:
    """(params ``{"img", "txt", ...}`` placed on ``mesh``, identity) of the vision tower: the
    checkpoint (SigLIP: HF folder or big_vision ``.npz``; CLIP: HF folder) or a random init from
    ``seed + 1``. The identity (file hash, or the seed and config) keys the word-table cache."""
    from sea_jax.align import semantic_labels as L
    from sea_jax.models.mllm import tower_module

    ckpt = config.vision.checkpoint
    if config_lib.is_set(ckpt):
        ckpt = local_path(ckpt)
        if config.vision.tower == "clip":
            from sea_jax.convert import hf_clip

            _, params = hf_clip.load_hf_clip(ckpt, mesh, cfg=mcfg_vision)
        elif os.path.isdir(ckpt):
            from sea_jax.convert import hf_siglip

            _, params = hf_siglip.load_hf_siglip(ckpt, mesh, cfg=mcfg_vision)
        elif ckpt.endswith(".npz"):
            from sea_jax.convert import big_vision

            params = big_vision.load_big_vision(ckpt, mcfg_vision, mesh)
        else:
            raise PathError(f"config.vision.checkpoint={ckpt!r} is neither a HF folder nor a .npz file")
        return params, L.file_identity(ckpt)
    params = tower_module(mcfg_vision).init_params(mcfg_vision, jax.random.key(int(config.seed) + 1), mesh)
    return params, f"random:{config.seed}:{mcfg_vision}"


def _grow_vocab(base: llm_lib.LLMConfig, params: dict, vocab: int, mesh: Mesh) -> dict:
    """Appends embedding rows (and untied LM-head columns) up to ``vocab``, each the mean of the
    old ones (HF ``resize_token_embeddings(mean_resizing=True)``): the ``<image>`` row is never
    read as an input (visual tokens replace it) but is a logit, which should start unremarkable."""
    extra = vocab - base.vocab_size
    shardings = llm_lib.param_shardings(dataclasses.replace(base, vocab_size=vocab), mesh)

    def grow(p):
        p = dict(p)
        emb = p["embedder"]["embedding"]
        rows = jnp.broadcast_to(emb.mean(0, keepdims=True), (extra, emb.shape[1])).astype(emb.dtype)
        p["embedder"] = dict(p["embedder"], embedding=jnp.concatenate([emb, rows], 0))
        if "lm_head" in p:
            k = p["lm_head"]["kernel"]  # [hidden, vocab]
            cols = jnp.broadcast_to(k.mean(1, keepdims=True), (k.shape[0], extra)).astype(k.dtype)
            p["lm_head"] = dict(p["lm_head"], kernel=jnp.concatenate([k, cols], 1))
        return p

    return jax.jit(grow, out_shardings=shardings)(params)


def load_llm(config, sources: Sources, mcfg: MLLMConfig, mesh: Mesh) -> dict:
    """The LLM's parameters placed on ``mesh``: the checkpoint's or a random init from
    ``seed + 2``, grown to ``mcfg.llm.vocab_size`` rows for ``<image>``."""
    base = base_llm_config(config, sources)
    if sources.llm_hf is not None:
        from sea_jax.convert import hf_llm, mapping

        params = hf_llm.load_params(base, mapping.SafetensorsReader(local_path(config.llm.checkpoint)), mesh=mesh)
    else:
        params = llm_lib.init_params(base, jax.random.key(int(config.seed) + 2), mesh)
    if mcfg.llm.vocab_size != base.vocab_size:
        logging.info("LLM vocabulary %d -> %d rows for %s (id %d)", base.vocab_size, mcfg.llm.vocab_size,
                     config.model.image_token, mcfg.image_token_id)
        params = _grow_vocab(base, params, mcfg.llm.vocab_size, mesh)
    return params


def init_adapter(config, mcfg: MLLMConfig, mesh: Mesh) -> dict:
    """A fresh adapter from ``seed + 3``, placed on ``mesh``."""
    adapter = _adapter(mcfg)
    feats = _adapter_input(mcfg)
    shard = sharding.tree_shardings(jax.eval_shape(lambda: adapter.init(jax.random.key(0), feats)["params"]), mesh)
    return jax.jit(lambda k: nn.unbox(adapter.init(k, feats)["params"]), out_shardings=shard)(
        jax.random.key(int(config.seed) + 3))


def restore_trained(run, step: int | None = None) -> tuple[int, dict]:
    """(step, trainable params as numpy) of a run folder's checkpoint (default the newest)."""
    from sea_jax.checkpoint import Checkpointer

    return Checkpointer(run.checkpoints, async_save=False).restore_params(step)


def load_params(config, sources: Sources, mcfg: MLLMConfig, mesh: Mesh, *, parts: Sequence[str] = PARTS,
                workdir: str | None = None, vision: Mapping | None = None) -> dict:
    """The parameters named in ``parts`` (of :data:`PARTS`), placed on ``mesh`` with the shardings
    of :func:`abstract_params`.

    Stage 2 takes adapter and tau from the stage-1 run (:func:`sea_jax.rundir.init_from_run` of
    ``workdir``); stage 1 starts them fresh (adapter from ``seed + 3``, ``log tau`` at
    ``log(sea.tau_init)``). ``vision``: the tower's tree if already loaded (:func:`load_vision`).
    """
    from sea_jax import rundir

    rep = NamedSharding(mesh, PartitionSpec())
    params: dict[str, Any] = {}
    if "llm" in parts:
        params["llm"] = load_llm(config, sources, mcfg, mesh)
    if "vision" in parts:
        if vision is None:
            vision, _ = load_vision(config, mcfg.vision, mesh)
        params["vision"] = {"img": vision["img"]}
    if "adapter" in parts or "log_tau" in parts:
        adapter = init_adapter(config, mcfg, mesh)
        log_tau = jnp.asarray(math.log(float(config.sea.tau_init)), jnp.float32)
        src = rundir.init_from_run(config, workdir)
        if src is not None:
            step, trained = restore_trained(src)
            if "adapter" not in trained:
                raise ConfigError(f"config.train.init_from: {src.path} checkpoint step {step} has no adapter "
                                  f"(parts: {sorted(trained)})")
            adapter = jax.device_put(trained["adapter"], jax.tree.map(lambda x: x.sharding, adapter))
            if "log_tau" in trained:
                log_tau = jnp.asarray(trained["log_tau"], jnp.float32)
            logging.info("stage 2 starts from %s step %d (adapter%s)", src.path, step,
                         ", tau" if "log_tau" in trained else "")
        if "adapter" in parts:
            params["adapter"] = adapter
        if "log_tau" in parts:
            params["log_tau"] = jax.device_put(log_tau, rep)
    return params


def check_placed(params: Mapping, abstract: Mapping) -> None:
    """Asserts that placed parameters are exactly the abstract ones (tree, shapes, dtypes,
    shardings): what was compiled is what runs."""
    got = dict(jax.tree_util.tree_leaves_with_path(params))
    want = dict(jax.tree_util.tree_leaves_with_path({k: abstract[k] for k in params}))
    if set(got) != set(want):
        raise AssertionError(f"placed parameters differ from the abstract ones in their tree: "
                             f"{sorted(map(jax.tree_util.keystr, set(got) ^ set(want)))[:6]}")
    for path, x in got.items():
        y = want[path]
        if x.shape != y.shape or jnp.dtype(x.dtype) != jnp.dtype(y.dtype) \
                or not x.sharding.is_equivalent_to(y.sharding, len(x.shape)):
            raise AssertionError(f"placed parameter {jax.tree_util.keystr(path)} is {x.shape} {x.dtype} "
                                 f"{x.sharding}, compiled for {y.shape} {y.dtype} {y.sharding}")


# ----------------------------------------------------------------------------------------------
# SEA tables


def needs_word_table(config) -> bool:
    """On-the-fly labels: the step scores patches against the vision tower's word table."""
    return float(config.sea.lam) != 0 and config.sea.label_source == "on_the_fly"


def word_list(config) -> list[str]:
    """The label vocabulary: the config's word list, or, with precomputed labels, the labeller's
    ``words.txt`` (label ids index it; a different list would silently mislabel)."""
    from sea_jax.align import semantic_labels as L

    if config.sea.label_source == "batch":
        path = storage.join(config.labels.output_dir, "words.txt")
        if not storage.exists(path):
            raise PathError(f"config.labels.output_dir: {path} missing; it must hold `sea_jax.labels` output")
        return L.load_word_list(path)
    if config.labels.word_list != "default" and not storage.exists(config.labels.word_list):
        raise PathError(f"config.labels.word_list={config.labels.word_list!r} does not exist")
    return L.resolve_word_list(config.labels.word_list, int(config.labels.default_size))


def word_table(config, vision_cfg: siglip.SigLIPConfig, text_params: Any, identity: str, words: Sequence[str],
               cache_dir: str | None, *, encode_batch: int = 256, progress: bool = False) -> np.ndarray:
    """T = h(W) (Eq. 5): the vision tower's text embedding of every word, float32 [W, D],
    L2-normalised, cached under ``cache_dir`` by (checkpoint, tokenizer, words)."""
    from sea_jax.align import semantic_labels as L

    from sea_jax.models.mllm import tower_module

    tokenizer, parts = load_vision_tokenizer(config)
    tower = tower_module(vision_cfg).TextTower(vision_cfg)
    encode = jax.jit(lambda p, ids: tower.apply({"params": p}, ids, hidden_states=False).embedding)
    tokenize = L.make_tokenize_fn(tokenizer, max_length=vision_cfg.text_len, template=config.labels.prompt)
    return L.embed_words(lambda ids: encode(text_params, ids), tokenize, list(words), encode_batch,
                         cache_dir=cache_dir, checkpoint_id=identity,
                         tokenizer_id=tokenizer_identity(parts, vision_cfg.text_len, config.labels.prompt),
                         progress=progress)


def sea_tables(config, mcfg: MLLMConfig, tokenizer, llm_embedding: Any, mesh: Mesh, cache_dir: str | None,
               vision: tuple[Mapping, str] | None = None) -> dict:
    """Frozen SEA inputs of the step, replicated on ``mesh``: ``label_table`` [W, d] (Eq. 8 from the
    frozen LLM's input embedding) or, when the LLM is trained, ``word_tokens`` (the step recomputes
    Eq. 8); and, for on-the-fly labels, ``word_table`` [W, dj]. Empty with lambda = 0.
    ``vision``: (tree, identity) of :func:`load_vision` if already loaded."""
    from sea_jax.align import loss as loss_lib

    if float(config.sea.lam) == 0:
        return {}
    words = word_list(config)
    rep = NamedSharding(mesh, PartitionSpec())
    wt = loss_lib.tokenize_words(tokenizer, words)
    out: dict[str, Any] = {}
    if "llm" in config.train.trainable:
        out["word_tokens"] = jax.device_put({"ids": wt.ids, "mask": wt.mask}, rep)
    else:
        out["label_table"] = jax.device_put(jax.jit(loss_lib.label_embedding_table)(llm_embedding, wt.ids, wt.mask), rep)
    if needs_word_table(config):
        tree, identity = vision if vision is not None else load_vision(config, mcfg.vision, mesh)
        table = word_table(config, mcfg.vision, tree["txt"], identity, words, cache_dir,
                           progress=jax.process_index() == 0)
        out["word_table"] = jax.device_put(jnp.asarray(table), rep)
    logging.info("SEA tables: %d words (%s labels)", len(words), config.sea.label_source)
    return out


def abstract_tables(config, mcfg: MLLMConfig, mesh: Mesh, num_words: int, word_tokens_len: int = 8) -> dict:
    """:func:`sea_tables` as replicated ShapeDtypeStructs (for compiling without the tables)."""
    rep = NamedSharding(mesh, PartitionSpec())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    out: dict[str, Any] = {}
    if float(config.sea.lam) == 0:
        return out
    if "llm" in config.train.trainable:  # Eq. 8 follows the trained embedding: token ids, not a table
        out["word_tokens"] = {"ids": sds((num_words, word_tokens_len), jnp.int32),
                              "mask": sds((num_words, word_tokens_len), jnp.bool_)}
    else:
        out["label_table"] = sds((num_words, mcfg.llm.hidden), jnp.float32)
    if needs_word_table(config):
        out["word_table"] = sds((num_words, mcfg.vision.out_dim), jnp.float32)
    return out


# ----------------------------------------------------------------------------------------------
# The step's inputs


def optimizer(config, total_steps: int):
    """(AdamW with warmup + cosine, schedule) of ``config.optim`` over ``total_steps``; the parts
    of ``optim.group_lr`` and log tau (``sea.log_tau_lr`` > 0) get their own peak lr."""
    group = dict(config.optim.group_lr or {})
    if float(config.sea.log_tau_lr) > 0:
        group["log_tau"] = float(config.sea.log_tau_lr)
    return make_optimizer(float(config.optim.lr), int(total_steps), float(config.optim.warmup_ratio),
                          float(config.optim.weight_decay), group, float(config.optim.clip_norm) or None)


def abstract_state(abstract_trainable: Mapping, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The train state (step, trainable params, optimizer state) as ShapeDtypeStructs: optimizer
    moments take their parameter's sharding, counters are replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    opt_shapes = jax.eval_shape(tx.init, abstract_trainable)
    opt_shards = optax.tree_map_params(
        tx, lambda _, sh: sh, opt_shapes, jax.tree.map(lambda x: x.sharding, abstract_trainable),
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shapes, opt_shards)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), dict(abstract_trainable), opt)


def length_buckets(config) -> tuple[int, ...]:
    """The sequence lengths the trainer compiles a step for (``data.length_buckets`` plus
    ``data.max_length``, ascending; :mod:`sea_jax.data.buckets`)."""
    from sea_jax.data import buckets

    return buckets.parse_buckets(config.data.get("length_buckets", ""), int(config.data.max_length))


def abstract_batch(config, mcfg: MLLMConfig, mesh: Mesh, length: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as the data pipeline delivers it (``sea_jax.data.pipeline``), abstractly;
    ``length``: the sequence length (a bucket; default ``data.max_length``)."""
    b, s = int(config.train.batch_size), mcfg.image_size
    length = int(length or config.data.max_length)
    batch = {
        "images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((b, length), jnp.bool_),
        "has_image": jax.ShapeDtypeStruct((b,), jnp.bool_),
    }
    if float(config.sea.lam) != 0 and config.sea.label_source == "batch":
        shape = (b, mcfg.num_image_tokens, int(config.labels.top_n))
        batch["label_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32)
        batch["label_scores"] = jax.ShapeDtypeStruct(shape, jnp.float32)
    shards = batch_shardings(mesh, batch)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shards[k]) for k, v in batch.items()}


def abstract_step_inputs(config, mcfg: MLLMConfig, mesh: Mesh, tx: optax.GradientTransformation, num_words: int,
                         word_tokens_len: int = 8, length: int | None = None) -> tuple[TrainState, dict, dict]:
    """(state, frozen, batch) of the train step as sharded ShapeDtypeStructs: parameters by the
    logical-axis rules, optimizer moments with their parameter, SEA's tables replicated, the batch
    split over (data, fsdp). Nothing real-size is allocated."""
    from sea_jax.train_step import split_params

    trainable, frozen = split_params(abstract_params(mcfg, mesh), tuple(config.train.trainable))
    frozen.update(abstract_tables(config, mcfg, mesh, num_words, word_tokens_len))
    return abstract_state(trainable, tx, mesh), frozen, abstract_batch(config, mcfg, mesh, length)


def lower_step(config, mcfg: MLLMConfig, mesh: Mesh, tx: optax.GradientTransformation, schedule, inputs: tuple):
    """The train step lowered for ``mesh`` from abstract ``inputs`` (:func:`abstract_step_inputs`):
    what ``sea_jax.train`` compiles and runs and ``sea_jax.aot`` compiles for a TPU slice."""
    from sea_jax.models.mllm import MLLM
    from sea_jax.train_step import make_train_step

    shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    step = make_train_step(MLLM(mcfg), step_config(config), tx, schedule, mesh, *map(shard_of, inputs))
    return step.lower(*inputs)


def check_batch_split(config, mesh: Mesh, process_count: int = 1, where: str = "") -> None:
    """The global batch, and each microbatch of it, must split evenly over the chips that shard
    the batch (and the batch over the processes); raises ConfigError naming what would work."""
    b, mb = int(config.train.batch_size), int(config.train.microbatches)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    on = f"mesh {dict(mesh.shape)}{where}"
    if b % shards or b % process_count:
        raise ConfigError(f"config.train.batch_size {b} must be a multiple of the {shards} batch shards of {on} "
                          f"and of the {process_count} processes")
    if b % (mb * shards):
        raise ConfigError(f"config.train.batch_size {b} in train.microbatches {mb} gives microbatches of {b / mb:g} "
                          f"rows, not a multiple of the {shards} batch shards of {on}; set "
                          f"--config.train.microbatches to a divisor of {b // shards}")


def flop_spec(config, mcfg: MLLMConfig, abstract: Mapping, num_words: int, length: int | None = None):
    """The analytic FLOP count's inputs (:class:`sea_jax.metrics.FlopSpec`) for this model and a
    batch of ``length`` tokens per row (default ``data.max_length``)."""
    from sea_jax import metrics

    on_the_fly = needs_word_table(config)
    seq_len = int(length or config.data.max_length)
    return metrics.FlopSpec(
        batch=int(config.train.batch_size), seq_len=seq_len,
        llm_matmul_params=metrics.llm_matmul_params(abstract["llm"], mcfg.llm.vocab_size, mcfg.llm.hidden),
        llm_layers=mcfg.llm.n_layers, llm_heads=mcfg.llm.n_heads, llm_head_dim=mcfg.llm.head_dim,
        vision_params=metrics.count_params(abstract["vision"]), vision_layers=mcfg.vision.depth,
        vision_width=mcfg.vision.width, patches=mcfg.num_image_tokens,
        adapter_params=metrics.count_params(abstract["adapter"]),
        trainable=frozenset(p for p in config.train.trainable if p != "log_tau"),
        label_words=num_words if on_the_fly else 0, label_dim=mcfg.vision.width if on_the_fly else 0,
        head_params=mcfg.llm.vocab_size * mcfg.llm.hidden, head_positions=head_capacity(mcfg, seq_len))


# ----------------------------------------------------------------------------------------------
# A trained run


@dataclasses.dataclass
class TrainedModel:
    """A training run's model, as export, generation, the probe and evaluation use it.

    Attributes:
      config: the run's config (its ``config.json``).
      cfg: the model config.
      params: the full tree ``{"vision": {"img"}, "adapter", "llm", "log_tau"}``: trained parts from
        the checkpoint, frozen parts reloaded as training loaded them.
      tokenizer: the tokenizer as trained (``<image>`` added, chat template set).
      run: the run folder (:class:`sea_jax.rundir.RunDir`).
      step: the checkpoint step.
    """

    config: Any
    cfg: MLLMConfig
    params: dict
    tokenizer: Any
    run: Any
    step: int

    @property
    def pad_to_square(self) -> bool:
        return bool(self.config.data.pad_to_square)

    @property
    def chat_template(self) -> str | None:
        """The template an export or a prompt uses: LLaVA's plain format (image then text) for a
        run trained on ``data.template = "plain"`` (stage 1), else None (the tokenizer's own)."""
        from sea_jax.convert.llava_files import PLAIN_CHAT_TEMPLATE

        return PLAIN_CHAT_TEMPLATE if self.config.data.template == "plain" else None


def load_trained(workdir: str, *, stage: int | None = None, step: int | None = None, mesh: Mesh | None = None,
                 to_host: bool = True, vision: Mapping | None = None) -> TrainedModel:
    """A trained run of ``workdir`` (``stage``, default the highest; ``step``, default the newest
    that restores), with the frozen parts reloaded as training loaded them.

    ``mesh``: where parameters are placed (default one local device); ``to_host`` returns numpy;
    ``vision``: the run's vision tower tree if already loaded (:func:`load_vision`).
    """
    from sea_jax import rundir
    from sea_jax.tokenizer import load_tokenizer

    run = rundir.RunDir.find(workdir, stage)
    config = run.load_config()
    at, trained = restore_trained(run, step)
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1}, jax.local_devices()[:1])
    # the tokenizer the run saved: <image> added, the chat template it trained with
    tokenizer = load_tokenizer(local_path(run.tokenizer)) if run.has_tokenizer() else load_llm_tokenizer(config)
    sources = read_sources(config, tokenizer)
    mcfg = model_config(config, sources)
    frozen = load_params(config, sources, mcfg, mesh, parts=[p for p in PARTS if p not in trained],
                         workdir=run.workdir, vision=vision)
    params = {**frozen, **(trained if to_host else jax.device_put(trained, {k: v for k, v in
                                                                          param_shardings(mcfg, mesh).items()
                                                                          if k in trained}))}
    if to_host:
        params = jax.tree.map(np.asarray, params)
    return TrainedModel(config, mcfg, params, tokenizer, run, at)


def total_steps(config, num_samples: int | None) -> int:
    """Optimizer steps of the run: ``train.num_steps``, or epochs x samples / batch."""
    if int(config.train.num_steps) > 0:
        return int(config.train.num_steps)
    if not num_samples:
        raise ConfigError("the dataset size is unknown; set --config.train.num_steps")
    return max(1, math.ceil(float(config.train.num_epochs) * num_samples / int(config.train.batch_size)))


__all__ = [
    "PARTS", "PRESET_TOKENIZER_LEN", "Sources", "read_vision_hf", "read_sources", "base_llm_config", "vision_config",
    "s2_config", "model_config",
    "image_token", "step_config", "length_buckets", "local_path", "load_llm_tokenizer", "load_vision_tokenizer", "tokenizer_identity",
    "param_shardings", "abstract_params", "abstract_of", "load_vision", "load_llm",
    "init_adapter", "restore_trained", "load_params", "check_placed", "needs_word_table", "word_list",
    "word_table", "sea_tables", "abstract_tables", "optimizer", "abstract_state",
    "abstract_batch", "abstract_step_inputs", "lower_step", "check_batch_split", "flop_spec", "TrainedModel", "load_trained", "total_steps",
]
