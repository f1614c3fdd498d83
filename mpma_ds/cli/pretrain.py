"""``mpma-pretrain`` / ``launch/pretrain.py``: pretrain MPMA.

deepspeed [--num_gpus N] launch/pretrain.py --config YAML [--set key.sub=value ...] [--resume auto]
python launch/pretrain.py --config YAML ...          (one process, no launcher)
"""

from __future__ import annotations

import argparse

from mpma_ds.cli.common import (
    add_set_argument,
    ends_without_teardown,
    error,
    is_rank0,
    prog_name,
)

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
        "--deepspeed_config", default=None, help="DeepSpeed JSON name or path (overrides the recipe's)"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser


@ends_without_teardown
def main(argv: list[str] | None = None) -> int:
    prog = prog_name(SCRIPT)
    args = build_parser(prog, "Pretrain MPMA (DeepSpeed ZeRO, MLflow tracking).").parse_args(argv)
    from mpma_ds.recipes import find_recipe
    from mpma_ds.training import RecipeError, load_recipe
    from mpma_ds.training.trainer import NonFiniteLossError, SetupError, train

    try:
        overrides = args.overrides + (
            [f"deepspeed_config={args.deepspeed_config}"] if args.deepspeed_config else []
        )
        recipe = load_recipe(find_recipe(args.config), overrides)
        summary = train(recipe, resume=args.resume)
    except (RecipeError, SetupError) as err:
        error(prog, err)
        return 2
    except NonFiniteLossError as err:
        error(prog, err, kind="stopped")
        return 3
    if is_rank0():
        print(
            f"done: step {summary['step']}, run folder {recipe.train.output_dir}, checkpoint {summary['checkpoint']}"
        )
    return 0
