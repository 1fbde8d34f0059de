r"""Evaluate like the paper: ``python -m sea_jax.eval --workdir=DIR --benchmarks=pope,gqa --data_root=EVAL_ROOT``.

    python -m sea_jax.eval --workdir=/runs/g2b --benchmarks=pope,gqa,textvqa,scienceqa,mmbench \
        --data_root=/data/eval [--out=DIR] [--limit=N] [--batch_size=8]
    python -m sea_jax.eval --hf=./sea-gemma2b-hf --benchmarks=pope --data_root=/data/eval
    python -m sea_jax.eval score --benchmark=NAME --predictions=FILE --annotations=FILE

The data root has LLaVA-1.5's evaluation layout (``playground/data/eval``: question files, images,
annotations; nothing is downloaded, a missing file is an error naming it). Each benchmark is asked
with LLaVA-1.5's prompts through the run's chat template, answered greedily in batches on the
devices of every host, and written as LLaVA's answers file, the official submission file and the
scores (``<out>/<benchmark>/``, ``<out>/scores.json``; default out: ``<workdir>/eval``).
``score`` scores a predictions file from anywhere (ours, HF, lmms-eval) with no model loaded.
Benchmarks: vqav2, gqa, textvqa, vizwiz, scienceqa, pope, mmbench, mmvet, mme.
"""
from __future__ import annotations

import sys

from absl import flags

from sea_jax import cli

flags.DEFINE_string("workdir", "", "a training workdir (its newest checkpoint of the highest stage)")
flags.DEFINE_string("hf", "", "an exported HF Llava folder (instead of --workdir)")
flags.DEFINE_integer("stage", None, "stage of --workdir (default: the highest trained)")
flags.DEFINE_integer("step", None, "checkpoint step of --workdir (default: latest)")
flags.DEFINE_list("benchmarks", [], "comma-separated benchmark names")
flags.DEFINE_string("data_root", "", "LLaVA-1.5's eval folder (playground/data/eval), local or gs://")
flags.DEFINE_string("out", "", "output folder (default: <workdir>/eval, or ./eval-<hf folder name>)")
flags.DEFINE_integer("limit", None, "first N questions of each benchmark (a quick look)")
flags.DEFINE_integer("batch_size", 8, "rows per generation batch (a multiple of the data-parallel devices)")
flags.DEFINE_integer("max_new_tokens", 0, "0 = each benchmark's LLaVA-1.5 value")
flags.DEFINE_list("mesh", ["data=-1", "fsdp=1", "tensor=1"], "mesh axis sizes (name=size, -1 = the rest)")
flags.DEFINE_list("annotations", [], "name=path scoring annotations that differ from the data root's layout")
flags.DEFINE_string("dtype", "", "compute dtype of the LLM (--hf only; default the folder's config)")


def _mesh(spec: list[str]):
    from sea_jax import sharding
    from sea_jax.errors import ConfigError

    axes = {}
    for item in spec:
        name, sep, size = item.partition("=")
        if not sep or name not in sharding.MESH_AXES or not size.lstrip("-").isdigit():
            raise ConfigError(f"--mesh: {item!r} is not axis=size with an axis of {list(sharding.MESH_AXES)}")
        axes[name] = int(size)
    return sharding.make_mesh(axes)


def main(argv) -> int:
    del argv
    from sea_jax import sharding, storage
    from sea_jax.errors import ConfigError, PathError
    from sea_jax.eval.run import EvalModel, evaluate, summary_table

    f = flags.FLAGS
    if bool(f.workdir) == bool(f.hf):
        raise ConfigError("pass exactly one of --workdir and --hf")
    if not f.benchmarks:
        raise ConfigError("--benchmarks is empty; e.g. --benchmarks=pope,gqa")
    if not f.data_root or not storage.isdir(f.data_root):
        raise PathError(f"--data_root={f.data_root!r} is not a folder (LLaVA-1.5's playground/data/eval, local or "
                        "gs://)")
    annotations = {}
    for item in f.annotations:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--annotations: {item!r} is not name=path")
        annotations[name] = path
    sharding.init_distributed()
    mesh = _mesh(f.mesh)
    if f.workdir:
        model = EvalModel.from_workdir(f.workdir, stage=f.stage, step=f.step, mesh=mesh)
        out = f.out or storage.join(f.workdir, "eval")
    else:
        model = EvalModel.from_hf(f.hf, mesh=mesh, dtype=f.dtype)
        out = f.out or f"eval-{model.name}"
    results = evaluate(model, f.benchmarks, f.data_root, out, mesh=mesh, batch_size=f.batch_size, limit=f.limit,
                       annotations=annotations, max_new_tokens=f.max_new_tokens)
    import jax

    if jax.process_index() == 0:
        print(summary_table(results))
        print(f"files in {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "score":
        from sea_jax.eval.score_cli import score_main

        sys.exit(score_main(sys.argv[1:]))
    cli.run_absl(main, __doc__)
