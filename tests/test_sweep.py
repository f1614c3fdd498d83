"""``mpma-sweep``: arms as recipe overrides, the shipped ablation parses, a 2-arm x 1-seed sweep at a few steps
writes the table with paired intervals and groups its runs in MLflow (sweep -> pretraining -> evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from finetune_testdata import ft_vqa_shards, split_counts
from mlflow.tracking import MlflowClient
from train_testdata import TINY_RECIPE, prepared_base, tiny_shards, tiny_tokenizer

from mpma_ds.cli import sweep as sweep_cli
from mpma_ds.config import ConfigError
from mpma_ds.eval.bootstrap import mean_paired_difference, paired_difference
from mpma_ds.eval.vqa import vqa_accuracy, vqa_correctness
from mpma_ds.sweep import arm_recipe, flatten_overrides, load_sweep


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return prepared_base(tmp_path_factory)


def test_flatten_overrides_nested_and_dotted_keys():
    tree = {
        "train": {"max_steps": 5, "lr": 1e-3},
        "model.overrides": {"w_mlm": 0.0, "align_on": "masked"},
        "x": {},
    }
    assert flatten_overrides(tree) == [
        "train.max_steps=5", "train.lr=0.001", "model.overrides.w_mlm=0.0", 'model.overrides.align_on="masked"',
    ]  # fmt: skip


def test_shipped_ablation_arms_build_and_differ_only_where_they_say():
    cfg = load_sweep("ablation_tiny")
    assert set(cfg.arms) == {
        "full",
        "no_levers",
        "clip",
        "global_local",
        "m3ae",
        "no_memory",
        "conv_stem",
        "gloria",
    }
    assert cfg.reference == "full" and len(cfg.seeds) == 2
    recipes = {arm: arm_recipe(cfg, arm, 0) for arm in cfg.arms}
    models = {arm: recipe.model.config for arm, recipe in recipes.items()}
    full = models["full"]  # the base recipe's own overrides survive
    assert (full.align_on, full.image_mask_ratio, full.w_mlm, full.memory_slots) == ("masked", 0.25, 4.0, 32)
    assert recipes["full"].data.mlm_finding_probability == 0.9
    for arm in ("no_levers", "m3ae"):  # the recipe before the levers; M3AE's own masking
        assert (models[arm].image_mask_ratio, models[arm].w_mlm) == (0.75, 1.0), arm
        assert (recipes[arm].data.mlm_finding_probability, recipes[arm].data.mlm_finding_classes) == (None, []), (
            arm
        )
    assert models["no_levers"].align_on == "full" and models["no_levers"].memory_slots == 32
    assert (models["clip"].w_mlm, models["clip"].w_mim, models["clip"].w_local, models["clip"].w_global) == (
        0,
        0,
        0,
        1,
    )
    assert models["m3ae"].memory_slots == 0 and models["m3ae"].w_itm == 1.0 and models["m3ae"].w_global == 0
    assert models["no_memory"].memory_slots == 0 and models["no_memory"].w_mlm == 4.0
    assert models["conv_stem"].patch_stem == "conv"
    assert models["gloria"].local_loss == "gloria" and full.local_loss == "late_interaction"
    assert cfg.evaluation.linear_probe_fraction == 0.01
    assert cfg.evaluation.vqa_shards == "demo_runs/vqa_shards"  # every column: the frozen VQA of make demo's set
    recipes = {arm: arm_recipe(cfg, arm, 1) for arm in cfg.arms}
    assert {r.train.max_steps for r in recipes.values()} == {900}  # equal budget
    assert {r.train.global_batch_size for r in recipes.values()} == {32}
    assert {r.train.seed for r in recipes.values()} == {1}
    assert recipes["clip"].tracking.tags["mpma.arm"] == "clip"


def test_an_arm_is_evaluated_with_the_reference_data_and_not_retrained_for_a_new_protocol(tmp_path):
    """Every arm's evaluation reads the reference arm's data settings (M3AE's 15 %-of-every-word masking would
    otherwise score its masked finding words on other masks than the full model's), which enter the
    fingerprint only where they differ from the arm's own, so a finished sweep's other arms stay current; and a
    finished pretraining by the same recipe is not rerun when only the evaluation changes."""
    import os

    from mpma_ds.sweep.runner import _fingerprint, _trained
    from mpma_ds.training.recipe import save_recipe

    cfg = load_sweep("ablation_tiny", [f"output_dir={tmp_path / 'out'}"])
    full, m3ae = arm_recipe(cfg, "full", 0), arm_recipe(cfg, "m3ae", 0)
    ref_data = arm_recipe(cfg, cfg.reference, 0).data
    assert m3ae.data.mlm_finding_probability is None and ref_data.mlm_finding_probability == 0.9
    assert _fingerprint(full, cfg, ref_data) == _fingerprint(full, cfg, full.data)  # its own: named nowhere
    assert _fingerprint(m3ae, cfg, ref_data) != _fingerprint(m3ae, cfg, m3ae.data)

    run = tmp_path / "out" / "m3ae" / "seed0"
    assert not _trained(m3ae, run)  # nothing there
    save_recipe(m3ae, run / "pretrain" / "recipe.yaml")
    (run / "pretrain" / "summary.json").write_text("{}")
    model = run / "exported" / "model.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    assert _trained(m3ae, run)
    assert not _trained(arm_recipe(cfg, "m3ae", 1), run)  # another seed: another recipe
    assert not _trained(full, run)
    stamp = model.stat().st_mtime
    later = (stamp + 10, stamp + 10)
    os.utime(run / "pretrain" / "summary.json", later)  # a pretraining that finished after the export
    assert not _trained(m3ae, run)
    os.utime(run / "pretrain" / "summary.json", (stamp, stamp))
    saved = run / "pretrain" / "recipe.yaml"
    good = saved.read_text()
    saved.write_text("model: [not, a, section]\n")  # a saved recipe this version cannot read: train again
    assert not _trained(m3ae, run)
    saved.write_text(good)
    assert _trained(m3ae, run)
    (run / "pretrain" / "summary.json").unlink()  # a fresh start removes it: killed before its end
    assert not _trained(m3ae, run)


def test_bad_sweep_is_one_line_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"base": "pretrain_tiny", "arms": {"a": {}}, "reference": "b"}))
    with pytest.raises(ConfigError, match="reference 'b' is not an arm"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({"base": "pretrain_tiny", "arms": {"full": {"model.overrides": {"nope": 1}}}}))
    assert sweep_cli.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_mean_paired_difference_of_one_pair_is_paired_difference():
    rng = np.random.default_rng(0)
    a, b = rng.random(200) < 0.6, rng.random(200) < 0.4

    def acc(hits):
        return {"acc": float(np.mean(hits))}

    one = paired_difference(acc, [a], [b], keys=["acc"], n_resamples=300)["acc"]
    mean = mean_paired_difference(acc, [([a], [b])], keys=["acc"], n_resamples=300)["acc"]
    assert mean["difference"] == pytest.approx(one["difference"])
    assert mean["difference_ci95"] == pytest.approx(one["difference_ci95"])
    two = mean_paired_difference(acc, [([a], [b]), ([b], [b])], keys=["acc"], n_resamples=300)["acc"]
    assert two["difference"] == pytest.approx(one["difference"] / 2)
    assert two["per_pair"] == pytest.approx([one["difference"], 0.0])


def two_arm_sweep(base: str, tmp_path: Path, evaluation: dict) -> dict:
    """A sweep file's tree: ``full`` and ``clip`` at 3 steps, seed 0, on the tiny shards; ``evaluation`` is
    merged over a quick protocol."""
    shards = tiny_shards(base)
    return {
        "name": "t2",
        "base": str(TINY_RECIPE),
        "shared": {
            "data": {
                "train_shards": str(shards / "train"),
                "val_shards": str(shards / "validate"),
                "tokenizer": str(tiny_tokenizer(base)),
                "image_size": 64,
                "max_text_len": 32,
                "num_workers": 0,
                "shuffle_buffer": 16,
            },  # fmt: skip
            "train": {
                "global_batch_size": 8,
                "micro_batch_size": 4,
                "max_steps": 3,
                "warmup_steps": 1,
                "save_every": 0,
                "eval_every": 0,
                "log_every": 1,
            },  # fmt: skip
            "tracking": {"system_metrics": False},
        },
        "reference": "full",
        "seeds": [0],
        "output_dir": str(tmp_path / "out"),
        "experiment": "sweep-test",
        "arms": {"full": {}, "clip": {"model.overrides": {"w_mlm": 0.0, "w_mim": 0.0, "w_local": 0.0}}},
        "evaluation": {
            "batch_size": 8,
            "min_label_count": 1,
            "bootstrap": 50,
            "maps": ["similarity"],
            "finetune_set": ["train.max_steps=20", "train.eval_every=10"],
            **evaluation,
        },  # fmt: skip
    }


def test_missing_vqa_shards_are_one_line_before_any_arm_pretrains(base, tmp_path, capsys):
    tree = two_arm_sweep(base, tmp_path, {"vqa_shards": str(tmp_path / "no_vqa_shards")})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tree))
    assert (
        sweep_cli.main(["--config", str(tmp_path / "s.yaml"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluation.vqa_shards=" in err[0] and "no train / validate / test shards" in err[0]
    assert not list((tmp_path / "out").glob("**/checkpoints"))  # no arm pretrained


def table_cells(table: str) -> dict[str, dict[str, str]]:
    """``table.md``'s markdown table as {arm: {column title: cell}}."""
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")
    ]
    header = rows[0]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in rows[1:]}


