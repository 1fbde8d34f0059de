"""S2 multi-scale wrapper: resampling against PyTorch's ``F.interpolate`` (bicubic, area), tile
split/merge, and the whole wrapper against a PyTorch implementation of s2wrapper's semantics
(written here) around transformers' CLIP vision model, on a tiny tower (base 32 px, scales 32/64/96).
"""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel

from sea_jax.convert import hf_clip
from sea_jax.models import s2
from sea_jax.models.clip import ImageTower

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
    hidden_act="quick_gelu",
)
TEXT = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
    max_position_embeddings=16, eos_token_id=3, bos_token_id=0, pad_token_id=1,
)
CFG = s2.S2Config(scales=(32, 64, 96))
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random CLIPModel (every weight perturbed) and (cfg, params) loaded from its folder."""
    torch.manual_seed(0)
    model = CLIPModel(
        HFCLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24, attn_implementation="eager")
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("hf_clip_s2"))
    model.save_pretrained(folder)
    cfg, params = hf_clip.load_hf_clip(folder)
    return model, cfg, params


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _torch_s2(vision_model, images, scales, layer=-2):
    """s2wrapper.forward(model, images, img_sizes=scales, max_split_size=scales[0]) with LLaVA's
    feature selection (hidden_states[layer] without CLS), re-implemented in PyTorch: bicubic
    resize per scale, tiles stacked tile-major on the batch axis, run, merge, area-resize to the
    base grid, concatenate on channels. images [b, h, w, 3] numpy -> [b, g*g, len(scales)*d]."""
    x0 = _nchw(images)
    b, base = x0.shape[0], scales[0]
    outs = []
    with torch.no_grad():
        for s in scales:
            x = F.interpolate(x0.float(), size=(s, s), mode="bicubic")
            k = s // base
            tiles = torch.cat(
                [x[:, :, i * base:(i + 1) * base, j * base:(j + 1) * base] for i in range(k) for j in range(k)], dim=0
            )
            f = vision_model(pixel_values=tiles, output_hidden_states=True).hidden_states[layer][:, 1:]
            g = round(f.shape[1] ** 0.5)
            f = f.reshape(f.shape[0], g, g, -1).permute(0, 3, 1, 2)
            grid = torch.cat(
                [torch.cat([f[(i * k + j) * b:(i * k + j + 1) * b] for j in range(k)], dim=-1) for i in range(k)],
                dim=-2,
            )
            outs.append(grid)
        size = outs[0].shape[-2:]
        out = torch.cat([F.interpolate(o, size=size, mode="area") for o in outs], dim=1)
    return out.flatten(2).transpose(1, 2).numpy()


# ----------------------------------------------------------------------------------------------
# Pieces


def test_resize_bicubic_matches_torch():
    rng = np.random.default_rng(0)
    # down by 3 (S2's base image), up by 2 and 3, a non-integer ratio each way, same size, and
    # large sizes where float32 source coordinates matter.
    for h_in, h_out in [(96, 32), (32, 64), (32, 96), (50, 32), (20, 33), (32, 32), (80, 96), (336, 1008)]:
        x = rng.normal(size=(2, h_in, h_in, 3)).astype(np.float32)
        want = F.interpolate(_nchw(x), size=(h_out, h_out), mode="bicubic").permute(0, 2, 3, 1).numpy()
        got = np.asarray(s2.resize_bicubic(x, h_out))
        assert got.shape == (2, h_out, h_out, 3)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{h_in} -> {h_out}")
    # non-square target
    x = rng.normal(size=(1, 40, 24, 3)).astype(np.float32)
    want = F.interpolate(_nchw(x), size=(30, 50), mode="bicubic").permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(s2.resize_bicubic(x, (30, 50))), want, atol=1e-5)


def test_pool_area_matches_torch():
    rng = np.random.default_rng(1)
    for n, k in [(8, 2), (12, 3), (4, 1)]:
        x = rng.normal(size=(2, n, n, 5)).astype(np.float32)
        want = F.interpolate(_nchw(x), size=(n // k, n // k), mode="area").permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(s2.pool_area(x, n // k)), want, atol=1e-6)
    with pytest.raises(ValueError, match="integer factors"):
        s2.pool_area(np.zeros((1, 10, 10, 1), np.float32), 4)


def test_split_and_merge_tiles():
    b, k, s = 2, 3, 4
    # Pixel value = (image, row, col), so any misplaced pixel shows.
    n, r, c = np.meshgrid(np.arange(b), np.arange(k * s), np.arange(k * s), indexing="ij")
    images = np.stack([n, r, c], axis=-1).astype(np.float32)
    tiles = np.asarray(s2.split_tiles(images, k))
    assert tiles.shape == (b * k * k, s, s, 3)
    for img in range(b):
        for i in range(k):
            for j in range(k):
                want = images[img, i * s:(i + 1) * s, j * s:(j + 1) * s]
                np.testing.assert_array_equal(tiles[img * k * k + i * k + j], want)
    # A "tower" whose tokens are its pixels (g = s): merging gives the image back.
    merged = np.asarray(s2.merge_tiles(tiles.reshape(b * k * k, s * s, 3), k))
    np.testing.assert_array_equal(merged, images)
    with pytest.raises(ValueError, match="square tiles"):
        s2.split_tiles(images[:, :, :-1], k)


def test_config_validation():
    cfg = s2.S2Config()
    assert (cfg.base_size, cfg.image_size, cfg.splits) == (336, 1008, (1, 2, 3))
    with pytest.raises(ValueError, match="multiples"):
        s2.S2Config(scales=(336, 500))
    with pytest.raises(ValueError, match="increasing"):
        s2.S2Config(scales=(672, 336))


# ----------------------------------------------------------------------------------------------
# The wrapper


@pytest.mark.parametrize("size", [96, 80], ids=["largest_scale_input", "other_size_input"])
@pytest.mark.parametrize("sequential", [False, True], ids=["batched", "sequential"])
def test_s2_matches_torch_s2wrapper(hf, size, sequential):
    model, cfg, params = hf
    rng = np.random.default_rng(size)
    images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    c = CFG.replace(sequential=sequential)
    tower = ImageTower(cfg)
    run = jax.jit(lambda p, x: s2.s2_features(s2.hidden_state_fn(tower, p), x, c))
    got = np.asarray(run(params["img"], images))
    assert got.shape == (2, cfg.num_patches, len(c.scales) * cfg.width)
    want = _torch_s2(model.vision_model, images, c.scales)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # Each scale contributes its own block (the scales are not copies of one another).
    d = cfg.width
    assert np.abs(got[..., :d] - got[..., d:2 * d]).max() > 1e-2


def test_s2_encode_gives_features_and_base_labels(hf):
    model, cfg, params = hf
    images = np.random.default_rng(3).normal(size=(2, 96, 96, 3)).astype(np.float32)
    tower = ImageTower(cfg)
    feats, base = jax.jit(lambda p, x: s2.s2_encode(tower, p, x, CFG))(params["img"], images)
    np.testing.assert_allclose(np.asarray(feats), _torch_s2(model.vision_model, images, CFG.scales), atol=ATOL)
    # Labels' features: the base-scale image (torch bicubic 96 -> 32) through the tower, each patch
    # token through post_layernorm and visual_projection.
    with torch.no_grad():
        x = F.interpolate(_nchw(images), size=(32, 32), mode="bicubic")
        last = model.vision_model(pixel_values=x).last_hidden_state
        want = model.visual_projection(model.vision_model.post_layernorm(last[:, 1:])).numpy()
    assert base.patch_embeds.shape == (2, cfg.num_patches, 24)
    np.testing.assert_allclose(np.asarray(base.patch_embeds), want, atol=ATOL)
