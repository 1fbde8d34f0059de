"""SEA alignment loss: Eq. 8 label table, Eq. 9 distributed symmetric InfoNCE, Eq. 11 objective."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sea_jax.align import loss as L
from sea_jax.align import sampling as S
from sea_jax.sharding import make_mesh


# ----------------------------------------------------------------------------------------------
# PyTorch reference of Eq. 9, written from the paper's formula:
#   L_a = -1/(2N) sum_i ( log[ exp(phi(x_i,t_i)/tau) / sum_j exp(phi(x_i,t_j)/tau) ]
#                       + log[ exp(phi(t_i,x_i)/tau) / sum_j exp(phi(t_i,x_j)/tau) ] )
# phi = cosine similarity, tau = exp(log_tau) clamped below at tau_min, N = number of pairs.


def torch_eq9(x, t, log_tau, tau_min=0.01):
    n = x.shape[0]
    tau = torch.clamp(torch.exp(log_tau), min=tau_min)
    phi_xt = torch.nn.functional.cosine_similarity(x[:, None, :], t[None, :, :], dim=-1)  # [i, j]: phi(x_i, t_j)
    phi_tx = torch.nn.functional.cosine_similarity(t[:, None, :], x[None, :, :], dim=-1)  # [i, j]: phi(t_i, x_j)
    total = 0.0
    for i in range(n):
        a = torch.exp(phi_xt[i, i] / tau) / torch.sum(torch.exp(phi_xt[i, :] / tau))
        b = torch.exp(phi_tx[i, i] / tau) / torch.sum(torch.exp(phi_tx[i, :] / tau))
        total = total + torch.log(a) + torch.log(b)
    return -total / (2 * n)


def torch_loss_and_grads(x, t, log_tau, tau_min=0.01):
    # float64: the formula taken literally, exp(phi / tau), overflows float32 once tau nears its
    # floor (e^(1/0.01) = e^100 > 3.4e38), so the reference runs in double and our float32 result
    # must match it.
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    tt = torch.tensor(np.asarray(t, np.float64), requires_grad=True)
    lt = torch.tensor(float(log_tau), dtype=torch.float64, requires_grad=True)
    loss = torch_eq9(xt, tt, lt, tau_min)
    loss.backward()
    return loss.item(), xt.grad.numpy(), tt.grad.numpy(), lt.grad.item()


def _close(a, b, rtol=1e-5, atol_frac=1e-5):
    """Relative agreement, with an absolute floor scaled to the array's magnitude (gradient entries
    near zero have no meaningful relative error)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_frac * scale)


def _pairs(seed, c, d, p_keep=0.6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(c, d)).astype(np.float32)
    t = rng.normal(size=(c, d)).astype(np.float32)
    # Correlate the positives a little so the loss is not at its random-pair value.
    x += 0.5 * t
    keep = rng.random(c) < p_keep
    return x, t, keep


@pytest.mark.parametrize(
    "layout, col_block, log_tau",
    [
        (None, 4096, 0.0),  # one device, one block
        ({"data": 8}, 4, -1.5),  # 8 devices, several column blocks
        ({"data": 2}, 20, -2.0),  # 2 x 37 rows = 74 columns: no block divides, columns padded
        ({"data": 2, "fsdp": 2, "tensor": 2}, 16, np.log(0.005)),  # tau clamped at 0.01
    ],
)
def test_matches_torch_reference(layout, col_block, log_tau):
    c = 74 if layout == {"data": 2} else 64
    x, t, keep = _pairs(0, c, 24)
    if log_tau < np.log(0.01):
        # At the tau floor logits reach +-100: make some pairs exactly aligned / anti-aligned, where
        # an unshifted exp would overflow float32.
        x[:8] = np.where(np.arange(8)[:, None] % 2 == 0, -t[:8], 3.0 * t[:8])
    ref_loss, ref_gx, ref_gt, ref_gtau = torch_loss_and_grads(x[keep], t[keep], log_tau)
    mesh = None if layout is None else make_mesh(layout)

    def f(x, t, log_tau):
        return L.symmetric_infonce(x, t, keep, log_tau, mesh=mesh, col_block=col_block).loss

    loss, (gx, gt, gtau) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, t, jnp.float32(log_tau))
    _close(loss, ref_loss)
    _close(np.asarray(gx)[keep], ref_gx)
    _close(np.asarray(gt)[keep], ref_gt)
    assert not np.asarray(gx)[~keep].any() and not np.asarray(gt)[~keep].any()  # not-kept: no gradient
    if log_tau < np.log(0.01):
        assert float(gtau) == 0.0 and ref_gtau == 0.0  # below the clamp tau does not move
    else:
        _close(gtau, ref_gtau)


