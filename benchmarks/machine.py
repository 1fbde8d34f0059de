"""What a CPU benchmark measures about the machine itself: its matmul rate, and whether it is quiet.

* :func:`matmul_rate`: GFLOP/s of a float32 square matmul, jitted JAX and eager torch, each in
  its own process (their thread pools slow each other down in one process), best of several;
  the machine's rate is the faster of the two. A benchmark prints its analytic FLOPs / time as
  a fraction of it, measured in the same run.
* :func:`check_quiet`: the 1-minute load average at the start. Timings taken while other jobs
  share the 2 cores are not comparable with anything; a benchmark refuses to run above
  :data:`QUIET_LOAD` unless told ``--allow-loaded``, and then flags its result.
* :func:`kernel_times`: a program's own matmuls (``sea_jax.aot.hlo_flops.matmul_shapes`` of its
  compiled HLO), each timed alone as a jitted JAX matmul and as an eager torch matmul, each side
  in its own process: what XLA's CPU matmul kernels and torch's need for exactly that program's
  matmul work. Their ratio is the speed-up over torch that the kernels alone allow; the program's
  time over its XLA matmul time is how close it gets to its own kernels.

    python benchmarks/machine.py            # prints both rates
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

QUIET_LOAD = 1.5


def _rate(kind: str, n: int, reps: int) -> float:
    return 2 * n**3 / _best_times(kind, [(1, n, n, n)], reps)[0] / 1e9


def matmul_rate(n: int = 1024, reps: int = 20) -> dict[str, float]:
    """{"jax": GFLOP/s, "torch": GFLOP/s, "machine": the larger}: an n x n float32 matmul, best of
    ``reps``, each framework in a fresh process."""
    out = {}
    for kind in ("jax", "torch"):
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--rate", kind, str(n), str(reps)],
                             check=True, capture_output=True, text=True)
        out[kind] = float(res.stdout.strip().splitlines()[-1])
    out["machine"] = max(out["jax"], out["torch"])
    return out


def _best_times(kind: str, shapes: list[tuple[int, int, int, int]], reps: int) -> list[float]:
    """Best-of-``reps`` seconds of each ``[batch, m, k] @ [batch, k, n]`` float32 matmul in
    ``kind``'s framework ("jax": jitted, "torch": eager)."""
    if kind == "jax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp

        f = jax.jit(lambda x, y: x @ y)
        make = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
        call = lambda a, b: f(a, b).block_until_ready()  # noqa: E731
    else:
        import torch

        make = lambda *s: torch.ones(s, dtype=torch.float32)  # noqa: E731
        call = lambda a, b: a @ b  # noqa: E731
    out = []
    for batch, m, k, n in shapes:
        a, b = make(batch, m, k), make(batch, k, n)
        for _ in range(3):
            call(a, b)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            call(a, b)
            best = min(best, time.perf_counter() - t)
        out.append(best)
    return out


def _kernel_times(kind: str, path: str, reps: int) -> list[float]:
    with open(path) as f:
        return _best_times(kind, [(d["batch"], d["m"], d["k"], d["n"]) for d in json.load(f)], reps)


def kernel_times(shapes: list[dict], reps: int = 10) -> dict:
    """The matmuls ``shapes`` (``matmul_shapes`` dicts: batch, m, k, n, runs), each timed alone
    in JAX and in torch (float32, each framework in its own process).

    Returns {"jax_s", "torch_s"}: seconds for all of them, each shape's best time times its
    ``runs``; "torch_over_jax": the speed-up over torch that the two frameworks' matmul kernels
    allow on this program's matmuls; "gflops": their total; "shapes": each shape with its two times.
    """
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(shapes, f)
    try:
        per = {}
        for kind in ("jax", "torch"):
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--kernels", kind, f.name, str(reps)],
                                 check=True, capture_output=True, text=True)
            per[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)
    rows = [dict(d, jax_s=tj, torch_s=tt) for d, tj, tt in zip(shapes, per["jax"], per["torch"])]
    jax_s = sum(r["jax_s"] * r["runs"] for r in rows)
    torch_s = sum(r["torch_s"] * r["runs"] for r in rows)
    return {"jax_s": jax_s, "torch_s": torch_s, "torch_over_jax": torch_s / jax_s,
            "gflops": sum(r["flops"] for r in rows) / 1e9, "shapes": rows}


