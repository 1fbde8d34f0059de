"""Tiny models for tests and a CPU smoke run: the whole training system in seconds.

With no checkpoints set, the LLM is a random ``llm.preset`` shrunk by ``llm.overrides`` and SigLIP a
random ``vision.variant`` shrunk by ``vision.overrides``; a tokenizer folder and data are still
needed (the tests generate them)::

    python -m sea_jax.train --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.llm.tokenizer=TOKENIZER_DIR --config.data.json=data.json --config.data.image_root=images \
        --config.vision.tokenizer=SIGLIP_TOKENIZER_DIR --config.labels.word_list=words.txt

HF folders work too (``--config.llm.checkpoint=DIR --config.vision.checkpoint=DIR``); then the
folder's config.json is that part's architecture and the overrides below that describe one are
not used (sea_jax.builder's rule); numerics (dtype, scan, remat) still apply.
``arg="stage2"`` (``--config=configs/tiny.py:stage2``) gives the stage-2 recipe at the same size.
"""
import ml_collections

from sea_jax.config import base_config
from sea_jax.errors import ConfigError


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.llm.preset = "gemma_2b"
    c.llm.overrides = ml_collections.ConfigDict(dict(
        vocab_size=128, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_positions=256))
    c.llm.dtype = "float32"
    c.llm.scan_layers = True
    c.vision.variant = "B/8"
    c.vision.image_size = 32
    c.vision.dtype = "float32"
    c.vision.overrides = ml_collections.ConfigDict(dict(
        width=32, depth=2, mlp_dim=64, num_heads=4, vocab_size=64, text_len=8, text_width=32, text_depth=1,
        text_mlp_dim=64, text_num_heads=4, out_dim=32))
    c.labels.top_n = 3
    c.sea.lam = 1.0
    c.data.max_length = 40
    c.data.num_workers = 0  # in-process decoding: tests run on 2 shared cores
    c.data.num_threads = 2
    c.data.prefetch = 1
    c.optim.lr = 1e-2
    c.optim.warmup_ratio = 0.1
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 10
    c.train.async_checkpoint = True
    c.train.progress = False
    if arg == "stage2":
        c.stage = 2
        c.data.template = "chat"
        c.data.pad_to_square = True
        c.train.trainable = ("adapter", "llm")
        c.sea.lam = 0.0
        c.optim.lr = 2e-3
    elif arg:
        raise ConfigError(f"unknown config argument {arg!r}; expected 'stage2' or nothing")
    return c
