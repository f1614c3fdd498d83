"""The zero-shot AUROC's supervised bound (`mpma_ds.runner.supervised_bound`): the ``cls`` task on the synthetic
truth (``task.cls.labels: truth``) run by the Trainer at the pretraining recipe's budget, scored on the validation
split, and cached by corpus contents, encoder config and budget so that a rerun does not pay for it."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from train_testdata import TINY_RECIPE, prepared_base, tiny_overrides, tiny_shards, tiny_tokenizer

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.eval.zeroshot import reference_targets, truth_targets
from mpma_ds.runner import supervised_bound as sb
from mpma_ds.tasks.classification import ClsOptions, Labels
from mpma_ds.training.recipe import Recipe, load_recipe


def _metas():
    return [
        {"truth": {"Cardiomegaly": {"present": True}, "Edema": {"present": False}}},
        {"truth": {"Cardiomegaly": {"present": False}, "Edema": {"present": True}}},
    ]


def test_truth_targets_are_the_zero_shot_reference_and_name_a_sample_without_truth():
    metas = _metas()
    y = truth_targets(metas)
    ref, kind = reference_targets(np.zeros((2, 14)), [m["truth"] for m in metas])
    assert (
        kind == "truth"
        and np.array_equal(np.isnan(y), np.isnan(ref))
        and np.allclose(y[~np.isnan(y)], ref[~np.isnan(ref)])
    )
    c, e = CHEXPERT_LABELS.index("Cardiomegaly"), CHEXPERT_LABELS.index("Edema")
    assert y[0, c] == 1 and y[0, e] == 0 and y[1, c] == 0 and y[1, e] == 1 and math.isnan(y[0, 0])
    with pytest.raises(ValueError, match="1 of 3 samples have no 'truth'"):
        truth_targets([*metas, {"labels": {}}])
    # in a batch a row without truth is one the loader skipped: NaN, out of loss and AUROC
    labels = Labels(ClsOptions(labels="truth"))
    targets = labels.targets({"meta": [*metas, {}], "labels": torch.zeros(3, 14)})
    assert targets.shape == (3, 14) and torch.isnan(targets[2]).all() and targets[0, c] == 1
    with pytest.raises(ValueError, match="task.cls.labels must be one of chexpert, truth, column"):
        ClsOptions(labels="truths").validate()


def _manifest(folder, shas):
    folder.mkdir(parents=True, exist_ok=True)
    shards = [{"name": f"train/shard-{i:06d}.tar", "sha256": s, "samples": 3} for i, s in enumerate(shas)]
    (folder / "manifest.json").write_text(json.dumps({"source": {"input": str(folder)}, "shards": shards}))
    return folder


def test_the_cache_key_follows_contents_encoder_and_budget_not_paths(tmp_path, monkeypatch):
    recipe = load_recipe(TINY_RECIPE, ["train.max_steps=7"], cls=Recipe, check_files=False)
    a = _manifest(tmp_path / "a", ["aa", "bb"])
    moved = _manifest(tmp_path / "elsewhere" / "b", ["aa", "bb"])  # the same build in another folder
    other = _manifest(tmp_path / "c", ["aa", "cc"])
    assert sb.corpus_digest(a) == sb.corpus_digest(moved) != sb.corpus_digest(other)
    key = sb.bound_key(sb.bound_inputs(a, recipe, 20))
    assert key == sb.bound_key(sb.bound_inputs(moved, recipe, 20))
    longer = load_recipe(TINY_RECIPE, ["train.max_steps=8"], cls=Recipe, check_files=False)
    conv = load_recipe(TINY_RECIPE, ["train.max_steps=7", "model.overrides.patch_stem=conv"], cls=Recipe,
                       check_files=False)  # fmt: skip
    others = {sb.bound_key(sb.bound_inputs(a, r, m)) for r, m in ((longer, 20), (conv, 20), (recipe, 10))}
    assert key not in others and len(others) == 3
    # settings of the pretraining loss alone (masking, aligned pass, weights) build no layer: the same bound
    loss_only = ["model.overrides.image_mask_ratio=0.6", "model.overrides.align_on=full",
                 "model.overrides.w_mlm=2", "data.mlm_finding_probability=0.5"]  # fmt: skip
    same = load_recipe(TINY_RECIPE, ["train.max_steps=7", *loss_only], cls=Recipe, check_files=False)
    assert sb.bound_key(sb.bound_inputs(a, same, 20)) == key
    itm = load_recipe(TINY_RECIPE, ["train.max_steps=7", "model.overrides.w_itm=1"], cls=Recipe, check_files=False)
    assert sb.bound_key(sb.bound_inputs(a, itm, 20)) != key  # an ITM head: another initialisation
    assert (
        sb.Budget.of(recipe).steps == 7
        and sb.Budget.of(recipe).global_batch_size == recipe.train.global_batch_size
    )

    # measured once, then read back: a second call (a rerun, another --out) does not train
    calls = []

    def fake_measure(overrides):
        calls.append(overrides)
        return {"auroc": 0.8, "ci95": [0.7, 0.9], "labels": 14, "train_seconds": 1.0, "steps": 7}

    monkeypatch.setattr(sb, "measure_bound", fake_measure)
    # `make demo` only reads the cache: nothing there, so the bound stays unknown and nothing trains
    unknown = sb.supervised_bound(
        a, "tok", recipe, out_dir=tmp_path / "run", min_count=20, cache_dir=tmp_path / "k", measure=False
    )
    assert unknown["auroc"] is None and unknown["measured"] is False and not calls
    first = sb.supervised_bound(a, "tok", recipe, out_dir=tmp_path / "run", min_count=20, cache_dir=tmp_path / "k")
    again = sb.supervised_bound(
        moved, "tok", recipe, out_dir=tmp_path / "r2", min_count=20, cache_dir=tmp_path / "k"
    )
    assert len(calls) == 1 and not first["cached"] and again["cached"] and again["auroc"] == 0.8
    read = sb.supervised_bound(a, "tok", recipe, out_dir=tmp_path / "r", min_count=20, cache_dir=tmp_path / "k",
                               measure=False)  # fmt: skip
    assert read["cached"] and read["measured"] and read["auroc"] == 0.8 and len(calls) == 1
    assert (
        "task.cls.labels=truth" in calls[0] and "train.max_steps=7" in calls[0] and "init.from=random" in calls[0]
    )
    assert f"data.test_shards={a / 'validate'}" in calls[0]  # scored on the zero-shot's split
    sb.supervised_bound(a, "tok", longer, out_dir=tmp_path / "r3", min_count=20, cache_dir=tmp_path / "k")
    assert len(calls) == 2  # another budget: measured
    (tmp_path / "k" / f"{key}.json").write_text("{ damaged")
    sb.supervised_bound(a, "tok", recipe, out_dir=tmp_path / "r4", min_count=20, cache_dir=tmp_path / "k")
    assert len(calls) == 3  # a damaged entry is measured again
    monkeypatch.setenv(sb.CACHE_ENV, str(tmp_path / "env"))
    assert sb.default_cache_dir() == tmp_path / "env" / "supervised_bound"


@pytest.mark.slow
def test_the_bound_is_trained_by_the_trainer_on_the_truth_and_cached(tmp_path_factory, tmp_path):
    base = prepared_base(tmp_path_factory)
    shards = tiny_shards(base)
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(base, tmp_path / "pre", **{"train.max_steps": 3}), cls=Recipe)
    kwargs = dict(out_dir=tmp_path / "bound", min_count=1, cache_dir=tmp_path / "cache",
                  tracking=["tracking.enabled=false"])  # fmt: skip
    found = sb.supervised_bound(shards, tiny_tokenizer(base), recipe, **kwargs)
    assert not found["cached"] and found["steps"] == 3
    low, high = found["ci95"]
    assert 0.0 <= low <= found["auroc"] <= high <= 1.0 and found["labels"] >= 1
    summary = json.loads((tmp_path / "bound" / "summary.json").read_text())
    assert summary["task"] == "cls" and summary["step"] == 3 and summary["world_size"] == 1
    shutil.rmtree(tmp_path / "bound")
    again = sb.supervised_bound(shards, tiny_tokenizer(base), recipe, **kwargs)
    assert again["cached"] and again["auroc"] == found["auroc"] and not (tmp_path / "bound").exists()
