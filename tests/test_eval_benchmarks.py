"""Readers, prompts, writers and the score CLI of sea_jax.eval on a tiny fake data root laid out
like LLaVA-1.5's ``playground/data/eval`` (files in their real formats)."""
import base64
import csv
import json
import os

import pytest

from sea_jax.eval import benchmarks as B
from sea_jax.eval.common import EvalInputError, read_table, write_llava_answers
from sea_jax.eval.score_cli import score_main

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes"


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def _images(d, names):
    for n in names:
        p = os.path.join(d, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(PNG)


def _tsv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
              "source", "l2-category", "comment", "split"]


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "eval")
    # POPE: two categories, question file + POPE label files (per-category order)
    pope_q = [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a snowboard in the image?" + SHORT, "category": "adversarial"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a backpack in the image?" + SHORT, "category": "adversarial"},
        {"question_id": 3, "image": "COCO_val2014_000000210789.jpg",
         "text": "Is there a truck in the image?" + SHORT, "category": "random"},
        {"question_id": 4, "image": "COCO_val2014_000000210789.jpg",
         "text": "Is there a car in the image?" + SHORT, "category": "random"},
    ]
    _jsonl(f"{r}/pope/llava_pope_test.jsonl", pope_q)
    _jsonl(f"{r}/pope/coco/coco_pope_adversarial.json", [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a snowboard in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a backpack in the image?", "label": "no"}])
    _jsonl(f"{r}/pope/coco/coco_pope_random.json", [
        {"question_id": 1, "image": "COCO_val2014_000000210789.jpg",
         "text": "Is there a truck in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000210789.jpg",
         "text": "Is there a car in the image?", "label": "yes"}])
    _images(f"{r}/pope/val2014", ["COCO_val2014_000000310196.jpg",
                                  "COCO_val2014_000000210789.jpg"])
    # GQA
    _jsonl(f"{r}/gqa/llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?" + SHORT,
         "category": "default"},
        {"question_id": "201640614", "image": "n235859.jpg",
         "text": "Who is wearing the dress?" + SHORT, "category": "default"}])
    _images(f"{r}/gqa/data/images", ["n161313.jpg", "n235859.jpg"])
    _json(f"{r}/gqa/data/testdev_balanced_questions.json", {
        "201307251": {"question": "Is it overcast?", "answer": "no", "imageId": "n161313",
                      "isBalanced": True, "types": {"structural": "verify", "semantic": "global",
                                                    "detailed": "weatherVerify"}},
        "201640614": {"question": "Who is wearing the dress?", "answer": "woman",
                      "imageId": "n235859", "isBalanced": True,
                      "types": {"structural": "query", "semantic": "rel",
                                "detailed": "relS"}},
        "999": {"question": "Unbalanced?", "answer": "yes", "imageId": "n1", "isBalanced": False,
                "types": {"structural": "verify", "semantic": "attr", "detailed": "x"}}})
    # TextVQA: question_id is the image id (two questions on one image)
    _jsonl(f"{r}/textvqa/llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL"
                 + SHORT, "category": "default"},
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": "What color is it?\nReference OCR token: DAKOTA, DIGITAL" + SHORT,
         "category": "default"},
        {"question_id": "97b1112b17015396", "image": "97b1112b17015396.jpg",
         "text": "Whats the lowest number yard line that you can see?" + SHORT,
         "category": "default"}])
    _images(f"{r}/textvqa/train_images", ["003a8ae2ef43b901.jpg", "97b1112b17015396.jpg"])
    _json(f"{r}/textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901",
         "question_id": 34602, "answers": ["dakota"] * 3 + ["dakota digital"] * 7},
        {"question": "what color is it?", "image_id": "003a8ae2ef43b901", "question_id": 34603,
         "answers": ["black"] * 10},
        {"question": "whats the lowest number yard line that you can see?",
         "image_id": "97b1112b17015396", "question_id": 34604,
         "answers": ["10"] * 2 + ["ten"] * 2 + ["20"] * 6}]})
    # VQAv2 test-dev + the full test2015 list
    vq = [{"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg",
           "text": "Is the ball flying towards the batter?" + SHORT, "category": "default"},
          {"question_id": 262144001, "image": "COCO_test2015_000000262144.jpg",
           "text": "What sport is this?" + SHORT, "category": "default"}]
    _jsonl(f"{r}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", vq)
    _jsonl(f"{r}/vqav2/llava_vqav2_mscoco_test2015.jsonl", vq + [
        {"question_id": 262144002, "image": "COCO_test2015_000000262144.jpg",
         "text": "Is it sunny?" + SHORT, "category": "default"}])
    _images(f"{r}/vqav2/test2015", ["COCO_test2015_000000262144.jpg"])
    # ScienceQA: one image question, one text-only
    _json(f"{r}/scienceqa/llava_test_CQM-A.json", [
        {"id": "4", "conversations": [
            {"from": "human", "value": "Which figure of speech is used in this text?\nSing, O "
                                       "goddess.\nA. chiasmus\nB. apostrophe"},
            {"from": "gpt", "value": "B"}]},
        {"id": "5", "image": "5/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A parachute test.\nWhich of the "
                                       "following could Gordon's test show?\nA. one\nB. two\n"
                                       "C. three"},
            {"from": "gpt", "value": "B"}]}])
    _images(f"{r}/scienceqa/images/test", ["5/image.png"])
    _json(f"{r}/scienceqa/problems.json", {
        "4": {"question": "Which figure of speech?", "choices": ["chiasmus", "apostrophe"],
              "answer": 1, "image": None, "split": "test"},
        "5": {"question": "Which could Gordon's test show?", "choices": ["one", "two", "three"],
              "answer": 1, "image": "image.png", "split": "test"},
        "6": {"question": "Train only", "choices": ["x", "y"], "answer": 0, "image": None,
              "split": "train"}})
    _json(f"{r}/scienceqa/pid_splits.json", {"train": ["6"], "val": [], "test": ["4", "5"]})
    # MMBench: question 0 (4 options, hint) + its 3 circular copies, question 1 (2 options)
    img = base64.b64encode(PNG).decode()
    rows = [
        [0, "What is shown?", "A photo of a pet.", "dog", "cat", "bird", "fish", "B",
         "object_localization", img, "src", "finegrained_perception", "nan", "dev"],
        [1, "Is it day?", "nan", "yes", "no", "nan", "nan", "A", "scene", img, "src",
         "coarse_perception", "nan", "dev"],
        [1000000, "What is shown?", "A photo of a pet.", "cat", "bird", "fish", "dog", "A",
         "object_localization", img, "src", "finegrained_perception", "nan", "dev"],
        [2000000, "What is shown?", "A photo of a pet.", "bird", "fish", "dog", "cat", "D",
         "object_localization", img, "src", "finegrained_perception", "nan", "dev"],
        [3000000, "What is shown?", "A photo of a pet.", "fish", "dog", "cat", "bird", "C",
         "object_localization", img, "src", "finegrained_perception", "nan", "dev"],
        [1000001, "Is it day?", "nan", "no", "yes", "nan", "nan", "B", "scene", img, "src",
         "coarse_perception", "nan", "dev"],
    ]
    _tsv(f"{r}/mmbench/mmbench_dev_20230712.tsv", MMB_HEADER, rows)
    # VizWiz
    _jsonl(f"{r}/vizwiz/llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg",
         "text": "What is this?\nWhen the provided information is insufficient, respond with "
                 "'Unanswerable'." + SHORT, "category": "default"},
        {"question_id": 1, "image": "VizWiz_test_00000001.jpg",
         "text": "What color is it?\nWhen the provided information is insufficient, respond "
                 "with 'Unanswerable'." + SHORT, "category": "default"}])
    _images(f"{r}/vizwiz/test", ["VizWiz_test_00000000.jpg", "VizWiz_test_00000001.jpg"])
    _json(f"{r}/vizwiz/val.json", [
        {"image": "VizWiz_test_00000000.jpg", "question": "What is this?",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
         "answer_type": "unanswerable", "answerable": 0},
        {"image": "VizWiz_test_00000001.jpg", "question": "What color is it?",
         "answers": [{"answer": "red", "answer_confidence": "yes"}] * 2
         + [{"answer": "blue", "answer_confidence": "yes"}] * 8,
         "answer_type": "other", "answerable": 1}])
    # MM-Vet
    _jsonl(f"{r}/mm-vet/llava-mm-vet.jsonl", [
        {"image": "v1_0.png", "text": "What is x in the equation?", "category": "conv",
         "question_id": 0}])
    _images(f"{r}/mm-vet/images", ["v1_0.png"])
    # MME: a flat subtask (image + txt side by side) and one with images/ + questions_answers_YN/
    _jsonl(f"{r}/MME/llava_mme.jsonl", [
        {"question_id": "existence/000000006040.jpg", "image": "existence/000000006040.jpg",
         "text": "Is there a train in this image?" + SHORT, "category": "existence"},
        {"question_id": "existence/000000006040.jpg", "image": "existence/000000006040.jpg",
         "text": "Is there a bed in this image?" + SHORT, "category": "existence"},
        {"question_id": "artwork/images/14777.jpg", "image": "artwork/images/14777.jpg",
         "text": "Does this artwork belong to the type of religious?" + SHORT,
         "category": "artwork"},
        {"question_id": "artwork/images/14777.jpg", "image": "artwork/images/14777.jpg",
         "text": "Does this artwork belong to the type of historical?" + SHORT,
         "category": "artwork"}])
    mme = f"{r}/MME/MME_Benchmark_release_version"
    _images(mme, ["existence/000000006040.jpg", "artwork/images/14777.jpg"])
    with open(f"{mme}/existence/000000006040.txt", "w") as f:
        f.write("Is there a train in this image? Please answer yes or no.\tYes\n"
                "Is there a bed in this image? Please answer yes or no.\tNo\n")
    os.makedirs(f"{mme}/artwork/questions_answers_YN")
    with open(f"{mme}/artwork/questions_answers_YN/14777.txt", "w") as f:
        f.write("Does this artwork belong to the type of religious? Please answer yes or no.\tYes\n"
                "Does this artwork belong to the type of historical?  Please answer yes or no."
                "\tNo\n")
    return r


