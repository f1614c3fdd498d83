"""``train(recipe, resume=...)``: the pretraining loop.

Setup runs every check that can fail on bad input before any process group, model or engine exists
(batch arithmetic, DeepSpeed JSON, model name, tokenizer vocabulary, shards, resume target) and turns each
failure into one ``SetupError`` line. Then: model → ``build_engine`` → resume → steps, with metrics to the
tracking logger, periodic evaluation (every rank runs the whole validation pass), checkpoints on every
rank, and NaN/Inf handling (skip the micro-batch on every rank; stop with a checkpoint after N in a row).

Data layout: the loader is split over ``world_size × accumulation`` *data ranks*; rank ``r`` feeds its
accumulation micro-step ``a`` from data rank ``r·A + a``. So step ``s`` trains on the same samples (and the
same image masks, drawn from a generator seeded by step and data rank) however the global batch is split
between ranks and accumulation — 1 rank × 2 accumulation steps equals 2 ranks × 1.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from mpma_ds.training.checkpoint import (
    ResumeError,
    check_compatible,
    find_checkpoint,
    load_checkpoint,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mpma_ds.training.config import Recipe, RecipeError, recipe_to_dict, save_recipe
from mpma_ds.training.engine import (
    build_engine,
    close_distributed,
    engine_memory,
    gradient_accumulation_steps,
    init_distributed,
    load_ds_config,
    resolve_ds_config,
    world_info,
    zero_stage,
)
from mpma_ds.training.metrics import StepMeter, device_peak_flops, memory_gb, sample_batch

LOSS_KEYS = ("loss", "loss_mlm", "loss_mim", "loss_global", "loss_local", "loss_itm")


class SetupError(ValueError):
    """Bad input found before training started (one line: what, where, what to do)."""


class NonFiniteLossError(RuntimeError):
    """``train.max_nan_steps`` micro-batches in a row had a NaN/Inf loss; a checkpoint was saved first."""


@dataclasses.dataclass
class Setup:
    """What setup resolved (all of it checked before any heavy work)."""

    rank: int
    world_size: int
    accumulation: int
    ds_config: dict[str, Any]
    model_config: Any
    tokenizer: Any
    loaders: list[Any]
    val_loader: Any
    resume_dir: Path | None


def prepare(recipe: Recipe, resume: str | None) -> Setup:
    """Every check that bad input can fail, in order of cost; raises ``SetupError``."""
    from mpma_ds.data import build_loader
    from mpma_ds.models import check_tokenizer_vocab, get_model_config
    from mpma_ds.tokenizer import load_tokenizer

    rank, world, _ = world_info()
    cfg = recipe.train
    loaders: list[Any] = []
    try:
        accumulation = gradient_accumulation_steps(cfg, world)
        ds_config = resolve_ds_config(load_ds_config(recipe.deepspeed_config), cfg, world)
        model_config = get_model_config(recipe.model.name, **recipe.model.overrides)
        if recipe.data.image_size % model_config.patch_size:
            raise SetupError(
                f"data.image_size={recipe.data.image_size} is not a multiple of the model's patch_size "
                f"{model_config.patch_size}"
            )
        if recipe.data.in_chans != model_config.in_chans:
            raise SetupError(f"data.in_chans={recipe.data.in_chans} but the model takes {model_config.in_chans}")
        if recipe.data.max_text_len > model_config.max_text_len:
            raise SetupError(
                f"data.max_text_len={recipe.data.max_text_len} exceeds the model's max_text_len "
                f"{model_config.max_text_len}; lower data.max_text_len"
            )
        if not recipe.data.tokenizer:
            raise SetupError("data.tokenizer is empty: set it to a tokenizer folder (data_tools.train_tokenizer)")
        tokenizer = load_tokenizer(recipe.data.tokenizer)
        check_tokenizer_vocab(model_config, tokenizer)
        resume_dir = None
        if resume:
            resume_dir = find_checkpoint(resume, cfg.output_dir)
            if resume_dir is not None:
                meta = read_meta(resume_dir)
                check_compatible(
                    meta,
                    model_name=recipe.model.name,
                    model_config=_arch_dict(model_config),
                    world_size=world,
                )
        loaders += [
            build_loader(
                recipe.data,
                rank * accumulation + a,
                world * accumulation,
                split="train",
                batch_size=cfg.micro_batch_size,
                tokenizer=tokenizer,
                seed=cfg.seed,
                train=True,
            )
            for a in range(accumulation)
        ]
        val_loader = None
        if cfg.eval_every:
            if not (recipe.data.val_shards or recipe.data.backend == "synthetic"):
                raise SetupError("train.eval_every > 0 needs data.val_shards (or set train.eval_every=0)")
            # every rank runs the whole validation pass: data rank 0 of 1, one deterministic pass
            val_loader = build_loader(
                recipe.data,
                0,
                1,
                split="validate",
                batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
                tokenizer=tokenizer,
                seed=cfg.seed,
                train=False,
            )
    except (SetupError, RecipeError, ResumeError) as err:
        _close_all(loaders)
        raise SetupError(str(err)) from err
    except (ValueError, FileNotFoundError, TypeError, KeyError, OSError) as err:
        _close_all(loaders)
        message = str(err).strip("'\"").replace("--set model.vocab_size=", "--set model.overrides.vocab_size=")
        raise SetupError(message) from err
    return Setup(rank, world, accumulation, ds_config, model_config, tokenizer, loaders, val_loader, resume_dir)


def _close_all(loaders: list[Any]) -> None:
    for loader in loaders:
        loader.close()


# Fields that change the computation but not the parameters: a checkpoint may resume across them.
_EFFICIENCY_FIELDS = {
    "grad_checkpointing",
    "attn_impl",
    "encoder_visible_only",
    "mlm_masked_only",
    "mim_masked_only",
    "image_init_from",
    "text_init_from",
}


def _arch_dict(model_config: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(model_config).items() if k not in _EFFICIENCY_FIELDS}


def _broadcast_object(value: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks (through the GPU when the group is NCCL); returns a CPU tensor."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        if torch.cuda.is_available():
            on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device)
            return on_device.cpu()
        dist.all_reduce(tensor)
    return tensor


def _to_device(batch: dict[str, Any], device: torch.device, image_dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; the image in the engine's compute dtype (DeepSpeed bf16 does not autocast)."""
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    out["image"] = out["image"].to(image_dtype)
    return out


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def mask_seed(seed: int, step: int, data_rank: int, attempt: int) -> int:
    """Seed of the image-mask generator for one micro-batch (independent of the rank/accumulation split)."""
    return (seed * 1_000_003 + step * 10_007 + data_rank * 101 + attempt) % (2**63 - 1)


