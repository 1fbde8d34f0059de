"""Hand-worked cases for sea_jax.eval.scoring, from each benchmark's official rules."""
import pytest

from sea_jax.eval import scoring as s

# ----------------------------------------------------------------------------------------------
# VQA normalisation (vqaEval.py processPunctuation / processDigitArticle)


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),          # period stripped, "two" -> "2"
    ("2 dogs", "2 dogs"),
    ("3,000", "3000"),                # digit,digit anywhere: punctuation deleted, not spaced
    ("yes, 3,000!", "yes 3000"),      # ... also the ',' and '!' elsewhere in the text
    ("hi-fi", "hi fi"),               # '-' touches no space: replaced by a space
    ("well - done", "well done"),     # '-' touches a space: deleted (the double space collapses)
    ("3.5 inches", "3.5 inches"),     # a '.' before a digit stays
    ("a.m.", "am"),
    ("a man", "man"),                 # articles a/an/the dropped
    ("The ten apples", "10 apples"),
    ("none", "0"),                    # "none" is a number word in the official map
    ("isnt", "isn't"),                # contractions table
    ("Isnt", "isn't"),                # lower-cased before the table
    ("dont know", "don't know"),
    ("Im", "im"),                     # the table's "Im" key can never match after lower-casing
    ("left/right", "left right"),
    ("  red\tand\nblue ", "red and blue"),
])
def test_vqa_normalize(raw, expected):
    assert s.vqa_normalize(raw) == expected


def test_period_strip_removes_at_most_32_periods():
    # The official call passes re.UNICODE (32) as the count argument of re.sub.
    assert s.process_punctuation("." * 40) == "." * 8


def test_evalai_answer_processor():
    assert s.evalai_answer_processor("Two dogs.") == "2 dogs"
    assert s.evalai_answer_processor("3,000") == "3000"
    assert s.evalai_answer_processor("Yes") == "yes"
    assert s.evalai_answer_processor("What?") == "what"
    # "'s" is split off before punctuation handling (m4c word_tokenize)
    assert s.evalai_answer_processor("The man's hat") == "man 's hat"


# ----------------------------------------------------------------------------------------------
# VQA accuracy


