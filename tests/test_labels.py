"""Semantic labels: word lists, the cached word table, per-patch top-n (plain, chunked, sharded)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.align import semantic_labels as labels


# ----------------------------------------------------------------------------------------------
# brute-force reference


def reference_top(feats, table, n, negate=False):
    """numpy float64: cosine, rank by (score desc, id asc), keep n; valid = score > 0."""
    f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    t = table / np.linalg.norm(table, axis=-1, keepdims=True)
    score = np.einsum("bpd,wd->bpw", f.astype(np.float64), t.astype(np.float64))
    if negate:
        score = -score
    b, p, w = score.shape
    ids = np.empty((b, p, n), np.int64)
    for i in range(b):
        for j in range(p):
            order = np.lexsort((np.arange(w), -score[i, j]))  # last key primary: score desc
            ids[i, j] = order[:n]
    top = np.take_along_axis(score, ids, axis=-1)
    return ids, top, top > 0


def _random(seed, b=3, p=5, w=50, d=16):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(b, p, d)).astype(np.float32) * rng.uniform(0.5, 3, size=(b, p, 1))
    table = rng.normal(size=(w, d)).astype(np.float32)
    return feats, table


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7, 64])
def test_top_labels_matches_bruteforce(negate, chunk_size):
    feats, table = _random(0)
    ids, scores, valid = labels.top_labels(feats, table, n=30, negate_similarity=negate,
                                           chunk_size=chunk_size)
    assert ids.dtype == jnp.int32 and scores.dtype == jnp.float32 and valid.dtype == jnp.bool_
    assert ids.shape == scores.shape == valid.shape == (3, 5, 30)
    r_ids, r_scores, r_valid = reference_top(feats, table, 30, negate)
    np.testing.assert_array_equal(np.asarray(ids), r_ids)
    np.testing.assert_allclose(np.asarray(scores), r_scores, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid), r_valid)
    # 30 of 50 random words: both kept and dropped (score <= 0) labels occur
    assert 0 < np.asarray(valid).sum() < valid.size


def test_sign_option_ranks_by_minus_cosine_and_scores_are_positive_weights():
    feats, table = _random(1)
    ids_p, scores_p, _ = labels.top_labels(feats, table, n=50)
    ids_n, scores_n, valid_n = labels.top_labels(feats, table, n=5, negate_similarity=True)
    # negated = the 5 words of lowest cosine, most negative first, with score = -cos
    np.testing.assert_array_equal(np.asarray(ids_n), np.asarray(ids_p)[..., ::-1][..., :5])
    np.testing.assert_allclose(np.asarray(scores_n), -np.asarray(scores_p)[..., ::-1][..., :5], atol=1e-6)
    # the kept labels (valid) all have positive weight: usable directly as Eq. 7's S_i
    assert np.all(np.asarray(scores_n)[np.asarray(valid_n)] > 0)
    assert np.asarray(valid_n).any()


def test_scores_at_or_below_zero_are_dropped():
    d = 4
    e = np.eye(d, dtype=np.float32)
    # word 0 = e0 (cos 1), 1 = -e0 (cos -1), 2 = e1 (cos exactly 0), 3 = e0+e1 (cos .707), 4 = -e1
    table = np.stack([e[0], -e[0], e[1], e[0] + e[1], -e[1]])
    feats = e[0][None, None]  # one image, one patch, pointing at e0
    ids, scores, valid = labels.top_labels(feats, table, n=5)
    assert np.asarray(ids).tolist() == [[[0, 3, 2, 4, 1]]]  # 2 and 4 tie at 0: lower id first
    np.testing.assert_allclose(np.asarray(scores)[0, 0], [1, 2 ** -0.5, 0, 0, -1], atol=1e-6)
    assert np.asarray(valid).tolist() == [[[True, True, False, False, False]]]  # 0 is dropped too
    ids, scores, valid = labels.top_labels(feats, table, n=3, negate_similarity=True)
    assert np.asarray(ids).tolist() == [[[1, 2, 4]]]
    assert np.asarray(valid).tolist() == [[[True, False, False]]]


def test_ties_go_to_lower_id():
    # one-hot rows make every dot product exact, so duplicated rows tie exactly
    d = 6
    e = np.eye(d, dtype=np.float32)
    table = np.stack([e[1], e[0], e[2], e[0], e[1], e[0], e[3]])  # e0 at ids 1, 3, 5; e1 at 0, 4
    feats = np.array([[[3.0, 2.0, 0.5, 0, 0, 0]]], np.float32)
    ids, _, _ = labels.top_labels(feats, table, n=6)
    assert np.asarray(ids).tolist() == [[[1, 3, 5, 0, 4, 2]]]
    ids, _, _ = labels.top_labels(feats, table, n=6, chunk_size=2)
    assert np.asarray(ids).tolist() == [[[1, 3, 5, 0, 4, 2]]]


@pytest.mark.parametrize("w,k,block", [(4000, 10, 32), (4096, 10, 64), (1000, 3, 7), (320, 10, 32), (50, 10, 32)])
def test_top_k_blocked_equals_lax_top_k_with_ties(w, k, block):
    # Few distinct values, so ties are everywhere: the blocked top-k must keep lax.top_k's values
    # and its lower-index-first order exactly, including across block boundaries.
    rng = np.random.default_rng(w + k)
    x = jnp.asarray(rng.integers(0, 12, size=(3, 5, w)).astype(np.float32))
    x = x.at[0, 0].set(0.0).at[0, 1, -block:].set(99.0)  # all tied; the top clustered in the last block
    # A tie between blocks chosen out of index order: the later block has the larger maximum.
    hi, lo = min(3, (w - 1) // block) * block, 0
    x = x.at[0, 2].set(-1.0).at[0, 2, hi].set(50.0).at[0, 2, hi + 1].set(40.0)
    x = x.at[0, 2, lo].set(45.0).at[0, 2, lo + 1].set(40.0)
    want_v, want_i = jax.lax.top_k(x, k)
    got_v, got_i = jax.jit(lambda a: labels.top_k_blocked(a, k, block))(x)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_array_equal(got_i, want_i)
    y = jnp.asarray(rng.normal(size=(4, w)).astype(np.float32))  # and on distinct values
    np.testing.assert_array_equal(labels.top_k_blocked(y, k, block)[1], jax.lax.top_k(y, k)[1])


def test_num_words_masks_padding_rows_and_argument_checks():
    feats, table = _random(2, w=20)
    padded = np.concatenate([table, feats[0, :3]])  # padding rows identical to patches: cos 1
    ids, scores, _ = labels.top_labels(feats, padded, n=4, num_words=20)
    r_ids, r_scores, _ = reference_top(feats, table, 4)
    np.testing.assert_array_equal(np.asarray(ids), r_ids)
    with pytest.raises(ValueError, match="num_words"):
        labels.top_labels(feats, table, n=21)
    with pytest.raises(ValueError, match="does not match"):
        labels.top_labels(feats, table[:, :8], n=2)


def test_top_labels_is_jittable_inside_a_larger_program():
    feats, table = _random(3)

    @jax.jit
    def f(x, t):
        ids, scores, valid = labels.top_labels(x * 2.0, t, n=3)
        return jnp.sum(jnp.where(valid, scores, 0.0)), ids

    total, ids = f(feats, table)
    r_ids, r_scores, r_valid = reference_top(feats, table, 3)
    np.testing.assert_array_equal(np.asarray(ids), r_ids)
    np.testing.assert_allclose(float(total), np.sum(np.where(r_valid, r_scores, 0)), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# sharded == unsharded


@pytest.mark.parametrize(
    "word_axes,chunk_size,negate",
    [(None, None, False), (None, 5, True), ("tensor", None, False), (("fsdp", "tensor"), None, True),
     ((), None, False)],
)
def test_sharded_equals_unsharded(make_mesh, word_axes, chunk_size, negate):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    feats, table = _random(4, b=6, p=3, w=61, d=24)  # 6 images over 4 batch shards, 61 words over 8
    want = labels.top_labels(feats, table, n=9, negate_similarity=negate)
    got = labels.sharded_top_labels(feats, table, mesh, n=9, negate_similarity=negate,
                                    word_axes=word_axes, chunk_size=chunk_size)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


def test_sharded_ties_and_presharded_table(make_mesh):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    d = 8
    e = np.eye(d, dtype=np.float32)
    # 13 words over 8 shards of 2 rows: equal rows land in different shards
    rows = [0, 1, 0, 2, 1, 0, 3, 0, 2, 1, 4, 0, 3]
    table = e[rows]
    feats = np.tile(np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0, 0, 0], np.float32), (4, 2, 1))
    feats[1, 0] = e[3] * 2  # a different patch
    sharded_table, num_words = labels.shard_word_table(table, mesh)
    assert sharded_table.shape == (16, d) and num_words == 13
    got = labels.sharded_top_labels(feats, sharded_table, mesh, n=10, num_words=num_words)
    want = labels.top_labels(feats, table, n=10)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert np.asarray(want[0])[0, 0, :6].tolist() == [0, 2, 5, 7, 11, 1]
    # padding rows (ids 13-15) are zero vectors: never labels, even where real scores are 0
    assert np.asarray(got[0]).max() < 13


def test_sharded_under_outer_jit_keeps_batch_sharding(make_mesh):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    feats, table = _random(5, b=8, p=2, w=40)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    x = jax.device_put(feats, batch_sharding)

    @jax.jit
    def f(x, t):
        return labels.sharded_top_labels(x, t, mesh, n=4, word_axes="tensor")

    ids, scores, valid = f(x, table)
    assert ids.sharding.is_equivalent_to(batch_sharding, 3)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(labels.top_labels(feats, table, n=4)[0]))


# ----------------------------------------------------------------------------------------------
# word lists


def test_load_word_list(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# header comment\ndog\n  cat  \n\ndog\nhouse\r\n\tsky\n", encoding="utf-8")
    assert labels.load_word_list(path) == ["dog", "cat", "house", "sky"]


def test_load_word_list_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("dog\ncat\nice cream\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:3: .*'ice cream'"):
        labels.load_word_list(path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        labels.load_word_list(empty)
    with pytest.raises(FileNotFoundError):
        labels.load_word_list(tmp_path / "missing.txt")


def test_default_word_list():
    words = labels.default_word_list()
    assert len(words) == 40_000 == len(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 2 for w in words)
    assert {"dog", "house", "tree", "water", "car"} <= set(words[:5000])
    assert labels.default_word_list(100) == words[:100]  # frequency order: a prefix
    assert labels.resolve_word_list("default", 50) == words[:50]


# ----------------------------------------------------------------------------------------------
# embedding + cache


class CountingEncoder:
    """A deterministic fake text tower: embedding = a fixed projection of the token ids."""

    def __init__(self, dim=12, length=5):
        self.calls = []
        self.proj = np.random.default_rng(0).normal(size=(length, dim)).astype(np.float32)

    def __call__(self, ids):
        self.calls.append(np.asarray(ids).shape)
        return jnp.asarray((np.asarray(ids, np.float32) + 1.0) @ self.proj)


def fake_tokenize(words):
    return np.array([[len(w), ord(w[0]), ord(w[-1]), sum(map(ord, w)) % 97, 0] for w in words], np.int32)


def test_embed_words_batches_and_normalises():
    enc = CountingEncoder()
    words = [f"w{'x' * i}" for i in range(11)]
    table = labels.embed_words(enc, fake_tokenize, words, batch_size=4, progress=False)
    assert table.shape == (11, 12) and table.dtype == np.float32
    assert enc.calls == [(4, 5)] * 3  # last batch padded to 4 rows: one compiled shape
    np.testing.assert_allclose(np.linalg.norm(table, axis=-1), 1.0, atol=1e-6)
    direct = np.asarray(enc(fake_tokenize(words)))
    np.testing.assert_allclose(table, direct / np.linalg.norm(direct, axis=-1, keepdims=True), atol=1e-6)


def test_embed_words_cache_hit_and_miss(tmp_path):
    cache = tmp_path / "cache"
    words = ["dog", "cat", "sky", "sea", "tree"]
    enc = CountingEncoder()
    kw = dict(batch_size=2, cache_dir=cache, progress=False)
    first = labels.embed_words(enc, fake_tokenize, words, checkpoint_id="ckpt-a", tokenizer_id="tok", **kw)
    assert len(enc.calls) == 3
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no temp left
    meta = json.loads((cache / files[0]).read_text())
    assert meta["num_words"] == 5 and meta["checkpoint_id"] == "ckpt-a"

    again = labels.embed_words(enc, fake_tokenize, words, checkpoint_id="ckpt-a", tokenizer_id="tok", **kw)
    assert len(enc.calls) == 3  # hit: the encoder is not called
    np.testing.assert_array_equal(again, first)

    # each part of the key invalidates: checkpoint, tokenizer, word list (order included)
    for ckpt, tok, ws in [("ckpt-b", "tok", words), ("ckpt-a", "tok2", words),
                          ("ckpt-a", "tok", words[::-1]), ("ckpt-a", "tok", words + ["sun"])]:
        n_calls = len(enc.calls)
        labels.embed_words(enc, fake_tokenize, ws, checkpoint_id=ckpt, tokenizer_id=tok, **kw)
        assert len(enc.calls) > n_calls, (ckpt, tok, ws)
    assert len(os.listdir(cache)) == 10

    # a torn entry (npy without matching metadata) is a miss, then repaired
    npy, meta_path = labels.word_table_cache_paths(cache, "ckpt-a", "tok", words)
    with open(meta_path, "w") as f:
        f.write("{not json")
    n_calls = len(enc.calls)
    repaired = labels.embed_words(enc, fake_tokenize, words, checkpoint_id="ckpt-a", tokenizer_id="tok", **kw)
    assert len(enc.calls) > n_calls
    np.testing.assert_array_equal(repaired, first)
    assert json.loads(open(meta_path).read())["num_words"] == 5

    with pytest.raises(ValueError, match="checkpoint_id"):
        labels.embed_words(enc, fake_tokenize, words, cache_dir=cache, progress=False)


def test_file_identity(tmp_path):
    a = tmp_path / "ckpt"
    a.mkdir()
    (a / "model.safetensors").write_bytes(os.urandom(3 << 20))  # > 2 sampled MiB
    (a / "config.json").write_text("{}")
    ident = labels.file_identity(a)
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    assert labels.file_identity(b) == ident  # path and mtime independent
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "model.safetensors").write_bytes(bytes(data))
    assert labels.file_identity(b) != ident
    assert labels.file_identity(a / "config.json") != labels.file_identity(a / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# pixels -> labels, against transformers (PyTorch) + torch.topk


def torch_per_patch_features(model, pixels_nhwc, feature):
    """Per-patch joint-space features from a HF SiglipModel, computed with torch modules only:
    "joint" = each final-layer token alone through the MAP head (attention over one key/value
    is out_proj(v_proj(x))), then the head's LayerNorm + MLP residual; "raw" = last_hidden_state."""
    import torch

    with torch.no_grad():
        pix = torch.from_numpy(np.asarray(pixels_nhwc)).permute(0, 3, 1, 2)
        x = model.vision_model(pixel_values=pix).last_hidden_state
        if feature == "raw":
            return x
        head = model.vision_model.head
        d = x.shape[-1]
        w, b = head.attention.in_proj_weight, head.attention.in_proj_bias
        v = torch.nn.functional.linear(x, w[2 * d:], b[2 * d:])
        y = head.attention.out_proj(v)
        return y + head.mlp(head.layernorm(y))


