"""Find shards, read their DALI ``.idx`` files (the ``wds2idx`` format) and list the readable samples.

Both real backends read the same list: a sample needs the `REQUIRED_MEMBERS` (``.jpg`` and ``.txt``) and
every member must lie inside the tar file (a member cut off by a truncated tar is dropped here as
``truncated``, one whose ``.idx`` offset or size is negative or off the tar's 512-byte blocks as
``bad_offset``, counted by reason). This costs one ``stat`` and one index parse per shard and never reads image bytes. The format
itself — member names, the ``.idx`` path and parser — is `data_tools.shard_format`, shared with the
tools that write the shards.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from webdataset.shardlists import expand_urls

from data_tools import remote
from data_tools.remote import ChangedObject, ObjectInfo, RemoteError
from data_tools.shard_format import REQUIRED_MEMBERS, SAMPLE_MEMBERS, index_path, parse_index, read_index

TAR_BLOCK = 512
"""A tar member's data starts on a block boundary: an ``.idx`` offset that does not is damaged."""


@dataclass(frozen=True, slots=True)
class SampleRef:
    """Where one sample's members are: shard number, key and ``((ext, offset, size), ...)``."""

    shard: int
    key: str
    members: tuple[tuple[str, int, int], ...]

    def span(self) -> tuple[int, int]:
        """Byte range ``[start, end)`` that covers every member (they are adjacent in a tar)."""
        return min(m[1] for m in self.members), max(m[1] + m[2] for m in self.members)


@dataclass
class ShardIndex:
    """The readable samples of a shard set, in shard order then file order, kept compact (MIMIC-CXR's
    ~377k samples cost ~60 MB, shared copy-on-write with DataLoader workers): flat sample ``i`` has key
    ``keys[i]``, shard ``shard_of[i]`` and member offsets/sizes ``layout[i]`` (`SAMPLE_MEMBERS` order, -1
    where a member is absent; other members of a sample are ignored)."""

    paths: list[Path | str]
    """Local shards as `pathlib.Path`, remote ones as URL strings (`data_tools.remote`)."""
    keys: list[str]
    shard_of: np.ndarray  # (N,) int32
    layout: np.ndarray  # (N, 2 * len(SAMPLE_MEMBERS)) int64: offset, size per member
    listed: list[int]
    """Samples each shard's ``.idx`` lists (``counts()`` is less where some were left out)."""
    skipped: Counter = field(default_factory=Counter)
    """Samples left out at start, by reason (``truncated``, ``bad_offset``, ``missing_jpg``, ``missing_txt``)."""
    skipped_by_shard: dict[int, Counter] = field(default_factory=dict)
    """The same per shard (its number in ``paths``), for the shards with any."""
    infos: list[ObjectInfo | None] = field(default_factory=list)
    """Size and ETag of each remote shard as listed (``None`` for a local one): reads are pinned to them."""

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def counts(self) -> list[int]:
        """Samples per shard."""
        return np.bincount(self.shard_of, minlength=len(self.paths)).tolist()

    def ref(self, i: int) -> SampleRef:
        """Flat sample ``i``."""
        row = self.layout[i].tolist()
        members = tuple(
            (ext, row[2 * k], row[2 * k + 1]) for k, ext in enumerate(SAMPLE_MEMBERS) if row[2 * k] >= 0
        )
        return SampleRef(int(self.shard_of[i]), self.keys[i], members)

    def member(self, ext: str) -> np.ndarray:
        """(N, 2) int64 ``(offset, size)`` of member ``ext`` of every sample (-1 where absent)."""
        k = SAMPLE_MEMBERS.index(ext)
        return self.layout[:, 2 * k : 2 * k + 2]

    def select(self, keep: np.ndarray) -> ShardIndex:
        """The samples where ``keep`` (N,) bool is true, in the same order; same shards and skip counts."""
        return ShardIndex(
            self.paths,
            [k for k, ok in zip(self.keys, keep.tolist()) if ok],
            self.shard_of[keep],
            self.layout[keep],
            self.listed,
            Counter(self.skipped),
            {k: Counter(v) for k, v in self.skipped_by_shard.items()},
            infos=self.infos,
        )

    def unreadable(self) -> list[tuple[Path, int, int, Counter]]:
        """``(shard, skipped, listed, reasons)`` of every shard whose index lists samples left out at start."""
        return [
            (self.paths[k], sum(c.values()), self.listed[k], c) for k, c in sorted(self.skipped_by_shard.items())
        ]

    def check_skipped(self, max_fraction: float) -> str | None:
        """A one-line note naming the shards whose index lists unreadable samples (``None`` when none do).

        Raises:
            ValueError: more than ``max_fraction`` of the listed samples are unreadable (``data.max_skipped_fraction``).
        """
        bad = self.unreadable()
        if not bad:
            return None
        skipped, listed = sum(b[1] for b in bad), max(sum(self.listed), 1)
        names = "; ".join(
            f"{path.name} {n} of {of} ({', '.join(f'{r} {c}' for r, c in sorted(why.items()))})"
            for path, n, of, why in bad
        )
        line = f"{skipped} of {listed} samples in {self.paths[0].parent} are unreadable and skipped: {names}"
        if skipped / listed > max_fraction:
            raise ValueError(
                f"{line}; that is {skipped / listed:.1%}, above data.max_skipped_fraction={max_fraction}: check "
                "them with python -m data_tools.verify_shards and rebuild, or raise data.max_skipped_fraction"
            )
        return line


