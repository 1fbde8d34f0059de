"""Training logs: FLOP accounting (TFLOP/s, MFU), a TensorBoard event writer, ``metrics.jsonl``
and the progress bar.

FLOPs of one train step (:func:`train_step_flops`, a pure function of sizes). Conventions, per
token that goes through a part (padding included: it is computed, and MFU measures the hardware):

* A matmul with an N-parameter weight costs 2N FLOPs forward. Its backward costs 2N for the
  activation gradient (needed whenever the gradient has to flow *through* the part to reach
  something trainable upstream) plus 2N for the weight gradient (only if the part is trained).
* trainable part: ``6 N`` (forward + activation grad + weight grad).
* frozen part the gradient flows through: ``4 N`` (forward + activation grad, no weight grad).
  In stage 1 this is the LLM: frozen, but L_lm's gradient must cross it to reach the adapter.
* frozen part with nothing trainable upstream: ``2 N`` (forward only). This is SigLIP unless it
  is trained (SEA-PRIME): its input is pixels, so no gradient is computed through it.
* N counts the weights used in matmuls: all parameters except the LLM's input embedding table
  (a gather, no FLOPs), plus the LM head (``vocab x hidden``, which for tied embeddings is the
  table itself). Norm scales and biases are included (negligible).
* Attention scores and the weighted sum (QK^T and AV) have no weights: ``4 * layers * heads *
  head_dim * context`` FLOPs per token forward (2 matmuls x 2 FLOP/MAC), counted over the full
  context (no causal saving: PaLM's appendix-B convention, what MaxText-style MFU reports use),
  times 3 when the gradient flows through (both operands are activations, so the backward costs
  twice the forward whether or not the part's weights are trained).
* SEA extras: on-the-fly labelling scores every patch against the word table
  (``2 * patches * words * joint_dim`` per image, forward only); the per-patch MAP head is counted
  in the SigLIP part's N. The alignment loss (N x N logits over kept pairs) is data dependent and
  small against the rest; it is not counted.

MFU = achieved FLOP/s per device / the chip's peak dense bf16 FLOP/s (:data:`PEAK_TFLOPS`, looked
up from ``jax.devices()[0].device_kind``; None on CPU or an unknown chip).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Peak dense bf16 TFLOP/s per chip (vendor datasheets). Matched against ``device_kind`` in order,
# first substring wins, so more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0),  # Trillium (v6e)
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),  # v5e reports "TPU v5 lite"
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v4", 275.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s of one chip of this ``device_kind``, None if unknown (e.g. CPU)."""
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


# ----------------------------------------------------------------------------------------------
# FLOPs


@dataclasses.dataclass(frozen=True)
class FlopSpec:
    """Sizes that determine one train step's FLOPs (see the module docstring).

    Attributes:
      batch: global batch (images = sequences).
      seq_len: LLM sequence length (padded).
      llm_matmul_params: LLM weights used in matmuls (all but the input embedding table, plus the
        LM head; see :func:`llm_matmul_params`).
      llm_layers, llm_heads, llm_head_dim: attention sizes of the LLM.
      vision_params: SigLIP image-tower parameters (incl. the MAP head when labelling on the fly).
      vision_layers, vision_width: image-tower depth and width (attention FLOPs; width = heads x
        head_dim).
      patches: patches (= visual tokens) per image.
      adapter_params: adapter parameters.
      trainable: names of the trained parts among ``"vision"``, ``"adapter"``, ``"llm"``.
      label_words, label_dim: word-table size and joint dim for on-the-fly labelling (0 = off).
    """

    batch: int
    seq_len: int
    llm_matmul_params: int
    llm_layers: int
    llm_heads: int
    llm_head_dim: int
    vision_params: int
    vision_layers: int
    vision_width: int
    patches: int
    adapter_params: int
    trainable: frozenset[str] = frozenset({"adapter"})
    label_words: int = 0
    label_dim: int = 0


def _mult(trained: bool, grad_through: bool) -> int:
    """FLOPs per weight per token in units of 2N: forward, + activation grad, + weight grad."""
    return 2 * (1 + int(grad_through or trained) + int(trained))


