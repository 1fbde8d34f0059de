"""Jitted, batched decoding for the multimodal model with a KV cache, and the prompt helpers.

``python -m sea_jax.generate`` (:mod:`sea_jax.generate.__main__`) is the command line.

Decoding (:class:`Generator`):

1. Prompts are re-laid out as *left*-padded inside the jit (a stable sort of the attention mask),
   whatever padding the caller used, so every row's last prompt token sits in the last prompt slot
   and one prefill fills the cache for all rows.
2. RoPE positions count real tokens only (``cumsum(mask) - 1``), so a padded row decodes exactly as
   it would alone. (HF's ``generate`` computes its position ids the same way.)
3. Prefill runs the full multimodal forward (image -> SigLIP -> adapter -> merged embeddings) into a
   cache of ``prompt_len + max_new_tokens`` slots; then a ``lax.while_loop`` feeds one token per step
   until every row has emitted EOS or ``max_new_tokens`` are out.
4. Greedy (``temperature == 0``) or sampling with temperature and nucleus (top-p) filtering; the key
   of step t is ``fold_in(key, t)``, so results do not depend on the batch split.

On a mesh, parameters keep their logical shardings, the batch is split over (data, fsdp) and the
cache over kv heads (tensor), by the same rules as training.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from sea_jax import sharding
from sea_jax.models.llm import init_cache
from sea_jax.models.mllm import MLLM
from sea_jax.tokenizer import stop_token_ids

IMAGE_TOKEN = "<image>"


class GenerateOutput(NamedTuple):
    """tokens: [b, max_new_tokens] int32, ``pad_token_id`` after a row's EOS (EOS itself kept);
    lengths: [b] int32, generated tokens per row including its EOS."""

    tokens: Int[Array, "b n"]
    lengths: Int[Array, "b"]


def sample_token(
    logits: Float[Array, "b v"], key: jax.Array | None, temperature: float | Array, top_p: float | Array, greedy: bool
) -> Int[Array, "b"]:
    """Next token per row: argmax when ``greedy``; else a sample from softmax(logits / temperature)
    restricted to the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    most likely token is always kept)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep token k when the mass of the tokens strictly more likely than it is below top_p.
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    masked = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def _left_align(
    input_ids: Int[Array, "b l"], attention_mask: Bool[Array, "b l"]
) -> tuple[Int[Array, "b l"], Bool[Array, "b l"]]:
    """Moves each row's real tokens to the end (order kept): a left-padded batch."""
    order = jnp.argsort(attention_mask.astype(jnp.int32), axis=1, stable=True)
    return jnp.take_along_axis(input_ids, order, axis=1), jnp.take_along_axis(attention_mask, order, axis=1)


_PROGRAMS: dict = {}


