"""``python -m sea_jax.train`` end to end, through the CLI, on tiny models and generated data.

Assets built here (no model hub): a tiny HF Gemma folder whose vocabulary is exactly its BPE
tokenizer's (so adding ``<image>`` grows the embedding), a tiny HF SigLIP folder with a SentencePiece
``SiglipTokenizer``, a word list, and LLaVA-format JSON + PNG files: captions for stage 1 (with one
sample of each fault the data pipeline skips), multi-turn and text-only conversations for stage 2.

What is shown:
* stage 1 then stage 2 from stage 1's adapter, loss going down, bad samples skipped, counted
  exactly and named in the log;
* resume: kill -9 at a random point after a checkpoint, rerun, final params bit-equal to an
  uninterrupted run; a damaged newest checkpoint is skipped for the previous one;
* multi-host: two processes x 4 CPU devices give the losses of one process x 8 devices;
* SIGTERM: a checkpoint and a clean exit.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
WORDS = ("dog cat tree house car boat sky water grass road bird horse flower cloud sun red blue green "
         "white black small large old").split()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Faults of the bad-data run, one sample each: (sample id, skip reason of sea_jax.data.llava).
FAULTS = {
    "bad-missing": "missing_image",
    "bad-corrupt": "corrupt_image",
    "bad-fields": "bad_record",
    "bad-empty": "empty_response",
}
LONG = "long-caption"  # longer than the context: truncated (after the image tokens) and counted


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    corpus += ["what is in the image?", "describe the picture", "a photo of the", "user model"] * 20
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def _caption(rng, n=5):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _image(rng, path, colour):
    arr = np.clip(rng.normal(colour, 30, size=(36, 30, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _records_stage1(root, n, faults: bool, seed=0):
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    records = []
    for i in range(n):
        colour = (40 + 200 * (i % 2), 90, 200 - 150 * (i % 2))
        name = f"img{i}.png"
        _image(nrng, img_dir / name, colour)
        # captions tied to the image colour: something for the adapter to learn
        cap = ("red sun " if i % 2 else "blue water ") + _caption(rng, 3)
        records.append({"id": f"s{i}", "image": name,
                        "conversations": [{"from": "human", "value": "<image>\n"},
                                          {"from": "gpt", "value": cap}]})
    if faults:
        (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        bad = [
            {"id": "bad-missing", "image": "nope.png", "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red sun"}]},
            {"id": "bad-corrupt", "image": "corrupt.png", "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red sun"}]},
            {"id": "bad-fields", "image": "img0.png", "conversation": []},
            {"id": "bad-empty", "image": "img1.png", "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "   "}]},
            {"id": LONG, "image": "img2.png", "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": _caption(rng, 60)}]},
        ]
        for k, r in enumerate(bad):
            records.insert(3 + 4 * k, r)
    return records


def _records_stage2(root, n, seed=1):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        cap = ("red sun " if i % 2 else "blue water ") + _caption(rng, 2)
        if i % 5 == 4:  # text-only, multi-turn
            records.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "describe " + _caption(rng, 2)}, {"from": "gpt", "value": _caption(rng, 3)},
                {"from": "human", "value": "what"}, {"from": "gpt", "value": _caption(rng, 2)}]})
        else:
            records.append({"id": f"c{i}", "image": f"img{i % 16}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": cap},
                {"from": "human", "value": "describe the picture"}, {"from": "gpt", "value": _caption(rng, 3)}]})
    return records


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import io

    import sentencepiece as spm
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, SiglipConfig, SiglipModel, SiglipTokenizer

    root = tmp_path_factory.mktemp("train")
    _JAX_CACHE["dir"] = str(root / "jax_cache")
    tok = _tokenizer()
    llm_dir = root / "gemma"
    tok.save_pretrained(llm_dir)
    torch.manual_seed(0)
    # vocabulary = the tokenizer's: "<image>" (added by the trainer) needs an embedding resize
    gcfg = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GemmaForCausalLM(gcfg).save_pretrained(llm_dir)

    sig_dir = root / "siglip"
    sig_dir.mkdir()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(WORDS)] * 50 + WORDS * 5), model_writer=buf,
                                   vocab_size=60, hard_vocab_limit=False, model_type="unigram", minloglevel=2)
    (root / "spiece.model").write_bytes(buf.getvalue())
    SiglipTokenizer(vocab_file=str(root / "spiece.model"), model_max_length=8).save_pretrained(sig_dir)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=8, pad_token_id=1, bos_token_id=1, eos_token_id=1)
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(sig_dir)

    (root / "words.txt").write_text("\n".join(WORDS) + "\n")
    (root / "stage1.json").write_text(json.dumps(_records_stage1(root, 40, faults=True)))
    (root / "clean.json").write_text(json.dumps(_records_stage1(root, 40, faults=False)))
    (root / "stage2.json").write_text(json.dumps(_records_stage2(root, 24)))
    return {"root": root, "llm": str(llm_dir), "siglip": str(sig_dir), "words": str(root / "words.txt"),
            "images": str(root / "images"), "stage1": str(root / "stage1.json"), "clean": str(root / "clean.json"),
            "stage2": str(root / "stage2.json")}


def _args(a, workdir, stage=1, data=None, **extra):
    cfg = TINY + (":stage2" if stage == 2 else "")
    over = {"llm.checkpoint": a["llm"], "vision.checkpoint": a["siglip"], "labels.word_list": a["words"],
            "data.json": data or (a["stage1"] if stage == 1 else a["stage2"]), "data.image_root": a["images"],
            "labels.cache_dir": str(a["root"] / "word_cache")}
    over.update(extra)
    return [f"--config={cfg}", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in over.items()]


_JAX_CACHE = {}


def _env(devices=8, **extra):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # Runs of one program (reference, killed, resumed) compile once: XLA's persistent cache.
    if "dir" in _JAX_CACHE:
        env["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE["dir"]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(extra)
    return env


def _popen(args, log, env=None):
    return subprocess.Popen([sys.executable, "-m", "sea_jax.train", *args], cwd=ROOT, env=env or _env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _run(args, log, env=None, timeout=300):
    p = _popen(args, log, env)
    rc = p.wait(timeout=timeout)
    out = open(log).read()
    assert rc == 0, out[-4000:]
    return out


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(run, step=None):
    from sea_jax import builder, rundir

    return builder.restore_trained(rundir.RunDir.find(str(run)), step)


def _assert_trees_equal(a, b):
    import jax

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stage1_then_stage2_with_bad_data(assets, tmp_path):
    wd = tmp_path / "run"
    out1 = _run(_args(assets, wd, 1, **{"train.num_steps": 8}), tmp_path / "s1.log")
    m1 = _metrics(wd / "stage1")
    assert [r["step"] for r in m1] == list(range(1, 9))
    assert np.isfinite([r["loss"] for r in m1]).all()
    # L_lm: L_a is an InfoNCE over the batch's distinct labels, its scale (log N) moves with N
    losses = [r["lm_loss"] for r in m1]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    for key in ("lm_loss", "align_loss", "tau", "unique_labels", "lr", "grad_norm", "step_time", "tokens_per_s",
                "tflops_per_device"):
        assert key in m1[-1], key
    assert m1[-1]["mfu"] is None  # CPU: no peak
    # bad data: the run went to the end; skip counts are exactly those of the data order
    # (simulated here from Grain's seeded shuffle), and every skipped sample is named in the log
    expected_skips, expected_long = _simulate_skips(assets["stage1"], steps=8, batch=8)
    final = m1[-1]
    by_reason = {r: 0 for r in FAULTS.values()}
    for sid, n in expected_skips.items():
        by_reason[FAULTS[sid]] += n
    assert {r: final[f"skipped/{r}"] for r in by_reason} == by_reason, final
    assert final["skipped_total"] == sum(expected_skips.values())
    assert set(expected_skips) == set(FAULTS)  # every fault was reached at least once
    logged = {sid: out1.count(f"skipped sample {sid} ") for sid in FAULTS}
    assert logged == expected_skips, (logged, expected_skips)
    assert final["truncated"] == expected_long >= 1
    assert os.path.exists(wd / "stage1" / "config.json") and os.path.isdir(wd / "stage1" / "tokenizer")
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(wd / "stage1" / "tensorboard"))
    _, p1 = _params(wd / "stage1")
    assert sorted(p1) == ["adapter", "log_tau"]

    _probe_real_config_run(assets, wd, tmp_path)

    # stage 2 from stage 1's adapter (same workdir), LLM + adapter trained, chat template
    _run(_args(assets, wd, 2, **{"train.num_steps": 8}), tmp_path / "s2.log")
    m2 = _metrics(wd / "stage2")
    l2 = [r["loss"] for r in m2]
    assert np.mean(l2[-3:]) < np.mean(l2[:3]), l2
    _, p2 = _params(wd / "stage2")
    assert sorted(p2) == ["adapter", "llm"]
    # stage 2 starts from stage 1's adapter: after 8 small steps it is still close to it, and far
    # from a fresh random init
    d_stage1 = np.abs(p2["adapter"]["linear_1"]["kernel"] - p1["adapter"]["linear_1"]["kernel"]).mean()
    assert d_stage1 < 0.05 * np.abs(p1["adapter"]["linear_1"]["kernel"]).mean() + 0.03
    # the export entry point sees the full tree
    from sea_jax.builder import load_trained

    trained = load_trained(str(wd))
    config, full = trained.config, trained.params
    assert config.stage == 2 and sorted(full) == ["adapter", "llm", "log_tau", "vision"]
    np.testing.assert_array_equal(full["log_tau"], p1["log_tau"])
    assert full["llm"]["embedder"]["embedding"].shape[0] == len(_tokenizer()) + 1  # + <image>

    # export the trained workdir through the CLI; transformers gives our logits on a chat prompt
    out = tmp_path / "hf"
    exp = subprocess.run([sys.executable, "-m", "sea_jax.export", f"--workdir={wd}", f"--out={out}", "--dtype=float32"],
                         cwd=ROOT, env=_env(devices=1), capture_output=True, text=True, timeout=300)
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-4000:]
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor


    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    image = Image.open(assets["root"] / "images" / "img3.png")
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        want = hf(**inputs).logits.numpy()
    ours = load_trained(str(wd))
    from sea_jax.models.mllm import MLLM

    got = MLLM(ours.cfg)(jax_tree(ours.params), jnp.asarray(inputs["pixel_values"].permute(0, 2, 3, 1).numpy()),
                         jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy())).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def jax_tree(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tree)


def _simulate_skips(json_path, steps, batch, seed=0):
    """(sample id -> times skipped, times the long sample was served) after ``steps`` batches of a
    one-process run: the pipeline's documented order (Grain shuffle with the seed, repeated), bad
    records skipped until each batch has ``batch`` good rows."""
    import grain

    records = json.load(open(json_path))
    order = grain.MapDataset.source(list(range(len(records)))).shuffle(seed=seed).repeat(None)
    skips, long_served, good, i = {}, 0, 0, 0
    while good < steps * batch:
        sid = records[order[i]]["id"]
        i += 1
        if sid in FAULTS:
            skips[sid] = skips.get(sid, 0) + 1
        else:
            good += 1
            long_served += sid == LONG
    return skips, long_served


# ----------------------------------------------------------------------------------------------
# Resume, preemption, multi-host: one program (clean data, 2 data shards so that one process with
# 8 devices and two processes with 4 each see the same global batches).

STEPS = 24


def _resume_args(assets, workdir, **extra):
    over = {"train.num_steps": STEPS, "train.checkpoint_every": 4, "data.num_shards": 2}
    over.update(extra)
    return _args(assets, workdir, 1, data=assets["clean"], **over)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted STEPS-step run, one process, 8 devices."""
    wd = tmp_path_factory.mktemp("reference")
    _run(_resume_args(assets, wd), wd / "log.txt")
    return wd / "stage1"


