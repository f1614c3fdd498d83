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