def evaluate(engine, recipe: Recipe, val_loader, tokenizer, device: torch.device) -> dict[str, float]:
    """Retrieval / zero-shot AUROC on the validation split. Collective: every rank runs the whole pass."""
    from mpma_ds.eval import evaluate_alignment

    cfg = recipe.train
    try:
        batches = []
        for i, batch in enumerate(val_loader.loader):  # one deterministic pass each time
            if cfg.eval_max_batches and i >= cfg.eval_max_batches:
                break
            batches.append(batch)
        metrics = evaluate_alignment(
            engine.module, batches, tokenizer=tokenizer, device=device, max_text_len=recipe.data.max_text_len
        )
    finally:
        engine.module.train()
    return {f"eval/{k}": float(v) for k, v in metrics.items()}


def start_logging(recipe: Recipe, setup: Setup, run_id: str | None):
    """The run's logger on every rank: rank 0 opens (or, resuming, continues) the MLflow run and logs the
    flattened recipe + DeepSpeed config and both files; the run id is broadcast to the other ranks."""
    from mpma_ds.tracking import build_logger, flatten_params

    out = Path(recipe.train.output_dir)
    logger = None
    if setup.rank == 0:
        logger = build_logger(recipe.tracking, rank=0, run_dir=out, run_id=run_id)
        run_id = logger.run_id
    run_id = _broadcast_object(run_id)
    if setup.rank != 0:
        return build_logger(recipe.tracking, rank=setup.rank, run_dir=out, run_id=run_id)
    save_recipe(recipe, out / "recipe.yaml")
    (out / "ds_config.json").write_text(json.dumps(setup.ds_config, indent=2), encoding="utf-8")
    logger.log_params({**flatten_params(recipe_to_dict(recipe)), **flatten_params(setup.ds_config, "ds")})
    logger.log_artifact(out / "recipe.yaml")
    logger.log_artifact(out / "ds_config.json")
    return logger


