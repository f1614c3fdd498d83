"""The resume state of a build in `OUT/.build/`, and what to do with an output folder that exists.

Each shard is written under a temporary name and renamed when complete, then a record of it goes to
`OUT/.build/<split>-shard-NNNNNN.json`. A rerun after a crash (even `kill -9`) with the same input and
options skips the shards whose record and tar agree and builds the rest; the result is byte-identical
to an uninterrupted build. `manifest.json` is written last; a finished build is never overwritten by a
different one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_tools.shard_build import BuildError
from data_tools.shard_build.plan import PlannedShard
from data_tools.shard_build.writer import sha256_file

STATE_DIR = ".build"
"""The resume state's folder inside the output folder; it exists only while a build is unfinished."""


def write_json_atomic(path: Path, obj, *, lines: bool = False) -> None:
    """Write JSON (or JSON lines from a list) to `path` through a synced temporary file and a rename."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parts of a split build may write the same file
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


def describe_difference(old: dict, new: dict) -> str:
    """What differs between two builds' identities (input, then each option), for the refusal message."""
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
                f"--output {out} holds {what} of different input or options ({describe_difference(old, identity)}); "
                "refusing to overwrite it: choose an empty --output or delete that folder first"
            )
    if any(p.name != STATE_DIR for p in out.iterdir()):  # .build/ alone: another part is starting this build
        raise BuildError(f"--output {out} is not empty and holds no mpma-ds build; choose an empty or new folder")
    return "fresh"


def finished_record(out: Path, shard: PlannedShard) -> dict | None:
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


def finished_records(out: Path, plan: list[PlannedShard]) -> dict[str, dict]:
    """`{record_name: record}` of the planned shards a previous run of this build finished."""
    return {s.record_name: r for s in plan if (r := finished_record(out, s)) is not None}
