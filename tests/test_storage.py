"""sea_jax.storage on a local folder and on gs:// (fake-gcs-server, tests/gcs_server.py): every
function, AppendLog rows visible to a second client before close, Orbax composite checkpoints to
gs:// read back bit-exact (and by tensorstore directly), a subprocess that reaches only loopback,
and timings (50 MB Orbax save/restore; 200 small image reads, sequential vs 16 threads)."""
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sea_jax import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unique(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") + "-" + uuid.uuid4().hex[:8]


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """A fresh empty folder: under tmp_path, or a fresh prefix of the emulator's bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    emu = request.getfixturevalue("gcs")
    return f"gs://{emu.bucket}/{_unique(request.node.name)}"


@pytest.fixture
def gs_root(gcs, request):  # noqa: F811
    return f"gs://{gcs.bucket}/{_unique(request.node.name)}"


def _read(path):
    with open(path) as f:
        return f.read()


def _write_local(path, text):
    with open(path, "w") as f:
        f.write(text)


def _report(capsys, text):
    with capsys.disabled():
        print(f"\n[storage timing] {text}")


# ----------------------------------------------------------------------------------------------
# paths and queries


def test_is_remote_and_join():
    assert storage.is_remote("gs://b/k") and not storage.is_remote("/tmp/x")
    assert not storage.is_remote("relative/x")
    with pytest.raises(ValueError, match="unsupported path scheme"):
        storage.is_remote("s3://b/k")
    assert storage.join("gs://b", "run", "metrics.jsonl") == "gs://b/run/metrics.jsonl"
    assert storage.join("gs://b/run/", "x") == "gs://b/run/x"
    assert storage.join("/tmp/a", "b", "c") == os.path.join("/tmp/a", "b", "c")


def test_write_read_text_and_bytes(root):
    t, b = storage.join(root, "a", "t.txt"), storage.join(root, "a", "deep", "b.bin")
    storage.write_text(t, "héllo\nworld\n")
    storage.write_bytes(b, bytes(range(256)) * 3)
    assert storage.read_text(t) == "héllo\nworld\n"
    assert storage.read_bytes(b) == bytes(range(256)) * 3
    storage.write_text(t, "short")  # overwrite
    assert storage.read_text(t) == "short"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))


def test_open_text_binary_and_append(root):
    p = storage.join(root, "f", "x.txt")
    with storage.open(p, "w") as f:
        f.write("line1\n")
        f.write("ünï\n")
    with storage.open(p) as f:
        assert f.readlines() == ["line1\n", "ünï\n"]
    pb = storage.join(root, "f", "x.bin")
    with storage.open(pb, "wb") as f:
        f.write(b"\x00\xff" * 1000)
    with storage.open(pb, "rb") as f:
        assert f.read(3) == b"\x00\xff\x00"
        f.seek(1998)
        assert f.read() == b"\x00\xff"
    if storage.is_remote(root):
        with pytest.raises(ValueError, match="AppendLog"):
            storage.open(p, "a")
    else:
        with storage.open(p, "a") as f:
            f.write("more\n")
        assert storage.read_text(p).endswith("more\n")
    with pytest.raises(ValueError):
        storage.open(p, "r+")


def test_exists_isdir_isfile_listdir_glob(root):
    for rel in ("a/x.txt", "a/y.bin", "a/sub/z.txt", "ab/w.txt"):
        storage.write_text(storage.join(root, *rel.split("/")), rel)
    a = storage.join(root, "a")
    assert storage.exists(a) and storage.isdir(a) and not storage.isfile(a)
    x = storage.join(a, "x.txt")
    assert storage.exists(x) and storage.isfile(x) and not storage.isdir(x)
    assert not storage.exists(storage.join(root, "nope")) and not storage.isdir(storage.join(root, "nope"))
    assert storage.listdir(a) == ["sub", "x.txt", "y.bin"]
    assert storage.listdir(root) == ["a", "ab"]
    with pytest.raises(FileNotFoundError):
        storage.listdir(storage.join(root, "nope"))
    assert storage.glob(storage.join(a, "*.txt")) == [x]
    assert storage.glob(storage.join(root, "a*", "*.txt")) == [x, storage.join(root, "ab", "w.txt")]
    assert storage.glob(storage.join(root, "**", "z.txt")) == [storage.join(a, "sub", "z.txt")]


def test_makedirs(root):
    d = storage.join(root, "e", "f")
    storage.makedirs(d)
    storage.makedirs(d)  # exist_ok
    # GCS has no folders: an empty one does not exist there (documented difference).
    assert storage.isdir(d) is (not storage.is_remote(root))
    storage.write_text(storage.join(d, "k"), "1")
    assert storage.isdir(d) and storage.listdir(d) == ["k"]


def test_size_and_mtime(root):
    p = storage.join(root, "s.bin")
    before = time.time()
    storage.write_bytes(p, b"x" * 12345)
    assert storage.size(p) == 12345
    assert before - 5 <= storage.mtime(p) <= time.time() + 5
    with pytest.raises(FileNotFoundError):
        storage.size(storage.join(root, "missing"))


def test_atomic_write(root):
    p = storage.join(root, "cfg", "config.json")
    storage.atomic_write(p, lambda f: json.dump({"a": 1}, f))
    assert json.loads(storage.read_text(p)) == {"a": 1}
    storage.atomic_write(p, lambda f: f.write(b"\x01\x02"), mode="wb")
    assert storage.read_bytes(p) == b"\x01\x02"

    def boom(f):
        f.write("partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        storage.atomic_write(p, boom)
    assert storage.read_bytes(p) == b"\x01\x02"  # old content, no partial file
    assert storage.listdir(storage.join(root, "cfg")) == ["config.json"]  # no temp left
    fresh = storage.join(root, "cfg", "never.json")
    with pytest.raises(RuntimeError):
        storage.atomic_write(fresh, boom)
    assert not storage.exists(fresh)
    with pytest.raises(ValueError):
        storage.atomic_write(p, boom, mode="a")


# ----------------------------------------------------------------------------------------------
# copy, rename, delete


def _tree(root):
    files = {"tok/tokenizer.json": "{}", "tok/sub/vocab.txt": "a\nb\n", "tok/merges.txt": "m"}
    for rel, text in files.items():
        storage.write_text(storage.join(root, *rel.split("/")), text)
    return {k[len("tok/"):]: v for k, v in files.items()}


def test_copy_and_copytree_all_directions(root, tmp_path, gs_root):
    files = _tree(root)
    src = storage.join(root, "tok")
    storage.write_text(storage.join(root, "tok2", "not-this.txt"), "sibling prefix")
    for dst in (str(tmp_path / "copy" / "tok"), storage.join(gs_root, "tok")):
        copied = storage.copytree(src, dst)
        assert sorted(copied) == sorted(files)
        for rel, text in files.items():
            assert storage.read_text(storage.join(dst, *rel.split("/"))) == text
        assert not storage.exists(storage.join(dst, "not-this.txt"))
        one = storage.join(dst, "one.txt")
        storage.copy(storage.join(src, "merges.txt"), one)
        assert storage.read_text(one) == "m"
        storage.copy(storage.join(src, "tokenizer.json"), one)  # overwrite
        assert storage.read_text(one) == "{}"
    with pytest.raises(FileNotFoundError):
        storage.copytree(storage.join(root, "missing"), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        storage.copy(storage.join(root, "missing"), storage.join(gs_root, "x"))


def test_rename_remove_rmtree(root, tmp_path):
    files = _tree(root)
    a, b = storage.join(root, "a.txt"), storage.join(root, "b.txt")
    storage.write_text(a, "A")
    storage.write_text(b, "B")
    storage.rename(a, b)  # a file replaces a file
    assert not storage.exists(a) and storage.read_text(b) == "A"
    storage.rename(storage.join(root, "tok"), storage.join(root, "moved", "tok"))
    assert not storage.exists(storage.join(root, "tok"))
    got = storage.join(root, "moved", "tok")
    assert {r: storage.read_text(storage.join(got, *r.split("/"))) for r in files} == files
    storage.write_text(storage.join(root, "other", "k"), "k")
    with pytest.raises(FileExistsError):
        storage.rename(got, storage.join(root, "other"))
    with pytest.raises(FileNotFoundError):
        storage.rename(storage.join(root, "missing"), storage.join(root, "m2"))
    # across kinds: to a local folder and back
    there = str(tmp_path / "elsewhere" / "b.txt")
    storage.rename(b, there)
    assert not storage.exists(b) and _read(there) == "A"
    storage.rename(there, b)
    assert storage.read_text(b) == "A" and not os.path.exists(there)

    storage.remove(b)
    assert not storage.exists(b)
    with pytest.raises(FileNotFoundError):
        storage.remove(b)
    storage.rmtree(storage.join(root, "moved"))
    assert not storage.exists(storage.join(root, "moved"))
    assert storage.exists(storage.join(root, "other", "k"))
    with pytest.raises(FileNotFoundError):
        storage.rmtree(storage.join(root, "moved"))


# ----------------------------------------------------------------------------------------------
# local copies


def test_local_copy_and_cache(root, tmp_path):
    files = _tree(root)
    cache = str(tmp_path / "cache")
    folder = storage.local_copy(storage.join(root, "tok"), cache_dir=cache)
    assert os.path.isdir(folder)
    assert {r: _read(os.path.join(folder, *r.split("/"))) for r in files} == files
    one = storage.local_copy(storage.join(root, "tok", "merges.txt"), cache_dir=cache)
    assert os.path.isfile(one) and _read(one) == "m"
    if not storage.is_remote(root):
        assert folder == storage.join(root, "tok")  # local paths are used in place
        return
    assert folder.startswith(cache)
    stamp = os.stat(os.path.join(folder, "merges.txt")).st_mtime_ns
    time.sleep(0.01)
    assert storage.local_copy(storage.join(root, "tok"), cache_dir=cache) == folder
    assert os.stat(os.path.join(folder, "merges.txt")).st_mtime_ns == stamp  # cached, not fetched
    storage.write_text(storage.join(root, "tok", "merges.txt"), "changed")
    storage.write_text(storage.join(root, "tok", "added.txt"), "new")
    again = storage.local_copy(storage.join(root, "tok"), cache_dir=cache)
    assert again == folder and _read(os.path.join(folder, "merges.txt")) == "changed"
    assert sorted(os.listdir(folder)) == ["added.txt", "merges.txt", "sub", "tokenizer.json"]
    assert [n for n in os.listdir(os.path.dirname(folder)) if ".tmp-" in n] == []
    with pytest.raises(FileNotFoundError):
        storage.local_copy(storage.join(root, "missing"), cache_dir=cache)


def test_as_local_read_and_write(root):
    _tree(root)
    with storage.as_local(storage.join(root, "tok")) as d:
        assert os.path.isdir(d) and _read(os.path.join(d, "sub", "vocab.txt")) == "a\nb\n"
    with storage.as_local(storage.join(root, "tok", "merges.txt")) as f:
        assert _read(f) == "m"
    if storage.is_remote(root):
        assert not os.path.exists(d) and not os.path.exists(f)  # temporary copies are gone
    with pytest.raises(FileNotFoundError), storage.as_local(storage.join(root, "missing")):
        pass
    with storage.as_local(storage.join(root, "saved"), write=True) as d:  # a library saves a folder
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "w.safetensors"), "wb") as fh:
            fh.write(b"\x07" * 10)
    assert storage.read_bytes(storage.join(root, "saved", "w.safetensors")) == b"\x07" * 10
    with storage.as_local(storage.join(root, "one.json"), write=True) as f:  # ... or a file
        _write_local(f, "{}")
    assert storage.read_text(storage.join(root, "one.json")) == "{}"
    with pytest.raises(RuntimeError), storage.as_local(storage.join(root, "fails.json"), write=True) as f:
        _write_local(f, "{}")
        raise RuntimeError("library failed")
    if storage.is_remote(root):
        assert not storage.exists(storage.join(root, "fails.json"))  # nothing uploaded
    with pytest.raises(FileNotFoundError), storage.as_local(storage.join(root, "empty"), write=True):
        pass  # wrote nothing


# ----------------------------------------------------------------------------------------------
# AppendLog


def _second_client_read(path: str) -> bytes:
    """Reads ``path`` with a client that shares nothing with the writer: google-cloud-storage for
    gs:// (a different library, its own connection), the builtin open locally."""
    if not storage.is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    from google.cloud import storage as gcs_client

    bucket, key = path[len("gs://"):].split("/", 1)
    client = gcs_client.Client(project="emulator-project")
    return client.bucket(bucket).blob(key).download_as_bytes()


def test_append_log_rows_visible_before_close(root):
    p = storage.join(root, "run", "metrics.jsonl")
    log = storage.AppendLog(p)
    rows = []
    for step in range(1, 6):
        row = {"step": step, "loss": 1.0 / step, "mfu": None}
        log.write_json(row)
        rows.append(row)
        seen = [json.loads(x) for x in _second_client_read(p).decode().splitlines()]
        assert seen == rows  # each row readable at once, writer still open
    log.close()
    log.close()  # idempotent
    with pytest.raises(ValueError):
        log.write("closed")
    # batched: nothing new until flush
    with storage.AppendLog(p, autoflush=False) as log2:  # reopening continues the log
        log2.write_json({"step": 6})
        assert len(_second_client_read(p).splitlines()) == 5
        log2.flush()
        assert len(_second_client_read(p).splitlines()) == 6
        log2.write(b'{"step": 7}\n')
    assert [json.loads(x)["step"] for x in storage.read_text(p).splitlines()] == list(range(1, 8))
    assert log2.size == storage.size(p)


def test_append_log_compose_mode_on_gcs(gs_root, gcs):  # noqa: F811
    p = storage.join(gs_root, "metrics.jsonl")
    want = b""
    with storage.AppendLog(p, rewrite_below=300) as log:
        for step in range(40):
            line = json.dumps({"step": step, "loss": float(step) * 0.5}).encode() + b"\n"
            log.write(line)
            want += line
            assert _second_client_read(p) == want
        assert log._content is None  # past 300 bytes: appends went by compose
    assert storage.listdir(gs_root) == ["metrics.jsonl"]  # no part objects left
    # a part left by a writer killed mid-flush is cleaned when the log is reopened
    storage.write_bytes(storage.join(gs_root, ".metrics.jsonl.part-dead"), b"x")
    with storage.AppendLog(p, rewrite_below=300) as log:
        log.write(b"last\n")
    assert storage.listdir(gs_root) == ["metrics.jsonl"]
    assert storage.read_bytes(p) == want + b"last\n"


def test_append_log_flush_cost(gs_root, capsys):
    """Per-flush time of the two gs:// strategies at a few log sizes (printed)."""
    row = json.dumps({"step": 1, "loss": 1.2345, "lr": 1e-3, "tokens_per_s": 12345.6}).encode() + b"\n"
    lines = []
    for n_rows, mode in ((100, "rewrite"), (10_000, "rewrite"), (10_000, "compose"), (100_000, "compose")):
        p = storage.join(gs_root, f"{mode}-{n_rows}.jsonl")
        storage.write_bytes(p, row * n_rows)
        with storage.AppendLog(p, rewrite_below=(1 << 40) if mode == "rewrite" else 0) as log:
            t = time.perf_counter()
            for _ in range(10):
                log.write(row)
            dt = (time.perf_counter() - t) / 10
        assert storage.size(p) == len(row) * (n_rows + 10)
        lines.append(f"{mode} at {len(row) * n_rows / 1e6:.2f} MB: {dt * 1e3:.1f} ms/flush")
    _report(capsys, "AppendLog per flush on the emulator: " + "; ".join(lines))


def test_sees_objects_written_by_another_client(gs_root):
    """No listings cache: what another process or host writes is seen at once."""
    from google.cloud import storage as gcs_client

    storage.write_text(storage.join(gs_root, "ck", "1", "done"), "1")
    assert storage.listdir(storage.join(gs_root, "ck")) == ["1"]
    assert not storage.exists(storage.join(gs_root, "ck", "2", "done"))
    bucket, key = gs_root[len("gs://"):].split("/", 1)
    gcs_client.Client(project="emulator-project").bucket(bucket).blob(f"{key}/ck/2/done").upload_from_string("2")
    assert storage.listdir(storage.join(gs_root, "ck")) == ["1", "2"]
    assert storage.exists(storage.join(gs_root, "ck", "2", "done"))
    assert storage.glob(storage.join(gs_root, "ck", "*", "done"))[-1].endswith("/ck/2/done")
    # folder placeholder objects ("key/", made by the Cloud Console or gsutil) are not entries
    for placeholder in (f"{key}/ck/", f"{key}/ck/3/"):
        gcs_client.Client(project="emulator-project").bucket(bucket).blob(placeholder).upload_from_string(b"")
    assert storage.listdir(storage.join(gs_root, "ck")) == ["1", "2", "3"]
    assert sorted(storage.copytree(storage.join(gs_root, "ck"), storage.join(gs_root, "ck2"))) == ["1/done", "2/done"]


# ----------------------------------------------------------------------------------------------
# Orbax and tensorstore on gs://


def _sharded_tree(mesh, scale=1):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64 * scale, 32)).astype(np.float32)
    b = rng.standard_normal((32,)).astype(jnp.bfloat16)
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P(("data", "fsdp"), "tensor"))),
            "b": jax.device_put(b, NamedSharding(mesh, P())),
        },
        "count": jax.device_put(np.int32(7), NamedSharding(mesh, P())),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _bits(x):
    a = np.asarray(x)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.itemsize in (1, 2, 4, 8) else a


