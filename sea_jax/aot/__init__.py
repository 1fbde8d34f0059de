"""Ahead-of-time compile of the real train step for a TPU slice we do not have, on this host.

:func:`compile_config` is the tool; ``python -m sea_jax.aot --config=configs/gemma2b.py
--topology=v4-32`` (:mod:`sea_jax.aot.__main__`) its command line; slices live in
:mod:`sea_jax.aot.topology`.

With ``libtpu`` installed (the ``test`` extra pins it), JAX can describe any TPU topology without
the hardware (``jax.experimental.topologies.get_topology_desc``) and hand out *compile-only*
devices. We build the config's mesh over those devices and lower the train step exactly as
``sea_jax.train`` does (:func:`sea_jax.builder.lower_step`: the same model config, parameters,
shardings and abstract batch; nothing real-size is ever allocated), compile it with the TPU
compiler, and read back what XLA decided:

* per-chip HBM from ``compiled.memory_analysis()`` (arguments, outputs, aliased by donation,
  temporaries, generated code) against the chip's capacity -> FITS / DOES NOT FIT (exit code 1);
* matmul FLOPs per step of the compiled program, every loop trip counted
  (:func:`sea_jax.aot.hlo_flops.loop_aware_flops` on ``compiled.as_text()``: the LLM's layer
  scan, the vision tower's scanned blocks, the microbatch loop and the chunked LM head / word
  scoring loops each multiply their body), against :func:`model_flops` (the analytic matmul
  count, without rematerialisation). Their ratio is the step's recompute factor: what remat
  recomputes, and what the program computes beyond the formula. ``compiled.cost_analysis()``
  is kept as ``cost_analysis_flops`` for reference only: it counts each loop body once, so for
  these programs it is a small fraction of the work.

Because the compiler is the TPU compiler, the numbers are the ones a pod would see, up to the
runtime's own reservations (hence ``--hbm_margin_gib``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from sea_jax import builder, sharding
from sea_jax import config as config_lib
from sea_jax.errors import ConfigError
from sea_jax.aot.hlo_flops import loop_aware_flops
from sea_jax.aot.topology import (TOPOLOGIES, Topology, get_topology, libtpu_available, resolve_mesh_sizes,
                                  topology_devices, topology_mesh)

GIB = 1 << 30

# Compile-only use of libtpu touches no TPU, so its one-process-per-host lock (/tmp/libtpu_lockfile)
# only gets in the way: two AOT compiles (or a test beside a compile) would otherwise abort.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# ----------------------------------------------------------------------------------------------
# The program a config describes


def plan(config, mesh, tx, length: int | None = None):
    """(model config, the step's abstract inputs) as ``sea_jax.train`` will have them
    (:func:`sea_jax.train.plan`), from the config alone: the checkpoints' config.json and the
    tokenizer are read when their paths are real, the preset's sizes are used when they are
    placeholders (:mod:`sea_jax.builder`'s rule)."""
    sources = builder.read_sources(config)
    mcfg = builder.model_config(config, sources)
    num_words, word_len = 0, 0
    if float(config.sea.lam):
        words = builder.word_list(config)
        num_words, word_len = len(words), 8  # a typical longest word in tokens, when no tokenizer is at hand
        if config_lib.is_set(config.llm.tokenizer or config.llm.checkpoint):
            from sea_jax.align.loss import tokenize_words

            word_len = tokenize_words(builder.load_llm_tokenizer(config), words).ids.shape[1]
    return mcfg, builder.abstract_step_inputs(config, mcfg, mesh, tx, num_words, word_len if num_words else 0,
                                              length)


def model_flops(config, mcfg=None, length: int | None = None) -> dict[str, float]:
    """Analytic FLOPs of one train step, by part and ``total``, with no rematerialisation.

    The formula is :func:`sea_jax.metrics.train_step_flops` (the one ``sea_jax.train`` uses for
    MFU, conventions in its module docstring), fed with sizes from the abstract parameters, so the
    compiled/model ratio printed here is the factor between the step's MFU and its hardware FLOP
    utilisation (remat recomputation, dense causal attention, partitioner overhead).
    """
    from sea_jax import metrics

    mcfg = mcfg or builder.model_config(config, builder.read_sources(config))
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    shapes = builder.abstract_params(mcfg, mesh)
    num_words = len(builder.word_list(config)) if float(config.sea.lam) else 0
    return metrics.train_step_flops(builder.flop_spec(config, mcfg, shapes, num_words, length))


# ----------------------------------------------------------------------------------------------
# Compile and report


@dataclasses.dataclass
class Report:
    """What one AOT compile says about a config on a slice (all memory per chip, bytes)."""

    config: str
    topology: str
    num_slices: int
    devices: int
    mesh: dict[str, int]
    llm_remat: str
    vision_remat: bool
    scan_layers: bool
    batch_size: int
    max_length: int
    trainable: list[str]
    params: int
    trainable_params: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    total_bytes: int
    hbm_bytes: int
    margin_bytes: int
    fits: bool
    # Matmul FLOPs of the compiled program with every loop trip counted (hlo_flops), per chip and
    # for all chips; compiled_flops / model_flops is the recompute factor.
    compiled_flops_per_device: float
    compiled_flops: float
    model_flops: float
    model_flops_breakdown: dict[str, float]
    lower_s: float
    compile_s: float
    microbatches: int = 1
    logits_chunk: int = 0
    # XLA's compiled.cost_analysis()["flops"] for all chips: each loop body counted once,
    # elementwise FLOPs included. Kept for reference; not comparable with model_flops.
    cost_analysis_flops: float = 0.0
    # While loops whose trip count was not found (counted once: compiled_flops is a lower bound),
    # the loops found (op_name, trips, runs per step, body FLOPs per chip, largest first), and the
    # custom calls whose FLOPs, if any, are not counted.
    unknown_loops: int = 0
    # Conditionals whose branches differ in FLOPs: compiled_flops takes the largest branch of each,
    # compiled_flops_smallest_branches (all chips) the smallest; which one runs is data.
    uneven_conditionals: int = 0
    compiled_flops_smallest_branches: float = 0.0
    loops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    custom_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    # Set when the TPU compiler itself refused the program for lack of HBM: then temp_bytes is the
    # compiler's stated requirement, argument/output bytes are computed from the input shardings,
    # and generated code / FLOPs are unknown (0).
    compiler_error: str = ""

    @property
    def recompute_factor(self) -> float:
        """Compiled (loops counted) / analytic matmul FLOPs: what remat recomputes and the program
        computes beyond the formula (partitioner, loss terms it leaves out); NaN when unknown."""
        return self.compiled_flops / self.model_flops if self.model_flops and self.compiled_flops else float("nan")

    @property
    def verdict(self) -> str:
        return "FITS" if self.fits and not self.compiler_error else "DOES NOT FIT"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict
        d["recompute_factor"] = self.recompute_factor
        return d

    def text(self) -> str:
        g = lambda x: f"{x / GIB:8.2f} GiB"  # noqa: E731
        lines = [
            f"config      {self.config}",
            f"topology    {self.topology} x{self.num_slices} slice(s): {self.devices} chips, mesh {self.mesh}",
            f"model       {self.params / 1e9:.3f} B params, {self.trainable_params / 1e6:.1f} M trainable "
            f"({', '.join(self.trainable)}); llm remat={self.llm_remat}, vision remat={self.vision_remat}",
            f"batch       {self.batch_size} x {self.max_length} tokens in {self.microbatches} microbatch(es), "
            f"LM head chunk {self.logits_chunk or 'none'}",
            "per-chip HBM (compiled.memory_analysis):",
            f"  arguments        {g(self.argument_bytes)}",
            f"  outputs          {g(self.output_bytes)}",
            f"  aliased (donated){g(self.alias_bytes)}",
            f"  temporaries      {g(self.temp_bytes)}",
            f"  generated code   {g(self.generated_code_bytes)}",
            f"  total            {g(self.total_bytes)}  of {g(self.hbm_bytes)} "
            f"({100 * self.total_bytes / self.hbm_bytes:.1f}%, margin {self.margin_bytes / GIB:.2f} GiB)",
            "matmul FLOPs per step (all chips):",
            f"  compiled, loops counted  {self.compiled_flops:.4g}  ({self.compiled_flops_per_device:.4g} per chip)",
            f"  model (analytic)         {self.model_flops:.4g}"
            f"  -> compiled / model = {self.recompute_factor:.3f} (recompute factor)",
            f"  cost_analysis            {self.cost_analysis_flops:.4g}  (XLA: each loop body once)",
            *self._loop_lines(),
            f"compile     lower {self.lower_s:.1f}s, compile {self.compile_s:.1f}s",
            *([f"compiler    {self.compiler_error}"] if self.compiler_error else []),
            f"VERDICT     {self.verdict}",
        ]
        return "\n".join(lines)

    def _loop_lines(self, top: int = 6) -> list[str]:
        """The loops that carry most of the compiled FLOPs, and what was not counted."""
        lines = []
        if self.loops:
            lines.append(f"  loops: {len(self.loops)}; largest (body runs per step x FLOPs per run, per chip):")
        for loop in self.loops[:top]:
            trips = loop["trips"] if loop["trips"] is not None else "unknown"
            lines.append(f"    {loop['runs']:5d} x {loop['body_flops']:9.3g}  trips {trips:>7}  {loop['op_name'][:90]}")
        if self.unknown_loops:
            lines.append(f"  WARNING: {self.unknown_loops} loop(s) with unknown trip count counted once: "
                         "compiled FLOPs are a lower bound")
        if self.uneven_conditionals:
            low = self.compiled_flops_smallest_branches
            lines.append(f"  {self.uneven_conditionals} conditional(s) counted by their largest branch; with the "
                         f"smallest: {low:.4g} -> compiled / model = {low / self.model_flops:.3f}")
        opaque = {k: v for k, v in self.custom_calls.items() if k not in _NO_FLOP_CUSTOM_CALLS}
        if opaque:
            lines.append(f"  custom calls not counted: {opaque}")
        return lines


# Custom calls the TPU compiler inserts for buffers and gather/scatter indices: no FLOPs to miss.
_NO_FLOP_CUSTOM_CALLS = frozenset({"AllocateBuffer", "AssumeGatherIndicesInBound", "ConcatBitcast",
                                   "GatherScatterIndicesBitpacked", "MoveToDevice", "MoveToHost", "Sharding",
                                   "SPMDFullToShardShape", "SPMDShardToFullShape", "ZeroCrop"})

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_OOM_PATTERNS = (
    # libtpu 0.0.42: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for
    # HLO temporaries (212.22G) exceeds available HBM (30.75G)."
    re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)([KMGT]?)"),
)


def parse_compiler_oom(message: str) -> tuple[int, int] | None:
    """(bytes required, bytes available) from the TPU compiler's out-of-HBM error, else None.

    XLA prints sizes with binary units (``G`` = GiB).
    """
    for pat in _OOM_PATTERNS:
        m = pat.search(message)
        if m:
            need, nu, have, hu = m.groups()
            return int(float(need) * _UNITS[nu]), int(float(have) * _UNITS[hu])
    return None


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _cost_analysis_flops(compiled) -> float:
    """XLA's own FLOP count of a compiled program, per device (each loop body counted once)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def memory_totals(mem) -> dict[str, int]:
    """Per-device byte counts of a ``CompiledMemoryStats``; total = what must sit in HBM at once.

    Donated inputs are aliased to outputs, so their bytes are in both arguments and outputs and
    are subtracted once.
    """
    out = dict(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
    )
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"] + out["generated_code_bytes"]
    )
    return out


def compile_config(
    config,
    topology: str | Topology,
    num_slices: int = 1,
    hbm_margin_gib: float = 0.5,
    config_name: str = "",
    length: int | None = None,
) -> Report:
    """Lowers and compiles the train step the config describes (``sea_jax.builder.lower_step``,
    exactly what ``sea_jax.train`` runs) for ``topology`` and reports on it.

    ``length``: the sequence length, one of the config's buckets (``data.length_buckets``,
    :func:`sea_jax.builder.length_buckets`); default the largest, ``data.max_length``, usually
    the most memory-hungry (same batch, longer rows). Not always: a bucket where the LM head runs
    on the target slots (:func:`sea_jax.models.mllm.head_capacity`) holds both of the head's
    branches, so check such buckets too (gemma2b stage 1: 12.7 GiB at 800 against 15.5 at 2048;
    :func:`compile_buckets` compiles them all)."""
    config_lib.validate(config)
    topo = get_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topo, num_slices)
    mesh = topology_mesh(devices, dict(config.mesh), num_slices)
    builder.check_batch_split(config, mesh, where=f" on {topo.name}")
    # The schedule's length does not change the program.
    tx, sched = builder.optimizer(config, 1000)
    buckets = builder.length_buckets(config)
    length = int(length or buckets[-1])
    if length not in buckets:
        raise ConfigError(f"--length={length} is not one of the config's buckets {list(buckets)} "
                          "(data.length_buckets, data.max_length)")
    mcfg, (state, frozen, batch) = plan(config, mesh, tx, length)
    t0 = time.time()
    lowered = builder.lower_step(config, mcfg, mesh, tx, sched, (state, frozen, batch))
    t1 = time.time()
    error = ""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = parse_compiler_oom(str(e))
        if oom is None:
            raise
        # The compiler stops at the first buffer-assignment failure; what it needed is a lower
        # bound on the real requirement, enough for the verdict.
        error = str(e).splitlines()[0][:500]
        args, state_b = shard_bytes((state, frozen, batch)), shard_bytes(state)
        mem = dict(argument_bytes=args, output_bytes=state_b, alias_bytes=state_b, temp_bytes=oom[0], generated_code_bytes=0)
        mem["total_bytes"] = args + oom[0]
        hlo, xla_per_dev = {"flops": 0.0, "flops_smallest_branches": 0.0, "loops": [], "unknown_loops": 0,
                            "uneven_conditionals": 0, "custom_calls": {}}, 0.0
    else:
        mem = memory_totals(compiled.memory_analysis())
        # The SPMD-partitioned module is one device's program: counts are per chip.
        hlo, xla_per_dev = loop_aware_flops(compiled.as_text()), _cost_analysis_flops(compiled)
    per_dev = hlo["flops"]
    t2 = time.time()

    hbm = int(topo.hbm_gib * GIB)
    margin = hbm - int(hbm_margin_gib * GIB) - mem["total_bytes"]
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
    flops = model_flops(config, mcfg, length)
    return Report(
        config=config_name, topology=topo.name, num_slices=num_slices, devices=len(devices), mesh=dict(mesh.shape),
        llm_remat=mcfg.llm.remat, vision_remat=bool(mcfg.vision.remat), scan_layers=bool(mcfg.llm.scan_layers),
        batch_size=int(config.train.batch_size), max_length=length,
        trainable=list(config.train.trainable),
        params=count({k: v for k, v in frozen.items() if k in builder.PARTS}) + count(state.params),
        trainable_params=count(state.params),
        **mem, hbm_bytes=hbm, margin_bytes=margin, fits=margin >= 0 and not error,
        compiled_flops_per_device=per_dev, compiled_flops=per_dev * len(devices),
        cost_analysis_flops=xla_per_dev * len(devices), unknown_loops=hlo["unknown_loops"],
        uneven_conditionals=hlo["uneven_conditionals"],
        compiled_flops_smallest_branches=hlo["flops_smallest_branches"] * len(devices),
        loops=hlo["loops"], custom_calls=hlo["custom_calls"],
        model_flops=flops["total"], model_flops_breakdown=flops,
        lower_s=t1 - t0, compile_s=t2 - t1, compiler_error=error,
        microbatches=int(config.train.microbatches), logits_chunk=int(config.train.logits_chunk),
    )


def compile_buckets(
    config, topology: str | Topology, num_slices: int = 1, hbm_margin_gib: float = 0.5, config_name: str = ""
) -> list[Report]:
    """:func:`compile_config` at every sequence length the trainer may compile (the config's
    buckets, :func:`sea_jax.builder.length_buckets`), largest first. The largest is usually the
    most memory-hungry, but a bucket whose LM head runs on the target slots holds both of the
    head's branches; this checks them all."""
    return [compile_config(config, topology, num_slices, hbm_margin_gib, config_name, length=n)
            for n in reversed(builder.length_buckets(config))]


def buckets_text(reports: list[Report]) -> str:
    """A summary of :func:`compile_buckets`: one line per bucket, the one needing the most HBM,
    and a verdict that holds only if every bucket fits."""
    lines = [f"bucket {r.max_length:6d}  total {r.total_bytes / GIB:6.2f} GiB  temp {r.temp_bytes / GIB:6.2f} GiB  "
             f"{r.verdict}" for r in reports]
    worst = max(reports, key=lambda r: r.total_bytes)
    bad = [r.max_length for r in reports if not r.fits]
    lines.append(f"most HBM    bucket {worst.max_length} ({worst.total_bytes / GIB:.2f} of {worst.hbm_bytes / GIB:.2f} GiB)")
    lines.append("VERDICT     FITS (every bucket)" if not bad else
                 f"VERDICT     DOES NOT FIT (bucket{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))})")
    return "\n".join(lines)


__all__ = [
    "GIB", "Report", "plan", "compile_config", "compile_buckets", "buckets_text", "model_flops", "memory_totals",
    "parse_compiler_oom", "shard_bytes",
    "Topology", "TOPOLOGIES", "get_topology", "libtpu_available", "topology_devices", "resolve_mesh_sizes",
    "topology_mesh", "loop_aware_flops",
]
