"""Data-pipeline startup per worker: a LLaVA JSON source vs its ArrayRecord conversion.

    python benchmarks/data_startup.py                      # 665k records, 2 workers, writes results/
    python benchmarks/data_startup.py --records 50000 --out /tmp/r.md

A synthetic JSON shaped like ``llava_v1_5_mix665k.json`` (665k records, ~4% text-only, 1-8 rounds
of human/gpt turns with web-like text, ~1 GB) is written once, then converted with
``python -m sea_jax.records`` (images not embedded: this measures the record side). Image records
point at 64 small JPEG files, so a first batch is real work but images do not dominate.

Two measurements per source, each in fresh processes (nothing shared or cached between them):

1. *One worker's startup*, isolated: a process that, as a Grain worker does, unpickles the
   pipeline's source (the JSON source travels as its path and count, the ArrayRecord one as its
   shard paths) and reads one record. Reported: seconds to that first record, resident memory
   added by it, and the process's peak resident memory (``VmHWM``).
2. *The trainer's startup*, end to end: ``pipeline.num_examples(config)`` then
   ``pipeline.make_train_iterator(...)`` and the first batch, with ``--workers`` Grain worker
   processes (``data.num_workers``), as ``sea_jax.train`` does. Reported: seconds to the first
   batch, and the resident memory (``VmRSS``, ``VmHWM``) of the main process and of each worker
   process right after it.

``--baseline=COMMIT`` also runs measurement 2 for the JSON with the pipeline as it was at COMMIT
(``git show COMMIT:sea_jax/data/pipeline.py``; 0034256 = before mixtures and ArrayRecord). That
pipeline kept a parsed copy in the main process and let every reader thread of a worker parse
the file: at 665k records it needs ~27 GB free (worker peaks of 11-13 GB), so it is off by default.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a of and to in is on with for this that image picture shows man woman dog cat person people "
         "standing sitting table street car red blue green white black large small two three left right what "
         "where how many color there are visible background front near next holding wearing shirt").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=665_000)
    p.add_argument("--workers", type=int, default=2, help="data.num_workers for the end-to-end startup")
    p.add_argument("--workdir", default="", help="where the data is written ('' = a temporary folder, removed)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "data_startup.md"))
    p.add_argument("--baseline", default="", help="also measure the JSON startup with this commit's pipeline")
    p.add_argument("--worker", choices=("isolated", "trainer"), help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=("llava_json", "array_record"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data


def write_dataset(folder: str, n: int) -> str:
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(os.path.join(folder, f"img/{i}.jpg"))
    words = np.asarray(WORDS)
    path = os.path.join(folder, "mix.json")
    text_only = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            rounds = int(rng.integers(1, 9))
            turns = []
            for r in range(rounds):
                q = " ".join(words[rng.integers(0, len(words), int(rng.integers(6, 24)))]) + "?"
                a = " ".join(words[rng.integers(0, len(words), int(rng.integers(8, 60)))]) + "."
                turns += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + q}, {"from": "gpt", "value": a}]
            if rng.random() > 0.04:  # mix665k: ~4% of the records are text-only
                rec = {"id": f"{i:09d}", "image": f"img/{i % 64}.jpg", "conversations": turns}
            else:
                turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
                rec = {"id": f"{i:09d}", "conversations": turns}
                text_only += 1
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")
    with open(os.path.join(folder, "text_only.json"), "w") as f:
        json.dump(text_only / n, f)
    return path


def tokenizer(folder: str):
    """A small trained byte-level BPE with <image> special, saved once and loaded by every worker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.path.join(folder, "tokenizer")
    if not os.path.exists(path):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        from sea_jax.data.llava import add_image_token

        add_image_token(fast)
        fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def config(folder: str, kind: str, workers: int):
    from sea_jax.config import base_config

    c = base_config()
    c.train.batch_size = 8
    c.data.kind = kind
    c.data.json = os.path.join(folder, "mix.json")
    c.data.records = os.path.join(folder, "records")
    c.data.image_root = folder
    c.data.max_length = 256
    c.data.num_workers = workers
    c.data.num_threads = 4
    c.data.prefetch = 1
    c.sea.label_source = "on_the_fly"
    return c


def proc_status(pid="self") -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


# ----------------------------------------------------------------------------------------------
# workers (subprocesses)


def isolated(folder: str, kind: str) -> dict:
    """What one Grain worker does first: unpickle the source, read one record."""
    from sea_jax.data import pipeline  # imports first, so that they are not counted below

    with open(os.path.join(folder, f"source_{kind}.pkl"), "rb") as f:
        blob = f.read()
    before = proc_status()
    t0 = time.perf_counter()
    src = pickle.loads(blob)
    src[0]
    seconds = time.perf_counter() - t0
    after = proc_status()
    assert len(src) > 0 and pipeline is not None
    return {"seconds": seconds, "rss_added_mib": after["VmRSS"] - before["VmRSS"], "peak_mib": after["VmHWM"],
            "rss_mib": after["VmRSS"]}


