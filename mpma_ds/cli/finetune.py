"""``mpma-finetune`` / ``launch/finetune.py``: fine-tune (or evaluate) MPMA on a downstream task.

    deepspeed [--num_gpus N] launch/finetune.py --config launch/configs/finetune_vqa_tiny.yaml [--set ...]
    python launch/finetune.py --config finetune_linear_probe_tiny --set data.label_fraction=0.01
    python launch/finetune.py --config finetune_cls_tiny --task cls --set init.from=random

Tasks: vqa, cls, linear_probe, retrieval, zero_shot and those installed plugins register (``--list-tasks``; the
recipe's task.name; --task must agree with it). The run folder holds recipe.yaml, checkpoints/ (the best one kept), metrics.jsonl and summary.json with the
validation-best and final test metrics (bootstrap 95 % intervals beside them).
"""

from __future__ import annotations

import sys

from mpma_ds.cli.common import ends_without_teardown, error, is_rank0, prog_name
from mpma_ds.cli.pretrain import build_parser, run_training

SCRIPT = "finetune.py"


@ends_without_teardown
def main(argv: list[str] | None = None) -> int:
    from mpma_ds.tasks.registry import TASKS, finetune_task_names, unknown_task

    prog = prog_name(SCRIPT)
    parser = build_parser(prog, __doc__.split("\n\n")[0])
    parser.add_argument("--task", help="the task (must agree with the recipe's task.name); see --list-tasks")
    parser.add_argument(
        "--list-tasks", action="store_true", help="list the registered tasks (plugins too) and exit"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    # --config is not needed to list the tasks
    args = parser.parse_args(["--config", "-", *argv] if "--list-tasks" in argv else argv)
    if args.list_tasks:
        for entry in TASKS:
            if entry.obj.kind == "finetune":
                sections = ", ".join(f"task.{k}" for k in entry.meta.get("sections", {})) or "-"
                print(f"{entry.name:<16} {entry.plugin or 'mpma_ds':<20} options: {sections}")
        return 0
    if args.task is not None and args.task not in finetune_task_names():
        error(prog, f"--task: {unknown_task(args.task)}")
        return 2
    from mpma_ds.recipes import find_recipe
    from mpma_ds.training import RecipeError, load_recipe
    from mpma_ds.training.recipe import FinetuneRecipe

    try:
        overrides = list(args.overrides)
        if args.deepspeed_config:
            overrides.append(f"deepspeed_config={args.deepspeed_config}")
        recipe = load_recipe(find_recipe(args.config), overrides, cls=FinetuneRecipe)
        if args.task and args.task != recipe.task.name:
            raise RecipeError(
                f"--task {args.task} but {args.config} is a {recipe.task.name} recipe (task.name); use a "
                f"finetune_{args.task}_*.yaml recipe or --set task.name={args.task}"
            )
    except RecipeError as err:
        error(prog, err)
        return 2
    code, summary = run_training(prog, recipe, args)
    if code:
        return code
    if is_rank0():
        print(format_summary(summary, recipe.train.output_dir))
    return 0


def format_summary(summary: dict, output_dir: str) -> str:
    """The end-of-run lines: the best validation value and the test metrics with their intervals."""
    lines = [f"done: {summary['task']}, step {summary['step']}, run folder {output_dir}"]
    best = summary.get("best")
    if best:
        lines.append(f"  best validation {best['metric']} = {best['value']:.4f} at step {best['step']}")
    test = summary.get("test") or {}
    for key, value in test.items():
        if isinstance(value, float) and not key.endswith(("_low", "_high")) and "/step" not in key:
            ci = test.get(f"{key}_ci95")
            extra = f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if isinstance(ci, list) else ""
            lines.append(f"  {key} = {value:.4f}{extra}")
    return "\n".join(lines)
