"""What a CPU benchmark measures about the machine itself: its matmul rate, and whether it is quiet.

* :func:`matmul_rate`: GFLOP/s of a float32 square matmul, jitted JAX and eager torch, each in
  its own process (their thread pools slow each other down in one process), best of several;
  the machine's rate is the faster of the two. A benchmark prints its analytic FLOPs / time as
  a fraction of it, measured in the same run.
* :func:`check_quiet`: the 1-minute load average at the start. Timings taken while other jobs
  share the 2 cores are not comparable with anything; a benchmark refuses to run above
  :data:`QUIET_LOAD` unless told ``--allow-loaded``, and then flags its result.

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
    if kind == "jax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        run = lambda: f(a, a).block_until_ready()  # noqa: E731
    else:
        import torch

        a = torch.ones((n, n), dtype=torch.float32)
        run = lambda: a @ a  # noqa: E731
    for _ in range(3):
        run()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


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
    else:
        print(json.dumps(matmul_rate(), indent=1))
