"""verify_shards: a clean build passes; each kind of damage is found and named; the CLI's exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from shards_testdata import read_shards, reference_build

from data_tools.shard_build.writer import ShardWriter
from data_tools.verify_shards import main, verify_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ref(tmp_path_factory) -> tuple[Path, dict]:
    return reference_build(str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def build(ref, tmp_path) -> Path:
    """A private copy of the reference build to damage."""
    out = tmp_path / "build"
    shutil.copytree(ref[0], out)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_clean_build_passes(ref):
    out, summary = ref
    report = verify_shards(out, progress=False)
    assert report.ok, report.problems
    assert report.samples == summary["written"] and report.shards == summary["shards"]
    assert report.rejects == sum(summary["rejects"].values())


def test_truncated_shard_is_reported(build):
    shard = _manifest(build)["shards"][0]
    tar = build / shard["name"]
    tar.write_bytes(tar.read_bytes()[: shard["bytes"] // 2])
    problems = verify_shards(build, progress=False).problems
    assert any(shard["name"] in p and "sha256 differs" in p for p in problems)
    assert any(shard["name"] in p and ("unreadable tar" in p or "truncated" in p) for p in problems)
    assert any("manifest says written=" in p for p in problems)


def test_index_not_matching_the_tar_is_reported(build):
    shard = _manifest(build)["shards"][1]
    idx = build / shard["index"]
    lines = idx.read_text().splitlines()
    fields = lines[1].split(" ")
    fields[1] = str(int(fields[1]) + 512)  # the first member's data offset, one block off
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    problems = verify_shards(build, progress=False).problems
    assert problems == [f"{shard['index']}: does not match the tar's real member offsets"]


def test_bad_members_are_reported_one_by_one(build):
    """Rewrite a shard (consistent tar, index and manifest hash) whose samples are broken inside."""
    manifest = _manifest(build)
    shard = manifest["shards"][0]
    samples = read_shards(build)
    good = next(s for s in samples.values() if json.loads(s["json"])["split"] == shard["split"])
    split, index = shard["name"].split("/")[0], int(shard["name"].split("-")[1][:6])
    writer = ShardWriter(build, split, index)
    bad_json = json.loads(good["json"])
    del bad_json["labels"]
    wrong_split = dict(json.loads(good["json"]), split="test" if split != "test" else "train")
    writer.add_sample("badjpeg", {**good, "jpg": good["jpg"][:200]})
    writer.add_sample("nojson", {"jpg": good["jpg"], "txt": good["txt"]})
    writer.add_sample("badmeta", {**good, "json": json.dumps(bad_json).encode()})
    writer.add_sample("wrongsplit", {**good, "json": json.dumps(wrong_split).encode(), "txt": b"  "})
    # A key that the next shard holds too.
    with tarfile.open(build / manifest["shards"][1]["name"]) as tar:
        dup_key = tar.getmembers()[0].name.split(".")[0]
    writer.add_sample(dup_key, good)
    while writer.samples <= shard["samples"]:  # one sample more than the manifest's split count expects
        writer.add_sample(f"extra{writer.samples}", good)
    info = writer.commit()
    shard.update(samples=info.samples, bytes=info.bytes, sha256=info.sha256)
    (build / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(build, progress=False).problems
    name = shard["name"]
    assert any(p.startswith(f"{name}:badjpeg.jpg: does not decode") for p in problems)
    assert f"{name}:nojson: members ['jpg', 'txt'], expected ['jpg', 'json', 'txt']" in problems
    assert f"{name}:badmeta.json: missing field(s) ['labels']" in problems
    assert any(p.startswith(f"{name}:wrongsplit.json: split") for p in problems)
    assert f"{name}:wrongsplit.txt: empty report text" in problems
    assert any(f"sample key {dup_key} also appears earlier in the build" in p for p in problems)
    assert any(p.startswith(f"split {split}:") for p in problems)


def test_missing_and_stray_files_and_count_mismatches(build):
    manifest = _manifest(build)
    first, second = manifest["shards"][0], manifest["shards"][1]
    (build / first["name"]).unlink()
    shutil.copy(build / second["name"], build / second["name"].replace("shard-", "shard-9"))
    (build / "rejects.jsonl").write_text((build / "rejects.jsonl").read_text() + "not json\n")
    (build / "train" / "shard-000123.tar.tmp").write_bytes(b"")
    problems = verify_shards(build, progress=False).problems
    assert f"{first['name']}: listed in manifest.json but missing" in problems
    assert any("on disk but not in manifest.json" in p for p in problems)
    assert any(p.startswith("rejects.jsonl line") and "not a JSON object" in p for p in problems)
    assert any("leftover temporary file" in p for p in problems)


def test_cli_exit_codes_and_output(ref, build, tmp_path, capsys):
    assert main([str(ref[0]), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    shard = _manifest(build)["shards"][0]
    (build / shard["index"]).unlink()
    assert main([str(build), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 PROBLEM(S)" in out and f"  - {shard['index']}: index file missing" in out
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools.verify_shards", str(tmp_path / "empty")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "empty does not exist" in proc.stderr
