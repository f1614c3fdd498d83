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
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from webdataset.shardlists import expand_urls

from data_tools.shard_format import REQUIRED_MEMBERS, SAMPLE_MEMBERS, index_path, read_index

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

    paths: list[Path]
    keys: list[str]
    shard_of: np.ndarray  # (N,) int32
    layout: np.ndarray  # (N, 2 * len(SAMPLE_MEMBERS)) int64: offset, size per member
    listed: list[int]
    """Samples each shard's ``.idx`` lists (``counts()`` is less where some were left out)."""
    skipped: Counter = field(default_factory=Counter)
    """Samples left out at start, by reason (``truncated``, ``bad_offset``, ``missing_jpg``, ``missing_txt``)."""
    skipped_by_shard: dict[int, Counter] = field(default_factory=dict)
    """The same per shard (its number in ``paths``), for the shards with any."""

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


def resolve_shards(spec: str) -> list[Path]:
    """Shard tars of ``spec``: a folder (its ``shard-*.tar``), a glob, a brace pattern or a comma list.

    Raises:
        FileNotFoundError: nothing matched, a listed shard does not exist, or a shard has no ``.idx``.
    """
    if not spec:
        raise FileNotFoundError("no shards given: set data.train_shards / data.val_shards to a shard folder")
    paths: list[Path] = []
    for part in expand_urls(spec) if "{" in spec or "::" in spec else spec.split(","):
        part = part.strip()
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(Path(part).glob("shard-*.tar")) or sorted(Path(part).glob("*.tar"))
            if not found:
                raise FileNotFoundError(
                    f"no shard-*.tar in {part}: build shards with python -m data_tools.build_shards"
                )
            paths.extend(found)
        elif any(c in part for c in "*?["):
            paths.extend(Path(p) for p in sorted(glob.glob(part)))
        else:
            paths.append(Path(part))
    if not paths:
        raise FileNotFoundError(f"no shards match {spec!r}: build shards with python -m data_tools.build_shards")
    for path in paths:
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
    return paths


def load_shard_index(spec: str) -> ShardIndex:
    """Resolve ``spec`` and list its readable samples; an empty result is a clear error."""
    paths = resolve_shards(spec)
    keys: list[str] = []
    shard_of: list[int] = []
    layout: list[list[int]] = []
    listed: list[int] = []
    skipped: Counter = Counter()
    by_shard: dict[int, Counter] = {}
    for shard_no, path in enumerate(paths):
        size = path.stat().st_size
        entries = read_index(index_path(path))
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
    )  # fmt: skip
