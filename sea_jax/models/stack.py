"""A stack of identical encoder blocks, as the vision towers run it: scanned or unrolled, with
optional remat, collecting every block's output (HF's ``hidden_states`` numbering).

Called from inside a module's ``nn.compact`` method, so the blocks become that module's
children: ``<name>`` (one scanned parameter tree with a leading ``layers`` axis) or
``<name>_0`` .. ``<name>_{depth-1}``. Each tower keeps its own block class (the parameter layouts
differ: big_vision for SigLIP, HF for CLIP); only the stacking lives here.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def run_blocks(block: type[nn.Module], kw: Mapping[str, Any], x: Array, *, depth: int, name: str,
               scan: bool, remat: bool, remat_policy: str, collect: bool,
               keep: int | None = None) -> tuple[Array, tuple | None]:
    """Runs ``depth`` blocks ``block(**kw)`` on x [b, l, D]; each block returns (x, x_or_None).

    Returns (x after the last block, hidden states or None): ``depth + 1`` arrays (the input,
    then each block's output) when ``collect``. With ``keep`` (a hidden-state index, HF numbering,
    negative from the end) and not ``collect``: the same tuple with only entry ``keep`` filled
    (the others None). Under scan the kept state rides in the carry, so the ``[depth, b, l, D]``
    stack of every block's output is never built: what a step that reads one layer (LLaVA's
    layer -2) needs.
    """
    if keep is not None and not collect:
        return _run_keeping(block, kw, x, depth=depth, name=name, scan=scan, remat=remat,
                            remat_policy=remat_policy, keep=int(keep) % (depth + 1))
    if remat:
        # Under scan, CSE across iterations cannot happen, so prevent_cse only costs speed there.
        block = nn.remat(block, prevent_cse=not scan, policy=getattr(jax.checkpoint_policies, remat_policy))
    hidden = [x]
    if scan:
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, ys = scanned(name=name, **kw)(x)
        if collect:
            hidden.extend(ys[i] for i in range(depth))
    else:
        for i in range(depth):
            x, _ = block(name=f"{name}_{i}", **kw)(x)
            hidden.append(x)
    return x, (tuple(hidden) if collect else None)


def _only(depth: int, k: int, value: Array) -> tuple:
    return tuple(value if i == k else None for i in range(depth + 1))


@functools.cache
def _keeping(block: type[nn.Module], k: int) -> type[nn.Module]:
    """``block`` whose call maps the carry (x, kept, i) -> ((x', kept', i + 1), None) with kept'
    = x' after block k - 1. A subclass, so its parameters are named exactly as ``block``'s."""

    class Keeping(block):
        def __call__(self, carry):
            x, kept, i = carry
            y, _ = super().__call__(x)
            i = i + 1
            return (y, jnp.where(i == k, y, kept), i), None

    Keeping.__name__ = Keeping.__qualname__ = f"{block.__name__}Keeping{k}"
    return Keeping


def _run_keeping(block, kw, x, *, depth, name, scan, remat, remat_policy, keep):
    if not scan:
        if remat:
            block = nn.remat(block, prevent_cse=True, policy=getattr(jax.checkpoint_policies, remat_policy))
        kept = x
        for i in range(depth):
            x, _ = block(name=f"{name}_{i}", **kw)(x)
            if i + 1 == keep:
                kept = x
        return x, _only(depth, keep, kept)
    body = _keeping(block, keep)
    if remat:
        body = nn.remat(body, prevent_cse=False, policy=getattr(jax.checkpoint_policies, remat_policy))
    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    (x, kept, _), _ = scanned(name=name, **kw)((x, x, jnp.zeros((), jnp.int32)))
    return x, _only(depth, keep, kept)
