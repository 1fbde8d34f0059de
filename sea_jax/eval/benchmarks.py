"""Benchmark readers, prompt building, answer post-processing, submission writers and scoring
for the SEA paper's evaluation (Tables 1-3), following LLaVA-1.5's evaluation exactly.

Layout under a data root (LLaVA's ``playground/data/eval``, see its ``docs/Evaluation.md`` and
``scripts/v1_5/eval/*.sh``); each reader takes the paths as keyword overrides too:

=========  ==================================================  ===================================
benchmark  questions (what the model is asked)                 scoring annotations
=========  ==================================================  ===================================
vqav2      vqav2/llava_vqav2_mscoco_test-dev2015.jsonl,        VQA-format annotations JSON (test-dev
           images vqav2/test2015                               has none: submit to EvalAI)
gqa        gqa/llava_gqa_testdev_balanced.jsonl,               gqa/data/testdev_balanced_questions
           images gqa/data/images                              .json
textvqa    textvqa/llava_textvqa_val_v051_ocr.jsonl,           textvqa/TextVQA_0.5.1_val.json
           images textvqa/train_images
vizwiz     vizwiz/llava_test.jsonl, images vizwiz/test         VizWiz annotations JSON (val; test
                                                               has none: submit to EvalAI)
scienceqa  scienceqa/llava_test_CQM-A.json,                    scienceqa/problems.json (+
           images scienceqa/images/test                        pid_splits.json next to it)
pope       pope/llava_pope_test.jsonl, images pope/val2014     the pope/ directory (its
                                                               llava_pope_test.jsonl + coco/)
mmbench    mmbench/mmbench_dev_20230712.tsv (images inside)    the same TSV
mmvet      mm-vet/llava-mm-vet.jsonl, images mm-vet/images     none (GPT-4 graded)
mme        MME/llava_mme.jsonl,                                MME/MME_Benchmark_release_version
           images MME/MME_Benchmark_release_version
=========  ==================================================  ===================================

Prompts (:attr:`Question.text`, the user message without LLaVA's ``"<image>\\n"`` prefix):

* jsonl benchmarks: the question file's ``text`` verbatim; LLaVA's files already end with
  ``"\\nAnswer the question using a single word or phrase."`` (VizWiz: preceded by
  ``"\\nWhen the provided information is insufficient, respond with 'Unanswerable'."``, TextVQA:
  by ``"\\nReference OCR token: ..."``); MM-Vet questions have no suffix.
* ScienceQA (``model_vqa_science.py --single-pred-prompt``): the human turn without ``<image>``,
  stripped, + ``"\\nAnswer with the option's letter from the given choices directly."``.
* MMBench (``model_vqa_mmbench.py --single-pred-prompt``): ``[hint + "\\n"] + question`` then one
  ``"\\n<L>. <option>"`` per option (A-D, stopping at the first empty one) +
  ``"\\nAnswer with the option's letter from the given choices directly."``.

Generation (LLaVA-1.5): greedy (temperature 0), ``vicuna_v1`` template, output ``.strip()``-ed;
``max_new_tokens`` 128 for the ``model_vqa_loader`` benchmarks, 1024 for ScienceQA, MMBench and
MM-Vet (:attr:`Benchmark.max_new_tokens`).

Typical use (the model side)::

    bench = BENCHMARKS["gqa"]
    questions = bench.load(data_root, limit=None)
    answers = [generate(q.image, q.text) for q in questions]       # raw stripped outputs
    write_llava_answers(out + "/answers.jsonl", questions, answers, model_id)
    bench.write_submission(out + "/submission.json", questions, answers)
    scores = bench.score(out + "/answers.jsonl", bench.default_annotations(data_root))

Scores are percentages. A prediction for a question the annotations do not have is an error; a
question without a prediction is left out and counted in ``missing`` (the official scripts count
it wrong or refuse to run: compare with the paper only when ``missing`` is 0).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from sea_jax import storage
from sea_jax.eval import scoring
from sea_jax.eval.common import (
    EvalInputError,
    ImageCheck,
    Question,
    Record,
    check_aligned,
    field,
    is_none_cell,
    read_json,
    read_jsonl,
    read_prediction_records,
    read_table,
    records_from_objects,
    require_dir,
    require_file,
    take,
    under,
    write_json,
    write_llava_answers,
    write_table,
)

log = logging.getLogger("sea_jax.eval")

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
OPTION_LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
MMBENCH_OPTIONS = ("A", "B", "C", "D")
MMBENCH_DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")

Predictions = str | Sequence[Mapping[str, Any]] | Sequence[Record]


def _records(predictions: Predictions) -> list[Record]:
    if isinstance(predictions, (str, os.PathLike)):
        return read_prediction_records(os.fspath(predictions))
    items = list(predictions)
    if all(isinstance(r, Record) for r in items):
        return items
    return records_from_objects(items)


def _id_str(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EvalInputError(f"{where}: field {key!r} must be an int or a string, got "
                             f"{type(value).__name__}")
    return str(value)


def _no_duplicates(seen: dict, key: Any, where: str) -> None:
    if key in seen:
        raise EvalInputError(f"{where}: a second prediction for question {key!r} (first at "
                             f"{seen[key]})")
    seen[key] = where


def _answer(rec: Record, raw_key: str = "text", official_key: str = "answer") -> tuple[str, bool]:
    """The answer of a record and whether it is a raw model output (LLaVA's ``text``) rather
    than an already post-processed official answer."""
    if official_key in rec.obj:
        return field(rec.obj, official_key, rec.where, str), False
    if raw_key in rec.obj:
        return field(rec.obj, raw_key, rec.where, str), True
    raise EvalInputError(f"{rec.where}: missing field {official_key!r} (or {raw_key!r}, the "
                         "LLaVA answers file's)")


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


# ----------------------------------------------------------------------------------------------
# Base class


class Benchmark:
    """One benchmark: reading, prompting, post-processing, writing, scoring.

    Attributes:
      name: registry key.
      question_file, image_dir: defaults, relative to the data root.
      max_new_tokens: LLaVA-1.5's generation length for this benchmark.
      submission_name: file name LLaVA's scripts give the official results file.
    """

    name = ""
    question_file = ""
    image_dir: str | None = None
    max_new_tokens = 128
    submission_name = "answers.jsonl"

    def load(self, data_root: str, limit: int | None = None, **kwargs: Any) -> list[Question]:
        """Reads the first ``limit`` questions (all if None) from ``data_root``.

        Raises:
          EvalInputError: a missing file or directory (named), or a malformed line (file + line).
        """
        raise NotImplementedError

    def postprocess(self, answer: str) -> str:
        """Turns a raw model output into the answer LLaVA submits / scores."""
        return answer.strip()

    def write_submission(self, path: str, questions: Sequence[Question], answers: Sequence[str],
                         **kwargs: Any) -> str:
        """Writes the file LLaVA's scripts hand to the official scorer (by default LLaVA's
        answers file, which is what the local scorers read). Returns the path written."""
        return write_llava_answers(path, questions, answers, kwargs.get("model_id", "sea_jax"))

    def default_annotations(self, data_root: str) -> str:
        """Where the scoring annotations live in LLaVA's layout."""
        raise EvalInputError(f"{self.name}: no default annotations; pass them explicitly")

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """Scores predictions (a file path or in-memory records) against ``annotations``.

        Args:
          predictions: path of a predictions file in one of the accepted formats (see
            :mod:`sea_jax.eval.score_cli`), or the list of its objects.
          annotations: path of the benchmark's scoring annotations.
          questions: path of LLaVA's question file, needed only to map LLaVA answers to
            VizWiz images (``vizwiz``) or POPE categories (``pope``, default: the one in the pope
            directory).
        """
        raise NotImplementedError


