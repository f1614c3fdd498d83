"""The comparison report's figures (matplotlib, Agg): training curves in a grid, evaluation metrics over steps
with the random twin as a dashed baseline, and the label-efficiency curve of each downstream task."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mpma_ds.tracking.compare import EVAL_METRICS, TRAIN_CURVES, RunGroup, RunSummary
from mpma_ds.tracking.pairs import PairRow

TITLES = {
    "loss": "total loss",
    "loss_mlm": "MLM loss",
    "loss_mim": "MIM loss",
    "loss_global": "global (InfoNCE) loss",
    "loss_local": "local alignment loss",
    "loss_itm": "ITM loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "samples_per_s": "samples / s",
    "data_wait_frac": "data-wait fraction",
    "system/cpu_utilization_percentage": "CPU utilisation %",
    "system/system_memory_usage_percentage": "memory used %",
}
FINETUNE_CURVES = ("loss", "lr", "grad_norm")
COLS = 3


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average ``s_t = w * s_(t-1) + (1 - w) * x_t`` (TensorBoard's smoothing), debiased so
    the first points are not pulled towards 0; NaN values are carried over, not averaged in."""
    if weight <= 0:
        return list(values)
    out, acc, norm = [], 0.0, 0.0
    for x in values:
        if math.isnan(x):
            out.append(out[-1] if out else x)
            continue
        acc = weight * acc + (1 - weight) * x
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _plt():
    import matplotlib  # heavy (about a second to import): only when a report draws its plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int = COLS, size: tuple[float, float] = (4.2, 2.9)):
    plt = _plt()
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    # at least 8 inches wide: the figure's title must fit above a single panel too
    fig, axes = plt.subplots(rows, cols, figsize=(max(8.0, size[0] * cols), size[1] * rows + 0.4), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path, legend_rows: int = 0) -> Path:
    """Lay out (room for the title on top and ``legend_rows`` of figure legend below) and write the PNG."""
    height = fig.get_figheight()
    bottom = min(0.3, (0.18 * legend_rows + 0.05) / height) if legend_rows else 0.0
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.3 / height))
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def training_grid(
    runs: Sequence[RunSummary], keys: Sequence[str], path: Path, *, smooth: float, title: str
) -> Path | None:
    """One panel per metric of ``keys`` some run logged (over steps), a line per run; ``smooth`` > 0 draws the
    EMA over the raw curve (kept faint)."""
    present = [k for k in keys if any(len(r.history.get(k, ())) > 0 for r in runs)]
    if not present:
        return None
    fig, axes = _grid(len(present))
    colors = _colors(runs)
    for ax, key in zip(axes, present):
        for r in runs:
            points = r.history.get(key)
            if not points:
                continue
            steps, values = zip(*points)
            style = "--" if r.init == "random" else "-"
            if smooth > 0 and len(points) > 2 and key != "lr":  # a schedule is not noisy: drawn as is
                ax.plot(steps, values, color=colors[r.run_id], alpha=0.25, linewidth=0.8)
                ax.plot(steps, ema(values, smooth), style, color=colors[r.run_id], label=r.label)
            else:
                ax.plot(
                    steps,
                    values,
                    style,
                    color=colors[r.run_id],
                    label=r.label,
                    marker="o" if len(points) < 3 else None,
                )
        ax.set_title(TITLES.get(key, key), fontsize=10)
        # MLflow's system metrics count samples (one every tracking.system_metrics_interval_s), not steps
        ax.set_xlabel("sample" if key.startswith("system/") else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key == "lr" or (key.startswith("loss") and _spans_decades(runs, key)):
            ax.set_yscale("log")
    rows = _legend(fig, axes)
    fig.suptitle(title + (f" (EMA smoothing {smooth:g})" if smooth > 0 else ""), fontsize=11)
    return _save(fig, path, rows)


def _spans_decades(runs: Sequence[RunSummary], key: str) -> bool:
    values = [v for r in runs for _, v in r.history.get(key, ()) if v > 0 and math.isfinite(v)]
    return bool(values) and max(values) / min(values) > 30


def _colors(runs: Sequence[RunSummary]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {r.run_id: palette[i % len(palette)] for i, r in enumerate(runs)}


def _legend(fig, axes) -> int:
    """One legend for the figure, below the panels; returns its number of rows."""
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if not labels:
        return 0
    ncol = min(3, len(labels))
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    return math.ceil(len(labels) / ncol)


def eval_over_steps(groups: Sequence[RunGroup], path: Path) -> Path | None:
    """Each evaluation metric over the pretraining steps (the in-training validation of each pretraining run),
    its evaluation run's value as a star at the evaluated step, and the random twin's value as a dashed
    horizontal baseline with its 95 % interval shaded."""
    with_parent = [g for g in groups if g.parent is not None]
    keys = [
        k
        for k in EVAL_METRICS
        if any(
            g.parent.history.get(k) or any(k in c.final for c in g.children if c.kind == "eval")
            for g in with_parent
        )
    ]
    if not keys:
        return None
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys):
        baselines: dict[str, RunSummary] = {}
        for i, g in enumerate(with_parent):
            color = f"C{i % 10}"
            points = g.parent.history.get(key) or []
            if points:
                steps, values = zip(*points)
                ax.plot(
                    steps,
                    values,
                    "-",
                    color=color,
                    marker="o" if len(points) < 4 else None,
                    markersize=3,
                    label=f"{g.parent.label} (in-training validation)",
                )
            for c in g.children:
                if c.kind == "eval" and c.init == "pretrained" and key in c.final:
                    step = int(float(c.tags.get("mpma.step", 0) or 0)) or (points[-1][0] if points else 0)
                    ax.plot(
                        [step],
                        [c.final[key]],
                        marker="*",
                        markersize=11,
                        color=color,
                        linestyle="none",
                        label=f"{c.label} (evaluation)",
                    )
            for p in g.partners:
                if p.kind == "eval" and key in p.final:
                    baselines.setdefault(p.run_id, p)
        for b in baselines.values():
            ax.axhline(b.final[key], color="0.35", linestyle="--", linewidth=1.2, label=f"{b.label} (random twin)")
            lo, hi = b.final.get(f"{key}_ci95_low"), b.final.get(f"{key}_ci95_high")
            if lo is not None and hi is not None:
                ax.axhspan(lo, hi, color="0.5", alpha=0.15, linewidth=0)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("pretraining step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    rows = _legend(fig, axes)
    fig.suptitle("evaluation metrics over steps; dashed: the random twin (shaded: its 95 % interval)", fontsize=11)
    return _save(fig, path, rows)


def label_efficiency(pairs: Sequence[PairRow], path: Path) -> Path | None:
    """Per downstream task: its first headline metric (``PairRow.headline``) against the label fraction (log axis),
    pretrained (solid) and random init (dashed), each with its 95 % interval as a band."""
    rows = [p for p in pairs if p.headline and p.label_fraction is not None]
    tasks = list(dict.fromkeys(p.task for p in rows))
    if not tasks:
        return None
    fig, axes = _grid(len(tasks), size=(4.4, 3.2))
    for ax, task in zip(axes, tasks):
        mine = [p for p in rows if p.task == task]
        for i, group in enumerate(dict.fromkeys(p.group for p in mine)):
            series = sorted((p for p in mine if p.group == group), key=lambda p: p.label_fraction)
            color = f"C{i % 10}"
            for side, style in (("pretrained", "-"), ("random", "--")):
                pts = [
                    (p.label_fraction, getattr(p, side), getattr(p, f"{side}_ci95"))
                    for p in series
                    if getattr(p, side) is not None
                ]
                if not pts:
                    continue
                x = [q[0] for q in pts]
                y = [q[1] for q in pts]
                shade = color if side == "pretrained" else "0.4"
                ax.plot(
                    x,
                    y,
                    style,
                    marker="o",
                    color=shade,
                    label=f"{side}" + (f" ({group[:6]})" if len(mine) != len(series) else ""),
                )
                bands = [(q[0], q[2]) for q in pts if q[2] is not None]
                if len(bands) == 1:  # one label fraction: no band to draw, an error bar instead
                    (f, (lo, hi)), value = bands[0], next(q[1] for q in pts if q[0] == bands[0][0])
                    ax.errorbar([f], [value], yerr=[[value - lo], [hi - value]], color=shade, capsize=4)
                elif bands:
                    ax.fill_between(
                        [b[0] for b in bands],
                        [b[1][0] for b in bands],
                        [b[1][1] for b in bands],
                        color=shade,
                        alpha=0.15,
                        linewidth=0,
                    )
        ax.set_xscale("log")
        fractions = sorted({p.label_fraction for p in mine})
        ax.set_xticks(fractions, [f"{100 * f:g} %" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labelled training data", fontsize=8)
        ax.set_ylabel(mine[0].metric, fontsize=8)
        ax.set_title(task, fontsize=10)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("label efficiency: pretrained vs random init (bands: 95 % intervals)", fontsize=11)
    return _save(fig, path)


def draw_all(
    runs: Sequence[RunSummary],
    groups: Sequence[RunGroup],
    pairs: Sequence[PairRow],
    out: Path,
    *,
    smooth: float = 0.0,
) -> dict[str, Path]:
    """Every figure that has data, as PNGs under ``out``: ``{section: path}``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "training_pretrain": training_grid(
            [r for r in runs if r.kind in ("pretrain", "train")],
            TRAIN_CURVES,
            out / "training_pretrain.png",
            smooth=smooth,
            title="pretraining: losses, schedule and throughput",
        ),
        "training_finetune": training_grid(
            [r for r in runs if r.kind == "finetune"],
            FINETUNE_CURVES,
            out / "training_finetune.png",
            smooth=smooth,
            title="fine-tuning (dashed: random init)",
        ),
        "eval_over_steps": eval_over_steps(groups, out / "eval_over_steps.png"),
        "label_efficiency": label_efficiency(pairs, out / "label_efficiency.png"),
    }
    return {k: v for k, v in figures.items() if v is not None}