def resolve_shards(spec: str) -> list[Path | str]:
    """Shard tars of ``spec``: a folder (its ``shard-*.tar``), a glob, a brace pattern or a comma list —
    local paths, or URLs (``s3://``, ``gs://``, ``http(s)://``: a folder is a prefix listed through the
    store's API, a brace pattern is expanded without listing; ``pipe:`` commands as given).

    Returns:
        `pathlib.Path` for a local shard, the URL string for a remote one.

    Raises:
        FileNotFoundError: nothing matched, a listed shard does not exist, or a shard has no ``.idx``.
        RemoteError: a remote shard or folder is missing, denied or unreachable (one line naming the URL).
    """
    return [p for p, _ in resolve_shard_infos(spec)]


def resolve_shard_infos(spec: str) -> list[tuple[Path | str, ObjectInfo | None]]:
    """`resolve_shards` with the store's size and ETag of each remote shard (``None`` for a local one)."""
    if not spec:
        raise FileNotFoundError("no shards given: set data.train_shards / data.val_shards to a shard folder")
    found: list[tuple[Path | str, ObjectInfo | None]] = []
    for part in expand_urls(spec) if "{" in spec or "::" in spec else spec.split(","):
        part = part.strip()
        if not part:
            continue
        if remote.is_remote(part):
            found.extend(_resolve_remote(part))
        elif os.path.isdir(part):
            tars = sorted(Path(part).glob("shard-*.tar")) or sorted(Path(part).glob("*.tar"))
            if not tars:
                raise FileNotFoundError(
                    f"no shard-*.tar in {part}: build shards with python -m data_tools.build_shards"
                )
            found.extend((p, None) for p in tars)
        elif any(c in part for c in "*?["):
            found.extend((Path(p), None) for p in sorted(glob.glob(part)))
        else:
            found.append((Path(part), None))
    if not found:
        raise FileNotFoundError(f"no shards match {spec!r}: build shards with python -m data_tools.build_shards")
    missing = [i for i, (p, info) in enumerate(found) if remote.is_remote(p) and (info is None or info.size < 0)]
    if missing:  # named one by one (a brace pattern), or a listing without sizes: one HEAD each, in parallel
        with ThreadPoolExecutor(min(16, len(missing))) as pool:
            infos = list(pool.map(lambda i: remote.object_info(str(found[i][0])), missing))
        for i, info in zip(missing, infos):
            found[i] = (found[i][0], info)
    for path, _ in found:
        if remote.is_remote(path):
            continue
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} does not exist (from data shards {spec!r})")
        if path.stat().st_size == 0:  # said before its index: an empty file is the fault, not the .idx
            raise FileNotFoundError(
                f"shard {path} is empty (0 bytes; an interrupted copy or write): copy it again or rebuild the "
                "shards with python -m data_tools.build_shards"
            )
        if not index_path(path).is_file():
            raise FileNotFoundError(
                f"shard {path} has no index {index_path(path).name}: create it with `wds2idx {path}` "
                "or rebuild the shards with python -m data_tools.build_shards"
            )
    return found


def _resolve_remote(part: str) -> list[tuple[str, ObjectInfo | None]]:
    if part.startswith("pipe:"):
        return [(part, None)]
    if any(c in part.split("://", 1)[1] for c in "*?["):
        listed = remote.glob(part)
        if not listed:
            raise FileNotFoundError(f"no shards match {part}: check the prefix and the pattern")
        return sorted(listed.items())
    if remote.is_folder(part):
        listed = remote.list_folder(part, "shard-*.tar") or remote.list_folder(part, "*.tar")
        if not listed:
            raise FileNotFoundError(
                f"no shard-*.tar under {part}: upload a build_shards output there (or build with --output {part})"
            )
        return sorted(listed.items())
    return [(part, None)]


