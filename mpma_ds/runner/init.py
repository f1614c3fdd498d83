"""Where a model's weights come from — the one resolver of the fine-tuning recipe's ``init.from`` and of
``mpma-evaluate --model / --random-init``: an exported folder, a pretraining run folder (consolidated on the
fly), or ``random`` — resolved and checked before any heavy work, loaded later.

``resolve_source`` reads only small files (``config.json``, ``export_info.json``, ``recipe.yaml``,
``complete.json``); ``resolve_init`` adds the fine-tuning recipe's rule: it reads the same small files (``config.json``, ``recipe.yaml``, ``complete.json``) and decides the
architecture: a folder's own, with the recipe's explicitly given ``model.overrides`` applied (efficiency
switches such as ``grad_checkpointing``); a recipe that names another architecture than the folder holds (other
parameter shapes) is refused, naming the fields. ``load_backbone`` then builds the ``MPMA`` with its weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model

from mpma_ds.config import given_keys
from mpma_ds.models import MPMA, MPMAConfig
from mpma_ds.models.config import architecture_difference
from mpma_ds.runner.export import (
    ExportError,
    check_complete,
    consolidated_weights,
    find_tag_dir,
    read_run_recipe,
    resolve_tokenizer,
)

if TYPE_CHECKING:
    from mpma_ds.training.recipe import FinetuneRecipe


@dataclass
class InitSource:
    """What ``init.from`` (or an evaluated model) resolved to."""

    kind: str
    """``random``, ``exported`` or ``run``."""
    path: Path | None
    config: MPMAConfig
    """The architecture to build (recipe efficiency overrides applied)."""
    tokenizer_dir: Path | None
    """The tokenizer that came with the weights (exported ``text_encoder/``, the run recipe's), if any."""
    pretrain_run_id: str | None
    """The MLflow run that pretrained the weights, when recorded."""
    step: int | None
    """The pretraining step of the weights."""

    def load(self) -> MPMA:
        """The backbone with these weights (``load_backbone``): what a fine-tuning task builds its module on."""
        return load_backbone(self)

    @property
    def label(self) -> str:
        """``random`` or ``pretrained`` (the MLflow tag ``mpma.init``)."""
        return "random" if self.kind == "random" else "pretrained"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path) if self.path else None,
            "step": self.step,
            "pretrain_run_id": self.pretrain_run_id,
        }


def parameter_shapes(config: MPMAConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape for ``config``, from a model built on the meta device (no memory, no files)."""
    plain = config.replace(text_init_from=None, image_init_from=None)
    with torch.device("meta"):
        model = MPMA(plain)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def shape_difference(a: MPMAConfig, b: MPMAConfig) -> list[str]:
    """Parameter names whose presence or shape differs between architectures ``a`` and ``b``."""
    sa, sb = parameter_shapes(a), parameter_shapes(b)
    return sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))


def _with_recipe_overrides(saved: MPMAConfig, recipe: FinetuneRecipe, where: str) -> MPMAConfig:
    """The folder's architecture with the recipe's ``model.overrides`` applied; a recipe model of other
    parameter shapes is refused."""
    config = saved.replace(**recipe.model.overrides)
    if "model" in given_keys(recipe) and "name" in given_keys(recipe.model):
        named = recipe.model.config
        differ = shape_difference(named, config)
        if differ:
            fields = architecture_difference(saved.architecture(), named) or ["(parameter shapes)"]
            raise ValueError(
                f"init.from {where} holds another architecture than model.name={recipe.model.name} (differs in "
                f"{', '.join(fields[:6])}); point init.from at a {recipe.model.name} run or drop model.name"
            )
    return config


def resolve_init(recipe: FinetuneRecipe) -> InitSource:
    """Decide the backbone's architecture and weights source; raise ``ValueError``/``FileNotFoundError`` on
    a missing folder, an incomplete checkpoint or another architecture."""
    spec = recipe.init.from_
    return resolve_source(
        spec, random_config=recipe.model.config, adapt=lambda saved: _with_recipe_overrides(saved, recipe, spec)
    )


def resolve_source(
    spec: str | Path,
    *,
    random_config: MPMAConfig | None = None,
    adapt: Callable[[MPMAConfig], MPMAConfig] | None = None,
    what: str = "init.from",
) -> InitSource:
    """``spec``: ``random`` (the architecture ``random_config``), an exported folder (``config.json`` +
    ``model.safetensors``) or a pretraining run folder / one of its ``step_*`` checkpoints. ``adapt`` turns a
    folder's saved architecture into the one to build (default: as saved); ``what`` names the setting in
    messages.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: not an MPMA folder, an incomplete checkpoint, a fine-tuning run, or what ``adapt`` refuses.
    """
    adapt = adapt or (lambda saved: saved)
    if str(spec) == "random":
        if random_config is None:
            raise ValueError(f"{what} random needs an architecture")
        return InitSource("random", None, random_config, None, None, None)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {spec} does not exist; give an exported folder (launch/export.py), a pretraining run "
            "folder, or random"
        )
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if meta.get("model_type") != "mpma":
            raise ValueError(
                f"{what} {spec}: config.json is not an MPMA model (model_type {meta.get('model_type')})"
            )
        saved = MPMAConfig.from_dict(meta["config"], context=str(path / "config.json"))
        info_file = path / "export_info.json"
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        tok = path / "text_encoder"
        return InitSource(
            "exported",
            path,
            adapt(saved),
            tok if (tok / "tokenizer.json").is_file() else None,
            info.get("mlflow_run_id"),
            info.get("step"),
        )
    try:
        tag_dir = find_tag_dir(path)
        meta = check_complete(tag_dir)
        run_recipe, recipe_path = read_run_recipe(tag_dir)
    except ExportError as err:
        raise ValueError(f"{what} {spec}: {err}") from err
    if run_recipe.kind != "pretrain" or meta.get("task", "pretrain") != "pretrain":
        raise ValueError(f"{what} {spec} is a fine-tuning run (task {meta.get('task')!r}); give a pretraining run")
    tok = resolve_tokenizer(run_recipe.data.tokenizer, recipe_path.parent)
    return InitSource(
        "run", tag_dir, adapt(run_recipe.model.config), tok, meta.get("mlflow_run_id"), meta.get("step")
    )


def load_backbone(source: InitSource) -> MPMA:
    """The ``MPMA`` of ``source.config`` with the source's weights (random: as initialised, under the caller's
    ``torch.manual_seed``)."""
    model = MPMA(source.config)
    if source.kind == "random":
        return model
    if source.kind == "exported":
        # load_model knows the tied weights safetensors stored once (MPMA.from_pretrained does the same)
        missing, unexpected = load_model(model, str(source.path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"init.from {source.path} does not fit the architecture: missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}"
            )
        return model
    state = consolidated_weights(source.path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    bad = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or bad:
        raise ValueError(
            f"init.from {source.path} does not fit the architecture: missing {missing[:4]}, shapes {bad[:4]}"
        )
    model.load_state_dict({k: v.float() for k, v in state.items() if k in expected}, strict=True)
    return model
