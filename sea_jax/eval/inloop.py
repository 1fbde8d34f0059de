"""Evaluation inside a training run: every ``eval.every`` steps, on fixed held-out data.

What is measured (each only when configured), logged as ``eval/*`` metrics beside the training
ones:

* ``eval/lm_loss``: the next-token loss per supervised token of the first ``eval.heldout_samples``
  records of ``eval.heldout_json``, encoded with the run's template (what L_lm optimises, on data
  the run does not train on); ``eval/lm_tokens`` counts the tokens.
* ``eval/label_accuracy``: the probe's alignment accuracy (:mod:`sea_jax.align.recall`) on the
  first ``eval.probe_images`` held-out images: the share of visual tokens whose nearest word
  (Eq. 8 table, by cosine) is among the patch's semantic labels. Needs the run's word table and
  label table (a run with lambda > 0 and on-the-fly labels).
* ``eval/<benchmark>``: the headline score (POPE mean F1, ScienceQA-IMG, ...) of the first
  ``eval.benchmark_samples`` questions of ``eval.benchmark`` under ``eval.data_root``, answered
  greedily as ``python -m sea_jax.eval`` does; the files go to
  ``<run folder>/eval/step_<k>/<benchmark>/``.

The evaluation reads the current parameters and nothing else: it draws no random number the
training uses and does not touch the data iterator, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sea_jax import storage
from sea_jax.errors import PathError


def encode_records(records_json: str, image_root: str, tokenizer, template: str, mcfg, max_length: int,
                   pad_to_square: bool, limit: int) -> list[tuple[Any, np.ndarray | None]]:
    """(encoded sample, preprocessed image or None) of the first ``limit`` good records; bad
    records are skipped (as the training pipeline skips them)."""
    from sea_jax.data import images as images_lib
    from sea_jax.data import llava, pipeline

    enc = llava.Encoder(tokenizer, template, mcfg.image_token_id, mcfg.num_image_tokens, max_length)
    out = []
    for k, raw in enumerate(pipeline.load_records(records_json)):
        if len(out) >= limit:
            break
        try:
            rec = llava.parse_record(raw, k)
            e = enc.encode(rec)
            img = None
            if rec.image is not None:
                img = images_lib.load_for(mcfg.pixel_spec, os.path.join(image_root, rec.image), pad_to_square)
        except (llava.SkipSample, images_lib.ImageLoadError) as err:
            logging.warning("in-loop eval: skipping held-out record %d: %s", k, err)
            continue
        out.append((e, img))
    return out


def lm_batches(rows, batch_size: int, max_length: int, image_size: int, pad_id: int):
    """Fixed-shape batches (``input_ids``, ``attention_mask``, ``loss_mask``, ``images``); a short
    last batch is padded with rows that have no target token."""
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        ids = np.full((batch_size, max_length), pad_id, np.int32)
        mask = np.zeros((batch_size, max_length), bool)
        loss_mask = np.zeros((batch_size, max_length), bool)
        images = np.zeros((batch_size, image_size, image_size, 3), np.float32)
        for i, (e, img) in enumerate(chunk):
            t = len(e.input_ids)
            ids[i, :t], mask[i, :t], loss_mask[i, :t] = e.input_ids, True, e.loss_mask
            if img is not None:
                images[i] = img
        yield {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask, "images": images}


class InLoopEval:
    """The evaluation a training run does every ``eval.every`` steps (see the module docstring).

    Call it with the full parameter tree (``{"vision", "adapter", "llm", ...}``, placed on
    ``mesh``) and the frozen SEA tables; it returns the ``eval/*`` metrics.
    """

    def __init__(self, config, mcfg, tokenizer, mesh, run_path: str):
        from sea_jax.models.mllm import MLLM

        e = config.eval
        self.config, self.mcfg, self.tokenizer, self.mesh, self.run_path = config, mcfg, tokenizer, mesh, run_path
        self.mllm = MLLM(mcfg)
        self.batch_size = int(e.batch_size)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.batch_size % shards:
            from sea_jax.errors import ConfigError

            raise ConfigError(f"config.eval.batch_size {self.batch_size} must be a multiple of the {shards} batch "
                              f"shards of mesh {dict(mesh.shape)}")
        self.rows: list = []
        if e.heldout_json:
            if not os.path.exists(e.heldout_json):
                raise PathError(f"config.eval.heldout_json={e.heldout_json!r} does not exist")
            root = e.heldout_image_root or config.data.image_root
            n = max(int(e.heldout_samples), int(e.probe_images))
            self.rows = encode_records(e.heldout_json, root, tokenizer, config.data.template, mcfg,
                                       int(config.data.max_length), bool(config.data.pad_to_square), n)
            if not self.rows:
                raise PathError(f"config.eval.heldout_json={e.heldout_json!r}: no usable record")
        self.questions: list = []
        if e.benchmark:
            from sea_jax.eval import benchmarks as bench_lib

            if not e.data_root or not storage.isdir(e.data_root):
                raise PathError(f"config.eval.data_root={e.data_root!r} is not a folder, local or gs:// (needed by "
                                "eval.benchmark)")
            self.bench = bench_lib.get_benchmark(e.benchmark)
            self.questions = self.bench.load(e.data_root, int(e.benchmark_samples))
        self._nll = jax.jit(self._nll_fn)
        self._probe = jax.jit(self._probe_fn)

    def _place(self, batch: Mapping[str, np.ndarray]) -> dict:
        from sea_jax.train_step import batch_shardings

        shardings = batch_shardings(self.mesh, batch)
        return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}

    def _nll_fn(self, params, batch):
        from sea_jax import sharding
        from sea_jax.models.mllm import lm_loss

        with sharding.activation_sharding(self.mesh):
            out = self.mllm(params, batch["images"], batch["input_ids"], batch["attention_mask"])
            mean, count = lm_loss(out.logits, batch["input_ids"], batch["loss_mask"])
        return mean * count, count

    def _probe_fn(self, params, tables, images):
        from sea_jax import sharding
        from sea_jax.align import semantic_labels as L

        s = self.config
        with sharding.activation_sharding(self.mesh):
            enc = self.mllm.encode_images(params["vision"], images)
            tokens = self.mllm.visual_tokens(params["adapter"], enc).astype(jnp.float32)
            ids, _, valid = L.top_labels(enc.patch_embeds, tables["word_table"], n=int(s.labels.top_n),
                                         negate_similarity=bool(s.labels.negate_similarity))
            norm = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))  # noqa: E731
            # the rule of sea_jax.align.recall (recall_words, word_hits), on device
            recalled = jnp.argmax(jnp.einsum("bpd,wd->bpw", norm(tokens), norm(tables["label_table"])), -1)
            hits = (ids == recalled[..., None]) & valid
        return hits.any(-1)

    def __call__(self, step: int, params: Mapping[str, Any], tables: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        e = self.config.eval
        if self.rows and int(e.heldout_samples) > 0:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            total, count = 0.0, 0
            for batch in lm_batches(self.rows[: int(e.heldout_samples)], self.batch_size,
                                    int(self.config.data.max_length), self.mcfg.image_size, pad):
                t, c = self._nll(params, self._place(batch))
                total, count = total + float(t), count + int(c)
            out["eval/lm_loss"] = total / max(count, 1)
            out["eval/lm_tokens"] = float(count)
        table = self._label_table(params, tables)
        with_images = [img for _, img in self.rows if img is not None][: int(e.probe_images)]
        if with_images and table is not None and "word_table" in tables:
            hits = []
            for s in range(0, len(with_images), self.batch_size):
                chunk = with_images[s:s + self.batch_size]
                real = len(chunk)
                chunk = chunk + [chunk[-1]] * (self.batch_size - real)
                images = self._place({"images": np.stack(chunk)})["images"]
                hits.append(np.asarray(self._probe(params, {"word_table": tables["word_table"], "label_table": table},
                                                   images))[:real])
            out["eval/label_accuracy"] = float(np.concatenate(hits).mean())
        if self.questions:
            out[f"eval/{self.bench.name}"] = self._benchmark(step, params)
        return out

    def _label_table(self, params, tables):
        from sea_jax.align.loss import label_embedding_table

        if "label_table" in tables:
            return tables["label_table"]
        if "word_tokens" in tables:
            wt = tables["word_tokens"]
            return jax.jit(label_embedding_table)(params["llm"]["embedder"]["embedding"], wt["ids"], wt["mask"])
        return None

    def _benchmark(self, step: int, params) -> float:
        from sea_jax.convert.llava_files import PLAIN_CHAT_TEMPLATE, prepare_tokenizer
        from sea_jax.eval.common import write_llava_answers
        from sea_jax.eval.run import Answerer, EvalModel, headline

        template = PLAIN_CHAT_TEMPLATE if self.config.data.template == "plain" else None
        tok = prepare_tokenizer(self.tokenizer, self.mcfg, template)
        model = EvalModel(self.mcfg, params, tok, self.mcfg.image_size, bool(self.config.data.pad_to_square))
        answerer = Answerer(model, self.mesh, self.batch_size)
        answers = answerer.answer(self.questions, int(self.config.eval.max_new_tokens) or self.bench.max_new_tokens)
        folder = storage.join(self.run_path, "eval", f"step_{step}", self.bench.name)
        if jax.process_index() != 0:
            return float("nan")
        with storage.as_local(folder, write=True) as local:  # a gs:// run folder gets the file when scored
            path = write_llava_answers(os.path.join(local, "answers.jsonl"), self.questions, answers)
            scores = self.bench.score(path, self.bench.default_annotations(self.config.eval.data_root))
        value = headline(self.bench.name, scores)
        return float("nan") if value is None else value


__all__ = ["InLoopEval", "encode_records", "lm_batches"]
