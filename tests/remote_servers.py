"""Real stores on loopback for the remote-shard tests: an S3-compatible server (moto's server mode, its own
process) and ``python -m http.server``, each on its own free port, stopped by the pid the test started.

Clients reach the S3 server through the standard ``AWS_ENDPOINT_URL`` chain (`s3_env`), nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MOTO = str(Path(sys.executable).with_name("moto_server"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode} before serving")
        try:
            urllib.request.urlopen(url, timeout=1).close()  # noqa: S310 - loopback only
            return
        except OSError as err:
            if getattr(err, "code", None):  # an HTTP error answer: the server is up
                return
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server this test started (by its pid) and wait for it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def start_moto(port: int, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(  # noqa: S603
        [MOTO, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env},
    )  # fmt: skip
    _wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


def start_gcs(port: int) -> subprocess.Popen:
    """gcp-storage-emulator (a GCS JSON-API server, in memory) as its own process; clients reach it through
    gcsfs's standard ``STORAGE_EMULATOR_HOST`` (`gcs_env`)."""
    proc = subprocess.Popen(  # noqa: S603
        [str(Path(sys.executable).with_name("gcp-storage-emulator")), "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


def gcs_env(port: int) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


def start_http(folder: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


def start_fault_proxy(
    target_port: int, port: int, mode: str, faults: int, log: Path, trigger: Path | None = None
) -> subprocess.Popen:
    """`fault_proxy.py` (its own process) on ``port`` in front of the server on ``target_port``: the first
    ``faults`` connections (-1: all) get ``mode`` (``reset`` or ``slowdown``), one line each in ``log``; with
    ``trigger``, only once that file exists."""
    script = Path(__file__).with_name("fault_proxy.py")
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, str(script), "--port", str(port), "--target", f"127.0.0.1:{target_port}",
         "--mode", mode, "--faults", str(faults), "--log", str(log), "--trigger", str(trigger or "")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a bare connect: a connection that sends nothing is never faulted
        if proc.poll() is not None:
            raise RuntimeError(f"fault_proxy.py exited {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"fault_proxy.py did not listen on {port} within 30 s")


def faults_served(log: Path) -> int:
    """How many faults the proxy has served (its log's lines, less the ``cut`` one)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(not line.startswith("cut ") for line in lines)


def connections_cut(log: Path) -> int:
    """How many live connections the proxy cut when its trigger appeared."""
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(int(line.split()[1]) for line in lines if line.startswith("cut "))


def s3_env(port: int) -> dict[str, str]:
    """The standard AWS variables pointing at the loopback server (any key works on moto)."""
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-role probe of 169.254.169.254
    }


@contextlib.contextmanager
def env(values: dict[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables for the block; the fsspec instance cache is cleared around it so
    clients are built from these values."""

    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    clear_clients()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear_clients()


def clear_clients() -> None:
    """Forget fsspec's cached clients (the registered ones and gcsfs's, which `remote` builds directly)."""
    import fsspec

    from data_tools import remote

    fsspec.AbstractFileSystem.clear_instance_cache()
    for cls in fsspec.registry.values():
        cls.clear_instance_cache()
    try:
        from gcsfs.core import GCSFileSystem
    except ImportError:
        return
    GCSFileSystem.clear_instance_cache()
    remote._single_try_gcs().clear_instance_cache()  # the class `remote` builds gs:// clients from


def upload_tree(local: Path, url: str) -> None:
    """Copy every file under ``local`` to the prefix ``url`` (the S3 server's bucket must exist)."""
    from data_tools import remote

    for path in sorted(local.rglob("*")):
        if path.is_file():
            remote.upload(path, remote.join(url, path.relative_to(local).as_posix()))


def make_bucket(name: str) -> None:
    from data_tools import remote

    fs, _ = remote.filesystem(f"s3://{name}")
    fs.mkdir(name)


@contextlib.contextmanager
def s3_with(local: Path, url: str) -> Iterator[int]:
    """A moto server process holding the files under ``local`` at ``url`` (``s3://bucket/prefix``, the bucket
    created); yields its port, and stops it after."""
    port = free_port()
    proc = start_moto(port)
    try:
        with env(s3_env(port)):
            make_bucket(url.split("://", 1)[1].split("/", 1)[0])
            upload_tree(local, url)
        yield port
    finally:
        stop(proc)
