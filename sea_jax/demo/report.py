"""What the demo measures on its held-out images after training, for each arm (SEA and lambda = 0).

* :func:`heldout_caption_loss`: the stage-1 model's next-token loss on the captions of the held-out
  images (``eval.json``), per caption token -- the LM objective both arms optimise, on images
  neither saw.
* :func:`answer_questions`: the stage-2 model answers the first question of each held-out image's
  generated conversation (greedy decoding); exact-match accuracy against the world's answer.
* :func:`format_table`: the Markdown table the demo prints (alignment accuracy from
  :mod:`sea_jax.probe`, caption loss, QA accuracy, a few answered questions).

Everything loads the run through :func:`sea_jax.builder.load_trained`, as ``sea_jax.export`` and
``sea_jax.generate`` do (the checkpoint, the frozen parts the config names, the tokenizer the run
saved).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def heldout_caption_loss(workdir: str, records_json: str, image_root: str, *, stage: int = 1,
                         batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss over the caption tokens of ``records_json`` (LLaVA stage-1 records,
    ``plain`` template as stage 1 trains) under ``workdir``'s ``stage`` model.

    Returns ``{"caption_loss": nats per caption token, "tokens": count, "samples": count}``.
    """
    from sea_jax.data import images as images_lib
    from sea_jax.data import llava, pipeline
    from sea_jax.models.mllm import lm_loss

    from sea_jax.builder import load_trained
    from sea_jax.models.mllm import MLLM

    run = load_trained(workdir, stage=stage)
    mllm, params, tok, cfg = MLLM(run.cfg), run.params, run.tokenizer, run.cfg
    L = int(run.config.data.max_length)
    enc = llava.Encoder(tok, "plain", cfg.image_token_id, cfg.num_image_tokens, L)
    rows = []
    for k, r in enumerate(pipeline.load_records(records_json)):
        rec = llava.parse_record(r, k)
        e = enc.encode(rec)
        img = images_lib.load_for(cfg.pixel_spec, os.path.join(image_root, rec.image), run.pad_to_square)
        rows.append((e, img))
    if not rows:
        raise ValueError(f"{records_json}: no records")

    @jax.jit
    def nll(p, images, ids, mask, loss_mask):
        out = mllm(p, images, ids, mask)
        mean, count = lm_loss(out.logits, ids, loss_mask)
        return mean * count, count

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]  # a short last chunk: its padding rows have no target tokens
        ids = np.full((batch_size, L), pad, np.int32)
        mask = np.zeros((batch_size, L), bool)
        loss_mask = np.zeros((batch_size, L), bool)
        images = np.zeros((batch_size, *chunk[0][1].shape), np.float32)
        for i, (e, img) in enumerate(chunk):
            t = len(e.input_ids)
            ids[i, :t], mask[i, :t], loss_mask[i, :t], images[i] = e.input_ids, True, e.loss_mask, img
        tot, c = nll(params, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask))
        total, count = total + float(tot), count + int(c)
    return {"caption_loss": total / max(count, 1), "tokens": count, "samples": len(rows)}


def answer_questions(workdir: str, questions: Sequence[tuple[str, str, str]], *, stage: int = 2,
                     max_new_tokens: int = 4, batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers of ``workdir``'s ``stage`` model to ``(image path, question, answer)`` triples.

    Returns ``{"accuracy": exact-match share, "answers": [str, ...]}`` (answers stripped and
    lower-cased before the comparison, as the world writes them).
    """
    from sea_jax import generate as gen
    from sea_jax.convert.llava_files import prepare_tokenizer
    from sea_jax.data import images as images_lib
    from sea_jax.builder import load_trained
    from sea_jax.models.mllm import MLLM

    run = load_trained(workdir, stage=stage)
    mllm, params, cfg = MLLM(run.cfg), run.params, run.cfg
    tok = prepare_tokenizer(run.tokenizer, cfg, run.chat_template)  # as ``python -m sea_jax.generate``
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = gen.stop_token_ids(tok, cfg.llm.eos_token_id)
    generator = gen.Generator(mllm)
    answers: list[str] = []
    for s in range(0, len(questions), batch_size):
        chunk = list(questions[s:s + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # one compiled shape
        images = np.stack([images_lib.load_for(cfg.pixel_spec, p, run.pad_to_square) for p, _, _ in chunk])
        rows = [gen.encode_prompt(tok, gen.chat_prompt(tok, q), cfg.num_image_tokens) for _, q, _ in chunk]
        ids, mask = gen.pad_batch(rows, pad, "left")
        out = generator(params, images, ids, mask, max_new_tokens=max_new_tokens, temperature=0.0,
                        eos_token_id=eos, pad_token_id=pad, key=jax.random.key(0))
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        answers += [tok.decode(toks[i, :lens[i]], skip_special_tokens=True).strip() for i in range(real)]
    right = [a.lower() == t.lower() for a, (_, _, t) in zip(answers, questions)]
    return {"accuracy": float(np.mean(right)) if right else float("nan"), "answers": answers}


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def format_table(arms: dict[str, dict[str, Any]], examples: Sequence[dict[str, str]] = ()) -> str:
    """The demo's summary as Markdown: one column per arm (``{"SEA": metrics, "baseline": ...}``,
    metrics keys as :func:`sea_jax.demo.run.run_demo` collects them), then example answers."""
    names = list(arms)
    rows = [
        ("alignment accuracy vs SigLIP labels (stage 1)", lambda m: _pct(m.get("label_accuracy"))),
        ("alignment accuracy vs true words (stage 1)", lambda m: _pct(m.get("truth_accuracy"))),
        ("  on object patches", lambda m: _pct(m.get("truth_accuracy_objects"))),
        ("  on background patches", lambda m: _pct(m.get("truth_accuracy_background"))),
        ("held-out caption loss (stage 1, nats/token)", lambda m: f"{m['caption_loss']:.3f}" if "caption_loss" in m else "-"),
        ("held-out QA exact match (stage 2)", lambda m: _pct(m.get("qa_accuracy"))),
    ]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(arms[n]) for n in names) + " |")
    if examples:
        lines += ["", "| question (held-out image) | truth | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for ex in examples:
            cell = lambda t: " ".join(str(t).split()) or "(nothing)"  # noqa: E731 - one table row
            lines.append(f"| {ex['image']}: {ex['question']} | {ex['truth']} | "
                         + " | ".join(cell(ex.get(n, "-")) for n in names) + " |")
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=float)


__all__ = ["heldout_caption_loss", "answer_questions", "format_table", "write_json"]