def _load_llava_jsonl(bench: Benchmark, data_root: str, limit: int | None,
                      question_file: str | None, image_dir: str | None,
                      check_images: bool) -> list[Question]:
    """LLaVA's ``model_vqa_loader`` question files: ``{"question_id", "image", "text",
    "category"}`` per line; the prompt is ``text`` verbatim."""
    qpath = require_file(under(data_root, question_file or bench.question_file),
                         f"{bench.name} question file")
    idir = require_dir(under(data_root, image_dir or bench.image_dir), f"{bench.name} image "
                       "directory")
    out = []
    exists = ImageCheck()
    for lineno, obj in take(read_jsonl(qpath, f"{bench.name} question file"), limit):
        where = f"{qpath} line {lineno}"
        qid = field(obj, "question_id", where, (int, str))
        image = field(obj, "image", where, str)
        text = field(obj, "text", where, str)
        image_path = storage.join(idir, image)
        if check_images and not exists(image_path):
            raise EvalInputError(f"{where}: image {image_path} does not exist")
        meta = {"benchmark": bench.name, "prompt": text, "image_file": image,
                "category": obj.get("category")}
        out.append(Question(qid, image_path, text, meta))
    return out


class _JsonlBenchmark(Benchmark):
    def load(self, data_root: str, limit: int | None = None, *, question_file: str | None = None,
             image_dir: str | None = None, check_images: bool = True) -> list[Question]:
        """Reads LLaVA's question file (see :func:`_load_llava_jsonl`).

        Args:
          data_root: LLaVA's ``playground/data/eval`` equivalent.
          limit: keep the first ``limit`` questions.
          question_file, image_dir: overrides of the defaults (relative to ``data_root`` or
            absolute).
          check_images: verify that every image file exists.
        """
        return _load_llava_jsonl(self, data_root, limit, question_file, image_dir, check_images)


# ----------------------------------------------------------------------------------------------
# VQAv2


class VQAv2(_JsonlBenchmark):
    """VQAv2 test-dev (EvalAI server) or any split with VQA-format annotations (local)."""

    name = "vqav2"
    question_file = "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"
    image_dir = "vqav2/test2015"
    full_test_file = "vqav2/llava_vqav2_mscoco_test2015.jsonl"
    submission_name = "vqav2_test-dev_submission.json"

    def postprocess(self, answer: str) -> str:
        """LLaVA's ``EvalAIAnswerProcessor`` (``convert_vqav2_for_submission.py``)."""
        return scoring.evalai_answer_processor(answer)

    def write_submission(self, path: str, questions: Sequence[Question], answers: Sequence[str],
                         full_question_file: str | None = None, **kwargs: Any) -> str:
        """EvalAI results ``[{"question_id": int, "answer": str}]``.

        Like ``convert_vqav2_for_submission.py``, when ``full_question_file`` (LLaVA's
        ``llava_vqav2_mscoco_test2015.jsonl``: the server wants every test2015 question, also for
        the test-dev phase) is given, every question of it is listed in its order, with ``""`` for
        those not answered; otherwise only ``questions``.
        """
        check_aligned(questions, answers)
        results = {q.question_id: self.postprocess(a) for q, a in zip(questions, answers)}
        if full_question_file is None:
            ids = [q.question_id for q in questions]
        else:
            qpath = require_file(full_question_file, "vqav2 full test question file")
            ids = [field(obj, "question_id", f"{qpath} line {n}", (int, str))
                   for n, obj in read_jsonl(qpath, "vqav2 full test question file")]
        return write_json(path, [{"question_id": i, "answer": results.get(i, "")} for i in ids])

    def default_annotations(self, data_root: str) -> str:
        """A VQA-format annotations file (none is public for test-dev; e.g. val2014's)."""
        return under(data_root, "vqav2/v2_mscoco_val2014_annotations.json")

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """Official ``vqaEval.py`` accuracy, overall and per answer / question type.

        Predictions: ``[{"question_id", "answer"}]`` (the EvalAI results file, scored as is) or
        LLaVA's answers file (``text`` post-processed with :meth:`postprocess` first).
        Annotations: ``{"annotations": [{"question_id", "answers": [{"answer"}...],
        "answer_type", "question_type"}]}`` (or the bare list).
        """
        data = read_json(annotations, "vqav2 annotations")
        anns = data.get("annotations") if isinstance(data, Mapping) else data
        if not isinstance(anns, list):
            raise EvalInputError(f"vqav2 annotations {annotations}: expected a list under "
                                 "'annotations'")
        by_id = {}
        for i, ann in enumerate(anns):
            where = f"vqav2 annotations {annotations} item {i}"
            qid = _id_str(field(ann, "question_id", where), where, "question_id")
            gts = [field(a, "answer", f"{where} answers", str)
                   for a in field(ann, "answers", where, list)]
            if not gts:
                raise EvalInputError(f"{where}: no answers")
            by_id[qid] = (gts, ann.get("answer_type"), ann.get("question_type"))
        rows, seen = [], {}
        for rec in _records(predictions):
            qid = _id_str(field(rec.obj, "question_id", rec.where), rec.where, "question_id")
            if qid not in by_id:
                raise EvalInputError(f"{rec.where}: question_id {qid} is not in the annotations "
                                     f"{annotations}")
            _no_duplicates(seen, qid, rec.where)
            text, raw = _answer(rec)
            pred = self.postprocess(text) if raw else text
            gts, atype, qtype = by_id[qid]
            rows.append((scoring.vqav2_accuracy(pred, gts),
                         {"answer_type": atype, "question_type": qtype}))
        out = scoring.aggregate_accuracy(rows)
        out["missing"] = len(by_id) - len(seen)
        return out


