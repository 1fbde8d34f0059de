"""Stage 2 (instruction tuning) of SigLIP So400m/14@384 + microsoft/Phi-3-mini-4k-instruct, from stage 1's adapter.

    python -m sea_jax.train --config=configs/phi3_mini_finetune.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/Phi-3-mini-4k-instruct --config.vision.checkpoint=/path/to/siglip \
        --config.data.json=/path/to/llava_v1_5_mix665k.json --config.data.image_root=/path/to/data

DIR is the stage-1 workdir (the adapter comes from DIR/stage1; or set --config.train.init_from).
SEA-PRIME (the vision tower trained too, lr 2e-6): --config=configs/phi3_mini_finetune.py:prime
"""
from sea_jax import recipes


def get_config(arg=None):
    c = recipes.stage2("microsoft/Phi-3-mini-4k-instruct HF folder", "phi3_mini", arg)
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # the LLM is trained: FSDP over its optimizer state
    return c
