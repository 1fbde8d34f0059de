"""CLIP towers: parity with transformers' CLIPModel (every hidden state, pooled and per-patch
features, both EOS pooling rules), the scanned layout, sharding, and the HF converter (round trip,
the CLIPVisionModel-named image tower used by a Llava export, configs).

Every expected number comes from transformers (PyTorch) run inside the test; none from the code
under test.
"""
import functools
import json
import os

import flax
import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPVisionModel

from sea_jax import sharding
from sea_jax.convert import hf_clip, mapping
from sea_jax.models import clip
from sea_jax.models.clip import CLIP

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
    hidden_act="quick_gelu",
)
# Text width and projection differ from the image width so a swapped tower or projection is a
# shape error; EOS 3 is inside the tiny vocabulary (HF's default 49407 is not).
TEXT = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
    max_position_embeddings=16, hidden_act="quick_gelu", pad_token_id=1, bos_token_id=0, eos_token_id=3,
)
PROJ = 24
EOS = TEXT["eos_token_id"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random CLIPModel (fp32, eval, eager attention) with every weight perturbed (HF inits
    biases to zero and norms to one, which would hide mapping errors), saved as a HF folder."""
    torch.manual_seed(0)
    cfg = HFCLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=PROJ, attn_implementation="eager")
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("hf_clip"))
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def inputs():
    """Images [4, 32, 32, 3] and ids [4, 16] whose EOS sits at different places: early with
    padding after it, last, repeated (pad == EOS, HF pools the first), and absent (HF pools 0)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    L = TEXT["max_position_embeddings"]
    ids = rng.integers(4, TEXT["vocab_size"], size=(4, L)).astype(np.int32)
    ids[0, 5], ids[0, 6:] = EOS, TEXT["pad_token_id"]
    ids[1, L - 1] = EOS
    ids[2, 7:] = EOS
    return images, ids


def _hf_outputs(model, images, ids):
    """Everything the test compares, computed by transformers."""
    with torch.no_grad():
        pix = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
        tok = torch.from_numpy(ids).long()
        v = model.vision_model(pixel_values=pix, output_hidden_states=True)
        t = model.text_model(input_ids=tok, output_hidden_states=True)
        vm = model.vision_model
        return dict(
            v_hidden=[h.numpy() for h in v.hidden_states],
            v_last=v.last_hidden_state.numpy(),
            image_embeds=model.visual_projection(v.pooler_output).numpy(),
            patch=model.visual_projection(vm.post_layernorm(v.last_hidden_state[:, 1:])).numpy(),
            patch_encoded=vm.post_layernorm(v.last_hidden_state[:, 1:]).numpy(),
            encoded=vm.post_layernorm(v.last_hidden_state).numpy(),
            t_hidden=[h.numpy() for h in t.hidden_states],
            t_last=t.last_hidden_state.numpy(),
            text_embeds=model.text_projection(t.pooler_output).numpy(),
            logits=model(input_ids=tok, pixel_values=pix).logits_per_image.numpy(),
        )


# One jitted forward shared by the tests: compiling is most of the cost on a CPU.
@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, images, ids):
    return CLIP(cfg).apply({"params": params}, images, ids)


@pytest.fixture(scope="module")
def loaded(hf):
    """(cfg, params) of the HF folder, plain layout, host arrays."""
    return hf_clip.load_hf_clip(hf[1])


@pytest.fixture(scope="module")
def want(hf, inputs):
    return _hf_outputs(hf[0], *inputs)


def _flat(tree):
    return flax.traverse_util.flatten_dict(tree, sep="/")


