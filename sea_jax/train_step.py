"""The jitted, sharded SEA train step (paper Eq. 7-11), for both stages.

Data flow of one step::

    pixels -> vision tower (frozen) -> hidden_states[layer] (or S2 features) -> adapter -> visual tokens
           -> merged at <image> into the text embeddings -> LLM -> L_lm            (Eq. 10)
    per-patch joint features -> top-n words (on the fly)  | or labels from the batch (Eq. 4-6)
           -> k x k window sampling + global keep-one-per-label dedup              (Eq. 7)
           -> visual tokens vs label embeddings (Eq. 8) -> symmetric InfoNCE       (Eq. 9)
    L = L_lm + lambda * L_a                                                        (Eq. 11)

Parameters are split by top-level name into *trainable* ones (carried in :class:`TrainState` with
optimizer state) and *frozen* ones (an argument of the step, never differentiated, no optimizer
state): stage 1 trains ``("adapter", "log_tau")``, stage 2 ``("adapter", "llm")`` (and
``"vision"`` for SEA-PRIME). The frozen dict also carries SEA's tables: ``label_table`` [W, d]
(Eq. 8, computed once while the LLM is frozen) and, for on-the-fly labels, ``word_table`` [W, dj]
(SigLIP text embeddings of the word list).

Every random choice uses ``fold_in(key(seed), step)``, so a resumed run repeats the same choices.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sea_jax import sharding
from sea_jax.align import semantic_labels as labels_lib
from sea_jax.align import loss as loss_lib
from sea_jax.align import sampling
from sea_jax.models.mllm import MLLM, head_capacity, lm_loss, lm_loss_sum

LABEL_SOURCES = ("on_the_fly", "batch")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step computes (not how it is optimized).

    Attributes:
      lam: lambda of Eq. 11; 0 turns SEA off (plain LLaVA training) and skips the alignment work.
      window: k of the k x k localized sampling windows.
      top_n: labels per patch (on-the-fly labelling).
      negate_similarity: rank words by -cos (paper Eq. 6 / CLIP Surgery); False for SigLIP.
      label_source: "on_the_fly" (from the SigLIP forward already in the step) or "batch"
        (``label_ids`` / ``label_scores`` precomputed by ``python -m sea_jax.labels``).
      tau_min: lower clamp of the temperature.
      trainable: top-level parameter names updated by the optimizer.
      seed: base of every step key.
      microbatches: the LM loss is accumulated over this many slices of the global batch (exact:
        the same loss and gradients as one pass). The alignment loss stays on the whole global
        batch, as SEA defines it, from visual tokens computed once per step.
      logits_chunk: > 0 computes the LM loss this many positions at a time without ever holding
        the [batch, length, vocab] logits (Gemma's 256k vocabulary); 0 = plain logits.
      label_chunk: on-the-fly labels score the word table this many words at a time with a
        running top-n (``labels.chunk_size``, as the offline labeller), never holding the
        [batch, patches, words] similarity (256 x 729 x 40k float32 is 30 GB); 0 = all at once.
    """

    lam: float = 1.0
    window: int = 2
    top_n: int = 10
    negate_similarity: bool = False
    label_source: str = "on_the_fly"
    tau_min: float = loss_lib.DEFAULT_TAU_MIN
    trainable: tuple[str, ...] = ("adapter", "log_tau")
    seed: int = 0
    microbatches: int = 1
    logits_chunk: int = 0
    label_chunk: int = 0

    def __post_init__(self):
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source {self.label_source!r} not in {LABEL_SOURCES}")
        if self.microbatches < 1 or self.logits_chunk < 0:
            raise ValueError(f"microbatches {self.microbatches} must be >= 1 and logits_chunk {self.logits_chunk} >= 0")

    @classmethod
    def from_config(cls, config) -> "StepConfig":
        """The step's view of a run config (``sea``, ``labels``, ``train``, ``seed``)."""
        return cls(
            lam=float(config.sea.lam), window=int(config.sea.window), top_n=int(config.labels.top_n),
            negate_similarity=bool(config.labels.negate_similarity), label_source=config.sea.label_source,
            tau_min=float(config.sea.tau_min), trainable=tuple(config.train.trainable), seed=int(config.seed),
            microbatches=int(config.train.microbatches), logits_chunk=int(config.train.logits_chunk),
            label_chunk=int(config.labels.chunk_size),
        )


