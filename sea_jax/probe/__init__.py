r"""The alignment probe (paper Figures 1 and 2): which word does each visual token "mean"?

:func:`probe_workdir` measures a trained run, :func:`run_probe` also writes the picture
(:mod:`sea_jax.probe.figure`) and the JSON; ``python -m sea_jax.probe`` is the command line. The
math is :mod:`sea_jax.align.recall`.

For every visual token (adapter output, one per SigLIP patch) of a set of images, the *recalled
word* is the word of the label vocabulary whose Eq. 8 embedding (mean of the LLM's input-embedding
rows of its tokens, :func:`sea_jax.align.loss.label_embedding_table`) has the highest cosine
similarity with the token. Two accuracies:

* ``label_accuracy``: share of all visual tokens whose recalled word is among the patch's SigLIP
  labels -- the top ``labels.top_n`` words of the run's SigLIP (per-patch joint-space feature
  against the text tower's embedding of the word list, :func:`sea_jax.align.semantic_labels.top_labels`),
  score > 0 only. A patch with no label counts as a miss (``labelled_share`` says how many had one).
  This is the paper's measurement and works on any workdir, real configs included.
* ``truth_accuracy`` (demo workdirs only): share of visual tokens whose recalled word is a true
  word of the patch. Rule: the patch's plurality owner (``truth.npz``, :mod:`sea_jax.demo.world`)
  is either an object, whose true words are its kind ("circle") and its colour ("red") -- either
  one counts as right, since a patch of a red circle is both and SigLIP-style labels name either --
  or the background, whose one true word is the texture's ("stripes"). Also split into
  ``truth_accuracy_objects`` / ``truth_accuracy_background`` (the background covers most patches,
  so a model recalling only texture words scores high on the overall number).

Images: in a demo workdir (a config run by the demo's runner) the held-out ``eval.json`` images of
``<workdir>/demo_assets/world``; otherwise ``--images`` (files) or the first ``--num_images`` records
of the run's ``config.data.json``. Preprocessing is the run's (size, ``data.pad_to_square``).

Outputs: a JSON of the numbers (``--json``, default next to the PNG; also printed) and a PNG like
Figure 1 (``--out``, default ``<workdir>/probe.png``): ``--plot_images`` images, each patch
written with its recalled word, green where right (truth in a demo, else SigLIP labels) and red
where wrong; the baseline's panel beside the run's when ``--baseline`` is given.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax import storage
from sea_jax.align.recall import PatchTruth, alignment_accuracy, recall_words, word_hits
from sea_jax.probe.figure import plot


class ProbeResult(NamedTuple):
    """One workdir's probe. ``n`` images of a ``g x g`` patch grid.

    pixels: uint8 [n, S, S, 3] the images as the model saw them. words: the label vocabulary.
    recalled: int32 [n, g, g]. labels / label_valid: [n, g, g, top_n] SigLIP labels.
    truth: int32 [n, g, g, 2] true word ids (kind, colour; the background word twice) into
    ``words`` or None (not a demo). objects: bool [n, g, g] object patches, or None. metrics: the JSON.
    """

    pixels: np.ndarray
    words: list[str]
    recalled: np.ndarray
    labels: np.ndarray
    label_valid: np.ndarray
    truth: np.ndarray | None
    objects: np.ndarray | None
    metrics: dict

    def correct(self) -> np.ndarray:
        """bool [n, g, g]: right by the truth in a demo, else by the SigLIP labels."""
        if self.truth is not None:
            return word_hits(self.recalled, self.truth)
        return word_hits(self.recalled, self.labels, self.label_valid)


def _data_images(config, limit: int) -> list[str]:
    from sea_jax.data import pipeline

    out = []
    for rec in pipeline.load_records(config.data.json):
        if rec.get("image"):
            out.append(os.path.join(config.data.image_root, rec["image"]))
            if len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{config.data.json}: no record with an image")
    return out


def probe_workdir(workdir: str, *, stage: int | None = None, step: int | None = None,
                  images: Sequence[str] | None = None, num_images: int = 64, batch_size: int = 16,
                  truth: PatchTruth | None = None) -> ProbeResult:
    """Loads the run of ``workdir`` and measures its alignment (see the module docstring).

    Images: ``truth.images`` when a :class:`~sea_jax.align.recall.PatchTruth` is given (then
    ``truth_accuracy`` is measured too), else ``images``, else the run's ``data.json``; at most
    ``num_images``.
    """
    from sea_jax import builder, sharding
    from sea_jax.align import loss as loss_lib
    from sea_jax.align import semantic_labels as L
    from sea_jax.data import images as images_lib
    from sea_jax.models.mllm import MLLM
    from sea_jax.rundir import RunDir

    run = RunDir.find(workdir, stage)
    mesh = sharding.make_mesh({"data": 1}, jax.local_devices()[:1])
    config = run.load_config()
    # The vision tower is loaded once, text tower included: the word table needs it even for a
    # lambda = 0 run, which never embedded the word list.
    sources = builder.read_sources(config)
    sig_cfg = builder.vision_config(config, sources)
    vision_tree, vision_id = builder.load_vision(config, sig_cfg, mesh)
    m = builder.load_trained(workdir, stage=stage, step=step, mesh=mesh, to_host=False, vision=vision_tree)
    params, mcfg = m.params, m.cfg
    words = builder.word_list(config)

    # Eq. 8 table in the LLM's input-embedding space (the trained embedding for a stage-2 run)
    wt = loss_lib.tokenize_words(m.tokenizer, words, on_empty="mask")
    emb = jnp.asarray(params["llm"]["embedder"]["embedding"])
    table = np.asarray(jax.jit(loss_lib.label_embedding_table)(emb, wt.ids, wt.mask))
    # SigLIP word table T = h(W) from the run's text tower (random init or checkpoint)
    word_table = builder.word_table(config, sig_cfg, vision_tree["txt"], vision_id, words,
                                    run.word_table_cache(config))
    del vision_tree

    # images
    objects = truth_ids = None
    if truth is not None:
        truth = truth.head(num_images)
        paths, truth_ids, objects = truth.images, truth.onto(words), truth.objects
    else:
        paths = list(images)[:num_images] if images else _data_images(config, num_images)
    spec = mcfg.pixel_spec
    pad = bool(config.data.pad_to_square)
    pixels = np.stack([images_lib.load_for(spec, p, pad) for p in paths])

    mllm = MLLM(mcfg)

    @jax.jit
    def forward(vision, adapter, wtab, x):
        image = mllm.encode_images(vision, x)  # the adapter's features and the labels' (as training)
        tokens = mllm.visual_tokens(adapter, image)
        ids, _, valid = L.top_labels(image.patch_embeds, wtab, n=int(config.labels.top_n),
                                     negate_similarity=bool(config.labels.negate_similarity))
        return tokens, ids, valid

    toks, lab, lval = [], [], []
    n = len(paths)
    for s in range(0, n, batch_size):
        x = pixels[s:s + batch_size]
        real = x.shape[0]
        if real < batch_size:  # one compiled shape
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - real, 0)])
        t, i, v = forward(params["vision"], params["adapter"], jnp.asarray(word_table), jnp.asarray(x))
        toks.append(np.asarray(t)[:real])
        lab.append(np.asarray(i)[:real])
        lval.append(np.asarray(v)[:real])
    tokens, labels, label_valid = np.concatenate(toks), np.concatenate(lab), np.concatenate(lval)
    g = mcfg.vision.grid
    recalled = recall_words(tokens.reshape(-1, tokens.shape[-1]), table, wt.valid).reshape(n, g, g)
    labels, label_valid = labels.reshape(n, g, g, -1), label_valid.reshape(n, g, g, -1)

    counts = np.bincount(recalled.ravel(), minlength=len(words))
    top = np.argsort(-counts, kind="stable")[:10]
    metrics: dict[str, Any] = {
        "workdir": workdir, "run": run.path, "lambda": float(config.sea.lam), "stage": int(config.stage),
        "num_images": n, "num_tokens": int(recalled.size), "num_words": len(words),
        "label_accuracy": alignment_accuracy(recalled, labels, label_valid),
        "labelled_share": float(label_valid.any(-1).mean()),
        "distinct_recalled_words": int((counts > 0).sum()),
        "most_recalled": {words[i]: int(counts[i]) for i in top if counts[i]},
    }
    if truth_ids is not None:
        metrics.update(
            truth_accuracy=alignment_accuracy(recalled, truth_ids),
            # SigLIP's own labels against the truth: how good the teacher is
            siglip_label_truth_accuracy=float(np.mean(any_label_true(labels, label_valid, truth_ids))),
        )
        if objects is not None:
            metrics.update(
                truth_accuracy_objects=alignment_accuracy(recalled, truth_ids, where=objects),
                truth_accuracy_background=alignment_accuracy(recalled, truth_ids, where=~objects),
                object_share=float(objects.mean()))
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    shown = np.clip(np.rint((pixels * std + mean) * 255), 0, 255).astype(np.uint8)
    return ProbeResult(shown, list(words), recalled, labels, label_valid, truth_ids, objects, metrics)


def any_label_true(labels: np.ndarray, valid: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """bool [...]: some valid SigLIP label of the patch is one of its true words."""
    return ((labels[..., :, None] == truth[..., None, :]) & valid[..., :, None]).any((-1, -2))


def run_probe(workdir: str, baseline: str | None = None, *, out: str | None = None, json_out: str | None = None,
              stage: int | None = None, images: Sequence[str] | None = None, num_images: int = 64,
              plot_images: int = 4, truth: PatchTruth | None = None) -> dict:
    """The CLI as a function: probes ``workdir`` (and ``baseline``), writes the PNG and JSON,
    returns ``{"run": metrics, "baseline": metrics or None, "png": path}``."""
    kw = dict(stage=stage, images=images, num_images=num_images, truth=truth)
    results = [("SEA" if baseline else "run", probe_workdir(workdir, **kw))]
    if baseline:
        results.append(("baseline", probe_workdir(baseline, **kw)))
    out = out or storage.join(workdir, "probe.png")
    json_out = json_out or os.path.splitext(out)[0] + ".json"
    plot(results, out, plot_images)
    summary = {"run": results[0][1].metrics, "baseline": results[1][1].metrics if baseline else None, "png": out}
    storage.atomic_write(json_out, lambda f: json.dump(summary, f, indent=1))  # local or gs://
    return summary


__all__ = ["ProbeResult", "probe_workdir", "run_probe", "any_label_true"]
