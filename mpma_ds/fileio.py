"""Crash-safe file writes: a file (or folder) appears whole or not at all, and is on disk when the call returns.

``atomic_write_text`` writes ``<name>.tmp`` beside the target, fsyncs it, renames it over the target and fsyncs
the folder (so the rename itself survives a power cut). ``replace_dir`` does the same for a folder built under a
temporary name. ``fsync_tree`` flushes files another library wrote (DeepSpeed's checkpoint files) before a
marker that declares them complete is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (new, renamed, deleted names) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file under ``root`` and every folder holding them (``root`` included)."""
    root = Path(root)
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through ``<path>.tmp`` + fsync + rename; the old file stays until the new one
    is complete. The temp file is removed when the write fails (e.g. a full disk)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put the finished folder ``tmp`` at ``target`` (an existing ``target`` is moved aside first and deleted
    only once ``tmp`` is in place): a reader sees the old folder or the new one, never a half-written one."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