@flax.struct.dataclass
class TrainState:
    """step (int32 scalar), trainable params, optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of one step: a pure function of (seed, step), so resumed runs repeat themselves."""
    return jax.random.fold_in(jax.random.key(seed), step)


def make_optimizer(
    lr: float,
    total_steps: int,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    group_lr: Mapping[str, float] | None = None,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """AdamW with linear warmup + cosine decay (the LLaVA-1.5 recipe).

    ``group_lr`` gives other peak learning rates per top-level parameter name (e.g.
    ``{"vision": 2e-6}`` for SEA-PRIME); the schedule shape is shared. Returns (optimizer, schedule
    of the default group) — the schedule is what the step reports as ``lr``.
    """
    warmup = max(1, int(round(warmup_ratio * total_steps)))

    def schedule_for(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)

    def adamw(peak):
        return optax.adamw(schedule_for(peak), b1=b1, b2=b2, weight_decay=weight_decay)

    group_lr = dict(group_lr or {})
    if group_lr:
        labels = lambda params: {k: (k if k in group_lr else "default") for k in params}  # noqa: E731
        tx = optax.multi_transform({"default": adamw(lr), **{k: adamw(v) for k, v in group_lr.items()}}, labels)
    else:
        tx = adamw(lr)
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx, schedule_for(lr)


def split_params(params: Mapping[str, Any], trainable: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) by top-level name; a trainable name that is missing is an error."""
    missing = [k for k in trainable if k not in params]
    if missing:
        raise KeyError(f"trainable parameters {missing} not in the model's parameters {sorted(params)}")
    return {k: v for k, v in params.items() if k in trainable}, {k: v for k, v in params.items() if k not in trainable}


def _label_table(scfg: StepConfig, params: Mapping[str, Any], frozen: Mapping[str, Any]) -> jax.Array:
    if "label_table" in frozen:
        return frozen["label_table"]
    # LLM being trained (stage 2 with lambda > 0): Eq. 8 must follow the current embedding rows.
    emb = params["llm"]["embedder"]["embedding"]
    wt = frozen["word_tokens"]
    return loss_lib.label_embedding_table(emb, wt["ids"], wt["mask"])


def loss_fn(
    model: MLLM,
    scfg: StepConfig,
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = L_lm + lambda L_a for one global batch, and its metrics.

    ``batch``: ``images`` [B, h, w, 3] in [-1, 1], ``input_ids`` / ``attention_mask`` /
    ``loss_mask`` [B, L], ``has_image`` [B] (text-only samples carry a dummy image that is neither
    merged nor labelled), and with ``label_source="batch"`` ``label_ids`` [B, p, n] int32 and
    ``label_scores`` [B, p, n] (score <= 0 = no label).
    """
    params = {**frozen, **trainable}
    image = model.encode_images(params["vision"], batch["images"])
    total, count, fwd = _lm_sum(model, scfg, params, image.features, batch["input_ids"], batch["attention_mask"],
                                batch["loss_mask"])
    l_lm = total / jnp.maximum(count, 1.0)
    align = jnp.zeros((), jnp.float32)
    if scfg.lam > 0:
        align = _alignment(model, scfg, params, frozen, batch, key, mesh, fwd.visual_tokens, image.patch_embeds)
    loss, metrics = loss_lib.sea_objective(l_lm, align, scfg.lam)
    metrics["target_tokens"] = count.astype(jnp.int32)
    return loss, metrics


def _lm_sum(model, scfg, params, feats, input_ids, attention_mask, loss_mask):
    """(sum of next-token losses, target count, the forward) from the adapter's input features.

    The LM head runs on each row's target slots where that at least halves its positions
    (:func:`sea_jax.models.mllm.lm_loss_sum`), else on every position: ``logits_chunk`` at a time,
    or as the LLM's own logits. The last case keeps the program the plain head always compiled
    to: a separate head call on the shifted hidden states needed 1.1 GiB more per chip (AOT,
    vicuna13b stage 1 on v4-32)."""
    capacity = head_capacity(model.cfg, input_ids.shape[1])
    if not capacity and not scfg.logits_chunk:
        fwd = model.forward_features(params, feats, input_ids, attention_mask)
        mean, count = lm_loss(fwd.logits, input_ids, loss_mask)
        return mean * count, count.astype(jnp.float32), fwd
    fwd = model.forward_features(params, feats, input_ids, attention_mask, compute_logits=False)
    total, count = lm_loss_sum(model, params["llm"], fwd.hidden, input_ids, loss_mask, chunk=scfg.logits_chunk,
                               capacity=capacity)
    return total, count, fwd


def _alignment(model, scfg, params, frozen, batch, key, mesh, visual_tokens, patch_embeds) -> loss_lib.AlignOut:
    """Eq. 4-9 on the global batch: labels (on the fly or from the batch), window sampling,
    global dedup, the distributed symmetric InfoNCE."""
    if scfg.label_source == "on_the_fly":
        ids, scores, valid = labels_lib.top_labels(patch_embeds, frozen["word_table"], scfg.top_n, scfg.negate_similarity,
                                                   chunk_size=scfg.label_chunk or None)
    else:
        ids, scores = batch["label_ids"], batch["label_scores"].astype(jnp.float32)
        valid = scores > 0
    valid = valid & batch["has_image"][:, None, None]
    grid = (model.cfg.vision.grid, model.cfg.vision.grid)
    pairs = sampling.select_pairs(key, ids, scores, valid, grid, scfg.window)
    return loss_lib.alignment_loss(
        visual_tokens.astype(jnp.float32), pairs, _label_table(scfg, params, frozen).astype(jnp.float32),
        params["log_tau"], mesh=mesh, tau_min=scfg.tau_min,
    )


def _split_microbatches(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...] taking every m-th sample, so each microbatch is spread over all the
    devices the batch is split over (a contiguous split would leave most devices idle)."""
    if x.shape[0] % m:
        raise ValueError(f"batch {x.shape[0]} is not divisible into {m} microbatches")
    return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def accumulated_grads(
    model: MLLM,
    scfg: StepConfig,
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    mesh: Mesh | None = None,
) -> tuple[dict[str, jax.Array], Any]:
    """(metrics, grads) of :func:`loss_fn`'s loss, memory-bounded: the frozen image tower runs
    once on the global batch, L_a is computed on the global batch, and L_lm is a sum over
    ``scfg.microbatches`` slices (optionally with the chunked LM head), divided by the global
    target count at the end, so the result equals one full-batch pass."""
    vision_trained = "vision" in trainable
    if vision_trained and scfg.lam > 0 and scfg.microbatches > 1:
        raise ValueError(
            "microbatches > 1 with a trained vision tower and lam > 0 would need the tower's activations "
            "for the whole global batch at once; use lam = 0 (stage 2) or microbatches = 1"
        )
    image = None
    if not vision_trained:
        image = model.encode_images(frozen["vision"], batch["images"])

    grads_a, align = None, None
    if scfg.lam > 0:
        def align_fn(p):
            prm = {**frozen, **p}
            img = image if image is not None else model.encode_images(prm["vision"], batch["images"])
            tokens = model.visual_tokens(prm["adapter"], img)
            out = _alignment(model, scfg, prm, frozen, batch, key, mesh, tokens, img.patch_embeds)
            return out.loss, out

        (_, align), grads_a = jax.value_and_grad(align_fn, has_aux=True)(trainable)

    m = scfg.microbatches
    xs = {k: _split_microbatches(batch[k], m) for k in ("input_ids", "attention_mask", "loss_mask")}
    if vision_trained:
        xs["images"] = _split_microbatches(batch["images"], m)
    else:
        xs["feats"] = _split_microbatches(image.features, m)

    def lm_sum(p, mb):
        prm = {**frozen, **p}
        feats = mb["feats"] if "feats" in mb else model.encode_images(prm["vision"], mb["images"]).features
        feats = sharding.constrain(feats, ("batch", "length", "act_embed"))
        total, count, _ = _lm_sum(model, scfg, prm, feats, mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
        return total, count

    def body(carry, mb):
        g_acc, s_acc, n_acc = carry
        (s, n), g = jax.value_and_grad(lm_sum, has_aux=True)(trainable, mb)
        return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (g_sum, s_sum, n_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), jnp.zeros(())), xs)
    denom = jnp.maximum(n_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    l_lm = s_sum / denom
    if grads_a is not None:
        grads = jax.tree.map(lambda g, ga: g + scfg.lam * ga, grads, grads_a)
    _, metrics = loss_lib.sea_objective(l_lm, align if align is not None else jnp.zeros((), jnp.float32), scfg.lam)
    metrics["target_tokens"] = n_sum.astype(jnp.int32)
    return metrics, grads


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any], rules: sharding.LogicalRules = sharding.DEFAULT_RULES):
    """Every batch array split along its leading (batch) axis over the rules' ``batch`` axes."""
    return {
        k: NamedSharding(mesh, sharding.logical_spec(("batch",) + (None,) * (len(v.shape) - 1), rules, mesh, v.shape))
        for k, v in batch.items()
    }


def init_state(trainable: Any, optimizer: optax.GradientTransformation, shardings: Any | None = None) -> TrainState:
    """Step 0 with fresh optimizer state. Jitted: without ``shardings`` the state inherits the
    params' shardings; with them (a :class:`TrainState` of shardings) it is placed exactly as a
    step compiled for those shardings expects."""
    init = lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))  # noqa: E731
    return jax.jit(init, out_shardings=shardings)(trainable)