class Generator:
    """``Generator(model, mesh)(params, images, input_ids, attention_mask, ...) -> GenerateOutput``.

    One compiled program per (config, mesh, shapes, max_new_tokens, greedy or not), shared by all
    Generators; temperature, top_p, EOS and pad ids are traced values.
    """

    def __init__(self, model: MLLM, mesh: jax.sharding.Mesh | None = None, rules: sharding.LogicalRules = sharding.DEFAULT_RULES):
        self.model = model
        self.mesh = mesh
        self.rules = rules

    def _context(self):
        return sharding.activation_sharding(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _decode(
        self,
        params: Any,
        images: Float[Array, "b h w 3"],
        input_ids: Int[Array, "b l"],
        attention_mask: Bool[Array, "b l"],
        key: jax.Array,
        temperature: Array,
        top_p: Array,
        eos_ids: Int[Array, "e"],
        pad_id: Array,
        *,
        max_new_tokens: int,
        greedy: bool,
    ) -> GenerateOutput:
        model, cfg = self.model, self.model.cfg
        llm = model.llm
        with self._context():
            ids, mask = _left_align(input_ids, attention_mask.astype(bool))
            b, l = ids.shape
            total = l + max_new_tokens
            lengths = mask.sum(axis=1).astype(jnp.int32)  # real prompt tokens per row
            positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
            # Cache slots: the prompt's (padding masked out), then the generated ones (causality
            # hides the slots not yet written).
            slot_mask = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)

            image = model.encode_images(params["vision"], images)
            visual = model.visual_tokens(params["adapter"], image)
            embeds = model.embed_inputs(params["llm"], ids, visual)
            cache = init_cache(cfg.llm, b, total)
            out = llm.apply(
                {"params": params["llm"]}, attention_mask=slot_mask, inputs_embeds=embeds, positions=positions,
                cache=cache, compute_logits=False,
            )
            logits = llm.apply({"params": params["llm"]}, out.hidden[:, -1:], method="head")[:, 0]

            def pick(logits, t):
                return sample_token(logits, jax.random.fold_in(key, t), temperature, top_p, greedy)

            first = pick(logits, 0)
            tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
            done = jnp.isin(first, eos_ids)
            n_out = jnp.ones((b,), jnp.int32)

            def cond(state):
                t, _, _, done, _, _ = state
                return (t < max_new_tokens) & ~jnp.all(done)

            def body(state):
                t, cache, last, done, tokens, n_out = state
                step = llm.apply(
                    {"params": params["llm"]}, last[:, None], attention_mask=slot_mask,
                    positions=(lengths + t - 1)[:, None], cache=cache,
                )
                nxt = pick(step.logits[:, -1], t)
                nxt = jnp.where(done, pad_id, nxt)
                tokens = tokens.at[:, t].set(nxt)
                n_out = n_out + (~done).astype(jnp.int32)
                done = done | jnp.isin(nxt, eos_ids)
                return t + 1, step.cache, nxt, done, tokens, n_out

            state = (jnp.ones((), jnp.int32), out.cache, first, done, tokens, n_out)
            _, _, _, _, tokens, n_out = jax.lax.while_loop(cond, body, state)
            return GenerateOutput(tokens=tokens, lengths=n_out)

    def __call__(
        self,
        params: Any,
        images: Float[Array, "b h w 3"],
        input_ids: Int[Array, "b l"],
        attention_mask: Bool[Array, "b l"] | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        key: jax.Array | None = None,
    ) -> GenerateOutput:
        """Decodes up to ``max_new_tokens`` tokens for each prompt.

        Args:
          params: ``{"vision": {"img", ...}, "adapter", "llm"}`` (sharded on ``mesh`` or not).
          images: float32 [b, h, w, 3] preprocessed images (one per prompt).
          input_ids: [b, l] prompts with ``<image>`` expanded to one id per patch; left or right
            padded (any padding with the real tokens in order works).
          attention_mask: [b, l], 1 = real token; None = no padding.
          temperature: 0 = greedy; > 0 samples.
          top_p: nucleus mass (sampling only).
          eos_token_id: stop ids (default: the LLM config's); pad_token_id fills after EOS.
          key: PRNG key for sampling (default ``jax.random.key(0)``).
        """
        cfg = self.model.cfg.llm
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        eos_list = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
        eos_arr = np.asarray(eos_list or [-1], np.int32)  # -1 never matches: no EOS, run to the end
        pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        input_ids = np.asarray(input_ids, np.int32)
        mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {mask.shape} does not match input_ids {input_ids.shape}")
        if not mask.any(axis=1).all():
            raise ValueError("every prompt needs at least one real token")
        greedy = temperature == 0.0
        key = jax.random.key(0) if key is None else key
        # Programs are shared by every Generator of an equal (config, mesh): MLLM is stateless.
        static = (self.model.cfg, self.mesh, self.rules, int(max_new_tokens), greedy)
        fn = _PROGRAMS.get(static)
        if fn is None:
            fn = jax.jit(functools.partial(self._decode, max_new_tokens=static[3], greedy=greedy))
            _PROGRAMS[static] = fn
        batch = (np.asarray(images, np.float32), input_ids, mask)
        if self.mesh is not None:
            batch = tuple(
                jax.device_put(x, sharding.named_sharding(self.mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape, self.rules))
                for x in batch
            )
        return fn(
            params, *batch, key, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.asarray(eos_arr), jnp.int32(pad),
        )


def generate(model: MLLM, params: Any, images, input_ids, attention_mask=None, *, mesh=None, **kwargs) -> GenerateOutput:
    """One-off :class:`Generator` call (compiles each time; keep a Generator to reuse programs)."""
    return Generator(model, mesh)(params, images, input_ids, attention_mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# Prompts


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The text LLaVA trains on for one user turn with an image: the chat template applied to
    ``"<image>\\n" + prompt`` with the generation prompt (the tokenizer's template; a tokenizer with
    none gets the plain "image then text" format)."""
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return messages[0]["content"]


def encode_prompt(tokenizer: Any, text: str, num_image_tokens: int) -> np.ndarray:
    """int32 ids of ``text`` with each ``<image>`` expanded to ``num_image_tokens`` placeholders.

    Special tokens are not added: the chat template already wrote BOS where the LLM wants it (the
    HF processor tokenizes templated text the same way).
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; export or train with one")
    expanded = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)
    return np.asarray(tokenizer(expanded, add_special_tokens=False)["input_ids"], np.int32)


def pad_batch(rows: Sequence[np.ndarray], pad_id: int, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """(ids [b, max_len], mask [b, max_len]) from variable-length rows, padded on ``side``."""
    n = max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad_id, np.int32)
    mask = np.zeros((len(rows), n), bool)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = True
    return ids, mask


__all__ = ["GenerateOutput", "Generator", "generate", "sample_token", "chat_prompt", "encode_prompt",
           "stop_token_ids", "pad_batch", "IMAGE_TOKEN"]
