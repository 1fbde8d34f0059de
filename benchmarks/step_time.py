"""Stage-1 SEA step time: sea_jax vs a PyTorch reference, and the SEA overhead.

    python benchmarks/step_time.py [--steps 7] [--out benchmarks/results/step_time.md]

Both sides run the same stage-1 step on the same weights and batch: frozen SigLIP tower with
on-the-fly labels (each patch alone through the MAP head, top-n words), the adapter, the frozen
LLM with the LM loss, k x k window sampling, the global keep-one-per-label dedup, the symmetric
InfoNCE with learnable temperature, backward to the adapter and tau, and an AdamW update.

* PyTorch: HF ``LlavaForConditionalGeneration`` (SigLIP + Gemma) with the SEA loss written in
  plain torch (eager, float32), frozen parts with ``requires_grad=False``.
* sea_jax: ``make_train_step`` (jit, float32), one device.

Each side runs in its own process (a JAX runtime in the same process slows torch's CPU kernels),
the two alternating several times; we report the median step time after warm-up and the ratio.
The SEA overhead is sea_jax's step with lambda = 1 (on-the-fly labels) over lambda = 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# A small but not trivial model: So400m's shape divided down, Gemma-2B's shape divided down.
VISION = dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=6,
              num_attention_heads=6, image_size=128, patch_size=8)  # 16 x 16 = 256 patches, 64 windows
TEXT = dict(model_type="gemma", vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=64)
IMAGE_TOKEN = 8191
BATCH, TEXT_LEN, N_WORDS, TOP_N, WINDOW = 8, 32, 4000, 10, 2


def build_checkpoint(folder: str) -> None:
    """Random HF Llava + a batch + word tables, written once and read by both workers."""
    import numpy as np
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                      vision_feature_select_strategy="full", projector_hidden_act="gelu",
                      image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    rng = np.random.default_rng(0)
    p = cfg.image_seq_length
    ids = np.concatenate([np.full((BATCH, 1), 2), np.full((BATCH, p), IMAGE_TOKEN),
                          rng.integers(3, 8000, size=(BATCH, TEXT_LEN))], axis=1).astype(np.int32)
    loss_mask = np.zeros(ids.shape, bool)
    loss_mask[:, 1 + p:] = True
    w_len = rng.integers(1, 4, size=N_WORDS)
    w_ids = rng.integers(3, 8000, size=(N_WORDS, 3)).astype(np.int32)
    w_mask = np.arange(3)[None] < w_len[:, None]
    np.savez(os.path.join(folder, "bench.npz"),
             images=rng.uniform(-1, 1, size=(BATCH, VISION["image_size"], VISION["image_size"], 3)).astype(np.float32),
             input_ids=ids, loss_mask=loss_mask, word_table=rng.normal(size=(N_WORDS, VISION["hidden_size"])).astype(np.float32),
             word_ids=np.where(w_mask, w_ids, 0), word_mask=w_mask)


# ----------------------------------------------------------------------------------------------
# PyTorch reference


def torch_worker(folder: str, steps: int) -> dict:
    import numpy as np
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    log_tau = torch.zeros((), requires_grad=True)
    opt = torch.optim.AdamW(list(proj.parameters()) + [log_tau], lr=1e-3, weight_decay=0.0)
    d = np.load(os.path.join(folder, "bench.npz"))
    pix = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(d["input_ids"]).long()
    labels = torch.where(torch.from_numpy(d["loss_mask"]), ids, torch.full_like(ids, -100))
    word_table = torch.nn.functional.normalize(torch.from_numpy(d["word_table"]), dim=-1)
    emb = model.model.language_model.embed_tokens.weight
    w_ids, w_mask = torch.from_numpy(d["word_ids"]).long(), torch.from_numpy(d["word_mask"]).float()
    label_table = (emb[w_ids] * w_mask[..., None]).sum(1) / w_mask.sum(1, keepdim=True)  # Eq. 8, once
    grid = VISION["image_size"] // VISION["patch_size"]
    # windows: [n_windows, k*k] patch indices
    win = torch.arange(grid * grid).reshape(grid // WINDOW, WINDOW, grid // WINDOW, WINDOW).permute(0, 2, 1, 3).reshape(-1, WINDOW * WINDOW)
    vt = model.model.vision_tower

    def step(gen):
        out = vt(pix, output_hidden_states=True)
        feats = out.hidden_states[-2]
        # Eq. 4-6: each patch alone through the MAP head, cosine to every word, top-n, drop <= 0.
        b, p, dim = out.last_hidden_state.shape
        per_patch = vt.head(out.last_hidden_state.reshape(b * p, 1, dim)).reshape(b, p, -1)
        sims = torch.nn.functional.normalize(per_patch, dim=-1) @ word_table.T
        scores, words = torch.topk(sims, TOP_N, dim=-1)
        valid = scores > 0
        # Eq. 7 + localized strategy: per window a uniform labelled patch, then a label ~ S_i.
        wv = valid[:, win].any(-1)  # [b, nw, k*k]
        pri = torch.rand(wv.shape, generator=gen).masked_fill(~wv, -1.0)
        slot = pri.argmax(-1)
        patch = win[torch.arange(win.shape[0])[None], slot]  # [b, nw]
        has = wv.any(-1)
        bi = torch.arange(b)[:, None].expand_as(patch)
        s = scores[bi, patch].clamp(min=0) * valid[bi, patch]
        s = torch.where(has[..., None], s, torch.ones_like(s))
        pick = torch.multinomial(s.reshape(-1, TOP_N), 1, generator=gen).reshape(b, -1)
        label = words[bi, patch].gather(-1, pick[..., None])[..., 0]
        # Global dedup: one random pair per label.
        cand = torch.nonzero(has.reshape(-1))[:, 0]
        perm = cand[torch.randperm(cand.numel(), generator=gen)]
        lab = label.reshape(-1)[perm]
        order = torch.argsort(lab, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = lab[order][1:] != lab[order][:-1]
        keep = perm[order][first]
        tokens = model.model.multi_modal_projector(feats)  # [b, p, d]
        x = tokens.reshape(-1, p, tokens.shape[-1])[keep // patch.shape[1], patch.reshape(-1)[keep]]
        t = label_table[label.reshape(-1)[keep]]
        # Eq. 9
        tau = torch.clamp(log_tau.exp(), min=0.01)
        logits = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T / tau
        tgt = torch.arange(logits.shape[0])
        l_a = 0.5 * (torch.nn.functional.cross_entropy(logits, tgt) + torch.nn.functional.cross_entropy(logits.T, tgt))
        # L_lm with the visual tokens merged (HF computes the image features again in forward;
        # pass inputs_embeds instead so the tower runs once, as in sea_jax).
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], tokens.reshape(-1, tokens.shape[-1]))
        l_lm = model(inputs_embeds=embeds, labels=labels).loss
        loss = l_lm + 1.0 * l_a
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step(gen)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"times": times}


# ----------------------------------------------------------------------------------------------
# sea_jax


def jax_worker(folder: str, steps: int, lam: float, scan_layers: bool = True, parts: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from sea_jax.align import loss as loss_lib
    from sea_jax.convert import hf_llava
    from sea_jax.models.mllm import MLLM
    from sea_jax.train_step import StepConfig, init_state, make_optimizer, make_train_step, split_params

    from sea_jax import metrics
    from sea_jax.aot.hlo_flops import matmul_shapes
    from sea_jax.models.mllm import head_capacity

    cfg = hf_llava.config_from_llava(hf_llava.read_llava_config(folder), dtype=jnp.float32, scan_layers=scan_layers)
    params = jax.tree.map(jnp.asarray, hf_llava.load_llava_params(cfg, folder))
    model = MLLM(cfg)
    d = np.load(os.path.join(folder, "bench.npz"))
    params["log_tau"] = jnp.zeros((), jnp.float32)
    scfg = StepConfig(lam=lam, window=WINDOW, top_n=TOP_N, label_source="on_the_fly")
    trainable, frozen = split_params(params, scfg.trainable)
    frozen = dict(frozen, word_table=jnp.asarray(d["word_table"]),
                  label_table=loss_lib.label_embedding_table(params["llm"]["embedder"]["embedding"], d["word_ids"], d["word_mask"]))
    tx, sched = make_optimizer(1e-3, total_steps=1000, clip_norm=None)
    state = init_state(trainable, tx)
    batch = {"images": d["images"], "input_ids": d["input_ids"], "attention_mask": np.ones_like(d["input_ids"]),
             "loss_mask": d["loss_mask"], "has_image": np.ones((BATCH,), bool)}
    batch = jax.tree.map(jnp.asarray, batch)
    step = make_train_step(model, scfg, tx, sched)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    # The step's analytic FLOPs (sea_jax.metrics, what the trainer's MFU uses): the same useful
    # work on both sides, so one figure serves both.
    seq = d["input_ids"].shape[1]
    spec = metrics.FlopSpec(
        batch=BATCH, seq_len=seq, llm_matmul_params=metrics.llm_matmul_params(params["llm"], cfg.llm.vocab_size, cfg.llm.hidden),
        llm_layers=cfg.llm.n_layers, llm_heads=cfg.llm.n_heads, llm_head_dim=cfg.llm.head_dim,
        vision_params=metrics.count_params(params["vision"]), vision_layers=cfg.vision.depth, vision_width=cfg.vision.width,
        patches=cfg.num_image_tokens, adapter_params=metrics.count_params(params["adapter"]),
        label_words=N_WORDS if lam else 0, label_dim=cfg.vision.width if lam else 0,
        head_params=cfg.llm.vocab_size * cfg.llm.hidden, head_positions=head_capacity(cfg, seq))
    flops = metrics.train_step_flops(spec)
    out = {"times": times, "flops": flops["total"]}
    if parts:
        out["parts"] = time_parts(model, params, frozen, batch, flops, steps)
        step = make_train_step(model, scfg, tx, sched, donate=False)
        out["ops"] = op_profile(step, (state, frozen, batch))
        # The step's own matmuls, for timing them kernel by kernel (machine.kernel_times). Every
        # row holds an image, so the LM head runs on the target slots: the conditional's smaller
        # branch, not its every-position fallback.
        out["matmuls"] = matmul_shapes(step.lower(state, frozen, batch).compile().as_text(), branches="smallest")
    return out


def time_parts(model, params, frozen, batch, flops, reps) -> dict:
    """The step's pieces jitted alone: median seconds and analytic FLOPs of each (where the
    step's time goes; the remainder is the alignment loss, window sampling, AdamW and glue)."""
    import jax
    import numpy as np

    from sea_jax.align import semantic_labels as labels_lib
    from sea_jax.models.mllm import head_capacity, lm_loss_sum

    def median_time(fn, *args):
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    encode = jax.jit(model.encode_images)
    image = encode(params["vision"], batch["images"])
    top = jax.jit(lambda pe: labels_lib.top_labels(pe, frozen["word_table"], TOP_N, False))
    ids = batch["input_ids"]
    cap = head_capacity(model.cfg, ids.shape[1])

    def lm(adapter, feats):
        prm = dict(params, adapter=adapter)
        fwd = model.forward_features(prm, feats, ids, batch["attention_mask"], compute_logits=False)
        total, count = lm_loss_sum(model, prm["llm"], fwd.hidden, ids, batch["loss_mask"], capacity=cap)
        return total / count

    parts = {
        "vision tower + per-patch MAP head, forward": (median_time(encode, params["vision"], batch["images"]), flops["vision"]),
        "word scores + top-n": (median_time(top, image.patch_embeds), flops["labels"]),
        "adapter + LLM, forward only": (median_time(jax.jit(lm), params["adapter"], image.features),
                                        (flops["adapter"] + flops["llm"]) / 2),  # forward = 2N of 4N
        "adapter + LLM, forward and backward (L_lm)": (median_time(jax.jit(jax.grad(lm)), params["adapter"], image.features),
                                                       flops["adapter"] + flops["llm"]),
    }
    return parts


