"""Shards on object stores: ``s3://``, ``gs://``, ``http(s)://`` and webdataset's ``pipe:`` commands.

Every remote access of the project goes through here, so the loaders, `verify_shards` and `build_shards`
see the same rules:

- **Libraries.** fsspec with s3fs (S3 and S3-compatible stores), gcsfs (``gs://``, the ``gcs`` extra) and
  fsspec's aiohttp client (``http(s)://``): one API for listing, ``HEAD`` and ranged ``GET`` on every store.
  Credentials and endpoints come from each store's standard chain (S3: ``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ``~/.aws``, instance roles; GCS:
  ``GOOGLE_APPLICATION_CREDENTIALS`` and the metadata server); nothing here adds settings of its own.
- **Transient faults** (refused or reset connections, timeouts, HTTP 5xx / S3 ``SlowDown``) are retried
  with exponential backoff, ``ATTEMPTS`` tries in all, and counted in `COUNTS` (``remote_retries``). The
  client libraries' own retry loops are turned off (s3fs/botocore, gcsfs, aiohttp), so every retry is counted
  once, here.
- **Permanent faults** — a missing object or bucket, missing credentials, access denied — raise
  `RemoteError`, one line naming the URL and what to do.
- **Changed objects.** `read_range` can pin a read to the ETag seen when the shard was listed (S3
  ``If-Match``): an object replaced since then raises `ChangedObject` instead of returning bytes of another
  file. `object_info` gives size and ETag for checking against a build's ``manifest.json``.

Paths: a remote shard is a ``str`` URL (a local one a `pathlib.Path`); ``pipe:CMD`` reads CMD's standard
output, and the ``.idx`` of ``pipe:... shard-000001.tar ...`` is the same command with that ``.tar`` as
``.idx`` (webdataset's convention for piped shards).

It imports only fsspec and the standard library (``data_tools`` never imports the training code).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SCHEMES: tuple[str, ...] = ("s3", "gs", "gcs", "http", "https")
"""URL schemes read through fsspec (``pipe:`` is run as a command)."""

ATTEMPTS = 6
"""Tries of one remote call on transient faults (the waits between them: 0.25, 0.5, 1, 2, 4 s)."""

BACKOFF_S = 0.25
"""The first wait before a retry; each next one doubles."""

COUNTS: Counter = Counter()
"""Process-wide counters: ``remote_retries`` (transient faults retried), ``remote_bytes`` (bytes read)."""

_scopes = threading.local()


def _count(key: str, n: int) -> None:
    COUNTS[key] += n
    for scope in getattr(_scopes, "stack", ()):
        scope[key] += n


@contextlib.contextmanager
def counted() -> Iterator[Counter]:
    """``remote_retries`` / ``remote_bytes`` of the remote calls this thread makes inside the block (several
    loaders of one process each count their own reads, which the process-wide `COUNTS` cannot tell apart)."""
    scope: Counter = Counter()
    stack = _scopes.__dict__.setdefault("stack", [])
    stack.append(scope)
    try:
        yield scope
    finally:
        stack.remove(scope)


T = TypeVar("T")


class RemoteError(OSError):
    """A remote shard or folder that cannot be read: missing, denied or without credentials (one line)."""


class ChangedObject(RemoteError):
    """An object that is not the one the manifest or the listing described (size, ETag or digest differ)."""


def is_remote(path: str | Path) -> bool:
    """True for ``s3://``, ``gs://``, ``http(s)://`` URLs and ``pipe:`` commands."""
    if not isinstance(path, str):
        return False
    return path.startswith("pipe:") or path.split("://", 1)[0].lower() in SCHEMES and "://" in path


def basename(path: str | Path) -> str:
    """The file name of a local path or a URL (``shard-000001.tar``)."""
    return Path(path).name if not isinstance(path, str) else posixpath.basename(path.rstrip("/").split("?")[0])


