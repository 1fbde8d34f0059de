"""``prepare(config, workdir)``: the demo's assets, built once per workdir, and the config that uses them.

The demo's runners (:mod:`sea_jax.demo.run`) call it before training. It writes under ``<workdir>/demo_assets/``::

    world/            the generated world, its tokenizers and word list (sea_jax.demo.assets)
    world/DONE.json   written last: what was built (the fingerprint) and the tokenizer sizes

and returns a copy of the config whose empty paths point there (``llm.tokenizer``,
``vision.tokenizer``, ``labels.word_list``, ``data.json`` (stage 1: captions, stage 2: the
question/answer conversations), ``data.image_root``) and whose random-init models fit the
tokenizers (``llm.overrides.vocab_size``, ``vision.overrides.vocab_size``) and the world
(``vision.image_size`` = ``demo.image_size``). A path the user set stays as set.

Caching: each step of the build is a folder with a ``DONE.json`` marker holding the fingerprint
of what it was built from. A second call finds the marker and rewrites nothing; a marker with a
different fingerprint (the same workdir with another world) is an error rather than a silent
rebuild, since the workdir's checkpoints were trained on the old world. A step interrupted midway
left only a ``*.partial-*`` folder (the build happens there and is renamed into place, marker
included), which the next call discards.

With ``config.demo.pretrain`` (default True in ``configs/demo.py``) two more steps follow, each
its own cached folder (:mod:`sea_jax.demo.pretrain`)::

    siglip/   a tiny SigLIP trained on the world with the sigmoid loss, a HF SiglipModel folder
    llm/      a tiny Gemma-architecture LM trained on the captions and conversations, HF folder

and the returned config loads them as checkpoints (``vision.checkpoint``, ``llm.checkpoint``,
each folder holding its tokenizer) unless the user set a checkpoint. Their fingerprints hold the
world's and the pretraining's settings (``demo.siglip_steps``, ``demo.llm_steps``, ...); a
different one in the same workdir is refused like a different world.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from collections.abc import Callable
from typing import Any

from absl import logging
import ml_collections

from sea_jax.demo import assets as assets_lib
from sea_jax.demo import world as world_lib

MARKER = "DONE.json"
# Bump when the world's generator or the asset formats change: old caches then fail loudly.
VERSION = 2  # 2: size / position / number words left out of the label word list


def assets_dir(workdir: str, config=None) -> str:
    """Where the demo's assets live: ``config.demo.assets`` when set (several workdirs sharing one
    world and one pair of pretrained towers), else ``<workdir>/demo_assets``."""
    shared = config.demo.assets if config is not None else ""
    return shared or os.path.join(workdir, "demo_assets")


def world_config(config) -> world_lib.WorldConfig:
    """The world's geometry from ``config.demo`` and the SigLIP patch size of ``config.vision``'s
    variant (the truth grid is the patch grid; a SigLIP checkpoint must have that patch size)."""
    from sea_jax.models import siglip

    d = config.demo
    patch = siglip.siglip_config(config.vision.variant, image_size=int(d.image_size),
                                 **dict(config.vision.overrides or {})).patch_size
    return world_lib.WorldConfig(image_size=int(d.image_size), patch_size=int(patch),
                                 max_objects=int(d.max_objects), qa_turns=int(d.qa_turns))


def read_marker(folder: str) -> dict | None:
    path = os.path.join(folder, MARKER)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cached_step(folder: str, fingerprint: dict, build: Callable[[str], dict]) -> dict:
    """Runs ``build(tmp_folder) -> info`` unless ``folder`` holds a marker with ``fingerprint``;
    returns the marker's ``info``.

    The build writes into a private temporary folder, then the marker, then the folder is renamed
    to ``folder``: a reader never sees a half-built folder under the final name, and several
    processes (hosts of a multi-host run, with or without a shared disk) may race, the first rename
    wins and the others discard their identical copy.
    """
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as the marker reads back
    done = read_marker(folder)
    if done is not None:
        if done["fingerprint"] != fingerprint:
            raise ValueError(
                f"{folder} was built from {done['fingerprint']}, the config asks for {fingerprint}; "
                "use another --workdir (its checkpoints were trained on the old assets) or delete the folder")
        return done["info"]
    if os.path.isdir(folder):  # no marker: an older crash left a half-built folder under the final name
        shutil.rmtree(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tag = f".partial-{socket.gethostname()}-{os.getpid()}"
    for name in os.listdir(parent):  # our own leftovers from an interrupted build
        if name.startswith(os.path.basename(folder) + ".partial-") and name.endswith(tag):
            shutil.rmtree(os.path.join(parent, name))
    tmp = folder + tag
    info = build(tmp)
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        json.dump({"fingerprint": fingerprint, "info": info}, f, indent=1)
    try:
        os.rename(tmp, folder)
    except OSError:
        # another process renamed its copy first; it must be the same build
        shutil.rmtree(tmp)
        done = read_marker(folder)
        if done is None or done["fingerprint"] != fingerprint:
            raise
        return done["info"]
    return info


def _build_world(config, cfg: world_lib.WorldConfig) -> Callable[[str], dict]:
    d = config.demo

    def build(tmp: str) -> dict:
        paths = assets_lib.build_assets(
            tmp, cfg, seed=int(d.seed), num_images=int(d.num_images), num_eval=int(d.num_eval),
            text_len=int(config.vision.overrides.text_len), siglip_vocab=int(d.siglip_vocab))
        from sea_jax.tokenizer import load_tokenizer

        return {"llm_vocab": len(load_tokenizer(paths.llm_tokenizer)),
                "siglip_vocab": len(load_tokenizer(paths.siglip_tokenizer))}

    return build


def prepare(config, workdir: str):
    """Builds (or finds) the demo assets under ``<workdir>/demo_assets`` and returns a copy of
    ``config`` using them (see the module docstring). Idempotent."""
    import jax

    cfg = world_config(config)
    d = config.demo
    folder = os.path.join(assets_dir(workdir, config), "world")
    fingerprint = {"version": VERSION, "world": dataclasses.asdict(cfg), "seed": int(d.seed), "num_images": int(d.num_images),
                   "num_eval": int(d.num_eval), "text_len": int(config.vision.overrides.text_len),
                   "siglip_vocab": int(d.siglip_vocab)}
    info = cached_step(folder, fingerprint, _build_world(config, cfg))
    paths = assets_lib.Assets.at(folder)
    if jax.process_index() == 0:
        write_probe_truth(paths, os.path.join(workdir, "probe_truth.npz"))
    if jax.process_index() == 0:
        logging.info("demo assets in %s: %d training images, %d held out", folder, int(d.num_images), int(d.num_eval))
    pretrained = {}
    if bool(d.pretrain):
        pretrained = _pretrain(config, workdir, paths, info, fingerprint)
    return _fill(config, paths, info, pretrained)


def write_probe_truth(paths: assets_lib.Assets, out: str) -> None:
    """The held-out images' per-patch true words (:class:`sea_jax.align.recall.PatchTruth`) at
    ``out``, where ``python -m sea_jax.probe`` finds them: an object patch's kind and colour, a
    background patch's texture (twice)."""
    import numpy as np

    from sea_jax.align.recall import PatchTruth

    with open(paths.eval_json, encoding="utf-8") as f:
        names = [r["image"] for r in json.load(f)]
    t = np.load(paths.truth)
    row = {str(n): i for i, n in enumerate(t["image"])}
    idx = np.asarray([row[n] for n in names])
    truth = PatchTruth([os.path.join(paths.image_root, n) for n in names], t["words"].tolist(),
                       np.stack([t["shape_word"][idx], t["colour_word"][idx]], -1), t["object_map"][idx] > 0)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}.npz"
    truth.save(tmp)
    os.replace(tmp, out)


