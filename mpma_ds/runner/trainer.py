"""``Trainer``: one loop for pretraining and every fine-tuning task (torchtitan ``trainer.py`` is the model).

    with Trainer(recipe, task) as trainer:       # build: checks, process group, loaders, model, engine, resume
        summary = trainer.fit()                  # train_step ... evaluate ... save ... final test

Building runs every check bad input can fail before heavy work (batch arithmetic, DeepSpeed JSON, model,
tokenizer vocabulary, the task's own inputs, shards, resume target) and turns each failure into one
``SetupError`` line. A step: one micro-batch per accumulation stream, NaN/Inf handling (every rank skips a
micro-batch that is not finite anywhere; ``train.max_nan_steps`` in a row save a checkpoint and stop), losses
all-reduced for logging. Evaluation every ``eval_every`` steps on the validation split (every rank runs the
whole pass: ZeRO-3 forwards are collective), the best checkpoint by ``best_metric`` kept, early stopping,
checkpoints on every rank, and at the end the test split evaluated on the best checkpoint.

Data layout: the loader is split over ``world_size × accumulation`` *data ranks*; rank ``r`` feeds its
accumulation micro-step ``a`` from data rank ``r·A + a``. So step ``s`` trains on the same samples (and the
same image masks, drawn from a generator seeded by step and data rank) however the global batch is split
between ranks and accumulation — 1 rank × 2 accumulation steps equals 2 ranks × 1.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpma_ds.config import ConfigError, to_dict
from mpma_ds.distributed import (
    CollectiveTimeoutError,
    all_gather_objects,
    all_reduce_sum,
    broadcast_object,
    close_distributed,
    init_distributed,
    is_collective_timeout,
    world_info,
)
from mpma_ds.eval import loggable_metrics
from mpma_ds.fileio import atomic_write_text
from mpma_ds.models.flops import training_flops_per_sample
from mpma_ds.runner.init import resolve_init
from mpma_ds.tasks.base import RunContext, Task
from mpma_ds.tasks.registry import build_task
from mpma_ds.tracking import build_logger, flatten_params
from mpma_ds.tracking.params import json_safe
from mpma_ds.training import checkpoint as ckpt
from mpma_ds.training import data_skips, notices, reshard
from mpma_ds.training.checkpoint import rng_state
from mpma_ds.training.ds_config import (
    compute_dtype,
    gradient_accumulation_steps,
    load_ds_config,
    resolve_ds_config,
    zero_stage,
)
from mpma_ds.training.engine import build_engine, engine_memory
from mpma_ds.training.metrics import StepMeter, device_peak_flops, memory_gb, remote_counters, source_counters
from mpma_ds.training.recipe import RECIPE_FILE, FinetuneRecipe, Recipe, save_recipe
from mpma_ds.training.run_folder import (  # noqa: F401 - the file names stay importable from here
    DS_CONFIG_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    clear_run,
    existing_run,
)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from mpma_ds.tracking import MetricLogger

# Bad input: one line and exit 2 (SetupError). A TypeError or KeyError is a bug in the code, not in the recipe:
# it keeps its traceback (exit 1).
_SETUP_ERRORS = (ConfigError, ckpt.ResumeError, ValueError, OSError)


class SetupError(ValueError):
    """Bad input found before training started (one line: what, where, what to do)."""


class NonFiniteLossError(RuntimeError):
    """``train.max_nan_steps`` skips in a row (NaN/Inf losses or gradients); a checkpoint was saved first."""


def mask_seed(seed: int, step: int, data_rank: int, attempt: int) -> int:
    """Seed of the image-mask generator for one micro-batch (independent of the rank/accumulation split)."""
    return (seed * 1_000_003 + step * 10_007 + data_rank * 101 + attempt) % (2**63 - 1)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).strip("'\"").split())


def _to_device(batch: dict[str, Any], device: torch.device, image_dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; float inputs in the engine's compute dtype (DeepSpeed bf16 does not autocast)."""
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for key in ("image", "features"):
        if key in out and torch.is_tensor(out[key]):
            out[key] = out[key].to(image_dtype)
    return out


