"""Answering a benchmark with a model: prompts through the run's chat template, greedy batched
generation on the mesh, LLaVA's answers file, the official submission file, the scores.

:func:`evaluate` is what ``python -m sea_jax.eval --workdir=DIR --benchmarks=pope,gqa
--data_root=...`` runs. The model is a trained run (:func:`sea_jax.builder.load_trained`) or an
exported Hugging Face Llava folder (:func:`sea_jax.convert.hf_llava.import_llava`), wrapped in
:class:`EvalModel`.

Prompts. Each :class:`~sea_jax.eval.common.Question` carries the user message exactly as
LLaVA-1.5 builds it; ``"<image>\\n"`` goes in front when the question has an image (LLaVA's
``DEFAULT_IMAGE_TOKEN + '\\n' + text``), and the run's own chat template (the one it was
instruction-tuned with, ``<image>`` expanded to one placeholder per patch) wraps it with the
generation prompt. Images are preprocessed as the run trained (size, pad-to-square).

Generation. Greedy (LLaVA-1.5's temperature 0), stopping at EOS or the template's end-of-turn
token, at most the benchmark's ``max_new_tokens`` (LLaVA's: 128, or 1024 for ScienceQA, MMBench
and MM-Vet). Prompts are sorted by length and cut into batches of ``batch_size`` rows, each padded
on the left to a multiple of ``length_multiple`` tokens: rows of a batch have similar lengths and
only a few shapes compile. Every batch is split over the data-parallel devices of every host
(the :class:`~sea_jax.generate.Generator`'s mesh); every process runs the same batches and
process 0 writes the files. A row's answer does not depend on the batch it is in (positions count
real tokens only; tested against unbatched and HF ``generate``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from sea_jax import storage
from sea_jax.eval import benchmarks as bench_lib
from sea_jax.eval.common import Question, write_json, write_llava_answers


@dataclasses.dataclass
class EvalModel:
    """A model ready to answer: config, parameters (placed), the tokenizer with ``<image>`` and the
    multimodal chat template, and the image preprocessing."""

    cfg: Any
    params: Any
    tokenizer: Any
    image_size: int
    pad_to_square: bool
    name: str = "sea_jax"

    @classmethod
    def from_workdir(cls, workdir: str, *, stage: int | None = None, step: int | None = None, mesh=None) -> "EvalModel":
        from sea_jax.builder import load_trained
        from sea_jax.convert.llava_files import prepare_tokenizer

        m = load_trained(workdir, stage=stage, step=step, mesh=mesh, to_host=False)
        return cls(m.cfg, m.params, prepare_tokenizer(m.tokenizer, m.cfg, m.chat_template), m.cfg.vision.image_size,
                   m.pad_to_square, name=os.path.basename(os.path.normpath(workdir)) or "sea_jax")

    @classmethod
    def from_hf(cls, folder: str, *, mesh=None, dtype: str = "") -> "EvalModel":
        import jax.numpy as jnp

        from sea_jax.convert import hf_llava, llava_files

        overrides = {"dtype": jnp.dtype(dtype)} if dtype else {}
        cfg, params, tok = hf_llava.import_llava(folder, mesh=mesh, **overrides)
        pre = llava_files.read_preprocessing(folder)
        return cls(cfg, params, tok, int(pre["image_size"]), bool(pre["pad_to_square"]),
                   name=os.path.basename(os.path.normpath(folder)))


def prompt_text(tokenizer: Any, question: Question) -> str:
    """The templated prompt of one question: ``"<image>\\n"`` + text when it has an image, in the
    tokenizer's chat template with the generation prompt (the plain text without a template)."""
    from sea_jax.generate import IMAGE_TOKEN

    content = f"{IMAGE_TOKEN}\n{question.text}" if question.image else question.text
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    return content


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (longest first, so a batch too large
    for memory fails at once, not at the end); every batch but the last is full."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


