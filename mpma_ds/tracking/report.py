"""The comparison report (``launch/compare_runs.py``): read and group the runs (``compare.py``), draw the figures
(``report_plots.py``), write the page (``report_html.py``) and the tables, under one folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mpma_ds.tracking import report_html, report_plots
from mpma_ds.tracking.compare import (
    ParamDiff,
    RunGroup,
    RunSummary,
    group_runs,
    load_runs,
    param_differences,
    runs_records,
    write_tables,
)
from mpma_ds.tracking.config import resolve_tracking_uri
from mpma_ds.tracking.pairs import PairRow, PredictionStore, pair_rows


@dataclass
class Report:
    html: Path
    plots: list[Path]
    tables: list[Path]
    runs: list[RunSummary]
    groups: list[RunGroup]
    pairs: list[PairRow]
    diffs: list[ParamDiff]
    metrics: list[str]
    uri: str


def write_report(
    experiment: str,
    out_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    metrics: Sequence[str] = (),
    max_runs: int = 50,
    runs: Sequence[str] = (),
    filter_string: str = "",
    smooth: float = 0.0,
    n_resamples: int = 1000,
) -> Report:
    """Read the runs, group and pair them, draw the plots, write ``report.html`` (self-contained), the PNGs and
    the tables under ``out_dir``. Raises ``ValueError`` (one line) on bad input, like `load_runs`."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"--smooth {smooth}: must be in [0, 1) (the EMA weight of the previous value)")
    from mlflow.tracking import MlflowClient  # mlflow: heavy, imported when a report is written only

    found, chosen = load_runs(
        experiment,
        tracking_uri=tracking_uri,
        metrics=metrics,
        max_runs=max_runs,
        runs=runs,
        filter_string=filter_string,
    )
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per artifact read is noise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(found)
    with tempfile.TemporaryDirectory(prefix="mpma-compare-") as work:
        pairs = pair_rows(groups, predictions=PredictionStore(client, Path(work)), n_resamples=n_resamples)
        gallery = report_html.grounding_gallery(client, groups, Path(work))
    diffs = param_differences(found)
    plots = report_plots.draw_all(found, groups, pairs, out, smooth=smooth)
    tables = write_tables(out, runs_records(found, groups), [asdict(p) for p in pairs])
    html = report_html.write_html(
        out / "report.html",
        experiment=experiment,
        uri=uri,
        runs=found,
        metrics=chosen,
        groups=groups,
        pairs=pairs,
        diffs=diffs,
        plots=plots,
        gallery=gallery,
        filter_string=filter_string,
        smooth=smooth,
    )
    return Report(html, list(plots.values()), tables, found, groups, pairs, diffs, chosen, uri)
