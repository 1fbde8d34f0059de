"""Labelling throughput (images/s): sea_jax's jitted labeller vs HF PyTorch ``SiglipModel`` + ``torch.topk``.

Both sides get the same random SigLIP weights (a HF ``SiglipModel`` built from a config and saved;
sea_jax loads that folder with ``load_hf_siglip``), the same float32 pixels and the same normalised
word table, and compute the same thing per batch: the image tower, per-patch joint-space features
(each final-layer patch token alone through the MAP head), cosine similarity to every word, top-n,
and the ``score > 0`` mask; each returns host (numpy) arrays. The PyTorch side is plain eager
``transformers`` code (``model.vision_model`` + the head's modules + a matmul + ``torch.topk``) under
``torch.inference_mode``.

Each side runs in its own worker process: XLA's CPU thread pool and torch's OpenMP threads slow
each other down when they share a process (measured here: torch 0.27 s/batch before any JAX call,
0.5-0.7 s after), which would not be a fair comparison. Workers alternate (jax, torch, torch, jax,
...) for ``--rounds`` rounds, each doing ``--warmup`` untimed and ``--runs`` timed batches; the figure
is the median over all timed batches of a side. The first batch of each side is kept and compared
(share of identical top-n ids) before anything is reported.

    python benchmarks/labels_throughput.py                       # defaults below, writes results/
    python benchmarks/labels_throughput.py --batch 16 --words 10000 --out /tmp/r.md

Defaults: a B/16-like tower reduced in width and depth (224 px, patch 16 -> 196 patches, width 384,
6 heads, MLP 1536, 12 blocks: ViT-S/16 size), 40,000 words (the default list's size), n = 10,
batch 8, and sea_jax scoring the words 4096 at a time with a running top-n (``labels.chunk_size``,
the config's default).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--words", type=int, default=40_000)
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="sea_jax word-table chunking, as labels.chunk_size (default: the config's 4096; 0 = none)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per worker")
    p.add_argument("--runs", type=int, default=3, help="timed batches per worker")
    p.add_argument("--rounds", type=int, default=3, help="worker processes per side")
    p.add_argument("--allow-loaded", action="store_true", help="run (flagged) even if the machine is busy")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "labels_throughput.md"))
    p.add_argument("--worker", choices=("sea_jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Workers (one process each)


def torch_labeller(folder: str, table: np.ndarray, n: int):
    """PyTorch reference: the same program as sea_jax's labeller, in eager transformers code."""
    import torch
    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(folder).eval()
    vision = model.vision_model
    head = vision.head
    d = table.shape[1]
    w_v = head.attention.in_proj_weight[2 * d:]
    b_v = head.attention.in_proj_bias[2 * d:]
    table_t = torch.from_numpy(table)

    def run(pixels_nhwc: np.ndarray):
        with torch.inference_mode():
            pix = torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2)
            x = vision(pixel_values=pix).last_hidden_state  # [b, p, d] after post_layernorm
            # attention over a single token = out_proj(v_proj(x)); then the head's LN + MLP residual
            y = head.attention.out_proj(torch.nn.functional.linear(x, w_v, b_v))
            feats = torch.nn.functional.normalize(y + head.mlp(head.layernorm(y)), dim=-1)
            scores, ids = torch.topk(feats @ table_t.T, n, dim=-1)
            return ids.numpy(), scores.numpy(), (scores > 0).numpy()

    return run, {"torch_threads": torch.get_num_threads()}


