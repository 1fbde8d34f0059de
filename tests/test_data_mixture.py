"""Mixtures of sources (sea_jax.data.mixture, sea_jax.data.mixing) through the training pipeline.

Proportions of weighted draws against the weights (chi-square, on the draw stream and on served
batches), resume bit-exact in the middle of a mixture, the restart / stop rules, LLaVA-NeXT
sampling strategies, per-source image roots, templates and counts, the three ways to write a
mixture (file, in-config tuple, single-source fields) and their errors.
"""
from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from sea_jax.config import base_config
from sea_jax.data import mixing, mixture, pipeline
from sea_jax.errors import ConfigError, DataFormatError, PathError
from test_data_pipeline import N_IMG, SIZE, _config, _iter, _take, _write_dataset, chat_tok, tok  # noqa: F401


def _text_json(path, prefix, n, bad=()):
    """n text-only records with ids prefix0.., prefix1..; indices in ``bad`` get an empty answer."""
    records = [{"id": f"{prefix}{i}", "conversations": [
        {"from": "human", "value": "How many birds?"},
        {"from": "gpt", "value": "" if i in bad else f"{prefix} {i}."}]} for i in range(n)]
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


def _mix_config(tmp_path, entries, batch=8, **data):
    """A config whose data.mixture is a YAML file holding ``entries`` (plus top-level ``data``
    keys named ``file_*``)."""
    import yaml

    doc = {"datasets": entries}
    doc.update({k[5:]: v for k, v in data.items() if k.startswith("file_")})
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(doc))
    c = _config("", str(tmp_path), batch=batch, **{k: v for k, v in data.items() if not k.startswith("file_")})
    c.data.mixture = str(path)
    return c


def _source_of(sid: str) -> str:
    return sid.rstrip("0123456789")


# ----------------------------------------------------------------------------------------------
# The spec


def test_mixture_file_yaml_and_json_and_in_config(tmp_path):
    a = _text_json(tmp_path / "a.json", "a", 4)
    os.makedirs(tmp_path / "sub")
    b = _text_json(tmp_path / "sub" / "b.json", "b", 4)
    entries = [{"json_path": "a.json", "sampling_strategy": "first:2", "weight": 2},
               {"path": "sub/b.json", "image_root": "imgs", "template": "chat", "weight": 1, "on_exhausted": "stop"}]
    c = _mix_config(tmp_path, entries, file_image_root="root_default")
    m = mixture.from_config(c)
    assert m.weighted and [s.name for s in m.sources] == ["a", "b"]
    assert [s.path for s in m.sources] == [a, b]  # relative to the mixture file's folder
    assert m.sources[0].image_root == str(tmp_path / "root_default")  # the file's default
    assert m.sources[1].image_root == str(tmp_path / "imgs") and m.sources[1].template == "chat"
    assert m.sources[0].template == "plain" and not m.sources[1].pad_to_square  # the config's defaults
    assert str(m.sources[0].sampling) == "first:2" and m.sources[0].weight == 2.0
    assert [s.on_exhausted for s in m.sources] == ["restart", "stop"]
    assert m.sources[1].where == f"{tmp_path / 'mix.yaml'}: datasets[1]"
    # the same file as JSON
    (tmp_path / "mix.json").write_text(json.dumps({"datasets": entries, "image_root": "root_default"}))
    c.data.mixture = str(tmp_path / "mix.json")
    m_json = mixture.from_config(c)
    assert [(s.name, s.path, s.image_root, s.weight, s.on_exhausted) for s in m_json.sources] == \
        [(s.name, s.path, s.image_root, s.weight, s.on_exhausted) for s in m.sources]
    # in the config: paths as given (no file to be relative to)
    c.data.mixture = ""
    c.data.sources = ({"path": a, "weight": 2}, {"json_path": b, "image_root": "imgs", "weight": 1})
    m_cfg = mixture.from_config(c)
    assert [s.path for s in m_cfg.sources] == [a, b] and m_cfg.origin == "config.data.sources"
    assert m_cfg.sources[1].image_root == "imgs" and m_cfg.sources[1].where == "config.data.sources[1]"
    # the single-source fields
    c.data.sources = ()
    c.data.json = a
    single = mixture.from_config(c)
    assert single.single and not single.weighted and single.sources[0].path == a


