"""Labelling config for the tests: the schema's defaults with small batches and shards.

The test passes the generated checkpoint, tokenizer, word list and data on the command line
(``--config.vision.checkpoint=...`` etc.).
"""
from sea_jax.config import base_config


def get_config():
    c = base_config()
    c.vision.image_size = 0  # the checkpoint's own
    c.vision.dtype = "float32"
    c.labels.top_n = 5
    c.labels.batch_size = 4  # 4 batch shards (data=2, fsdp=2) on the 8 simulated devices
    c.labels.shard_size = 3
    c.labels.text_batch_size = 16
    c.labels.num_workers = 2
    c.labels.mesh.update(data=2, fsdp=2, tensor=2)
    c.labels.word_axes = "tensor"
    return c
