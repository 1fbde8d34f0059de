"""launch_tpu/tpu.py --dry-run: the exact commands for representative slices.

The script is run as a subprocess (as a user runs it) and its printed commands are compared
token by token, so a changed flag, zone, worker selector or env var fails here.
"""
import datetime
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_tpu" / "tpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("launch_tpu_tpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


tpu = _module()


def dry(*argv):
    """Runs the script with --dry-run; returns its printed commands as argv lists (comments out)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--dry-run"], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize(
    "name, accel, chips, hosts, zone, runtime",
    [
        ("v4-8", "v4-8", 4, 1, "us-central2-b", "tpu-ubuntu2204-base"),
        ("v4-32", "v4-32", 16, 4, "us-central2-b", "tpu-ubuntu2204-base"),
        ("v5e-8", "v5litepod-8", 8, 1, "us-west4-a", "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", "v5litepod-16", 16, 4, "us-west4-a", "v2-alpha-tpuv5-lite"),
        ("v5e-256", "v5litepod-256", 256, 64, "us-west4-a", "v2-alpha-tpuv5-lite"),
        ("v5p-16", "v5p-16", 8, 2, "us-east5-a", "v2-alpha-tpuv5"),
        ("v6e-8", "v6e-8", 8, 1, "us-east5-b", "v2-alpha-tpuv6e"),
    ],
)
def test_slice_table(name, accel, chips, hosts, zone, runtime):
    s = tpu.get_slice(name)
    assert (s.accelerator_type, s.chips, s.hosts, s.zone, s.runtime_version) == (accel, chips, hosts, zone, runtime)


def test_slice_table_agrees_with_aot():
    """The launcher (no JAX) and sea_jax.aot (libtpu names) keep separate tables; same chips/hosts."""
    aot = pytest.importorskip("sea_jax.aot")
    for name, t in aot.TOPOLOGIES.items():
        s = tpu.get_slice(name)
        assert (s.chips, s.hosts) == (t.chips, t.hosts), name


def test_unknown_slice_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "create", "--name=x", "--slice=v4-12", "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown slice 'v4-12'" in proc.stderr and proc.stdout == ""


def test_create_queued_spot_v4_32():
    assert dry("create", "--name=sea1", "--slice=v4-32", "--spot") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "sea1", "--node-id=sea1", "--zone=us-central2-b",
         "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"],
    ]


def test_create_plain_vm_v5e_16_with_project_and_zone():
    assert dry("create", "--name=s", "--slice=v5e-16", "--no-queued", "--project=p1", "--zone=us-east1-c") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "s", "--zone=us-east1-c", "--project=p1",
         "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"],
    ]


def test_install_ships_head_and_jax_tpu_to_all_workers():
    cmds = dry("install", "--name=sea1", "--slice=v5p-16")
    assert cmds[0] == ["git", "archive", "--format=tar.gz", "--output=/tmp/sea_jax_src.tar.gz", "HEAD"]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/sea_jax_src.tar.gz",
                       "sea1:sea_jax_src.tar.gz", "--zone=us-east5-a", "--worker=all"]
    ssh = cmds[2]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sea1", "--zone=us-east5-a", "--worker=all"]
    remote = ssh[8].removeprefix("--command=")
    assert "pip install -q 'jax[tpu]==0.10.2'" in remote and remote.endswith("pip install -q -e ~/sea_jax")
    assert len(cmds) == 3


def test_install_from_package_spec():
    cmds = dry("install", "--name=a", "--slice=v4-8", "--package=git+https://example.com/sea_jax@v1")
    assert len(cmds) == 1 and cmds[0][7] == "--worker=all"
    assert cmds[0][8].endswith("~/sea_venv/bin/pip install -q git+https://example.com/sea_jax@v1")


def test_train_starts_all_workers_with_env_and_extra_flags():
    cmds = dry("train", "--name=sea1", "--slice=v4-32", "--config=configs/gemma2b.py", "--workdir=gs://b/run1",
               "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_data_parallel_all_reduce_opt=true", "--",
               "--config.train.batch_size=128")
    assert len(cmds) == 1
    ssh = cmds[0]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sea1", "--zone=us-central2-b", "--worker=all"]
    remote = ssh[8].removeprefix("--command=")
    # The detached job, re-parsed as the remote shell will see it.
    inner = shlex.split(remote.split("setsid nohup bash -c ", 1)[1])[0]
    assert inner.startswith("echo $$ > ~/sea_run/pid; cd ~/sea_jax && env PYTHONUNBUFFERED=1 TPU_STDERR_LOG_LEVEL=2 "
                            "TF_CPP_MIN_LOG_LEVEL=2 LIBTPU_INIT_ARGS=--xla_tpu_enable_data_parallel_all_reduce_opt=true ")
    # gs:// paths reach the trainer unchanged: it writes checkpoints and logs to GCS itself
    assert ("~/sea_venv/bin/python -m sea_jax.train --config=configs/gemma2b.py --workdir=gs://b/run1 "
            "--config.train.batch_size=128 > ~/sea_run/train.log 2>&1; echo $? > ~/sea_run/exit_code") in inner
    assert remote.startswith("mkdir -p ~/sea_run && { if [ -f ~/sea_run/pid ]; then kill -- -$(cat ~/sea_run/pid)")
    assert "rm -f ~/sea_run/exit_code ~/sea_run/pid && setsid nohup bash -c " in remote


def test_gs_paths_pass_through_and_nothing_is_mounted():
    cmds = dry("train", "--name=s", "--slice=v4-8", "--config=configs/gemma2b.py", "--workdir=gs://runs/r1", "--",
               "--config.llm.checkpoint=gs://models/gemma-2b", "--config.data.json=/local/data.json")
    remote = cmds[0][8].removeprefix("--command=")
    assert ("-m sea_jax.train --config=configs/gemma2b.py --workdir=gs://runs/r1 "
            "--config.llm.checkpoint=gs://models/gemma-2b --config.data.json=/local/data.json >") in remote
    assert "gcsfuse" not in remote and "/gcs/" not in remote and "mountpoint" not in remote


def test_v4_32_gs_paths_are_never_rewritten():
    """Every command a v4-32 run prints (install, train, supervise with its recovery and heartbeat
    paths) keeps gs:// as given: no gcsfuse install, no mount, no /gcs/ path."""
    flags = ["--config=configs/gemma2b.py", "--workdir=gs://runs/g2b", "--",
             "--config.llm.checkpoint=gs://models/gemma-2b", "--config.data.image_root=gs://data/images"]
    out = [dry("install", "--name=s", "--slice=v4-32"), dry("train", "--name=s", "--slice=v4-32", *flags),
           dry("supervise", "--name=s", "--slice=v4-32", "--spot", *flags)]
    text = json.dumps(out)
    assert "gcsfuse" not in text and "/gcs/" not in text and "mountpoint" not in text
    launches = [c[-1] for cmds in out for c in cmds if "sea_jax.train --config" in c[-1]]
    assert len(launches) == 4  # train; supervise: launch, after preemption, after a stale heartbeat
    for remote in launches:
        assert ("--workdir=gs://runs/g2b --config.llm.checkpoint=gs://models/gemma-2b "
                "--config.data.image_root=gs://data/images") in remote


def test_logs_follow_worker_zero_by_default():
    assert dry("logs", "--name=s", "--slice=v5e-16") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "s", "--zone=us-west4-a", "--worker=0",
         "--command=tail -n +1 -F ~/sea_run/train.log"],
    ]


