"""The stage-1 SEA step against a PyTorch reference on HF LlavaForConditionalGeneration.

The reference is written here from the paper (Eq. 8-11), not from sea_jax: given the same sampled
(patch, label) pairs it computes L_lm with HF's own loss, the label embeddings as the mean of the
LLM's input-embedding rows, the symmetric InfoNCE with cosine similarity and temperature, and
backpropagates to the adapter (HF's multi_modal_projector).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from sea_jax import sharding
from sea_jax.align import loss as loss_lib
from sea_jax.align import sampling
from sea_jax.convert import hf_llm, hf_siglip, mapping
from sea_jax.models.mllm import MLLM, MLLMConfig, merge_image_tokens
from sea_jax.train_step import StepConfig, init_state, loss_fn, make_optimizer, make_train_step, split_params, step_key

IMAGE_TOKEN = 127
GRID = 4  # 16 px images, 4 px patches
P = GRID * GRID
N_WORDS = 24
TOP_N = 3


VISION = {
    "siglip": dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, image_size=16, patch_size=4),
    "clip": dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, image_size=16, patch_size=4, projection_dim=24, hidden_act="quick_gelu"),
}
STRATEGY = {"siglip": "full", "clip": "default"}  # CLIP: the CLS token is dropped (LLaVA-1.5)


def _hf_llava(tower="siglip"):
    cfg = LlavaConfig(
        vision_config=VISION[tower],
        text_config=dict(
            model_type="gemma", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        ),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy=STRATEGY[tower],
        projector_hidden_act="gelu", image_seq_length=P,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Gemma zero-inits norm weights; random ones make the test see any (1 + w) mistake.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(0.0, 0.3)
    return model


def _ours_from_hf(model, tower="siglip"):
    from sea_jax.convert import hf_clip

    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    reader = mapping.DictReader(sd, "hf llava")
    llm_cfg = hf_llm.config_from_hf(model.config.text_config.to_dict(), dtype=jnp.float32)
    llm_params = mapping.load(hf_llm.hf_param_mapping(llm_cfg, prefix="model.language_model.", lm_head="lm_head.weight"), reader)
    if tower == "clip":
        vis_cfg = hf_clip.config_from_hf(model.config.vision_config.to_dict())
        vis_params = mapping.load(hf_clip.clip_vision_params(vis_cfg, name_prefix="model.vision_tower."), reader)
        # a Llava's CLIPVisionModel has no visual projection; the labels' projection, random here
        vis_params["img"]["visual_projection"] = {"kernel": np.random.default_rng(0).normal(
            size=(vis_cfg.width, vis_cfg.out_dim)).astype(np.float32)}
    else:
        vis_cfg = hf_siglip.config_from_hf(model.config.vision_config.to_dict())
        vis_params = mapping.load(hf_siglip.siglip_vision_params(vis_cfg, name_prefix="model.vision_tower."), reader)
    adapter = {
        f"linear_{i}": {
            "kernel": sd[f"model.multi_modal_projector.linear_{i}.weight"].T,
            "bias": sd[f"model.multi_modal_projector.linear_{i}.bias"],
        }
        for i in (1, 2)
    }
    cfg = MLLMConfig(llm=llm_cfg, vision=vis_cfg, image_token_id=IMAGE_TOKEN)
    params = jax.tree.map(jnp.asarray, {"vision": vis_params, "adapter": adapter, "llm": llm_params})
    params["log_tau"] = jnp.asarray(0.3, jnp.float32)
    return MLLM(cfg), params


def _batch(b=4, text_len=8, seed=0):
    rng = np.random.default_rng(seed)
    l = 1 + P + text_len
    ids = np.zeros((b, l), np.int32)
    ids[:, 0] = 2  # bos
    ids[:, 1 : 1 + P] = IMAGE_TOKEN
    ids[:, 1 + P :] = rng.integers(3, 120, size=(b, text_len))
    attn = np.ones((b, l), np.int32)
    if b > 1:
        attn[1, -3:] = 0  # right padding
        ids[1, -3:] = 0
    loss_mask = np.zeros((b, l), bool)
    loss_mask[:, 1 + P :] = attn[:, 1 + P :] == 1
    images = rng.uniform(-1, 1, size=(b, 16, 16, 3)).astype(np.float32)
    label_ids = rng.integers(0, N_WORDS, size=(b, P, TOP_N)).astype(np.int32)
    scores = rng.uniform(-0.05, 0.3, size=(b, P, TOP_N)).astype(np.float32)
    scores[0, :5] = -0.1  # patches without any label
    return {
        "images": images, "input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
        "has_image": np.ones((b,), bool), "label_ids": label_ids, "label_scores": scores,
    }


def _word_tokens(seed=1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 4, size=N_WORDS)
    ids = rng.integers(3, 120, size=(N_WORDS, 3)).astype(np.int32)
    mask = np.arange(3)[None, :] < lengths[:, None]
    return np.where(mask, ids, 0).astype(np.int32), mask


@pytest.fixture(scope="module")
def setup():
    hf = _hf_llava()
    model, params = _ours_from_hf(hf)
    wt_ids, wt_mask = _word_tokens()
    table = loss_lib.label_embedding_table(params["llm"]["embedder"]["embedding"], wt_ids, wt_mask)
    return hf, model, params, (wt_ids, wt_mask), table


def _torch_reference(hf, batch, pairs, word_tokens, log_tau, lam, strategy="full"):
    """Eq. 8-11 from the paper on HF Llava; returns losses and grads of projector + log_tau."""
    hf.zero_grad()
    ids = torch.from_numpy(batch["input_ids"]).long()
    pix = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()
    attn = torch.from_numpy(batch["attention_mask"]).long()
    labels = torch.where(torch.from_numpy(batch["loss_mask"]), ids, torch.full_like(ids, -100))
    out = hf(input_ids=ids, pixel_values=pix, attention_mask=attn, labels=labels)
    l_lm = out.loss
    # Visual tokens X_v = g(f(image)) at the sampled patches.
    feats = torch.stack(list(hf.model.get_image_features(pix, vision_feature_layer=-2, vision_feature_select_strategy=strategy).pooler_output))
    keep = np.asarray(pairs.keep)
    bi, wi = np.nonzero(keep)
    patch = np.asarray(pairs.patch_index)[bi, wi]
    words = np.asarray(pairs.label)[bi, wi]
    x = feats[torch.from_numpy(bi), torch.from_numpy(patch)]
    # Eq. 8: t_i = mean of the LLM input-embedding rows of the word's tokens.
    emb = hf.model.language_model.embed_tokens.weight
    w_ids, w_mask = word_tokens
    t = torch.stack([emb[torch.from_numpy(w_ids[w][w_mask[w]]).long()].mean(0) for w in words])
    # Eq. 9: symmetric InfoNCE, cosine similarity over temperature tau.
    lt = torch.tensor(float(log_tau), requires_grad=True)
    tau = torch.clamp(torch.exp(lt), min=0.01)
    xn = x / x.norm(dim=-1, keepdim=True)
    tn = t / t.norm(dim=-1, keepdim=True)
    s = xn @ tn.T / tau
    n = s.shape[0]
    diag = torch.arange(n)
    l_a = -(torch.log_softmax(s, dim=1)[diag, diag].sum() + torch.log_softmax(s.T, dim=1)[diag, diag].sum()) / (2 * n)
    total = l_lm + lam * l_a  # Eq. 11
    total.backward()
    proj = hf.model.multi_modal_projector
    grads = {
        f"linear_{i}": {"kernel": getattr(proj, f"linear_{i}").weight.grad.numpy().T, "bias": getattr(proj, f"linear_{i}").bias.grad.numpy()}
        for i in (1, 2)
    }
    return total.item(), l_lm.item(), l_a.item(), grads, float(lt.grad), n


@pytest.fixture(scope="module")
def clip_setup():
    hf = _hf_llava("clip")
    model, params = _ours_from_hf(hf, "clip")
    wt_ids, wt_mask = _word_tokens()
    table = loss_lib.label_embedding_table(params["llm"]["embedder"]["embedding"], wt_ids, wt_mask)
    return hf, model, params, (wt_ids, wt_mask), table


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_step_loss_and_grads_match_pytorch_reference(tower, request):
    hf, model, params, word_tokens, table = request.getfixturevalue("setup" if tower == "siglip" else "clip_setup")
    batch = _batch()
    scfg = StepConfig(lam=0.7, label_source="batch", seed=3)
    trainable, frozen = split_params(params, scfg.trainable)
    frozen = dict(frozen, label_table=table)
    key = step_key(scfg.seed, jnp.asarray(0))
    jb = jax.tree.map(jnp.asarray, batch)
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(lambda p: loss_fn(model, scfg, p, frozen, jb, key), has_aux=True)
    )(trainable)
    # The same choices the step made (sampling is a pure function of key and labels).
    valid = (jb["label_scores"] > 0) & jb["has_image"][:, None, None]
    pairs = sampling.select_pairs(key, jb["label_ids"], jb["label_scores"], valid, (GRID, GRID), scfg.window)
    assert int(np.asarray(pairs.keep).sum()) > 4
    ref_total, ref_lm, ref_a, ref_grads, ref_tau_grad, n = _torch_reference(
        hf, batch, pairs, word_tokens, params["log_tau"], scfg.lam, STRATEGY[tower]
    )
    assert int(metrics["pairs_kept"]) == n
    np.testing.assert_allclose(float(metrics["lm_loss"]), ref_lm, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["align_loss"]), ref_a, rtol=1e-4)
    np.testing.assert_allclose(float(loss), ref_total, rtol=1e-4)
    for name in ("linear_1", "linear_2"):
        for leaf in ("kernel", "bias"):
            got, want = np.asarray(grads["adapter"][name][leaf]), ref_grads[name][leaf]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(float(grads["log_tau"]), ref_tau_grad, rtol=1e-4, atol=1e-7)


def test_text_only_row_is_untouched_by_its_image(setup):
    hf, model, params, _, _ = setup
    ids = jnp.asarray([[2, IMAGE_TOKEN, 5], [2, 7, 9]], jnp.int32)
    text = jnp.zeros((2, 3, 4))
    vis = jnp.arange(2 * 2 * 4, dtype=jnp.float32).reshape(2, 2, 4) + 1
    merged = merge_image_tokens(text, ids, vis, IMAGE_TOKEN)
    np.testing.assert_array_equal(merged[1], 0)
    np.testing.assert_array_equal(merged[0, 1], vis[0, 0])
    # A text-only sample through the whole model gives HF's text-only logits.
    b = _batch(b=1)
    text_ids = b["input_ids"][:, 1 + P :]
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(text_ids).long()).logits.numpy()
    got = model(params, jnp.asarray(b["images"]), jnp.asarray(text_ids)).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def _run_step_on_mesh(model, params, table, batch, mesh, steps=1, lam=1.0):
    scfg = StepConfig(lam=lam, label_source="batch", seed=5)
    tx, sched = make_optimizer(1e-2, total_steps=10)
    trainable, frozen = split_params(params, scfg.trainable)
    frozen = dict(frozen, label_table=table)
    jb = jax.tree.map(jnp.asarray, batch)
    if mesh is not None:
        from sea_jax.train_step import batch_shardings

        bsh = batch_shardings(mesh, jb)
        jb = jax.device_put(jb, bsh)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        trainable = jax.device_put(trainable, rep)
        frozen = jax.device_put(frozen, rep)
    state = init_state(trainable, tx)
    shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    step = make_train_step(
        model, scfg, tx, sched, mesh=mesh,
        state_shardings=shard_of(state) if mesh is not None else None,
        frozen_shardings=shard_of(frozen) if mesh is not None else None,
        batch_sharding=shard_of(jb) if mesh is not None else None,
        donate=False,
    )
    history = []
    for _ in range(steps):
        state, m = step(state, frozen, jb)
        history.append(jax.tree.map(np.asarray, m))
    return state, history, frozen


@pytest.fixture(scope="module")
def one_device_run(setup):
    _, model, params, _, table = setup
    return _run_step_on_mesh(model, params, table, _batch(b=8, seed=2), None)


@pytest.mark.parametrize("axes", [dict(data=2), dict(data=4), dict(data=2, fsdp=2, tensor=2)])
def test_shard_count_invariance(setup, one_device_run, axes):
    _, model, params, _, table = setup
    ref_state, ref_hist, _ = one_device_run
    state, hist, _ = _run_step_on_mesh(model, params, table, _batch(b=8, seed=2), sharding.make_mesh(axes))
    for k in ("loss", "lm_loss", "align_loss", "pairs_kept", "grad_norm"):
        np.testing.assert_allclose(hist[0][k], ref_hist[0][k], rtol=2e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 state.params, ref_state.params)


def test_frozen_means_frozen(setup):
    """What the step returns holds exactly the trainable parts (and their optimizer state); the
    frozen parts it was given come back untouched and undonated; only the trainable parts move."""
    _, model, params, _, table = setup
    batch = _batch(b=8, seed=4)
    before = jax.tree.map(np.array, params)
    state, hist, frozen = _run_step_on_mesh(model, params, table, batch, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), steps=3)
    assert sorted(state.params) == ["adapter", "log_tau"]
    leaves_of = lambda t: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    opt_paths = " ".join(leaves_of(state.opt_state))
    assert "adapter" in opt_paths and "'llm'" not in opt_paths and "'vision'" not in opt_paths
    for part in ("vision", "llm"):
        for leaf in jax.tree.leaves(frozen[part]):
            assert not leaf.is_deleted()  # never donated to the step
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen[part], before[part])
    full = {**frozen, **state.params}  # the model the run now has
    for part in ("vision", "llm"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), full[part], before[part])
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state.params["adapter"], before["adapter"])
    assert all(jax.tree.leaves(changed))
    assert float(state.params["log_tau"]) != float(before["log_tau"])
    assert int(state.step) == 3
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_text_only_rows_give_no_alignment_pairs(setup):
    """A text-only row (``has_image`` False) carries a dummy image whose labels would be valid: its
    patches must give no (token, label) candidate. The step with such a row equals the step with
    that row's labels removed, and differs from the step where the row has its image."""
    _, model, params, _, table = setup
    batch = _batch(b=4, seed=9)
    key = step_key(0, jnp.asarray(0))
    scfg = StepConfig(lam=1.0, label_source="batch")
    trainable, frozen = split_params(params, scfg.trainable)
    frozen = dict(frozen, label_table=table)
    run = jax.jit(lambda b: loss_fn(model, scfg, trainable, frozen, b, key)[1])
    text_only = dict(batch, has_image=np.asarray([True, False, True, True]))
    no_labels = dict(batch, label_scores=np.where(np.arange(4)[:, None, None] == 1, -1.0,
                                                  batch["label_scores"]).astype(np.float32))
    with_image = batch
    got, want, other = (run(jax.tree.map(jnp.asarray, b)) for b in (text_only, no_labels, with_image))
    assert int(got["pairs_kept"]) == int(want["pairs_kept"]) < int(other["pairs_kept"])
    np.testing.assert_allclose(float(got["align_loss"]), float(want["align_loss"]), rtol=1e-6)


