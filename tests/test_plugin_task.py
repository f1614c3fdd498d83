"""A task from another package: ``examples/plugin_task`` installed with pip, found through the ``mpma_ds.tasks``
entry point, fine-tuned by ``mpma-finetune`` from an empty folder outside the checkout, logged to MLflow and
paired with its random twin in ``mpma-compare``'s report — with no file of ``mpma_ds`` changed (issue 21)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_testdata import ft_shards, prepare, pretrained
from train_testdata import IMAGE_SIZE, ROOT, tiny_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-e2e (minutes each; not in make test)

PLUGIN = ROOT / "examples" / "plugin_task"
BIN = Path(sys.executable).parent
EXPERIMENT = "plugin-test"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The plugin pip-installed into a folder of its own (the environment stays as it was); the env that sees it."""
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target,
         str(PLUGIN)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(target))
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_list_tasks_shows_the_plugin_and_an_unknown_task_names_it(installed, tmp_path):
    listed = _run([str(BIN / "mpma-finetune"), "--list-tasks"], tmp_path, installed)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("view_position"))
    assert "mpma-view-task" in line and "task.view_position" in line
    unknown = _run([str(BIN / "mpma-finetune"), "--config", "finetune_cls_tiny", "--task", "no_such"], tmp_path,
                   installed)  # fmt: skip
    assert unknown.returncode == 2
    assert "choose one of vqa, cls" in unknown.stderr and "view_position (plugin mpma-view-task)" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_plugin_task_finetunes_logs_and_is_paired_in_the_report(installed, tmp_path_factory):
    base = str(tmp_path_factory.getbasetemp())
    prepare(base)
    shards, pre = ft_shards(base), pretrained(base)
    work = tmp_path_factory.mktemp("empty-folder")  # outside the checkout, nothing in it
    uri = f"sqlite:///{work / 'mlflow.db'}"
    recipe = next((Path(p) for p in installed["PYTHONPATH"].split(os.pathsep)), None)
    recipe = recipe / "mpma_view_task" / "view_position_tiny.yaml"
    common = [
        f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'validate'}",
        f"data.test_shards={shards / 'test'}", f"data.image_size={IMAGE_SIZE}", "data.max_text_len=32",
        "data.num_workers=0", "data.shuffle_buffer=16", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.epochs=0", "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2",
        "train.eval_every_epochs=0", "train.log_every=1", "task.bootstrap=50", f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
    ]  # fmt: skip
    runs = {
        "pretrained": [f"init.from={pre.exported}", f"train.output_dir={work / 'view-pretrained'}"],
        "random": ["init.from=random", f"data.tokenizer={tiny_tokenizer(base)}",
                   f"train.output_dir={work / 'view-random'}"],
    }  # fmt: skip
    for name, extra in runs.items():
        done = _run(
            [str(BIN / "mpma-finetune"), "--config", str(recipe), "--set", *common, *extra], work, installed
        )
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        assert "done: view_position" in done.stdout

    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    logged = client.search_runs([exp.experiment_id])
    assert len(logged) == 2
    for run in logged:
        assert run.data.tags["mpma.task"] == "view_position"
        assert run.data.tags["mpma.headline_metrics"] == "test/accuracy,test/auroc_macro"
        assert run.data.tags["mpma.pairing"] == "view_accuracy"
        assert 0.0 <= run.data.metrics["test/accuracy"] <= 1.0

    report = work / "report"
    compared = _run(
        [str(BIN / "mpma-compare"), "--tracking-uri", uri, "--experiment", EXPERIMENT, "--out", str(report)],
        work, installed,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-3000:]
    text = (report / "report.md").read_text() if (report / "report.md").is_file() else compared.stdout
    rows = [ln for ln in text.splitlines() if "view_position" in ln and "test/accuracy" in ln]
    assert rows, text[-3000:]
    assert "paired bootstrap" in "\n".join(rows)
    # no file of mpma_ds was needed: the plugin's module lives outside the checkout
    assert not (ROOT / "mpma_ds" / "tasks" / "view_position.py").exists()