@pytest.mark.slow
@pytest.mark.e2e
def test_two_arm_sweep_writes_the_table_and_groups_runs_in_mlflow(base, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = two_arm_sweep(base, tmp_path, {"linear_probe_fraction": 0.5, "linear_probe_min_label_count": 1})
    sweep["arms"]["clip"]["data"] = {"mlm_probability": 0.5}  # trained with other masking, evaluated with full's
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(sweep))
    assert sweep_cli.main(["--config", str(cfg_file), "--tracking-uri", db]) == 0
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| arm | training GFLOPs / sample | zero-shot AUROC")
    assert "pointing game (similarity)" in rows[0]
    assert rows[1].startswith("| full |") and "(reference)" in rows[1]
    assert "linear probe AUROC (50 % labels)" in rows[0]
    assert rows[2].startswith("| clip |") and rows[2].count("[") == 8  # a paired interval in every column
    results = json.loads((out / "sweep_results.json").read_text())
    flops = results["training_flops_per_sample"]  # what each arm's pretraining counted, in its summary.json
    for arm in ("full", "clip"):
        summary = json.loads((out / arm / "seed0" / "pretrain" / "summary.json").read_text())
        assert flops[arm] == summary["flops_per_sample"] > 0
    assert table_cells(table)["clip"]["training GFLOPs / sample"] == (
        f"{flops['clip'] / 1e9:.3f} (x{flops['clip'] / flops['full']:.2f})"
    )
    diff = results["differences"]["clip"]["i2t_R@10"]
    assert diff["difference"] == pytest.approx(diff["a"] - diff["b"])
    assert diff["difference_ci95"][0] <= diff["difference"] <= diff["difference_ci95"][1]
    assert results["results"]["full"][0]["eval_samples"] > 0
    same = ("mlm_tokens", "mlm_tokens_findings")  # the same masks for both arms: the reference's masking
    assert [results["results"]["clip"][0][k] for k in same] == [results["results"]["full"][0][k] for k in same]

    client = MlflowClient(tracking_uri=db)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("mpma.kind"), []).append(r)
    (parent,) = by_kind["sweep"]
    assert parent.data.tags["mpma.sweep"] == "t2" and parent.info.status == "FINISHED"
    assert "clip/i2t_R_at_10/difference" in parent.data.metrics  # MLflow names: @ -> _at_
    pretrain = {r.data.tags["mpma.arm"]: r for r in by_kind["pretrain"]}
    assert set(pretrain) == {"full", "clip"}
    assert {r.data.tags["mlflow.parentRunId"] for r in pretrain.values()} == {parent.info.run_id}
    evals = {r.data.tags["mpma.arm"]: r for r in by_kind["eval"]}
    assert {a: r.data.tags["mlflow.parentRunId"] for a, r in evals.items()} == {
        a: r.info.run_id for a, r in pretrain.items()
    }
    assert "eval/grounding/similarity/pointing_game" in evals["full"].data.metrics
    probes = {r.data.tags["mpma.arm"]: r for r in by_kind["finetune"]}  # the linear probes, under each pretraining
    assert {a: r.data.tags["mlflow.parentRunId"] for a, r in probes.items()} == {
        a: r.info.run_id for a, r in pretrain.items()
    }
    assert results["differences"]["clip"]["linear_probe_auroc"]["difference_ci95"] is not None

    # a rerun finds every evaluation current and trains nothing
    capsys.readouterr()
    assert sweep_cli.main(["--config", str(cfg_file), "--tracking-uri", db]) == 0
    assert capsys.readouterr().out.count("evaluation is current") == 2
    assert Path(out / "table.md").read_text() == table

    # a new protocol evaluates every arm again on the models it has: no pretraining is rerun
    def exported() -> dict[str, int]:
        return {a: (out / a / "seed0" / "exported" / "model.safetensors").stat().st_mtime_ns for a in pretrain}

    models = exported()
    new_protocol = ["--set", "evaluation.bootstrap=60"]
    assert sweep_cli.main(["--config", str(cfg_file), "--tracking-uri", db, *new_protocol]) == 0
    said = capsys.readouterr().out
    assert said.count("pretraining is current") == 2 and "pretraining 3 steps" not in said
    assert said.count(": evaluating") == 2
    assert exported() == models

    # a finished sweep given another seed: its folder is no run folder, so the new arms x seed export
    assert sweep_cli.main(["--config", str(cfg_file), "--tracking-uri", db, *new_protocol, "seeds=[0,1]"]) == 0
    assert all((out / arm / "seed1" / "exported" / "model.safetensors").is_file() for arm in pretrain)
    assert (out / "sweep_log" / "metrics.jsonl").is_file() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_two_arm_sweep_with_frozen_vqa_on_real_vqa_shards(base, tmp_path):
    """``evaluation.vqa_shards`` on a real VQA-RAD shard build: each arm's exported model fine-tuned frozen, the
    CLOSED / OPEN accuracies in the table for both arms with a paired interval, equal to the accuracies of the
    rows the sweep kept, and every VQA run nested under its arm's pretraining run. The second arm is M3AE-style
    (no memory, an ITM head): an exported model of other parameter shapes than the VQA recipe's ``mpma_tiny``."""
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    vqa = ft_vqa_shards(base)
    sweep = two_arm_sweep(base, tmp_path, {"linear_probe_fraction": 0.0, "vqa_shards": str(vqa)})
    sweep["arms"] = {"full": {}, "m3ae": load_sweep("ablation_tiny").arms["m3ae"]}
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(sweep))
    assert sweep_cli.main(["--config", str(cfg_file), "--tracking-uri", db]) == 0
    out = tmp_path / "out"
    cells = table_cells((out / "table.md").read_text())
    assert set(cells) == {"full", "m3ae"}
    assert not any(c.startswith("linear probe") for c in cells["full"])  # linear_probe_fraction 0 skips it
    results = json.loads((out / "sweep_results.json").read_text())
    for kind in ("closed", "open"):
        title, key = f"frozen VQA {kind.upper()}", f"vqa_accuracy_{kind}"
        full_value = results["results"]["full"][0][key]
        other_value = results["results"]["m3ae"][0][key]
        assert 0.0 <= full_value <= 1.0 and 0.0 <= other_value <= 1.0
        assert cells["full"][title] == f"{full_value:.3f} (reference)"
        d = results["differences"]["m3ae"][key]
        assert d["a"] == pytest.approx(other_value) and d["b"] == pytest.approx(full_value)
        assert d["difference"] == pytest.approx(other_value - full_value)
        lo, hi = d["difference_ci95"]
        assert lo <= d["difference"] <= hi
        assert cells["m3ae"][title] == f"{other_value:.3f} ({d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}])"

    # each arm's accuracies are those of the per-question rows it kept on the build's test questions, and the
    # interval is the paired bootstrap over those rows (same questions, same order, the sweep's resamples)
    kept = {
        arm: torch.load(out / arm / "seed0" / "eval" / "rows.pt", weights_only=False) for arm in ("full", "m3ae")
    }
    vqa_rows = {arm: saved["rows"]["vqa"] for arm, saved in kept.items()}
    assert (
        vqa_rows["full"]["keys"] == vqa_rows["m3ae"]["keys"]
        and vqa_rows["full"]["gold"] == vqa_rows["m3ae"]["gold"]
    )
    assert len(vqa_rows["full"]["keys"]) == split_counts(vqa)["test"]
    types = [t.strip().upper() for t in vqa_rows["full"]["types"]]
    assert {"CLOSED", "OPEN"} <= set(types)
    for arm, rows in vqa_rows.items():
        again = vqa_accuracy(rows["predicted"], rows["gold"], types, answer_vocab=rows["answer_vocab"])
        for kind in ("closed", "open"):
            assert kept[arm]["metrics"][f"vqa_accuracy_{kind}"] == pytest.approx(again[f"accuracy_{kind}"])
    keys = ["accuracy_overall", "accuracy_closed", "accuracy_open"]
    paired = mean_paired_difference(
        vqa_accuracy,
        [tuple((vqa_rows[arm]["predicted"], vqa_rows[arm]["gold"], types) for arm in ("m3ae", "full"))],
        keys=keys, n_resamples=50, answer_vocab=vqa_rows["full"]["answer_vocab"],
    )  # fmt: skip
    for k in keys[1:]:
        d = results["differences"]["m3ae"][f"vqa_{k}"]
        assert d["difference_ci95"] == pytest.approx(paired[k]["difference_ci95"])
        lo, hi = d["difference_ci95"]
        kind = k.split("_")[1].upper()
        right = {
            arm: vqa_correctness(r["predicted"], r["gold"], types, answer_vocab=r["answer_vocab"])
            for arm, r in vqa_rows.items()
        }
        of_kind = right["full"][1] if kind == "CLOSED" else ~right["full"][1]
        same = bool((right["full"][0] == right["m3ae"][0])[of_kind].all())
        assert (lo == hi == 0.0) if same else lo < hi  # a width where the arms score any question apart

    client = MlflowClient(tracking_uri=db)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    pretrain = {r.data.tags["mpma.arm"]: r.info.run_id for r in runs if r.data.tags.get("mpma.kind") == "pretrain"}
    vqa_runs = {r.data.tags["mpma.arm"]: r for r in runs if r.data.tags.get("mpma.kind") == "finetune"}
    assert {a: r.data.tags["mlflow.parentRunId"] for a, r in vqa_runs.items()} == pretrain
    assert all("test/accuracy_closed" in r.data.metrics for r in vqa_runs.values())


