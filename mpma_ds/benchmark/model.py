"""The model a suite evaluates: ``--model`` an exported folder, a pretraining run folder (consolidated on the fly,
as ``init.from``) or ``random:<arch>`` (the twin, seeded), with its tokenizer and the eval preprocessing of the
recipe it was trained with — resolved before any dataset is read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpma_ds.models import MPMA, MPMAConfig, check_tokenizer_vocab, create_model
from mpma_ds.runner.evaluate import data_config_for
from mpma_ds.runner.export import ExportError, check_complete, find_tag_dir, load_run_recipe, read_run_recipe
from mpma_ds.runner.export import resolve_tokenizer as run_tokenizer
from mpma_ds.runner.init import InitSource, load_backbone
from mpma_ds.tokenizer import load_tokenizer
from mpma_ds.training.recipe import RECIPE_FILE


@dataclass
class BenchModel:
    name: str
    """Column of the tables (``--name``, else the folder's name, else ``random-<arch>``)."""
    spec: str
    kind: str
    """``exported``, ``run`` or ``random``."""
    net: MPMA
    tokenizer: Any
    tokenizer_dir: str
    data_cfg: Any
    """The eval ``DataConfig`` (image size, channels, normalisation, eval crop)."""
    fingerprint: str
    """What the feature cache is keyed on: a hash of the weights file (or arch + seed for a random twin) and the
    eval preprocessing."""
    info: dict[str, Any]


def _arch_digest(net: MPMA) -> str:
    return hashlib.sha256(json.dumps(net.config.architecture(), sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_model(spec: str, *, tokenizer: str | None = None, seed: int = 0, name: str | None = None) -> BenchModel:
    """Build the model of ``spec``; ``FileNotFoundError`` / ``ValueError`` (one line) when it cannot be.

    ``random:<arch>`` is a registered architecture at its defaults; ``random:<exported folder>`` is that folder's
    twin: its architecture (sizes included), its recipe's preprocessing and its tokenizer, freshly initialised
    with ``seed`` — what a pretrained model is compared with."""
    recipe = None
    info: dict[str, Any] = {}
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        torch.manual_seed(seed)
        folder = Path(arch)
        if (folder / "config.json").is_file():  # the twin of an exported folder: its architecture and recipe
            meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            net = MPMA(MPMAConfig.from_dict(meta["config"], context=str(folder / "config.json")))
            if (folder / RECIPE_FILE).is_file():
                recipe = load_run_recipe(folder / RECIPE_FILE)
            arch = folder.resolve().name
            tok = folder / "text_encoder"
            tokenizer = tokenizer or (str(tok) if (tok / "tokenizer.json").is_file() else None)
        else:
            net = create_model(arch)
        kind, tok_dir, weights = "random", tokenizer, f"random:{_arch_digest(net)}:seed={seed}"
        info = {"seed": seed}  # a fine-tuning protocol rebuilds the same weights from it
        default_name = f"random-{arch}"
        if not tok_dir:
            raise ValueError(
                f"--model {spec}: a random twin needs --tokenizer (the pretrained model's text_encoder/)"
            )
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"--model {spec} does not exist: give an exported folder, a run folder or random:<arch>"
            )
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            net = MPMA.from_pretrained(path)
            kind, weights = "exported", _file_digest(path / "model.safetensors")
            if (path / RECIPE_FILE).is_file():
                recipe = load_run_recipe(path / RECIPE_FILE)
            tok = path / "text_encoder"
            tok_dir = tokenizer or (str(tok) if (tok / "tokenizer.json").is_file() else None)
            if (path / "export_info.json").is_file():
                info = json.loads((path / "export_info.json").read_text(encoding="utf-8"))
        else:
            try:
                tag_dir = find_tag_dir(path)
                meta = check_complete(tag_dir)
                recipe, recipe_path = read_run_recipe(tag_dir)
            except ExportError as err:
                raise ValueError(f"--model {spec}: {err}") from err
            source = InitSource(
                "run", tag_dir, recipe.model.config, None, meta.get("mlflow_run_id"), meta.get("step")
            )
            net = load_backbone(source)
            kind, weights = "run", f"run:{tag_dir.resolve()}:{meta.get('step')}"
            found = run_tokenizer(recipe.data.tokenizer, recipe_path.parent)
            tok_dir = tokenizer or (str(found) if found else None)
            info = {"mlflow_run_id": meta.get("mlflow_run_id"), "step": meta.get("step")}
        default_name = path.resolve().name
        if not tok_dir:
            raise ValueError(f"--model {spec}: no tokenizer found with it; pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    check_tokenizer_vocab(net, tok)
    net.eval()
    data_cfg = data_config_for(net.config, recipe=recipe, shards=Path("."), tokenizer=tok_dir, backend=None)
    pre = (data_cfg.image_size, data_cfg.in_chans, data_cfg.eval_crop_fraction, tuple(data_cfg.channel_stats()[0]),
           tuple(data_cfg.channel_stats()[1]))  # fmt: skip
    fingerprint = hashlib.sha256(f"{weights}|{pre}".encode()).hexdigest()[:16]
    return BenchModel(name or default_name, spec, kind, net, tok, str(tok_dir), data_cfg, fingerprint, info)