def _wait_for_checkpoint(p, ckdir, newer_than, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [s for s in (_ckpt_steps(ckdir) if os.path.isdir(ckdir) else []) if s > newer_than]
        if steps:
            return max(steps)
        assert p.poll() is None, "the run ended before writing a checkpoint"
        time.sleep(0.02)
    raise TimeoutError(ckdir)


def _ckpt_steps(ckdir):
    return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit())


def test_sigterm_then_kill9_then_resume_is_bit_exact(assets, reference, tmp_path):
    wd = tmp_path / "run"
    run = wd / "stage1"
    ckdir = run / "checkpoints"
    # A: SIGTERM (preemption) once training runs: a checkpoint at the current step, exit 0
    p = _popen(_resume_args(assets, wd), tmp_path / "a.log", _env())
    _wait_for_checkpoint(p, ckdir, 0)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0, open(tmp_path / "a.log").read()[-3000:]
    log_a = open(tmp_path / "a.log").read()
    assert "preemption signal" in log_a
    stopped_at = _metrics(run)[-1]["step"]
    assert stopped_at < STEPS and _ckpt_steps(ckdir)[-1] == stopped_at  # saved where it stopped

    # B: resume, kill -9 at a random point after its next checkpoint (possibly mid-save)
    p = _popen(_resume_args(assets, wd), tmp_path / "b.log", _env())
    _wait_for_checkpoint(p, ckdir, stopped_at)
    time.sleep(random.uniform(0.0, 0.4))
    assert p.poll() is None, "finished before the kill; the test needs more steps"
    p.kill()
    p.wait()
    assert "resumed from step %d" % stopped_at in open(tmp_path / "b.log").read()

    # C: resume to the end
    out = _run(_resume_args(assets, wd), tmp_path / "c.log")
    resumed_from = int(out.split("resumed from step ")[1].split()[0])
    assert stopped_at < resumed_from < STEPS
    step, params = _params(run)
    ref_step, ref_params = _params(reference)
    assert step == ref_step == STEPS
    _assert_trees_equal(params, ref_params)
    # the logged losses after the resume are the reference's, bit for bit
    ref_m = {r["step"]: r for r in _metrics(reference)}
    after = [r for r in _metrics(run) if r["step"] > resumed_from]
    assert after and all(r["loss"] == ref_m[r["step"]]["loss"] for r in after)
    # skip statistics and data position travel with the checkpoint
    assert _metrics(run)[-1]["samples"] == ref_m[STEPS]["samples"] == STEPS * 8


