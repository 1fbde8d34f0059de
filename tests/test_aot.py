"""AOT compile of a tiny SEA train step for a TPU topology on this (CPU) host.

Needs libtpu (the ``test`` extra pins the version jax expects); without it the TPU-compile tests
skip with the reason. Topology mapping, mesh sizing and the memory arithmetic are tested without
libtpu.
"""
import dataclasses
import json
import subprocess
import sys
import types

import pytest

from sea_jax import aot
from sea_jax.config import base_config
from sea_jax.errors import ConfigError

TINY_LLM = dict(vocab_size=512, hidden=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, mlp_dim=128)
TINY_SIGLIP = dict(
    width=64, depth=2, mlp_dim=128, num_heads=4, text_width=64, text_depth=1, text_mlp_dim=128,
    text_num_heads=4, out_dim=64,
)


def tiny_config(stage=1):
    c = base_config()
    c.llm.preset = "gemma_2b"
    c.llm.overrides = dict(TINY_LLM)
    c.vision.variant = "B/16"
    c.vision.image_size = 64
    c.vision.overrides = dict(TINY_SIGLIP)
    c.labels.default_size = 256
    c.train.batch_size = 8
    c.data.max_length = 64
    if stage == 2:
        c.train.trainable = ("adapter", "llm")
        c.mesh.data, c.mesh.fsdp = 1, -1
    return c


def _need_libtpu():
    ok, why = aot.libtpu_available()
    if not ok:
        print(f"SKIP reason: {why}")
        pytest.skip(why)


# ---------------------------------------------------------------------------------------------
# Without libtpu


@pytest.mark.parametrize(
    "name, topology, chips, hosts, hbm",
    [
        ("v4-8", "v4:2x2x1", 4, 1, 32),
        ("v4-32", "v4:2x2x4", 16, 4, 32),
        ("v5e-16", "v5e:4x4", 16, 4, 16),
        ("v5litepod-8", "v5e:2x4", 8, 1, 16),
        ("v5e-256", "v5e:16x16", 256, 64, 16),
        ("v5p-16", "v5p:2x2x2", 8, 2, 95),
        ("v6e-8", "v6e:2x4", 8, 1, 32),
    ],
)
def test_topology_table(name, topology, chips, hosts, hbm):
    t = aot.get_topology(name)
    assert (t.topology, t.chips, t.hosts, t.hbm_gib) == (topology, chips, hosts, hbm)


def test_raw_topology_and_unknown():
    t = aot.get_topology("v4:2x2x2")
    assert (t.chips, t.hosts, t.hbm_gib, t.chip_config) == (8, 2, 32, "megacore")
    with pytest.raises(KeyError):
        aot.get_topology("v3-8")


def test_resolve_mesh_sizes():
    assert aot.resolve_mesh_sizes({"data": -1, "fsdp": 2, "tensor": 1}, 16) == {"data": 8, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError):
        aot.resolve_mesh_sizes({"data": 3, "fsdp": 1, "tensor": 1}, 16)
    with pytest.raises(ValueError):
        aot.resolve_mesh_sizes({"data": -1, "fsdp": 3, "tensor": 1}, 16)


def test_memory_totals_subtracts_donated_once():
    stats = types.SimpleNamespace(
        argument_size_in_bytes=100, output_size_in_bytes=90, alias_size_in_bytes=80,
        temp_size_in_bytes=50, generated_code_size_in_bytes=7,
    )
    assert aot.memory_totals(stats)["total_bytes"] == 100 + 90 - 80 + 50 + 7


def test_model_flops_stage2_exceeds_stage1():
    """Training the LLM adds its weight gradients: 6N vs 4N per token on the LLM's matmuls."""
    s1, s2 = tiny_config(1), tiny_config(2)
    f1, f2 = aot.model_flops(s1), aot.model_flops(s2)
    assert f2["llm"] > f1["llm"] and f1["labels"] > 0 and f2["total"] == pytest.approx(sum(v for k, v in f2.items() if k != "total"))
    llm_tokens = s1.train.batch_size * s1.data.max_length
    assert (f2["llm"] - f1["llm"]) / llm_tokens > 2 * TINY_LLM["vocab_size"] * TINY_LLM["hidden"]