class Answerer:
    """Greedy answers of an :class:`EvalModel` to questions, in batches on ``mesh``.

    ``batch_size`` rows per batch (a multiple of the mesh's data-parallel size); prompts padded to
    a multiple of ``length_multiple`` tokens.
    """

    def __init__(self, model: EvalModel, mesh=None, batch_size: int = 8, length_multiple: int = 64):
        from sea_jax.generate import Generator
        from sea_jax.models.mllm import MLLM
        from sea_jax.tokenizer import stop_token_ids

        self.model, self.mesh = model, mesh
        self.batch_size, self.length_multiple = int(batch_size), int(length_multiple)
        self.generator = Generator(MLLM(model.cfg), mesh)
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.stop_ids = stop_token_ids(tok, model.cfg.llm.eos_token_id)
        if mesh is not None:
            shards = mesh.shape["data"] * mesh.shape["fsdp"]
            if self.batch_size % shards:
                from sea_jax.errors import ConfigError

                raise ConfigError(f"--batch_size {self.batch_size} must be a multiple of the {shards} data-parallel "
                                  f"devices of the mesh {dict(mesh.shape)}")

    def encode(self, question: Question) -> np.ndarray:
        from sea_jax.generate import encode_prompt

        text = prompt_text(self.model.tokenizer, question)
        return encode_prompt(self.model.tokenizer, text, self.model.cfg.num_image_tokens)

    def _pixels(self, question: Question) -> np.ndarray:
        from sea_jax.data.images import ImageLoadError, load_for
        from sea_jax.eval.common import EvalInputError

        spec = self.model.cfg.pixel_spec
        if not question.image:  # text-only: a dummy image the prompt never refers to
            return np.zeros((spec.size, spec.size, 3), np.float32)
        try:
            return load_for(spec, question.image, self.model.pad_to_square)
        except ImageLoadError as e:
            raise EvalInputError(f"question {question.question_id!r}: {e}") from None

    def answer(self, questions: Sequence[Question], max_new_tokens: int, progress: bool = False) -> list[str]:
        """Raw decoded answers (special tokens skipped, stripped), aligned with ``questions``."""
        from tqdm import tqdm

        rows = [self.encode(q) for q in questions]
        out: list[str] = [""] * len(questions)
        batches = length_batches([len(r) for r in rows], self.batch_size)
        for idx in tqdm(batches, desc="answering", unit="batch", disable=not progress):
            take = list(idx) + [idx[-1]] * (self.batch_size - len(idx))  # one shape: repeat the last row
            width = -(-max(len(rows[i]) for i in take) // self.length_multiple) * self.length_multiple
            ids = np.full((len(take), width), self.pad_id, np.int32)
            mask = np.zeros((len(take), width), bool)
            for r, i in enumerate(take):
                ids[r, width - len(rows[i]):] = rows[i]
                mask[r, width - len(rows[i]):] = True
            images = np.stack([self._pixels(questions[i]) for i in take])
            gen = self.generator(self.model.params, images, ids, mask, max_new_tokens=int(max_new_tokens),
                                 eos_token_id=self.stop_ids, pad_token_id=self.pad_id, key=jax.random.key(0))
            tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
            for r, i in enumerate(idx):
                out[i] = self.model.tokenizer.decode(tokens[r, :lengths[r]], skip_special_tokens=True).strip()
        return out


def evaluate(model: EvalModel, benchmarks: Sequence[str], data_root: str, out_dir: str, *, mesh=None,
             batch_size: int = 8, limit: int | None = None, annotations: dict[str, str] | None = None,
             max_new_tokens: int = 0, progress: bool = True) -> dict[str, Any]:
    """Answers and scores each benchmark; writes ``<out_dir>/<benchmark>/`` (LLaVA's answers file,
    the official submission file, ``scores.json``) and ``<out_dir>/scores.json``; returns
    ``{benchmark: scores}``.

    ``annotations``: scoring annotations per benchmark (default: where LLaVA's layout keeps them
    under ``data_root``; a benchmark whose annotations are absent, e.g. a test split scored only
    by the official server, gets its files written and ``{"scored": False, "why": ...}``).
    ``max_new_tokens``: 0 = each benchmark's LLaVA-1.5 value.
    """
    answerer = Answerer(model, mesh, batch_size)
    main = jax.process_index() == 0
    if not main:  # only process 0 writes; the others answer their share of every batch
        return _evaluate(answerer, benchmarks, data_root, out_dir, out_dir, limit, annotations, max_new_tokens,
                         progress, main)
    # the writers make local files; a gs:// out_dir is uploaded when every benchmark is written,
    # and the paths recorded in scores.json are the final ones
    with storage.as_local(out_dir, write=True) as local:
        return _evaluate(answerer, benchmarks, data_root, local, out_dir, limit, annotations, max_new_tokens,
                         progress, main)


def _evaluate(answerer, benchmarks, data_root, local_out, out_dir, limit, annotations, max_new_tokens, progress,
              main) -> dict[str, Any]:
    model = answerer.model
    final = lambda p: out_dir + p[len(local_out):] if p.startswith(local_out) else p  # noqa: E731
    results: dict[str, Any] = {}
    for name in benchmarks:
        bench = bench_lib.get_benchmark(name)
        questions = bench.load(data_root, limit)
        t0 = time.time()
        answers = answerer.answer(questions, max_new_tokens or bench.max_new_tokens, progress=progress and main)
        dt = time.time() - t0
        logging.info("%s: %d questions answered in %.1fs", name, len(questions), dt)
        if not main:
            continue
        folder = os.path.join(local_out, name)
        answers_file = write_llava_answers(os.path.join(folder, "answers.jsonl"), questions, answers, model.name)
        extra = {}
        full = getattr(bench, "full_test_file", None)  # VQAv2: the server wants every test2015 question
        if full and storage.exists(storage.join(data_root, full)):
            extra["full_question_file"] = storage.join(data_root, full)
        submission = bench.write_submission(os.path.join(folder, bench.submission_name), questions, answers,
                                            model_id=model.name, **extra)
        scores: dict[str, Any] = {"questions": len(questions), "seconds": dt, "answers": final(answers_file),
                                  "submission": final(submission)}
        ann = (annotations or {}).get(name)
        if name == "mmvet":
            scores.update(scored=False, why="MM-Vet is graded by GPT-4: submit the results file to its grader")
        else:
            try:
                ann = ann or bench.default_annotations(data_root)
            except bench_lib.EvalInputError as e:
                ann, why = None, str(e)
            if ann and storage.exists(ann):
                qfile = storage.join(data_root, bench.question_file) if bench.question_file else None
                scores.update(scored=True, **bench.score(answers_file, ann, qfile))
            else:
                scores.update(scored=False, why=why if ann is None else f"no annotations at {ann} "
                              "(a test split is scored by the official server: submit the submission file)")
        write_json(os.path.join(folder, "scores.json"), scores, indent=1)
        results[name] = scores
    if main:
        write_json(os.path.join(local_out, "scores.json"), results, indent=1)
    return results


# The number each benchmark reports in the paper's tables (a path into its scores).
HEADLINE = {"pope": ("mean", "f1"), "scienceqa": ("img_accuracy",), "mme": ("perception",)}


def headline(name: str, scores: dict[str, Any]) -> float | None:
    """The paper's number for ``name`` from its scores (POPE: mean F1; ScienceQA: the IMG subset;
    MME: perception; else accuracy); None when not scored."""
    value: Any = scores
    for key in HEADLINE.get(name, ("accuracy",)):
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def summary_table(results: dict[str, Any]) -> str:
    """One line per benchmark with its headline score."""
    lines = []
    for name, s in results.items():
        value = headline(name, s) if s.get("scored") else None
        if value is None:
            lines.append(f"{name:10s} not scored: {s.get('why', 'no headline number')}")
        else:
            what = "/".join(HEADLINE.get(name, ("accuracy",)))
            lines.append(f"{name:10s} {what} {value:.2f}  ({s['questions']} questions)")
    return "\n".join(lines)


__all__ = ["EvalModel", "Answerer", "evaluate", "prompt_text", "length_batches", "headline", "summary_table"]
