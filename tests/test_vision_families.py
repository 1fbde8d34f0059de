"""The paper's other model rows through the whole model and the export: Gemma's input scale applied
to the visual tokens (the paper's code, transformers 4) and folded into the export; a CLIP tower
(LLaVA-1.5's CLS-dropping feature selection) exported to and imported from an HF Llava folder."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llava_testlib as lib
from sea_jax.convert import hf_llava, hf_llm
from sea_jax.models import clip
from sea_jax.models.mllm import MLLM, MLLMConfig


def _batch(cfg, seed=0, text=6):
    rng = np.random.default_rng(seed)
    p = cfg.num_image_tokens
    ids = np.concatenate([[2], [cfg.image_token_id] * p, rng.integers(6, 100, size=text)]).astype(np.int32)[None]
    pixels = rng.uniform(-1, 1, size=(1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return pixels, ids


def test_scaled_visual_tokens_are_transformers_4_gemma(tmp_path):
    """With ``scale_visual_tokens`` our forward equals HF Gemma fed ``inputs_embeds`` in which every
    row, visual tokens included, was multiplied by sqrt(hidden) (what LLaVA on transformers 4 fed
    its Gemma); without it the visual rows are unscaled."""
    from transformers import AutoModelForCausalLM

    base = lib.mllm_config("gemma")
    params = lib.init_params(base, seed=3)
    hf_llm.save_hf_llm(base.llm, params["llm"], str(tmp_path / "gemma"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gemma")).eval()
    pixels, ids = _batch(base)
    jp = jax.tree.map(jnp.asarray, params)
    for scaled in (True, False):
        cfg = MLLMConfig(base.llm, base.vision, base.image_token_id, scale_visual_tokens=scaled)
        model = MLLM(cfg)
        got = np.asarray(model(jp, pixels, ids).logits)
        tokens = np.asarray(model.visual_tokens(jp["adapter"], model.encode_images(jp["vision"], pixels)))
        emb = np.asarray(params["llm"]["embedder"]["embedding"])[ids[0]]
        is_image = ids[0] == cfg.image_token_id
        emb[is_image] = tokens[0]
        normalizer = np.float32(math.sqrt(cfg.llm.hidden))
        embeds = emb * normalizer  # every row, as transformers 4's GemmaModel
        if not scaled:
            embeds[is_image] = tokens[0]  # transformers 5: the visual rows as the adapter wrote them
        with torch.no_grad():
            want = hf(inputs_embeds=torch.from_numpy(embeds[None])).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"scaled={scaled}")
    assert MLLMConfig(base.llm, base.vision, 0, scale_visual_tokens=True).visual_token_scale == math.sqrt(32)
    llama = lib.mllm_config("llama")
    assert MLLMConfig(llama.llm, llama.vision, 0, scale_visual_tokens=True).visual_token_scale == 1.0


def test_folded_export_gives_transformers_5_the_same_logits_and_imports_back(tmp_path):
    from transformers import AutoModelForImageTextToText

    base = lib.mllm_config("gemma")
    cfg = MLLMConfig(base.llm, base.vision, base.image_token_id, scale_visual_tokens=True)
    params = lib.init_params(cfg, seed=4)
    out = str(tmp_path / "llava")
    hf_llava.export_llava(cfg, params, lib.make_tokenizer(), out, pad_to_square=False)
    pixels, ids = _batch(cfg, seed=1)
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits
    got = MLLM(cfg)(jax.tree.map(jnp.asarray, params), pixels, ids).logits
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=1e-4)
    # the folder's adapter holds the factor; import takes it out again
    cfg2, back, _ = hf_llava.import_llava(out, dtype=jnp.dtype("float32"))
    assert cfg2.scale_visual_tokens and cfg2.visual_token_scale == cfg.visual_token_scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 back["adapter"], params["adapter"])
    np.testing.assert_allclose(np.asarray(MLLM(cfg2)(back, pixels, ids).logits), want.numpy(), atol=1e-4, rtol=1e-4)


def _clip_mllm():
    vision = clip.clip_config("B/16", image_size=16, patch_size=4, width=32, depth=3, mlp_dim=64, num_heads=4,
                              vocab_size=64, text_len=8, text_width=32, text_depth=1, text_mlp_dim=64,
                              text_num_heads=4, out_dim=24, eos_token_id=3)
    return MLLMConfig(lib.llm_config("llama"), vision, lib.IMAGE_ID)


def test_clip_tower_exports_to_a_llava_transformers_loads_and_imports_back(tmp_path):
    """A CLIP tower: 16 patch tokens after the CLS one is dropped (LLaVA-1.5's ``default``
    strategy); the exported Llava (CLIPVisionModel tower) gives our logits, and import gives our
    parameters back (the labels' visual projection is not part of a Llava: it comes back zero)."""
    from transformers import AutoModelForImageTextToText

    cfg = _clip_mllm()
    assert cfg.num_image_tokens == 16
    params = lib.init_params(cfg, seed=5)
    out = str(tmp_path / "clip_llava")
    hf_llava.export_llava(cfg, params, lib.make_tokenizer(), out, pad_to_square=False)
    hf, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.vision_feature_select_strategy == "default"
    pixels, ids = _batch(cfg, seed=2)
    with torch.no_grad():
        want = hf.eval()(input_ids=torch.from_numpy(ids).long(),
                         pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits.numpy()
    jp = jax.tree.map(jnp.asarray, params)
    np.testing.assert_allclose(np.asarray(MLLM(cfg)(jp, pixels, ids).logits), want, atol=1e-4, rtol=1e-4)
    cfg2, back, _ = hf_llava.import_llava(out, dtype=jnp.dtype("float32"))
    assert isinstance(cfg2.vision, clip.CLIPConfig) and cfg2.num_image_tokens == 16
    np.testing.assert_allclose(np.asarray(MLLM(cfg2)(back, pixels, ids).logits), want, atol=1e-4, rtol=1e-4)
    assert not np.asarray(back["vision"]["img"]["visual_projection"]["kernel"]).any()
    back_img = {k: v for k, v in back["vision"]["img"].items() if k != "visual_projection"}
    orig_img = {k: v for k, v in params["vision"]["img"].items() if k != "visual_projection"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back_img, orig_img)


def test_s2_features_feed_the_adapter_and_the_labels_read_the_base_scale():
    from sea_jax.models import s2

    base = _clip_mllm()
    cfg = MLLMConfig(base.llm, base.vision, base.image_token_id, s2=s2.S2Config((16, 32)))
    assert cfg.adapter_in_dim == 2 * 32 and cfg.image_size == 32 and cfg.num_image_tokens == 16
    params = lib.init_params(cfg, seed=6)
    pixels, ids = _batch(cfg, seed=3)
    model = MLLM(cfg)
    jp = jax.tree.map(jnp.asarray, params)
    feats = model.encode_images(jp["vision"], pixels)
    tower = clip.ImageTower(cfg.vision)
    fn = s2.hidden_state_fn(tower, jp["vision"]["img"], -2)
    np.testing.assert_allclose(np.asarray(feats.features), np.asarray(s2.s2_features(fn, pixels, cfg.s2)), atol=1e-6)
    base_enc = tower.apply({"params": jp["vision"]["img"]}, s2.base_images(pixels, cfg.s2))
    np.testing.assert_allclose(np.asarray(feats.patch_embeds), np.asarray(base_enc.patch_embeds), atol=1e-6)
    assert model(jp, pixels, ids).logits.shape == (1, ids.shape[1], cfg.llm.vocab_size)
    with pytest.raises(NotImplementedError, match="S2"):
        hf_llava.llava_config(cfg)


@pytest.mark.parametrize("family", ["siglip", "clip"])
@pytest.mark.parametrize("scan,remat", [(False, False), (True, False), (True, True)])
def test_keeping_one_hidden_state_equals_collecting_all(family, scan, remat):
    """``keep_hidden=k`` computes hidden state k (the others None) equal to collecting every
    layer's, with the same parameter tree: the step reads one layer without the stack of all."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from sea_jax.models import clip, siglip

    small = dict(image_size=32, width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=8, scan=scan)
    if family == "siglip":
        mod, cfg = siglip, siglip.siglip_config("B/16", out_dim=32, **small)
    else:
        mod, cfg = clip, clip.clip_config("B/16", **small)
    tower = mod.ImageTower(dataclasses.replace(cfg, remat=remat))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    params = tower.init(jax.random.key(0), x)["params"]
    full = tower.apply({"params": params}, x, hidden_states=True)
    for k in (-2, -1, 0, 1):
        one = tower.apply({"params": params}, x, hidden_states=False, keep_hidden=k)
        assert [h is not None for h in one.hidden_states] == [i == k % 4 for i in range(4)]
        np.testing.assert_allclose(np.asarray(one.hidden_states[k]), np.asarray(full.hidden_states[k]),
                                   rtol=1e-6, atol=1e-6)
    kept = tower.init(jax.random.key(0), x, hidden_states=False, keep_hidden=-2)["params"]
    assert jax.tree.structure(kept) == jax.tree.structure(params)


def test_s2_model_exports_its_parts_that_transformers_loads(tmp_path):
    """No transformers class computes S2 features, so an S2 model exports as parts: the LLM
    (AutoModelForCausalLM gives our text logits), the CLIP tower (CLIPVisionModel gives our hidden
    states), the adapter (LLaVA's names, input 2 x width here) and s2.json saying how they fit."""
    import json as json_lib

    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPModel

    from sea_jax.models import s2

    base = _clip_mllm()
    cfg = MLLMConfig(base.llm, base.vision, base.image_token_id, s2=s2.S2Config((16, 32)))
    params = lib.init_params(cfg, seed=7)
    tok = lib.make_tokenizer()
    files = hf_llava.export_parts(cfg, params, tok, str(tmp_path))
    assert all(os.path.exists(f) for f in files)
    meta = json_lib.load(open(tmp_path / hf_llava.S2_FILE))
    assert meta["s2_scales"] == [16, 32] and meta["vision_feature_layer"] == cfg.vision_feature_layer
    assert meta["num_image_tokens"] == cfg.num_image_tokens and meta["image_token_id"] == cfg.image_token_id
    pixels, ids = _batch(cfg, seed=4)
    jp = jax.tree.map(jnp.asarray, params)
    # the LLM: text-only logits
    text_ids = np.where(np.asarray(ids) == cfg.image_token_id, 3, np.asarray(ids))
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    with torch.no_grad():
        want = llm(torch.from_numpy(text_ids).long()).logits.numpy()
    from sea_jax.models.llm import LLM

    got = LLM(cfg.llm).apply({"params": jp["llm"]}, jnp.asarray(text_ids)).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "llm").convert_tokens_to_ids("<image>") == cfg.image_token_id
    # the tower: the hidden state the adapter reads, at the base scale
    vis = CLIPModel.from_pretrained(tmp_path / "vision").vision_model.eval()
    base_px = np.asarray(s2.base_images(pixels, cfg.s2))
    with torch.no_grad():
        hs = vis(torch.from_numpy(base_px).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
    ours = clip.ImageTower(cfg.vision).apply({"params": jp["vision"]["img"]}, jnp.asarray(base_px))
    np.testing.assert_allclose(np.asarray(ours.hidden_states[cfg.vision_feature_layer]),
                               hs[cfg.vision_feature_layer].numpy(), atol=1e-4, rtol=1e-4)
    # the adapter: LLaVA's names, [out, in] with the 2-scale input width
    adapter = load_file(str(tmp_path / hf_llava.ADAPTER_FILE))
    np.testing.assert_array_equal(adapter["model.mm_projector.0.weight"],
                                  np.asarray(params["adapter"]["linear_1"]["kernel"]).T)
    assert adapter["model.mm_projector.0.weight"].shape[1] == cfg.adapter_in_dim == 2 * cfg.vision.width
