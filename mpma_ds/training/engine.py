"""``build_engine``: the one place that calls ``deepspeed.initialize``.

It checks global batch = micro-batch × accumulation × world size against the resolved DeepSpeed config,
splits parameters into weight-decay × learning-rate groups (decay exemptions from ``model.no_weight_decay()``;
per-parameter lr scales from ``model.lr_scales(...)`` where a fine-tuning task defines them: head multiplier,
layer-wise decay), builds the optimizer (FusedAdam on CUDA, DeepSpeedCPUAdam when the optimizer is offloaded,
torch's fused AdamW on CPU) and the warm-up + cosine/linear schedule, and switches activation checkpointing. On a
CPU-only machine it lets the process keep the host memory a step frees (``keep_freed_host_memory``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

# deepspeed is imported inside build_engine / build_optimizer: heavy (seconds to import), so reading a recipe or
# a checkpoint's metadata does not pay for it.
from mpma_ds.training.compile import compile_blocks
from mpma_ds.training.ds_config import gradient_accumulation_steps, optimizer_offloaded
from mpma_ds.training.host_memory import keep_freed_host_memory
from mpma_ds.training.recipe import TrainConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    lr: float = 1.0,
    lr_scales: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weight matrices, none on what ``model.no_weight_decay()`` names (norms,
    biases, embeddings, tokens, temperatures, memory slots); one group per distinct lr scale of ``lr_scales``
    (parameter name → multiplier of ``lr``, default 1). Frozen parameters are left out. Each group carries the
    parameter ``names`` (dropped before the optimizer sees it)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    scales = lr_scales or {}
    buckets: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name in skip)
        scale = float(scales.get(name, 1.0))
        group = buckets.setdefault(
            (decay, scale),
            {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale},
        )
        group["params"].append(param)
        group["names"].append(name)
    if not scales:  # the plain split: always [decay, no_decay], even when one is empty
        for decay in (True, False):
            buckets.setdefault(
                (decay, 1.0), {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr": lr}
            )
    return [buckets[k] for k in sorted(buckets, key=lambda k: (not k[0], -k[1]))]


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
    """FusedAdam on CUDA, DeepSpeedCPUAdam when ZeRO offloads the optimizer, torch ``AdamW(fused=True)`` otherwise
    (one kernel over all parameters; the default ``AdamW`` on CPU is a Python loop over them, several times
    slower on mpma_base's 350 M parameters; the same update to rounding)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]]
    if not clean:
        raise ValueError("the model has no trainable parameters")
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
    return torch.optim.AdamW(clean, fused=True, **kwargs)


def build_engine(
    model: nn.Module,
    cfg: TrainConfig,
    ds_config: dict[str, Any],
    *,
    world_size: int,
    max_steps: int | None = None,
    lr_scales: dict[str, float] | None = None,
) -> tuple[DeepSpeedEngine, Any, torch.optim.lr_scheduler.LambdaLR]:
    """Wrap ``model`` in a DeepSpeed engine: ``(engine, optimizer, scheduler)``.

    Args:
        model: the module to train (MPMA itself for pretraining, a task module for fine-tuning); the engine
            wraps it as is, so consolidated state-dict keys are the module's own.
        cfg: the recipe's ``train`` section (optimizer, schedule, checkpointing).
        ds_config: the resolved DeepSpeed config (``resolve_ds_config``).
        world_size: data-parallel world size.
        max_steps: length of the schedule (default ``cfg.max_steps``; a run sized by ``epochs`` passes its own).
        lr_scales: per-parameter learning-rate multipliers (``param_groups``).

    The process group must exist (``init_distributed``). Raises ``ConfigError`` for a batch mismatch, before
    anything is allocated.
    """
    import deepspeed

    accumulation = gradient_accumulation_steps(cfg, world_size)
    if ds_config.get("gradient_accumulation_steps") != accumulation:
        raise ValueError(
            f"ds_config gradient_accumulation_steps={ds_config.get('gradient_accumulation_steps')} but the recipe "
            f"needs {accumulation} on {world_size} ranks; resolve it with resolve_ds_config"
        )
    if cfg.grad_checkpointing is not None and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(cfg.grad_checkpointing)  # off as well as on: the recipe decides
    if not torch.cuda.is_available():
        keep_freed_host_memory()  # a CPU step then reuses last step's pages instead of faulting them in again
    compile_blocks(model, cfg.compile)  # per-block torch.compile (train.compile), before ZeRO-3 hooks wrap it
    groups = param_groups(model, cfg.weight_decay, lr=cfg.lr, lr_scales=lr_scales)
    optimizer = build_optimizer(groups, cfg, ds_config)
    steps = cfg.max_steps if max_steps is None else max_steps
    lr_fn = WarmupDecay(cfg.warmup_steps, steps, cfg.schedule, cfg.min_lr / cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def engine_memory(engine: DeepSpeedEngine) -> dict[str, float]:
    """What this rank holds: parameter elements (local partition vs the whole model) and the bytes of
    parameters and optimizer state, read from the engine (ZeRO-3 partitions: ``ds_tensor``; a parameter under
    the persistence threshold is held whole beside its partition, ``param_numel_persistent`` counts those)."""
    total = local = param_bytes = persistent = 0
    for param in engine.module.parameters():
        if hasattr(param, "ds_tensor"):  # ZeRO-3: the full size is ds_numel, this rank keeps ds_tensor
            total += param.ds_numel
            held = param.ds_tensor.numel()
            if getattr(param, "ds_persist", False):  # under the persistence threshold: kept whole as well
                held += param.ds_numel
                persistent += param.ds_numel
            local += held
            param_bytes += held * param.ds_tensor.element_size()
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
        "param_numel_persistent": float(persistent),
        "param_bytes_local": float(param_bytes),
        "optimizer_bytes_local": float(opt_bytes),
    }