def op_profile(step, args, reps: int = 3) -> dict:
    """Where the XLA CPU runtime's threads spend a step: ``jax.profiler`` events of the compiled
    program's ops (one event per executed HLO op, on XLA's worker threads), in ms per step summed
    over the threads, by kind: matmuls (XLA hands dots to YNNPACK as ``ynn_fusion``s), the
    layer scan's stacked residual buffers (zero-fill, copies, dynamic (update-)slices), and the
    rest (softmax and other elementwise ops, reductions, transposes)."""
    import collections
    import glob
    import re
    import jax

    hlo = step.lower(*args).compile().as_text()
    op_names = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if m:
            on = re.search(r'op_name="([^"]*)"', line)
            op_names[m.group(1)] = on.group(1) if on else ""
    jax.block_until_ready(step(*args))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(reps):
                jax.block_until_ready(step(*args))
        wall = (time.perf_counter() - t0) / reps
        from jax.profiler import ProfileData

        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    kinds = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA's worker threads; the rest is the host side
                continue
            for ev in line.events:
                name = ev.name
                if name not in op_names or name.startswith("while"):
                    continue  # runtime bookkeeping and loop ops (their bodies' ops are events)
                on = op_names[name]
                if name.startswith("ynn_fusion") or "dot_general" in on and "fusion" not in name:
                    kind = "matmuls (YNNPACK)"
                elif ("dynamic_update_slice" in on or "dynamic_slice" in on or name.startswith(("copy.", "wrapped_broadcast"))):
                    kind = "scan residual buffers (zero-fill, copies, dynamic slices)"
                else:
                    kind = "other ops (softmax, elementwise, reductions, transposes)"
                kinds[kind] += ev.duration_ns / 1e6 / reps
    return {"wall_ms": wall * 1e3, "thread_ms": dict(kinds)}