def train_step_flops(spec: FlopSpec) -> dict[str, float]:
    """FLOPs of one train step by part, and ``total``.

    Returns keys ``vision``, ``adapter``, ``llm``, ``labels``, ``total`` (float FLOPs for the
    global batch). The gradient flows through a part iff something upstream of it is trained:
    vision <- adapter <- llm in data-flow order, so the LLM carries gradients whenever the adapter
    or vision is trained, and the adapter whenever vision is.
    """
    t = spec.trainable
    unknown = set(t) - {"vision", "adapter", "llm", "log_tau"}
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}")
    v_tr, a_tr, l_tr = "vision" in t, "adapter" in t, "llm" in t
    img_tokens = spec.batch * spec.patches
    llm_tokens = spec.batch * spec.seq_len

    # vision: nothing upstream of pixels, so only its own training makes a gradient flow
    v_mult = _mult(v_tr, False)
    v_attn = 4 * spec.vision_layers * spec.vision_width * spec.patches * (3 if v_tr else 1)
    vision = img_tokens * (v_mult * spec.vision_params + v_attn)

    a_mult = _mult(a_tr, v_tr)
    adapter = img_tokens * a_mult * spec.adapter_params

    l_through = a_tr or v_tr
    l_mult = _mult(l_tr, l_through)
    l_attn = 4 * spec.llm_layers * spec.llm_heads * spec.llm_head_dim * spec.seq_len * (3 if (l_tr or l_through) else 1)
    llm = llm_tokens * (l_mult * spec.llm_matmul_params + l_attn)

    labels = 2.0 * img_tokens * spec.label_words * spec.label_dim
    out = {"vision": float(vision), "adapter": float(adapter), "llm": float(llm), "labels": float(labels)}
    out["total"] = sum(out.values())
    return out


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def llm_matmul_params(llm_params: Mapping, vocab_size: int, hidden: int) -> int:
    """LLM weights that cost FLOPs per token: all but the input embedding (a gather), plus the LM
    head (an untied ``lm_head`` is already in the tree; a tied head reuses the table)."""
    total = count_params(llm_params)
    emb = count_params(llm_params["embedder"]["embedding"])
    head_in_tree = "lm_head" in llm_params
    return total - emb + (0 if head_in_tree else vocab_size * hidden)


# ----------------------------------------------------------------------------------------------
# TensorBoard event files, without TensorFlow
#
# An event file is a sequence of records: uint64 length, uint32 masked CRC-32C of the length,
# the payload (a serialized tensorflow.Event protobuf), uint32 masked CRC-32C of the payload.
# Event{wall_time=1: double, step=2: int64, file_version=3: string, summary=5: Summary};
# Summary{value=1: repeated Value}; Value{tag=1: string, simple_value=2: float}. The protobuf
# wire format is written by hand: these four messages are all TensorBoard's scalar plots need.


def _crc32c_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _len_delimited(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """A serialized ``tensorflow.Event`` with scalar summaries (or the file-version header)."""
    msg = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        msg += _len_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _len_delimited(1, _len_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items()
        )
        msg += _len_delimited(5, values)
    return msg


def _record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", _masked_crc(header)) + payload + struct.pack("<I", _masked_crc(payload))


class EventWriter:
    """Appends scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>`` (TensorBoard
    reads it with ``tensorboard --logdir``). Local paths only; the file is flushed per write so a
    killed run loses at most the current record."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._f = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        self._f.write(_record(payload))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(float(v))}
        if finite:
            self._write(encode_event(time.time(), step, finite))

    def close(self) -> None:
        self._f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _parse(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message (types 0, 1, 2, 5)."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _read_varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, val


def read_events(path: str) -> list[dict]:
    """Decodes an event file written by :class:`EventWriter` (CRCs checked):
    ``[{"step", "wall_time", "file_version"?, "scalars": {tag: value}}]``."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        payload = data[i + 12:i + 12 + n]
        (pcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if hcrc != _masked_crc(header) or pcrc != _masked_crc(payload):
            raise ValueError(f"{path}: bad CRC in the record at byte {i}")
        i += 16 + n
        ev: dict[str, Any] = {"scalars": {}}
        for num, _, val in _parse(payload):
            if num == 1:
                ev["wall_time"] = struct.unpack("<d", val)[0]
            elif num == 2:
                ev["step"] = val
            elif num == 3:
                ev["file_version"] = val.decode()
            elif num == 5:
                for _, _, v in _parse(val):
                    fields = {k: x for k, _, x in _parse(v)}
                    ev["scalars"][fields[1].decode()] = struct.unpack("<f", fields[2])[0]
        out.append(ev)
    return out


# ----------------------------------------------------------------------------------------------
# The run's logger


class MetricsLogger:
    """metrics.jsonl + TensorBoard + a tqdm bar, on the process that logs (process 0).

    ``log(step, metrics)`` writes one JSON line (``{"step": .., **metrics}``, floats; None for
    unavailable values such as MFU on CPU), the finite scalars to TensorBoard, and the key metrics
    to the bar's postfix. Other processes get a logger with ``enabled=False``: every call is a
    no-op, so the loop needs no ``if process_index == 0``.
    """

    BAR_KEYS = ("loss", "lm_loss", "align_loss", "lr", "tokens_per_s", "mfu")

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        _truncate_after(self.jsonl_path, initial_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = EventWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._tb.scalars(step, {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(row[k]) for k in self.BAR_KEYS if row.get(k) is not None}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Drops rows logged after ``step`` (a run killed after its last checkpoint logged steps that
    the resumed run recomputes), so metrics.jsonl reads as one trajectory."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):  # a line cut by a kill mid-write
            continue
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _to_py(v: Any) -> Any:
    if v is None or isinstance(v, (str, bool)):
        return v
    a = np.asarray(v)
    if a.ndim == 0:
        return a.item()  # NaN stays NaN (json writes it): a diverged loss must be visible
    return a.tolist()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
