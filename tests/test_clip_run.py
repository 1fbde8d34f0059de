"""SEA-LLaVA through the command line: a tiny CLIP tower + a Vicuna-architecture (Llama) LLM built
here as HF folders, stage 1 (on-the-fly CLIP labels, Eq. 6 negation on), stage 2 (LLaVA's Vicuna
chat format), export, and transformers' logits on the processor's inputs equal sea_jax's; the
exported processor preprocesses as training did (CLIP's mean / std, shortest side + centre crop)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_train import _env, _records_stage1, _records_stage2, WORDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _bpe(specials, vocab_size, corpus, bos, eos, post_eos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       show_progress=False))
    if post_eos:  # CLIP: every text is wrapped in start / end tokens; the tower pools at the end one
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, tk.token_to_id(bos)), (eos, tk.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def clip_assets(tmp_path_factory):
    import random

    import torch
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("clip_run")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    corpus += ["what is in the image?", "describe the picture", "USER: ASSISTANT:"] * 20
    torch.manual_seed(0)
    # the LLM: Vicuna's architecture (Llama) with a BPE tokenizer that fills its vocabulary
    tok = _bpe(["<pad>", "<s>", "</s>", "<unk>"], 110, corpus, "<s>", "</s>", post_eos=False)
    llm = root / "vicuna"
    tok.save_pretrained(llm)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(llm)
    # CLIP: both towers, quick_gelu, 32 px / patch 8 (16 patches + CLS), its own tokenizer
    ctok = _bpe(["<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>"], 60, corpus + WORDS * 5,
                "<|startoftext|>", "<|endoftext|>", post_eos=True)
    clip_dir = root / "clip"
    ctok.save_pretrained(clip_dir)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="quick_gelu")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=len(ctok), max_position_embeddings=8, hidden_act="quick_gelu",
                eos_token_id=ctok.eos_token_id, bos_token_id=ctok.bos_token_id, pad_token_id=ctok.pad_token_id)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).save_pretrained(clip_dir)
    (root / "words.txt").write_text("\n".join(WORDS) + "\n")
    (root / "stage1.json").write_text(json.dumps(_records_stage1(root, 24, faults=False)))
    (root / "stage2.json").write_text(json.dumps(_records_stage2(root, 16)))
    return root


def _run(args, log):
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=900)
    open(log, "w").write(p.stdout + p.stderr)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p.stdout + p.stderr


def test_clip_vicuna_stage1_stage2_export(clip_assets, tmp_path):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sea_jax.builder import load_trained
    from sea_jax.data.images import load_and_preprocess
    from sea_jax.models.clip import IMAGE_MEAN, IMAGE_STD
    from sea_jax.models.mllm import MLLM

    a = clip_assets
    wd = tmp_path / "run"
    common = {"llm.checkpoint": a / "vicuna", "vision.tower": "clip", "vision.checkpoint": a / "clip",
              "vision.image_size": 32, "labels.word_list": a / "words.txt", "labels.negate_similarity": True,
              "data.image_root": a / "images", "labels.cache_dir": a / "word_cache", "data.max_length": 128,
              "train.num_steps": 4, "train.checkpoint_every": 0}
    flags = lambda d: [f"--config.{k}={v}" for k, v in d.items()]  # noqa: E731
    out1 = _run(["sea_jax.train", f"--config={TINY}", f"--workdir={wd}",
                 *flags({**common, "data.json": a / "stage1.json"})], tmp_path / "s1.log")
    rows = [json.loads(x) for x in open(wd / "stage1" / "metrics.jsonl")]
    assert all(r["align_loss"] > 0 and r["unique_labels"] > 0 for r in rows), rows  # CLIP labels on the fly
    assert "not used" not in out1 or "vision.overrides" in out1
    _run(["sea_jax.train", f"--config={TINY}:stage2", f"--workdir={wd}",
          *flags({**common, "data.json": a / "stage2.json", "data.chat_template": "vicuna_v1",
                   # the Vicuna system prompt is ~140 tokens in this 110-word vocabulary
                   "data.max_length": 320})], tmp_path / "s2.log")
    hf_dir = tmp_path / "hf"
    _run(["sea_jax.export", f"--workdir={wd}", f"--out={hf_dir}", "--dtype=float32"], tmp_path / "export.log")

    hf = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    assert hf.config.vision_config.model_type == "clip_vision_model"
    assert hf.config.vision_feature_select_strategy == "default" and hf.config.image_seq_length == 16
    proc = AutoProcessor.from_pretrained(hf_dir, backend="pil")
    path = a / "images" / "img3.png"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image?"}]}]
    inputs = proc(images=Image.open(path), text=proc.apply_chat_template(msgs, add_generation_prompt=True),
                  return_tensors="pt")
    # the processor preprocesses as training did: CLIP's mean / std, pad to square (stage 2)
    ours_pixels = load_and_preprocess(str(path), 32, pad_to_square=True, mean=IMAGE_MEAN, std=IMAGE_STD,
                                      center_crop=True)
    np.testing.assert_allclose(inputs["pixel_values"][0].permute(1, 2, 0).numpy(), ours_pixels, atol=1e-5)
    with torch.no_grad():
        want = hf(**inputs).logits.numpy()
    m = load_trained(str(wd))
    got = MLLM(m.cfg)({k: v for k, v in m.params.items()}, jnp.asarray(ours_pixels[None]),
                      jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy())).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
