"""sea_jax.metrics: the FLOP formula on hand-computed cases, the peak table, the TensorBoard event
encoding (CRC-32C test vector, round trip), metrics.jsonl."""
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax import metrics as M


def _spec(**kw):
    base = dict(batch=2, seq_len=10, llm_matmul_params=1000, llm_layers=2, llm_heads=4, llm_head_dim=8,
                vision_params=300, vision_layers=3, vision_width=16, patches=4, adapter_params=50)
    base.update(kw)
    return M.FlopSpec(**base)


def test_stage1_flops_by_hand():
    f = M.train_step_flops(_spec(trainable=frozenset({"adapter"})))
    img, tok = 2 * 4, 2 * 10
    # SigLIP frozen, nothing upstream trained: forward only, attention forward only
    assert f["vision"] == img * (2 * 300 + 4 * 3 * 16 * 4)
    # adapter trained: 6N
    assert f["adapter"] == img * 6 * 50
    # LLM frozen but the gradient crosses it: 4N, attention fwd + bwd = 3x forward
    assert f["llm"] == tok * (4 * 1000 + 3 * 4 * 2 * 4 * 8 * 10)
    assert f["labels"] == 0
    assert f["total"] == f["vision"] + f["adapter"] + f["llm"]


def test_stage2_and_prime_flops():
    s2 = M.train_step_flops(_spec(trainable=frozenset({"adapter", "llm"})))
    assert s2["llm"] == 2 * 10 * (6 * 1000 + 3 * 4 * 2 * 4 * 8 * 10)
    assert s2["adapter"] == 8 * 6 * 50
    prime = M.train_step_flops(_spec(trainable=frozenset({"adapter", "llm", "vision"})))
    assert prime["vision"] == 8 * (6 * 300 + 3 * 4 * 3 * 16 * 4)
    # vision trained, adapter frozen: the adapter still carries the gradient (4N)
    only_v = M.train_step_flops(_spec(trainable=frozenset({"vision"})))
    assert only_v["adapter"] == 8 * 4 * 50
    lab = M.train_step_flops(_spec(label_words=100, label_dim=16))
    assert lab["labels"] == 2 * 8 * 100 * 16
    with pytest.raises(ValueError):
        M.train_step_flops(_spec(trainable=frozenset({"decoder"})))


def test_llm_matmul_params_tied_and_untied():
    tied = {"embedder": {"embedding": np.zeros((100, 8))}, "layers": {"w": np.zeros((8, 8))}}
    assert M.llm_matmul_params(tied, 100, 8) == 64 + 800  # the table serves as the LM head
    untied = dict(tied, lm_head={"kernel": np.zeros((8, 100))})
    assert M.llm_matmul_params(untied, 100, 8) == 64 + 800


def test_peak_table():
    assert M.peak_tflops("TPU v4") == 275
    assert M.peak_tflops("TPU v5 lite") == 197
    assert M.peak_tflops("TPU v5p") == 459
    assert M.peak_tflops("TPU v6 lite") == 918
    assert M.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert M.peak_tflops("NVIDIA H100 PCIe") == 756
    assert M.peak_tflops("NVIDIA H200") == 989
    assert M.peak_tflops("NVIDIA A100-SXM4-40GB") == 312
    assert M.peak_tflops("cpu") is None
    assert M.peak_tflops(jax.devices()[0].device_kind) is None  # the test host is a CPU


def test_crc32c_vector_and_event_round_trip(tmp_path):
    assert M.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    w = M.EventWriter(str(tmp_path))
    w.scalars(3, {"loss": 1.5, "lr": 1e-3, "mfu": None, "bad": float("nan")})
    w.scalars(4, {"loss": 1.25})
    w.close()
    ev = M.read_events(w.path)
    assert ev[0]["file_version"] == "brain.Event:2"
    assert ev[1]["step"] == 3 and ev[1]["scalars"] == {"loss": 1.5, "lr": pytest.approx(1e-3)}
    assert ev[2]["step"] == 4 and ev[2]["scalars"] == {"loss": 1.25}
    # a flipped byte is caught by the CRC
    data = bytearray(open(w.path, "rb").read())
    data[-6] ^= 0xFF
    open(w.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        M.read_events(w.path)


def test_event_wire_format_by_hand():
    # Event{wall_time=1.0, step=5, summary{value{tag="a", simple_value=2.0}}}
    got = M.encode_event(1.0, 5, {"a": 2.0})
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 2.0)
    want = b"\x09" + struct.pack("<d", 1.0) + b"\x10\x05" + b"\x2a" + bytes([len(value) + 2]) + b"\x0a" + bytes([len(value)]) + value
    assert got == want


def test_metrics_logger_jsonl_and_resume_truncation(tmp_path):
    log = M.MetricsLogger(str(tmp_path), total_steps=5, progress=False)
    for s in (1, 2, 3):
        log.log(s, {"loss": jnp.asarray(2.0 / s), "mfu": None, "n": np.int32(s)})
    log.close()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[0] == {"step": 1, "loss": 2.0, "mfu": None, "n": 1}
    # a resume from step 2 drops step 3 (recomputed by the resumed run)
    M.MetricsLogger(str(tmp_path), total_steps=5, initial_step=2, progress=False).close()
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]
    off = M.MetricsLogger(str(tmp_path / "other"), total_steps=5, enabled=False)
    off.log(1, {"loss": 1.0})
    off.close()
    assert not (tmp_path / "other").exists()
