"""Check a shard build end to end: `python -m data_tools.verify_shards DIR` (DIR may be a remote prefix,
`s3://bucket/build`: each shard is fetched into a temporary folder, checked and deleted).

Re-reads every shard listed in `DIR/manifest.json` and checks:
- the tar's size and sha256 against the manifest, and that it reads as a tar to the end;
- members: regular files named `<key>.<ext>`, each sample exactly `jpg` + `json` + `txt`, keys unique
  across the build, the sample count against the manifest;
- every JPEG decodes as 8-bit grayscale with its shorter side equal to the build's `image_size`;
- every JSON has the SPEC §4.2 fields (14 CheXpert labels in 1 / 0 / -1 / null, the shard's split, the
  original width/height; a VQA sample also its question, normalised answer, CLOSED/OPEN answer type and
  the rest of `shard_format.VQA_FIELDS`) and every text is non-empty UTF-8;
- every `.idx` equals the index computed from the tar's real member offsets (DALI `wds2idx` format);
- per-split counts, totals and reject counts against the manifest and `rejects.jsonl`, and no stray
  shard or temporary file in the folder;
- that the build holds at least one sample (a build whose every input was rejected is a failure).

Prints a summary; exits 1 listing every problem found (2 when DIR is not a build at all).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_tools import remote
from data_tools.remote import RemoteError
from data_tools.shard_build.writer import sha256_file
from data_tools.shard_format import (
    ANSWER_TYPES,
    CHEXPERT_LABELS,
    CLASS_FIELD,
    DATASET_LABELS_FIELD,
    LABEL_VALUES,
    SAMPLE_MEMBERS,
    TRUTH_FIELD,
    VQA_SOURCES,
    check_truth,
    format_index,
    json_fields,
    normalize_answer,
    split_name,
)


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    rejects: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_vqa(where: str, meta: dict) -> list[str]:
    """The QA fields of a VQA sample's JSON."""
    problems = []
    if meta["answer_type"] not in ANSWER_TYPES:
        problems.append(
            f"{where}.json: answer_type {meta['answer_type']!r} is not one of {', '.join(ANSWER_TYPES)}"
        )
    for name in ("qid", "question", "answer"):
        if not isinstance(meta[name], str) or not meta[name].strip():
            problems.append(f"{where}.json: {name} must be a non-empty string")
    if isinstance(meta["answer"], str) and meta["answer"] != normalize_answer(meta["answer"]):
        problems.append(
            f"{where}.json: answer {meta['answer']!r} is not normalised (strip, lower case, one space)"
        )
    return problems


def _check_sample(where: str, members: dict[str, bytes], split: str, image_size: int | None) -> list[str]:
    problems = []
    if set(members) != set(SAMPLE_MEMBERS):
        return [f"{where}: members {sorted(members)}, expected {sorted(SAMPLE_MEMBERS)}"]
    stored_size = None
    try:
        with Image.open(io.BytesIO(members["jpg"])) as img:
            img.load()
            stored_size = img.size
            if img.format != "JPEG" or img.mode != "L":
                problems.append(f"{where}.jpg: {img.format} mode {img.mode}, expected an 8-bit grayscale JPEG")
            if image_size is not None and min(img.size) != image_size:
                problems.append(f"{where}.jpg: {img.size[0]}x{img.size[1]}, shorter side is not {image_size}")
    except Exception as exc:
        problems.append(f"{where}.jpg: does not decode ({exc})")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise json.JSONDecodeError("not an object", "", 0)
        missing = [k for k in json_fields(meta.get("source")) if k not in meta]
        if missing:
            problems.append(f"{where}.json: missing field(s) {missing}")
        else:
            labels = meta["labels"]
            if not isinstance(labels, dict) or set(labels) != set(CHEXPERT_LABELS):
                problems.append(f"{where}.json: labels must hold exactly the 14 CheXpert names")
            elif any(v not in LABEL_VALUES or isinstance(v, bool) for v in labels.values()):
                problems.append(f"{where}.json: label values must be 1, 0, -1 or null")
            if meta["split"] != split:
                problems.append(f"{where}.json: split {meta['split']!r} but the shard is in {split!r}")
            if not all(isinstance(meta[k], int) and meta[k] > 0 for k in ("width", "height")):
                problems.append(f"{where}.json: width/height must be positive integers")
            if meta["source"] in VQA_SOURCES:
                problems.extend(_check_vqa(where, meta))
            if TRUTH_FIELD in meta:
                problems.extend(f"{where}.json: {p}" for p in check_truth(meta[TRUTH_FIELD], stored_size))
            own = meta.get(DATASET_LABELS_FIELD, {})
            if not isinstance(own, dict) or any(
                v not in LABEL_VALUES or isinstance(v, bool) for v in own.values()
            ):
                problems.append(f"{where}.json: {DATASET_LABELS_FIELD} must map names to 1, 0, -1 or null")
            if CLASS_FIELD in meta and not (isinstance(meta[CLASS_FIELD], str) and meta[CLASS_FIELD]):
                problems.append(f"{where}.json: {CLASS_FIELD} must be a non-empty string")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{where}.json: not valid UTF-8 JSON ({exc})")
    try:
        if not members["txt"].decode("utf-8").strip():
            problems.append(f"{where}.txt: empty report text")
    except UnicodeDecodeError:
        problems.append(f"{where}.txt: not valid UTF-8")
    return problems


