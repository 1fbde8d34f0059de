"""The demo world on disk, in the formats a real run reads, plus the tokenizers and word list.

Layout of an asset folder (:func:`build_assets`)::

    images/000000.png ...   the world's images, PNG, ``image_size`` pixels square
    stage1.json             LLaVA-Pretrain format: "<image>\\n" then the caption (train images)
    stage2.json             mix665k format: multi-turn question/answer conversations (train images)
    eval.json               held-out images, captions (the probe and the caption-loss table use them)
    truth.npz               per image the true word of every patch (see :func:`write_world`)
    words.txt               the label word list (``config.labels.word_list``)
    llm_tokenizer/          BPE over the world's text, Gemma-style chat template, no ``<image>``
    siglip_tokenizer/       SentencePiece ``SiglipTokenizer`` for the SigLIP text tower

The builders of the tokenizers take any corpus, so tests with their own toy data use them too.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from sea_jax.demo import world as W

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
# Gemma's turn format (roles "user" / "model"), with the BOS the template itself writes.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Characters every LLM tokenizer here can spell, seen in the corpus or not: a word of a word list
# outside the world still tokenizes (into pieces) instead of becoming <unk>.
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:;\n")


def train_llm_tokenizer(corpus: Iterable[str], vocab_size: int = 4096, chat_template: str = GEMMA_CHAT_TEMPLATE):
    """A fast HF tokenizer: BPE over ``corpus`` with a Metaspace pre-tokenizer (SentencePiece-like
    "▁word" pieces, as Gemma's), punctuation and newlines split off as their own pre-tokens.

    Why split them off: with ``"circle?"`` one piece, "circle" in a question and in a caption would
    be different tokens; with ``"\\nred"`` one piece, the answer after Gemma's ``"model\\n"`` header
    would straddle the supervised span and the chat encoder would skip the sample.
    ``vocab_size`` is a ceiling: merges stop when every word of the corpus is one token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\n.,?!:;]"), behavior="isolated"),
        pre_tokenizers.Metaspace(prepend_scheme="first"),
    ])
    tk.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=ALPHABET,
                                  show_progress=False)
    texts = list(corpus)
    # After a newline (Gemma's "model\n" header, "<image>\n") a word has no "▁": the same text
    # after a newline makes those forms whole tokens too, so an answer is not spelled letter by letter.
    texts += ["\n" + t for t in texts] + ["user\n", "model\n"] * 8
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def train_siglip_tokenizer(corpus: Iterable[str], folder: str | os.PathLike, vocab_size: int = 256,
                           max_length: int = 16):
    """A SentencePiece unigram model over ``corpus`` saved as a ``SiglipTokenizer`` folder
    (what ``config.siglip.tokenizer`` takes); returns the tokenizer. ``vocab_size`` is a soft
    ceiling (a small corpus has fewer pieces)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    lines = [t.replace("\n", " ") for t in corpus]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   hard_vocab_limit=False, model_type="unigram", minloglevel=2,
                                   character_coverage=1.0)
    model = os.path.join(folder, "spiece.model")
    with open(model, "wb") as f:
        f.write(buf.getvalue())
    tok = SiglipTokenizer(vocab_file=model, model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def write_word_list(words: Sequence[str], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(w + "\n" for w in words))


def llava_record(sample_id: str, image: str | None, turns: Sequence[tuple[str, str]]) -> dict:
    """A LLaVA JSON record; the first human turn starts with ``<image>\\n`` when there is an image."""
    conv = []
    for k, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if (k == 0 and image) else q})
        conv.append({"from": "gpt", "value": a})
    rec = {"id": sample_id, "conversations": conv}
    if image:
        rec["image"] = image
    return rec


class Assets(NamedTuple):
    """Paths of an asset folder (see the module docstring)."""

    root: str
    image_root: str
    stage1_json: str
    stage2_json: str
    eval_json: str
    truth: str
    word_list: str
    llm_tokenizer: str
    siglip_tokenizer: str

    @classmethod
    def at(cls, root: str) -> Assets:
        j = lambda *p: os.path.join(root, *p)  # noqa: E731
        return cls(root, j("images"), j("stage1.json"), j("stage2.json"), j("eval.json"), j("truth.npz"),
                   j("words.txt"), j("llm_tokenizer"), j("siglip_tokenizer"))


def write_world(cfg: W.WorldConfig, seed: int, num_images: int, num_eval: int, root: str) -> Assets:
    """Renders ``num_images`` training + ``num_eval`` held-out images and writes the JSON files and
    ``truth.npz``.

    ``truth.npz`` holds, for all images in file order (train first): ``image`` (file names),
    ``split`` (0 train, 1 eval), ``object_map``, ``coverage``, ``shape_word``, ``colour_word``
    ([n, grid, grid], see :class:`sea_jax.demo.world.Sample`; word ids index ``words``), and
    ``words``, ``image_size``, ``patch_size``, ``seed``. Eval images are indices ``num_images``
    onwards of the same world (an image depends on its index alone).
    """
    from PIL import Image

    paths = Assets.at(root)
    os.makedirs(paths.image_root, exist_ok=True)
    stage1, stage2, evals = [], [], []
    names, split, truth = [], [], {k: [] for k in ("object_map", "coverage", "shape_word", "colour_word")}
    for i in range(num_images + num_eval):
        s = W.sample(cfg, seed, i)
        name = f"{i:06d}.png"
        Image.fromarray(s.image).save(os.path.join(paths.image_root, name))
        names.append(name)
        split.append(int(i >= num_images))
        for k in truth:
            truth[k].append(getattr(s, k))
        sid = f"{i:06d}"
        if i < num_images:
            stage1.append(llava_record(sid, name, [("", s.caption)]))
            stage2.append(llava_record(sid, name, s.conversation))
        else:
            evals.append(llava_record(sid, name, [("", s.caption)]))
    for path, recs in ((paths.stage1_json, stage1), (paths.stage2_json, stage2), (paths.eval_json, evals)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(recs, f, indent=0)
    np.savez_compressed(
        paths.truth, image=np.asarray(names), split=np.asarray(split, np.int8),
        **{k: np.stack(v) for k, v in truth.items()}, words=np.asarray(W.label_words()),
        image_size=cfg.image_size, patch_size=cfg.patch_size, seed=int(seed))
    return paths


def world_corpus(cfg: W.WorldConfig, stage1_json: str, stage2_json: str) -> list[str]:
    """Every text the world has (captions, questions, answers) plus the world's templates and the
    word list: what the tokenizers are trained on."""
    texts = W.corpus(cfg) + W.label_words()
    for path in (stage1_json, stage2_json):
        with open(path, encoding="utf-8") as f:
            for rec in json.load(f):
                texts += [t["value"].replace("<image>\n", "") for t in rec["conversations"]]
    return [t for t in texts if t]


def build_assets(root: str, cfg: W.WorldConfig, *, seed: int, num_images: int, num_eval: int,
                 text_len: int = 16, siglip_vocab: int = 256) -> Assets:
    """Writes everything of the module docstring under ``root`` (which must be empty or absent)."""
    paths = write_world(cfg, seed, num_images, num_eval, root)
    write_word_list(W.label_words(), paths.word_list)
    texts = world_corpus(cfg, paths.stage1_json, paths.stage2_json)
    train_llm_tokenizer(texts).save_pretrained(paths.llm_tokenizer)
    train_siglip_tokenizer(texts, paths.siglip_tokenizer, vocab_size=siglip_vocab, max_length=text_len)
    return paths