# ----------------------------------------------------------------------------------------------
# Prompts and readers


def test_registry_has_the_paper_benchmarks():
    assert {"vqav2", "gqa", "textvqa", "vizwiz", "scienceqa", "pope", "mmbench",
            "mmvet"} <= set(B.BENCHMARKS)
    with pytest.raises(EvalInputError, match="unknown benchmark 'nope'"):
        B.get_benchmark("nope")


def test_jsonl_prompts_are_the_question_files_text(root):
    pope = B.load("pope", root)
    assert [q.question_id for q in pope] == [1, 2, 3, 4]
    assert pope[0].text == ("Is there a snowboard in the image?\n"
                            "Answer the question using a single word or phrase.")
    assert pope[0].image == os.path.join(root, "pope", "val2014", "COCO_val2014_000000310196.jpg")
    assert os.path.isabs(pope[0].image)
    assert pope[2].meta["category"] == "random"
    gqa = B.load("gqa", root, limit=1)
    assert len(gqa) == 1 and gqa[0].question_id == "201307251"
    assert gqa[0].text == "Is it overcast?\nAnswer the question using a single word or phrase."
    assert gqa[0].image.endswith(os.path.join("gqa", "data", "images", "n161313.jpg"))
    tv = B.load("textvqa", root)
    assert tv[0].question_id == "003a8ae2ef43b901"
    assert tv[0].text == ("What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL"
                          "\nAnswer the question using a single word or phrase.")
    viz = B.load("vizwiz", root)
    assert viz[1].text == ("What color is it?\nWhen the provided information is insufficient, "
                           "respond with 'Unanswerable'.\nAnswer the question using a single "
                           "word or phrase.")
    vq = B.load("vqav2", root)
    assert vq[1].text == "What sport is this?\nAnswer the question using a single word or phrase."
    mmvet = B.load("mmvet", root)
    assert mmvet[0].text == "What is x in the equation?"   # natural QA: no suffix
    assert B.BENCHMARKS["mmvet"].max_new_tokens == 1024
    mme = B.load("mme", root)
    assert mme[2].image.endswith(os.path.join("artwork", "images", "14777.jpg"))


