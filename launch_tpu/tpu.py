#!/usr/bin/env python3
"""Create a Cloud TPU slice, install sea_jax on every worker, train, survive preemption, delete.

One file, standard library only (it runs on a laptop without JAX). Every subcommand builds the
exact ``gcloud`` / ``xpk`` command lines first and, with ``--dry-run``, prints them instead of
running them, one per line, shell-quoted, so what you see is what would run::

    python launch_tpu/tpu.py create    --name=sea1 --slice=v4-32 [--spot] [--dry-run]
    python launch_tpu/tpu.py install   --name=sea1 --slice=v4-32
    python launch_tpu/tpu.py train     --name=sea1 --slice=v4-32 --config=configs/gemma2b.py --workdir=gs://b/run1
    python launch_tpu/tpu.py logs      --name=sea1 --slice=v4-32
    python launch_tpu/tpu.py supervise --name=sea1 --slice=v4-32 --config=... --workdir=gs://b/run1
    python launch_tpu/tpu.py delete    --name=sea1 --slice=v4-32
    python launch_tpu/tpu.py xpk       --cluster=c1 --name=sea1 --slice=v5e-256 --num-slices=2 --image=... --config=... --workdir=...

Slices are created as *queued resources* (the only way to get spot / reserved capacity for
multi-host slices, and the object whose state tells us about preemption); ``--no-queued`` makes
a plain TPU VM instead. Training resumes from the last checkpoint in ``--workdir`` by itself
(``sea_jax.train`` restores the newest step there), so surviving preemption is: notice it,
re-create the slice, reinstall, relaunch the same command. A run that hangs (alive, but no new
``metrics.jsonl`` row for ``--heartbeat-timeout`` seconds) is killed and relaunched the same way.

``gs://`` paths (``--workdir``, checkpoints, data) reach the trainer unchanged: it reads and writes
them itself (Orbax's GCS support for checkpoints, gcsfs for the rest). Nothing is mounted with
gcsfuse: Orbax finalises a save by renaming its ``*.orbax-checkpoint-tmp`` folder, which gcsfuse
refuses by default (``rename-dir-limit`` 0) or does object by object, and gcsfuse uploads a file
only when it is closed, so ``metrics.jsonl`` and TensorBoard would stay invisible while the run
goes (launch_tpu/README.md, "Storage").
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

JAX_VERSION = "0.10.2"  # the jax sea_jax is developed against; jax[tpu] pins the matching libtpu

# Accelerator type, TPU VM runtime image and a zone where the generation is offered. One JAX
# process runs per VM ("host"); v4 / v5p hosts have 4 chips, v5e / v6e hosts 4 (8 for the
# single-host -8 slices). Only the names listed are accepted: a typo must not create a slice.
GENERATIONS = {
    # gen: (runtime version, default zone, chips per host, cores per chip in the slice name)
    "v4": ("tpu-ubuntu2204-base", "us-central2-b", 4, 2),
    "v5e": ("v2-alpha-tpuv5-lite", "us-west4-a", 4, 1),
    "v5p": ("v2-alpha-tpuv5", "us-east5-a", 4, 2),
    "v6e": ("v2-alpha-tpuv6e", "us-east5-b", 4, 1),
}
SLICE_SIZES = {
    "v4": (8, 16, 32, 64, 128, 256, 512),
    "v5e": (1, 4, 8, 16, 32, 64, 128, 256),
    "v5p": (8, 16, 32, 64, 128, 256, 512),
    "v6e": (1, 4, 8, 16, 32, 64, 128, 256),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # our name: v4-32, v5e-16 (v5litepod-16 accepted), v5p-16, v6e-8
    gen: str
    accelerator_type: str  # what gcloud / xpk call it
    runtime_version: str
    zone: str
    chips: int
    hosts: int  # = JAX processes = ssh workers


def get_slice(name: str) -> Slice:
    name = name.replace("v5litepod-", "v5e-")
    gen, _, size = name.partition("-")
    if gen not in GENERATIONS or not size.isdigit() or int(size) not in SLICE_SIZES[gen]:
        known = [f"{g}-{n}" for g, ns in SLICE_SIZES.items() for n in ns]
        raise SystemExit(f"unknown slice {name!r}; known: {', '.join(known)}")
    runtime, zone, per_host, cores_per_chip = GENERATIONS[gen]
    chips = int(size) // cores_per_chip
    if gen in ("v5e", "v6e") and chips <= 8:
        per_host = chips  # v5litepod-1/4/8 and v6e-1/4/8 are single-VM slices
    accel = f"v5litepod-{size}" if gen == "v5e" else name
    return Slice(name, gen, accel, runtime, zone, chips, max(1, chips // per_host))


# ----------------------------------------------------------------------------------------------
# Command builders (pure: they return argv lists)


def _where(args) -> list[str]:
    out = [f"--zone={args.zone or get_slice(args.slice).zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def create_cmds(args) -> list[list[str]]:
    s = get_slice(args.slice)
    runtime = args.runtime_version or s.runtime_version
    if args.queued:
        cmd = [
            "gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}",
            *_where(args), f"--accelerator-type={s.accelerator_type}", f"--runtime-version={runtime}",
        ]
        if args.spot:
            cmd.append("--spot")
        if args.reserved:
            cmd.append("--reserved")
        return [cmd]
    cmd = [
        "gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
        f"--accelerator-type={s.accelerator_type}", f"--version={runtime}",
    ]
    if args.spot:
        cmd.append("--spot")
    if args.reserved:
        cmd.append("--reserved")
    return [cmd]


def state_cmd(args) -> list[str]:
    """Prints one word: the queued resource's state (ACTIVE, SUSPENDED, FAILED, ...) or, for a
    plain TPU VM, the node's (READY, PREEMPTED, ...)."""
    if args.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *_where(args),
                "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_where(args), "--format=value(state)"]


