"""Pretraining of the demo's two frozen towers on its world, on a CPU in well under a minute each.

SEA assumes a SigLIP whose towers are aligned (so the per-patch labels of Eq. 4-6 mean something)
and an LLM that already knows the language (so the caption loss of stage 1 is the adapter's
problem). With random towers neither holds; these two steps make them hold on the demo world.

* :func:`pretrain_siglip`: both towers of a small SigLIP trained with the sigmoid loss
  (Zhai et al. 2023, big_vision's ``siglip``), ``-1/b sum_ij log sigmoid(z_ij (t cos_ij + b))``, on
  (image, text) pairs of the world's training images, where each image's text is, at random, its
  caption, one of its objects' phrases ("a small red circle"), or one of the words the caption
  contains (a kind, a colour, the background, ...): the word list's words are then in the text
  tower's distribution, as a real SigLIP's web captions contain single words. A pair is positive
  (z = +1) when every content word of the text is in the image's caption, not only on the diagonal
  (two images of the batch both showing a circle are both positives of "circle").
  Plus (``patch_weight``) a FILIP-style token-wise term, :func:`patch_word_loss`: every word of
  the word list against every image, scored by its best-matching patch's per-patch feature (the
  feature SEA's labels use), positive when the caption contains the word. It uses image-level
  text only, no patch truth. Why: trained on the pooled embedding alone, this 3-layer tower's
  per-patch labels matched no true word (0% top-1 on 64 held-out images; the per-patch features
  of a ViT trained on 512 images only at the image level do not localise). With the term (weight
  3, 600 steps, ``configs/demo.py``) its top-5 labels hold a true word of the patch on 67% of the
  64 held-out images' patches (``siglip_label_truth_accuracy`` in the demo's report; 69% on the
  tower of an earlier version of the model code, whose top-1 was right on 99% of object patches
  and 37% of background ones).
* :func:`pretrain_llm`: a Gemma-architecture LM (the config's ``llm`` preset and overrides)
  trained with next-token loss on the captions and the question/answer conversations written with
  the tokenizer's chat template.

Each writes a Hugging Face folder the trainer loads as a checkpoint (``SiglipModel`` through
:func:`sea_jax.convert.hf_siglip.save_hf_siglip`, ``GemmaForCausalLM`` through
:func:`sea_jax.convert.hf_llm.save_hf_llm`) with its tokenizer beside the weights, and returns a
small ``info`` dict with the first and last losses (``sea_jax.demo.prepare`` stores it in the
step's marker). Everything is seeded: the same call gives the same weights.
"""
from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sea_jax.demo import assets as assets_lib

# Words that never make a text a negative of an image (grammar, not content).
STOP_WORDS = frozenset({"a", "and", "on", "the"})


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+", text.lower())) - STOP_WORDS


def text_choices(caption: str) -> list[str]:
    """The texts an image may be paired with: its caption, each object phrase ("a small red
    circle"), and each content word of the caption."""
    head, _, _background = caption.rpartition(" on ")
    phrases = [p.strip() for p in re.split(r",| and ", head) if p.strip()]
    return [caption, *phrases, *sorted(_words(caption))]


def positives(captions: list[str], texts: list[str]) -> np.ndarray:
    """float32 [b_img, b_txt]: 1 where every content word of ``texts[j]`` is in ``captions[i]``."""
    cw = [_words(c) for c in captions]
    tw = [_words(t) for t in texts]
    return np.asarray([[float(t <= c) for t in tw] for c in cw], np.float32)


def sigmoid_loss(img_emb: jax.Array, txt_emb: jax.Array, t: jax.Array, b: jax.Array, pos: jax.Array) -> jax.Array:
    """SigLIP's loss. img_emb [B, D], txt_emb [B, D] (any norm), t, b [1] (log temperature, bias),
    pos [B, B] in {0, 1}. Returns the scalar ``-sum log sigmoid(z * logits) / B``, z = 2 pos - 1."""
    zi = img_emb * jax.lax.rsqrt(jnp.maximum(jnp.sum(img_emb**2, -1, keepdims=True), 1e-12))
    zt = txt_emb * jax.lax.rsqrt(jnp.maximum(jnp.sum(txt_emb**2, -1, keepdims=True), 1e-12))
    logits = zi @ zt.T * jnp.exp(t) + b
    return -jnp.sum(jax.nn.log_sigmoid((2 * pos - 1) * logits)) / img_emb.shape[0]


