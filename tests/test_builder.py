"""``sea_jax.builder``: the one road from a config to a model, and the config schema it reads.

The central check: for every recipe config, the abstract parameter tree that ``sea_jax.aot``
compiles (the recipe as shipped, paths still placeholders: preset architecture, the preset's
tokenizer size) equals the one ``sea_jax.train`` plans from real-format checkpoint folders of that
architecture and a tokenizer of the released size -- structure, shapes, dtypes and shardings.
"""
import importlib.util
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sea_jax import aot, builder, config as config_lib, sharding
from sea_jax.errors import ConfigError, PathError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ["gemma2b", "gemma2b_finetune", "vicuna7b", "vicuna7b_finetune", "llama3_8b", "llama3_8b_finetune",
           "phi3_mini", "phi3_mini_finetune", "vicuna13b", "vicuna13b_finetune", "clip_vicuna7b",
           "clip_vicuna7b_finetune", "clip_vicuna13b", "clip_vicuna13b_finetune", "s2_vicuna7b", "s2_vicuna7b_finetune"]


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def word_level_tokenizer(n: int, image: bool = True):
    """A real fast tokenizer of exactly ``n`` tokens (before ``<image>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sea_jax.data import llava

    vocab = {f"w{i}": i for i in range(n - 1)}
    vocab["<unk>"] = n - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)  # <unk> an ordinary token: every word has one
    assert len(tok) == n
    if image:
        llava.add_image_token(tok)
    return tok


def _leaves(tree):
    return {jax.tree_util.keystr(p): (tuple(x.shape), jnp.dtype(x.dtype), x.sharding)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _param_parts(inputs):
    state, frozen, _ = inputs
    return {**{k: v for k, v in frozen.items() if k in builder.PARTS}, **state.params}


@pytest.mark.parametrize("name", RECIPES)
def test_aot_compiles_the_parameters_train_builds(name, tmp_path):
    from sea_jax import train
    from sea_jax.convert import hf_llm, hf_siglip
    from sea_jax.models import llm as llm_lib
    from sea_jax.models import siglip

    shipped = load_config(name)
    mesh = sharding.make_mesh(dict(shipped.mesh))
    tx, _ = builder.optimizer(shipped, 100)
    for c in (shipped,):
        c.labels.default_size = 200  # the word count sizes SEA's tables, not the parameters

    # aot: the recipe as shipped (placeholder paths)
    assert not config_lib.is_set(shipped.llm.checkpoint)
    mcfg_aot, inputs_aot = aot.plan(shipped, mesh, tx)

    # train: real-format folders of the same architecture, a tokenizer of the released size
    preset = llm_lib.preset(shipped.llm.preset)
    llm_dir, vis_dir = tmp_path / "llm", tmp_path / "vision"
    llm_dir.mkdir()
    vis_dir.mkdir()
    (llm_dir / "config.json").write_text(json.dumps(hf_llm.config_to_hf(preset)))
    if shipped.vision.tower == "clip":
        from sea_jax.convert import hf_clip
        from sea_jax.models import clip

        vis = clip.clip_config(shipped.vision.variant, image_size=shipped.vision.image_size)
        (vis_dir / "config.json").write_text(json.dumps(hf_clip.config_to_hf(vis)))
    else:
        vis = siglip.siglip_config(shipped.vision.variant, image_size=shipped.vision.image_size)
        (vis_dir / "config.json").write_text(json.dumps(hf_siglip.config_to_hf(vis)))
    real = load_config(name)
    real.labels.default_size = 200
    real.llm.checkpoint, real.vision.checkpoint = str(llm_dir), str(vis_dir)
    tok = word_level_tokenizer(builder.PRESET_TOKENIZER_LEN[shipped.llm.preset])
    p = train.plan(real, tok, mesh, tx)

    assert p.mcfg == mcfg_aot
    got, want = _leaves(_param_parts(p.inputs)), _leaves(_param_parts(inputs_aot))
    assert got.keys() == want.keys() and got == want
    # the trainable split and the batch agree too
    assert sorted(p.inputs[0].params) == sorted(inputs_aot[0].params) == sorted(shipped.train.trainable)
    assert _leaves(p.inputs[2]) == _leaves(inputs_aot[2])
    # <image>: Gemma / Llama fill their embedding, so it adds a row; Phi-3's has room
    vocab = preset.vocab_size
    assert p.mcfg.image_token_id == builder.PRESET_TOKENIZER_LEN[shipped.llm.preset]
    assert p.mcfg.llm.vocab_size == (vocab if shipped.llm.preset == "phi3_mini" else vocab + 1)


def _tiny_llm_folder(path, vocab=50, **kw):
    from sea_jax.convert import hf_llm
    from sea_jax.models import llm as llm_lib

    cfg = llm_lib.preset("gemma_2b", vocab_size=vocab, hidden=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                         mlp_dim=32, **kw)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_llm.config_to_hf(cfg)))
    return cfg


def test_checkpoint_architecture_wins_and_ignored_overrides_are_named(tmp_path, caplog):
    ckpt = _tiny_llm_folder(tmp_path / "llm")
    c = config_lib.base_config()
    c.llm.checkpoint, c.llm.preset = str(tmp_path / "llm"), "gemma_2b"
    c.llm.overrides = ml_collections.ConfigDict(dict(hidden=64, n_layers=3, param_dtype="bfloat16"))
    c.llm.dtype, c.llm.remat = "float32", "full"
    with caplog.at_level(logging.WARNING):
        llm = builder.base_llm_config(c, builder.Sources(json.loads((tmp_path / "llm" / "config.json").read_text()),
                                                         None, 50))
    assert llm.hidden == ckpt.hidden == 16 and llm.n_layers == 1  # the checkpoint's shapes
    assert llm.param_dtype == "bfloat16" and llm.remat == "full" and jnp.dtype(llm.dtype) == jnp.float32
    assert "['hidden', 'n_layers']" in caplog.text and "not used" in caplog.text
    # without a checkpoint the preset and every override describe the model
    c.llm.checkpoint = config_lib.PLACEHOLDER + "somewhere"
    c.llm.overrides = ml_collections.ConfigDict(dict(vocab_size=40, hidden=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                     head_dim=16, mlp_dim=64))
    sources = builder.read_sources(c)
    assert sources.llm_hf is None and sources.tokenizer_len == 40  # a shrunk preset: its own vocab
    mcfg = builder.model_config(c, sources)
    assert mcfg.llm.hidden == 32 and mcfg.image_token_id == 40 and mcfg.llm.vocab_size == 41


def test_image_token_rule():
    c = config_lib.base_config()
    # the tokenizer fills the embedding: <image> gets the next id and one more row
    assert builder.image_token(c, builder.Sources(None, None, 100), 100) == (100, 101)
    # the embedding has room (Phi-3): no new row
    assert builder.image_token(c, builder.Sources(None, None, 90), 100) == (90, 100)
    # the tokenizer already has <image> (an imported Llava): its id, no growth
    assert builder.image_token(c, builder.Sources(None, None, 100, image_token_id=37), 100) == (37, 100)
    # read from real tokenizers: appended now, or already inside the vocabulary
    tok = word_level_tokenizer(30)
    s = builder.read_sources(c, tok)
    assert (s.tokenizer_len, s.image_token_id) == (30, None)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "<image>": 1, "b": 2, "<unk>": 3}
    inner = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                    unk_token="<unk>")
    s = builder.read_sources(c, inner)
    assert (s.tokenizer_len, s.image_token_id) == (4, 1)


def test_unknown_preset_and_bad_override_are_config_errors():
    c = config_lib.base_config()
    c.llm.preset = "gemma_3b"
    with pytest.raises(ConfigError, match="config.llm.preset='gemma_3b'"):
        builder.base_llm_config(c, builder.Sources(None, None, 10))
    c.llm.preset = "gemma_2b"
    c.llm.overrides = ml_collections.ConfigDict(dict(widht=3))
    with pytest.raises(ConfigError, match="config.llm.overrides"):
        builder.base_llm_config(c, builder.Sources(None, None, 10))
    c = config_lib.base_config()
    with pytest.raises(PathError, match="no config.llm.preset"):
        builder.base_llm_config(c, builder.Sources(None, None, 10))


def test_placed_parameters_must_be_the_compiled_ones():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    other = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    from jax.sharding import NamedSharding, PartitionSpec

    abstract = {"llm": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))}}
    good = jax.device_put(np.zeros((8, 4), np.float32), abstract["llm"]["w"].sharding)
    builder.check_placed({"llm": {"w": good}}, abstract)
    with pytest.raises(AssertionError, match="compiled for"):
        builder.check_placed({"llm": {"w": good.astype(jnp.bfloat16)}}, abstract)
    with pytest.raises(AssertionError, match="compiled for"):
        builder.check_placed({"llm": {"w": jax.device_put(good, NamedSharding(other, PartitionSpec("data")))}},
                             abstract)
    with pytest.raises(AssertionError, match="tree"):
        builder.check_placed({"llm": {"v": good}}, abstract)


# ----------------------------------------------------------------------------------------------
# The schema


def test_every_recipe_config_is_the_schema():
    """Recipes only change values: the same fields as base_config, so every tool reads every
    recipe (and --config.a.b works for every field)."""
    def flat(c, prefix=""):
        out = set()
        for k, v in c.items():
            if isinstance(v, ml_collections.ConfigDict) and k not in ("overrides", "group_lr", "mesh"):
                out |= flat(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    base = flat(config_lib.base_config())
    for name in RECIPES + ["tiny", "demo"]:
        c = load_config(name)
        assert flat(c) == base, (name, flat(c) ^ base)
        config_lib.validate(c)


def test_saved_config_round_trip_migration_and_unknown_fields():
    c = load_config("gemma2b_finetune")
    back = config_lib.from_json(c.to_json())
    assert back.to_dict() == c.to_dict()
    old = json.loads(c.to_json())
    old["siglip"] = old.pop("vision")
    del old["siglip"]["tower"]
    old["data"]["image_size"] = 224
    old["demo"]["full_run"] = True
    migrated = config_lib.from_dict(old, "old/config.json")
    assert migrated.vision.checkpoint == c.vision.checkpoint and migrated.vision.image_size == 224
    with pytest.raises(ConfigError, match=r"old/config.json: config field 'train.nonsense'"):
        config_lib.from_dict({"train": {"nonsense": 1}}, "old/config.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_lib.from_json("{", "x/config.json")


@pytest.mark.parametrize("field, value, message", [
    ("data.template", "chatml", "config.data.template='chatml': expected one of"),
    ("sea.label_source", "disk", "config.sea.label_source='disk'"),
    ("train.microbatches", 0, "config.train.microbatches=0: must be >= 1"),
    ("train.trainable", ("adapter", "lm"), "config.train.trainable has ['lm']"),
])
def test_validate_names_the_field(field, value, message):
    c = config_lib.base_config()
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ConfigError) as e:
        config_lib.validate(c)
    assert message in str(e.value)


def test_log_tau_has_its_own_learning_rate():
    """``sea.log_tau_lr``: Adam's update of each part is -lr(t) for constant gradients (m / sqrt(v) = 1), so log tau
    moves by its own peak lr, the adapter by optim.lr (0 = log tau follows optim.lr)."""
    c = config_lib.base_config()
    c.optim.lr, c.optim.warmup_ratio = 1e-3, 0.0
    c.sea.log_tau_lr = 0.05
    params = {"adapter": jnp.zeros((3,)), "log_tau": jnp.zeros(())}
    grads = {"adapter": jnp.ones((3,)), "log_tau": jnp.ones(())}
    for lr_tau, want in ((0.05, 0.05), (0.0, 1e-3)):
        c.sea.log_tau_lr = lr_tau
        tx, _ = builder.optimizer(c, 100)
        state = tx.init(params)
        _, state = tx.update(grads, state, params)  # step 0: the one warmup step, lr 0
        updates, _ = tx.update(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates["adapter"]), -1e-3, rtol=1e-3)
        np.testing.assert_allclose(float(updates["log_tau"]), -want, rtol=1e-3)
    c.sea.tau_init = 0.07
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    c.llm.preset = "gemma_2b"
    c.llm.overrides = ml_collections.ConfigDict(dict(vocab_size=32, hidden=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                                     head_dim=8, mlp_dim=32))
    c.vision.variant, c.vision.image_size = "B/16", 32
    c.vision.overrides = ml_collections.ConfigDict(dict(width=16, depth=1, mlp_dim=32, num_heads=2, text_width=16,
                                                        text_depth=1, text_mlp_dim=32, text_num_heads=2, out_dim=16))
    mcfg = builder.model_config(c, builder.read_sources(c))
    tau = builder.load_params(c, builder.read_sources(c), mcfg, mesh, parts=["log_tau"])["log_tau"]
    np.testing.assert_allclose(float(jnp.exp(tau)), 0.07, rtol=1e-6)
