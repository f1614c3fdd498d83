"""Consolidate a DeepSpeed (ZeRO-1/2/3) pretraining checkpoint into one folder usable without DeepSpeed.

The output is ``MPMA.save_pretrained`` layout::

    OUT/config.json, OUT/model.safetensors      ->  mpma_ds.MPMA.from_pretrained(OUT)
    OUT/text_encoder/  (+ the tokenizer files)   ->  transformers.AutoModel / AutoTokenizer.from_pretrained
    OUT/image_encoder/                           ->  timm.create_model("local-dir:OUT/image_encoder")
    OUT/recipe.yaml                              the training recipe (evaluation reads its preprocessing)
    OUT/export_info.json                         which checkpoint, step, MLflow run, when
    OUT/README.md                                the model card (mpma_ds.runner.model_card)

The weights are DeepSpeed's own consolidation (``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``):
the fp32 master copy, merged over every rank's partition. ``load_pretraining_checkpoint`` gives the same
weights as an in-memory ``MPMA`` (fine-tuning initialised from a pretraining run folder).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mpma_ds.models import MPMA
from mpma_ds.models.config import check_same_architecture
from mpma_ds.runner.model_card import CARD_FILE, write_model_card
from mpma_ds.tokenizer import load_tokenizer
from mpma_ds.training.checkpoint import (
    COMPLETE_FILE,
    LATEST_FILE,
    TAG_PREFIX,
    ResumeError,
    complete_tags,
    safe_torch_load,
    verify_checkpoint,
)
from mpma_ds.training.recipe import RECIPE_FILE, Recipe, load_recipe
from mpma_ds.training.run_folder import existing_run

INFO_FILE = "export_info.json"
EXPORT_NAMES = frozenset(
    {"config.json", "model.safetensors", "text_encoder", "image_encoder", RECIPE_FILE, INFO_FILE, CARD_FILE}
)
"""Every name ``export_checkpoint`` writes into its output folder: ``overwrite`` replaces a folder holding only
these (with ``export_info.json``), and nothing else."""


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


def read_run_recipe(tag_dir: Path) -> tuple[Recipe, Path]:
    """The run's typed recipe (``recipe.yaml`` two levels above the tag folder) and its path; files it names
    are not checked (the run may come from another machine)."""
    path = tag_dir.parent.parent / RECIPE_FILE
    if not path.is_file():
        raise ExportError(
            f"{path} is missing: the run folder must hold the recipe it was trained with (it names the "
            "architecture and tokenizer)"
        )
    try:
        recipe = load_run_recipe(path)
    except ValueError as err:
        raise ExportError(f"{path} is not a usable training recipe: {err}") from err
    return recipe, path


def load_run_recipe(path: Path) -> Recipe:
    """A run folder's saved recipe as the typed recipe it was (fine-tuning when it has a ``task`` section),
    without checking the files it names."""
    return load_recipe(path, check_files=False)


def resolve_tokenizer(path: str | None, run_dir: Path) -> Path | None:
    """The recipe's tokenizer folder: as written (absolute or relative to the working folder), else relative
    to the run folder's parent."""
    if not path:
        return None
    for cand in (Path(path), run_dir.parent / path, run_dir / path):
        if cand.is_dir():
            return cand
    return None


def consolidated_weights(tag_dir: Path) -> dict[str, Any]:
    """DeepSpeed's fp32 consolidation of a checkpoint, keys as the wrapped module's ``state_dict()``.

    The files are checked against the sizes and sha256 recorded in ``complete.json`` when they were written and
    unpickled with ``weights_only=True`` (``safe_torch_load``): a damaged or crafted file is an ``ExportError``
    and nothing in it runs.
    """
    # deepspeed: heavy (seconds to import); an exported folder is used without it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        verify_checkpoint(tag_dir)
        with safe_torch_load(tag_dir):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except ResumeError as err:
        raise ExportError(str(err)) from err
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        raise ExportError(f"DeepSpeed could not consolidate {tag_dir}: {err}") from err
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretraining_checkpoint(checkpoint: str | Path):
    """``(MPMA with the checkpoint's weights, tag_dir, meta, recipe)`` of a pretraining run / checkpoint folder.

    Raises:
        ExportError: missing/incomplete checkpoint, missing recipe, a fine-tuning run, weights that do not match
            the recorded architecture.
    """
    tag_dir = find_tag_dir(checkpoint)
    meta = check_complete(tag_dir)
    recipe, recipe_path = read_run_recipe(tag_dir)
    if recipe.kind != "pretrain" or meta.get("task", "pretrain") != "pretrain":
        raise ExportError(
            f"{tag_dir} is a fine-tuning checkpoint (task {meta.get('task')!r}); export and init.from take "
            "pretraining runs — its metrics are in the run folder's summary.json"
        )
    config = recipe.model.config
    try:
        check_same_architecture(
            meta.get("model_config"),
            config,
            where=f"checkpoint {tag_dir.name}",
            fix=f"was {recipe_path} edited after training?",
        )
    except ValueError as err:
        raise ExportError(str(err)) from err
    model = MPMA(config)
    state = consolidated_weights(tag_dir)
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
    return model, tag_dir, meta, recipe


