"""Answer prompts about images: ``python -m sea_jax.generate --hf=HF_DIR --image=PATH --prompt="What is shown?"``.

``--hf`` is an exported Llava folder; ``--workdir=DIR [--stage=K] [--step=N]`` reads a training run
instead. The image is preprocessed as training did, the chat template is applied with ``<image>``
expanded to one placeholder per patch, and the answer is decoded greedily (``--temperature=0``) or
sampled, stopping at EOS or the template's end-of-turn token. ``--mesh`` shards the model over
all local devices.
"""
from __future__ import annotations

from typing import Any

from absl import flags

from sea_jax import cli
from sea_jax.errors import UserError

flags.DEFINE_string("hf", "", "an exported HF Llava folder")
flags.DEFINE_string("workdir", "", "a training workdir (reads its checkpoint)")
flags.DEFINE_integer("stage", None, "stage of --workdir (default: the highest trained)")
flags.DEFINE_integer("step", None, "checkpoint step of --workdir (default: latest)")
flags.DEFINE_multi_string("image", None, "image file(s); one prompt each, or one prompt for all")
flags.DEFINE_multi_string("prompt", None, "user prompt(s)")
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("dtype", "", "compute dtype of the LLM (--hf only; default the folder's config)")
flags.DEFINE_bool("mesh", False, "shard the model over all local devices (fsdp)")
flags.mark_flags_as_required(["image", "prompt"])


def load(f, mesh) -> tuple[Any, Any, Any, dict]:
    """(cfg, params, tokenizer, {"image_size", "pad_to_square"}) from --hf or --workdir."""
    import jax.numpy as jnp

    from sea_jax.convert import hf_llava, llava_files

    if bool(f.hf) == bool(f.workdir):
        raise UserError("pass exactly one of --hf and --workdir")
    if f.hf:
        overrides = {"dtype": jnp.dtype(f.dtype)} if f.dtype else {}
        cfg, params, tok = hf_llava.import_llava(f.hf, mesh=mesh, **overrides)
        return cfg, params, tok, llava_files.read_preprocessing(f.hf)
    from sea_jax.builder import load_trained

    m = load_trained(f.workdir, stage=f.stage, step=f.step, mesh=mesh, to_host=False)
    # The exported folder's tokenizer: <image> special, the multimodal chat template.
    tok = llava_files.prepare_tokenizer(m.tokenizer, m.cfg, m.chat_template)
    return m.cfg, m.params, tok, {"image_size": m.cfg.vision.image_size, "pad_to_square": m.pad_to_square}


def main(argv) -> int:
    del argv
    import jax
    import numpy as np

    from sea_jax import generate as gen
    from sea_jax import sharding
    from sea_jax.data.images import load_for
    from sea_jax.models.mllm import MLLM

    f = flags.FLAGS
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)) if f.mesh else None
    cfg, params, tok, pre = load(f, mesh)
    images = [load_for(cfg.pixel_spec, p, pre["pad_to_square"]) for p in f.image]
    prompts = list(f.prompt)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise UserError(f"{len(images)} images and {len(prompts)} prompts; pass one prompt or one per image")
    rows = [gen.encode_prompt(tok, gen.chat_prompt(tok, p), cfg.num_image_tokens) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = gen.pad_batch(rows, pad, "left")
    out = gen.Generator(MLLM(cfg), mesh)(
        params, np.stack(images), ids, mask, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
        top_p=f.top_p, eos_token_id=gen.stop_token_ids(tok, cfg.llm.eos_token_id), pad_token_id=pad,
        key=jax.random.key(f.seed),
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, p in enumerate(prompts):
        text = tok.decode(tokens[i, : lengths[i]], skip_special_tokens=True)
        print(f"[{i}] {p}\n{text}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run_absl(main, __doc__)
