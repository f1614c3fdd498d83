"""Compare the runs of an MLflow experiment: a table on stdout, one PNG per metric and an HTML report.

python launch/compare_runs.py --experiment mpma-demo --tracking-uri sqlite:///$PWD/demo_runs/mlflow.db
python launch/compare_runs.py --experiment mpma-pretrain --metric loss --metric eval/i2t_R@1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpma_ds.cli.common import prog_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog_name("compare_runs.py"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--metric", action="append", default=[], help="metric to compare (repeatable; default: "
                   "loss, eval retrieval/AUROC, samples/s where present)")  # fmt: skip
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--max-runs", type=int, default=50, help="newest N runs (default 50)")
    p.add_argument(
        "--out", default=None, help="folder for the PNGs and report.html (default: compare/<experiment>)"
    )
    args = p.parse_args(argv)

    from mpma_ds.tracking.compare import (
        finetune_pairs,
        format_pairs_table,
        format_runs_table,
        load_runs,
        plot_metrics,
        write_html,
    )

    try:
        runs, metrics = load_runs(args.experiment, tracking_uri=args.tracking_uri, metrics=args.metric,
                                  max_runs=args.max_runs)  # fmt: skip
    except ValueError as err:
        print(f"{prog_name('compare_runs.py')}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # MLflow's own errors (a store it refuses, a server that does not answer): one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{prog_name('compare_runs.py')}: error: cannot read the runs: {type(err).__name__}: {first}",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out or Path("compare") / args.experiment)
    print(format_runs_table(runs, metrics))
    pairs = finetune_pairs(runs)
    if pairs:
        print("\nfine-tuning, pretrained vs random init (newest run of each):")
        print(format_pairs_table(pairs))
    plots = plot_metrics(runs, metrics, out)
    report = write_html(args.experiment, runs, metrics, plots, out)
    print(f"\n{len(plots)} plot(s) and the report: {report}")
    return 0
