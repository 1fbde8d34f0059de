"""Stage 1 (adapter pretraining + SEA) of SigLIP So400m/14@384 + google/gemma-2b.

    python -m sea_jax.train --config=configs/gemma2b.py --workdir=DIR \
        --config.llm.checkpoint=/path/to/gemma-2b --config.vision.checkpoint=/path/to/siglip \
        --config.data.json=/path/to/blip_laion_cc_sbu_558k.json --config.data.image_root=/path/to/images
"""
from sea_jax import recipes


def get_config(arg=None):
    recipes.no_argument(__name__, arg)
    c = recipes.stage1("google/gemma-2b HF folder", "gemma_2b")
    # Measured with `python -m sea_jax.aot --config=configs/gemma2b.py --topology=v4-8` (15.6 of 32 GiB
    # per chip, benchmarks/results/aot_table.md): FSDP keeps the frozen fp32 LLM from sitting whole on
    # every chip; 4 microbatches + the chunked LM head keep Gemma's 256k-vocab logits and the
    # 2048-token activations small while L_a still spans the whole global batch of 256. (16
    # microbatches were needed while the step scored the whole word list at once and kept every
    # SigLIP layer's output; it scores 4096 words at a time and keeps the one layer it reads.)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.llm.remat = "full"
    c.vision.overrides.scan = True
    c.train.microbatches = 4
    c.train.logits_chunk = 256
    return c
