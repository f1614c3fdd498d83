"""Resuming a ZeRO-3 checkpoint on another world size, on DeepSpeed's universal checkpoint.

    ensure_universal(tag_dir, rank=r)        rank 0 converts step_N once (``ds_to_universal``) into step_N/universal/,
                                             recorded in complete.json's digests; every rank waits for it
    load_universal(engine, tag_dir)          DeepSpeed's ZeRO-3 universal load, re-partitioned for this world
    load_resharded(engine, tag_dir, ...)     the whole load: the above, plus this rank's loader positions (those of
                                             its data ranks, ``mpma_ds.data.plan.reshard_positions``) and RNG;
                                             returns what ``checkpoint.load_checkpoint`` does, so the Trainer
                                             restores both the same way
    elastic_batch(cfg, world, saved_world)   the recipe's global batch on the new world (micro-batch lowered only
                                             where it must be)

The rules (what is exact, what changes) are in docs/training.md, "Scaling".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpma_ds.data.plan import reshard_positions
from mpma_ds.distributed import all_reduce_sum
from mpma_ds.fileio import atomic_write_text, fsync_tree
from mpma_ds.training import checkpoint as ckpt
from mpma_ds.training.ds_config import elastic_micro_batch

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from mpma_ds.training.recipe import TrainConfig


def saved_world_size(meta: dict[str, Any], default: int) -> int:
    """The world size that wrote a checkpoint (``default`` for one that did not record it)."""
    return int(meta.get("world_size", default))


def ensure_universal(tag_dir: str | Path, *, rank: int) -> Path:
    """``tag_dir/universal``, DeepSpeed's universal form of a ZeRO-3 checkpoint, made by rank 0 when missing.

    Collective (every rank calls it; the others wait at a barrier, which ``train.collective_timeout_s`` bounds).
    The conversion (``deepspeed.checkpoint.ds_to_universal``, serial, its loads under ``safe_torch_load``) writes
    into ``checkpoints/.universal-step_N/`` and is moved into place when complete; then ``complete.json`` is
    rewritten atomically with the new files' sizes and sha256 and a ``universal`` record (world size converted
    from, seconds, bytes). A conversion killed half-way leaves nothing that is ever loaded: its folder is not
    recorded, ``verify_checkpoint`` ignores it and the next resume converts again.
    """
    tag_dir = Path(tag_dir)
    out = tag_dir / ckpt.UNIVERSAL_DIR
    failure: BaseException | None = None
    if rank == 0:
        try:
            meta = ckpt.read_meta(tag_dir)
            if ckpt.UNIVERSAL_KEY not in meta:
                _convert_to_universal(tag_dir, meta)
        except (OSError, RuntimeError, ValueError, AssertionError, KeyError) as err:
            failure = err
    failed = all_reduce_sum(torch.tensor([0.0 if failure is None else 1.0]))
    if failed.item():
        detail = " ".join(str(failure).split())[:200] if failure is not None else "see rank 0"
        raise ckpt.ResumeError(
            f"could not convert checkpoint {tag_dir} to DeepSpeed's universal form for another world size "
            f"({detail}); resume on {ckpt.read_meta(tag_dir).get('world_size')} ranks"
        ) from failure
    return out


def _convert_to_universal(tag_dir: Path, meta: dict[str, Any]) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # heavy: on a reshard only

    staging = tag_dir.parent / f".{ckpt.UNIVERSAL_DIR}-{tag_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(tag_dir / ckpt.UNIVERSAL_DIR, ignore_errors=True)  # an interrupted conversion's leftovers
    staging.mkdir(parents=True)
    target = staging / ckpt.UNIVERSAL_DIR
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    start = time.perf_counter()
    with ckpt.safe_torch_load(tag_dir), contextlib.redirect_stdout(_Quiet()), contextlib.redirect_stderr(_Quiet()):
        ds_to_universal(args)  # its prints and progress bars: the trainer prints one line instead
    fsync_tree(target)
    seconds = time.perf_counter() - start
    os.replace(target, tag_dir / ckpt.UNIVERSAL_DIR)
    shutil.rmtree(staging, ignore_errors=True)  # DeepSpeed's latest_universal pointer
    added = {
        f"{ckpt.UNIVERSAL_DIR}/{rel}": info
        for rel, info in ckpt.file_manifest(tag_dir / ckpt.UNIVERSAL_DIR).items()
    }
    record = {
        "from_world_size": meta.get("world_size"),
        "seconds": round(seconds, 3),
        "bytes": sum(info["size"] for info in added.values()),
        "files": len(added),
    }
    files = dict(meta.get(ckpt.FILES_KEY) or {})
    files.update(added)
    meta = dict(meta, **{ckpt.FILES_KEY: files, ckpt.UNIVERSAL_KEY: record})
    atomic_write_text(tag_dir / ckpt.COMPLETE_FILE, json.dumps(meta, indent=1, default=str))


class _Quiet:
    """A stream that drops DeepSpeed's converter prints and progress bars (failures still raise)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def read_rank_states(tag_dir: str | Path, world_size: int) -> list[dict[str, Any]]:
    """The ``rank_state`` of every rank that wrote ``tag_dir`` (``world_size`` of them), in rank order."""
    states = []
    for rank in range(world_size):
        file = ckpt.rank_state_file(Path(tag_dir), rank)
        if not file.is_file():
            raise ckpt.ResumeError(f"{file} is missing; the checkpoint is incomplete, resume from another one")
        states.append(torch.load(file, map_location="cpu", weights_only=True))
    return states