def test_delete_queued_and_plain():
    assert dry("delete", "--name=s", "--slice=v4-8") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "s", "--zone=us-central2-b", "--force", "--quiet"]]
    assert dry("delete", "--name=s", "--slice=v4-8", "--no-queued") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "s", "--zone=us-central2-b", "--quiet"]]


def test_supervise_dry_run_shows_recovery_path():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "supervise", "--name=r", "--slice=v4-16", "--spot", "--config=configs/x.py",
         "--workdir=gs://b/r", "--dry-run"], capture_output=True, text=True, timeout=60,
    ).stdout
    head, recovery = out.split("# on FAILED/SUSPENDED/PREEMPTED:\n")
    recovery, polling = recovery.split("# while running, every --poll seconds:\n")
    polling, stale = polling.split("# when the newest metrics.jsonl row (or the launch) is over 1800 s old:\n")
    first = [shlex.split(line) for line in head.splitlines()]
    assert first[0][4] == "create" and first[1][4] == "describe" and first[1][-1] == "--format=value(state.state)"
    assert first[-1][4] == "ssh" and "sea_jax.train" in first[-1][-1]
    rec = [shlex.split(line) for line in recovery.splitlines()]
    # delete, then the same bring-up and launch again: the run resumes from gs://b/r's checkpoint
    assert rec[0][3:5] == ["queued-resources", "delete"] and rec[1:] == first[:1] + first[2:]
    poll = [shlex.split(line) for line in polling.splitlines()]
    assert poll[1][7] == "--worker=0" and "exit_code" in poll[1][8]
    # the heartbeat: the times of the run's metrics.jsonl objects (one per stage), read from GCS
    assert poll[2] == ["gcloud", "storage", "ls", "-l", "gs://b/r/stage*/metrics.jsonl"] and len(poll) == 3
    # a hung run: its trainer killed on every worker, then the same launch (it resumes from the checkpoint)
    hung = [shlex.split(line) for line in stale.splitlines()]
    assert hung == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r", "--zone=us-central2-b", "--worker=all",
                     "--command=pkill -9 -f '[s]ea_jax.train'"], first[-1]]