def trainer(folder: str, kind: str, workers: int, baseline: bool = False) -> dict:
    """``sea_jax.train``'s data startup: num_examples, the iterator, the first batch (with the
    baseline commit's pipeline module when ``baseline``)."""
    from absl import flags

    if baseline:
        import baseline_pipeline as pipeline  # written by main() from `git show`, on PYTHONPATH
    else:
        from sea_jax.data import pipeline

    flags.FLAGS.mark_as_parsed()  # Grain's worker pool reads its absl flags; a command line parses them
    tok = tokenizer(folder)
    c = config(folder, kind, workers)
    image_id = tok.convert_tokens_to_ids("<image>")
    t0 = time.perf_counter()
    n = pipeline.num_examples(c)
    t1 = time.perf_counter()
    it, _ = pipeline.make_train_iterator(c, tok, image_id, 16, 32, process_index=0, process_count=1)
    t2 = time.perf_counter()
    batch = next(it)
    t3 = time.perf_counter()
    assert batch["input_ids"].shape == (8, 256)
    me = os.getpid()
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if ppid == me and "multiprocessing" in cmd and "resource_tracker" not in cmd:
            kids.append(proc_status(name))
    out = {"records": n, "num_examples_s": t1 - t0, "iterator_s": t2 - t1, "first_batch_s": t3 - t2,
           "total_s": t3 - t0, "main": proc_status(), "workers": kids}
    it.close()
    return out