@pytest.mark.parametrize("doc, message", [
    ({"datasets": [{"json_path": "a.json", "wieght": 2}]}, r"datasets\[0\]: unknown fields \['wieght'\]"),
    ({"datasets": [{"json_path": "a.json", "weight": 2}, {"json_path": "a.json"}]},
     r"some sources have a weight and \[.*datasets\[1\]'\] do not"),
    ({"datasets": [{"json_path": "a.json", "on_exhausted": "stop"}]}, "on_exhausted applies to weighted mixtures"),
    ({"datasets": [{"json_path": "a.json", "sampling_strategy": "some:3"}]}, "sampling_strategy 'some:3' is not"),
    ({"datasets": [{"json_path": "a.json", "weight": -1}]}, "weight must be a number > 0"),
    ({"datasets": [{"json_path": "a.json", "weight": 1, "on_exhausted": "never"}]}, "on_exhausted 'never'"),
    ({"datasets": [{"kind": "parquet", "path": "a.json"}]}, "kind 'parquet'"),
    ({"datasets": [{"kind": "tfds"}]}, "a tfds source needs tfds_name"),
    ({"datasets": [{"json_path": "a.json", "path": "b.json"}]}, "give 'path' or 'json_path', not both"),
    ({"datasets": []}, "non-empty 'datasets' list"),
    ({"datasets": [{"json_path": "a.json"}], "seed": 3}, r"unknown top-level keys \['seed'\]"),
])
def test_mixture_errors_name_the_entry(tmp_path, doc, message):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(doc))
    c = base_config()
    c.data.mixture = str(path)
    with pytest.raises(ConfigError, match=message):
        mixture.from_config(c)


def test_mixture_file_problems(tmp_path):
    c = base_config()
    c.data.mixture = str(tmp_path / "nope.yaml")
    with pytest.raises(PathError, match="nope.yaml' does not exist"):
        mixture.from_config(c)
    (tmp_path / "bad.yaml").write_text("datasets:\n  - json_path: a.json\n    weight: [1\n")
    c.data.mixture = str(tmp_path / "bad.yaml")
    with pytest.raises(DataFormatError, match=r"bad\.yaml: line \d+, column \d+"):
        mixture.from_config(c)
    (tmp_path / "mix.txt").write_text("{}")
    c.data.mixture = str(tmp_path / "mix.txt")
    with pytest.raises(ConfigError, match="expected a .yaml, .yml or .json file"):
        mixture.from_config(c)
    c.data.mixture = str(tmp_path / "bad.yaml")
    c.data.sources = ({"path": "x.json"},)
    with pytest.raises(ConfigError, match="not both"):
        mixture.from_config(c)


def test_names_are_made_unique_and_sampling_counts(tmp_path):
    a = _text_json(tmp_path / "a.json", "a", 10)
    c = base_config()
    c.data.sources = ({"path": a}, {"path": a, "sampling_strategy": "random:25%"}, {"path": a, "name": "x"})
    m = mixture.from_config(c)
    assert [s.name for s in m.sources] == ["a", "a_2", "x"]
    s = mixture.parse_sampling("random:25%", "w")
    assert s.count(10, "w") == 3  # rounded up, as LLaVA-NeXT
    assert mixture.parse_sampling("first:4", "w").count(10, "w") == 4
    with pytest.raises(ConfigError, match="asks for 11 records of a source of 10"):
        mixture.parse_sampling("end:11", "w").count(10, "w")
    with pytest.raises(ConfigError, match="percentage 150"):
        mixture.parse_sampling("random:150%", "w").count(10, "w")