def test_orbax_composite_checkpoint_on_gcs(gs_root, make_mesh):
    import tensorstore as ts

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ckdir = storage.join(gs_root, "run", "checkpoints")
    mgr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    trees = {}
    for step in (1, 2, 3):
        tree = _sharded_tree(mesh)
        tree["params"]["w"] = tree["params"]["w"] * step
        trees[step] = tree
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave({"step": step, "seed": 7})))
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 3]
    mgr.close()
    assert storage.listdir(ckdir) == ["2", "3"]  # step 1 deleted by max_to_keep, no temp folder
    # on gs:// Orbax finalizes by writing commit markers in place (no folder rename)
    assert storage.isfile(storage.join(ckdir, "3", "commit_success.txt"))

    mgr = ocp.CheckpointManager(ckdir)  # a fresh manager finds the steps in the bucket
    assert mgr.latest_step() == 3
    want = trees[3]
    got = mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(want)),
                                                 meta=ocp.args.JsonRestore()))
    mgr.close()
    assert got.meta == {"step": 3, "seed": 7}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got.state)):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert b.sharding == a.sharding, path
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(path))
    assert json.loads(storage.read_text(storage.join(ckdir, "3", "meta", "metadata"))) == {"step": 3, "seed": 7}

    # tensorstore, directly, reads the arrays Orbax wrote (OCDBT over the gcs kvstore, zarr)
    base = storage.join(ckdir, "3", "state") + "/"
    keys = ts.KvStore.open({"driver": "ocdbt", "base": base}).result().list().result()
    assert b"params.w/.zarray" in keys
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": "params.w/"}}).result()
    np.testing.assert_array_equal(arr.read().result(), np.asarray(want["params"]["w"]))


