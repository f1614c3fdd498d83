"""What a training run says on the console besides its logged steps (rank 0): the shards with unreadable
samples and where a resumed run continues, once started, and a line after the first step when the first logged
step is later (a short run with ``train.log_every`` 10 used to show nothing until its end)."""

from __future__ import annotations

import sys
from typing import Any

from mpma_ds.training.data_skips import shard_metrics


def announce_start(trainer: Any, note: str | None, resumed_from: Any) -> None:
    """Rank 0: the shards with unreadable samples (stderr, and per shard to MLflow) and the checkpoint and step a
    resumed run continues from (stdout)."""
    if trainer.ctx.rank != 0:
        return
    if note is not None:
        print(f"warning: {note}", file=sys.stderr, flush=True)
        trainer.logger.log_metrics(shard_metrics(trainer.loaders), step=trainer.step)
    if resumed_from is not None:
        print(f"resumed from {resumed_from} at step {trainer.step} of {trainer.max_steps}", flush=True)


def first_step(trainer: Any, start_step: int, log_every: int) -> None:
    """Rank 0, after this process's first step when that step is not logged: a sign of life."""
    step = trainer.step
    if trainer.ctx.rank == 0 and step == start_step + 1 and step % log_every and step != trainer.max_steps:
        print(f"step {step}/{trainer.max_steps} done; a line every train.log_every={log_every} steps", flush=True)
