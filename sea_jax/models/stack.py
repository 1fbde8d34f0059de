"""A stack of identical encoder blocks, as the vision towers run it: scanned or unrolled, with
optional remat, collecting every block's output (HF's ``hidden_states`` numbering).

Called from inside a module's ``nn.compact`` method, so the blocks become that module's
children: ``<name>`` (one scanned parameter tree with a leading ``layers`` axis) or
``<name>_0`` .. ``<name>_{depth-1}``. Each tower keeps its own block class (the parameter layouts
differ: big_vision for SigLIP, HF for CLIP); only the stacking lives here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

Array = jax.Array


def run_blocks(block: type[nn.Module], kw: Mapping[str, Any], x: Array, *, depth: int, name: str,
               scan: bool, remat: bool, remat_policy: str, collect: bool) -> tuple[Array, tuple | None]:
    """Runs ``depth`` blocks ``block(**kw)`` on x [b, l, D]; each block returns (x, x_or_None).

    Returns (x after the last block, hidden states or None): ``depth + 1`` arrays (the input,
    then each block's output) when ``collect``.
    """
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
