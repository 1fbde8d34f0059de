"""Loop-aware matmul FLOPs of a compiled program (sea_jax.aot.hlo_flops).

The reference for a program with loops is the same program written without them (Python loops,
so XLA sees straight-line code): XLA's own cost analysis counts that one fully, and the
loop-aware count of the looped program must equal it. Every loop test also checks that counting
each body once (what ``cost_analysis`` does) would fall short, so the tests fail if trip counts
were ignored. CPU tests use XLA:CPU (which annotates loops with ``known_trip_count``); the TPU
test uses the TPU compiler of libtpu (which does not, so the count comes from the loop itself).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax import aot
from sea_jax.aot.hlo_flops import loop_aware_flops, matmul_shapes

M, K = 8, 32
MATMUL = 2 * M * K * K  # one (M, K) @ (K, K)


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _xla_flops(compiled) -> float:
    return float(compiled.cost_analysis()["flops"])


def looped(x, ws, w2):
    """A scan over 5 weights, a scan of 4 over a scan of 3, and a fori_loop of 7: 24 matmuls."""
    c, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)

    def outer(c, w):
        c, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), c, None, length=3)
        return c, None

    c, _ = jax.lax.scan(outer, c, w2)
    return jax.lax.fori_loop(0, 7, lambda i, c: jnp.tanh(c @ ws[0]), c)


def unrolled(x, ws, w2):
    """``looped`` as straight-line code (tanh: a transcendental, not in cost_analysis' flops)."""
    c = x
    for i in range(ws.shape[0]):
        c = jnp.tanh(c @ ws[i])
    for j in range(w2.shape[0]):
        for _ in range(3):
            c = jnp.tanh(c @ w2[j])
    for _ in range(7):
        c = jnp.tanh(c @ ws[0])
    return c


ARGS = (jnp.ones((M, K)), jnp.ones((5, K, K)), jnp.ones((4, K, K)))


@pytest.fixture(scope="module")
def looped_hlo():
    return _compile(looped, *ARGS).as_text()


def test_scans_and_fori_loop_count_every_trip(looped_hlo):
    r = loop_aware_flops(looped_hlo)
    assert r["flops"] == r["flops_smallest_branches"] == 24 * MATMUL == _xla_flops(_compile(unrolled, *ARGS))
    # One trip per loop, as cost_analysis counts: the outer scan's body holds the inner loop once.
    assert r["flops_loops_once"] == (1 + 1 + 1) * MATMUL < r["flops"]
    assert r["unknown_loops"] == 0
    # The nested scan's body runs 4 x 3 times per call.
    assert sorted((d["trips"], d["runs"]) for d in r["loops"]) == [(3, 12), (4, 4), (5, 5), (7, 7)]


def test_trip_count_derived_from_the_loop_without_the_annotation(looped_hlo):
    """The TPU compiler prints no ``known_trip_count``: the count must come from the induction
    variable (init constant, compare with a constant, add a constant); here XLA:CPU's HLO, whose
    compare and add sit in one-op fusions, with the annotation removed."""
    stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", looped_hlo)
    assert "known_trip_count" not in stripped
    r = loop_aware_flops(stripped)
    assert r["flops"] == 24 * MATMUL and r["unknown_loops"] == 0


def test_unknown_trip_count_is_counted_once_and_flagged():
    def f(x, w, n):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]

    r = loop_aware_flops(_compile(f, ARGS[0], ARGS[1][0], 5).as_text())
    assert r["unknown_loops"] == 1 and r["loops"][0]["trips"] is None
    assert r["flops"] == r["flops_loops_once"] == MATMUL


def test_conditional_counts_its_largest_branch_and_reports_the_smallest():
    def f(x, ws):
        def body(c, w):
            c = jax.lax.cond(jnp.sum(c) > 0, lambda c: jnp.tanh(jnp.tanh(c @ w) @ w), lambda c: jnp.tanh(c @ w), c)
            return c, None

        return jax.lax.scan(body, x, ws)[0]

    r = loop_aware_flops(_compile(f, ARGS[0], ARGS[1]).as_text())
    assert r["flops"] == 5 * 2 * MATMUL and r["flops_smallest_branches"] == 5 * MATMUL
    assert r["uneven_conditionals"] == 1


