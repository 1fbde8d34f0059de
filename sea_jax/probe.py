r"""The alignment probe (paper Figures 1 and 2, issue 8): which word does each visual token "mean"?

    python -m sea_jax.probe --workdir=DIR [--baseline=DIR_LAMBDA0] [--stage=1] [--out=probe.png]

For every visual token (adapter output, one per SigLIP patch) of a set of images, the *recalled
word* is the word of the label vocabulary whose Eq. 8 embedding (mean of the LLM's input-embedding
rows of its tokens, :func:`sea_jax.align.loss.label_embedding_table`) has the highest cosine
similarity with the token. Two accuracies:

* ``label_accuracy``: share of all visual tokens whose recalled word is among the patch's SigLIP
  labels -- the top ``labels.top_n`` words of the run's SigLIP (per-patch joint-space feature
  against the text tower's embedding of the word list, :func:`sea_jax.align.labels.top_labels`),
  score > 0 only. A patch with no label counts as a miss (``labelled_share`` says how many had one).
  This is the paper's measurement and works on any workdir, real configs included.
* ``truth_accuracy`` (demo workdirs only): share of visual tokens whose recalled word is a true
  word of the patch. Rule: the patch's plurality owner (``truth.npz``, :mod:`sea_jax.demo.world`)
  is either an object, whose true words are its kind ("circle") and its colour ("red") -- either
  one counts as right, since a patch of a red circle is both and SigLIP-style labels name either --
  or the background, whose one true word is the texture's ("stripes"). Also split into
  ``truth_accuracy_objects`` / ``truth_accuracy_background`` (the background covers most patches,
  so a model recalling only texture words scores high on the overall number).

Images: in a demo workdir (config with a ``demo`` section) the held-out ``eval.json`` images of
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

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# The math (pure)


def recall_words(tokens: Array | np.ndarray, table: Array | np.ndarray, valid: Array | np.ndarray | None = None,
                 *, chunk: int = 4096) -> np.ndarray:
    """Nearest word by cosine for every token.

    Args:
      tokens: float ``[n, d]`` visual tokens (any norm).
      table: float ``[W, d]`` word embeddings (Eq. 8 rows; any norm).
      valid: bool ``[W]``; words with ``False`` (no tokens: a zero row) are never recalled.
      chunk: tokens per matmul, bounding memory to ``[chunk, W]``.

    Returns:
      int32 ``[n]`` word ids; ties go to the lower id (``argmax``'s first index).
    """
    tokens = jnp.asarray(tokens, jnp.float32)
    table = jnp.asarray(table, jnp.float32)
    if tokens.ndim != 2 or table.ndim != 2 or tokens.shape[1] != table.shape[1]:
        raise ValueError(f"tokens [n, d] and table [W, d] expected, got {tokens.shape} and {table.shape}")
    mask = jnp.ones(table.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    return np.concatenate([np.asarray(_recall(tokens[s:s + chunk], table, mask))
                           for s in range(0, tokens.shape[0], chunk)] or [np.zeros(0, np.int32)])


@jax.jit
def _recall(tokens: Array, table: Array, mask: Array) -> Array:
    norm = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))  # noqa: E731
    sim = jnp.einsum("nd,wd->nw", norm(tokens), norm(table), precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(jnp.where(mask[None], sim, -jnp.inf), axis=-1).astype(jnp.int32)


def word_hits(recalled: np.ndarray, targets: np.ndarray, target_valid: np.ndarray | None = None) -> np.ndarray:
    """Whether each recalled word is one of its token's target words.

    Args:
      recalled: int ``[...]`` recalled word ids.
      targets: int ``[..., k]`` target word ids per token (SigLIP labels, or true words).
      target_valid: bool ``[..., k]``; invalid targets never match (default all valid).

    Returns:
      bool ``[...]``.
    """
    recalled, targets = np.asarray(recalled), np.asarray(targets)
    if targets.shape[:-1] != recalled.shape:
        raise ValueError(f"targets {targets.shape} do not match recalled {recalled.shape} + [k]")
    match = targets == recalled[..., None]
    if target_valid is not None:
        match &= np.asarray(target_valid, bool)
    return match.any(-1)


def alignment_accuracy(recalled: np.ndarray, targets: np.ndarray, target_valid: np.ndarray | None = None,
                       where: np.ndarray | None = None) -> float:
    """Share of tokens (those with ``where`` True, default all) whose recalled word is among their
    targets (:func:`word_hits`); NaN when no token is selected."""
    hits = word_hits(recalled, targets, target_valid)
    if where is not None:
        hits = hits[np.asarray(where, bool)]
    return float(hits.mean()) if hits.size else float("nan")


# ----------------------------------------------------------------------------------------------
# A run


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


def _top_workdir(run: str) -> str:
    return os.path.dirname(os.path.abspath(run)) if os.path.basename(os.path.normpath(run)).startswith("stage") else run


def _demo_images(config, top: str, limit: int):
    """(paths, truth [n, g, g, 2] ids into the demo word list, objects [n, g, g]) of eval.json."""
    from sea_jax.demo import assets as assets_lib
    from sea_jax.demo.prepare import assets_dir  # (sea_jax.demo.prepare is also the function's name)

    paths = assets_lib.Assets.at(os.path.join(assets_dir(top, config), "world"))
    with open(paths.eval_json, encoding="utf-8") as f:
        names = [r["image"] for r in json.load(f)][:limit]
    t = np.load(paths.truth)
    row = {str(n): i for i, n in enumerate(t["image"])}
    idx = np.asarray([row[n] for n in names])
    truth = np.stack([t["shape_word"][idx], t["colour_word"][idx]], -1)
    return [os.path.join(paths.image_root, n) for n in names], truth, t["object_map"][idx] > 0, [str(w) for w in t["words"]]


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
                  images: Sequence[str] | None = None, num_images: int = 64, batch_size: int = 16) -> ProbeResult:
    """Loads the run of ``workdir`` and measures its alignment (see the module docstring)."""
    from sea_jax import checkpoint, sharding, train
    from sea_jax import labels as labels_cli
    from sea_jax.align import labels as L
    from sea_jax.align import loss as loss_lib
    from sea_jax.data import images as images_lib
    from sea_jax.models import siglip
    from sea_jax.models.mllm import MLLM

    run = checkpoint.find_run(workdir, stage)
    top = _top_workdir(run)
    mesh = sharding.make_mesh({"data": 1}, jax.local_devices()[:1])
    # As checkpoint.load_params_from_workdir, but SigLIP is built once, text tower included (the
    # word table needs it even for a lambda = 0 run, which never loaded it).
    config = checkpoint.load_config(run)
    _, trained = checkpoint.Checkpointer(checkpoint.checkpoint_dir(run), async_save=False).restore_params(step)
    model = train.build_model(config, mesh, skip=tuple(trained) + ("vision", "word_table"), workdir=top)
    params = {**model.params, **trained}
    sig_cfg, sig_params, sig_id = train._siglip(config, mesh, load_weights=True)
    if "vision" not in params:
        params["vision"] = {"img": sig_params["img"]}
    missing = {"vision", "adapter", "llm"} - set(params)
    if missing:
        raise KeyError(f"{run}: parameters {sorted(missing)} neither in the checkpoint nor loadable")
    mcfg = model.cfg
    words = train.resolve_words(config)

    # Eq. 8 table in the LLM's input-embedding space (the trained embedding for a stage-2 run)
    wt = loss_lib.tokenize_words(model.tokenizer, words, on_empty="mask")
    emb = jnp.asarray(params["llm"]["embedder"]["embedding"])
    table = np.asarray(jax.jit(loss_lib.label_embedding_table)(emb, wt.ids, wt.mask))

    # SigLIP word table T = h(W) from the run's SigLIP text tower (random init or checkpoint)
    tokenizer, tok_path = labels_cli.load_tokenizer(config.siglip)
    tower = siglip.TextTower(sig_cfg)
    encode = jax.jit(lambda p, ids: tower.apply({"params": p}, ids, hidden_states=False).embedding)
    tokenize = L.make_tokenize_fn(tokenizer, max_length=sig_cfg.text_len, template=config.labels.prompt)
    cache = (config.labels.cache_dir or os.path.join(run, "word_table_cache")) if sig_id else None
    txt_params = sig_params.pop("txt")
    del sig_params  # the image tower used is params["vision"]
    word_table = L.embed_words(lambda ids: encode(txt_params, ids), tokenize, words, 256, cache_dir=cache,
                               checkpoint_id=sig_id,
                               tokenizer_id=labels_cli._tokenizer_identity(tok_path, sig_cfg.text_len, config.labels.prompt),
                               progress=False)

    # images
    truth = objects = None
    is_demo = "demo" in config and not images
    if is_demo:
        paths, truth, objects, demo_words = _demo_images(config, top, num_images)
        # truth ids index the demo's word list; map them onto the run's by spelling
        where = {w: i for i, w in enumerate(words)}
        truth = np.vectorize(lambda i: where.get(demo_words[i], -1))(truth).astype(np.int32)
    else:
        paths = list(images) if images else _data_images(config, num_images)
    size = mcfg.vision.image_size
    pad = bool(config.data.pad_to_square)
    pixels = np.stack([images_lib.load_and_preprocess(p, size, pad_to_square=pad) for p in paths])

    mllm = MLLM(mcfg)
    feature = L.FEATURES[config.labels.feature]
    img_tower = siglip.ImageTower(mcfg.vision)

    @jax.jit
    def forward(vision, adapter, wtab, x):
        enc = img_tower.apply({"params": vision["img"]}, x, patch_features=feature, hidden_states=True)
        tokens = mllm.visual_tokens(adapter, enc)
        ids, _, valid = L.top_labels(enc.patch_embeds, wtab, n=int(config.labels.top_n),
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
        "workdir": workdir, "run": run, "lambda": float(config.sea.lam), "stage": int(config.stage),
        "num_images": n, "num_tokens": int(recalled.size), "num_words": len(words),
        "label_accuracy": alignment_accuracy(recalled, labels, label_valid),
        "labelled_share": float(label_valid.any(-1).mean()),
        "distinct_recalled_words": int((counts > 0).sum()),
        "most_recalled": {words[i]: int(counts[i]) for i in top if counts[i]},
    }
    if truth is not None:
        metrics.update(
            truth_accuracy=alignment_accuracy(recalled, truth),
            truth_accuracy_objects=alignment_accuracy(recalled, truth, where=objects),
            truth_accuracy_background=alignment_accuracy(recalled, truth, where=~objects),
            object_share=float(objects.mean()),
            # SigLIP's own labels against the truth: how good the teacher is
            siglip_label_truth_accuracy=float(np.mean(_any_label_true(labels, label_valid, truth))),
        )
    mean = np.asarray(images_lib.SIGLIP_MEAN, np.float32)
    std = np.asarray(images_lib.SIGLIP_STD, np.float32)
    shown = np.clip(np.rint((pixels * std + mean) * 255), 0, 255).astype(np.uint8)
    return ProbeResult(shown, list(words), recalled, labels, label_valid, truth, objects, metrics)


def _any_label_true(labels: np.ndarray, valid: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """bool [...]: some valid SigLIP label of the patch is one of its true words."""
    return ((labels[..., :, None] == truth[..., None, :]) & valid[..., :, None]).any((-1, -2))


# ----------------------------------------------------------------------------------------------
# Figure 1


def plot(results: Sequence[tuple[str, ProbeResult]], out: str, num_images: int = 4) -> None:
    """Writes the PNG: one row per image, one column per run (name, result); each patch shows its
    recalled word, green where :meth:`ProbeResult.correct`, red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(num_images, min(r.recalled.shape[0] for _, r in results))
    cols = len(results)
    fig, axes = plt.subplots(k, cols, figsize=(4.2 * cols, 4.2 * k), squeeze=False)
    for c, (name, r) in enumerate(results):
        ok = r.correct()
        g = r.recalled.shape[1]
        for i in range(k):
            ax = axes[i, c]
            s = r.pixels.shape[1]
            ax.imshow(r.pixels[i], extent=(0, s, s, 0), alpha=0.75)
            step = s / g
            for y in range(g):
                for x in range(g):
                    ax.text((x + 0.5) * step, (y + 0.5) * step, r.words[r.recalled[i, y, x]], ha="center",
                            va="center", fontsize=max(3.0, 48.0 / g), color="green" if ok[i, y, x] else "red",
                            fontweight="bold")
            for t in np.arange(1, g) * step:
                ax.axhline(t, color="white", lw=0.3)
                ax.axvline(t, color="white", lw=0.3)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                m = r.metrics
                acc = m.get("truth_accuracy", m["label_accuracy"])
                kind = "truth" if "truth_accuracy" in m else "SigLIP labels"
                ax.set_title(f"{name} (lambda={m['lambda']:g})\n{kind} acc {acc:.1%}, label acc {m['label_accuracy']:.1%}",
                             fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_probe(workdir: str, baseline: str | None = None, *, out: str | None = None, json_out: str | None = None,
              stage: int | None = None, images: Sequence[str] | None = None, num_images: int = 64,
              plot_images: int = 4) -> dict:
    """The CLI as a function: probes ``workdir`` (and ``baseline``), writes the PNG and JSON,
    returns ``{"run": metrics, "baseline": metrics or None}``."""
    results = [("SEA" if baseline else "run", probe_workdir(workdir, stage=stage, images=images, num_images=num_images))]
    if baseline:
        results.append(("baseline", probe_workdir(baseline, stage=stage, images=images, num_images=num_images)))
    out = out or os.path.join(workdir, "probe.png")
    json_out = json_out or os.path.splitext(out)[0] + ".json"
    plot(results, out, plot_images)
    summary = {"run": results[0][1].metrics, "baseline": results[1][1].metrics if baseline else None, "png": out}
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    from absl import flags

    f = flags.FLAGS
    summary = run_probe(f.workdir, f.baseline or None, out=f.out or None, json_out=f.json or None, stage=f.stage,
                        images=f.images or None, num_images=f.num_images, plot_images=f.plot_images)
    print(json.dumps(summary, indent=1))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "a sea_jax.train workdir (or one of its stage folders)")
    flags.DEFINE_string("baseline", "", "a second workdir (e.g. lambda = 0) drawn beside the first")
    flags.DEFINE_integer("stage", None, "stage to probe (default the highest trained)")
    flags.DEFINE_string("out", "", "PNG path (default <workdir>/probe.png)")
    flags.DEFINE_string("json", "", "JSON path (default the PNG's with .json)")
    flags.DEFINE_list("images", [], "image files (default: the demo's eval images, else config.data.json's)")
    flags.DEFINE_integer("num_images", 64, "images to probe")
    flags.DEFINE_integer("plot_images", 4, "images drawn in the PNG")
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