def _plain_member_name(name: str) -> bool:
    """A member name build_shards writes: one `<key>.<ext>`, no folder, no `..`, not absolute."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name


def _check_shard(root: Path, info: dict, image_size: int | None, keys: set[str], report: VerifyReport) -> None:
    name = info.get("name", "?")
    tar_path, idx_path = root / name, root / info.get("index", "?")
    problems = report.problems
    if not tar_path.exists():
        problems.append(f"{name}: listed in manifest.json but missing")
        return
    if not tar_path.is_file():
        what = "a FIFO" if tar_path.is_fifo() else "a folder" if tar_path.is_dir() else "not a regular file"
        problems.append(f"{name}: {what}, not a shard file; rebuild the shards (its samples are not counted)")
        return
    size = tar_path.stat().st_size
    report.bytes += size
    if size != info.get("bytes"):
        problems.append(f"{name}: {size} bytes, manifest says {info.get('bytes')}")
    if sha256_file(tar_path) != info.get("sha256"):
        problems.append(f"{name}: sha256 differs from manifest.json (the file changed or is damaged)")
    split = info.get("split") or name.split("/")[0]
    offsets: list[tuple[str, int, int]] = []
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    problems.append(f"{name}: member {member.name!r} is not a regular file")
                    continue
                if not _plain_member_name(member.name):
                    problems.append(
                        f"{name}: member {member.name!r} is not a plain <key>.<ext> name (a path, absolute or "
                        "with '..', would write outside the folder it is extracted to)"
                    )
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    problems.append(f"{name}: member {member.name} is truncated")
                offsets.append((member.name, member.offset_data, member.size))
                key, ext = split_name(member.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                if ext in samples[-1][1]:
                    problems.append(f"{name}: {member.name} appears twice")
                samples[-1][1][ext] = data
            end = tar.offset  # where the end-of-archive marker (two zero blocks) must be
        with open(tar_path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
        if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
            problems.append(f"{name}: truncated (no end-of-archive marker after the last member)")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{name}: unreadable tar ({exc})")
        return
    for key, members in samples:
        if key in keys:
            problems.append(f"{name}: sample key {key} also appears earlier in the build")
        keys.add(key)
        problems.extend(_check_sample(f"{name}:{key}", members, split, image_size))
    report.samples += len(samples)
    if len(samples) != info.get("samples"):
        problems.append(f"{name}: {len(samples)} samples, manifest says {info.get('samples')}")
    if not idx_path.is_file():
        problems.append(f"{info.get('index')}: index file missing")
    else:
        try:
            expected = format_index(offsets)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        else:
            if idx_path.read_text(encoding="utf-8", errors="replace") != expected:
                problems.append(f"{info.get('index')}: does not match the tar's real member offsets")


class _RemoteRoot:
    """A build under a remote prefix, read through `data_tools.remote`: each shard and its index is fetched
    into a temporary folder, checked there by the same code as a local build, and deleted."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.tmp = Path(tempfile.mkdtemp(prefix="verify-shards-"))

    def text(self, rel: str) -> str | None:
        url = remote.join(self.url, rel)
        if not remote.exists(url):
            return None
        return remote.read_bytes(url).decode("utf-8", errors="replace")

    def listing(self) -> list[str]:
        fs, path = remote.filesystem(self.url)
        found = remote.with_retries(lambda: fs.find(path), self.url)
        base = path.rstrip("/") + "/"
        return sorted(f[len(base) :] for f in found if f.startswith(base))

    def fetch(self, info: dict) -> None:
        for rel in (info.get("name"), info.get("index")):
            if not rel:
                continue
            target = self.tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            url = remote.join(self.url, rel)
            if remote.exists(url):
                target.write_bytes(remote.read_bytes(url))

    def drop(self, info: dict) -> None:
        for rel in (info.get("name"), info.get("index")):
            if rel:
                (self.tmp / rel).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def verify_shards(root: str | Path, progress: bool = True) -> VerifyReport:
    """Verify the build in `root` (a folder, or a remote prefix ``s3://bucket/build``); every problem found
    is one line in `report.problems`.

    Raises:
        FileNotFoundError: `root` holds no readable `manifest.json`.
        RemoteError: a remote `root` cannot be read (missing credentials, access denied: one line).
    """
    if remote.is_remote(str(root)):
        store = _RemoteRoot(str(root))
        try:
            return _verify(Path(store.tmp), progress, store)
        finally:
            store.close()
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; give the build_shards --output folder")
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is a file, not a folder; give the build_shards --output folder (the one holding manifest.json)"
        )
    if not manifest_path.is_file():
        if (root.parent / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{root} has no manifest.json: it looks like a split folder of the build {root.parent}; "
                "verify that folder"
            )
        raise FileNotFoundError(f"{root} has no manifest.json: not a finished build_shards output")
    return _verify(root, progress, None)


