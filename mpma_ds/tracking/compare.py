"""Compare the runs of an MLflow experiment: a table of final values, one PNG per metric (history over
steps, one line per run) and an HTML report with both (``launch/compare_runs.py``)."""

from __future__ import annotations

import html
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpma_ds.tracking.base import metric_name
from mpma_ds.tracking.config import resolve_tracking_uri

_SQLITE_MAGIC = b"SQLite format 3\x00"

DEFAULT_METRICS = (
    "loss",
    "eval/i2t_R_at_1",
    "eval/t2i_R_at_1",
    "eval/i2t_R_at_10",
    "eval/zeroshot_auroc_mean",
    "samples_per_s",
)


@dataclass
class RunSummary:
    """One run: its identity, its last value of each metric and (on request) each metric's history."""

    run_id: str
    name: str
    status: str
    kind: str
    last: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    """Every metric's last value (``last`` holds only the compared ones)."""


# The test metrics a fine-tuning task's pretrained-vs-random comparison shows, by task.
PAIR_METRICS: dict[str, tuple[str, ...]] = {
    "vqa": ("test/accuracy_overall", "test/accuracy_closed", "test/accuracy_open"),
    "cls": ("test/auroc_macro",),
    "linear_probe": ("test/auroc_macro",),
    "retrieval": ("test/i2t_R_at_1", "test/t2i_R_at_1", "test/rsum"),
    "zero_shot": ("test/zeroshot_auroc_mean", "test/i2t_R_at_1"),
}


@dataclass
class PairRow:
    """A fine-tuning setting (task, label fraction, metric) with its pretrained and random-init values."""

    task: str
    label_fraction: str
    metric: str
    pretrained: float | None
    random: float | None

    @property
    def difference(self) -> float | None:
        return None if self.pretrained is None or self.random is None else self.pretrained - self.random


def finetune_pairs(runs: Sequence[RunSummary]) -> list[PairRow]:
    """Pretrained and random-init fine-tuning runs side by side (MLflow tags ``mpma.kind=finetune``,
    ``mpma.task``, ``mpma.init``, ``mpma.label_fraction``); the newest run of each (task, fraction, init)."""
    newest: dict[tuple[str, str, str], RunSummary] = {}
    for r in runs:  # newest first
        if r.kind != "finetune":
            continue
        key = (
            r.tags.get("mpma.task", "?"),
            r.tags.get("mpma.label_fraction", "1.0"),
            r.tags.get("mpma.init", "?"),
        )
        newest.setdefault(key, r)
    rows = []
    for task, fraction in sorted({(t, f) for t, f, _ in newest}, key=lambda k: (k[0], float(k[1] or 1))):
        pre, rnd = newest.get((task, fraction, "pretrained")), newest.get((task, fraction, "random"))
        for metric in PAIR_METRICS.get(task, ()):
            values = [r.final.get(metric) if r is not None else None for r in (pre, rnd)]
            if any(v is not None for v in values):
                rows.append(PairRow(task, fraction, metric, *values))
    return rows


