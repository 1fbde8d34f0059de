"""The Flax decoder LLM on its own: sizes, layouts, masks, cache, remat, dtypes, sharding.

HF parity of the forward pass is in test_convert_llm.py; here are the properties that do not need
a reference implementation (and RoPE frequencies checked directly against transformers').
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from jax.sharding import PartitionSpec as P

from sea_jax.models import llm


def tiny(**kw) -> llm.LLMConfig:
    """Gemma-2-like tiny model: every optional feature on (window 3 on layer 0, soft-caps, ...)."""
    base = dict(
        family="gemma2", vocab_size=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
        activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True, tie_embeddings=True, post_norms=True,
        query_pre_attn_scalar=24.0, attn_logit_softcap=5.0, final_logit_softcap=3.0, sliding_window=3,
        layer_types=("sliding_attention", "full_attention"), dtype=jnp.float32,
    )
    return llm.LLMConfig(**{**base, **kw})


def _noisy_params(cfg, seed=0):
    """Random params from numpy (XLA:CPU compiles jax.random slowly), shapes from eval_shape;
    norm scales are non-trivial too (init puts them at exactly 0 / 1)."""
    shapes = nn.unbox(llm.abstract_variables(cfg)["params"])
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), shapes)


@functools.cache  # one compiled forward per config, shared by the tests (CPU compiles are slow)
def _logits_fn(cfg):
    model = llm.LLM(cfg)
    return jax.jit(lambda p, ids, mask: model.apply({"params": p}, input_ids=ids, attention_mask=mask).logits)


def _ids(b=2, l=8, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(b, l)).astype(np.int32)


def test_gemma_2b_parameter_count_abstractly():
    cfg = llm.gemma_2b()
    abstract = llm.abstract_variables(cfg)["params"]  # ShapeDtypeStructs only: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nn.unbox(abstract)))
    # Published size of google/gemma-2b, and the same from the architecture's formula.
    d, f, h, k, hd, v, n = 2048, 16384, 8, 1, 256, 256000, 18
    per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f + 2 * d
    assert llm.param_count(cfg) == v * d + n * per_layer + d == 2_506_172_416
    assert llm.param_count(dataclasses.replace(cfg, scan_layers=False)) == 2_506_172_416


def test_parameters_carry_logical_names():
    names = nn.get_partition_spec(llm.abstract_variables(tiny(tie_embeddings=False))["params"])
    assert names["embedder"]["embedding"] == P("vocab", "embed")
    assert names["layers"]["attn"]["q"]["kernel"] == P("layers", "embed", "heads", "head_dim")
    assert names["layers"]["attn"]["k"]["kernel"] == P("layers", "embed", "kv_heads", "head_dim")
    assert names["layers"]["attn"]["o"]["kernel"] == P("layers", "heads", "head_dim", "embed")
    assert names["layers"]["mlp"]["down"]["kernel"] == P("layers", "mlp", "embed")
    assert names["layers"]["post_mlp_norm"]["scale"] == P("layers", "norm")
    assert names["lm_head"]["kernel"] == P("embed", "vocab")
    flat = nn.get_partition_spec(llm.abstract_variables(tiny(scan_layers=False))["params"])
    assert flat["layers_1"]["mlp"]["gate"]["kernel"] == P("embed", "mlp")


def test_scanned_and_unscanned_layouts_compute_the_same():
    cfg = tiny()
    params = _noisy_params(cfg)
    flat = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.n_layers):
        flat[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    ids = _ids()
    mask = np.ones_like(ids)
    a = _logits_fn(cfg)(params, ids, mask)
    b = _logits_fn(dataclasses.replace(cfg, scan_layers=False))(flat, ids, mask)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_masks_causal_window_and_padding():
    """One sliding layer (window 3): position p depends on tokens p-2..p only; padding keys and
    future tokens never leak into real positions; fully padded rows stay finite."""
    cfg = tiny(n_layers=1, layer_types=("sliding_attention",))
    params = _noisy_params(cfg)
    fn = _logits_fn(cfg)
    ids = _ids(b=1)
    mask = np.ones_like(ids)
    base = np.asarray(fn(params, ids, mask))
    changed = ids.copy()
    changed[0, 2] = (ids[0, 2] + 1) % 256
    out = np.asarray(fn(params, changed, mask))
    np.testing.assert_array_equal(out[0, :2], base[0, :2])  # causal: the past is unaffected
    assert np.abs(out[0, 2:5] - base[0, 2:5]).max() > 1e-3  # inside the window: affected
    np.testing.assert_array_equal(out[0, 5:], base[0, 5:])  # beyond the window: unaffected

    # Padding: change the ids under padding (left and right), real positions must not move.
    pad_mask = np.ones((2, 8), np.int32)
    pad_mask[0, :3] = 0
    pad_mask[1, 6:] = 0
    ids2 = _ids()
    other = np.where(pad_mask == 1, ids2, (ids2 + 7) % 256).astype(np.int32)
    a = np.asarray(fn(params, ids2, pad_mask))
    b = np.asarray(fn(params, other, pad_mask))
    valid = pad_mask.astype(bool)
    np.testing.assert_allclose(a[valid], b[valid], atol=1e-6)
    assert np.isfinite(a).all()


def test_inputs_embeds_path_equals_input_ids():
    cfg = tiny()
    params = _noisy_params(cfg)
    model = llm.LLM(cfg)
    ids = _ids()

    @jax.jit
    def run(p, ids):
        raw = model.apply({"params": p}, ids, method=model.embed)
        scaled = model.apply({"params": p}, ids, scaled=True, method=model.embed)
        return raw, scaled, model.apply({"params": p}, input_ids=ids), model.apply({"params": p}, inputs_embeds=scaled)

    raw, scaled, from_ids, from_embeds = run(params, ids)
    np.testing.assert_array_equal(raw, np.asarray(params["embedder"]["embedding"])[ids])
    np.testing.assert_allclose(scaled, raw * math.sqrt(cfg.hidden), rtol=1e-6)
    np.testing.assert_allclose(from_ids.logits, from_embeds.logits, atol=1e-5)
    np.testing.assert_allclose(from_ids.hidden, from_embeds.hidden, atol=1e-5)
    no_logits = jax.eval_shape(lambda p: model.apply({"params": p}, input_ids=ids, compute_logits=False), params)
    assert no_logits.logits is None and no_logits.hidden.shape == (2, 8, cfg.hidden)
    with pytest.raises(ValueError, match="exactly one"):
        jax.eval_shape(lambda p: model.apply({"params": p}, input_ids=ids, inputs_embeds=scaled), params)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_kv_cache_decoding_matches_full_forward(scan):
    """Prefill 5 tokens, then decode 3 one at a time (row 1 left-padded, layer 0 windowed)."""
    cfg = tiny(scan_layers=scan)
    params = _noisy_params(cfg)
    model = llm.LLM(cfg)
    ids = _ids()
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    full = np.asarray(_logits_fn(cfg)(params, ids, mask))

    step = jax.jit(lambda p, x, m, c: model.apply({"params": p}, input_ids=x, attention_mask=m, cache=c))
    cache = llm.init_cache(cfg, batch=2, max_len=8)
    out = step(params, ids[:, :5], mask, cache)
    got = [np.asarray(out.logits)]
    for t in range(5, 8):
        out = step(params, ids[:, t : t + 1], mask, out.cache)
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, axis=1)
    assert int(out.cache.index) == 8
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-5)


def test_remat_gives_the_same_gradients():
    ids = _ids()
    grads = {}
    for policy in ("none", "full"):
        cfg = tiny(remat=policy)
        model = llm.LLM(cfg)
        params = _noisy_params(cfg)

        def loss(p):
            logits = model.apply({"params": p}, input_ids=ids).logits
            return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

        grads[policy] = jax.jit(jax.grad(loss))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads["none"], grads["full"])


def test_bf16_compute_with_fp32_masters():
    cfg32 = tiny()
    cfg16 = dataclasses.replace(cfg32, dtype=jnp.bfloat16)
    params = _noisy_params(cfg32)
    ids = _ids()
    mask = np.ones_like(ids)
    out16 = _logits_fn(cfg16)(params, ids, mask)
    out32 = _logits_fn(cfg32)(params, ids, mask)
    assert out16.dtype == jnp.float32 and params["layers"]["mlp"]["up"]["kernel"].dtype == jnp.float32
    # bf16 keeps ~3 significant digits; logits are soft-capped at 3.
    assert np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.1
    assert np.corrcoef(np.ravel(out16), np.ravel(out32))[0, 1] > 0.999


def test_sharded_init_places_each_leaf(make_mesh):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg = tiny(tie_embeddings=False)
    # An "rbg" key: XLA:CPU compiles threefry random bits slowly (a second per leaf).
    params = llm.init_params(cfg, jax.random.key(0, impl="rbg"), mesh=mesh)
    assert params["layers"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["layers"]["attn"]["o"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["final_norm"]["scale"].sharding.spec == P(None)
    assert params["layers"]["pre_attn_norm"]["scale"].dtype == jnp.float32


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sea_jax.convert.hf_llm import config_from_hf

    hf = T.LlamaConfig(hidden_size=1024, num_attention_heads=8, head_dim=128, max_position_embeddings=1024,
                       rope_parameters=dict(rope))
    cfg = config_from_hf(hf)
    inv, long_inv, factor = llm.rope_inv_freq(cfg)
    if rope["rope_type"] == "default":
        ref = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6)
    assert long_inv is None and factor == 1.0


def test_longrope_switches_on_sequence_length():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sea_jax.convert.hf_llm import config_from_hf

    hf = T.Phi3Config(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                      original_max_position_embeddings=32, rope_parameters={
                          "rope_type": "longrope", "rope_theta": 10000.0,
                          "short_factor": [1.0 + i / 8 for i in range(16)], "long_factor": [2.0 + i for i in range(16)]})
    cfg = config_from_hf(hf)
    short, long, factor = llm.rope_inv_freq(cfg)
    ref_short, ref_factor = ROPE_INIT_FUNCTIONS["longrope"](hf)
    ref_long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, seq_len=33)
    np.testing.assert_allclose(short, ref_short.numpy(), rtol=1e-6)
    np.testing.assert_allclose(long, ref_long.numpy(), rtol=1e-6)
    assert factor == pytest.approx(ref_factor)
    # Sequences up to 32 use the short set, longer ones the long set (HF: max position + 1 > 32).
    cos_short, _ = llm.rope_cos_sin(cfg, jnp.arange(32)[None], jnp.float32)
    cos_long, _ = llm.rope_cos_sin(cfg, jnp.arange(33)[None], jnp.float32)
    np.testing.assert_allclose(cos_short[0, 5, :16], np.cos(5 * short) * factor, rtol=1e-5)
    np.testing.assert_allclose(cos_long[0, 5, :16], np.cos(5 * long) * factor, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="sliding_window"):
        tiny(sliding_window=None)
    with pytest.raises(ValueError, match="remat"):
        tiny(remat="sometimes")
    with pytest.raises(KeyError, match="no LLM preset"):
        llm.preset("gpt5")
    assert llm.preset("phi3_mini", scan_layers=False).head_dim == 96