def test_empty_label_batch_gives_zero_align_loss_and_finite_grads(setup):
    _, model, params, _, table = setup
    batch = _batch(b=4, seed=6)
    batch["label_scores"][:] = -1.0
    scfg = StepConfig(lam=1.0, label_source="batch")
    trainable, frozen = split_params(params, scfg.trainable)
    frozen = dict(frozen, label_table=table)
    (loss, m), g = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(model, scfg, p, frozen, jax.tree.map(jnp.asarray, batch), step_key(0, jnp.asarray(0))), has_aux=True
    ))(trainable)
    assert float(m["align_loss"]) == 0.0 and int(m["pairs_kept"]) == 0
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_on_the_fly_labels_equal_precomputed_ones(setup):
    """Labels from the SigLIP forward inside the step == the same labels passed in the batch."""
    from sea_jax.align import semantic_labels as labels_lib

    _, model, params, _, table = setup
    batch = jax.tree.map(jnp.asarray, _batch(b=4, seed=7))
    rng = np.random.default_rng(0)
    image = model.encode_images(params["vision"], batch["images"])
    # Patch features share a large common direction; words pointing partly away from it keep
    # only some patches' labels above 0, so the <= 0 drop is exercised.
    mean = np.asarray(image.patch_embeds).reshape(-1, 32).mean(0)
    word_table = jnp.asarray((rng.normal(size=(N_WORDS, 32)) - 1.7 * mean / np.linalg.norm(mean)).astype(np.float32))
    ids, scores, valid = labels_lib.top_labels(image.patch_embeds, word_table, TOP_N)
    assert bool(valid.any()) and not bool(valid.all())  # some words score <= 0 on random features
    key = step_key(0, jnp.asarray(0))
    results = {}
    for source in ("on_the_fly", "batch"):
        scfg = StepConfig(lam=1.0, label_source=source, top_n=TOP_N)
        trainable, frozen = split_params(params, scfg.trainable)
        frozen = dict(frozen, label_table=table, word_table=word_table)
        b = dict(batch, label_ids=ids, label_scores=jnp.where(valid, scores, -1.0))
        results[source] = jax.jit(lambda p, f, b, scfg=scfg: loss_fn(model, scfg, p, f, b, key))(trainable, frozen, b)
    assert int(results["batch"][1]["pairs_kept"]) > 0
    for k in ("loss", "align_loss", "pairs_kept"):
        np.testing.assert_allclose(results["on_the_fly"][1][k], results["batch"][1][k], rtol=1e-6, err_msg=k)