def _load_world(paths: assets_lib.Assets) -> tuple[np.ndarray, list[str]]:
    """(float32 images [n, S, S, 3] in [-1, 1], captions) of the training split."""
    from PIL import Image

    with open(paths.stage1_json, encoding="utf-8") as f:
        recs = json.load(f)
    imgs = np.stack([np.asarray(Image.open(os.path.join(paths.image_root, r["image"])).convert("RGB"))
                     for r in recs]).astype(np.float32)
    caps = [r["conversations"][1]["value"] for r in recs]
    return imgs / 127.5 - 1.0, caps  # SigLIP's normalisation (mean = std = 0.5)


def patch_word_loss(patch_emb: jax.Array, word_emb: jax.Array, t: jax.Array, b: jax.Array,
                    pos: jax.Array) -> jax.Array:
    """FILIP-style token-wise sigmoid loss: image i and word w score ``t * max_p cos(patch_ip, w) + b``.

    patch_emb [B, P, D] per-patch joint-space features, word_emb [W, D], pos [B, W] in {0, 1}
    (word in the image's caption). Only image-level words supervise it (no patch truth): a word of
    the caption must match some patch, a word absent from it must match none.
    """
    norm = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))  # noqa: E731
    sim = jnp.max(jnp.einsum("bpd,wd->bpw", norm(patch_emb), norm(word_emb)), axis=1)
    logits = sim * jnp.exp(t) + b
    return -jnp.sum(jax.nn.log_sigmoid((2 * pos - 1) * logits)) / patch_emb.shape[0]


def _word_list(paths: assets_lib.Assets) -> list[str]:
    with open(paths.word_list, encoding="utf-8") as f:
        return [w.strip() for w in f if w.strip()]


def _schedule(lr: float, steps: int):
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.05)


def pretrain_siglip(folder: str, paths: assets_lib.Assets, cfg, *, steps: int = 300, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, patch_weight: float = 0.0) -> dict:
    """Trains SigLIP ``cfg`` (a :class:`sea_jax.models.siglip.SigLIPConfig`, image size and patch
    of the world, vocabulary of the world's SigLIP tokenizer) on the world of ``paths``; writes the
    HF folder (weights, config, tokenizer) to ``folder``. ``patch_weight`` > 0 adds
    :func:`patch_word_loss` over the word list (``paths.word_list``) with that weight. Returns
    ``{"loss_first", "loss_last", "steps", "seconds"}`` (losses averaged over the first / last 10%
    of steps)."""
    from transformers import AutoTokenizer

    from sea_jax.align import semantic_labels as L
    from sea_jax.convert import hf_siglip
    from sea_jax.models import siglip

    t0 = time.time()
    images, captions = _load_world(paths)
    tok = AutoTokenizer.from_pretrained(paths.siglip_tokenizer)
    tokenize = L.make_tokenize_fn(tok, max_length=cfg.text_len)
    choices = [text_choices(c) for c in captions]
    vocab = _word_list(paths)
    vocab_ids = jnp.asarray(tokenize(vocab))
    model = siglip.SigLIP(cfg)
    params = siglip.init_params(cfg, jax.random.key(seed))
    tx = optax.adamw(_schedule(lr, steps), weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, ids, pos, wpos):
        def loss_fn(p):
            img = model.apply({"params": p}, x, patch_features="map", hidden_states=False, method="encode_image")
            txt = model.apply({"params": p}, ids, method="encode_text")
            loss = sigmoid_loss(img.pooled, txt.embedding, p["t"], p["b"], pos)
            if patch_weight:
                words = model.apply({"params": p}, vocab_ids, method="encode_text").embedding
                loss += patch_weight * patch_word_loss(img.patch_embeds, words, p["t"], p["b"], wpos)
            return loss

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(captions), size=min(batch_size, len(captions)), replace=False)
        texts = [choices[i][int(rng.integers(len(choices[i])))] for i in idx]
        x = images[idx]
        pos = positives([captions[i] for i in idx], texts)
        wpos = positives([captions[i] for i in idx], vocab)
        params, opt, loss = step(params, opt, jnp.asarray(x), jnp.asarray(tokenize(texts)), jnp.asarray(pos),
                                 jnp.asarray(wpos))
        losses.append(float(loss))
    os.makedirs(folder, exist_ok=True)
    hf_siglip.save_hf_siglip(folder, cfg, jax.device_get(params))
    tok.save_pretrained(folder)
    k = max(1, steps // 10)
    info = {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])), "steps": steps,
            "seconds": round(time.time() - t0, 1)}
    logging.info("demo SigLIP pretrained: %s", info)
    return info


