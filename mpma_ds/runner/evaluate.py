"""Evaluate a model on one shard split (the library side of ``launch/evaluate.py`` and the demo)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from data_tools import remote
from data_tools.shard_format import SPLIT_SYNONYMS, SPLITS, wrong_kind
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.loader import split_shards
from mpma_ds.eval.alignment import DEFAULT_RESAMPLES, evaluate_alignment
from mpma_ds.eval.bootstrap import loggable_metrics
from mpma_ds.eval.grounding import (
    BEST_MAP,
    GroundTruthError,
    evaluate_grounding,
    shards_have_truth,
    stored_sizes,
    write_overlays,
)
from mpma_ds.eval.zeroshot import DEFAULT_MIN_COUNT
from mpma_ds.models import check_tokenizer_vocab, get_model_config
from mpma_ds.runner.export import INFO_FILE, load_run_recipe
from mpma_ds.runner.init import load_backbone, resolve_source
from mpma_ds.tokenizer import load_tokenizer
from mpma_ds.tracking import TrackingConfig, build_logger
from mpma_ds.tracking.lineage import lineage_tags, pair_key_eval
from mpma_ds.tracking.params import json_safe
from mpma_ds.training.recipe import RECIPE_FILE, Recipe

# Rows of the summary table: (metric key, label); each printed with its 95 % interval when it has one.
TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("i2t_R@1", "image->report R@1"),
    ("i2t_R@5", "image->report R@5"),
    ("i2t_R@10", "image->report R@10"),
    ("t2i_R@1", "report->image R@1"),
    ("t2i_R@5", "report->image R@5"),
    ("t2i_R@10", "report->image R@10"),
    ("i2t_R@1_abnormal", "image->report R@1, abnormal"),
    ("i2t_R@5_abnormal", "image->report R@5, abnormal"),
    ("t2i_R@1_abnormal", "report->image R@1, abnormal"),
    ("t2i_R@5_abnormal", "report->image R@5, abnormal"),
    ("zeroshot_auroc_mean", "zero-shot AUROC (mean)"),
)
# Rows added when the pointing game was played (``--grounding``).
GROUNDING_ROWS: tuple[tuple[str, str], ...] = (
    ("pointing_game", "pointing game"),
    ("pointing_game_chance", "pointing game chance (box area)"),
)


def canonical_split(split: str) -> str:
    """``train``, ``validate`` or ``test`` for a split name or a usual synonym; ValueError listing them else."""
    canonical = SPLIT_SYNONYMS.get(str(split).strip().lower())
    if canonical is None:
        raise ValueError(
            f"--split {split!r} is not a split name; use one of {', '.join(SPLITS)} (or "
            f"{', '.join(k for k, v in SPLIT_SYNONYMS.items() if k != v)})"
        )
    return canonical


def split_folder(shards: str | Path, split: str) -> Path | str:
    """``shards/<split>`` when the build root is given, else ``shards`` itself (already a split folder).

    ``split`` is one of ``train``, ``validate``, ``test`` or a usual synonym (``val``, ``valid``, ``validation``,
    ``training``, ...). A remote build root (``s3://bucket/build``) gives ``<root>/<split>/`` when that prefix
    holds shards, else the root itself.

    Raises:
        ValueError: an unknown split name, or a split folder of another split than ``split``.
        FileNotFoundError: no such folder, or it holds neither the split nor shards.
    """
    canonical = canonical_split(split)
    if remote.is_remote(str(shards)):
        url = str(shards).rstrip("/")
        try:
            if not url.startswith("pipe:") and remote.list_folder(remote.join(url, canonical) + "/"):
                return remote.join(url, canonical) + "/"
        except remote.RemoteError as err:
            if "does not exist" not in str(err):
                raise
        return str(shards)
    root = Path(shards)
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {root} does not exist; build shards with data_tools.build_shards")
    if (root / canonical).is_dir():
        return root / canonical
    if any(root.glob("shard-*.tar")):
        if root.name in SPLITS and root.name != canonical:
            raise ValueError(
                f"--shards {root} is the {root.name} split but --split is {split}; give the build folder "
                f"{root.parent} or --split {root.name}"
            )
        return root
    raise FileNotFoundError(f"{root} holds no {canonical}/ folder and no shard-*.tar files")


def data_config_for(
    model_config: Any,
    *,
    recipe: Recipe | None,
    shards: Path,
    tokenizer: str | Path,
    backend: str | None,
):
    """The eval ``DataConfig``: the training recipe's preprocessing (size, channels, normalisation, text length)
    when known, else the model's own sizes; every split pointed at ``shards`` (the loader picks the recipe's
    train shards for ``split="train"`` otherwise), read whole (no label-fraction subset)."""
    if recipe is not None:
        base = recipe.data
    else:
        base = DataConfig(
            image_size=model_config.image_size,
            in_chans=model_config.in_chans,
            max_text_len=model_config.max_text_len,
        )
    chosen = backend or ("wds" if base.backend == "synthetic" else base.backend)  # evaluation reads shards
    return dataclasses.replace(
        base,
        train_shards=str(shards),
        val_shards=str(shards),
        test_shards=str(shards),
        label_fraction=1.0,
        tokenizer=str(tokenizer),
        backend=chosen,
    )


@contextlib.contextmanager
def one_pass(
    data_cfg, tokenizer, *, split: str, batch_size: int, max_batches: int | None = None
) -> Iterator[Iterable[dict[str, Any]]]:
    """One deterministic, unshuffled pass over ``split`` as rank 0 of 1 (the first ``max_batches`` batches when
    given); the loader is closed when the block ends."""
    info = build_loader(
        data_cfg, 0, 1, split=split, batch_size=batch_size, tokenizer=tokenizer, seed=0, train=False
    )
    try:
        yield info.loader if not max_batches else (b for _, b in zip(range(max_batches), info.loader))
    finally:
        info.close()


def evaluate_on_split(
    model: torch.nn.Module,
    tokenizer,
    data_cfg,
    *,
    split: str = "validate",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    n_resamples: int = DEFAULT_RESAMPLES,
) -> dict[str, Any]:
    """One deterministic pass over ``split`` (rank 0 of 1) through ``evaluate_alignment``, with bootstrap 95 %
    intervals (``n_resamples``; 0 = none) and zero-shot labels needing ``min_count`` positives and negatives."""
    with one_pass(data_cfg, tokenizer, split=split, batch_size=batch_size, max_batches=max_batches) as batches:
        model.to(device)
        return evaluate_alignment(
            model,
            batches,
            tokenizer=tokenizer,
            device=device,
            max_text_len=data_cfg.max_text_len,
            min_count=min_count,
            n_resamples=n_resamples,
        )


def grounding_on_split(
    model: torch.nn.Module,
    tokenizer,
    data_cfg,
    *,
    split: str = "validate",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    n_examples: int = 0,
    seed: int = 0,
    map: str = BEST_MAP,
):
    """The pointing game over one deterministic pass of ``split`` (`eval.grounding.evaluate_grounding`): a
    ``GroundingResult`` with the metrics and the first ``n_examples`` (image, finding) pairs for overlays."""
    sizes = stored_sizes(split_shards(data_cfg, split))
    with one_pass(data_cfg, tokenizer, split=split, batch_size=batch_size, max_batches=max_batches) as batches:
        model.to(device)
        return evaluate_grounding(
            model,
            batches,
            tokenizer=tokenizer,
            data_cfg=data_cfg,
            sizes=sizes,
            device=device,
            n_examples=n_examples,
            seed=seed,
            map=map,
        )


def format_grounding(metrics: Mapping[str, Any]) -> str:
    """The pointing game's lines under the table: overall and per finding, each with its 95 % interval, the
    box-area chance level and the number of pairs."""
    if "pointing_game" not in metrics:
        return ""

    def cell(key: str) -> str:
        ci = metrics.get(f"{key}_ci95")
        band = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not any(math.isnan(v) for v in ci) else ""
        return f"{metrics[key]:.3f}{band}"

    head = (
        f"pointing game: {cell('pointing_game')} (95 % bootstrap interval) vs chance "
        f"{metrics['pointing_game_chance']:.3f}, {int(metrics['pointing_game_pairs'])} (image, finding) pairs"
    )
    lines = [head]
    names = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("pointing_game/") and "_ci" not in k)
    width = max((len(n) for n in names), default=0)
    for name in names:
        lines.append(
            f"  {name.ljust(width)}  {cell(f'pointing_game/{name}')}  chance "
            f"{metrics[f'pointing_game_chance/{name}']:.3f}"
        )
    return "\n".join(lines)


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    """``0.412 [0.371, 0.455]`` (the value and its 95 % interval), ``0.412`` without one, ``n/a`` without value."""
    value = metrics.get(key, math.nan)
    if value is None or math.isnan(value):
        return "n/a"
    ci = metrics.get(f"{key}_ci95")
    if ci is None or any(v is None or math.isnan(v) for v in ci):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_table(results: Mapping[str, Mapping[str, Any]], rows: Sequence[tuple[str, str]] = TABLE_ROWS) -> str:
    """A plain-text table: one row per metric, one column per evaluated model (``results`` name -> metrics),
    each value with its bootstrap 95 % interval beside it, then the zero-shot labels left out and why."""
    names = list(results)
    width = max(len(label) for _, label in rows)
    cells = {name: [_cell(results[name], key) for key, _ in rows] for name in names}
    cols = [max(10, len(n), *(len(c) for c in cells[n])) for n in names]
    head = " " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols))
    lines = [head, "-" * len(head)]
    for i, (_, label) in enumerate(rows):
        lines.append(label.ljust(width) + "  " + "  ".join(cells[n][i].rjust(c) for n, c in zip(names, cols)))
    footers: dict[str, list[str]] = {}  # footer text -> the models it applies to (the same split: usually all)
    for name in names:
        m = results[name]
        if "zeroshot_reference" not in m:
            continue
        left_out = m.get("zeroshot_labels_left_out") or {}
        used = int(m.get("zeroshot_labels", 0))
        text = [
            f"zero-shot AUROC: mean over {used} of {used + len(left_out)} labels, those with >= "
            f"{m.get('zeroshot_min_count')} positives and negatives (reference: {m['zeroshot_reference']})"
        ]
        text += [f"  left out: {label}: {why}" for label, why in left_out.items()]
        if m.get("zeroshot_note"):
            text.append(f"  {m['zeroshot_note']}")
        footers.setdefault("\n".join(text), []).append(name)
    for text, which in footers.items():
        lines.append(text if len(which) == len(names) else f"[{', '.join(which)}] {text}")
    return "\n".join(lines)


def run_evaluation(
    *,
    shards: str | Path,
    model: str | Path | None = None,
    random_init: str | None = None,
    split: str = "validate",
    recipe: str | Path | None = None,
    tokenizer: str | Path | None = None,
    backend: str | None = None,
    batch_size: int = 32,
    max_batches: int = 0,
    seed: int = 0,
    device: str = "auto",
    out_dir: str | Path | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    mlflow: bool = True,
    min_count: int = DEFAULT_MIN_COUNT,
    n_resamples: int = DEFAULT_RESAMPLES,
    grounding: int | None = None,
    grounding_map: str = BEST_MAP,
) -> dict[str, Any]:
    """Evaluate an exported model folder (``model``) or a random twin (``random_init`` = architecture name) on
    ``split`` of ``shards``; write ``out_dir/results.json`` + ``metrics.jsonl`` and log an MLflow "eval" run
    tagged ``mpma.eval_of``. Returns ``{"name", "evaluated", "split", "metrics", "run_id", "out_dir"}``;
    ``metrics`` holds each metric's ``<metric>_ci95`` (``n_resamples`` bootstrap resamples; 0 = none) and the
    zero-shot labels left out (fewer than ``min_count`` positives or negatives) with the reason.

    ``grounding`` (N >= 0) also plays the pointing game (of the ``grounding_map``, `grounding_maps.MAPS`) against the shards' ``truth`` boxes (its metrics join
    ``metrics``), writes N overlay PNGs to ``out_dir/grounding/`` (logged as MLflow artifacts under
    ``grounding/``) and returns the N examples under ``"grounding_examples"`` (not in results.json).

    Raises:
        FileNotFoundError / ValueError: missing model, shards, recipe or tokenizer; a tokenizer that does not
            fit the model.
        GroundTruthError (a ValueError): ``grounding`` on shards whose samples carry no usable ``truth``.
    """
    split = canonical_split(split)  # the shards are checked before any model is loaded
    shard_dir = split_folder(shards, split)
    if problem := wrong_kind(shard_dir, "report", "launch/evaluate.py"):
        raise ValueError(problem)
    model_dir = Path(model) if model else None
    recipe_path = Path(recipe) if recipe else (model_dir / RECIPE_FILE if model_dir else None)
    if recipe and not recipe_path.is_file():
        raise FileNotFoundError(f"recipe {recipe_path} does not exist")
    run_recipe = load_run_recipe(recipe_path) if recipe_path and recipe_path.is_file() else None

    if model_dir is not None:
        source = resolve_source(model_dir, what="--model")
        evaluated = str(model_dir.resolve())
        default_name = model_dir.name
    else:
        same = run_recipe is not None and run_recipe.model.name == random_init
        overrides = dict(run_recipe.model.overrides) if same else {}
        source = resolve_source("random", random_config=get_model_config(random_init, **overrides))
        evaluated = f"random-init:{random_init}:seed={seed}"
        default_name = f"random-{random_init}"
    name = name or default_name
    torch.manual_seed(seed)
    net = load_backbone(source)

    tok_dir = tokenizer or source.tokenizer_dir
    if tok_dir is None and run_recipe is not None:
        tok_dir = run_recipe.data.tokenizer
    if not tok_dir:
        raise ValueError("no tokenizer: pass --tokenizer DIR (or a recipe with data.tokenizer)")
    tok = load_tokenizer(tok_dir)
    check_tokenizer_vocab(net, tok)

    if grounding is not None:
        if grounding < 0:
            raise ValueError(f"--grounding takes the number of overlays to write (>= 0), got {grounding}")
        if not shards_have_truth(shard_dir):  # before the evaluation pass, not after it
            raise GroundTruthError(
                f"--grounding needs ground truth: the samples of {shard_dir} have no 'truth' in their json "
                "(build shards from a synthetic corpus with python -m data_tools.synth_corpus + build_shards)"
            )
    data_cfg = data_config_for(net.config, recipe=run_recipe, shards=shard_dir, tokenizer=tok_dir, backend=backend)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if min_count < 1 or n_resamples < 0:
        raise ValueError(f"--min-label-count must be >= 1 and --bootstrap >= 0, got {min_count} and {n_resamples}")
    metrics = evaluate_on_split(
        net,
        tok,
        data_cfg,
        split=split,
        batch_size=batch_size,
        device=device,
        max_batches=max_batches or None,
        min_count=min_count,
        n_resamples=n_resamples,
    )

    out_dir = Path(out_dir or Path("eval_results") / f"{name}-{split}")
    out_dir.mkdir(parents=True, exist_ok=True)
    found = None
    if grounding is not None:
        found = grounding_on_split(
            net,
            tok,
            data_cfg,
            split=split,
            batch_size=batch_size,
            device=device,
            max_batches=max_batches or None,
            n_examples=grounding,
            seed=seed,
            map=grounding_map,
        )
        metrics.update(found.metrics)
        shutil.rmtree(out_dir / "grounding", ignore_errors=True)  # an earlier run's overlays are not this run's
        write_overlays(out_dir / "grounding", {name: found.examples}, map=grounding_map)
    # the caller's tracking store (flag, else $MLFLOW_TRACKING_URI, else ./mlflow.db), never the one written
    # in the evaluated folder's recipe: a model from elsewhere must not send results to its old server
    tracking = TrackingConfig(
        enabled=mlflow,
        uri=tracking_uri,
        experiment=experiment or (run_recipe.tracking.experiment if run_recipe is not None else "mpma-eval"),
        run_name=f"eval-{name}-{split}",
    )
    tags = {"mpma.kind": "eval", "mpma.eval_of": evaluated, "mpma.split": split, "mpma.shards": str(shard_dir)}
    step = int(source.step or 0)
    if source.kind == "run":
        tags.update({"mpma.checkpoint": str(source.path), "mpma.step": str(step)})
    elif source.kind == "exported" and (source.path / INFO_FILE).is_file():
        info = json.loads((source.path / INFO_FILE).read_text(encoding="utf-8"))
        tags.update({"mpma.checkpoint": str(info.get("checkpoint")), "mpma.step": str(step)})
    # nested under the pretraining run the weights came from (export_info.json, complete.json); a random twin is
    # matched with the pretrained evaluation of the same split by the pair key
    tags.update(
        lineage_tags(
            source.pretrain_run_id,
            source.label,
            pair_key_eval(split, shard_dir if isinstance(shard_dir, str) else str(Path(shard_dir).resolve())),
        )
    )
    logger = build_logger(tracking, rank=0, run_dir=out_dir, tags=tags)
    logger.log_params(
        {
            "eval": {
                "model": evaluated,
                "split": split,
                "shards": str(shard_dir),
                "tokenizer": str(tok_dir),
                "batch_size": batch_size,
                "min_label_count": min_count,
                "bootstrap": n_resamples,
            }
        }
    )
    logger.log_metrics({f"eval/{k}": v for k, v in loggable_metrics(metrics).items()}, step=step)
    if found is not None and found.examples:  # the overlays under grounding/ (the metrics joined `metrics`)
        logger.log_artifact(out_dir / "grounding")
    result = {
        "name": name,
        "evaluated": evaluated,
        "split": split,
        "metrics": metrics,
        "run_id": logger.run_id,
        "out_dir": str(out_dir),
    }
    (out_dir / "results.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")  # NaN -> null
    logger.log_artifact(out_dir / "results.json")
    logger.close()
    if found is not None:
        result["grounding_examples"] = found.examples
    return result
