"""Pretrain MPMA: ``deepspeed [--num_gpus N] launch/pretrain.py --config YAML [--set key.sub=value ...]``.

Also runs as one plain process (``python launch/pretrain.py ...``). The loop lives in ``mpma_ds.training``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mpma_ds.training import RecipeError, load_recipe  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML recipe (launch/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys, e.g. --set train.lr=3e-4 train.max_steps=100 (repeatable)",
    )
    parser.add_argument(
        "--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder"
    )
    parser.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (overrides the recipe's)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    from mpma_ds.training.loop import NonFiniteLossError, SetupError, train

    try:
        overrides = args.overrides + (
            [f"deepspeed_config={args.deepspeed_config}"] if args.deepspeed_config else []
        )
        recipe = load_recipe(args.config, overrides)
        summary = train(recipe, resume=args.resume)
    except (RecipeError, SetupError) as err:
        if rank0:
            print(f"pretrain.py: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        if rank0:
            print(f"pretrain.py: stopped: {err}", file=sys.stderr)
        return 3
    if rank0:
        print(
            f"done: step {summary['step']}, run folder {recipe.train.output_dir}, checkpoint {summary['checkpoint']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