class Trainer:
    """Builds and runs one training job of ``task`` (default: the recipe's own task) as ``recipe`` says.

    Args:
        recipe: the resolved recipe (``load_recipe``).
        task: the task object; ``None`` builds it from the recipe (``mpma_ds.tasks.build_task``).
        resume: ``"auto"`` (newest intact complete checkpoint in ``train.output_dir``, or a fresh start when there
            is none) or a checkpoint path; ``None`` starts fresh.
        overwrite: a fresh start in a ``train.output_dir`` that already holds a run removes that run's files
            first; without it such a folder is refused (a new run is never mixed into an old one).

    Raises:
        SetupError: bad input, found before training started.
    """

    def __init__(
        self, recipe: Recipe, task: Task | None = None, *, resume: str | None = None, overwrite: bool = False
    ) -> None:
        self.recipe = recipe
        self.task = task if task is not None else build_task(recipe)
        self.cfg = recipe.train
        self.out = Path(self.cfg.output_dir)
        self.loaders: list[Any] = []
        self.val_loader: Any = None
        self.engine: DeepSpeedEngine | None = None
        self.logger: MetricLogger | None = None
        self.created_group = False
        self.closed = False
        self.step = 0
        self.run_id: str | None = None
        self.best: dict[str, Any] | None = None
        self.evals_without_gain = 0
        self.nan_total = 0
        self.grad_skipped = 0
        self.last_eval: dict[str, Any] = {}
        self.reshard_from: int | None = None  # world size of a checkpoint resumed on another one
        self.ctx, resume_dir = self._resolve(resume, overwrite)
        self.resumed = resume_dir is not None
        try:
            self.created_group = init_distributed(self.cfg.collective_timeout_s)
            try:
                self.loaders, self.val_loader = self.task.build_loaders(self.ctx)
                self.max_steps, self.eval_every = self.cfg.steps_for(self.loaders[0].steps_per_epoch)
                skip_note = data_skips.check_at_start(self.loaders, recipe.data.max_skipped_fraction)
            except _SETUP_ERRORS as err:
                raise SetupError(_one_line(err)) from err
            self._build_engine()
            if resume_dir is not None:
                try:
                    self.resume(resume_dir)
                except ckpt.ResumeError as err:
                    raise SetupError(_one_line(err)) from err
            if resume is None:  # after every input check, before the first write into the folder
                self._fresh_folder(self.ctx.rank, overwrite)
            self.logger = self._start_logging()
            notices.announce_start(self, skip_note, resume_dir)
        except BaseException:
            self.close("FAILED")
            raise

    # ---------------------------------------------------------------------------------------------- build
    def _resolve(self, resume: str | None, overwrite: bool = False) -> tuple[RunContext, Path | None]:
        """Every check that bad input can fail, in order of cost, before any process group exists."""
        try:
            rank, world, local_rank = world_info()
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
            resume_dir = meta = None
            if resume:
                resume_dir = ckpt.find_checkpoint(resume, self.cfg.output_dir, set_aside=rank == 0)
                meta = ckpt.read_meta(resume_dir) if resume_dir is not None else None
            if meta is not None and reshard.saved_world_size(meta, world) != world:
                reshard.elastic_batch(self.cfg, world, reshard.saved_world_size(meta, world))
            accumulation = gradient_accumulation_steps(self.cfg, world)
            ds_config = resolve_ds_config(load_ds_config(self.recipe.deepspeed_config), self.cfg, world)
            ctx = RunContext(self.recipe, rank, world, accumulation, ds_config, device)
            self.task.check_inputs()  # the shards, cheapest first
            if isinstance(self.recipe, FinetuneRecipe):  # the runner resolves init.from; the task builds on it
                ctx.init = resolve_init(self.recipe)
            self.task.resolve(ctx)
            if meta is not None:
                resharded = ckpt.check_compatible(
                    meta,
                    model_name=self.recipe.model.name,
                    model_config=ctx.model_config,
                    world_size=world,
                    task=self.task.name,
                    task_arch=self.task.architecture(ctx),
                    zero_stage=zero_stage(ds_config),
                )
                self.reshard_from = reshard.saved_world_size(meta, world) if resharded else None
        except _SETUP_ERRORS as err:
            raise SetupError(_one_line(err)) from err
        return ctx, resume_dir

    def _fresh_folder(self, rank: int, overwrite: bool) -> None:
        """A fresh start: refuse a folder that holds another run, or (``overwrite``) remove that run first."""
        if self.out.exists() and not self.out.is_dir():
            raise SetupError(f"train.output_dir {self.out} is a file; give a folder path")
        found = existing_run(self.out)
        if not found:
            return
        if not overwrite:
            raise SetupError(
                f"train.output_dir {self.out} already holds a run ({', '.join(found)}); continue it with --resume "
                "auto, replace it with --overwrite, or choose another train.output_dir"
            )
        if rank == 0:
            clear_run(self.out)

    def _build_engine(self) -> None:
        ctx = self.ctx
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        try:
            model = self.task.build_model(ctx)
        except _SETUP_ERRORS as err:
            raise SetupError(_one_line(err)) from err
        sample = self.task.flops_batch(ctx)
        self.flops_per_sample = training_flops_per_sample(model, sample, seed=self.cfg.seed) if sample else 0.0
        model.to(ctx.device)
        self.engine, _, self.scheduler = build_engine(
            model,
            self.cfg,
            ctx.ds_config,
            world_size=ctx.world_size,
            max_steps=self.max_steps,
            lr_scales=self.task.lr_scales(model),
        )
        peak = self.cfg.peak_tflops * 1e12 if self.cfg.peak_tflops else device_peak_flops(ctx.device)
        self.meter = StepMeter(flops_per_sample=self.flops_per_sample, peak_flops=peak * ctx.world_size)
        self.image_dtype = compute_dtype(ctx.ds_config)
        self.generator = torch.Generator(device=ctx.device)
        self.iters = [iter(loader.loader) for loader in self.loaders]
        keys = getattr(self.task, "active_loss_keys", self.task.loss_keys)
        self.loss_keys = tuple(keys)
        best = self.cfg.best_metric or self.task.default_best_metric
        self.best_metric = best
        self.best_mode = self.cfg.mode_for(best) if best else "max"

    def _start_logging(self) -> MetricLogger:
        """The run's logger on every rank: rank 0 opens (or, resuming, continues) the MLflow run and logs the
        flattened recipe + DeepSpeed config and both files; the run id is broadcast to the other ranks."""
        ctx = self.ctx
        tags = {**self.recipe.tracking.tags, **self.task.tags(ctx), **self.task.comparison_tags()}
        logger = None
        if ctx.rank == 0:
            logger = build_logger(
                self.recipe.tracking,
                rank=0,
                run_dir=self.out,
                run_id=self.run_id,
                tags=tags,
                console_steps=self.max_steps,
                resume=self.resumed,
            )
            self.run_id = logger.run_id
        self.run_id = broadcast_object(self.run_id)
        if ctx.rank != 0:
            return build_logger(self.recipe.tracking, rank=ctx.rank, run_dir=self.out, run_id=self.run_id)
        save_recipe(self.recipe, self.out / RECIPE_FILE)
        atomic_write_text(self.out / DS_CONFIG_FILE, json.dumps(ctx.ds_config, indent=2))
        # what data.label_fraction_cover added to the subset: subset.cover.patients_added, .samples_added, .labels
        cover = (ctx.subset or {}).get("cover")
        logger.log_params({**flatten_params(to_dict(self.recipe)), **flatten_params(ctx.ds_config, "ds"),
                           **(flatten_params(cover, "subset.cover") if cover else {}),
                           **self.recipe.tracking.params})  # fmt: skip
        logger.log_artifact(self.out / RECIPE_FILE)
        logger.log_artifact(self.out / DS_CONFIG_FILE)
        return logger

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's client state holds besides DeepSpeed's own: step, run id, best so far."""
        return {
            "step": self.step,
            "mlflow_run_id": self.run_id,
            "model_name": self.recipe.model.name,
            "task": self.task.name,
            "best": self.best,
            "evals_without_gain": self.evals_without_gain,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.run_id = state.get("mlflow_run_id")
        self.best = state.get("best")
        self.evals_without_gain = int(state.get("evals_without_gain", 0))

    def _meta(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "model_name": self.recipe.model.name,
            "model_config": ctx.model_config.architecture(),
            "task": self.task.name,
            "task_arch": self.task.architecture(ctx),
            "world_size": ctx.world_size,
            "zero_stage": zero_stage(ctx.ds_config),
            "mlflow_run_id": self.run_id,
        }

    def save(self, step: int | None = None) -> Path:
        """A checkpoint of ``step`` (default: now) on every rank; complete only when every rank wrote it."""
        step = self.step if step is None else step
        return ckpt.save_checkpoint(
            self.engine,
            self.out / "checkpoints",
            step,
            rank=self.ctx.rank,
            client_state=dict(self.state_dict(), step=step),
            rank_state={"loaders": [ld.state_dict() for ld in self.loaders], "rng": rng_state()},
            meta=self._meta(),
            keep_last=self.cfg.keep_last,
        )

    def resume(self, tag_dir: str | Path) -> None:
        """Continue from checkpoint ``tag_dir``: weights, optimizer, schedule, data position, RNG, best so far."""
        ctx = self.ctx
        if self.reshard_from is not None:  # another world size: DeepSpeed's universal checkpoint
            client, rank_state = reshard.load_resharded(
                self.engine,
                Path(tag_dir),
                saved_world=self.reshard_from,
                rank=ctx.rank,
                world_size=ctx.world_size,
                accumulation=ctx.accumulation,
            )
        else:  # find_checkpoint verified the files in _resolve
            client, rank_state = ckpt.load_checkpoint(self.engine, tag_dir, rank=ctx.rank, verify=False)
        self.load_state_dict(client)
        try:
            for loader, state in zip(self.loaders, rank_state["loaders"]):
                loader.load_state_dict(state)
        except ValueError as err:  # a loader position this run cannot take: bad input, one line
            raise ckpt.ResumeError(f"checkpoint {Path(tag_dir).name}: {' '.join(str(err).split())}") from err
        self.iters = [iter(loader.loader) for loader in self.loaders]
        ckpt.set_rng_state(rank_state["rng"])

    # ---------------------------------------------------------------------------------------------- steps
    def train_step(self) -> dict[str, float]:
        """One optimizer step (``accumulation`` micro-batches); returns the step's mean loss terms.

        A micro-batch whose loss is NaN/Inf on any rank is skipped (never backpropagated) and replaced by the
        next one; a step whose gradients are NaN/Inf although every loss was finite is not applied (DeepSpeed's
        ZeRO optimizers drop it; without ZeRO the gradients are cleared here) and is redone on the next
        micro-batches. ``train.max_nan_steps`` such skips without an applied step in between save a checkpoint
        and raise ``NonFiniteLossError``.
        """
        ctx, cfg, engine = self.ctx, self.cfg, self.engine
        sums = torch.zeros(len(self.loss_keys))
        done, attempt, nan_in_row = 0, 0, 0
        while done < ctx.accumulation:
            t0 = time.perf_counter()
            batch = next(self.iters[done])
            self.meter.add_wait(time.perf_counter() - t0)
            batch = _to_device(self.task.to_model(batch), ctx.device, self.image_dtype)
            data_rank = ctx.rank * ctx.accumulation + done
            self.generator.manual_seed(mask_seed(cfg.seed, self.step, data_rank, attempt))
            losses = engine(batch, generator=self.generator)
            values = torch.stack([losses[k].detach().float().cpu() for k in self.loss_keys])
            finite = bool(torch.isfinite(values).all())
            tokens = float(batch["attention_mask"].sum()) if "attention_mask" in batch else 0.0
            # one all-reduce: the loss terms, how many ranks saw finite losses, non-padding tokens
            extra = torch.tensor([float(finite), tokens])
            packed = all_reduce_sum(torch.cat([torch.where(torch.isfinite(values), values, 0.0), extra]))
            if packed[-2].item() < ctx.world_size:  # some rank saw NaN/Inf: every rank skips this micro-batch
                nan_in_row, attempt = nan_in_row + 1, attempt + 1
                self.nan_total += 1
                self._stop_if_too_many(nan_in_row, "had a NaN/Inf loss")
                continue
            engine.backward(losses["loss"])
            boundary = done == ctx.accumulation - 1
            if boundary and self.plain_optimizer:
                self._drop_nonfinite_grads()
            engine.step()
            sums += packed[:-2] / ctx.world_size
            self.meter.add_samples(cfg.micro_batch_size * ctx.world_size, float(packed[-1]))
            done += 1
            if boundary and not engine.was_step_applied():  # non-finite gradients: the step was not applied
                nan_in_row, attempt = nan_in_row + 1, attempt + 1
                self.grad_skipped += 1
                self._stop_if_too_many(nan_in_row, "had NaN/Inf gradients (finite loss)")
                sums.zero_()
                done = 0
        self.step += 1
        return {k: float(v) / ctx.accumulation for k, v in zip(self.loss_keys, sums)}

    def _stop_if_too_many(self, in_row: int, what: str) -> None:
        if in_row < self.cfg.max_nan_steps:
            return
        self.save()
        raise NonFiniteLossError(
            f"{in_row} skips in a row at step {self.step + 1}, the last one {what}; saved checkpoint "
            f"{self.out / 'checkpoints'} (step {self.step}); lower train.lr or check the data, then --resume auto"
        )

    @property
    def plain_optimizer(self) -> bool:
        """True when DeepSpeed steps a plain torch optimizer (no ZeRO, no fp16/bf16 wrapper), which applies
        whatever gradients it gets: the trainer then checks them itself."""
        return zero_stage(self.ctx.ds_config) == 0 and isinstance(self.engine.optimizer, torch.optim.Optimizer)

    def _drop_nonfinite_grads(self) -> None:
        """Without ZeRO: when any gradient is NaN/Inf on any rank, make the coming ``engine.step()`` leave every
        parameter and optimizer moment alone (the torch optimizer's ``step`` is a no-op for that one call;
        DeepSpeed still clears the gradients) and mark it an overflow, so DeepSpeed counts it as skipped and
        leaves the learning-rate schedule where it was."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        bad = sum(float((~torch.isfinite(g)).any()) for g in grads)
        bad = all_reduce_sum(torch.tensor([bad])).item() > 0
        optimizer = self.engine.optimizer
        optimizer.overflow = bad
        if bad:

            def skip_once(*args: Any, **kwargs: Any) -> None:
                del optimizer.step  # the class's own step again from the next call on

            optimizer.step = skip_once

    def _log_step(self, losses: dict[str, float]) -> None:
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            **losses,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            **self.meter.rates(),
            "memory_gb": memory_gb(self.ctx.device),
            **data_skips.loader_metrics(self.loaders, self.step * self.cfg.global_batch_size, self.recipe.data),
            **source_counters(self.loaders, self.recipe.data.train_sources),  # data/samples/<source>
            **remote_counters(self.loaders),  # data/remote_retries, data/remote_bytes
            "nonfinite_skipped": float(self.nan_total),
            "nonfinite_grad_skipped": float(self.grad_skipped),
        }
        self.logger.log_metrics(metrics, step=self.step)

    def evaluate(self, split: str = "validate", *, n_resamples: int = 0, keep: dict[str, Any] | None = None,
                 source: Any = None) -> dict[str, Any]:  # fmt: skip
        """The task's metrics on one deterministic pass over ``split`` (collective: every rank runs it).

        Returns names prefixed ``eval/`` (validation) or ``<split>/`` (e.g. ``test/accuracy_overall``); with
        ``n_resamples`` > 0, bootstrap 95 % intervals beside them (``<metric>_ci95: [low, high]``). ``source``: a
        ``data.train_sources`` entry: its ``val_shards`` instead, as ``eval/<name>/<metric>``.
        """
        own = source is not None or not (split == "validate" and self.val_loader is not None)
        loader = self.task.eval_loader(self.ctx, split, source) if own else self.val_loader
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            batches = (
                _to_device(self.task.to_model(b), self.ctx.device, self.image_dtype)
                for i, b in enumerate(loader.loader)
                if not (self.cfg.eval_max_batches and i >= self.cfg.eval_max_batches)
            )
            metrics = self.task.evaluate(module, batches, self.ctx, n_resamples=n_resamples, keep=keep)
        finally:
            module.train(was_training)
            if own:
                loader.close()
        prefix = f"eval/{source.name}" if source is not None else "eval" if split == "validate" else split
        return {f"{prefix}/{k}": v for k, v in metrics.items()}

    def _log_eval(self, metrics: dict[str, Any]) -> None:
        self.logger.log_metrics(loggable_metrics(metrics), step=self.step)

    def _track_best(self, metrics: dict[str, float]) -> bool:
        """Update the best record with this evaluation; True when it improved."""
        key = f"eval/{self.best_metric}"
        if key not in metrics:
            raise SetupError(
                f"train.best_metric {self.best_metric!r} is not among the task's metrics "
                f"({', '.join(sorted(k.split('/', 1)[1] for k in metrics))})"
            )
        value = float(metrics[key])
        if math.isnan(value):
            return False
        better = self.best is None or (
            value > self.best["value"] if self.best_mode == "max" else value < self.best["value"]
        )
        if better:
            self.best = {"step": self.step, "metric": self.best_metric, "value": value}
            self.evals_without_gain = 0
        else:
            self.evals_without_gain += 1
        return better

    # ---------------------------------------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or an early stop), then evaluate the best checkpoint on the test split;
        returns the summary (also ``<output_dir>/summary.json``)."""
        cfg, ctx = self.cfg, self.ctx
        start_step, t_start = self.step, time.perf_counter()
        losses: dict[str, float] = {}
        last_saved, stopped_early = -1, False
        self.engine.train()
        while self.step < self.max_steps:
            losses = self.train_step()
            if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                self._log_step(losses)
            notices.first_step(self, start_step, cfg.log_every)
            evaluate_now = self.eval_every and (self.step % self.eval_every == 0 or self.step == self.max_steps)
            improved = False
            if evaluate_now:
                self.last_eval = self.evaluate("validate")
                self._log_eval(self.last_eval)
                for source in (s for s in self.recipe.data.train_sources if s.val_shards):  # a mixture's, each
                    self._log_eval(self.evaluate("validate", source=source))
                if self.best_metric:
                    improved = self._track_best(self.last_eval)
            stop = bool(cfg.early_stopping and self.evals_without_gain >= cfg.early_stopping)
            if (
                (cfg.save_every and self.step % cfg.save_every == 0)
                or self.step == self.max_steps
                or improved
                or stop
            ):
                self.save()
                last_saved = self.step
                if improved:
                    ckpt.mark_best(
                        self.out / "checkpoints",
                        self.step,
                        self.best_metric,
                        self.best["value"],
                        rank=ctx.rank,
                        keep_last=cfg.keep_last,
                    )
            if stop:
                stopped_early = True
                break
        if self.max_steps == 0 and self.val_loader is not None:  # evaluation only (zero_shot)
            self.last_eval = self.evaluate("validate")
            self._log_eval(self.last_eval)
        elif last_saved != self.step:
            self.save()
        wall = time.perf_counter() - t_start
        per_rank = all_gather_objects(self._memory())  # after the steps: the optimizer state exists now
        test = self._final_test()
        summary = {
            "task": self.task.name,
            "step": self.step,
            "max_steps": self.max_steps,
            "start_step": start_step,
            "stopped_early": stopped_early,
            "final_losses": losses,
            "wall_s": wall,
            "steps_per_s": (self.step - start_step) / wall if wall > 0 else 0.0,
            "samples_per_s": (self.step - start_step) * cfg.global_batch_size / wall if wall > 0 else 0.0,
            "world_size": ctx.world_size,
            "accumulation": ctx.accumulation,
            "zero_stage": zero_stage(ctx.ds_config),
            "flops_per_sample": self.flops_per_sample,
            "memory_per_rank": per_rank,
            "nonfinite_skipped": self.nan_total,
            "nonfinite_grad_skipped": self.grad_skipped,
            "eval": self.last_eval,
            "best": self.best,
            "test": test,
            "mlflow_run_id": self.run_id,
            "checkpoint": str(self.out / "checkpoints" / ckpt.tag_for(self.step)),
            **self.task.summary(ctx),
        }
        if ctx.rank == 0:
            text = json.dumps(json_safe(summary), indent=1, default=str)
            atomic_write_text(self.out / SUMMARY_FILE, text)
            self.logger.log_artifact(self.out / SUMMARY_FILE)
        self.status = "FINISHED"
        return summary

    def _memory(self) -> dict[str, float]:
        return engine_memory(self.engine)

    def _final_test(self) -> dict[str, Any] | None:
        """Test-split metrics of the best checkpoint (else the last weights); None without ``data.test_shards``."""
        if not (self.task.test_after_training and self.recipe.data.test_shards):
            return None
        if self.best is not None and self.best["step"] != self.step:
            best_dir = self.out / "checkpoints" / ckpt.tag_for(self.best["step"])
            ckpt.load_checkpoint(self.engine, best_dir, rank=self.ctx.rank, full_state=False)
        predictions: dict[str, Any] = {}
        metrics = self.evaluate("test", n_resamples=self.task.bootstrap_resamples, keep=predictions)
        metrics["test/step"] = float(self.best["step"] if self.best else self.step)
        if predictions and self.ctx.rank == 0:  # per-sample outputs, for paired comparisons between runs
            torch.save(predictions, self.out / PREDICTIONS_FILE)
            self.logger.log_artifact(self.out / PREDICTIONS_FILE)  # compare_runs' paired intervals read it
        self._log_eval(metrics)
        return metrics

    def close(self, status: str | None = None) -> None:
        """Stop loaders, end the MLflow run, leave the process group this trainer created. Idempotent."""
        if self.closed:
            return
        self.closed = True
        status = status or getattr(self, "status", "FAILED")
        for loader in [*self.loaders, self.val_loader]:
            if loader is not None:
                loader.close()
        if self.logger is not None:
            self.logger.close(status)
        if self.created_group:
            close_distributed()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and getattr(self, "status", "") == "FINISHED":
            status = "FINISHED"
        elif exc_type is not None and issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C, SIGTERM (the CLIs)
            status = "KILLED"
        else:
            status = "FAILED"
        self.close(status)


def train(
    recipe: Recipe, *, resume: str | None = None, task: Task | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Build a ``Trainer`` for ``recipe`` and run it to the end; returns the summary.

    Raises:
        SetupError: bad input (before training started).
        NonFiniteLossError: too many NaN/Inf losses or gradients in a row (a checkpoint was saved).
        CheckpointSaveError: a checkpoint could not be written (disk full); the earlier ones are intact.
        CollectiveTimeoutError: another rank did not reach a collective within ``train.collective_timeout_s``.
    """
    with Trainer(recipe, task, resume=resume, overwrite=overwrite) as trainer:
        try:
            return trainer.fit()
        except RuntimeError as err:
            if isinstance(err, (NonFiniteLossError, ckpt.CheckpointSaveError)) or not is_collective_timeout(err):
                raise
            raise CollectiveTimeoutError(
                f"rank {trainer.ctx.rank}: a collective did not complete within train.collective_timeout_s="
                f"{trainer.cfg.collective_timeout_s:g} s at step {trainer.step + 1} (another rank is hung, dead or "
                f"far slower: {_one_line(err)[:160]}); resume with --resume auto once the cause is fixed"
            ) from err
