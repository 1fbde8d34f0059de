"""HF parity of the Flax decoder LLMs, and the HF converter both ways.

Every family is a tiny random ``transformers`` model built here from a config (float32, eval,
eager attention), saved with ``save_pretrained`` and imported with ``load_hf_llm``; the reference
logits are HF's own. Sizes are even so the (data=2, fsdp=2, tensor=2) mesh really splits them.
"""
import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from jax.sharding import NamedSharding, PartitionSpec as P

from sea_jax import sharding
from sea_jax.convert import hf_llm
from sea_jax.models import llm
from sea_jax.tokenizer import load_tokenizer

TOL = 1e-4
_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _hf_configs():
    """One tiny config per family, each switching on the family's distinctive features."""
    phi3 = {k: v for k, v in _COMMON.items() if k != "head_dim"}  # Phi3 derives head_dim
    return {
        # Gemma: MQA (1 kv head, as gemma-2b), GeGLU, (1+w) norms, sqrt(d) embedding scale, tied.
        "gemma": T.GemmaConfig(**{**_COMMON, "num_key_value_heads": 1}),
        # Llama-2 / Vicuna: MHA, SwiGLU, untied head.
        "llama": T.LlamaConfig(**{**_COMMON, "num_key_value_heads": 4}),
        # Llama 3.1 style: GQA, theta 500k, llama3 frequency scaling (original length 16 < 128).
        "llama3": T.LlamaConfig(**_COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        # Phi-3: fused qkv / gate_up, GQA, sliding window 5 on every layer, longrope (the test
        # sequence of 8 is longer than original 4, so the long factors are used) on half the head.
        "phi3": T.Phi3Config(**phi3, sliding_window=5, original_max_position_embeddings=4, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 9.0]}),
        # Gemma 2: local (window 4) / global layers, both soft-caps, sandwich norms, query scalar 24.
        "gemma2": T.Gemma2Config(**_COMMON, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                 final_logit_softcapping=3.0),
    }


FAMILIES = list(_hf_configs())


