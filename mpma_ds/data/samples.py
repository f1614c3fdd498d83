"""One sample: its members read at the ``.idx`` offsets, then checked and decoded (text, JSON, image).

A member that cannot be used raises `SampleError`, whose ``reason`` is the counter the sample is skipped
under (``skipped_bad_jpg``, ...); the stand-in policy of `stream.read_batch_rows` turns it into a
``valid = False`` repeat, so one bad sample never stops a run.
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from typing import Any, BinaryIO

from PIL import Image

from data_tools import remote
from data_tools.remote import ChangedObject
from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.data.shard_cache import ShardCache
from mpma_ds.data.shards import SampleRef, ShardIndex

_TEXT_FIELDS = (
    "source",
    "subject_id",
    "study_id",
    "image_id",
    "view",
    "split",
    "question",
    "answer",
    "answer_type",
)
"""Sample JSON fields that, when present, must be a string or null (ids may also be integers)."""
_LABEL_NAMES = frozenset(CHEXPERT_LABELS)


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


REMOTE_BLOCK = 8 << 20
"""Bytes of a remote shard read per request: ~80 samples of ~100 kB, so request latency is paid once per block."""

REMOTE_BLOCKS_KEPT = 8
"""Blocks a reader keeps in memory (64 MB per DataLoader worker)."""


class SampleReader:
    """Reads a sample's members from its shard at the ``.idx`` offsets; keeps shard files open.

    A remote shard (`data_tools.remote`) is read in blocks of `REMOTE_BLOCK` bytes (one ranged ``GET`` each,
    pinned to the ETag it was listed with; the last `REMOTE_BLOCKS_KEPT` blocks are kept, so the neighbouring
    samples a shuffle buffer reads cost no request); a
    ``pipe:`` shard, or one on a server that ignores ``Range``, is fetched whole into the node-local
    `ShardCache` once and read from there. A shard that changed on the store is a ``changed_shard``
    `SampleError`; ``remote_retries`` counts the transient faults retried while reading.
    """

    def __init__(self, index: ShardIndex, cache: ShardCache | None = None) -> None:
        self.paths = index.paths
        self.infos = index.infos or [None] * len(index.paths)
        self._cache = cache
        self._files: dict[int, BinaryIO] = {}
        self._blocks: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    @property
    def cache(self) -> ShardCache:
        if self._cache is None:
            self._cache = ShardCache()
        return self._cache

    def _file(self, shard: int) -> BinaryIO:
        handle = self._files.get(shard)
        if handle is None:
            path = self.paths[shard]
            if remote.is_remote(path):
                handle = self._files[shard] = self.cache.open(str(path), self.infos[shard])
            else:
                handle = self._files[shard] = open(path, "rb")  # noqa: SIM115
        return handle

    def _range(self, shard: int, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of shard ``shard`` (fewer at a truncated end)."""
        path = self.paths[shard]
        if shard in self._files or not remote.is_remote(path) or str(path).startswith("pipe:"):
            handle = self._file(shard)
            handle.seek(start)
            return handle.read(end - start)
        info = self.infos[shard]
        if info is not None and info.size >= 0:
            end = min(end, info.size)
        if end <= start:
            return b""
        first, last = start // REMOTE_BLOCK, (end - 1) // REMOTE_BLOCK
        parts = []
        for k in range(first, last + 1):
            block = self._blocks.get((shard, k))
            if block is None:
                block = self._fetch_block(shard, k)
                if block is None:  # the shard is now a local file (cached whole)
                    return self._range(shard, start, end)
            else:
                self._blocks.move_to_end((shard, k))
            parts.append(block)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        offset = start - first * REMOTE_BLOCK
        return data[offset : offset + end - start]

    def _fetch_block(self, shard: int, k: int) -> bytes | None:
        """Block ``k`` of a remote shard (one ranged GET pinned to the listed ETag), kept in a small LRU; None
        when the shard was (or just got) cached whole on local disk and is open in ``_files``."""
        url, info = str(self.paths[shard]), self.infos[shard]
        cached = self.cache.open_cached(url, info)
        if cached is not None:  # fetched whole earlier (by any rank of this node)
            self._files[shard] = cached
            return None
        lo = k * REMOTE_BLOCK
        hi = lo + REMOTE_BLOCK if info is None or info.size < 0 else min(lo + REMOTE_BLOCK, info.size)
        try:
            data = remote.read_range(url, lo, hi, etag=info.etag if info is not None else "")
            if len(data) > hi - lo:  # the server ignored Range and sent the whole shard: keep it locally
                self._files[shard] = self.cache.open(url, info, data=data)
                return None
        except ChangedObject as err:
            raise SampleError("changed_shard", str(err)) from None
        self._blocks[(shard, k)] = data
        while len(self._blocks) > REMOTE_BLOCKS_KEPT:
            self._blocks.popitem(last=False)
        return data

    def read(self, ref: SampleRef) -> dict[str, bytes]:
        """Every member of ``ref`` in one seek and one read (a sample's members are adjacent in the tar)."""
        start, end = ref.span()
        data = self._range(ref.shard, start, end)
        if len(data) != end - start:
            raise SampleError("truncated", f"{remote.basename(self.paths[ref.shard])}: {ref.key}")
        return {ext: data[off - start : off - start + size] for ext, off, size in ref.members}

    def read_member(self, shard: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of shard ``shard`` (fewer at a truncated end)."""
        return self._range(shard, offset, offset + size)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def decode_text(data: bytes | None) -> str:
    """UTF-8 report text, whitespace-normalised; empty or undecodable text is a `SampleError`."""
    if data is None:
        raise SampleError("missing_txt")
    try:
        text = " ".join(bytes(data).decode("utf-8").split())
    except UnicodeDecodeError as err:
        raise SampleError("bad_txt", str(err)) from err
    if not text:
        raise SampleError("empty_txt")
    return text


def decode_meta(data: bytes | None) -> dict[str, Any]:
    """The sample JSON (``{}`` when the member is absent); invalid JSON is a `SampleError`."""
    if data is None or len(data) == 0:
        return {}
    try:
        meta = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError("bad_json", str(err)) from err
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "not an object")
    check_meta_schema(meta)
    return meta


def check_meta_schema(meta: dict[str, Any]) -> None:
    """The fields the loader and the tasks read have the SPEC §4.2 types, else a ``bad_json`` `SampleError`.

    ``labels`` is null or an object of CheXpert names -> 1 / 0 / -1 / null; the id, view, split and VQA
    text fields are strings or null (ids may be integers). Other fields are not looked at.
    """
    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, dict):
            raise SampleError("bad_json", f"labels is a JSON {type(labels).__name__}, expected an object")
        for name, value in labels.items():
            if name not in _LABEL_NAMES:
                raise SampleError("bad_json", f"labels: unknown label name {name!r}")
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value not in (1, 0, -1)
            ):
                raise SampleError("bad_json", f"labels.{name} = {value!r}, expected 1, 0, -1 or null")
    for name in _TEXT_FIELDS:
        value = meta.get(name)
        if value is not None and not isinstance(value, str):
            if name.endswith("_id") and isinstance(value, int) and not isinstance(value, bool):
                continue
            raise SampleError("bad_json", f"{name} is a JSON {type(value).__name__}, expected a string")


def decode_image(data: bytes | None, key: str) -> Image.Image:
    """The decoded JPEG (PIL, pixels loaded); a missing or undecodable image is a `SampleError`."""
    if data is None:
        raise SampleError("missing_jpg", key)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for corrupt data
        raise SampleError("bad_jpg", f"{key}: {err}") from err
    return image