@pytest.fixture(scope="module")
def tiny_hf_siglip(tmp_path_factory):
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64, max_position_embeddings=8)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    with torch.no_grad():  # HF zero-inits biases; perturb everything so a mapping error shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("tiny_siglip"))
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("feature,negate", [("joint", False), ("raw", True)])
def test_labeller_matches_torch_topk(tiny_hf_siglip, make_mesh, feature, negate):
    import torch
    from sea_jax.convert import hf_siglip

    model, folder = tiny_hf_siglip
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = hf_siglip.load_hf_siglip(folder, mesh)
    rng = np.random.default_rng(6)
    table = rng.normal(size=(45, 32)).astype(np.float32)
    table /= np.linalg.norm(table, axis=-1, keepdims=True)
    pixels = rng.uniform(-1, 1, size=(4, 32, 32, 3)).astype(np.float32)

    labeller = labels.make_labeller(cfg, params, table, mesh, n=6, negate_similarity=negate,
                                    feature=feature, word_axes="tensor")
    ids, scores, valid = labeller(pixels)
    assert ids.shape == (4, 16, 6)

    feats = torch.nn.functional.normalize(torch_per_patch_features(model, pixels, feature), dim=-1)
    sim = feats @ torch.from_numpy(table).T
    sign = -1.0 if negate else 1.0
    t_scores, t_ids = torch.topk(sign * sim, 6, dim=-1)
    np.testing.assert_array_equal(np.asarray(ids), t_ids.numpy())
    np.testing.assert_allclose(np.asarray(scores), t_scores.numpy(), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(valid), t_scores.numpy() > 0)
    with pytest.raises(ValueError, match="batch shards"):
        labeller(pixels[:3])
    # The program lowers for inspection; its word scores are one of its matmuls (per device: the
    # 45 words padded to 46 and split over 2 word shards, one image of 16 patches).
    from sea_jax.aot.hlo_flops import matmul_shapes
    shapes = matmul_shapes(labeller.lower(pixels).compile().as_text())
    assert any((d["m"], d["k"], d["n"]) == (16, 32, 23) for d in shapes), shapes