# ----------------------------------------------------------------------------------------------
# TextVQA


def textvqa_question_from_prompt(prompt: str) -> str:
    """The question LLaVA's ``eval_textvqa.py`` reads back from a recorded prompt (lower-cased):
    ``"OCR tokens: ... Question: q Short answer:"``; or three lines with a ``Reference OCR
    token:`` line (the question is the other first line); or two lines (the first).

    Raises:
      ValueError: any other layout.
    """
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise ValueError("an 'OCR tokens:' prompt without 'Question: ... Short answer:'")
        return m.group(1).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise ValueError(f"unrecognised TextVQA prompt layout ({len(lines)} lines)")


class TextVQA(_JsonlBenchmark):
    """TextVQA val with OCR tokens in the prompt (``llava_textvqa_val_v051_ocr.jsonl``)."""

    name = "textvqa"
    question_file = "textvqa/llava_textvqa_val_v051_ocr.jsonl"
    image_dir = "textvqa/train_images"

    def postprocess(self, answer: str) -> str:
        """``EvalAIAnswerProcessor`` (applied inside LLaVA's TextVQA evaluator)."""
        return scoring.evalai_answer_processor(answer)

    def default_annotations(self, data_root: str) -> str:
        """``textvqa/TextVQA_0.5.1_val.json``."""
        return under(data_root, "textvqa/TextVQA_0.5.1_val.json")

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """LLaVA's ``eval_textvqa.py`` accuracy (m4c ``TextVQAAccuracyEvaluator``).

        Predictions: LLaVA's answers file - its ``question_id`` is the image id and the question
        is read back from ``prompt`` (:func:`textvqa_question_from_prompt`), matched to the
        annotation with that ``(image_id, question.lower())`` exactly as LLaVA does - or
        ``[{"question_id": <TextVQA int question_id>, "answer"}]``.
        """
        data = read_json(annotations, "textvqa annotations")
        items = data.get("data") if isinstance(data, Mapping) else None
        if not isinstance(items, list):
            raise EvalInputError(f"textvqa annotations {annotations}: expected a 'data' list")
        by_key, by_qid, gts = {}, {}, []
        for i, ann in enumerate(items):
            where = f"textvqa annotations {annotations} item {i}"
            image_id = _id_str(field(ann, "image_id", where), where, "image_id")
            question = field(ann, "question", where, str)
            answers = field(ann, "answers", where, list)
            if len(answers) != 10 or not all(isinstance(a, str) for a in answers):
                raise EvalInputError(f"{where}: 'answers' must be 10 strings, got {answers!r:.120}")
            gts.append(answers)
            by_key[(image_id, question.lower())] = i  # last wins, as in LLaVA's dict
            if "question_id" in ann:
                by_qid[_id_str(ann["question_id"], where, "question_id")] = i
        rows, matched = [], set()
        for rec in _records(predictions):
            qid = _id_str(field(rec.obj, "question_id", rec.where), rec.where, "question_id")
            if "prompt" in rec.obj and "text" in rec.obj:
                prompt = field(rec.obj, "prompt", rec.where, str)
                try:
                    key = (qid, textvqa_question_from_prompt(prompt))
                except ValueError as e:
                    raise EvalInputError(f"{rec.where}: field 'prompt': {e}") from e
                if key not in by_key:
                    raise EvalInputError(f"{rec.where}: no annotation with image_id {qid!r} and "
                                         f"question {key[1]!r} in {annotations}")
                idx = by_key[key]
            else:
                if qid not in by_qid:
                    raise EvalInputError(f"{rec.where}: question_id {qid} is not in the "
                                         f"annotations {annotations}")
                idx = by_qid[qid]
            text, _ = _answer(rec)
            matched.add(idx)
            rows.append((scoring.textvqa_accuracy(text, gts[idx]), {}))
        out = scoring.aggregate_accuracy(rows)
        out["missing"] = len(items) - len(matched)
        return out


# ----------------------------------------------------------------------------------------------
# GQA


class GQA(_JsonlBenchmark):
    """GQA testdev-balanced."""

    name = "gqa"
    question_file = "gqa/llava_gqa_testdev_balanced.jsonl"
    image_dir = "gqa/data/images"
    submission_name = "testdev_balanced_predictions.json"

    def postprocess(self, answer: str) -> str:
        """``convert_gqa_for_eval.py``: trailing periods stripped, lower-cased."""
        return scoring.gqa_postprocess(answer)

    def write_submission(self, path: str, questions: Sequence[Question], answers: Sequence[str],
                         **kwargs: Any) -> str:
        """GQA's predictions file ``[{"questionId", "prediction"}]`` (LLaVA writes it as
        ``gqa/data/testdev_balanced_predictions.json``)."""
        check_aligned(questions, answers)
        return write_json(path, [{"questionId": q.question_id, "prediction": self.postprocess(a)}
                                 for q, a in zip(questions, answers)])

    def default_annotations(self, data_root: str) -> str:
        """``gqa/data/testdev_balanced_questions.json`` (where ``gqa.sh`` runs GQA's eval.py),
        else ``gqa/testdev_balanced_questions.json``."""
        for rel in ("gqa/data/testdev_balanced_questions.json",
                    "gqa/testdev_balanced_questions.json"):
            if storage.isfile(under(data_root, rel)):
                return under(data_root, rel)
        return under(data_root, "gqa/data/testdev_balanced_questions.json")

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """GQA ``eval.py`` accuracy over the balanced questions (binary/open, per type).

        Predictions: ``[{"questionId", "prediction"}]`` (scored as is), LLaVA's answers file
        (``text`` post-processed) or ``[{"question_id", "answer"}]`` (as is). Annotations: GQA's
        questions file ``{question_id: {"answer", "isBalanced", "types": {...}}}``.
        """
        qs = read_json(annotations, "gqa questions")
        if not isinstance(qs, Mapping):
            raise EvalInputError(f"gqa questions {annotations}: expected a JSON object keyed by "
                                 "question id")
        rows, seen = [], {}
        for rec in _records(predictions):
            if "questionId" in rec.obj:
                qid = _id_str(rec.obj["questionId"], rec.where, "questionId")
                pred = field(rec.obj, "prediction", rec.where, str)
            else:
                qid = _id_str(field(rec.obj, "question_id", rec.where), rec.where, "question_id")
                text, raw = _answer(rec)
                pred = self.postprocess(text) if raw else text
            if qid not in qs:
                raise EvalInputError(f"{rec.where}: question {qid} is not in the GQA questions "
                                     f"{annotations}")
            _no_duplicates(seen, qid, rec.where)
            q = qs[qid]
            where = f"gqa questions {annotations} question {qid}"
            if not q.get("isBalanced", True):
                continue
            types = q.get("types") or {}
            rows.append((pred, field(q, "answer", where, str), types.get("structural"),
                         types.get("semantic")))
        out = scoring.gqa_scores(rows)
        balanced = sum(1 for q in qs.values() if isinstance(q, Mapping) and q.get("isBalanced",
                                                                                    True))
        out["missing"] = balanced - out["n"]
        return out


