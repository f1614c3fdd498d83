"""Checkpoints that count only when complete, exact resume, and keeping the last K.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/                      engine.save_checkpoint (every rank writes its ZeRO partitions)
        rank_state_00000.pt             per rank: data-loader position + RNG states (python, numpy, torch)
        complete.json                   written by rank 0 after every rank finished: step, model, world
    latest                              the newest complete tag (moved last, atomically)
    best.json                           fine-tuning: the tag with the best validation metric (never pruned)

A kill -9 during a save leaves a tag folder without ``complete.json``: it is ignored by ``--resume auto``
and replaced by the next save of that step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpma_ds.models.config import MPMAConfig, architecture_difference
from mpma_ds.training.distributed import barrier

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

TAG_PREFIX = "step_"
COMPLETE_FILE = "complete.json"
LATEST_FILE = "latest"
BEST_FILE = "best.json"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed here (missing, incomplete, another architecture or world size)."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank_state_{rank:05d}.pt"


def complete_tags(ckpt_dir: str | Path) -> list[tuple[int, str]]:
    """``(step, tag)`` of every complete checkpoint in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    found = []
    if ckpt_dir.is_dir():
        for sub in ckpt_dir.iterdir():
            if sub.is_dir() and sub.name.startswith(TAG_PREFIX) and (sub / COMPLETE_FILE).is_file():
                try:
                    found.append((int(sub.name[len(TAG_PREFIX) :]), sub.name))
                except ValueError:
                    continue
    return sorted(found)


def read_meta(tag_dir: str | Path) -> dict[str, Any]:
    """The ``complete.json`` of a checkpoint; ``ResumeError`` when the checkpoint is incomplete."""
    path = Path(tag_dir) / COMPLETE_FILE
    if not path.is_file():
        raise ResumeError(f"{tag_dir} is not a complete checkpoint (no {COMPLETE_FILE}); resume from another one")
    return json.loads(path.read_text(encoding="utf-8"))


def find_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder (``.../checkpoints/step_N``) that ``--resume spec`` means.

    ``auto``: the newest complete one in ``output_dir/checkpoints`` (``None`` when there is none: a fresh
    start). Otherwise a path: a checkpoint folder itself, or a ``checkpoints/`` or run folder holding some.
    """
    if spec == "auto":
        tags = complete_tags(Path(output_dir) / "checkpoints")
        return Path(output_dir) / "checkpoints" / tags[-1][1] if tags else None
    path = Path(spec)
    if not path.exists():
        raise ResumeError(f"--resume {spec}: no such checkpoint folder")
    if (path / COMPLETE_FILE).is_file() or path.name.startswith(TAG_PREFIX):
        read_meta(path)
        return path
    for base in (path, path / "checkpoints"):
        tags = complete_tags(base)
        if tags:
            return base / tags[-1][1]
    raise ResumeError(f"--resume {spec}: holds no complete checkpoint (step_*/{COMPLETE_FILE})")


def check_compatible(
    meta: dict[str, Any],
    *,
    model_name: str,
    model_config: MPMAConfig,
    world_size: int,
    task: str = "pretrain",
    task_arch: dict[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint of another architecture, task or world size before anything is loaded.

    ``meta`` is the checkpoint's ``complete.json``; ``model_config`` the architecture this run builds (compared
    field by field with ``architecture_difference``); ``task``/``task_arch`` the fine-tuning head it adds.
    """
    where = meta.get("tag", "checkpoint")
    differ = architecture_difference(meta.get("model_config") or {}, model_config)
    if differ:
        raise ResumeError(
            f"checkpoint {where} holds model {meta.get('model_name')!r} (differs in {', '.join(differ[:6])}), but "
            f"the recipe builds {model_name!r}; resume with the recipe it was trained with or start a new "
            "train.output_dir"
        )
    saved_task = meta.get("task", "pretrain")
    if saved_task != task or (task_arch is not None and (meta.get("task_arch") or {}) != task_arch):
        raise ResumeError(
            f"checkpoint {where} was written by task {saved_task!r} ({meta.get('task_arch') or {}}), this run is "
            f"{task!r} ({task_arch or {}}); start a new train.output_dir"
        )
    if int(meta.get("world_size", world_size)) != world_size:
        raise ResumeError(
            f"checkpoint {where} was written by {meta.get('world_size')} ranks; resume it with the same number "
            f"of ranks (now {world_size}) or export it with launch/export.py"
        )


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a ``torch.load(weights_only=True)``-safe form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    engine: DeepSpeedEngine,
    ckpt_dir: str | Path,
    step: int,
    *,
    rank: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Save on every rank; rank 0 marks it complete, moves ``latest`` and prunes to ``keep_last``.

    Collective: every rank must call it at the same step. A step that already has a complete checkpoint is
    left as it is.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if (tag_dir / COMPLETE_FILE).is_file():
        # already saved at this step (a resume that had nothing left to do, or a NaN stop right after a
        # save): never delete a complete checkpoint to write the same step again
        return tag_dir
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a save of this step that a kill interrupted: start it over
            shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, rank_state_file(tag_dir, rank))
    barrier()  # every rank's files are on disk
    if rank == 0:
        info = dict(meta, step=step, tag=tag, time=time.time())
        _atomic_write(tag_dir / COMPLETE_FILE, json.dumps(info, indent=1, default=str))
        _atomic_write(ckpt_dir / LATEST_FILE, tag)
        prune(ckpt_dir, keep_last)
    barrier()
    return tag_dir


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete complete checkpoints beyond the newest ``keep_last`` and incomplete ones older than the newest
    complete one. Returns the deleted tags."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return []
    newest = tags[-1][0]
    best = read_best(ckpt_dir)
    keep = {best["tag"]} if best else set()
    removed = [tag for _, tag in tags[:-keep_last] if tag not in keep] if keep_last > 0 else []
    for sub in ckpt_dir.iterdir():
        if sub.is_dir() and sub.name.startswith(TAG_PREFIX) and not (sub / COMPLETE_FILE).is_file():
            try:
                if int(sub.name[len(TAG_PREFIX) :]) < newest:
                    removed.append(sub.name)
            except ValueError:
                continue
    for tag in removed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return removed


