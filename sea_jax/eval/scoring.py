"""Rule-based scoring of the LLaVA-1.5 / SEA benchmarks: pure functions, no model, no files.

Each rule below follows the script LLaVA-1.5's evaluation actually runs (or the official server
LLaVA submits to); the script is named at each section. Where an official script has a quirk that
changes numbers, the quirk is reproduced and documented rather than "fixed".

VQA family (VQAv2, TextVQA, VizWiz)
    Accuracy of an answer ``a`` against ten human answers is the mean, over the ten leave-one-out
    subsets of nine humans, of ``min(#humans in the subset who said a / 3, 1)``
    (:func:`vqa_leave_one_out`). What differs is the answer normalisation applied first:

    * :func:`vqav2_accuracy` - the official ``vqaEval.py`` (GT-Vision-Lab/VQA): whitespace clean-up,
      then, **only when the ten human answers are not all identical**, both the prediction and
      the human answers go through :func:`process_punctuation` and :func:`process_digit_article`
      (if all ten humans agree the comparison is on the raw, stripped strings - the official quirk).
    * :func:`textvqa_accuracy` - LLaVA's ``eval_textvqa.py`` uses ``m4c_evaluator``'s
      ``TextVQAAccuracyEvaluator``: every answer, prediction and human ones, always goes through
      :func:`evalai_answer_processor` (lower-casing, comma/'?' removal, ``'s`` split, then the VQA
      punctuation and digit/article rules); exactly ten human answers are required.
    * :func:`vizwiz_accuracy` - the VizWiz API's ``vqaEval`` (the VizWiz evaluation server): the
      prediction always goes through the punctuation and digit/article rules, the human answers
      are compared as given; the contraction table of that script writes a typographic apostrophe
      (U+2019) in its expansions, reproduced by :data:`VIZWIZ_CONTRACTIONS`.

    LLaVA post-processes VQAv2 and VizWiz predictions with :func:`evalai_answer_processor` before
    writing the submission file (``convert_vqav2_for_submission.py``,
    ``convert_vizwiz_for_submission.py``); the server then applies the rules above.

GQA (:func:`gqa_postprocess`, :func:`gqa_scores`)
    ``convert_gqa_for_eval.py`` lower-cases the output after stripping trailing periods; the
    official GQA ``eval.py`` scores exact string equality over the balanced questions, and reports
    binary (structural type != "query") / open ("query") accuracy and accuracy per structural and
    semantic type.

POPE (:func:`pope_parse`, :func:`pope_metrics`)
    ``eval_pope.py``: keep the text before the first '.', delete commas, split on single spaces;
    the answer is "no" if one of the words is exactly ``No``, ``not`` or ``no``, else "yes".
    Positive class = yes. Accuracy, precision, recall, F1 and the ratio of "yes" predictions.

ScienceQA (:func:`scienceqa_parse`, :func:`scienceqa_correct`)
    ``eval_science_qa.py``: the output is the letter if it is exactly one of A-E; else if it starts
    with ``"<letter>. "``; else if ``The answer is ([A-Z]).`` matches exactly once; else "FAILED"
    (counted wrong: the script's random-choice fallback sits after a ``return -1`` and never runs).
    A parsed letter beyond the question's number of choices is also wrong.

MMBench (:func:`mmbench_extract_letter`, :func:`mmbench_circular_scores`)
    CircularEval as in MMBench's evaluator: a question (main index ``i < 1e6``) is asked once per
    rotation of its options (copies with index ``i + k * 1e6``), and counts as correct only if the
    option extracted from every copy's answer is that copy's correct letter. Letter extraction is
    MMBench's rule-based matching (a single stand-alone option letter, else a single option text
    contained in the answer); the official evaluator additionally asks ChatGPT to match answers
    the rules cannot, which is not done here - such answers count as wrong.

MME (:func:`mme_parse`, :func:`mme_scores`)
    The official ``eval_tool/calculation.py``: answers lower-cased; "yes"/"no" exactly, else the
    first four characters are searched for "yes" then "no", else "other". Per subtask
    ``score = 100 * (acc + acc+)`` where acc+ is the fraction of images whose two questions are both
    right; perception = sum over its 10 subtasks, cognition = sum over its 4.

MM-Vet has no rule-based score (it needs a GPT-4 grader); nothing here.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# ----------------------------------------------------------------------------------------------
# VQA answer normalisation (GT-Vision-Lab/VQA vqaEval.py; m4c_evaluator.EvalAIAnswerProcessor)

# Number words -> digits (vqaEval's ``manualMap``); note "none" -> "0".
NUMBER_WORDS: Mapping[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Punctuation handled by processPunctuation, in the order the official script walks it.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)

# Apostrophe-less spellings -> contractions (vqaEval's ``contractions``). Word-level: applied to
# whole whitespace-separated words after the number/article step. Some keys already contain an
# apostrophe (a half-written contraction), and a few entries map a word to itself.
VQA_CONTRACTIONS: Mapping[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# The VizWiz API's table: the same words, but its expansions are written with U+2019 (except
# "weve", "wheres" and "whove", which it leaves with an ASCII apostrophe).
VIZWIZ_CONTRACTIONS: Mapping[str, str] = {
    k: (v if k in ("weve", "wheres", "whove") else v.replace("'", "\u2019"))
    for k, v in VQA_CONTRACTIONS.items()
}

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# vqaEval's periodStrip "(?!<=\d)(\.)(?!\d)": the leading group is a (mistyped) look-ahead that
# never fails at a '.', so the rule is "delete every '.' not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (== 32) positionally, i.e. as ``count``: at most 32 periods
# are removed. Reproduced for exactness.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def clean_whitespace(text: str) -> str:
    """vqaEval's first step on every answer: newlines and tabs become spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """vqaEval's ``processPunctuation``.

    Each punctuation mark of :data:`PUNCTUATION` is deleted when it touches a space somewhere in
    the original text (``"p "`` or ``" p"`` occurs) or when the text contains a digit-comma-digit
    sequence anywhere (``"3,000"``); otherwise it is replaced by a space. Finally every '.' not
    followed by a digit is deleted (``"3.5"`` keeps its point, ``"dogs."`` loses it).
    """
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str, contractions: Mapping[str, str] = VQA_CONTRACTIONS) -> str:
    """vqaEval's ``processDigitArticle``: lower-case, split on whitespace, number words to digits
    (:data:`NUMBER_WORDS`), drop the articles a/an/the, expand :data:`VQA_CONTRACTIONS`, re-join
    with single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(contractions.get(w, w) for w in words)