# ----------------------------------------------------------------------------------------------
# ScienceQA


class ScienceQA(Benchmark):
    """ScienceQA test (``llava_test_CQM-A.json``); the paper reports the image subset."""

    name = "scienceqa"
    question_file = "scienceqa/llava_test_CQM-A.json"
    image_dir = "scienceqa/images/test"
    max_new_tokens = 1024

    def load(self, data_root: str, limit: int | None = None, *, question_file: str | None = None,
             image_dir: str | None = None, image_only: bool = False,
             check_images: bool = True) -> list[Question]:
        """Reads LLaVA's ScienceQA conversations file.

        Each item ``{"id", "image"?, "conversations": [{"from": "human", "value"}, {"from":
        "gpt", "value": letter}]}``. Text = the human value without ``<image>``, stripped, +
        ``"\\n" + OPTION_LETTER_PROMPT``; ``meta["prompt"]`` adds LLaVA's ``"<image>\\n"`` prefix
        for image questions (``eval_science_qa.py`` detects IMG questions from it);
        ``meta["answer"]`` is the gpt letter. ``image_only`` keeps the IMG subset (applied
        before ``limit``).
        """
        qpath = require_file(under(data_root, question_file or self.question_file),
                             "scienceqa question file")
        idir = under(data_root, image_dir or self.image_dir)
        items = read_json(qpath, "scienceqa question file")
        if not isinstance(items, list):
            raise EvalInputError(f"scienceqa question file {qpath}: expected a JSON list")
        if limit is not None and limit < 0:
            raise EvalInputError(f"limit must be >= 0, got {limit}")
        out = []
        exists, dir_checked = ImageCheck(), False
        for i, item in enumerate(items):
            if limit is not None and len(out) >= limit:
                break
            where = f"{qpath} item {i}"
            qid = _id_str(field(item, "id", where), where, "id")
            convs = field(item, "conversations", where, list)
            if not convs:
                raise EvalInputError(f"{where} (id {qid}): empty 'conversations'")
            value = field(convs[0], "value", f"{where} (id {qid}) conversations[0]", str)
            qs = value.replace("<image>", "").strip()
            image = item.get("image")
            if image is not None and not isinstance(image, str):
                raise EvalInputError(f"{where} (id {qid}): field 'image' must be a string")
            if image_only and image is None:
                continue
            text = qs + "\n" + OPTION_LETTER_PROMPT
            image_path = None
            if image is not None:
                if not dir_checked:  # once, at the first image question (a request on gs://)
                    dir_checked = bool(require_dir(idir, "scienceqa image directory"))
                image_path = storage.join(idir, image)
                if check_images and not exists(image_path):
                    raise EvalInputError(f"{where} (id {qid}): image {image_path} does not exist")
            meta = {"benchmark": self.name, "prompt": ("<image>\n" if image else "") + text,
                    "answer": convs[1].get("value") if len(convs) > 1 and isinstance(
                        convs[1], Mapping) else None}
            out.append(Question(qid, image_path, text, meta))
        return out

    def postprocess(self, answer: str) -> str:
        """The parsed option letter, or "FAILED" (:func:`scoring.scienceqa_parse`)."""
        return scoring.scienceqa_parse(answer)

    def default_annotations(self, data_root: str) -> str:
        """``scienceqa/problems.json`` (``pid_splits.json`` must sit next to it)."""
        return under(data_root, "scienceqa/problems.json")

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None, split: str = "test") -> dict[str, Any]:
        """LLaVA's ``eval_science_qa.py``: accuracy over all answered problems of ``split`` and
        over those with an image (``img_accuracy``, the paper's ScienceQA-IMG).

        Predictions: LLaVA's answers file (``question_id`` = problem id, ``text``) or
        ``[{"question_id", "answer"}]`` (the answer parsed the same way). An image problem is one
        whose ``problems.json`` entry has an ``image``.
        """
        problems = read_json(annotations, "scienceqa problems")
        splits_path = storage.join(storage.dirname(annotations), "pid_splits.json")
        splits = read_json(splits_path, "scienceqa pid_splits")
        if not isinstance(problems, Mapping):
            raise EvalInputError(f"scienceqa problems {annotations}: expected a JSON object")
        if not isinstance(splits, Mapping) or split not in splits:
            raise EvalInputError(f"scienceqa pid_splits {splits_path}: no split {split!r}")
        pids = [str(p) for p in splits[split]]
        in_split = set(pids)
        total = correct = img_total = img_correct = 0
        seen: dict = {}
        for rec in _records(predictions):
            pid = _id_str(field(rec.obj, "question_id", rec.where), rec.where, "question_id")
            if pid not in in_split or pid not in problems:
                raise EvalInputError(f"{rec.where}: question_id {pid} is not a {split!r} problem "
                                     f"of {annotations}")
            _no_duplicates(seen, pid, rec.where)
            text, _ = _answer(rec)
            prob = problems[pid]
            where = f"scienceqa problems {annotations} problem {pid}"
            choices = field(prob, "choices", where, list)
            answer = field(prob, "answer", where, int)
            ok = scoring.scienceqa_correct(scoring.scienceqa_parse(text), len(choices), answer)
            total += 1
            correct += ok
            if prob.get("image"):
                img_total += 1
                img_correct += ok
        img_pids = [p for p in pids if isinstance(problems.get(p), Mapping)
                    and problems[p].get("image")]
        return {"accuracy": 100.0 * correct / total if total else None, "n": total,
                "img_accuracy": 100.0 * img_correct / img_total if img_total else None,
                "n_img": img_total, "missing": len(pids) - total,
                "missing_img": len(img_pids) - img_total}


# ----------------------------------------------------------------------------------------------
# POPE