def _read_index(path: Path | str) -> list[tuple[str, list[tuple[str, int, int]]]]:
    if not remote.is_remote(path):
        return read_index(index_path(path))
    url = str(remote.index_of(path))
    try:
        text = remote.read_bytes(url).decode("utf-8")
    except RemoteError as err:
        if "does not exist" in str(err):
            raise RemoteError(
                f"shard {path} has no index {url}: upload the .idx beside each .tar (build_shards writes both)"
            ) from None
        raise
    return parse_index(text, remote.basename(url))


def load_shard_index(spec: str) -> ShardIndex:
    """Resolve ``spec`` and list its readable samples; an empty result is a clear error.

    Remote shards: every ``.idx`` is fetched (in parallel), and each shard's size and ETag is checked
    against the ``manifest.json`` of its build where one is found (`check_manifest`): a shard changed on the
    store since the build is refused before anything is read.
    """
    found = resolve_shard_infos(spec)
    paths = [p for p, _ in found]
    infos = [info for _, info in found]
    if any(info is not None for info in infos):
        check_manifest(paths, infos)
    with ThreadPoolExecutor(min(16, max(1, sum(remote.is_remote(p) for p in paths)))) as pool:
        indexes = list(pool.map(_read_index, paths))
    keys: list[str] = []
    shard_of: list[int] = []
    layout: list[list[int]] = []
    listed: list[int] = []
    skipped: Counter = Counter()
    by_shard: dict[int, Counter] = {}
    for shard_no, (path, entries) in enumerate(zip(paths, indexes)):
        size = infos[shard_no].size if infos[shard_no] is not None else _local_size(path)
        listed.append(len(entries))
        for key, members in entries:
            found = {ext: (off, n) for ext, off, n in members}
            missing = [e for e in REQUIRED_MEMBERS if e not in found]
            reason = None
            if missing:
                reason = f"missing_{missing[0]}"
            elif any(off < 0 or n < 0 or off % TAR_BLOCK for off, n in found.values()):
                reason = "bad_offset"  # a damaged or hand-edited index: tar data starts on a 512-byte block
            elif any(off + n > size for off, n in found.values()):
                reason = "truncated"
            if reason is not None:
                skipped[reason] += 1
                by_shard.setdefault(shard_no, Counter())[reason] += 1
            else:
                keys.append(key)
                shard_of.append(shard_no)
                layout.append([v for ext in SAMPLE_MEMBERS for v in found.get(ext, (-1, -1))])
    if not keys:
        raise FileNotFoundError(f"the shards of {spec!r} hold no readable samples (skipped: {dict(skipped)})")
    return ShardIndex(
        paths, keys, np.asarray(shard_of, dtype=np.int32), np.asarray(layout, dtype=np.int64), listed, skipped,
        by_shard,
        infos=infos,
    )  # fmt: skip


def _local_size(path: Path | str) -> int:
    return Path(path).stat().st_size


def check_manifest(paths: list[Path | str], infos: list[ObjectInfo | None]) -> None:
    """Refuse a remote shard whose size (or recorded ETag) differs from its build's ``manifest.json``.

    The manifest of ``PREFIX/<split>/shard-N.tar`` is ``PREFIX/manifest.json`` (where build_shards writes
    it), listing the shard as ``<split>/shard-N.tar``; shards without a manifest there are not checked.

    Raises:
        ChangedObject: one line naming the shard, the size on the store and the manifest's.
    """
    manifests: dict[str, dict[str, dict] | None] = {}
    for path, info in zip(paths, infos):
        if info is None or str(path).startswith("pipe:"):
            continue
        folder = remote.parent(str(path))
        root = remote.parent(folder)
        if root not in manifests:
            manifests[root] = _manifest_shards(remote.join(root, "manifest.json"))
        entry = (manifests[root] or {}).get(f"{remote.basename(folder)}/{remote.basename(str(path))}")
        if entry is None:
            continue
        if entry.get("bytes") is not None and int(entry["bytes"]) != info.size:
            raise ChangedObject(
                f"shard {path} is {info.size} bytes on the store but its manifest.json says {entry['bytes']}: "
                "it changed since the build; restore it or rebuild, then verify with data_tools.verify_shards"
            )
        if entry.get("etag") and info.etag and entry["etag"] != info.etag:
            raise ChangedObject(
                f"shard {path} has ETag {info.etag} on the store but its manifest.json says {entry['etag']}: "
                "it changed since the build; restore it or rebuild, then verify with data_tools.verify_shards"
            )


def _manifest_shards(url: str) -> dict[str, dict] | None:
    try:
        manifest = json.loads(remote.read_bytes(url).decode("utf-8"))
    except RemoteError as err:
        if "does not exist" in str(err):
            return None
        raise
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RemoteError(f"{url} is not valid JSON: re-upload the build's manifest.json") from None
    return {s.get("name"): s for s in manifest.get("shards", []) if isinstance(s, dict)}
