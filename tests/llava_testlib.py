"""Shared builders for the export / generation tests: a tiny SigLIP + Gemma (or Llama) MLLM, a
locally trained BPE tokenizer with a Gemma-style chat template, a few real SEA train steps."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sea_jax.models.llm import LLMConfig
from sea_jax.models.mllm import MLLM, MLLMConfig
from sea_jax.models.siglip import SigLIPConfig

VOCAB = 128  # LLM embedding rows; the tokenizer has 100 tokens, <image> becomes id 100
IMAGE_ID = 100
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CORPUS = [
    "a photo of a red cat on the mat", "what is in the image?", "describe the picture in detail",
    "the dog runs\nover the hill", "user model assistant", "blue sky green grass", "how many birds are there?",
]


def make_tokenizer(chat_template: str | None = GEMMA_TEMPLATE):
    """A 100-token BPE (no <image>: export adds it at id 100) wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tk.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=100, special_tokens=specials, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    assert len(tok) == 100
    tok.chat_template = chat_template
    return tok


def vision_config() -> SigLIPConfig:
    return SigLIPConfig(
        image_size=16, patch_size=4, width=32, depth=3, mlp_dim=64, num_heads=4,
        vocab_size=64, text_len=8, text_width=32, text_depth=1, text_mlp_dim=64, text_num_heads=4, out_dim=32,
    )


def llm_config(family: str = "gemma", **kw) -> LLMConfig:
    base = dict(vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                dtype=jnp.float32, bos_token_id=2, eos_token_id=1, pad_token_id=0, max_positions=256)
    if family == "gemma":
        base.update(family="gemma", activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True, tie_embeddings=True)
    else:
        base.update(family="llama", activation="silu", norm_eps=1e-5, tie_embeddings=False, rope_theta=500_000.0)
    return LLMConfig(**{**base, **kw})


def mllm_config(family: str = "gemma", **llm_kw) -> MLLMConfig:
    return MLLMConfig(llm=llm_config(family, **llm_kw), vision=vision_config(), image_token_id=IMAGE_ID)


def init_params(cfg: MLLMConfig, seed: int = 0) -> dict:
    """Random float32 parameters (numpy), shapes from ``jax.eval_shape`` of the models' inits.

    Filling the shapes on the host avoids compiling three init programs (slow on a shared CPU).
    Norm scales are random too (Gemma zero-inits them), so a (1 + w) slip would show.
    """
    from sea_jax.models.mllm import abstract_params, tower_module

    rng = np.random.default_rng(seed)
    shapes = nn.unbox(abstract_params(cfg))
    text = nn.unbox(tower_module(cfg.vision).abstract_params(cfg.vision))  # the text tower too, as training holds it
    shapes["vision"] = {**{k: v for k, v in text.items() if k != "img"}, "img": shapes["vision"]["img"]}

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            base = 0.0 if (cfg.llm.norm_plus_one and "'llm'" in name) else 1.0
            v = base + 0.3 * rng.standard_normal(x.shape)
        elif "embedding" in name and "'llm'" in name:
            v = 0.4 * rng.standard_normal(x.shape)
        elif "bias" in name or "pos_embedding" in name or "probe" in name:
            v = 0.1 * rng.standard_normal(x.shape)
        elif x.ndim == 0:
            v = np.zeros(())
        else:
            v = rng.standard_normal(x.shape) / np.sqrt(max(x.shape[0] if x.ndim < 3 else np.prod(x.shape[:-2]), 1))
        return np.asarray(v, np.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    params["log_tau"] = np.float32(0.0)
    return params


def train_a_few_steps(cfg: MLLMConfig, params: dict, steps: int = 3) -> dict:
    """Real SEA stage-1 steps (adapter + tau trainable, labels from the batch)."""
    from sea_jax.align import loss as loss_lib
    from sea_jax.train_step import StepConfig, init_state, make_optimizer, make_train_step, split_params

    rng = np.random.default_rng(0)
    b, p = 4, cfg.num_image_tokens
    l = 1 + p + 8
    ids = np.zeros((b, l), np.int32)
    ids[:, 0] = 2
    ids[:, 1 : 1 + p] = cfg.image_token_id
    ids[:, 1 + p :] = rng.integers(6, 100, size=(b, 8))
    loss_mask = np.zeros((b, l), bool)
    loss_mask[:, 1 + p :] = True
    batch = {
        "images": rng.uniform(-1, 1, size=(b, 16, 16, 3)).astype(np.float32), "input_ids": ids,
        "attention_mask": np.ones((b, l), np.int32), "loss_mask": loss_mask, "has_image": np.ones((b,), bool),
        "label_ids": rng.integers(0, 12, size=(b, p, 3)).astype(np.int32),
        "label_scores": rng.uniform(0.05, 0.3, size=(b, p, 3)).astype(np.float32),
    }
    words = rng.integers(6, 100, size=(12, 2)).astype(np.int32)
    table = loss_lib.label_embedding_table(params["llm"]["embedder"]["embedding"], words, np.ones((12, 2), bool))
    scfg = StepConfig(lam=1.0, label_source="batch", seed=1)
    tx, sched = make_optimizer(5e-2, total_steps=steps)
    trainable, frozen = split_params(params, scfg.trainable)
    frozen = dict(frozen, label_table=table)
    state = init_state(trainable, tx)
    step = make_train_step(MLLM(cfg), scfg, tx, sched, donate=False)
    jb = jax.tree.map(jnp.asarray, batch)
    for _ in range(steps):
        state, _ = step(state, frozen, jb)
    out = dict(params)
    out.update(state.params)
    return out


def random_image(width: int = 23, height: int = 15, seed: int = 0) -> Image.Image:
    """A non-square RGB image (so pad-to-square and the resize both matter)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


_EXPORTED: dict = {}


def trained_export(tmp_root) -> tuple:
    """(cfg, params, tokenizer, folder, files): the tiny Gemma MLLM trained a few SEA steps and
    exported with pad-to-square and small shards; built once per test session (both the export
    and the generation tests use it)."""
    if "gemma" not in _EXPORTED:
        from sea_jax.convert import hf_llava

        cfg = mllm_config("gemma")
        params0 = init_params(cfg)
        params = train_a_few_steps(cfg, params0)
        # The steps really trained the adapter.
        assert not np.allclose(params["adapter"]["linear_1"]["kernel"], params0["adapter"]["linear_1"]["kernel"])
        params = jax.tree.map(np.asarray, params)
        tok = make_tokenizer()
        out = str(tmp_root / "llava")
        files = hf_llava.export_llava(cfg, params, tok, out, dtype=np.float32, pad_to_square=True, max_shard_bytes=64 * 2**10)
        _EXPORTED["gemma"] = (cfg, params, tok, out, files)
    return _EXPORTED["gemma"]