def ssh_cmd(args, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args), f"--worker={worker}",
            f"--command={command}"]


REMOTE_DIR = "~/sea_jax"
VENV = "~/sea_venv"
RUN_DIR = "~/sea_run"


def install_cmds(args) -> list[list[str]]:
    """Ships the code (a ``git archive`` of HEAD, or a pip spec via ``--package``) and installs it
    with ``jax[tpu]`` into a venv on every worker. HEAD, not the dirty tree: what runs is a commit."""
    pip = f"{VENV}/bin/pip install -q"
    setup = f"python3 -m venv {VENV} && {pip} -U pip && {pip} 'jax[tpu]=={args.jax_version}'"
    if args.package:
        return [ssh_cmd(args, f"{setup} && {pip} {shlex.quote(args.package)}")]
    tarball = "/tmp/sea_jax_src.tar.gz"
    return [
        ["git", "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:sea_jax_src.tar.gz", *_where(args),
         "--worker=all"],
        ssh_cmd(args, f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar xzf ~/sea_jax_src.tar.gz -C {REMOTE_DIR}"
                      f" && {setup} && {pip} -e {REMOTE_DIR}"),
    ]


def env_vars(args) -> dict[str, str]:
    """Environment of the training processes. On a TPU VM slice JAX finds its peers from the TPU
    metadata, so no coordinator address is needed; these only make logs and failures legible."""
    env = {
        "PYTHONUNBUFFERED": "1",  # log lines reach train.log as they are written
        "TPU_STDERR_LOG_LEVEL": "2",  # libtpu warnings and errors only
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for kv in args.env or ():
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"--env wants KEY=VALUE, got {kv!r}")
        env[k] = v
    return env


def trainer_flags(args) -> list[str]:
    """The flags of ``python -m sea_jax.train``, the same on TPU VMs and under XPK. ``gs://`` paths
    pass through unchanged: the trainer reads and writes them itself (README "Storage")."""
    return [f"--config={args.config}", f"--workdir={args.workdir}", *(args.extra or ())]


def train_argv(args) -> list[str]:
    """argv of ``python -m sea_jax.train`` on a TPU VM worker (the venv ``install`` made)."""
    return [f"{VENV}/bin/python", "-m", "sea_jax.train", *trainer_flags(args)]


