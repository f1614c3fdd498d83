"""Build verified, deterministic WebDataset shards from a chest X-ray corpus (SPEC §4).

    python -m data_tools.build_shards --format mimic-cxr --input CORPUS --output SHARDS [--workers 2]

Output (SPEC §4.2): `OUT/<split>/shard-NNNNNN.tar` + `.idx` (DALI `wds2idx` format), `OUT/manifest.json`,
`OUT/rejects.jsonl`.

How the build stays deterministic, parallel and resumable:
- the source is scanned once in sorted order into a *plan*: per split, the planned samples are cut
  into shards of `--shard-size` inputs. A shard's content is a pure function of its inputs and the
  options, whatever the number of workers;
- worker processes decode, resize and encode the images and send back only bytes; the main process
  writes the tars in plan order (fixed tar headers, see `shard_writer`);
- each shard is written under a temporary name and renamed when complete, then a record of it goes to
  `OUT/.build/`. A rerun after a crash (even `kill -9`) with the same input and options skips the shards
  whose record and tar agree and builds the rest; the result is byte-identical to an uninterrupted build.
  `manifest.json` is written last; a finished build is never overwritten by a different one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from data_tools import __version__
from data_tools.reports import DEFAULT_SECTIONS, SECTION_SYNONYMS
from data_tools.shard_format import SIZE_FIELDS, SPLITS, json_fields
from data_tools.shard_writer import ShardWriter, sha256_file
from data_tools.sources import Reject, ScanOptions, SourceError, SourceItem, SourceScan
from data_tools.sources_images import ImageOptions, ImageRejected, encode_image

FORMATS = ("mimic-cxr", "iu-xray", "manifest")
STATE_DIR = ".build"


class BuildError(Exception):
    """A build that must not start or go on; the message is one line for the user."""


@dataclass
class PlannedShard:
    split: str
    index: int
    items: list[SourceItem]

    @property
    def record_name(self) -> str:
        return f"{self.split}-shard-{self.index:06d}.json"


# ----------------------------------------------------------------------------------------------- workers

_WORKER_OPTS: tuple[ImageOptions, tuple[str, ...] | None] | None = None


def _init_worker(image_opts: ImageOptions, views: tuple[str, ...] | None) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = (image_opts, views)


def encode_sample(item: SourceItem, image_opts: ImageOptions, views: tuple[str, ...] | None) -> tuple:
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
    meta["width"], meta["height"] = encoded.width, encoded.height
    members = {
        "jpg": encoded.jpeg,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "txt": item.text.encode("utf-8"),
    }
    return "ok", members


def _encode_in_worker(item: SourceItem) -> tuple:
    assert _WORKER_OPTS is not None
    return encode_sample(item, *_WORKER_OPTS)


# ----------------------------------------------------------------------------------------------- planning


def scan_source(fmt: str, input_path: Path, scan_opts: ScanOptions) -> SourceScan:
    if fmt == "mimic-cxr":
        from data_tools.sources_mimic import scan_mimic_cxr

        return scan_mimic_cxr(input_path, scan_opts)
    if fmt == "iu-xray":
        from data_tools.sources_iu import scan_iu_xray

        return scan_iu_xray(input_path, scan_opts)
    if fmt == "manifest":
        from data_tools.sources_manifest import scan_manifest

        return scan_manifest(input_path, scan_opts)
    raise BuildError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")


def plan_shards(items: list[SourceItem], shard_size: int) -> list[PlannedShard]:
    """Cut each split's items (in scan order) into consecutive shards; MIMIC splits first, then others."""
    by_split: dict[str, list[SourceItem]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    order = [s for s in SPLITS if s in by_split] + sorted(s for s in by_split if s not in SPLITS)
    plan = []
    for split in order:
        split_items = by_split[split]
        for n, start in enumerate(range(0, len(split_items), shard_size)):
            plan.append(PlannedShard(split, n, split_items[start : start + shard_size]))
    return plan


def fingerprint(options: dict, scan: SourceScan) -> str:
    """A hash of everything that decides the output bytes: options, planned inputs (path, size, text, meta)."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for item in scan.items:
        size = os.stat(item.image_path).st_size
        h.update(json.dumps([item.key, item.input, size, item.text, item.meta], sort_keys=True).encode())
    for rej in scan.rejects:
        h.update(json.dumps(rej.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- state


def _write_json_atomic(path: Path, obj, *, lines: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if lines:
            for row in obj:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_difference(old: dict, new: dict) -> str:
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    diffs = [f"{k}: {old_opts.get(k)!r} there vs {new_opts.get(k)!r} now" for k in sorted(set(old_opts) | set(new_opts))
             if old_opts.get(k) != new_opts.get(k)]  # fmt: skip
    if old.get("source") != new.get("source"):
        diffs.insert(0, f"input {old.get('source')} there vs {new.get('source')} now")
    return "; ".join(diffs) if diffs else "same options but the input files changed"


def check_output_folder(out: Path, identity: dict) -> str:
    """Decide what to do with the output folder: `"fresh"`, `"resume"` or `"done"`.

    Raises:
        BuildError: the folder holds another build (finished or not) or unrelated files.
    """
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise BuildError(f"--output {out} exists and is not a folder; choose another --output")
    manifest = out / "manifest.json"
    state = out / STATE_DIR / "state.json"
    for path, what in ((manifest, "a finished build"), (state, "an unfinished build")):
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BuildError(
                    f"--output {out} holds an unreadable {path.name}; choose an empty --output"
                ) from None
            if old.get("fingerprint") == identity["fingerprint"]:
                return "done" if path is manifest else "resume"
            raise BuildError(
                f"--output {out} holds {what} of different input or options ({_describe_difference(old, identity)}); "
                "refusing to overwrite it: choose an empty --output or delete that folder first"
            )
    if any(out.iterdir()):
        raise BuildError(f"--output {out} is not empty and holds no mpma-ds build; choose an empty or new folder")
    return "fresh"


def _finished_record(out: Path, shard: PlannedShard) -> dict | None:
    """The saved record of a shard if the shard on disk is whole and matches it, else None."""
    path = out / STATE_DIR / shard.record_name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    info = record.get("shard")
    if info is None:  # a shard whose inputs were all rejected
        return record
    tar = out / info["name"]
    if not (tar.is_file() and (out / info["index"]).is_file() and tar.stat().st_size == info["bytes"]):
        return None
    return record if sha256_file(tar) == info["sha256"] else None


# ----------------------------------------------------------------------------------------------- build


def build_shards(
    fmt: str,
    input_path: str | Path,
    output: str | Path,
    *,
    shard_size: int = 1000,
    image_size: int = 512,
    workers: int = 1,
    sections: tuple[str, ...] | list[str] = DEFAULT_SECTIONS,
    views: tuple[str, ...] | list[str] | None = ("PA", "AP"),
    min_words: int = 3,
    min_size: int = 64,
    max_aspect: float = 3.0,
    jpeg_quality: int = 90,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    image_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Build the shards of one corpus; see the module docstring and `--help` for each option.

    Returns:
        The summary: `written`, `rejected` (images), `rejected_reports`, `rejects` (by reason),
        `splits` (samples per split), `shards`, `shards_reused`, `bytes`, `seconds`, `images_per_s`,
        `status` (`built`, `resumed` or `already_complete`), `output`.

    Raises:
        BuildError: bad arguments, an unreadable input, or an output folder holding another build.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise BuildError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    input_path, out = Path(input_path).resolve(), Path(output).resolve()
    if not input_path.exists():
        raise BuildError(f"--input {input_path} does not exist")
    if shard_size < 1 or image_size < 8 or workers < 1 or min_words < 0:
        raise BuildError("--shard-size, --workers must be >= 1, --image-size >= 8, --min-words >= 0")
    if not 0 <= val_fraction + test_fraction < 1:
        raise BuildError("--val-fraction + --test-fraction must be in [0, 1)")
    known_sections = set(SECTION_SYNONYMS.values()) | {"preamble", "text"}
    if unknown := [s for s in sections if s not in known_sections]:
        raise BuildError(f"unknown --sections {unknown}; choose from {', '.join(sorted(known_sections))}")
    views_t = tuple(v.upper() for v in views) if views else None
    scan_opts = ScanOptions(tuple(sections), views_t, min_words, val_fraction, test_fraction,
                            str(image_dir) if image_dir else None)  # fmt: skip
    image_opts = ImageOptions(image_size, jpeg_quality, min_size, max_aspect)
    try:
        scan = scan_source(fmt, input_path, scan_opts)
    except SourceError as exc:
        raise BuildError(str(exc)) from None

    options = {"format": fmt, "shard_size": shard_size, **asdict(scan_opts), **asdict(image_opts)}
    options["sections"], options["views"] = list(scan_opts.sections), list(views_t) if views_t else None
    identity = {"source": {"format": fmt, "input": str(input_path)}, "options": options}
    identity["fingerprint"] = fingerprint(options, scan)
    status = check_output_folder(out, identity)
    if status == "done":
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return _summary(manifest, out, "already_complete", 0, time.perf_counter() - t0)

    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    if status == "fresh":
        _write_json_atomic(
            state_dir / "state.json", {**identity, "tool": "data_tools.build_shards", "version": __version__}
        )

    plan = plan_shards(scan.items, shard_size)
    records: dict[str, dict] = {}
    for shard in plan:
        if status == "resume" and (record := _finished_record(out, shard)) is not None:
            records[shard.record_name] = record
    todo = [s for s in plan if s.record_name not in records]
    reused = len(plan) - len(todo)
    total_todo = sum(len(s.items) for s in todo)

    items = [item for shard in todo for item in shard.items]
    pool = None
    if workers > 1 and total_todo > 1:
        # spawn: safe whatever threads the caller runs (tests, notebooks); workers only import PIL/pydicom.
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(image_opts, views_t))
        results = pool.imap(_encode_in_worker, items, chunksize=max(1, min(4, total_todo // (workers * 8))))
    else:
        results = (encode_sample(item, image_opts, views_t) for item in items)
    bar = tqdm(total=total_todo, unit="img", desc=f"shards -> {out.name}", disable=not progress, file=sys.stderr)
    try:
        for shard in todo:
            writer = ShardWriter(out, shard.split, shard.index)
            shard_rejects = []
            for item in shard.items:
                kind, payload = next(results)
                if kind == "ok":
                    writer.add_sample(item.key, payload)
                else:
                    shard_rejects.append(payload.to_dict())
                bar.update(1)
            if writer.samples:
                info = writer.commit().to_dict()
            else:
                writer.abort()
                info = None
            record = {"shard": info, "rejects": shard_rejects}
            _write_json_atomic(state_dir / shard.record_name, record)
            records[shard.record_name] = record
        if pool is not None:
            pool.close()  # all work is done: let the workers exit on their own
            pool.join()
            pool = None
    finally:
        bar.close()
        if pool is not None:  # an error or an interrupt: stop the workers
            pool.terminate()
            pool.join()

    manifest = _finish(out, identity, scan, plan, records)
    shutil.rmtree(state_dir)
    status = "resumed" if reused else "built"
    return _summary(manifest, out, status, reused, time.perf_counter() - t0)


def _finish(out: Path, identity: dict, scan: SourceScan, plan: list[PlannedShard], records: dict) -> dict:
    """Write `rejects.jsonl` then `manifest.json` (last: its presence means the build is complete)."""
    shards = [records[s.record_name]["shard"] for s in plan if records[s.record_name]["shard"] is not None]
    rejects = [r.to_dict() for r in scan.rejects]
    for shard in plan:
        rejects.extend(records[shard.record_name]["rejects"])
    counts = {split: 0 for split in SPLITS}
    for info in shards:
        counts[info["split"]] = counts.get(info["split"], 0) + info["samples"]
    written = sum(counts.values())
    image_rejects = sum(r["kind"] == "image" for r in rejects)
    manifest = {
        "tool": "data_tools.build_shards",
        "version": __version__,
        **identity,
        "inputs": {"images": written + image_rejects, "reports_without_images": len(rejects) - image_rejects},
        "written": written,
        "rejected": image_rejects,
        "rejects": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "counts": counts,
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    _write_json_atomic(out / "rejects.jsonl", rejects, lines=True)
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _summary(manifest: dict, out: Path, status: str, reused: int, seconds: float) -> dict:
    return {
        "status": status,
        "output": str(out),
        "written": manifest["written"],
        "rejected": manifest["rejected"],
        "rejected_reports": manifest["inputs"]["reports_without_images"],
        "inputs": manifest["inputs"]["images"],
        "rejects": manifest["rejects"],
        "splits": manifest["counts"],
        "shards": len(manifest["shards"]),
        "shards_reused": reused,
        "bytes": manifest["bytes"],
        "seconds": round(seconds, 3),
        "images_per_s": round(manifest["written"] / seconds, 2)
        if seconds > 0 and status != "already_complete"
        else None,
    }


def format_summary(summary: dict) -> str:
    """The human-readable end-of-build summary printed by the CLI."""
    lines = [
        f"{summary['status']}: {summary['output']}",
        f"  written   {summary['written']} images in {summary['shards']} shards "
        f"({summary['shards_reused']} reused), {summary['bytes'] / 1e6:.1f} MB, "
        + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()),
        f"  rejected  {summary['rejected']} of {summary['inputs']} images"
        + (f" (+ {summary['rejected_reports']} reports without images)" if summary["rejected_reports"] else ""),
    ]
    lines += [f"            {reason}: {n}" for reason, n in summary["rejects"].items()]
    if summary["images_per_s"] is None:
        lines.append(f"  time      {summary['seconds']:.1f} s (nothing to do: the build was already complete)")
    else:
        lines.append(f"  time      {summary['seconds']:.1f} s ({summary['images_per_s']:.1f} images/s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.build_shards",
        description="Build deterministic WebDataset shards (+ DALI .idx, manifest.json, rejects.jsonl) "
        "from a MIMIC-CXR tree, the IU X-ray (Open-I) collection or a CSV/JSONL manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--format", required=True, help=f"input format: {', '.join(FORMATS)}")
    p.add_argument("--input", required=True, help="corpus folder (mimic-cxr, iu-xray) or manifest file")
    p.add_argument(
        "--output", required=True, help="output folder (new or empty, or an interrupted build to resume)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="input images per shard")
    p.add_argument("--image-size", type=int, default=512, help="shorter side of the stored JPEGs (px)")
    p.add_argument("--workers", type=int, default=1, help="image-encoding processes")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help="report sections kept, in order")
    p.add_argument("--views", default="PA,AP", help="view positions kept ('all' keeps every view)")
    p.add_argument("--min-words", type=int, default=3, help="reject reports with fewer words")
    p.add_argument("--min-size", type=int, default=64, help="reject images whose shorter side is smaller (px)")
    p.add_argument("--max-aspect", type=float, default=3.0, help="reject images with a larger long/short ratio")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the stored JPEGs")
    p.add_argument(
        "--val-fraction", type=float, default=0.05, help="patients hashed into 'validate' (no split file)"
    )
    p.add_argument("--test-fraction", type=float, default=0.05, help="patients hashed into 'test' (no split file)")
    p.add_argument("--image-dir", default=None, help="iu-xray: image folder (default INPUT/images, else INPUT)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    views = None if args.views.strip().lower() in ("all", "any", "") else _csv_list(args.views)
    try:
        summary = build_shards(
            args.format,
            args.input,
            args.output,
            shard_size=args.shard_size,
            image_size=args.image_size,
            workers=args.workers,
            sections=_csv_list(args.sections.lower()),
            views=views,
            min_words=args.min_words,
            min_size=args.min_size,
            max_aspect=args.max_aspect,
            jpeg_quality=args.jpeg_quality,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            image_dir=args.image_dir,
            progress=not args.no_progress,
        )
    except BuildError as exc:
        print(f"build_shards: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "build_shards: interrupted; finished shards are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
