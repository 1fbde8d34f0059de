"""The whole demo in one call: SEA and lambda = 0 stage 1, stage 2 of each, and the report.

``python -m sea_jax.train --config=configs/demo.py --workdir=DIR`` lands in :func:`run_demo` (the
config's ``runner``; ``configs/demo.py:stage1`` and ``:stage2`` land in :func:`run_stage`):

1. :func:`sea_jax.demo.prepare` builds (or finds) the world and the pretrained towers once, in
   ``DIR/demo_assets`` (or ``demo.assets``, shared by several workdirs, e.g. seeds).
2. Stage 1 twice through the ordinary trainer (:func:`sea_jax.train.train`), each arm's config
   filled by :func:`sea_jax.demo.prepare`: SEA with the
   config's lambda in ``DIR/stage1``, and, with ``demo.compare``, the same run with lambda = 0
   (plain LLaVA pretraining) in ``DIR/baseline/stage1``. Same seed, data order, steps and
   learning rate: lambda is the only difference.
3. With ``demo.stage2_steps > 0``, a short stage 2 (adapter + LLM on the question/answer
   conversations, :func:`stage2_config`) from each arm's stage-1 adapter.
4. The report (:mod:`sea_jax.demo.report`, :mod:`sea_jax.probe`) on the held-out images: alignment
   accuracy of the stage-1 visual tokens, held-out caption loss, exact-match QA after stage 2, a
   few answered questions; printed as a table and written to ``DIR/demo_report.{md,json}``, the
   Figure-1 picture to ``DIR/probe.png``.

Every step resumes: a finished stage is skipped by the trainer (its checkpoint is at the last
step), so running the command again only redoes the report.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import logging


def stage2_config(config, num_steps: int | None = None):
    """Stage 2 of the demo from a stage-1 demo config: LLaVA-1.5 style instruction tuning of
    adapter + LLM on the world's question/answer conversations, from the same workdir's
    ``stage1/`` adapter (``train.init_from`` unless set), LM loss only."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.stage = 2
        c.data.template = "chat"
        c.data.pad_to_square = True  # the images are square: a no-op, kept for the recipe
        c.data.max_length = 160  # chat headers + 64 image tokens + up to 3 turns
        c.data.json = ""  # prepare points it at the conversations
        c.train.trainable = ("adapter", "llm")
        c.sea.lam = 0.0
        c.optim.lr = 1e-3
        if num_steps is not None:
            c.train.num_steps = int(num_steps)
    return c


def _arm(config, lam: float, assets: str):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.runner = ""
        c.sea.lam = float(lam)
        c.demo.assets = assets
    return c


def run_stage(config, workdir: str) -> dict[str, Any]:
    """One stage of the demo (``configs/demo.py:stage1`` / ``:stage2``): the assets, then the trainer."""
    from sea_jax.demo.prepare import prepare
    from sea_jax.train import train

    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.runner = ""
    return train(prepare(c, workdir), workdir)


def _questions(config, assets: str) -> list[tuple[str, str, str, str]]:
    """(image path, question, answer, image name) of every turn of every held-out image's
    conversation, each asked on its own as a first turn."""
    from sea_jax.demo import assets as assets_lib
    from sea_jax.demo import world as world_lib
    from sea_jax.demo.prepare import world_config  # (the package's ``prepare`` is the function)

    paths = assets_lib.Assets.at(os.path.join(assets, "world"))
    wcfg = world_config(config)
    with open(paths.eval_json, encoding="utf-8") as f:
        names = [r["image"] for r in json.load(f)]
    out = []
    for name in names:
        index = int(os.path.splitext(name)[0])
        for q, a in world_lib.sample(wcfg, int(config.demo.seed), index).conversation:
            out.append((os.path.join(paths.image_root, name), q, a, name))
    return out


def run_demo(config, workdir: str) -> dict[str, Any]:
    """Runs the demo (see the module docstring); returns the report dict also written as JSON."""
    import jax

    from sea_jax import probe
    from sea_jax.align.recall import PatchTruth
    from sea_jax.demo import report
    from sea_jax.demo.prepare import assets_dir, prepare
    from sea_jax.train import train

    d = config.demo
    assets = assets_dir(workdir, config)
    prepared = prepare(config, workdir)  # once, before the arms share it
    arms: dict[str, tuple[str, float]] = {"SEA": (workdir, float(config.sea.lam))}
    if bool(d.compare):
        arms["baseline"] = (os.path.join(workdir, "baseline"), 0.0)
    stage2 = int(d.stage2_steps)
    for name, (wd, lam) in arms.items():
        c1 = _arm(config, lam, assets)
        logging.info("demo: %s arm, stage 1 (lambda=%g) in %s", name, lam, wd)
        train(prepare(c1, wd), wd)
        if stage2 > 0:
            logging.info("demo: %s arm, stage 2 in %s", name, wd)
            c2 = stage2_config(c1, stage2)
            train(prepare(c2, wd), wd)
    if jax.process_index() != 0:
        return {}

    # --- report on the held-out images ----------------------------------------------------------
    eval_json = os.path.join(assets, "world", "eval.json")
    image_root = prepared.data.image_root
    base = arms.get("baseline", (None,))[0]
    truth = PatchTruth.load(os.path.join(workdir, "probe_truth.npz"))
    summary = probe.run_probe(workdir, base, stage=1, out=os.path.join(workdir, "probe.png"),
                              num_images=int(d.num_eval), plot_images=int(d.plot_images), truth=truth)
    metrics: dict[str, dict[str, Any]] = {"SEA": dict(summary["run"])}
    if base:
        metrics["baseline"] = dict(summary["baseline"])
    questions = _questions(config, assets) if stage2 > 0 else []
    qa = [(p, q, a) for p, q, a, _ in questions]
    for name, (wd, _) in arms.items():
        metrics[name].update(report.heldout_caption_loss(wd, eval_json, image_root, stage=1))
        if qa:
            ans = report.answer_questions(wd, qa, stage=2)
            metrics[name]["qa_accuracy"] = ans["accuracy"]
            metrics[name]["answers"] = ans["answers"]
    examples = []
    for k in range(min(int(d.show_questions), len(questions))):
        _, q, a, img = questions[k]
        examples.append({"image": img, "question": q, "truth": a,
                         **{n: metrics[n]["answers"][k] for n in arms}})
    table = report.format_table(metrics, examples)
    out = {"arms": {n: {k: v for k, v in m.items() if k != "answers"} for n, m in metrics.items()},
           "examples": examples, "png": summary["png"], "table": table,
           "num_questions": len(questions)}
    report.write_json(os.path.join(workdir, "demo_report.json"), out)
    with open(os.path.join(workdir, "demo_report.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table, flush=True)
    print(f"\nFigure-1 picture: {summary['png']}", flush=True)
    return out


__all__ = ["run_demo", "run_stage", "stage2_config"]
