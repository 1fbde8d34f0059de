"""Useful-token fraction and CPU step time per useful token, without and with length buckets.

    python benchmarks/length_buckets.py [--quick] [--out benchmarks/results/length_buckets.md]

Rows are padded to ``data.max_length`` (2048) unless ``data.length_buckets`` is set; with it each
global batch is padded to the smallest bucket holding its longest row, and with
``data.group_batches`` rows of similar length share a batch (``sea_jax.data.buckets``, the very
functions the pipeline and the trainer call: ``group_window``, ``bucket_for``).

**Length distributions (synthetic).** LLaVA's JSON files cannot be downloaded here, so the rows'
lengths are drawn from distributions built on published figures plus stated assumptions:

* stage 1, LLaVA-Pretrain ``blip_laion_cc_sbu_558k`` (558,128 samples, LLaVA's data card): one
  image (729 tokens: SigLIP So400m/14 at 384 px, the gemma2b recipe) + BOS + a BLIP caption +
  EOS with the plain template. Caption length: BLIP captions are one short sentence; we draw
  tokens from a log-normal with median 12 and sigma 0.4, clipped to 4..64 (assumption).
* stage 2, ``llava_v1_5_mix665k`` (665k; component counts from the LLaVA-1.5 paper's data
  table): LLaVA-Instruct 158k, ShareGPT 40k (text only), VQAv2 83k, GQA 72k, OKVQA 9k, OCR-VQA
  80k, A-OKVQA 66k, TextCaps 22k, RefCOCO 48k, VG 86k. LLaVA-1.5 merges every question of one
  image into one conversation, so the VQA-style components are multi-turn with short answers.
  Turns and tokens per component are our assumptions (``MIX665K`` below); the image is 729
  tokens, a chat template costs 8 tokens per turn plus a 40-token system prompt, rows are cut at
  2048 (ShareGPT's long conversations are).

The fractions depend on these assumptions; the method (and code) is what real data gets. On a
real file, the row lengths come from the pipeline itself and the same comparison applies.

**CPU step time per useful token.** The SEA step of ``benchmarks/step_time.py``'s model (SigLIP
6 x 192 on 256 patches, a 4-layer width-256 Gemma-shaped LLM, on-the-fly labels, lambda = 1,
batch 8) is timed at every sequence length the plans use, scaled by 1/2 (2048 -> 1024, so 256
image tokens fit under every row); the time per useful token of a plan is the sum of its
batches' step times over their real tokens. The ratio before/after is the speed-up a run sees.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU probing when libtpu is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sea_jax import recipes  # noqa: E402
from sea_jax.data import buckets  # noqa: E402

MAX_LEN = 2048
IMAGE = 729

# (samples, has image, turns (lo, hi) uniform, question tokens median, answer tokens median)
MIX665K = {
    "llava_instruct": (158_000, True, (1, 5), 18, 90),
    "sharegpt": (40_000, False, (1, 8), 60, 260),
    "vqav2": (83_000, True, (2, 8), 12, 2),
    "gqa": (72_000, True, (3, 12), 14, 2),
    "okvqa": (9_000, True, (1, 3), 12, 3),
    "ocrvqa": (80_000, True, (3, 8), 12, 5),
    "aokvqa": (66_000, True, (1, 3), 40, 2),  # multiple-choice prompt with options
    "textcaps": (22_000, True, (1, 1), 12, 16),
    "refcoco": (48_000, True, (2, 10), 20, 20),  # region <-> box coordinates
    "vg": (86_000, True, (2, 10), 20, 18),
}
SYSTEM, PER_TURN = 40, 8


def lengths_558k(rng: np.random.Generator, n: int = 558_128) -> np.ndarray:
    cap = np.clip(np.rint(rng.lognormal(np.log(12), 0.4, n)), 4, 64)
    return (1 + IMAGE + cap + 1).astype(np.int64)


def lengths_665k(rng: np.random.Generator) -> np.ndarray:
    out = []
    for n, image, (lo, hi), q, a in MIX665K.values():
        turns = rng.integers(lo, hi + 1, n)
        toks = np.zeros(n)
        for t in range(hi):
            on = turns > t
            qs = np.rint(rng.lognormal(np.log(q), 0.5, n))
            ans = np.rint(rng.lognormal(np.log(max(a, 1)), 0.6, n))
            toks += on * (2 * PER_TURN + qs + ans)
        out.append(np.minimum(SYSTEM + toks + (IMAGE if image else 0), MAX_LEN))
    x = np.concatenate(out).astype(np.int64)
    return x[rng.permutation(len(x))]


def plan(lengths: np.ndarray, batch: int, bucket_set: tuple[int, ...], group: int, seed: int = 0):
    """[(computed length, real tokens)] per global batch of one epoch: the pipeline's grouping
    (windows of ``group`` batches; 0 = off) then the trainer's bucket choice."""
    out = []
    n = (len(lengths) // batch) * batch
    k = max(group, 1)
    for w, start in enumerate(range(0, n - k * batch + 1, k * batch)):
        window = lengths[start:start + k * batch]
        order = buckets.group_window(window.tolist(), k, seed, w) if group > 1 else \
            [list(range(j * batch, (j + 1) * batch)) for j in range(k)]
        for rows in order:
            ls = window[rows]
            out.append((buckets.bucket_for(bucket_set, int(ls.max())), int(ls.sum())))
    return out


def fraction(p, batch: int) -> float:
    return sum(r for _, r in p) / (batch * sum(length for length, _ in p))


# ----------------------------------------------------------------------------------------------
# CPU timing of the SEA step at each length


def time_lengths(lengths: list[int], steps: int) -> dict[int, float]:
    import jax
    import jax.numpy as jnp

    from benchmarks import step_time as st
    from sea_jax.align import loss as loss_lib
    from sea_jax.convert import hf_llava
    from sea_jax.models.mllm import MLLM
    from sea_jax.train_step import StepConfig, init_state, make_optimizer, make_train_step, split_params

    folder = tempfile.mkdtemp(prefix="sea_len_")
    st.build_checkpoint(folder)
    cfg = hf_llava.config_from_llava(hf_llava.read_llava_config(folder), dtype=jnp.float32)
    params = jax.tree.map(jnp.asarray, hf_llava.load_llava_params(cfg, folder))
    d = np.load(os.path.join(folder, "bench.npz"))
    params["log_tau"] = jnp.zeros((), jnp.float32)
    scfg = StepConfig(lam=1.0, window=st.WINDOW, top_n=st.TOP_N, label_source="on_the_fly")
    trainable, frozen = split_params(params, scfg.trainable)
    frozen = dict(frozen, word_table=jnp.asarray(d["word_table"]),
                  label_table=loss_lib.label_embedding_table(params["llm"]["embedder"]["embedding"], d["word_ids"],
                                                             d["word_mask"]))
    tx, sched = make_optimizer(1e-3, total_steps=1000, clip_norm=None)
    step = make_train_step(MLLM(cfg), scfg, tx, sched, donate=False)
    state = init_state(trainable, tx)
    p = cfg.num_image_tokens
    rng = np.random.default_rng(0)
    out = {}
    for length in sorted(set(lengths)):
        ids = np.concatenate([np.full((st.BATCH, 1), 2), np.full((st.BATCH, p), st.IMAGE_TOKEN),
                              rng.integers(3, 8000, size=(st.BATCH, length - 1 - p))], axis=1).astype(np.int32)
        mask = np.zeros(ids.shape, bool)
        mask[:, 1 + p:] = True
        batch = jax.tree.map(jnp.asarray, {"images": d["images"], "input_ids": ids, "attention_mask": np.ones_like(ids),
                                           "loss_mask": mask, "has_image": np.ones((st.BATCH,), bool)})
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            _, m = step(state, frozen, batch)
            jax.block_until_ready(m["loss"])
            if i:
                times.append(time.perf_counter() - t0)
        out[length] = float(np.median(times))
        print(f"  length {length}: {out[length]:.3f} s/step", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "length_buckets.md"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fractions only, no CPU timing")
    ap.add_argument("--allow-loaded", action="store_true", help="time (flagged) even if the machine is busy")
    args = ap.parse_args()
    quiet = None
    if not args.quick:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import machine

        quiet = machine.check_quiet(args.allow_loaded)
    rng = np.random.default_rng(0)
    cases = {
        # name: (lengths, global batch, the recipes' buckets and group_batches, sea_jax.recipes)
        "stage 1 (558k-like)": (lengths_558k(rng), 256, buckets.parse_buckets(recipes.stage1_buckets(IMAGE), MAX_LEN),
                                recipes.STAGE1_GROUP_BATCHES),
        "stage 2 (665k-like)": (lengths_665k(rng), 128, buckets.parse_buckets(recipes.STAGE2_BUCKETS, MAX_LEN),
                                recipes.STAGE2_GROUP_BATCHES),
    }
    rows, results = [], {}
    for name, (ls, batch, bset, group) in cases.items():
        k = group or 32  # the recipe's grouping, or what grouping would add to a recipe without it
        variants = {"pad to 2048": plan(ls, batch, (MAX_LEN,), 0),
                    "buckets" + (" (the recipe)" if not group else ""): plan(ls, batch, bset, 0),
                    f"buckets + group_batches={k}" + (" (the recipe)" if group else ""): plan(ls, batch, bset, k)}
        results[name] = {"mean_length": float(ls.mean()), "p50": float(np.median(ls)), "p95": float(np.percentile(ls, 95)),
                         "buckets": list(bset), "group_batches": group, "batch": batch,
                         "useful_fraction": {k: fraction(v, batch) for k, v in variants.items()},
                         "_plans": variants}
        print(f"{name}: mean {ls.mean():.0f}, " + ", ".join(f"{k}: {fraction(v, batch):.3f}" for k, v in variants.items()))
    timing = None
    if not args.quick:
        scale = 0.5
        need = {int(round(length * scale)) for r in results.values() for p in r["_plans"].values() for length, _ in p}
        load = os.getloadavg()[0]
        print(f"timing {len(need)} lengths (load average {load:.2f})", flush=True)
        per_len = time_lengths(sorted(need), args.steps)
        timing = {"scale": scale, "step_time_s": per_len, "load_average_before": load,
                  "load_average_after": os.getloadavg()[0], **quiet}
        for r in results.values():
            # a plan's batch of B rows costs B / 8 timed steps (batch 8) at its scaled length
            rows = r["batch"] / 8
            r["cpu_s_per_1k_useful_tokens"] = {
                k: 1000 * rows * sum(per_len[int(round(length * scale))] for length, _ in p) /
                (scale * sum(real for _, real in p)) for k, p in r["_plans"].items()}
    for r in results.values():
        del r["_plans"]
    write(args.out, results, timing)


def write(out: str, results: dict, timing: dict | None) -> None:
    lines = ["# Length buckets: useful-token fraction and CPU time per useful token", "",
             "`python benchmarks/length_buckets.py` (synthetic length distributions: see the script's docstring "
             "for the published figures and the assumptions). Machine: " + platform.machine() + f", {os.cpu_count()} "
             "CPUs.", ""]
    for name, r in results.items():
        lines += [f"## {name}", "",
                  f"Row length: mean {r['mean_length']:.0f}, median {r['p50']:.0f}, 95th percentile {r['p95']:.0f} "
                  f"tokens. Buckets: {', '.join(map(str, r['buckets']))}.", "",
                  "| batches | useful-token fraction |" + (" CPU s per 1k useful tokens | speed-up |" if timing else ""),
                  "|---|---|" + ("---|---|" if timing else "")]
        base = None
        for k, f in r["useful_fraction"].items():
            row = f"| {k} | {f:.3f} |"
            if timing:
                t = r["cpu_s_per_1k_useful_tokens"][k]
                base = base or t
                row += f" {t:.3f} | {base / t:.2f}x |"
            lines.append(row)
        lines.append("")
    if timing:
        lines += ["CPU step time (the SEA step of benchmarks/step_time.py's model, batch 8) per sequence length, "
                  f"lengths scaled by {timing['scale']}: " + ", ".join(f"{k}: {v:.2f} s" for k, v in
                                                                       sorted(timing['step_time_s'].items())) + ".",
                  f"Load average {timing['load_average_before']:.2f} before, {timing['load_average_after']:.2f} after"
                  + ("." if timing.get("quiet", True) else " **LOADED: not a figure to quote**."),
                  ""]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"results": results, "timing": timing}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