def test_no_global_pair_matrix_at_stage1_scale():
    """256 images x 196 windows on 8 devices: the compiled step holds no [N, N] logits anywhere."""
    from sea_jax.models.llm import LLMConfig
    from sea_jax.models.siglip import SigLIPConfig

    mesh = sharding.make_mesh({"data": 8})
    vis = SigLIPConfig(image_size=56, patch_size=2, width=16, depth=2, mlp_dim=32, num_heads=2,
                       vocab_size=64, text_len=8, text_width=16, text_depth=1, text_mlp_dim=32, text_num_heads=2, out_dim=16)
    llm = LLMConfig(vocab_size=128, hidden=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                    dtype=jnp.float32)
    model = MLLM(MLLMConfig(llm=llm, vision=vis, image_token_id=IMAGE_TOKEN))
    b, l, grid = 256, 28 * 28 + 8, 28
    n = b * sampling.num_windows(grid, grid, 2)
    assert n == 256 * 196
    tx, sched = make_optimizer(1e-3, total_steps=10)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    from sea_jax.models import llm as llm_lib
    from sea_jax.models import siglip as siglip_lib
    from sea_jax.train_step import TrainState, batch_shardings

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)

    import flax.linen as nn

    ad = nn.unbox(jax.eval_shape(model.adapter.init, jax.random.key(0), jnp.zeros((1, 1, 16)))["params"])
    trainable = abstract({"adapter": ad, "log_tau": jax.ShapeDtypeStruct((), jnp.float32)})
    opt = abstract(jax.eval_shape(tx.init, trainable))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), trainable, opt)
    frozen = abstract({
        "vision": nn.unbox(siglip_lib.abstract_params(vis)),
        "llm": nn.unbox(llm_lib.abstract_variables(llm)["params"]),
        "label_table": jax.ShapeDtypeStruct((1000, 32), jnp.float32),
        "word_table": jax.ShapeDtypeStruct((1000, 16), jnp.float32),
    })
    shapes = {
        "images": ((b, 56, 56, 3), jnp.float32), "input_ids": ((b, l), jnp.int32), "attention_mask": ((b, l), jnp.int32),
        "loss_mask": ((b, l), jnp.bool_), "has_image": ((b,), jnp.bool_),
    }
    bsh = batch_shardings(mesh, {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()})
    batch = {k: jax.ShapeDtypeStruct(*v, sharding=bsh[k]) for k, v in shapes.items()}
    shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731

    def compiled(lam):
        scfg = StepConfig(lam=lam, label_source="on_the_fly", top_n=TOP_N)
        step = make_train_step(model, scfg, tx, sched, mesh=mesh, state_shardings=shard_of(state),
                               frozen_shardings=shard_of(frozen), batch_sharding=bsh)
        return step.lower(state, frozen, batch).compile()

    sea = compiled(1.0)
    import re

    dims = [tuple(int(d) for d in m.split(",")) for m in re.findall(r"\[(\d+(?:,\d+)+)\]", sea.as_text())]
    big = [d for d in dims if len(d) >= 2 and sorted(d)[-2] >= n // 8 and sorted(d)[-1] >= n]
    assert not big, f"arrays with an N x N/8 (or larger) pair dimension in the compiled step: {big[:5]}"
    # What SEA adds to the plain LLaVA step's temporaries (attention, activations) stays far
    # below one eighth of the [N, N] float32 pair logits.
    extra = sea.memory_analysis().temp_size_in_bytes - compiled(0.0).memory_analysis().temp_size_in_bytes
    assert extra < n * n * 4 / 8, extra


@pytest.mark.parametrize("trainable,lam", [(("adapter", "log_tau"), 0.7), (("adapter", "llm", "vision"), 0.0)])
def test_microbatches_and_chunked_logits_equal_one_pass(setup, trainable, lam):
    """Accumulating L_lm over microbatches with the chunked LM head gives the full-batch loss and
    gradients (L_a stays on the whole global batch)."""
    from sea_jax.train_step import accumulated_grads

    _, model, params, _, table = setup
    batch = jax.tree.map(jnp.asarray, _batch(b=4, seed=8))
    key = step_key(1, jnp.asarray(0))
    one = StepConfig(lam=lam, label_source="batch", trainable=trainable)
    acc = StepConfig(lam=lam, label_source="batch", trainable=trainable, microbatches=2, logits_chunk=7)
    tr, fr = split_params(params, trainable)
    fr = dict(fr, label_table=table)
    (_, m1), g1 = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, one, p, fr, batch, key), has_aux=True))(tr)
    m2, g2 = jax.jit(lambda p: accumulated_grads(model, acc, p, fr, batch, key))(tr)
    for k in ("loss", "lm_loss", "align_loss", "target_tokens"):
        np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(m1[k]), rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7), g2, g1)


