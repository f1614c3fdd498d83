"""What every command shares: its program name in messages, the rank-0 check, ``--set`` parsing."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def prog_name(script: str) -> str:
    """``script`` (``pretrain.py``), or the console script's own name when run as one (``mpma-pretrain``)."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("mpma-") else script


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys, e.g. --set train.lr=3e-4 train.max_steps=100 (repeatable)",
    )


def error(prog: str, message: object, *, kind: str = "error") -> None:
    """One line on stderr (rank 0 only: every rank fails alike, one line is enough)."""
    if is_rank0():
        print(f"{prog}: {kind}: {' '.join(str(message).split())}", file=sys.stderr)


def train_then_leave(recipe, resume: str | None) -> dict:
    """Run ``recipe`` to the end, then leave the process group, whoever made it: this process ends next.

    Under ``deepspeed``/``torchrun`` the launcher's group outlives the trainer; left to interpreter exit, the
    gloo group's threads are torn down unjoined and one rank in about four aborts ("terminate called without
    an active exception", exit 250) after a run that finished well.
    """
    from mpma_ds.training.distributed import close_distributed
    from mpma_ds.training.trainer import train

    try:
        return train(recipe, resume=resume)
    finally:
        close_distributed()