# ----------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scanned_remat"])
def test_parity_with_transformers(hf, inputs, want, scan):
    _, folder = hf
    images, ids = inputs
    # The scanned layout also runs its blocks under nn.remat (forward values must not change).
    cfg, params = hf_clip.load_hf_clip(folder, scan=scan, remat=scan)
    assert (cfg.width, cfg.depth, cfg.text_width, cfg.out_dim, cfg.eos_token_id, cfg.scan) == (32, 2, 48, PROJ, EOS, scan)
    if scan:
        assert params["img"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 64)
    out = _forward(cfg, params, images, ids)
    img, txt = out.image, out.text

    # HF numbering, CLS included: [0] = pre_layrnorm(embeddings), [i] = output of layer i-1.
    assert len(img.hidden_states) == len(want["v_hidden"]) == VISION["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(img.hidden_states, want["v_hidden"])):
        assert ours.shape == (4, 1 + cfg.num_patches, 32)
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, err_msg=f"image hidden_states[{i}]")
    np.testing.assert_allclose(np.asarray(img.hidden_states[-1]), want["v_last"], atol=ATOL)
    np.testing.assert_allclose(np.asarray(img.encoded), want["encoded"], atol=ATOL)
    np.testing.assert_allclose(np.asarray(img.pooled), want["image_embeds"], atol=ATOL)
    assert img.patch_embeds.shape == (4, cfg.num_patches, PROJ)
    np.testing.assert_allclose(np.asarray(img.patch_embeds), want["patch"], atol=ATOL)

    assert len(txt.hidden_states) == len(want["t_hidden"]) == TEXT["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(txt.hidden_states, want["t_hidden"])):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, err_msg=f"text hidden_states[{i}]")
    np.testing.assert_allclose(np.asarray(txt.encoded), want["t_last"], atol=ATOL)
    np.testing.assert_allclose(np.asarray(txt.embedding), want["text_embeds"], atol=ATOL)

    np.testing.assert_allclose(np.asarray(out.logits), want["logits"], atol=ATOL)


def test_encoded_patch_features_and_no_hidden_states(loaded, inputs, want):
    cfg, params = loaded
    encode = jax.jit(lambda p, x: CLIP(cfg).apply({"params": p}, x, "encoded", False, method="encode_image"))
    raw = encode(params, inputs[0])
    assert raw.hidden_states is None
    assert raw.patch_embeds.shape == (4, cfg.num_patches, cfg.width)
    np.testing.assert_allclose(np.asarray(raw.patch_embeds), want["patch_encoded"], atol=ATOL)
    np.testing.assert_allclose(np.asarray(raw.pooled), want["image_embeds"], atol=ATOL)


def test_bfloat16_compute_stays_close(loaded, inputs, want):
    """bfloat16 compute (float32 parameters, float32 softmax) stays near transformers' float32."""
    cfg, params = loaded
    out = _forward(cfg.replace(dtype="bfloat16"), params, *inputs)
    assert out.image.pooled.dtype == out.text.embedding.dtype == np.dtype("bfloat16")
    for ours, key in ((out.image.pooled, "image_embeds"), (out.image.patch_embeds, "patch"), (out.text.embedding, "text_embeds")):
        np.testing.assert_allclose(np.asarray(ours, np.float32), want[key], atol=0.1, rtol=0.05, err_msg=key)


def test_eos_positions_both_rules():
    ids = np.array([[0, 9, 3, 1, 1], [0, 5, 7, 7, 3], [0, 3, 3, 3, 3], [0, 5, 6, 8, 9]], np.int32)
    # new rule: first EOS (3), 0 when there is none
    np.testing.assert_array_equal(np.asarray(clip.eos_positions(ids, 3)), [2, 4, 1, 0])
    # legacy rule (eos_token_id == 2): position of the largest id, the first one on ties
    np.testing.assert_array_equal(np.asarray(clip.eos_positions(ids, 2)), [1, 2, 1, 4])


def test_legacy_eos_rule_matches_transformers(hf, loaded, inputs, want):
    model, _ = hf
    cfg, params = loaded
    ids = inputs[1]
    legacy = cfg.replace(eos_token_id=clip.LEGACY_EOS_TOKEN_ID)
    # The two rules pool different tokens on these inputs, so the comparison below means something.
    assert (np.asarray(clip.eos_positions(ids, EOS)) != np.asarray(clip.eos_positions(ids, 2))).any()
    model.text_model.eos_token_id = 2  # HF reads the rule from this attribute at forward time
    try:
        with torch.no_grad():
            t = model.text_model(input_ids=torch.from_numpy(ids).long())
            theirs = model.text_projection(t.pooler_output).numpy()
    finally:
        model.text_model.eos_token_id = EOS
    ours = jax.jit(lambda p, x: CLIP(legacy).apply({"params": p}, x, method="encode_text"))(params, ids)
    np.testing.assert_allclose(np.asarray(ours.embedding), theirs, atol=ATOL)
    assert np.abs(theirs - want["text_embeds"]).max() > 1e-2


def test_wrong_sizes_are_named(loaded):
    cfg, params = loaded
    with pytest.raises(ValueError, match="patch grid"):
        CLIP(cfg).apply({"params": params}, np.zeros((1, 48, 48, 3), np.float32), method="encode_image")
    with pytest.raises(ValueError, match="positions"):
        CLIP(cfg).apply({"params": params}, np.zeros((1, 17), np.int32), method="encode_text")


# ----------------------------------------------------------------------------------------------
# Sharding


def test_sharded_forward_matches_unsharded(hf, loaded, inputs, make_mesh):
    _, folder = hf
    images, ids = inputs
    cfg, host = loaded
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    _, params = hf_clip.load_hf_clip(folder, mesh=mesh)

    # The parameters really are split over the mesh, by the same logical rules as SigLIP's.
    layer = params["img"]["encoder"]["layers_0"]
    assert layer["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["mlp"]["fc1"]["kernel"].addressable_shards[0].data.shape == (cfg.width // 2, cfg.mlp_dim // 2)
    assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["self_attn"]["out_proj"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert params["txt"]["embeddings"]["token_embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["img"]["visual_projection"]["kernel"].sharding.spec == P("fsdp", None)
    assert params["t"].shape == ()

    batch = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))

    # A fresh jit: constrain() acts at trace time, so a trace cached without the mesh must not be reused.
    @jax.jit
    def fwd(params, images, ids):
        with sharding.activation_sharding(mesh):
            return CLIP(cfg).apply({"params": params}, images, ids)

    got = fwd(params, jax.device_put(images, batch), jax.device_put(ids, batch))
    assert got.image.patch_embeds.sharding.spec[0] == ("data", "fsdp")
    ref = _forward(cfg, host, images, ids)
    leaves, ref_leaves = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert len(leaves) == len(ref_leaves) == 3 + 3 + 2 + 3 + 1
    for g, w in zip(leaves, ref_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_init_params_sharded_tree_matches_loader(loaded, make_mesh):
    cfg, host = loaded
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = clip.init_params(cfg, jax.random.key(0), mesh)
    got = {k: (v.shape, v.sharding.spec) for k, v in _flat(params).items()}
    assert set(got) == set(_flat(host))
    for k, v in _flat(host).items():
        assert got[k][0] == v.shape, k
    shardings = _flat(clip.param_shardings(cfg, mesh))
    for k, (_, spec) in got.items():
        assert spec == shardings[k].spec, k
    assert float(params["t"]) == pytest.approx(cfg.logit_scale_init)


# ----------------------------------------------------------------------------------------------
# HF folders


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scanned"])
def test_hf_round_trip_identical_tensors(hf, inputs, want, tmp_path, scan):
    model, folder = hf
    cfg, params = hf_clip.load_hf_clip(folder, scan=scan)
    hf_clip.save_hf_clip(cfg, params, str(tmp_path))
    back, info = CLIPModel.from_pretrained(str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back.eval()
    ref, got = model.state_dict(), back.state_dict()
    assert set(got) == set(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    # The exported config keeps what the numbers depend on (activation, EOS rule, projection).
    c = back.config
    assert (c.projection_dim, c.text_config.eos_token_id, c.vision_config.hidden_act) == (PROJ, EOS, "quick_gelu")
    np.testing.assert_allclose(_hf_outputs(back, *inputs)["text_embeds"], want["text_embeds"], atol=1e-6)


def test_vision_params_export_loads_as_clip_vision_model(hf, loaded, inputs, want, tmp_path):
    """The image tower alone under CLIPVisionModel's names (what a Llava export prefixes): it
    loads with no missing or unexpected tensor and computes the same hidden states."""
    cfg, params = loaded
    plist = hf_clip.clip_vision_params(cfg, name_prefix="")
    assert not any("visual_projection" in p.name for p in plist)
    mapping.save_safetensors(mapping.export(plist, params), str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf_clip.vision_config_to_hf(cfg), f)
    vis, info = CLIPVisionModel.from_pretrained(str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        out = vis.eval()(pixel_values=torch.from_numpy(inputs[0]).permute(0, 3, 1, 2), output_hidden_states=True)
    for i, h in enumerate(out.hidden_states):
        np.testing.assert_allclose(h.numpy(), want["v_hidden"][i], atol=1e-6, err_msg=f"hidden_states[{i}]")
    # Back again: the same tensors.
    tree = mapping.load(plist, mapping.SafetensorsReader(str(tmp_path)))
    for k, v in _flat(tree).items():
        np.testing.assert_array_equal(v, _flat(params)[k], err_msg=k)


def test_loader_rejects_other_configs(hf, tmp_path):
    _, folder = hf
    with pytest.raises(ValueError, match="tensors not used"):
        hf_clip.load_hf_clip(folder, text_depth=1)
    with pytest.raises(ValueError, match="position_embedding"):
        hf_clip.load_hf_clip(folder, image_size=48)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="expected a 'clip'"):
        hf_clip.load_hf_clip(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Configs


def test_config_round_trip_and_validation(hf):
    model, folder = hf
    cfg = hf_clip.config_from_hf(model.config)
    assert (cfg.vocab_size, cfg.text_len, cfg.activation, cfg.layer_norm_eps) == (100, 16, "quick_gelu", 1e-5)
    assert hf_clip.config_from_hf(hf_clip.config_to_hf(cfg)) == cfg
    with open(os.path.join(folder, "config.json")) as f:
        assert hf_clip.config_from_hf(json.load(f)) == cfg
    # a Llava's vision_config alone sets the image tower
    vis = hf_clip.config_from_hf(hf_clip.vision_config_to_hf(cfg))
    assert (vis.width, vis.depth, vis.image_size, vis.patch_size, vis.out_dim) == (32, 2, 32, 8, PROJ)
    bad = hf_clip.config_to_hf(cfg)
    bad["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(NotImplementedError, match="hidden_act"):
        hf_clip.config_from_hf(bad)
    mixed = hf_clip.config_to_hf(cfg)
    mixed["text_config"]["hidden_act"] = "gelu"
    with pytest.raises(NotImplementedError, match="different activations"):
        hf_clip.config_from_hf(mixed)
    with pytest.raises(ValueError, match="activation"):
        cfg.replace(activation="relu")
    with pytest.raises(ValueError, match="patch_features"):
        cfg.replace(patch_features="map")


def test_gelu_variant_matches_transformers(inputs, tmp_path):
    """activation="gelu" (exact GELU, LAION conversions) rather than OpenAI's quick_gelu."""
    torch.manual_seed(1)
    hcfg = HFCLIPConfig(
        vision_config=dict(VISION, hidden_act="gelu"), text_config=dict(TEXT, hidden_act="gelu"),
        projection_dim=PROJ, attn_implementation="eager",
    )
    model = CLIPModel(hcfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    cfg, params = hf_clip.load_hf_clip(str(tmp_path))
    assert cfg.activation == "gelu"
    out = _forward(cfg, params, *inputs)
    ref = _hf_outputs(model, *inputs)
    np.testing.assert_allclose(np.asarray(out.image.patch_embeds), ref["patch"], atol=ATOL)
    np.testing.assert_allclose(np.asarray(out.text.embedding), ref["text_embeds"], atol=ATOL)


def test_named_variants_match_transformers_parameter_count():
    cfg = clip.clip_config("L/14", image_size=336, scan=True)
    got = (cfg.grid, cfg.num_patches, cfg.num_prefix_tokens, cfg.width, cfg.depth, cfg.out_dim, cfg.text_width)
    assert got == (24, 576, 1, 1024, 24, 768, 768)
    assert clip.clip_config("B/16").num_patches == 196
    for c in (cfg, clip.clip_config("B/16", scan=True)):
        with torch.device("meta"):
            theirs = CLIPModel(HFCLIPConfig(**hf_clip.config_to_hf(c)))
        assert clip.num_params(c) == sum(p.numel() for p in theirs.parameters())
    with pytest.raises(ValueError, match="unknown CLIP variant"):
        clip.clip_config("H/14")
