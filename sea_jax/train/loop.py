r"""The trainer of both stages: ``train(config, workdir)``, as ``python -m sea_jax.train`` runs it.

It reads top to bottom like a run: check the paths, build the model's config, compile the step
from abstract shapes (the same program :mod:`sea_jax.aot` proves on a TPU slice), load and place
the parameters, restore, then the loop; side jobs (logs, checkpoints, preemption) are hooks
(:mod:`sea_jax.train.hooks`). Outputs go to the run folder ``<workdir>/stage<k>/``
(:mod:`sea_jax.rundir`); stage 2 starts from ``<workdir>/stage1``'s adapter unless
``train.init_from`` names another run. Running the same command again resumes from the newest
checkpoint that restores, bit for bit (same data order, same random choices); SIGTERM (preemption)
saves a checkpoint and ends the run normally.

What a run records besides checkpoints (README "Observability"): ``metrics.jsonl`` and TensorBoard
events (and W&B with ``log.wandb``; :mod:`sea_jax.tracking`), ``manifest.json`` (what produced the
run, :mod:`sea_jax.manifest`), ``log.txt`` (every library's log lines, :mod:`sea_jax.logs`), a
profiler trace of ``log.profile_steps`` steps in ``profile/``, and the goodput of the attempt
(:mod:`sea_jax.goodput`) in the last log line, the returned dict and the manifest.

Every path may be local or ``gs://`` (:mod:`sea_jax.storage`): the workdir (checkpoints through
Orbax's own GCS support, metrics, events, config, tokenizer), model checkpoints (copied once per
host, :func:`sea_jax.builder.local_path`), data, images and labels. Every path is checked before
anything is built or compiled, the workdir by writing a probe file; the error names the config
field to set.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from sea_jax import builder, goodput, logs, manifest, rundir, sharding, storage, tracking
from sea_jax import checkpoint as ckpt_lib
from sea_jax import config as config_lib
from sea_jax import metrics as metrics_lib
from sea_jax import progress as progress_lib
from sea_jax.data import buckets as buckets_lib
from sea_jax.errors import ConfigError, PathError
from sea_jax.train import hooks as hooks_lib
from sea_jax.train_step import init_state, split_params

# Batch entries that go to the devices; anything else (the sample ids) stays on the host.
DEVICE_KEYS = ("images", "input_ids", "attention_mask", "loss_mask", "has_image", "label_ids", "label_scores")


def check_paths(config, workdir: str | None = None) -> None:
    """Raises :class:`PathError` listing every path the run needs that is unset, a placeholder or
    missing, by config field, before anything is loaded or compiled."""
    problems: list[str] = []
    if workdir and "://" in workdir and not storage.is_remote(workdir):
        problems.append(f"--workdir={workdir!r}: a local folder or gs://bucket/prefix")
    elif workdir:
        why = storage.check_writable(workdir)  # before anything compiles: a wrong bucket fails in seconds
        if why is not None:
            problems.append(f"--workdir={workdir!r} is not writable: {why}")

    def need(field: str, path: str, kind: str = "path", why: str = "") -> None:
        if not config_lib.is_set(path):
            shown = f"={path!r}" if path else " is empty"
            problems.append(f"config.{field}{shown}{why}; set --config.{field}=...")
        elif "://" in path and not storage.is_remote(path):
            problems.append(f"config.{field}={path!r}: a local path or gs://bucket/key")
        elif kind == "dir" and not storage.isdir(path):
            problems.append(f"config.{field}={path!r} is not a folder")
        elif not storage.exists(path):
            problems.append(f"config.{field}={path!r} does not exist")

    if config.llm.checkpoint or not config.llm.preset:
        need("llm.checkpoint", config.llm.checkpoint, "dir", "" if config.llm.preset else " and no config.llm.preset is given")
    if config.llm.tokenizer or not config.llm.checkpoint:
        need("llm.tokenizer", config.llm.tokenizer, why=" (a random-init LLM needs a tokenizer folder)")
    if config.vision.checkpoint:
        need("vision.checkpoint", config.vision.checkpoint)
    if config.vision.tokenizer:
        need("vision.tokenizer", config.vision.tokenizer)
    elif builder.needs_word_table(config) and not config.vision.checkpoint:
        need("vision.tokenizer", "", why=" (on-the-fly labels embed the word list with the text tower)")
    if float(config.sea.lam) != 0:
        if config.labels.word_list != "default":
            need("labels.word_list", config.labels.word_list)
        if config.sea.label_source == "batch":
            need("labels.output_dir", config.labels.output_dir, "dir",
                 why=" (sea.label_source='batch' reads labels made by `python -m sea_jax.labels`)")
    from sea_jax.data import pipeline

    problems += pipeline.check_paths(config)  # the data: one source or a mixture, local or gs://
    src = rundir.init_from_run(config, workdir)
    if int(config.stage) == 2 and (src is None or not src.has_checkpoints()):
        where = src.path if src is not None else "(none)"
        problems.append(f"config.train.init_from: stage 2 starts from a stage-1 run's adapter, but {where!r} has "
                        "no checkpoints; run stage 1 with the same --workdir or set --config.train.init_from=DIR")
    if problems:
        raise PathError("cannot start, fix the config first:\n  " + "\n  ".join(problems))


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any]) -> dict:
    """Host-local rows -> global ``jax.Array`` s split along the batch over the mesh (each process
    contributes the rows its devices hold)."""
    out = {}
    for k, s in shardings.items():
        x = np.asarray(local[k])
        out[k] = jax.make_array_from_process_local_data(s.sharding, x, s.shape)
    return out


@dataclasses.dataclass
class Plan:
    """What the run will compile, known before any weight or batch is read.

    Attributes:
      sources: what the builder read to know the architecture.
      mcfg: the model config.
      words: the label vocabulary ([] with lambda = 0).
      word_tokens: its LLM tokenization (Eq. 8), or None.
      inputs: (state, frozen, batch) of the step as sharded ShapeDtypeStructs.
    """

    sources: builder.Sources
    mcfg: Any
    words: list[str]
    word_tokens: Any
    inputs: tuple


def plan(config, tokenizer, mesh, tx) -> Plan:
    """The model config and the step's abstract inputs for the LLM ``tokenizer`` (``<image>`` added)."""
    from sea_jax.align.loss import tokenize_words

    sources = builder.read_sources(config, tokenizer)
    mcfg = builder.model_config(config, sources)
    words = builder.word_list(config) if float(config.sea.lam) else []
    word_tokens = tokenize_words(tokenizer, words) if words else None
    inputs = builder.abstract_step_inputs(config, mcfg, mesh, tx, len(words),
                                          word_tokens.ids.shape[1] if word_tokens is not None else 0)
    return Plan(sources, mcfg, words, word_tokens, inputs)


