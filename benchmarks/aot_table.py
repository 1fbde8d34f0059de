"""Regenerates benchmarks/results/aot_table.md: AOT compiles of the real configs for TPU slices.

    python benchmarks/aot_table.py                 # every row (tens of minutes on a small CPU)
    python benchmarks/aot_table.py --only gemma2b  # rows whose label contains the string ('a|b': in order)
    python benchmarks/aot_table.py --render        # re-render the table from the saved JSON lines

Each row runs ``python -m sea_jax.aot --json`` in its own process (a compile of a real-size model
holds GBs; a fresh process returns them, and a timeout can kill it cleanly) and appends the JSON
report to ``benchmarks/results/aot_table.jsonl``; the Markdown table is rendered from that file,
the last result per row label winning, so an interrupted run keeps what it finished.

Each row compiles a shipped config file on a slice, plus at most the overrides that slice needs
(listed in the table): the question "does the committed config, launched as the README says, fit
this slice?".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSONL = RESULTS / "aot_table.jsonl"
TABLE = RESULTS / "aot_table.md"
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    config: str
    topology: str
    overrides: tuple[str, ...] = ()
    note: str = ""


def _rows() -> list[Row]:
    g1, g2 = "configs/gemma2b.py", "configs/gemma2b_finetune.py"
    v2, l2 = "configs/vicuna7b_finetune.py", "configs/llama3_8b_finetune.py"
    mb = lambda n: (f"--config.train.microbatches={n}",)  # noqa: E731
    # The Gemma configs ship tuned for v4-8 (FSDP over every chip, full remat, scanned SigLIP,
    # microbatches + chunked LM head). The same file runs on bigger slices as long as each
    # microbatch still splits over the chips; where it does not, the row names the one override.
    rows = [
        Row("gemma2b s1 v4-8", g1, "v4-8"),
        Row("gemma2b s1 v4-32", g1, "v4-32"),
        Row("gemma2b s1 v5e-16", g1, "v5e-16"),
        Row("gemma2b s2 v4-8", g2, "v4-8"),
        Row("gemma2b s2 v4-32", g2, "v4-32", mb(4)),
        Row("gemma2b s2 v5e-16", g2, "v5e-16", mb(8)),
        # The recipes' length buckets (data.length_buckets): what most steps run. Stage 1's first
        # bucket (729 image tokens + 71) holds nearly every LLaVA-Pretrain row; 1088 is a middle
        # stage-2 bucket. The 2048 rows above are the largest bucket, the memory verdict.
        Row("gemma2b s1 v4-8 @800", g1, "v4-8", ("--length=800",)),
        Row("gemma2b s2 v4-8 @1088", g2, "v4-8", ("--length=1088",)),
        # The 7-8B stage-2 configs ship for v4-32 (one step of 128) and fit v5p-16 as they are;
        # half a v4-32 needs accumulation and the chunked head.
        Row("vicuna7b s2 v4-32", v2, "v4-32"),
        Row("llama3_8b s2 v4-32", l2, "v4-32"),
        Row("llama3_8b s2 v5p-16", l2, "v5p-16"),
        Row("vicuna7b s2 v4-16", v2, "v4-16", mb(8) + ("--config.train.logits_chunk=512",)),
        Row("llama3_8b s2 v4-16", l2, "v4-16", mb(8) + ("--config.train.logits_chunk=512",)),
        # The paper's other rows (CLIP, S2, 13B) ship for a v4-32: FSDP over every chip, full remat,
        # a scanned tower, 8 microbatches (stage 2: and the chunked head).
        Row("clip_vicuna7b s1 v4-32", "configs/clip_vicuna7b.py", "v4-32"),
        Row("clip_vicuna7b s2 v4-32", "configs/clip_vicuna7b_finetune.py", "v4-32"),
        Row("s2_vicuna7b s1 v4-32", "configs/s2_vicuna7b.py", "v4-32"),
        Row("s2_vicuna7b s2 v4-32", "configs/s2_vicuna7b_finetune.py", "v4-32"),
        Row("vicuna13b s1 v4-32", "configs/vicuna13b.py", "v4-32"),
        Row("vicuna13b s2 v4-32", "configs/vicuna13b_finetune.py", "v4-32"),
        Row("clip_vicuna13b s1 v4-32", "configs/clip_vicuna13b.py", "v4-32"),
        Row("clip_vicuna13b s2 v4-32", "configs/clip_vicuna13b_finetune.py", "v4-32"),
    ]
    return rows


def run_row(row: Row, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "sea_jax.aot", f"--config={row.config}", f"--topology={row.topology}", "--json",
           *row.overrides]
    t0 = time.time()
    env = dict(os.environ, TPU_STDERR_LOG_LEVEL="3", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"compile did not finish in {timeout:.0f} s on this host"}
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode in (0, 1) and last.startswith("{"):
        out = json.loads(last)
        out["status"] = "ok"
    else:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "I0000", "E0000"))]
        out = {"status": f"error (rc {proc.returncode}): {' | '.join(tail[-3:])[:400]}"}
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def _fmt_gib(x) -> str:
    return f"{x / GIB:.1f}" if isinstance(x, (int, float)) else "-"


def _flops(r: dict) -> tuple[float, float]:
    """(compiled FLOPs with loops counted, XLA cost_analysis FLOPs) of a result; 0 = not known.

    Results written before loops were counted have no ``cost_analysis_flops``: their
    ``compiled_flops`` was cost_analysis' number."""
    if "cost_analysis_flops" in r:
        return float(r["compiled_flops"]), float(r["cost_analysis_flops"])
    return 0.0, float(r.get("compiled_flops") or 0.0)


