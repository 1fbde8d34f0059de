"""``sea_jax.probe`` and ``sea_jax.align.recall``: the recalled-word math against numpy brute force,
the figure, the truth file, and a probe of a tiny trained demo workdir through the code the CLI runs."""
import json
import os

import numpy as np
import pytest

from sea_jax import probe
from sea_jax.align import recall


def _brute_recall(tokens, table, valid):
    out = []
    for t in tokens:
        best, best_i = -np.inf, -1
        for i, w in enumerate(table):
            if not valid[i]:
                continue
            c = float(t @ w) / (np.linalg.norm(t) * np.linalg.norm(w))
            if c > best:  # strict: ties keep the lower id
                best, best_i = c, i
        out.append(best_i)
    return np.asarray(out)


def test_recall_words_is_nearest_by_cosine():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(37, 12)) * rng.uniform(0.1, 50, size=(37, 1))  # norms must not matter
    table = rng.normal(size=(23, 12)) * rng.uniform(0.1, 50, size=(23, 1))
    valid = rng.random(23) > 0.3
    want = _brute_recall(tokens, table, valid)
    np.testing.assert_array_equal(recall.recall_words(tokens, table, valid, chunk=8), want)
    np.testing.assert_array_equal(recall.recall_words(tokens, table), _brute_recall(tokens, table, np.ones(23, bool)))
    # a token equal to a (scaled) word recalls that word, and an invalid copy of it is skipped
    t2 = np.concatenate([table, 3 * table[:1]])
    assert recall.recall_words(7 * table[5:6], t2)[0] == 5
    v2 = np.ones(24, bool)
    v2[0] = False
    assert recall.recall_words(table[:1], t2, v2)[0] == 23
    with pytest.raises(ValueError):
        recall.recall_words(tokens, table[:, :5])


def test_alignment_accuracy_matches_loops():
    rng = np.random.default_rng(1)
    recalled = rng.integers(0, 6, size=(3, 4, 4))
    targets = rng.integers(0, 6, size=(3, 4, 4, 3))
    valid = rng.random((3, 4, 4, 3)) > 0.4
    where = rng.random((3, 4, 4)) > 0.5
    hits = np.zeros(recalled.shape, bool)
    for idx in np.ndindex(recalled.shape):
        hits[idx] = any(targets[idx][k] == recalled[idx] and valid[idx][k] for k in range(3))
    np.testing.assert_array_equal(recall.word_hits(recalled, targets, valid), hits)
    assert recall.alignment_accuracy(recalled, targets, valid) == pytest.approx(hits.mean())
    assert recall.alignment_accuracy(recalled, targets, valid, where=where) == pytest.approx(hits[where].mean())
    # without a validity mask every target counts
    assert recall.alignment_accuracy(recalled, targets) == pytest.approx(
        np.mean([recalled[i] in targets[i] for i in np.ndindex(recalled.shape)]))
    assert np.isnan(recall.alignment_accuracy(recalled, targets, where=np.zeros_like(where)))
    with pytest.raises(ValueError):
        recall.word_hits(recalled, targets[:2])
    # SigLIP labels against the truth
    truth = rng.integers(0, 6, size=(3, 4, 4, 2))
    want = np.zeros(recalled.shape, bool)
    for idx in np.ndindex(recalled.shape):
        want[idx] = any(valid[idx][k] and targets[idx][k] in truth[idx] for k in range(3))
    np.testing.assert_array_equal(probe.any_label_true(targets, valid, truth), want)


def _fake(lam, seed):
    rng = np.random.default_rng(seed)
    words = ["circle", "red", "stripes", "dog"]
    rec = rng.integers(0, 4, size=(2, 4, 4))
    labels = rng.integers(0, 4, size=(2, 4, 4, 2))
    valid = np.ones_like(labels, bool)
    truth = np.stack([np.zeros((2, 4, 4), int), np.ones((2, 4, 4), int)], -1)
    m = {"lambda": lam, "label_accuracy": recall.alignment_accuracy(rec, labels, valid),
         "truth_accuracy": recall.alignment_accuracy(rec, truth)}
    return probe.ProbeResult(rng.integers(0, 255, size=(2, 32, 32, 3), dtype=np.uint8), words, rec, labels, valid,
                             truth, truth[..., 0] == 0, m)


