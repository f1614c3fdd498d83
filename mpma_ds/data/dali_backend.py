"""The ``dali`` backend: ``fn.readers.webdataset`` → host checks and text → DALI decode + transforms.

Two DALI pipelines per rank:

- the **reader** pipeline: ``fn.readers.webdataset`` over this epoch's shard list (shuffled with
  ``seed + epoch``), with the ``.idx`` files, ``shard_id = rank`` / ``num_shards = world_size`` (a
  sample-exact split, the same rule as `plan.rank_range`), its shuffle buffer and ``pad_last_batch``.
  It is built with ``enable_checkpointing=True``: the loader state carries ``pipe.checkpoint()``, and a
  resumed reader continues exactly where the saved one stopped;
- the **decode** pipeline: ``fn.decoders.image`` on ``device="mixed"`` when CUDA is available (``"cpu"``
  otherwise), then resize / crop / rotate / brightness-contrast / flip / normalise, fed through
  ``external_source``. Augmentation parameters are drawn on the host from the same per-sample generators
  as the ``wds`` backend, so this pipeline holds no random state and both backends compute the same
  numeric pipeline.

Between the two the host checks each JPEG's header and end marker (a corrupt or truncated image is
skipped and counted under the stand-in policy of `stream.py`), and tokenises and masks the text. Should DALI's decoder still fail on a batch, that batch is decoded on the
host with PIL (same parameters) instead of stopping the run; an image PIL cannot decode either (a
corrupt Huffman table behind a valid header) is skipped and counted as ``bad_jpg`` under the same policy.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_tools import remote
from data_tools.shard_format import SAMPLE_MEMBERS, format_index, index_path
from mpma_ds.data import dali_remote
from mpma_ds.data.backends import BACKENDS
from mpma_ds.data.config import DataConfig
from mpma_ds.data.plan import MadeBatch, rank_range, seeded_rng, shard_order
from mpma_ds.data.samples import SampleError, decode_meta, decode_text
from mpma_ds.data.shards import ShardIndex
from mpma_ds.data.stream import SampleRow, ShardStream, collate_rows, mask_generator, read_batch_rows
from mpma_ds.data.transforms import AugParams, draw_aug_params, eval_geometry


def _dali():
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise ImportError(
            "data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or -cuda120), "
            "or set data.backend=wds"
        ) from err
    return fn, types, pipeline_def


def jpeg_header(data: bytes, key: str) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's header, checking it is a complete JPEG (no pixel decode)."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise SampleError("bad_jpg", f"{key}: not a JPEG")
    if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise SampleError("bad_jpg", f"{key}: truncated JPEG (no end marker)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as err:
        raise SampleError("bad_jpg", f"{key}: {err}") from err


def write_clean_indexes(index: ShardIndex, folder: Path) -> list[str]:
    """``.idx`` files listing only the samples of ``index`` (so DALI never reads past a truncated tar's end,
    nor a sample outside a label-fraction subset); the original index is used where nothing was left out.

    A shard with no sample left keeps its original path: `_build_reader` never lists an empty shard."""
    out = []
    counts = index.counts()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    for shard, path in enumerate(index.paths):
        if remote.is_remote(path) and not str(path).startswith("s3://"):  # read from the cache (`dali_remote`)
            out.append("")
            continue
        if counts[shard] in (0, index.listed[shard]) and not remote.is_remote(path):
            out.append(str(index_path(path)))
            continue
        refs = [index.ref(i) for i in range(starts[shard], starts[shard + 1])]
        clean = folder / f"{shard:06d}-{remote.basename(path).removesuffix('.tar')}.idx"
        members = [(f"{ref.key}.{ext}", off, size) for ref in refs for ext, off, size in ref.members]
        clean.write_text(format_index(members), encoding="utf-8")
        out.append(str(clean))
    return out


@BACKENDS.register("dali")
class DaliStream(ShardStream):
    """Batches from webdataset shards read and decoded by DALI pipelines."""

    backend = "dali"

    def __init__(self, cfg: DataConfig, shards: str, **common: Any) -> None:
        """``common``: `ShardStream`'s keyword arguments (rank, world size, batch size, tokenizer, ...)."""
        self.fn, self.types, self.pipeline_def = _dali()
        super().__init__(cfg, shards, **common)
        self.augment = self.transform.augment
        self._tmp = tempfile.TemporaryDirectory(prefix="mpma-dali-idx-")
        self.idx_files = write_clean_indexes(self.index, Path(self._tmp.name))
        self.remote = any(remote.is_remote(p) for p in self.index.paths)
        if self.remote and cfg.dali_remote == "direct":
            other = next((str(p) for p in self.index.paths if not str(p).startswith("s3://")), None)
            if other is not None:
                raise ValueError(
                    f"data.dali_remote=direct reads s3:// shards only (DALI's own client), not {other}: "
                    "use data.dali_remote=cache"
                )
        self._cache = self.shard_cache() if self.remote and cfg.dali_remote == "cache" else None
        self._cache_counted: Counter = Counter()
        use_cuda = torch.cuda.is_available()
        self.decode_device = {"auto": "mixed" if use_cuda else "cpu"}.get(cfg.dali_decode, cfg.dali_decode)
        if self.decode_device == "mixed" and not use_cuda:
            raise ValueError("data.dali_decode=mixed needs a CUDA device; use auto or cpu on this machine")
        local_rank = os.environ.get("LOCAL_RANK")
        if self.decode_device != "mixed":
            self.device_id = None
        else:
            self.device_id = int(local_rank) if local_rank is not None else torch.cuda.current_device()
        self._reader: Any = None
        self._resume_checkpoint: str | None = None
        self._spare: tuple[SampleRow, torch.Tensor] | None = None
        """A good sample of an earlier batch, with its image: the stand-in when none of a batch decodes."""
        self._decoder = self._build_decoder()

    # -- pipelines -------------------------------------------------------------------------------------
    def _build_reader(self, epoch: int, checkpoint: str | None) -> Any:
        fn = self.fn
        counts = self.index.counts()
        order = shard_order(counts, epoch, self.seed, shuffle=self.train, resample_to=self.resample_to)
        order = [s for s in order if counts[s]]
        shard_id, num_shards = self.rank, self.world_size
        if self._cache is not None:  # remote shards: this rank's part of the epoch, from the node cache
            paths, idx = self._local_part(epoch, order)
            shard_id, num_shards = 0, 1
        else:
            paths = [str(self.index.paths[s]) for s in order]
            idx = [self.idx_files[s] for s in order]
        shuffle = self.train and self.cfg.shuffle_buffer > 1

        @self.pipeline_def(enable_checkpointing=True)
        def reader():
            jpg, txt, meta = fn.readers.webdataset(
                paths=paths,
                index_paths=idx,
                ext=list(SAMPLE_MEMBERS),  # jpg, txt, json: the order run() returns them in
                missing_component_behavior="empty",
                shard_id=shard_id,
                num_shards=num_shards,
                random_shuffle=shuffle,
                initial_fill=max(self.cfg.shuffle_buffer, 1),
                pad_last_batch=True,
                seed=int(seeded_rng(self.seed, epoch, self.rank, 0xDA11).integers(2**31)),
                name="Reader",
            )
            return jpg, txt, meta

        kwargs: dict[str, Any] = {}
        if checkpoint is not None:
            kwargs["checkpoint"] = base64.b64decode(checkpoint)
        pipe = reader(
            batch_size=self.batch_size,
            num_threads=max(1, self.cfg.num_workers),
            device_id=None,
            prefetch_queue_depth=self.cfg.prefetch_batches,
            **kwargs,
        )
        pipe.build()
        return pipe

    def _local_part(self, epoch: int, order: list[int]) -> tuple[list[str], list[str]]:
        """Local paths and trimmed ``.idx`` of this rank's part of ``epoch`` (`dali_remote`); the next epoch's
        shards are fetched ahead in the background when the cache budget holds both epochs."""
        assert self._cache is not None
        counts = self.index.counts()
        pieces = dali_remote.rank_pieces(counts, order, self.rank, self.world_size)
        paths, idx = dali_remote.local_reader_inputs(
            self.index, pieces, self._cache, Path(self._tmp.name), f"epoch{epoch}"
        )
        keep = [str(self.index.paths[s]) for s, _, _ in pieces]
        if self.train:
            nxt = shard_order(counts, epoch + 1, self.seed, shuffle=True, resample_to=self.resample_to)
            ahead = dali_remote.rank_pieces(counts, [s for s in nxt if counts[s]], self.rank, self.world_size)
            need = dali_remote.epoch_bytes(self.index, pieces) + dali_remote.epoch_bytes(self.index, ahead)
            if need <= self._cache.budget_bytes:
                urls = {str(self.index.paths[s]): self.index.infos[s] for s, _, _ in ahead}
                keep += list(urls)
                self._cache.prefetch(
                    [
                        (url, lambda url=url, info=info: self._cache.path(url, info, pin=True))
                        for url, info in urls.items()
                    ]
                )
        self._cache.unpin_all_but(keep)  # the last epoch's shards: evictable again
        return paths, idx

    def _build_decoder(self) -> Any:
        fn, types = self.fn, self.types
        import nvidia.dali.math as dmath

        cfg = self.cfg
        size = cfg.image_size
        mean, std = cfg.channel_stats()
        out_type = types.GRAY if cfg.in_chans == 1 else types.RGB
        augment = self.augment

        @self.pipeline_def(exec_async=False, exec_pipelined=False)
        def decoder():
            jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(jpg, device=self.decode_device, output_type=out_type)
            if augment:
                roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
                roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
                img = fn.resize(
                    img,
                    size=[size, size],
                    roi_start=roi_start,
                    roi_end=roi_end,
                    roi_relative=False,
                    antialias=True,
                    interp_type=types.INTERP_LINEAR,
                )
                if cfg.rotation_degrees > 0:
                    angle = fn.external_source(name="angle", dtype=types.FLOAT, ndim=0)
                    img = fn.rotate(
                        img, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR
                    )
                if cfg.brightness > 0 or cfg.contrast > 0:
                    bright = fn.external_source(name="brightness", dtype=types.FLOAT, ndim=0)
                    contrast = fn.external_source(name="contrast", dtype=types.FLOAT, ndim=0)
                    if self.decode_device == "mixed":  # arithmetic operands live on the image's device
                        bright, contrast = bright.gpu(), contrast.gpu()
                    # torchvision: brightness scales, contrast blends with the image's mean gray value
                    img = fn.cast(img, dtype=types.FLOAT) * bright
                    img = dmath.clamp(img, 0.0, 255.0)
                    gray_mean = fn.reductions.mean(img)
                    img = dmath.clamp(img * contrast + gray_mean * (1.0 - contrast), 0.0, 255.0)
                if cfg.hflip:
                    flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
                    img = fn.flip(img, horizontal=flip)
            else:
                resized = fn.external_source(name="resized", dtype=types.FLOAT, ndim=1)
                anchor = fn.external_source(name="anchor", dtype=types.INT64, ndim=1)
                img = fn.resize(img, size=resized, antialias=True, interp_type=types.INTERP_LINEAR)
                img = fn.slice(img, start=anchor, shape=[size, size], axes=[0, 1])  # argument inputs: CPU
            return fn.crop_mirror_normalize(
                img,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[m * 255.0 for m in mean],
                std=[s * 255.0 for s in std],
            )

        pipe = decoder(
            batch_size=self.batch_size, num_threads=max(1, self.cfg.num_workers), device_id=self.device_id
        )
        pipe.build()
        return pipe

    # -- iteration -------------------------------------------------------------------------------------
    def _epoch_iter(self, epoch: int, start_batch: int) -> Iterator[MadeBatch]:
        checkpoint = self._resume_checkpoint if start_batch else None
        self._resume_checkpoint = None
        self._reader = self._build_reader(epoch, checkpoint)
        if start_batch and checkpoint is None:  # no checkpoint: replay the reader (bytes only, no decode)
            for _ in range(start_batch):
                self._reader.run()
        counts = self.index.counts()
        # the reader splits the listed shards (resampled: drawn with replacement, >= epoch_length samples)
        order = shard_order(counts, epoch, self.seed, shuffle=self.train, resample_to=self.resample_to)
        lo, hi = rank_range(sum(counts[s] for s in order), self.rank, self.world_size)
        own = hi - lo
        if self.resample_to:  # the declared epoch: this rank's share of epoch_length samples
            share = rank_range(self.resample_to, self.rank, self.world_size)
            own = min(own, share[1] - share[0])
        try:
            for number in range(start_batch, self.steps_per_epoch):
                jpgs, txts, metas = self._reader.run()
                valid = [number * self.batch_size + s < own for s in range(self.batch_size)]
                yield self._make_batch(epoch, number, jpgs, txts, metas, valid)
        finally:
            self._reader = None

    def _make_batch(
        self, epoch: int, number: int, jpgs: Any, txts: Any, metas: Any, valid: list[bool]
    ) -> MadeBatch:
        def read(slot: int, _: None, ok: bool) -> SampleRow:
            jpg = np.array(jpgs.at(slot), dtype=np.uint8)
            key = jpgs[slot].source_info() or f"{number}:{slot}"
            size = jpeg_header(jpg.tobytes(), key)
            text = decode_text(np.array(txts.at(slot), dtype=np.uint8).tobytes())
            meta = decode_meta(np.array(metas.at(slot), dtype=np.uint8).tobytes())
            return SampleRow(jpg, text, meta, sample_key(key), ok, size)

        where = f"batch {number} (epoch {epoch}, rank {self.rank})"
        rows, skipped = read_batch_rows(((None, v) for v in valid[: len(jpgs)]), read, where=where)
        params = [
            draw_aug_params(self.cfg, *row.size, seeded_rng(self.seed, epoch, self.rank, number, slot))
            if self.augment
            else None
            for slot, row in enumerate(rows)
        ]
        images, undecodable = self._decode(rows, params)  # (B, C, S, S)
        if undecodable:  # passed the header checks, yet no decoder can read them: the stand-in policy again
            good = [i for i in range(len(rows)) if i not in undecodable]
            for slot in undecodable:
                skipped["bad_jpg"] += rows[slot].valid  # a padding repeat of a bad sample is not counted twice
            if not good and self._spare is None:
                raise RuntimeError(
                    f"every sample of {where} is unreadable (bad_jpg: {len(undecodable)}); "
                    "check the shards with python -m data_tools.verify_shards"
                )
            for n, slot in enumerate(sorted(undecodable)):
                # the stand-in: a good sample of this batch, else the last good one of an earlier batch (the
                # last batch of an epoch is padded with repeats of its last sample, which may be the bad one)
                row, image = (rows[good[n % len(good)]], images[good[n % len(good)]]) if good else self._spare
                rows[slot] = dataclasses.replace(row, valid=False)
                images[slot] = image
        first_good = next((i for i, r in enumerate(rows) if r.valid), None)
        if first_good is not None:
            self._spare = (rows[first_good], images[first_good].clone())
        if self._cache is not None:  # the cache's fetches since the last batch (prefetch threads too)
            cost = Counter(self._cache.cost)
            skipped.update(cost - self._cache_counted)
            self._cache_counted = cost
        gen = mask_generator(self.seed, epoch, self.rank, number, self.train)
        batch = collate_rows(rows, images, self.encoder, gen)
        return batch, dict(skipped)

    def _decode(self, rows: list[SampleRow], params: list[AugParams | None]) -> tuple[torch.Tensor, set[int]]:
        """``(images, undecodable)``: (B, C, S, S) float32 images from the decode pipeline, and the slots no
        decoder could read. When DALI fails on the batch, each image is decoded on the host with PIL (same
        parameters); one PIL cannot decode either is listed, its image left zero for the caller to replace."""
        pipe = self._decoder
        pipe.feed_input("jpg", [r.image for r in rows])
        if self.augment:
            pipe.feed_input("roi_start", [np.array([p.top, p.left], np.float32) for p in params])
            pipe.feed_input(
                "roi_end", [np.array([p.top + p.height, p.left + p.width], np.float32) for p in params]
            )
            if self.cfg.rotation_degrees > 0:
                pipe.feed_input("angle", [np.array(p.angle, np.float32) for p in params])
            if self.cfg.brightness > 0 or self.cfg.contrast > 0:
                pipe.feed_input("brightness", [np.array(p.brightness, np.float32) for p in params])
                pipe.feed_input("contrast", [np.array(p.contrast, np.float32) for p in params])
            if self.cfg.hflip:
                pipe.feed_input("flip", [np.array(int(p.flip), np.int32) for p in params])
        else:
            geometry = [eval_geometry(self.cfg, *r.size) for r in rows]
            pipe.feed_input("resized", [np.array(g[:2], np.float32) for g in geometry])
            pipe.feed_input("anchor", [np.array(g[2:], np.int64) for g in geometry])
        try:
            (out,) = pipe.run()
        except RuntimeError:
            # a JPEG that passed the header checks but breaks the decoder: decode this batch on the host
            self._decoder = self._build_decoder()
            return self._decode_on_host(rows, params)
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        # a copy into torch memory: on the GPU after `mixed` decode (no host round trip), else on the CPU
        return to_torch_tensor(out.as_tensor(), copy=True), set()  # (B, C, S, S)

    def _decode_on_host(
        self, rows: list[SampleRow], params: list[AugParams | None]
    ) -> tuple[torch.Tensor, set[int]]:
        images: list[torch.Tensor | None] = []
        undecodable: set[int] = set()
        for slot, (row, p) in enumerate(zip(rows, params)):
            try:
                with Image.open(io.BytesIO(row.image.tobytes())) as img:
                    img.load()
                    images.append(self.transform.apply(img, p))
            except Exception:  # PIL raises many types for corrupt data
                images.append(None)
                undecodable.add(slot)
        shape = next((t.shape for t in images if t is not None), None)
        if shape is None:
            size = self.cfg.image_size
            shape = (self.cfg.in_chans, size, size)
        stacked = torch.stack([t if t is not None else torch.zeros(shape) for t in images])  # (B, C, S, S)
        return stacked, undecodable

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._reader is not None and 0 < self.batch_in_epoch < self.steps_per_epoch:
            state["dali_checkpoint"] = base64.b64encode(self._reader.checkpoint()).decode("ascii")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._reader = None
        self._resume_checkpoint = state.get("dali_checkpoint")

    def close(self) -> None:
        super().close()
        self._reader = None
        self._decoder = None
        if self._cache is not None:
            self._cache.close()
        self._tmp.cleanup()


def sample_key(source_info: str) -> str:
    """The sample key from DALI's ``source_info`` (``path/shard.tar:key.jpg``-like) or a fallback."""
    name = source_info.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return name.split(".", 1)[0] if "." in name else name