def index_of(path: str | Path) -> str | Path:
    """The ``.idx`` beside a shard: a local path, a URL, or the ``pipe:`` command with its last ``.tar``
    changed to ``.idx``."""
    if not isinstance(path, str):
        return Path(path).with_suffix(".idx")
    head, dot, tail = path.rpartition(".tar")
    if not dot:
        raise ValueError(f"cannot name the .idx of {path!r}: the shard's name must end in .tar")
    return head + ".idx" + tail


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URL (no normalisation of the scheme's ``//``)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(url: str) -> str:
    """The URL one folder up (``s3://b/out/train/x.tar`` → ``s3://b/out/train``)."""
    return url.rstrip("/").rsplit("/", 1)[0]


# -- fault handling -------------------------------------------------------------------------------------------


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in out and len(out) < 8:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def _status(err: BaseException) -> int | None:
    """The HTTP status behind an error (botocore ``ClientError``, aiohttp ``ClientResponseError``, gcsfs
    ``HttpError``)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status = getattr(err, "status", None)
    if type(err).__name__ == "HttpError" and status is None:
        status = getattr(err, "code", None)
    return status if isinstance(status, int) else None


def _code(err: BaseException) -> str:
    response = getattr(err, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
        "ResponseStreamingError", "IncompleteReadError", "ServerDisconnectedError", "ClientConnectorError",
        "ClientOSError", "ClientPayloadError", "ServerTimeoutError", "TransferEncodingError",
    }
)  # fmt: skip
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "Forbidden"}
)


def one_line(err: BaseException) -> str:
    """The message of a `RemoteError` as one line, also when a DataLoader worker raised it: torch re-raises
    it in the main process with the worker's traceback in the message, whose last line is the original one."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(text.split())


def classify(err: BaseException, url: str) -> RemoteError | None:
    """``None`` for a transient fault worth retrying, else the one-line `RemoteError` for ``err``."""
    chain = _chain(err)
    for e in chain:
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError") or (
            name == "DefaultCredentialsError"
        ):
            return RemoteError(
                f"no credentials for {url}: set them the store's usual way (S3: AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws, an instance role; GCS: GOOGLE_APPLICATION_CREDENTIALS)"
            )
        if _code(e) == "PreconditionFailed" or _status(e) == 412:
            return ChangedObject(f"{url} changed on the store since it was listed (its ETag differs)")
        if _code(e) in _DENIED_CODES or _status(e) in (401, 403) or isinstance(e, PermissionError):
            return RemoteError(
                f"access denied to {url}: the credentials of the standard chain may not read it "
                "(check the key, the bucket policy or AWS_ENDPOINT_URL)"
            )
    for e in chain:
        name = type(e).__name__
        status = _status(e)
        if name in _TRANSIENT_NAMES or (status is not None and (status >= 500 or status == 429)):
            return None
        if _code(e) in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling"):
            return None
        if isinstance(e, (ConnectionError, TimeoutError)) or (
            isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT)
        ):
            return None
    for e in chain:
        if isinstance(e, FileNotFoundError) or _status(e) == 404 or _code(e) in ("NoSuchKey", "NoSuchBucket"):
            return RemoteError(f"{url} does not exist (no such object or bucket on the store)")
    if isinstance(err, ImportError):
        return RemoteError(f"cannot read {url}: {err} (gs:// needs pip install 'mpma-ds[gcs]')")
    return RemoteError(f"cannot read {url}: {type(err).__name__}: {' '.join(str(err).split())}")


def with_retries(fn: Callable[[], T], url: str) -> T:
    """``fn()`` with transient faults retried (counted in ``COUNTS["remote_retries"]``); a permanent fault, or
    a transient one that outlasts `ATTEMPTS` tries, raises `RemoteError`."""
    for attempt in range(ATTEMPTS):
        try:
            return fn()
        except RemoteError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below: every client library raises its own types
            problem = classify(err, url)
            if problem is not None:
                raise problem from None
            if attempt == ATTEMPTS - 1:
                raise RemoteError(
                    f"{url}: the store did not answer after {ATTEMPTS} tries "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                ) from None
            _count("remote_retries", 1)
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


# -- stores ---------------------------------------------------------------------------------------------------


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of ``url``; instances are cached by fsspec (per process)."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    options: dict[str, Any] = {}
    # one retry loop, ours, so each retry is counted: s3fs's, botocore's and aiohttp's are set to one attempt
    if scheme == "s3":
        options = {
            "config_kwargs": {
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "http_session_cls": _single_try_s3_session(),
            }
        }
    elif scheme in ("http", "https"):
        options = {"get_client": _single_try_http_client}
    try:
        if scheme in ("gs", "gcs"):
            fs = _gcs()
            path = fs._strip_protocol(url)
        else:
            fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        raise RemoteError(f"cannot read {url}: {err} (gs:// needs pip install 'mpma-ds[gcs]')") from None
    if scheme == "s3":
        fs.retries = 1  # s3fs's own loop (a class attribute of 5)
    return fs, path


def _single_try(session: Any) -> Any:
    """``session`` (an ``aiohttp.ClientSession``) without aiohttp's own silent second try of an idempotent
    request whose connection was closed or reset (RFC 9112 §9.3.1): that retry is then ours, and counted."""
    if hasattr(session, "_retry_connection"):  # aiohttp >= 3.10; older ones have no such retry
        session._retry_connection = False
    return session


