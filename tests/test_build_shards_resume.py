"""kill -9 in the middle of a build, then a rerun: only the missing shards are built, and the result is
byte-identical to an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shards_testdata import IMAGE_SIZE, build_files, synth_corpus

from data_tools.build_shards import STATE_DIR, build_shards

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"shard_size": 1, "image_size": IMAGE_SIZE, "views": None}


def _start_and_kill(corpus: Path, out: Path, after_records: int) -> bool:
    """Run the CLI (2 workers) in its own process group; SIGKILL the group once `after_records` shards are
    recorded. Returns False when the build finished before it could be killed."""
    cmd = [sys.executable, "-m", "data_tools.build_shards", "--format", "mimic-cxr", "--input", str(corpus),
           "--output", str(out), "--shard-size", "1", "--image-size", str(IMAGE_SIZE), "--views", "all",
           "--workers", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            state = out / STATE_DIR
            if state.is_dir() and len([p for p in state.glob("*-shard-*.json")]) >= after_records:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_only_missing_shards_identically(tmp_path_factory, tmp_path):
    corpus = synth_corpus(str(tmp_path_factory.getbasetemp()))
    clean = tmp_path / "clean"
    build_shards("mimic-cxr", corpus, clean, workers=1, progress=False, **OPTIONS)

    for attempt in range(3):  # the machine may finish the whole build before the kill lands: try again
        out = tmp_path / f"killed-{attempt}"
        if _start_and_kill(corpus, out, after_records=3):
            break
    else:
        pytest.fail("the build always finished before it could be killed")
    records = sorted((out / STATE_DIR).glob("*-shard-*.json"))
    assert len(records) >= 3
    finished = {}
    for rec in records:
        shard = json.loads(rec.read_text())["shard"]
        if shard is not None:
            tar = out / shard["name"]
            finished[tar] = (tar.stat().st_ino, tar.stat().st_mtime_ns)

    summary = build_shards("mimic-cxr", corpus, out, workers=1, progress=False, **OPTIONS)
    assert summary["status"] == "resumed"
    assert summary["shards_reused"] == len(records) and summary["shards_reused"] < summary["shards"]
    for tar, stamp in finished.items():  # finished shards were not rewritten
        assert (tar.stat().st_ino, tar.stat().st_mtime_ns) == stamp
    assert build_files(out) == build_files(clean)
    assert not list(out.rglob("*.tmp")) and not (out / STATE_DIR).exists()
