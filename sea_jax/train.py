r"""Training, both stages: ``python -m sea_jax.train --config=configs/X.py --workdir=DIR``.

    python -m sea_jax.train --config=configs/gemma2b.py --workdir=/runs/g2b \
        --config.llm.checkpoint=/ckpt/gemma-2b --config.siglip.checkpoint=/ckpt/siglip-so400m-384 \
        --config.data.json=/data/blip_laion_cc_sbu_558k.json --config.data.image_root=/data/images
    python -m sea_jax.train --config=configs/gemma2b_finetune.py --workdir=/runs/g2b ...   # stage 2

Outputs, under ``<workdir>/stage<config.stage>/`` (both stages share a workdir; stage 2 starts
from ``<workdir>/stage1``'s adapter unless ``config.train.init_from`` names another run):

* ``config.json`` -- the resolved config (what ``sea_jax.export`` rebuilds the model from);
* ``tokenizer/`` -- the LLM tokenizer as trained (``<image>`` added as a special token);
* ``checkpoints/<step>/`` -- Orbax checkpoints (:mod:`sea_jax.checkpoint`);
* ``metrics.jsonl``, ``tensorboard/`` -- logs (:mod:`sea_jax.metrics`).

Running the same command again resumes from the newest checkpoint that restores, bit for bit
(same data order, same random choices). SIGTERM (preemption) saves a checkpoint and exits 0.

Paths are local (or a gcsfuse mount such as ``/gcs/bucket``): the HF / safetensors / .npz
loaders and the log writers use plain file I/O, and without TensorFlow or gcsfs installed
``etils.epath`` cannot read ``gs://`` either, so a ``gs://`` path is refused up front rather than
failing mid-run. Every path is checked before any model is built or compiled; the error names the
config field to set.

The file reads top to bottom like the run: setup, model, SEA tables, data, optimizer and state,
restore, loop, final checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# Batch entries that go to the devices; anything else (the sample ids) stays on the host.
DEVICE_KEYS = ("images", "input_ids", "attention_mask", "loss_mask", "has_image", "label_ids", "label_scores")
PARTS = ("vision", "adapter", "llm", "log_tau", "word_table")  # what build_model can skip


def _get(cfg, name: str, default: Any) -> Any:
    """``cfg[name]`` if the (ConfigDict) field exists, else ``default``: fields that only some
    config files define (e.g. ``llm.overrides`` in ``configs/tiny.py``)."""
    return cfg[name] if cfg is not None and name in cfg else default


def run_dir(workdir: str, stage: int) -> str:
    return os.path.join(workdir, f"stage{int(stage)}")


# ----------------------------------------------------------------------------------------------
# Setup: paths checked first


def _needs_word_table(config) -> bool:
    return float(config.sea.lam) != 0 and config.sea.label_source == "on_the_fly"


def init_from_dir(config, workdir: str | None) -> str:
    """The stage-1 run whose adapter (and tau) stage 2 starts from; "" for stage 1."""
    src = config.train.init_from
    if not src:
        return run_dir(workdir, 1) if int(config.stage) == 2 and workdir else ""
    # a workdir holding stage1/ or the stage-1 run folder itself
    return run_dir(src, 1) if os.path.isdir(os.path.join(src, "stage1")) else src


def check_paths(config, workdir: str | None = None) -> None:
    """Raises FileNotFoundError listing every configured path that does not exist, by config
    field, before anything is loaded or compiled."""
    problems: list[str] = []
    if workdir and "://" in workdir:
        problems.append(f"--workdir={workdir!r}: only local paths (or a gcsfuse mount such as /gcs/bucket)")

    def need(field: str, path: str, kind: str = "path", why: str = "") -> None:
        if not path:
            problems.append(f"config.{field} is empty{why}; set --config.{field}=...")
        elif "://" in path:
            problems.append(f"config.{field}={path!r}: only local paths (or a gcsfuse mount) are supported")
        elif kind == "dir" and not os.path.isdir(path):
            problems.append(f"config.{field}={path!r} is not a folder")
        elif not os.path.exists(path):
            problems.append(f"config.{field}={path!r} does not exist")

    if config.llm.checkpoint:
        need("llm.checkpoint", config.llm.checkpoint, "dir")
    elif not config.llm.preset:
        need("llm.checkpoint", "", why=" and no config.llm.preset is given")
    if config.llm.tokenizer or not config.llm.checkpoint:
        need("llm.tokenizer", config.llm.tokenizer, why=" (a random-init LLM needs a tokenizer folder)")
    if config.siglip.checkpoint:
        need("siglip.checkpoint", config.siglip.checkpoint)
    if _needs_word_table(config):
        tok = config.siglip.tokenizer or config.siglip.checkpoint
        need("siglip.tokenizer", tok, why=" (on-the-fly labels embed the word list with the SigLIP text tower)")
    if float(config.sea.lam) != 0:
        if config.labels.word_list != "default":
            need("labels.word_list", config.labels.word_list)
        if config.sea.label_source == "batch":
            need("labels.output_dir", config.labels.output_dir, "dir",
                 why=" (sea.label_source='batch' reads labels made by `python -m sea_jax.labels`)")
    if config.data.kind == "llava_json":
        need("data.json", config.data.json)
        need("data.image_root", config.data.image_root, "dir")
    elif config.data.kind == "tfds":
        if not config.data.tfds_name:
            problems.append("config.data.tfds_name is empty; set --config.data.tfds_name=...")
        if config.data.tfds_data_dir:
            need("data.tfds_data_dir", config.data.tfds_data_dir, "dir")
    else:
        problems.append(f"config.data.kind={config.data.kind!r}: expected 'llava_json' or 'tfds'")
    src = init_from_dir(config, workdir)
    if int(config.stage) == 2:
        from sea_jax import checkpoint

        ck = checkpoint.checkpoint_dir(src) if src else ""
        if not src or not os.path.isdir(ck) or not any(n.isdigit() for n in os.listdir(ck)):
            problems.append(
                f"config.train.init_from: stage 2 starts from a stage-1 run's adapter, but {src or '(none)'!r} "
                "has no checkpoints; run stage 1 with the same --workdir or set --config.train.init_from=DIR")
    if problems:
        raise FileNotFoundError("cannot start, fix the config first:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# Model


class Model(NamedTuple):
    """What :func:`build_model` returns.

    cfg: the :class:`~sea_jax.models.mllm.MLLMConfig`. params: ``{"vision": {"img": ...},
    "adapter", "llm", "log_tau"}`` placed on the mesh (parts named in ``skip`` absent).
    tokenizer: the LLM tokenizer with ``<image>``. siglip_txt: the SigLIP text tower's params and
    config (for the word table) or None. siglip_id: identity of the SigLIP weights (cache key).
    """

    cfg: Any
    params: dict
    tokenizer: Any
    siglip_txt: Any
    siglip_cfg: Any
    siglip_id: str


def load_llm_tokenizer(config):
    """The LLM tokenizer, with ``<image>`` as a special token and the chat template set.

    ``config.data.chat_template``: ``""`` = the tokenizer's own, ``"vicuna_v1"`` = LLaVA's Vicuna
    format (Vicuna ships no template), anything else = a jinja template string.
    """
    from sea_jax.data import llava
    from sea_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(config.llm.tokenizer or config.llm.checkpoint)
    chat = _get(config.data, "chat_template", "")
    if chat == "vicuna_v1":
        tok.chat_template = llava.VICUNA_V1_TEMPLATE
    elif chat:
        tok.chat_template = chat
    return tok


def _llm_overrides(config, preset: bool) -> dict:
    """LLMConfig fields from the config: numerics always; ``llm.overrides`` (architecture) only
    for a preset (an HF checkpoint's config.json is the architecture)."""
    out = dict(dtype=jnp.dtype(config.llm.dtype), scan_layers=bool(config.llm.scan_layers), remat=config.llm.remat)
    if preset:
        out.update(dict(_get(config.llm, "overrides", {}) or {}))
    return out


def _resize_vocab(llm_cfg, params: dict, new_vocab: int, mesh):
    """Grows the embedding (and an untied LM head) to ``new_vocab`` rows, new rows = the mean of
    the old ones (HF ``resize_token_embeddings(mean_resizing=True)``): the ``<image>`` row is never
    read as an input (visual tokens replace it) but is a logit, which should start unremarkable."""
    from sea_jax.models import llm as llm_lib

    new_cfg = dataclasses.replace(llm_cfg, vocab_size=int(new_vocab))
    extra = new_vocab - llm_cfg.vocab_size
    shardings = llm_lib.param_shardings(new_cfg, mesh)

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

    return new_cfg, jax.jit(grow, out_shardings=shardings)(params)


def _siglip(config, mesh, load_weights: bool):
    """(SigLIPConfig, params or None, identity) from an HF folder / .npz, or random from the variant."""
    from sea_jax import labels as labels_cli
    from sea_jax.align import labels as L
    from sea_jax.models import siglip

    image_size = int(config.data.image_size or config.siglip.image_size)
    if config.siglip.checkpoint:
        if not load_weights:
            if os.path.isdir(config.siglip.checkpoint):
                from sea_jax.convert import hf_siglip

                with open(os.path.join(config.siglip.checkpoint, "config.json")) as f:
                    cfg = hf_siglip.config_from_hf(json.load(f))
                over = dict(_get(config.siglip, "overrides", {}) or {}, dtype=config.siglip.dtype, image_size=image_size)
                return cfg.replace(**over), None, ""
            cfg = siglip.siglip_config(config.siglip.variant, image_size=image_size,
                                       **dict(_get(config.siglip, "overrides", {}) or {}), dtype=config.siglip.dtype)
            return cfg, None, ""
        cfg, params = labels_cli.load_siglip(config.siglip, mesh, image_size)
        return cfg, params, L.file_identity(config.siglip.checkpoint)
    cfg = siglip.siglip_config(config.siglip.variant, image_size=image_size, dtype=config.siglip.dtype,
                               **dict(_get(config.siglip, "overrides", {}) or {}))
    if not load_weights:
        return cfg, None, ""
    params = siglip.init_params(cfg, jax.random.key(int(config.seed) + 1), mesh)
    return cfg, params, f"random:{config.seed}:{cfg}"


def build_model(config, mesh=None, *, skip: Sequence[str] | None = None, workdir: str | None = None) -> Model:
    """Tokenizer, LLM, SigLIP, adapter and tau, placed on ``mesh`` with their shardings.

    ``skip``: parts (of :data:`PARTS`) whose weights are not loaded (they come from a checkpoint);
    the model config is still built. Default: nothing skipped with a mesh; everything without one
    (``build_model(config).cfg`` is the model config, read from config files only). Stage 2 takes
    adapter and tau from the stage-1 run (:func:`init_from_dir`, ``workdir`` = the top workdir).
    """
    if skip is None:
        skip = () if mesh is not None else PARTS
    if mesh is None:
        from sea_jax import sharding

        mesh = sharding.make_mesh({"data": 1}, jax.local_devices()[:1])
    from sea_jax import sharding
    from sea_jax.data import llava
    from sea_jax.models import llm as llm_lib
    from sea_jax.models.adapter import Adapter
    from sea_jax.models.mllm import MLLMConfig

    tokenizer = load_llm_tokenizer(config)
    # LLM
    overrides = _llm_overrides(config, preset=not config.llm.checkpoint)
    if config.llm.checkpoint:
        from sea_jax.convert import hf_llm

        if "llm" in skip:
            llm_cfg, llm_params = hf_llm.config_from_hf(hf_llm.read_hf_config(config.llm.checkpoint), **overrides), None
        else:
            llm_cfg, llm_params = hf_llm.load_hf_llm(config.llm.checkpoint, mesh, **overrides)
    else:
        llm_cfg = llm_lib.preset(config.llm.preset, **overrides)
        llm_params = None if "llm" in skip else llm_lib.init_params(llm_cfg, jax.random.key(int(config.seed) + 2), mesh)
    image = llava.add_image_token(tokenizer, config.model.image_token, vocab_size=llm_cfg.vocab_size)
    if image.needs_resize:
        logging.info("LLM vocabulary %d -> %d rows for %s (id %d)", llm_cfg.vocab_size, image.id + 1,
                     config.model.image_token, image.id)
        if llm_params is None:
            llm_cfg = dataclasses.replace(llm_cfg, vocab_size=image.id + 1)
        else:
            llm_cfg, llm_params = _resize_vocab(llm_cfg, llm_params, image.id + 1, mesh)
    # SigLIP (image tower for the model; text tower only for the word table)
    sig_cfg, sig_params, sig_id = _siglip(
        config, mesh, load_weights="vision" not in skip or (_needs_word_table(config) and "word_table" not in skip))
    mcfg = MLLMConfig(llm=llm_cfg, vision=sig_cfg, image_token_id=image.id,
                      vision_feature_layer=int(config.model.vision_feature_layer), adapter=config.model.adapter)
    params: dict[str, Any] = {}
    if llm_params is not None:
        params["llm"] = llm_params
    if sig_params is not None and "vision" not in skip:
        params["vision"] = {"img": sig_params["img"]}
    # Adapter + tau: random from the seed (stage 1), or the stage-1 run's (stage 2)
    adapter = Adapter(out_dim=llm_cfg.hidden, kind=config.model.adapter, dtype=llm_cfg.dtype)
    feats = jnp.zeros((1, sig_cfg.num_patches, sig_cfg.width), jnp.float32)
    boxed = jax.eval_shape(lambda: adapter.init(jax.random.key(0), feats)["params"])
    import flax.linen as nn

    a_shard = sharding.tree_shardings(boxed, mesh)
    a_params = jax.jit(lambda k: nn.unbox(adapter.init(k, feats)["params"]), out_shardings=a_shard)(
        jax.random.key(int(config.seed) + 3))
    log_tau = jnp.asarray(float(config.sea.log_tau_init), jnp.float32)
    src = init_from_dir(config, workdir)
    if src and int(config.stage) == 2 and not {"adapter", "log_tau"} <= set(skip):
        from sea_jax import checkpoint

        step, trained = checkpoint.Checkpointer(checkpoint.checkpoint_dir(src), async_save=False).restore_params()
        if "adapter" not in trained:
            raise KeyError(f"{src}: checkpoint step {step} has no adapter (parts: {sorted(trained)})")
        a_params = jax.device_put(trained["adapter"], a_shard)
        if "log_tau" in trained:
            log_tau = jnp.asarray(trained["log_tau"], jnp.float32)
        logging.info("stage 2 starts from %s step %d (adapter%s)", src, step, ", tau" if "log_tau" in trained else "")
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if "adapter" not in skip:
        params["adapter"] = a_params
    if "log_tau" not in skip:
        params["log_tau"] = jax.device_put(log_tau, rep)
    txt = (sig_params["txt"], sig_cfg) if sig_params is not None and _needs_word_table(config) and "word_table" not in skip else None
    return Model(mcfg, params, tokenizer, txt, sig_cfg, sig_id)


# ----------------------------------------------------------------------------------------------
# SEA tables


def resolve_words(config) -> list[str]:
    """The label vocabulary: the config's word list, or, with precomputed labels, the labeller's
    ``words.txt`` (label ids index it; a different list would silently mislabel)."""
    from sea_jax.align import labels as L

    if config.sea.label_source == "batch":
        path = os.path.join(config.labels.output_dir, "words.txt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} missing: config.labels.output_dir must hold `sea_jax.labels` output")
        return L.load_word_list(path)
    return L.resolve_word_list(config.labels.word_list, int(config.labels.default_size))


def sea_tables(config, model: Model, mesh, run: str) -> dict:
    """Frozen SEA inputs of the step: ``label_table`` [W, d] (Eq. 8, from the frozen LLM's input
    embedding) or, when the LLM is trained, ``word_tokens`` (the step recomputes Eq. 8); and, for
    on-the-fly labels, ``word_table`` [W, dj] (SigLIP text embeddings, cached on disk)."""
    from sea_jax import labels as labels_cli
    from sea_jax.align import labels as L
    from sea_jax.align import loss as loss_lib
    from sea_jax.models import siglip

    if float(config.sea.lam) == 0:
        return {}
    words = resolve_words(config)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    wt = loss_lib.tokenize_words(model.tokenizer, words)
    out: dict[str, Any] = {}
    if "llm" in config.train.trainable:
        out["word_tokens"] = jax.device_put({"ids": wt.ids, "mask": wt.mask}, rep)
    else:
        emb = model.params["llm"]["embedder"]["embedding"]
        out["label_table"] = jax.device_put(jax.jit(loss_lib.label_embedding_table)(emb, wt.ids, wt.mask), rep)
    if _needs_word_table(config):
        txt_params, sig_cfg = model.siglip_txt
        tokenizer, tok_path = labels_cli.load_tokenizer(config.siglip)
        tower = siglip.TextTower(sig_cfg)
        encode = jax.jit(lambda p, ids: tower.apply({"params": p}, ids, hidden_states=False).embedding)
        tokenize = L.make_tokenize_fn(tokenizer, max_length=sig_cfg.text_len, template=config.labels.prompt)
        cache = config.labels.cache_dir or os.path.join(run, "word_table_cache")
        table = L.embed_words(
            lambda ids: encode(txt_params, ids), tokenize, words, 256, cache_dir=cache,
            checkpoint_id=model.siglip_id,
            # the labelling CLI's identity: both share one cache for the same checkpoint and words
            tokenizer_id=labels_cli._tokenizer_identity(tok_path, sig_cfg.text_len, config.labels.prompt),
            progress=jax.process_index() == 0,
        )
        out["word_table"] = jax.device_put(jnp.asarray(table), rep)
    logging.info("SEA tables: %d words (%s labels)", len(words), config.sea.label_source)
    return out


# ----------------------------------------------------------------------------------------------
# Data


def make_data(config, model: Model):
    """(iterator of host-local batches, stats, number of records) from ``sea_jax.data.pipeline``:
    this process's rows of each global batch, repeating over epochs (the step count decides)."""
    from sea_jax.data import pipeline

    it, stats = pipeline.make_train_iterator(
        config, model.tokenizer, model.cfg.image_token_id, model.cfg.num_image_tokens,
        model.cfg.vision.image_size, process_index=jax.process_index(), process_count=jax.process_count())
    return it, stats, pipeline.num_examples(config)


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any], global_size: int) -> dict:
    """Host-local arrays -> global ``jax.Array`` s split along the batch over the mesh (each
    process contributes the rows its devices hold)."""
    out = {}
    for k, s in shardings.items():
        x = np.asarray(local[k])
        out[k] = jax.make_array_from_process_local_data(s, x, (global_size,) + x.shape[1:])
    return out


