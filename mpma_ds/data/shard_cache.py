"""The node-local shard cache: remote shards fetched whole onto local disk, shared by the ranks of a node.

Used where a reader needs a local file — DALI's webdataset reader (paths and ``.idx`` files on disk), ``pipe:``
shards, and HTTP servers that ignore ``Range`` — while ``wds`` otherwise streams byte ranges with no local
copy. Rules:

- **Shared and safe.** One folder per node (``data.shard_cache``, default ``$TMPDIR/mpma-shard-cache-<uid>``);
  a shard is fetched under an exclusive ``flock`` on ``<name>.lock``, written to ``<name>.tmp-<pid>-<thread>``
  and renamed into place, so two ranks that want the same shard fetch it once and nobody reads half a file.
- **Verified.** The fetch is pinned to the version the store listed (S3 ``If-Match`` on its ETag; HTTP
  ``If-Match`` / ``If-Unmodified-Since`` and the answer's own ETag / Last-Modified), and the bytes must have the
  listed size (and, where the build's manifest gives one, its sha256): anything else is `ChangedObject`, never
  kept.
- **One budget per node.** ``budget_bytes`` bounds the whole folder, whichever rank fetched what: accounting
  and eviction happen under a folder lock (``.folder.lock``), and a fetch first *reserves* its listed size (its
  temporary file is created at that size, sparse) and evicts least recently used shards to make room. A shard
  in use is never evicted: a rank holds a shared ``flock`` on a shard's lock from its fetch until it has the
  file open (`open`) or, for DALI, for as long as its reader may open it (`path` with ``pin=True``, `unpin`),
  and eviction takes only shards whose lock it gets exclusively. When nothing can be evicted a fetch goes
  ahead while the folder is within budget, so the folder exceeds it by at most one shard; over budget, it
  waits for room (``WAIT_S``) and then fails with one line.
- **Ahead of the reader.** `prefetch` starts fetches of the next shards in a thread pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from data_tools import remote
from data_tools.remote import ChangedObject, ObjectInfo

DEFAULT_BUDGET_GB = 50.0
FOLDER_LOCK = ".folder.lock"
WAIT_S = 300.0
"""How long a fetch waits for room in a folder over budget whose shards are all in use before failing."""


class ShardCacheFull(ValueError):
    """The node's cache stayed over ``data.shard_cache_gb`` with every shard in use for `WAIT_S`: the budget is
    too small for the shards the node's ranks read at once (a setting to change, not a fault to retry)."""


def default_root() -> Path:
    """``$TMPDIR/mpma-shard-cache-<uid>``: node-local and shared by this user's ranks."""
    return Path(tempfile.gettempdir()) / f"mpma-shard-cache-{os.getuid()}"


