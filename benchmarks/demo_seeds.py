"""The demo over several training seeds: SEA vs lambda = 0, mean and spread of every number.

    python benchmarks/demo_seeds.py                       # seeds 0 1 2, the shipped configs/demo.py
    python benchmarks/demo_seeds.py --seeds 0 1 --workdir /tmp/seeds -- --config.train.num_steps=100

Each seed is one ``python -m sea_jax.train --config=configs/demo.py`` run (both arms, stage 2, the
report) in ``<workdir>/seed<k>`` with ``--config.seed=k``; all seeds share one world and one pair
of pretrained towers (``--config.demo.assets=<workdir>/assets``), so the seed changes what the
runs themselves draw: adapter initialisation, data order and SEA's label sampling. Arguments after
``--`` go to every run. Writes ``benchmarks/results/demo_seeds.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

KEYS = (
    ("label_accuracy", "alignment accuracy vs SigLIP labels", True),
    ("truth_accuracy", "alignment accuracy vs true words", True),
    ("truth_accuracy_objects", "  on object patches", True),
    ("truth_accuracy_background", "  on background patches", True),
    ("siglip_label_truth_accuracy", "SigLIP labels vs true words (the teacher)", True),
    ("caption_loss", "held-out caption loss (nats/token)", False),
    ("qa_accuracy", "held-out QA exact match", True),
)


def _stat(values: list[float], pct: bool) -> str:
    scale = 100.0 if pct else 1.0
    vals = [v * scale for v in values]
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    fmt = "{:.1f}" if pct else "{:.3f}"
    return f"{fmt.format(mean)} ± {fmt.format(sd)}" + ("%" if pct else "") + \
        " (" + ", ".join(fmt.format(v) for v in vals) + ")"


def render(per_seed: dict[int, dict], extra: list[str], seconds: dict[int, float]) -> str:
    seeds = sorted(per_seed)
    lines = [
        "# The demo over seeds: SEA vs lambda = 0",
        "",
        f"`python benchmarks/demo_seeds.py --seeds {' '.join(map(str, seeds))}"
        + (" -- " + " ".join(extra) if extra else "") + "` on this repository's 2-core CPU host.",
        "Each seed: both arms of stage 1 (same data order, steps and learning rate; lambda is the only",
        "difference), stage 2 of each, and the report on the held-out images (`configs/demo.py`).",
        "Mean ± sample standard deviation over seeds, then the per-seed values.",
        "",
        "| | SEA | baseline (lambda = 0) |",
        "|---|---|---|",
    ]
    for key, label, pct in KEYS:
        row = [label]
        for arm in ("SEA", "baseline"):
            vals = [per_seed[s]["arms"][arm].get(key) for s in seeds]
            row.append(_stat([float(v) for v in vals], pct) if all(v is not None for v in vals) else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Wall time per seed (both arms, stage 2, report; the shared assets built by the first): "
              + ", ".join(f"seed {s}: {seconds[s]:.0f} s" for s in seeds if s in seconds), ""]
    ex = per_seed[seeds[0]].get("examples") or []
    if ex:
        lines += [f"Answered questions (seed {seeds[0]}):", "", "| question | truth | SEA | baseline |",
                  "|---|---|---|---|"]
        lines += [f"| {e['image']}: {e['question']} | {e['truth']} | {e.get('SEA', '-')} | {e.get('baseline', '-')} |"
                  for e in ex]
    return "\n".join(lines) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default="/tmp/sea_demo_seeds")
    p.add_argument("--out", default=str(RESULTS / "demo_seeds"), help="results path without extension")
    args = p.parse_args(argv)
    per_seed, seconds = {}, {}
    for s in args.seeds:
        wd = os.path.join(args.workdir, f"seed{s}")
        cmd = [sys.executable, "-m", "sea_jax.train", "--config=configs/demo.py", f"--workdir={wd}",
               f"--config.seed={s}", f"--config.demo.assets={os.path.join(args.workdir, 'assets')}",
               "--config.train.progress=False", *extra]
        print(f"[{time.strftime('%H:%M:%S')}] seed {s}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=str(ROOT))
        seconds[s] = time.time() - t0
        with open(os.path.join(wd, "demo_report.json"), encoding="utf-8") as f:
            per_seed[s] = json.load(f)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"seeds": per_seed, "seconds": seconds, "extra_args": extra}, f, indent=1)
    text = render(per_seed, extra, seconds)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
