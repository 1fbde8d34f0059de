"""Shared pieces of the stage-1 / stage-2 recipes (LLaVA-1.5, DESIGN.md section 2).

Each model's config file calls :func:`stage1` or :func:`stage2` and sets what is model specific.
Paths are placeholders on purpose: ``sea_jax.train`` checks every path before it compiles anything
and names the config field to set (``--config.llm.checkpoint=/path/to/folder``).
"""
from sea_jax.config import base_config

# A placeholder is a path that cannot exist, so a forgotten override fails with a clear message.
SET_ME = "SET_ME:"


def stage1(llm_placeholder: str, preset: str):
    """Stage 1: adapter (+ SEA's tau) on LLaVA-Pretrain-558k, 'plain' template, frozen LLM and
    SigLIP So400m/14@384; batch 256, lr 1e-3, no weight decay, 3% warmup, cosine, 1 epoch."""
    c = base_config()
    c.stage = 1
    c.llm.checkpoint = SET_ME + llm_placeholder
    c.llm.preset = preset  # the architecture, for sizing (AOT) and to check the checkpoint's config
    c.siglip.checkpoint = SET_ME + "siglip-so400m-patch14-384 (HF SiglipModel folder or big_vision .npz)"
    c.siglip.variant = "So400m/14"
    c.siglip.image_size = 384
    c.data.kind = "llava_json"
    c.data.json = SET_ME + "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    c.data.image_root = SET_ME + "LLaVA-Pretrain/images"
    c.data.template = "plain"
    c.data.pad_to_square = False
    c.data.max_length = 2048
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.03
    c.train.batch_size = 256
    c.train.num_epochs = 1.0
    c.train.trainable = ("adapter", "log_tau")
    c.train.checkpoint_every = 500
    c.sea.lam = 1.0
    # Fields beyond sea_jax.config.base_config, declared so `--config.X=` can set them:
    c.data.num_shards = 0  # data shards (0 = one per process); fix it to change the host count mid-run
    c.data.num_threads = 16  # image-decoding threads per worker process
    c.data.chat_template = ""  # "" = the LLM tokenizer's own; "vicuna_v1" = LLaVA's Vicuna format
    c.train.async_checkpoint = True
    c.train.progress = True  # tqdm bar on process 0
    return c


def stage2(llm_placeholder: str, preset: str, arg: str | None = None):
    """Stage 2: adapter + LLM on llava_v1_5_mix665k with the LLM's chat template (loss on assistant
    turns), images padded to square with the image mean; batch 128, lr 2e-5, same schedule; starts
    from the stage-1 adapter (``train.init_from``, default ``<workdir>/stage1``). LM loss only
    (``sea.lam = 0``), as the paper's stage 2.

    ``arg="prime"`` (``--config=configs/X_finetune.py:prime``): SEA-PRIME, the SigLIP image tower
    trained as well at lr 2e-6.
    """
    c = stage1(llm_placeholder, preset)
    c.stage = 2
    c.data.json = SET_ME + "llava_v1_5_mix665k.json"
    c.data.image_root = SET_ME + "LLaVA-Finetune image root (coco, gqa, ocr_vqa, textvqa, vg)"
    c.data.template = "chat"
    c.data.pad_to_square = True
    c.optim.lr = 2e-5
    c.train.batch_size = 128
    c.train.trainable = ("adapter", "llm")
    c.train.init_from = ""  # "" = <workdir>/stage1
    c.sea.lam = 0.0
    c.llm.remat = "full"  # the LLM is trained: activations of 2048-token sequences dominate memory
    if arg == "prime":
        c.train.trainable = ("adapter", "llm", "vision")
        c.optim.group_lr = {"vision": 2e-6}
        c.siglip.overrides.update(remat=True)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected 'prime' or nothing")
    return c
