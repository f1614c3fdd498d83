"""DALI webdataset index files (`.idx`), in exactly the format of DALI's `wds2idx` tool.

`wds2idx` (shipped in the nvidia-dali wheel, `IndexCreator`) writes:

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> <ext> <data offset> <size> <member name> ...   (one line per sample)

where a sample is a run of consecutive regular-file members sharing the same basename (the name up to
the first `.` after the last `/`), the data offset is the byte offset of the member's data (its header
offset + 512) and members are listed in tar order. `fn.readers.webdataset(index_paths=...)` reads it.
We write the same bytes from the offsets recorded while writing the tar, with no `tar` subprocess.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

INDEX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    """`("dir/key", "ext.more")` for `"dir/key.ext.more"`, as `wds2idx.IndexCreator.split_name`."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def format_index(members: list[tuple[str, int, int]]) -> str:
    """The `.idx` text for tar members `[(name, data_offset, size), ...]` in tar order.

    Raises:
        ValueError: no sample at all (DALI's tool refuses an empty tar the same way).
    """
    bundles: list[list[tuple[str, int, int, str]]] = []
    last = None
    for name, offset, size in members:
        base, ext = split_name(name)
        if not base or base.endswith("/"):  # hidden files, as wds2idx
            continue
        if base != last:
            bundles.append([])
            last = base
        bundles[-1].append((ext, offset, size, name))
    if not bundles:
        raise ValueError("webdataset tar file is empty")
    lines = [f"{INDEX_VERSION} {len(bundles)}\n"]
    for bundle in bundles:
        lines.append(" ".join(" ".join(map(str, component)) for component in bundle) + "\n")
    return "".join(lines)


def tar_members(tar_path: str | Path) -> list[tuple[str, int, int]]:
    """`[(name, data_offset, size)]` of the regular files in a tar, read from its real headers."""
    with tarfile.open(tar_path, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]


def index_from_tar(tar_path: str | Path) -> str:
    """The `.idx` text of an existing tar, computed from its headers (used by `verify_shards`)."""
    return format_index(tar_members(tar_path))


def parse_index(text: str) -> list[list[tuple[str, int, int, str]]]:
    """Parse `.idx` text into samples `[[(ext, offset, size, name), ...], ...]`.

    Raises:
        ValueError: a malformed header or line, or a sample count that does not match the header.
    """
    lines = text.splitlines()
    if not lines:
        raise ValueError("index file is empty")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"bad index header {lines[0]!r} (expected '{INDEX_VERSION} <count>')")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split(" ")
        if len(fields) % 4 or not fields:
            raise ValueError(f"index line {lineno} has {len(fields)} fields, not a multiple of 4")
        sample = []
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            if not (offset.isdigit() and size.isdigit()):
                raise ValueError(f"index line {lineno}: offset/size not integers")
            sample.append((ext, int(offset), int(size), name))
        samples.append(sample)
    if len(samples) != int(head[1]):
        raise ValueError(f"index header says {head[1]} samples but lists {len(samples)}")
    return samples