def test_no_pairs_gives_zero_loss_and_zero_gradients_one_pair_zero_loss():
    x, t, _ = _pairs(1, 32, 8)
    x[:4] = 0.0  # zero tokens (padding) must not produce NaN either
    none = np.zeros(32, bool)
    one = none.copy()
    one[5] = True
    for layout in (None, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = None if layout is None else make_mesh(layout)

        @jax.jit
        def f(x, t, keep, lt):
            def loss(x, t, lt):
                out = L.symmetric_infonce(x, t, keep, lt, mesh=mesh)
                return out.loss, out.n_pairs

            return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, t, lt)

        (out, n), grads = f(x, t, none, jnp.float32(0.0))
        assert float(out) == 0.0 and int(n) == 0
        for g in grads:
            assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any()
        # N = 1: each softmax has a single entry, so both log terms are 0.
        (out, n), grads = f(x, t, one, jnp.float32(0.0))
        assert abs(float(out)) < 1e-6 and int(n) == 1
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# Whole alignment path (sampling -> dedup -> loss) on 1, 2, 4 and 8 devices.

H = W = 5  # 9 windows per image, partial edges
B, N_LAB, D, VOCAB = 8, 4, 16, 24


def _batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(B, H * W, N_LAB)).astype(np.int32)
    scores = rng.uniform(-0.2, 1.0, size=ids.shape).astype(np.float32)
    valid = rng.random(ids.shape) > 0.3
    valid &= ~(rng.random((B, H * W, 1)) < 0.3)
    tokens = rng.normal(size=(B, H * W, D)).astype(np.float32)
    table = rng.normal(size=(VOCAB, D)).astype(np.float32)
    return ids, scores, valid, tokens, table


def _global_step(mesh, key, ids, scores, valid, tokens, table, log_tau):
    """Train-step style, global arrays under jit: select pairs, then the shard_map'ed loss."""

    def f(tokens, log_tau):
        pairs = S.select_pairs(key, ids, scores, valid, (H, W))
        out = L.alignment_loss(tokens, pairs, table, log_tau, mesh=mesh)  # one column block
        return out.loss, (out, pairs)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(tokens, log_tau)


def _local_step(mesh, axes, key, ids, scores, valid, tokens, table, log_tau):
    """The same inside one shard_map: select_pairs + alignment_loss_local with axis names, and
    several column blocks (the result must not depend on the blocking)."""
    spec = P(axes)

    def body(key, ids, scores, valid, tokens, table, log_tau):
        pairs = S.select_pairs(key, ids, scores, valid, (H, W), axis_name=axes)
        out = L.alignment_loss_local(tokens, pairs, table, log_tau, axis_name=axes, col_block=8)
        return out, pairs

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), spec, spec, spec, spec, P(), P()),
        out_specs=(L.AlignOut(P(), P(), P(), P()), S.Pairs(spec, spec, spec, spec)),
    )

    def f(tokens, log_tau):
        out, pairs = fn(key, ids, scores, valid, tokens, table, log_tau)
        return out.loss, (out, pairs)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(tokens, log_tau)


