"""Consolidate a DeepSpeed (ZeRO-1/2/3) training checkpoint into one folder usable without DeepSpeed.

The output is ``MPMA.save_pretrained`` layout::

    OUT/config.json, OUT/model.safetensors      ->  mpma_ds.MPMA.from_pretrained(OUT)
    OUT/text_encoder/  (+ the tokenizer files)   ->  transformers.AutoModel / AutoTokenizer.from_pretrained
    OUT/image_encoder/                           ->  timm.create_model("local-dir:OUT/image_encoder")
    OUT/recipe.yaml                              the training recipe (evaluate.py reads its preprocessing)
    OUT/export_info.json                         which checkpoint, step, when

The weights are DeepSpeed's own consolidation (``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``):
the fp32 master copy, merged over every rank's partition.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from mpma_ds.training.checkpoint import COMPLETE_FILE, LATEST_FILE, TAG_PREFIX, complete_tags

RECIPE_FILE = "recipe.yaml"
INFO_FILE = "export_info.json"


class ExportError(ValueError):
    """The checkpoint cannot be exported (missing, incomplete, inconsistent with its recipe)."""


def find_tag_dir(checkpoint: str | Path) -> Path:
    """The checkpoint tag folder meant by ``checkpoint``: a tag folder (``.../checkpoints/step_N``), a
    ``checkpoints/`` folder (its ``latest`` tag, else the newest complete one) or a run folder."""
    path = Path(checkpoint)
    if not path.exists():
        raise ExportError(
            f"checkpoint {path} does not exist; pass a run folder, its checkpoints/ or a step_* folder"
        )
    if path.is_file():
        raise ExportError(f"checkpoint {path} is a file; pass a run folder, its checkpoints/ or a step_* folder")
    if path.name.startswith(TAG_PREFIX) or (path / COMPLETE_FILE).exists():
        return path
    for base in (path, path / "checkpoints"):
        latest = base / LATEST_FILE
        if latest.is_file():
            tag = latest.read_text().strip()
            if (base / tag).is_dir():
                return base / tag
        tags = complete_tags(base)
        if tags:
            return base / tags[-1][1]
    raise ExportError(f"{path} holds no complete checkpoint (no checkpoints/step_*/{COMPLETE_FILE}); train first")


def check_complete(tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``complete.json``, after checking every rank's DeepSpeed files are there."""
    meta_file = tag_dir / COMPLETE_FILE
    if not meta_file.is_file():
        raise ExportError(
            f"checkpoint {tag_dir} is incomplete (no {COMPLETE_FILE}: the save was interrupted); export an "
            "earlier step_* folder"
        )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    if not model_files:
        raise ExportError(f"checkpoint {tag_dir} has no DeepSpeed *model_states.pt file; it is damaged")
    world = int(meta.get("world_size", 0) or 0)
    zero_optim = [f for f in optim_files if re.match(r"(bf16_)?zero_pp_rank_\d+", f.name)]
    if world and zero_optim and len(zero_optim) != world:
        raise ExportError(
            f"checkpoint {tag_dir} was written by {world} ranks but holds {len(zero_optim)} optimizer "
            "partitions; it is damaged, export another step_* folder"
        )
    return meta


def read_run_recipe(tag_dir: Path) -> tuple[dict[str, Any], Path]:
    """The run's ``recipe.yaml`` (two levels above the tag folder) as a plain dict, and its path."""
    path = tag_dir.parent.parent / RECIPE_FILE
    if not path.is_file():
        raise ExportError(
            f"{path} is missing: the run folder must hold the recipe it was trained with (it names the "
            "architecture and tokenizer)"
        )
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(tree.get("model"), dict) or "name" not in tree["model"]:
        raise ExportError(f"{path} has no model.name; it is not a training recipe")
    return tree, path


def build_model_for(recipe: dict[str, Any], meta: dict[str, Any]):
    """The architecture the checkpoint was trained with: the recipe's ``model.name`` + ``model.overrides``,
    checked against the architecture fields ``complete.json`` recorded (so an edited recipe is caught)."""
    from mpma_ds.models import MPMA, get_model_config

    section = recipe["model"]
    config = get_model_config(section["name"], **(section.get("overrides") or {}))
    saved = meta.get("model_config")
    if isinstance(saved, dict) and saved:
        mine = config.to_dict()
        differ = sorted(k for k, v in saved.items() if k in mine and _plain(mine[k]) != _plain(v))
        if differ:
            raise ExportError(
                f"the run's recipe builds a model that differs from the checkpoint's in {', '.join(differ[:6])}; "
                "was the recipe edited after training?"
            )
    return MPMA(config)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resolve_tokenizer(path: str | None, run_dir: Path) -> Path | None:
    """The recipe's tokenizer folder: as written (absolute or relative to the working folder), else relative
    to the run folder's parent."""
    if not path:
        return None
    for cand in (Path(path), run_dir.parent / path, run_dir / path):
        if cand.is_dir():
            return cand
    return None


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Export a training checkpoint to ``out`` (see the module docstring) and return ``out``.

    Args:
        checkpoint: a run folder, its ``checkpoints/`` folder or one ``step_*`` tag folder.
        out: the folder to create; written beside as ``<out>.partial`` and renamed when complete.
        tokenizer: tokenizer folder to copy beside the text encoder (default: the recipe's ``data.tokenizer``).
        overwrite: replace an existing ``out``.
    Raises:
        ExportError: a missing/incomplete checkpoint, a missing recipe or tokenizer, weights that do not
            match the architecture, or an existing ``out`` without ``overwrite``.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mpma_ds.tokenizer import load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; pass --overwrite or another --out")
    tag_dir = find_tag_dir(checkpoint)
    meta = check_complete(tag_dir)
    recipe, recipe_path = read_run_recipe(tag_dir)
    run_dir = recipe_path.parent
    tok_dir = (
        Path(tokenizer) if tokenizer else resolve_tokenizer((recipe.get("data") or {}).get("tokenizer"), run_dir)
    )
    if tok_dir is None or not tok_dir.is_dir():
        raise ExportError(
            f"tokenizer folder {tokenizer or (recipe.get('data') or {}).get('tokenizer')!r} (from {recipe_path} "
            "data.tokenizer) not found; pass --tokenizer DIR"
        )
    tok = load_tokenizer(tok_dir)

    model = build_model_for(recipe, meta)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        raise ExportError(f"DeepSpeed could not consolidate {tag_dir}: {err}") from err
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{tag_dir} does not hold this architecture's weights (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); was {recipe_path} changed after training?"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ExportError(f"{tag_dir}: shapes differ from the architecture for {bad[:4]}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.eval()

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(str(partial / "text_encoder"))
    shutil.copyfile(recipe_path, partial / RECIPE_FILE)
    info = {
        "checkpoint": str(tag_dir.resolve()),
        "step": meta.get("step"),
        "tag": tag_dir.name,
        "world_size": meta.get("world_size"),
        "tokenizer": str(tok_dir.resolve()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (partial / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out
