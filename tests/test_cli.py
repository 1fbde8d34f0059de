"""Every command line: usage on ``--help`` (exit 0), a user's mistake as one clear line and exit 2
with no traceback, every path field the command needs named at once."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ["train", "labels", "aot", "export", "generate", "probe", "eval", "records"]
RECIPES = ["gemma2b", "gemma2b_finetune", "vicuna7b", "vicuna7b_finetune", "llama3_8b", "llama3_8b_finetune",
           "phi3_mini", "phi3_mini_finetune", "vicuna13b", "vicuna13b_finetune", "clip_vicuna7b",
           "clip_vicuna7b_finetune", "clip_vicuna13b", "clip_vicuna13b_finetune", "s2_vicuna7b", "s2_vicuna7b_finetune"]


def run(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_prints_usage_and_exits_0(tool):
    p = run(f"sea_jax.{tool}", "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"python -m sea_jax.{tool}" in p.stdout and "Traceback" not in p.stdout + p.stderr


@pytest.mark.parametrize("name", RECIPES)
def test_train_and_labels_name_every_path_to_set(name, tmp_path):
    """The recipes ship placeholders: both commands stop before loading anything, exit 2, name
    every path field the user must set, and print no traceback."""
    cfg = f"--config=configs/{name}.py"
    for tool, fields in (("sea_jax.train", ["llm.checkpoint", "vision.checkpoint", "data.json", "data.image_root"]),
                         ("sea_jax.labels", ["vision.checkpoint", "data.json", "data.image_root"])):
        p = run(tool, cfg, f"--workdir={tmp_path / tool}")
        assert p.returncode == 2, (tool, p.stderr[-3000:])
        assert "Traceback" not in p.stderr and p.stderr.startswith("error: cannot start"), p.stderr[-3000:]
        for field in fields:
            assert f"--config.{field}=" in p.stderr, (tool, field, p.stderr)
        if tool == "sea_jax.train" and name.endswith("_finetune"):
            assert "config.train.init_from" in p.stderr
        assert "config.llm.tokenizer" not in p.stderr and "config.vision.tokenizer" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--config.data.template=chatml"], "config.data.template='chatml': expected one of"),
    (["--config.train.nonsense=1"], "nonsense"),
    (["--config=configs/nope.py"], "nope.py"),
    (["unexpected"], "unexpected arguments"),
])
def test_train_user_errors_exit_2_without_traceback(args, message, tmp_path):
    base = ["--config=configs/gemma2b.py", f"--workdir={tmp_path}"]
    if args[0].startswith("--config="):
        base = [f"--workdir={tmp_path}"]
    p = run("sea_jax.train", *base, *args)
    assert p.returncode == 2, p.stderr[-3000:]
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]


def test_missing_required_flag_and_bad_export_workdir(tmp_path):
    p = run("sea_jax.train", "--config=configs/tiny.py")
    assert p.returncode == 2 and "--workdir" in p.stderr and "Traceback" not in p.stderr
    p = run("sea_jax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'hf'}")
    assert p.returncode == 2 and "is not a sea_jax.train workdir" in p.stderr and "Traceback" not in p.stderr
