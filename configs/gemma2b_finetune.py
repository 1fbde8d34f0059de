"""Stage 2 (instruction tuning) of SigLIP So400m/14@384 + google/gemma-2b, from stage 1's adapter.

    python -m sea_jax.train --config=configs/gemma2b_finetune.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/gemma-2b --config.vision.checkpoint=/path/to/siglip \
        --config.data.json=/path/to/llava_v1_5_mix665k.json --config.data.image_root=/path/to/data

DIR is the stage-1 workdir (the adapter comes from DIR/stage1; or set --config.train.init_from).
SEA-PRIME (the vision tower trained too, lr 2e-6): --config=configs/gemma2b_finetune.py:prime
"""
from sea_jax import recipes


def get_config(arg=None):
    c = recipes.stage2("google/gemma-2b HF folder", "gemma_2b", arg)
    # Tuned for v4-8 with `python -m sea_jax.aot` (benchmarks/results/aot_table.md): FSDP over every
    # chip holds the trained LLM's Adam state; 16 microbatches of 8 sequences (2 per chip) + the
    # chunked LM head keep Gemma's 256k-vocab logits small. On 16 chips (v4-32, v5e-16) each
    # microbatch must still split over the chips: add --config.train.microbatches=4 (v4-32) or 8 (v5e-16).
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.vision.overrides.scan = True
    c.train.microbatches = 16
    c.train.logits_chunk = 512
    return c