def test_same_choices_loss_and_gradients_on_1_2_4_8_devices(make_mesh):
    ids, scores, valid, tokens, table = _batch(4)
    key = jax.random.fold_in(jax.random.key(123), 9)  # (seed, step)
    log_tau = jnp.float32(-0.7)
    one = make_mesh(data=1)
    (ref_loss, (ref_out, ref_pairs)), ref_g = _global_step(one, key, ids, scores, valid, tokens, table, log_tau)
    ref_pairs = jax.tree.map(np.asarray, ref_pairs)
    assert 4 < int(ref_out.n_pairs) < int(ref_out.n_candidates)  # the dedup did something
    # The 1-device result is Eq. 9 on the kept pairs (reference from the paper's formula).
    keep = ref_pairs.keep
    x_kept = tokens[np.nonzero(keep)[0], ref_pairs.patch_index[keep]]
    t_kept = table[ref_pairs.label[keep]]
    t_loss, t_gx, _, t_gtau = torch_loss_and_grads(x_kept, t_kept, float(log_tau))
    _close(ref_loss, t_loss)
    _close(np.asarray(ref_g[0])[np.nonzero(keep)[0], ref_pairs.patch_index[keep]], t_gx)
    _close(ref_g[1], t_gtau)

    args = (key, ids, scores, valid, tokens, table, log_tau)
    runs = [
        ("2 devices", lambda: _global_step(make_mesh(data=2), *args)),
        ("4 devices", lambda: _global_step(make_mesh(data=2, fsdp=2), *args)),
        ("8 devices", lambda: _global_step(make_mesh(data=2, fsdp=2, tensor=2), *args)),
        # The same pipeline written inside one shard_map, as a train step may call it.
        ("8 devices, shard_map", lambda: _local_step(make_mesh(data=8), ("data",), *args)),
    ]
    for name, step in runs:
        (loss, (out, pairs)), g = step()
        for field, a, b in zip(S.Pairs._fields, ref_pairs, pairs):
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=f"{name}: {field}")
        assert int(out.n_pairs) == int(ref_out.n_pairs) and int(out.n_candidates) == int(ref_out.n_candidates)
        _close(loss, ref_loss, rtol=2e-6)
        _close(g[0], ref_g[0], rtol=2e-6, atol_frac=2e-6)
        _close(g[1], ref_g[1], rtol=2e-6)


# ----------------------------------------------------------------------------------------------
# Scale: the N x N logits never exist on a device.


def test_sharded_loss_memory_at_stage1_scale():
    n_images, n_win, d = 256, 196, 2048  # 27x27 grid, k=2: 14x14 windows
    c_total = n_images * n_win  # 50176 candidates
    mesh = make_mesh({"data": 8})
    rows = NamedSharding(mesh, P("data", None))

    def f(x, t, keep, log_tau):
        return L.symmetric_infonce(x, t, keep, log_tau, mesh=mesh).loss

    compiled = (
        jax.jit(jax.value_and_grad(f, argnums=(0, 3)))
        .lower(
            jax.ShapeDtypeStruct((c_total, d), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((c_total, d), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((c_total,), jnp.bool_, sharding=NamedSharding(mesh, P("data"))),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P())),
        )
        .compile()
    )
    hlo = compiled.as_text()
    sizes = [np.prod([int(v) for v in dims.split(",") if v]) for dims in re.findall(r"\[([\d,]*)\]", hlo)]
    local_rows = c_total // 8
    assert f"{c_total},{c_total}" not in hlo
    # Not even one device's full [C/8, C] row block is materialized: logits exist per column block.
    assert max(sizes) < local_rows * c_total, max(sizes)
    stats = compiled.memory_analysis()
    assert stats is not None
    # Far below N*N*4 bytes (10 GB) and below the [C/8, C] float32 row block (1.26 GB).
    assert stats.temp_size_in_bytes < local_rows * c_total * 4, stats.temp_size_in_bytes
    assert stats.temp_size_in_bytes < c_total * c_total * 4 / 10


# ----------------------------------------------------------------------------------------------
# Eq. 8: label-embedding table and word tokenization