# ----------------------------------------------------------------------------------------------
# a subprocess with only gcs.env: works, and its Python clients reach loopback only

_CHILD = r"""
import json, socket, sys, time
seen = []
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):
        seen.append(str(args[1][0]))
    elif event == "socket.getaddrinfo":
        seen.append(str(args[0]))
sys.addaudithook(hook)
root = sys.argv[1]
from sea_jax import storage
out = {"listdir": storage.listdir(root), "log": storage.read_text(root + "/metrics.jsonl")}
with storage.AppendLog(root + "/metrics.jsonl") as log:
    log.write_json({"step": 99})
import tensorstore as ts
bucket, key = root[len("gs://"):].split("/", 1)
kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": key + "/"}).result()
out["ts"] = kv.read("metrics.jsonl").result().value.decode()
t = time.time()
import google.auth, google.auth.exceptions
try:
    google.auth.default()
    out["adc"] = "found credentials"
except google.auth.exceptions.DefaultCredentialsError as e:
    out["adc"] = "none"
out["adc_s"] = time.time() - t
import fsspec
t = time.time()
fs = fsspec.filesystem("gcs", token=None, skip_instance_cache=True)  # gcsfs's default auth chain
out["default_chain_ls"] = sorted(fs.ls(bucket + "/" + key, detail=False))
out["default_chain_s"] = time.time() - t
out["seen"] = sorted(set(seen))
print("RESULT" + json.dumps(out))
"""