def gather_memory(engine, world: int) -> list[dict[str, float]]:
    """``engine_memory`` of every rank (collective)."""
    import torch.distributed as dist

    memory = engine_memory(engine)
    if not (dist.is_initialized() and world > 1):
        return [memory]
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, memory)
    return per_rank


def train(recipe: Recipe, *, resume: str | None = None) -> dict[str, Any]:
    """Pretrain MPMA as ``recipe`` says; returns the final summary (also ``<output_dir>/summary.json``).

    Args:
        recipe: the resolved recipe (``load_recipe``).
        resume: ``"auto"`` (newest complete checkpoint in ``train.output_dir``, or a fresh start when there is
            none) or a checkpoint path; ``None`` starts fresh.

    Raises:
        SetupError: bad input, found before training started.
        NonFiniteLossError: too many NaN/Inf losses in a row (a checkpoint was saved first).
    """
    from mpma_ds.models import create_model
    from mpma_ds.models.flops import training_flops_per_sample

    setup = prepare(recipe, resume)
    cfg = recipe.train
    out = Path(cfg.output_dir)
    rank, world, accumulation = setup.rank, setup.world_size, setup.accumulation
    created_group = init_distributed()
    logger = None
    status = "FAILED"
    try:
        device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = create_model(recipe.model.name, **recipe.model.overrides)
        model.set_distributed(rank, world)
        flops_per_sample = training_flops_per_sample(
            model, sample_batch(recipe.data, model.config, setup.tokenizer), seed=cfg.seed
        )
        model.to(device)
        engine, _, scheduler = build_engine(model, recipe, ds_config=setup.ds_config, world_size=world)

        step, run_id = 0, None
        if setup.resume_dir is not None:
            client, rank_state = load_checkpoint(engine, setup.resume_dir, rank=rank)
            step, run_id = int(client["step"]), client.get("mlflow_run_id")
            for loader, state in zip(setup.loaders, rank_state["loaders"]):
                loader.load_state_dict(state)
            set_rng_state(rank_state["rng"])
        logger = start_logging(recipe, setup, run_id)
        run_id = logger.run_id

        meta = {
            "model_name": recipe.model.name,
            "model_config": _arch_dict(setup.model_config),
            "world_size": world,
            "zero_stage": zero_stage(setup.ds_config),
            "mlflow_run_id": run_id,
        }

        def checkpoint(at_step: int) -> None:
            save_checkpoint(
                engine,
                out / "checkpoints",
                at_step,
                rank=rank,
                client_state={"step": at_step, "mlflow_run_id": run_id, "model_name": recipe.model.name},
                rank_state={"loaders": [ld.state_dict() for ld in setup.loaders], "rng": rng_state()},
                meta=meta,
                keep_last=cfg.keep_last,
            )

        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else device_peak_flops(device)
        meter = StepMeter(flops_per_sample=flops_per_sample, peak_flops=peak * world)
        iters = [iter(ld.loader) for ld in setup.loaders]
        generator = torch.Generator(device=device)
        image_dtype = compute_dtype(setup.ds_config)
        terms = [k for k in LOSS_KEYS if k != "loss_itm" or setup.model_config.w_itm > 0]
        nan_in_row, nan_total, last_eval, last_saved = 0, 0, {}, -1
        start_step, t_start, step_losses = step, time.perf_counter(), {}
        engine.train()
        while step < cfg.max_steps:
            step_sums = torch.zeros(len(terms))
            done, attempt = 0, 0
            while done < accumulation:
                t0 = time.perf_counter()
                batch = next(iters[done])
                meter.add_wait(time.perf_counter() - t0)
                batch = _to_device(batch, device, image_dtype)
                generator.manual_seed(mask_seed(cfg.seed, step, rank * accumulation + done, attempt))
                losses = engine(batch, generator=generator)
                values = torch.stack([losses[k].detach().float().cpu() for k in terms])
                finite = bool(torch.isfinite(values).all())
                tokens = float(batch["attention_mask"].sum())
                # one all-reduce: the loss terms, how many ranks saw finite losses, non-padding tokens
                extra = torch.tensor([float(finite), tokens])
                packed = _all_reduce(torch.cat([torch.where(torch.isfinite(values), values, 0.0), extra]))
                if packed[-2].item() < world:  # some rank saw NaN/Inf: every rank skips this micro-batch
                    nan_in_row, nan_total, attempt = nan_in_row + 1, nan_total + 1, attempt + 1
                    if nan_in_row >= cfg.max_nan_steps:
                        checkpoint(step)
                        raise NonFiniteLossError(
                            f"{nan_in_row} micro-batches in a row had a NaN/Inf loss at step {step + 1}; saved "
                            f"checkpoint {out / 'checkpoints'} (step {step}); lower train.lr or check the data"
                        )
                    continue
                nan_in_row = 0
                engine.backward(losses["loss"])
                engine.step()
                step_sums += packed[:-2] / world
                meter.add_samples(cfg.micro_batch_size * world, float(packed[-1]))
                done += 1
            step += 1
            step_losses = {k: float(v) / accumulation for k, v in zip(terms, step_sums)}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                skipped = torch.tensor([float(sum(ld.stats()["skipped_samples"] for ld in setup.loaders))])
                skipped = _all_reduce(skipped)
                grad_norm = engine.get_global_grad_norm()
                metrics = {
                    **step_losses,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    **meter.rates(),
                    "memory_gb": memory_gb(device),
                    "skipped_samples": float(skipped.item()),
                    "nonfinite_skipped": float(nan_total),
                    "epoch": float(setup.loaders[0].stats().get("epoch", 0)),
                }
                logger.log_metrics(metrics, step=step)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                last_eval = evaluate(engine, recipe, setup.val_loader, setup.tokenizer, device)
                logger.log_metrics(last_eval, step=step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                checkpoint(step)
                last_saved = step

        if last_saved != step:
            checkpoint(step)
        per_rank = gather_memory(engine, world)  # after the steps: the optimizer state exists now
        wall = time.perf_counter() - t_start
        summary = {
            "step": step,
            "start_step": start_step,
            "final_losses": step_losses,
            "wall_s": wall,
            "steps_per_s": (step - start_step) / wall if wall > 0 else 0.0,
            "samples_per_s": (step - start_step) * cfg.global_batch_size / wall if wall > 0 else 0.0,
            "world_size": world,
            "accumulation": accumulation,
            "zero_stage": zero_stage(setup.ds_config),
            "flops_per_sample": flops_per_sample,
            "memory_per_rank": per_rank,
            "nonfinite_skipped": nan_total,
            "eval": last_eval,
            "mlflow_run_id": run_id,
            "checkpoint": str(out / "checkpoints" / f"step_{step:08d}"),
        }
        if rank == 0:
            (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
            logger.log_artifact(out / "summary.json")
        status = "FINISHED"
        return summary
    finally:
        for loader in [*setup.loaders, setup.val_loader]:
            if loader is not None:
                loader.close()
        if logger is not None:
            logger.close(status)
        if created_group:
            close_distributed()
