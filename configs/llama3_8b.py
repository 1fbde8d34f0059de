"""Stage 1 (adapter pretraining + SEA) of SigLIP So400m/14@384 + meta-llama/Meta-Llama-3-8B-Instruct.

    python -m sea_jax.train --config=configs/llama3_8b.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/Meta-Llama-3-8B-Instruct --config.vision.checkpoint=/path/to/siglip \
        --config.data.json=/path/to/blip_laion_cc_sbu_558k.json --config.data.image_root=/path/to/images
"""
from sea_jax import recipes


def get_config(arg=None):
    recipes.no_argument(__name__, arg)
    c = recipes.stage1("meta-llama/Meta-Llama-3-8B-Instruct HF folder", "llama3_8b")
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # 7-8B: shard weights and optimizer state (FSDP)
    return c
