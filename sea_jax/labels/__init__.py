r"""Offline semantic labelling of a whole dataset (SEA, paper Eq. 4-6), on every host of a pod.

:func:`label_dataset` is the tool; ``python -m sea_jax.labels --config=configs/X.py --workdir=DIR``
(:mod:`sea_jax.labels.__main__`) its command line. It works with every recipe config: it reads the
``vision``, ``labels`` and ``data`` sections (``sea_jax.config.base_config`` describes each field).

Every process labels its own slice of the dataset with the devices it owns (labelling is
embarrassingly parallel: no cross-host collective is needed, so a slow or preempted host never
stalls the others), writes shards, and the run that finds every shard complete writes the index and
the summary.

Fields read: ``vision.*`` (the tower, its tokenizer, dtype), ``labels.*`` (word list, prompt,
top_n, sign, feature, batch and shard sizes, output and cache folders, per-host mesh, word-table
split, precision, decoding threads, ``max_shards``, ``process_index`` / ``process_count``) and
``data.json``, ``data.image_root``, ``data.pad_to_square``; the image size is the tower's
(``vision.image_size``).

Outputs, under ``output_dir``:

* ``meta.json`` -- what produced the labels (word list digest, n, sign, feature, image size,
  checkpoint identity, shard layout); a rerun with a different setting refuses to mix shards.
* ``words.txt`` -- the word list; a word id is a line index.
* ``shard-SSSSS-of-NNNNN.npz`` -- shard s holds unique images [s*K, (s+1)*K) in first-appearance
  order of the JSON. Arrays: ``ids`` int32 [k, p, n] (-1 where the label was dropped, score <= 0),
  ``scores`` float16 [k, p, n] (the ranking similarity, see ``sea_jax.align.semantic_labels``), ``image``
  [k] relative paths, ``image_index`` int64 [k], ``bad_image`` / ``bad_reason`` (images skipped),
  and statistics for the summary (``word_counts`` [W], ``word_score_sum`` [W], ``score_hist``).
  Written to a temp name, fsynced, then renamed: a shard file that exists is complete, so a killed
  run is resumed by running the same command again (completed shards are skipped).
* ``index.json`` -- ``{"shards": [...], "images": {path: [shard, row]}, "samples": {id: [shard, row]}}``.
* ``summary.json`` and ``summary.png`` -- word-list utilisation (share of words used as a label at
  least once; the paper reports 61.2% for 2of12 on LLaVA-Pretrain), the distribution of kept scores
  and of each used word's mean score (the paper's Figure 6), counts of records without an image and
  of unreadable images (with their sample ids).

Records without an image are skipped and counted; an image that cannot be decoded is skipped,
logged with its sample ids and counted -- neither stops the run. (Its shard still counts as complete:
after fixing such a file, delete that shard and rerun to label it.)
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from sea_jax import config as config_lib
from sea_jax import storage
from sea_jax.data import images as image_lib
from sea_jax.errors import ConfigError, DataFormatError, PathError

SCORE_BINS = 200  # histogram of kept scores over (0, 1]: 0.005-wide bins
META_KEYS = (
    "words_sha256", "num_words", "top_n", "negate_similarity", "feature", "prompt", "image_size",
    "pad_to_square", "checkpoint_id", "tokenizer_id", "shard_size", "num_images", "num_shards",
)


# ----------------------------------------------------------------------------------------------
# Dataset records


@dataclasses.dataclass
class Dataset:
    """Unique images of a LLaVA JSON, in first-appearance order, and who uses them.

    Attributes:
      images: relative image paths, each once (labels depend on the image only, so an image
        shared by several records is labelled once).
      samples: (sample id, image position) for every record with an image, in JSON order.
      num_records: records in the JSON.
      no_image: records without an image (text-only), skipped.
      duplicate_ids: sample ids seen more than once (the index keeps the last).
    """

    images: list[str]
    samples: list[tuple[str, int]]
    num_records: int
    no_image: int
    duplicate_ids: int


def read_llava_json(path: str) -> Dataset:
    """Parses a LLaVA-format JSON list. A record's ``image`` must be a non-empty string or absent."""
    from sea_jax.data.pipeline import load_records

    records = load_records(path)
    position: dict[str, int] = {}
    images: list[str] = []
    samples: list[tuple[str, int]] = []
    seen_ids: set[str] = set()
    no_image = duplicates = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{path}: record {i} is not an object")
        sid = str(rec.get("id", i))
        image = rec.get("image")
        if image is None or image == "":
            no_image += 1
            continue
        if not isinstance(image, str):
            raise DataFormatError(f"{path}: record {i} (id {sid!r}): 'image' must be a string, got {image!r}")
        if image not in position:
            position[image] = len(images)
            images.append(image)
        if sid in seen_ids:
            duplicates += 1
        seen_ids.add(sid)
        samples.append((sid, position[image]))
    return Dataset(images, samples, len(records), no_image, duplicates)


