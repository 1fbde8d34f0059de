"""Prove a config fits a TPU slice: ``python -m sea_jax.aot --config=configs/gemma2b.py --topology=v4-32 [--json] [--all_buckets] [--config.a.b=v ...]``.

Compiles the real train step of the config (the program ``python -m sea_jax.train`` would run)
for the slice with the TPU compiler on this host (``libtpu`` installed; no TPU needed) and prints
the per-chip HBM (arguments, outputs, temporaries, generated code) against the chip's capacity,
compiled (every loop trip counted) vs analytic FLOPs and a verdict. ``--all_buckets`` compiles
every sequence length the trainer may compile (``data.length_buckets``), reports each and a
verdict for all of them. Exit status 0 when it fits, 1 when it does not, 2 for a mistake in the
config or flags (or no libtpu here).
"""
from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from sea_jax import cli
from sea_jax.aot.topology import TOPOLOGIES

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("topology", "v4-8", f"slice name ({', '.join(TOPOLOGIES)}) or <gen>:<grid>")
flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (the data axis spans them)")
flags.DEFINE_float("hbm_margin_gib", 0.5, "HBM kept free for the runtime when judging the fit")
flags.DEFINE_bool("json", False, "print one JSON object instead of the text report")
flags.DEFINE_integer("length", 0, "sequence length to compile: one of data.length_buckets (0 = data.max_length, "
                     "the largest and usually the most memory-hungry)")
flags.DEFINE_bool("all_buckets", False, "compile every bucket of data.length_buckets (largest first); "
                  "fits only if all do")
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    del argv
    from sea_jax import aot

    f = flags.FLAGS
    ok, why = aot.libtpu_available()
    if not ok:
        cli.fail(f"cannot compile for TPU here: {why}")
    name = config_flags.get_config_filename(f["config"])
    if f.all_buckets:
        if f.length:
            cli.fail("--all_buckets compiles every bucket; drop --length")
        reports = aot.compile_buckets(_CONFIG.value, f.topology, f.num_slices, f.hbm_margin_gib, config_name=name)
        if f.json:
            print(json.dumps({"buckets": [r.to_json() for r in reports], "fits": all(r.fits for r in reports)}))
        else:
            print("\n\n".join(r.text() for r in reports) + "\n\n" + aot.buckets_text(reports))
        return 0 if all(r.fits for r in reports) else 1
    report = aot.compile_config(_CONFIG.value, f.topology, f.num_slices, f.hbm_margin_gib, config_name=name,
                                length=f.length or None)
    print(json.dumps(report.to_json()) if f.json else report.text())
    return 0 if report.fits else 1


if __name__ == "__main__":
    cli.run_absl(main, __doc__)