# ----------------------------------------------------------------------------------------------
# Optimizer, state, FLOPs


def total_steps(config, num_samples: int | None) -> int:
    if int(config.train.num_steps) > 0:
        return int(config.train.num_steps)
    if not num_samples:
        raise ValueError("the dataset size is unknown; set --config.train.num_steps")
    return max(1, math.ceil(float(config.train.num_epochs) * num_samples / int(config.train.batch_size)))


def flop_spec(model: Model, params: Mapping, config, seq_len: int):
    from sea_jax import metrics

    mcfg = model.cfg
    llm_matmul = metrics.llm_matmul_params(params["llm"], mcfg.llm.vocab_size, mcfg.llm.hidden)
    words = len(resolve_words(config)) if _needs_word_table(config) else 0
    return metrics.FlopSpec(
        batch=int(config.train.batch_size), seq_len=seq_len, llm_matmul_params=llm_matmul,
        llm_layers=mcfg.llm.n_layers, llm_heads=mcfg.llm.n_heads, llm_head_dim=mcfg.llm.head_dim,
        vision_params=metrics.count_params(params["vision"]), vision_layers=mcfg.vision.depth,
        vision_width=mcfg.vision.width, patches=mcfg.num_image_tokens,
        adapter_params=metrics.count_params(params["adapter"]),
        trainable=frozenset(p for p in config.train.trainable if p != "log_tau"),
        label_words=words, label_dim=mcfg.vision.width if words else 0,
    )


