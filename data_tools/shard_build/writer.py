"""Deterministic WebDataset tar shards with their DALI `.idx`, written atomically.

Every tar header is fixed (mtime, uid/gid 0, empty user/group names, mode 0644, POSIX ustar format), and
members are written in the order given, so the same samples always give the same bytes. The tar and
its index go to `*.tmp` names and are renamed into place only when complete: a shard that exists under
its final name is whole (the build's resume logic relies on it).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_tools.shard_format import format_index

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed so that rebuilding gives identical bytes
MAX_MEMBER_NAME = 100  # ustar name field; longer names would need GNU/pax extension headers


@dataclass
class ShardInfo:
    """What `manifest.json` records of one shard."""

    name: str
    """Path of the tar relative to the output folder, e.g. `train/shard-000000.tar`."""
    index: str
    """Path of the `.idx` relative to the output folder."""
    split: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "index": self.index,
            "split": self.split,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Write one shard: `add_sample(key, {"jpg": b, "json": b, "txt": b})` ..., then `commit()`.

    Args:
        out_dir: the build's output folder.
        split: split name (the sub-folder).
        index: shard number (`shard-NNNNNN`).
    """

    def __init__(self, out_dir: str | Path, split: str, index: int):
        self.out_dir = Path(out_dir)
        self.split = split
        self.rel_tar = f"{split}/shard-{index:06d}.tar"
        self.rel_idx = f"{split}/shard-{index:06d}.idx"
        self.tar_path = self.out_dir / self.rel_tar
        self.idx_path = self.out_dir / self.rel_idx
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_tar = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._file = open(self._tmp_tar, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._members: list[tuple[str, int, int]] = []  # (name, data offset, size)
        self.samples = 0

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; members are written in sorted extension order."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for ext in sorted(members):
            data = members[ext]
            name = f"{key}.{ext}"
            if len(name.encode()) > MAX_MEMBER_NAME:
                raise ValueError(f"member name {name!r} is longer than {MAX_MEMBER_NAME} bytes")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            header_offset = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            self._members.append((name, header_offset + tarfile.BLOCKSIZE, len(data)))
        self.samples += 1

    def commit(self) -> ShardInfo:
        """Close the tar, write the `.idx`, and rename both into place (index first, tar last)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        tmp_idx.write_text(format_index(self._members), encoding="utf-8")
        os.replace(tmp_idx, self.idx_path)
        os.replace(self._tmp_tar, self.tar_path)
        return ShardInfo(
            name=self.rel_tar,
            index=self.rel_idx,
            split=self.split,
            samples=self.samples,
            bytes=self.tar_path.stat().st_size,
            sha256=sha256_file(self.tar_path),
        )

    def abort(self) -> None:
        """Drop the unfinished shard."""
        try:
            self._tar.close()
        finally:
            self._file.close()
            self._tmp_tar.unlink(missing_ok=True)