def render(results: dict[str, dict], rows: list[Row]) -> str:
    lines = [
        "# AOT compile of the real configs for TPU slices",
        "",
        "Generated by `python benchmarks/aot_table.py` (each row: `python -m sea_jax.aot --json`, the TPU",
        "compiler of libtpu run on a CPU host against a described topology). Memory is per chip, in GiB,",
        "from `compiled.memory_analysis()`: args = parameters, optimizer state, SEA tables and batch",
        "shards; temp = activations and workspace; total = args + outputs - donated (aliased) + temp +",
        "code. When the compiler itself refuses the program (out of HBM), temp is its stated",
        "requirement and the row reads DOES NOT FIT. TFLOP per step, all chips: compiled = the matmul",
        "FLOPs of the compiled program with every loop trip counted (`sea_jax.aot.hlo_flops`: the",
        "LLM's layer scan, the microbatch loop, the chunked LM head and word scoring multiply their",
        "bodies); model = the analytic count (`sea_jax.metrics.train_step_flops`, no remat); compiled /",
        "model = the recompute factor (MFU x factor = hardware FLOP utilisation; a range where the",
        "step has a data-dependent branch: compiled TFLOP takes the larger). `cost_analysis` is",
        "XLA's own count, which takes each loop body once: not comparable with the model count.",
        "Rows without a compiled count were measured before loops were counted: re-run them.",
        "Sequence length 2048 (the largest bucket) unless the row says `--length`; `s1` = stage 1",
        "(adapter + tau, SEA on), `s2` = stage 2 (adapter + LLM). Compile seconds are on a shared",
        "2-core CPU host.",
        "",
        "| row | overrides | mesh (data, fsdp, tensor) | LLM remat | batch | microbatches x rows | LM head chunk "
        "| args | temp | total | HBM | verdict | compiled TFLOP | model TFLOP | compiled / model "
        "| cost_analysis TFLOP | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = results.get(row.label)
        over = " ".join(o.removeprefix("--config.") for o in row.overrides) or "-"
        if r is None or r.get("status") != "ok":
            why = "not compiled in this run" if r is None else f"not compiled: {r.get('status')}"
            lines.append(f"| {row.label} | {over} | | | | | | | | | | {why} | | | | | |")
            continue
        mesh, mbs = r["mesh"], int(r.get("microbatches", 1))
        compiled, xla = _flops(r)
        ratio = f"{compiled / r['model_flops']:.2f}" if compiled and r["model_flops"] else "-"
        low = r.get("compiled_flops_smallest_branches") or compiled
        if compiled and r["model_flops"] and low < compiled:  # a data-dependent branch: the range
            ratio = f"{low / r['model_flops']:.2f}-{ratio}"
        if compiled and r.get("unknown_loops"):
            ratio += f" (>=; {r['unknown_loops']} loop(s) of unknown length)"
        tf = lambda x: f"{x / 1e12:.0f}" if x else "-"  # noqa: E731
        lines.append(
            f"| {row.label} | {over} | {mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} | {r['llm_remat']} "
            f"| {r['batch_size']} | {mbs} x {r['batch_size'] // mbs} | {r.get('logits_chunk') or '-'} "
            f"| {_fmt_gib(r['argument_bytes'])} | {_fmt_gib(r['temp_bytes'])} "
            f"| {_fmt_gib(r['total_bytes'])} | {r['hbm_bytes'] / GIB:.0f} | {r['verdict']} | {tf(compiled)} "
            f"| {r['model_flops'] / 1e12:.0f} | {ratio} | {tf(xla)} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines) + "\n" + NOTES


# Conclusions drawn from the rows above (kept next to the code that produces them).
NOTES = """
## Reading the table

* Gemma-2B's 256k vocabulary makes the float32 logits (and their gradient) the largest activation:
  about 4 GiB per 2048-token sequence when whole. The Gemma configs therefore ship with
  `train.logits_chunk=512` (the LM head and its loss in rematerialised 512-token slices) and
  `train.microbatches` (exact gradient accumulation; SEA's L_a still spans the whole global
  batch), FSDP over every chip (the frozen fp32 LLM is sharded, not replicated) and full remat.
* One microbatch must still split over the batch-sharding chips: `configs/gemma2b.py` (4
  microbatches of 64) runs unchanged on 4 to 64 chips; `configs/gemma2b_finetune.py` (16 of 8,
  for v4-8) needs `--config.train.microbatches=4` on v4-32 and `=8` on v5e-16, as the rows show.
* What filled stage 1's HBM (v4-8, from the compiled program's memory-usage report, XLA's
  `--xla_dump_to`): at 29.9 of 32 GiB with 16 microbatches, the step scored every patch against
  the whole word list at once (64 images x 729 patches x ~40k words in float32 per chip, the
  reason the sequence length did not matter) and kept all 28 SigLIP hidden states (the scan's
  stacked outputs) to read one of them. Scoring 4096 words at a time with a running top-n took it
  to 15.3 GiB; carrying only the layer the adapter reads through the scan to 10.1 GiB. The recipe
  now runs 4 microbatches of 16 sequences per chip (15.5 GiB; 2 would need 25.1). Largest left:
  SigLIP's float32 attention scores for 64 images (2.2 GiB), the logits chunks (256 positions x
  256k vocabulary, float32, with their gradient) and the label chunk's scores and ids.
  Every row was compiled again after both changes (and after the word top-n moved to blocks and
  the LM head's fallback was rematerialised: +0.03 GiB at `@800`, otherwise within rounding).
  `python benchmarks/aot_table.py --only NAME` re-measures a row.
* Compiled / model FLOPs (`gemma2b s1 v4-8`, per chip, TFLOP): the LLM's layers compile to 1559
  against the formula's 1158 (1.35: full remat recomputes each layer's forward in the backward,
  all but the MLP down projection, whose output the backward does not need); the LM head to 412
  against 275 (every position at 2048 tokens, forward + activation gradient; the chunk's remat
  is a third pass the formula does not count); vision 44, word scoring 4.4, adapter 3.2 and the
  alignment loss 7.7 (not in the formula) are about as counted. Hence 1.37 for the step. At the
  recipe's first bucket (`@800`) the head runs on each row's 70 target slots instead.
* Vicuna-7B (32k vocabulary) and Llama-3-8B (128k) stage 2 fit v4-32 at batch 128 in one step
  with FSDP over the 16 chips and full remat, and half that slice (v4-16) with 8 microbatches and
  the chunked head.
* The paper's other rows ship for a v4-32 (FSDP over 16 chips, full remat, scanned tower, 8
  microbatches, stage 2 with the chunked head): SEA-LLaVA (CLIP ViT-L/14@336 + Vicuna-7B / 13B),
  S2 at 1008 px (the tower runs on 1 + 4 + 9 tiles per image: stage 1 holds 12.1 GiB of
  temporaries) and SigLIP + Vicuna-13B all fit; 13B stage 2 is the largest at 24.7 GiB.
"""


def load_results() -> dict[str, dict]:
    out = {}
    if JSONL.exists():
        for line in JSONL.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["label"]] = rec
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run only rows whose label contains this ('a|b': several, in order)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per compile")
    p.add_argument("--render", action="store_true", help="only re-render the table from the JSON lines")
    args = p.parse_args()
    rows = _rows()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.render:
        todo = rows
        if args.only:  # "a|b|c": rows matching a, then b, then c (priority order under a time budget)
            todo = [r for pat in args.only.split("|") for r in rows if pat in r.label]
            todo = list(dict.fromkeys(todo))
        for row in todo:
            print(f"[{time.strftime('%H:%M:%S')}] {row.label}: {row.config} on {row.topology} {' '.join(row.overrides)}",
                  flush=True)
            rec = run_row(row, args.timeout)
            rec.update(label=row.label, overrides=list(row.overrides))
            with JSONL.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            summary = rec.get("verdict", rec["status"])
            print(f"    -> {summary}, total {_fmt_gib(rec.get('total_bytes'))} GiB, {rec.get('wall_s')} s", flush=True)
            TABLE.write_text(render(load_results(), rows))
    TABLE.write_text(render(load_results(), rows))
    print(TABLE.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
