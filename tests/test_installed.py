"""Installed use, from outside the checkout: a wheel of the project in a fresh virtual environment, and every
console script run from an empty folder in which the checkout is nowhere to be found.

How the environment is made (offline, and honest about where ``mpma_ds`` comes from):
- the wheel is built from a copy of the project's files (``pip wheel --no-deps --no-build-isolation``), so
  the build leaves nothing in the checkout;
- a new venv (``--without-pip``) gets the wheel installed with ``--no-deps``: ``mpma_ds`` and ``data_tools``
  come from the wheel, with its console scripts and package data;
- the dependencies (torch, deepspeed, ...) are the project venv's: a ``.pth`` file adds that venv's
  ``site-packages`` as a plain path. A plain path's own ``.pth`` files are not run, so the editable install
  of the checkout living there stays switched off;
- ``bin/deepspeed`` in the new venv is the launcher as pip would write it, so the ranks it starts run on
  the new venv's interpreter.

The test then asserts that ``mpma_ds.__file__`` lies in the new venv's ``site-packages`` and that no
``sys.path`` entry points into the checkout (but the dependencies' folder), that package data and the license
shipped, and that every console script's entry point answers ``--help`` (in one interpreter: each start
imports torch). Then the tools, each by the script pip wrote: synthetic corpus -> shards -> verify ->
tokenizer -> ``mpma-pretrain`` (one process, the recipe by its absolute path inside the wheel, MLflow to the
default ``mlflow.db`` in the working folder) -> ``deepspeed --num_gpus 2 $(which mpma-pretrain)`` (recipe and
DeepSpeed config by name) -> ``mpma-export``. Measured: 3.5 min on the 2-core machine while another job
loaded it (load average 6), the launcher run half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from mpma_ds.distributed import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What a source distribution of the project holds; the wheel is built from a copy of these alone.
PROJECT_FILES = ("setup.py", "pyproject.toml", "README.md", "LICENSE")
PROJECT_PACKAGES = ("mpma_ds", "data_tools")
CONSOLE_SCRIPTS = (
    "mpma-pretrain",
    "mpma-finetune",
    "mpma-export",
    "mpma-evaluate",
    "mpma-compare",
    "mpma-demo",
    "mpma-predict",
    "mpma-benchmark",
    "mpma-sweep",
    "mpma-synth-corpus",
    "mpma-synth-vqa",
    "mpma-build-shards",
    "mpma-verify-shards",
    "mpma-train-tokenizer",
)
DEEPSPEED_LAUNCHER = """#!{python}
import sys

from deepspeed.launcher.runner import main

if __name__ == "__main__":
    sys.exit(main())
"""
# A couple of optimizer steps of the tiny recipe on the tiny corpus: global 8 = micro 4 x 2 (accumulation
# steps on one process, ranks under the launcher).
PRETRAIN_SET = {
    "data.image_size": 64,
    "data.max_text_len": 32,
    "data.num_workers": 0,
    "data.shuffle_buffer": 16,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 4,
    "train.max_steps": 2,
    "train.warmup_steps": 1,
    "train.save_every": 2,
    "train.log_every": 1,
    "deepspeed_config": "cpu_zero3",
}


class Installed:
    """The fresh venv and an empty working folder outside the checkout."""

    def __init__(self, venv: Path, work: Path):
        self.venv, self.work = venv, work
        self.bin = venv / "bin"
        self.python = self.bin / "python"
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != Path(sys.executable).parent]
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
        self.env.update(
            PATH=os.pathsep.join([str(self.bin), *path]),
            VIRTUAL_ENV=str(venv),
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
        )

    def run(self, *cmd: str | Path, timeout: float = 300) -> str:
        """Run ``cmd`` in the working folder with the venv's bin first on PATH; its output, or a failure."""
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{output[-6000:]}"
        return output

    def script(self, name: str) -> Path:
        path = self.bin / name
        assert path.is_file(), f"the wheel installed no console script {name}"
        return path