def jax_labeller(folder: str, table: np.ndarray, n: int, chunk_size: int, pixels: np.ndarray):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # "on the same CPU": keep JAX off any accelerator
    import jax

    from sea_jax import sharding
    from sea_jax.align import semantic_labels as labels
    from sea_jax.aot.hlo_flops import matmul_shapes
    from sea_jax.convert import hf_siglip

    cfg, params = hf_siglip.load_hf_siglip(folder)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    fn = labels.make_labeller(cfg, params, table, mesh, n=n, feature="joint", word_axes="tensor",
                              chunk_size=chunk_size or None)

    def run(pixels_nhwc: np.ndarray):
        ids, scores, valid = fn(pixels_nhwc)
        return np.asarray(ids), np.asarray(scores), np.asarray(valid)

    # The program's own matmuls, for timing them kernel by kernel (machine.kernel_times).
    matmuls = matmul_shapes(fn.lower(pixels).compile().as_text())
    return run, {"jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()), "matmuls": matmuls}


def worker(args) -> None:
    """Times one side; writes <dir>/<side>-<pid>.json (and the first batch's labels once)."""
    pixels = np.load(os.path.join(args.dir, "pixels.npy"))
    table = np.load(os.path.join(args.dir, "table.npy"))
    folder = os.path.join(args.dir, "hf")
    if args.worker == "torch":
        run, info = torch_labeller(folder, table, args.top_n)
    else:
        run, info = jax_labeller(folder, table, args.top_n, args.chunk_size, pixels)
    t = time.perf_counter()
    ids, scores, valid = run(pixels)
    first_call = time.perf_counter() - t
    out = os.path.join(args.dir, f"{args.worker}-labels.npz")
    if not os.path.exists(out):
        np.savez(out, ids=ids, scores=scores, valid=valid)
    for _ in range(args.warmup):
        run(pixels)
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        run(pixels)
        times.append(time.perf_counter() - t)
    with open(os.path.join(args.dir, f"{args.worker}-{os.getpid()}.json"), "w") as f:
        json.dump({"times": times, "first_call_s": first_call, **info}, f)


# ----------------------------------------------------------------------------------------------
# Driver


def build_checkpoint(args, folder: str) -> int:
    """Saves a random HF SiglipModel of the benchmark's size; returns its patch count."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = dict(hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.depth,
                  num_attention_heads=args.heads, image_size=args.image_size, patch_size=args.patch)
    text = dict(hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=1,
                num_attention_heads=args.heads, vocab_size=1000, max_position_embeddings=16,
                pad_token_id=1, bos_token_id=2, eos_token_id=3)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    with torch.no_grad():  # HF zero-inits biases: perturb so the comparison is meaningful
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    model.save_pretrained(folder)
    return (args.image_size // args.patch) ** 2


def _conditions():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": importlib.metadata.version("jax"),
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "loadavg_start": os.getloadavg(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import machine

    quiet = machine.check_quiet(args.allow_loaded)
    cond = _conditions()
    rate = machine.matmul_rate()
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    table = rng.normal(size=(args.words, args.width)).astype(np.float32)
    table /= np.linalg.norm(table, axis=-1, keepdims=True)

    with tempfile.TemporaryDirectory() as tmp:
        patches = build_checkpoint(args, os.path.join(tmp, "hf"))
        np.save(os.path.join(tmp, "pixels.npy"), pixels)
        np.save(os.path.join(tmp, "table.npy"), table)
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                       if k not in ("out", "worker", "dir", "allow_loaded")]
        order = []
        for r in range(args.rounds):  # alternate who goes first, so drifting load hits both alike
            order += ["sea_jax", "torch"] if r % 2 == 0 else ["torch", "sea_jax"]
        for side in order:
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--worker", side, "--dir", tmp]
            print(f"worker {side} ...", flush=True)
            subprocess.run(cmd, check=True)
        results = {"sea_jax": [], "torch": []}
        for name in sorted(os.listdir(tmp)):
            if name.endswith(".json"):
                with open(os.path.join(tmp, name)) as f:
                    results[name.split("-")[0]].append(json.load(f))
        got = np.load(os.path.join(tmp, "sea_jax-labels.npz"))
        want = np.load(os.path.join(tmp, "torch-labels.npz"))
        same_ids = float(np.mean(got["ids"] == want["ids"]))
        max_score_diff = float(np.max(np.abs(got["scores"] - want["scores"])))

    cond["loadavg_end"] = os.getloadavg()
    kernels = machine.kernel_times(results["sea_jax"][0].pop("matmuls"))
    for w in results["sea_jax"][1:]:
        w.pop("matmuls")
    times = {k: [t for w in v for t in w["times"]] for k, v in results.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch / v for k, v in med.items()}
    result = {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "dir")},
        "conditions": cond,
        "worker_info": {k: {kk: vv for kk, vv in v[0].items() if kk != "times"} for k, v in results.items()},
        "first_call_s": {k: [w["first_call_s"] for w in v] for k, v in results.items()},
        "agreement_identical_ids": same_ids, "max_abs_score_diff": max_score_diff,
        "seconds_per_batch": times, "median_s": med, "images_per_s": ips,
        "speedup_sea_jax_over_torch": ips["sea_jax"] / ips["torch"], "patches": patches,
        "flops_per_batch": labelling_flops(args, patches), "matmul_rate_gflops": rate, "kernels": kernels, **quiet,
    }
    result["fraction_of_matmul_rate"] = {k: result["flops_per_batch"] / v / (rate["machine"] * 1e9) for k, v in med.items()}
    print(json.dumps(result, indent=1))
    if args.out:
        write_report(args, result, argv)
    return result


def labelling_flops(args, patches: int) -> float:
    """Matmul FLOPs of one batch, by hand: the patch embedding, each block's projections, MLP and
    attention (QK^T, AV), every patch alone through the MAP head (value, out, MLP), and the scores
    against the word table. The probe's pooled output and the norms are left out (tiny)."""
    p, w, m = patches, args.width, args.mlp
    embed = 2 * p * 3 * args.patch**2 * w
    block = 2 * p * (4 * w * w + 2 * w * m) + 4 * p * p * w
    head = 2 * p * (2 * w * w + 2 * w * m)
    scores = 2 * p * args.words * w
    return float(args.batch * (embed + args.depth * block + head + scores))


def write_report(args, r, argv):
    import machine  # benchmarks/ is on sys.path (main)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    c = r["conditions"]
    cmd = "python benchmarks/labels_throughput.py" + "".join(f" {a}" for a in (argv or []))
    lines = [
        "# Labelling throughput: sea_jax vs HF PyTorch SiglipModel + torch.topk",
        "",
        f"Command: `{cmd}`",
        "",
        "| | images/s | median s/batch | timed batches (s) | analytic FLOPs / time, share of the matmul rate |",
        "|---|---:|---:|---|---:|",
    ]
    for k in ("sea_jax", "torch"):
        runs = ", ".join(f"{t:.2f}" for t in r["seconds_per_batch"][k])
        lines.append(f"| {k} | {r['images_per_s'][k]:.2f} | {r['median_s'][k]:.3f} | {runs} | "
                     f"{r['fraction_of_matmul_rate'][k]:.0%} |")
    first = {k: ", ".join(f"{t:.1f}" for t in v) for k, v in r["first_call_s"].items()}
    lines += [
        "",
        f"**sea_jax / torch throughput ratio: {r['speedup_sea_jax_over_torch']:.2f}x**",
        "",
        "Workload per batch (both sides): SigLIP image tower "
        f"({args.image_size} px, patch {args.patch} -> {r['patches']} patches, width {args.width}, "
        f"depth {args.depth}, {args.heads} heads, MLP {args.mlp}), per-patch MAP-head features, cosine "
        f"against {args.words} words (sea_jax: {'at most ' + str(args.chunk_size) if args.chunk_size else 'all'} at a time with a running top-n), "
        f"top-{args.top_n}, `> 0` mask; batch {args.batch}; float32; "
        f"results copied to host numpy. {r['flops_per_batch'] / 1e9:.1f} GFLOP per batch by hand (`labelling_flops`).",
        f"Machine matmul rate, measured in this run (1024^2 float32, best of 20): jax "
        f"{r['matmul_rate_gflops']['jax']:.0f} GFLOP/s, torch {r['matmul_rate_gflops']['torch']:.0f} GFLOP/s; the faster "
        "is the rate in the table.",
        "",
        *machine.kernel_report(r["kernels"], r["median_s"]["sea_jax"], "The labeller", r["median_s"]["torch"],
                               r["matmul_rate_gflops"]["machine"]),
        "",
        f"Labels agree: {100 * r['agreement_identical_ids']:.2f}% identical ids, max |score diff| "
        f"{r['max_abs_score_diff']:.1e}.",
        f"Timing: {args.rounds} worker processes per side, alternating; each {args.warmup} warm-up + "
        f"{args.runs} timed batches; median over all timed batches. First call per worker, excluded "
        f"(sea_jax includes trace + compile): sea_jax {first['sea_jax']} s, torch {first['torch']} s.",
        "",
        "Conditions:",
        f"- CPU: {c['cpu']}, {c['cores_visible']} cores visible; {c['platform']}",
        f"- jax {c['jax']} ({r['worker_info']['sea_jax'].get('jax_backend')} backend), torch {c['torch']} "
        f"({r['worker_info']['torch'].get('torch_threads')} threads), transformers {c['transformers']}, "
        f"python {c['python']}",
        f"- {machine.describe(r)}, at end "
        f"{tuple(round(x, 2) for x in c['loadavg_end'])} (the benchmark itself keeps about one core "
        "busy; a start well above 1 means other jobs shared the machine); the alternating-median ratio "
        "is the figure to read.",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(r, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
