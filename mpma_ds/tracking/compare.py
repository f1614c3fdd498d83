"""Compare the runs of an MLflow experiment (``launch/compare_runs.py``): what a user decides "which run is better,
and why" on.

- **Runs grouped**: each pretraining run with its evaluation and fine-tuning runs (MLflow's nested-run tag
  ``mlflow.parentRunId``, set by those runs from the folder they were made from: ``tracking/lineage.py``), and
  each random-init run beside its pretrained partner (the same ``mpma.pair`` key: task, label fraction, seeds;
  or the evaluated split).
- **Pairs**: pretrained vs random per metric, the difference and its 95 % interval: a *paired bootstrap* over
  the same test samples where both runs logged per-sample predictions (``test_predictions.pt``: the linear probe,
  classification and VQA), else the normal approximation from the two logged bootstrap intervals
  (``_ci95_low`` / ``_high``), which ignores that both were scored on the same samples (wider than the paired
  one); each row says which.
- **What changed**: the parameters (flattened recipe + DeepSpeed config) that differ between the compared runs
  of one kind; the identical ones counted and folded away.

``report_plots.py`` draws the figures and ``report_html.py`` writes the page; ``write_report`` does it all.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpma_ds.tracking.base import metric_name
from mpma_ds.tracking.config import resolve_tracking_uri
from mpma_ds.tracking.lineage import INIT_TAG, PAIR_TAG, PARENT_TAG, PRETRAIN_RUN_TAG, pair_key_finetune

_SQLITE_MAGIC = b"SQLite format 3\x00"

DEFAULT_METRICS = (
    "loss",
    "eval/i2t_R_at_1",
    "eval/t2i_R_at_1",
    "eval/i2t_R_at_10",
    "eval/zeroshot_auroc_mean",
    "samples_per_s",
)
# the training curves of the plot grid, in panel order (those no run logged are left out)
TRAIN_CURVES = (
    "loss",
    "loss_mlm",
    "loss_mim",
    "loss_global",
    "loss_local",
    "loss_itm",
    "lr",
    "grad_norm",
    "samples_per_s",
    "data_wait_frac",
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_percentage",
)
# the evaluation metrics compared between a pretrained model and its random twin (pretraining evaluation)
EVAL_METRICS = (
    "eval/zeroshot_auroc_mean",
    "eval/i2t_R_at_1",
    "eval/t2i_R_at_1",
    "eval/i2t_R_at_10",
    "eval/t2i_R_at_10",
    "eval/i2t_R_at_1_abnormal",
    "eval/t2i_R_at_1_abnormal",
    "eval/pointing_game",
    "eval/mlm_accuracy",
)


@dataclass
class RunSummary:
    """One run: identity, tags, params, every metric's last value and (for the plotted ones) its history."""

    run_id: str
    name: str
    status: str
    kind: str
    last: dict[str, float]
    """The compared metrics' last values (the runs table's columns)."""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    """Every metric's last value."""
    params: dict[str, str] = field(default_factory=dict)
    start_time: int = 0
    artifact_uri: str = ""

    @property
    def parent_id(self) -> str | None:
        """The pretraining run this one was made from (MLflow parent, else ``mpma.pretrain_run``)."""
        return self.tags.get(PARENT_TAG) or self.tags.get(PRETRAIN_RUN_TAG) or None

    @property
    def init(self) -> str:
        """``pretrained`` or ``random`` (a pretraining run counts as ``pretrained``)."""
        if INIT_TAG in self.tags:
            return self.tags[INIT_TAG]
        if self.kind == "eval":
            return "random" if self.tags.get("mpma.eval_of", "").startswith("random-init") else "pretrained"
        return "pretrained"

    @property
    def pair(self) -> str | None:
        """The pair key (``mpma.pair``; derived from older runs' tags and params where it is missing)."""
        if PAIR_TAG in self.tags:
            return self.tags[PAIR_TAG]
        if self.kind == "finetune" and "mpma.task" in self.tags:
            return pair_key_finetune(self.tags["mpma.task"], self.tags.get("mpma.label_fraction", "1.0"),
                                     self.params.get("train.seed", "?"),
                                     self.params.get("data.label_fraction_seed", "?"))  # fmt: skip
        if self.kind == "eval" and "mpma.split" in self.tags:
            return f"eval|{self.tags['mpma.split']}|{self.tags.get('mpma.shards', '?')}"
        return None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:6]})"