def format_pairs_table(rows: Sequence[PairRow]) -> str:
    """Plain-text table of ``finetune_pairs``: task, label fraction, metric, pretrained, random, difference."""
    head = ["task", "labels", "metric", "pretrained", "random", "difference"]
    body = [
        [r.task, f"{100 * float(r.label_fraction):g} %", r.metric, _fmt(r.pretrained), _fmt(r.random),
         "-" if r.difference is None else f"{r.difference:+.4g}"]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def check_readable_store(uri: str) -> None:
    """Refuse a local store that holds no MLflow data, before MLflow would create or migrate one there.

    A comparison only reads: a ``sqlite:///`` path must be an existing SQLite file with MLflow's tables, a
    file store an existing folder. Servers (``http://``, ...) are left to MLflow.

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


def load_runs(
    experiment: str, *, tracking_uri: str | None = None, metrics: Sequence[str] = (), max_runs: int = 50
) -> tuple[list[RunSummary], list[str]]:
    """The newest ``max_runs`` runs of ``experiment`` and the metric names to show.

    Args:
        metrics: names to compare (``@`` is accepted: ``eval/i2t_R@1``); empty = the defaults present, else
            every metric the runs hold (up to 8).
    Raises:
        ValueError: ``max_runs`` below 1, a store that is not there or not MLflow's (`check_readable_store`),
            no such experiment, or it has no runs.
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
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs)
    if not runs:
        raise ValueError(f"experiment {experiment!r} at {uri} has no runs")
    present = sorted({k for r in runs for k in r.data.metrics})
    if metrics:
        chosen = [metric_name(m) for m in metrics]
        unknown = [m for m in chosen if m not in present]
        if unknown:
            raise ValueError(f"no run of {experiment!r} has metric(s) {', '.join(unknown)}; "
                             f"known: {', '.join(present[:30])}")  # fmt: skip
    else:
        chosen = [m for m in DEFAULT_METRICS if m in present] or present[:8]
    summaries = []
    for r in runs:
        hist = {}
        for key in chosen:
            if key in r.data.metrics:
                hist[key] = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
        summaries.append(
            RunSummary(
                run_id=r.info.run_id,
                name=r.info.run_name or r.info.run_id[:8],
                status=r.info.status,
                kind=r.data.tags.get("mpma.kind", "train"),
                last={k: v for k, v in r.data.metrics.items() if k in chosen},
                history=hist,
                tags={k: v for k, v in r.data.tags.items() if k.startswith("mpma.")},
                final=dict(r.data.metrics),
            )
        )
    return summaries, chosen


def format_runs_table(runs: Sequence[RunSummary], metrics: Sequence[str]) -> str:
    """Plain-text table: one row per run, one column per metric (its last value)."""
    head = ["run", "id", "kind", "status", *metrics]
    rows = [[r.name, r.run_id[:8], r.kind, r.status, *(_fmt(r.last.get(m)) for m in metrics)] for r in runs]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def plot_metrics(runs: Sequence[RunSummary], metrics: Sequence[str], out_dir: Path) -> list[Path]:
    """One PNG per metric: its history over steps, a line (or a point) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for key in metrics:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for r in runs:
            points = r.history.get(key)
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 3 else None, label=f"{r.name} ({r.run_id[:6]})")
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out_dir / (key.replace("/", "_").replace(" ", "_") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def write_html(
    experiment: str, runs: Sequence[RunSummary], metrics: Sequence[str], plots: Sequence[Path], out_dir: Path
) -> Path:
    """``out_dir/report.html``: the table and the plots (linked by relative path)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("run", "id", "kind", "status", *metrics))
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(x))}</td>"
            for x in (r.name, r.run_id[:8], r.kind, r.status, *(_fmt(r.last.get(m)) for m in metrics))
        )
        + "</tr>"
        for r in runs
    )
    imgs = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></figure>' for p in plots
    )
    pairs = finetune_pairs(runs)
    if pairs:
        cells = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
                p.task, f"{100 * float(p.label_fraction):g} %", p.metric, _fmt(p.pretrained), _fmt(p.random),
                "-" if p.difference is None else f"{p.difference:+.4g}")) + "</tr>"
            for p in pairs
        )  # fmt: skip
        heads = "".join(
            f"<th>{h}</th>" for h in ("task", "labels", "metric", "pretrained", "random", "difference")
        )
        imgs = f"<h2>Fine-tuning: pretrained vs random init</h2><table><tr>{heads}</tr>{cells}</table>" + imgs
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(experiment)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
        "figure{display:inline-block;margin:0.5em}</style></head><body>"
        f"<h1>MLflow experiment {html.escape(experiment)}</h1><table><tr>{head}</tr>{body}</table>{imgs}"
        "</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