def test_scienceqa_prompts(root):
    qs = B.load("scienceqa", root)
    text_only, with_image = qs
    assert text_only.image is None
    assert text_only.text == ("Which figure of speech is used in this text?\nSing, O goddess.\n"
                              "A. chiasmus\nB. apostrophe\n"
                              "Answer with the option's letter from the given choices directly.")
    assert text_only.meta["prompt"] == text_only.text
    assert with_image.image == os.path.join(root, "scienceqa", "images", "test", "5",
                                            "image.png")
    assert with_image.text == ("Context: A parachute test.\nWhich of the following could Gordon's"
                               " test show?\nA. one\nB. two\nC. three\n"
                               "Answer with the option's letter from the given choices directly.")
    assert with_image.meta["prompt"] == "<image>\n" + with_image.text
    assert with_image.meta["answer"] == "B"
    assert [q.question_id for q in B.load("scienceqa", root, image_only=True)] == ["5"]
    assert B.load("scienceqa", root, limit=0) == []


def test_mmbench_prompts_and_circular_copies(root):
    qs = B.load("mmbench", root, image_cache_dir=os.path.join(root, "cache"))
    assert [q.question_id for q in qs] == [0, 1, 1000000, 2000000, 3000000, 1000001]
    q0 = qs[0]
    assert q0.text == ("A photo of a pet.\nWhat is shown?\nA. dog\nB. cat\nC. bird\nD. fish\n"
                       "Answer with the option's letter from the given choices directly.")
    assert q0.meta["prompt"] == ("A photo of a pet.\nWhat is shown?\nA. dog\nB. cat\nC. bird\n"
                                 "D. fish")
    # "nan" hint is skipped; options stop at the first empty one
    assert qs[1].text == ("Is it day?\nA. yes\nB. no\n"
                          "Answer with the option's letter from the given choices directly.")
    assert qs[1].meta["answer_fields"] == {"round_id": 0, "options": ["yes", "no"],
                                           "option_char": ["A", "B"]}
    assert qs[2].text.startswith("A photo of a pet.\nWhat is shown?\nA. cat\nB. bird\n")
    assert qs[2].meta["main_index"] == 0 and qs[2].meta["answer"] == "A"
    with open(q0.image, "rb") as f:
        assert f.read() == PNG
    assert q0.image.endswith(".png") and q0.image == qs[1].image   # one file per distinct image
    # limit counts questions, and keeps all their copies
    assert [q.question_id for q in B.load("mmbench", root, limit=1,
                                          image_cache_dir=os.path.join(root, "cache"))] == [
        0, 1000000, 2000000, 3000000]