@dataclass
class RunGroup:
    """A pretraining run and the runs made from it; ``partners``: random-init runs paired with its children."""

    parent_id: str | None
    parent: RunSummary | None
    children: list[RunSummary] = field(default_factory=list)
    partners: list[RunSummary] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.parent is not None:
            return f"pretraining run {self.parent.label}"
        if self.parent_id:
            return f"pretraining run {self.parent_id[:8]} (not among the compared runs)"
        return "runs without a pretraining parent"

    @property
    def runs(self) -> list[RunSummary]:
        return ([self.parent] if self.parent else []) + self.children + self.partners


# ------------------------------------------------------------------------------------------------ reading
def check_readable_store(uri: str) -> None:
    """Refuse a local store that holds no MLflow data, before MLflow would create or migrate one there.

    A comparison only reads: a ``sqlite:///`` path must be an existing SQLite file with MLflow's tables, a
    file store an existing folder; another scheme must be one MLflow reads. Servers (``http://``, ...) are left to
    MLflow.

    Raises:
        ValueError: one line naming the path and what to pass instead.
    """
    hint = (
        "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the run's store, e.g. sqlite:///demo_runs/mlflow.db"
    )
    if uri.startswith("sqlite:"):
        path_text = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not path_text or path_text == ":memory:":
            raise ValueError(f"{uri} is not a database file; {hint}")
        path = Path(path_text)
        if not path.parent.is_dir():
            raise ValueError(f"no MLflow database at {path}: folder {path.parent} does not exist; {hint}")
        if not path.is_file():
            raise ValueError(f"no MLflow database at {path}; {hint}")
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head != _SQLITE_MAGIC:
            raise ValueError(
                f"{path} is not a SQLite database ({'empty' if not head else 'other content'}); {hint}"
            )
        try:
            with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{path} is not a readable SQLite database ({exc}); {hint}") from None
        if "experiments" not in tables:
            raise ValueError(f"{path} is a SQLite database but not MLflow's (no experiments table); {hint}")
        return
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file://") :] if uri.startswith("file://") else uri.removeprefix("file:"))
        if not path.is_dir():
            raise ValueError(f"no MLflow file store at {path} (not a folder); {hint}")
        return
    scheme = uri.split("://", 1)[0].lower()
    if scheme.split("+", 1)[0] not in MLFLOW_SCHEMES:
        raise ValueError(
            f"--tracking-uri {uri}: MLflow reads no {scheme}:// store; use one of "
            f"{', '.join(s + '://' for s in MLFLOW_SCHEMES)} (or a folder path); {hint}"
        )


MLFLOW_SCHEMES: tuple[str, ...] = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
"""URI schemes MLflow's tracking client opens (SQLAlchemy drivers as ``postgresql+psycopg2``)."""


def _select(runs: list, wanted: Sequence[str], experiment: str) -> list:
    """The runs named (run name) or identified (full id or a prefix of >= 6 characters) by ``wanted``, plus the
    runs nested under them (children) and the random-init partners of all those — in the store's order."""
    by_id = {r.info.run_id: r for r in runs}
    chosen: dict[str, Any] = {}
    for item in wanted:
        hits = [r for r in runs if r.info.run_name == item or r.info.run_id == item]
        if not hits and len(item) >= 6:
            hits = [r for r in runs if r.info.run_id.startswith(item)]
        if not hits:
            names = sorted({r.info.run_name or r.info.run_id[:8] for r in runs})
            more = f" (and {len(names) - 12} more)" if len(names) > 12 else ""
            raise ValueError(f"no run named or with id {item!r} in experiment {experiment!r}; runs there: "
                             f"{', '.join(names[:12])}{more}")  # fmt: skip
        chosen.update({r.info.run_id: r for r in hits})
    for r in runs:  # children of a chosen pretraining run
        if r.data.tags.get(PARENT_TAG) in chosen or r.data.tags.get(PRETRAIN_RUN_TAG) in chosen:
            chosen.setdefault(r.info.run_id, r)
    pairs = {r.data.tags.get(PAIR_TAG) for r in chosen.values() if r.data.tags.get(INIT_TAG) != "random"}
    for r in runs:  # and the random-init partners of the chosen runs
        if r.data.tags.get(INIT_TAG) == "random" and r.data.tags.get(PAIR_TAG) in pairs - {None}:
            chosen.setdefault(r.info.run_id, r)
    return [r for r in runs if r.info.run_id in chosen and r.info.run_id in by_id]


