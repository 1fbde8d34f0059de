"""Stage 2 (instruction tuning) of CLIP ViT-L/14@336 + lmsys/vicuna-7b-v1.5 (SEA-LLaVA: LLaVA-1.5-7B's architecture), from stage 1's adapter.

    python -m sea_jax.train --config=configs/clip_vicuna7b_finetune.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/vicuna-7b-v1.5 --config.vision.checkpoint=/path/to/clip-vit-large-patch14-336 \
        --config.data.json=/path/to/llava_v1_5_mix665k.json --config.data.image_root=/path/to/data

DIR is the stage-1 workdir (the adapter comes from DIR/stage1; or set --config.train.init_from).
SEA-PRIME (the vision tower trained too, lr 2e-6): --config=configs/clip_vicuna7b_finetune.py:prime
"""
from sea_jax import recipes


def get_config(arg=None):
    c = recipes.stage2("lmsys/vicuna-7b-v1.5 HF folder", "vicuna_7b", arg, tower="clip")
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # the LLM is trained: FSDP over its optimizer state
    c.data.chat_template = "vicuna_v1"  # Vicuna ships no chat template: LLaVA-1.5's conv_vicuna_v1
    c.vision.overrides.scan = True
    c.train.microbatches = 8
    c.train.logits_chunk = 512
    return c
