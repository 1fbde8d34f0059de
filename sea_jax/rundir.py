"""The layout of a workdir and of its run folders, in one place.

A *workdir* (``--workdir``) holds both stages of one model; each stage is a *run folder*::

    <workdir>/
      stage1/                    the run of stage 1 (adapter pretraining + SEA)
        config.json              the resolved config, written at start (what export / probe rebuild from)
        tokenizer/               the LLM tokenizer as trained (``<image>`` added, chat template set)
        checkpoints/<step>/      Orbax checkpoints (:mod:`sea_jax.checkpoint`)
        metrics.jsonl            one JSON row per logged step
        tensorboard/             event files (tensorboardX: scalars, the probe picture, histograms)
        manifest.json            what produced the run: code version, libraries, devices, mesh, config, command
        log.txt                  every library's log lines (the terminal shows only what a person reads)
        profile/                 jax.profiler trace of log.profile_steps steps from log.profile_start, when set
        wandb/                   Weights & Biases' files, when log.wandb is on
        eval/                    in-loop evaluation outputs (eval.every > 0)
        word_table_cache/        the vision tower's embedding of the word list (on-the-fly labels)
      stage2/                    the run of stage 2, same layout; starts from stage1's adapter
      labels/                    offline labels (``python -m sea_jax.labels``) unless labels.output_dir says
      probe_truth.npz            true words of held-out patches, where known (the demo writes it)
      demo_assets/               the embedded demo's world and pretrained towers (configs/demo.py)

Everything that needs one of these paths asks :class:`RunDir` (or :func:`init_from_run`) for it.
A workdir may be local or ``gs://bucket/prefix`` (:mod:`sea_jax.storage`); the paths it gives are
of the same kind.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath

import ml_collections

from sea_jax import config as config_lib
from sea_jax import storage
from sea_jax.errors import PathError

STAGES = (1, 2)


def normalize(path: str) -> str:
    """``path`` without a trailing slash or ``.``/``..`` segments; ``gs://`` kept as it is
    (``os.path.normpath`` would turn ``gs://b`` into ``gs:/b``)."""
    if storage.is_remote(path):
        bucket_and_key = path[len("gs://"):].strip("/")
        return "gs://" + posixpath.normpath(bucket_and_key)
    return os.path.normpath(path)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The run folder of one stage of a workdir.

    Attributes:
      workdir: the top folder (both stages).
      stage: 1 or 2.
    """

    workdir: str
    stage: int

    @property
    def path(self) -> str:
        return storage.join(self.workdir, f"stage{int(self.stage)}")

    @property
    def config_json(self) -> str:
        return storage.join(self.path, "config.json")

    @property
    def tokenizer(self) -> str:
        return storage.join(self.path, "tokenizer")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.path, "checkpoints")

    @property
    def metrics_jsonl(self) -> str:
        return storage.join(self.path, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return storage.join(self.path, "tensorboard")

    @property
    def probe_truth(self) -> str:
        """``<workdir>/probe_truth.npz``: per-patch true words for ``python -m sea_jax.probe``."""
        return storage.join(self.workdir, "probe_truth.npz")

    def word_table_cache(self, config) -> str:
        """``labels.cache_dir``, or this run's ``word_table_cache/``."""
        return config.labels.cache_dir or storage.join(self.path, "word_table_cache")

    def exists(self) -> bool:
        """True when the run was started (its config was written)."""
        return storage.exists(self.config_json)

    def has_checkpoints(self) -> bool:
        d = self.checkpoints
        return storage.isdir(d) and any(n.isdigit() for n in storage.listdir(d))

    def has_tokenizer(self) -> bool:
        """True when the run saved its tokenizer (``<image>`` added, its chat template)."""
        return storage.isdir(self.tokenizer)

    def save_config(self, config: ml_collections.ConfigDict) -> None:
        storage.makedirs(self.path)
        storage.atomic_write(self.config_json, lambda f: f.write(config.to_json(indent=1)))

    def save_tokenizer(self, tokenizer) -> None:
        """Saves the LLM tokenizer as trained into the run folder (through a local folder for ``gs://``:
        ``save_pretrained`` writes local files)."""
        with storage.as_local(self.tokenizer, write=True) as local:
            tokenizer.save_pretrained(local)

    def load_config(self) -> ml_collections.ConfigDict:
        """The config the run was started with (on the current schema, :func:`sea_jax.config.from_json`)."""
        if not storage.exists(self.config_json):
            raise PathError(f"{self.config_json} missing: is {self.path!r} a sea_jax.train run folder?")
        return config_lib.from_json(storage.read_text(self.config_json), self.config_json)

    @classmethod
    def find(cls, path: str, stage: int | None = None) -> "RunDir":
        """The run folder named by ``path``: a workdir (its ``stage`` run, default the highest that
        has a config) or a run folder itself (``.../stage1``)."""
        path = normalize(path)
        base = posixpath.basename(path)
        if base.startswith("stage") and base[5:].isdigit() and storage.exists(storage.join(path, "config.json")):
            if stage is not None and int(base[5:]) != int(stage):
                raise PathError(f"{path!r} is the stage-{base[5:]} run, not stage {stage}")
            return cls(posixpath.dirname(path), int(base[5:]))
        if stage is not None:
            return cls(path, int(stage))
        for s in reversed(STAGES):
            if storage.exists(storage.join(path, f"stage{s}", "config.json")):
                return cls(path, s)
        raise PathError(f"{path!r} is not a sea_jax.train workdir (no stage1/ or stage2/ with a config.json)")


def init_from_run(config, workdir: str | None) -> RunDir | None:
    """The stage-1 run whose adapter (and tau) a stage-2 run starts from; None for stage 1.

    ``train.init_from`` may name a workdir (its ``stage1/``) or a stage-1 run folder; empty means
    ``<workdir>/stage1``.
    """
    if int(config.stage) != 2:
        return None
    src = config.train.init_from
    if not src:
        return RunDir(workdir, 1) if workdir else None
    src = normalize(src)
    if posixpath.basename(src) == "stage1" and not storage.isdir(storage.join(src, "stage1")):
        return RunDir(posixpath.dirname(src), 1)  # the run folder itself
    return RunDir(src, 1)


__all__ = ["RunDir", "init_from_run", "STAGES"]