def test_matmul_shapes_with_their_runs(looped_hlo):
    # looped: 5 + 4 x 3 + 7 runs of one (M, K) @ (K, K) shape
    shapes = matmul_shapes(looped_hlo)
    assert [(d["batch"], d["m"], d["k"], d["n"], d["dtype"], d["runs"]) for d in shapes] == [(1, M, K, K, "f32", 24)]
    assert sum(d["flops"] for d in shapes) == loop_aware_flops(looped_hlo)["flops"]

    def g(q, k, x, ws):  # a batched attention-like einsum outside a loop, and the conditional scan
        s = jnp.einsum("bhld,bhsd->bhls", q, k)
        c = jax.lax.scan(lambda c, w: (jax.lax.cond(jnp.sum(c) > 0, lambda c: jnp.tanh(jnp.tanh(c @ w) @ w),
                                                    lambda c: jnp.tanh(c @ w), c), None), x, ws)[0]
        return s, c

    q, k = jnp.ones((2, 3, 5, 4)), jnp.ones((2, 3, 7, 4))
    got = {(d["batch"], d["m"], d["k"], d["n"]): d["runs"] for d in matmul_shapes(_compile(g, q, k, *ARGS[:2]).as_text())}
    assert got == {(6, 5, 4, 7): 1, (1, M, K, K): 5 * 2}  # the conditional's larger branch
    hlo = _compile(g, q, k, *ARGS[:2]).as_text()
    assert [d["runs"] for d in matmul_shapes(hlo, branches="smallest") if d["m"] == M] == [5]


@pytest.mark.parametrize(
    "stride, padding, lhs_dilation, rhs_dilation, groups, kernel",
    [
        ((1, 1), "SAME", (1, 1), (1, 1), 1, 3),
        ((2, 2), ((1, 2), (0, 1)), (1, 1), (1, 1), 1, 3),
        ((1, 1), ((1, 1), (2, 0)), (2, 2), (1, 1), 1, 3),
        ((1, 2), ((2, 2), (1, 1)), (1, 1), (2, 3), 1, 3),
        ((1, 1), "SAME", (1, 1), (1, 1), 4, 3),
        ((14, 14), "VALID", (1, 1), (1, 1), 1, 14),  # a ViT patch embedding
    ],
)
def test_convolution_flops_match_xla(stride, padding, lhs_dilation, rhs_dilation, groups, kernel):
    """Padding taps are not counted, dilation holes neither: XLA's own convention, forward and
    both gradients (the backward convolutions carry dilations and batch groups)."""

    def f(x, k):
        return jax.lax.conv_general_dilated(x, k, stride, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)

    x, k = jnp.ones((2, 28, 20, 8)), jnp.ones((kernel, kernel, 8 // groups, 16))
    ct = jnp.ones(jax.eval_shape(f, x, k).shape)
    for c in (_compile(f, x, k), _compile(lambda x, k, ct: jax.vjp(f, x, k)[1](ct), x, k, ct)):
        assert loop_aware_flops(c.as_text())["flops"] == _xla_flops(c) > 0


def test_tpu_scanned_layers_with_gradient_match_the_unrolled_program():
    """On the TPU compiler (dots become convolutions, loops lose their annotation): six scanned
    layers of a convolution and batched matmuls, differentiated, count what the same six layers
    unrolled count."""
    ok, why = aot.libtpu_available()
    if not ok:
        pytest.skip(why)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(aot.topology_devices(aot.get_topology("v4-8"))), ("d",))

    def layer(c, wc, wb):
        c = jax.lax.conv_general_dilated(c, wc, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        b, h, w, ch = c.shape
        t = c.reshape(b, h * w, ch)
        t = jnp.einsum("bqk,bkc->bqc", jnp.einsum("bqc,bkc->bqk", t, t), t) @ wb
        return t.reshape(c.shape)

    def scanned(x, wc, wb):
        c, _ = jax.lax.scan(lambda c, w: (layer(c, *w), None), x, (wc, wb))
        return jnp.sum(jnp.square(c.astype(jnp.float32)))

    def straight(x, wc, wb):
        c = x
        for i in range(wc.shape[0]):
            c = layer(c, wc[i], wb[i])
        return jnp.sum(jnp.square(c.astype(jnp.float32)))

    def spec(shape, p):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, p))

    args = (spec((8, 8, 8, 64), P("d")), spec((6, 3, 3, 64, 64), P()), spec((6, 64, 64), P()))
    grad = lambda fn: jax.grad(fn, argnums=(0, 1, 2))  # noqa: E731 - x too: the scan computes its gradient anyway
    r_scan = loop_aware_flops(_compile(grad(scanned), *args).as_text())
    c_straight = _compile(grad(straight), *args)
    r_straight = loop_aware_flops(c_straight.as_text())
    assert r_straight["loops"] == [] and r_scan["unknown_loops"] == 0
    assert sorted(d["trips"] for d in r_scan["loops"]) == [6, 6]  # forward and backward scans
    assert r_scan["flops"] == r_straight["flops"] > 5 * r_scan["flops_loops_once"]
    # XLA's count of the straight program adds only elementwise FLOPs to the matmuls.
    assert r_straight["flops"] <= _xla_flops(c_straight) < 1.03 * r_straight["flops"]


