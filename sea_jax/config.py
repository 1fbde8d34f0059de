"""The one configuration schema: every field any tool reads, its default and its meaning.

Config files under ``configs/`` (big_vision style: ``get_config(arg=None)`` returning an
``ml_collections.ConfigDict``) start from :func:`base_config` (usually through
:mod:`sea_jax.recipes`) and change what differs. Every field exists here, in exactly one place, so
``--config.a.b=value`` works for every field with every config, and every tool
(``sea_jax.train``, ``labels``, ``aot``, ``export``, ``probe``, ``generate``, the demo) reads the
same names. Typed views validated once live next to their users (``StepConfig.from_config`` in
:mod:`sea_jax.train_step`); :func:`validate` checks the enumerated fields up front.

Paths: a path field may be empty (unused, or a default derived from the workdir) or a
*placeholder* (``SET_ME:<what to put here>``, :data:`PLACEHOLDER`) that recipes ship so a forgotten
path fails with a message naming the field. :func:`is_set` tells a real path from both. Every
real path may be local or ``gs://bucket/key`` (:mod:`sea_jax.storage`).

A run saves its resolved config as ``config.json`` in its run folder (:mod:`sea_jax.rundir`);
:func:`from_json` reads it back onto the current schema, so a run saved by an older version (with
fewer fields) still loads, and an unknown field is an error rather than silently dropped.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from sea_jax.errors import ConfigError

# A recipe's path that the user must replace; ``SET_ME:`` never exists on disk.
PLACEHOLDER = "SET_ME:"

# Enumerated fields: (section, field) -> allowed values.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("vision", "tower"): ("siglip", "clip"),
    ("model", "adapter"): ("mlp2x_gelu", "linear"),
    ("llm", "remat"): ("none", "full", "dots", "dots_no_batch"),
    ("labels", "feature"): ("joint", "raw"),
    ("labels", "matmul_precision"): ("highest", "high", "default"),
    ("sea", "label_source"): ("on_the_fly", "batch"),
    ("data", "kind"): ("llava_json", "array_record", "tfds"),
    ("data", "template"): ("plain", "chat"),
    ("data", "on_exhausted"): ("restart", "stop"),
}


def is_set(path: str) -> bool:
    """True for a real path: neither empty nor a recipe placeholder."""
    return bool(path) and not str(path).startswith(PLACEHOLDER)


def base_config() -> ml_collections.ConfigDict:
    """Every field, at its default: the LLaVA-1.5 / SEA stage-1 recipe; sizes left to configs."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # every random choice is a function of (seed, step): data order, init, label sampling
    c.stage = 1  # 1: adapter pretraining (+ SEA); 2: instruction tuning
    # "module:function" run instead of the trainer by `python -m sea_jax.train` (the embedded
    # demo's whole story); "" = the trainer, sea_jax.train.train(config, workdir).
    c.runner = ""

    # Mesh of the train step: axis sizes, -1 = the rest of the devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # LLM. Architecture rule (sea_jax.builder): with a checkpoint, its config.json is the
    # architecture and preset/overrides are not used; without one, preset + overrides describe a
    # random-init model (AOT sizing, tests). dtype / remat / scan_layers apply either way.
    c.llm = ml_collections.ConfigDict()
    c.llm.checkpoint = ""  # HF folder: config.json + safetensors (+ tokenizer files)
    c.llm.preset = ""  # a name of sea_jax.models.llm.PRESETS
    c.llm.overrides = ml_collections.ConfigDict()  # more LLMConfig fields for the preset (a shrunk model)
    c.llm.tokenizer = ""  # a tokenizer folder; "" = the checkpoint folder
    c.llm.dtype = "bfloat16"  # compute dtype
    c.llm.remat = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    c.llm.scan_layers = True

    # Vision tower: a HF folder (config.json + safetensors) or a big_vision .npz (then `variant`
    # names the architecture). Same architecture rule as the LLM for HF folders; `overrides` may
    # always set the numerics/memory fields (scan, remat, remat_policy).
    c.vision = ml_collections.ConfigDict()
    c.vision.tower = "siglip"  # or "clip" (HF CLIPModel folders; LLaVA-1.5's ViT-L/14@336)
    c.vision.checkpoint = ""
    c.vision.variant = "So400m/14"  # architecture of a .npz or of a random-init tower
    c.vision.image_size = 384  # input pixels per side (a checkpoint's position embeddings are resampled)
    c.vision.tokenizer = ""  # the text tower's tokenizer: HF folder or SentencePiece .model; "" = the checkpoint folder
    c.vision.dtype = "bfloat16"
    c.vision.overrides = ml_collections.ConfigDict()  # more tower config fields (scan, remat, a shrunk tower)
    c.vision.s2_scales = ()  # S2 multi-scale features, e.g. (336, 672, 1008) (base = image_size); () = none

    # The multimodal wiring.
    c.model = ml_collections.ConfigDict()
    c.model.adapter = "mlp2x_gelu"  # LLaVA-1.5's projector; or "linear"
    c.model.vision_feature_layer = -2  # HF numbering of the image tower's hidden states
    c.model.image_token = "<image>"  # placeholder added to the LLM tokenizer as a special token
    # Gemma: visual tokens times sqrt(hidden) like the text rows, as the paper's code (transformers 4)
    # trained; the export folds the factor into the adapter (transformers 5 scales text rows only).
    c.model.scale_visual_tokens = True

    # Semantic labels (paper Eq. 4-6): on-the-fly labelling in the step and `sea_jax.labels`.
    c.labels = ml_collections.ConfigDict()
    c.labels.word_list = "default"  # a one-word-per-line file (e.g. 2of12.txt), or "default" (wordfreq)
    c.labels.default_size = 40_000  # words of the "default" list
    c.labels.prompt = "{}"  # template a word is embedded in by the text tower ("{}" = the bare word)
    c.labels.top_n = 10  # labels kept per patch (score > 0 only)
    c.labels.negate_similarity = False  # rank by -cos (Eq. 6 as printed, CLIP Surgery): True for CLIP, False for SigLIP
    c.labels.feature = "joint"  # per-patch joint-space feature (SigLIP: MAP head; CLIP: final LN + projection), or "raw"
    c.labels.output_dir = ""  # offline labels (`sea_jax.labels` output); "" = <workdir>/labels
    c.labels.cache_dir = ""  # word-table cache; "" = <run folder>/word_table_cache
    # the word table is scored this many words at a time with a running top-n, by the step's
    # on-the-fly labels and the offline labeller alike (0 = all at once: a [batch, patches, words] array)
    c.labels.chunk_size = 4096
    # offline labelling (`python -m sea_jax.labels`) only:
    c.labels.batch_size = 32  # images per device step on each host (a multiple of its batch shards)
    c.labels.text_batch_size = 256  # words per text-tower call while embedding the list
    c.labels.shard_size = 1024  # images per output shard
    c.labels.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # per-host mesh
    c.labels.word_axes = "tensor"  # mesh axes splitting the word table ("" = replicated)
    c.labels.matmul_precision = "highest"  # of the patch-word similarity: "highest" | "high" | "default"
    c.labels.num_workers = 8  # image-decoding threads per host
    c.labels.max_shards = 0  # stop after this many shards in this run (0 = no limit); a rerun resumes
    c.labels.process_index = -1  # -1 = jax.process_index(); set both to run hosts as independent jobs
    c.labels.process_count = -1

    # SEA objective (Eq. 7-11).
    c.sea = ml_collections.ConfigDict()
    c.sea.lam = 1.0  # lambda of Eq. 11; 0 = plain LLaVA training
    c.sea.window = 2  # k of the k x k sampling windows
    c.sea.label_source = "on_the_fly"  # or "batch": labels precomputed by `python -m sea_jax.labels`
    c.sea.tau_init = 1.0  # tau at step 0 (learned as log tau): the paper's "tau = 0" read as log tau = 0
    c.sea.log_tau_lr = 0.0  # peak lr of log tau (same schedule); 0 = optim.lr. Adam moves log tau ~lr per step
    c.sea.tau_min = 0.01  # lower clamp of tau

    # Training data. One source from the fields below (kind + json / records / tfds_*), or several
    # from `mixture` (a file) or `sources` (in the config): sea_jax/data/mixture.py. Paths are local
    # or gs://. Image paths that leave their image root are skipped (image_outside_root), never opened.
    c.data = ml_collections.ConfigDict()
    c.data.kind = "llava_json"  # "llava_json" (data.json), "array_record" (data.records) or "tfds" (data.tfds_*)
    c.data.json = ""  # LLaVA-format .json / .jsonl (blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json)
    c.data.records = ""  # kind="array_record": a folder written by `python -m sea_jax.records` (or .array_record files)
    c.data.image_root = ""  # folder (or gs:// prefix) the records' image paths are relative to; a mixture's default
    c.data.tfds_name = ""  # kind="tfds": a dataset with an image and a caption, or LLaVA-style conversations
    c.data.tfds_split = "train"  # the TFDS split read
    c.data.tfds_data_dir = ""  # TFDS data dir ("" = TFDS's default); gs:// is copied to cache_dir first
    c.data.tfds_image_key = "image"  # image feature (uint8 array or encoded bytes; empty = text-only row)
    c.data.tfds_caption_key = "caption"  # caption feature (str/bytes, or a list: the first is used)
    c.data.tfds_conversations_key = "conversations"  # present = a LLaVA conversation ({from, value} turns)
    # Several sources: a YAML/JSON file, LLaVA-NeXT's data YAML plus our fields: `datasets:` entries
    # {json_path or path, kind, sampling_strategy ("all" | "first:N" | "end:N" | "random:N", N or "P%"),
    # weight, on_exhausted, image_root, template, pad_to_square, tfds_*, name}. "" = not used.
    c.data.mixture = ""
    c.data.sources = ()  # the same entries as a tuple of dicts in a Python config (not with `mixture`)
    # Weighted mixtures: when a source has given all its selected records, "restart" it in a fresh
    # order or "stop" (that ends the mixture's epoch); a mixture entry may set its own.
    c.data.on_exhausted = "restart"
    c.data.cache_dir = ""  # local copies of gs:// ArrayRecord / TFDS / label files ("" = $SEA_JAX_CACHE_DIR or ~/.cache/sea_jax/gcs)
    c.data.template = "plain"  # "plain" (stage 1: image then caption) or "chat" (the tokenizer's chat template); a mixture's default
    c.data.chat_template = ""  # "" = the LLM tokenizer's own; "vicuna_v1" = LLaVA's Vicuna format; or a jinja string
    c.data.pad_to_square = False  # LLaVA-1.5 stage 2: pad with the image mean before resizing; a mixture's default
    c.data.max_length = 2048  # tokens per row at most (longer rows are truncated after the image tokens)
    # Length-aware batches (sea_jax.data.buckets): each global batch is padded to the smallest of these
    # lengths that holds its longest row (max_length is always one), one compiled step per bucket;
    # "" = every batch padded to max_length. Comma-separated, e.g. "768,1024,1536".
    c.data.length_buckets = ""
    # Rows of similar length in the same batch: windows of this many global batches are sorted by length
    # and cut into batches, served in a seeded order (0 = off). Resume stays exact.
    c.data.group_batches = 0
    c.data.num_shards = 0  # data shards dealt over processes (0 = one per process); fix it to change hosts mid-run
    c.data.num_workers = 2  # Grain worker processes per shard (0 = decode in the main process)
    c.data.num_threads = 4  # decoding threads per worker
    c.data.prefetch = 2  # batches prepared ahead

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate (linear warmup, then cosine to 0)
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0  # global gradient norm clip (0 = none)
    c.optim.group_lr = ml_collections.ConfigDict()  # other peak lr per part, e.g. {"vision": 2e-6} (SEA-PRIME)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # global batch (rows)
    c.train.num_epochs = 1.0
    c.train.num_steps = -1  # > 0 overrides num_epochs
    c.train.trainable = ("adapter", "log_tau")  # parts updated: adapter, log_tau, llm, vision
    c.train.microbatches = 1  # L_lm accumulated over this many slices of the global batch (exact)
    c.train.logits_chunk = 0  # > 0: LM head on this many positions at a time (large vocabularies)
    c.train.init_from = ""  # stage 2: a stage-1 workdir (or run folder) whose adapter and tau to start from
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.progress = True  # progress bar on process 0

    # What a run shows and records (README "Observability"; sea_jax.logs, tracking, progress,
    # manifest, goodput). metrics.jsonl, manifest.json and log.txt are always written.
    c.log = ml_collections.ConfigDict()
    # Terminal: "brief" = progress, the tools' own lines, every warning; "all" = every library's
    # INFO lines too; "warning" = progress and warnings only. <run folder>/log.txt gets everything.
    c.log.terminal = "brief"
    c.log.progress_every = 0  # without a TTY: a plain progress line every N steps, on logged steps (0 = each)
    c.log.tensorboard = True  # event files in <run folder>/tensorboard (tensorboardX)
    c.log.histograms = True  # histograms of unique labels / candidates per step and of batch label scores
    c.log.wandb = False  # also log to Weights & Biases (needs `pip install sea_jax[wandb]`)
    c.log.wandb_project = "sea_jax"  # W&B project
    c.log.wandb_entity = ""  # W&B team or user; "" = wandb's default
    c.log.wandb_name = ""  # W&B run name; "" = "<workdir name>/stage<k>"
    c.log.wandb_mode = ""  # "online", "offline" (no network; `wandb sync` later), "disabled"; "" = $WANDB_MODE or online
    c.log.wandb_dir = ""  # local folder for wandb's files; "" = the run folder (~/.cache/sea_jax/wandb for gs://)
    c.log.profile_start = 0  # first step (1-based) of a jax.profiler trace into <run folder>/profile; 0 = off
    c.log.profile_steps = 3  # steps in the trace
    c.log.probe_images = 0  # > 0: at the end, the probe picture of this many images into probe.png and TensorBoard

    # In-loop evaluation (sea_jax.eval.inloop), every `eval.every` steps; logged as eval/* metrics.
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps between evaluations (0 = off); also after the last step
    c.eval.heldout_json = ""  # held-out LLaVA records: LM loss (and the probe's images); "" = none
    c.eval.heldout_image_root = ""  # "" = data.image_root
    c.eval.heldout_samples = 64  # records of heldout_json used (the first N, a fixed set)
    c.eval.probe_images = 16  # held-out images for the probe's alignment accuracy (needs lambda > 0); 0 = off
    c.eval.benchmark = ""  # one benchmark asked in the loop (e.g. "pope"); "" = none
    c.eval.data_root = ""  # LLaVA-1.5's eval folder for `eval.benchmark`
    c.eval.benchmark_samples = 64  # its first N questions (a fixed subset)
    c.eval.batch_size = 8  # rows per evaluation batch (a multiple of the batch shards)
    c.eval.max_new_tokens = 0  # 0 = the benchmark's LLaVA-1.5 value

    # The embedded demo (configs/demo.py, sea_jax.demo); read only by the demo's runner.
    c.demo = ml_collections.ConfigDict()
    c.demo.seed = 0  # the world (config.seed is the training seed)
    c.demo.num_images = 512  # training images, each with a caption and a conversation
    c.demo.num_eval = 64  # held-out images
    c.demo.image_size = 64  # pixels (also the tower's input; with patch 8 the grid is image_size / 8)
    c.demo.max_objects = 3  # shapes per image, 1..4
    c.demo.qa_turns = 3  # questions per conversation, at most
    c.demo.siglip_vocab = 256  # SentencePiece size ceiling of the tower's text tokenizer
    c.demo.pretrain = True  # pretrain both frozen towers on the world first (False = random towers)
    c.demo.siglip_steps = 600
    c.demo.siglip_lr = 3e-3
    c.demo.siglip_patch_weight = 3.0  # weight of the FILIP-style per-patch word term
    c.demo.llm_steps = 150
    c.demo.llm_lr = 3e-3
    c.demo.pretrain_batch = 32
    c.demo.compare = True  # also run the lambda = 0 arm
    c.demo.stage2_steps = 150  # 0 = no stage 2
    c.demo.assets = ""  # "" = <workdir>/demo_assets; a shared folder lets several workdirs reuse one world
    c.demo.plot_images = 4
    c.demo.show_questions = 6
    return c