def test_mmbench_rotates_when_the_tsv_has_no_copies(root, tmp_path):
    img = base64.b64encode(PNG).decode()
    path = str(tmp_path / "plain.tsv")
    _tsv(path, MMB_HEADER, [[7, "Q?", "nan", "w", "x", "y", "nan", "C", "cat", img, "s", "l2",
                             "nan", "dev"]])
    qs = B.load("mmbench", root, question_file=path)
    # 3 options -> 3 rotations, LLaVA's --all-rounds order; the answer letter follows "y"
    assert [(q.question_id, q.meta["index"], q.meta["answer"]) for q in qs] == [
        (7, 7, "C"), (7, 1000007, "B"), (7, 2000007, "A")]
    assert [q.meta["answer_fields"]["round_id"] for q in qs] == [0, 1, 2]
    assert qs[1].text == "Q?\nA. x\nB. y\nC. w\n" + LETTER[1:]
    # score LLaVA all-rounds answers (question_id + round_id): right in rounds 0, 1 only -> 0
    answers = ["C", "B", "B"]
    preds = tmp_path / "a.jsonl"
    write_llava_answers(str(preds), qs, answers)
    out = B.score("mmbench", str(preds), path)
    assert out["accuracy"] == 0.0 and out["n"] == 1 and out["single_pass_accuracy"] == 100.0
    write_llava_answers(str(preds), qs, ["C", "B", "A"])
    assert B.score("mmbench", str(preds), path)["accuracy"] == 100.0


# ----------------------------------------------------------------------------------------------
# Bad input


def test_missing_files_are_named(root):
    os.remove(f"{root}/gqa/llava_gqa_testdev_balanced.jsonl")
    with pytest.raises(EvalInputError, match="llava_gqa_testdev_balanced.jsonl does not exist"):
        B.load("gqa", root)
    os.remove(f"{root}/pope/val2014/COCO_val2014_000000210789.jpg")
    with pytest.raises(EvalInputError, match=r"llava_pope_test.jsonl line 3: image .*"
                                             r"COCO_val2014_000000210789.jpg does not exist"):
        B.load("pope", root)
    assert len(B.load("pope", root, check_images=False)) == 4
    with pytest.raises(EvalInputError, match=r"vizwiz image directory .*nowhere does not exist"):
        B.load("vizwiz", root, image_dir="nowhere")
    with pytest.raises(EvalInputError, match="mmbench TSV .*missing.tsv does not exist"):
        B.load("mmbench", root, question_file="mmbench/missing.tsv")


def test_malformed_question_files_name_line_and_field(root):
    path = f"{root}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"
    with open(path, "a") as f:
        f.write('{"question_id": 5, "image": "x.jpg"\n')
    with pytest.raises(EvalInputError, match=r"test-dev2015.jsonl: line 3 is not valid JSON"):
        B.load("vqav2", root)
    _jsonl(path, [{"question_id": 5, "image": "COCO_test2015_000000262144.jpg"}])
    with pytest.raises(EvalInputError, match=r"line 1: missing field 'text'"):
        B.load("vqav2", root)
    _jsonl(path, [{"question_id": 5, "image": 7, "text": "q"}])
    with pytest.raises(EvalInputError, match=r"line 1: field 'image' must be str, got int"):
        B.load("vqav2", root)
    with open(f"{root}/mmbench/mmbench_dev_20230712.tsv", "a") as f:
        f.write("9\tonly three\tcells\n")
    with pytest.raises(EvalInputError, match=r"line 8 has 3 tab-separated cells"):
        B.load("mmbench", root)