def test_selections(tmp_path):
    key = mixing.key_of(0, "select", 1)
    assert mixing.selection(mixture.Sampling("all"), 10, key, "w") is None
    np.testing.assert_array_equal(mixing.selection(mixture.parse_sampling("first:3", "w"), 10, key, "w"), [0, 1, 2])
    np.testing.assert_array_equal(mixing.selection(mixture.parse_sampling("end:3", "w"), 10, key, "w"), [7, 8, 9])
    r = mixing.selection(mixture.parse_sampling("random:40", "w"), 100, key, "w")
    assert len(r) == 40 and len(set(r.tolist())) == 40 and (np.diff(r) > 0).all()
    again = mixing.selection(mixture.parse_sampling("random:40", "w"), 100, key, "w")
    other = mixing.selection(mixture.parse_sampling("random:40", "w"), 100, mixing.key_of(1, "select", 1), "w")
    np.testing.assert_array_equal(r, again)
    assert r.tolist() != other.tolist()
    # the hash stream is fixed (not numpy's generators): a changed constant would change every run
    assert mixing.hashes(0, 0, 2).tolist() == [16294208416658607535, 7960286522194355700]


# ----------------------------------------------------------------------------------------------
# Proportions


def _pvalue(counts, probs):
    counts = np.asarray(counts, float)
    expected = counts.sum() * np.asarray(probs, float)
    return scipy_stats.chisquare(counts, expected).pvalue


def test_weighted_draw_proportions_match_the_weights():
    weights = [0.2, 0.3, 0.5]
    p = np.asarray(weights) / sum(weights)
    import grain

    streams = [mixing.Selected(grain.MapDataset.source(_Range(10_000)), np.arange(10_000))] * 3
    draws = mixing.WeightedDraws([s.repeat(None) for s in streams], [10_000] * 3, weights, ["restart"] * 3,
                                 key=mixing.key_of(0, "mixture"))
    n = 60_000
    src = np.asarray([draws.locate(i)[0] for i in range(n)])
    counts = np.bincount(src, minlength=3)
    assert _pvalue(counts, p) > 1e-3, counts
    assert _pvalue(counts, [1 / 3] * 3) < 1e-12  # the test can tell other proportions apart
    # also in every window of 600 draws (not only on average): within 5 sigma of the binomial
    for w in range(0, n, 600):
        c = np.bincount(src[w:w + 600], minlength=3)
        assert (np.abs(c - 600 * p) < 5 * np.sqrt(600 * p * (1 - p))).all(), (w, c)
    # the j-th draw of a source reads position j of its stream: each position once, in order
    for k in range(3):
        pos = [draws.locate(i)[1] for i in np.flatnonzero(src == k)]
        assert pos == list(range(len(pos)))


