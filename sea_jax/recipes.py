"""The paper's training recipes (LLaVA-1.5's, which SEA follows) as config builders.

Each model's config file (``configs/<model>.py``, ``configs/<model>_finetune.py``) calls
:func:`stage1` or :func:`stage2` and sets what is model specific (mesh, memory knobs). Paths are
placeholders on purpose (:data:`sea_jax.config.PLACEHOLDER`): every tool checks the paths it needs
before it loads or compiles anything and names the field to set
(``--config.llm.checkpoint=/path/to/folder``). ``docs/design.md`` gives the recipe's numbers and
where they come from.
"""
from __future__ import annotations

import ml_collections

from sea_jax.config import PLACEHOLDER, base_config
from sea_jax.errors import ConfigError


# The paper's vision towers: (tower, variant, image size, checkpoint placeholder, Eq. 6 negation).
TOWERS = {
    "siglip": ("siglip", "So400m/14", 384, "siglip-so400m-patch14-384 (HF SiglipModel folder or big_vision .npz)",
               False),
    # LLaVA-1.5's tower; the paper's Eq. 6 ranks CLIP's patch-word similarities by -cos (CLIP Surgery)
    "clip": ("clip", "L/14", 336, "openai/clip-vit-large-patch14-336 (HF CLIPModel folder)", True),
}
S2_SCALES = (336, 672, 1008)  # LLaVA-S2's CLIP-L scales (the paper's CLIP-L @ 1008 rows)

# Length buckets (sea_jax.data.buckets), chosen with benchmarks/length_buckets.py: useful-token
# fraction 0.93 on a 558k-like and 0.92 on a 665k-like length distribution, against 0.36 and 0.53
# when every row is padded to 2048. Stage 1 rows are the image's tokens plus a short caption, nearly
# constant: buckets just above the image (offsets rounded up to 32 tokens) need no grouping (which
# would hold batches of decoded images in host memory for nothing). Stage 2 rows spread widely:
# without grouping a batch's longest row is near 2048 and buckets gain nothing (0.53).
STAGE1_BUCKET_OFFSETS = (71, 167, 295)
STAGE1_GROUP_BATCHES = 0
STAGE2_BUCKETS = "832,960,1088,1216,1344,1536,1792"
STAGE2_GROUP_BATCHES = 32


def stage1_buckets(image_tokens: int) -> str:
    """``data.length_buckets`` of a stage-1 recipe whose image takes ``image_tokens`` tokens."""
    return ",".join(str(-(-(image_tokens + o) // 32) * 32) for o in STAGE1_BUCKET_OFFSETS)


def stage1(llm_placeholder: str, preset: str, tower: str = "siglip", s2: bool = False) -> ml_collections.ConfigDict:
    """Stage 1: adapter (+ SEA's tau) on LLaVA-Pretrain-558k, 'plain' template, frozen LLM and
    vision tower; batch 256, lr 1e-3, no weight decay, 3% warmup, cosine, 1 epoch, SEA with
    lambda = 1.

    Args:
      llm_placeholder: what ``llm.checkpoint`` should hold (shown in the error until it is set).
      preset: the LLM architecture (``sea_jax.models.llm.PRESETS``), used when no checkpoint is
        set (AOT sizing).
      tower: "siglip" (So400m/14@384, the paper's SigLIP rows) or "clip" (ViT-L/14@336,
        LLaVA-1.5's, labels ranked by -cos as Eq. 6).
      s2: the S2 multi-scale features over the CLIP tower at 336/672/1008 px.
    """
    c = base_config()
    c.stage = 1
    c.llm.checkpoint = PLACEHOLDER + llm_placeholder
    c.llm.preset = preset
    name, variant, size, placeholder, negate = TOWERS[tower]
    c.vision.tower = name
    c.vision.checkpoint = PLACEHOLDER + placeholder
    c.vision.variant = variant
    c.vision.image_size = size
    c.labels.negate_similarity = negate
    if s2:
        if tower != "clip":
            raise ConfigError("S2 is the paper's CLIP-L row: use tower='clip'")
        c.vision.s2_scales = S2_SCALES
    c.data.kind = "llava_json"
    c.data.json = PLACEHOLDER + "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    c.data.image_root = PLACEHOLDER + "LLaVA-Pretrain/images"
    c.data.template = "plain"
    c.data.pad_to_square = False
    c.data.max_length = 2048
    c.data.length_buckets = stage1_buckets((size // int(variant.split("/")[1])) ** 2)  # "L/14": 14-px patches
    c.data.group_batches = STAGE1_GROUP_BATCHES
    c.data.num_threads = 16
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.03
    c.train.batch_size = 256
    c.train.num_epochs = 1.0
    c.train.trainable = ("adapter", "log_tau")
    c.train.checkpoint_every = 500
    c.sea.lam = 1.0
    return c


def stage2(llm_placeholder: str, preset: str, arg: str | None = None, tower: str = "siglip",
           s2: bool = False) -> ml_collections.ConfigDict:
    """Stage 2: adapter + LLM on llava_v1_5_mix665k with the LLM's chat template (loss on assistant
    turns), images padded to square with the image mean; batch 128, lr 2e-5, same schedule; starts
    from the stage-1 adapter (``train.init_from``, default ``<workdir>/stage1``). LM loss only
    (``sea.lam = 0``), as the paper's stage 2.

    ``arg="prime"`` (``--config=configs/X_finetune.py:prime``): SEA-PRIME, the vision tower trained
    as well at lr 2e-6.
    """
    c = stage1(llm_placeholder, preset, tower, s2)
    c.stage = 2
    c.data.json = PLACEHOLDER + "llava_v1_5_mix665k.json"
    c.data.image_root = PLACEHOLDER + "LLaVA-Finetune image root (coco, gqa, ocr_vqa, textvqa, vg)"
    c.data.template = "chat"
    c.data.pad_to_square = True
    c.data.length_buckets = STAGE2_BUCKETS
    c.data.group_batches = STAGE2_GROUP_BATCHES
    c.optim.lr = 2e-5
    c.train.batch_size = 128
    c.train.trainable = ("adapter", "llm")
    c.train.init_from = ""  # "" = <workdir>/stage1
    c.sea.lam = 0.0
    c.llm.remat = "full"  # the LLM is trained: activations of 2048-token sequences dominate memory
    if arg == "prime":
        c.train.trainable = ("adapter", "llm", "vision")
        c.optim.group_lr = ml_collections.ConfigDict({"vision": 2e-6})
        c.vision.overrides.remat = True
    elif arg:
        raise ConfigError(f"unknown config argument {arg!r}; expected 'prime' or nothing")
    return c


def no_argument(name: str, arg: str | None) -> None:
    """Refuses a ``:arg`` suffix for a config file that takes none."""
    if arg:
        raise ConfigError(f"{name} takes no config argument, got {arg!r}")


__all__ = ["stage1", "stage2", "no_argument", "TOWERS", "S2_SCALES"]
