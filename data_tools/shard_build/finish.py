"""The end of a build: `rejects.jsonl`, then `manifest.json` (its presence means the build is complete),
and the summary `build_shards` returns and prints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from data_tools import __version__
from data_tools.shard_build.plan import PlannedShard
from data_tools.shard_build.resume import write_json_atomic
from data_tools.shard_format import SPLITS, kind_of_format
from data_tools.sources.common import SourceScan


def finish_build(out: Path, identity: dict, scan: SourceScan, plan: list[PlannedShard], records: dict) -> dict:
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
        "kind": kind_of_format(identity["source"]["format"]),
        "inputs": {"images": written + image_rejects, "reports_without_images": len(rejects) - image_rejects},
        "written": written,
        "rejected": image_rejects,
        "rejects": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "counts": counts,
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    if scan.notes:  # only where there is something to say: other builds keep their exact bytes
        manifest["notes"] = list(scan.notes)
    write_json_atomic(out / "rejects.jsonl", rejects, lines=True)
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def build_summary(manifest: dict, out: Path, status: str, reused: int, seconds: float) -> dict:
    """What `build_shards` returns: counts from the manifest plus status, reuse and speed."""
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
        "notes": manifest.get("notes", []),
    }


def part_summary(out: Path, records: dict, node_rank: int, num_nodes: int, reused: int, seconds: float) -> dict:
    """What one part of a split build returns when other parts are still building (status ``part_done``)."""
    shards = [r["shard"] for r in records.values() if r["shard"] is not None]
    rejects = [row for r in records.values() for row in r["rejects"]]
    splits: dict[str, int] = {}
    for info in shards:
        splits[info["split"]] = splits.get(info["split"], 0) + info["samples"]
    written = sum(splits.values())
    image_rejects = sum(row["kind"] == "image" for row in rejects)
    return {
        "status": "part_done",
        "output": str(out),
        "part": f"{node_rank + 1} of {num_nodes}",
        "written": written,
        "rejected": image_rejects,
        "rejected_reports": 0,
        "inputs": written + image_rejects,
        "rejects": dict(sorted(Counter(row["reason"] for row in rejects).items())),
        "splits": splits,
        "shards": len(shards),
        "shards_reused": reused,
        "bytes": sum(s["bytes"] for s in shards),
        "seconds": round(seconds, 3),
        "images_per_s": round(written / seconds, 2) if seconds > 0 else None,
        "notes": [f"part {node_rank + 1} of {num_nodes} done; the last part to finish writes manifest.json"],
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
    lines += [f"  note      {note}" for note in summary["notes"]]
    if summary["images_per_s"] is None:
        lines.append(f"  time      {summary['seconds']:.1f} s (nothing to do: the build was already complete)")
    else:
        lines.append(f"  time      {summary['seconds']:.1f} s ({summary['images_per_s']:.1f} images/s)")
    return "\n".join(lines)
