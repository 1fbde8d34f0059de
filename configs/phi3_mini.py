"""Stage 1 (adapter pretraining + SEA) of SigLIP So400m/14@384 + microsoft/Phi-3-mini-4k-instruct.

    python -m sea_jax.train --config=configs/phi3_mini.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/Phi-3-mini-4k-instruct --config.vision.checkpoint=/path/to/siglip \
        --config.data.json=/path/to/blip_laion_cc_sbu_558k.json --config.data.image_root=/path/to/images
"""
from sea_jax import recipes


def get_config(arg=None):
    recipes.no_argument(__name__, arg)
    c = recipes.stage1("microsoft/Phi-3-mini-4k-instruct HF folder", "phi3_mini")
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # 7-8B: shard weights and optimizer state (FSDP)
    return c