def run_worker(kind: str, folder: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--folder", folder, "--steps", str(steps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


KINDS = {
    "torch": "PyTorch reference (HF Llava + SEA in torch, eager)",
    "jax": "sea_jax, lambda = 1, on-the-fly labels",
    "jax_lam0": "sea_jax, lambda = 0 (plain LLaVA)",
    "jax_unrolled": "sea_jax, lambda = 1, LLM layers unrolled (`llm.scan_layers=False`)",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_time.md"))
    ap.add_argument("--allow-loaded", action="store_true", help="run (flagged) even if the machine is busy")
    ap.add_argument("--render", action="store_true", help="rebuild the report from its json, run nothing")
    ap.add_argument("--worker", default="")
    ap.add_argument("--folder", default="")
    args = ap.parse_args()
    if args.worker:
        fn = {"torch": lambda: torch_worker(args.folder, args.steps),
              "jax": lambda: jax_worker(args.folder, args.steps, 1.0),
              "jax_lam0": lambda: jax_worker(args.folder, args.steps, 0.0),
              "jax_unrolled": lambda: jax_worker(args.folder, args.steps, 1.0, scan_layers=False),
              "jax_parts": lambda: jax_worker(args.folder, args.steps, 1.0, parts=True)}[args.worker]
        print(json.dumps(fn()))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import machine

    if args.render:
        with open(os.path.splitext(args.out)[0] + ".json") as f:
            return write_report(json.load(f), args.out)
    quiet = machine.check_quiet(args.allow_loaded)
    rate = machine.matmul_rate()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                        f"import step_time; step_time.build_checkpoint({folder!r})"], check=True)
        times = {k: [] for k in KINDS}
        flops = {}
        for _ in range(args.rounds):
            for kind in times:
                out = run_worker(kind, folder, args.steps)
                times[kind] += out["times"]
                flops[kind] = out.get("flops")
        profiled = run_worker("jax_parts", folder, args.steps)
        parts, ops = profiled["parts"], profiled["ops"]
    kernels = machine.kernel_times(profiled["matmuls"])
    med = {k: statistics.median(v) for k, v in times.items()}
    useful = flops["jax"]  # lambda = 1: the work both the reference and sea_jax's SEA step do
    frac = {k: (useful if k != "jax_lam0" else flops["jax_lam0"]) / med[k] / (rate["machine"] * 1e9) for k in KINDS}
    result = {"steps": args.steps, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "times": times, "median": med, "flops": flops, "parts": parts, "ops": ops,
              "matmul_rate_gflops": rate, "fraction_of_matmul_rate": frac, "kernels": kernels, **quiet,
              "loadavg_end": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_report(result, args.out)


def write_report(r: dict, out: str) -> None:
    """The markdown report of a result (``--render`` rebuilds it from the committed json)."""
    import machine

    med, flops, rate, parts, ops, frac = r["median"], r["flops"], r["matmul_rate_gflops"], r["parts"], r["ops"], \
        r["fraction_of_matmul_rate"]
    busy = sum(ops["thread_ms"].values())
    matmul_ms = ops["thread_ms"].get("matmuls (YNNPACK)", 0.0)
    lines = [
        "# Stage-1 SEA step time on this CPU",
        "",
        f"`python benchmarks/step_time.py --steps {r['steps']} --rounds {r['rounds']}` on {r['machine']}, "
        f"{r['cores']} cores (ratios are what to read).",
        "",
        f"Model: SigLIP {VISION['num_hidden_layers']}x{VISION['hidden_size']} at {VISION['image_size']} px / {VISION['patch_size']} "
        f"({(VISION['image_size'] // VISION['patch_size']) ** 2} patches), Gemma-style LLM {TEXT['num_hidden_layers']}x{TEXT['hidden_size']}, "
        f"vocab {TEXT['vocab_size']}, batch {BATCH}, {N_WORDS} words, top-{TOP_N}, k={WINDOW}, float32.",
        "",
        f"Machine matmul rate, measured in this run (1024^2 float32, best of 20): jax {rate['jax']:.0f} GFLOP/s, "
        f"torch {rate['torch']:.0f} GFLOP/s; the faster, {rate['machine']:.0f} GFLOP/s, is the machine's rate below. "
        f"Analytic FLOPs of the step (`sea_jax.metrics.train_step_flops`, what the trainer's MFU uses; the LM head on "
        f"the caption positions only): {flops['jax'] / 1e9:.1f} GFLOP (lambda = 1), {flops['jax_lam0'] / 1e9:.1f} GFLOP (lambda = 0).",
        "",
        "| step | median s/step | runs | analytic FLOPs / time, share of the matmul rate |",
        "|---|---|---|---|",
        *[f"| {KINDS[k]} | {med[k]:.3f} | {len(r['times'][k])} | {frac[k]:.0%} |" for k in KINDS],
        "",
        f"- sea_jax speed-up over the PyTorch reference: **{med['torch'] / med['jax']:.2f}x** "
        f"({med['torch'] / med['jax_unrolled']:.2f}x with the LLM's layers unrolled)",
        f"- SEA overhead (lambda = 1 over lambda = 0): **{med['jax'] / med['jax_lam0']:.2f}x**",
        "",
        "Where sea_jax's step time goes (each piece jitted alone, median of the same number of runs, one worker; "
        "FLOPs analytic, as above):",
        "",
        "| piece | s | GFLOP | GFLOP/s | share of the matmul rate |",
        "|---|---|---|---|---|",
        *[f"| {name} | {t:.3f} | {f / 1e9:.1f} | {f / t / 1e9:.0f} | {f / t / (rate['machine'] * 1e9):.0%} |"
          for name, (t, f) in parts.items()],
        "",
        *(machine.kernel_report(r["kernels"], med["jax"], "The step (lambda = 1)", machine_rate=rate["machine"]) + [""]
          if "kernels" in r else []),
        f"The whole step under `jax.profiler` (lambda = 1, {ops['wall_ms']:.0f} ms per step while profiled: the "
        "profiler's own cost inflates the wall time): XLA's worker-thread time per step by kind of op, summed over "
        f"the threads (2 threads x wall time = {2 * ops['wall_ms']:.0f} ms available):",
        "",
        "| ops | thread ms per step | share of the busy time |",
        "|---|---|---|",
        *[f"| {k} | {v:.0f} | {v / busy:.0%} |" for k, v in sorted(ops["thread_ms"].items(), key=lambda kv: -kv[1])],
        "",
        f"- XLA's threads ran ops {busy / (2 * ops['wall_ms']):.0%} of the profiled step and sat idle the rest. "
        "Matmuls are "
        f"{matmul_ms / busy:.0%} of the busy time; at the machine's rate the step's {flops['jax'] / 1e9:.1f} GFLOP "
        f"would take {flops['jax'] / (rate['machine'] * 1e9) * 2e3:.0f} thread-ms, so the matmuls themselves "
        f"ran at about {flops['jax'] / (rate['machine'] * 1e9) * 2e3 / matmul_ms:.0%} of it while profiled. The "
        "rest of the distance to the rate is the idle threads and the non-matmul ops (the scan's residual buffers "
        "among them): work of XLA's CPU runtime and of the scan's lowering, not FLOPs the step could drop.",
        f"- {machine.describe(r)}, at end {tuple(round(x, 2) for x in r['loadavg_end'])} (the benchmark itself "
        "keeps one to two cores busy); the alternating medians' ratios are the figures to read.",
        "",
    ]
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
