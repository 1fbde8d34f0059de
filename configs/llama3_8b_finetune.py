"""Stage 2 (instruction tuning) of SigLIP So400m/14@384 + meta-llama/Meta-Llama-3-8B-Instruct, from stage 1's adapter.

    python -m sea_jax.train --config=configs/llama3_8b_finetune.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/Meta-Llama-3-8B-Instruct --config.vision.checkpoint=/path/to/siglip \
        --config.data.json=/path/to/llava_v1_5_mix665k.json --config.data.image_root=/path/to/data

DIR is the stage-1 workdir (the adapter comes from DIR/stage1; or set --config.train.init_from).
SEA-PRIME (the vision tower trained too, lr 2e-6): --config=configs/llama3_8b_finetune.py:prime
"""
from sea_jax import recipes


def get_config(arg=None):
    c = recipes.stage2("meta-llama/Meta-Llama-3-8B-Instruct HF folder", "llama3_8b", arg)
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # the LLM is trained: FSDP over its optimizer state
    return c