def _pretrain(config, workdir: str, paths: assets_lib.Assets, info: dict, world_fp: dict) -> dict[str, str]:
    """The SigLIP and LM pretraining steps (cached); returns their folders by config section."""
    from sea_jax.demo import pretrain
    from sea_jax.models import llm as llm_lib
    from sea_jax.models import siglip

    d = config.demo
    out: dict[str, str] = {}
    if not config.vision.checkpoint:
        over = dict(config.vision.overrides or {}, vocab_size=int(info["siglip_vocab"]))
        sig_cfg = siglip.siglip_config(config.vision.variant, image_size=int(d.image_size), **over)
        kw = dict(steps=int(d.siglip_steps), batch_size=int(d.pretrain_batch), lr=float(d.siglip_lr), seed=int(d.seed),
                  patch_weight=float(d.siglip_patch_weight))
        fp = {"world": world_fp, "model": repr(sig_cfg), **kw}
        folder = os.path.join(assets_dir(workdir, config), "siglip")
        cached_step(folder, fp, lambda tmp: pretrain.pretrain_siglip(tmp, paths, sig_cfg, **kw))
        out["siglip"] = folder
    if not config.llm.checkpoint:
        over = dict(config.llm.overrides or {}, vocab_size=int(info["llm_vocab"]), dtype="float32")
        llm_cfg = llm_lib.preset(config.llm.preset, **over)
        kw = dict(steps=int(d.llm_steps), batch_size=int(d.pretrain_batch), lr=float(d.llm_lr), seed=int(d.seed))
        fp = {"world": world_fp, "model": repr(llm_cfg), **kw}
        folder = os.path.join(assets_dir(workdir, config), "llm")
        cached_step(folder, fp, lambda tmp: pretrain.pretrain_llm(tmp, paths, llm_cfg, **kw))
        out["llm"] = folder
    return out


def _fill(config, paths: assets_lib.Assets, info: dict[str, Any], pretrained: dict[str, str] | None = None):
    c = config.copy_and_resolve_references()

    def fill(section, field: str, value: Any) -> None:
        if not section[field]:
            section[field] = value

    with c.unlocked():
        pretrained = pretrained or {}
        # A pretrained folder's config.json is then the architecture (sea_jax.builder's rule): the
        # overrides that described it for pretraining have done their job.
        if "llm" in pretrained:
            c.llm.checkpoint = pretrained["llm"]  # its tokenizer is in the folder
            c.llm.overrides = ml_collections.ConfigDict()
        if "siglip" in pretrained:
            c.vision.checkpoint = pretrained["siglip"]
            c.vision.overrides = ml_collections.ConfigDict()
        if not c.llm.checkpoint:
            fill(c.llm, "tokenizer", paths.llm_tokenizer)
            c.llm.overrides.vocab_size = int(info["llm_vocab"])  # "<image>" is added by the trainer
        if not c.vision.checkpoint:
            fill(c.vision, "tokenizer", paths.siglip_tokenizer)
            c.vision.overrides.vocab_size = int(info["siglip_vocab"])
        c.vision.image_size = int(c.demo.image_size)
        if c.labels.word_list in ("", "demo"):
            c.labels.word_list = paths.word_list
        fill(c.data, "json", paths.stage2_json if int(c.stage) == 2 else paths.stage1_json)
        fill(c.data, "image_root", paths.image_root)
    return c