def test_damaged_newest_checkpoint_falls_back_to_previous(assets, reference, tmp_path):
    run = tmp_path / "wd" / "stage1"
    shutil.copytree(reference, run)
    ckdir = run / "checkpoints"
    newest, previous = _ckpt_steps(ckdir)[-1], _ckpt_steps(ckdir)[-2]
    # truncate every data file of the newest step's params (an interrupted copy, a full disk)
    damaged = 0
    for dirpath, _, files in os.walk(ckdir / str(newest) / "params"):
        for f in files:
            path = os.path.join(dirpath, f)
            if os.path.getsize(path) > 16 and "d" in os.path.relpath(path, ckdir / str(newest) / "params").split(os.sep):
                with open(path, "r+b") as fh:
                    fh.truncate(8)
                damaged += 1
    assert damaged
    step, params = _params(run)
    assert step == previous
    _assert_trees_equal(params, _params(reference, previous)[1])
    # and the trainer resumes from it: run to the end, same final params as the reference
    out = _run(_resume_args(assets, run.parent), tmp_path / "r.log")
    assert f"checkpoint step {newest}" in out and f"resumed from step {previous}" in out
    _assert_trees_equal(_params(run)[1], _params(reference)[1])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(assets, reference, tmp_path):
    wd = tmp_path / "mh"
    port = _free_port()
    procs = []
    for pid in range(2):
        env = _env(devices=4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(_popen(_resume_args(assets, wd), tmp_path / f"p{pid}.log", env))
    for pid, p in enumerate(procs):
        assert p.wait(timeout=400) == 0, open(tmp_path / f"p{pid}.log").read()[-4000:]
    assert "2 processes, 8 devices" in open(tmp_path / "p0.log").read()
    mh = _metrics(wd / "stage1")  # process 0 logs
    ref = _metrics(reference)
    assert [r["step"] for r in mh] == [r["step"] for r in ref]
    for a, b in zip(mh, ref):
        for k in ("loss", "lm_loss", "align_loss", "unique_labels", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {k}")
    _, p_mh = _params(wd / "stage1")
    _, p_ref = _params(reference)
    import jax

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), p_mh, p_ref)


