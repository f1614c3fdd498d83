"""Build verified, deterministic WebDataset shards from a chest X-ray or VQA corpus (SPEC §4).

    python -m data_tools.build_shards --format mimic-cxr --input CORPUS --output SHARDS [--workers 2]

Output (SPEC §4.2): `OUT/<split>/shard-NNNNNN.tar` + `.idx` (DALI `wds2idx` format), `OUT/manifest.json`,
`OUT/rejects.jsonl`. Formats: `mimic-cxr`, `iu-xray`, `manifest` (image-report samples) and `vqa-rad`,
`slake` (one sample per question); the readers are in `data_tools.sources`.

How the build stays deterministic, parallel and resumable (the steps are in `data_tools.shard_build`):
- the source is scanned once in sorted order into a *plan* (`shard_build.plan`): per split, the planned
  samples are cut into shards of `--shard-size` inputs. A shard's content is a pure function of its
  inputs and the options, whatever the number of workers;
- worker processes decode, resize and encode the images and send back only bytes (`shard_build.encode`);
  the main process writes the tars in plan order (fixed tar headers, `shard_build.writer`);
- each shard is written under a temporary name and renamed when complete, then a record of it goes to
  `OUT/.build/` (`shard_build.resume`). A rerun after a crash (even `kill -9`) with the same input and
  options skips the shards whose record and tar agree and builds the rest; the result is byte-identical
  to an uninterrupted build. `manifest.json` is written last (`shard_build.finish`); a finished build is
  never overwritten by a different one.
- a build that writes no sample at all ends the CLI with exit status 1 (its manifest and rejects stay).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from data_tools import __version__, remote
from data_tools.shard_build import BuildError
from data_tools.shard_build.encode import encoded_samples
from data_tools.shard_build.finish import build_summary, finish_build, format_summary, part_summary
from data_tools.shard_build.parts import SharedRecords, all_records, part_of, resolve_part
from data_tools.shard_build.plan import fingerprint, plan_shards
from data_tools.shard_build.resume import STATE_DIR, check_output_folder, finished_records, write_json_atomic
from data_tools.shard_build.upload import build_to_store
from data_tools.shard_build.writer import ShardWriter
from data_tools.sources import formats, scan_source, source_kind
from data_tools.sources.common import KNOWN_VIEWS, ScanOptions, SourceError
from data_tools.sources.dicom import CHEST_BODY_PARTS, PROJECTION_MODALITIES
from data_tools.sources.images import ImageOptions
from data_tools.sources.report_text import DEFAULT_SECTIONS, SECTION_SYNONYMS
from data_tools.sources.vqa import VQA_LANGS

__all__ = ["STATE_DIR", "BuildError", "build_parser", "build_shards", "format_summary", "main"]


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
    vqa_lang: str = "en",
    modalities: tuple[str, ...] | list[str] | None = PROJECTION_MODALITIES,
    body_parts: tuple[str, ...] | list[str] | None = CHEST_BODY_PARTS,
    allow_shared_patients: bool = False,
    follow_outside_links: bool = False,
    progress: bool = True,
    num_nodes: int | None = None,
    node_rank: int | None = None,
    on_shard: Callable[[dict], None] | None = None,
    shared: SharedRecords | None = None,
) -> dict:
    """Build the shards of one corpus; see the module docstring and `--help` for each option.

    `sections`, `views`, `min_words`, `val_fraction`, `test_fraction`, `image_dir` and `allow_shared_patients`
    do not apply to the VQA formats (their splits are the dataset's own files); `vqa_lang` applies only to
    `slake`. `follow_outside_links` reads reports / images that are symbolic links leading outside the input
    (rejected as `symlink_outside_input` otherwise).
    `num_nodes` / `node_rank` build one part of the plan (`shard_build.parts`; default: a SLURM job array's
    variables, else everything); the part that completes the plan writes the manifest. `output` may be a
    remote prefix (`s3://bucket/build`: staged locally, each shard uploaded when finished,
    `shard_build.upload`); `on_shard(info)` is called after each shard is written; `shared` keeps the parts'
    records where every part sees them (the store, for a remote split build) beside the output's own.

    Returns:
        The summary: `written`, `rejected` (images), `rejected_reports`, `rejects` (by reason),
        `splits` (samples per split), `shards`, `shards_reused`, `bytes`, `seconds`, `images_per_s`,
        `status` (`built`, `resumed`, `already_complete`, or `empty` when no sample was written), `output`, `notes` (lines about the input,
        e.g. a VQA set without a validation file).

    Raises:
        BuildError: bad arguments, an unreadable input, or an output folder holding another build.
    """
    if remote.is_remote(str(output)):
        options = {
            k: v
            for k, v in locals().items()
            if k not in ("output", "on_shard", "shared", "num_nodes", "node_rank")
        }
        return build_to_store(
            str(output), lambda **where: build_shards(**options, **where), *resolve_part(num_nodes, node_rank)
        )
    t0 = time.perf_counter()
    num_nodes, node_rank = resolve_part(num_nodes, node_rank)
    try:
        vqa = source_kind(fmt) == "vqa"
    except SourceError as exc:
        raise BuildError(str(exc)) from None
    input_path, out = Path(input_path).resolve(), Path(output).resolve()
    if not input_path.exists():
        raise BuildError(f"--input {input_path} does not exist")
    for flag, value, low in (("--shard-size", shard_size, 1), ("--workers", workers, 1), ("--image-size", image_size, 8),
                             ("--min-words", min_words, 0)):  # fmt: skip
        if value < low:
            raise BuildError(f"{flag} {value} is below {low}; give {flag} >= {low}")
    if not 0 <= val_fraction + test_fraction < 1 or min(val_fraction, test_fraction) < 0:
        raise BuildError("--val-fraction and --test-fraction must be >= 0 with a sum below 1")
    if not 1 <= jpeg_quality <= 100:
        raise BuildError(f"--jpeg-quality {jpeg_quality} is outside 1..100 (90 is the default, 95 the useful top)")
    if min_size < 1 or not max_aspect >= 1:
        raise BuildError("--min-size must be >= 1 and --max-aspect >= 1")
    if views and (unknown := [v for v in views if v.strip().upper() not in KNOWN_VIEWS]):
        raise BuildError(f"unknown --views {','.join(unknown)}; choose from {', '.join(KNOWN_VIEWS)} (or 'all')")
    modalities_t = tuple(sorted({m.strip().upper() for m in modalities})) if modalities else None
    body_parts_t = tuple(sorted({b.strip().upper() for b in body_parts})) if body_parts else None
    known_sections = set(SECTION_SYNONYMS.values()) | {"preamble", "text"}
    if unknown := [s for s in sections if s not in known_sections]:
        raise BuildError(f"unknown --sections {unknown}; choose from {', '.join(sorted(known_sections))}")
    if vqa_lang not in VQA_LANGS:
        raise BuildError(f"unknown --vqa-lang {vqa_lang!r}; choose one of {', '.join(VQA_LANGS)}")
    views_t = tuple(v.upper() for v in views) if views and not vqa else None
    scan_opts = ScanOptions(tuple(sections), views_t, min_words, val_fraction, test_fraction,
                            str(image_dir) if image_dir else None, allow_shared_patients,
                            follow_outside_links)  # fmt: skip
    image_opts = ImageOptions(image_size, jpeg_quality, min_size, max_aspect, modalities_t, body_parts_t)
    if input_path.is_dir() and out.is_relative_to(input_path):
        raise BuildError(
            f"--output {out} lies inside --input {input_path}: a later build would read its own shards; "
            "choose an --output outside the input folder"
        )
    _check_output_path(out)
    try:
        scan = scan_source(fmt, input_path, scan_opts, vqa_lang=vqa_lang)
    except SourceError as exc:
        raise BuildError(str(exc)) from None
    except OSError as exc:  # an input that cannot be read (a FIFO, permissions, an I/O error): not the output
        where = exc.filename or input_path
        raise BuildError(
            f"cannot read input {where}: {exc.strerror or exc}; check the file under --input"
        ) from None
    if links := [r for r in scan.rejects if r.reason == "symlink_outside_input"]:
        scan.notes.append(
            f"{len(links)} input(s) are symbolic links leading outside --input and were rejected, e.g. "
            f"{links[0].input}; pass --follow-outside-links if that is where your corpus lives"
        )

    if vqa:  # only what decides a VQA build's bytes
        options = {"format": fmt, "shard_size": shard_size, "vqa_lang": vqa_lang, **asdict(image_opts)}
        options["follow_outside_links"] = follow_outside_links
    else:
        options = {"format": fmt, "shard_size": shard_size, **asdict(scan_opts), **asdict(image_opts)}
        options["sections"], options["views"] = list(scan_opts.sections), list(views_t) if views_t else None
    for name in ("modalities", "body_parts"):  # as JSON will read them back
        options[name] = list(options[name]) if options[name] else None
    identity = {"source": {"format": fmt, "input": str(input_path)}, "options": options}
    identity["fingerprint"] = fingerprint(options, scan)
    status = check_output_folder(out, identity)
    if status == "done":
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return build_summary(manifest, out, "already_complete", 0, time.perf_counter() - t0)

    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    if status == "fresh":
        write_json_atomic(
            state_dir / "state.json", {**identity, "tool": "data_tools.build_shards", "version": __version__}
        )

    plan = plan_shards(scan.items, shard_size)
    mine = part_of(plan, num_nodes, node_rank)
    records = finished_records(out, mine) if status == "resume" else {}
    todo = [s for s in mine if s.record_name not in records]
    reused = len(mine) - len(todo)
    items = [item for shard in todo for item in shard.items]
    bar = tqdm(total=len(items), unit="img", desc=f"shards -> {out.name}", disable=not progress, file=sys.stderr)
    try:
        with encoded_samples(items, image_opts, views_t, workers) as results:
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
                write_json_atomic(state_dir / shard.record_name, record)
                records[shard.record_name] = record
                if shared is not None:
                    shared.put(shard.record_name, record, identity["fingerprint"])
                if on_shard is not None and info is not None:
                    on_shard(info)
    finally:
        bar.close()

    if num_nodes > 1:
        if shared is not None:  # records a killed earlier run of this part made before it could share them
            for name, record in records.items():
                shared.put(name, record, identity["fingerprint"], again=False)
        every = shared.all(plan, identity["fingerprint"]) if shared is not None else all_records(state_dir, plan)
        if every is None:  # another part is still building: it will finish the build
            return part_summary(out, records, node_rank, num_nodes, reused, time.perf_counter() - t0)
        records = every
    try:
        manifest = finish_build(out, identity, scan, plan, records)
    except FileNotFoundError:  # another part finished at the same moment and removed .build/
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    shutil.rmtree(state_dir, ignore_errors=num_nodes > 1)
    status = "empty" if manifest["written"] == 0 else "resumed" if reused else "built"
    return build_summary(manifest, out, status, reused, time.perf_counter() - t0)


def _check_output_path(out: Path) -> None:
    """Refuse an output that cannot be created or written: one line, before any work."""
    if out.exists():
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise BuildError(f"--output {out} is not writable; choose a folder you can write to")
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BuildError(
            f"--output {out} lies under {parent}, which is a file, not a folder; choose another --output"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"--output {out} cannot be created: {parent} is not writable; choose another --output")


# ----------------------------------------------------------------------------------------------- CLI


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.build_shards",
        description="Build deterministic WebDataset shards (+ DALI .idx, manifest.json, rejects.jsonl) "
        "from a MIMIC-CXR tree, the IU X-ray (Open-I) collection, a CSV/JSONL manifest, or a VQA-RAD / "
        "SLAKE visual question answering set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--format", required=True, help=f"input format: {', '.join(formats())} (and installed plugins')"
    )
    p.add_argument(
        "--input", required=True, help="corpus folder (mimic-cxr, iu-xray, vqa-rad, slake) or manifest file"
    )
    p.add_argument(
        "--output",
        required=True,
        help="output folder (new or empty, or an interrupted build to resume), or a remote prefix (s3://bucket/build): "
        "staged locally, each shard uploaded when finished, manifest.json last",
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
    p.add_argument(
        "--vqa-lang", default="en", help=f"slake: question language kept ({', '.join(VQA_LANGS)}; 'all' keeps all)"
    )
    p.add_argument(
        "--modalities",
        default=",".join(PROJECTION_MODALITIES),
        help="DICOM: accepted Modality values, projection radiographs by default ('all' accepts any)",
    )
    p.add_argument(
        "--body-parts",
        default=",".join(CHEST_BODY_PARTS),
        help="DICOM: a BodyPartExamined tag, where present, must contain one of these ('all' skips the check)",
    )
    p.add_argument(
        "--allow-shared-patients",
        action="store_true",
        help="accept a split file that puts one patient in two splits (refused by default: leakage)",
    )
    p.add_argument(
        "--follow-outside-links",
        action="store_true",
        help="read reports / images that are symbolic links leading outside --input (rejected by default)",
    )
    p.add_argument(
        "--num-nodes",
        type=int,
        default=None,
        help="split the build into this many parts, one per machine, sharing --output (default: "
        "SLURM_ARRAY_TASK_COUNT when set, else 1); the last part to finish writes manifest.json",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="which part this machine builds, 0..num-nodes-1 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _all_or_list(text: str) -> list[str] | None:
    return None if text.strip().lower() in ("all", "any", "") else _csv_list(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    views = _all_or_list(args.views)
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
            vqa_lang=args.vqa_lang,
            modalities=_all_or_list(args.modalities),
            body_parts=_all_or_list(args.body_parts),
            allow_shared_patients=args.allow_shared_patients,
            follow_outside_links=args.follow_outside_links,
            progress=not args.no_progress,
            num_nodes=args.num_nodes,
            node_rank=args.node_rank,
        )
    except BuildError as exc:
        print(f"build_shards: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions changed mid-build: finished shards are kept
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"build_shards: error: cannot write the build{where}: {exc.strerror or exc}; check --output (free "
            "space, permissions) and rerun the same command: finished shards are kept",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "build_shards: interrupted; finished shards are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(format_summary(summary))
    if summary["status"] == "part_done":
        return 0
    if summary["written"] == 0:
        counts = ", ".join(f"{reason} {n}" for reason, n in summary["rejects"].items()) or "no input found"
        print(
            f"build_shards: error: no sample was written: {summary['inputs']} input images, all rejected ({counts}); "
            f"each one is in {Path(summary['output']) / 'rejects.jsonl'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
