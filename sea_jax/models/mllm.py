"""The multimodal LLM: image -> SigLIP -> adapter -> visual tokens at ``<image>`` -> decoder LLM.

Semantics are those of HF ``LlavaForConditionalGeneration`` with a SigLIP vision tower and
``vision_feature_select_strategy="full"``: the adapter reads ``hidden_states[vision_feature_layer]``
of the vision tower (HF numbering: [0] = patch + position embedding, [i] = output of block i, so
-2 is the penultimate block's output, before the final norm), the visual tokens replace the
placeholder embeddings in order, and the whole sequence goes through the LLM's ``inputs_embeds``
path.

Gemma's sqrt(hidden) input scale: in transformers >= 5 it lives in the embedding module
(``GemmaTextScaledWordEmbedding``), so HF Llava scales the *text* rows and writes the visual tokens
unscaled (transformers 4, which the paper's code used, scaled every row inside ``GemmaModel``). We match the pinned transformers, so an exported model gives the same logits. The two
conventions differ only by a constant factor on the adapter's last layer.

The three parts stay separate parameter trees (``{"vision", "adapter", "llm"}``) so a train step
can freeze any of them simply by not differentiating with respect to it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sea_jax import sharding
from sea_jax.models.adapter import Adapter
from sea_jax.models.llm import LLM, LLMConfig, abstract_variables
from sea_jax.models.siglip import ImageEncoding, ImageTower, SigLIPConfig
from sea_jax.models.siglip import abstract_params as siglip_abstract_params


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """Configuration of the multimodal model.

    Attributes:
      llm: the decoder LLM.
      vision: the SigLIP towers (the image tower is the vision encoder; the text tower only labels).
      image_token_id: id of the ``<image>`` placeholder in the LLM's vocabulary.
      vision_feature_layer: index into the image tower's hidden states (HF numbering, see module).
      adapter: "mlp2x_gelu" or "linear".
    """

    llm: LLMConfig
    vision: SigLIPConfig
    image_token_id: int
    vision_feature_layer: int = -2
    adapter: str = "mlp2x_gelu"

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (all patches; SigLIP has no CLS token)."""
        return self.vision.num_patches


class Forward(NamedTuple):
    """One forward pass.

    Attributes:
      logits: [b, l, vocab] float32, or None when the LM head was not applied.
      visual_tokens: [b, p, d] adapter outputs (what SEA aligns).
      image: the vision tower's outputs (``patch_embeds`` feeds on-the-fly labelling).
      hidden: [b, l, d] the LLM's final hidden states (after its final norm), when the LM head was
        not applied (:func:`lm_loss_chunked` applies it a chunk at a time); else None.
    """

    logits: Float[Array, "b l v"] | None
    visual_tokens: Float[Array, "b p d"]
    image: ImageEncoding | None
    hidden: Float[Array, "b l d"] | None = None


def abstract_params(cfg: MLLMConfig) -> dict:
    """Boxed (logically named) abstract parameters ``{"vision": {"img"}, "adapter", "llm"}``:
    shapes, dtypes and logical axes, nothing allocated. The vision entry is the image tower only
    (the text tower labels patches in training and is not part of the multimodal model)."""
    adapter = Adapter(out_dim=cfg.llm.hidden, kind=cfg.adapter, dtype=cfg.llm.dtype)
    feats = jnp.zeros((1, cfg.vision.num_patches, cfg.vision.width), jnp.float32)
    return {"vision": {"img": siglip_abstract_params(cfg.vision)["img"]},
            "adapter": jax.eval_shape(lambda: adapter.init(jax.random.key(0), feats)["params"]),
            "llm": abstract_variables(cfg.llm)["params"]}