def test_pope_label_files_must_match_the_question_file(root):
    _jsonl(f"{root}/pope/coco/coco_pope_random.json", [
        {"question_id": 1, "image": "COCO_val2014_000000210789.jpg",
         "text": "Is there a truck in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000999999.jpg",
         "text": "Is there a car in the image?", "label": "yes"}])
    with pytest.raises(EvalInputError, match=r"coco_pope_random.json line 2: does not match "
                                             r"question_id 4"):
        B.score("pope", [{"question_id": 1, "text": "Yes"}], f"{root}/pope")
    os.remove(f"{root}/pope/coco/coco_pope_random.json")
    with pytest.raises(EvalInputError, match=r"category 'random'.*coco_pope_random.json does not"
                                             r" exist"):
        B.score("pope", [{"question_id": 1, "text": "Yes"}], f"{root}/pope")


# ----------------------------------------------------------------------------------------------
# Writers


def test_llava_answers_file(root, tmp_path):
    qs = B.load("scienceqa", root)
    path = write_llava_answers(str(tmp_path / "a" / "sqa.jsonl"), qs, ["B", "The answer is B."],
                               model_id="sea-7b")
    lines = _lines(path)
    assert list(lines[1]) == ["question_id", "prompt", "text", "answer_id", "model_id",
                              "metadata"]
    assert lines[1]["question_id"] == "5" and lines[1]["prompt"].startswith("<image>\n")
    assert lines[1]["model_id"] == "sea-7b" and lines[1]["metadata"] == {}
    mmb = B.load("mmbench", root, limit=1)
    write_llava_answers(str(tmp_path / "m.jsonl"), mmb, ["B", "A", "D", "C"])
    line = _lines(tmp_path / "m.jsonl")[0]
    assert list(line)[:6] == ["question_id", "round_id", "prompt", "text", "options",
                              "option_char"]
    with pytest.raises(EvalInputError, match="1 answers for 2 questions"):
        write_llava_answers(str(tmp_path / "x.jsonl"), qs, ["B"])


def test_official_submission_files(root, tmp_path):
    vq = B.load("vqav2", root)
    path = B.BENCHMARKS["vqav2"].write_submission(
        str(tmp_path / "vqav2.json"), vq, ["Yes.", "Two"],
        full_question_file=f"{root}/vqav2/llava_vqav2_mscoco_test2015.jsonl")
    assert _load(path) == [{"question_id": 262144000, "answer": "yes"},
                                     {"question_id": 262144001, "answer": "2"},
                                     {"question_id": 262144002, "answer": ""}]
    gqa = B.load("gqa", root)
    path = B.BENCHMARKS["gqa"].write_submission(str(tmp_path / "gqa.json"), gqa, ["No.", "Woman"])
    assert _load(path) == [{"questionId": "201307251", "prediction": "no"},
                                     {"questionId": "201640614", "prediction": "woman"}]
    viz = B.load("vizwiz", root)
    path = B.BENCHMARKS["vizwiz"].write_submission(str(tmp_path / "viz.json"), viz,
                                                   ["Unanswerable", "The red one."])
    assert _load(path) == [{"image": "VizWiz_test_00000000.jpg",
                                      "answer": "unanswerable"},
                                     # number words become digits, "the" is dropped
                                     {"image": "VizWiz_test_00000001.jpg", "answer": "red 1"}]
    mmvet = B.load("mmvet", root)
    path = B.BENCHMARKS["mmvet"].write_submission(str(tmp_path / "mmvet.json"), mmvet, ["x = 3"])
    assert _load(path) == {"v1_0": "x = 3"}


def test_mmbench_submission_table(root, tmp_path):
    qs = B.load("mmbench", root)
    out = B.BENCHMARKS["mmbench"].write_submission(str(tmp_path / "up" / "sea.xlsx"), qs,
                                                   ["B", "A", "A", "D", "C", "B"])
    try:
        import openpyxl  # noqa: F401
        assert out.endswith(".xlsx")
    except ImportError:
        assert out == str(tmp_path / "up" / "sea.tsv")
    header, rows = read_table(out, "submission")
    # LLaVA's layout: TSV columns minus hint/category/source/image/comment/l2-category, with
    # "prediction" inserted at position 6
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[0][1] == ["0", "What is shown?", "dog", "cat", "bird", "fish", "B", "B", "dev"]
    assert rows[1][1][:7] == ["1", "Is it day?", "yes", "no", "", "", "A"]


# ----------------------------------------------------------------------------------------------
# Scoring: end to end through the CLI, official formats