def _batch():
    """4 x 8 tokens: full, right-padded, left-padded, right-padded by one."""
    ids = np.random.RandomState(0).randint(3, 256, size=(4, 8)).astype(np.int32)
    mask = np.ones((4, 8), np.int32)
    mask[1, 5:] = 0
    mask[2, :3] = 0
    mask[3, 7:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (torch model, folder, HF logits, HF last hidden state) for the test batch."""
    ids, mask = _batch()
    out = {}
    for i, (name, cfg) in enumerate(_hf_configs().items()):
        torch.manual_seed(i)
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        with torch.no_grad():
            # HF initialises norms to exactly 0 / 1 and weights at std 0.02; perturb everything so
            # a transposed, unscaled or misplaced tensor cannot go unnoticed.
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            res = model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
            hidden = model.model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).last_hidden_state
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        out[name] = (model, folder, res.logits.numpy(), hidden.numpy())
    return out


def _valid_max_diff(a, b, mask):
    """Max |a - b| over real (non-padding) query positions; padded rows are unspecified in HF."""
    return float(np.abs(np.asarray(a, np.float32) - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_single_device_unscanned(hf_models, family):
    _, folder, ref_logits, ref_hidden = hf_models[family]
    ids, mask = _batch()
    cfg, params = hf_llm.load_hf_llm(folder, dtype=jnp.float32, scan_layers=False)
    assert cfg.family == {"llama3": "llama"}.get(family, family) and not cfg.scan_layers
    assert "layers_1" in params and "layers" not in params
    model = llm.LLM(cfg)
    out = jax.jit(lambda p, i, m: model.apply({"params": p}, input_ids=i, attention_mask=m))(params, ids, mask)
    assert out.logits.dtype == jnp.float32
    assert np.std(ref_logits) > 0.05  # the comparison is not between near-zero numbers
    assert _valid_max_diff(out.logits, ref_logits, mask) <= TOL
    assert _valid_max_diff(out.hidden, ref_hidden, mask) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_sharded_mesh_scanned(hf_models, family, make_mesh):
    _, folder, ref_logits, _ = hf_models[family]
    ids, mask = _batch()
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = hf_llm.load_hf_llm(folder, mesh=mesh, dtype=jnp.float32, scan_layers=True)

    # The parameters really are split: FSDP over the model dim, tensor over mlp / heads / vocab.
    gate = params["layers"]["mlp"]["gate"]["kernel"]  # [layers, embed, mlp] = [2, 64, 128]
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (2, 32, 64)
    assert params["layers"]["attn"]["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["layers"]["mlp"]["down"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")
    k_spec = params["layers"]["attn"]["k"]["kernel"].sharding.spec
    # One kv head (Gemma's MQA) cannot be split over tensor=2 and is replicated instead.
    assert k_spec == (P(None, "fsdp", None, None) if cfg.n_kv_heads == 1 else P(None, "fsdp", "tensor", None))
    if not cfg.tie_embeddings:
        assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")

    model = llm.LLM(cfg)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    ids_d, mask_d = jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding)
    with sharding.activation_sharding(mesh):
        logits = jax.jit(lambda p, i, m: model.apply({"params": p}, input_ids=i, attention_mask=m).logits)(
            params, ids_d, mask_d)
    assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
    assert _valid_max_diff(logits, ref_logits, mask) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trip_identical_tensors(hf_models, family, scan, tmp_path):
    model, folder, _, _ = hf_models[family]
    cfg, params = hf_llm.load_hf_llm(folder, dtype=jnp.float32, scan_layers=scan)
    out = str(tmp_path / "export")
    # A small shard limit forces the sharded layout (index + several files).
    files = hf_llm.save_hf_llm(cfg, params, out, dtype=np.float32, max_shard_bytes=200_000)
    assert len(files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    back = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(model)
    ref, got = model.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    # And the exported folder imports again to the same tree.
    cfg2, params2 = hf_llm.load_hf_llm(out, dtype=jnp.float32, scan_layers=scan)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bf16_checkpoint_import_and_export(hf_models, tmp_path):
    """Released checkpoints are bf16: import them (float32 masters) and export bf16 bit-exactly."""
    model, _, _, _ = hf_models["llama"]
    src = str(tmp_path / "bf16")
    bf16 = T.AutoModelForCausalLM.from_config(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.save_pretrained(src)
    cfg, params = hf_llm.load_hf_llm(src, dtype=jnp.float32)
    assert params["embedder"]["embedding"].dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(params["embedder"]["embedding"]), bf16.model.embed_tokens.weight.detach().float().numpy())
    out = str(tmp_path / "out")
    hf_llm.save_hf_llm(cfg, {"params": params}, out, dtype=jnp.bfloat16)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    back = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, tensor in bf16.state_dict().items():
        assert back.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(back.state_dict()[name], tensor), name


def test_gemma_inputs_embeds_follow_hf(hf_models):
    """transformers 5.x scales Gemma's token embeddings inside the embedding module: ids are scaled
    by sqrt(hidden), ``inputs_embeds`` are not. ``embed(ids, scaled=True)`` is HF's
    ``get_input_embeddings()(ids)``; ``embed(ids)`` is the raw table row."""
    model, folder, ref_logits, _ = hf_models["gemma"]
    ids, mask = _batch()
    cfg, params = hf_llm.load_hf_llm(folder, dtype=jnp.float32)
    flax_model = llm.LLM(cfg)
    variables = {"params": params}
    raw = flax_model.apply(variables, ids, method=flax_model.embed)
    scaled = flax_model.apply(variables, ids, scaled=True, method=flax_model.embed)
    table = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(raw), table[ids])
    with torch.no_grad():
        hf_scaled = model.get_input_embeddings()(torch.tensor(ids).long()).numpy()
        # Arbitrary inputs_embeds (e.g. visual tokens) go in unscaled.
        embeds = np.random.RandomState(1).normal(size=(4, 8, cfg.hidden)).astype(np.float32)
        hf_embeds_logits = model(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(scaled), hf_scaled, rtol=1e-6, atol=1e-6)

    run = jax.jit(lambda p, e, m: flax_model.apply({"params": p}, inputs_embeds=e, attention_mask=m).logits)
    assert _valid_max_diff(run(params, embeds, mask), hf_embeds_logits, mask) <= TOL
    assert _valid_max_diff(run(params, hf_scaled, mask), ref_logits, mask) <= TOL


@pytest.mark.parametrize("name", sorted(llm.PRESETS))
def test_presets_match_hf_configs_and_sizes(name):
    """Each preset exports to a HF config that converts back to itself, and HF builds a model of
    exactly our parameter count from it (on the meta device: nothing allocated)."""
    cfg = llm.preset(name)
    hf = hf_llm.config_to_hf(cfg)
    assert hf_llm.config_from_hf(hf) == cfg
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**hf))
    assert type(model).__name__ == hf["architectures"][0]
    assert sum(p.numel() for p in model.parameters()) == llm.param_count(cfg)


def test_config_from_legacy_hf_dicts():
    """Old config.json layouts (top-level rope_theta / rope_scaling, Gemma's hidden_act "gelu")."""
    gemma = {"model_type": "gemma", "hidden_act": "gelu", "hidden_size": 2048, "intermediate_size": 16384,
             "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 18,
             "vocab_size": 256000, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0",
             "architectures": ["GemmaForCausalLM"], "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
             "rms_norm_eps": 1e-6, "max_position_embeddings": 8192}
    assert hf_llm.config_from_hf(gemma) == llm.gemma_2b()
    llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_hidden_layers": 2, "vocab_size": 256, "rope_theta": 1000.0,
             "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = hf_llm.config_from_hf(llama, dtype=jnp.float32)
    assert cfg.head_dim == 16 and cfg.n_kv_heads == 4 and cfg.rope_theta == 1000.0
    assert cfg.rope_scaling == llm.RopeScaling("linear", factor=2.0) and cfg.dtype == jnp.float32


def test_unsupported_configs_are_refused():
    with pytest.raises(NotImplementedError, match="attention_bias"):
        hf_llm.config_from_hf({"model_type": "llama", "attention_bias": True})
    with pytest.raises(ValueError, match="not a supported"):
        hf_llm.config_from_hf({"model_type": "gpt2"})
    with pytest.raises(NotImplementedError, match="yarn"):
        hf_llm.config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    # Llama has no sandwich norms: such a config is not exportable under the llama name.
    with pytest.raises(ValueError, match="post_norms"):
        hf_llm.config_to_hf(dataclasses.replace(llm.vicuna_7b(), post_norms=True))


def test_checkpoint_config_mismatch_is_named(hf_models):
    _, folder, _, _ = hf_models["llama"]
    with pytest.raises(ValueError, match="does not match"):
        hf_llm.load_hf_llm(folder, mlp_dim=96)


def test_unused_tensors_warn(hf_models, tmp_path):
    model, _, _, _ = hf_models["gemma"]
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    sd["model.extra.weight"] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(tmp_path / "config.json"))
    with pytest.warns(UserWarning, match="model.extra.weight"):
        hf_llm.load_hf_llm(str(tmp_path), dtype=jnp.float32)


def test_tokenizer_loads_from_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                     eos_token="</s>")
    fast.save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded("hello world there", add_special_tokens=False)["input_ids"] == [4, 5, 3]
    assert loaded.pad_token_id == 0


def test_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="broken"):
            load_tokenizer(str(tmp_path / "broken"))
