"""Pretrained vs random-init pairs of a comparison: one row per metric, the difference and its 95 % interval —
a paired bootstrap over the per-sample test predictions both runs logged (``test_predictions.pt``: linear
probe, classification, VQA), else the normal approximation from the two runs' own logged intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpma_ds.eval.paired import PAIRED_STATISTICS
from mpma_ds.tracking.compare import EVAL_METRICS, RunGroup, RunSummary, _text_table
from mpma_ds.tracking.lineage import HEADLINE_TAG, PAIRING_TAG

PREDICTIONS_FILE = "test_predictions.pt"  # the trainer's per-sample test outputs (training/run_folder.py)
PAIRED = "paired bootstrap"
FROM_INTERVALS = "from the two intervals"
# Runs logged before the Trainer wrote mpma.headline_metrics / mpma.pairing: what their tasks compared on, so old
# experiments still read. A task of today declares both itself (Task.headline_metrics, Task.pairing).
LEGACY_PAIR_METRICS: dict[str, tuple[str, ...]] = {
    "linear_probe": ("test/auroc_macro",),
    "cls": ("test/auroc_macro",),
    "vqa": ("test/accuracy_overall", "test/accuracy_closed", "test/accuracy_open"),
    "retrieval": ("test/rsum", "test/i2t_R_at_1", "test/t2i_R_at_1"),
    "zero_shot": ("test/zeroshot_auroc_mean", "test/i2t_R_at_1"),
}
LEGACY_PAIRING = {"linear_probe": "multilabel_auroc", "cls": "multilabel_auroc", "vqa": "vqa_accuracy"}


@dataclass
class PairRow:
    """One metric of a pretrained run beside its random-init partner."""

    group: str
    kind: str
    """``eval`` (pretraining evaluation) or ``finetune``."""
    task: str
    label_fraction: float | None
    metric: str
    pretrained: float | None
    random: float | None
    pretrained_ci95: list[float] | None
    random_ci95: list[float] | None
    difference: float | None
    difference_ci95: list[float] | None
    interval: str
    """How ``difference_ci95`` was computed: ``PAIRED``, ``FROM_INTERVALS`` or ``none``."""
    pretrained_run: str
    random_run: str | None
    pair: str

    @property
    def setting(self) -> str:
        if self.label_fraction is None:
            return self.task
        return f"{self.task} @ {100 * self.label_fraction:g} % labels"

    headline: bool = False
    """The run's first headline metric (its label-efficiency curve)."""


def _ci(run: RunSummary, metric: str) -> list[float] | None:
    lo, hi = run.final.get(f"{metric}_ci95_low"), run.final.get(f"{metric}_ci95_high")
    return None if lo is None or hi is None else [lo, hi]


def interval_from_two(
    pre: float, rnd: float, ci_pre: Sequence[float] | None, ci_rnd: Sequence[float] | None
) -> list[float] | None:
    """The difference's 95 % interval from the two models' own intervals, normal approximation: half-widths
    added in quadrature (``d ± sqrt(h1² + h2²)``). It treats the two estimates as independent; scored on the same
    samples they are positively correlated, so this is wider than the paired bootstrap's (conservative)."""
    if ci_pre is None or ci_rnd is None:
        return None
    h1, h2 = (float(ci_pre[1]) - float(ci_pre[0])) / 2, (float(ci_rnd[1]) - float(ci_rnd[0])) / 2
    half = math.hypot(h1, h2)
    d = pre - rnd
    return [d - half, d + half]


class PredictionStore:
    """Per-sample test predictions of fine-tuning runs: the logged artifact, else the run folder's file."""

    def __init__(self, client: Any, work: Path) -> None:
        self.client = client
        self.work = work
        self._cache: dict[str, Any] = {}

    def get(self, run: RunSummary) -> Any | None:
        if run.run_id in self._cache:
            return self._cache[run.run_id]

        path = None
        try:
            if self.client is not None:
                names = {a.path for a in self.client.list_artifacts(run.run_id)}
                if PREDICTIONS_FILE in names:
                    dest = self.work / run.run_id
                    dest.mkdir(parents=True, exist_ok=True)
                    path = Path(self.client.download_artifacts(run.run_id, PREDICTIONS_FILE, str(dest)))
        except Exception:  # noqa: BLE001 - an artifact store we cannot read: try the run folder
            path = None
        if path is None:
            folder = run.params.get("train.output_dir")
            candidate = Path(folder) / PREDICTIONS_FILE if folder else None
            path = candidate if candidate is not None and candidate.is_file() else None
        value = torch.load(path, weights_only=True) if path is not None else None
        self._cache[run.run_id] = value
        return value


