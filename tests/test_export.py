"""Export to a HF Llava folder, loading it with transformers (PyTorch, offline), import back.

A tiny SigLIP + Gemma MLLM, trained three real SEA steps, exported with pad-to-square preprocessing
and small shards; transformers must load it without missing keys, its processor must reproduce our
pixels and ids, and its logits ours (1e-4, fp32). Import -> export must reproduce every tensor.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import AddedToken

import llava_testlib as lib
from sea_jax.convert import hf_llava, llava_files, mapping
from sea_jax.data.images import preprocess_image
from sea_jax.generate import chat_prompt, encode_prompt
from sea_jax.models.mllm import MLLM

PROMPT = "what is in the image?"


def _tensors(folder):
    """{name: array} over every safetensors file of a folder."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="np") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
    return out


def _training_ids(cfg):
    """Our template + tokenization, from the *training* tokenizer (the raw Gemma template) with
    <image> added as training does, independent of the export code."""
    tok = lib.make_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return encode_prompt(tok, chat_prompt(tok, PROMPT), cfg.num_image_tokens)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return lib.trained_export(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def reference(exported):
    """An image + chat prompt as our pipeline prepares them, and our (jitted) logits."""
    cfg, params, _, _, _ = exported
    image = lib.random_image()
    pixels = preprocess_image(image, cfg.vision.image_size, pad_to_square=True)
    ids = _training_ids(cfg)
    logits = jax.jit(lambda p, i, t: MLLM(cfg)(p, i, t).logits)(params, pixels[None], ids[None])[0]
    return image, pixels, ids, np.asarray(logits)


def test_folder_is_a_complete_llava_that_transformers_loads(exported):
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    cfg, _, _, out, files = exported
    for f in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert os.path.exists(os.path.join(out, f)), f
    assert len(files) > 1 and all(os.path.exists(os.path.join(out, f)) for f in files)
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    assert c["model_type"] == "llava" and c["architectures"] == ["LlavaForConditionalGeneration"]
    assert c["vision_config"]["model_type"] == "siglip_vision_model" and c["text_config"]["model_type"] == "gemma"
    assert c["image_token_index"] == lib.IMAGE_ID and c["vision_feature_layer"] == -2
    assert c["vision_feature_select_strategy"] == "full" and c["image_seq_length"] == 16
    with open(os.path.join(out, "processor_config.json")) as f:
        p = json.load(f)
    assert p["patch_size"] == 4 and p["num_additional_image_tokens"] == 0 and p["vision_feature_select_strategy"] == "full"
    assert p["image_processor"]["do_pad"] is True
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["image_token"] == "<image>"

    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<image>") == lib.IMAGE_ID
    assert "<image>" in tok.all_special_tokens


def test_processor_reproduces_training_inputs_and_logits_match(exported, reference):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg, params, _, out, _ = exported
    image, ours_pixels, ours_ids, ours_logits = reference
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")

    np.testing.assert_allclose(inputs["pixel_values"][0].permute(1, 2, 0).numpy(), ours_pixels, atol=1e-5)
    np.testing.assert_array_equal(inputs["input_ids"][0].numpy(), ours_ids)
    assert (ours_ids == lib.IMAGE_ID).sum() == cfg.num_image_tokens

    # A whole training sample: the data pipeline's ids (sea_jax.data.llava, "chat" template) for a
    # LLaVA record equal the processor's for the same conversation.
    from sea_jax.data import llava as data_llava

    answer = "a red cat on the mat"
    tok = lib.make_tokenizer()
    image_id = data_llava.add_image_token(tok, vocab_size=cfg.llm.vocab_size).id
    record = data_llava.parse_record({"id": "x", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\n" + PROMPT}, {"from": "gpt", "value": answer}]}, 0)
    encoded = data_llava.Encoder(tok, "chat", image_id, cfg.num_image_tokens, 512).encode(record)
    conversation = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    full = processor(images=image, text=processor.apply_chat_template(conversation), return_tensors="pt")
    np.testing.assert_array_equal(full["input_ids"][0].numpy(), encoded.input_ids)

    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        want = hf(**inputs).logits[0].numpy()
    np.testing.assert_allclose(ours_logits, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want).max() > 1.0  # logits are not trivially small


def test_pipeline_runs_offline(exported, monkeypatch):
    from transformers import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, _, out, _ = exported
    pipe = pipeline("image-text-to-text", model=out)
    messages = [{"role": "user", "content": [{"type": "image", "image": lib.random_image()}, {"type": "text", "text": PROMPT}]}]
    res = pipe(text=messages, max_new_tokens=5)
    assert isinstance(res, list) and res and "generated_text" in res[0]


def test_round_trip_export_import_export_is_identical(exported, tmp_path):
    cfg, params, _, out, _ = exported
    cfg2, params2, tok2 = hf_llava.import_llava(out, dtype=jnp.float32)
    assert cfg2.llm == cfg.llm and cfg2.image_token_id == cfg.image_token_id
    assert cfg2.vision_feature_layer == cfg.vision_feature_layer and cfg2.adapter == cfg.adapter
    for f in ("image_size", "patch_size", "width", "depth", "mlp_dim", "num_heads", "layer_norm_eps"):
        assert getattr(cfg2.vision, f) == getattr(cfg.vision, f), f
    assert set(params2) == {"vision", "adapter", "llm"} and set(params2["vision"]) == {"img"}
    again = str(tmp_path / "again")
    hf_llava.export_llava(cfg2, params2, tok2, again, pad_to_square=True, max_shard_bytes=64 * 2**10)
    a, b = _tensors(out), _tensors(again)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    for f in ("config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        with open(os.path.join(out, f)) as x, open(os.path.join(again, f)) as y:
            assert x.read() == y.read(), f
    # The imported tree is the exported one (text tower and log_tau are not part of a Llava).
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 params2["llm"], jax.tree.map(np.asarray, params["llm"]))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_corrupted_or_incomplete_folders_are_named(exported, tmp_path):
    _, _, _, out, files = exported
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)

    d = _copy(out, tmp_path / "no_config")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        hf_llava.import_llava(d)

    d = _copy(out, tmp_path / "no_shard")
    os.remove(os.path.join(d, files[1]))
    with pytest.raises(FileNotFoundError, match=files[1]):
        hf_llava.import_llava(d)

    d = _copy(out, tmp_path / "no_tensor")
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    broken = json.loads(json.dumps(index))
    del broken["weight_map"][name]
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(broken, f)
    with pytest.raises(mapping.MissingTensorError, match=name.replace(".", r"\.")):
        hf_llava.import_llava(d)

    d = _copy(out, tmp_path / "truncated")
    shard = os.path.join(d, files[0])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=files[0]):
        hf_llava.import_llava(d)

    d = _copy(out, tmp_path / "no_weights")
    for f in files + ["model.safetensors.index.json"]:
        os.remove(os.path.join(d, f))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf_llava.import_llava(d)

    d = _copy(out, tmp_path / "no_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(d, f))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        hf_llava.import_llava(d)

    d = _copy(out, tmp_path / "bad_config")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        hf_llava.import_llava(d)

    with pytest.raises(FileNotFoundError, match="no such folder"):
        hf_llava.import_llava(str(tmp_path / "nowhere"))


def test_llama_family_untied_head_exports_with_matching_logits(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = lib.mllm_config("llama")
    params = lib.init_params(cfg, seed=1)
    out = str(tmp_path / "llama")
    hf_llava.export_llava(cfg, params, lib.make_tokenizer(), out, pad_to_square=False)
    names = _tensors(out)
    assert "language_model.lm_head.weight" in names
    np.testing.assert_array_equal(names["language_model.lm_head.weight"], np.asarray(params["llm"]["lm_head"]["kernel"]).T)
    processor = AutoProcessor.from_pretrained(out)
    image = lib.random_image(seed=2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    pixels = preprocess_image(image, 16, pad_to_square=False)
    np.testing.assert_allclose(inputs["pixel_values"][0].permute(1, 2, 0).numpy(), pixels, atol=1e-5)
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        want = model.eval()(**inputs).logits[0].numpy()
    got = MLLM(cfg)(jax.tree.map(jnp.asarray, params), pixels[None], inputs["input_ids"].numpy().astype(np.int32)).logits[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_bfloat16_export(exported, tmp_path):
    from transformers import AutoModelForImageTextToText

    cfg, params, tok, out, _ = exported
    bf = str(tmp_path / "bf16")
    hf_llava.export_llava(cfg, params, tok, bf, dtype="bfloat16", pad_to_square=True)
    with open(os.path.join(bf, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    model = AutoModelForImageTextToText.from_pretrained(bf, dtype=torch.bfloat16)
    w = model.model.multi_modal_projector.linear_1.weight
    assert w.dtype == torch.bfloat16
    want = torch.from_numpy(np.asarray(params["adapter"]["linear_1"]["kernel"]).T.copy()).to(torch.bfloat16)
    assert torch.equal(w.detach(), want)


def test_image_token_and_vocabulary_checks():
    cfg = lib.mllm_config("gemma")
    tok = lib.make_tokenizer()
    grown = llava_files.prepare_tokenizer(tok, cfg)
    assert len(tok) == 100 and len(grown) == 101  # the caller's tokenizer is not modified
    assert grown.convert_tokens_to_ids("<image>") == lib.IMAGE_ID
    # Already present at the right id: nothing added.
    again = llava_files.prepare_tokenizer(grown, cfg)
    assert len(again) == 101
    with pytest.raises(ValueError, match="image_token_id is 50"):
        llava_files.prepare_tokenizer(tok, lib.MLLMConfig(cfg.llm, cfg.vision, image_token_id=50))
    small = lib.mllm_config("gemma", vocab_size=100)
    with pytest.raises(ValueError, match="no row in the LLM's embedding"):
        hf_llava.llava_config(small, tok)
    extra = llava_files.prepare_tokenizer(tok, cfg)
    extra.add_tokens(["<extra>"])
    tight = lib.mllm_config("gemma", vocab_size=101)
    with pytest.raises(ValueError, match="only 101 rows"):
        llava_files.prepare_tokenizer(extra, tight)
    with pytest.raises(NotImplementedError, match="mlp2x_gelu"):
        hf_llava.llava_param_mapping(lib.MLLMConfig(cfg.llm, cfg.vision, lib.IMAGE_ID, adapter="linear"))


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_adapter_only_export_uses_llava_names(kind, tmp_path):
    from sea_jax.models.adapter import Adapter

    cfg = lib.MLLMConfig(lib.llm_config("gemma", hidden=24), lib.vision_config(), lib.IMAGE_ID, adapter=kind)
    adapter = nn.unbox(Adapter(out_dim=24, kind=kind).init(jax.random.key(0), jnp.zeros((1, 1, 32)))["params"])
    path = hf_llava.export_adapter(cfg, adapter, str(tmp_path))
    with safe_open(path, framework="np") as f:
        names = set(f.keys())
        meta = f.metadata()
        layer0 = "model.mm_projector.0" if kind == "mlp2x_gelu" else "model.mm_projector"
        w = f.get_tensor(f"{layer0}.weight")
    want = {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    assert names == (want if kind == "mlp2x_gelu" else {"model.mm_projector.weight", "model.mm_projector.bias"})
    assert w.shape == (24, 32)  # PyTorch nn.Linear [out, in]
    np.testing.assert_array_equal(w, np.asarray(adapter["linear_1"]["kernel"]).T)
    assert meta["mm_projector_type"] == kind and meta["mm_hidden_size"] == "32" and meta["hidden_size"] == "24"
    got_kind, back = hf_llava.load_adapter(str(tmp_path))
    assert got_kind == kind
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, adapter)


def test_export_workdir_reads_the_checkpoint_through_the_builder(exported, tmp_path, monkeypatch):
    """The CLI's workdir path, with the builder's run loader replaced by the in-memory run (the real
    one restores Orbax checkpoints and reloads frozen parts; tested with training)."""
    from sea_jax import builder, export

    cfg, params, tok, out, _ = exported
    run = ml_collections.ConfigDict({"data": {"pad_to_square": True, "template": "chat"}})
    calls = []

    def fake_load(workdir, *, stage=None, step=None, mesh=None, to_host=True, vision=None):  # the real signature
        calls.append((workdir, step))
        return builder.TrainedModel(run, cfg, params, tok, None, step)

    monkeypatch.setattr(builder, "load_trained", fake_load)
    dest = str(tmp_path / "from_workdir")
    export.export_workdir("/runs/r1", dest, step=7, dtype="float32", max_shard_bytes=64 * 2**10)
    assert calls == [("/runs/r1", 7)]
    a, b = _tensors(out), _tensors(dest)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with open(os.path.join(dest, "processor_config.json")) as f:
        assert json.load(f)["image_processor"]["do_pad"] is True
    adapter_file = export.export_workdir("/runs/r1", str(tmp_path / "adapter"), adapter_only=True, dtype="float32")[0]
    assert os.path.basename(adapter_file) == "mm_projector.safetensors"
