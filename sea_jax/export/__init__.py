"""Export a training run to Hugging Face: :func:`export_workdir`, run by ``python -m sea_jax.export``.

The run is read by :func:`sea_jax.builder.load_trained` (trained parts from the checkpoint, frozen
parts reloaded as training loaded them, the tokenizer the run saved) and written as a
``LlavaForConditionalGeneration`` folder (:func:`sea_jax.convert.hf_llava.export_llava`) or, for a
stage-1 run, as the adapter alone in LLaVA's ``mm_projector`` layout
(:func:`sea_jax.convert.hf_llava.export_adapter`). The run's config decides the image
preprocessing (``data.pad_to_square``) and the template (``data.template``: "plain" exports
LLaVA's plain format, "chat" the tokenizer's template).
"""
from __future__ import annotations


def export_workdir(workdir: str, out: str, step: int | None = None, dtype: str = "bfloat16",
                   adapter_only: bool = False, max_shard_bytes: int = 5 * 2**30, stage: int | None = None,
                   eos_is_end_of_turn: bool = False) -> list[str]:
    """Writes the run of ``workdir`` (``stage``, default the highest) at ``step`` (default the
    newest) to ``out`` (local or ``gs://``, like ``workdir``); returns the files written. ``eos_is_end_of_turn``: see
    :func:`sea_jax.convert.llava_files.prepare_tokenizer`."""
    from absl import logging

    from sea_jax import storage
    from sea_jax.builder import load_trained
    from sea_jax.convert import hf_llava

    m = load_trained(workdir, stage=stage, step=step)
    # the writers make local files (safetensors, tokenizer); a gs:// out is uploaded when complete
    with storage.as_local(out, write=True) as local:
        if adapter_only:
            files = [hf_llava.export_adapter(m.cfg, m.params["adapter"], local, dtype=dtype)]
        elif m.cfg.s2 is not None:  # no transformers class computes S2 features: the parts
            logging.warning("an S2 model has no transformers Llava class: writing its parts (llm/, vision/, "
                            "mm_projector.safetensors, s2.json) to %s", out)
            files = hf_llava.export_parts(m.cfg, m.params, m.tokenizer, local, dtype=dtype,
                                          pad_to_square=m.pad_to_square, chat_template=m.chat_template,
                                          max_shard_bytes=max_shard_bytes)
        else:
            files = hf_llava.export_llava(
                m.cfg, m.params, m.tokenizer, local, dtype=dtype, pad_to_square=m.pad_to_square,
                chat_template=m.chat_template, max_shard_bytes=max_shard_bytes,
                eos_is_end_of_turn=eos_is_end_of_turn)
    return [out + f[len(local):] if f.startswith(local) else f for f in files]


__all__ = ["export_workdir"]