class _Range:
    """A tiny random-access source: element i is i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return int(i)


def test_served_batches_follow_the_weights(tmp_path, tok):  # noqa: F811
    paths = {k: _text_json(tmp_path / f"{k}.json", k, n) for k, n in (("a", 40), ("b", 25), ("c", 60))}
    weights = {"a": 1.0, "b": 3.0, "c": 6.0}
    c = _mix_config(tmp_path, [{"path": paths[k], "weight": w} for k, w in weights.items()], batch=16)
    it, stats = _iter(c, tok)
    served = [s for b in _take(it, 100) for s in b["sample_id"].tolist()]
    counts = collections.Counter(_source_of(s) for s in served)
    p = np.asarray(list(weights.values())) / sum(weights.values())
    assert _pvalue([counts[k] for k in weights], p) > 1e-3, counts
    d = stats.as_dict()
    assert {k: d[f"source/{k}/samples"] for k in weights} == {k: counts[k] for k in weights}
    assert d["samples"] == 1600 and d["skipped_total"] == 0


# ----------------------------------------------------------------------------------------------
# Exhaustion, epochs, resume


def test_stop_source_ends_the_epoch_restart_source_cycles(tmp_path, tok):  # noqa: F811
    a = _text_json(tmp_path / "a.json", "a", 20)
    b = _text_json(tmp_path / "b.json", "b", 3)
    c = _mix_config(tmp_path, [{"path": a, "weight": 1, "on_exhausted": "stop"},
                               {"path": b, "weight": 1, "on_exhausted": "restart"}], batch=1)
    period = pipeline.num_examples(c)
    it, stats = _iter(c, tok, num_epochs=2)
    served = [s for x in it for s in x["sample_id"].tolist()]  # the iterator ends after 2 epochs
    a_at = [i for i, s in enumerate(served) if s.startswith("a")]
    assert len(a_at) == 40 and served[-1].startswith("a")  # ends on the stop source's last record
    assert a_at[19] + 1 == period  # the first epoch ends at the stop source's 20th draw
    first, second = served[:period], served[period:]
    for epoch in (first, second):
        assert sorted(s for s in epoch if s.startswith("a")) == sorted(f"a{i}" for i in range(20))  # exactly once
    assert [s for s in first if s.startswith("a")] != [s for s in second if s.startswith("a")]  # fresh order
    b_ids = [s for s in served if s.startswith("b")]
    assert len(b_ids) > 6  # the restart source ran out and started again, several times
    passes = [b_ids[i:i + 3] for i in range(0, len(b_ids) - len(b_ids) % 3, 3)]
    assert all(sorted(p) == ["b0", "b1", "b2"] for p in passes)  # whole passes, each a permutation
    assert len({tuple(p) for p in passes}) > 1  # in fresh orders
    # ... and continued across the epoch boundary (not restarted there): passes straddle it
    d = stats.as_dict()
    assert d["source/a/samples"] == 40 and d["source/b/samples"] == len(b_ids)


def test_two_stop_sources_the_first_to_run_out_ends_the_epoch(tmp_path, tok):  # noqa: F811
    a = _text_json(tmp_path / "a.json", "a", 6)
    b = _text_json(tmp_path / "b.json", "b", 30)
    c = _mix_config(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 1}], batch=1, file_on_exhausted="stop")
    it, _ = _iter(c, tok, num_epochs=3)
    served = [s for x in it for s in x["sample_id"].tolist()]
    ends = [i + 1 for i, s in enumerate(served) if s.startswith("a")][5::6]
    assert len(ends) == 3 and ends[-1] == len(served)
    starts = [0] + ends[:-1]
    for lo, hi in zip(starts, ends):
        epoch = served[lo:hi]
        bs = [s for s in epoch if s.startswith("b")]
        assert sorted(s for s in epoch if s.startswith("a")) == [f"a{i}" for i in range(6)]
        assert len(set(bs)) == len(bs) < 30  # b did not run out: a prefix of a fresh pass each epoch


def test_restart_only_never_ends_and_epochs_are_sum_of_selections(tmp_path, tok):  # noqa: F811
    a = _text_json(tmp_path / "a.json", "a", 5)
    b = _text_json(tmp_path / "b.json", "b", 7)
    c = _mix_config(tmp_path, [{"path": a, "weight": 5}, {"path": b, "weight": 1}], batch=4)
    assert pipeline.num_examples(c) == 12
    it, _ = _iter(c, tok)
    served = [s for x in _take(it, 30) for s in x["sample_id"].tolist()]
    a_ids = [s for s in served if s.startswith("a")]
    assert len(a_ids) == len(served) - len([s for s in served if s.startswith("b")]) and len(a_ids) > 60
    assert all(sorted(a_ids[i:i + 5]) == [f"a{j}" for j in range(5)] for i in range(0, len(a_ids) - 4, 5))


def test_concatenated_mixture_reads_each_selected_record_once_per_epoch(tmp_path, tok):  # noqa: F811
    a = _text_json(tmp_path / "a.json", "a", 10)
    b = _text_json(tmp_path / "b.json", "b", 10)
    d = _text_json(tmp_path / "d.json", "d", 20)
    c = _mix_config(tmp_path, [{"path": a, "sampling_strategy": "first:3"}, {"path": b, "sampling_strategy": "end:2"},
                               {"path": d, "sampling_strategy": "random:50%"}], batch=3)
    assert pipeline.num_examples(c) == 15
    it, stats = _iter(c, tok, num_epochs=2)
    served = [s for x in it for s in x["sample_id"].tolist()]
    assert len(served) == 30
    e1, e2 = served[:15], served[15:]
    assert sorted(e1) == sorted(e2) and e1 != e2
    assert sorted(s for s in e1 if s[0] in "ab") == ["a0", "a1", "a2", "b8", "b9"]
    chosen = sorted(int(s[1:]) for s in e1 if s[0] == "d")
    assert len(chosen) == 10
    key = mixing.key_of(3, "select", 2)  # seed 3 (the test config), source 2
    assert chosen == mixing.selection(mixture.parse_sampling("random:50%", "w"), 20, key, "w").tolist()
    assert stats.as_dict()["source/d/samples"] == 20


@pytest.mark.parametrize("weighted", [False, True])
def test_resume_bit_exact_in_the_middle_of_a_mixture(tmp_path, tok, weighted):  # noqa: F811
    # Images, text, faults and two shards: a stop source that ends epochs, a restart source that
    # cycles, a third with a strategy; the state is taken mid-epoch and restored in a new iterator.
    img_json = _write_dataset(str(tmp_path))
    a = _text_json(tmp_path / "a.json", "a", 9, bad={4})
    b = _text_json(tmp_path / "b.json", "b", 4)
    entries = [{"path": img_json, "name": "img", "image_root": str(tmp_path)},
               {"path": a, "sampling_strategy": "random:8"}, {"path": b}]
    if weighted:
        for e, w, x in zip(entries, (2, 1, 1), ("stop", "restart", "restart")):
            e.update(weight=w, on_exhausted=x)
    c = _mix_config(tmp_path, entries, batch=4, num_shards=2)
    it, stats = _iter(c, tok)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    saved = dict(stats.as_dict())
    rest = _take(it, 12)  # across epoch boundaries of every source
    it2, stats2 = _iter(c, tok)
    it2.set_state(state)
    assert stats2.as_dict() == saved
    again = _take(it2, 12)
    for x, y in zip(rest, again):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert stats2.as_dict() == stats.as_dict()
    d = stats.as_dict()
    assert d["skipped_total"] > 0 and d["source/img/skipped"] + d["source/a/skipped"] == d["skipped_total"]
    assert sum(d[f"source/{n}/samples"] for n in ("img", "a", "b")) == d["samples"] == 17 * 4
    assert state["mixture"]["mode"] == ("weighted" if weighted else "concatenated")
    assert [s["selected"] for s in state["mixture"]["sources"]] == [17, 8, 4]


def test_restoring_another_mixtures_state_is_refused(tmp_path, tok):  # noqa: F811
    a = _text_json(tmp_path / "a.json", "a", 9)
    b = _text_json(tmp_path / "b.json", "b", 4)
    c = _mix_config(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 1}], batch=2)
    it, _ = _iter(c, tok)
    _take(it, 2)
    state = it.get_state()
    c2 = _mix_config(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 3}], batch=2)
    it2, _ = _iter(c2, tok)
    with pytest.raises(ConfigError, match=r"source 1 \(b\) weight: 1.0 -> 3.0"):
        it2.set_state(state)
    # a state saved before mixtures existed (no description) still restores
    legacy = {k: v for k, v in state.items() if k != "mixture"}
    it3, _ = _iter(c, tok)
    it3.set_state(legacy)


def test_one_source_mixture_is_the_single_source_pipeline(tmp_path, tok):  # noqa: F811
    path = _write_dataset(str(tmp_path))
    single = _config(path, str(tmp_path))
    mixed = _mix_config(tmp_path, [{"json_path": path, "image_root": str(tmp_path)}], batch=4)
    a, b = _take(_iter(single, tok)[0], 6), _take(_iter(mixed, tok)[0], 6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_legacy_order_is_grains_shuffle_of_the_file(tmp_path, tok):  # noqa: F811
    # The single-source fields keep the pre-mixture order exactly: Grain's shuffle(seed) of the
    # records, repeated (tests/test_train.py simulates the trainer's skip counts from it).
    import grain

    path = _write_dataset(str(tmp_path), faults=False)
    c = _config(path, str(tmp_path))
    served = [s for b in _take(_iter(c, tok)[0], 6) for s in b["sample_id"].tolist()]
    with open(path) as f:
        ids = [r["id"] for r in json.load(f)]
    ref = grain.MapDataset.source(ids).shuffle(seed=3).repeat(None)
    assert served == [ref[i] for i in range(24)]


def test_per_source_templates_and_image_roots(tmp_path, chat_tok, caplog):  # noqa: F811
    # Two copies of one dataset under two image roots: the plain source sees every image, the
    # chat source's root lacks them (missing_image, counted against that source and named).
    root_a = tmp_path / "a"
    path = _write_dataset(str(root_a), faults=False)
    os.makedirs(tmp_path / "empty_root")
    c = _mix_config(tmp_path, [
        {"path": path, "name": "plain", "image_root": str(root_a), "template": "plain"},
        {"path": path, "name": "chat", "image_root": str(tmp_path / "empty_root"), "template": "chat",
         "pad_to_square": True}], batch=3)
    with caplog.at_level(logging.WARNING, logger="sea_jax.data"):
        it, stats = _iter(c, chat_tok, num_epochs=1)
        batches = list(it)
    d = stats.as_dict()
    assert d["source/chat/skipped"] == d["skipped/missing_image"] == 9 and d["source/plain/skipped"] == 0
    assert d["source/plain/samples"] == 12 and d["source/chat/samples"] == 3  # its text-only records
    assert "(missing_image, source chat)" in caplog.text
    # The chat source's rows are rendered with the chat template (role headers), the plain source's
    # as image + caption (none); only the chat source's text-only rows survived its empty root.
    header = chat_tok.convert_tokens_to_ids("<|start_header_id|>")
    is_chat = np.concatenate([(b["input_ids"] == header).any(axis=1) for b in batches])
    has_image = np.concatenate([b["has_image"] for b in batches])
    assert not has_image[is_chat].any() and has_image[~is_chat].sum() == 9
    rows = sum(len(b["sample_id"]) for b in batches)
    chat_rows = int(is_chat.sum())
    assert rows == 15 and chat_rows == 3


def test_path_problems_name_fields_and_entries(tmp_path):
    c = base_config()
    c.data.json = "SET_ME:the json"
    c.data.image_root = str(tmp_path / "nope")
    problems = pipeline.check_paths(c)
    assert problems == ["config.data.json='SET_ME:the json'; set --config.data.json=...",
                        f"config.data.image_root={str(tmp_path / 'nope')!r} does not exist"]
    a = _text_json(tmp_path / "a.json", "a", 2)
    c = base_config()
    c.data.sources = ({"path": a, "image_root": str(tmp_path)}, {"path": str(tmp_path / "gone.json")},
                      {"kind": "array_record", "path": str(tmp_path / "recs"), "image_root": str(tmp_path / "x")})
    problems = pipeline.check_paths(c)
    assert problems == [f"config.data.sources[1]: path {str(tmp_path / 'gone.json')!r} does not exist",
                        f"config.data.sources[2]: path {str(tmp_path / 'recs')!r} does not exist",
                        f"config.data.sources[2]: image_root {str(tmp_path / 'x')!r} is not a folder"]
    c.data.sources = ({"path": a, "weight": 1}, {"path": a})
    assert "some sources have a weight" in pipeline.check_paths(c)[0]


@pytest.mark.parametrize("where", ["README.md", "sea_jax/data/mixture.py"])
def test_documented_mixture_examples_parse(tmp_path, where):
    import re

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), where)).read()
    if where.endswith(".md"):
        block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    else:
        block = re.search(r"::\n\n((?:       .*\n|\n)+)", text).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
    (tmp_path / "mix.yaml").write_text("\n".join(ln[indent:] for ln in lines) + "\n")
    c = base_config()
    c.data.mixture = str(tmp_path / "mix.yaml")
    m = mixture.from_config(c)
    assert m.weighted and len(m.sources) >= 2
    assert {s.kind for s in m.sources} >= {"llava_json", "array_record"}
    assert any(s.on_exhausted == "stop" for s in m.sources)
