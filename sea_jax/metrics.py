"""FLOP accounting of a train step, and the chips' peak FLOP/s for MFU.

Where the numbers are written (``metrics.jsonl``, TensorBoard, W&B) is :mod:`sea_jax.tracking`;
the progress display is :mod:`sea_jax.progress`.

FLOPs of one train step (:func:`train_step_flops`, a pure function of sizes). Conventions, per
token that goes through a part (padding included: it is computed, and MFU measures the hardware):

* A matmul with an N-parameter weight costs 2N FLOPs forward. Its backward costs 2N for the
  activation gradient (needed whenever the gradient has to flow *through* the part to reach
  something trainable upstream) plus 2N for the weight gradient (only if the part is trained).
* trainable part: ``6 N`` (forward + activation grad + weight grad).
* frozen part the gradient flows through: ``4 N`` (forward + activation grad, no weight grad).
  In stage 1 this is the LLM: frozen, but L_lm's gradient must cross it to reach the adapter.
* frozen part with nothing trainable upstream: ``2 N`` (forward only). This is SigLIP unless it
  is trained (SEA-PRIME): its input is pixels, so no gradient is computed through it.
* N counts the weights used in matmuls: all parameters except the LLM's input embedding table
  (a gather, no FLOPs), plus the LM head (``vocab x hidden``, which for tied embeddings is the
  table itself). Norm scales and biases are included (negligible). The LM head counts only the
  positions the step runs it on: where the image tokens (never targets) leave a few slots per
  row, only those (``FlopSpec.head_positions``).
* Attention scores and the weighted sum (QK^T and AV) have no weights: ``4 * layers * heads *
  head_dim * context`` FLOPs per token forward (2 matmuls x 2 FLOP/MAC), counted over the full
  context (no causal saving: PaLM's appendix-B convention, what MaxText-style MFU reports use),
  times 3 when the gradient flows through (both operands are activations, so the backward costs
  twice the forward whether or not the part's weights are trained).
* SEA extras: on-the-fly labelling scores every patch against the word table
  (``2 * patches * words * joint_dim`` per image, forward only); the per-patch MAP head is counted
  in the SigLIP part's N. The alignment loss (N x N logits over kept pairs) is data dependent and
  small against the rest; it is not counted.

MFU = achieved FLOP/s per device / the chip's peak dense bf16 FLOP/s (:data:`PEAK_TFLOPS`, looked
up from ``jax.devices()[0].device_kind``; None on CPU or an unknown chip).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# Peak dense bf16 TFLOP/s per chip (vendor datasheets). Matched against ``device_kind`` in order,
# first substring wins, so more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0),  # Trillium (v6e)
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),  # v5e reports "TPU v5 lite"
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v4", 275.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s of one chip of this ``device_kind``, None if unknown (e.g. CPU)."""
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


# ----------------------------------------------------------------------------------------------
# FLOPs


@dataclasses.dataclass(frozen=True)
class FlopSpec:
    """Sizes that determine one train step's FLOPs (see the module docstring).

    Attributes:
      batch: global batch (images = sequences).
      seq_len: LLM sequence length (padded).
      llm_matmul_params: LLM weights used in matmuls (all but the input embedding table, plus the
        LM head; see :func:`llm_matmul_params`).
      llm_layers, llm_heads, llm_head_dim: attention sizes of the LLM.
      vision_params: SigLIP image-tower parameters (incl. the MAP head when labelling on the fly).
      vision_layers, vision_width: image-tower depth and width (attention FLOPs; width = heads x
        head_dim).
      patches: patches (= visual tokens) per image.
      adapter_params: adapter parameters.
      trainable: names of the trained parts among ``"vision"``, ``"adapter"``, ``"llm"``.
      label_words, label_dim: word-table size and joint dim for on-the-fly labelling (0 = off).
      head_params, head_positions: the LM head's weights (``vocab x hidden``, part of
        ``llm_matmul_params``) and the positions per row it runs on, when fewer than ``seq_len``
        (the step's head runs on the target slots only, :func:`sea_jax.models.mllm.head_capacity`;
        0 = every position).
    """

    batch: int
    seq_len: int
    llm_matmul_params: int
    llm_layers: int
    llm_heads: int
    llm_head_dim: int
    vision_params: int
    vision_layers: int
    vision_width: int
    patches: int
    adapter_params: int
    trainable: frozenset[str] = frozenset({"adapter"})
    label_words: int = 0
    label_dim: int = 0
    head_params: int = 0
    head_positions: int = 0


def _mult(trained: bool, grad_through: bool) -> int:
    """FLOPs per weight per token in units of 2N: forward, + activation grad, + weight grad."""
    return 2 * (1 + int(grad_through or trained) + int(trained))


def train_step_flops(spec: FlopSpec) -> dict[str, float]:
    """FLOPs of one train step by part, and ``total``.

    Returns keys ``vision``, ``adapter``, ``llm``, ``labels``, ``total`` (float FLOPs for the
    global batch). The gradient flows through a part iff something upstream of it is trained:
    vision <- adapter <- llm in data-flow order, so the LLM carries gradients whenever the adapter
    or vision is trained, and the adapter whenever vision is.
    """
    t = spec.trainable
    unknown = set(t) - {"vision", "adapter", "llm", "log_tau"}
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}")
    v_tr, a_tr, l_tr = "vision" in t, "adapter" in t, "llm" in t
    img_tokens = spec.batch * spec.patches
    llm_tokens = spec.batch * spec.seq_len

    # vision: nothing upstream of pixels, so only its own training makes a gradient flow
    v_mult = _mult(v_tr, False)
    v_attn = 4 * spec.vision_layers * spec.vision_width * spec.patches * (3 if v_tr else 1)
    vision = img_tokens * (v_mult * spec.vision_params + v_attn)

    a_mult = _mult(a_tr, v_tr)
    adapter = img_tokens * a_mult * spec.adapter_params

    l_through = a_tr or v_tr
    l_mult = _mult(l_tr, l_through)
    l_attn = 4 * spec.llm_layers * spec.llm_heads * spec.llm_head_dim * spec.seq_len * (3 if (l_tr or l_through) else 1)
    llm = llm_tokens * (l_mult * spec.llm_matmul_params + l_attn)
    if spec.head_positions:
        llm -= spec.batch * (spec.seq_len - spec.head_positions) * l_mult * spec.head_params

    labels = 2.0 * img_tokens * spec.label_words * spec.label_dim
    out = {"vision": float(vision), "adapter": float(adapter), "llm": float(llm), "labels": float(labels)}
    out["total"] = sum(out.values())
    return out


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def llm_matmul_params(llm_params: Mapping, vocab_size: int, hidden: int) -> int:
    """LLM weights that cost FLOPs per token: all but the input embedding (a gather), plus the LM
    head (an untied ``lm_head`` is already in the tree; a tied head reuses the table)."""
    total = count_params(llm_params)
    emb = count_params(llm_params["embedder"]["embedding"])
    head_in_tree = "lm_head" in llm_params
    return total - emb + (0 if head_in_tree else vocab_size * hidden)


__all__ = ["PEAK_TFLOPS", "peak_tflops", "FlopSpec", "train_step_flops", "count_params", "llm_matmul_params"]