def test_paired_table_of_synthetic_arms_and_its_markdown():
    from mpma_ds.sweep import SweepConfig, sweep_table
    from mpma_ds.sweep.arm_eval import RowOutputs, paired_table

    rng = np.random.default_rng(1)
    n = 60
    img = rng.normal(size=(n, 8)).astype(np.float32)
    texts = [f"report {i}" for i in range(n)]

    def outputs(noise: float, hit_rate: float, mlm_right: int) -> RowOutputs:
        import torch

        text = torch.as_tensor(img + noise * rng.normal(size=img.shape).astype(np.float32))
        rows = {"image": torch.as_tensor(img), "text": text, "texts": texts,
                "mlm_findings": np.tile([mlm_right, 4], (n, 1)), "pairs": [("k", "f")] * 40,
                "hits": {"similarity": (rng.random(40) < hit_rate).astype(float)}}  # fmt: skip
        pg = float(rows["hits"]["similarity"].mean())
        return RowOutputs({"eval_samples": n, "i2t_R@10": 0.0, "grounding_maps": {"similarity": {
            "pointing_game": pg, "pairs": 40}}}, rows)  # fmt: skip

    good, bad = outputs(0.1, 0.9, 3), outputs(3.0, 0.1, 1)
    diff = paired_table([bad], [good], n_resamples=200)
    assert diff["i2t_R@10"]["difference"] < 0 and diff["i2t_R@10"]["difference_ci95"][1] < 0
    assert diff["mlm_acc_findings"]["difference"] == pytest.approx(1 / 4 - 3 / 4)
    assert diff["pointing_game[similarity]"]["difference_ci95"][1] < 0
    with pytest.raises(ValueError, match="same rows"):
        paired_table([RowOutputs({}, {**bad.rows, "texts": texts[::-1]})], [good])
    cfg = SweepConfig(arms={"full": {}, "weak": {}}, evaluation={"maps": ["similarity"], "bootstrap": 200})
    table = sweep_table(cfg, {"full": [good], "weak": [bad]}, {"weak": diff}, {"full": 2.0e9, "weak": 2.5e9})
    cells = table_cells(table)
    assert cells["full"]["training GFLOPs / sample"] == "2.000"
    assert cells["weak"]["training GFLOPs / sample"] == "2.500 (x1.25)"  # the compute beside the reference's
    d = diff["mlm_acc_findings"]
    assert cells["weak"]["masked finding words"].endswith(
        f"(-0.500 [{d['difference_ci95'][0]:+.3f}, {d['difference_ci95'][1]:+.3f}])"
    )
    no_flops = table_cells(sweep_table(cfg, {"full": [good], "weak": [bad]}, {"weak": diff}))
    assert no_flops["weak"]["training GFLOPs / sample"] == "n/a"  # runs that counted none


