"""The multimodal LLM: image -> vision tower -> adapter -> visual tokens at ``<image>`` -> decoder LLM.

Semantics are those of HF ``LlavaForConditionalGeneration``: the adapter reads
``hidden_states[vision_feature_layer]`` of the vision tower (HF numbering: [0] = the embeddings,
[i] = output of block i, so -2 is the penultimate block's output, before the final norm) without
the tower's prefix tokens (SigLIP has none, ``vision_feature_select_strategy="full"``; CLIP's CLS
token is dropped, LLaVA-1.5's ``"default"``: 24 x 24 = 576 tokens at 336 px), the visual tokens
replace the placeholder embeddings in order, and the whole sequence goes through the LLM's
``inputs_embeds`` path.

Vision towers: SigLIP (:mod:`sea_jax.models.siglip`) or CLIP (:mod:`sea_jax.models.clip`), chosen
by the type of ``MLLMConfig.vision``; with ``MLLMConfig.s2`` the adapter reads the S2 multi-scale
features (:mod:`sea_jax.models.s2`, scales concatenated on channels) while the labels read the
base scale. :class:`VisionFeatures` carries both.

Gemma's sqrt(hidden) input scale (``MLLMConfig.scale_visual_tokens``). The paper's code (LLaVA on
transformers 4) multiplied *every* input-embedding row by sqrt(hidden), visual tokens included;
transformers 5 (pinned here) scales only the text rows inside ``GemmaTextScaledWordEmbedding``.
``scale_visual_tokens=True`` trains as the paper did; the export folds the factor into the
adapter's last Linear (:mod:`sea_jax.convert.hf_llava`), so the HF folder gives the same logits
under transformers 5. False is transformers 5's semantics (the default of this dataclass, what an
imported Llava folder means); the config schema's default (``model.scale_visual_tokens``) is the
paper's. Models without the scale (Llama, Phi-3) are unaffected.

The three parts stay separate parameter trees (``{"vision", "adapter", "llm"}``) so a train step
can freeze any of them simply by not differentiating with respect to it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sea_jax import sharding
from sea_jax.models import clip, s2, siglip
from sea_jax.models.adapter import Adapter
from sea_jax.models.llm import LLM, LLMConfig, abstract_variables
from sea_jax.models.siglip import ImageEncoding, SigLIPConfig

VisionConfig = SigLIPConfig | clip.CLIPConfig


def tower_module(cfg: VisionConfig):
    """The module of a vision config's family (``siglip`` or ``clip``): its ``ImageTower``,
    ``TextTower``, ``abstract_params``, ``init_params``."""
    return clip if isinstance(cfg, clip.CLIPConfig) else siglip


def pixel_spec_for(cfg: VisionConfig, size: int | None = None):
    """The :class:`sea_jax.data.images.PixelSpec` of a tower at ``size`` (default its own): CLIP's
    mean / std and its processor's shorter-side resize + centre crop, or SigLIP's 0.5 / 0.5 and a
    resize to the square."""
    from sea_jax.data.images import PixelSpec

    size = cfg.image_size if size is None else int(size)
    if isinstance(cfg, clip.CLIPConfig):
        return PixelSpec(size, clip.IMAGE_MEAN, clip.IMAGE_STD, center_crop=True)
    return PixelSpec(size)


# labels.feature (config spelling) -> the tower's patch-feature mode
FEATURE_MODES = {SigLIPConfig: {"joint": "map", "raw": "encoded"}, clip.CLIPConfig: {"joint": "proj", "raw": "encoded"}}


def patch_feature_mode(cfg: VisionConfig, feature: str) -> str:
    """The tower's per-patch feature mode for ``labels.feature``: ``"joint"`` is the tower's own
    joint-space projection of each patch (SigLIP: the patch alone through the MAP head; CLIP: the
    final LayerNorm and the visual projection), ``"raw"`` the encoder output."""
    modes = FEATURE_MODES[type(cfg)]
    if feature not in modes:
        raise ValueError(f"labels.feature must be one of {sorted(modes)}, got {feature!r}")
    return modes[feature]


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """Configuration of the multimodal model.

    Attributes:
      llm: the decoder LLM.
      vision: the vision towers, SigLIP or CLIP (the image tower is the vision encoder; the text
        tower only labels). Its ``patch_features`` is the labels' per-patch feature.
      image_token_id: id of the ``<image>`` placeholder in the LLM's vocabulary.
      vision_feature_layer: index into the image tower's hidden states (HF numbering, see module).
      adapter: "mlp2x_gelu" or "linear".
      s2: the S2 scales (the adapter reads multi-scale features), or None.
      scale_visual_tokens: multiply the visual tokens by the LLM's input scale (Gemma's
        sqrt(hidden)) as the text rows are (the paper's code); see the module docstring.
    """

    llm: LLMConfig
    vision: VisionConfig
    image_token_id: int
    vision_feature_layer: int = -2
    adapter: str = "mlp2x_gelu"
    s2: s2.S2Config | None = None
    scale_visual_tokens: bool = False

    def __post_init__(self):
        if self.s2 is not None and self.s2.base_size != self.vision.image_size:
            raise ValueError(f"S2's base scale {self.s2.base_size} must be the tower's image size {self.vision.image_size}")

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: every patch (CLIP's CLS token is dropped; S2 pools to the base grid)."""
        return self.vision.num_patches

    @property
    def adapter_in_dim(self) -> int:
        """Channels of the adapter's input: the tower's width, times the scales with S2."""
        return self.vision.width * (len(self.s2.scales) if self.s2 is not None else 1)

    @property
    def image_size(self) -> int:
        """Pixels per side the model takes: the tower's size, or S2's largest scale."""
        return self.s2.image_size if self.s2 is not None else self.vision.image_size

    @property
    def pixel_spec(self):
        """How images are preprocessed for this tower (:class:`sea_jax.data.images.PixelSpec`): at
        :attr:`image_size`; CLIP: OpenAI's mean / std, shorter side resized then centre-cropped
        (its HF processor, as LLaVA-1.5 trained); SigLIP: 0.5 / 0.5, resized to the square."""
        return pixel_spec_for(self.vision, self.image_size)

    @property
    def visual_token_scale(self) -> float:
        """What the visual tokens are multiplied by before the LLM (1 unless scaled)."""
        return math.sqrt(self.llm.hidden) if self.scale_visual_tokens and self.llm.scale_embeddings else 1.0


class VisionFeatures(NamedTuple):
    """What the vision side gives the rest of the model.

    Attributes:
      features: [b, n, d_in] the adapter's input (``hidden_states[vision_feature_layer]`` without
        prefix tokens, or the S2 features).
      patch_embeds: [b, n, dj] per-patch joint-space features for semantic labels (base scale).
      image: the tower's encoding at the base scale.
    """

    features: Float[Array, "b n d"]
    patch_embeds: Float[Array, "b n e"]
    image: ImageEncoding


class Forward(NamedTuple):
    """One forward pass.

    Attributes:
      logits: [b, l, vocab] float32, or None when the LM head was not applied.
      visual_tokens: [b, p, d] adapter outputs (what SEA aligns).
      image: the vision side's outputs (``patch_embeds`` feeds on-the-fly labelling).
      hidden: [b, l, d] the LLM's final hidden states (after its final norm), when the LM head was
        not applied (:func:`lm_loss_sum` applies it where it runs the head); else None.
    """

    logits: Float[Array, "b l v"] | None
    visual_tokens: Float[Array, "b p d"]
    image: VisionFeatures | None
    hidden: Float[Array, "b l d"] | None = None


def abstract_params(cfg: MLLMConfig) -> dict:
    """Boxed (logically named) abstract parameters ``{"vision": {"img"}, "adapter", "llm"}``:
    shapes, dtypes and logical axes, nothing allocated. The vision entry is the image tower only
    (the text tower labels patches in training and is not part of the multimodal model)."""
    adapter = Adapter(out_dim=cfg.llm.hidden, kind=cfg.adapter, dtype=cfg.llm.dtype)
    feats = jnp.zeros((1, cfg.num_image_tokens, cfg.adapter_in_dim), jnp.float32)
    return {"vision": {"img": tower_module(cfg.vision).abstract_params(cfg.vision)["img"]},
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

    ``params = {"vision": tower_params, "adapter": adapter_params, "llm": llm_params}`` where
    ``tower_params`` is the tower family's tree (``img``, and ``txt``... which the model never reads).
    """

    def __init__(self, cfg: MLLMConfig):
        self.cfg = cfg
        self.llm = LLM(cfg.llm)
        self.image_tower = tower_module(cfg.vision).ImageTower(cfg.vision)
        self.adapter = Adapter(out_dim=cfg.llm.hidden, kind=cfg.adapter, dtype=cfg.llm.dtype)

    def encode_images(self, vision_params: Any, images: Float[Array, "b h w 3"]) -> VisionFeatures:
        """The image tower (``vision_params["img"]``): the adapter's input features and the labels'
        per-patch features. The text tower is not needed here: labels use its cached word table."""
        cfg, layer = self.cfg, self.cfg.vision_feature_layer
        drop = cfg.vision.num_prefix_tokens
        if cfg.s2 is not None:
            feats, enc = s2.s2_encode(self.image_tower, vision_params["img"], images, cfg.s2, layer)
        else:
            # only the layer the adapter reads: the stack of every layer's output is not built
            enc = self.image_tower.apply({"params": vision_params["img"]}, images, hidden_states=False,
                                         keep_hidden=layer)
            feats = enc.hidden_states[layer][:, drop:]
        return VisionFeatures(feats, enc.patch_embeds, enc)

    def visual_tokens(self, adapter_params: Any, image: VisionFeatures) -> Float[Array, "b p d"]:
        """The adapter applied to the vision features."""
        return self.adapter.apply({"params": adapter_params}, image.features)

    def embed_inputs(
        self, llm_params: Any, input_ids: Int[Array, "b l"], visual_tokens: Float[Array, "b p d"]
    ) -> Float[Array, "b l d"]:
        """LLM ``inputs_embeds`` for a batch: the text rows as the LLM embeds them (scaled for
        Gemma) with the visual tokens written at the ``<image>`` positions: scaled as the text rows
        with ``scale_visual_tokens`` (the paper), unscaled otherwise (HF Llava, transformers 5)."""
        text = self.llm.apply({"params": llm_params}, input_ids, method="embed", scaled=True)
        if self.cfg.visual_token_scale != 1.0:
            # as the LLM scales its text rows: in the compute dtype, the factor rounded to it
            visual_tokens = visual_tokens.astype(text.dtype) * jnp.asarray(self.cfg.visual_token_scale, text.dtype)
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
        fwd = self.forward_features(params, image.features, input_ids, attention_mask)
        return fwd._replace(image=image)

    def forward_features(
        self,
        params: Any,
        feats: Float[Array, "b p dv"],
        input_ids: Int[Array, "b l"],
        attention_mask: Bool[Array, "b l"] | None = None,
        compute_logits: bool = True,
    ) -> Forward:
        """Forward pass from the adapter's input features (:attr:`VisionFeatures.features`),
        e.g. computed once per step for a frozen tower and reused by every microbatch.
        ``compute_logits=False`` returns the final hidden states (``hidden``) instead of the logits
        (for :func:`lm_loss_sum`). ``image`` of the result is None."""
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


def target_positions(
    loss_mask: Bool[Array, "b l"], capacity: int
) -> tuple[Int[Array, "b c"], Bool[Array, "b c"], Bool[Array, ""]]:
    """The first ``capacity`` next-token targets of each row, in order.

    Returns (positions t into the shifted sequence: hidden[t] predicts token t + 1, marked by
    ``loss_mask[:, t + 1]``; whether each slot holds a target; whether every row's targets fit).
    """
    m = loss_mask[:, 1:]
    # a stable sort of "not a target" puts the targets first, in position order
    pos = jnp.argsort(~m, axis=-1, stable=True)[:, :capacity].astype(jnp.int32)
    return pos, jnp.take_along_axis(m, pos, axis=-1), jnp.all(m.sum(-1) <= capacity)


def head_capacity(cfg: MLLMConfig, length: int) -> int:
    """LM-head slots per row that hold every target of a sample with an image: the image's tokens
    are never targets, so a row of ``length`` has at most ``length - 1 - num_image_tokens``.

    0 (the head on every position) unless that at least halves the head's positions: the gather
    and :func:`lm_loss_sum`'s fallback branch cost HBM (AOT, gemma2b stage 1 at 2048 tokens, where
    1318 of 2047 positions would remain: +0.4 GiB per chip on v4-8, +0.8 on v4-32), which only a
    large saving pays for. Stage 1's usual bucket (768 tokens, 38 slots) is far below the bar."""
    c = length - 1 - cfg.num_image_tokens
    return c if 0 < c <= (length - 1) // 2 else 0


def lm_loss_sum(
    model: MLLM,
    llm_params: Any,
    hidden: Float[Array, "b l d"],
    input_ids: Int[Array, "b l"],
    loss_mask: Bool[Array, "b l"],
    chunk: int = 0,
    capacity: int = 0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Sum (not mean) of the next-token losses and the target count, from the final hidden states.

    ``chunk`` > 0: the LM head runs ``chunk`` positions at a time inside a rematerialised scan,
    never holding [b, l, vocab]: with Gemma's 256k vocabulary the float32 logits of one
    2048-token sample are 2 GiB; the backward pass recomputes each chunk's logits instead. ``capacity`` > 0 (:func:`head_capacity`): the head runs only on
    the first ``capacity`` targets of each row (gathered, per row, so a batch-sharded array stays
    where it is) instead of every position. In stage 1 a row is 729 image tokens and a caption of
    a few dozen, so this removes ~95% of the head's FLOPs (Gemma's 256k vocabulary makes the head a
    fifth of the LLM's). A row with more targets than that (a text-only sample) sends the whole
    batch through every position instead (``lax.cond``), so the result is always exact.
    """
    h, targets = hidden[:, :-1], input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    count = mask.sum()

    def every_position():
        return _nll_sum(model, llm_params, h, targets, mask, chunk)

    if not capacity:
        return every_position(), count
    pos, valid, fits = target_positions(loss_mask, capacity)

    def targets_only():
        hc = jnp.take_along_axis(h, pos[..., None], axis=1)
        tc = jnp.take_along_axis(targets, pos, axis=1)
        return _nll_sum(model, llm_params, hc, tc, valid.astype(jnp.float32), chunk)

    # The forward cond returns the residuals of both branches, the untaken one's zero-filled: the
    # every-position head's would be its [b, l, vocab] logits (75 MB per step in
    # benchmarks/step_time.py, with no chunking). Rematerialised, the rare fallback keeps only its
    # inputs and recomputes the logits in the backward when it does run.
    fallback = jax.checkpoint(lambda h, targets, mask: _nll_sum(model, llm_params, h, targets, mask, chunk))
    return jax.lax.cond(fits, targets_only, lambda: fallback(h, targets, mask)), count


def _nll_sum(model, llm_params, h, targets, mask, chunk):
    """sum(mask * NLL) of the head's logits on h [b, n, d] against targets [b, n]."""
    if not chunk:
        return _chunk_nll(model, llm_params, h, targets, mask)
    b, n, d = h.shape
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    c = (n + pad) // chunk
    xs = (h.reshape(b, c, chunk, d).swapaxes(0, 1), targets.reshape(b, c, chunk).swapaxes(0, 1),
          mask.reshape(b, c, chunk).swapaxes(0, 1))

    @jax.checkpoint
    def one(carry, x):
        return carry + _chunk_nll(model, llm_params, *x), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), xs)
    return total


def _chunk_nll(model, llm_params, h, targets, mask):
    logits = model.llm.apply({"params": llm_params}, h, method="head").astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((logz - picked) * mask).sum()
