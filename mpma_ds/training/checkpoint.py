"""Checkpoints that count only when complete, exact resume, and keeping the last K.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/                      engine.save_checkpoint (every rank writes its ZeRO partitions)
        rank_state_00000.pt             per rank: data-loader position + RNG states (python, numpy, torch)
        complete.json                   written by rank 0 after every rank finished: step, model, world, and
                                        the size + sha256 of every file in the folder
        universal/                      made on the first resume on another world size (ZeRO-3): DeepSpeed's
                                        universal checkpoint of this step (``ds_to_universal``), cached; its
                                        files are added to complete.json's digests when the conversion ends
    latest                              the newest complete tag (moved last, atomically)
    best.json                           fine-tuning: the tag with the best validation metric (never pruned)

A kill -9 during a save leaves a tag folder without ``complete.json``: it is ignored by ``--resume auto``
and replaced by the next save of that step. Every file is fsynced before ``complete.json`` is written.

Loading is safe against crafted files: before anything is unpickled, every file is checked against the size
and sha256 that ``complete.json`` recorded when this system wrote it (``verify_checkpoint``), and DeepSpeed's
own loads (which pass ``weights_only=False``) run under ``safe_torch_load``: ``weights_only=True`` with an
allow-list of the few DeepSpeed classes its files hold. A damaged newest checkpoint is skipped by
``--resume auto`` (one warning), an explicitly named one is refused with one line.

A checkpoint of another world size is resumed through DeepSpeed's universal checkpoint:
``mpma_ds.training.reshard``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpma_ds.distributed import all_reduce_sum, barrier
from mpma_ds.fileio import atomic_write_text, fsync_tree
from mpma_ds.models.config import MPMAConfig, architecture_difference

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

TAG_PREFIX = "step_"
COMPLETE_FILE = "complete.json"
LATEST_FILE = "latest"
BEST_FILE = "best.json"
UNIVERSAL_DIR = "universal"
"""Sub-folder of a checkpoint holding its DeepSpeed universal form (made on the first resume on another world
size)."""
UNIVERSAL_KEY = "universal"
"""``complete.json`` key recorded when ``universal/`` is complete: world size converted from, seconds, bytes."""


FILES_KEY = "files"
"""``complete.json`` key: ``{relative path: {"size": bytes, "sha256": hex}}`` of every file of the checkpoint."""

SAFE_GLOBALS_NAMES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The only non-tensor classes DeepSpeed 0.19's checkpoint files hold (ZeRO-1/2/3 optimizer states: the stage
enum and the loss scaler; bf16 optimizer states: fragment addresses). Nothing else is unpickled."""


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed here (missing, incomplete, another architecture or world size)."""


class DamagedCheckpointError(ResumeError):
    """A checkpoint whose files differ from what was recorded when it was written, or that holds Python objects
    a checkpoint never holds (a crafted file): refused before anything in it is run."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (``--resume auto`` fell back to an older one)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only, quota): the previous ones are intact."""


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
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpointError(f"{path} is unreadable ({err}); the checkpoint is damaged") from err
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{path} is not a JSON object; the checkpoint is damaged")
    return meta


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(tag_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``tag_dir`` but ``complete.json``."""
    tag_dir = Path(tag_dir)
    out = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(tag_dir).as_posix()
        if rel == COMPLETE_FILE or rel.endswith(".tmp"):
            continue
        out[rel] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return out


def verify_checkpoint(tag_dir: str | Path, meta: dict[str, Any] | None = None) -> bool:
    """Check every file of a checkpoint against the size and sha256 ``complete.json`` recorded at save time.

    Returns False for a checkpoint written before sizes and hashes were recorded (nothing to check against;
    its files are still loaded with ``safe_torch_load``). Raises ``DamagedCheckpointError`` naming the first file
    that is missing, of another size, with another sha256, or present but never recorded.
    """
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir) if meta is None else meta
    recorded = meta.get(FILES_KEY)
    if not isinstance(recorded, dict):
        return False
    where = f"checkpoint {tag_dir}"
    present = {
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != COMPLETE_FILE and not p.name.endswith(".tmp")
    }
    if UNIVERSAL_KEY not in meta:  # a conversion that was interrupted before it was recorded: never loaded
        present = {rel for rel in present if not rel.startswith(UNIVERSAL_DIR + "/")}
    extra = sorted(present - set(recorded))
    if extra:
        raise DamagedCheckpointError(
            f"{where}: {extra[0]} was not written by this checkpoint's save (not in its {COMPLETE_FILE}); "
            "refusing to load it, resume from another checkpoint"
        )
    for rel, info in sorted(recorded.items()):
        path = tag_dir / rel
        if not path.is_file():
            raise DamagedCheckpointError(f"{where}: {rel} is missing; resume from another checkpoint")
        size = path.stat().st_size
        if size != info.get("size"):
            raise DamagedCheckpointError(
                f"{where}: {rel} is {size} bytes, {info.get('size')} were written (truncated or replaced); "
                "resume from another checkpoint"
            )
        if file_digest(path) != info.get("sha256"):
            raise DamagedCheckpointError(
                f"{where}: {rel} does not match the sha256 recorded when it was written (changed or damaged); "
                "refusing to load it, resume from another checkpoint"
            )
    return True


def newest_intact(ckpt_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of ``ckpt_dir`` whose files pass ``verify_checkpoint`` and the newer
    ones skipped (``"step_N (why)"``)."""
    ckpt_dir = Path(ckpt_dir)
    skipped = []
    for _, tag in reversed(complete_tags(ckpt_dir)):
        try:
            verify_checkpoint(ckpt_dir / tag)
        except (ResumeError, OSError) as err:
            skipped.append(f"{tag} ({str(err).split(': ', 1)[-1].split(';')[0]})")
            continue
        return ckpt_dir / tag, skipped
    return None, skipped


DAMAGED_SUFFIX = ".damaged"


def find_checkpoint(spec: str, output_dir: str | Path, *, set_aside: bool = False) -> Path | None:
    """The checkpoint folder (``.../checkpoints/step_N``) that ``--resume spec`` means, its files verified.

    ``auto``: the newest intact complete one in ``output_dir/checkpoints`` (``None`` when there is none: a fresh
    start); damaged newer ones are skipped with one ``CheckpointWarning`` naming them, and when every checkpoint
    is damaged it is an error (never a silent fresh start over a run). ``set_aside`` (rank 0 of a resume):
    rename the skipped ones to ``step_N.damaged``, kept for inspection, so the resumed run writes those steps
    afresh. Otherwise a path: a checkpoint folder
    itself, or a ``checkpoints/`` or run folder holding some; a damaged one is refused
    (``DamagedCheckpointError``).
    """
    if spec == "auto":
        ckpt_dir = Path(output_dir) / "checkpoints"
        found, skipped = newest_intact(ckpt_dir)
        if skipped and found is None:
            raise DamagedCheckpointError(
                f"--resume auto: every checkpoint in {ckpt_dir} is damaged ({'; '.join(skipped)}); start a new "
                "train.output_dir"
            )
        if skipped:
            moved = ""
            if set_aside:
                for entry in skipped:
                    tag = entry.split(" ", 1)[0]
                    with contextlib.suppress(OSError):
                        shutil.rmtree(ckpt_dir / (tag + DAMAGED_SUFFIX), ignore_errors=True)
                        os.replace(ckpt_dir / tag, ckpt_dir / (tag + DAMAGED_SUFFIX))
                moved = f" (kept as {DAMAGED_SUFFIX} folders)"
            warnings.warn(
                f"--resume auto skipped damaged checkpoint(s) {', '.join(skipped)} in {ckpt_dir}{moved}; resuming "
                f"from {found.name}",
                CheckpointWarning,
                stacklevel=2,
            )
        return found
    path = Path(spec)
    if not path.exists():
        raise ResumeError(f"--resume {spec}: no such checkpoint folder")
    if (path / COMPLETE_FILE).is_file() or path.name.startswith(TAG_PREFIX):
        verify_checkpoint(path, read_meta(path))
        return path
    for base in (path, path / "checkpoints"):
        tags = complete_tags(base)
        if tags:
            verify_checkpoint(base / tags[-1][1])
            return base / tags[-1][1]
    raise ResumeError(f"--resume {spec}: holds no complete checkpoint (step_*/{COMPLETE_FILE})")


def safe_globals() -> list[Any]:
    """The classes of ``SAFE_GLOBALS_NAMES`` that this DeepSpeed has (for ``torch.serialization.safe_globals``)."""
    found = []
    for name in SAFE_GLOBALS_NAMES:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def safe_torch_load(where: str | Path) -> Iterator[None]:
    """Within the block every ``torch.load`` (DeepSpeed's included, which ask for ``weights_only=False``) runs
    with ``weights_only=True`` and only ``SAFE_GLOBALS_NAMES`` allowed; a file that holds anything else is a
    ``DamagedCheckpointError`` and nothing in it runs. The patch is process-wide for the block's duration."""
    real_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    except pickle.UnpicklingError as err:
        first = " ".join(str(err).split("\n")[0].split())
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), first)
        raise DamagedCheckpointError(
            f"checkpoint {where} holds Python objects a checkpoint never holds ({detail[:160]}); refused to load "
            "it (a crafted file can run code); use a checkpoint this system wrote"
        ) from err
    finally:
        torch.load = real_load


