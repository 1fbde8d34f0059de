"""SigLIP towers: parity with transformers' SiglipModel, the per-patch MAP property, sharding, and
the big_vision .npz / HF folder converters (round trips, layouts, resampling, errors).

Every expected number comes from transformers (PyTorch), scipy, or the test's own arrays; none
from the code under test.
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
from transformers import SiglipConfig, SiglipModel

from sea_jax import sharding
from sea_jax.convert import big_vision, hf_siglip
from sea_jax.models import siglip
from sea_jax.models.siglip import MAPHead, SigLIP

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
# Text width differs from the image width so a swapped tower or head shows up as a shape error.
TEXT = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
    max_position_embeddings=16, projection_size=32, pad_token_id=1, bos_token_id=2, eos_token_id=3,
)
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random SiglipModel (fp32, eval) with every weight perturbed (HF inits biases and
    logit_scale to zero, which would hide mapping errors), saved as a HF folder."""
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("hf_siglip"))
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(0, TEXT["vocab_size"], size=(4, TEXT["max_position_embeddings"])).astype(np.int32)
    return images, ids


# One jitted forward (both towers, every hidden state, logits) shared by the tests: compiling is
# most of the cost on a CPU, and equal (cfg, shapes) hit jit's cache.
@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, images, ids):
    return SigLIP(cfg).apply({"params": params}, images, ids)


@pytest.fixture(scope="module")
def loaded(hf):
    """(cfg, params) of the HF folder, plain layout, host arrays."""
    return hf_siglip.load_hf_siglip(hf[1])


def _hf_outputs(model, images, ids):
    with torch.no_grad():
        pix = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
        tok = torch.from_numpy(ids).long()
        v = model.vision_model(pixel_values=pix, output_hidden_states=True)
        t = model.text_model(input_ids=tok, output_hidden_states=True)
        logits = model(input_ids=tok, pixel_values=pix).logits_per_image
    return v, t, logits


def _flat(tree):
    return flax.traverse_util.flatten_dict(tree, sep="/")


