"""The embedded demo: SEA on tiny models and a generated world, on a laptop CPU.

    python -m sea_jax.train --config=configs/demo.py --workdir=/tmp/demo           # the whole demo
    python -m sea_jax.train --config=configs/demo.py:stage1 --workdir=/tmp/demo    # SEA stage 1 only
    python -m sea_jax.train --config=configs/demo.py:stage2 --workdir=/tmp/demo    # stage 2 only

The config names its own runner (``runner``), which ``python -m sea_jax.train`` calls instead of
the trainer: :func:`sea_jax.demo.run.run_demo` (the whole demo: SEA stage 1 in ``DIR/stage1``, the
same run with lambda = 0 in ``DIR/baseline/stage1``, a short stage 2 of each, then the table of
alignment accuracy, held-out caption loss, held-out QA and answered questions, and
``DIR/probe.png``) or :func:`sea_jax.demo.run.run_stage` (one stage).

No weights, no data, no network: the runner first calls :func:`sea_jax.demo.prepare`, which
renders the world of coloured shapes (``sea_jax.demo.world``), its captions, question/answer
conversations, per-patch truth, tokenizers and word list into ``<workdir>/demo_assets/`` once (a
second run reuses them), pretrains the two frozen towers on it, and fills the paths below that are
left empty. The models are ``configs/tiny.py``-style presets, sized so that stage 1 runs in about
two minutes on two CPU cores; the steps are the real ones (same train step, data pipeline,
on-the-fly SigLIP labels, checkpoints) as for ``configs/gemma2b.py``. The ``demo`` fields are
described in ``sea_jax.config.base_config``; changing the world's or the pretraining's needs a
fresh workdir (or another ``demo.assets``).
"""
import ml_collections

from sea_jax.config import base_config
from sea_jax.errors import ConfigError


def get_config(arg=None):
    if arg not in (None, "stage1", "stage2"):
        raise ConfigError(f"unknown config argument {arg!r}; expected 'stage1', 'stage2' or nothing")
    c = base_config()
    c.seed = 0
    c.runner = "sea_jax.demo.run:run_demo" if arg is None else "sea_jax.demo.run:run_stage"
    c.mesh.update(data=-1, fsdp=1, tensor=1)

    # Random Gemma-architecture LM; vocab_size is set by prepare from the world's tokenizer.
    c.llm.preset = "gemma_2b"
    c.llm.overrides = ml_collections.ConfigDict(dict(
        vocab_size=0, hidden=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, mlp_dim=128, max_positions=256))
    c.llm.dtype = "float32"
    c.llm.tokenizer = ""  # "" = the demo's (prepare fills it)
    # Random SigLIP B/8 shrunk: 64 px / patch 8 = an 8 x 8 grid of visual tokens.
    c.vision.variant = "B/8"
    c.vision.image_size = 64  # prepare sets it to demo.image_size
    c.vision.dtype = "float32"
    c.vision.tokenizer = ""
    c.vision.overrides = ml_collections.ConfigDict(dict(
        width=64, depth=3, mlp_dim=128, num_heads=4, vocab_size=0, text_len=16, text_width=64, text_depth=2,
        text_mlp_dim=128, text_num_heads=4, out_dim=64))

    c.labels.word_list = "demo"  # the world's words + distractors (prepare fills the path)
    c.labels.top_n = 5
    c.sea.lam = 1.0
    # tau starts at CLIP's 0.07 rather than the recipes' 1.0 (log tau = 0): with ~60 words and a
    # few hundred steps, tau = 1 caps Eq. 9's logits at +-1 and the learned tau only reached 0.72;
    # measured on one seed at 200 steps, SEA's alignment accuracy vs the SigLIP labels was 45.5% with tau_0 = 1
    # and 61.5% with 0.07 (lambda = 0 baseline: 37.1%), see README "The embedded demo".
    c.sea.tau_init = 0.07

    c.data.json = ""
    c.data.image_root = ""
    c.data.max_length = 96  # 64 image tokens + BOS + the caption (at most ~20 tokens) + EOS
    c.data.num_workers = 0  # in-process decoding: a laptop, and tiny images
    c.data.num_threads = 2
    c.data.prefetch = 2

    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.03
    c.train.batch_size = 16
    c.train.num_steps = 300
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2

    if arg == "stage2":
        # LLaVA-1.5 stage 2 on the world's question/answer conversations, from stage 1's adapter
        # (the same workdir's stage1/ unless --config.train.init_from says otherwise).
        from sea_jax.demo.run import stage2_config

        c = stage2_config(c)
    return c