def check_compatible(
    meta: dict[str, Any],
    *,
    model_name: str,
    model_config: MPMAConfig,
    world_size: int,
    task: str = "pretrain",
    task_arch: dict[str, Any] | None = None,
    zero_stage: int | None = None,
) -> bool:
    """Refuse a checkpoint of another architecture or task before anything is loaded; return True when it was
    written by another world size (the resume then goes through DeepSpeed's universal checkpoint).

    ``meta`` is the checkpoint's ``complete.json``; ``model_config`` the architecture this run builds (compared
    field by field with ``architecture_difference``); ``task``/``task_arch`` the fine-tuning head it adds;
    ``zero_stage`` this run's ZeRO stage: another world size is resumed for ZeRO-3 checkpoints into ZeRO-3 runs.
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
    saved_world = int(meta.get("world_size", world_size))
    if saved_world == world_size:
        return False
    saved_stage = int(meta.get("zero_stage", -1))
    if saved_stage != 3 or (zero_stage is not None and zero_stage != 3):
        raise ResumeError(
            f"checkpoint {where} was written by {saved_world} ranks under ZeRO-{saved_stage}; this run has "
            f"{world_size} ranks under ZeRO-{zero_stage}: another number of ranks is resumed only from a ZeRO-3 "
            f"checkpoint into a ZeRO-3 run; resume on {saved_world} ranks or export it with launch/export.py"
        )
    return True


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
    """Save on every rank; rank 0 records every file's size + sha256 in ``complete.json``, moves ``latest`` and
    prunes to ``keep_last``.

    Collective: every rank must call it at the same step. A step that already has a complete checkpoint is
    left as it is. Every file is fsynced before ``complete.json`` is written. A write that fails on any rank
    (disk full, quota, read-only) removes the half-written folder and raises ``CheckpointSaveError`` on every
    rank; the previous checkpoints and ``latest`` are untouched.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if (tag_dir / COMPLETE_FILE).is_file():
        # already saved at this step (a resume that had nothing left to do, or a NaN stop right after a
        # save): never delete a complete checkpoint to write the same step again
        return tag_dir
    failure: BaseException | None = None
    try:
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a save of this step that a kill interrupted: start it over
                shutil.rmtree(tag_dir)
    except OSError as err:
        failure = err
    barrier()
    if failure is None:
        try:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
            tag_dir.mkdir(parents=True, exist_ok=True)
            torch.save(rank_state, rank_state_file(tag_dir, rank))
            fsync_tree(tag_dir)  # this rank's files are on disk before rank 0 declares the checkpoint complete
        except (OSError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not _is_write_failure(err):
                raise
            failure = err
    _raise_if_any_failed(failure, ckpt_dir, tag_dir, rank)  # also the barrier: every rank's files are on disk
    if rank == 0:
        try:
            info = dict(meta, step=step, tag=tag, time=time.time(), **{FILES_KEY: file_manifest(tag_dir)})
            atomic_write_text(tag_dir / COMPLETE_FILE, json.dumps(info, indent=1, default=str))
            atomic_write_text(ckpt_dir / LATEST_FILE, tag)
        except OSError as err:
            failure = err
            (tag_dir / COMPLETE_FILE).unlink(missing_ok=True)
        else:
            prune(ckpt_dir, keep_last)
    _raise_if_any_failed(failure, ckpt_dir, tag_dir, rank)
    return tag_dir


def _is_write_failure(err: RuntimeError) -> bool:
    """torch.save reports a failed write (disk full) as a RuntimeError from its zip writer."""
    text = str(err).lower()
    return "write" in text and ("file" in text or "failed" in text)


def _raise_if_any_failed(failure: BaseException | None, ckpt_dir: Path, tag_dir: Path, rank: int) -> None:
    """Collective: when ``failure`` is set on any rank, remove the half-written ``tag_dir`` (rank 0) and raise
    ``CheckpointSaveError`` on every rank."""
    failed = all_reduce_sum(torch.tensor([0.0 if failure is None else 1.0]))
    if failed.item() == 0:
        return
    if rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)  # frees the space it took; complete.json was never there
    barrier()
    tags = complete_tags(ckpt_dir)
    previous = f"the previous checkpoints are intact (newest: {tags[-1][1]})" if tags else "no earlier checkpoint"
    if failure is None:
        reason = "another rank failed to write its files"
    elif isinstance(failure, OSError) and failure.errno == errno.ENOSPC:
        reason = f"no space left on device ({failure.filename or ckpt_dir})"
    else:
        reason = " ".join(str(failure).split())[:200]
    raise CheckpointSaveError(
        f"could not write checkpoint {tag_dir.name} in {ckpt_dir}: {reason}; {previous}; free space (or fix the "
        "folder) and continue with --resume auto"
    ) from failure


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
        atomic_write_text(Path(ckpt_dir) / BEST_FILE, json.dumps(record, indent=1))
        if keep_last > 0:
            prune(Path(ckpt_dir), keep_last)
    barrier()


def load_checkpoint(
    engine: DeepSpeedEngine,
    tag_dir: str | Path,
    *,
    rank: int,
    full_state: bool = True,
    verify: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into ``engine``; return ``(client_state, rank_state)``.

    The files are first checked against the sizes and hashes recorded at save time, then loaded with
    ``safe_torch_load`` (``DamagedCheckpointError`` for a damaged or crafted file, before anything runs).
    Weights, optimizer and scheduler are always loaded (a weights-only load is not consistent under every ZeRO
    stage); ``full_state`` also reads this rank's loader/RNG state (resume). False: the best checkpoint for the
    final test evaluation (``rank_state`` is then ``{}``). ``verify``: check the recorded sizes and hashes first.
    A checkpoint of another world size is loaded by ``reshard.load_universal`` instead.
    Collective: every rank calls it with the same ``tag_dir``.
    """
    tag_dir = Path(tag_dir)
    if verify:  # False: find_checkpoint has just verified it
        verify_checkpoint(tag_dir)
    with safe_torch_load(tag_dir):
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