def paired_interval(
    pairing: str, metric: str, pre: Any, rnd: Any, *, params: Mapping[str, str], n_resamples: int = 1000
) -> tuple[float, list[float]] | None:
    """``(difference, [low, high])`` of ``metric`` by the paired statistic ``pairing`` (``mpma.pairing``: a name in
    ``mpma_ds.eval.paired.PAIRED_STATISTICS``) over the two runs' per-sample test predictions (the same samples, in
    the same order); ``None`` when the task or predictions do not allow it."""
    if not pairing or pairing not in PAIRED_STATISTICS:
        return None
    if pre is None or rnd is None or list(pre.get("keys", [])) != list(rnd.get("keys", [1])):
        return None
    key = metric.split("/", 1)[1]
    found = PAIRED_STATISTICS[pairing](pre, rnd, key, params, n_resamples)
    if found is None:
        return None
    d, ci = found[key]["difference"], found[key]["difference_ci95"]
    if d is None or ci is None or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (d, *ci)):
        return None
    return float(d), [float(ci[0]), float(ci[1])]


def headline_metrics(run: RunSummary) -> tuple[str, ...]:
    """The test metrics a fine-tuning run compares on: its ``mpma.headline_metrics`` tag (written by the Trainer
    from the task's declaration), or for a run logged before that tag existed, the table those runs had."""
    tag = run.tags.get(HEADLINE_TAG)
    if tag is not None:
        return tuple(m for m in tag.split(",") if m)
    return LEGACY_PAIR_METRICS.get(run.tags.get("mpma.task", ""), ())


def pairing(run: RunSummary) -> str:
    """The run's paired statistic (``mpma.pairing``; legacy runs: by task)."""
    tag = run.tags.get(PAIRING_TAG)
    return tag if tag is not None else LEGACY_PAIRING.get(run.tags.get("mpma.task", ""), "")


def _newest(runs: Iterable[RunSummary]) -> dict[str, RunSummary]:
    """The newest run of each pair key."""
    out: dict[str, RunSummary] = {}
    for r in sorted(runs, key=lambda r: -r.start_time):
        if r.pair is not None:
            out.setdefault(r.pair, r)
    return out


def pair_rows(
    groups: Sequence[RunGroup], *, predictions: PredictionStore | None = None, n_resamples: int = 1000
) -> list[PairRow]:
    """Every pretrained child of every group beside its random partner (the newest run of each pair key), one
    row per compared metric; pretrained runs without a partner get a row with ``random`` empty."""
    rows: list[PairRow] = []
    for g in groups:
        if g.parent_id is None:
            continue
        pre_runs = _newest(c for c in g.children if c.init == "pretrained")
        rnd_runs = _newest(g.partners)
        order = sorted(pre_runs.values(), key=lambda r: (r.kind != "eval", r.tags.get("mpma.task", ""),
                                                         float(r.tags.get("mpma.label_fraction", 1.0))))  # fmt: skip
        for pre in order:
            rnd = rnd_runs.get(pre.pair or "")
            if pre.kind == "eval":
                task, fraction = f"evaluation ({pre.tags.get('mpma.split', '?')})", None
                metrics = [m for m in EVAL_METRICS if m in pre.final]
            else:
                task = pre.tags.get("mpma.task", "?")
                fraction = float(pre.tags.get("mpma.label_fraction", 1.0))
                metrics = [m for m in headline_metrics(pre) if m in pre.final]
            for metric in metrics:
                a = pre.final.get(metric)
                b = rnd.final.get(metric) if rnd is not None else None
                ci_a, ci_b = _ci(pre, metric), _ci(rnd, metric) if rnd is not None else None
                diff, ci, how = None, None, "none"
                if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)):
                    diff = a - b
                    paired = None
                    if pre.kind == "finetune" and predictions is not None:
                        paired = paired_interval(
                            pairing(pre),
                            metric,
                            predictions.get(pre),
                            predictions.get(rnd),
                            params=pre.params,
                            n_resamples=n_resamples,
                        )
                    if paired is not None:
                        diff, ci = paired
                        how = PAIRED
                    else:
                        ci = interval_from_two(a, b, ci_a, ci_b)
                        how = FROM_INTERVALS if ci is not None else "none"
                rows.append(PairRow(
                    group=g.parent_id, kind=pre.kind, task=task, label_fraction=fraction, metric=metric,
                    pretrained=a, random=b, pretrained_ci95=ci_a, random_ci95=ci_b, difference=diff,
                    difference_ci95=ci, interval=how, pretrained_run=pre.run_id,
                    random_run=rnd.run_id if rnd is not None else None, pair=pre.pair or "",
                    headline=pre.kind == "finetune" and metric == next(iter(headline_metrics(pre)), None),
                ))  # fmt: skip
    return rows


def _fmt_ci(value: float | None, ci: Sequence[float] | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


PAIR_HEAD = ("setting", "metric", "pretrained", "random", "difference [95 %]", "interval")


def pair_cells(p: PairRow) -> list[str]:
    return [p.setting, p.metric, _fmt_ci(p.pretrained, p.pretrained_ci95), _fmt_ci(p.random, p.random_ci95),
            _fmt_ci(p.difference, p.difference_ci95, signed=True), p.interval]  # fmt: skip


def format_pairs_table(rows: Sequence[PairRow]) -> str:
    """Plain-text table of ``pair_rows``."""
    return _text_table(PAIR_HEAD, [pair_cells(p) for p in rows])
