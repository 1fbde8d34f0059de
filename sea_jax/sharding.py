"""Meshes and logical-axis sharding.

Every parameter and key activation carries *logical* axis names ("embed", "heads", "batch", ...).
One table of rules (``LogicalRules``) maps logical names to the physical mesh axes
(``data``, ``fsdp``, ``tensor``). Changing how a model is parallelised means changing the rules,
never the model code.

Parameters are annotated with ``flax.linen.with_logical_partitioning``; activations call
:func:`constrain`, which is a no-op unless :func:`activation_sharding` is active (so the same model
code runs unsharded in a plain ``jit`` or a test).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

# Parameters: FSDP shards the model dimension, tensor parallelism the heads / mlp / vocab dimension.
# Activations: the batch is split over data *and* fsdp (FSDP is data parallelism with sharded
# weights); the feature dims of activations use act_* names so they are not FSDP-sharded.
DEFAULT_RULES: LogicalRules = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # SEA: candidate (token, label) pairs are split like the batch; the word table over all axes.
    ("pairs", ("data", "fsdp")),
    ("words", ("data", "fsdp", "tensor")),
)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``MESH_AXES`` (always all three, in that order).

    Args:
      axes: size per axis name; a missing axis has size 1, one axis may be -1 ("the rest").
      devices: devices to use (default ``jax.devices()``); the first prod(sizes) are taken.
    """
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected a subset of {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(axes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = math.prod(sizes)
    if total > len(devices) or min(sizes) < 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, have {len(devices)}")
    grid = np.asarray(devices[:total], dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_spec(
    names: Sequence[str | None],
    rules: LogicalRules = DEFAULT_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    With ``mesh`` and ``shape`` given, a mesh axis that does not divide its dimension is dropped
    (that dimension is replicated over it) and no mesh axis is used twice, so any model size works on
    any mesh. Unknown logical names raise, so a typo cannot silently replicate a 7B weight.
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
        target = table[name]
        cand = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        dim = None if shape is None else int(shape[i])
        for ax in cand:
            if ax in used or (mesh is not None and ax not in mesh.shape):
                continue
            if mesh is not None and dim is not None:
                step = math.prod(mesh.shape[a] for a in kept) * mesh.shape[ax]
                if dim % step:
                    continue
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh, names: Sequence[str | None], shape: Sequence[int], rules: LogicalRules = DEFAULT_RULES
) -> NamedSharding:
    """NamedSharding of an array of ``shape`` whose axes have the given logical ``names``."""
    return NamedSharding(mesh, logical_spec(names, rules, mesh, shape))


def logical_names(boxed_tree):
    """Tree of logical-name tuples (``PartitionSpec`` of names) from a tree boxed by
    ``nn.with_logical_partitioning``; unboxed leaves get an empty spec (replicated)."""
    return nn.get_partition_spec(boxed_tree)


def tree_shardings(abstract_boxed_tree, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """NamedShardings for every leaf of an (abstract, e.g. ``jax.eval_shape``) boxed tree.

    The returned tree is unboxed, matching ``nn.unbox(abstract_boxed_tree)``.
    """
    names = logical_names(abstract_boxed_tree)
    shapes = nn.unbox(abstract_boxed_tree)

    def one(spec, leaf):
        spec = tuple(spec) if spec is not None else ()
        spec = spec + (None,) * (len(leaf.shape) - len(spec))
        return named_sharding(mesh, spec, leaf.shape, rules)

    return jax.tree.map(one, names, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def placements(abstract_boxed_tree, mesh: Mesh | None, rules: LogicalRules = DEFAULT_RULES):
    """Where loaders put each leaf: its logical sharding on ``mesh``, or the first local device
    when there is no mesh. Same (unboxed) structure as the tree."""
    if mesh is not None:
        return tree_shardings(abstract_boxed_tree, mesh, rules)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, nn.unbox(abstract_boxed_tree))


# ----------------------------------------------------------------------------------------------
# Activation constraints


_ACTIVE: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "sea_jax_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (at trace time), :func:`constrain` pins activations to ``mesh``."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, when an activation mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical names {tuple(names)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing :func:`activation_sharding` context, if any."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


# ----------------------------------------------------------------------------------------------
# Multi-host


def init_distributed() -> None:
    """``jax.distributed.initialize()`` when this is one process of several.

    On TPU pods JAX discovers the topology itself; elsewhere set ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (used by the multi-host test on 127.0.0.1).
    Single-process runs are left alone.
    """
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()