def _is_run_or_checkpoint(path: Path) -> bool:
    """``path`` is a training run folder (checkpoints, metrics, a summary), a ``checkpoints/`` folder or a tag."""
    if existing_run(path) or (path / COMPLETE_FILE).exists() or (path / LATEST_FILE).is_file():
        return True
    return path.name.startswith(TAG_PREFIX) and path.parent.name == "checkpoints"


def check_output_folder(out: Path, tag_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out`` whose writing could delete what export did not write: one that is, contains or lies
    inside a run or checkpoint folder, a file, or an existing folder that is not a previous export (with
    ``overwrite``) or not empty (without)."""
    res = out.resolve()
    run_dir = tag_dir.resolve().parent.parent
    if res == run_dir or run_dir.is_relative_to(res) or res.is_relative_to(run_dir):
        how = "is" if res == run_dir else "contains" if run_dir.is_relative_to(res) else "lies inside"
        raise ExportError(
            f"--out {out} {how} the run folder {run_dir} being exported; export writes a folder of its own "
            "(e.g. --out exported/NAME)"
        )
    for parent in (res, *res.parents):
        if parent.is_dir() and _is_run_or_checkpoint(parent):
            how = "is" if parent == res else "lies inside"
            raise ExportError(
                f"--out {out} {how} the run or checkpoint folder {parent}; choose a folder outside any run"
            )
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder for the export")
    if not out.is_dir() or not any(out.iterdir()):
        return
    names = sorted(p.name for p in out.iterdir())
    if not overwrite:
        raise ExportError(f"{out} already exists and is not empty; pass --overwrite or another --out")
    foreign = [n for n in names if n not in EXPORT_NAMES]
    if INFO_FILE not in names or foreign:
        what = f"it also holds {', '.join(foreign[:4])}" if foreign else f"it has no {INFO_FILE}"
        raise ExportError(
            f"--out {out} is not a previous export ({what}); --overwrite replaces only a folder export wrote: "
            "choose another --out"
        )


def _remove_export(folder: Path) -> None:
    """Delete ``folder`` if it holds nothing but what export writes (a previous export, or its ``.partial``)."""
    if folder.is_dir() and all(p.name in EXPORT_NAMES for p in folder.iterdir()):
        shutil.rmtree(folder)
    elif folder.exists():
        raise ExportError(f"{folder} is in the way and is not an export; move it away and export again")


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Export a pretraining checkpoint to ``out`` (see the module docstring) and return ``out``.

    Args:
        checkpoint: a run folder, its ``checkpoints/`` folder or one ``step_*`` tag folder.
        out: the folder to create; written beside as ``<out>.partial`` and renamed when complete.
        tokenizer: tokenizer folder to copy beside the text encoder (default: the recipe's ``data.tokenizer``).
        overwrite: replace an existing ``out`` that holds a previous export (only what export writes).
    Raises:
        ExportError: a missing/incomplete checkpoint, a missing recipe or tokenizer, weights that do not
            match the architecture, an existing ``out`` without ``overwrite`` or that is not an export, or an
            ``out`` that is, contains or lies inside a run or checkpoint folder.
    """
    out = Path(out)
    tag_dir = find_tag_dir(checkpoint)
    check_output_folder(out, tag_dir, overwrite)
    check_complete(tag_dir)
    recipe, recipe_path = read_run_recipe(tag_dir)
    run_dir = recipe_path.parent
    tok_dir = Path(tokenizer) if tokenizer else resolve_tokenizer(recipe.data.tokenizer, run_dir)
    if tok_dir is None or not tok_dir.is_dir():
        raise ExportError(
            f"tokenizer folder {tokenizer or recipe.data.tokenizer!r} (from {recipe_path} data.tokenizer) not "
            "found; pass --tokenizer DIR"
        )
    tok = load_tokenizer(tok_dir)
    model, tag_dir, meta, _ = load_pretraining_checkpoint(tag_dir)

    partial = out.with_name(out.name + ".partial")
    _remove_export(partial)
    model.save_pretrained(partial)
    tok.save_pretrained(str(partial / "text_encoder"))
    shutil.copyfile(recipe_path, partial / RECIPE_FILE)
    info = {
        "checkpoint": str(tag_dir.resolve()),
        "step": meta.get("step"),
        "tag": tag_dir.name,
        "world_size": meta.get("world_size"),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "tokenizer": str(tok_dir.resolve()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (partial / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    write_model_card(partial, model=model, recipe=recipe, run_dir=run_dir, info=info)  # README.md
    if out.exists():
        _remove_export(out)
    partial.rename(out)
    return out