CONFIGS = ["gemma2b", "gemma2b_finetune", "vicuna7b", "vicuna7b_finetune", "llama3_8b", "llama3_8b_finetune",
           "phi3_mini", "phi3_mini_finetune", "vicuna13b", "vicuna13b_finetune", "clip_vicuna7b",
           "clip_vicuna7b_finetune", "clip_vicuna13b", "clip_vicuna13b_finetune", "s2_vicuna7b", "s2_vicuna7b_finetune"]


@pytest.mark.parametrize("name", CONFIGS)
def test_recipe_configs_name_every_missing_path(name, tmp_path):
    import importlib.util

    from sea_jax import train

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    stage2 = name.endswith("_finetune")
    assert c.stage == (2 if stage2 else 1)
    assert c.train.batch_size == (128 if stage2 else 256)
    assert c.optim.lr == (2e-5 if stage2 else 1e-3) and c.optim.weight_decay == 0 and c.optim.warmup_ratio == 0.03
    assert c.data.template == ("chat" if stage2 else "plain") and c.data.pad_to_square == stage2
    with pytest.raises(FileNotFoundError) as e:
        train.check_paths(c, str(tmp_path))
    msg = str(e.value)
    for field in ("llm.checkpoint", "vision.checkpoint", "data.json", "data.image_root"):
        assert f"config.{field}=" in msg, (field, msg)
    if stage2:
        assert "config.train.init_from" in msg
        prime = mod.get_config("prime")
        assert "vision" in prime.train.trainable and prime.optim.group_lr.vision == 2e-6