class POPE(_JsonlBenchmark):
    """POPE (COCO) adversarial / popular / random, LLaVA's ``llava_pope_test.jsonl``."""

    name = "pope"
    question_file = "pope/llava_pope_test.jsonl"
    image_dir = "pope/val2014"
    categories = ("adversarial", "popular", "random")

    def postprocess(self, answer: str) -> str:
        """``"yes"`` or ``"no"`` by LLaVA's rule (:func:`scoring.pope_parse`)."""
        return scoring.pope_parse(answer)

    def default_annotations(self, data_root: str) -> str:
        """The ``pope`` directory (``llava_pope_test.jsonl`` and ``coco/coco_pope_*.json``)."""
        return under(data_root, "pope")

    def labels(self, annotations: str, questions: str | None = None) -> dict[str, tuple[str,
                                                                                        str]]:
        """``{question_id: (category, label)}`` for LLaVA's POPE questions.

        ``eval_pope.py`` pairs the k-th question of a category in ``llava_pope_test.jsonl`` with
        the k-th line of ``coco/coco_pope_<category>.json``; so does this, checking that each pair
        has the same image and question (else the label files are not the POPE version LLaVA's
        question file was built from, and the error names the line).

        Args:
          annotations: the ``pope`` directory, or its ``coco`` label directory.
          questions: LLaVA's POPE question file (default: ``llava_pope_test.jsonl`` in the pope
            directory).
        """
        annotations = under(None, annotations).rstrip("/")
        require_dir(annotations, "pope annotation directory")
        label_dir = storage.join(annotations, "coco")
        if not storage.isdir(label_dir):
            label_dir = annotations
            annotations = storage.dirname(annotations)
        qpath = require_file(questions or storage.join(annotations, "llava_pope_test.jsonl"),
                             "pope question file")
        by_cat: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for lineno, obj in read_jsonl(qpath, "pope question file"):
            where = f"{qpath} line {lineno}"
            qid = _id_str(field(obj, "question_id", where), where, "question_id")
            by_cat[field(obj, "category", where, str)].append(
                (qid, field(obj, "image", where, str), field(obj, "text", where, str)))
        out: dict[str, tuple[str, str]] = {}
        for cat, qs in by_cat.items():
            lpath = require_file(storage.join(label_dir, f"coco_pope_{cat}.json"),
                                 f"pope label file for category {cat!r}")
            lines = read_jsonl(lpath, "pope label file")
            if len(lines) != len(qs):
                raise EvalInputError(f"pope label file {lpath} has {len(lines)} lines but {qpath}"
                                     f" has {len(qs)} {cat!r} questions")
            for (lineno, obj), (qid, image, text) in zip(lines, qs):
                where = f"pope label file {lpath} line {lineno}"
                label = field(obj, "label", where, str)
                if label not in ("yes", "no"):
                    raise EvalInputError(f"{where}: field 'label' must be 'yes' or 'no', got "
                                         f"{label!r}")
                first_line = text.split("\n")[0]
                if (field(obj, "image", where, str) != image
                        or field(obj, "text", where, str).strip() != first_line.strip()):
                    raise EvalInputError(f"{where}: does not match question_id {qid} of {qpath} "
                                         f"(image {image!r}, {first_line!r}); the label files "
                                         "must be the POPE version the question file was built "
                                         "from")
                out[qid] = (cat, label)
        return out

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """LLaVA's ``eval_pope.py`` per category (%), plus the mean over the categories scored.

        Predictions: LLaVA's answers file or ``[{"question_id", "answer"}]`` (both parsed with
        :func:`scoring.pope_parse`).
        """
        labels = self.labels(annotations, questions)
        per_cat: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        seen: dict = {}
        for rec in _records(predictions):
            qid = _id_str(field(rec.obj, "question_id", rec.where), rec.where, "question_id")
            if qid not in labels:
                raise EvalInputError(f"{rec.where}: question_id {qid} is not a POPE question of "
                                     f"{annotations}")
            _no_duplicates(seen, qid, rec.where)
            text, _ = _answer(rec)
            cat, label = labels[qid]
            per_cat[cat][0].append(scoring.pope_parse(text))
            per_cat[cat][1].append(label)
        out: dict[str, Any] = {}
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        cats = [c for c in self.categories if c in per_cat] + sorted(
            c for c in per_cat if c not in self.categories)
        for cat in cats:
            m = scoring.pope_metrics(*per_cat[cat])
            out[cat] = {k: (100.0 * v if k in keys else v) for k, v in m.items()}
        if cats:
            out["mean"] = {k: sum(out[c][k] for c in cats) / len(cats) for k in keys}
        out["n"] = len(seen)
        out["missing"] = len(labels) - len(seen)
        return out


# ----------------------------------------------------------------------------------------------
# MMBench


def _image_ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"GIF8"):
        return ".gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data.startswith(b"BM"):
        return ".bmp"
    return ".jpg"


def _mmbench_options(row: Mapping[str, str]) -> list[str]:
    """LLaVA's ``get_options``: A, B, C, D in order, stopping at the first empty one."""
    out = []
    for letter in MMBENCH_OPTIONS:
        value = row.get(letter)
        if is_none_cell(value):
            break
        out.append(value)
    return out


def _parse_index(value: str, where: str) -> int:
    try:
        return int(float(value)) if value.strip().endswith(".0") else int(value)
    except ValueError:
        raise EvalInputError(f"{where}: field 'index' must be an integer, got {value!r}") from None


