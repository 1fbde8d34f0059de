"""Stage 1 (adapter pretraining + SEA) of SigLIP So400m/14@384 + lmsys/vicuna-13b-v1.5.

    python -m sea_jax.train --config=configs/vicuna13b.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/vicuna-13b-v1.5 --config.vision.checkpoint=/path/to/siglip \
        --config.data.json=/path/to/blip_laion_cc_sbu_558k.json --config.data.image_root=/path/to/images
"""
from sea_jax import recipes


def get_config(arg=None):
    recipes.no_argument(__name__, arg)
    c = recipes.stage1("lmsys/vicuna-13b-v1.5 HF folder", "vicuna_13b", tower="siglip")
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # 7-13B: shard weights and optimizer state (FSDP)
    c.llm.remat = "full"
    c.vision.overrides.scan = True
    c.train.microbatches = 8  # 32 rows each: the activations of 2048-token rows (see the AOT table)
    return c