def test_subprocess_with_gcs_env_stays_on_loopback(gs_root, gcs):  # noqa: F811
    storage.write_text(storage.join(gs_root, "metrics.jsonl"), '{"step": 1}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_"))}
    env.update(gcs.env)
    env["PYTHONPATH"] = REPO
    r = subprocess.run([sys.executable, "-c", _CHILD, gs_root], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["listdir"] == ["metrics.jsonl"] and out["log"] == '{"step": 1}\n'
    assert out["ts"] == '{"step": 1}\n{"step": 99}\n'
    assert out["adc"] == "none" and out["adc_s"] < 5
    assert out["default_chain_ls"] == [gs_root[len("gs://"):] + "/metrics.jsonl"]
    assert out["default_chain_s"] < 10
    assert out["seen"] and set(out["seen"]) <= {"127.0.0.1", "localhost"}, out["seen"]
    assert storage.read_text(storage.join(gs_root, "metrics.jsonl")).endswith('{"step": 99}\n')


# ----------------------------------------------------------------------------------------------
# timings


def test_timing_orbax_50mb_save_restore(gs_root, make_mesh, capsys):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rng = np.random.default_rng(1)
    tree = {
        "a": jax.device_put(rng.standard_normal((2048, 4096), np.float32),
                            NamedSharding(mesh, P(("data", "fsdp"), "tensor"))),
        "b": jax.device_put(rng.standard_normal((2048, 4096), np.float32).astype(jnp.bfloat16),
                            NamedSharding(mesh, P("fsdp", ("data", "tensor")))),
    }
    nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    assert nbytes >= 50e6
    mgr = ocp.CheckpointManager(storage.join(gs_root, "ck"))
    t = time.perf_counter()
    mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    mgr.wait_until_finished()
    t_save = time.perf_counter() - t
    t = time.perf_counter()
    got = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(tree)))).state
    jax.block_until_ready(got)
    t_restore = time.perf_counter() - t
    mgr.close()
    for k, want in tree.items():
        np.testing.assert_array_equal(_bits(got[k]), _bits(want))
    _report(capsys, f"Orbax {nbytes / 1e6:.1f} MB to the emulator: save {t_save:.2f} s "
                    f"({nbytes / 1e6 / t_save:.0f} MB/s), restore {t_restore:.2f} s "
                    f"({nbytes / 1e6 / t_restore:.0f} MB/s)")


def test_timing_small_image_reads(gs_root, tmp_path, capsys):
    rng = np.random.default_rng(2)
    local = tmp_path / "images"
    local.mkdir()
    blobs = {}
    for i in range(200):
        data = rng.integers(0, 256, 50 * 1024, dtype=np.uint8).tobytes()
        (local / f"{i:04d}.jpg").write_bytes(data)
        blobs[f"{i:04d}.jpg"] = data
    t = time.perf_counter()
    storage.copytree(str(local), storage.join(gs_root, "images"))
    t_up = time.perf_counter() - t
    paths = [storage.join(gs_root, "images", n) for n in sorted(blobs)]

    t = time.perf_counter()
    seq = [storage.read_bytes(p) for p in paths]
    t_seq = time.perf_counter() - t
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        t = time.perf_counter()
        par = list(pool.map(storage.read_bytes, paths))
        t_par = time.perf_counter() - t
    assert seq == par == [blobs[n] for n in sorted(blobs)]
    _report(capsys, f"200 x 50 KB from the emulator: upload (copytree) {t_up:.2f} s; read sequential "
                    f"{t_seq:.2f} s ({200 / t_seq:.0f}/s), 16 threads {t_par:.2f} s ({200 / t_par:.0f}/s)")