def make_train_step(
    model: MLLM,
    scfg: StepConfig,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    mesh: Mesh | None = None,
    state_shardings: Any | None = None,
    frozen_shardings: Any | None = None,
    batch_sharding: Any | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    donate: bool = True,
):
    """``step(state, frozen, batch) -> (state, metrics)``, jitted.

    With a mesh, pass the shardings (``jax.tree.map(lambda x: x.sharding, tree)`` of placed
    arrays is the usual way): they become the jit's explicit in/out shardings, activations are
    constrained by the logical rules, and the alignment loss runs under ``shard_map`` over the
    batch axes. Metrics are replicated scalars.
    """

    def step(state: TrainState, frozen, batch):
        with sharding.activation_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext():
            key = step_key(scfg.seed, state.step)
            if scfg.microbatches > 1 or scfg.logits_chunk:
                metrics, grads = accumulated_grads(model, scfg, state.params, frozen, batch, key, mesh)
            else:
                grad_fn = jax.value_and_grad(
                    lambda p: loss_fn(model, scfg, p, frozen, batch, key, mesh), has_aux=True
                )
                (_, metrics), grads = grad_fn(state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
            # non-pad tokens of the global batch: with length buckets, real vs computed tokens
            metrics["real_tokens"] = jnp.sum(batch["attention_mask"], dtype=jnp.int32)
            if schedule is not None:
                metrics["lr"] = schedule(state.step)
            if "log_tau" in params:
                metrics["tau"] = loss_lib.temperature(params["log_tau"], scfg.tau_min)
        return TrainState(state.step + 1, params, opt_state), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )
