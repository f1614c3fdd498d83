"""A shard build split across machines (``--num-nodes N --node-rank R``, or a SLURM job array): parts run in
any order into one shared output, the last writes the manifest, the result is byte-identical to a
one-machine build, and a killed part resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shards_testdata import IMAGE_SIZE, build_files, synth_corpus

from data_tools.build_shards import STATE_DIR, BuildError, build_shards, main

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"shard_size": 1, "image_size": IMAGE_SIZE, "views": None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synth_corpus(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("one-machine") / "out"
    build_shards("mimic-cxr", corpus, out, progress=False, **OPTIONS)
    return build_files(out)


def test_two_parts_in_either_order_equal_the_one_machine_build(corpus, clean, tmp_path, monkeypatch):
    for order in ((1, 0), (0, 1)):
        out = tmp_path / f"parts-{order[0]}{order[1]}"
        first = build_shards("mimic-cxr", corpus, out, progress=False, num_nodes=2, node_rank=order[0], **OPTIONS)
        assert first["status"] == "part_done" and not (out / "manifest.json").exists()
        assert 0 < first["shards"] < len([k for k in clean if k.endswith(".tar")])
        # the second part from a SLURM job array's variables (array 3-4: the task id is offset by the minimum)
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(3 + order[1]))
        second = build_shards("mimic-cxr", corpus, out, progress=False, **OPTIONS)
        monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
        assert second["status"] == "built"
        assert build_files(out) == clean
        assert not (out / STATE_DIR).exists()


def test_bad_part_arguments_are_one_line(corpus, tmp_path, capsys):
    with pytest.raises(BuildError, match="--node-rank 2 must be in"):
        build_shards("mimic-cxr", corpus, tmp_path / "o", num_nodes=2, node_rank=2, **OPTIONS)
    code = main(
        ["--format", "mimic-cxr", "--input", str(corpus), "--output", str(tmp_path / "o"), "--num-nodes", "2"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "build_shards: error: give both --num-nodes and --node-rank (or neither), e.g. --num-nodes 4 --node-rank 0"
    ]


def _cli(corpus: Path, out: Path, rank: int) -> list[str]:
    return [sys.executable, "-m", "data_tools.build_shards", "--format", "mimic-cxr", "--input", str(corpus),
            "--output", str(out), "--shard-size", "1", "--image-size", str(IMAGE_SIZE), "--views", "all",
            "--no-progress", "--num-nodes", "2", "--node-rank", str(rank)]  # fmt: skip


@pytest.mark.slow
def test_a_killed_part_resumes_and_the_concurrent_parts_match(corpus, clean, tmp_path):
    """Part 0 is killed (SIGKILL) after recording 2 shards while part 1 runs at the same time on the same
    folder; rerunning part 0 finishes the build, byte-identical to the one-machine build."""
    out = tmp_path / "out"
    killed = subprocess.Popen(_cli(corpus, out, 0), cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    other = subprocess.Popen(_cli(corpus, out, 1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed.poll() is None:
        state = out / STATE_DIR
        mine = [p for p in state.glob("*-shard-*.json")] if state.is_dir() else []
        if len(mine) >= 4:  # both parts are writing: about 2 of them are part 0's
            os.killpg(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    killed.wait(timeout=30)
    stdout, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr.decode()
    if killed.returncode == -signal.SIGKILL:
        assert b"part_done" in stdout and not (out / "manifest.json").exists()
    rerun = subprocess.run(_cli(corpus, out, 0), cwd=REPO, capture_output=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert build_files(out) == clean


def test_slurm_array_script_builds_the_parts(corpus, clean, tmp_path):
    """launch/slurm/build_shards.sbatch run as two array tasks (ids 4 and 5 of an array 4-5), for real."""
    out = tmp_path / "out"
    args = ["--format", "mimic-cxr", "--input", str(corpus), "--output", str(out), "--shard-size", "1",
            "--image-size", str(IMAGE_SIZE), "--views", "all"]  # fmt: skip
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
               MPMA_VENV=str(tmp_path / "no-venv"), SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="4")  # fmt: skip
    for task in ("5", "4"):
        res = subprocess.run(
            ["bash", str(REPO / "launch" / "slurm" / "build_shards.sbatch"), *args], cwd=tmp_path, capture_output=True,
            text=True, env=dict(env, SLURM_ARRAY_TASK_ID=task), timeout=300, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert f"part {int(task) - 4} of 2" in res.stdout
    assert build_files(out) == clean
    res = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "build_shards.sbatch")], capture_output=True,
                         text=True, env={"PATH": os.environ["PATH"]}, check=False)  # fmt: skip
    assert res.returncode == 2 and res.stderr.strip().startswith(
        "build_shards.sbatch: error: SLURM_ARRAY_TASK_COUNT"
    )


@pytest.fixture(scope="module")
def store():
    """A moto S3 server process with the bucket ``builds``; the standard AWS variables point at it."""
    from remote_servers import env, free_port, make_bucket, s3_env, start_moto, stop

    port = free_port()
    server = start_moto(port)
    try:
        with env(s3_env(port)):
            make_bucket("builds")
            yield
    finally:
        stop(server)


def stored_files(url: str) -> dict[str, bytes]:
    from data_tools import remote

    fs, root = remote.filesystem(url)
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def test_remote_output_uploads_a_byte_identical_build(corpus, clean, store):
    """``--output s3://...`` on a loopback S3 server: the objects equal the one-machine build's files, the
    manifest is uploaded last, a rerun does nothing, other options are refused, and verify_shards passes."""
    from data_tools import remote
    from data_tools.shard_build.upload import staging_folder
    from data_tools.verify_shards import verify_shards

    url = "s3://builds/mimic"
    uploads: list[str] = []
    real = remote.upload

    def record(local, target):  # the order objects appear in on the store
        uploads.append(target.rsplit("/", 2)[-1] if "/" in target else target)
        real(local, target)

    remote.upload = record
    try:
        summary = main(["--format", "mimic-cxr", "--input", str(corpus), "--output", url, "--shard-size", "1",
                        "--image-size", str(IMAGE_SIZE), "--views", "all", "--no-progress"])  # fmt: skip
    finally:
        remote.upload = real
    assert summary == 0
    assert (
        uploads[-2:] == ["rejects.jsonl", "manifest.json"] and uploads.index("manifest.json") == len(uploads) - 1
    )
    assert stored_files(url) == clean
    assert not staging_folder(url).exists()
    assert verify_shards(url, progress=False).ok
    again = build_shards("mimic-cxr", corpus, url, progress=False, **OPTIONS)
    assert again["status"] == "already_complete" and again["output"] == url
    with pytest.raises(BuildError, match=f"--output {url} holds a finished build of different input or options"):
        build_shards("mimic-cxr", corpus, url, progress=False, **{**OPTIONS, "image_size": IMAGE_SIZE + 8})


def test_split_build_to_a_remote_output_equals_the_one_machine_build(corpus, clean, store):
    """``--num-nodes 2 --node-rank R --output s3://...``: the second part uploads its shards and shares its
    records under ``.build/``, no manifest yet; the first, finding every record, writes rejects.jsonl and
    manifest.json remotely. The objects equal the one-machine build byte for byte, ``.build/`` is gone, and a
    part run with other options under the same prefix is refused with one line."""
    from data_tools import remote
    from data_tools.shard_build.upload import staging_folder
    from data_tools.verify_shards import verify_shards

    url = "s3://builds/split"
    argv = ["--format", "mimic-cxr", "--input", str(corpus), "--output", url, "--shard-size", "1",
            "--image-size", str(IMAGE_SIZE), "--views", "all", "--no-progress", "--num-nodes", "2"]  # fmt: skip
    assert main([*argv, "--node-rank", "1"]) == 0
    after_one = stored_files(url)
    assert "manifest.json" not in after_one and "rejects.jsonl" not in after_one
    assert any(name.startswith(f"{STATE_DIR}/") for name in after_one)
    assert main([*argv, "--node-rank", "0"]) == 0
    assert stored_files(url) == clean
    assert not any(staging_folder(url, 2, r).exists() for r in (0, 1))
    assert verify_shards(url, progress=False).ok

    mixed = "s3://builds/mixed"
    build_shards("mimic-cxr", corpus, mixed, num_nodes=2, node_rank=1, progress=False, **OPTIONS)
    with pytest.raises(BuildError, match=f"{mixed}/{STATE_DIR}/.* was built from other input or options") as err:
        build_shards("mimic-cxr", corpus, mixed, num_nodes=2, node_rank=0, progress=False,
                     **{**OPTIONS, "image_size": IMAGE_SIZE + 8})  # fmt: skip
    assert "\n" not in str(err.value)
    assert not remote.exists(f"{mixed}/manifest.json")
