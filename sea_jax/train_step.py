"""The jitted, sharded SEA train step (paper Eq. 7-11), for both stages.

Data flow of one step::

    pixels -> SigLIP image tower (frozen) -> hidden_states[layer] -> adapter -> visual tokens
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
from sea_jax.align import labels as labels_lib
from sea_jax.align import loss as loss_lib
from sea_jax.align import sampling
from sea_jax.models.mllm import MLLM, lm_loss

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
    """

    lam: float = 1.0
    window: int = 2
    top_n: int = 10
    negate_similarity: bool = False
    label_source: str = "on_the_fly"
    tau_min: float = loss_lib.DEFAULT_TAU_MIN
    trainable: tuple[str, ...] = ("adapter", "log_tau")
    seed: int = 0

    def __post_init__(self):
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source {self.label_source!r} not in {LABEL_SOURCES}")


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
    fwd = model(params, batch["images"], batch["input_ids"], batch["attention_mask"])
    l_lm, n_tokens = lm_loss(fwd.logits, batch["input_ids"], batch["loss_mask"])
    if scfg.lam == 0:
        loss, metrics = loss_lib.sea_objective(l_lm, jnp.zeros((), jnp.float32), 0.0)
        metrics["target_tokens"] = n_tokens
        return loss, metrics

    if scfg.label_source == "on_the_fly":
        ids, scores, valid = labels_lib.top_labels(
            fwd.image.patch_embeds, frozen["word_table"], scfg.top_n, scfg.negate_similarity
        )
    else:
        ids, scores = batch["label_ids"], batch["label_scores"].astype(jnp.float32)
        valid = scores > 0
    valid = valid & batch["has_image"][:, None, None]
    grid = (model.cfg.vision.grid, model.cfg.vision.grid)
    pairs = sampling.select_pairs(key, ids, scores, valid, grid, scfg.window)
    align = loss_lib.alignment_loss(
        fwd.visual_tokens.astype(jnp.float32), pairs, _label_table(scfg, params, frozen).astype(jnp.float32),
        params["log_tau"], mesh=mesh, tau_min=scfg.tau_min,
    )
    loss, metrics = loss_lib.sea_objective(l_lm, align, scfg.lam)
    metrics["target_tokens"] = n_tokens
    return loss, metrics


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any], rules: sharding.LogicalRules = sharding.DEFAULT_RULES):
    """Every batch array split along its leading (batch) axis over the rules' ``batch`` axes."""
    return {
        k: NamedSharding(mesh, sharding.logical_spec(("batch",) + (None,) * (len(v.shape) - 1), rules, mesh, v.shape))
        for k, v in batch.items()
    }


def init_state(trainable: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 with fresh optimizer state; jitted so the state inherits the params' shardings."""
    return jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)))(trainable)


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
            grad_fn = jax.value_and_grad(
                lambda p: loss_fn(model, scfg, p, frozen, batch, key, mesh), has_aux=True
            )
            (_, metrics), grads = grad_fn(state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
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