def _run(capsys, *args):
    rc = score_main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_vqav2_official_results(root, tmp_path, capsys):
    ann = tmp_path / "ann.json"
    _json(str(ann), {"annotations": [
        {"question_id": 262144000, "answer_type": "yes/no", "question_type": "is the",
         "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1}
                     for i in range(10)]},
        {"question_id": 262144001, "answer_type": "other", "question_type": "what sport is",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in
                     enumerate(["baseball"] * 2 + ["softball"] * 8)]}]})
    preds = tmp_path / "res.json"
    _json(str(preds), [{"question_id": 262144000, "answer": "yes"},
                       {"question_id": 262144001, "answer": "Baseball."}])
    rc, out, err = _run(capsys, "score", "--benchmark=vqav2", f"--predictions={preds}",
                        f"--annotations={ann}", f"--out={tmp_path / 'scores.json'}")
    assert rc == 0, err
    scores = json.loads(out)["scores"]
    # q1: exact "yes" -> 1; q2: humans disagree -> normalised "baseball" matches 2 -> 0.6
    assert scores["accuracy"] == pytest.approx(80.0)
    assert scores["per_answer_type"] == pytest.approx({"other": 60.0, "yes/no": 100.0})
    assert scores["missing"] == 0
    assert _load(tmp_path / "scores.json")["scores"]["accuracy"] == pytest.approx(80.0)


def test_cli_gqa_and_llava_answers_agree(root, tmp_path, capsys):
    ann = B.BENCHMARKS["gqa"].default_annotations(root)
    preds = tmp_path / "testdev_balanced_predictions.json"
    _json(str(preds), [{"questionId": "201307251", "prediction": "no"},
                       {"questionId": "201640614", "prediction": "man"}])
    rc, out, err = _run(capsys, "--benchmark=gqa", f"--predictions={preds}",
                        f"--annotations={ann}")
    assert rc == 0, err
    s = json.loads(out)["scores"]
    assert (s["accuracy"], s["binary"], s["open"], s["missing"]) == (50.0, 100.0, 0.0, 0)
    qs = B.load("gqa", root)
    write_llava_answers(str(tmp_path / "a.jsonl"), qs, ["No.", "Woman"])
    assert B.score("gqa", str(tmp_path / "a.jsonl"), data_root=root)["accuracy"] == 100.0


def test_cli_textvqa_llava_answers_matched_by_prompt(root, tmp_path, capsys):
    qs = B.load("textvqa", root)
    preds = str(tmp_path / "textvqa.jsonl")
    write_llava_answers(preds, qs, ["The Dakota.", "black", "Ten"])
    rc, out, err = _run(capsys, "--benchmark=textvqa", f"--predictions={preds}",
                        f"--annotations={root}/textvqa/TextVQA_0.5.1_val.json")
    assert rc == 0, err
    # "The Dakota." -> "dakota": 3 humans -> 0.9; "black": 10 humans -> 1.0; "Ten" -> "10",
    # and the human "10" x2 and "ten" x2 all normalise to "10": 4 matches -> 1.0
    s = json.loads(out)["scores"]
    assert s["accuracy"] == pytest.approx(100 * (0.9 + 1.0 + 1.0) / 3)
    assert s["n"] == 3 and s["missing"] == 0
    # the official-id form scores the same
    official = [{"question_id": 34602, "answer": "The Dakota."},
                {"question_id": 34603, "answer": "black"}]
    assert B.score("textvqa", official, f"{root}/textvqa/TextVQA_0.5.1_val.json")[
        "accuracy"] == pytest.approx(95.0)


def test_cli_pope(root, tmp_path, capsys):
    qs = B.load("pope", root)
    preds = str(tmp_path / "pope.jsonl")
    write_llava_answers(preds, qs, ["Yes", "No, there is not.", "Yes", "There is no car."])
    rc, out, err = _run(capsys, "--benchmark=pope", f"--predictions={preds}",
                        f"--annotations={root}/pope")
    assert rc == 0, err
    s = json.loads(out)["scores"]
    # adversarial: yes/yes, no/no -> all right; random: yes/yes, no/yes -> TP 1, FN 1
    assert s["adversarial"]["accuracy"] == 100.0 and s["adversarial"]["f1"] == 100.0
    assert s["random"]["accuracy"] == 50.0 and s["random"]["precision"] == 100.0
    assert s["random"]["recall"] == 50.0 and s["random"]["f1"] == pytest.approx(200 / 3)
    assert s["random"]["yes_ratio"] == 50.0
    assert s["mean"]["f1"] == pytest.approx((100 + 200 / 3) / 2)
    # the coco label directory itself works too (LLaVA's --annotation-dir)
    assert B.score("pope", preds, f"{root}/pope/coco")["random"]["tp"] == 1