def merge_image_tokens(
    text_embeds: Float[Array, "b l d"],
    input_ids: Int[Array, "b l"],
    visual_tokens: Float[Array, "b p d"],
    image_token_id: int,
) -> Float[Array, "b l d"]:
    """Writes row i's visual tokens, in order, at row i's ``<image>`` positions.

    A row with no placeholder (a text-only sample) keeps its text embeddings and ignores its image
    slot; a row with placeholders must have exactly ``p`` of them (the data pipeline checks this
    before batching, as HF Llava does at run time).
    """
    is_image = input_ids == image_token_id
    # k-th placeholder of a row takes visual token k of that row's image.
    k = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, visual_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(visual_tokens, k[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class MLLM:
    """The model definitions (stateless); parameters are passed to every call.

    ``params = {"vision": siglip_params, "adapter": adapter_params, "llm": llm_params}`` where
    ``siglip_params`` is the big_vision tree (``img``, ``txt``, ``t``, ``b``).
    """

    def __init__(self, cfg: MLLMConfig):
        self.cfg = cfg
        self.llm = LLM(cfg.llm)
        self.image_tower = ImageTower(cfg.vision)
        self.adapter = Adapter(out_dim=cfg.llm.hidden, kind=cfg.adapter, dtype=cfg.llm.dtype)

    def encode_images(self, vision_params: Any, images: Float[Array, "b h w 3"]) -> ImageEncoding:
        """SigLIP image tower (``vision_params["img"]``) with every block's output (the adapter reads
        one of them). The text tower is not needed here: labels come from its cached word table."""
        return self.image_tower.apply({"params": vision_params["img"]}, images, hidden_states=True)

    def visual_tokens(self, adapter_params: Any, image: ImageEncoding) -> Float[Array, "b p d"]:
        """Adapter applied to ``hidden_states[vision_feature_layer]``."""
        feats = image.hidden_states[self.cfg.vision_feature_layer]
        return self.adapter.apply({"params": adapter_params}, feats)

    def embed_inputs(
        self, llm_params: Any, input_ids: Int[Array, "b l"], visual_tokens: Float[Array, "b p d"]
    ) -> Float[Array, "b l d"]:
        """LLM ``inputs_embeds`` for a batch: the text rows as the LLM embeds them (scaled for
        Gemma) with the visual tokens written, unscaled, at the ``<image>`` positions (HF Llava)."""
        text = self.llm.apply({"params": llm_params}, input_ids, method="embed", scaled=True)
        merged = merge_image_tokens(text, input_ids, visual_tokens, self.cfg.image_token_id)
        return sharding.constrain(merged, ("batch", "length", "act_embed"))

    def __call__(
        self,
        params: Any,
        images: Float[Array, "b h w 3"],
        input_ids: Int[Array, "b l"],
        attention_mask: Bool[Array, "b l"] | None = None,
    ) -> Forward:
        """Full forward pass -> :class:`Forward`."""
        image = self.encode_images(params["vision"], images)
        fwd = self.forward_features(params, image.hidden_states[self.cfg.vision_feature_layer], input_ids, attention_mask)
        return fwd._replace(image=image)

    def forward_features(
        self,
        params: Any,
        feats: Float[Array, "b p dv"],
        input_ids: Int[Array, "b l"],
        attention_mask: Bool[Array, "b l"] | None = None,
        compute_logits: bool = True,
    ) -> Forward:
        """Forward pass from the adapter's input features (``hidden_states[vision_feature_layer]``),
        e.g. computed once per step for a frozen tower and reused by every microbatch.
        ``compute_logits=False`` returns the final hidden states (``hidden``) instead of the logits
        (for :func:`lm_loss_chunked`). ``image`` of the result is None."""
        tokens = self.adapter.apply({"params": params["adapter"]}, feats)
        embeds = self.embed_inputs(params["llm"], input_ids, tokens)
        out = self.llm.apply(
            {"params": params["llm"]}, attention_mask=attention_mask, inputs_embeds=embeds, compute_logits=compute_logits
        )
        if compute_logits:
            return Forward(logits=out.logits, visual_tokens=tokens, image=None)
        return Forward(logits=None, visual_tokens=tokens, image=None, hidden=out.hidden)


def lm_loss(
    logits: Float[Array, "b l v"], input_ids: Int[Array, "b l"], loss_mask: Bool[Array, "b l"]
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """Next-token cross-entropy averaged over supervised target tokens.

    ``loss_mask[b, t]`` marks token t as a *target* (predicted from position t-1), the LLaVA
    convention of labels != -100. Returns (mean loss, number of target tokens); 0 when none.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (logz - picked) * mask
    count = mask.sum()
    return nll.sum() / jnp.maximum(count, 1.0), count.astype(jnp.int32)


def lm_loss_chunked(
    model: MLLM,
    llm_params: Any,
    hidden: Float[Array, "b l d"],
    input_ids: Int[Array, "b l"],
    loss_mask: Bool[Array, "b l"],
    chunk: int,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Sum (not mean) of the next-token losses and the target count, never holding [b, l, vocab].

    The LM head runs on ``chunk`` positions at a time inside a rematerialised scan: with Gemma's
    256k vocabulary the full float32 logits of one 2048-token sample are 2 GiB, so stage 1 at
    batch 256 cannot hold them; the backward pass recomputes each chunk's logits instead.
    """
    b, l, d = hidden.shape
    h = hidden[:, :-1]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    n = l - 1
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    c = (n + pad) // chunk
    h = h.reshape(b, c, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, c, chunk).swapaxes(0, 1)
    mask = mask.reshape(b, c, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, xs):
        hc, tc, mc = xs
        logits = model.llm.apply({"params": llm_params}, hc, method="head").astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return carry + ((logz - picked) * mc).sum(), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (h, targets, mask))
    return total, mask.sum()