class MMBench(Benchmark):
    """MMBench (dev, ``mmbench_dev_20230712.tsv``), CircularEval."""

    name = "mmbench"
    question_file = "mmbench/mmbench_dev_20230712.tsv"
    max_new_tokens = 1024
    submission_name = "mmbench_dev_20230712.xlsx"

    def read_rows(self, tsv: str, circular: str = "auto") -> list[dict[str, Any]]:
        """The copies to ask, in order, as dicts: the TSV cells (``image`` kept as read) plus
        ``_index`` (int, the copy's index), ``_main`` (index % 1e6), ``_round``, ``_options``
        (letter -> text for this copy), ``_answer`` (this copy's correct letter or None) and
        ``_line``.

        ``circular``: ``"tsv"`` asks the rows as they are (the 20230712 TSV already holds the
        circular copies, index ``i + k * 1e6`` with options rotated by ``k``: LLaVA's
        ``mmbench.sh`` asks each row once); ``"rotate"`` asks every main row (index < 1e6) once per
        rotation of its options - copy ``k`` gets options ``opts[k:] + opts[:k]``, answer letter
        shifted accordingly, index ``k * 1e6 + i`` (LLaVA's ``--all-rounds`` order) - and ignores
        copies in the file; ``"auto"`` is ``"tsv"`` if the file has copies, else ``"rotate"``.
        """
        if circular not in ("auto", "tsv", "rotate"):
            raise EvalInputError(f"mmbench: circular must be 'auto', 'tsv' or 'rotate', got "
                                 f"{circular!r}")
        header, cells = read_table(tsv, "mmbench TSV")
        for col in ("index", "question"):
            if col not in header:
                raise EvalInputError(f"mmbench TSV {tsv}: no {col!r} column (header: {header})")
        rows, seen = [], {}
        for lineno, values in cells:
            row: dict[str, Any] = dict(zip(header, values))
            where = f"mmbench TSV {tsv} line {lineno}"
            row["_index"] = _parse_index(row["index"], where)
            row["_line"] = lineno
            if row["_index"] in seen:
                raise EvalInputError(f"{where}: index {row['_index']} already at line "
                                     f"{seen[row['_index']]}")
            seen[row["_index"]] = lineno
            rows.append(row)
        has_copies = any(r["_index"] >= scoring.MMBENCH_CIRCULAR_OFFSET for r in rows)
        mode = ("tsv" if has_copies else "rotate") if circular == "auto" else circular
        out = []
        for row in rows:
            opts = _mmbench_options(row)
            answer = None if is_none_cell(row.get("answer")) else row["answer"].strip()
            main = row["_index"] % scoring.MMBENCH_CIRCULAR_OFFSET
            if mode == "tsv":
                out.append({**row, "_main": main, "_round": row["_index"] // (
                    scoring.MMBENCH_CIRCULAR_OFFSET), "_options": dict(zip(MMBENCH_OPTIONS, opts)),
                    "_answer": answer})
                continue
            if row["_index"] >= scoring.MMBENCH_CIRCULAR_OFFSET:
                continue
            n = len(opts)
            for k in range(max(n, 1)):
                rotated = opts[k:] + opts[:k]
                ans_k = None
                if answer is not None and answer in MMBENCH_OPTIONS[:n]:
                    ans_k = MMBENCH_OPTIONS[(MMBENCH_OPTIONS.index(answer) - k) % n]
                out.append({**row, "_index": k * scoring.MMBENCH_CIRCULAR_OFFSET + row["_index"],
                            "_main": row["_index"], "_round": k,
                            "_options": dict(zip(MMBENCH_OPTIONS, rotated)), "_answer": ans_k})
        return out

    def load(self, data_root: str, limit: int | None = None, *, question_file: str | None = None,
             circular: str = "auto", image_cache_dir: str | None = None) -> list[Question]:
        """Reads the MMBench TSV and decodes its base64 images to files.

        Args:
          limit: keep the first ``limit`` questions (main indices, in file order) with all their
            copies.
          circular: see :meth:`read_rows`.
          image_cache_dir: where decoded images go (default ``<tsv dir>/images/<tsv stem>``);
            one file per distinct image, reused when present. An ``image`` cell holding only a
            number refers to the image of that index (newer MMBench TSVs do this for copies).

        ``question_id`` is the row's index (``"tsv"``), or the main index with
        ``meta["answer_fields"]["round_id"]`` = rotation (``"rotate"``, as LLaVA's
        ``--all-rounds``). ``meta``: ``index`` (the copy's index), ``main_index``, ``round``,
        ``options``, ``answer``, ``category``, ``l2_category``, ``row`` (TSV cells but the image),
        ``prompt`` (LLaVA's recorded prompt: the text without the final instruction).
        """
        tsv = under(data_root, question_file or self.question_file)
        if storage.is_remote(tsv):  # its images are cached next to it: work on a local copy
            tsv = storage.local_copy(require_file(tsv, "mmbench TSV"))
        rows = self.read_rows(tsv, circular)
        mains: list[int] = []
        for r in rows:
            if r["_main"] not in mains:
                mains.append(r["_main"])
        keep = set(take(mains, limit))
        rows = [r for r in rows if r["_main"] in keep]
        cache = os.path.abspath(image_cache_dir or os.path.join(
            os.path.dirname(tsv), "images", os.path.splitext(os.path.basename(tsv))[0]))
        by_index_image = {r["_index"]: r.get("image", "") for r in rows}
        out = []
        for r in rows:
            where = f"mmbench TSV {tsv} line {r['_line']} (index {r['_index']})"
            image_path = self._image_file(r, by_index_image, cache, where)
            opts = r["_options"]
            question = r["question"]
            if not is_none_cell(r.get("hint")):
                question = r["hint"] + "\n" + question
            for letter, opt in opts.items():
                question += "\n" + letter + ". " + opt
            text = question + "\n" + OPTION_LETTER_PROMPT
            rotate = r["_index"] != _parse_index(r["index"], where)
            qid = r["_main"] if rotate else r["_index"]
            meta = {
                "benchmark": self.name, "prompt": question, "index": r["_index"],
                "main_index": r["_main"], "round": r["_round"], "options": dict(opts),
                "answer": r["_answer"], "category": r.get("category"),
                "l2_category": r.get("l2-category"),
                "row": {k: v for k, v in r.items() if not k.startswith("_") and k != "image"},
                "answer_fields": {"round_id": r["_round"] if rotate else 0,
                                  "options": list(opts.values()), "option_char": list(opts)},
            }
            out.append(Question(qid, image_path, text, meta))
        return out

    @staticmethod
    def _image_file(row: Mapping[str, Any], by_index: Mapping[int, str], cache: str,
                    where: str) -> str:
        b64 = row.get("image", "")
        if b64 is None or is_none_cell(b64):
            raise EvalInputError(f"{where}: empty 'image' cell")
        if b64.strip().isdigit() and len(b64.strip()) <= 12:
            ref = int(b64.strip())
            b64 = by_index.get(ref, "")
            if not b64 or (b64.strip().isdigit() and len(b64.strip()) <= 12):
                raise EvalInputError(f"{where}: 'image' refers to index {ref}, which has no "
                                     "image in the file")
        digest = hashlib.sha1(b64.encode("ascii", "replace")).hexdigest()[:20]
        try:
            data = base64.b64decode(b64, validate=False)
        except (binascii.Error, ValueError) as e:
            raise EvalInputError(f"{where}: 'image' is not valid base64 ({e})") from e
        if not data:
            raise EvalInputError(f"{where}: 'image' decodes to no bytes")
        path = os.path.join(cache, digest + _image_ext(data))
        if not os.path.isfile(path):
            os.makedirs(cache, exist_ok=True)
            tmp = path + f".tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return path

    def write_submission(self, path: str, questions: Sequence[Question], answers: Sequence[str],
                         **kwargs: Any) -> str:
        """The table ``convert_mmbench_for_submission.py`` uploads: the TSV's columns without
        ``hint, category, source, image, comment, l2-category``, a ``prediction`` column (the raw
        output) inserted at position 6, one row per copy asked (rotations get their own index
        and rotated options). Written as ``.xlsx`` if openpyxl is installed, else as ``.tsv``
        (with a warning). Returns the path written."""
        check_aligned(questions, answers)
        if not questions:
            raise EvalInputError("mmbench submission: no questions")
        header = [c for c in questions[0].meta["row"] if c not in MMBENCH_DROPPED_COLUMNS]
        header.insert(min(6, len(header)), "prediction")
        rows = []
        for q, a in zip(questions, answers):
            cells = dict(q.meta["row"])
            cells["index"] = q.meta["index"]
            for letter in MMBENCH_OPTIONS:
                if letter in cells:
                    cells[letter] = q.meta["options"].get(letter, "")
            if q.meta.get("answer") is not None and "answer" in cells:
                cells["answer"] = q.meta["answer"]
            cells["prediction"] = a
            rows.append([cells.get(c, "") for c in header])
        written = write_table(path, header, rows)
        if written != path:
            log.warning("openpyxl is not installed: wrote the MMBench submission as TSV %s "
                        "instead of %s (convert it to .xlsx before uploading)", written, path)
        return written

    def default_annotations(self, data_root: str) -> str:
        """The TSV itself."""
        return under(data_root, self.question_file)

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """CircularEval (%): see :func:`scoring.mmbench_circular_scores`.

        Predictions: LLaVA's answers file (``question_id`` = index; a ``round_id`` k > 0 means the
        k-th rotation, index ``k * 1e6 + question_id``), the submission table (``index``,
        ``prediction``), or ``[{"question_id", "answer"}]``. If the TSV has no circular copies,
        every main question's rotations are expected (a run that asked each row once should read
        ``single_pass_accuracy``).
        """
        rows = self.read_rows(annotations, "auto")
        by_index = {r["_index"]: r for r in rows}
        if all(r["_answer"] is None for r in rows):
            raise EvalInputError(f"mmbench TSV {annotations}: no 'answer' column values (a test "
                                 "split): submit it to the MMBench server instead")
        copies: dict[int, dict[str, Any]] = {
            i: {"index": i, "answer": r["_answer"], "category": r.get("category"),
                "l2_category": r.get("l2-category")} for i, r in by_index.items()}
        seen: dict = {}
        for rec in _records(predictions):
            if "index" in rec.obj and "prediction" in rec.obj:
                index = _parse_index(str(rec.obj["index"]), rec.where)
                text = rec.obj["prediction"]
                text = "" if is_none_cell(text) else str(text)
            else:
                qid = field(rec.obj, "question_id", rec.where, (int, str))
                index = _parse_index(str(qid), rec.where)
                rnd = rec.obj.get("round_id", 0)
                if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
                    raise EvalInputError(f"{rec.where}: field 'round_id' must be an int >= 0")
                if rnd and index < scoring.MMBENCH_CIRCULAR_OFFSET:
                    index += rnd * scoring.MMBENCH_CIRCULAR_OFFSET
                text, _ = _answer(rec)
            if index not in by_index:
                raise EvalInputError(f"{rec.where}: index {index} is not a question of "
                                     f"{annotations}")
            _no_duplicates(seen, index, rec.where)
            copies[index]["prediction"] = scoring.mmbench_extract_letter(
                text, by_index[index]["_options"])
        out = scoring.mmbench_circular_scores(copies.values())
        out["missing"] = len({i % scoring.MMBENCH_CIRCULAR_OFFSET for i in copies}) - out["n"]
        return out