def test_supervise_dry_run_without_heartbeat():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "supervise", "--name=r", "--slice=v4-8", "--config=c.py", "--workdir=gs://b/r",
         "--heartbeat-timeout=0", "--dry-run"], check=False, capture_output=True, text=True, timeout=60,
    ).stdout
    assert "# no heartbeat check" in out and "gcloud storage" not in out and "pkill" not in out


@pytest.mark.parametrize("listing, expected", [
    ("", None),
    ("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.", None),
    # gcloud storage ls -l: size, time, URL per object, then a total
    (("     10  2026-01-31T18:38:20Z  gs://b/r/stage1/metrics.jsonl\n"
      "   2048  2026-02-01T09:00:05Z  gs://b/r/stage2/metrics.jsonl\n"
      "TOTAL: 2 objects, 2058 bytes (2.01kiB)"), "2026-02-01T09:00:05+00:00"),
    ("2026-01-31T18:38:20.123Z", "2026-01-31T18:38:20+00:00"),
    ("2026-01-31T19:38:20+0100", "2026-01-31T18:38:20+00:00"),
    ("2026-01-31T18:38:20+00:00", "2026-01-31T18:38:20+00:00"),
    ("2026-01-31T18:38:20", "2026-01-31T18:38:20+00:00"),  # no zone printed: UTC
])
def test_newest_time_reads_listings(listing, expected):
    t = tpu.newest_time(listing)
    assert t == (None if expected is None else datetime.datetime.fromisoformat(expected).timestamp())


class FakeRunner(tpu.Runner):
    """Scripted gcloud: states and exit codes come from queues, the metrics.jsonl listing from
    ``listing()`` (default: no row yet); records what was run and what was asked."""

    def __init__(self, states, codes, listing=lambda: ""):
        super().__init__(dry_run=False, out=open("/dev/null", "w"))
        self.states, self.codes, self.listing, self.ran, self.asked = list(states), list(codes), listing, [], []

    def run(self, cmd, check=True):
        self.ran.append(list(cmd))
        return 0

    def output(self, cmd):
        self.asked.append(list(cmd))
        if "describe" in cmd:
            return self.states.pop(0)
        if cmd[:3] == ["gcloud", "storage", "ls"]:
            return self.listing()
        return self.codes.pop(0)


class FakeClock:
    """Epoch seconds that only move when the supervisor sleeps (``time.sleep`` patched to ``sleep``)."""

    def __init__(self, t=1_800_000_000.0):
        self.t0 = self.t = t

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


def _listing(t):
    """``gcloud storage ls -l`` of a metrics.jsonl last written at epoch ``t``."""
    when = datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"  4096  {when}  gs://w/stage1/metrics.jsonl\nTOTAL: 1 objects, 4096 bytes (4.00kiB)"


def _launches(runner):
    return [i for i, c in enumerate(runner.ran) if c[4:5] == ["ssh"] and "sea_jax.train --config" in c[-1]]


def _kills(runner):
    return [i for i, c in enumerate(runner.ran) if c[4:5] == ["ssh"] and "pkill" in c[-1]]


def test_supervise_recreates_after_preemption_and_relaunches_after_crash(monkeypatch):
    monkeypatch.setattr(tpu.time, "sleep", lambda s: None)
    args = tpu.parser().parse_args(["supervise", "--name=r", "--slice=v4-8", "--config=c.py", "--workdir=gs://w"])
    # up; running; preempted -> recreate (up); crashed (1) -> relaunch; finished (0)
    runner = FakeRunner(["ACTIVE", "ACTIVE", "SUSPENDED", "ACTIVE", "ACTIVE", "ACTIVE"], ["running", "1", "0"])
    assert tpu.supervise(runner, args) == 0
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in runner.ran]
    launches = [c for c in runner.ran if c[4:5] == ["ssh"] and "sea_jax.train" in c[-1]]
    assert verbs.count("create") == 2 and len(launches) == 3
    assert verbs[-1] == "delete" and verbs.count("delete") == 2  # preemption cleanup + final delete