def train_command(args) -> str:
    """``python -m sea_jax.train`` as every worker runs it (same argv on all workers: JAX is SPMD)."""
    return " ".join(shlex.quote(a) if not a.startswith("~/") else a for a in train_argv(args))


def train_cmds(args) -> list[list[str]]:
    """Starts training on all workers at once, detached (nohup), logging to ``~/sea_run/train.log``
    and writing the exit status to ``~/sea_run/exit_code`` so the supervisor can tell a finished
    run from a crashed or preempted one. Configs are paths inside the installed source tree."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_vars(args).items())
    inner = (
        f"echo $$ > {RUN_DIR}/pid; cd {REMOTE_DIR} && env {env} {train_command(args)} > {RUN_DIR}/train.log 2>&1;"
        f" echo $? > {RUN_DIR}/exit_code"
    )
    # A relaunch on the same slice first stops what the previous launch left (e.g. workers hung
    # after worker 0 crashed): setsid made its shell a process-group leader, so the group is
    # killed by the pid it recorded, nothing else.
    stop = f"if [ -f {RUN_DIR}/pid ]; then kill -- -$(cat {RUN_DIR}/pid) 2>/dev/null; sleep 5; fi"
    remote = (
        f"mkdir -p {RUN_DIR} && {{ {stop}; }}; rm -f {RUN_DIR}/exit_code {RUN_DIR}/pid"
        f" && setsid nohup bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &"
    )
    return [ssh_cmd(args, remote)]


def logs_cmd(args) -> list[str]:
    """Follows worker ``--worker``'s log (worker 0 is the process that logs metrics)."""
    return ssh_cmd(args, f"tail -n +1 -F {RUN_DIR}/train.log", worker=str(args.worker))


def exit_code_cmd(args) -> list[str]:
    return ssh_cmd(args, f"cat {RUN_DIR}/exit_code 2>/dev/null || echo running", worker="0")


def heartbeat_cmd(args) -> list[str] | None:
    """Lists the run's ``metrics.jsonl`` objects with their times (``gcloud storage ls -l``: size,
    time, URL). The trainer writes a new object generation for every logged row
    (``sea_jax.storage.AppendLog``), so an object's time is the time of its newest row: the run's
    heartbeat. ``stage*``: the config, not the launcher, knows the stage; the newest log counts.
    None for a workdir off GCS (on a VM's disk it would not survive a re-created slice anyway)."""
    if not args.workdir.startswith("gs://"):
        return None
    return ["gcloud", "storage", "ls", "-l", f"{args.workdir.rstrip('/')}/stage*/metrics.jsonl"]


# An RFC 3339 time as listings print it: 2026-01-31T18:38:20Z, ...20.123Z, ...20+0000, ...20+00:00.
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?")


def newest_time(listing: str) -> float | None:
    """The newest time in a listing, in epoch seconds (UTC where no zone is printed); None when it
    has none (no row logged yet, or the listing failed)."""
    times = [
        datetime.datetime.strptime(m.group(1) + (m.group(2) or "Z"), "%Y-%m-%dT%H:%M:%S%z").timestamp()
        for m in _RFC3339.finditer(listing)
    ]
    return max(times, default=None)


def kill_cmd(args) -> list[str]:
    """Kills the trainer on every worker before a hung run is relaunched. SIGKILL: a process stuck
    in a collective or in the TPU driver may ignore SIGTERM, and while it lives it holds the chips,
    so the relaunch could not open them. ``[s]``: the pattern must not match the remote shell that
    runs pkill (its command line holds the pattern, not ``sea_jax.train``)."""
    return ssh_cmd(args, "pkill -9 -f '[s]ea_jax.train'")


def delete_cmds(args) -> list[list[str]]:
    if args.queued:
        # --force also deletes the TPU VM the queued resource holds.
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args), "--force",
                 "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]