def load_runs(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    metrics: Sequence[str] = (),
    max_runs: int = 50,
    runs: Sequence[str] = (),
    filter_string: str = "",
) -> tuple[list[RunSummary], list[str]]:
    """The newest ``max_runs`` runs of ``experiment`` (newest first) and the metric names of the runs table.

    Args:
        metrics: names to compare (``@`` is accepted: ``eval/i2t_R@1``); empty = the defaults present, else
            every metric the runs hold (up to 8).
        runs: run names or ids to keep (with the runs nested under them); empty = all.
        filter_string: an MLflow search filter (``params.train.lr = '0.001'``, ``tags.mpma.kind = 'finetune'``,
            ``metrics.loss < 2``), passed to ``search_runs``.
    Raises:
        ValueError: ``max_runs`` below 1, a store that is not there or not MLflow's (`check_readable_store`),
            no such experiment, it has no runs (or none match), an unknown run or metric name.
    """
    if max_runs < 1:
        raise ValueError(f"--max-runs {max_runs}: must be at least 1")
    uri = resolve_tracking_uri(tracking_uri)
    check_readable_store(uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment {experiment!r} at {uri}; experiments there: {', '.join(names) or 'none'}")
    found = client.search_runs([exp.experiment_id], filter_string=filter_string,
                               order_by=["attributes.start_time DESC"], max_results=max_runs)  # fmt: skip
    if not found:
        if filter_string:
            raise ValueError(f"no run of experiment {experiment!r} at {uri} matches --filter {filter_string!r}")
        raise ValueError(f"experiment {experiment!r} at {uri} has no runs; run a training or evaluation with "
                         f"tracking.experiment={experiment} first")  # fmt: skip
    if runs:
        found = _select(list(found), runs, experiment)
    present = sorted({k for r in found for k in r.data.metrics})
    if metrics:
        chosen = [metric_name(m) for m in metrics]
        unknown = [m for m in chosen if m not in present]
        if unknown:
            raise ValueError(f"no run of {experiment!r} has metric(s) {', '.join(unknown)}; "
                             f"known: {', '.join(present[:30])}")  # fmt: skip
    else:
        chosen = [m for m in DEFAULT_METRICS if m in present] or present[:8]
    plotted = set(chosen) | set(TRAIN_CURVES) | set(EVAL_METRICS)
    summaries = []
    for r in found:
        hist = {}
        for key in r.data.metrics:
            if key in plotted:
                hist[key] = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
        summaries.append(
            RunSummary(
                run_id=r.info.run_id,
                name=r.info.run_name or r.info.run_id[:8],
                status=r.info.status,
                kind=r.data.tags.get("mpma.kind", "train"),
                last={k: v for k, v in r.data.metrics.items() if k in chosen},
                history=hist,
                tags={k: v for k, v in r.data.tags.items() if k.startswith("mpma.") or k == PARENT_TAG},
                final=dict(r.data.metrics),
                params=dict(r.data.params),
                start_time=int(r.info.start_time or 0),
                artifact_uri=r.info.artifact_uri or "",
            )
        )
    return summaries, chosen


# ----------------------------------------------------------------------------------------------- grouping
def group_runs(runs: Sequence[RunSummary]) -> list[RunGroup]:
    """Pretraining runs with their children (newest first), each random-init run beside every group whose
    pretrained child has its pair key (a random twin is the baseline of every pretraining run it pairs with),
    and a last group of the runs without a pretraining parent or partner."""
    groups: dict[str, RunGroup] = {}
    for r in runs:
        if r.kind == "pretrain":
            groups.setdefault(r.run_id, RunGroup(r.run_id, r))
    for r in runs:
        parent = r.parent_id
        if r.kind != "pretrain" and parent:
            groups.setdefault(parent, RunGroup(parent, None)).children.append(r)
    placed = {r.run_id for g in groups.values() for r in g.runs}
    for r in runs:
        if r.run_id in placed or r.init != "random" or r.pair is None:
            continue
        for g in groups.values():
            if any(c.pair == r.pair and c.init == "pretrained" for c in g.children):
                g.partners.append(r)
                placed.add(r.run_id)
    rest = [r for r in runs if r.run_id not in placed]
    ordered = sorted(groups.values(), key=lambda g: -(g.parent.start_time if g.parent else 0))
    if rest:
        ordered.append(RunGroup(None, None, children=rest))
    return ordered


# ---------------------------------------------------------------------------------------- what changed
@dataclass
class ParamDiff:
    """The params of one kind of run (and task): those that differ (``differing[key][i]`` for ``runs[i]``;
    ``None`` = not logged) and those the same in all."""

    kind: str
    task: str | None
    runs: list[RunSummary]
    differing: dict[str, list[str | None]]
    identical: dict[str, str]

    @property
    def title(self) -> str:
        names = {"pretrain": "pretraining", "eval": "evaluation", "finetune": "fine-tuning"}
        return names.get(self.kind, self.kind) + (
            f": {self.task}" if self.task and self.kind == "finetune" else ""
        )


def param_differences(runs: Sequence[RunSummary]) -> list[ParamDiff]:
    """Per kind of run (pretraining, evaluation; fine-tuning per task) with at least two runs: the params whose
    values differ between them, and the identical ones."""
    by_kind: dict[tuple[str, str | None], list[RunSummary]] = {}
    for r in runs:
        task = r.tags.get("mpma.task") if r.kind == "finetune" else None
        by_kind.setdefault((r.kind, task), []).append(r)
    out = []
    for (kind, task), members in by_kind.items():
        if len(members) < 2:
            continue
        keys = sorted({k for r in members for k in r.params})
        differing, identical = {}, {}
        for key in keys:
            values = [r.params.get(key) for r in members]
            if len(set(values)) > 1:
                differing[key] = values
            else:
                identical[key] = values[0]
        out.append(ParamDiff(kind, task, list(members), differing, identical))
    return out


# ------------------------------------------------------------------------------------------------- tables
def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def _text_table(head: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def format_runs_table(runs: Sequence[RunSummary], metrics: Sequence[str]) -> str:
    """Plain-text table: one row per run, one column per metric (its last value)."""
    head = ["run", "id", "kind", "status", *metrics]
    rows = [[r.name, r.run_id[:8], r.kind, r.status, *(_fmt(r.last.get(m)) for m in metrics)] for r in runs]
    return _text_table(head, rows)


def format_groups(groups: Sequence[RunGroup]) -> str:
    """The run tree: each pretraining run, its children indented, their random partners marked."""
    lines = []
    for g in groups:
        lines.append(g.title)
        for r in g.children:
            lines.append(f"  ├─ {r.label}  {r.kind} {r.init}  {r.tags.get('mpma.task', '')}".rstrip())
        for r in g.partners:
            lines.append(f"  ┆  {r.label}  {r.kind} random partner  {r.tags.get('mpma.task', '')}".rstrip())
    return "\n".join(lines)


RUN_FIELDS = ("run_id", "name", "kind", "init", "status", "parent", "pair", "task", "label_fraction")


def runs_records(runs: Sequence[RunSummary], groups: Sequence[RunGroup]) -> list[dict[str, Any]]:
    """One dict per run for CSV / JSON: identity, group (``parent``), kind, init, pair key, every last metric."""
    group_of = {r.run_id: g.parent_id for g in groups for r in g.runs}
    out = []
    for r in runs:
        record = {"run_id": r.run_id, "name": r.name, "kind": r.kind, "init": r.init, "status": r.status,
                  "parent": group_of.get(r.run_id) if group_of.get(r.run_id) != r.run_id else None,
                  "pair": r.pair, "task": r.tags.get("mpma.task"),
                  "label_fraction": r.tags.get("mpma.label_fraction")}  # fmt: skip
        record.update({f"metric:{k}": v for k, v in sorted(r.final.items())})
        out.append(record)
    return out


def write_tables(out_dir: Path, runs_rec: list[dict[str, Any]], pair_rec: list[dict[str, Any]]) -> list[Path]:
    """``runs.csv`` / ``runs.json`` (one row per run) and ``pairs.csv`` / ``pairs.json`` (one per pair row)."""
    from mpma_ds.tracking.params import json_safe

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, records, fixed in (("runs", runs_rec, RUN_FIELDS), ("pairs", pair_rec, ())):
        columns = list(fixed) + sorted({k for r in records for k in r} - set(fixed))
        if not fixed and records:
            columns = list(records[0])
        path = out_dir / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for r in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
        files.append(path)
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(json_safe(records), indent=1) + "\n", encoding="utf-8")
        files.append(path)
    return files