# ---------------------------------------------------------------------------------------------
# With libtpu: a real TPU compile


@pytest.fixture(scope="module")
def stage1_buckets():
    """Every bucket of the tiny stage-1 config with a half-length bucket added (the LM head on the
    target slots there: a different program from the full length's)."""
    _need_libtpu()
    c = tiny_config(1)
    c.data.length_buckets = str(c.data.max_length // 2)
    return aot.compile_buckets(c, "v4:2x2x1", config_name="tiny1")


@pytest.fixture(scope="module")
def stage1_report(stage1_buckets):
    return stage1_buckets[0]


def test_all_buckets_compile_largest_first_with_one_verdict(stage1_buckets):
    full, half = stage1_buckets
    assert (full.max_length, half.max_length) == (64, 32)
    assert half.model_flops < full.model_flops and full.fits and half.fits
    text = aot.buckets_text(stage1_buckets)
    assert "bucket     64" in text and "bucket     32" in text and "VERDICT     FITS (every bucket)" in text
    worst = max(stage1_buckets, key=lambda r: r.total_bytes)
    assert f"most HBM    bucket {worst.max_length} " in text
    # One bucket that does not fit makes the verdict for the config
    text = aot.buckets_text([full, dataclasses.replace(half, fits=False)])
    assert text.endswith("VERDICT     DOES NOT FIT (bucket 32)")


def test_cli_all_buckets_and_length_together_is_a_usage_error(tmp_path):
    _need_libtpu()
    cfg = tmp_path / "tiny.py"
    cfg.write_text("from tests.test_aot import tiny_config\ndef get_config():\n    return tiny_config(1)\n")
    cmd = [sys.executable, "-m", "sea_jax.aot", f"--config={cfg}", "--all_buckets", "--length=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(_repo_root()))
    assert proc.returncode == 2 and "drop --length" in proc.stderr and "Traceback" not in proc.stderr


def test_tpu_compile_reports_memory(stage1_report):
    r = stage1_report
    assert r.devices == 4 and r.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    for field in ("argument_bytes", "output_bytes", "generated_code_bytes", "total_bytes"):
        assert getattr(r, field) > 0, field
    # The tiny program's temporaries may all fit the compiler's on-chip memory: 0 HBM bytes then.
    assert r.temp_bytes >= 0
    # The donated state is aliased into the outputs (step donates argument 0).
    assert 0 < r.alias_bytes <= r.output_bytes
    assert r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes + r.generated_code_bytes
    assert r.hbm_bytes == 32 * aot.GIB and r.fits and r.verdict == "FITS"
    assert r.compiled_flops > 0 and r.compiled_flops == r.compiled_flops_per_device * 4
    assert "VERDICT     FITS" in r.text()


def test_compiled_flops_count_every_layer(stage1_report):
    """The LLM's two layers run in a scan (forward and backward loops of 2 trips): the compiled
    count multiplies them, so without remat it matches the analytic count closely, while XLA's
    cost_analysis (each loop body once) falls short of it."""
    r = stage1_report
    assert r.scan_layers and r.unknown_loops == 0
    assert sorted(d["trips"] for d in r.loops) == [TINY_LLM["n_layers"]] * 2
    assert 0.9 < r.recompute_factor < 1.2, (r.compiled_flops, r.model_flops)
    assert r.cost_analysis_flops < r.compiled_flops and 0 < r.compiled_flops_smallest_branches <= r.compiled_flops
    assert "recompute factor" in r.text() and r.to_json()["recompute_factor"] == r.recompute_factor


def test_each_length_bucket_compiles_and_shorter_needs_less(stage1_report):
    """A config's smaller bucket compiles to a program with less memory and fewer FLOPs than the
    largest (the default) when both run the same LM head; a length outside the set is refused."""
    c = tiny_config(1)
    # 3/4 of the length: the LM head runs on every position at both lengths (at half, the target
    # slots would halve it, a different program: mllm.head_capacity)
    n = c.data.max_length * 3 // 4
    c.data.length_buckets = str(n)
    short = aot.compile_config(c, "v4:2x2x1", length=n)
    assert short.max_length == n and stage1_report.max_length == c.data.max_length
    assert short.temp_bytes <= stage1_report.temp_bytes and short.model_flops < stage1_report.model_flops
    with pytest.raises(ConfigError, match="not one of the config's buckets"):
        aot.compile_config(c, "v4:2x2x1", length=c.data.max_length - 1)


def test_margin_arithmetic(stage1_report):
    r = stage1_report
    assert r.margin_bytes == r.hbm_bytes - int(0.5 * aot.GIB) - r.total_bytes


def test_microbatch_that_does_not_split_over_the_chips_is_refused():
    """128 rows in 16 microbatches are 8 rows each: fine on 4 chips, not on 16 (v4-32); the error
    names the field and the divisors that work, before any compile."""
    _need_libtpu()
    c = tiny_config(2)
    c.train.batch_size, c.train.microbatches = 128, 16
    with pytest.raises(ValueError, match=r"microbatches of 8 rows.*16 batch shards.*v4-32.*divisor of 8"):
        aot.compile_config(c, "v4-32")


def test_parse_compiler_oom():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(212.22G) exceeds available HBM (30.75G).")
    need, have = aot.parse_compiler_oom(msg)
    assert need == int(212.22 * aot.GIB) and have == int(30.75 * aot.GIB)
    assert aot.parse_compiler_oom("INTERNAL: something else") is None


def test_cli_does_not_fit_exits_1_with_json(tmp_path):
    """A batch whose logits alone (4096 x 8192 x 512 float32 = 64 GiB, 16 GiB per chip) overflow
    four 16 GiB v5e chips: the TPU compiler refuses it, the report says DOES NOT FIT with the
    compiler's stated requirement, and the CLI exits 1."""
    _need_libtpu()
    cfg = tmp_path / "tiny_big.py"
    cfg.write_text("from tests.test_aot import tiny_config\ndef get_config():\n    return tiny_config(1)\n")
    cmd = [sys.executable, "-m", "sea_jax.aot", f"--config={cfg}", "--topology=v5e:2x2", "--json",
           "--config.train.batch_size=4096", "--config.data.max_length=8192"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(_repo_root()))
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["verdict"] == "DOES NOT FIT" and out["hbm_bytes"] == 16 * aot.GIB and out["devices"] == 4
    assert out["temp_bytes"] > 16 * aot.GIB and out["margin_bytes"] < 0
    assert "RESOURCE_EXHAUSTED" in out["compiler_error"] and out["argument_bytes"] > 0


def test_fsdp_sharding_shrinks_per_chip_arguments():
    """Stage 2 trains the LLM: FSDP over 4 chips keeps a quarter of its parameters and Adam moments
    (12 bytes a parameter) per chip instead of all of them, in the compiled program too (the mesh
    reaches the compile). Norm scales stay replicated, hence 0.6 of the 9 bytes saved."""
    _need_libtpu()
    from sea_jax.models import llm as llm_lib

    rep = tiny_config(2)
    rep.mesh.data, rep.mesh.fsdp = -1, 1
    r_rep = aot.compile_config(rep, "v4:2x2x1")
    r_fsdp = aot.compile_config(tiny_config(2), "v4:2x2x1")
    assert r_fsdp.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and r_rep.mesh["data"] == 4
    from sea_jax import builder

    n_llm = llm_lib.param_count(builder.model_config(rep, builder.read_sources(rep)).llm)
    assert r_rep.argument_bytes - r_fsdp.argument_bytes > 0.6 * 12 * n_llm


def _repo_root():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[1]
