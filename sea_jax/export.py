"""``python -m sea_jax.export --workdir=DIR [--step=N] --out=HF_DIR [--dtype=bfloat16|float32] [--adapter_only]``

Writes a training run's checkpoint as a Hugging Face ``LlavaForConditionalGeneration`` folder
(:func:`sea_jax.convert.hf_llava.export_llava`) or, with ``--adapter_only`` (stage 1), the adapter
alone in LLaVA's ``mm_projector`` layout (:func:`sea_jax.convert.hf_llava.export_adapter`).

The checkpoint is read by ``sea_jax.checkpoint.load_params_from_workdir(workdir, step)`` (the
training system's; imported lazily, so export's Python API works without it), which returns
``(run_config, params)``: the run's ``ml_collections`` config and the full parameter tree
``{"vision": {"img"}, "adapter", "llm", "log_tau"}`` (trained parts from the checkpoint, frozen
parts reloaded as training loaded them). ``sea_jax.train.build_model(run_config)`` (no weights
read) gives the model config (``.cfg``) and the tokenizer as trained (``.tokenizer``: ``<image>``
added, the run's chat template set). From the run config: the image preprocessing
(``data.pad_to_square``) and the template kind (``data.template``: "plain" (stage 1) exports
LLaVA's plain format, "chat" the tokenizer's template).

Multi-host: run on every host (gathering is collective); process 0 writes.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from sea_jax.models.mllm import MLLMConfig


@dataclasses.dataclass
class WorkdirModel:
    """What export and generation need from a training run."""

    cfg: MLLMConfig
    params: Any
    tokenizer: Any
    pad_to_square: bool
    chat_template: str | None = None
    run_config: Any = None  # the run's config.json (ml_collections), e.g. its data.max_length


def load_workdir(workdir: str, step: int | None = None, mesh=None, stage: int | None = None) -> WorkdirModel:
    """Reads a training run's checkpoint through ``sea_jax.checkpoint.load_params_from_workdir``:
    the run of ``stage`` (default the highest trained) at ``step`` (default the newest).

    Raises:
      ImportError: the training system's modules are not available (this function depends on
        them; use :func:`sea_jax.convert.hf_llava.export_llava` with in-memory params instead).
    """
    try:
        from sea_jax.checkpoint import load_params_from_workdir
        from sea_jax.train import build_model
    except ImportError as e:
        raise ImportError(
            "reading a workdir needs sea_jax.checkpoint.load_params_from_workdir and sea_jax.train.build_model "
            f"(the training system), which cannot be imported: {e}"
        ) from e
    from sea_jax.convert.hf_llava import PLAIN_CHAT_TEMPLATE

    run_config, params = load_params_from_workdir(workdir, step, stage=stage, mesh=mesh)
    built = build_model(run_config)  # without a mesh: configs and tokenizer only, no weights
    cfg = getattr(built, "cfg", None)
    if not isinstance(cfg, MLLMConfig):
        raise TypeError(f"sea_jax.train.build_model(...).cfg is {type(cfg).__name__}, expected MLLMConfig")
    data = _get(run_config, "data")
    template = PLAIN_CHAT_TEMPLATE if _get(data, "template", "plain") == "plain" else None
    tokenizer = built.tokenizer
    # The run saved the tokenizer exactly as trained (<image> added, chat template set, e.g.
    # Vicuna's LLaVA format that the source folder lacks): prefer it over the source folder's.
    from sea_jax.checkpoint import find_run

    trained = os.path.join(find_run(workdir, stage), "tokenizer") if os.path.isdir(workdir) else ""
    if trained and os.path.isdir(trained):
        from sea_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(trained)
    return WorkdirModel(
        cfg=cfg, params=params, tokenizer=tokenizer,
        pad_to_square=bool(_get(data, "pad_to_square", False)), chat_template=template, run_config=run_config,
    )


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def export_workdir(workdir: str, out: str, step: int | None = None, dtype: str = "bfloat16",
                   adapter_only: bool = False, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """The CLI as a function: export the run's checkpoint at ``step`` to ``out``; returns the files."""
    from sea_jax.convert import hf_llava

    m = load_workdir(workdir, step)
    if adapter_only:
        return [hf_llava.export_adapter(m.cfg, m.params["adapter"], out, dtype=dtype)]
    return hf_llava.export_llava(
        m.cfg, m.params, m.tokenizer, out, dtype=dtype, pad_to_square=m.pad_to_square,
        chat_template=m.chat_template, max_shard_bytes=max_shard_bytes,
    )


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    from sea_jax import sharding

    f = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    sharding.init_distributed()
    files = export_workdir(f.workdir, f.out, f.step, f.dtype, f.adapter_only, int(f.max_shard_gb * 2**30))
    logging.info("wrote %s to %s", files, f.out)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "the training run's workdir")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_string("out", None, "output folder")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weight dtype on disk")
    flags.DEFINE_bool("adapter_only", False, "write only the adapter (LLaVA mm_projector), for stage-1 runs")
    flags.DEFINE_float("max_shard_gb", 5.0, "safetensors shard size in GiB")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)


__all__ = ["WorkdirModel", "load_workdir", "export_workdir", "main"]