# ----------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scanned_remat"])
def test_parity_with_transformers(hf, inputs, scan):
    model, folder = hf
    images, ids = inputs
    # The scanned layout also runs its blocks under nn.remat (forward values must not change).
    cfg, params = hf_siglip.load_hf_siglip(folder, scan=scan, remat=scan)
    assert (cfg.width, cfg.depth, cfg.text_width, cfg.text_depth, cfg.scan) == (32, 3, 48, 2, scan)
    out = _forward(cfg, params, images, ids)
    img, txt = out.image, out.text
    v, t, logits = _hf_outputs(model, images, ids)

    # HF numbering: hidden_states[0] = embeddings, [i] = output of layer i-1; same length.
    assert len(img.hidden_states) == len(v.hidden_states) == VISION["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(img.hidden_states, v.hidden_states)):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=ATOL, err_msg=f"image hidden_states[{i}]")
    np.testing.assert_allclose(np.asarray(img.encoded), v.last_hidden_state.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(img.pooled), v.pooler_output.numpy(), atol=ATOL)

    assert len(txt.hidden_states) == len(t.hidden_states) == TEXT["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(txt.hidden_states, t.hidden_states)):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=ATOL, err_msg=f"text hidden_states[{i}]")
    np.testing.assert_allclose(np.asarray(txt.embedding), t.pooler_output.numpy(), atol=ATOL)

    np.testing.assert_allclose(np.asarray(out.logits), logits.numpy(), atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Per-patch joint-space features


def test_equal_tokens_per_patch_features_equal_pooled(loaded, inputs):
    cfg, params = loaded
    # End to end: a constant image with equal position embeddings makes every patch token equal
    # through every block (attention over equal tokens returns that token's value).
    params = jax.tree.map(np.array, params)
    params["img"]["pos_embedding"][...] = 0.0
    images = np.full((4, 32, 32, 3), 0.3, np.float32)
    images[1], images[2], images[3] = -0.7, 1.0, -1.0
    enc = _forward(cfg, params, images, inputs[1]).image
    want = np.broadcast_to(np.asarray(enc.pooled)[:, None], enc.patch_embeds.shape)
    np.testing.assert_allclose(np.asarray(enc.patch_embeds), want, atol=1e-5)

    # Directly on the head: equal tokens (not all equal across the batch).
    head = MAPHead(width=cfg.width, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads)
    tok = np.random.default_rng(1).normal(size=(3, 1, cfg.width)).astype(np.float32)
    x = np.repeat(tok, 5, axis=1)
    pooled, per = jax.jit(lambda p, x: head.apply({"params": p}, x, per_token=True))(params["img"]["MAPHead_0"], x)
    np.testing.assert_allclose(np.asarray(per), np.broadcast_to(np.asarray(pooled)[:, None], per.shape), atol=1e-5)


def test_per_patch_features_are_not_pooled_on_real_images(hf, loaded, inputs):
    """On distinct tokens each patch gets its own feature (so the property above is not vacuous),
    and the "encoded" option returns the encoder output (HF last_hidden_state)."""
    cfg, params = loaded
    enc = _forward(cfg, params, *inputs).image
    spread = np.abs(np.asarray(enc.patch_embeds) - np.asarray(enc.pooled)[:, None]).max()
    assert spread > 1e-2
    encode = jax.jit(lambda p, x: SigLIP(cfg).apply({"params": p}, x, "encoded", False, method="encode_image"))
    raw = encode(params, inputs[0])
    assert raw.hidden_states is None
    v, _, _ = _hf_outputs(hf[0], inputs[0], inputs[1])
    np.testing.assert_allclose(np.asarray(raw.patch_embeds), v.last_hidden_state.numpy(), atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Sharding


def test_sharded_forward_matches_unsharded(hf, loaded, inputs, make_mesh):
    _, folder = hf
    images, ids = inputs
    cfg, host = loaded
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    _, params = hf_siglip.load_hf_siglip(folder, mesh=mesh)

    # The parameters really are split over the mesh.
    k = params["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert k.sharding.spec == P("fsdp", "tensor")
    assert k.addressable_shards[0].data.shape == (cfg.width // 2, cfg.mlp_dim // 2)
    q = params["img"]["MAPHead_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    e = params["txt"]["Embed_0"]["embedding"]
    assert e.sharding.spec == P("tensor", "fsdp")

    batch = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))

    # A fresh jit: constrain() acts at trace time, so a trace cached without the mesh must not be reused.
    @jax.jit
    def fwd(params, images, ids):
        with sharding.activation_sharding(mesh):
            return SigLIP(cfg).apply({"params": params}, images, ids)

    got = fwd(params, jax.device_put(images, batch), jax.device_put(ids, batch))
    assert got.image.patch_embeds.sharding.spec[0] == ("data", "fsdp")
    want = _forward(cfg, host, images, ids)
    leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(leaves) == len(want_leaves) == 4 + 1 + 4 + 3 + 1
    for g, w in zip(leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Configs


def test_named_variants_match_transformers_parameter_count():
    cfg = siglip.siglip_config("So400m/14", image_size=384, scan=True)
    got = (cfg.grid, cfg.num_patches, cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads)
    assert got == (27, 729, 1152, 27, 4304, 16)
    assert siglip.siglip_config("B/16").num_patches == 196
    assert siglip.siglip_config("L/16", image_size=256).num_patches == 256
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.unbox(siglip.abstract_params(cfg))))
    with torch.device("meta"):
        theirs = SiglipModel(SiglipConfig(**hf_siglip.config_to_hf(cfg)))
    assert ours == sum(p.numel() for p in theirs.parameters())
    with pytest.raises(ValueError, match="unknown SigLIP variant"):
        siglip.siglip_config("Q/16")


def test_config_round_trip_and_validation(hf):
    model, folder = hf
    cfg = hf_siglip.config_from_hf(model.config)
    assert hf_siglip.config_from_hf(hf_siglip.config_to_hf(cfg)) == cfg
    with open(os.path.join(folder, "config.json")) as f:
        assert hf_siglip.config_from_hf(json.load(f)) == cfg
    with pytest.raises(ValueError, match="out_dim"):
        cfg.replace(out_dim=cfg.width + 1)
    bad = hf_siglip.config_to_hf(cfg)
    bad["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(NotImplementedError, match="hidden_act"):
        hf_siglip.config_from_hf(bad)


def test_wrong_image_size_is_named(loaded):
    cfg, params = loaded
    with pytest.raises(ValueError, match="patch grid"):
        SigLIP(cfg).apply({"params": params}, np.zeros((1, 48, 48, 3), np.float32), method="encode_image")


# ----------------------------------------------------------------------------------------------
# HF folder round trip


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scanned"])
def test_hf_round_trip_identical_tensors(hf, tmp_path, scan):
    model, folder = hf
    cfg, params = hf_siglip.load_hf_siglip(folder, scan=scan)
    hf_siglip.save_hf_siglip(str(tmp_path), cfg, params)
    back = SiglipModel.from_pretrained(str(tmp_path)).eval()
    want, got = model.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# ----------------------------------------------------------------------------------------------
# big_vision .npz


def _test_npz(params, cfg, path, scanned: bool, prefix="params/"):
    """Writes a big_vision-style .npz from a plain tree, by the test's own flattening: '/'-joined
    keys, and for the scanned layout encoderblock_{i} stacked into encoderblock [depth, ...]."""
    flat = {k: np.asarray(v) for k, v in _flat(params).items()}
    if scanned:
        out = {}
        for k, v in flat.items():
            parts = k.split("/")
            if len(parts) > 3 and parts[2].startswith("encoderblock_"):
                depth = cfg.depth if parts[0] == "img" else cfg.text_depth
                key = "/".join(parts[:2] + ["encoderblock"] + parts[3:])
                if key not in out:
                    layers = ["/".join(parts[:2] + [f"encoderblock_{i}"] + parts[3:]) for i in range(depth)]
                    out[key] = np.stack([flat[name] for name in layers])
            else:
                out[k] = v
        flat = out
    np.savez(path, **{prefix + k: v for k, v in flat.items()})
    return {prefix + k: v for k, v in flat.items()}


@pytest.mark.parametrize("ckpt_scanned", [False, True], ids=["npz_plain", "npz_scanned"])
def test_big_vision_npz_round_trip(loaded, tmp_path, ckpt_scanned):
    cfg, plain = loaded
    path = str(tmp_path / "ckpt.npz")
    written = _test_npz(plain, cfg, path, ckpt_scanned)
    want = _flat(plain)
    for model_scan in (False, True):
        c = cfg.replace(scan=model_scan)
        tree = big_vision.load_big_vision(path, c)
        got = _flat(tree)
        if model_scan:  # unstack by the test's own code, compare with the plain tree
            assert got["img/Transformer/encoderblock/LayerNorm_0/scale"].shape == (cfg.depth, cfg.width)
            got = _flat(_unstack(got))
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        # save_npz writes back exactly the checkpoint's keys and arrays, in its layout.
        out = str(tmp_path / f"back_{model_scan}.npz")
        big_vision.save_npz(out, tree, c, scan=ckpt_scanned)
        with np.load(out, allow_pickle=False) as z:
            assert set(z.files) == set(written)
            for k in written:
                np.testing.assert_array_equal(z[k], written[k], err_msg=k)
    # Keys without the "params/" prefix load too.
    _test_npz(plain, cfg, path, ckpt_scanned, prefix="")
    got = _flat(big_vision.load_big_vision(path, cfg))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _unstack(flat_scanned: dict) -> dict:
    """A scanned flat dict ('/' keys) as the plain nested tree."""
    out = {}
    for k, v in flat_scanned.items():
        parts = k.split("/")
        if len(parts) > 3 and parts[2] == "encoderblock":
            for i in range(v.shape[0]):
                out["/".join(parts[:2] + [f"encoderblock_{i}"] + parts[3:])] = v[i]
        else:
            out[k] = v
    return flax.traverse_util.unflatten_dict(out, sep="/")


def test_big_vision_errors_name_the_key(loaded, tmp_path):
    cfg, params = loaded
    flat = {"params/" + k: np.asarray(v) for k, v in _flat(params).items()}

    missing = dict(flat)
    del missing["params/txt/head/bias"]
    with pytest.raises(ValueError, match="missing keys: params/txt/head/bias"):
        big_vision.load_big_vision(missing, cfg)

    extra = dict(flat, **{"params/img/head/kernel": np.zeros((32, 10), np.float32)})
    with pytest.raises(ValueError, match="unexpected keys: params/img/head/kernel"):
        big_vision.load_big_vision(extra, cfg)
    assert "img" in big_vision.load_big_vision(extra, cfg, strict=False)

    with pytest.raises(ValueError, match="params/txt/Embed_0/embedding"):
        big_vision.load_big_vision(flat, cfg.replace(vocab_size=101))
    path = str(tmp_path / "scanned.npz")
    _test_npz(params, cfg, path, scanned=True)
    # a plain model reading slices of the scanned tensors still names the stacked tensor
    with pytest.raises(ValueError, match="params/txt/Encoder_0/encoderblock/MlpBlock_0/Dense_0/bias: per-layer shape"):
        big_vision.load_big_vision(path, cfg.replace(text_mlp_dim=72))

    np.save(str(tmp_path / "obj.npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.replace(str(tmp_path / "obj.npy"), str(tmp_path / "obj.npz"))
    with pytest.raises(ValueError, match="obj.npz"):
        big_vision.load_big_vision(str(tmp_path / "obj.npz"), cfg)


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling


def test_posemb_resampling_matches_big_vision_zoom(hf, loaded, tmp_path):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    cfg, params = loaded  # 4x4 grid
    old = np.asarray(params["img"]["pos_embedding"])
    # big_vision's resample_posemb: scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1).
    want = scipy_ndimage.zoom(old.reshape(4, 4, -1), (6 / 4, 6 / 4, 1), order=1).reshape(1, 36, -1)

    np.testing.assert_allclose(siglip.resample_posemb(old, 6), want, atol=1e-6)
    big = cfg.replace(image_size=48)  # 6x6 grid
    path = str(tmp_path / "ckpt.npz")
    _test_npz(params, cfg, path, scanned=False)
    got = big_vision.load_big_vision(path, big)["img"]["pos_embedding"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    big_cfg, from_hf = hf_siglip.load_hf_siglip(hf[1], image_size=48)
    assert big_cfg.num_patches == 36
    np.testing.assert_allclose(from_hf["img"]["pos_embedding"], want, atol=1e-6)