async def _single_try_http_client(**kwargs: Any) -> Any:
    """fsspec's HTTP client factory (``get_client``), as fsspec's own, with `_single_try`."""
    from fsspec.implementations.http import get_client

    return _single_try(await get_client(**kwargs))


@functools.cache
def _single_try_s3_session() -> type:
    """aiobotocore's HTTP session class whose aiohttp sessions are `_single_try`."""
    from aiobotocore.httpsession import AIOHTTPSession

    class SingleTrySession(AIOHTTPSession):
        async def _get_session(self, proxy_url: Any) -> Any:
            return _single_try(await super()._get_session(proxy_url))

    return SingleTrySession


def _gcs() -> Any:
    """gcsfs's ``GCSFileSystem``, trying each request once (cached by fsspec), endpoint and credentials from gcsfs's own chain
    (``STORAGE_EMULATOR_HOST``, ``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server). Not the class gcsfs
    registers for ``gs://`` by default, whose first use of each bucket asks the storage-control API whether it is
    a zonal / hierarchical bucket (for appends, which shards never need) and logs a warning wherever that API
    cannot be reached (an emulator, a role that may only read objects)."""
    return _single_try_gcs()()


@functools.cache
def _single_try_gcs() -> type:
    """gcsfs's ``GCSFileSystem`` with one try per request, so each retry is ours and counted: its
    ``retry_request`` loop (6 tries, a decorator bound at class definition) is taken off the methods it wraps, and its
    aiohttp sessions are `_single_try`."""
    from gcsfs.core import GCSFileSystem

    class SingleTryGCSFileSystem(GCSFileSystem):
        _request = GCSFileSystem._request.__wrapped__
        _get_file_request = GCSFileSystem._get_file_request.__wrapped__
        _get_file_concurrent = GCSFileSystem._get_file_concurrent.__wrapped__

        async def _set_session(self) -> Any:
            session = await super()._set_session()
            return _single_try(session)

    return SingleTryGCSFileSystem


LAST_MODIFIED = "lm:"
"""Marks an `ObjectInfo.etag` that is an HTTP ``Last-Modified`` date, not an ETag."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says of one object: its size (-1 where a listing does not say: an HTML folder page) and
    version: its ETag, or ``lm:<Last-Modified>`` where an HTTP server gives only that (``python -m http.server``),
    ``""`` where the store gives neither."""

    size: int
    etag: str = ""


def _info_of(entry: dict[str, Any]) -> ObjectInfo:
    etag = entry.get("ETag") or entry.get("etag") or entry.get("md5Hash") or ""
    if not etag and isinstance(entry.get("Last-Modified"), str):  # fsspec's HTTP HEAD
        etag = LAST_MODIFIED + entry["Last-Modified"]
    size = entry.get("size")
    return ObjectInfo(int(size) if size is not None else -1, str(etag))


def object_info(url: str) -> ObjectInfo:
    """Size and ETag of ``url`` (a ``HEAD``); `RemoteError` when it does not exist or cannot be read."""
    if url.startswith("pipe:"):
        return ObjectInfo(len(read_bytes(url)))
    fs, path = filesystem(url)
    info = with_retries(lambda: fs.info(path), url)
    if info.get("type") == "directory":
        raise RemoteError(f"{url} is a folder, not a shard")
    return _info_of(info)


def _url(fs: Any, url: str, path: str) -> str:
    """A listed path back as a URL with the scheme of ``url``."""
    return path if "://" in path else fs.unstrip_protocol(path)


def list_folder(url: str, pattern: str = "*.tar") -> dict[str, ObjectInfo]:
    """``{url: info}`` of the objects directly under the prefix ``url`` whose names match ``pattern``."""
    import fnmatch

    fs, path = filesystem(url)
    entries = with_retries(lambda: fs.ls(path.rstrip("/"), detail=True), url)
    return {
        _url(fs, url, e["name"]): _info_of(e)
        for e in entries
        if e.get("type") != "directory" and fnmatch.fnmatch(basename(e["name"]), pattern)
    }


def glob(url: str) -> dict[str, ObjectInfo]:
    """``{url: info}`` of the objects matching the glob ``url`` (``s3://b/train/shard-*.tar``), sorted."""
    fs, path = filesystem(url)
    found = with_retries(lambda: fs.glob(path, detail=True), url)
    return {_url(fs, url, p): _info_of(e) for p, e in sorted(found.items()) if e.get("type") != "directory"}


