"""The embedded demo: SEA on tiny models and a generated world, on a laptop CPU.

    python -m sea_jax.train --config=configs/demo.py --workdir=/tmp/demo           # the whole demo
    python -m sea_jax.train --config=configs/demo.py:stage1 --workdir=/tmp/demo    # SEA stage 1 only
    python -m sea_jax.train --config=configs/demo.py:stage2 --workdir=/tmp/demo    # stage 2 only

The whole demo (``demo.full_run``, :mod:`sea_jax.demo.run`): SEA stage 1 in ``DIR/stage1``, the
same run with lambda = 0 in ``DIR/baseline/stage1``, a short stage 2 of each, then the table
(alignment accuracy, held-out caption loss, held-out QA, answered questions) and ``DIR/probe.png``.

No weights, no data, no network: the trainer sees the ``demo`` section and calls
``sea_jax.demo.prepare``, which renders the world of coloured shapes (``sea_jax.demo.world``),
its captions, question/answer conversations, per-patch truth, tokenizers and word list into
``<workdir>/demo_assets/`` once (a second run reuses them) and fills the paths below that are left
empty. The models are ``configs/tiny.py``-style random presets, sized so that stage 1 runs in
about two minutes on two CPU cores; the steps are the real ones (same train step, data pipeline,
on-the-fly SigLIP labels, checkpoints) as for ``configs/gemma2b.py``.

``demo`` fields: ``seed`` (the world; ``config.seed`` is the training seed), ``num_images``
(training images, each with a caption and a conversation), ``num_eval`` (held-out images),
``image_size`` (pixels; also SigLIP's input size; with patch 8 the grid is image_size / 8),
``max_objects`` (1..4 shapes per image), ``qa_turns`` (questions per conversation, at most),
``siglip_vocab`` (SentencePiece size ceiling); ``pretrain`` (train the SigLIP with the sigmoid loss
and the Gemma-architecture LM on the world first, ``sea_jax.demo.pretrain``; False = random towers),
``siglip_steps``, ``siglip_lr``, ``siglip_patch_weight``, ``llm_steps``, ``llm_lr``,
``pretrain_batch``. Changing any of them needs a fresh workdir (or another ``assets``). Run
fields: ``full_run`` (the whole demo, above), ``compare`` (the lambda = 0 arm), ``stage2_steps``
(0 = no stage 2), ``assets`` ("" = ``DIR/demo_assets``; a shared folder lets several workdirs, e.g.
seeds, reuse one world and one pair of pretrained towers), ``plot_images``, ``show_questions``.

Fields added as in ``configs/tiny.py`` (not in ``base_config``): ``llm.overrides``,
``data.chat_template``, ``data.num_threads``, ``train.async_checkpoint``, ``train.progress``.
"""
import ml_collections

from sea_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.mesh.update(data=-1, fsdp=1, tensor=1)

    c.demo = ml_collections.ConfigDict(dict(
        seed=0, num_images=512, num_eval=64, image_size=64, max_objects=3, qa_turns=3, siglip_vocab=256,
        # pretraining of the frozen towers on the world (sea_jax.demo.pretrain), cached in the workdir
        pretrain=True, siglip_steps=600, siglip_lr=3e-3, siglip_patch_weight=3.0, llm_steps=150, llm_lr=3e-3,
        pretrain_batch=32,
        # the whole demo (sea_jax.demo.run)
        full_run=arg is None, compare=True, stage2_steps=150, assets="", plot_images=4, show_questions=6))

    # Random Gemma-architecture LM; vocab_size is set by prepare from the world's tokenizer.
    c.llm.preset = "gemma_2b"
    c.llm.overrides = ml_collections.ConfigDict(dict(
        vocab_size=0, hidden=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, mlp_dim=128, max_positions=256))
    c.llm.dtype = "float32"
    c.llm.tokenizer = ""  # "" = the demo's (prepare fills it)
    # Random SigLIP B/8 shrunk: 64 px / patch 8 = an 8 x 8 grid of visual tokens.
    c.siglip.variant = "B/8"
    c.siglip.image_size = 64  # prepare sets it to demo.image_size
    c.siglip.dtype = "float32"
    c.siglip.tokenizer = ""
    c.siglip.overrides = ml_collections.ConfigDict(dict(
        width=64, depth=3, mlp_dim=128, num_heads=4, vocab_size=0, text_len=16, text_width=64, text_depth=2,
        text_mlp_dim=128, text_num_heads=4, out_dim=64))

    c.labels.word_list = "demo"  # the world's words + distractors (prepare fills the path)
    c.labels.top_n = 5
    c.sea.lam = 1.0
    # tau starts at CLIP's 0.07 rather than the recipes' 1.0 (log tau = 0): with ~60 words and a
    # few hundred steps, tau = 1 caps Eq. 9's logits at +-1 and the learned tau only reached 0.72;
    # measured on one seed at 200 steps, SEA's alignment accuracy vs the SigLIP labels was 45.5% with tau_0 = 1
    # and 61.5% with 0.07 (lambda = 0 baseline: 37.1%), see README "The embedded demo".
    c.sea.log_tau_init = -2.66

    c.data.json = ""
    c.data.image_root = ""
    c.data.max_length = 96  # 64 image tokens + BOS + the caption (at most ~20 tokens) + EOS
    c.data.num_workers = 0  # in-process decoding: a laptop, and tiny images
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.num_shards = 0
    c.data.chat_template = ""  # the demo tokenizer's own (Gemma-style)

    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.03
    c.train.batch_size = 16
    c.train.num_steps = 300
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2
    c.train.async_checkpoint = True
    c.train.progress = True

    if arg == "stage2":
        # LLaVA-1.5 stage 2 on the world's question/answer conversations, from stage 1's adapter
        # (the same workdir's stage1/ unless --config.train.init_from says otherwise).
        from sea_jax.demo.run import stage2_config

        c = stage2_config(c)
    elif arg not in (None, "stage1"):
        raise ValueError(f"unknown config argument {arg!r}; expected 'stage1', 'stage2' or nothing")
    return c
