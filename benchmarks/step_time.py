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


def torch_worker(folder: str, steps: int) -> list[float]:
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
    return times


# ----------------------------------------------------------------------------------------------
# sea_jax


def jax_worker(folder: str, steps: int, lam: float) -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from sea_jax.align import loss as loss_lib
    from sea_jax.convert import hf_llava
    from sea_jax.models.mllm import MLLM
    from sea_jax.train_step import StepConfig, init_state, make_optimizer, make_train_step, split_params

    cfg = hf_llava.config_from_llava(hf_llava.read_llava_config(folder), dtype=jnp.float32)
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
    return times


def run_worker(kind: str, folder: str, steps: int) -> list[float]:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--folder", folder, "--steps", str(steps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_time.md"))
    ap.add_argument("--worker", default="")
    ap.add_argument("--folder", default="")
    args = ap.parse_args()
    if args.worker:
        fn = {"torch": lambda: torch_worker(args.folder, args.steps),
              "jax": lambda: jax_worker(args.folder, args.steps, 1.0),
              "jax_lam0": lambda: jax_worker(args.folder, args.steps, 0.0)}[args.worker]
        print(json.dumps(fn()))
        return
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                        f"import step_time; step_time.build_checkpoint({folder!r})"], check=True)
        times = {"torch": [], "jax": [], "jax_lam0": []}
        for _ in range(args.rounds):
            for kind in times:
                times[kind] += run_worker(kind, folder, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# Stage-1 SEA step time on this CPU",
        "",
        f"`python benchmarks/step_time.py --steps {args.steps} --rounds {args.rounds}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (ratios are what to read).",
        "",
        f"Model: SigLIP {VISION['num_hidden_layers']}x{VISION['hidden_size']} at {VISION['image_size']} px / {VISION['patch_size']} "
        f"({(VISION['image_size'] // VISION['patch_size']) ** 2} patches), Gemma-style LLM {TEXT['num_hidden_layers']}x{TEXT['hidden_size']}, "
        f"vocab {TEXT['vocab_size']}, batch {BATCH}, {N_WORDS} words, top-{TOP_N}, k={WINDOW}, float32.",
        "",
        "| step | median s/step | runs |",
        "|---|---|---|",
        f"| PyTorch reference (HF Llava + SEA in torch, eager) | {med['torch']:.3f} | {len(times['torch'])} |",
        f"| sea_jax, lambda = 1, on-the-fly labels | {med['jax']:.3f} | {len(times['jax'])} |",
        f"| sea_jax, lambda = 0 (plain LLaVA) | {med['jax_lam0']:.3f} | {len(times['jax_lam0'])} |",
        "",
        f"- sea_jax speed-up over the PyTorch reference: **{med['torch'] / med['jax']:.2f}x**",
        f"- SEA overhead (lambda = 1 over lambda = 0): **{med['jax'] / med['jax_lam0']:.2f}x**",
        f"- load average (1/5/15 min) at start {tuple(round(x, 2) for x in load_start)}, at end "
        f"{tuple(round(x, 2) for x in os.getloadavg())} (the benchmark itself keeps one to two cores busy; "
        "a start well above 1 means other jobs shared the machine); the alternating medians' ratios are the "
        "figures to read.",
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"times": times, "median": med}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