def lm_texts(paths: assets_lib.Assets, tokenizer) -> list[str]:
    """The LM's corpus: every training caption, and every conversation in the chat template."""
    out = []
    with open(paths.stage1_json, encoding="utf-8") as f:
        out += [r["conversations"][1]["value"] for r in json.load(f)]
    with open(paths.stage2_json, encoding="utf-8") as f:
        for r in json.load(f):
            msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace("<image>\n", "")}
                    for t in r["conversations"]]
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return out


def pretrain_llm(folder: str, paths: assets_lib.Assets, cfg, *, steps: int = 300, batch_size: int = 32,
                 lr: float = 3e-3, max_length: int = 64, seed: int = 0) -> dict:
    """Trains the LM ``cfg`` (a :class:`sea_jax.models.llm.LLMConfig` whose vocabulary is the
    world's LLM tokenizer's) on :func:`lm_texts`, next-token loss on every real token; writes the HF
    folder (weights, config, tokenizer) to ``folder``. Returns ``{"loss_first", "loss_last",
    "steps", "seconds"}``."""
    from sea_jax.convert import hf_llm
    from sea_jax.models import llm as llm_lib
    from sea_jax.models.mllm import lm_loss
    from sea_jax.tokenizer import load_tokenizer

    t0 = time.time()
    tok = load_tokenizer(paths.llm_tokenizer)
    texts = lm_texts(paths, tok)
    ids = np.full((len(texts), max_length), tok.pad_token_id, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    for i, t in enumerate(texts):
        # chat texts carry their BOS (the template writes it); captions get BOS + EOS here
        row = tok(t, add_special_tokens=False)["input_ids"]
        if not t.startswith(tok.bos_token):
            row = [tok.bos_token_id, *row, tok.eos_token_id]
        row = row[:max_length]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    model = llm_lib.LLM(cfg)
    params = llm_lib.init_params(cfg, jax.random.key(seed))
    tx = optax.adamw(_schedule(lr, steps), weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, m):
        def loss_fn(p):
            out = model.apply({"params": p}, x, attention_mask=m)
            return lm_loss(out.logits, x, m)[0]

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(texts), size=min(batch_size, len(texts)), replace=False)
        params, opt, loss = step(params, opt, jnp.asarray(ids[idx]), jnp.asarray(mask[idx]))
        losses.append(float(loss))
    os.makedirs(folder, exist_ok=True)
    hf_llm.save_hf_llm(cfg, jax.device_get(params), folder)
    tok.save_pretrained(folder)
    k = max(1, steps // 10)
    info = {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])), "steps": steps,
            "seconds": round(time.time() - t0, 1), "num_texts": len(texts)}
    logging.info("demo LM pretrained: %s", info)
    return info


__all__ = ["pretrain_siglip", "pretrain_llm", "sigmoid_loss", "positives", "text_choices", "lm_texts"]