# ----------------------------------------------------------------------------------------------
# VizWiz


class VizWiz(_JsonlBenchmark):
    """VizWiz-VQA test (EvalAI server), or val with its annotations (local)."""

    name = "vizwiz"
    question_file = "vizwiz/llava_test.jsonl"
    image_dir = "vizwiz/test"
    submission_name = "vizwiz_test_submission.json"

    def postprocess(self, answer: str) -> str:
        """``EvalAIAnswerProcessor`` (``convert_vizwiz_for_submission.py``)."""
        return scoring.evalai_answer_processor(answer)

    def write_submission(self, path: str, questions: Sequence[Question], answers: Sequence[str],
                         **kwargs: Any) -> str:
        """EvalAI results ``[{"image": <file name>, "answer": str}]`` for every question."""
        check_aligned(questions, answers)
        return write_json(path, [{"image": q.meta["image_file"], "answer": self.postprocess(a)}
                                 for q, a in zip(questions, answers)])

    def default_annotations(self, data_root: str) -> str:
        """``vizwiz/val.json`` (VizWiz's val annotations; test answers are not public)."""
        return under(data_root, "vizwiz/val.json")

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """VizWiz API accuracy (%), overall and per ``answer_type`` (yes/no, number, other,
        unanswerable).

        Predictions: ``[{"image", "answer"}]`` (scored as is), or LLaVA's answers file together
        with ``questions`` = LLaVA's question file (to find each question_id's image; ``text``
        post-processed). Annotations: ``[{"image", "answers": [{"answer"}...], "answer_type"}]``.
        """
        anns = read_json(annotations, "vizwiz annotations")
        if not isinstance(anns, list):
            raise EvalInputError(f"vizwiz annotations {annotations}: expected a JSON list")
        by_image = {}
        for i, ann in enumerate(anns):
            where = f"vizwiz annotations {annotations} item {i}"
            gts = [field(a, "answer", f"{where} answers", str)
                   for a in field(ann, "answers", where, list)]
            if not gts:
                raise EvalInputError(f"{where}: no answers")
            by_image[field(ann, "image", where, str)] = (gts, ann.get("answer_type"))
        qid_to_image = None
        rows, seen = [], {}
        for rec in _records(predictions):
            if "image" in rec.obj:
                image = field(rec.obj, "image", rec.where, str)
                text, raw = _answer(rec)
            else:
                qid = _id_str(field(rec.obj, "question_id", rec.where), rec.where, "question_id")
                if qid_to_image is None:
                    if questions is None:
                        raise EvalInputError(f"{rec.where}: a LLaVA answer has no 'image'; pass "
                                             "the question file (--questions) to map "
                                             "question_id to image")
                    qpath = require_file(questions, "vizwiz question file")
                    qid_to_image = {
                        _id_str(field(o, "question_id", f"{qpath} line {n}"), f"{qpath} line {n}",
                                "question_id"): field(o, "image", f"{qpath} line {n}", str)
                        for n, o in read_jsonl(qpath, "vizwiz question file")}
                if qid not in qid_to_image:
                    raise EvalInputError(f"{rec.where}: question_id {qid} is not in {questions}")
                image = qid_to_image[qid]
                text, raw = _answer(rec)
            if image not in by_image:
                raise EvalInputError(f"{rec.where}: image {image} is not in the annotations "
                                     f"{annotations}")
            _no_duplicates(seen, image, rec.where)
            pred = self.postprocess(text) if raw else text
            gts, atype = by_image[image]
            rows.append((scoring.vizwiz_accuracy(pred, gts), {"answer_type": atype}))
        out = scoring.aggregate_accuracy(rows)
        out["missing"] = len(by_image) - len(seen)
        return out