def test_supervise_gives_up_on_repeated_crashes(monkeypatch):
    monkeypatch.setattr(tpu.time, "sleep", lambda s: None)
    args = tpu.parser().parse_args(["supervise", "--name=r", "--slice=v4-8", "--config=c.py", "--workdir=gs://w",
                                    "--max-relaunches=1"])
    runner = FakeRunner(["ACTIVE"] * 4, ["2", "2"])
    assert tpu.supervise(runner, args) == 1
    assert not any(c[4:5] == ["delete"] for c in runner.ran if c[0] == "gcloud")  # slice kept for debugging


def _supervise(monkeypatch, flags, polls, listing_at):
    """supervise on a fake slice that stays ACTIVE: the job runs for ``polls`` polls (60 s apart on
    a fake clock), then exits 0; ``listing_at(clock)``: the metrics.jsonl listing at that time."""
    clock = FakeClock()
    monkeypatch.setattr(tpu.time, "sleep", clock.sleep)
    args = tpu.parser().parse_args(["supervise", "--name=r", "--slice=v4-8", "--config=c.py", "--workdir=gs://w",
                                    "--poll=60", "--heartbeat-timeout=600", *flags])
    runner = FakeRunner(["ACTIVE"] * (polls + 2), ["running"] * polls + ["0"], listing=lambda: listing_at(clock))
    return tpu.supervise(runner, args, clock=clock), runner


def test_supervise_keeps_a_run_with_a_fresh_heartbeat(monkeypatch):
    # 9 minutes without a row (compiling: the launch counts as the heartbeat), then a row every poll;
    # 30 minutes in all, three times the timeout
    rc, runner = _supervise(monkeypatch, [], 30, lambda c: "" if c.t - c.t0 < 540 else _listing(c.t - 5))
    assert rc == 0 and len(_launches(runner)) == 1 and not _kills(runner)
    assert sum(c[:3] == ["gcloud", "storage", "ls"] for c in runner.asked) == 30
    assert ["gcloud", "storage", "ls", "-l", "gs://w/stage*/metrics.jsonl"] in runner.asked


def test_supervise_kills_and_relaunches_a_run_whose_heartbeat_is_stale(monkeypatch, capsys):
    # rows until 300 s, then none: at 960 s the newest row is 660 s old > 600. After the relaunch the
    # old row no longer counts (the restart restores a checkpoint first); done at 1200 s.
    rc, runner = _supervise(monkeypatch, [], 19, lambda c: _listing(min(c.t, c.t0 + 300)))
    assert rc == 0
    launches, kills = _launches(runner), _kills(runner)
    assert len(launches) == 2 and kills == [launches[1] - 1]  # killed on every worker, then the same launch
    assert runner.ran[kills[0]][7:] == ["--worker=all", "--command=pkill -9 -f '[s]ea_jax.train'"]
    assert runner.ran[launches[0]] == runner.ran[launches[1]]
    assert not any(c[4:5] in (["create"], ["delete"]) for c in runner.ran[1:-1])  # same slice
    err = capsys.readouterr().err
    assert ("heartbeat stale: 660 s since the newest metrics.jsonl row > --heartbeat-timeout=600; "
            "relaunching (1)") in err


def test_supervise_gives_up_on_a_run_that_hangs_again(monkeypatch, capsys):
    # never a row (e.g. stuck before the first step): stale 660 s after each launch
    rc, runner = _supervise(monkeypatch, ["--max-relaunches=1"], 30, lambda c: "")
    assert rc == 1 and len(_launches(runner)) == 2 and len(_kills(runner)) == 1
    assert runner.ran[-1][4] == "ssh"  # nothing deleted: the slice is kept for debugging
    err = capsys.readouterr().err
    assert "heartbeat stale: 660 s since the launch, and no metrics.jsonl row since" in err
    assert "giving up (slice kept)" in err


def test_supervise_heartbeat_timeout_zero_never_checks(monkeypatch):
    rc, runner = _supervise(monkeypatch, ["--heartbeat-timeout=0"], 40, lambda c: "")
    assert rc == 0 and len(_launches(runner)) == 1 and not _kills(runner)
    assert not any(c[:2] == ["gcloud", "storage"] for c in runner.asked)


