"""Run a sweep: pretrain every arm x seed, export, evaluate row by row, and tabulate each arm against the
reference with paired intervals (the library side of ``mpma-sweep``).

Every run is grouped in MLflow: the sweep's own run (tag ``mpma.kind=sweep``) is the parent of each arm's
pretraining run (tags ``mpma.sweep``, ``mpma.arm``, ``mpma.seed``), which is the parent of that run's evaluation
run. Each arm x seed writes ``<output_dir>/<arm>/seed<k>/`` (``pretrain/``, ``exported/``, ``eval/``); a rerun
skips every arm x seed whose evaluation was written for the same resolved recipe and protocol, so an interrupted
sweep continues where it stopped, and keeps a finished pretraining of the same recipe when only the protocol
changed. Every arm is evaluated with the reference arm's data settings (the same masks for all). The pretraining
runs in this process (one rank; a global batch above ``train.micro_batch_size`` is reached by gradient
accumulation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mpma_ds.config import ConfigError, to_dict
from mpma_ds.sweep.config import SweepConfig
from mpma_ds.training import load_recipe
from mpma_ds.training.recipe import RECIPE_FILE

STATE_FILE = "sweep_state.json"
LOG_DIR = "sweep_log"  # the sweep's own metrics.jsonl / params.json: in the output folder they would make it
# read as a run folder, inside which an arm's export is refused
TABLE_FILE = "table.md"
RESULTS_FILE = "sweep_results.json"
ROWS_FILE = "rows.pt"

# (metric key, column title) of the table; pointing_game[<map>] columns follow, one per evaluated map
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("zeroshot_auroc_mean", "zero-shot AUROC"),
    ("i2t_R@10", "image->report R@10"),
    ("i2t_R@10_abnormal", "image->report R@10, abnormal"),
    ("t2i_R@10", "report->image R@10"),
    ("mlm_acc_findings", "masked finding words"),
    ("mlm_findings_image_gain", "finding words: own - other image"),
)
# (metric key, column title) of the downstream fine-tuning (`sweep.downstream`), shown when the reference has them
DOWNSTREAM_METRICS: tuple[tuple[str, str], ...] = (
    ("linear_probe_auroc", "linear probe AUROC ({fraction} labels)"),
    ("vqa_accuracy_closed", "frozen VQA CLOSED"),
    ("vqa_accuracy_open", "frozen VQA OPEN"),
)


class SweepError(RuntimeError):
    """An arm could not be trained, exported or evaluated (the message names which and why)."""


def arm_recipe(cfg: SweepConfig, arm: str, seed: int, *, tracking_uri: str | None = None,
               parent_run_id: str | None = None):  # fmt: skip
    """The resolved pretraining recipe of ``arm`` at ``seed`` (paths, run name, tags of the sweep set)."""
    from mpma_ds.recipes import find_recipe

    run_dir = Path(cfg.output_dir) / arm / f"seed{seed}"
    overrides = cfg.arm_overrides(arm) + [
        f"train.seed={seed}",
        f"train.output_dir={json.dumps(str(run_dir / 'pretrain'))}",
        f"tracking.run_name={json.dumps(f'{cfg.name}-{arm}-seed{seed}')}",
    ]
    if cfg.experiment:
        overrides.append(f"tracking.experiment={json.dumps(cfg.experiment)}")
    if tracking_uri:
        overrides.append(f"tracking.uri={json.dumps(tracking_uri)}")
    recipe = load_recipe(find_recipe(cfg.base), overrides)
    tags = {"mpma.sweep": cfg.name, "mpma.arm": arm, "mpma.seed": str(seed)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    recipe.tracking.tags = {**recipe.tracking.tags, **tags}
    return recipe


def _recipe_tree(recipe) -> dict[str, Any]:
    tree = to_dict(recipe)
    tree.pop("tracking", None)
    return tree


def _fingerprint(recipe, cfg: SweepConfig, eval_data) -> str:
    """What an arm x seed's evaluation depends on: its recipe (less tracking), the evaluation protocol and the
    data settings it is evaluated with (named only where they are not the arm's own)."""
    tree = {"recipe": _recipe_tree(recipe), "evaluation": to_dict(cfg.evaluation)}
    if to_dict(eval_data) != tree["recipe"]["data"]:
        tree["eval_data"] = to_dict(eval_data)
    blob = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _trained(recipe, run_dir: Path) -> bool:
    """The arm x seed's export is of a finished pretraining by ``recipe``: its run folder's saved recipe (less
    tracking) is this one, its ``summary.json`` was written (at the end of training; a fresh start removes it)
    and the export is not older than it. Then only the evaluation is redone."""
    pretrain, model = run_dir / "pretrain", run_dir / "exported" / "model.safetensors"
    summary, saved = pretrain / "summary.json", pretrain / RECIPE_FILE
    if not (summary.is_file() and saved.is_file() and model.is_file()):
        return False
    if model.stat().st_mtime < summary.stat().st_mtime:
        return False
    try:
        before = load_recipe(saved)
    except ConfigError:  # a saved recipe this version no longer reads is not this recipe
        return False
    return _recipe_tree(before) == _recipe_tree(recipe)


def _eval_split(recipe, split: str) -> Path:
    """The folder of ``split`` beside (or at) the recipe's validation shards."""
    from mpma_ds.runner.evaluate import split_folder

    val = Path(recipe.data.val_shards or recipe.data.train_shards)
    for root in (val.parent, val):
        try:
            return split_folder(root, split)
        except FileNotFoundError:
            continue
    raise SweepError(f"no {split} split beside or at {val}")


def run_arm(cfg: SweepConfig, arm: str, seed: int, *, tracking_uri: str | None = None,
            parent_run_id: str | None = None, log: Callable[[str], None] = print):  # fmt: skip
    """Pretrain, export and evaluate one arm x seed (or read back its evaluation when it is current); returns
    `arm_eval.RowOutputs`."""
    from mpma_ds.sweep.arm_eval import RowOutputs

    recipe = arm_recipe(cfg, arm, seed, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    # every arm is evaluated with the reference's data settings: the same shards, preprocessing and MLM masking
    # (an arm that trains with other masking, e.g. M3AE's 15 % of every word, is still scored on the same masks)
    eval_data = arm_recipe(cfg, cfg.reference, seed).data
    run_dir = Path(cfg.output_dir) / arm / f"seed{seed}"
    eval_dir = run_dir / "eval"
    stamp = _fingerprint(recipe, cfg, eval_data)
    done = eval_dir / ROWS_FILE
    if done.is_file():
        saved = torch.load(done, weights_only=False)
        if saved.get("fingerprint") == stamp:
            log(f"{arm} seed {seed}: evaluation is current ({done}), not rerun")
            return RowOutputs(saved["metrics"], saved["rows"])
    from mpma_ds.runner.export import ExportError, export_checkpoint
    from mpma_ds.runner.trainer import train

    if _trained(recipe, run_dir):
        log(f"{arm} seed {seed}: pretraining is current ({run_dir / 'exported'}), not rerun")
    else:
        log(f"{arm} seed {seed}: pretraining {recipe.train.max_steps} steps -> {run_dir / 'pretrain'}")
        try:
            train(recipe, overwrite=True)
            export_checkpoint(run_dir / "pretrain", run_dir / "exported", overwrite=True)
        except (ValueError, RuntimeError, ExportError) as err:
            raise SweepError(f"arm {arm} seed {seed}: {' '.join(str(err).split())}") from err
    log(f"{arm} seed {seed}: evaluating")
    found = evaluate_exported(run_dir / "exported", recipe, cfg, eval_dir, eval_data=eval_data)
    found = _with_downstream(found, run_dir, recipe, cfg, arm, seed, log)
    torch.save({"fingerprint": stamp, "metrics": found.metrics, "rows": found.rows}, done)
    _log_eval_run(found.metrics, run_dir, eval_dir, recipe, cfg, arm, seed)
    return found


def evaluate_exported(model_dir: Path, recipe, cfg: SweepConfig, out_dir: Path, *, eval_data=None):
    """`arm_eval.evaluate_rows` of an exported model on the sweep's split, read with ``eval_data`` (a
    ``DataConfig``; default: the recipe's own); writes ``out_dir/metrics.json``."""
    from mpma_ds.eval.grounding import shards_have_truth, stored_sizes
    from mpma_ds.eval.grounding_maps import available_maps
    from mpma_ds.models import MPMA
    from mpma_ds.runner.evaluate import data_config_for
    from mpma_ds.sweep.arm_eval import evaluate_rows
    from mpma_ds.tokenizer import load_tokenizer
    from mpma_ds.tracking.params import json_safe

    ev = cfg.evaluation
    net = MPMA.from_pretrained(model_dir)
    tok_dir = model_dir / "text_encoder" if (model_dir / "text_encoder" / "tokenizer.json").is_file() else None
    tok_dir = tok_dir or recipe.data.tokenizer
    tok = load_tokenizer(tok_dir)
    shard_dir = _eval_split(recipe, ev.split)
    if eval_data is not None:
        recipe = dataclasses.replace(recipe, data=eval_data)
    data_cfg = data_config_for(net.config, recipe=recipe, shards=shard_dir, tokenizer=tok_dir, backend=None)
    maps = [m for m in ev.maps if m in available_maps(net)] if ev.maps and shards_have_truth(shard_dir) else []
    device = ("cuda" if torch.cuda.is_available() else "cpu") if ev.device == "auto" else ev.device
    found = evaluate_rows(
        net, tok, data_cfg, split=ev.split, batch_size=ev.batch_size, device=device,
        max_batches=ev.max_batches or None, min_count=ev.min_label_count, n_resamples=ev.bootstrap, maps=maps,
        sizes=stored_sizes(shard_dir) if maps else None,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(found.metrics), indent=1) + "\n")
    return found


def _with_downstream(found, run_dir: Path, recipe, cfg: SweepConfig, arm: str, seed: int,
                     log: Callable[[str], None]):  # fmt: skip
    """``found`` with the linear probe and frozen VQA of the exported arm (`sweep.downstream`) joined to its
    metrics and rows; the fine-tuning runs nested under the arm's pretraining run."""
    from mpma_ds.sweep.arm_eval import RowOutputs
    from mpma_ds.sweep.downstream import downstream_rows

    ev = cfg.evaluation
    if ev.linear_probe_fraction <= 0 and not ev.vqa_shards:
        return found
    log(f"{arm} seed {seed}: linear probe at {ev.linear_probe_fraction:g} of the labels"
        + (", frozen VQA" if ev.vqa_shards else ""))  # fmt: skip
    info_file = run_dir / "exported" / "export_info.json"
    parent = (json.loads(info_file.read_text()) if info_file.is_file() else {}).get("mlflow_run_id")
    tags = {"mpma.sweep": cfg.name, "mpma.arm": arm, "mpma.seed": str(seed),
            **({"mlflow.parentRunId": parent} if parent else {})}  # fmt: skip
    shards = _eval_split(recipe, ev.split).parent
    try:
        metrics, rows = downstream_rows(run_dir / "exported", recipe, cfg, shards, run_dir / "downstream", tags)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        raise SweepError(f"arm {arm} seed {seed}: downstream: {' '.join(str(err).split())}") from err
    return RowOutputs({**found.metrics, **metrics}, {**found.rows, **rows})


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalars of an arm's metrics for MLflow: the alignment ones and each map's ``grounding/<map>/<metric>``."""
    from mpma_ds.eval.bootstrap import loggable_metrics

    out = loggable_metrics({k: v for k, v in metrics.items() if k != "grounding_maps"})
    for name, m in (metrics.get("grounding_maps") or {}).items():
        out.update({f"grounding/{name}/{k}": v for k, v in loggable_metrics(m).items()})
    return out


def _log_eval_run(metrics, run_dir: Path, eval_dir: Path, recipe, cfg: SweepConfig, arm: str, seed: int) -> None:
    """An MLflow "eval" run nested under the arm's pretraining run (the exported folder names it)."""
    from mpma_ds.tracking import TrackingConfig, build_logger
    from mpma_ds.tracking.lineage import lineage_tags

    info_file = run_dir / "exported" / "export_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    t = recipe.tracking
    tracking = TrackingConfig(enabled=t.enabled, backends=list(t.backends), uri=t.uri, experiment=t.experiment,
                              run_name=f"eval-{cfg.name}-{arm}-seed{seed}", system_metrics=False)  # fmt: skip
    tags = {"mpma.kind": "eval", "mpma.sweep": cfg.name, "mpma.arm": arm, "mpma.seed": str(seed),
            **lineage_tags(info.get("mlflow_run_id"), "pretrained", f"sweep|{cfg.name}|seed={seed}")}  # fmt: skip
    logger = build_logger(tracking, rank=0, run_dir=eval_dir, tags=tags)
    try:
        logger.log_metrics(
            {f"eval/{k}": v for k, v in _flat_metrics(metrics).items()}, step=recipe.train.max_steps
        )
        logger.log_artifact(eval_dir / "metrics.json")
    finally:
        logger.close()


# ------------------------------------------------------------------------------------------------ table
def _value(metrics: Mapping[str, Any], key: str) -> float:
    if key.startswith("pointing_game["):
        name = key[len("pointing_game[") : -1]
        return float((metrics.get("grounding_maps") or {}).get(name, {}).get("pointing_game", math.nan))
    value = metrics.get(key)
    return math.nan if value is None else float(value)


def _fmt(x: float, signed: bool = False) -> str:
    return "n/a" if x is None or math.isnan(x) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def training_flops(cfg: SweepConfig, arm: str, seed: int) -> float:
    """The forward + backward FLOPs per sample the arm x seed's pretraining counted (its ``summary.json``); NaN
    when that run wrote none."""
    summary = Path(cfg.output_dir) / arm / f"seed{seed}" / "pretrain" / "summary.json"
    if not summary.is_file():
        return math.nan
    return float(json.loads(summary.read_text()).get("flops_per_sample") or math.nan)


def sweep_table(cfg: SweepConfig, results: Mapping[str, Sequence[Any]], differences: Mapping[str, Mapping],
                flops: Mapping[str, float] | None = None) -> str:  # fmt: skip
    """The markdown table: one row per arm, its training GFLOPs per sample (``flops``: arm -> FLOPs, the same
    steps and batch for every arm) beside the reference's, then per metric the arm's value (mean over seeds) and
    its paired difference from the reference with the 95 % interval; the per-seed differences under it."""
    ref = cfg.reference
    flops = flops or {}
    maps = [f"pointing_game[{m}]" for m in cfg.evaluation.maps if any(
        m in (r.metrics.get("grounding_maps") or {}) for r in results[ref])]  # fmt: skip
    fraction = f"{100 * cfg.evaluation.linear_probe_fraction:g} %"
    downstream = [(k, t.format(fraction=fraction)) for k, t in DOWNSTREAM_METRICS
                  if any(r.metrics.get(k) is not None for r in results[ref])]  # fmt: skip
    columns = [*TABLE_METRICS, *downstream] + [(k, f"pointing game ({k[14:-1]})") for k in maps]
    lines = ["| arm | training GFLOPs / sample | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]  # fmt: skip
    ref_flops = flops.get(ref, math.nan)
    for arm, found in results.items():
        arm_flops = flops.get(arm, math.nan)
        ratio = "" if arm == ref or math.isnan(arm_flops / ref_flops) else f" (x{arm_flops / ref_flops:.2f})"
        cells = [f"{_fmt(arm_flops / 1e9)}{ratio}"]
        for key, _ in columns:
            mean = sum(_value(r.metrics, key) for r in found) / len(found)
            if arm == ref:
                cells.append(f"{_fmt(mean)} (reference)")
                continue
            d = differences.get(arm, {}).get(key)
            if d is None:
                cells.append(_fmt(mean))
                continue
            lo, hi = d["difference_ci95"]
            cells.append(f"{_fmt(mean)} ({_fmt(d['difference'], True)} [{_fmt(lo, True)}, {_fmt(hi, True)}])")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    n_eval = int(results[ref][0].metrics.get("eval_samples", 0))
    pairs = results[ref][0].metrics.get("grounding_maps") or {}
    n_pairs = next(iter(pairs.values()))["pairs"] if pairs else 0
    lines += ["", f"Each cell: the arm's value (mean over seeds {cfg.seeds}) and, in brackets, its difference from "
              f"`{ref}` with the paired bootstrap 95 % interval ({cfg.evaluation.bootstrap} resamples of the "
              f"{n_eval} {cfg.evaluation.split} studies, {n_pairs} (image, finding) pairs for the pointing game); "
              "an interval that excludes 0 is a difference this evaluation can see."]  # fmt: skip
    if downstream:
        lines[-1] += (" The linear probe and frozen VQA columns resample their own test splits' images and "
                      "questions (`sweep.downstream`).")  # fmt: skip
    if len(cfg.seeds) > 1:
        lines.append("")
        lines.append("Per-seed differences (the spread between seeds, which the intervals above do not hold):")
        for arm, per_key in differences.items():
            shown = ", ".join(
                f"{k}: " + " / ".join(_fmt(x, True) for x in d["per_pair"]) for k, d in per_key.items()
            )
            lines.append(f"- {arm}: {shown}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ sweep
def _open_parent(cfg: SweepConfig, tracking_uri: str | None):
    """The sweep's own MLflow run (continued when ``sweep_state.json`` names one) and its logger."""
    from mpma_ds.tracking import TrackingConfig, build_logger, flatten_params

    base = arm_recipe(cfg, cfg.reference, cfg.seeds[0], tracking_uri=tracking_uri)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    t = base.tracking
    tracking = TrackingConfig(enabled=t.enabled, backends=list(t.backends), uri=t.uri, experiment=t.experiment,
                              run_name=f"sweep-{cfg.name}", system_metrics=False)  # fmt: skip
    logger = build_logger(tracking, rank=0, run_dir=out / LOG_DIR, run_id=state.get("run_id"), resume=False,
                          tags={"mpma.kind": "sweep", "mpma.sweep": cfg.name})  # fmt: skip
    if logger.run_id:
        state_file.write_text(json.dumps({"run_id": logger.run_id}) + "\n")
        if not state.get("run_id"):
            logger.log_params(flatten_params(to_dict(cfg), "sweep"))
    return logger


def _check_vqa_shards(vqa: str) -> None:
    """A local ``evaluation.vqa_shards`` must hold the train / validate / test shards frozen VQA reads; one line
    otherwise (remote ones are listed when read)."""
    from data_tools import remote

    if not vqa or remote.is_remote(vqa):
        return
    missing = [split for split in ("train", "validate", "test") if not any(Path(vqa, split).glob("*.tar"))]
    if missing:
        raise SweepError(
            f"evaluation.vqa_shards={vqa}: no {' / '.join(missing)} shards there; build them (make demo builds "
            "demo_runs/vqa_shards; or python -m data_tools.build_shards --format vqa-rad), or skip frozen VQA with "
            "--set 'evaluation.vqa_shards=\"\"'"
        )


def run_sweep(cfg: SweepConfig, *, arms: Sequence[str] | None = None, tracking_uri: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run (or continue) the sweep; write ``table.md`` and ``sweep_results.json`` to ``cfg.output_dir`` and log
    both, and every difference, to the sweep's MLflow run. ``arms``: only these (the reference is always run).

    Returns:
        ``{"table": markdown, "differences": {arm: {metric: ...}}, "results": {arm: [metrics per seed]},
        "run_id": the sweep's MLflow run}``.
    """
    from mpma_ds.sweep.arm_eval import paired_table
    from mpma_ds.tracking.params import json_safe

    chosen = [cfg.reference] + [a for a in (arms or cfg.arms) if a != cfg.reference]  # the reference first
    missing = [a for a in chosen if a not in cfg.arms]
    if missing:
        raise SweepError(f"unknown arm(s) {missing}; the sweep has {', '.join(cfg.arms)}")
    _check_vqa_shards(cfg.evaluation.vqa_shards)  # before any arm pretrains: it is read only after the first
    parent = _open_parent(cfg, tracking_uri)
    status = "FAILED"
    try:
        results = {
            arm: [run_arm(cfg, arm, s, tracking_uri=tracking_uri, parent_run_id=parent.run_id, log=log)
                  for s in cfg.seeds]
            for arm in chosen
        }  # fmt: skip
        ev = cfg.evaluation
        differences = {
            arm: paired_table(results[arm], results[cfg.reference], min_count=ev.min_label_count,
                              n_resamples=ev.bootstrap)
            for arm in chosen if arm != cfg.reference
        }  # fmt: skip
        flops = {arm: sum(training_flops(cfg, arm, s) for s in cfg.seeds) / len(cfg.seeds) for arm in chosen}
        table = sweep_table(cfg, results, differences, flops)
        out = Path(cfg.output_dir)
        (out / TABLE_FILE).write_text(table)
        summary = {"sweep": cfg.name, "reference": cfg.reference, "seeds": list(cfg.seeds),
                   "results": {a: [r.metrics for r in rs] for a, rs in results.items()},
                   "differences": differences, "training_flops_per_sample": flops}  # fmt: skip
        (out / RESULTS_FILE).write_text(json.dumps(json_safe(summary), indent=1) + "\n")
        diffs = {f"{arm}/{key}/difference": d["difference"] for arm, per in differences.items()
                 for key, d in per.items()}  # fmt: skip
        diffs.update({f"{arm}/{key}/ci95_{side}": d["difference_ci95"][i] for arm, per in differences.items()
                      for key, d in per.items() for i, side in enumerate(("low", "high"))})  # fmt: skip
        parent.log_metrics({k: v for k, v in diffs.items() if v is not None and not math.isnan(v)}, step=0)
        parent.log_artifact(out / TABLE_FILE)
        parent.log_artifact(out / RESULTS_FILE)
        status = "FINISHED"
        return {"table": table, "differences": differences, "results": results, "run_id": parent.run_id}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.close(status)
        sys.stdout.flush()
