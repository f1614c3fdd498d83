"""The node-local shard cache: remote shards fetched whole onto local disk, shared by the ranks of a node.

Used where a reader needs a local file — DALI's webdataset reader (paths and ``.idx`` files on disk), ``pipe:``
shards, and HTTP servers that ignore ``Range`` — while ``wds`` otherwise streams byte ranges with no local
copy. Rules:

- **Shared and safe.** One folder per node (``data.shard_cache``, default ``$TMPDIR/mpma-shard-cache-<uid>``);
  a shard is fetched under an exclusive ``flock`` on ``<name>.lock``, written to ``<name>.tmp-<pid>`` and
  renamed into place, so two ranks that want the same shard fetch it once and nobody reads half a file.
- **Verified.** The fetched bytes must have the size the store listed (and, where the build's manifest gives
  one, its sha256): anything else is `ChangedObject`, never kept.
- **Bounded.** After each fetch the least recently used shards are deleted until the folder holds at most
  ``budget_bytes`` (a file being read stays readable after deletion, POSIX semantics); a use refreshes the
  shard's mtime.
- **Ahead of the reader.** `prefetch` starts fetches of the next shards in a thread pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from data_tools import remote
from data_tools.remote import ChangedObject, ObjectInfo

DEFAULT_BUDGET_GB = 50.0


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
        self.cost: Counter = Counter()
        """``remote_retries`` / ``remote_bytes`` of this cache's fetches (prefetch threads included)."""
        self._cost_lock = threading.Lock()
        self._threads = prefetch_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}

    def name_of(self, url: str) -> str:
        """The cache file name of ``url``: a digest of the URL, then its basename (readable in ``ls``)."""
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
        return f"{digest}-{remote.basename(url) or 'object'}"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with open(self.root / f"{name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def cached(self, url: str, info: ObjectInfo | None = None) -> Path | None:
        """The local copy of ``url`` when one of the listed size is there (refreshing its LRU time), else None."""
        target = self.root / self.name_of(url)
        try:
            if info is None or target.stat().st_size == info.size:
                os.utime(target)
                return target
        except FileNotFoundError:
            pass
        return None

    def path(
        self, url: str, info: ObjectInfo | None = None, *, sha256: str = "", data: bytes | None = None
    ) -> Path:
        """The local copy of ``url``, fetched (or taken from ``data``, bytes already read) when absent.

        Args:
            info: the size (and ETag) the store listed; the copy must have that size.
            sha256: the manifest's digest of the shard, checked when given.

        Raises:
            ChangedObject: the bytes are not those of the listed object.
        """
        name = self.name_of(url)
        target = self.root / name
        with self._locked(name):
            if target.is_file() and (info is None or target.stat().st_size == info.size):
                os.utime(target)  # the LRU clock
                return target
            if data is None:
                with remote.counted() as cost:
                    data = remote.read_bytes(url)
                with self._cost_lock:
                    self.cost.update(cost)
            payload = data
            if info is not None and info.size and len(payload) != info.size:
                raise ChangedObject(
                    f"{url}: fetched {len(payload)} bytes, the store listed {info.size}: it changed while being read"
                )
            if sha256 and hashlib.sha256(payload).hexdigest() != sha256:
                raise ChangedObject(
                    f"{url}: sha256 differs from its manifest.json: the shard changed since the build"
                )
            tmp = self.root / f"{name}.tmp-{os.getpid()}"
            tmp.write_bytes(payload)
            os.replace(tmp, target)
            self.fetched += 1
        self.evict(keep=target)
        return target

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used copies until the folder holds at most ``budget_bytes``; returns how many."""
        files = []
        for entry in self.root.iterdir():
            if entry.suffix == ".lock" or ".tmp-" in entry.name or not entry.is_file():
                continue
            st = entry.stat()
            files.append((st.st_mtime, st.st_size, entry))
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, entry in sorted(files, key=lambda f: f[0]):
            if total <= self.budget_bytes:
                break
            if entry == keep:
                continue
            with self._locked(entry.name):
                entry.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

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