def test_paired_table_pairs_the_linear_probe_and_frozen_vqa_rows():
    """The downstream rows (`sweep.downstream`) are paired like the pretraining evaluation's: the difference
    of the macro AUROC / VQA accuracies and a paired interval; rows of other test samples are refused."""
    from mpma_ds.sweep.arm_eval import RowOutputs, paired_table

    rng = np.random.default_rng(2)
    n, q = 80, 60
    targets = (rng.random((n, 2)) < 0.5).astype(np.float64)
    gold = [str(x) for x in rng.integers(0, 3, q)]
    types = ["CLOSED" if i % 2 else "OPEN" for i in range(q)]
    vocab = ["0", "1", "2"]
    texts = [f"r{i}" for i in range(10)]

    def outputs(noise: float, right: float) -> RowOutputs:
        import torch

        scores = targets + noise * rng.normal(size=targets.shape)
        predicted = [g if rng.random() < right else vocab[(int(g) + 1) % 3] for g in gold]
        rows = {"image": torch.zeros(10, 4), "text": torch.zeros(10, 4), "texts": texts,
                "mlm_findings": np.tile([1, 4], (10, 1)),
                "linear_probe": {"scores": scores, "targets": targets, "names": ["a", "b"],
                                 "keys": [f"k{i}" for i in range(n)], "min_each": 5},
                "vqa": {"predicted": predicted, "gold": gold, "types": types, "answer_vocab": vocab,
                        "keys": list(range(q))}}  # fmt: skip
        return RowOutputs({"eval_samples": 10}, rows)

    good, bad = outputs(0.2, 0.9), outputs(3.0, 0.3)
    diff = paired_table([bad], [good], n_resamples=200)
    lp = diff["linear_probe_auroc"]
    assert lp["difference"] < -0.2 and lp["difference_ci95"][1] < 0
    for kind in ("overall", "closed", "open"):
        d = diff[f"vqa_accuracy_{kind}"]
        assert d["difference"] < -0.3 and d["difference_ci95"][0] <= d["difference"] <= d["difference_ci95"][1]
    assert diff["vqa_accuracy_closed"]["b"] == pytest.approx(
        np.mean([p == g for p, g, t in zip(good.rows["vqa"]["predicted"], gold, types) if t == "CLOSED"])
    )
    other = RowOutputs(bad.metrics, {**bad.rows, "linear_probe": {**bad.rows["linear_probe"], "keys": ["x"] * n}})
    with pytest.raises(ValueError, match="same test images"):
        paired_table([other], [good], n_resamples=50)
    without = RowOutputs(bad.metrics, {k: v for k, v in bad.rows.items() if k != "vqa"})
    assert "vqa_accuracy_open" not in paired_table([without], [good], n_resamples=50)
