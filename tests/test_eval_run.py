"""``sea_jax.eval`` with a model: batched greedy answers equal unbatched ones and HF ``generate``
on the exported folder, on a mesh; the CLI end to end on a tiny trained workdir with every
benchmark's files; the in-loop evaluation's numbers against direct computations."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llava_testlib as lib
from sea_jax import sharding
from sea_jax.eval.common import Question
from test_eval_benchmarks import root as fake_root  # noqa: F401 - the fake LLaVA eval folder
from test_train import _args, _env, _run, assets  # noqa: F401 - tiny HF models, tokenizer, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 12


@pytest.fixture
def root(fake_root):  # noqa: F811
    """The fake eval folder with every image a real (small, random) picture."""
    import base64
    import io

    for d, _, files in os.walk(fake_root):
        for i, f in enumerate(files):
            if f.endswith((".jpg", ".png")):
                lib.random_image(width=12 + i, height=14, seed=i).save(os.path.join(d, f), format="PNG")
    buf = io.BytesIO()
    lib.random_image(seed=7).save(buf, format="PNG")
    tsv = os.path.join(fake_root, "mmbench", "mmbench_dev_20230712.tsv")
    fake = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"fake image bytes").decode()
    with open(tsv) as f:
        text = f.read()
    with open(tsv, "w") as f:
        f.write(text.replace(fake, base64.b64encode(buf.getvalue()).decode()))
    return fake_root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    _, _, _, out, _ = lib.trained_export(tmp_path_factory.mktemp("evalgen"))
    return out


def _questions(tmp_path, n=5):
    qs = []
    texts = ["what is in the image?", "how many birds are there?", "describe the picture in detail",
             "what is in the image? answer the question using a single word or phrase.", "blue sky?"]
    for i in range(n):
        path = str(tmp_path / f"q{i}.png")
        lib.random_image(width=13 + 3 * i, height=19 - i, seed=30 + i).save(path)
        qs.append(Question(i, path if i != 2 else None, texts[i % len(texts)], {"prompt": texts[i % len(texts)]}))
    return qs


def _hf_answers(folder, questions):
    """transformers: the processor and greedy ``generate`` with the folder's generation config."""
    import copy

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    out = []
    for q in questions:
        content = ([{"type": "image"}] if q.image else []) + [{"type": "text", "text": q.text}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        if q.image:
            inputs = proc(images=Image.open(q.image), text=text, return_tensors="pt")
        else:
            inputs = proc.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        g = copy.deepcopy(hf.generation_config)
        g.max_new_tokens, g.do_sample = N, False
        with torch.no_grad():
            ids = hf.generate(**inputs, generation_config=g)[0, inputs["input_ids"].shape[1]:]
        out.append(proc.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def test_batched_equals_unbatched_equals_hf_generate(exported, tmp_path):
    from sea_jax.eval.run import Answerer, EvalModel, length_batches

    questions = _questions(tmp_path)
    alone = Answerer(EvalModel.from_hf(exported, dtype="float32"), None, batch_size=1).answer(questions, N)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    on_mesh = EvalModel.from_hf(exported, mesh=mesh, dtype="float32")
    batched = Answerer(on_mesh, mesh, batch_size=4, length_multiple=16).answer(questions, N)
    assert batched == alone
    assert alone == _hf_answers(exported, questions)
    assert any(a for a in alone)  # something was generated
    # prompts of similar length travel together, longest first
    assert length_batches([3, 9, 5, 9, 1], 2) == [[1, 3], [2, 0], [4]]


def test_in_loop_evaluation_numbers(assets, root, tmp_path):  # noqa: F811
    """The in-loop metrics on a tiny model equal direct computations: the held-out LM loss summed
    per sample, the probe's accuracy through sea_jax.align.recall on the host, and the benchmark
    score of the same answers through the score function."""
    import ml_collections

    from sea_jax import builder
    from sea_jax.align import recall
    from sea_jax.align import semantic_labels as L
    from sea_jax.config import base_config
    from sea_jax.eval import benchmarks
    from sea_jax.eval.inloop import InLoopEval
    from sea_jax.models.mllm import MLLM, lm_loss

    spec = __import__("importlib").util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    mod = __import__("importlib").util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.llm.checkpoint, c.vision.checkpoint = assets["llm"], assets["siglip"]
    c.labels.word_list, c.labels.cache_dir = assets["words"], str(assets["root"] / "word_cache")
    c.data.json, c.data.image_root = assets["clean"], assets["images"]
    c.eval.update(heldout_json=assets["clean"], heldout_samples=10, probe_images=6, benchmark="pope",
                  data_root=root, benchmark_samples=4, batch_size=8, max_new_tokens=3)
    assert isinstance(c, ml_collections.ConfigDict) and base_config().eval.every == 0
    mesh = sharding.make_mesh({"data": 8})
    tok = builder.load_llm_tokenizer(c)
    sources = builder.read_sources(c, tok)
    mcfg = builder.model_config(c, sources)
    vision = builder.load_vision(c, mcfg.vision, mesh)
    params = builder.load_params(c, sources, mcfg, mesh, vision=vision[0])
    tables = builder.sea_tables(c, mcfg, tok, params["llm"]["embedder"]["embedding"], mesh, None, vision)
    ev = InLoopEval(c, mcfg, tok, mesh, str(tmp_path / "run"))
    got = ev(3, params, tables)

    host = jax.tree.map(np.asarray, params)
    mllm = MLLM(mcfg)
    total = count = 0
    for e, img in ev.rows[:10]:
        ids = jnp.asarray(e.input_ids)[None]
        out = mllm(host, jnp.asarray(img)[None], ids, jnp.ones_like(ids, bool))
        mean, n = lm_loss(out.logits, ids, jnp.asarray(e.loss_mask)[None])
        total, count = total + float(mean) * int(n), count + int(n)
    assert got["eval/lm_tokens"] == count
    np.testing.assert_allclose(got["eval/lm_loss"], total / count, rtol=1e-5)

    images = np.stack([img for _, img in ev.rows if img is not None][:6])
    enc = mllm.encode_images(host["vision"], jnp.asarray(images))
    tokens = np.asarray(mllm.visual_tokens(host["adapter"], enc)).reshape(-1, mcfg.llm.hidden)
    rec = recall.recall_words(tokens, np.asarray(tables["label_table"]))
    ids, _, valid = L.top_labels(enc.patch_embeds, tables["word_table"], n=int(c.labels.top_n))
    want = recall.alignment_accuracy(rec.reshape(6, -1), np.asarray(ids), np.asarray(valid))
    assert got["eval/label_accuracy"] == pytest.approx(want)

    answers = os.path.join(tmp_path, "run", "eval", "step_3", "pope", "answers.jsonl")
    scores = benchmarks.score("pope", answers, os.path.join(root, "pope"))
    assert got["eval/pope"] == pytest.approx(scores["mean"]["f1"]) and len(open(answers).readlines()) == 4


def test_eval_cli_end_to_end(assets, root, tmp_path, gcs):  # noqa: F811
    wd = tmp_path / "run"
    _run(_args(assets, wd, 1, **{"train.num_steps": 2, "train.checkpoint_every": 0}), tmp_path / "train.log")
    names = ["pope", "gqa", "textvqa", "vqav2", "vizwiz", "scienceqa", "mmbench", "mmvet", "mme"]
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, "-m", "sea_jax.eval", f"--workdir={wd}", f"--benchmarks={','.join(names)}",
                        f"--data_root={root}", f"--out={out}", "--max_new_tokens=3", "--batch_size=8"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    scores = json.load(open(out / "scores.json"))
    assert sorted(scores) == sorted(names)
    for name in names:
        lines = [json.loads(x) for x in open(out / name / "answers.jsonl")]
        assert len(lines) == scores[name]["questions"] > 0
        assert all({"question_id", "prompt", "text", "answer_id", "model_id"} <= set(x) for x in lines)
    # the official formats
    vq = json.load(open(out / "vqav2" / scores["vqav2"]["submission"].split("/")[-1]))
    assert {x["question_id"] for x in vq} == {262144000, 262144001, 262144002} and all("answer" in x for x in vq)
    viz = json.load(open(scores["vizwiz"]["submission"]))
    assert {x["image"] for x in viz} == {"VizWiz_test_00000000.jpg", "VizWiz_test_00000001.jpg"}
    assert set(json.load(open(scores["mmvet"]["submission"]))) == {"v1_0"}
    assert open(scores["mmbench"]["submission"]).readline().split("\t")[0] == "index"
    gqa = json.load(open(scores["gqa"]["submission"]))
    assert {x["questionId"] for x in gqa} == {"201307251", "201640614"}
    # scored where the annotations exist, not where only the official server scores
    for name in ("pope", "gqa", "textvqa", "vizwiz", "scienceqa", "mmbench", "mme"):
        assert scores[name]["scored"], (name, scores[name])
    assert not scores["vqav2"]["scored"] and not scores["mmvet"]["scored"]
    # the score command agrees with the run, from the files alone
    s = subprocess.run([sys.executable, "-m", "sea_jax.eval", "score", "--benchmark=pope",
                        f"--predictions={out / 'pope' / 'answers.jsonl'}", f"--annotations={root}/pope"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout)["scores"]["mean"] == scores["pope"]["mean"]
    # a missing data file is one clear line, exit 2
    bad = subprocess.run([sys.executable, "-m", "sea_jax.eval", f"--workdir={wd}", "--benchmarks=gqa",
                          f"--data_root={tmp_path}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "llava_gqa_testdev_balanced.jsonl" in bad.stderr and "Traceback" not in bad.stderr
    # the eval folder and the outputs in a bucket: the images are read from it, the files land
    # there, scores.json names their gs:// paths, and the answers are those of the local run
    from sea_jax import storage

    gs_out, gs_root = f"gs://{gcs.bucket}/eval_out", f"gs://{gcs.bucket}/eval_root"
    storage.copytree(root, gs_root)
    g = subprocess.run([sys.executable, "-m", "sea_jax.eval", f"--workdir={wd}", "--benchmarks=pope",
                        f"--data_root={gs_root}", f"--out={gs_out}", "--max_new_tokens=3", "--batch_size=8"],
                       cwd=ROOT, env=_env() | gcs.env, capture_output=True, text=True, timeout=600)
    assert g.returncode == 0, g.stderr[-4000:]
    in_bucket = json.loads(storage.read_text(f"{gs_out}/scores.json"))
    assert in_bucket["pope"]["answers"] == f"{gs_out}/pope/answers.jsonl"
    texts = lambda lines: [(x["question_id"], x["text"]) for x in map(json.loads, lines)]  # noqa: E731
    assert texts(storage.read_text(in_bucket["pope"]["answers"]).splitlines()) == \
        texts(open(out / "pope" / "answers.jsonl").read().splitlines())  # answer ids are random, texts not
    assert in_bucket["pope"]["mean"] == scores["pope"]["mean"]


def test_export_stops_at_the_templates_end_of_turn_and_the_lmms_eval_path(tmp_path):
    """generation_config.json lists the chat template's end-of-turn token; the folder loads and
    generates through the calls lmms-eval's ``llava_hf`` makes (AutoConfig, the Llava class,
    AutoProcessor with left padding, the tokenizer's chat template with ``<image>\\n`` in front,
    the processor, ``generate(eos_token_id=pad_token_id=tokenizer.eos_token_id)``) and gives the
    tokens sea_jax generates with the same stop token. With ``eos_is_end_of_turn`` the tokenizer's
    EOS is ``<end_of_turn>``, so that path stops where the chat model ends its turn."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    from sea_jax.convert import hf_llava
    from sea_jax.eval.run import Answerer, EvalModel
    from sea_jax.generate import Generator, encode_prompt
    from sea_jax.models.mllm import MLLM

    cfg, params, tok, _, _ = lib.trained_export(tmp_path)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    for flag in (False, True):
        folder = str(tmp_path / f"export-{flag}")
        hf_llava.export_llava(cfg, params, tok, folder, pad_to_square=True, eos_is_end_of_turn=flag)
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        assert end in eos and tok.eos_token_id in eos  # HF generate stops at either
        # --- lmms-eval llava_hf's calls
        assert AutoConfig.from_pretrained(folder).model_type == "llava"
        model = LlavaForConditionalGeneration.from_pretrained(folder, revision="main", torch_dtype="auto").eval()
        processor = AutoProcessor.from_pretrained(folder, revision="main")
        processor.tokenizer.padding_side = "left"
        eot = processor.tokenizer.eos_token_id
        assert eot == (end if flag else tok.eos_token_id)
        q = _questions(tmp_path, 1)[0]
        text = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{q.text}"}],
                                                       tokenize=False, add_generation_prompt=True)
        image = Image.open(q.image)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            cont = model.generate(**inputs, do_sample=False, temperature=None, top_p=None, num_beams=1,
                                  max_new_tokens=N, use_cache=True, pad_token_id=eot, eos_token_id=eot)
        hf_ids = cont[0, inputs["input_ids"].shape[1]:].numpy()
        # --- sea_jax on the same folder, stopping at the same token
        m = EvalModel.from_hf(folder, dtype="float32")
        ids = encode_prompt(m.tokenizer, text, m.cfg.num_image_tokens)
        np.testing.assert_array_equal(ids, inputs["input_ids"][0].numpy())
        pixels = Answerer(m)._pixels(q)[None]
        got = Generator(MLLM(m.cfg))(m.params, pixels, ids[None], max_new_tokens=N, eos_token_id=[eot],
                                     pad_token_id=eot)
        n = int(got.lengths[0])
        np.testing.assert_array_equal(np.asarray(got.tokens[0, :n]), hf_ids[:n])
        assert len(hf_ids) == n or (hf_ids[n:] == eot).all()


def test_in_loop_evaluation_in_a_cli_run_leaves_training_bit_exact(assets, tmp_path):  # noqa: F811
    """``eval.every``: eval/* rows in metrics.jsonl at the evaluation steps; the trained parameters
    are bit-equal to a run without evaluation, and to a run resumed across an evaluation step."""
    import shutil

    from test_train import _params

    base = {"train.num_steps": 6, "train.checkpoint_every": 2, "data.num_shards": 2}
    ev = {**base, "eval.every": 3, "eval.heldout_json": assets["clean"], "eval.heldout_samples": 8,
          "eval.probe_images": 8, "eval.batch_size": 8}
    plain, with_eval = tmp_path / "plain", tmp_path / "eval"
    _run(_args(assets, plain, 1, data=assets["clean"], **base), tmp_path / "plain.log")
    _run(_args(assets, with_eval, 1, data=assets["clean"], **ev), tmp_path / "eval.log")
    rows = [json.loads(x) for x in open(with_eval / "stage1" / "metrics.jsonl")]
    evals = [r for r in rows if "eval/lm_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(np.isfinite(r["eval/lm_loss"]) and 0 <= r["eval/label_accuracy"] <= 1 for r in evals)
    step, p_eval = _params(with_eval / "stage1")
    _, p_plain = _params(plain / "stage1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_eval, p_plain)
    # resume from step 2, across the evaluation at step 3
    ck = with_eval / "stage1" / "checkpoints"
    for s in ("4", "6"):
        shutil.rmtree(ck / s)
    out = _run(_args(assets, with_eval, 1, data=assets["clean"], **ev), tmp_path / "resume.log")
    assert "resumed from step 2" in out
    _, p_resumed = _params(with_eval / "stage1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_resumed, p_plain)
    rows = [json.loads(x) for x in open(with_eval / "stage1" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval/lm_loss" in r] == [3, 6]  # one trajectory
