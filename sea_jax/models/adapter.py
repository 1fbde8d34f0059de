"""The vision-to-language adapter g_theta (LLaVA-1.5's projector).

``mlp2x_gelu`` is Linear -> GELU (exact, erf) -> Linear, as LLaVA-1.5 builds it and as HF's
``LlavaMultiModalProjector`` computes it (``projector_hidden_act="gelu"``); ``linear`` is LLaVA-1's
single projection. Parameter names ``linear_1`` / ``linear_2`` map one to one onto HF's
``multi_modal_projector.linear_{1,2}``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sea_jax import sharding

KINDS = ("mlp2x_gelu", "linear")


class Adapter(nn.Module):
    """Maps vision features [b, p, d_vision] to visual tokens [b, p, d_llm].

    Attributes:
      out_dim: the LLM's hidden size (its input-embedding width).
      kind: "mlp2x_gelu" (default, LLaVA-1.5) or "linear".
      dtype: compute dtype; parameters stay ``param_dtype``.
    """

    out_dim: int
    kind: str = "mlp2x_gelu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _dense(self, name: str, names: tuple[str | None, str | None]) -> nn.Dense:
        # PyTorch's nn.Linear init (kaiming-uniform weights, uniform bias) is what LLaVA trains from;
        # lecun_normal has the same variance scale and is Flax's idiom.
        return nn.Dense(
            self.out_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
            name=name,
        )

    @nn.compact
    def __call__(self, feats: Float[Array, "b p dv"]) -> Float[Array, "b p d"]:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} unknown; expected one of {KINDS}")
        x = self._dense("linear_1", (None, "embed"))(feats)
        if self.kind == "mlp2x_gelu":
            x = jax.nn.gelu(x, approximate=False)
            x = self._dense("linear_2", ("mlp", "embed"))(x)
        return sharding.constrain(x, ("batch", "length", "act_embed"))
