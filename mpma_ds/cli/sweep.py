"""``mpma-sweep`` / ``launch/sweep.py``: pretrain named arms (recipe overrides) x seeds at one budget, evaluate
each by the same protocol and tabulate every arm's difference from the reference arm with a paired 95 % interval.

    mpma-sweep --config ablation_tiny                              (the shipped ablation; docs/model.md)
    mpma-sweep --config my_sweep.yaml --set shared.train.max_steps=100 seeds=[0] --arms full clip

Writes OUTPUT_DIR/table.md (markdown) and sweep_results.json, and prints the table. Runs continue where an
interrupted sweep stopped (an arm x seed whose evaluation is current is not rerun).

Exit codes: 0 done, 2 bad input (one line), 1 an arm failed (one line naming it), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from mpma_ds.cli.common import add_set_argument, error, prog_name

SCRIPT = "sweep.py"


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", required=True, help="sweep YAML: a path, or a sweep shipped with mpma-ds (ablation_tiny)"
    )
    add_set_argument(p)
    p.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms (and the reference)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the base recipe's, $MLFLOW_TRACKING_URI, ./mlflow.db)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print each arm's overrides and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    prog = prog_name(SCRIPT)
    args = build_parser(prog).parse_args(argv)
    from mpma_ds.config import ConfigError
    from mpma_ds.sweep import SweepError, arm_recipe, load_sweep, run_sweep

    try:
        cfg = load_sweep(args.config, args.overrides)
        for arm in cfg.arms:  # every arm's recipe builds before anything trains
            arm_recipe(cfg, arm, cfg.seeds[0], tracking_uri=args.tracking_uri)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        error(prog, err)
        return 2
    if args.dry_run:
        for arm in cfg.arms:
            print(f"{arm}: {' '.join(cfg.arm_overrides(arm)) or '(the base recipe)'}")
        return 0
    try:
        result = run_sweep(cfg, arms=args.arms, tracking_uri=args.tracking_uri)
    except SweepError as err:
        error(prog, err)
        return 1
    except KeyboardInterrupt:
        error(prog, "interrupted; rerun the same command to continue", kind="stopped")
        return 130
    print(result["table"])
    print(f"table: {cfg.output_dir}/table.md" + (f"  (MLflow run {result['run_id']})" if result["run_id"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