@pytest.mark.parametrize("matches, expected", [
    # 10 humans, `matches` of them gave the predicted answer. Leave-one-out: drop human i, count
    # matches among the other 9, min(count/3, 1), average over the 10 choices of i.
    (0, 0.0),
    # 1 match: dropping the matching human leaves 0 (score 0); dropping one of the 9 others
    # leaves 1 (1/3). (0 + 9 * 1/3) / 10 = 0.3
    (1, 0.3),
    # 2 matches: dropping a matching human leaves 1 -> 1/3 (twice); dropping one of the 8 others
    # leaves 2 -> 2/3 (8 times). (2/3 + 16/3) / 10 = 6/10 = 0.6
    (2, 0.6),
    # 3 matches: 3 * 2/3 + 7 * 1 = 9 -> 0.9
    (3, 0.9),
    # 4 matches: dropping any human leaves >= 3 -> 1 everywhere
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_leave_one_out(matches, expected):
    gts = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert s.vqa_leave_one_out("cat", gts) == pytest.approx(expected)


def test_vqa_leave_one_out_needs_answers():
    with pytest.raises(ValueError):
        s.vqa_leave_one_out("x", [])


def test_vqav2_accuracy_normalises_when_humans_disagree():
    gts = ["two dogs", "2 dogs"] + ["dogs"] * 8
    # prediction and human answers all normalised: "2 dogs" matches 2 humans -> 0.6
    assert s.vqav2_accuracy("Two dogs.", gts) == pytest.approx(0.6)
    assert s.vqav2_accuracy("a dogs", gts) == pytest.approx(1.0)  # "dogs" x8


def test_vqav2_accuracy_unanimous_humans_compare_raw_strings():
    # Official quirk: with all 10 answers identical, nothing is normalised.
    assert s.vqav2_accuracy("Yes", ["yes"] * 10) == 0.0
    assert s.vqav2_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is still cleaned
    # One dissenting human switches normalisation on: "Yes" -> "yes" matches 9 -> 1.0
    assert s.vqav2_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0


def test_textvqa_accuracy():
    gts = ["dakota"] * 3 + ["dakota digital"] * 7
    # "The Dakota." -> "dakota": 3 matches -> 0.9
    assert s.textvqa_accuracy("The Dakota.", gts) == pytest.approx(0.9)
    assert s.textvqa_accuracy("Dakota Digital", gts) == pytest.approx(1.0)
    # human answers are processed too: "Two" == "2"
    assert s.textvqa_accuracy("2", ["Two"] * 2 + ["x"] * 8) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="exactly 10"):
        s.textvqa_accuracy("x", ["x"] * 9)


def test_vizwiz_accuracy():
    assert s.vizwiz_accuracy("Unanswerable.", ["unanswerable"] * 10) == 1.0
    # only the prediction is normalised, human answers are used as given
    assert s.vizwiz_accuracy("two", ["Two"] * 10) == 0.0
    assert s.vizwiz_accuracy("two", ["2"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    # the VizWiz table expands contractions with U+2019
    assert s.vizwiz_accuracy("isnt", ["isn\u2019t"] * 10) == 1.0
    assert s.vizwiz_accuracy("isnt", ["isn't"] * 10) == 0.0


def test_aggregate_accuracy():
    out = s.aggregate_accuracy([(1.0, {"answer_type": "yes/no"}), (0.0, {"answer_type": "yes/no"}),
                                (0.6, {"answer_type": "number"}), (0.3, {"answer_type": None})])
    assert out["accuracy"] == pytest.approx(100 * 1.9 / 4)
    assert out["n"] == 4
    assert out["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 60.0})
    assert out["count_per_answer_type"] == {"yes/no": 2, "number": 1}
    assert s.aggregate_accuracy([])["accuracy"] is None


# ----------------------------------------------------------------------------------------------
# GQA


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"), ("Table", "table"), ("left...", "left"), (" Left. ", "left"),
    ("U.S.", "u.s"),
])
def test_gqa_postprocess(raw, expected):
    assert s.gqa_postprocess(raw) == expected


def test_gqa_scores():
    out = s.gqa_scores([
        ("yes", "yes", "verify", "attr"),
        ("no", "yes", "logical", "obj"),
        ("table", "table", "query", "rel"),
        ("chair", "table", "query", "rel"),
        ("Table", "table", "query", "rel"),   # exact match: case matters (post-process first)
    ])
    assert out["accuracy"] == pytest.approx(40.0)
    assert out["binary"] == pytest.approx(50.0)      # verify right, logical wrong
    assert out["open"] == pytest.approx(100 / 3)     # 1 of 3 "query"
    assert out["per_structural"] == pytest.approx({"logical": 0.0, "query": 100 / 3,
                                                   "verify": 100.0})
    assert out["per_semantic"]["rel"] == pytest.approx(100 / 3)
    assert out["n"] == 5


# ----------------------------------------------------------------------------------------------
# POPE


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("No", "no"),
    ("no.", "no"),
    ("No, there is no dog.", "no"),
    ("There is not a dog in the image.", "no"),
    ("Yes, there is a dog. No cat.", "yes"),   # only the first sentence counts
    ("NO", "yes"),                             # words are case-sensitive: only No / no / not
    ("Not really", "yes"),
    ("Nope", "yes"),
    ("I don't know", "yes"),
    ("There is no.", "no"),
    ("no,", "no"),                             # commas are deleted before splitting
])
def test_pope_parse(text, expected):
    assert s.pope_parse(text) == expected


def test_pope_metrics_hand_table():
    #          0      1     2     3     4      5
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    # TP: 0, 4 -> 2; FP: 1 -> 1; TN: 2, 5 -> 2; FN: 3 -> 1
    m = s.pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_second_table_and_degenerate():
    # TP 3, FP 1, TN 0, FN 1: precision 3/4, recall 3/4 -> f1 3/4; yes ratio 4/5
    m = s.pope_metrics(["yes", "yes", "yes", "yes", "no"], ["yes", "yes", "yes", "no", "yes"])
    assert m["precision"] == pytest.approx(0.75) and m["f1"] == pytest.approx(0.75)
    assert m["yes_ratio"] == pytest.approx(0.8)
    m = s.pope_metrics(["no", "no"], ["yes", "no"])  # no yes predicted: precision has no cases
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5
    with pytest.raises(ValueError):
        s.pope_metrics(["maybe"], ["yes"])
    with pytest.raises(ValueError):
        s.pope_metrics(["yes"], ["yes", "no"])


# ----------------------------------------------------------------------------------------------
# ScienceQA