# ----------------------------------------------------------------------------------------------
# The run


def train(config, workdir: str) -> dict:
    """Runs (or resumes) one stage; returns the last logged metrics plus ``step`` and ``stopped``
    ("done" or "preempted")."""
    from sea_jax import checkpoint as ckpt_lib
    from sea_jax import metrics as metrics_lib
    from sea_jax import sharding
    from sea_jax.train_step import StepConfig, TrainState, batch_shardings, init_state, make_optimizer, make_train_step, split_params

    # --- setup ---------------------------------------------------------------------------------
    sharding.init_distributed()
    if "demo" in config:
        # The embedded demo: generated world, tokenizers and word list, built once in the workdir.
        from sea_jax import demo

        config = demo.prepare(config, workdir)
    check_paths(config, workdir)
    run = run_dir(workdir, config.stage)
    is_main = jax.process_index() == 0
    os.makedirs(run, exist_ok=True)
    mesh = sharding.make_mesh(dict(config.mesh))
    logging.info("stage %d, %d processes, %d devices (%s), mesh %s, run dir %s", config.stage, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape), run)
    b = int(config.train.batch_size)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % shards or b % jax.process_count():
        raise ValueError(f"train.batch_size {b} must be a multiple of the {shards} batch shards of mesh "
                         f"{dict(mesh.shape)} and of the {jax.process_count()} processes")
    mb = int(config.train.microbatches)
    if b % (mb * shards):
        raise ValueError(f"train.batch_size {b} in train.microbatches {mb} gives microbatches of {b / mb:g} rows, "
                         f"not a multiple of the {shards} batch shards of mesh {dict(mesh.shape)}; "
                         f"set --config.train.microbatches to a divisor of {b // shards}")
    preempt = ckpt_lib.PreemptionFlag().install()

    # --- model ---------------------------------------------------------------------------------
    t0 = time.time()
    model = build_model(config, mesh, workdir=workdir)
    if is_main:
        with open(os.path.join(run, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=1))
        model.tokenizer.save_pretrained(os.path.join(run, "tokenizer"))
    scfg = StepConfig(
        lam=float(config.sea.lam), window=int(config.sea.window), top_n=int(config.labels.top_n),
        negate_similarity=bool(config.labels.negate_similarity), label_source=config.sea.label_source,
        tau_min=float(config.sea.tau_min), trainable=tuple(config.train.trainable), seed=int(config.seed),
        microbatches=int(config.train.microbatches), logits_chunk=int(config.train.logits_chunk),
    )
    trainable, frozen = split_params(model.params, scfg.trainable)
    logging.info("model built in %.1fs: trainable %s (%d params), frozen %s", time.time() - t0, sorted(trainable),
                 metrics_lib.count_params(trainable), sorted(frozen))

    # --- SEA tables ----------------------------------------------------------------------------
    frozen.update(sea_tables(config, model, mesh, run))

    # --- data ----------------------------------------------------------------------------------
    data_iter, data_stats, num_samples = make_data(config, model)
    steps = total_steps(config, num_samples)
    local_b = b // jax.process_count()

    # --- optimizer and state -------------------------------------------------------------------
    tx, schedule = make_optimizer(
        float(config.optim.lr), steps, float(config.optim.warmup_ratio), float(config.optim.weight_decay),
        dict(config.optim.group_lr or {}), float(config.optim.clip_norm) or None)
    state = init_state(trainable, tx)
    del trainable

    # --- checkpoint restore --------------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run), keep=int(config.train.keep_checkpoints),
                                 async_save=bool(_get(config.train, "async_checkpoint", True)))
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)  # noqa: E731
    restored = ckpt.restore(abstract(state.params), abstract(state.opt_state), data_iter)
    start = 0
    if restored is not None:
        start = restored.step
        step0 = jax.device_put(jnp.asarray(start, jnp.int32), state.step.sharding)
        state = TrainState(step0, restored.params, restored.opt_state)
        logging.info("resumed from step %d", start)

    # --- the loop ------------------------------------------------------------------------------
    logger = metrics_lib.MetricsLogger(run, steps, start, enabled=is_main,
                                       progress=bool(_get(config.train, "progress", True)))
    peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind)
    log_every = max(1, int(config.train.log_every))
    ckpt_every = int(config.train.checkpoint_every)
    step_fn = batch_sh = flops = None
    last: dict[str, Any] = {}
    stopped = "done"
    t_last, steps_since = time.time(), 0

    def save(at: int) -> None:
        meta = {"seed": int(config.seed), "process_count": jax.process_count(), "total_steps": steps,
                "data": _stats_dict(data_stats)}
        ckpt.save(at, state.params, state.opt_state, meta, data_iter)

    step = start
    while step < steps:
        local = next(data_iter)
        if batch_sh is None:  # first batch: shapes known, compile once
            batch_sh = batch_shardings(mesh, {k: jax.ShapeDtypeStruct((b,) + np.shape(local[k])[1:], np.asarray(local[k]).dtype)
                                              for k in DEVICE_KEYS if k in local})
            shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
            step_fn = make_train_step(_mllm(model.cfg), scfg, tx, schedule, mesh,
                                      shard_of(state), shard_of(frozen), batch_sh)
            seq_len = int(np.shape(local["input_ids"])[1])
            flops = metrics_lib.train_step_flops(flop_spec(model, {**frozen, **state.params}, config, seq_len))
            tc = time.time()
            step_fn = step_fn.lower(state, frozen, global_batch(local, batch_sh, b)).compile()
            logging.info("compiled the train step in %.1fs; %.3g TFLOP per step %s", time.time() - tc,
                         flops["total"] / 1e12, {k: f"{v / 1e12:.3g}" for k, v in flops.items() if k != "total"})
            t_last = time.time()
        if np.shape(local["input_ids"])[0] != local_b:
            raise ValueError(f"the data gave {np.shape(local['input_ids'])[0]} rows, expected {local_b} per process")
        state, m = step_fn(state, frozen, global_batch(local, batch_sh, b))
        step += 1
        steps_since += 1
        logger.advance()
        if step % log_every == 0 or step == steps:
            m = jax.device_get(m)
            dt = (time.time() - t_last) / steps_since
            t_last, steps_since = time.time(), 0
            seq = int(np.shape(local["input_ids"])[1])
            tflops = flops["total"] / dt / jax.device_count() / 1e12
            last = {k: np.asarray(v).item() for k, v in m.items()}
            last.update(step_time=dt, tokens_per_s=b * seq / dt, tflops_per_device=tflops,
                        mfu=(tflops / peak) if peak else None)
            last.update(_stats_dict(data_stats))  # skipped/<reason>, skipped_total, truncated, ...
            logger.log(step, last)
            if not math.isfinite(last.get("loss", 0.0)):
                logging.error("step %d: loss is %s", step, last.get("loss"))
        if ckpt_lib.any_process(preempt.is_set):
            logging.warning("preemption signal: saving step %d and exiting", step)
            save(step)
            stopped = "preempted"
            break
        if ckpt_every > 0 and step % ckpt_every == 0 and step < steps:
            save(step)

    # --- final checkpoint ----------------------------------------------------------------------
    if stopped == "done" and (step not in ckpt.all_steps()):
        save(step)
    ckpt.close()
    logger.close()
    preempt.uninstall()
    data_iter.close()
    stats = _stats_dict(data_stats)
    if stats.get("skipped_total"):
        logging.info("data: %d samples skipped: %s", stats["skipped_total"],
                     {k: v for k, v in stats.items() if k.startswith("skipped/") and v})
    logging.info("stage %d %s at step %d/%d", config.stage, stopped, step, steps)
    return dict(last, step=step, stopped=stopped, data=stats)


def _mllm(cfg):
    from sea_jax.models.mllm import MLLM

    return MLLM(cfg)


def _stats_dict(stats) -> dict:
    """The data pipeline's statistics as plain JSON data."""
    if stats is None:
        return {}
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return dict(stats)


# ----------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    if "demo" in config and _get(config.demo, "full_run", False):
        # The embedded demo's whole story (both arms, stage 2, report): sea_jax.demo.run.
        from sea_jax.demo.run import run_demo

        run_demo(config, _WORKDIR.value)
        return
    out = train(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in out.items() if k != "data"}, default=str))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config (.py)", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs); shared by both stages")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
