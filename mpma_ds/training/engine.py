"""``build_engine``: the one place that calls ``deepspeed.initialize``.

It resolves the DeepSpeed JSON against the recipe (``"auto"`` batch fields filled, conflicts refused),
checks global batch = micro-batch × accumulation × world size, splits parameters into weight-decay
groups, builds the optimizer (FusedAdam on CUDA, DeepSpeedCPUAdam when the optimizer is offloaded,
torch AdamW on CPU) and the warm-up + cosine/linear schedule, and switches activation checkpointing.
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpma_ds.training.config import Recipe, RecipeError, TrainConfig

# Parameter names (or name fragments) that never get weight decay besides norms and biases (ndim <= 1).
NO_DECAY_FRAGMENTS = ("embed", "pos_embed", "cls_token", "mask_token", "temperature", "logit_scale", "memory")
AUTO_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def world_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (1 process when unset)."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Accumulation steps so that micro × accumulation × world = global batch; ``RecipeError`` otherwise."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step != 0:
        raise RecipeError(
            f"train.global_batch_size={cfg.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{cfg.micro_batch_size} × world size {world_size} = {per_step}; change one of them"
        )
    return cfg.global_batch_size // per_step


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON; ``RecipeError`` naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"deepspeed_config {path} does not exist; name one of ds_configs/*.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecipeError(f"deepspeed_config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise RecipeError(f"deepspeed_config {path} must hold a JSON object")
    return config


def resolve_ds_config(config: dict[str, Any], cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """A copy of ``config`` with the batch/clipping fields taken from the recipe.

    ``"auto"`` (or absent) fields are filled; a number that disagrees with the recipe is a ``RecipeError``
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
            raise RecipeError(
                f"deepspeed_config: remove the '{key}' section; it is built from the recipe's train.*"
            )
    for key, value in wanted.items():
        given = out.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise RecipeError(
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on weight matrices; none on norms, biases (ndim <= 1), embeddings, the
    temperature, the memory slots and whatever ``model.no_weight_decay()`` names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or any(frag in name for frag in NO_DECAY_FRAGMENTS):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


@dataclass
class WarmupDecay:
    """LR multiplier: linear warm-up to 1, then cosine / linear decay to ``min_ratio`` at ``max_steps``.

    A dataclass (not a lambda) so ``LambdaLR.state_dict()`` saves it with the checkpoint.
    """

    warmup_steps: int
    max_steps: int
    schedule: str
    min_ratio: float

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, ds_config: dict[str, Any]):
    """FusedAdam on CUDA, DeepSpeedCPUAdam when ZeRO offloads the optimizer, torch AdamW otherwise."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]]
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if optimizer_offloaded(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, adamw_mode=True, **kwargs)
    if torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(clean, adam_w_mode=True, **kwargs)
        except Exception as err:  # the op is JIT-built: no nvcc / ninja on this machine
            warnings.warn(f"DeepSpeed FusedAdam unavailable ({err}); using torch AdamW(fused=True)", stacklevel=2)
            return torch.optim.AdamW(clean, fused=True, **kwargs)
    return torch.optim.AdamW(clean, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_SINGLE_PROCESS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed() -> bool:
    """Join (or, for a plain ``python`` run, create) the process group: NCCL on CUDA, gloo on CPU.

    Returns True when this call created the group; the caller then calls ``close_distributed()``.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    if "RANK" not in os.environ:  # `python launch/pretrain.py`: a group of one, no launcher
        os.environ["MPMA_DS_SET_ENV"] = ",".join(k for k in _SINGLE_PROCESS_ENV if k not in os.environ)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def close_distributed() -> None:
    """Destroy the group ``init_distributed`` created and undo its environment (in-process runs, tests)."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    ds_comm.cdb = None  # DeepSpeed keeps its own handle; a later init must make a fresh one
    # ... and caches the groups it derived from the old world; forget them too (private module state).
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "mpu", "mesh_device"):  # fmt: skip
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):  # fmt: skip
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
    for key in filter(None, os.environ.pop("MPMA_DS_SET_ENV", "").split(",")):
        os.environ.pop(key, None)


def build_engine(
    model: nn.Module,
    recipe: Recipe,
    *,
    ds_config: dict[str, Any] | None = None,
    world_size: int | None = None,
):
    """Wrap ``model`` in a DeepSpeed engine: ``(engine, optimizer, scheduler)``.

    Args:
        model: the MPMA module (the engine wraps it as is, so consolidated state-dict keys are MPMA's).
        recipe: the training recipe (``train`` section: batch sizes, optimizer, schedule, checkpointing).
        ds_config: an already resolved DeepSpeed config; default: ``recipe.deepspeed_config`` resolved.
        world_size: data-parallel world size; default: from the environment / process group.

    The process group must exist (``init_distributed``). Raises ``RecipeError`` for a batch mismatch or a
    DeepSpeed JSON that disagrees with the recipe, before anything is allocated.
    """
    import deepspeed

    cfg = recipe.train
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else world_info()[1]
    if ds_config is None:
        ds_config = resolve_ds_config(load_ds_config(recipe.deepspeed_config), cfg, world_size)
    else:
        gradient_accumulation_steps(cfg, world_size)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = build_optimizer(groups, cfg, ds_config)
    lr_fn = WarmupDecay(cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.min_lr / cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def engine_memory(engine) -> dict[str, float]:
    """What this rank holds: parameter elements (local partition vs the whole model) and the bytes of
    parameters and optimizer state, read from the engine (ZeRO-3 partitions: ``ds_tensor``)."""
    total = local = param_bytes = 0
    for param in engine.module.parameters():
        if hasattr(param, "ds_tensor"):  # ZeRO-3: the full size is ds_numel, this rank keeps ds_tensor
            total += param.ds_numel
            local += param.ds_tensor.numel()
            param_bytes += param.ds_tensor.numel() * param.ds_tensor.element_size()
        else:
            total += param.numel()
            local += param.numel()
            param_bytes += param.numel() * param.element_size()
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    opt_bytes = 0
    seen: set[int] = set()
    if isinstance(opt, torch.optim.Optimizer):
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value) and id(value) not in seen:
                    seen.add(id(value))
                    opt_bytes += value.numel() * value.element_size()
        # ZeRO-1/2 keep fp32 master partitions in the wrapper; ZeRO-3 fp32 trains ds_tensor directly.
    wrapper = engine.optimizer
    model_ptrs = {p.data_ptr() for p in engine.module.parameters()}
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for tensor in getattr(wrapper, attr, None) or []:
            if torch.is_tensor(tensor) and tensor.data_ptr() not in model_ptrs:
                opt_bytes += tensor.numel() * tensor.element_size()
    return {
        "param_numel_total": float(total),
        "param_numel_local": float(local),
        "param_bytes_local": float(param_bytes),
        "optimizer_bytes_local": float(opt_bytes),
    }