@pytest.mark.parametrize("text, expected", [
    ("A", "A"),
    ("E", "E"),
    ("B. cat", "B"),                       # "<letter>. " prefix
    ("B.", "FAILED"),                      # too short for the prefix rule, no "The answer is"
    ("The answer is C.", "C"),
    ("Because of x. The answer is D, clearly", "D"),   # '.' in the pattern is any character
    ("The answer is C", "FAILED"),         # nothing after the letter: the pattern needs a char
    ("The answer is A. The answer is B.", "FAILED"),   # two matches
    ("(C)", "FAILED"),
    ("a", "FAILED"),                       # no case folding
    ("F", "FAILED"),                       # not among A-E
])
def test_scienceqa_parse(text, expected):
    assert s.scienceqa_parse(text) == expected


def test_scienceqa_correct():
    assert s.scienceqa_correct("C", num_choices=3, answer_index=2)
    assert not s.scienceqa_correct("B", num_choices=3, answer_index=2)
    assert not s.scienceqa_correct("D", num_choices=3, answer_index=3)   # beyond the choices
    assert not s.scienceqa_correct("FAILED", num_choices=4, answer_index=0)


# ----------------------------------------------------------------------------------------------
# MMBench

OPTS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("The answer is (C).", "C"),
    ("D: fish", "D"),
    ("A", "A"),
    ("A cat sits on the mat", "B"),        # lone "A" in a long answer is an article: text match
    ("B and C", None),                     # two letters, no option text
    ("It is a bird", "C"),                 # no letter token, one option text
    ("cat or dog", None),                  # two option texts
    ("I don't know", None),
])
def test_mmbench_extract_letter(text, expected):
    assert s.mmbench_extract_letter(text, OPTS) == expected


def test_mmbench_circular_three_of_four_rotations_scores_zero():
    off = s.MMBENCH_CIRCULAR_OFFSET
    rows = []
    # question 1: right in rotations 0, 1, 2, wrong in rotation 3
    for k, pred in enumerate(["A", "D", "C", "A"]):
        rows.append({"index": k * off + 1, "answer": ["A", "D", "C", "B"][k], "prediction": pred,
                     "category": "ocr", "l2_category": "perception"})
    # question 2: right in all four rotations
    for k in range(4):
        rows.append({"index": k * off + 2, "answer": "ABCD"[k], "prediction": "ABCD"[k],
                     "category": "ocr", "l2_category": "reasoning"})
    out = s.mmbench_circular_scores(rows)
    assert out["accuracy"] == pytest.approx(50.0)
    assert out["n"] == 2
    assert out["per_l2_category"] == {"perception": 0.0, "reasoning": 100.0}
    assert out["single_pass_accuracy"] == pytest.approx(100.0)   # both rotation-0 copies right
    assert out["incomplete"] == 0


def test_mmbench_circular_unanswered_copy_and_unparsed_answer():
    off = s.MMBENCH_CIRCULAR_OFFSET
    rows = [
        {"index": 5, "answer": "A", "prediction": "A"},
        {"index": off + 5, "answer": "B"},                     # never answered
        {"index": 6, "answer": "A", "prediction": None},       # unparsed -> wrong
        {"index": 7, "answer": "A"},                           # question not answered at all
    ]
    out = s.mmbench_circular_scores(rows)
    assert out["n"] == 2 and out["incomplete"] == 1
    assert out["accuracy"] == 0.0
    assert out["single_pass_accuracy"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------------------
# MME


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes.", "yes"),
    ("There is a dog", "other"), ("Not sure", "no"), ("I think yes", "other"),
])
def test_mme_parse(text, expected):
    assert s.mme_parse(text) == expected


def test_mme_scores():
    out = s.mme_scores([
        ("existence", "img1", "Yes", "Yes"),
        ("existence", "img1", "No", "No"),
        ("existence", "img2", "Yes", "No"),
        ("existence", "img2", "No", "no"),
        ("OCR", "img3", "Yes", "yes"),
        ("OCR", "img3", "No", "no"),
        ("code_reasoning", "img4", "Yes", "maybe"),
        ("code_reasoning", "img4", "No", "No"),
    ])
    # existence: acc 3/4, acc+ 1/2 (only img1 fully right) -> 75 + 50 = 125
    assert out["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert out["subtasks"]["OCR"]["score"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(325.0)
    # code_reasoning: "maybe" is "other" (wrong): acc 1/2, acc+ 0 -> 50
    assert out["cognition"] == pytest.approx(50.0)
    assert "count" in out["missing_subtasks"] and "OCR" not in out["missing_subtasks"]
    with pytest.raises(ValueError):
        s.mme_scores([("OCR", "i", "maybe", "yes")])