def test_cli_scienceqa(root, tmp_path, capsys):
    preds = tmp_path / "sqa.jsonl"
    _jsonl(str(preds), [{"question_id": "4", "prompt": "p", "text": "A"},
                        {"question_id": "5", "prompt": "<image>\np", "text": "The answer is B."}])
    rc, out, err = _run(capsys, "--benchmark=scienceqa", f"--predictions={preds}",
                        f"--annotations={root}/scienceqa/problems.json")
    assert rc == 0, err
    s = json.loads(out)["scores"]
    assert (s["accuracy"], s["img_accuracy"], s["n"], s["n_img"]) == (50.0, 100.0, 2, 1)


def test_cli_mmbench_submission_table(root, tmp_path, capsys):
    qs = B.load("mmbench", root)
    # question 0: right in rotations 0, 1, 2 but wrong in rotation 3 -> 0
    # question 1: right in both rotations -> 1
    table = B.BENCHMARKS["mmbench"].write_submission(
        str(tmp_path / "sea.xlsx"), qs, ["B", "A", "A", "D", "B", "The answer is B"])
    rc, out, err = _run(capsys, "--benchmark=mmbench", f"--predictions={table}",
                        f"--annotations={root}/mmbench/mmbench_dev_20230712.tsv")
    assert rc == 0, err
    s = json.loads(out)["scores"]
    assert s["accuracy"] == 50.0 and s["n"] == 2 and s["missing"] == 0
    assert s["per_category"] == {"object_localization": 0.0, "scene": 100.0}
    assert s["single_pass_accuracy"] == 100.0


def test_cli_vizwiz(root, tmp_path, capsys):
    preds = tmp_path / "viz.json"
    _json(str(preds), [{"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
                       {"image": "VizWiz_test_00000001.jpg", "answer": "red"}])
    rc, out, err = _run(capsys, "--benchmark=vizwiz", f"--predictions={preds}",
                        f"--annotations={root}/vizwiz/val.json")
    assert rc == 0, err
    s = json.loads(out)["scores"]
    assert s["accuracy"] == pytest.approx(80.0)   # 1.0 and 0.6 (2 humans said red)
    assert s["per_answer_type"] == pytest.approx({"other": 60.0, "unanswerable": 100.0})
    # LLaVA's answers file needs the question file to find the images
    llava = str(tmp_path / "viz.jsonl")
    write_llava_answers(llava, B.load("vizwiz", root), ["Unanswerable.", "Blue"])
    rc, out, err = _run(capsys, "--benchmark=vizwiz", f"--predictions={llava}",
                        f"--annotations={root}/vizwiz/val.json")
    assert rc == 2 and "--questions" in err
    rc, out, err = _run(capsys, "--benchmark=vizwiz", f"--predictions={llava}",
                        f"--annotations={root}/vizwiz/val.json",
                        f"--questions={root}/vizwiz/llava_test.jsonl")
    assert rc == 0, err
    assert json.loads(out)["scores"]["accuracy"] == pytest.approx(100.0)


def test_cli_mme(root, tmp_path, capsys):
    qs = B.load("mme", root)
    preds = str(tmp_path / "mme.jsonl")
    write_llava_answers(preds, qs, ["Yes", "Yes", "Yes", "No"])
    rc, out, err = _run(capsys, "--benchmark=mme", f"--predictions={preds}",
                        f"--annotations={root}/MME/MME_Benchmark_release_version")
    assert rc == 0, err
    s = json.loads(out)["scores"]
    # existence: 1 of 2 right, image not fully right -> 50; artwork (double-space GT line) -> 200
    assert s["subtasks"]["existence"]["score"] == pytest.approx(50.0)
    assert s["subtasks"]["artwork"]["score"] == pytest.approx(200.0)
    assert s["perception"] == pytest.approx(250.0)


def test_cli_bad_input_exits_2_with_one_line(root, tmp_path, capsys):
    ann = f"{root}/gqa/data/testdev_balanced_questions.json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "201307251", "text": "no"}\n{"question_id": 12\n')
    rc, out, err = _run(capsys, "--benchmark=gqa", f"--predictions={bad}", f"--annotations={ann}")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "bad.jsonl: line 2 is not valid JSON" in err

    unknown = tmp_path / "unknown.json"
    _json(str(unknown), [{"questionId": "42", "prediction": "no"}])
    rc, _, err = _run(capsys, "--benchmark=gqa", f"--predictions={unknown}",
                      f"--annotations={ann}")
    assert rc == 2 and "item 0: question 42 is not in the GQA questions" in err

    vqa_ann = tmp_path / "vqa_ann.json"
    _json(str(vqa_ann), {"annotations": [{"question_id": 262144000, "answer_type": "yes/no",
                                          "answers": [{"answer": "yes"}] * 10}]})
    nofield = tmp_path / "nofield.json"
    _json(str(nofield), [{"question_id": 262144000, "answr": "yes"}])
    rc, _, err = _run(capsys, "--benchmark=vqav2", f"--predictions={nofield}",
                      f"--annotations={vqa_ann}")
    assert rc == 2 and "nofield.json item 0: missing field 'answer' (or 'text'" in err
    rc, _, err = _run(capsys, "--benchmark=vqav2", f"--predictions={nofield}",
                      f"--annotations={ann}")   # GQA's questions are not VQA annotations
    assert rc == 2 and "expected a list under 'annotations'" in err

    rc, _, err = _run(capsys, "--benchmark=gqa", f"--predictions={tmp_path / 'nope.json'}",
                      f"--annotations={ann}")
    assert rc == 2 and "nope.json does not exist" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "--benchmark=nope", f"--predictions={unknown}",
                      f"--annotations={ann}")
    assert rc == 2 and "unknown benchmark 'nope'" in err
    rc, _, err = _run(capsys, "--benchmark=gqa", f"--predictions={unknown}")
    assert rc == 2 and "--annotations is required" in err
    rc, _, err = _run(capsys, "--benchmark=gqa")
    assert rc == 2 and "--predictions" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "--benchmark=mmvet", f"--predictions={unknown}")
    assert rc == 2 and "GPT-4" in err


