"""sea_jax.metrics: the FLOP formula on hand-computed cases and the peak table. (metrics.jsonl and
the TensorBoard events are sea_jax.tracking's, tested in tests/test_observe.py.)"""
import jax
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


def test_lm_head_counted_on_its_positions_only():
    """The head (part of llm_matmul_params) runs on head_positions of the seq_len positions."""
    full = M.train_step_flops(_spec(head_params=400))
    assert full == M.train_step_flops(_spec())  # head_positions 0: every position
    few = M.train_step_flops(_spec(head_params=400, head_positions=3))
    # stage 1: LLM frozen, gradient through it (4N); 2 rows x 7 positions without the head
    assert full["llm"] - few["llm"] == 2 * 7 * 4 * 400
    assert full["total"] - few["total"] == 2 * 7 * 4 * 400
