"""README.md's "The tools, one example each" block runs as written, in order, from a fresh copy of the repository.

The commands are read from the README itself (a `\\`-continued line is one command, `#` starts a comment), so
the test follows the README and fails when a step stops chaining to the ones before it. What differs from a
user typing them, and why:

- `sbatch` lines are skipped: they need a Slurm cluster;
- `deepspeed` gets `--master_port` with a free port: the default port 29500 may be taken on a shared machine;
- `python` / `deepspeed` are this interpreter's, `OMP_NUM_THREADS=1` (one core per CPU rank, as `make demo`
  sets it) and no `MLFLOW_TRACKING_URI`, so the runs log to the copy's `./mlflow.db` as in a fresh clone;
- DeepSpeed's JIT-built CPU op goes to a folder of this test's own (`TORCH_EXTENSIONS_DIR`, unless set),
  built once and kept: in the shared default folder, runs of other processes that rebuild it hold its lock
  for minutes (seen here: a one-process pretraining waited 10 minutes for it).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mpma_ds.distributed import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## The tools, one example each"
SKIPPED = {"sbatch": "needs a Slurm cluster"}


def readme_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The argv of every command of the README's example block, in order."""
    text = readme.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    block = text.split(SECTION, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked files (what a clone holds), as they are in the working tree."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # launch/configs -> ../mpma_ds/recipes
            os.symlink(os.readlink(src), dest / rel)
        elif src.is_file():
            shutil.copy2(src, dest / rel)
    return dest


def test_readme_commands_parse_and_chain():
    commands = readme_commands()
    programs = [c[0] for c in commands]
    assert programs.count("python") >= 12 and "deepspeed" in programs and "sbatch" in programs
    # every path a later step reads was written by an earlier one (all under demo_runs/)
    written = {c[c.index(flag) + 1] for c in commands for flag in ("--out", "--output") if flag in c}
    assert {"demo_runs/corpus", "demo_runs/shards", "demo_runs/tokenizer", "demo_runs/exported"} <= written


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_readme_example_block_runs_in_order(tmp_path):
    repo = fresh_copy(tmp_path / "repo")
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "mpma-ds-readme-torch-extensions"))
    timings = []
    try:
        for argv in readme_commands():
            if argv[0] in SKIPPED:
                timings.append((f"skipped ({SKIPPED[argv[0]]}): {shlex.join(argv)}", 0.0))
                continue
            if argv[0] == "python":
                argv = [sys.executable, *argv[1:]]
            elif argv[0] == "deepspeed":
                argv = [str(bin_dir / "deepspeed"), "--master_port", str(free_port()), *argv[1:]]
            t0 = time.perf_counter()
            proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
            timings.append((shlex.join(argv[1:]), time.perf_counter() - t0))
            assert proc.returncode == 0, (
                f"README step failed (exit {proc.returncode}): {shlex.join(argv)}\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
    finally:
        print("\n".join(f"{seconds:6.1f} s  {what}" for what, seconds in timings))
    runs = repo / "demo_runs"
    assert json.loads((runs / "shards" / "manifest.json").read_text())["written"] > 0
    assert (runs / "exported" / "config.json").is_file() or any((runs / "exported").iterdir())
    assert json.loads((runs / "pretrain_tiny" / "summary.json").read_text())["step"] == 20  # resumed to 20
    for run in ("vqa", "linear_probe", "lp-random", "cls"):
        assert (runs / "finetune" / run / "summary.json").is_file(), run
    assert (repo / "compare" / "mpma-demo" / "report.html").is_file()