def _build_wheel(dest: Path, tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    for package in PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    proc = subprocess.run([*pip, "-w", str(dest), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dest.glob("mpma_ds-*.whl")
    return wheel


def _make_venv(venv: Path, wheel: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    proc = subprocess.run([*install, str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # only now the dependencies: pip above saw an environment holding nothing but the wheel
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    launcher = venv / "bin" / "deepspeed"
    launcher.write_text(DEEPSPEED_LAUNCHER.format(python=python))
    launcher.chmod(0o755)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("installed")
    assert not tmp.resolve().is_relative_to(ROOT), "pytest's temp folder lies inside the checkout"
    wheel = _build_wheel(tmp / "dist", tmp)
    _make_venv(tmp / "venv", wheel)
    work = tmp / "work"
    work.mkdir()
    return Installed(tmp / "venv", work)


@pytest.fixture(scope="module")
def where(installed: Installed) -> dict:
    """What the venv's interpreter imports, seen from the empty working folder; and every console script's
    entry point loaded and asked for ``--help`` (one interpreter start for all ten: each start imports torch)."""
    probe = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from importlib import metadata, resources
        import data_tools, mpma_ds
        from mpma_ds.recipes import shipped_recipes
        from mpma_ds.training.ds_config import shipped_ds_configs
        from mpma_ds.benchmark.references import load_references
        from mpma_ds.benchmark.suite import load_suite, suite_names
        dist = metadata.distribution("mpma-ds")
        helps = {}
        for entry in dist.entry_points:
            if entry.group == "console_scripts":
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    try:
                        entry.load()(["--help"])
                        code = "returned"
                    except SystemExit as stop:
                        code = stop.code
                helps[entry.name] = [code, out.getvalue()[:80]]
        print(json.dumps({
            "mpma_ds": mpma_ds.__file__, "data_tools": data_tools.__file__, "version": mpma_ds.__version__,
            "sys_path": sys.path, "recipes": {k: str(v) for k, v in shipped_recipes().items()},
            "ds_configs": sorted(shipped_ds_configs()),
            "suites": {n: len(load_suite(n).entries) for n in suite_names()}, "references": len(load_references()),
            "py_typed": [resources.files(p).joinpath("py.typed").is_file() for p in ("mpma_ds", "data_tools")],
            "license": dist.metadata.get("License-Expression") or dist.metadata.get("License"),
            "license_files": [str(f) for f in dist.files if "licen" in str(f).lower()],
            "helps": helps,
        }))
        """
    )
    return json.loads(installed.run(installed.python, "-c", probe).splitlines()[-1])


def _site_packages(installed: Installed) -> Path:
    (site,) = (installed.venv / "lib").glob("python3*/site-packages")
    return site


def _set_args(values: dict[str, object]) -> list[str]:
    return ["--set", *(f"{k}={v}" for k, v in values.items())]


def test_the_package_comes_from_the_wheel_not_the_checkout(installed: Installed, where: dict):
    site = _site_packages(installed)
    for package in PROJECT_PACKAGES:
        assert Path(where[package]).is_relative_to(site), f"{package} imported from {where[package]}"
    inside = [p for p in where["sys_path"] if p and Path(p).resolve().is_relative_to(ROOT.resolve())]
    # the project venv's site-packages is on the path for the dependencies; nothing else of the checkout
    assert inside == [sysconfig.get_paths()["purelib"]], inside
    from mpma_ds import __version__

    assert where["version"] == __version__ != "0+unknown"
    assert where["py_typed"] == [True, True]


def test_every_console_script_installed_and_answers_help(installed: Installed, where: dict):
    assert sorted(where["helps"]) == sorted(CONSOLE_SCRIPTS)
    for name in CONSOLE_SCRIPTS:
        installed.script(name)  # the wrapper pip wrote into the venv's bin/
        code, text = where["helps"][name]
        assert code == 0 and text.startswith("usage:"), (name, code, text)


def test_package_data_found_by_name(where: dict):
    assert {"cpu_zero3", "cpu_zero2", "cpu_dp", "zero3_bf16", "zero3_offload", "zero2_bf16"} <= set(
        where["ds_configs"]
    )
    expected = {p.stem for p in (ROOT / "mpma_ds" / "recipes").glob("*.yaml")}
    assert set(where["recipes"]) == expected
    assert all(Path(p).is_file() for p in where["recipes"].values())
    # the benchmark suites and the published references ship as package data, found by name
    assert set(where["suites"]) == {p.stem for p in (ROOT / "mpma_ds" / "benchmark" / "suites").glob("*.yaml")}
    assert all(n > 0 for n in where["suites"].values()) and where["references"] > 0


def test_license_in_the_metadata(where: dict):
    assert where["license"] == "Apache-2.0"
    assert any(f.endswith("LICENSE") for f in where["license_files"]), where["license_files"]


@pytest.fixture(scope="module")
def data(installed: Installed) -> dict[str, Path]:
    """Corpus -> shards -> verified -> tokenizer, each by its console script, in the working folder."""
    installed.run(
        installed.script("mpma-synth-corpus"), "--out", "corpus", "--studies", "24", "--seed", "3",
        "--min-size", "96", "--max-size", "128", "--lateral-fraction", "0",
    )  # fmt: skip
    installed.run(
        installed.script("mpma-build-shards"), "--format", "mimic-cxr", "--input", "corpus", "--output",
        "shards", "--shard-size", "16", "--image-size", "64", "--val-fraction", "0.2", "--no-progress",
    )  # fmt: skip
    installed.run(installed.script("mpma-verify-shards"), "shards", "--no-progress")
    installed.run(
        installed.script("mpma-train-tokenizer"), "--shards", "shards", "--out", "tokenizer",
        "--vocab-size", "1024", "--min-frequency", "1",
    )  # fmt: skip
    work = installed.work
    assert (work / "shards" / "manifest.json").is_file() and (work / "tokenizer" / "tokenizer.json").is_file()
    return {
        "data.train_shards": work / "shards" / "train",
        "data.val_shards": work / "shards" / "validate",
        "data.tokenizer": work / "tokenizer",
    }


def test_pretrain_one_process_recipe_by_path_from_the_wheel(installed: Installed, where: dict, data: dict):
    recipe = where["recipes"]["pretrain_tiny"]
    assert Path(recipe).is_relative_to(_site_packages(installed))
    values = {**data, **PRETRAIN_SET, "train.output_dir": "run_one", "train.eval_every": 2}
    # tracking on, default store: MLflow's sqlite:///mlflow.db lands in the working folder
    out = installed.run(installed.script("mpma-pretrain"), "--config", recipe, *_set_args(values))
    run = installed.work / "run_one"
    assert "done: step 2" in out, out[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert (installed.work / "mlflow.db").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2


def test_pretrain_under_the_deepspeed_launcher(installed: Installed, data: dict):
    script = shutil.which("mpma-pretrain", path=installed.env["PATH"])
    assert script == str(installed.script("mpma-pretrain"))
    values = {**data, **PRETRAIN_SET, "train.output_dir": "run_two", "train.eval_every": 0}
    values["tracking.enabled"] = False
    port = free_port()
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), script]
    out = installed.run(*launcher, "--config", "pretrain_tiny", *_set_args(values), timeout=400)
    run = installed.work / "run_two"
    assert "done: step 2" in out, out[-3000:]
    complete = json.loads((run / "checkpoints" / "step_00000002" / "complete.json").read_text())
    assert complete["world_size"] == 2 and complete["zero_stage"] == 3
    # DeepSpeed's CPU all-reduce buffers (~69 MB of RAM per rank in /dev/shm) do not outlive the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


def test_export_from_the_console_script(installed: Installed):
    run = installed.work / "run_one"
    if not (run / "checkpoints" / "latest").is_file():
        pytest.skip("needs the one-process run")
    out = installed.run(installed.script("mpma-export"), "--checkpoint", run, "--out", "exported")
    exported = installed.work / "exported"
    assert "-> exported" in out, out[-2000:]
    for name in ("config.json", "model.safetensors", "text_encoder/tokenizer.json", "recipe.yaml"):
        assert (exported / name).is_file(), name
    info = json.loads((exported / "export_info.json").read_text())
    assert info["step"] == 2 and info["mlflow_run_id"], info  # the one-process run logged to mlflow.db