@dataclasses.dataclass
class Program:
    """The compiled step and the abstract inputs it was compiled for."""

    step: Any
    state: Any
    frozen: dict
    batch: dict
    flops: dict


def compile_program(config, p: Plan, mesh, tx, schedule, length: int | None = None) -> Program:
    """Lowers and compiles the train step from the plan's abstract inputs (no weights, no batch)
    for rows of ``length`` tokens (a bucket; default ``data.max_length``)."""
    t0 = time.time()
    length = int(length or config.data.max_length)
    state, frozen, _ = p.inputs
    inputs = (state, frozen, builder.abstract_batch(config, p.mcfg, mesh, length))
    step = builder.lower_step(config, p.mcfg, mesh, tx, schedule, inputs).compile()
    flops = metrics_lib.train_step_flops(
        builder.flop_spec(config, p.mcfg, builder.abstract_params(p.mcfg, mesh), len(p.words), length))
    logging.info("compiled the train step for length %d in %.1fs; %.3g TFLOP per step %s", length, time.time() - t0,
                 flops["total"] / 1e12, {k: f"{v / 1e12:.3g}" for k, v in flops.items() if k != "total"})
    return Program(step, *inputs, flops)


def agreed_length(buckets: tuple[int, ...], local: Mapping[str, np.ndarray]) -> int:
    """The bucket of this global batch: the smallest that holds the longest row of every
    process's rows (all processes must run the same shape)."""
    longest = buckets_lib.longest(local)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    return buckets_lib.bucket_for(buckets, longest)


def check_log_config(config) -> None:
    """:class:`ConfigError` for a ``log`` field out of range (before anything is built)."""
    logs.check_mode(config.log.terminal)
    tracking.check_wandb_config(config.log)
    for name in ("profile_start", "progress_every", "probe_images"):
        if int(config.log[name]) < 0:
            raise ConfigError(f"config.log.{name}={config.log[name]!r}: must be >= 0")
    if int(config.log.profile_steps) < 1:
        raise ConfigError(f"config.log.profile_steps={config.log.profile_steps!r}: must be >= 1")