def xpk_cmds(args) -> list[list[str]]:
    """GKE multi-slice through XPK: the cluster (once) and the workload. XPK sets up DCN between
    slices (MEGASCALE_* env) and restarts the JobSet after a preemption (``--max-restarts``)."""
    s = get_slice(args.slice)
    zone = args.zone or s.zone
    where = [f"--zone={zone}"] + ([f"--project={args.project}"] if args.project else [])
    cluster = ["xpk", "cluster", "create", f"--cluster={args.cluster}", f"--tpu-type={s.accelerator_type}",
               f"--num-slices={args.num_slices}", *where]
    if args.spot:
        cluster.append("--spot")
    if args.reserved:
        cluster.append(f"--reservation={args.reservation}" if args.reservation else "--on-demand")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_vars(args).items())
    # The image's python; gs:// paths unchanged (the pods mount nothing, the trainer reads GCS).
    command = f"env {env} python -m sea_jax.train " + " ".join(shlex.quote(a) for a in trainer_flags(args))
    workload = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.name}",
                f"--tpu-type={s.accelerator_type}", f"--num-slices={args.num_slices}",
                f"--docker-image={args.image}", f"--max-restarts={args.max_restarts}", f"--command={command}",
                *where]
    return [cluster, workload]


# ----------------------------------------------------------------------------------------------
# Execution


