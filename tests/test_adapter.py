"""The adapter against HF's LlavaMultiModalProjector with the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from sea_jax.models.adapter import Adapter


def _hf_projector(dv, d):
    cfg = LlavaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": dv},
        text_config={"model_type": "llama", "hidden_size": d},
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    return LlavaMultiModalProjector(cfg).eval()


def test_mlp2x_gelu_matches_hf_projector():
    dv, d = 24, 32
    proj = _hf_projector(dv, d)
    params = {
        f"linear_{i}": {
            "kernel": getattr(proj, f"linear_{i}").weight.detach().numpy().T,
            "bias": getattr(proj, f"linear_{i}").bias.detach().numpy(),
        }
        for i in (1, 2)
    }
    x = np.random.default_rng(0).normal(size=(2, 5, dv)).astype(np.float32)
    want = proj(torch.from_numpy(x)).detach().numpy()
    got = Adapter(out_dim=d).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_param_names_and_kinds():
    x = jnp.ones((1, 3, 8))
    mlp = jax.eval_shape(Adapter(out_dim=16).init, jax.random.key(0), x)["params"]
    lin = jax.eval_shape(Adapter(out_dim=16, kind="linear").init, jax.random.key(0), x)["params"]
    assert set(mlp) == {"linear_1", "linear_2"} and set(lin) == {"linear_1"}
    with pytest.raises(ValueError, match="adapter kind"):
        Adapter(out_dim=16, kind="qformer").init(jax.random.key(0), x)
