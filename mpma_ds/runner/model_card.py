"""The model card (``README.md``) an export writes beside the weights, in the Hugging Face model-card layout.

A YAML metadata header (library, licence, tags, pipeline, data set, metrics), then: a one-line summary (the
first paragraph under the title: `card_summary` reads it back, `mpma-predict` prints it), architecture and
size, how to use it, the training data (from the shards' ``manifest.json``: source, counts per split, whether the
corpus is synthetic), the training procedure (from the run's ``recipe.yaml`` and ``summary.json``), the
evaluation figures the run logged (``summary.json``'s ``eval`` / ``test`` sections, else the last evaluation in
``metrics.jsonl``) with their 95 % intervals where the run computed them, intended use and limits, provenance.
Everything is read from the run folder; nothing here trains or evaluates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpma_ds.eval.grounding import shards_have_truth
from mpma_ds.tracking import read_metrics_jsonl

CARD_FILE = "README.md"
_SUMMARY_MARK = "<!-- summary -->"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _manifest(shards: str) -> tuple[dict[str, Any], Path | None]:
    """The build manifest of a shard spec (a split folder, its parent, or a glob inside them)."""
    if not shards or "://" in shards or shards.startswith("pipe:"):
        return {}, None
    base = Path(shards.split("*")[0].split("{")[0])
    for cand in (base, base.parent, base.parent.parent):
        if (cand / "manifest.json").is_file():
            return _read_json(cand / "manifest.json"), cand
    return {}, None


def _is_synthetic(manifest: Mapping[str, Any], root: Path | None) -> bool | None:
    """True when the shards were built from `data_tools.synth_corpus` output (its ``synth_corpus.json`` in the
    build's input, or ``truth`` in the samples); None when it cannot be told."""
    src = (manifest.get("source") or {}).get("input")
    if src and (Path(src) / "synth_corpus.json").is_file():
        return True
    if root is not None:
        for split in ("train", "validate"):
            if (root / split).is_dir():
                try:
                    return shards_have_truth(root / split)
                except (OSError, ValueError, IndexError):
                    return None
    return None if not src else False


def _logged_metrics(run_dir: Path) -> tuple[dict[str, Any], str]:
    """The run's evaluation figures: ``summary.json``'s ``test`` and ``eval`` sections, else the last evaluation
    row of ``metrics.jsonl``; and where they came from."""
    summary = _read_json(run_dir / "summary.json")
    found: dict[str, Any] = {}
    for section in ("eval", "test"):
        found.update(summary.get(section) or {})
    if found:
        return found, f"{run_dir / 'summary.json'} (step {summary.get('step')})"
    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        rows = [r for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    if rows:
        last = rows[-1]
        return {
            k: v for k, v in last.items() if k.startswith("eval/")
        }, f"{run_dir / 'metrics.jsonl'} (step {last.get('step')})"
    return {}, ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(name, value, 95 % interval)`` of every numeric metric (its ``<name>_ci95`` beside it), sorted."""
    rows = []
    for key in sorted(metrics):
        value = metrics[key]
        if key.endswith("_ci95") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        ci = metrics.get(f"{key}_ci95")
        band = (
            f"[{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]"
            if isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci
            else ""
        )
        rows.append((key, _fmt(float(value)), band))
    return rows


def _parameters(model: Any) -> dict[str, int]:
    parts = {"total": sum(p.numel() for p in model.parameters())}
    for name in ("image_encoder", "text_encoder", "fusion", "mae_decoder", "mlm_head"):
        sub = getattr(model, name, None)
        if sub is not None:
            parts[name] = sum(p.numel() for p in sub.parameters())
    return parts


def model_summary(name: str, params: int, steps: Any, samples: Any, source: str, synthetic: bool | None,
                  headline: tuple[str, str, str] | None) -> str:  # fmt: skip
    """The card's one line: architecture, size, training, data, the headline figure."""
    data = {True: "synthetic", False: "real", None: "unknown"}[synthetic]
    line = f"MPMA {name} ({params / 1e6:.1f} M parameters), pretrained {steps} steps on {samples} {data} {source} image-report pairs"
    if headline:
        line += f"; {headline[0]} {headline[1]}{(' ' + headline[2]) if headline[2] else ''}"
    return line + ". Research use only, not a medical device."


def write_model_card(out_dir: str | Path, *, model: Any, recipe: Any, run_dir: str | Path,
                     info: Mapping[str, Any]) -> Path:  # fmt: skip
    """Write ``out_dir/README.md`` (see the module docstring) and return its path.

    Args:
        out_dir: the exported folder.
        model: the exported `MPMA`.
        recipe: the run's typed recipe.
        run_dir: the run folder (``summary.json``, ``metrics.jsonl``).
        info: the export's ``export_info.json`` content (step, checkpoint, MLflow run).
    """
    from importlib.metadata import PackageNotFoundError, version

    run_dir = Path(run_dir)
    cfg = model.config
    manifest, shard_root = _manifest(recipe.data.train_shards)
    synthetic = _is_synthetic(manifest, shard_root)
    counts = manifest.get("counts") or {}
    source = (manifest.get("source") or {}).get("format", "unknown-format")
    metrics, metrics_from = _logged_metrics(run_dir)
    rows = metric_rows(metrics)
    headline = next((r for r in rows if r[0].endswith("zeroshot_auroc_mean")), None)
    params = _parameters(model)
    steps = info.get("step")
    train_n = counts.get("train", "an unknown number of")
    summary = model_summary(recipe.model.name, params["total"], steps, train_n, source, synthetic, headline)
    try:
        mpma_version = version("mpma-ds")
    except PackageNotFoundError:
        mpma_version = "0+unknown"
    tags = ["mpma", "medical-imaging", "chest-x-ray", "vision-language", "zero-shot-image-classification"]
    if synthetic:
        tags.append("synthetic-data")
    header = ["---", "library_name: mpma-ds", "license: other", "pipeline_tag: zero-shot-image-classification",
              "tags:", *(f"- {t}" for t in tags), f"datasets:\n- {source}{'-synthetic' if synthetic else ''}",
              "metrics:\n- roc_auc\n- recall", "---"]  # fmt: skip
    arch = cfg.to_dict()
    arch_keys = ("image_size", "patch_size", "in_chans", "vision_width", "vision_layers", "text_width", "text_layers",
                 "fusion_width", "fusion_layers", "embed_dim", "memory_slots", "memory_topk", "vocab_size",
                 "max_text_len", "image_mask_ratio")  # fmt: skip
    t = recipe.train
    lines = [
        *header, "", f"# {recipe.model.name} (MPMA)", "", _SUMMARY_MARK, summary, "",
        "## Model details", "",
        "MPMA (Multi-task Paired Masking with Alignment; Zhang et al., IEEE TMM 2023) trained with "
        f"mpma-ds {mpma_version}: a ViT image encoder, a transformer text encoder, memory-"
        "augmented cross-modal fusion, MLM and MAE heads, global and local image-report alignment.", "",
        "| parameters | count |", "|---|---|", *(f"| {k} | {v:,} |" for k, v in params.items()), "",
        "| architecture field | value |", "|---|---|", *(f"| {k} | {arch[k]} |" for k in arch_keys if k in arch), "",
        "## How to use", "",
        "```python", "import mpma_ds", "model = mpma_ds.MPMA.from_pretrained('.')",
        "tok = mpma_ds.load_tokenizer('text_encoder')",
        "preds = mpma_ds.Predictor('.').predict(['film.dcm'], phrases=['left pleural effusion'])", "```", "",
        "```bash", "mpma-predict --model . films/ --out predictions/", "```", "",
        "## Training data", "",
        f"- source: `{source}` shards built by `data_tools.build_shards` from `{(manifest.get('source') or {}).get('input', '?')}`",
        f"- synthetic: {'yes (data_tools.synth_corpus: drawn films and templated reports, no patient data)' if synthetic else ('no' if synthetic is False else 'unknown')}",
        f"- samples per split: {', '.join(f'{k} {v}' for k, v in counts.items()) or 'unknown (no manifest.json found)'}",
        f"- preprocessing: {recipe.data.image_size} px square, {recipe.data.in_chans} channel(s), reports cut to "
        f"{recipe.data.max_text_len} tokens; tokenizer in `text_encoder/`", "",
        "## Training procedure", "",
        f"- steps: {steps} (recipe max_steps {t.max_steps}), global batch {t.global_batch_size} "
        f"(micro batch {t.micro_batch_size}), world size {info.get('world_size')}",
        f"- optimiser: AdamW lr {t.lr} ({t.schedule}, {t.warmup_steps} warm-up steps), weight decay {t.weight_decay}",
        f"- DeepSpeed config: {recipe.deepspeed_config}; seed {t.seed}", "",
        "## Evaluation", "",
    ]  # fmt: skip
    if rows:
        lines += [f"Figures the run logged ({metrics_from}); intervals are bootstrap 95 % where the run computed them.",
                  "", "| metric | value | 95 % interval |", "|---|---|---|",
                  *(f"| {k} | {v} | {ci} |" for k, v, ci in rows), ""]  # fmt: skip
    else:
        lines += [
            "The run logged no evaluation (train.eval_every 0); evaluate the export with `mpma-evaluate`.",
            "",
        ]
    lines += [
        "## Intended use and limits", "",
        "- Research on medical vision-language pretraining: zero-shot findings, retrieval, phrase grounding, "
        "fine-tuning. **Not a medical device**; not for diagnosis or any clinical decision.",
        "- Zero-shot scores are not probabilities; `mpma-predict --calibrate SHARDS` fits a per-label calibration on "
        "labelled films of the target site.",
        *(["- Trained on **synthetic** films and reports: its figures say the pipeline works, not that it reads real "
           "chest X-rays."] if synthetic else []),
        "- Chest projection radiographs (CR / DX) only; reports in English; findings and prompts follow MIMIC-CXR "
        "wording (CheXpert-14 labels). Performance on other sites, devices or populations is unmeasured.", "",
        "## Provenance", "",
        f"- checkpoint: `{info.get('checkpoint')}` (step {steps}), exported {info.get('exported_at')}",
        f"- MLflow run: {info.get('mlflow_run_id') or 'none'}", "",
    ]  # fmt: skip
    path = Path(out_dir) / CARD_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def card_summary(folder: str | Path) -> str | None:
    """The card's one-line summary (the line after the summary mark), or None without a card."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() == _SUMMARY_MARK and i + 1 < len(lines):
            return lines[i + 1].strip() or None
    return None
