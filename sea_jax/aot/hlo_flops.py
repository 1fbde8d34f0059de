"""Matmul FLOPs of a compiled XLA program read from its HLO text, with every loop trip counted.

``compiled.cost_analysis()`` walks the HLO once: the body of a ``while`` loop is counted as if it
ran one time. A train step is mostly loops (the LLM's layer ``scan``, the vision tower's scanned
blocks, gradient accumulation over microbatches, chunked LM head and word scoring), so its
``flops`` miss most of the work. :func:`loop_aware_flops` counts the same matmuls from the
optimized HLO (``compiled.as_text()``) but multiplies each loop body by its trip count, nested
loops multiplying.

What is counted, per instruction (the module is the SPMD-partitioned one, so the counts are per
device):

* ``dot``: ``2 x (output elements) x (product of the lhs contracting dimensions)``;
* ``convolution`` (the TPU compiler rewrites most dots as convolutions): ``2 x (output
  elements) x (kernel input features) x (kernel taps that land inside the input)``, the count
  of XLA's own cost analysis (padding taps are not counted);
* called computations: fusions (``calls=``), ``call``, ``async-start``, each once per call;
  ``conditional`` takes its most expensive branch (an upper bound: which branch runs is data;
  the count with the cheapest branches is returned too);
  ``while`` multiplies its body by the trip count.

Elementwise ops, reductions, transcendentals and collectives are not counted (the analytic
:func:`sea_jax.metrics.train_step_flops` counts matmul FLOPs only; the elementwise rest is a few
percent of a transformer step). ``custom-call`` bodies are opaque: their targets are listed in the
result so a kernel with FLOPs (a Pallas call) is visible as missing, not silently dropped.

Trip counts: from the ``known_trip_count`` XLA puts in a loop's ``backend_config`` (the CPU
compiler does), else derived from the loop itself: the condition compares one tuple element of
the loop state (the induction variable) with a constant, the body adds a constant to that
element, and the ``tuple`` that starts the loop sets it to a constant (what ``lax.scan`` and
``lax.fori_loop`` with static bounds lower to; the TPU compiler keeps that shape and drops the
annotation). A loop that matches neither is counted once and reported in ``unknown_loops``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# ----------------------------------------------------------------------------------------------
# Parsing the HLO text

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass
class _Instr:
    name: str
    type: str  # the result type as printed: ``f32[8,16]{1,0}`` or a tuple ``(s32[], ...)``
    opcode: str
    operands: list[str]  # operand names (for a constant: its literal)
    attrs: str  # everything after the operands, quoted strings blanked
    trip: int | None  # known_trip_count from backend_config, if printed
    target: str  # custom_call_target
    op_name: str  # metadata op_name (where in the JAX program it came from)


@dataclasses.dataclass
class _Computation:
    name: str
    instrs: dict[str, _Instr]
    root: str


def _balanced(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_}{close} in HLO line: {text[:200]}")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (operand lists hold types like ``f32[2,3]{1,0}``)."""
    out, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur))
    return [s.strip() for s in out]


def _parse_instr(line: str) -> tuple[bool, _Instr] | None:
    m = _INSTR.match(line)
    if not m:
        return None
    is_root, name, rest = bool(m.group(1)), m.group(2), _COMMENT.sub("", m.group(3))
    # The result type: a tuple (balanced parentheses) or one token.
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_, rest = rest[:end], rest[end:].lstrip()
    else:
        type_, _, rest = rest.partition(" ")
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    opcode = om.group(1)
    end = _balanced(rest, om.end() - 1)
    operands = []
    for tok in _split_top(rest[om.end():end - 1]):
        # ``%name``, or ``type %name`` when operand types are printed; a constant's literal as is.
        names = re.findall(r"%([\w.\-]+)", tok)
        operands.append(names[-1] if names else tok)
    tail = rest[end:]
    trip = _TRIP.search(tail)
    target = _TARGET.search(tail)
    op_name = _OP_NAME.search(tail)
    return is_root, _Instr(
        name=name, type=type_, opcode=opcode, operands=operands, attrs=_QUOTED.sub('""', tail),
        trip=int(trip.group(1)) if trip else None, target=target.group(1) if target else "",
        op_name=op_name.group(1) if op_name else "",
    )