def kernel_report(k: dict, program_s: float, what: str, torch_program_s: float | None = None,
                  machine_rate: float | None = None, top: int = 6) -> list[str]:
    """Markdown lines for a :func:`kernel_times` result next to the program's measured time (and
    the torch program's, when it does the same matmul work; and the machine's matmul rate in
    GFLOP/s, to state the ceiling XLA's kernels put on analytic FLOPs / time)."""
    lines = [
        f"{what}'s own matmuls ({len(k['shapes'])} shapes from its compiled HLO, {k['gflops']:.1f} GFLOP), each timed "
        "alone as a float32 `[batch, m, k] @ [batch, k, n]` in each framework (best of 10, its own process):",
        "",
        "| batch x m x k x n | runs | GFLOP | XLA GFLOP/s | torch GFLOP/s |",
        "|---|---:|---:|---:|---:|",
        *[f"| {d['batch']} x {d['m']} x {d['k']} x {d['n']} | {d['runs']} | {d['flops'] / 1e9:.2f} | "
          f"{d['flops'] / d['runs'] / d['jax_s'] / 1e9:.0f} | {d['flops'] / d['runs'] / d['torch_s'] / 1e9:.0f} |"
          for d in k["shapes"][:top]],
        f"| all {len(k['shapes'])} | | {k['gflops']:.1f} | {k['gflops'] / k['jax_s']:.0f} | {k['gflops'] / k['torch_s']:.0f} |",
        "",
        f"- XLA's CPU kernels take {k['jax_s']:.3f} s for these matmuls, torch's {k['torch_s']:.3f} s: on this machine "
        f"the kernels alone allow sea_jax **{k['torch_over_jax']:.2f}x** torch's speed on this matmul work.",
        f"- sea_jax's measured {program_s:.3f} s is {program_s / k['jax_s']:.2f}x its matmuls' time at XLA's kernel "
        "speed; the rest is softmax, norms, top-n, data movement and the runtime's idle threads.",
    ]
    if machine_rate:
        lines.append(f"- At XLA's kernel speed these matmuls run at {k['gflops'] / k['jax_s'] / machine_rate:.0%} of the "
                     f"machine's matmul rate ({machine_rate:.0f} GFLOP/s): the ceiling on sea_jax's share of it, before "
                     "anything around the matmuls.")
    if torch_program_s is not None:
        lines.append(f"- torch's measured {torch_program_s:.3f} s is {torch_program_s / k['torch_s']:.2f}x the same "
                     "matmuls' time at its kernels' speed: what the two programs do around their matmuls compares "
                     "as these two factors do.")
    return lines


def check_quiet(allow_loaded: bool) -> dict:
    """{"loadavg_start", "quiet"}; exits 2 with a message when the machine is busy and
    ``allow_loaded`` is False."""
    load = os.getloadavg()
    quiet = load[0] <= QUIET_LOAD
    if not quiet and not allow_loaded:
        print(f"load average {load[0]:.2f} > {QUIET_LOAD}: other jobs share this machine, so timings would not "
              "be comparable; wait, or pass --allow-loaded to run anyway (the result is flagged)", file=sys.stderr)
        raise SystemExit(2)
    return {"loadavg_start": load, "quiet": quiet}


def describe(quiet: dict) -> str:
    """One line for a report about the load at the start."""
    flag = "" if quiet["quiet"] else f" **LOADED (> {QUIET_LOAD}): not a figure to quote**"
    return f"load average (1/5/15 min) at start {tuple(round(x, 2) for x in quiet['loadavg_start'])}{flag}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rate":
        print(_rate(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--kernels":
        print(json.dumps(_kernel_times(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        print(json.dumps(matmul_rate(), indent=1))