class Runner:
    """Runs argv lists, or only prints them (``dry_run``)."""

    def __init__(self, dry_run: bool, out=sys.stdout):
        self.dry_run = dry_run
        self.out = out

    def show(self, cmd: Sequence[str]) -> None:
        print(shlex.join(cmd), file=self.out, flush=True)

    def run(self, cmd: Sequence[str], check: bool = True) -> int:
        self.show(cmd)
        if self.dry_run:
            return 0
        return subprocess.run(list(cmd), check=check).returncode

    def output(self, cmd: Sequence[str]) -> str:
        self.show(cmd)
        if self.dry_run:
            return ""
        res = subprocess.run(list(cmd), capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""


GONE_STATES = {"FAILED", "SUSPENDED", "SUSPENDING", "PREEMPTED", "TERMINATED", ""}  # "" = not found
UP_STATES = {"ACTIVE", "READY"}


def wait_until_up(runner: Runner, args) -> bool:
    """Polls the slice's state until it is usable (True) or has failed (False)."""
    deadline = time.time() + args.create_timeout
    while True:
        state = runner.output(state_cmd(args))
        if runner.dry_run or state in UP_STATES:
            return True
        if state in {"FAILED", "SUSPENDED", "PREEMPTED", "TERMINATED"} or time.time() > deadline:
            return False
        time.sleep(args.poll)


def bring_up(runner: Runner, args) -> None:
    for attempt in range(args.max_recreates + 1):
        for c in create_cmds(args):
            runner.run(c, check=False)
        if wait_until_up(runner, args):
            for c in install_cmds(args):
                runner.run(c)
            return
        print(f"slice {args.name} did not come up (attempt {attempt + 1}); deleting and retrying", file=sys.stderr)
        for c in delete_cmds(args):
            runner.run(c, check=False)
    raise SystemExit(f"could not bring up {args.name} after {args.max_recreates + 1} attempts")


def launch(runner: Runner, args, clock) -> float:
    """Starts training on the slice; returns the launch time, from which the heartbeat's age counts
    until the run logs a row (before its first row a run compiles and restores a checkpoint)."""
    for c in train_cmds(args):
        runner.run(c)
    return clock()


def stale_heartbeat(runner: Runner, args, launched: float, now: float) -> str:
    """Why the running job counts as hung, or "" while it is alive: its newest ``metrics.jsonl``
    row, or its launch when it has logged no row since (compiling, restoring a checkpoint, or
    stuck before the first step), is more than ``--heartbeat-timeout`` seconds old."""
    cmd = heartbeat_cmd(args)
    if cmd is None or args.heartbeat_timeout <= 0:
        return ""
    beat = newest_time(runner.output(cmd))
    if beat is not None and beat > launched:
        age, since = now - beat, "the newest metrics.jsonl row"
    else:
        # An empty listing is also what a failed one looks like: say so, the user can check.
        age, since = now - launched, f"the launch, and no metrics.jsonl row since (does `{shlex.join(cmd)}` work here?)"
    if age <= args.heartbeat_timeout:
        return ""
    return f"heartbeat stale: {age:.0f} s since {since} > --heartbeat-timeout={args.heartbeat_timeout:g}"


def show_recovery(runner: Runner, args) -> None:
    """``--dry-run``: one pass of each recovery branch, printed."""
    print("# on FAILED/SUSPENDED/PREEMPTED:", file=runner.out)
    for c in delete_cmds(args) + create_cmds(args) + install_cmds(args) + train_cmds(args):
        runner.show(c)
    print("# while running, every --poll seconds:", file=runner.out)
    runner.show(state_cmd(args))
    runner.show(exit_code_cmd(args))
    cmd = heartbeat_cmd(args)
    if cmd is None or args.heartbeat_timeout <= 0:
        print("# no heartbeat check (--heartbeat-timeout=0, or --workdir is not gs://)", file=runner.out)
        return
    runner.show(cmd)
    print(f"# when the newest metrics.jsonl row (or the launch) is over {args.heartbeat_timeout:g} s old:",
          file=runner.out)
    for c in [kill_cmd(args)] + train_cmds(args):
        runner.show(c)


def supervise(runner: Runner, args, clock=time.time) -> int:
    """create -> install -> train, then watch: the slice's state, worker 0's exit code and the
    run's heartbeat (``clock``: the current time in epoch seconds; tests pass a fake one).

    * state FAILED / SUSPENDED / PREEMPTED (or gone): delete, re-create, reinstall, relaunch; the
      run restores its last checkpoint from ``--workdir``.
    * exit code 0: done (the slice is deleted unless ``--keep``).
    * another exit code (a crash, or a worker lost its peers), or still running with a stale
      heartbeat (a hang: see :func:`stale_heartbeat`; the trainer is killed first): relaunch on the
      same slice, at most ``--max-relaunches`` times, since a deterministic bug would otherwise
      loop forever.
    In ``--dry-run`` one pass of each branch is printed, nothing is polled.
    """
    bring_up(runner, args)
    launched = launch(runner, args, clock)
    if runner.dry_run:
        show_recovery(runner, args)
        return 0
    relaunches = recreates = 0
    while True:
        time.sleep(args.poll)
        state = runner.output(state_cmd(args))
        if state in GONE_STATES:
            recreates += 1
            if recreates > args.max_recreates:
                raise SystemExit(f"slice lost {recreates} times; giving up")
            print(f"slice state {state or 'GONE'}: re-creating ({recreates})", file=sys.stderr)
            for c in delete_cmds(args):
                runner.run(c, check=False)
            bring_up(runner, args)
            launched = launch(runner, args, clock)
            continue
        if state not in UP_STATES:
            continue  # PROVISIONING, WAITING_FOR_RESOURCES, ... (a queued resource being restored)
        code = runner.output(exit_code_cmd(args))
        if code == "":
            continue  # worker 0 unreachable this time
        if code == "0":
            print("training finished", file=sys.stderr)
            if not args.keep:
                for c in delete_cmds(args):
                    runner.run(c, check=False)
            return 0
        why = stale_heartbeat(runner, args, launched, clock()) if code == "running" else f"training exited with {code}"
        if not why:
            continue
        relaunches += 1
        if relaunches > args.max_relaunches:
            print(f"{why}; relaunched {args.max_relaunches} times already; giving up (slice kept)", file=sys.stderr)
            return 1
        print(f"{why}; relaunching ({relaunches})", file=sys.stderr)
        if code == "running":
            runner.run(kill_cmd(args), check=False)  # pkill exits 1 when the process already died
        launched = launch(runner, args, clock)


# ----------------------------------------------------------------------------------------------
# CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, slice_required=True):
        sp.add_argument("--name", required=True, help="queued resource / TPU VM / workload name")
        sp.add_argument("--slice", required=slice_required, default="v4-8", help="v4-8, v4-32, v5e-16, v5p-16, v6e-8 ...")
        sp.add_argument("--zone", default="", help="default: a zone that offers the generation")
        sp.add_argument("--project", default="", help="default: gcloud's configured project")
        sp.add_argument("--no-queued", dest="queued", action="store_false", help="plain TPU VM, no queued resource")
        sp.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    def capacity(sp):
        sp.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
        sp.add_argument("--reserved", action="store_true", help="use the project's reservation")
        sp.add_argument("--runtime-version", default="", help="TPU VM image (default per generation)")

    def install_opts(sp):
        sp.add_argument("--package", default="", help="pip spec to install instead of `git archive HEAD`")
        sp.add_argument("--jax-version", default=JAX_VERSION)

    def train_opts(sp):
        sp.add_argument("--config", required=True, help="config path inside the repo, e.g. configs/gemma2b.py")
        sp.add_argument("--workdir", required=True, help="gs:// run directory (checkpoints make restarts resume)")
        sp.add_argument("--env", action="append", help="KEY=VALUE for the training processes (repeatable)")
        sp.add_argument("extra", nargs="*", help="more sea_jax.train flags after --, e.g. -- --config.train.batch_size=128")

    def loop_opts(sp):
        sp.add_argument("--poll", type=float, default=60.0, help="seconds between state checks")
        sp.add_argument("--create-timeout", type=float, default=6 * 3600, help="seconds to wait for capacity")
        sp.add_argument("--max-recreates", type=int, default=20)
        sp.add_argument("--max-relaunches", type=int, default=3)
        sp.add_argument("--keep", action="store_true", help="keep the slice when training finishes")
        sp.add_argument("--heartbeat-timeout", type=float, default=1800.0,
                        help="seconds without a new metrics.jsonl row (or since the launch) after which a running "
                             "job counts as hung: killed and relaunched (0: never)")

    sp = sub.add_parser("create", help="create the slice (and wait until it is up)")
    common(sp), capacity(sp)
    sp.add_argument("--no-wait", dest="wait", action="store_false")
    sp.add_argument("--create-timeout", type=float, default=6 * 3600)
    sp.add_argument("--poll", type=float, default=30.0)
    sp = sub.add_parser("install", help="install sea_jax + jax[tpu] on every worker")
    common(sp), install_opts(sp)
    sp = sub.add_parser("train", help="start training on every worker (detached)")
    common(sp), train_opts(sp)
    sp = sub.add_parser("logs", help="stream a worker's training log")
    common(sp)
    sp.add_argument("--worker", default="0", help="worker index, or 'all'")
    sp = sub.add_parser("supervise", help="create + install + train, and recover from preemption until done")
    common(sp), capacity(sp), install_opts(sp), train_opts(sp), loop_opts(sp)
    sp = sub.add_parser("delete", help="delete the slice")
    common(sp)
    sp = sub.add_parser("xpk", help="print/run the XPK (GKE) commands for a (multi-slice) workload")
    common(sp), train_opts(sp)
    sp.add_argument("--cluster", required=True)
    sp.add_argument("--num-slices", type=int, default=1)
    sp.add_argument("--image", required=True, help="docker image with sea_jax and jax[tpu] installed")
    sp.add_argument("--max-restarts", type=int, default=20, help="JobSet restarts (preemptions) before failing")
    sp.add_argument("--spot", action="store_true")
    sp.add_argument("--reserved", action="store_true")
    sp.add_argument("--reservation", default="")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    # "--dry-run" anywhere (even after "--", where argparse hands it to sea_jax.train) means dry:
    # a misplaced safety flag must never turn into a real slice.
    if "--dry-run" in argv:
        args.dry_run = True
        if getattr(args, "extra", None):
            args.extra = [a for a in args.extra if a != "--dry-run"]
    get_slice(args.slice)  # validate early, before any command runs
    runner = Runner(args.dry_run)
    if args.cmd == "create":
        for c in create_cmds(args):
            runner.run(c)
        if args.wait and not args.dry_run and not wait_until_up(runner, args):
            print(f"{args.name} failed to come up", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "install":
        for c in install_cmds(args):
            runner.run(c)
        return 0
    if args.cmd == "train":
        for c in train_cmds(args):
            runner.run(c)
        return 0
    if args.cmd == "logs":
        return runner.run(logs_cmd(args), check=False)
    if args.cmd == "supervise":
        return supervise(runner, args)
    if args.cmd == "delete":
        for c in delete_cmds(args):
            runner.run(c)
        return 0
    if args.cmd == "xpk":
        for c in xpk_cmds(args):
            runner.run(c)
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