def is_folder(url: str) -> bool:
    """True when ``url`` names a prefix with objects under it rather than an object (``s3://b/train/``)."""
    if url.startswith("pipe:"):
        return False
    if url.endswith("/"):
        return True
    if url.lower().endswith((".tar", ".idx", ".json", ".jsonl")):
        return False
    fs, path = filesystem(url)
    try:
        return with_retries(lambda: fs.isdir(path), url)
    except RemoteError:
        return False


def read_range(url: str, start: int, end: int, *, etag: str = "") -> bytes:
    """Bytes ``[start, end)`` of ``url``; with ``etag`` (the listed `ObjectInfo.etag`, S3 or HTTP) the read is
    refused with `ChangedObject` when the object was replaced since it was listed: S3 by ``If-Match``; HTTP by
    ``If-Match`` / ``If-Unmodified-Since`` and, for servers that ignore those, by the answer's own ``ETag`` /
    ``Last-Modified``.

    A server that ignores ``Range`` (``python -m http.server``) answers with the whole object: the result is
    then longer than asked, and the caller decides (`mpma_ds.data.shard_cache` keeps it as the whole shard).
    """
    if url.startswith("pipe:"):
        return read_bytes(url)[start:end]
    fs, path = filesystem(url)
    if etag and url.startswith("s3://"):
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)

        async def get() -> bytes:
            resp = await fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
            )
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        data = with_retries(lambda: sync(fs.loop, get), url)
    elif etag and url.startswith(("http://", "https://")):
        from fsspec.asyn import sync

        data = with_retries(lambda: sync(fs.loop, _http_get_pinned, fs, url, start, end, etag), url)
    else:
        data = with_retries(lambda: fs.cat_file(path, start=start, end=end), url)
    _count("remote_bytes", len(data))
    return data


async def _http_get_pinned(fs: Any, url: str, start: int, end: int, etag: str) -> bytes:
    """A ranged HTTP GET that fails with `ChangedObject` unless the object still has the version ``etag``."""
    session = await fs.set_session()
    by_date = etag.startswith(LAST_MODIFIED)
    expected = etag[len(LAST_MODIFIED) :] if by_date else etag
    headers = {"Range": f"bytes={start}-{end - 1}", "If-Unmodified-Since" if by_date else "If-Match": expected}
    async with session.get(url, headers=headers) as resp:
        seen = resp.headers.get("Last-Modified" if by_date else "ETag")
        if resp.status == 412 or (resp.status < 300 and seen and seen != expected):
            raise ChangedObject(
                f"{url} changed on the store since it was listed ({'Last-Modified' if by_date else 'ETag'} {seen} is not {expected})"
            )
        resp.raise_for_status()
        return await resp.read()


def read_bytes(url: str) -> bytes:
    """The whole object (a ``.idx``, a ``manifest.json``, a shard fetched whole), or a ``pipe:`` command's output."""
    if url.startswith("pipe:"):
        command = url[len("pipe:") :]

        def run() -> bytes:
            done = subprocess.run(command, shell=True, capture_output=True, check=False)  # noqa: S602
            if done.returncode != 0:
                tail = " ".join(done.stderr.decode("utf-8", "replace").split())[-200:]
                raise RemoteError(f"{url}: the command exited {done.returncode} ({tail})")
            return done.stdout

        data = run()
    else:
        fs, path = filesystem(url)
        data = with_retries(lambda: fs.cat_file(path), url)
    _count("remote_bytes", len(data))
    return data


def exists(url: str) -> bool:
    """True when the object ``url`` exists (a missing one is False; denied or unreachable is `RemoteError`)."""
    try:
        object_info(url)
    except RemoteError as err:
        if "does not exist" in str(err):
            return False
        raise
    return True


def upload(local: str | Path, url: str) -> None:
    """Put the local file at ``url``. An object store shows an object under its name only once the upload
    is complete (a single PUT or a completed multipart upload), so no reader ever sees half a shard."""
    fs, path = filesystem(url)
    with_retries(lambda: fs.put_file(str(local), path), url)


def put_bytes(data: bytes, url: str) -> None:
    """Write ``data`` as the object ``url`` (complete or not at all, as `upload`)."""
    fs, path = filesystem(url)
    with_retries(lambda: fs.pipe_file(path, data), url)


def delete(url: str) -> None:
    """Remove the object ``url`` (nothing when it is already gone)."""
    fs, path = filesystem(url)
    try:
        with_retries(lambda: fs.rm_file(path), url)
    except RemoteError as err:
        if "does not exist" not in str(err):
            raise


def env_summary() -> str:
    """Which endpoint S3 requests go to (for log lines): ``AWS_ENDPOINT_URL`` or AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "aws"
