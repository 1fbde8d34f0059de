"""Export a run: ``python -m sea_jax.export --workdir=DIR --out=HF_DIR [--step=N] [--dtype=bfloat16|float32] [--adapter_only]``.

Writes the run's checkpoint (the highest stage, or ``--stage``) as a Hugging Face
``LlavaForConditionalGeneration`` folder that loads offline with ``AutoModelForImageTextToText`` +
``AutoProcessor``, or with ``--adapter_only`` the adapter alone (LLaVA's ``mm_projector``).
Multi-host: run on every host (gathering is collective); process 0 writes.
"""
from __future__ import annotations

from absl import flags, logging

from sea_jax import cli

flags.DEFINE_string("workdir", None, "the training run's workdir")
flags.DEFINE_integer("stage", None, "which stage's run (default: the highest trained)")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weight dtype on disk")
flags.DEFINE_bool("adapter_only", False, "write only the adapter (LLaVA mm_projector), for stage-1 runs")
flags.DEFINE_float("max_shard_gb", 5.0, "safetensors shard size in GiB")
flags.DEFINE_bool("eos_is_end_of_turn", False, "the tokenizer's EOS becomes the chat template's end-of-turn token "
                  "(for tools such as lmms-eval's llava_hf that stop only at tokenizer.eos_token_id)")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> int:
    del argv
    from sea_jax import sharding
    from sea_jax.export import export_workdir

    f = flags.FLAGS
    sharding.init_distributed()
    files = export_workdir(f.workdir, f.out, f.step, f.dtype, f.adapter_only, int(f.max_shard_gb * 2**30), f.stage,
                           f.eos_is_end_of_turn)
    logging.info("wrote %s to %s", files, f.out)
    return 0


if __name__ == "__main__":
    cli.run_absl(main, __doc__)
