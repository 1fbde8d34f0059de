"""The two matmuls of dot-product attention, in a head-major layout, for the vision towers.

Projections give tokens-major arrays, q [b, l, H, D] and k / v [b, s, K, D] (K key/value heads,
H = K * G query heads; head h reads kv head h // G, HF's ``repeat_kv`` order, without repeating
the keys). Written as one einsum on that layout (``bqhd,bkhd->bhqk``) the batch dimensions of
the matmul (b, h) are not the leading ones, and XLA's CPU backend then runs it as a loop of
small dots, about 5x slower than the same FLOPs head-major (the SigLIP tower of
``benchmarks/step_time.py`` went 0.31 -> 0.13 s). So q, k and v are transposed to
[b, K, G, l, D] / [b, K, s, D] first and the output back: the same math. With one query head
per kv head (G = 1, every tower) the matmuls are plain [b, H] batches with the keys stored
transposed ([b, H, D, s]), the form XLA's CPU dots run fastest: the labeller's tower takes 4%
less time than through the grouped form. On TPU the towers' compiled memory is unchanged by
either (AOT, gemma2b and clip_vicuna7b stage 1). The LLM keeps its own einsum: there the TPU
compiler's layout of the head-major form needed 2 GiB more HBM per chip.

Scaling, masking, softmax and dtypes stay with each model; the functions here are only the layout
and the two contractions.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float


def scores(
    q: Float[Array, "b l h d"], k: Float[Array, "b s k d"], preferred_element_type: Any = None
) -> Float[Array, "b k g l s"]:
    """q . k for every (query head, its kv head): [b, K, G, l, s] with H = K * G."""
    b, l, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads are not a multiple of {kv} key/value heads")
    if h == kv:  # one query head per kv head (the towers): plain [b, H] batches of q @ kT
        qh, kt = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)  # [b, H, l, D], [b, H, D, s]
        out = jnp.einsum("bhld,bhds->bhls", qh, kt, preferred_element_type=preferred_element_type)
        return out[:, :, None]
    qh = q.reshape(b, l, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, K, G, l, D]
    kh = k.transpose(0, 2, 1, 3)  # [b, K, s, D]
    return jnp.einsum("bkgld,bksd->bkgls", qh, kh, preferred_element_type=preferred_element_type)


def mix(probs: Float[Array, "b k g l s"], v: Float[Array, "b s k d"]) -> Float[Array, "b l h d"]:
    """The attention-weighted sum of the values, back in the tokens-major layout [b, l, H, D]."""
    b, kv, g, l, _ = probs.shape
    vh = v.transpose(0, 2, 1, 3)  # [b, K, s, D]
    if g == 1:
        return jnp.einsum("bkls,bksd->bkld", probs[:, :, 0], vh).transpose(0, 2, 1, 3)
    out = jnp.einsum("bkgls,bksd->bkgld", probs, vh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, kv * g, v.shape[-1])


__all__ = ["scores", "mix"]