def _parse_hlo(hlo_text: str) -> tuple[dict[str, _Computation], str]:
    """({computation name: computation}, entry name) of an HLO module's text."""
    comps: dict[str, _Computation] = {}
    entry = ""
    cur: _Computation | None = None
    for line in hlo_text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = _Computation(m.group(2), {}, "")
                if m.group(1):
                    entry = cur.name
            continue
        if line.strip() == "}":
            comps[cur.name] = cur
            cur = None
            continue
        parsed = _parse_instr(line)
        if parsed is None:
            continue
        is_root, ins = parsed
        cur.instrs[ins.name] = ins
        if is_root:
            cur.root = ins.name
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _dims(type_: str) -> list[int]:
    """Dimensions of an array type (``bf16[4,<=8]{...}`` -> [4, 8])."""
    m = _ARRAY.search(type_)
    if not m or not m.group(2).strip():
        return []
    return [int(d.replace("<=", "")) for d in m.group(2).split(",")]


def _attr_list(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([\d,\s]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x.strip()] if m else []


def _attr_int(attrs: str, key: str, default: int) -> int:
    m = re.search(rf"\b{key}=(-?\d+)", attrs)
    return int(m.group(1)) if m else default


def _called(attrs: str, key: str) -> list[str]:
    """Computation names an attribute names: ``key=%c`` or ``key={%a, %b}``."""
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
    if m:
        return re.findall(r"%?([\w.\-]+)", m.group(1))
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return [m.group(1)] if m else []


# ----------------------------------------------------------------------------------------------
# FLOPs of one instruction


def _branches(attrs: str) -> list[str]:
    """The branch computations of a ``conditional`` (indexed or true / false form)."""
    return _called(attrs, "branch_computations") or (
        _called(attrs, "true_computation") + _called(attrs, "false_computation"))


def _operand_type(comp: _Computation, name: str) -> str:
    ins = comp.instrs.get(name)
    return ins.type if ins else ""


def _dot_flops(comp: _Computation, ins: _Instr) -> float:
    lhs = _dims(_operand_type(comp, ins.operands[0]))
    contract = math.prod(lhs[d] for d in _attr_list(ins.attrs, "lhs_contracting_dims"))
    return 2.0 * math.prod(_dims(ins.type)) * contract


def _valid_taps(out: int, kernel: int, inp: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, kernel tap) pairs along one spatial dimension whose input position is a
    real (not padding, not dilation-hole) element -- how XLA's cost analysis counts a window."""
    limit = (inp - 1) * lhs_dil  # last position of the dilated input
    total = 0
    for o in range(out):
        base = o * stride - pad_lo  # input position of tap 0
        if lhs_dil == 1:  # taps k with 0 <= base + k * rhs_dil <= limit, in closed form
            lo = max(0, -(base // rhs_dil))  # ceil(-base / rhs_dil)
            hi = min(kernel - 1, (limit - base) // rhs_dil) if limit >= base else -1
            total += max(0, hi - lo + 1)
        else:
            total += sum(1 for k in range(kernel)
                         if 0 <= base + k * rhs_dil <= limit and (base + k * rhs_dil) % lhs_dil == 0)
    return total


def _conv_flops(comp: _Computation, ins: _Instr) -> float:
    m = re.search(r"\bdim_labels=([\w]+)_([\w]+)->([\w]+)", ins.attrs)
    if not m:
        raise ValueError(f"convolution {ins.name} without dim_labels")
    lhs_l, rhs_l, out_l = m.groups()
    lhs = _dims(_operand_type(comp, ins.operands[0]))
    rhs = _dims(_operand_type(comp, ins.operands[1]))
    out = _dims(ins.type)
    # Output batch and feature dimensions, and the kernel's input features (already divided by
    # feature_group_count), multiply every spatial window.
    fma = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
    spatial = sorted(c for c in out_l if c.isdigit())
    if spatial:
        w = re.search(r"\bwindow=\{([^}]*)\}", ins.attrs)
        win = dict(kv.split("=", 1) for kv in w.group(1).split()) if w else {}
        n = len(spatial)

        def field(key, default):
            return [int(x) for x in win[key].split("x")] if key in win else [default] * n

        strides, lhs_dil, rhs_dil = field("stride", 1), field("lhs_dilate", 1), field("rhs_dilate", 1)
        pads = [int(p.split("_")[0]) for p in win["pad"].split("x")] if "pad" in win else [0] * n
        for j, s in enumerate(spatial):
            fma *= _valid_taps(out[out_l.index(s)], rhs[rhs_l.index(s)], lhs[lhs_l.index(s)], strides[j], pads[j],
                               lhs_dil[j], rhs_dil[j])
    return 2.0 * fma


# ----------------------------------------------------------------------------------------------
# Trip counts


def _scalar(comps: dict[str, _Computation], comp: _Computation, name: str, env: dict[int, Any] | None = None,
            depth: int = 0):
    """A small symbolic value of a scalar integer instruction: ("const", v), ("iv", tuple index of
    the computation's parameter), ("add"/"sub", a, b), ("cmp", direction, a, b), or None.

    Sees through copies, converts, bitcasts and fusions (the CPU compiler wraps a loop's add and
    compare in one-op fusions); ``env`` maps a fused computation's parameters to the caller's
    values."""
    ins = comp.instrs.get(name)
    if ins is None or depth > 32:
        return None
    op, args = ins.opcode, ins.operands
    if op == "constant":
        try:
            return ("const", int(args[0]))
        except (ValueError, IndexError):
            return None
    if op == "parameter":
        if env is not None:
            return env.get(int(args[0]))
        return ("param", int(args[0]))
    if op == "get-tuple-element":
        base = _scalar(comps, comp, args[0], env, depth + 1)
        if base == ("param", 0):
            return ("iv", _attr_int(ins.attrs, "index", -1))
        return None
    if op in ("copy", "convert", "bitcast", "reshape", "broadcast"):
        return _scalar(comps, comp, args[0], env, depth + 1)
    if op in ("add", "subtract"):
        a, b = (_scalar(comps, comp, x, env, depth + 1) for x in args[:2])
        return ("add" if op == "add" else "sub", a, b)
    if op == "compare":
        d = re.search(r"\bdirection=(\w+)", ins.attrs)
        a, b = (_scalar(comps, comp, x, env, depth + 1) for x in args[:2])
        return ("cmp", d.group(1) if d else "", a, b)
    if op == "fusion":
        callee = comps.get((_called(ins.attrs, "calls") or [""])[0])
        if callee is None:
            return None
        inner_env = {i: _scalar(comps, comp, x, env, depth + 1) for i, x in enumerate(args)}
        return _scalar(comps, callee, callee.root, inner_env, depth + 1)
    return None


_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _derived_trip_count(comps: dict[str, _Computation], parent: _Computation, ins: _Instr) -> int | None:
    """Trip count of a while loop of the form ``for (i = c0; i <op> N; i += s)``, else None."""
    cond = comps.get((_called(ins.attrs, "condition") or [""])[0])
    body = comps.get((_called(ins.attrs, "body") or [""])[0])
    if cond is None or body is None:
        return None
    cmp = _scalar(comps, cond, cond.root)
    if not cmp or cmp[0] != "cmp":
        return None
    _, direction, a, b = cmp
    if b and b[0] == "iv" and a and a[0] == "const":
        a, b, direction = b, a, _FLIP.get(direction, "")
    if not (a and a[0] == "iv" and b and b[0] == "const"):
        return None
    k, bound = a[1], b[1]
    # The initial value: the loop's operand is the tuple that starts it.
    init_tuple = parent.instrs.get(ins.operands[0]) if ins.operands else None
    if init_tuple is None or init_tuple.opcode != "tuple" or k >= len(init_tuple.operands):
        return None
    init = _scalar(comps, parent, init_tuple.operands[k])
    # The step: what the body's result tuple puts back in the same element.
    root = body.instrs.get(body.root)
    if not init or init[0] != "const" or root is None or root.opcode != "tuple" or k >= len(root.operands):
        return None
    nxt = _scalar(comps, body, root.operands[k])
    step = None
    if nxt and nxt[0] in ("add", "sub"):
        x, y = nxt[1], nxt[2]
        if x == ("iv", k) and y and y[0] == "const":
            step = y[1] if nxt[0] == "add" else -y[1]
        elif nxt[0] == "add" and y == ("iv", k) and x and x[0] == "const":
            step = x[1]
    if not step:
        return None
    c0 = init[1]
    # Iterations while i < N (i <= N): ceil((N - c0) / s) (ceil((N - c0 + 1) / s)) for s > 0;
    # mirrored for > and >= with s < 0. Any other pairing never ends or never starts.
    if direction in ("LT", "LE") and step > 0:
        span = bound - c0 + (direction == "LE")
    elif direction in ("GT", "GE") and step < 0:
        span = c0 - bound + (direction == "GE")
    elif direction == "NE" and (bound - c0) % step == 0 and (bound - c0) // step >= 0:
        return (bound - c0) // step
    else:
        return None
    return max(0, -(-span // abs(step)))  # ceil


def _trip_count(comps: dict[str, _Computation], parent: _Computation, ins: _Instr) -> int | None:
    """A while instruction's trip count: XLA's ``known_trip_count`` when printed, else derived
    from the loop's induction variable (module docstring); None when neither works."""
    if ins.trip is not None:
        return ins.trip
    return _derived_trip_count(comps, parent, ins)


# ----------------------------------------------------------------------------------------------
# The walk


@dataclasses.dataclass(frozen=True)
class _Count:
    """FLOPs of one execution of something: loops counted, conditionals taking their largest
    branch (``high``) or their smallest (``low``); and with every loop body once (``once``)."""

    high: float = 0.0
    low: float = 0.0
    once: float = 0.0

    def __add__(self, other: "_Count") -> "_Count":
        return _Count(self.high + other.high, self.low + other.low, self.once + other.once)

    def times(self, trips: int) -> "_Count":
        return _Count(self.high * trips, self.low * trips, self.once)


@dataclasses.dataclass
class _Walk:
    comps: dict[str, _Computation]
    memo: dict[str, _Count] = dataclasses.field(default_factory=dict)
    loops: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    custom_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    uneven_conditionals: int = 0

    def flops(self, name: str) -> _Count:
        """The FLOPs of one execution of a computation and everything it calls."""
        if name in self.memo:
            return self.memo[name]
        self.memo[name] = _Count()  # a recursive call graph is not valid HLO; guard anyway
        comp = self.comps[name]
        total = _Count()
        for ins in comp.instrs.values():
            total = total + self._instr(comp, ins)
        self.memo[name] = total
        return total

    def _sum(self, names: list[str]) -> _Count:
        total = _Count()
        for n in names:
            if n in self.comps:
                total = total + self.flops(n)
        return total

    def _instr(self, comp: _Computation, ins: _Instr) -> _Count:
        op = ins.opcode
        if op in ("dot", "convolution"):
            f = _dot_flops(comp, ins) if op == "dot" else _conv_flops(comp, ins)
            return _Count(f, f, f)
        if op == "fusion" or op == "async-start":
            return self._sum(_called(ins.attrs, "calls"))
        if op == "call":
            return self._sum(_called(ins.attrs, "to_apply"))
        if op == "conditional":
            counts = [self.flops(b) for b in _branches(ins.attrs) if b in self.comps]
            if not counts:
                return _Count()
            if len({c.high for c in counts}) > 1:
                self.uneven_conditionals += 1
            return _Count(max(c.high for c in counts), min(c.low for c in counts), max(c.once for c in counts))
        if op == "while":
            trips = _trip_count(self.comps, comp, ins)
            body = _called(ins.attrs, "body")
            count = self._sum(body)
            self.loops[ins.name] = dict(
                name=ins.name, body=body[0] if body else "", trips=trips, op_name=ins.op_name,
                body_flops=count.high, parent=comp.name,
            )
            return count.times(trips if trips is not None else 1)
        if op == "custom-call":
            self.custom_calls[ins.target] = self.custom_calls.get(ins.target, 0) + 1
        # Elementwise, reductions (their to_apply is a scalar function), data movement,
        # collectives: no matmul FLOPs.
        return _Count()

    def runs(self, entry: str) -> dict[str, int]:
        """How many times each while loop runs its body in one execution of the entry (the
        product of the trip counts of the loops around it; an unknown trip count counts as 1)."""
        out: dict[str, int] = {}
        holds_loop: dict[str, bool] = {}

        def children(comp: _Computation):
            for ins in comp.instrs.values():
                if ins.opcode == "while":
                    trips = self.loops[ins.name]["trips"] if ins.name in self.loops else None
                    yield ins, _called(ins.attrs, "body") + _called(ins.attrs, "condition"), trips
                else:
                    yield ins, [c for key in _CALL_KEYS for c in _called(ins.attrs, key)], 1

        def has_loop(name: str) -> bool:
            if name not in holds_loop:
                holds_loop[name] = False  # guard against a (malformed) cycle
                comp = self.comps.get(name)
                holds_loop[name] = comp is not None and any(
                    ins.opcode == "while" or any(has_loop(c) for c in callees) for ins, callees, _ in children(comp))
            return holds_loop[name]

        def visit(name: str, mult: int) -> None:
            for ins, callees, trips in children(self.comps[name]):
                t = 1 if trips is None else trips
                if ins.opcode == "while":
                    out[ins.name] = out.get(ins.name, 0) + mult * t
                for c in callees:
                    if has_loop(c):  # only control flow that nests loops is walked
                        visit(c, mult * t)

        visit(entry, 1)
        return out


# Attributes through which an instruction calls a computation that runs once per call.
_CALL_KEYS = ("calls", "to_apply", "branch_computations", "true_computation", "false_computation")


def loop_aware_flops(hlo_text: str) -> dict[str, Any]:
    """Matmul FLOPs of one execution of an HLO module (``compiled.as_text()``), loops counted.

    Returns a dict:

    * ``flops``: dot and convolution FLOPs, each while body multiplied by its trip count (nested
      loops multiply); for an SPMD-partitioned module, per device.
    * ``flops_loops_once``: the same instructions with every loop body counted once (the
      convention of ``compiled.cost_analysis()``; minus its elementwise FLOPs), to show what
      the trip counts add.
    * ``loops``: one entry per while instruction: ``name``, ``op_name`` (where in the JAX program),
      ``trips`` (None when unknown), ``runs`` (body executions per program run, all enclosing
      trips multiplied; a loop in a conditional's branch as if that branch ran), ``body_flops``
      (one trip, inner loops counted, per device), largest ``runs x body_flops`` first.
    * ``unknown_loops``: how many loops had no trip count (counted once: ``flops`` is then a
      lower bound).
    * ``uneven_conditionals``: conditionals whose branches differ in FLOPs. ``flops`` takes the
      largest branch of each (an upper bound), ``flops_smallest_branches`` the smallest (a lower
      bound); which one runs is data.
    * ``custom_calls``: {target: count} of custom calls, whose FLOPs, if any, are not counted.

    What counts as a FLOP, and how trip counts are found, is in the module docstring.
    """
    comps, entry = _parse_hlo(hlo_text)
    walk = _Walk(comps)
    count = walk.flops(entry)
    runs = walk.runs(entry)
    loops = [dict(name=v["name"], op_name=v["op_name"], trips=v["trips"], runs=runs.get(v["name"], 0),
                  body_flops=v["body_flops"]) for v in walk.loops.values()]
    loops.sort(key=lambda d: -d["body_flops"] * max(d["runs"], 1))
    return dict(
        flops=count.high, flops_smallest_branches=count.low, flops_loops_once=count.once, loops=loops,
        unknown_loops=sum(1 for v in loops if v["trips"] is None), uneven_conditionals=walk.uneven_conditionals,
        custom_calls=dict(sorted(walk.custom_calls.items())),
    )


def matmul_shapes(hlo_text: str, branches: str = "largest") -> list[dict[str, Any]]:
    """Every ``dot`` of an HLO module as a canonical batched matmul, with how often it runs.

    Each dot becomes ``[batch, m, k] x [batch, k, n]`` (batch, contracting and free dimensions
    multiplied out), and identical ones are merged. ``runs`` is executions per program run: the
    trip counts of every loop around it multiplied (a loop of unknown trip count counts once), a
    conditional's most expensive branch only (as ``loop_aware_flops``' ``flops``), or with
    ``branches="smallest"`` its cheapest (when the caller knows that is the one its data takes:
    the LM head on target slots instead of its every-position fallback). Returns dicts
    ``batch, m, k, n, dtype, runs, flops`` (``2 b m k n x runs``), largest ``flops`` first.
    Convolutions are not matmuls here and are left out. What it is for: timing the program's
    matmuls alone, kernel by kernel (``benchmarks/machine.py``).
    """
    if branches not in ("largest", "smallest"):
        raise ValueError(f"branches {branches!r}: 'largest' or 'smallest'")
    pick = max if branches == "largest" else min
    comps, entry = _parse_hlo(hlo_text)
    walk = _Walk(comps)
    found: dict[tuple, int] = {}

    def visit(name: str, mult: int) -> None:
        comp = comps[name]
        for ins in comp.instrs.values():
            if ins.opcode == "dot":
                lhs = _dims(_operand_type(comp, ins.operands[0]))
                rhs = _dims(_operand_type(comp, ins.operands[1]))
                lb, lc = _attr_list(ins.attrs, "lhs_batch_dims"), _attr_list(ins.attrs, "lhs_contracting_dims")
                rb, rc = _attr_list(ins.attrs, "rhs_batch_dims"), _attr_list(ins.attrs, "rhs_contracting_dims")
                key = (math.prod(lhs[d] for d in lb), math.prod(v for d, v in enumerate(lhs) if d not in lb + lc),
                       math.prod(lhs[d] for d in lc), math.prod(v for d, v in enumerate(rhs) if d not in rb + rc),
                       ins.type.split("[", 1)[0])
                found[key] = found.get(key, 0) + mult
            elif ins.opcode == "while":
                trips = _trip_count(comps, comp, ins)
                for body in _called(ins.attrs, "body"):
                    visit(body, mult * (trips if trips is not None else 1))
            elif ins.opcode == "conditional":
                branches = [b for b in _branches(ins.attrs) if b in comps]
                if branches:
                    visit(pick(branches, key=lambda b: walk.flops(b).high), mult)
            else:
                for key in ("calls", "to_apply"):
                    for callee in _called(ins.attrs, key):
                        if callee in comps:
                            visit(callee, mult)

    visit(entry, 1)
    out = [dict(batch=b, m=m, k=k, n=n, dtype=dt, runs=r, flops=2.0 * b * m * k * n * r)
           for (b, m, k, n, dt), r in found.items()]
    return sorted(out, key=lambda d: -d["flops"])


__all__ = ["loop_aware_flops", "matmul_shapes"]