# ----------------------------------------------------------------------------------------------
# Shards


def shard_name(s: int, num_shards: int) -> str:
    return f"shard-{s:05d}-of-{num_shards:05d}.npz"


def shard_path(out_dir: str, s: int, num_shards: int) -> str:
    return storage.join(out_dir, shard_name(s, num_shards))


def _remove_stale_temps(out_dir: str, shards: Sequence[int], num_shards: int) -> int:
    """Deletes leftover temp files of ``shards`` (a killed writer's), returns how many."""
    prefixes = tuple(shard_name(s, num_shards) + ".tmp-" for s in shards)
    removed = 0
    if not storage.isdir(out_dir):  # a gs:// folder exists only once something is in it
        return 0
    for name in storage.listdir(out_dir):
        if name.startswith(prefixes):
            storage.remove(storage.join(out_dir, name))
            removed += 1
    return removed


def _write_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    storage.atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")


def _write_text_atomic(path: str, text: str) -> None:
    storage.atomic_write(path, lambda f: f.write(text))


def shard_statistics(ids: np.ndarray, scores: np.ndarray, num_words: int) -> dict[str, np.ndarray]:
    """Per-word usage counts and score sums, and the kept-score histogram of one shard's labels."""
    keep = ids >= 0
    kept_ids = ids[keep].astype(np.int64)
    kept_scores = scores[keep].astype(np.float64)
    return {
        "word_counts": np.bincount(kept_ids, minlength=num_words).astype(np.int64),
        "word_score_sum": np.bincount(kept_ids, weights=kept_scores, minlength=num_words),
        "score_hist": np.histogram(kept_scores, bins=SCORE_BINS, range=(0.0, 1.0))[0].astype(np.int64),
        "num_entries": np.int64(ids.size),
    }


# ----------------------------------------------------------------------------------------------
# Model, tokenizer, word table


