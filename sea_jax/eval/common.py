"""Shared pieces of the evaluation code: the error type, the question record, careful file
reading (every error names the file and the line / item / field), and LLaVA's answers file.

LLaVA's answers file (``model_vqa*.py`` output, one JSON object per line)::

    {"question_id": ..., "prompt": "<what LLaVA records as the prompt>", "text": "<model output>",
     "answer_id": "<random id>", "model_id": "<model name>", "metadata": {}}

MMBench lines also carry ``round_id``, ``options`` and ``option_char`` (``model_vqa_mmbench.py``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sea_jax import storage
from sea_jax.errors import UserError


class EvalInputError(UserError, ValueError):
    """Bad user input to the evaluation code: a missing file, a malformed line, a field of the
    wrong type, a prediction for an unknown question. The message names the file and the
    line / field / question id."""


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question, ready for the model.

    Attributes:
      question_id: the id LLaVA writes in its answers file (int or str; not unique for TextVQA,
        whose LLaVA question file uses the image id).
      image: absolute path of the image, or None for a text-only question (ScienceQA).
      text: the user message exactly as LLaVA-1.5 builds it, *without* the image placeholder:
        LLaVA puts ``"<image>\\n"`` in front of it (``DEFAULT_IMAGE_TOKEN + '\\n' + text``) when
        ``image`` is not None, then wraps it in the ``vicuna_v1`` conversation template.
      meta: benchmark-specific extras. Always has ``"prompt"`` (what LLaVA records as ``prompt``
        in the answers file) and ``"benchmark"``; see each reader for the rest.
    """

    question_id: Any
    image: str | None
    text: str
    meta: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Reading


def require_file(path: str, what: str) -> str:
    """Returns ``path`` (local or ``gs://``) if it is an existing file, else raises
    :class:`EvalInputError` naming it."""
    if not storage.isfile(path):
        kind = "is a directory, not a file" if storage.isdir(path) else "does not exist"
        raise EvalInputError(f"{what} {path} {kind}")
    return path


def require_dir(path: str, what: str) -> str:
    """Returns ``path`` (local or ``gs://``) if it is an existing directory, else raises
    :class:`EvalInputError`."""
    if not storage.isdir(path):
        raise EvalInputError(f"{what} {path} does not exist (or is not a directory)")
    return path


def under(root: str | None, rel: str) -> str:
    """``rel`` under the data root ``root``: an absolute local path, or a ``gs://`` one. An
    absolute or ``gs://`` ``rel`` stands as it is."""
    if storage.is_remote(rel):
        return rel
    if os.path.isabs(rel) or root is None:
        return os.path.abspath(rel)
    return storage.join(root, rel) if storage.is_remote(root) else os.path.abspath(os.path.join(root, rel))


class ImageCheck:
    """Whether image files exist, for a question file's worth of them: one listing per ``gs://``
    folder instead of one request per image (a GQA test split names 12,578)."""

    def __init__(self):
        self._listed: dict[str, set[str]] = {}

    def __call__(self, path: str) -> bool:
        if not storage.is_remote(path):
            return os.path.isfile(path)
        folder, name = path.rsplit("/", 1)
        if folder not in self._listed:
            try:
                self._listed[folder] = set(storage.listdir(folder))
            except FileNotFoundError:
                self._listed[folder] = set()
        return name in self._listed[folder]


def _read_text(path: str, what: str) -> str:
    require_file(path, what)
    try:
        with storage.open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{what} {path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise EvalInputError(f"{what} {path}: cannot be read ({e.strerror})") from e


def read_json(path: str, what: str = "file") -> Any:
    """Parses a JSON file; a syntax error names the file, line and column."""
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{what} {path}: malformed JSON at line {e.lineno}, column {e.colno}:"
                             f" {e.msg}") from e


def read_jsonl(path: str, what: str = "file") -> list[tuple[int, Any]]:
    """Parses a JSON-lines file into ``(line_number, value)`` pairs (blank lines skipped).

    Raises:
      EvalInputError: naming the file and line of a malformed line.
    """
    text = _read_text(path, what)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{what} {path}: line {lineno} is not valid JSON (column "
                                 f"{e.colno}: {e.msg})") from e
    return rows


