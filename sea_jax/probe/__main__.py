"""Measure a run's alignment: ``python -m sea_jax.probe --workdir=DIR [--baseline=DIR_LAMBDA0] [--stage=1] [--out=probe.png]``.

For every visual token of a set of images, the word of the run's label vocabulary nearest to it in
the LLM's input-embedding space, scored against the patch's semantic labels (and against its true
words where they are known: ``--truth``, default ``<workdir>/probe_truth.npz``, which the embedded
demo writes). Prints and writes the numbers as JSON and draws the paper's Figure 1 as a PNG.
"""
from __future__ import annotations

import json
import os

from absl import flags

from sea_jax import cli

flags.DEFINE_string("workdir", None, "a sea_jax.train workdir (or one of its stage folders)")
flags.DEFINE_string("baseline", "", "a second workdir (e.g. lambda = 0) drawn beside the first")
flags.DEFINE_integer("stage", None, "stage to probe (default the highest trained)")
flags.DEFINE_string("out", "", "PNG path (default <workdir>/probe.png)")
flags.DEFINE_string("json", "", "JSON path (default the PNG's with .json)")
flags.DEFINE_list("images", [], "image files (default: the truth file's images, else config.data.json's)")
flags.DEFINE_string("truth", "", "per-patch true words (.npz, sea_jax.align.recall.PatchTruth); "
                    "default <workdir>/probe_truth.npz when it exists")
flags.DEFINE_integer("num_images", 64, "images to probe")
flags.DEFINE_integer("plot_images", 4, "images drawn in the PNG")
flags.mark_flag_as_required("workdir")


def main(argv) -> int:
    del argv
    from sea_jax.align.recall import PatchTruth
    from sea_jax.errors import PathError
    from sea_jax.probe import run_probe
    from sea_jax.rundir import RunDir

    f = flags.FLAGS
    truth_path = f.truth or (RunDir.find(f.workdir, f.stage).probe_truth if not f.images else "")
    if f.truth and not os.path.exists(f.truth):
        raise PathError(f"--truth={f.truth!r} does not exist")
    truth = PatchTruth.load(truth_path) if truth_path and os.path.exists(truth_path) else None
    summary = run_probe(f.workdir, f.baseline or None, out=f.out or None, json_out=f.json or None, stage=f.stage,
                        images=f.images or None, num_images=f.num_images, plot_images=f.plot_images, truth=truth)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    cli.run_absl(main, __doc__)