def train(config, workdir: str, hooks: hooks_lib.Hooks | None = None) -> dict:
    """Runs (or resumes) one stage; returns the last logged metrics plus ``step``, ``stopped``
    ("done" or "preempted"), ``data`` (the data statistics) and ``goodput`` (where the wall time
    went, :mod:`sea_jax.goodput`). ``hooks``: more side jobs. Everything logged meanwhile also goes
    to ``<run folder>/log.txt`` (:mod:`sea_jax.logs`)."""
    clock = goodput.Clock()
    config_lib.validate(config)
    check_log_config(config)
    sharding.init_distributed()
    check_paths(config, workdir)
    run = rundir.RunDir(workdir, int(config.stage))
    with logs.run_log(logs.run_log_path(run.path, jax.process_index())):
        return _run(config, run, hooks or hooks_lib.Hooks(), clock)


def _run(config, run: rundir.RunDir, extra: hooks_lib.Hooks, clock: goodput.Clock) -> dict:
    from sea_jax.data import pipeline

    workdir = run.workdir
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(dict(config.mesh))
    builder.check_batch_split(config, mesh, jax.process_count())
    logging.info("stage %d, %d processes, %d devices (%s), mesh %s, run dir %s", config.stage, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape), run.path)

    # --- what will run, from abstract shapes: compiled before any weight or batch is read ---------
    tokenizer = builder.load_llm_tokenizer(config)
    steps = builder.total_steps(config, pipeline.num_examples(config))
    tx, schedule = builder.optimizer(config, steps)
    p = plan(config, tokenizer, mesh, tx)
    sources, mcfg = p.sources, p.mcfg
    data_iter, data_stats = pipeline.make_train_iterator(
        config, tokenizer, mcfg.image_token_id, mcfg.num_image_tokens, mcfg.image_size, pixels=mcfg.pixel_spec)
    if is_main:
        run.save_config(config)
        run.save_tokenizer(tokenizer)
    buckets = builder.length_buckets(config)
    with clock.phase("compile"):  # the largest bucket first: the one that needs the most memory
        programs = {buckets[-1]: compile_program(config, p, mesh, tx, schedule, buckets[-1])}
    program = programs[buckets[-1]]

    def program_for(length: int) -> Program:
        if length not in programs:  # each bucket compiled once, when a batch first needs it
            with clock.phase("compile"):
                programs[length] = compile_program(config, p, mesh, tx, schedule, length)
        return programs[length]

    # --- parameters, SEA tables, state -----------------------------------------------------------
    with clock.phase("load"):
        t0 = time.time()
        vision = builder.load_vision(config, mcfg.vision, mesh)
        params = builder.load_params(config, sources, mcfg, mesh, workdir=workdir, vision=vision[0])
        builder.check_placed(params, builder.abstract_params(mcfg, mesh))
        trainable, frozen = split_params(params, tuple(config.train.trainable))
        frozen.update(builder.sea_tables(config, mcfg, tokenizer, params["llm"]["embedder"]["embedding"], mesh,
                                         run.word_table_cache(config), vision))
        del vision, params
        logging.info("model loaded in %.1fs: trainable %s (%d params), frozen %s", time.time() - t0,
                     sorted(trainable), metrics_lib.count_params(trainable), sorted(frozen))
        shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
        state = init_state(trainable, tx, shard_of(program.state))
        del trainable

    # --- restore ---------------------------------------------------------------------------------
    with clock.phase("restore"):
        ckpt = ckpt_lib.Checkpointer(run.checkpoints, keep=int(config.train.keep_checkpoints),
                                     async_save=bool(config.train.async_checkpoint))
        restored = ckpt.restore(program.state.params, program.state.opt_state, data_iter)
    start = 0
    if restored is not None:
        start = restored.step
        state = state.replace(step=jax.device_put(np.int32(start), program.state.step.sharding),
                              params=restored.params, opt_state=restored.opt_state)
        logging.info("resumed from step %d", start)
    if is_main:
        manifest.start(run.path, manifest.collect(config, mesh_shape=dict(mesh.shape), resumed_from=start))

    # --- side jobs -------------------------------------------------------------------------------
    def save(at: int) -> None:
        with clock.phase("checkpoint"):
            t = time.time()
            meta = {"seed": int(config.seed), "process_count": jax.process_count(), "total_steps": steps,
                    "data": data_stats.as_dict()}
            ckpt.save(at, state.params, state.opt_state, meta, data_iter)
            logging.info("checkpoint at step %d (%.1f s%s)", at, time.time() - t,
                         ", written in the background" if config.train.async_checkpoint else "")

    with clock.phase("logging"):  # opening W&B takes seconds
        tracker = tracking.Tracker(run.path, config.log, start, enabled=is_main,
                                   config_dict=json.loads(config.to_json()))
    progress = progress_lib.Progress(steps, start, enabled=is_main and bool(config.train.progress),
                                     every=int(config.log.progress_every))
    log = hooks_lib.LogHook(tracker, progress, clock, lambda length: program_for(length).flops["total"],
                            metrics_lib.peak_tflops(jax.devices()[0].device_kind), int(config.train.batch_size),
                            data_stats.as_dict, histograms=bool(config.log.histograms))
    preempt = ckpt_lib.PreemptionFlag().install()
    side = hooks_lib.Hooks()
    side.add(log.collect)
    side.add(log, every=int(config.train.log_every))
    profiler = None
    if int(config.log.profile_start) > 0:
        profiler = hooks_lib.ProfileHook(storage.join(run.path, "profile"), int(config.log.profile_start),
                                         int(config.log.profile_steps), start, clock, state)
        side.add(profiler)
    if int(config.eval.every) > 0:
        from sea_jax.eval.inloop import InLoopEval

        evaluator = InLoopEval(config, mcfg, tokenizer, mesh, run.path)
        side.add(hooks_lib.eval_hook(evaluator, frozen, tracker, clock), every=int(config.eval.every))
    side.add(hooks_lib.preemption_hook(preempt, save))
    if int(config.train.checkpoint_every) > 0:
        side.add(hooks_lib.checkpoint_hook(save), every=int(config.train.checkpoint_every))

    # --- the loop --------------------------------------------------------------------------------
    local_rows = int(config.train.batch_size) // jax.process_count()
    step, stopped = start, "done"
    log.restart_clock(start)
    try:
        with clock.phase("steps"):
            while step < steps:
                with clock.phase("data_wait"):
                    local = next(data_iter)
                if np.shape(local["input_ids"])[0] != local_rows:
                    raise ValueError(f"the data gave {np.shape(local['input_ids'])[0]} rows, expected {local_rows}")
                length = agreed_length(buckets, local)
                local = buckets_lib.trim(local, length)
                prog = program_for(length)
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    state, m = prog.step(state, frozen, global_batch(local, prog.batch))
                step += 1
                progress.advance()
                info = hooks_lib.StepInfo(step, steps, state, m, local)
                side.run(info)
                extra.run(info)
    except hooks_lib.StopTraining as stop:
        stopped = stop.reason
    finally:
        preempt.uninstall()
        if profiler is not None:
            profiler.close()
    if stopped == "done" and step not in ckpt.all_steps():
        save(step)
    with clock.phase("checkpoint"):
        ckpt.close()
    progress.close()
    data_iter.close()
    stats = data_stats.as_dict()
    if stats.get("skipped_total"):
        logging.info("data: %d samples skipped: %s", stats["skipped_total"],
                     {k: v for k, v in stats.items() if k.startswith("skipped/") and v})
    if is_main and int(config.log.probe_images) > 0 and jax.process_count() == 1:
        with clock.phase("logging"):
            tracker.image("probe", step, hooks_lib.probe_picture(workdir, int(config.stage),
                                                                  int(config.log.probe_images), run.path))
    summary = clock.summary()
    tracker.summary({f"goodput/{k}": v for k, v in summary.items()}, step)
    tracker.close()
    if is_main:
        manifest.finish(run.path, {"stopped": stopped, "step": step, "goodput": summary})
    logging.info("stage %d %s at step %d/%d; %s", config.stage, stopped, step, steps, goodput.format_summary(summary))
    return dict(log.last, step=step, stopped=stopped, data=stats, goodput=summary)


__all__ = ["train", "check_paths", "check_log_config", "plan", "compile_program", "agreed_length", "global_batch", "Plan", "Program", "DEVICE_KEYS"]
