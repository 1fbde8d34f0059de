"""Test setup: a simulated 8-chip pod on the CPU, and meshes over it.

XLA reads the device count when JAX's backend starts, so the flag is set here, before any test
module imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gcs_server  # noqa: E402,F401 - before google-auth / gcsfs read their settings at import
import jax  # noqa: E402
import pytest  # noqa: E402
from gcs_server import gcs  # noqa: E402,F401 - the local GCS fixture, for every test module

from sea_jax import sharding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

MESH_SHAPES = {
    "single": {"data": 1, "fsdp": 1, "tensor": 1},
    "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
    "d8": {"data": 8, "fsdp": 1, "tensor": 1},
    "f4t2": {"data": 1, "fsdp": 4, "tensor": 2},
}


@pytest.fixture(params=sorted(MESH_SHAPES))
def mesh(request):
    """A mesh over axes (data, fsdp, tensor) of each shape in MESH_SHAPES."""
    return sharding.make_mesh(MESH_SHAPES[request.param])


@pytest.fixture
def make_mesh():
    """Factory: make_mesh(data=2, fsdp=2, tensor=2) over the first prod(sizes) host devices."""

    def _make(**axes):
        return sharding.make_mesh(axes)

    return _make
