r"""Train one stage: ``python -m sea_jax.train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]``.

    python -m sea_jax.train --config=configs/gemma2b.py --workdir=/runs/g2b \
        --config.llm.checkpoint=/ckpt/gemma-2b --config.vision.checkpoint=/ckpt/siglip-so400m-384 \
        --config.data.json=/data/blip_laion_cc_sbu_558k.json --config.data.image_root=/data/images
    python -m sea_jax.train --config=configs/gemma2b_finetune.py --workdir=/runs/g2b ...   # stage 2
    python -m sea_jax.train --config=configs/demo.py --workdir=/tmp/demo                   # the CPU demo

A config may name its own runner (``config.runner = "module:function"``, called as
``function(config, workdir)``), which runs instead of the trainer: the embedded demo's does. The
run's outputs are described in :mod:`sea_jax.rundir`; re-running the same command resumes.
Exit status 0 when the stage finished or was preempted (a checkpoint is saved), 2 for a mistake in
the config or the paths (the message names the field), 1 for anything else.
"""
from __future__ import annotations

import importlib
import json

from absl import flags
from ml_collections import config_flags

from sea_jax import cli
from sea_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config (.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs), local or gs://bucket/prefix; shared by both stages")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_runner(spec: str):
    """``"package.module:function"`` -> the function (``config.runner``)."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ConfigError(f"config.runner={spec!r}: expected 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config.runner={spec!r}: {e}") from None


def main(argv) -> int:
    del argv
    config = _CONFIG.value
    if config.runner:
        resolve_runner(config.runner)(config, _WORKDIR.value)
        return 0
    import jax

    from sea_jax.train import train

    out = train(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in out.items() if k != "data"}, default=str))
    return 0


if __name__ == "__main__":
    cli.run_absl(main, __doc__, route_logs=True)