def test_length_bucket_padding_changes_no_loss_or_gradient(setup):
    """A batch padded to the full length, the same batch cut to its length bucket, and each sample
    alone without padding: the same L_lm token sums per sample, the same L_a, the same gradients.
    What ``data.length_buckets`` relies on: padding is masked out everywhere."""
    from sea_jax.data import buckets

    _, model, params, _, table = setup
    trainable = ("adapter", "log_tau", "llm")
    base = _batch(b=4, text_len=8, seed=11)
    base["attention_mask"][2, -5:] = 0  # rows of three different lengths
    base["input_ids"][2, -5:] = 0
    base["loss_mask"][2, -5:] = False
    full = {k: v for k, v in base.items()}
    extra = 9  # the full length: 9 more pad columns than the longest row
    for k in buckets.SEQ_KEYS:
        full[k] = np.pad(base[k], ((0, 0), (0, extra)))
    cut = buckets.trim(full, buckets.bucket_for((8, base["input_ids"].shape[1], full["input_ids"].shape[1]),
                                                buckets.longest(full)))
    assert cut["input_ids"].shape == base["input_ids"].shape
    key = step_key(1, jnp.asarray(0))
    tr, fr = split_params(params, trainable)
    fr = dict(fr, label_table=table)

    def run(batch, lam=0.7):
        cfg = StepConfig(lam=lam, label_source="batch", trainable=trainable)
        b = jax.tree.map(jnp.asarray, batch)
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(model, cfg, p, fr, b, key), has_aux=True))(tr)

    (_, m_full), g_full = run(full)
    (_, m_cut), g_cut = run(cut)
    for k in ("loss", "lm_loss", "align_loss", "target_tokens"):
        np.testing.assert_allclose(np.asarray(m_cut[k]), np.asarray(m_full[k]), rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
                 g_cut, g_full)
    # each sample alone, cut to its own length: its token-loss sum is its share of the batch's
    total = 0.0
    for r in range(4):
        n = int(base["attention_mask"][r].sum())
        alone = {k: (v[r:r + 1, :n] if k in buckets.SEQ_KEYS else v[r:r + 1]) for k, v in base.items()}
        (_, m), _ = run(alone, lam=0.0)
        total += float(m["lm_loss"]) * int(m["target_tokens"])
    np.testing.assert_allclose(total, float(m_cut["lm_loss"]) * int(m_cut["target_tokens"]), rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 5])
