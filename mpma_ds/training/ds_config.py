"""DeepSpeed JSON configs: found by name among those shipped with mpma-ds or by path, read, and resolved
against the recipe (``"auto"`` batch fields filled from ``train``, numbers that disagree refused)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpma_ds.config import ConfigError

if TYPE_CHECKING:
    from mpma_ds.training.recipe import TrainConfig

AUTO_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def shipped_ds_configs() -> dict[str, Path]:
    """The DeepSpeed configs installed with the package (``mpma_ds/ds_configs/*.json``), by name."""
    folder = resources.files("mpma_ds") / "ds_configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def find_ds_config(spec: str, *, recipe_dir: Path | None = None) -> Path:
    """The DeepSpeed JSON ``spec`` means: a shipped name (``cpu_zero3``), else a path as given (absolute or
    relative to the working folder), else beside the recipe; a path that names a shipped file
    (``ds_configs/cpu_zero3.json``, as older recipes and run folders write it) falls back to that file.

    Raises:
        ConfigError: nothing found (the message lists the shipped names).
    """
    shipped = shipped_ds_configs()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec)
    candidates = [path]
    if not path.is_absolute() and recipe_dir is not None:
        candidates.append(recipe_dir / path)
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    if path.suffix == ".json" and path.stem in shipped:
        return shipped[path.stem]
    raise ConfigError(
        f"deepspeed_config {spec} does not exist; name one of {', '.join(sorted(shipped))} or give a JSON path"
    )


def load_ds_config(spec: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON (name or path); ``ConfigError`` naming the file when it is missing or not JSON."""
    path = find_ds_config(str(spec))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed_config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed_config {path} must hold a JSON object")
    return config


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Accumulation steps so that micro × accumulation × world = global batch; ``ConfigError`` otherwise (the
    message names the micro-batch that would fit, or says that no micro-batch fits that many ranks)."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step != 0:
        head = (
            f"train.global_batch_size={cfg.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{cfg.micro_batch_size} × world size {world_size} = {per_step}"
        )
        try:
            fits = elastic_micro_batch(cfg, world_size)
        except ConfigError as err:
            raise ConfigError(f"{head}: {err}") from None
        raise ConfigError(f"{head}; change one of them (train.micro_batch_size={fits} fits)")
    return cfg.global_batch_size // per_step


def check_world_fits(cfg: TrainConfig, world_size: int) -> None:
    """``ConfigError`` when the global batch cannot be split evenly over ``world_size`` ranks (more ranks than
    samples per step, or a remainder): the hostfile / ``--num_gpus`` names more slots than the recipe can use."""
    if world_size > cfg.global_batch_size:
        raise ConfigError(
            f"{world_size} ranks (launcher slots: hostfile slots × nodes, or --num_gpus) are more than "
            f"train.global_batch_size={cfg.global_batch_size} samples per step can feed; use at most "
            f"{cfg.global_batch_size} ranks or raise train.global_batch_size"
        )
    if cfg.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.global_batch_size} cannot be split evenly over {world_size} ranks "
            "(launcher slots: hostfile slots × nodes, or --num_gpus); use a number of ranks that divides it"
        )


def elastic_micro_batch(cfg: TrainConfig, world_size: int) -> int:
    """The micro-batch that keeps the recipe's global batch on ``world_size`` ranks: the recipe's own when
    micro × world divides the global batch, else the largest divisor of ``global / world`` below it (the
    accumulation steps make up the rest). ``ConfigError`` when the global batch does not split over the ranks.
    """
    check_world_fits(cfg, world_size)
    per_rank = cfg.global_batch_size // world_size
    return max(m for m in range(1, min(cfg.micro_batch_size, per_rank) + 1) if per_rank % m == 0)


def resolve_ds_config(config: dict[str, Any], cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """A copy of ``config`` with the batch/clipping fields taken from the recipe.

    ``"auto"`` (or absent) fields are filled; a number that disagrees with the recipe is a ``ConfigError``
    (the recipe is the single source of batch sizes). Optimizer and scheduler sections are refused: they are
    built by ``build_engine`` from ``train``.
    """
    gas = gradient_accumulation_steps(cfg, world_size)
    wanted = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(cfg.grad_clip),
    }
    out = json.loads(json.dumps(config))
    for key in ("optimizer", "scheduler"):
        if key in out:
            raise ConfigError(
                f"deepspeed_config: remove the '{key}' section; it is built from the recipe's train.*"
            )
    for key, value in wanted.items():
        given = out.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(
                f'deepspeed_config {key}={given} disagrees with the recipe ({value}); set it to "auto"'
            )
        out[key] = value
    if not torch.cuda.is_available():
        # CPU runs: fp32 and no pinned memory (bf16/fp16 sections are GPU settings).
        for key in ("bf16", "fp16"):
            if out.get(key, {}).get("enabled"):
                out[key] = {"enabled": False}
    return out


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def optimizer_offloaded(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype the engine computes in (DeepSpeed bf16/fp16 do not autocast: inputs must match)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