def read_best(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """``best.json`` (``tag``, ``step``, ``metric``, ``value``) when its checkpoint is complete, else ``None``."""
    path = Path(ckpt_dir) / BEST_FILE
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(best, dict) or not (Path(ckpt_dir) / str(best.get("tag")) / COMPLETE_FILE).is_file():
        return None
    return best


def mark_best(
    ckpt_dir: str | Path, step: int, metric: str, value: float, *, rank: int, keep_last: int = 0
) -> None:
    """Record the checkpoint of ``step`` as the best so far (rank 0 writes; the checkpoint must be complete).

    With ``keep_last`` > 0 the checkpoints are pruned again: the best this one replaces was spared by the prune
    of ``save_checkpoint`` (best.json still named it then) and would otherwise stay on disk for good.
    """
    if rank == 0:
        record = {"tag": tag_for(step), "step": step, "metric": metric, "value": value}
        _atomic_write(Path(ckpt_dir) / BEST_FILE, json.dumps(record, indent=1))
        if keep_last > 0:
            prune(Path(ckpt_dir), keep_last)
    barrier()


def load_checkpoint(
    engine: DeepSpeedEngine, tag_dir: str | Path, *, rank: int, full_state: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into ``engine``; return ``(client_state, rank_state)``.

    Weights, optimizer and scheduler are always loaded (a weights-only load is not consistent under every ZeRO
    stage); ``full_state`` also reads this rank's loader/RNG state (resume). False: the best checkpoint for the
    final test evaluation (``rank_state`` is then ``{}``).
    Collective: every rank calls it with the same ``tag_dir``.
    """
    tag_dir = Path(tag_dir)
    path, client_state = engine.load_checkpoint(
        str(tag_dir.parent),
        tag=tag_dir.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise ResumeError(f"DeepSpeed could not load {tag_dir}; the checkpoint is damaged")
    if not full_state:
        return client_state or {}, {}
    file = rank_state_file(tag_dir, rank)
    if not file.is_file():
        raise ResumeError(f"{file} is missing; the checkpoint was written by fewer ranks")
    rank_state = torch.load(file, map_location="cpu", weights_only=True)
    return client_state or {}, rank_state