def test_plot_side_by_side(tmp_path):
    a, b = _fake(1.0, 0), _fake(0.0, 1)
    np.testing.assert_array_equal(a.correct(), (a.recalled == 0) | (a.recalled == 1))
    out = str(tmp_path / "fig.png")
    probe.plot([("SEA", a), ("baseline", b)], out, num_images=1)
    from PIL import Image

    w, h = Image.open(out).size
    assert w == pytest.approx(2 * h, rel=0.01)  # one row, the two runs side by side


def test_probe_a_trained_demo_workdir(tmp_path):
    """Stage 1 of a reduced demo (3 steps), then the probe: the numbers agree with the arrays it
    returns, the truth maps onto the run's word list, the PNG and JSON are written."""
    from test_demo import demo_config

    from sea_jax import train
    from sea_jax.demo import prepare

    wd = str(tmp_path / "wd")
    c = prepare(demo_config(num_images=16, num_eval=3), wd)
    with c.unlocked():
        c.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=0, progress=False,
                       async_checkpoint=False)
    train.train(c, wd)

    truth_file = os.path.join(wd, "probe_truth.npz")  # written by the demo's prepare
    r = probe.probe_workdir(wd, truth=recall.PatchTruth.load(truth_file))
    m = r.metrics
    assert r.recalled.shape == (3, 8, 8) and r.labels.shape == (3, 8, 8, int(c.labels.top_n))
    assert r.truth.shape == (3, 8, 8, 2) and (r.truth >= 0).all()
    words = r.words
    truth = np.load(os.path.join(wd, "demo_assets", "world", "truth.npz"))
    eval_rows = np.where(truth["split"] == 1)[0]
    assert [words[i] for i in r.truth[0, ..., 0].ravel()] == [str(truth["words"][i]) for i in truth["shape_word"][eval_rows[0]].ravel()]
    assert m["label_accuracy"] == pytest.approx(recall.alignment_accuracy(r.recalled, r.labels, r.label_valid))
    assert m["truth_accuracy"] == pytest.approx(recall.word_hits(r.recalled, r.truth).mean())
    assert 0 <= m["truth_accuracy_objects"] <= 1 and m["num_tokens"] == 3 * 64
    assert sum(m["most_recalled"].values()) <= 3 * 64
    assert r.pixels.dtype == np.uint8 and r.pixels.shape == (3, 64, 64, 3)
    # the pixels shown are the image files (64 px, no resize): up to rounding
    from PIL import Image

    first = np.asarray(Image.open(os.path.join(wd, "demo_assets", "world", "images", str(truth["image"][eval_rows[0]]))))
    assert np.abs(r.pixels[0].astype(int) - first.astype(int)).max() <= 1

    out = str(tmp_path / "p.png")
    probe.plot([("run", r)], out)
    summary_path = str(tmp_path / "p.json")
    with open(summary_path, "w") as f:
        json.dump(m, f)  # JSON-serialisable as is
    assert os.path.getsize(out) > 10_000


def test_patch_truth_round_trip_and_reindex(tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 3, size=(2, 4, 4, 2))
    objects = rng.random((2, 4, 4)) > 0.5
    t = recall.PatchTruth([str(tmp_path / "a.png"), "/abs/b.png"], ["red", "circle", "dots"], ids, objects)
    path = str(tmp_path / "t.npz")
    t.save(path)
    back = recall.PatchTruth.load(path)
    assert back.images == t.images and back.words == t.words  # relative paths resolve against the file
    np.testing.assert_array_equal(back.ids, ids)
    np.testing.assert_array_equal(back.objects, objects)
    # onto another vocabulary by spelling; missing words become -1
    want = np.vectorize({0: 1, 1: 0, 2: -1}.get)(ids)
    np.testing.assert_array_equal(back.onto(["circle", "red", "stripes"]), want)
    assert back.head(1).ids.shape == (1, 4, 4, 2)
    with pytest.raises(ValueError, match="objects"):
        recall.PatchTruth(t.images, t.words, ids, objects[:, :2])