def test_label_embedding_table_is_mean_of_token_rows():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 6)).astype(np.float32)
    ids = rng.integers(0, 50, size=(7, 3)).astype(np.int32)
    lengths = np.array([1, 2, 3, 3, 0, 1, 2])
    mask = np.arange(3)[None, :] < lengths[:, None]
    expected = np.stack([emb[ids[w, : lengths[w]]].mean(0) if lengths[w] else np.zeros(6) for w in range(7)])
    got_mask = L.label_embedding_table(emb, ids, mask, batch_size=3)  # 7 words in chunks of 3
    got_len = L.label_embedding_table(emb, ids, lengths=lengths)
    np.testing.assert_allclose(np.asarray(got_mask), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_len), expected, rtol=1e-6, atol=1e-7)
    assert not np.asarray(got_mask)[4].any()  # a word with no tokens: zero row, not NaN


def _sentencepiece_tokenizer(tmp_path, cls, dummy_prefix):
    import sentencepiece as spm

    corpus = ["the cat sat on the mat", "a dog and a cat", "hello world of words", "red apple green tree"] * 50
    prefix = tmp_path / f"sp_{dummy_prefix}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(prefix), vocab_size=60, model_type="bpe",
        add_dummy_prefix=dummy_prefix, bos_id=1, eos_id=2, unk_id=0, pad_id=3, minloglevel=2,
    )
    folder = tmp_path / f"tok_{dummy_prefix}"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(prefix.with_suffix(".model").read_bytes())
    return cls.from_pretrained(str(folder))


def _byte_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "red apple green tree"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def test_tokenize_words_mid_sentence_form_per_family(tmp_path):
    from transformers import GemmaTokenizer, LlamaTokenizer

    cases = {
        # SentencePiece with dummy prefix (Llama 2 / Vicuna): "▁cat"
        "llama_sp": (_sentencepiece_tokenizer(tmp_path, LlamaTokenizer, True), "▁cat"),
        # SentencePiece without dummy prefix (Gemma): the bare word would be "c" "at"; mid-sentence "▁cat"
        "gemma_sp": (_sentencepiece_tokenizer(tmp_path, GemmaTokenizer, False), "▁cat"),
        # Byte-level BPE (Llama 3): "Ġcat"
        "byte_bpe": (_byte_bpe_tokenizer(), "Ġcat"),
    }
    for name, (tok, piece) in cases.items():
        out = L.tokenize_words(tok, ["cat", "dog"])
        assert out.ids.shape[0] == 2 and out.valid.all()
        cat = out.ids[0][out.mask[0]].tolist()
        assert tok.convert_ids_to_tokens(cat) == [piece], (name, tok.convert_ids_to_tokens(cat))
        assert not set(cat) & set(tok.all_special_ids)  # no BOS / EOS
        with pytest.raises(ValueError, match="tokenize to nothing"):
            L.tokenize_words(tok, ["cat", "  "])
        masked = L.tokenize_words(tok, ["cat", ""], on_empty="mask")
        assert masked.valid.tolist() == [True, False] and not masked.mask[1].any()
    gemma = cases["gemma_sp"][0]
    assert gemma.convert_ids_to_tokens(gemma("cat", add_special_tokens=False)["input_ids"]) != ["▁cat"]
    with pytest.raises(ValueError, match="max_tokens"):
        L.tokenize_words(cases["byte_bpe"][0], ["cat", "xqzv"], max_tokens=1)


# ----------------------------------------------------------------------------------------------
# Eq. 11


def test_sea_objective_combines_and_reports():
    out = L.AlignOut(loss=jnp.float32(2.0), n_pairs=jnp.int32(30), n_candidates=jnp.int32(50), tau=jnp.float32(0.5))
    loss, m = L.sea_objective(jnp.float32(1.5), out, 0.25)
    assert float(loss) == 2.0
    assert float(m["lm_loss"]) == 1.5 and float(m["align_loss"]) == 2.0 and float(m["tau"]) == 0.5
    assert int(m["unique_labels"]) == int(m["pairs_kept"]) == 30 and int(m["candidates"]) == 50
    loss, m = L.sea_objective(jnp.float32(1.5), jnp.float32(4.0), 0.0)
    assert float(loss) == 1.5 and "tau" not in m
    np.testing.assert_allclose(float(L.temperature(jnp.log(0.001))), 0.01)
    np.testing.assert_allclose(float(L.temperature(L.DEFAULT_LOG_TAU_INIT)), 1.0)
