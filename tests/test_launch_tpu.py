"""launch_tpu/tpu.py --dry-run: the exact commands for representative slices.

The script is run as a subprocess (as a user runs it) and its printed commands are compared
token by token, so a changed flag, zone, worker selector or env var fails here.
"""
import importlib.util
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
    # gs:// paths become the workers' gcsfuse mounts (sea_jax reads and writes plain files)
    assert ("~/sea_venv/bin/python -m sea_jax.train --config=configs/gemma2b.py --workdir=/gcs/b/run1 "
            "--config.train.batch_size=128 > ~/sea_run/train.log 2>&1; echo $? > ~/sea_run/exit_code") in inner
    assert remote.startswith("mkdir -p ~/sea_run && { if [ -f ~/sea_run/pid ]; then kill -- -$(cat ~/sea_run/pid)")
    assert ("sudo mkdir -p /gcs/b && sudo chown $USER /gcs/b && { mountpoint -q /gcs/b || "
            "gcsfuse --implicit-dirs b /gcs/b; } && setsid nohup") in remote


def test_every_bucket_a_run_names_is_mounted():
    cmds = dry("train", "--name=s", "--slice=v4-8", "--config=configs/gemma2b.py", "--workdir=gs://runs/r1", "--",
               "--config.llm.checkpoint=gs://models/gemma-2b", "--config.data.json=/local/data.json")
    remote = cmds[0][8].removeprefix("--command=")
    assert remote.count("gcsfuse --implicit-dirs") == 2
    assert "gcsfuse --implicit-dirs models /gcs/models" in remote and "gcsfuse --implicit-dirs runs /gcs/runs" in remote
    assert "--config.llm.checkpoint=/gcs/models/gemma-2b --config.data.json=/local/data.json" in remote
    assert "gs://" not in remote
    # local paths only: nothing to mount
    local = dry("train", "--name=s", "--slice=v4-8", "--config=c.py", "--workdir=/mnt/run")[0][8]
    assert "gcsfuse" not in local


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
    first = [shlex.split(line) for line in head.splitlines()]
    assert first[0][4] == "create" and first[1][4] == "describe" and first[1][-1] == "--format=value(state.state)"
    assert first[-1][4] == "ssh" and "sea_jax.train" in first[-1][-1]
    rec = [shlex.split(line) for line in recovery.splitlines()]
    # delete, then the same bring-up and launch again: the run resumes from gs://b/r's checkpoint
    assert rec[0][3:5] == ["queued-resources", "delete"] and rec[1:] == first[:1] + first[2:]
    poll = [shlex.split(line) for line in polling.splitlines()]
    assert poll[1][7] == "--worker=0" and "exit_code" in poll[1][8]


class FakeRunner(tpu.Runner):
    """Scripted gcloud: states and exit codes come from queues; records what was run."""

    def __init__(self, states, codes):
        super().__init__(dry_run=False, out=open("/dev/null", "w"))
        self.states, self.codes, self.ran = list(states), list(codes), []

    def run(self, cmd, check=True):
        self.ran.append(list(cmd))
        return 0

    def output(self, cmd):
        if "describe" in cmd:
            return self.states.pop(0)
        return self.codes.pop(0)


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