def _precision(name: str):
    import jax

    table = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
             "default": jax.lax.Precision.DEFAULT}
    if name not in table:
        raise ValueError(f"labels.matmul_precision must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ----------------------------------------------------------------------------------------------
# The run


def _batches(items: list[tuple[int, str]], batch_size: int, load, pool) -> Iterator[list]:
    """Yields lists of (image position, result) per ``batch_size`` items, loading two batches ahead
    in ``pool`` so decoding overlaps the device step; memory stays bounded at three batches."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    pending: collections.deque = collections.deque()
    it = iter(chunks)

    def submit():
        chunk = next(it, None)
        if chunk is not None:
            pending.append([(pos, pool.submit(load, path)) for pos, path in chunk])

    for _ in range(3):
        submit()
    while pending:
        chunk = pending.popleft()
        submit()
        yield [(pos, fut.result()) for pos, fut in chunk]


def _load_safe(root: str, rel: str, spec: image_lib.PixelSpec, pad: bool):
    """The image's pixels, or the error that makes it a bad image (unreadable, or a path that
    leaves the image root: refused, never opened)."""
    try:
        return image_lib.load_for(spec, image_lib.resolve_under_root(root, rel), pad)
    except (image_lib.ImageLoadError, image_lib.ImagePathError) as e:
        return e


def label_dataset(config, workdir: str) -> dict | None:
    """Labels every image of ``config.data.json`` this process owns; returns the summary if this
    run completed the dataset (and wrote index + summary), else None."""
    import jax

    from sea_jax import builder, sharding
    from sea_jax.align import semantic_labels as L

    config_lib.validate(config)
    lc, dc = config.labels, config.data
    check_paths(config)
    out_dir = lc.output_dir or storage.join(workdir, "labels")
    cache_dir = lc.cache_dir or storage.join(workdir, "word_table_cache")
    storage.makedirs(out_dir)
    pi = lc.process_index if lc.process_index >= 0 else jax.process_index()
    pc = lc.process_count if lc.process_count > 0 else jax.process_count()
    if not 0 <= pi < pc:
        raise ConfigError(f"config.labels.process_index {pi} outside [0, {pc})")

    data = read_llava_json(dc.json)
    words = L.resolve_word_list(lc.word_list, lc.default_size)
    shard_size = int(lc.shard_size)
    num_shards = max(1, math.ceil(len(data.images) / shard_size))
    mine = list(range(pi, num_shards, pc))
    logging.info(
        "process %d/%d: %d records (%d without image, skipped), %d unique images in %d shards of %d; "
        "%d shards are this process's", pi, pc, data.num_records, data.no_image, len(data.images),
        num_shards, shard_size, len(mine),
    )
    removed = _remove_stale_temps(out_dir, mine, num_shards)
    if removed:
        logging.info("removed %d temp files left by an interrupted run", removed)
    pending = [s for s in mine if not storage.exists(shard_path(out_dir, s, num_shards))]
    if len(pending) < len(mine):
        logging.info("resuming: %d of this process's %d shards already complete, skipped",
                     len(mine) - len(pending), len(mine))
    if lc.max_shards > 0:
        pending = pending[: lc.max_shards]

    meta = {
        "words_sha256": L.words_digest(words), "num_words": len(words), "top_n": int(lc.top_n),
        "negate_similarity": bool(lc.negate_similarity), "feature": lc.feature, "prompt": lc.prompt,
        "pad_to_square": bool(dc.pad_to_square), "shard_size": shard_size,
        "num_images": len(data.images), "num_shards": num_shards,
        "checkpoint_id": L.file_identity(builder.local_path(config.vision.checkpoint)),
    }
    cfg = builder.vision_config(config)
    meta["image_size"] = cfg.image_size
    if pending:
        mesh = sharding.make_mesh(dict(lc.mesh), jax.local_devices())
        params, _ = builder.load_vision(config, cfg, mesh)
        tokenizer, tok_parts = builder.load_vision_tokenizer(config)
        meta["tokenizer_id"] = builder.tokenizer_identity(tok_parts, cfg.text_len, lc.prompt)
    elif not _read_meta(out_dir):
        raise PathError(f"{out_dir}: shards exist but meta.json is missing; delete the shards to relabel")
    # With nothing left to label the model is not loaded: the settings known without it are checked.
    _check_or_write_meta(out_dir, meta)
    _write_words(out_dir, words)

    if pending:
        from jax.sharding import NamedSharding, PartitionSpec

        from sea_jax.models import siglip

        # The word list is split over this host's devices like an image batch (data x fsdp).
        text_axes = sharding.logical_spec(("batch",), mesh=mesh)[0]
        text_axes_t = (text_axes,) if isinstance(text_axes, str) else tuple(text_axes or ())
        text_shards = math.prod(mesh.shape[a] for a in text_axes_t)
        text_batch = -(-int(lc.text_batch_size) // text_shards) * text_shards
        text_tower = siglip.TextTower(cfg)

        @functools.partial(jax.jit, in_shardings=(None, NamedSharding(mesh, PartitionSpec(text_axes))))
        def encode_text(p, ids):
            with sharding.activation_sharding(mesh):
                return text_tower.apply({"params": p}, ids, hidden_states=False).embedding

        tokenize = L.make_tokenize_fn(tokenizer, max_length=cfg.text_len, template=lc.prompt)
        table = L.embed_words(
            lambda ids: encode_text(params["txt"], ids), tokenize, words, text_batch,
            cache_dir=cache_dir, checkpoint_id=meta["checkpoint_id"], tokenizer_id=meta["tokenizer_id"],
        )
        word_axes = lc.word_axes
        if isinstance(word_axes, str):  # "tensor", "fsdp,tensor" or "" (replicated)
            word_axes = [a for a in re.split(r"[,\s]+", word_axes) if a]
        labeller = L.make_labeller(
            cfg, params, table, mesh, n=int(lc.top_n), negate_similarity=bool(lc.negate_similarity),
            word_axes=word_axes, chunk_size=(int(lc.chunk_size) or None),
            precision=_precision(lc.matmul_precision),
        )
        if lc.batch_size % labeller.batch_shards:
            raise ConfigError(
                f"config.labels.batch_size {lc.batch_size} must be a multiple of the {labeller.batch_shards} "
                f"batch shards of this host's mesh {dict(mesh.shape)}"
            )
        users: dict[int, list[str]] = collections.defaultdict(list)
        for sid, pos in data.samples:
            users[pos].append(sid)
        with concurrent.futures.ThreadPoolExecutor(max(1, int(lc.num_workers))) as pool:
            for s in pending:
                _label_shard(s, num_shards, out_dir, data, users, labeller, cfg, config, len(words), pool)

    if lc.process_count <= 0 and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sea_jax.labels: all shards written")
        if pi != 0:
            return None  # process 0 writes the summary once for the pod
    done = [s for s in range(num_shards) if storage.exists(shard_path(out_dir, s, num_shards))]
    if len(done) < num_shards:
        logging.info("%d of %d shards complete; the run that completes the last one writes the summary",
                     len(done), num_shards)
        return None
    return finalize(out_dir, data)


def _read_meta(out_dir: str, required: bool = False) -> dict:
    path = storage.join(out_dir, "meta.json")
    if not storage.exists(path):
        if required:
            raise PathError(f"{path} missing although shards exist; delete the shards to relabel")
        return {}
    with storage.open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_or_write_meta(out_dir: str, meta: dict) -> None:
    old = _read_meta(out_dir)
    if old:
        diff = {k: (old.get(k), meta[k]) for k in META_KEYS if k in meta and old.get(k) != meta[k]}
        if diff:
            raise ConfigError(
                f"{out_dir} holds labels made with different settings {diff} (old, new); use another "
                "config.labels.output_dir or delete it"
            )
        return
    _write_text_atomic(storage.join(out_dir, "meta.json"), json.dumps(meta, indent=1, sort_keys=True))


def _write_words(out_dir: str, words: list[str]) -> None:
    path = storage.join(out_dir, "words.txt")
    text = "".join(w + "\n" for w in words)
    if storage.exists(path):
        with storage.open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    _write_text_atomic(path, text)


def _label_shard(s, num_shards, out_dir, data: Dataset, users, labeller, cfg, config, num_words, pool) -> None:
    lc, dc = config.labels, config.data
    t0 = time.time()
    lo, hi = s * int(lc.shard_size), min((s + 1) * int(lc.shard_size), len(data.images))
    items = [(pos, data.images[pos]) for pos in range(lo, hi)]
    size, pad, bs = cfg.image_size, bool(dc.pad_to_square), int(lc.batch_size)
    rows_pos: list[int] = []
    outs: list[tuple[Any, Any, int]] = []
    bad: list[tuple[str, str]] = []
    from sea_jax.models.mllm import pixel_spec_for

    spec = pixel_spec_for(cfg)
    load = lambda rel: _load_safe(dc.image_root, rel, spec, pad)  # noqa: E731
    for chunk in _batches(items, bs, load, pool):
        good = []
        for pos, res in chunk:
            if isinstance(res, (image_lib.ImageLoadError, image_lib.ImagePathError)):
                logging.warning("skipping image %s (samples %s): %s", data.images[pos], users[pos], res)
                bad.append((data.images[pos], str(res)))
            else:
                good.append((pos, res))
        if not good:
            continue
        batch = np.zeros((bs, size, size, 3), np.float32)  # padded rows are discarded below
        for i, (pos, pixels) in enumerate(good):
            batch[i] = pixels
            rows_pos.append(pos)
        ids, scores, valid = labeller(batch)  # dispatched asynchronously; read back at shard end
        outs.append((ids, scores, valid, len(good)))
    n = int(lc.top_n)
    p = cfg.num_patches
    all_ids = np.empty((len(rows_pos), p, n), np.int32)
    all_scores = np.empty((len(rows_pos), p, n), np.float32)
    row = 0
    for ids, scores, valid, k in outs:
        ids, scores, valid = (np.asarray(a)[:k] for a in (ids, scores, valid))
        all_ids[row:row + k] = np.where(valid, ids, -1)  # dropped labels (score <= 0) -> id -1
        all_scores[row:row + k] = scores
        row += k
    arrays = {
        "ids": all_ids,
        "scores": all_scores.astype(np.float16),
        "image": np.asarray([data.images[pos] for pos in rows_pos], dtype=np.str_),
        "image_index": np.asarray(rows_pos, np.int64),
        "bad_image": np.asarray([b[0] for b in bad], dtype=np.str_),
        "bad_reason": np.asarray([b[1] for b in bad], dtype=np.str_),
        # statistics from the float32 scores, so the summary does not need the label arrays
        **shard_statistics(all_ids, all_scores, num_words),
    }
    _write_npz_atomic(shard_path(out_dir, s, num_shards), arrays)
    dt = time.time() - t0
    logging.info("shard %d/%d: %d images labelled, %d bad, %.1fs (%.1f images/s)", s + 1, num_shards,
                 len(rows_pos), len(bad), dt, len(rows_pos) / max(dt, 1e-9))


# ----------------------------------------------------------------------------------------------
# Index and summary


def finalize(out_dir: str, data: Dataset) -> dict:
    """Writes ``index.json``, ``summary.json`` and ``summary.png`` from the shards' small arrays
    (the label arrays themselves are not read), returns the summary."""
    meta = _read_meta(out_dir, required=True)
    with storage.open(storage.join(out_dir, "words.txt"), encoding="utf-8") as f:
        words = [w.rstrip("\n") for w in f]
    num_shards, num_words = meta["num_shards"], meta["num_words"]
    shards = [shard_name(s, num_shards) for s in range(num_shards)]
    where: dict[str, list[int]] = {}
    counts = np.zeros(num_words, np.int64)
    score_sum = np.zeros(num_words, np.float64)
    hist = np.zeros(SCORE_BINS, np.int64)
    entries = 0
    bad_images: list[tuple[str, str]] = []
    for s, name in enumerate(shards):
        with np.load(io.BytesIO(storage.read_bytes(storage.join(out_dir, name))), allow_pickle=False) as z:
            for r, path in enumerate(z["image"].tolist()):
                where[path] = [s, r]
            bad_images += list(zip(z["bad_image"].tolist(), z["bad_reason"].tolist()))
            counts += z["word_counts"]
            score_sum += z["word_score_sum"]
            hist += z["score_hist"]
            entries += int(z["num_entries"])
    samples = {sid: where[data.images[pos]] for sid, pos in data.samples if data.images[pos] in where}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for sid, pos in data.samples:
        users[data.images[pos]].append(sid)

    index = {"shards": shards, "images": where, "samples": samples}
    _write_text_atomic(storage.join(out_dir, "index.json"), json.dumps(index))

    used = counts > 0
    kept = int(counts.sum())
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    word_mean = np.where(used, score_sum / np.maximum(counts, 1), 0.0)
    cdf = np.cumsum(hist)
    median = float(centres[np.searchsorted(cdf, kept / 2)]) if kept else float("nan")
    order = np.argsort(-counts, kind="stable")[:25]
    summary = {
        "num_records": data.num_records,
        "records_without_image": data.no_image,
        "duplicate_sample_ids": data.duplicate_ids,
        "num_images": len(data.images),
        "images_labelled": len(where),
        "bad_images": len(bad_images),
        "bad_image_list": [{"image": p, "samples": users[p], "reason": r} for p, r in bad_images],
        "word_list_size": num_words,
        "words_used": int(used.sum()),
        "utilization": float(used.mean()),
        "label_entries": entries,
        "labels_kept": kept,
        "kept_fraction": kept / entries if entries else 0.0,
        "mean_labels_per_patch": kept / entries * meta["top_n"] if entries else 0.0,
        "kept_score_mean": float(score_sum.sum() / kept) if kept else float("nan"),
        "kept_score_median_approx": median,
        "used_word_mean_score_median": float(np.median(word_mean[used])) if used.any() else float("nan"),
        "top_words": [{"word": words[i], "count": int(counts[i])} for i in order if counts[i] > 0],
        "score_hist": {"edges": edges.tolist(), "counts": hist.tolist()},
        "settings": {k: meta[k] for k in ("top_n", "negate_similarity", "feature", "prompt", "image_size")},
    }
    _write_text_atomic(storage.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    _plot(storage.join(out_dir, "summary.png"), centres, hist, word_mean[used], summary)
    logging.info(
        "summary: %d images labelled, %d bad, %d records without image; word-list utilization %.1f%% "
        "(%d of %d words); kept-score mean %.3f", len(where), len(bad_images), data.no_image,
        100 * summary["utilization"], summary["words_used"], num_words, summary["kept_score_mean"],
    )
    return summary


def _plot(path: str, centres, hist, word_means, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on pod hosts
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(centres, hist, width=centres[1] - centres[0])
    a.set_xlabel("similarity score of kept labels (> 0)")
    a.set_ylabel("labels")
    a.set_title(f"(a) kept label scores, mean {summary['kept_score_mean']:.3f}")
    b.hist(word_means, bins=50)
    b.set_xlabel("mean score per used word")
    b.set_ylabel("words")
    b.set_title(f"(b) {summary['words_used']}/{summary['word_list_size']} words used "
                f"({100 * summary['utilization']:.1f}%)")
    fig.tight_layout()
    storage.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)


def check_paths(config) -> None:
    """Raises :class:`PathError` naming every path field the labeller needs that is unset, a
    placeholder or missing."""
    problems = []
    for field, kind in (("vision.checkpoint", "path"), ("data.json", "path"), ("data.image_root", "dir")):
        section, name = field.split(".")
        path = config[section][name]
        if not config_lib.is_set(path):
            problems.append(f"config.{field}{'=' + repr(path) if path else ' is empty'}; set --config.{field}=...")
        elif not (storage.isdir(path) if kind == "dir" else storage.exists(path)):
            problems.append(f"config.{field}={path!r} does not exist")
    if config.labels.word_list != "default" and not storage.exists(config.labels.word_list):
        problems.append(f"config.labels.word_list={config.labels.word_list!r} does not exist")
    if problems:
        raise PathError("cannot start, fix the config first:\n  " + "\n  ".join(problems))


__all__ = ["label_dataset", "check_paths", "finalize", "read_llava_json", "Dataset", "shard_name", "shard_path",
           "shard_statistics", "SCORE_BINS", "META_KEYS"]
