"""TPU slices as the compiler sees them, without the hardware: names, chip grids, HBM, and the
config's mesh laid onto compile-only devices (``jax.experimental.topologies``, needs ``libtpu``).

What ``gcloud`` needs to create a slice (accelerator type, runtime, zone) lives in
``launch_tpu/tpu.py``, which must run without JAX; a test checks the two tables agree.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from sea_jax import sharding

@dataclasses.dataclass(frozen=True)
class Topology:
    """One TPU slice type, in the terms ``get_topology_desc`` wants.

    Attributes:
      name: the Cloud TPU accelerator type (``v4-32``, ``v5litepod-16`` is spelled ``v5e-16``).
      topology: ``<gen>:<chip grid>`` as libtpu spells it (``v4:2x2x4``).
      chip_config: "megacore" for v4 / v5p (the two TensorCores of a chip are one JAX device),
        "default" for the single-core v5e / v6e.
      chips_per_host: host bounds (chips per VM along each axis); only process ids depend on it.
      hbm_gib: HBM per chip (= per JAX device here).
      peak_tflops: bf16 peak per chip, for the MFU a FLOP count implies.

    What ``gcloud`` needs to create a slice (accelerator type, runtime, zone) lives in
    ``launch_tpu/tpu.py``, which must run without JAX; a test checks the two tables agree.
    """

    name: str
    topology: str
    chip_config: str
    chips_per_host: tuple[int, int, int]
    hbm_gib: float
    peak_tflops: float

    @property
    def chips(self) -> int:
        return math.prod(int(x) for x in self.topology.split(":")[1].split("x"))

    @property
    def hosts(self) -> int:
        return max(1, self.chips // math.prod(self.chips_per_host))


def _v4(cores: int, grid: str) -> Topology:
    # v4-N counts TensorCores: N/2 chips, 4 chips per VM.
    return Topology(f"v4-{cores}", f"v4:{grid}", "megacore", (2, 2, 1), 32, 275)


def _v5e(chips: int, grid: str) -> Topology:
    # v5litepod-8 is one 8-chip VM; larger v5e slices are 4-chip VMs.
    host = (2, 4, 1) if chips == 8 else (2, 2, 1) if chips > 4 else (chips if chips < 4 else 2, 1 if chips < 4 else 2, 1)
    return Topology(f"v5e-{chips}", f"v5e:{grid}", "default", host, 16, 197)


def _v5p(cores: int, grid: str) -> Topology:
    return Topology(f"v5p-{cores}", f"v5p:{grid}", "megacore", (2, 2, 1), 95, 459)


def _v6e(chips: int, grid: str) -> Topology:
    host = (2, 4, 1) if chips == 8 else (2, 2, 1)
    return Topology(f"v6e-{chips}", f"v6e:{grid}", "default", host, 32, 918)


TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        _v4(8, "2x2x1"), _v4(16, "2x2x2"), _v4(32, "2x2x4"), _v4(64, "2x4x4"), _v4(128, "4x4x4"),
        _v5e(4, "2x2"), _v5e(8, "2x4"), _v5e(16, "4x4"), _v5e(32, "4x8"), _v5e(64, "8x8"),
        _v5e(128, "8x16"), _v5e(256, "16x16"),
        _v5p(8, "2x2x1"), _v5p(16, "2x2x2"), _v5p(32, "2x2x4"), _v5p(64, "2x4x4"), _v5p(128, "4x4x4"),
        _v6e(8, "2x4"), _v6e(16, "4x4"), _v6e(32, "4x8"), _v6e(64, "8x8"), _v6e(256, "16x16"),
    )
}


def get_topology(name: str) -> Topology:
    """A slice by name (``v4-32``; ``v5litepod-16`` is accepted for ``v5e-16``), or a raw libtpu
    topology ``<gen>:<grid>`` (``v4:2x2x1``), whose chip facts come from its generation."""
    name = name.replace("v5litepod-", "v5e-")
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    gen, sep, grid = name.partition(":")
    same_gen = [t for t in TOPOLOGIES.values() if t.topology.startswith(gen + ":")]
    if sep and same_gen:
        return dataclasses.replace(same_gen[0], name=name, topology=name)
    raise KeyError(f"unknown topology {name!r}; known: {sorted(TOPOLOGIES)} or '<gen>:<grid>' (e.g. v4:2x2x1)")


def libtpu_available(probe: bool = True) -> tuple[bool, str]:
    """(True, "") when TPU topologies can be described on this host, else (False, why).

    ``probe`` also describes a one-host v4 slice, which catches a libtpu that is present but does
    not load with this jaxlib (a version mismatch) -- the case where tests should skip, not fail.
    """
    try:
        from jax._src import xla_bridge

        if xla_bridge.get_tpu_library_path() is None:
            return False, "libtpu is not installed (pip install 'libtpu==0.0.42.*' for jax 0.10.2, or 'jax[tpu]')"
        if probe:
            topology_devices(TOPOLOGIES["v4-8"])
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot AOT for TPU"
        return False, f"libtpu cannot describe a TPU topology here: {e!r}"[:500]
    return True, ""


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """Compile-only TPU devices of ``num_slices`` copies of ``topo`` (multi-slice: over DCN)."""
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology,
        chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.chips_per_host,
        num_slices=num_slices,
    )
    return list(desc.devices)


def resolve_mesh_sizes(axes: Mapping[str, int], n: int) -> dict[str, int]:
    """Mesh axis sizes with the one ``-1`` filled in (same rule as :func:`sharding.make_mesh`)."""
    sizes = {a: int(axes.get(a, 1)) for a in sharding.MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % known:
            raise ValueError(f"{n} devices do not divide into mesh {dict(axes)}")
        sizes[free[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh {sizes} uses {math.prod(sizes.values())} devices; the slice has {n}")
    return sizes


def topology_mesh(devices: Sequence, axes: Mapping[str, int], num_slices: int = 1) -> Mesh:
    """The config's (data, fsdp, tensor) mesh laid onto the physical torus.

    ``mesh_utils`` orders devices so the fast-varying axes (tensor, then fsdp) are ICI
    neighbours; with several slices the ``data`` axis is split across them (DCN carries only the
    data-parallel gradient reduction).
    """
    from jax.experimental import mesh_utils

    sizes = resolve_mesh_sizes(axes, len(devices))
    shape = [sizes[a] for a in sharding.MESH_AXES]
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ValueError(f"data axis {shape[0]} must be a multiple of num_slices {num_slices}")
        ici = [shape[0] // num_slices, shape[1], shape[2]]
        grid = mesh_utils.create_hybrid_device_mesh(ici, [num_slices, 1, 1], devices)
    else:
        grid = mesh_utils.create_device_mesh(shape, devices)
    return sharding.make_mesh(sizes, list(np.asarray(grid).reshape(-1)))


__all__ = ["Topology", "TOPOLOGIES", "get_topology", "libtpu_available", "topology_devices", "resolve_mesh_sizes",
           "topology_mesh"]