def field(obj: Any, key: str, where: str, types: type | tuple[type, ...] | None = None) -> Any:
    """``obj[key]``, checked: raises :class:`EvalInputError` naming ``where`` (e.g. ``"f.jsonl
    line 3"``) and the field when ``obj`` is not an object, the key is missing, or the value is not
    of ``types`` (bool is never accepted as an int)."""
    if not isinstance(obj, Mapping):
        raise EvalInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise EvalInputError(f"{where}: missing field {key!r}")
    value = obj[key]
    if types is not None:
        bad = not isinstance(value, types) or (isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)))
        if bad:
            names = (types.__name__ if isinstance(types, type)
                     else " or ".join(t.__name__ for t in types))
            raise EvalInputError(f"{where}: field {key!r} must be {names}, got "
                                 f"{type(value).__name__} {value!r:.80}")
    return value


def take(items: Sequence[Any], limit: int | None) -> Sequence[Any]:
    """The first ``limit`` items (all if ``limit`` is None)."""
    if limit is None:
        return items
    if limit < 0:
        raise EvalInputError(f"limit must be >= 0, got {limit}")
    return items[:limit]


# ----------------------------------------------------------------------------------------------
# Predictions


@dataclasses.dataclass(frozen=True)
class Record:
    """One prediction as read from a file: the parsed object and where it came from."""

    where: str
    obj: Mapping[str, Any]


def read_prediction_records(path: str) -> list[Record]:
    """Reads a predictions file of any accepted layout into :class:`Record` objects.

    * ``*.jsonl``: one object per line (LLaVA's answers file, or lines with ``answer``).
    * ``*.json``: a list of objects (official results files: ``[{"question_id", "answer"}]``,
      GQA's ``[{"questionId", "prediction"}]``, VizWiz's ``[{"image", "answer"}]``), or one object
      mapping ids to answers (MM-Vet's ``{"v1_0": "..."}``), turned into
      ``{"question_id": key, "answer": value}`` records.
    * ``*.tsv`` / ``*.xlsx``: MMBench submission tables (see :func:`read_table`).
    """
    lower = path.lower()
    if lower.endswith((".tsv", ".xlsx")):
        header, rows = read_table(path, "predictions file")
        return [Record(f"{path} row {n}", dict(zip(header, row))) for n, row in rows]
    if lower.endswith(".jsonl"):
        out = []
        for lineno, obj in read_jsonl(path, "predictions file"):
            where = f"{path} line {lineno}"
            if not isinstance(obj, Mapping):
                raise EvalInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(where, obj))
        return out
    data = read_json(path, "predictions file")
    if isinstance(data, list):
        out = []
        for i, obj in enumerate(data):
            where = f"{path} item {i}"
            if not isinstance(obj, Mapping):
                raise EvalInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(where, obj))
        return out
    if isinstance(data, Mapping):
        out = []
        for key, value in data.items():
            where = f"{path} key {key!r}"
            if not isinstance(value, str):
                raise EvalInputError(f"{where}: expected a string answer, got "
                                     f"{type(value).__name__}")
            out.append(Record(where, {"question_id": key, "answer": value}))
        return out
    raise EvalInputError(f"predictions file {path}: expected a JSON list or object, got "
                         f"{type(data).__name__}")


def records_from_objects(objs: Sequence[Mapping[str, Any]], name: str = "predictions") -> list[
        Record]:
    """In-memory predictions (e.g. the dicts of a LLaVA answers file) as :class:`Record` s."""
    out = []
    for i, obj in enumerate(objs):
        if not isinstance(obj, Mapping):
            raise EvalInputError(f"{name} item {i}: expected a mapping, got {type(obj).__name__}")
        out.append(Record(f"{name} item {i}", obj))
    return out


# ----------------------------------------------------------------------------------------------
# Tables (MMBench TSV / XLSX)

# Cells pandas.read_table turns into NaN by default (LLaVA reads the MMBench TSV with pandas).
PANDAS_NA_VALUES: frozenset[str] = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def is_none_cell(value: Any) -> bool:
    """LLaVA's ``is_none`` on a cell as pandas would have read it: missing, a pandas NA token, or
    the text "nan"/"none" in any case."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    text = str(value)
    return text in PANDAS_NA_VALUES or text.lower() in ("nan", "none")


def read_table(path: str, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Reads a tab-separated (pandas ``read_table`` quoting rules) or ``.xlsx`` table.

    Returns:
      ``(header, rows)``, rows as ``(line_or_row_number, cells)`` with cells as strings
      (empty string for an empty cell) and exactly ``len(header)`` cells.

    Raises:
      EvalInputError: missing file, a row with the wrong number of cells, or an ``.xlsx`` file
        without openpyxl installed.
    """
    require_file(path, what)
    if storage.is_remote(path):  # a local copy, cached by content (MMBench's TSV holds its images)
        path = storage.local_copy(path)
    if path.lower().endswith(".xlsx"):
        return _read_xlsx(path, what)
    import csv
    import sys

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # MMBench cells hold base64 images
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quotechar='"', doublequote=True)
            rows = []
            header = None
            for cells in reader:
                lineno = reader.line_num
                if header is None:
                    header = cells
                    continue
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise EvalInputError(f"{what} {path}: line {lineno} has {len(cells)} "
                                         f"tab-separated cells, the header has {len(header)}")
                rows.append((lineno, cells))
    except csv.Error as e:
        raise EvalInputError(f"{what} {path}: malformed TSV ({e})") from e
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{what} {path}: not UTF-8 text ({e})") from e
    if header is None:
        raise EvalInputError(f"{what} {path} is empty (no header line)")
    return header, rows