def vqa_normalize(text: str, contractions: Mapping[str, str] = VQA_CONTRACTIONS) -> str:
    """The full official normalisation of one answer: whitespace clean-up, punctuation, then the
    digit/article/contraction step. ``vqa_normalize("Two dogs.") == "2 dogs"``."""
    return process_digit_article(process_punctuation(clean_whitespace(text)), contractions)


def evalai_answer_processor(text: str) -> str:
    """LLaVA's ``m4c_evaluator.EvalAIAnswerProcessor`` (MMF's EvalAI answer processing).

    Lower-case; delete ',' and '?'; ``"'s"`` becomes ``" 's"``; strip; newlines/tabs to spaces;
    then :func:`process_punctuation` and :func:`process_digit_article`. This is what LLaVA applies
    to VQAv2/VizWiz outputs before writing a submission, and to both sides in TextVQA scoring.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = clean_whitespace(text)
    return process_digit_article(process_punctuation(text))


# ----------------------------------------------------------------------------------------------
# VQA accuracy


def vqa_leave_one_out(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of an (already normalised) prediction against (normalised) human answers.

    The mean over ``i`` of ``min(1, #{j != i : gt[j] == prediction} / 3)``. With 10 humans:
    0 matches -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.

    Raises:
      ValueError: ``gt_answers`` is empty.
    """
    n = len(gt_answers)
    if n == 0:
        raise ValueError("no ground-truth answers")
    matches = sum(1 for a in gt_answers if a == prediction)
    total = 0.0
    for a in gt_answers:
        others = matches - (1 if a == prediction else 0)
        total += min(1.0, others / 3.0)
    return total / n


