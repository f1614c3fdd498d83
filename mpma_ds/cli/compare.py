"""Compare the runs of an MLflow experiment: the run tree and the pretrained-vs-random table on stdout, and a
self-contained report (report.html with every figure embedded, the figures as PNGs, the tables as CSV / JSON).

python launch/compare_runs.py --experiment mpma-demo --tracking-uri sqlite:///$PWD/demo_runs/mlflow.db
python launch/compare_runs.py --experiment mpma-pretrain --runs demo-pretrain --runs 3f2a9c01 --smooth 0.6
python launch/compare_runs.py --experiment mpma-demo --filter "tags.mpma.task = 'linear_probe'"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mpma_ds.cli.common import prog_name
from mpma_ds.tracking.compare import format_groups, format_runs_table
from mpma_ds.tracking.config import resolve_tracking_uri
from mpma_ds.tracking.mlflow_logger import HTTP_ENV_DEFAULTS
from mpma_ds.tracking.pairs import format_pairs_table
from mpma_ds.tracking.report import write_report

SERVER_ATTEMPTS = 3
"""Tries to reach an MLflow server (``http(s)://``) before reading: 1 s, then 2 s apart, each with a 5 s timeout."""


def server_unreachable(uri: str, prog: str, attempts: int = SERVER_ATTEMPTS, timeout: float = 5.0) -> str | None:
    """Why the MLflow server at ``uri`` cannot be reached (``None`` when it answers), trying ``attempts`` times
    with a line on stderr per retry: MLflow's own client retries a refused connection for minutes in silence."""
    reason = ""
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None  # something answers (a proxy without /health): let MLflow's client talk to it
        except (urllib.error.URLError, OSError) as err:
            why = getattr(err, "reason", err)
            reason = str(getattr(why, "strerror", None) or why)
        if attempt < attempts:
            print(f"{prog}: {uri} does not answer ({reason}); retry {attempt}/{attempts - 1} in {attempt} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(attempt)
    return reason


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog_name("compare_runs.py"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument(
        "--runs",
        action="append",
        default=[],
        metavar="NAME_OR_ID",
        help="compare only these runs (run name, id or an id prefix of >= 6 characters; repeatable), "
        "with the runs nested under them",
    )
    p.add_argument(
        "--filter",
        default="",
        metavar="FILTER",
        help="an MLflow search filter passed to search_runs, e.g. \"params.train.lr = '0.001'\" or "
        "\"tags.mpma.kind = 'finetune'\"",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        help="a column of the runs table (repeatable; "
        "default: loss, eval retrieval/AUROC, samples/s where present)",
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="W",
        help="EMA smoothing weight of the training curves, in [0, 1) (0.6 is a good start; default 0)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="R",
        help="resamples of the paired bootstrap intervals (default 1000)",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--max-runs", type=int, default=50, help="newest N runs (default 50)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for report.html, the PNGs and the tables (default: compare/<experiment>)",
    )
    args = p.parse_args(argv)

    prog = prog_name("compare_runs.py")
    if args.bootstrap < 1:
        print(f"{prog}: error: --bootstrap {args.bootstrap}: must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out or Path("compare") / args.experiment)
    blocked = next((q for q in (out, *out.parents) if q.exists() and not q.is_dir()), None)
    if blocked is not None:
        where = "is a file" if blocked == out else f"lies under {blocked}, a file"
        print(f"{prog}: error: --out {out} {where}; give a folder for the report", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_ENV_DEFAULTS.items():  # bounded: MLflow's defaults retry for minutes
            os.environ.setdefault(key, value)
        print(f"{prog}: reading the runs of {args.experiment!r} from {uri} ...", file=sys.stderr, flush=True)
        reason = server_unreachable(uri, prog)
        if reason is not None:
            print(f"{prog}: error: cannot reach the MLflow server at {uri} ({reason}, {SERVER_ATTEMPTS} tries); "
                  "start it (mlflow server --host 127.0.0.1 --port PORT) or check --tracking-uri / "
                  "$MLFLOW_TRACKING_URI", file=sys.stderr)  # fmt: skip
            return 2
    try:
        report = write_report(
            args.experiment,
            out,
            tracking_uri=args.tracking_uri,
            metrics=args.metric,
            max_runs=args.max_runs,
            runs=args.runs,
            filter_string=args.filter,
            smooth=args.smooth,
            n_resamples=args.bootstrap,
        )
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except (
        Exception
    ) as err:  # MLflow's own errors (a store it refuses, a bad filter, a server that does not answer)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{prog}: error: cannot read the runs: {type(err).__name__}: {first}", file=sys.stderr)
        return 2
    print(format_runs_table(report.runs, report.metrics))
    print("\nruns grouped (pretraining run, its evaluation / fine-tuning runs, ┆ random-init partners):")
    print(format_groups(report.groups))
    if report.pairs:
        print("\npretrained vs random (difference [95 % interval], and how the interval was computed):")
        print(format_pairs_table(report.pairs))
    for d in report.diffs:
        print(
            f"\n{d.title} runs: {len(d.differing)} parameter(s) differ, {len(d.identical)} identical"
            + (
                f" ({', '.join(list(d.differing)[:8])}{' ...' if len(d.differing) > 8 else ''})"
                if d.differing
                else ""
            )
        )
    print(f"\n{len(report.plots)} figure(s), tables {', '.join(p.name for p in report.tables)} in {out}")
    print(f"report: {report.html}")
    return 0
