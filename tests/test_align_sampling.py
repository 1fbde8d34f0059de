"""Pair sampling (paper Eq. 7 + localized window strategy) and the global keep-one-per-label dedup."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

from sea_jax.align import sampling as S

# A chi-square test at this level fails a correct sampler 1 time in 1000.
P_MIN = 1e-3


def _random_labels(rng, b, p, n, vocab, p_patch_empty=0.3, p_label_invalid=0.3):
    ids = rng.integers(0, vocab, size=(b, p, n)).astype(np.int32)
    scores = rng.uniform(-0.2, 1.0, size=(b, p, n)).astype(np.float32)
    valid = rng.random((b, p, n)) > p_label_invalid
    valid &= ~(rng.random((b, p, 1)) < p_patch_empty)  # whole patches without labels
    return ids, scores, valid


def test_window_layout_tiles_grid_and_keeps_partial_windows():
    patches, slot_valid = S.window_layout(27, 27, 2)
    assert patches.shape == (196, 4) and S.num_windows(27, 27, 2) == 196  # 14 x 14, edges partial
    # Every patch lies in exactly one window.
    covered = np.sort(patches[slot_valid])
    np.testing.assert_array_equal(covered, np.arange(27 * 27))
    sizes = slot_valid.sum(-1).reshape(14, 14)
    assert (sizes[:13, :13] == 4).all() and (sizes[13, :13] == 2).all() and (sizes[:13, 13] == 2).all()
    assert sizes[13, 13] == 1
    # Odd, non-square grid: windows are row-major, slots inside a window row-major.
    patches, slot_valid = S.window_layout(5, 7, 2)
    assert patches.shape == (12, 4)
    np.testing.assert_array_equal(patches[0][slot_valid[0]], [0, 1, 7, 8])
    np.testing.assert_array_equal(patches[3][slot_valid[3]], [6, 13])  # right edge: one column
    np.testing.assert_array_equal(patches[8][slot_valid[8]], [28, 29])  # bottom edge: one row
    np.testing.assert_array_equal(patches[11][slot_valid[11]], [34])  # corner: one patch


def test_one_labelled_patch_per_window_and_a_valid_label():
    h, w, k, n = 5, 7, 2, 4
    rng = np.random.default_rng(0)
    ids, scores, valid = _random_labels(rng, b=6, p=h * w, n=n, vocab=50)
    # Some patches are marked valid but have only non-positive scores: they count as unlabelled.
    scores[:, ::5, :] = -np.abs(scores[:, ::5, :])
    keys = jax.random.split(jax.random.key(1), 16)
    run = jax.jit(jax.vmap(lambda key: S.sample_windows(key, ids, scores, valid, (h, w), k)))
    out = jax.tree.map(np.asarray, run(keys))
    patches, slot_valid = S.window_layout(h, w, k)
    ok = valid & (scores > 0)
    labelled = ok.any(-1)  # [b, p]
    assert out.patch_index.shape == (16, 6, 12)
    for r in range(16):
        for i in range(6):
            for win in range(12):
                members = patches[win][slot_valid[win]]
                has_label = labelled[i, members].any()
                assert out.valid[r, i, win] == has_label
                if not has_label:
                    assert out.label[r, i, win] == -1 and out.patch_index[r, i, win] == 0
                    continue
                pch = out.patch_index[r, i, win]
                assert pch in members and labelled[i, pch]  # in its window, and labelled
                assert out.label[r, i, win] in ids[i, pch][ok[i, pch]]  # one of its valid labels


def _eq7_fixture():
    """One 3x3 window (k=3) per image. Labelled patches: 0, 4, 5, 8. Patch 3 is marked valid but
    its scores are <= 0; the other patches have no valid label."""
    n = 5
    ids = np.zeros((9, n), np.int32)
    scores = np.full((9, n), 0.5, np.float32)
    valid = np.zeros((9, n), bool)
    ids[0], scores[0], valid[0] = [10, 11, 12, 13, 14], [0.5, 0.3, 0.15, 0.05, -0.2], True
    ids[4], scores[4] = [20, 21, 22, 23, 24], [0.8, 0.9, 0.2, 0.7, 0.1]
    valid[4] = [True, False, True, False, False]  # valid: 20 (0.8), 22 (0.2)
    ids[5], scores[5], valid[5, 0] = [30, 31, 32, 33, 34], 0.3, True
    ids[8], scores[8], valid[8, :2] = [40, 41, 42, 43, 44], [0.6, 0.3, 1, 1, 1], True
    ids[3], scores[3], valid[3] = [50, 51, 52, 53, 54], [0.0, -0.1, -0.5, 0.0, -1.0], True
    return ids, scores, valid


def _eq7_draws(sample_windows):
    """(patch, label) of 256 images x 48 keys = 12288 draws of ``sample_windows`` on the fixture."""
    ids, scores, valid = _eq7_fixture()
    b = 256
    tile = lambda a: np.broadcast_to(a, (b,) + a.shape)  # noqa: E731
    keys = jax.random.split(jax.random.key(7), 48)
    run = jax.jit(jax.vmap(lambda key: sample_windows(key, tile(ids), tile(scores), tile(valid), (3, 3), 3)))
    out = run(keys)
    assert np.asarray(out.valid).all()
    return np.asarray(out.patch_index).ravel(), np.asarray(out.label).ravel()


def _eq7_pvalues(patch, label) -> dict:
    """Chi-square p-values: the patch choice uniform among labelled patches, and each patch's
    label frequencies proportional to its valid positive scores (Eq. 7)."""
    out = {"patch": stats.chisquare(np.array([(patch == q).sum() for q in (0, 4, 5, 8)])).pvalue}
    for q, labels, weights in ((0, [10, 11, 12, 13], [0.5, 0.3, 0.15, 0.05]), (4, [20, 22], [0.8, 0.2]),
                               (8, [40, 41], [0.6, 0.3])):
        got = label[patch == q]
        obs = np.array([(got == lab).sum() for lab in labels])
        out[q] = stats.chisquare(obs, np.asarray(weights, float) / np.sum(weights) * len(got)).pvalue
    return out


def test_patch_choice_uniform_and_label_frequencies_follow_eq7():
    patch, label = _eq7_draws(S.sample_windows)
    assert set(np.unique(patch)) <= {0, 4, 5, 8}  # never an unlabelled patch (3 included)
    assert set(np.unique(label[patch == 0])) <= {10, 11, 12, 13}  # 14 has score <= 0
    assert set(np.unique(label[patch == 4])) <= {20, 22}  # masked labels never drawn, even with a high score
    assert (label[patch == 5] == 30).all()
    p = _eq7_pvalues(patch, label)
    assert min(p.values()) > P_MIN, p


def test_eq7_check_rejects_a_sampler_that_ignores_the_scores():
    """The check above has power: the same sampler fed equal weights (a bug that drops S_i and
    picks labels uniformly) fails it on the labels and still passes on the patches."""
    def uniform_labels(key, ids, scores, valid, grid, k):
        return S.sample_windows(key, ids, np.where(scores > 0, 1.0, scores).astype(np.float32), valid, grid, k)

    p = _eq7_pvalues(*_eq7_draws(uniform_labels))
    assert p["patch"] > P_MIN and p[0] < P_MIN and p[4] < P_MIN, p


def test_dedup_keeps_exactly_one_per_label_uniformly():
    # 64 candidates; label 7 at 4 positions (in different "devices"' blocks), label 3 twice with one
    # copy invalid, others unique or invalid.
    labels = np.arange(100, 164, dtype=np.int32)
    valid = np.ones(64, bool)
    dup = [2, 17, 40, 63]
    labels[dup] = 7
    labels[[5, 6]] = 3
    valid[[6, 30, 31]] = False
    keys = jax.random.split(jax.random.key(3), 4000)
    keep = np.asarray(jax.jit(jax.vmap(lambda k: S.dedup_keep_one(k, labels, valid)))(keys))
    assert not keep[:, ~valid].any()
    for row in keep[:50]:
        kept = labels[row]
        assert len(kept) == len(set(kept))  # unique
        assert set(kept) == set(labels[valid])  # every valid label represented
    assert keep[:, 5].all()  # the only valid copy of label 3
    counts = keep[:, dup].sum(0)
    assert counts.sum() == 4000
    assert stats.chisquare(counts).pvalue > P_MIN


def test_empty_batch_gives_no_candidates():
    ids, scores, valid = np.zeros((4, 9, 3), np.int32), np.ones((4, 9, 3), np.float32), np.zeros((4, 9, 3), bool)
    pairs = jax.jit(lambda k: S.select_pairs(k, ids, scores, valid, (3, 3)))(jax.random.key(0))
    assert pairs.patch_index.shape == (4, 4)
    assert not np.asarray(pairs.candidate).any() and not np.asarray(pairs.keep).any()
    assert (np.asarray(pairs.label) == -1).all()


def _select_on_mesh(mesh, axes, key, ids, scores, valid, grid):
    spec = P(axes)
    fn = jax.shard_map(
        lambda k, a, b, c: S.select_pairs(k, a, b, c, grid, 2, axis_name=axes),
        mesh=mesh,
        in_specs=(P(), spec, spec, spec),
        out_specs=S.Pairs(spec, spec, spec, spec),
    )
    return jax.tree.map(np.asarray, jax.jit(fn)(key, ids, scores, valid))


def test_choices_identical_for_1_2_4_8_devices(make_mesh):
    h, w = 5, 5  # 9 windows, partial edges
    rng = np.random.default_rng(11)
    # Small vocabulary: many labels collide across images and devices, so the dedup matters.
    ids, scores, valid = _random_labels(rng, b=8, p=h * w, n=4, vocab=12)
    key = jax.random.fold_in(jax.random.key(2024), 17)  # (seed, step)
    ref = jax.tree.map(np.asarray, jax.jit(lambda k: S.select_pairs(k, ids, scores, valid, (h, w)))(key))
    assert 0 < ref.keep.sum() < ref.candidate.sum()  # dedup removed some candidates
    kept = ref.label[ref.keep]
    assert len(kept) == len(set(kept)) and set(kept) == set(ref.label[ref.candidate])
    # select_pairs makes the same window choices as sample_windows with the same key.
    ws = jax.tree.map(np.asarray, jax.jit(lambda k: S.sample_windows(k, ids, scores, valid, (h, w)))(key))
    np.testing.assert_array_equal(ws.patch_index, ref.patch_index)
    np.testing.assert_array_equal(ws.label, ref.label)
    np.testing.assert_array_equal(ws.valid, ref.candidate)
    layouts = [
        ({"data": 1}, ("data",)),
        ({"data": 2}, ("data",)),
        ({"data": 2, "fsdp": 2}, ("data", "fsdp")),
        ({"data": 2, "fsdp": 2, "tensor": 2}, ("data", "fsdp", "tensor")),
    ]
    for axes_sizes, axes in layouts:
        got = _select_on_mesh(make_mesh(**axes_sizes), axes, key, ids, scores, valid, (h, w))
        for name, a, b in zip(S.Pairs._fields, ref, got):
            np.testing.assert_array_equal(a, b, err_msg=f"{axes_sizes}: {name}")


def test_different_steps_give_different_choices():
    rng = np.random.default_rng(5)
    ids, scores, valid = _random_labels(rng, b=4, p=49, n=5, vocab=1000, p_patch_empty=0.0)
    base = jax.random.key(0)
    run = jax.jit(lambda k: S.select_pairs(k, ids, scores, valid, (7, 7)))
    a, b = run(jax.random.fold_in(base, 0)), run(jax.random.fold_in(base, 1))
    assert not np.array_equal(np.asarray(a.label), np.asarray(b.label))
    c = run(jax.random.fold_in(base, 0))
    np.testing.assert_array_equal(np.asarray(a.label), np.asarray(c.label))  # same (seed, step)


def test_shape_checks():
    with pytest.raises(ValueError, match="grid"):
        ids, scores, valid = np.zeros((1, 10, 2), np.int32), np.zeros((1, 10, 2)), np.zeros((1, 10, 2), bool)
        S.sample_windows(jax.random.key(0), ids, scores, valid, (3, 3))
    assert S.num_windows(27, 27, 2) == math.ceil(27 / 2) ** 2