def test_duplicate_and_missing_field_predictions(root, tmp_path):
    ann = f"{root}/gqa/data/testdev_balanced_questions.json"
    dup = [{"questionId": "201307251", "prediction": "no"},
           {"questionId": "201307251", "prediction": "yes"}]
    with pytest.raises(EvalInputError, match="item 1: a second prediction for question "
                                             "'201307251'"):
        B.score("gqa", dup, ann)
    with pytest.raises(EvalInputError, match=r"item 0: missing field 'answer' \(or 'text'"):
        B.score("scienceqa", [{"question_id": "4"}], f"{root}/scienceqa/problems.json")
    with pytest.raises(EvalInputError, match="question_id 6 is not a 'test' problem"):
        B.score("scienceqa", [{"question_id": "6", "answer": "A"}],
                f"{root}/scienceqa/problems.json")


def test_every_benchmark_reads_and_scores_from_a_bucket(root, tmp_path, gcs, monkeypatch):
    """The eval folder in a bucket (the local GCS emulator): every benchmark loads the same
    questions as from the local folder, with its images as gs:// paths (checked by one listing per
    image folder), and scores the same against the bucket's annotations."""
    from sea_jax import storage

    monkeypatch.setenv("SEA_JAX_CACHE_DIR", str(tmp_path / "cache"))  # MMBench's TSV: a local copy
    g = f"gs://{gcs.bucket}/eval_data_{os.getpid()}"
    storage.copytree(root, g)
    scored = []
    for name in sorted(B.BENCHMARKS):
        local, remote = B.load(name, root), B.load(name, g)
        assert [(q.question_id, q.text) for q in remote] == [(q.question_id, q.text) for q in local], name
        for a, b in zip(local, remote):
            if a.image is None:
                assert b.image is None
            elif name == "mmbench":  # decoded from the TSV's cells, next to its local copy
                assert open(a.image, "rb").read() == open(b.image, "rb").read()
            else:
                assert b.image == g + a.image[len(root):].replace(os.sep, "/"), name
                assert storage.read_bytes(b.image) == open(a.image, "rb").read()
        try:
            ann_local, ann_remote = B.get_benchmark(name).default_annotations(root), \
                B.get_benchmark(name).default_annotations(g)
        except EvalInputError:
            continue
        if not os.path.exists(ann_local):
            continue  # a test split: the official server scores it
        preds = str(tmp_path / f"{name}.jsonl")
        write_llava_answers(preds, local, ["Yes"] * len(local))
        assert ann_remote.startswith("gs://")
        bench, rel = B.get_benchmark(name), B.get_benchmark(name).question_file
        want = bench.score(preds, ann_local, os.path.join(root, rel))
        assert bench.score(preds, ann_remote, f"{g}/{rel}") == want, name
        scored.append(name)
    assert set(scored) == {"pope", "gqa", "textvqa", "vizwiz", "scienceqa", "mmbench", "mme"}
    # a missing image is named, with its gs:// path
    img = B.load("pope", root)[0].image
    storage.remove(g + img[len(root):].replace(os.sep, "/"))
    with pytest.raises(EvalInputError, match=r"image gs://.*COCO_val2014_000000310196.jpg does not exist"):
        B.load("pope", g)