def _check_keys(saved: Mapping[str, Any], schema: ml_collections.ConfigDict, where: str) -> None:
    for key, value in saved.items():
        name = f"{where}{key}"
        if key not in schema:
            raise ConfigError(f"config field {name!r} is not in the schema (sea_jax.config.base_config)")
        # free-form dicts (overrides, group_lr, mesh) take any keys
        if isinstance(value, Mapping) and isinstance(schema[key], ml_collections.ConfigDict) and len(schema[key]) \
                and key not in ("overrides", "group_lr"):
            _check_keys(value, schema[key], name + ".")


def from_dict(values: Mapping[str, Any], source: str = "config") -> ml_collections.ConfigDict:
    """The schema with ``values`` (a nested dict, e.g. a saved ``config.json``) filled in.

    Fields the dict lacks keep their defaults (a run saved by an older version); a field the
    schema does not know is a :class:`ConfigError` naming it and ``source``. Runs saved before
    the schema had one ``vision`` section (``siglip``, ``data.image_size``, ``demo.full_run``;
    ``labels.feature = "map_head"``, ``sea.log_tau_init``; no ``model.scale_visual_tokens``, i.e.
    trained unscaled) are read with those fields moved to their present place and meaning.
    """
    values = _migrate(dict(values))
    c = base_config()
    try:
        _check_keys(values, c, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _merge(c, values)
    return c


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    if "siglip" in values and "vision" not in values:
        values["vision"] = dict(values.pop("siglip"), tower="siglip")
    data = values.get("data")
    if isinstance(data, Mapping) and "image_size" in data:
        data = dict(data)
        size = data.pop("image_size")
        if size:
            values.setdefault("vision", {})["image_size"] = size
        values["data"] = data
    demo = values.get("demo")
    if isinstance(demo, Mapping) and "full_run" in demo:
        values["demo"] = {k: v for k, v in demo.items() if k != "full_run"}
    labels = values.get("labels")
    if isinstance(labels, Mapping) and labels.get("feature") == "map_head":
        values["labels"] = dict(labels, feature="joint")
    sea = values.get("sea")
    if isinstance(sea, Mapping) and "log_tau_init" in sea:
        sea = dict(sea)
        sea["tau_init"] = math.exp(float(sea.pop("log_tau_init")))
        values["sea"] = sea
    model = values.get("model")
    if isinstance(model, Mapping) and "scale_visual_tokens" not in model:
        # runs saved before the knob trained with visual tokens unscaled (transformers 5's way)
        values["model"] = dict(model, scale_visual_tokens=False)
    return values


def _merge(section: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if key in ("overrides", "group_lr", "mesh"):
            section[key] = ml_collections.ConfigDict(dict(value or {}))
        elif isinstance(section[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
            _merge(section[key], value)
        elif isinstance(section[key], tuple) and isinstance(value, list):
            section[key] = tuple(value)
        else:
            section[key] = value


def from_json(text: str, source: str = "config.json") -> ml_collections.ConfigDict:
    """:func:`from_dict` of a JSON text (what a run folder's ``config.json`` holds)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    return from_dict(values, source)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the enumerated and numeric fields once, up front; returns ``config``.

    Raises:
      ConfigError: naming the first field found wrong and what it accepts.
    """
    for (section, field), allowed in CHOICES.items():
        value = config[section][field]
        if value not in allowed:
            raise ConfigError(f"config.{section}.{field}={value!r}: expected one of {list(allowed)}")
    if int(config.stage) not in (1, 2):
        raise ConfigError(f"config.stage={config.stage!r}: expected 1 or 2")
    positive = {"train.batch_size": config.train.batch_size, "train.microbatches": config.train.microbatches,
                "data.max_length": config.data.max_length, "labels.top_n": config.labels.top_n,
                "sea.window": config.sea.window, "train.log_every": config.train.log_every}
    for name, value in positive.items():
        if int(value) < 1:
            raise ConfigError(f"config.{name}={value!r}: must be >= 1")
    if int(config.data.get("group_batches", 0)) < 0:
        raise ConfigError(f"config.data.group_batches={config.data.group_batches!r}: must be >= 0 (0 = off)")
    if int(config.train.logits_chunk) < 0:
        raise ConfigError(f"config.train.logits_chunk={config.train.logits_chunk!r}: must be >= 0")
    parts = ("adapter", "log_tau", "llm", "vision")
    bad = [p for p in config.train.trainable if p not in parts]
    if bad:
        raise ConfigError(f"config.train.trainable has {bad}; parts are {list(parts)}")
    bad = [p for p in (config.optim.group_lr or {}) if p not in parts]
    if bad:
        raise ConfigError(f"config.optim.group_lr has {bad}; parts are {list(parts)}")
    if float(config.sea.tau_min) <= 0:
        raise ConfigError(f"config.sea.tau_min={config.sea.tau_min!r}: must be > 0")
    if float(config.sea.tau_init) < float(config.sea.tau_min):
        raise ConfigError(f"config.sea.tau_init={config.sea.tau_init!r}: must be >= sea.tau_min {config.sea.tau_min}")
    return config


__all__ = ["PLACEHOLDER", "CHOICES", "is_set", "base_config", "from_dict", "from_json", "validate"]
