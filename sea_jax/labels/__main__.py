r"""Label a dataset offline: ``python -m sea_jax.labels --config=configs/X.py --workdir=DIR [--config.a.b=v ...]``.

    python -m sea_jax.labels --config=configs/gemma2b.py --workdir=/runs/g2b \
        --config.vision.checkpoint=/ckpt/siglip-so400m-384 \
        --config.data.json=/data/blip_laion_cc_sbu_558k.json --config.data.image_root=/data/images

Every recipe config works: the tool reads its ``vision``, ``labels`` and ``data`` sections. Each
host labels its own shards (resumable: run the same command again after a kill); the run that
completes the last shard writes ``index.json``, ``summary.json`` and ``summary.png``. Output goes to
``labels.output_dir`` (default ``DIR/labels``); train with it by
``--config.sea.label_source=batch --config.labels.output_dir=...``.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from sea_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config (.py): its vision, labels and data sections",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (outputs, word-table cache)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    del argv
    from sea_jax import sharding
    from sea_jax.labels import label_dataset

    sharding.init_distributed()
    label_dataset(_CONFIG.value, _WORKDIR.value)
    return 0


if __name__ == "__main__":
    cli.run_absl(main, __doc__)