def _verify(root: Path, progress: bool, store: _RemoteRoot | None) -> VerifyReport:
    name = store.url if store is not None else str(root)

    def text(rel: str) -> str | None:
        if store is not None:
            return store.text(rel)
        return (root / rel).read_text(encoding="utf-8") if (root / rel).is_file() else None

    manifest_text = text("manifest.json")
    if manifest_text is None:
        raise FileNotFoundError(f"{name} has no manifest.json: not a finished build_shards output")
    try:
        manifest = json.loads(manifest_text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileNotFoundError(f"{name}/manifest.json is not valid JSON ({exc})") from None
    report = VerifyReport()
    problems = report.problems
    image_size = (manifest.get("options") or {}).get("image_size")
    shards = manifest.get("shards", [])
    keys: set[str] = set()
    split_counts: Counter = Counter()
    for info in tqdm(shards, unit="shard", desc="verify", disable=not progress, file=sys.stderr):
        before = report.samples
        if store is not None:
            store.fetch(info)
        _check_shard(root, info, image_size, keys, report)
        if store is not None:
            store.drop(info)
        split_counts[info.get("split")] += report.samples - before
        report.shards += 1

    listed = {s.get("name") for s in shards} | {s.get("index") for s in shards}
    if store is not None:
        names = store.listing()
        files = [n for n in names if n.count("/") == 1]
        unfinished = any(n.startswith(".build/") for n in names)
    else:
        files = [p.relative_to(root).as_posix() for p in sorted(root.glob("*/*"))]
        unfinished = (root / ".build").exists()
    for rel in files:
        if rel.endswith((".tar", ".idx")) and rel not in listed:
            problems.append(f"{rel}: on disk but not in manifest.json")
        elif rel.endswith(".tmp"):
            problems.append(f"{rel}: leftover temporary file (an interrupted build? rerun build_shards)")
    if unfinished:
        problems.append(".build/: the build did not finish (rerun build_shards with the same options)")

    counts = manifest.get("counts", {})
    for split in sorted(set(counts) | set(split_counts)):
        if counts.get(split, 0) != split_counts.get(split, 0):
            problems.append(
                f"split {split}: {split_counts.get(split, 0)} samples in shards, manifest says {counts.get(split, 0)}"
            )
    if report.samples == 0 and not manifest.get("written"):
        problems.append(
            "the build holds no sample: every input was rejected (see rejects.jsonl); an empty build is not usable"
        )
    if report.samples != manifest.get("written"):
        problems.append(f"{report.samples} samples in shards, manifest says written={manifest.get('written')}")

    rejects_text = text("rejects.jsonl")
    reasons: Counter = Counter()
    image_rejects = 0
    if rejects_text is None:
        problems.append("rejects.jsonl: missing")
    else:
        for lineno, line in enumerate(rejects_text.splitlines(), start=1):
            try:
                row = json.loads(line)
                reasons[row["reason"]] += 1
                image_rejects += row.get("kind", "image") == "image"
                if not row.get("input"):
                    problems.append(f"rejects.jsonl line {lineno}: no input path")
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(f"rejects.jsonl line {lineno}: not a JSON object with a reason")
    report.rejects = sum(reasons.values())
    if dict(reasons) != manifest.get("rejects", {}):
        problems.append(
            f"rejects.jsonl reasons {dict(sorted(reasons.items()))} differ from manifest {manifest.get('rejects')}"
        )
    if image_rejects != manifest.get("rejected"):
        problems.append(
            f"rejects.jsonl has {image_rejects} image rejects, manifest says {manifest.get('rejected')}"
        )
    inputs = (manifest.get("inputs") or {}).get("images")
    if inputs is not None and inputs != report.samples + image_rejects:
        problems.append(f"written {report.samples} + rejected {image_rejects} != {inputs} input images")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.verify_shards",
        description="Re-read and check every shard, index, JSON and count of a build_shards output folder.",
    )
    parser.add_argument("dir", help="the build_shards --output folder, or its remote prefix (s3://bucket/build)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = verify_shards(args.dir, progress=not args.no_progress)
    except (FileNotFoundError, RemoteError) as exc:
        print(f"verify_shards: error: {exc}", file=sys.stderr)
        return 2
    status = "OK" if report.ok else f"{len(report.problems)} PROBLEM(S)"
    print(
        f"{args.dir}: {report.shards} shards, {report.samples} samples, {report.rejects} rejects, "
        f"{report.bytes / 1e6:.1f} MB: {status}"
    )
    for problem in report.problems:
        print(f"  - {problem}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