def vqav2_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy of one VQAv2 answer exactly as the official ``vqaEval.py`` computes it.

    Both sides are whitespace-cleaned; normalisation (:func:`process_punctuation` then
    :func:`process_digit_article`) is applied to both only if the human answers are not all
    identical (the official script's behaviour), then :func:`vqa_leave_one_out`.
    """
    gts = [clean_whitespace(a) for a in gt_answers]
    pred = clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    return vqa_leave_one_out(pred, gts)


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy of one TextVQA answer as LLaVA's ``TextVQAAccuracyEvaluator`` computes it:
    :func:`evalai_answer_processor` on the prediction and on every human answer, then
    :func:`vqa_leave_one_out`.

    Raises:
      ValueError: there are not exactly 10 human answers (the evaluator asserts it).
    """
    if len(gt_answers) != 10:
        raise ValueError(f"TextVQA needs exactly 10 human answers, got {len(gt_answers)}")
    return vqa_leave_one_out(evalai_answer_processor(prediction),
                             [evalai_answer_processor(a) for a in gt_answers])


def vizwiz_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy of one VizWiz answer as the VizWiz API's ``vqaEval`` computes it: the prediction
    is whitespace-cleaned and normalised (:func:`process_punctuation`,
    :func:`process_digit_article` with :data:`VIZWIZ_CONTRACTIONS`); the human answers are used as
    given; then :func:`vqa_leave_one_out`. "unanswerable" is an ordinary answer string."""
    pred = process_digit_article(process_punctuation(clean_whitespace(prediction)),
                                 VIZWIZ_CONTRACTIONS)
    return vqa_leave_one_out(pred, list(gt_answers))


def aggregate_accuracy(per_question: Iterable[tuple[float, Mapping[str, Any]]]) -> dict[str, Any]:
    """Averages per-question accuracies (0..1) into percentages, overall and per group.

    Args:
      per_question: ``(accuracy, groups)`` pairs, ``groups`` mapping a breakdown name (e.g.
        ``"answer_type"``) to the question's value for it (None = not counted in that breakdown).

    Returns:
      ``{"accuracy": %, "n": count, "per_<name>": {value: %}, "count_per_<name>": {value: n}}``.
      ``accuracy`` is None when there is no question.
    """
    total, n = 0.0, 0
    sums: dict[str, dict[Any, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, dict[Any, int]] = defaultdict(lambda: defaultdict(int))
    for acc, groups in per_question:
        total += acc
        n += 1
        for name, value in groups.items():
            if value is None:
                continue
            sums[name][value] += acc
            counts[name][value] += 1
    out: dict[str, Any] = {"accuracy": 100.0 * total / n if n else None, "n": n}
    for name, by_value in sums.items():
        out[f"per_{name}"] = {str(v): 100.0 * s / counts[name][v] for v, s in sorted(
            by_value.items(), key=lambda kv: str(kv[0]))}
        out[f"count_per_{name}"] = {str(v): c for v, c in sorted(
            counts[name].items(), key=lambda kv: str(kv[0]))}
    return out


# ----------------------------------------------------------------------------------------------
# GQA (scripts/convert_gqa_for_eval.py + the official GQA eval.py)


def gqa_postprocess(text: str) -> str:
    """``convert_gqa_for_eval.py``: strip trailing periods, then lower-case. (LLaVA's generation
    already strips surrounding whitespace; it is stripped here too so a raw output behaves the
    same.)"""
    return text.strip().rstrip(".").lower()


def gqa_scores(records: Iterable[tuple[str, str, str | None, str | None]]) -> dict[str, Any]:
    """GQA accuracy (official ``eval.py``) over ``(prediction, gold, structural, semantic)`` rows.

    A row is correct iff ``prediction == gold`` (exact, case-sensitive: predictions are expected
    post-processed by :func:`gqa_postprocess`, GQA answers are lower-case). Open questions are
    those of structural type ``"query"``, the rest are binary.

    Returns:
      percentages ``accuracy``, ``binary``, ``open`` (None if empty), ``n`` and
      ``per_structural`` / ``per_semantic`` (with counts).
    """
    rows = []
    for pred, gold, structural, semantic in records:
        correct = 1.0 if pred == gold else 0.0
        kind = None if structural is None else ("open" if structural == "query" else "binary")
        rows.append((correct, {"structural": structural, "semantic": semantic, "kind": kind}))
    out = aggregate_accuracy(rows)
    kinds = out.pop("per_kind", {})
    out.pop("count_per_kind", None)
    out["binary"] = kinds.get("binary")
    out["open"] = kinds.get("open")
    return out


# ----------------------------------------------------------------------------------------------
# POPE (llava/eval/eval_pope.py)


def pope_parse(text: str) -> str:
    """LLaVA's POPE yes/no rule: first sentence (text before the first '.'), commas deleted, split
    on single spaces; "no" if a word is exactly ``No``, ``not`` or ``no``, otherwise "yes".

    So ``"No, there is not."`` -> no, ``"There is no dog."`` -> no, ``"Yes. No."`` -> yes (only the
    first sentence counts), ``"NO"`` -> yes and ``"Not really"`` -> yes (case-sensitive words).
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """POPE metrics of parsed predictions against labels, both "yes"/"no", positive class = yes.

    Returns:
      ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (fractions in 0..1; a ratio
      whose denominator is 0 is reported as 0.0 where LLaVA's script would divide by zero), the
      counts ``tp fp tn fn`` and ``n``.

    Raises:
      ValueError: different lengths, no rows, or a value other than "yes"/"no".
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise ValueError("no predictions")
    tp = fp = tn = fn = 0
    for p, y in zip(predictions, labels):
        if p not in ("yes", "no") or y not in ("yes", "no"):
            raise ValueError(f"POPE values must be 'yes' or 'no', got prediction {p!r}, "
                             f"label {y!r}")
        if p == "yes":
            tp, fp = (tp + 1, fp) if y == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if y == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


# ----------------------------------------------------------------------------------------------
# ScienceQA (llava/eval/eval_science_qa.py)

SCIENCEQA_OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text: str, options: Sequence[str] = SCIENCEQA_OPTIONS) -> str:
    """The option letter LLaVA's ``eval_science_qa.py`` reads from an output, or ``"FAILED"``.

    In order: the whole text is one of ``options``; the text starts with ``"<option>. "``; the
    pattern ``The answer is ([A-Z]).`` (any character after the letter, so a bare trailing
    ``"The answer is B"`` does not match) occurs exactly once; otherwise ``"FAILED"``. No
    stripping or case folding (LLaVA's outputs are already stripped).
    """
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return "FAILED"


def scienceqa_correct(letter: str, num_choices: int, answer_index: int,
                      options: Sequence[str] = SCIENCEQA_OPTIONS) -> bool:
    """Whether a parsed letter is right: it must be among the first ``num_choices`` options and
    its index must equal the problem's ``answer`` index ("FAILED" and out-of-range letters are
    wrong)."""
    valid = list(options[:num_choices])
    return letter in valid and valid.index(letter) == answer_index


# ----------------------------------------------------------------------------------------------
# MMBench (MMBench / VLMEvalKit CircularEval, rule-based matching only)

MMBENCH_CIRCULAR_OFFSET = 1_000_000
_MMBENCH_SEPARATORS = ".()[],:;!*#{}"


def mmbench_extract_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The option a free-form MMBench answer picks, by MMBench's rule-based matching; None if the
    rules cannot tell (the official evaluator would then ask ChatGPT; here it counts as wrong).

    1. Replace each of ``.()[],:;!*#{}`` by a space and split on whitespace. If exactly one of the
       option letters occurs as a whole token, that letter - unless it is ``"A"`` in an answer of
       more than 3 tokens, where "A" may be the article (then go to 2).
    2. Otherwise, if exactly one option's text occurs (case-insensitive substring) in the answer,
       that option's letter.

    Args:
      text: the model's answer.
      options: letter -> option text of the copy that was asked, e.g. ``{"A": "cat", "B": "dog"}``.
    """
    cleaned = text
    for c in _MMBENCH_SEPARATORS:
        cleaned = cleaned.replace(c, " ")
    tokens = cleaned.split()
    letters = [ch for ch in options if ch in tokens]
    if len(letters) == 1 and not (letters[0] == "A" and len(tokens) > 3):
        return letters[0]
    lowered = text.lower()
    hits = [ch for ch, opt in options.items() if str(opt).lower() in lowered]
    if len(hits) == 1:
        return hits[0]
    return None


def mmbench_circular_scores(
        rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """MMBench CircularEval over answered copies.

    Args:
      rows: one mapping per copy (a TSV row, or a rotation of a question): ``index`` (int),
        ``answer`` (its correct letter), ``prediction`` (the extracted letter, None = unparsed, or
        the key absent = not answered), ``category`` and ``l2_category`` (optional strings).

    A question is the group of copies with the same ``index % 1e6``. It is scored when at least one
    copy was answered, and is correct only if every copy of the group was answered and its
    extracted letter equals its answer (a question right in 3 of its 4 rotations scores 0).

    Returns:
      ``accuracy`` (circular, %), ``n`` (questions scored), ``incomplete`` (scored questions with an
      unanswered copy, counted wrong), ``single_pass_accuracy`` (% over the answered main copies,
      index < 1e6, i.e. the non-circular number), ``per_category``, ``per_l2_category``.
    """
    groups: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[int(row["index"]) % MMBENCH_CIRCULAR_OFFSET].append(row)
    per_question = []
    single = []
    incomplete = 0
    for main, copies in sorted(groups.items()):
        answered = [c for c in copies if "prediction" in c]
        if not answered:
            continue
        complete = len(answered) == len(copies)
        incomplete += 0 if complete else 1
        ok = complete and all(c["prediction"] == c["answer"] for c in copies)
        head = next((c for c in copies if int(c["index"]) == main), copies[0])
        per_question.append((1.0 if ok else 0.0, {"category": head.get("category"),
                                                  "l2_category": head.get("l2_category")}))
        for c in answered:
            if int(c["index"]) < MMBENCH_CIRCULAR_OFFSET:
                single.append(1.0 if c["prediction"] == c["answer"] else 0.0)
    out = aggregate_accuracy(per_question)
    out["incomplete"] = incomplete
    out["single_pass_accuracy"] = 100.0 * sum(single) / len(single) if single else None
    return out


# ----------------------------------------------------------------------------------------------
# MME (eval_tool/calculation.py)

MME_PERCEPTION: tuple[str, ...] = ("existence", "count", "position", "color", "posters",
                                   "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation",
                                  "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """MME's answer rule: lower-case; "yes"/"no" if the text is exactly that; else "yes" if "yes"
    occurs in its first 4 characters, else "no" if "no" does, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[tuple[str, str, str, str]]) -> dict[str, Any]:
    """MME scores from ``(subtask, image_key, gold, prediction)`` rows (gold "yes"/"no", prediction
    raw text, parsed with :func:`mme_parse`; gold is lower-cased).

    Per subtask: ``acc`` = fraction of questions right, ``acc_plus`` = fraction of images all of
    whose questions are right, ``score = 100 * (acc + acc_plus)``. ``perception`` / ``cognition``
    are the sums of the subtask scores of :data:`MME_PERCEPTION` / :data:`MME_COGNITION` that have
    rows (``missing_subtasks`` lists those without).

    Raises:
      ValueError: a gold answer that is not yes/no.
    """
    per_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for task, image, gold, pred in records:
        gold = gold.lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"MME gold answer must be yes/no, got {gold!r} ({task}/{image})")
        per_task[task][image].append(mme_parse(pred) == gold)
    subtasks = {}
    for task, images in sorted(per_task.items()):
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        subtasks[task] = {"acc": 100.0 * acc, "acc_plus": 100.0 * acc_plus,
                          "score": 100.0 * (acc + acc_plus), "n": len(answers),
                          "images": len(images)}
    out: dict[str, Any] = {"subtasks": subtasks}
    for name, tasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        out[name] = sum(subtasks[t]["score"] for t in tasks if t in subtasks)
    out["missing_subtasks"] = [t for t in MME_PERCEPTION + MME_COGNITION if t not in subtasks]
    return out