def run_worker(args, folder: str, kind: str, mode: str, baseline: bool = False) -> dict:
    cmd = [sys.executable, __file__, f"--worker={mode}", f"--kind={kind}", f"--workdir={folder}",
           f"--workers={args.workers}"] + ([f"--baseline={args.baseline}"] if baseline else [])
    path = os.pathsep.join([REPO] + ([os.path.join(folder, "baseline")] if baseline else []))
    env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode:
        raise RuntimeError(f"{mode} {kind} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# report


def report(args, r: dict) -> str:
    j, a = r["isolated"]["llava_json"], r["isolated"]["array_record"]
    tj, ta = r["trainer"]["llava_json"], r["trainer"]["array_record"]

    def workers(t, key):
        return ", ".join(f"{w[key]:.0f}" for w in t["workers"]) or "-"

    lines = [
        "# Data startup per worker: LLaVA JSON vs ArrayRecord (`python -m sea_jax.records`)", "",
        f"Command: `python benchmarks/data_startup.py --records {args.records} --workers {args.workers}"
        + (f" --baseline={r['baseline']['commit']}`" if "baseline" in r else "`"), "",
        f"Data: a synthetic mix665k-shaped JSON, {r['records']:,} records, {r['json_mib']:.0f} MiB "
        f"({r['text_only']:.1%} text-only, 1-8 rounds per record); converted in {r['convert_s']:.1f} s to "
        f"{r['shards']} ArrayRecord shards, {r['records_mib']:.0f} MiB (group_size 1, zstd).", "",
        "## One worker's startup (isolated: unpickle the source, read one record)", "",
        "| source | seconds to first record | resident memory added (MiB) | peak resident (MiB) |",
        "|---|---:|---:|---:|",
        f"| LLaVA JSON (before) | {j['seconds']:.2f} | {j['rss_added_mib']:.0f} | {j['peak_mib']:.0f} |",
        f"| ArrayRecord (after) | {a['seconds']:.4f} | {a['rss_added_mib']:.1f} | {a['peak_mib']:.0f} |", "",
        f"Per worker: {j['seconds'] / max(a['seconds'], 1e-9):,.0f}x faster to its first record, "
        f"{j['rss_added_mib'] / max(a['rss_added_mib'], 0.1):,.0f}x less memory added "
        f"({j['rss_added_mib']:.0f} MiB -> {a['rss_added_mib']:.1f} MiB). The peak includes the process's "
        "imports (numpy, grain, the sea_jax data modules), the same in both.", "",
        f"## The trainer's startup ({args.workers} Grain worker processes: num_examples, the iterator, the first batch)",
        "",
        "| source | num_examples (s) | iterator (s) | first batch (s) | total (s) | main RSS / peak (MiB) | "
        "worker RSS (MiB) | worker peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("LLaVA JSON, this pipeline (before)", tj), ("ArrayRecord (after)", ta)]
    if "baseline" in r:
        rows.insert(0, (f"LLaVA JSON, the pipeline of {r['baseline']['commit']} (before this change)", r["baseline"]))
    for name, t in rows:
        lines.append(f"| {name} | {t['num_examples_s']:.2f} | {t['iterator_s']:.2f} | {t['first_batch_s']:.2f} | "
                     f"{t['total_s']:.2f} | {t['main']['VmRSS']:.0f} / {t['main']['VmHWM']:.0f} | "
                     f"{workers(t, 'VmRSS')} | {workers(t, 'VmHWM')} |")
    lines += [
        "",
        "Notes:",
        "- The JSON source parses the file once in the main process (to count and validate it; the count is "
        "reused by the iterator and no copy is kept there when workers decode) and once in every worker "
        "process, which then holds all records as Python objects. An ArrayRecord worker reads `info.json` and "
        "one record per sample.",
        *([f"- `{r['baseline']['commit']}` row: the pipeline before this change (`--baseline`). It parsed the "
           "JSON twice in the main process and kept one copy there for the run, and its JSON source had no "
           "lock, so each of a worker's reader threads (`data.num_threads` = 4) parsed the file on its first "
           "read: hence the worker peaks and the minutes to the first batch."] if "baseline" in r else []),
        "- A worker's resident memory after the first batch includes its imports (transformers for the "
        "tokenizer, grain, numpy, PIL) and the first decoded images; the difference between the rows is the "
        "records.",
        "- Start-up of the worker processes themselves (spawn + imports) is in 'first batch' for every row.",
        "",
        "Conditions:",
        f"- {r['cpu']}; {platform.platform()}; python {platform.python_version()}, grain "
        f"{importlib.metadata.version('grain')}, array_record {importlib.metadata.version('array_record')}",
        f"- load average at start {r['load_start']}, at end {r['load_end']}: the 2 cores were shared with other "
        "processes during the run; the seconds are noisy, the memory is not.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "isolated":
        print(json.dumps(isolated(args.workdir, args.kind)))
        return 0
    if args.worker == "trainer":
        print(json.dumps(trainer(args.workdir, args.kind, args.workers, baseline=bool(args.baseline))))
        return 0
    sys.path.insert(0, REPO)
    from sea_jax.data import sources

    folder = args.workdir or tempfile.mkdtemp(prefix="sea_data_startup_")
    os.makedirs(folder, exist_ok=True)
    result = {"load_start": tuple(round(x, 2) for x in os.getloadavg())}
    try:
        path = os.path.join(folder, "mix.json")
        if not os.path.exists(path):
            t = time.time()
            write_dataset(folder, args.records)
            print(f"wrote {path} in {time.time() - t:.1f}s", file=sys.stderr)
        tokenizer(folder)
        # The conversion, as a user runs it (its own process: this one never holds the parsed JSON).
        t = time.time()
        p = subprocess.run([sys.executable, "-m", "sea_jax.records", f"--json={path}",
                            f"--out={os.path.join(folder, 'records')}", "--overwrite"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=REPO), timeout=3600)
        if p.returncode:
            raise RuntimeError(f"conversion failed:\n{p.stderr[-4000:]}")
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        result.update(convert_s=time.time() - t, shards=summary["shards"], records=summary["num_records"],
                      records_mib=summary["bytes"] / 2**20, json_mib=os.path.getsize(path) / 2**20)
        with open(os.path.join(folder, "text_only.json")) as f:
            result["text_only"] = json.load(f)
        # The sources exactly as the main process pickles them for its workers. The JSON source's
        # state is its path and record count (JsonSource.__getstate__); built from that state here
        # so that this process does not parse the JSON itself.
        json_src = sources.JsonSource.__new__(sources.JsonSource)
        json_src.__setstate__({"path": path, "_len": summary["num_records"], "_records": None})
        for kind, src in (("llava_json", json_src),
                          ("array_record", sources.ArrayRecordSource(os.path.join(folder, "records")))):
            with open(os.path.join(folder, f"source_{kind}.pkl"), "wb") as f:
                pickle.dump(src, f)
        result["isolated"] = {k: run_worker(args, folder, k, "isolated") for k in ("llava_json", "array_record")}
        print(json.dumps(result["isolated"]), file=sys.stderr)
        result["trainer"] = {k: run_worker(args, folder, k, "trainer") for k in ("llava_json", "array_record")}
        print(json.dumps(result["trainer"]), file=sys.stderr)
        if args.baseline:
            os.makedirs(os.path.join(folder, "baseline"), exist_ok=True)
            old = subprocess.run(["git", "show", f"{args.baseline}:sea_jax/data/pipeline.py"], cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout
            with open(os.path.join(folder, "baseline", "baseline_pipeline.py"), "w") as f:
                f.write(old)
            result["baseline"] = {"commit": args.baseline,
                                  **run_worker(args, folder, "llava_json", "trainer", baseline=True)}
            print(json.dumps(result["baseline"]), file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)
    result["load_end"] = tuple(round(x, 2) for x in os.getloadavg())
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    result["cpu"] = f"{model}, {os.cpu_count()} cores visible"
    md = report(args, result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