def test_cli_missing_path_fails_before_compiling(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sea_jax.train", f"--config={ROOT}/configs/gemma2b.py",
                        f"--workdir={tmp_path}", "--config.data.json=/nonexistent/x.json"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "config.data.json='/nonexistent/x.json' does not exist" in p.stderr
    assert "config.llm.checkpoint=" in p.stderr and "compiled" not in p.stderr


def test_microbatches_that_do_not_split_over_the_devices_are_refused(assets, tmp_path):
    """8 rows in 8 microbatches on 8 batch shards: one row per microbatch cannot be sharded; the
    run stops before building the model, naming the field and what would work."""
    args = _args(assets, tmp_path / "run", 1, **{"train.batch_size": 8, "train.microbatches": 8})
    p = subprocess.run([sys.executable, "-m", "sea_jax.train", *args], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert "train.microbatches 8 gives microbatches of 1 rows" in p.stderr and "divisor of 1" in p.stderr
    assert "model built" not in p.stderr


def _probe_real_config_run(a, wd, tmp_path):
    """``python -m sea_jax.probe`` on a workdir of a real (non-demo) config: the SigLIP labels are
    the run's (its SigLIP checkpoint and word list; checked here against transformers'
    SiglipModel), the recalled words are nearest by cosine in the LLM's Eq. 8 table, and the
    picture marks words right by the SigLIP labels (no truth outside the demo)."""
    import torch
    from transformers import SiglipModel

    from sea_jax import builder, probe
    from sea_jax.align import semantic_labels as L
    from sea_jax.align.recall import word_hits
    from sea_jax.data.images import load_and_preprocess
    from sea_jax.rundir import RunDir

    images = [os.path.join(a["images"], f"img{i}.png") for i in range(3)]
    out = tmp_path / "probe.png"
    res = subprocess.run([sys.executable, "-m", "sea_jax.probe", f"--workdir={wd}", "--stage=1", f"--out={out}",
                          "--images=" + ",".join(images), "--plot_images=2"],
                         cwd=ROOT, env=_env(devices=1), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    summary = json.load(open(tmp_path / "probe.json"))
    m = summary["run"]
    assert m["num_images"] == 3 and "truth_accuracy" not in m and 0.0 <= m["label_accuracy"] <= 1.0
    assert os.path.getsize(out) > 10_000

    r = probe.probe_workdir(str(wd), stage=1, images=images)
    assert r.truth is None and m["label_accuracy"] == pytest.approx(r.metrics["label_accuracy"])
    np.testing.assert_array_equal(r.correct(), word_hits(r.recalled, r.labels, r.label_valid))
    # the SigLIP labels, recomputed with transformers: each patch alone through the MAP head
    # (the trainer's ``labels.feature``) against the text tower's embedding of every word
    config = RunDir(str(wd), 1).load_config()
    hf = SiglipModel.from_pretrained(a["siglip"]).eval()
    words = L.load_word_list(a["words"])
    tok, _ = builder.load_vision_tokenizer(config)
    ids = L.make_tokenize_fn(tok, max_length=hf.config.text_config.max_position_embeddings,
                             template=config.labels.prompt)(words)
    x = np.stack([load_and_preprocess(p, hf.config.vision_config.image_size) for p in images])
    with torch.no_grad():
        t = hf.get_text_features(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long))
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        h = hf.vision_model(pixel_values=torch.as_tensor(x).permute(0, 3, 1, 2)).last_hidden_state
        b, p, d = h.shape
        v = hf.vision_model.head(h.reshape(b * p, 1, d)).reshape(b, p, d)
    cos = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    cos = -cos if config.labels.negate_similarity else cos
    top = torch.topk(cos, k=r.labels.shape[-1], dim=-1)
    g = r.labels.shape[1]
    want_ids = top.indices.numpy().reshape(b, g, g, -1)
    want_valid = top.values.numpy().reshape(b, g, g, -1) > 0
    gap = (top.values[..., 0] - top.values[..., 1]).numpy().reshape(b, g, g) > 1e-4  # no near-tie
    assert gap.mean() > 0.8
    np.testing.assert_array_equal(r.labels[..., 0][gap], want_ids[..., 0][gap])
    np.testing.assert_array_equal(r.label_valid[..., 0][gap], want_valid[..., 0][gap])


def test_length_buckets_compile_only_the_bucket_set_and_resume_bit_exact(assets, tmp_path):
    """data.length_buckets + data.group_batches in a CLI run: every step runs at one of the
    buckets, each bucket is compiled once (the largest first), the padding fraction is logged, and
    kill -9 after a checkpoint then resume gives the uninterrupted run's parameters bit for bit."""
    import re

    over = {"train.num_steps": 12, "train.checkpoint_every": 4, "data.length_buckets": "26,30,34",
            "data.group_batches": 3}
    ref = tmp_path / "ref"
    out = _run(_args(assets, ref, 1, data=assets["clean"], **over), tmp_path / "ref.log")
    rows = _metrics(ref / "stage1")
    used = {r["seq_len"] for r in rows}
    assert used <= {26, 30, 34, 40}, used
    compiled = [int(n) for n in re.findall(r"compiled the train step for length (\d+)", out)]
    assert compiled[0] == 40 and len(compiled) == len(set(compiled)) and set(compiled) == used | {40}
    assert all(0 <= r["padding_fraction"] < 1 and r["real_tokens"] <= 8 * r["seq_len"] for r in rows)

    wd = tmp_path / "run"
    p = _popen(_args(assets, wd, 1, data=assets["clean"], **over), tmp_path / "a.log")
    _wait_for_checkpoint(p, wd / "stage1" / "checkpoints", 4)  # past the first window boundary
    p.kill()
    p.wait()
    out = _run(_args(assets, wd, 1, data=assets["clean"], **over), tmp_path / "b.log")
    assert "resumed from step" in out
    _assert_trees_equal(_params(wd / "stage1")[1], _params(ref / "stage1")[1])
