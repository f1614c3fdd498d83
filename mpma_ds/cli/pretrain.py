"""``mpma-pretrain`` / ``launch/pretrain.py``: pretrain MPMA.

deepspeed [--num_gpus N] launch/pretrain.py --config YAML [--set key.sub=value ...] [--resume auto]
python launch/pretrain.py --config YAML ...          (one process, no launcher)

Exit codes: 0 done, 2 bad input (one line), 3 stopped on NaN/Inf (checkpoint saved), 4 a checkpoint could not
be written (disk full; the earlier ones are intact), 5 a collective timed out (a hung or dead rank), 130 killed
by SIGINT/SIGTERM (the MLflow run ends KILLED).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from data_tools import remote
from data_tools.remote import RemoteError
from mpma_ds.cli.common import (
    add_set_argument,
    ends_without_teardown,
    error,
    is_rank0,
    prog_name,
)
from mpma_ds.data.shard_cache import ShardCacheFull
from mpma_ds.distributed import CollectiveTimeoutError
from mpma_ds.recipes import find_recipe
from mpma_ds.runner.trainer import NonFiniteLossError, SetupError, train
from mpma_ds.training import RecipeError, load_recipe
from mpma_ds.training.checkpoint import CheckpointSaveError, CheckpointWarning
from mpma_ds.training.data_skips import TooManySkipped

SCRIPT = "pretrain.py"


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        required=True,
        help="YAML recipe: a path, or a recipe name shipped with mpma-ds (pretrain_tiny)",
    )
    add_set_argument(parser)
    parser.add_argument(
        "--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a train.output_dir that already holds a run (its checkpoints and metrics are "
        "deleted); without it such a folder is refused",
    )
    parser.add_argument(
        "--deepspeed_config", default=None, help="DeepSpeed JSON name or path (overrides the recipe's)"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser


@contextlib.contextmanager
def run_guard(prog: str) -> Iterator[None]:
    """While a run trains: SIGTERM (SLURM's preemption / time limit, ``kill``) raises ``KeyboardInterrupt`` like
    Ctrl-C, so the run ends KILLED in MLflow; warnings about skipped checkpoints print as one line."""

    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            if is_rank0():
                print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
            return
        show(message, category, filename, lineno, file, line)

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = show
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def run_training(prog: str, recipe, args) -> tuple[int, dict | None]:
    """``train(recipe)`` with every way it can end turned into an exit code and at most one stderr line."""

    if is_rank0():
        for note in getattr(recipe, "notes", ()):
            print(f"{prog}: note: {note}", file=sys.stderr, flush=True)
    try:
        with run_guard(prog):
            return 0, train(recipe, resume=args.resume, overwrite=args.overwrite)
    except (SetupError, TooManySkipped, ShardCacheFull) as err:  # bad input: before the first step, or found later
        error(prog, err)
        return 2, None
    except NonFiniteLossError as err:
        error(prog, err, kind="stopped")
        return 3, None
    except CheckpointSaveError as err:
        error(prog, err)
        return 4, None
    except CollectiveTimeoutError as err:
        error(prog, err)
        return 5, None
    except RemoteError as err:  # the store stopped answering mid-run, past remote.ATTEMPTS tries
        error(
            prog,
            f"{remote.one_line(err)}; no sample was skipped: continue with --resume auto (the newest complete "
            "checkpoint) once the store answers",
        )
        return 6, None
    except KeyboardInterrupt:
        error(prog, "interrupted; continue with --resume auto (the newest complete checkpoint)", kind="stopped")
        return 130, None


@ends_without_teardown
def main(argv: list[str] | None = None) -> int:
    prog = prog_name(SCRIPT)
    args = build_parser(prog, "Pretrain MPMA (DeepSpeed ZeRO, MLflow tracking).").parse_args(argv)

    try:
        overrides = args.overrides + (
            [f"deepspeed_config={args.deepspeed_config}"] if args.deepspeed_config else []
        )
        recipe = load_recipe(find_recipe(args.config), overrides)
    except RecipeError as err:
        error(prog, err)
        return 2
    code, summary = run_training(prog, recipe, args)
    if code:
        return code
    if is_rank0():
        print(
            f"done: step {summary['step']}, run folder {recipe.train.output_dir}, checkpoint {summary['checkpoint']}"
        )
    return 0


if __name__ == "__main__":  # deepspeed --module mpma_ds.cli.pretrain (the demo's pretraining stage)
    sys.exit(main())
