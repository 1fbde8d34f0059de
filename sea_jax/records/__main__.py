r"""Convert a LLaVA JSON/JSONL once into an ArrayRecord folder that training reads by index.

    python -m sea_jax.records --json=/data/llava_v1_5_mix665k.json --out=/data/mix665k_records
    python -m sea_jax.records --json=gs://b/mix665k.json --out=gs://b/mix665k_records \
        --image_root=gs://b/images --embed_images

Then train from it with ``--config.data.kind=array_record --config.data.records=OUT`` (plus
``--config.data.image_root=...`` when images are not embedded), or name it in a mixture
(``kind: array_record``, ``path: OUT``). Entry i is record i of the JSON, so the batches are
exactly those of the JSON. Prints a one-line summary (records, shards, images embedded / missing /
outside the root, bytes, seconds).
"""
from __future__ import annotations

import json

from absl import flags

from sea_jax import cli
from sea_jax.data import records as records_lib

flags.DEFINE_string("json", None, "the LLaVA .json / .jsonl to convert (local or gs://)")
flags.DEFINE_string("out", None, "the folder to write (local or gs://)")
flags.DEFINE_string("image_root", "", "folder (or gs:// prefix) the records' image paths are relative to")
flags.DEFINE_bool("embed_images", False, "store each record's image bytes inside it (needs --image_root)")
flags.DEFINE_integer("records_per_shard", 65536, "records per ArrayRecord file")
flags.DEFINE_integer("num_threads", 16, "concurrent image reads with --embed_images")
flags.DEFINE_string("options", records_lib.WRITER_OPTIONS, "ArrayRecord writer options (keep group_size:1)")
flags.DEFINE_bool("overwrite", False, "replace --out if it exists")
flags.mark_flags_as_required(["json", "out"])


def main(argv) -> int:
    del argv
    import logging

    from sea_jax.records import convert

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    f = flags.FLAGS
    info = convert(f.json, f.out, image_root=f.image_root, embed_images=f.embed_images,
                   records_per_shard=f.records_per_shard, num_threads=f.num_threads, options=f.options,
                   overwrite=f.overwrite)
    print(json.dumps({k: info[k] for k in ("num_records", "embedded_images", "images", "bytes", "seconds")}
                     | {"shards": len(info["shards"]), "out": f.out}))
    return 0


if __name__ == "__main__":
    cli.run_absl(main, __doc__)