def _counted_loop(init: int, bound: int, direction: str, update: str, step: int) -> str:
    """HLO text of ``for (i = init; i <direction> bound; i = i <update> step) x = x @ x`` on a
    4 x 4 matrix, in the form the TPU compiler prints (no known_trip_count)."""
    return f"""HloModule loop

%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {{
  %p = (s32[], f32[4,4]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,4]{{1,0}} get-tuple-element(%p), index=1
  %step = s32[] constant({step})
  %next = s32[] {update}(%i, %step)
  %dot = f32[4,4]{{1,0}} dot(%x, %x), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
  ROOT %out = (s32[], f32[4,4]{{1,0}}) tuple(%next, %dot)
}}

%cond (q: (s32[], f32[4,4])) -> pred[] {{
  %q = (s32[], f32[4,4]{{1,0}}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %bound = s32[] constant({bound})
  ROOT %test = pred[] compare(%j, %bound), direction={direction}
}}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {{
  %a = f32[4,4]{{1,0}} parameter(0)
  %init = s32[] constant({init})
  %start = (s32[], f32[4,4]{{1,0}}) tuple(%init, %a)
  %loop = (s32[], f32[4,4]{{1,0}}) while(%start), condition=%cond, body=%body
  ROOT %r = f32[4,4]{{1,0}} get-tuple-element(%loop), index=1
}}
"""


@pytest.mark.parametrize(
    "init, bound, direction, update, step, trips",
    [
        (0, 10, "LT", "add", 1, 10),
        (3, 10, "LT", "add", 1, 7),
        (0, 10, "LE", "add", 1, 11),
        (0, 10, "LT", "add", 3, 4),
        (10, 0, "GT", "subtract", 1, 10),
        (10, 0, "GE", "add", -2, 6),
        (0, 10, "NE", "add", 2, 5),
        (0, 10, "GT", "add", 1, None),  # never starts or never ends: not a counted loop
    ],
)
def test_trip_count_arithmetic(init, bound, direction, update, step, trips):
    r = loop_aware_flops(_counted_loop(init, bound, direction, update, step))
    assert r["loops"][0]["trips"] == trips
    assert r["flops"] == 2 * 4 * 4 * 4 * (trips if trips is not None else 1)
    assert r["unknown_loops"] == (trips is None)