def test_lm_head_on_target_positions_only_is_exact(setup, chunk):
    """The LM head on each row's target positions alone (stage 1: the image tokens are never
    targets) gives the loss and gradients of the head on every position; a row with more targets
    than the slots (a text-only sample) sends the batch through every position, still exact."""
    from sea_jax.models.mllm import head_capacity, lm_loss_sum, target_positions

    _, model, params, _, _ = setup
    batch = _batch(b=3, text_len=8, seed=21)
    l = batch["input_ids"].shape[1]
    cap = head_capacity(model.cfg, l)
    assert cap == 8  # 1 + P + 8 tokens: 8 slots instead of l - 1 = 24
    text_only = {k: v.copy() for k, v in batch.items()}
    text_only["input_ids"][2, 1:] = np.arange(l - 1) % 100 + 3
    text_only["loss_mask"][2, 2:] = True  # 22 targets > 8 slots
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, l, model.cfg.llm.hidden)).astype(np.float32))
    for b in (batch, text_only):
        ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["loss_mask"])
        fits = bool(target_positions(mask, cap)[2])
        assert fits == (b is batch)

        def loss(llm, h, capacity):
            total, count = lm_loss_sum(model, llm, h, ids, mask, chunk=chunk, capacity=capacity)
            return total / count

        want = jax.jit(jax.value_and_grad(lambda p, h: loss(p, h, 0), argnums=(0, 1)))(params["llm"], hidden)
        got = jax.jit(jax.value_and_grad(lambda p, h: loss(p, h, cap), argnums=(0, 1)))(params["llm"], hidden)
        np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
        jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-7),
                     got[1], want[1])
        # the gradient reaches exactly the rows' target positions (and nothing else of hidden)
        g_h = np.abs(np.asarray(got[1][1])).sum(-1)
        np.testing.assert_array_equal(g_h[:, :-1] > 0, np.asarray(mask)[:, 1:])