# ----------------------------------------------------------------------------------------------
# MM-Vet


class MMVet(_JsonlBenchmark):
    """MM-Vet: answers only; scored by the MM-Vet GPT-4 grader."""

    name = "mmvet"
    question_file = "mm-vet/llava-mm-vet.jsonl"
    image_dir = "mm-vet/images"
    max_new_tokens = 1024
    submission_name = "mmvet_results.json"

    def write_submission(self, path: str, questions: Sequence[Question], answers: Sequence[str],
                         **kwargs: Any) -> str:
        """``convert_mmvet_for_eval.py``: ``{"v1_<question_id>": answer}``, indented by 2."""
        check_aligned(questions, answers)
        return write_json(path, {f"v1_{q.question_id}": a for q, a in zip(questions, answers)},
                          indent=2)

    def score(self, predictions: Predictions, annotations: str | None = None,
              questions: str | None = None) -> dict[str, Any]:
        """Always raises: MM-Vet has no rule-based score."""
        raise EvalInputError("mmvet has no rule-based score: grade the results file "
                             "({\"v1_<id>\": answer}) with the MM-Vet GPT-4 evaluator")


# ----------------------------------------------------------------------------------------------
# MME


class MME(_JsonlBenchmark):
    """MME (perception + cognition), LLaVA's ``llava_mme.jsonl``."""

    name = "mme"
    question_file = "MME/llava_mme.jsonl"
    image_dir = "MME/MME_Benchmark_release_version"

    def postprocess(self, answer: str) -> str:
        """"yes" / "no" / "other" (:func:`scoring.mme_parse`)."""
        return scoring.mme_parse(answer)

    def default_annotations(self, data_root: str) -> str:
        """``MME/MME_Benchmark_release_version``."""
        return under(data_root, "MME/MME_Benchmark_release_version")

    @staticmethod
    def ground_truth(root: str) -> dict[tuple[str, str, str], str]:
        """``{(subtask, txt file name, question): answer}`` from MME's release directory, read
        like LLaVA's ``convert_answer_to_mme.py``: each subtask directory holds ``*.txt`` files of
        ``question<TAB>answer`` lines (in ``questions_answers_YN/`` when it has ``images/``)."""
        require_dir(root, "MME benchmark directory")
        gt = {}
        for task in storage.listdir(root):
            tdir = storage.join(root, task)
            if not storage.isdir(tdir):
                continue
            qa_dir = (storage.join(tdir, "questions_answers_YN")
                      if storage.isdir(storage.join(tdir, "images")) else tdir)
            require_dir(qa_dir, f"MME {task} question directory")
            for name in storage.listdir(qa_dir):
                if not name.endswith(".txt"):
                    continue
                fpath = storage.join(qa_dir, name)
                with storage.open(fpath, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        parts = line.strip().split("\t")
                        if len(parts) != 2:
                            raise EvalInputError(f"MME file {fpath} line {lineno}: expected "
                                                 "'question<TAB>answer'")
                        gt[(task, name, parts[0])] = parts[1]
        return gt

    def score(self, predictions: Predictions, annotations: str,
              questions: str | None = None) -> dict[str, Any]:
        """MME scores (see :func:`scoring.mme_scores`) from LLaVA's answers file.

        Each answer's subtask is the first component of ``question_id``; its GT file is the image
        name's stem + ``.txt``; its question is ``prompt`` without the short-answer instruction +
        ``" Please answer yes or no."`` (or with two spaces, as some MME files have it).
        """
        gt = self.ground_truth(annotations)
        rows, seen = [], {}
        for rec in _records(predictions):
            qid = field(rec.obj, "question_id", rec.where, str)
            prompt = field(rec.obj, "prompt", rec.where, str)
            text = field(rec.obj, "text", rec.where, str)
            task = qid.split("/")[0]
            fname = qid.split("/")[-1].split(".")[0] + ".txt"
            question = prompt
            if SHORT_ANSWER_PROMPT in question:
                question = question.replace(SHORT_ANSWER_PROMPT, "").strip()
            if "Please answer yes or no." not in question:
                question = question + " Please answer yes or no."
                if (task, fname, question) not in gt:
                    question = question.replace(" Please answer yes or no.",
                                                "  Please answer yes or no.")
            if (task, fname, question) not in gt:
                raise EvalInputError(f"{rec.where}: no MME ground truth for {qid} question "
                                     f"{question!r} in {annotations}")
            _no_duplicates(seen, (task, fname, question), rec.where)
            rows.append((task, qid, gt[(task, fname, question)], text))
        try:
            out = scoring.mme_scores(rows)
        except ValueError as e:
            raise EvalInputError(f"MME ground truth {annotations}: {e}") from e
        out["n"] = len(rows)
        out["missing"] = len(gt) - len(rows)
        return out


# ----------------------------------------------------------------------------------------------
# Registry

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b for b in (VQAv2(), GQA(), TextVQA(), VizWiz(), ScienceQA(), POPE(), MMBench(),
                        MMVet(), MME())
}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``; :class:`EvalInputError` listing the known ones
    otherwise."""
    if name not in BENCHMARKS:
        raise EvalInputError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def load(benchmark: str, data_root: str, limit: int | None = None, **kwargs: Any) -> list[
        Question]:
    """``get_benchmark(benchmark).load(data_root, limit, **kwargs)``."""
    return get_benchmark(benchmark).load(data_root, limit, **kwargs)


def score(benchmark: str, predictions: Predictions, annotations: str | None = None,
          questions: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Scores ``predictions`` for ``benchmark`` (dispatch to :meth:`Benchmark.score`).

    ``annotations`` defaults to the benchmark's file under ``data_root``
    (:meth:`Benchmark.default_annotations`); one of the two is required.
    """
    bench = get_benchmark(benchmark)
    if annotations is None:
        if data_root is None:
            if bench.name == "mmvet":
                return bench.score(predictions, None)
            raise EvalInputError(f"{benchmark}: pass the annotations (or a data root)")
        annotations = bench.default_annotations(data_root)
    return bench.score(predictions, annotations, questions)