class ShardCache:
    """Whole remote shards (and their ``.idx``) on local disk; see the module docstring."""

    def __init__(self, root: str | Path = "", budget_gb: float = DEFAULT_BUDGET_GB, prefetch_threads: int = 4):
        self.root = Path(root) if root else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = int(budget_gb * 1e9)
        self.fetched = 0
        """Shards this process fetched (not found already cached)."""
        self.evicted = 0
        """Shards this process deleted to make room (fetched by any rank of the node)."""
        self.cost: Counter = Counter()
        """``remote_retries`` / ``remote_bytes`` of this cache's fetches (prefetch threads included)."""
        self._cost_lock = threading.Lock()
        self._threads = prefetch_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._pins: dict[str, BinaryIO] = {}
        """Shard name → its lock file, held shared: in use by this process, never evicted."""
        self._name_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def name_of(self, url: str) -> str:
        """The cache file name of ``url``: a digest of the URL, then its basename (readable in ``ls``)."""
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
        return f"{digest}-{remote.basename(url) or 'object'}"

    # -- locks ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _folder(self) -> Iterator[None]:
        """The folder lock: accounting, eviction and lock downgrades of every rank of the node, one at a time."""
        with open(self.root / FOLDER_LOCK, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _thread_lock(self, name: str) -> threading.Lock:
        """One thread of this process at a time per shard (``flock`` locks of one process's threads on
        different descriptors would otherwise wait on each other's pins)."""
        with self._guard:
            return self._name_locks.setdefault(name, threading.Lock())

    def _fits(self, target: Path, info: ObjectInfo | None) -> bool:
        try:
            return info is None or info.size < 0 or target.stat().st_size == info.size
        except FileNotFoundError:
            return False

    # -- the shards ---------------------------------------------------------------------------------------
    def path(
        self,
        url: str,
        info: ObjectInfo | None = None,
        *,
        sha256: str = "",
        data: bytes | None = None,
        pin: bool = False,
    ) -> Path:
        """The local copy of ``url``, fetched (or taken from ``data``, bytes already read) when absent.

        Args:
            info: the size (and ETag) the store listed; the copy must have that size.
            sha256: the manifest's digest of the shard, checked when given.
            pin: keep the copy from eviction until `unpin` (or `close`); without it, another rank may evict the
                copy as soon as this returns (`open` gives a handle instead, safe either way).

        Raises:
            ChangedObject: the bytes are not those of the listed object.
        """
        name = self.name_of(url)
        target = self.root / name
        with self._thread_lock(name):
            if name in self._pins:
                if self._fits(target, info):
                    os.utime(target)  # the LRU clock
                    return target
                self.unpin([url])  # our own shared lock would block the exclusive one below
            lock = open(self.root / f"{name}.lock", "a+b")  # noqa: SIM115 - kept open while pinned
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # a rank fetching this shard finishes first
                if self._fits(target, info) and target.is_file():
                    os.utime(target)
                else:
                    self._fetch(url, info, sha256, data, name, target)
                if pin:
                    with self._folder():  # no eviction between the exclusive lock and the shared one
                        fcntl.flock(lock, fcntl.LOCK_SH)
                    with self._guard:
                        self._pins[name], lock = lock, None
            finally:
                if lock is not None:
                    lock.close()  # releases its flock
        return target

    def open(self, url: str, info: ObjectInfo | None = None, *, data: bytes | None = None) -> BinaryIO:
        """The local copy of ``url`` opened for reading (fetched, or from ``data``, when absent); once open it
        stays readable whoever evicts it (POSIX)."""
        pinned = self.name_of(url) in self._pins
        path = self.path(url, info, data=data, pin=True)
        handle = open(path, "rb")  # noqa: SIM115 - the caller closes it
        if not pinned:
            self.unpin([url])
        return handle

    def open_cached(self, url: str, info: ObjectInfo | None = None) -> BinaryIO | None:
        """The local copy of ``url`` opened for reading when one of the listed size is there (refreshing its LRU
        time); None when absent or being fetched or evicted right now."""
        name = self.name_of(url)
        target = self.root / name
        with self._thread_lock(name), open(self.root / f"{name}.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            if not (target.is_file() and self._fits(target, info)):
                return None
            os.utime(target)
            return open(target, "rb")  # noqa: SIM115 - the caller closes it

    def unpin(self, urls: list[str]) -> None:
        """Let other ranks evict these shards again (their copies stay until the budget needs the room)."""
        with self._guard:
            locks = [self._pins.pop(self.name_of(url), None) for url in urls]
        for lock in locks:
            if lock is not None:
                lock.close()

    def unpin_all_but(self, urls: list[str]) -> None:
        """`unpin` every shard this process holds except ``urls``."""
        keep = {self.name_of(u) for u in urls}
        with self._guard:
            locks = [self._pins.pop(n) for n in list(self._pins) if n not in keep]
        for lock in locks:
            lock.close()

    def _fetch(
        self, url: str, info: ObjectInfo | None, sha256: str, data: bytes | None, name: str, target: Path
    ) -> None:
        """Reserve room, fetch, verify and rename into place (under the shard's exclusive lock)."""
        listed = info.size if info is not None and info.size > 0 else 0
        tmp = self.root / f"{name}.tmp-{os.getpid()}-{threading.get_ident()}"
        self._reserve(tmp, listed)
        try:
            if data is None:
                with remote.counted() as cost:
                    if listed and info.etag:  # pinned to the listed version: a replaced object is ChangedObject
                        data = remote.read_range(url, 0, listed, etag=info.etag)
                    else:
                        data = remote.read_bytes(url)
                with self._cost_lock:
                    self.cost.update(cost)
            if listed and len(data) != listed:
                raise ChangedObject(
                    f"{url}: fetched {len(data)} bytes, the store listed {listed}: it changed while being read"
                )
            if sha256 and hashlib.sha256(data).hexdigest() != sha256:
                raise ChangedObject(
                    f"{url}: sha256 differs from its manifest.json: the shard changed since the build"
                )
            with open(tmp, "r+b") as out:
                out.write(data)
                out.truncate(len(data))
            with self._folder():
                os.replace(tmp, target)
            self.fetched += 1
        finally:
            tmp.unlink(missing_ok=True)
        if not listed:  # nothing was reserved (a size no listing gave): account for it now
            self.evict()

    def _reserve(self, tmp: Path, size: int) -> None:
        """Make room for ``size`` bytes and create ``tmp`` at that size (sparse) so every rank counts it."""
        deadline = time.monotonic() + WAIT_S
        while True:
            with self._folder():
                used = self._make_room(size)
                if used <= self.budget_bytes:  # over by at most this shard when nothing else could go
                    with open(tmp, "wb") as out:
                        out.truncate(size)
                    return
            if time.monotonic() > deadline:
                raise ShardCacheFull(
                    f"the node's shard cache {self.root} holds {used / 1e9:.2f} GB of shards in use, over "
                    f"data.shard_cache_gb={self.budget_bytes / 1e9:g}, and none came free in {WAIT_S:g} s: raise "
                    "data.shard_cache_gb (it bounds the shards all ranks of a node read at once)"
                )
            time.sleep(0.1)

    def evict(self) -> int:
        """Delete least recently used copies not in use until the folder holds at most ``budget_bytes``; returns
        how many (0 when the rest are in use)."""
        before = self.evicted
        with self._folder():
            self._make_room(0)
        return self.evicted - before

    def usage(self) -> int:
        """Bytes the folder holds or has reserved for fetches under way (every rank's)."""
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[float, int, Path]]:
        """``(mtime, size, path)`` of every copy and reservation; reservations of dead processes are removed."""
        out = []
        for entry in self.root.iterdir():
            if entry.suffix == ".lock" or entry.name == FOLDER_LOCK:
                continue
            if ".tmp-" in entry.name and not _alive(entry.name):
                entry.unlink(missing_ok=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                out.append((st.st_mtime, st.st_size, entry))
        return out

    def _make_room(self, need: int) -> int:
        """Under the folder lock: evict LRU copies no rank is using until ``need`` more bytes fit; returns the
        bytes then held or reserved."""
        entries = self._entries()
        used = sum(size for _, size, _ in entries)
        for _, size, entry in sorted((e for e in entries if ".tmp-" not in e[2].name), key=lambda e: e[0]):
            if used + need <= self.budget_bytes:
                break
            with open(self.root / f"{entry.name}.lock", "a+b") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # fetched or read by a rank right now
                entry.unlink(missing_ok=True)
            used -= size
            self.evicted += 1
        return used

    def prefetch(self, jobs: list[tuple[str, Callable[[], Path]]]) -> None:
        """Start ``fetch()`` for each ``(url, fetch)`` not already running, in the background."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="shard-prefetch")
        for url, fetch in jobs:
            if url not in self._pending:
                self._pending[url] = self._pool.submit(fetch)

    def wait(self, url: str) -> Path | None:
        """The result of a prefetch of ``url`` (its errors re-raised), or None when none was started."""
        future = self._pending.pop(url, None)
        return future.result() if future is not None else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self.unpin_all_but([])


def _alive(tmp_name: str) -> bool:
    """Whether the process that reserved ``<name>.tmp-<pid>-<thread>`` still runs."""
    try:
        pid = int(tmp_name.rsplit(".tmp-", 1)[1].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