def test_xpk_multislice():
    cmds = dry("xpk", "--cluster=c1", "--name=sea-ms", "--slice=v5e-256", "--num-slices=2", "--spot",
               "--image=gcr.io/p/sea:1", "--config=configs/gemma2b.py", "--workdir=gs://b/ms", "--project=p")
    assert cmds[0] == ["xpk", "cluster", "create", "--cluster=c1", "--tpu-type=v5litepod-256", "--num-slices=2",
                       "--zone=us-west4-a", "--project=p", "--spot"]
    assert cmds[1] == [
        "xpk", "workload", "create", "--cluster=c1", "--workload=sea-ms", "--tpu-type=v5litepod-256",
        "--num-slices=2", "--docker-image=gcr.io/p/sea:1", "--max-restarts=20",
        "--command=env PYTHONUNBUFFERED=1 TPU_STDERR_LOG_LEVEL=2 TF_CPP_MIN_LOG_LEVEL=2 python -m sea_jax.train "
        "--config=configs/gemma2b.py --workdir=gs://b/ms",
        "--zone=us-west4-a", "--project=p",
    ]


# What the trainer does with its command line (sea_jax.cli.run_absl): its module defines the flags,
# absl parses argv (config_flags reads the --config.x overrides from sys.argv, so this runs as its
# own process with the trainer's argv as sys.argv[1:]), then the values are read.
PARSE_AS_TRAINER = """
import importlib, json, sys
from absl import flags
importlib.import_module("sea_jax.train.__main__")
flags.FLAGS(sys.argv)
c = flags.FLAGS.config
print(json.dumps({"workdir": flags.FLAGS.workdir, "batch_size": c.train.batch_size, "llm": c.llm.checkpoint,
                  "microbatches": c.train.microbatches, "locked": c.is_locked}))
"""


def test_xpk_workload_argv_parses_with_the_trainers_own_flags():
    """The xpk workload's trainer argv keeps gs:// as given, and the trainer's real flags accept it:
    the config file loads, the overrides apply, the workdir is the gs:// string (no bucket needed:
    nothing is read or written while parsing)."""
    cmds = dry("xpk", "--cluster=c1", "--name=sea", "--slice=v4-32", "--image=gcr.io/p/sea:1",
               "--config=configs/gemma2b.py", "--workdir=gs://runs/sea-xpk", "--",
               "--config.train.batch_size=96", "--config.llm.checkpoint=gs://models/gemma 2b")
    (command,) = [a.removeprefix("--command=") for a in cmds[1] if a.startswith("--command=")]
    words = shlex.split(command)
    i = words.index("sea_jax.train")
    assert words[i - 2:i] == ["python", "-m"]
    argv = words[i + 1:]
    assert argv == ["--config=configs/gemma2b.py", "--workdir=gs://runs/sea-xpk", "--config.train.batch_size=96",
                    "--config.llm.checkpoint=gs://models/gemma 2b"]
    pytest.importorskip("ml_collections")
    proc = subprocess.run([sys.executable, "-c", PARSE_AS_TRAINER, *argv], check=False, capture_output=True,
                          text=True, timeout=300, cwd=str(ROOT), env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    parsed = json.loads(proc.stdout.splitlines()[-1])
    # microbatches is configs/gemma2b.py's own value (not the schema default): the file was loaded
    import importlib.util

    spec = importlib.util.spec_from_file_location("gemma2b_cfg", ROOT / "configs" / "gemma2b.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from sea_jax.config import base_config

    own = mod.get_config().train.microbatches
    assert own != base_config().train.microbatches
    assert parsed == {"workdir": "gs://runs/sea-xpk", "batch_size": 96, "llm": "gs://models/gemma 2b",
                      "microbatches": own, "locked": True}


def test_dry_run_after_double_dash_still_dry():
    """'--dry-run' misplaced after '--' (where flags go to sea_jax.train) must still run nothing."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "train", "--name=s", "--slice=v4-8", "--config=c.py", "--workdir=gs://w", "--",
         "--config.seed=1", "--dry-run"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/nonexistent"},  # gcloud unreachable anyway
    )
    assert proc.returncode == 0, proc.stderr
    (cmd,) = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert "--config.seed=1" in cmd[-1] and "--dry-run" not in cmd[-1]
