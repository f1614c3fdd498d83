"""The per-sample work of a build: one planned input -> its `jpg` / `json` / `txt` members, or a reject.

Worker processes decode, resize and encode the images and send back only bytes; the main process
writes the tars in plan order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager

from data_tools.shard_format import (
    CLASS_FIELD,
    DATASET_LABELS_FIELD,
    SIZE_FIELDS,
    TRUTH_FIELD,
    json_fields,
    scale_truth,
)
from data_tools.sources.common import ImageRejected, Reject, SourceItem
from data_tools.sources.images import ImageOptions, encode_image, target_size

Result = tuple[str, "dict[str, bytes] | Reject"]
"""`("ok", {"jpg", "json", "txt"})` or `("reject", Reject)`."""

_WORKER_OPTS: tuple[ImageOptions, tuple[str, ...] | None] | None = None


def encode_sample(item: SourceItem, image_opts: ImageOptions, views: tuple[str, ...] | None) -> Result:
    """The members of one sample, or its reject: `("ok", {"jpg", "json", "txt"})` / `("reject", Reject)`."""
    try:
        encoded = encode_image(item.image_path, image_opts)
    except ImageRejected as exc:
        return "reject", Reject(item.input, exc.reason, exc.detail, key=item.key, split=item.split)
    except Exception as exc:  # a codec bug must cost one image, never the build
        return "reject", Reject(
            item.input, "corrupt_image", f"{type(exc).__name__}: {exc}", key=item.key, split=item.split
        )
    meta = {k: item.meta[k] for k in json_fields(item.meta["source"]) if k not in SIZE_FIELDS}
    if meta["view"] is None and encoded.view:
        meta["view"] = encoded.view  # a DICOM's own ViewPosition
        if views is not None and encoded.view.upper() not in views:
            detail = f"view {encoded.view} (DICOM header) not in --views {','.join(views)}"
            return "reject", Reject(item.input, "view_filtered", detail, key=item.key, split=item.split)
    if TRUTH_FIELD in item.meta:  # boxes in the source image's pixels -> the stored image's
        stored = target_size(encoded.width, encoded.height, image_opts.image_size)
        meta[TRUTH_FIELD] = scale_truth(item.meta[TRUTH_FIELD], (encoded.width, encoded.height), stored)
    for name in (DATASET_LABELS_FIELD, CLASS_FIELD):  # a manifest's own label set / class, as the source gave it
        if name in item.meta:
            meta[name] = item.meta[name]
    meta["width"], meta["height"] = encoded.width, encoded.height
    members = {
        "jpg": encoded.jpeg,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "txt": item.text.encode("utf-8"),
    }
    return "ok", members


def _init_worker(image_opts: ImageOptions, views: tuple[str, ...] | None) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = (image_opts, views)


def _encode_in_worker(item: SourceItem) -> Result:
    assert _WORKER_OPTS is not None
    return encode_sample(item, *_WORKER_OPTS)


@contextmanager
def encoded_samples(
    items: list[SourceItem], image_opts: ImageOptions, views: tuple[str, ...] | None, workers: int
) -> Iterator[Iterator[Result]]:
    """The `encode_sample` results of `items`, in order, from `workers` processes (in-process for 1).

    Leaving the block normally lets the workers finish and exit; an error or an interrupt stops them.
    """
    pool = None
    if workers > 1 and len(items) > 1:
        # spawn: safe whatever threads the caller runs (tests, notebooks); workers only import PIL/pydicom.
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(image_opts, views))
        results = pool.imap(_encode_in_worker, items, chunksize=max(1, min(4, len(items) // (workers * 8))))
    else:
        results = (encode_sample(item, image_opts, views) for item in items)
    try:
        yield results
        if pool is not None:
            pool.close()  # all work is done: let the workers exit on their own
            pool.join()
            pool = None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