def _read_xlsx(path: str, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        import openpyxl
    except ImportError as e:
        raise EvalInputError(f"{what} {path}: reading .xlsx needs openpyxl, which is not "
                             "installed; pass the .tsv written instead") from e
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several unrelated types for a bad file
        raise EvalInputError(f"{what} {path}: not a readable .xlsx file ({e})") from e
    sheet = book.worksheets[0]
    it = sheet.iter_rows(values_only=True)
    try:
        header = ["" if c is None else str(c) for c in next(it)]
    except StopIteration:
        raise EvalInputError(f"{what} {path} is empty (no header row)") from None
    rows = []
    for n, values in enumerate(it, 2):
        cells = ["" if c is None else str(c) for c in values]
        cells = (cells + [""] * len(header))[:len(header)]
        rows.append((n, cells))
    return header, rows


def write_table(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Writes ``rows`` as ``.xlsx`` when openpyxl is installed and ``path`` ends in ``.xlsx``;
    otherwise (or without openpyxl) as tab-separated text next to it (``.tsv``). Returns the path
    actually written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".xlsx"):
        try:
            import openpyxl
        except ImportError:
            path = path[:-len(".xlsx")] + ".tsv"
        else:
            book = openpyxl.Workbook()
            sheet = book.active
            sheet.append(list(header))
            for row in rows:
                sheet.append(["" if v is None else v for v in row])
            book.save(path)
            return path
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quotechar='"', lineterminator="\n")
        writer.writerow(list(header))
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
    return path


# ----------------------------------------------------------------------------------------------
# Writing answers


def check_aligned(questions: Sequence[Question], answers: Sequence[str]) -> None:
    """Raises :class:`EvalInputError` unless ``answers`` is a sequence of strings aligned with
    ``questions`` (same length)."""
    if isinstance(answers, (str, bytes, Mapping)):
        raise EvalInputError("answers must be a sequence of strings aligned with the questions")
    if len(answers) != len(questions):
        raise EvalInputError(f"{len(answers)} answers for {len(questions)} questions (answers "
                             "must be aligned with the questions)")
    for q, a in zip(questions, answers):
        if not isinstance(a, str):
            raise EvalInputError(f"answer for question {q.question_id!r} is "
                                 f"{type(a).__name__}, not str")


def iter_answer_lines(questions: Sequence[Question], answers: Sequence[str],
                      model_id: str) -> Iterator[dict[str, Any]]:
    """The objects of LLaVA's answers file, in question order (see the module docstring)."""
    check_aligned(questions, answers)
    for q, a in zip(questions, answers):
        line: dict[str, Any] = {"question_id": q.question_id}
        extra = q.meta.get("answer_fields", {})
        if "round_id" in extra:
            line["round_id"] = extra["round_id"]
        line["prompt"] = q.meta.get("prompt", q.text)
        line["text"] = a
        for key, value in extra.items():
            if key != "round_id":
                line[key] = value
        line["answer_id"] = uuid.uuid4().hex[:22]
        line["model_id"] = model_id
        line["metadata"] = {}
        yield line


def write_llava_answers(path: str, questions: Sequence[Question], answers: Sequence[str],
                        model_id: str = "sea_jax") -> str:
    """Writes LLaVA's answers file (``.jsonl``) for ``questions`` and their aligned ``answers``
    (raw model outputs, stripped as LLaVA does). Returns ``path``."""
    lines = list(iter_answer_lines(questions, answers, model_id))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def write_json(path: str, obj: Any, indent: int | None = None) -> str:
    """Writes ``obj`` as JSON (creating the directory). Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    return path