def load_universal(engine: DeepSpeedEngine, tag_dir: Path) -> dict[str, Any]:
    """DeepSpeed's universal load of ``tag_dir/universal`` into a ZeRO-3 engine of any world size.

    ``load_universal`` is switched on only for this call (DeepSpeed reads it from the engine's config; left on, a
    later load of a regular checkpoint in the same process, e.g. the best one for the final test, would look for
    a universal one). DeepSpeed 0.19's ZeRO-3 universal loader gives every optimizer parameter group the
    hyper-parameters of group 0 (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``): weight decay would
    then reach the norms, biases and embeddings that group 1 exempts. Each group's own values are put back from
    the converted optimizer state, which keeps them in group order. It also hands every group the same ``step``
    tensor, which torch's AdamW increments in place once per group: with two groups Adam's step count (and so
    its bias correction) would run twice as fast after the resume. Each group gets its own copy.
    """
    source = tag_dir / ckpt.UNIVERSAL_DIR
    optim_file = source / "zero" / "optimizer_state.pt"
    config = engine._config  # noqa: SLF001 - DeepSpeed reads load_universal from here at load time
    was = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with ckpt.safe_torch_load(source):
            path, client_state = engine.load_checkpoint(
                str(tag_dir), tag=ckpt.UNIVERSAL_DIR, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            # mmap: the file holds rank 0's whole optimizer state (GBs); only the groups are read here
            saved = torch.load(optim_file, map_location="cpu", mmap=True)
            saved_groups = saved["optimizer_state_dict"]["param_groups"]
            del saved
    finally:
        config.load_universal_checkpoint = was
    if path is None:
        raise ckpt.ResumeError(f"DeepSpeed could not load the universal checkpoint {source}; it is damaged")
    groups = _base_optimizer(engine).param_groups
    if len(saved_groups) != len(groups):
        raise ckpt.ResumeError(
            f"checkpoint {tag_dir.name} has {len(saved_groups)} optimizer parameter groups, this run builds "
            f"{len(groups)}; resume with the recipe it was trained with"
        )
    for group, saved in zip(groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for state in _base_optimizer(engine).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()  # one tensor per group (see above)
    return client_state or {}


def _base_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def elastic_batch(cfg: TrainConfig, world: int, saved_world: int) -> None:
    """Resuming on another world size: keep the recipe's global batch; lower ``cfg.micro_batch_size`` where the
    recipe's does not divide ``global / world`` (the accumulation steps make up the rest), with one warning;
    evaluation keeps the old batch size. ``ConfigError`` when the global batch does not split over ``world``."""
    micro = elastic_micro_batch(cfg, world)
    if micro == cfg.micro_batch_size:
        return
    warnings.warn(
        f"the checkpoint was written by {saved_world} ranks, this run has {world}: train.micro_batch_size "
        f"{cfg.micro_batch_size} -> {micro} keeps train.global_batch_size={cfg.global_batch_size} "
        f"({micro} x {cfg.global_batch_size // (micro * world)} accumulation x {world} ranks)",
        ckpt.CheckpointWarning,
        stacklevel=3,
    )
    if not cfg.eval_batch_size:
        cfg.eval_batch_size = cfg.micro_batch_size  # evaluation batches stay what they were
    cfg.micro_batch_size = micro


def load_resharded(
    engine: DeepSpeedEngine, tag_dir: Path, *, saved_world: int, rank: int, world_size: int, accumulation: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a ZeRO-3 checkpoint written by ``saved_world`` ranks on this world size: DeepSpeed's universal
    checkpoint (converted once, cached in ``tag_dir/universal``) re-partitions weights and Adam moments into
    ``engine``. Returns ``(client_state, rank_state)`` like ``checkpoint.load_checkpoint``: ``rank_state``'s
    ``loaders`` are the positions of this rank's data ranks (``reshard_positions``), its ``rng`` that of old
    rank ``rank mod saved_world`` (masks and data order do not depend on it: they are seeded per step and data
    rank)."""
    if rank == 0:
        warnings.warn(
            f"resuming {tag_dir.name}, written by {saved_world} ranks, on {world_size}: through DeepSpeed's "
            f"universal checkpoint ({tag_dir / ckpt.UNIVERSAL_DIR})",
            ckpt.CheckpointWarning,
            stacklevel=3,
        )
    ensure_universal(tag_dir, rank=rank)
    client = load_universal(engine, tag_dir)
    old = read_rank_states(tag_dir, saved_world)
    try:
        positions = reshard_positions(
            [state for rank_state in old for state in rank_state["loaders"]],
            world_size * accumulation,
            [rank * accumulation + a for a in range(accumulation)],
        )
    except ValueError as err:
        raise ckpt.ResumeError(f"checkpoint {tag_dir.name}: {' '.join(str(err).split())}") from err
    return client, {"loaders": positions, "rng": old[rank % len(old)]["rng"]}
