"""The comparison report as one self-contained HTML page (every image base64-embedded, no script, no network:
it opens offline and can be mailed), and the grounding gallery it shows."""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.eval.grounding import BEST_MAP, OVERLAY_INDEX
from mpma_ds.tracking.compare import ParamDiff, RunGroup, RunSummary, _fmt
from mpma_ds.tracking.pairs import PAIR_HEAD, PAIRED, PairRow, pair_cells

THUMB_PX = 300
SECTIONS = (
    ("runs", "Runs"),
    ("pairs", "Pretrained vs random"),
    ("changes", "What changed"),
    ("training", "Training curves"),
    ("evaluation", "Evaluation over steps"),
    ("label-efficiency", "Label efficiency"),
    ("grounding", "Grounding gallery"),
)
"""Every section of the page, in order (id, heading); each is present even when it has nothing to show."""
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em 2em;color:#222;max-width:1500px}
h1{font-size:1.5em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em}nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.86em}
td,th{border:1px solid #d6d6d6;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f0f0f0}td.l,th.l{text-align:left}tr.group td{background:#eef4fb;font-weight:600;text-align:left}
.pos{color:#11703a;font-weight:600}.neg{color:#b02020;font-weight:600}.na{color:#999}
figure{margin:.5em 0}figure img{max-width:100%;border:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.pair{border:1px solid #ddd;padding:6px;border-radius:4px}
.pair img{width:220px;display:block}.pair .row{display:flex;gap:6px}.cap{font-size:.75em;color:#444;max-width:450px}
.hit{color:#11703a}.miss{color:#b02020}details{margin:.4em 0}code{background:#f6f6f6;padding:0 3px}
.empty{color:#777;font-style:italic}.scroll{overflow-x:auto;max-width:100%}
"""


# ----------------------------------------------------------------------------------------------- gallery
@dataclass
class Overlay:
    """One overlay PNG of an evaluation run: its sample key, finding, phrase, whether the map's peak hit."""

    key: str
    finding: str
    phrase: str
    hit: bool | None
    png: bytes
    map: str | None = None
    """The grounding map drawn (``None``: a run logged before overlays.json named it: the local similarity)."""


@dataclass
class GalleryPair:
    key: str
    finding: str
    phrase: str
    pretrained: Overlay | None
    random: Overlay | None


@dataclass
class Gallery:
    """Grounding overlays by finding: ``findings[name]`` = pretrained/random pairs of the same (sample, finding)."""

    pretrained_run: str
    random_run: str | None
    findings: dict[str, list[GalleryPair]] = field(default_factory=dict)
    map: str | None = None
    pointing: dict[str, str] = field(default_factory=dict)
    """Each side's pointing game over the whole split (``"0.207 [0.180, 0.236]"``) and ``chance``."""


def _finding_from_name(stem: str) -> str:
    """The finding at the end of an overlay name (``003-<key>-pleural_effusion``) for runs logged before
    ``overlays.json`` existed: the longest CheXpert label whose slug ends the name."""
    slugs = sorted(((re.sub(r"[^a-z0-9]+", "_", n.lower()), n) for n in CHEXPERT_LABELS), key=lambda s: -len(s[0]))
    for slug, name in slugs:
        if stem.lower().endswith(slug):
            return name
    return "other"


def read_overlays(client: Any, run: RunSummary, work: Path) -> list[Overlay]:
    """The overlays an evaluation run logged under ``grounding/`` (``[]`` when it logged none)."""
    try:
        names = [a.path for a in client.list_artifacts(run.run_id, "grounding")]
    except Exception:  # noqa: BLE001 - an artifact store we cannot read: no gallery for this run
        return []
    if not any(n.endswith(".png") for n in names):
        return []
    folder = Path(client.download_artifacts(run.run_id, "grounding", str(work / f"g-{run.run_id}")))
    index_file = folder / OVERLAY_INDEX
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else None
    if index is None:
        index = [
            {"file": p.name, "key": p.stem, "finding": _finding_from_name(p.stem), "phrase": "", "hit": {}}
            for p in sorted(folder.glob("*.png"))
        ]
    out = []
    for entry in index:
        png = folder / entry["file"]
        if not png.is_file():
            continue
        hits = list((entry.get("hit") or {}).values())
        out.append(
            Overlay(
                entry["key"],
                entry["finding"],
                entry.get("phrase", ""),
                hits[0] if hits else None,
                png.read_bytes(),
                entry.get("map"),
            )
        )
    return out


def grounding_gallery(client: Any, groups: Sequence[RunGroup], work: Path) -> list[Gallery]:
    """For each pretrained evaluation run that logged overlays: its overlays by finding, beside the random twin's
    overlay of the same (sample, finding) when the twin logged one."""
    galleries = []
    for g in groups:
        partners = {p.pair: p for p in sorted(g.partners, key=lambda r: -r.start_time) if p.kind == "eval"}
        for run in g.children:
            if run.kind != "eval" or run.init != "pretrained":
                continue
            mine = read_overlays(client, run, work)
            if not mine:
                continue
            twin = partners.get(run.pair)
            theirs = {(o.key, o.finding): o for o in (read_overlays(client, twin, work) if twin else [])}
            gallery = Gallery(
                run.run_id, twin.run_id if twin else None, map=next((o.map for o in mine if o.map), None)
            )
            gallery.pointing = pointing_cells(run, twin)
            for o in mine:
                gallery.findings.setdefault(o.finding, []).append(
                    GalleryPair(o.key, o.finding, o.phrase, o, theirs.pop((o.key, o.finding), None))
                )
            for o in theirs.values():  # the twin's examples the pretrained evaluation did not draw
                gallery.findings.setdefault(o.finding, []).append(GalleryPair(o.key, o.finding, o.phrase, None, o))
            galleries.append(gallery)
    return galleries


def pointing_cells(run: RunSummary, twin: RunSummary | None) -> dict[str, str]:
    """``{"pretrained", "random", "chance"}``: the evaluations' logged pointing game with its 95 % interval (the
    whole split's, not the gallery's few films); absent where a run logged none."""
    out = {}
    for side, r in (("pretrained", run), ("random", twin)):
        value = r.final.get("eval/pointing_game") if r is not None else None
        if value is None:
            continue
        low, high = r.final.get("eval/pointing_game_ci95_low"), r.final.get("eval/pointing_game_ci95_high")
        out[side] = f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")
        if "eval/pointing_game_chance" in r.final:
            out.setdefault("chance", f"{r.final['eval/pointing_game_chance']:.3f}")
    return {k: out[k] for k in ("pretrained", "random", "chance") if k in out}


def thumbnail(png: bytes, width: int = THUMB_PX) -> bytes:
    """``png`` scaled down to ``width`` pixels wide (kept when smaller), as PNG bytes."""
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, max(1, round(im.height * width / im.width))), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------- page
def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(alt)}">'


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, raw: bool = False) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i < left else ""}">{c if raw else _e(c)}</td>' for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<div class='scroll'><table><tr>{th}</tr>{body}</table></div>"


def _runs_section(groups: Sequence[RunGroup], metrics: Sequence[str]) -> str:
    head = ["run", "id", "kind", "init", "task / setting", "status", *metrics]
    th = "".join(f'<th class="{"l" if i < 5 else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    rows = []
    for g in groups:
        rows.append(f'<tr class="group"><td colspan="{len(head)}">{_e(g.title)}</td></tr>')
        members = (
            ([(g.parent, "")] if g.parent else [])
            + [(c, "├ ") for c in g.children]
            + [(p, "┆ ") for p in g.partners]
        )
        for r, mark in members:
            setting = r.tags.get("mpma.task", "")
            if "mpma.label_fraction" in r.tags:
                setting += f" @ {100 * float(r.tags['mpma.label_fraction']):g} % labels"
            if r.kind == "eval":
                setting = f"evaluation of {r.tags.get('mpma.split', '?')}"
            init = r.init + (" (partner)" if mark == "┆ " else "")
            cells = [
                mark + r.name,
                r.run_id[:8],
                r.kind,
                init,
                setting,
                r.status,
                *(_fmt(r.last.get(m)) for m in metrics),
            ]
            rows.append(
                "<tr>"
                + "".join(f'<td class="{"l" if i < 5 else ""}">{_e(c)}</td>' for i, c in enumerate(cells))
                + "</tr>"
            )
    return (
        "<p>Each pretraining run with the evaluation and fine-tuning runs made from its weights (MLflow child runs:"
        " <code>mlflow ui</code> shows the same tree), and each random-init run beside the pretrained run it pairs"
        f" with (┆: same task, label fraction and seeds, or the same evaluated split).</p><div class='scroll'><table>"
        f"<tr>{th}</tr>" + "".join(rows) + "</table></div>"
    )


def _diff_class(p: PairRow) -> str:
    if p.difference_ci95 is None:
        return "na"
    lo, hi = p.difference_ci95
    return "pos" if lo > 0 else "neg" if hi < 0 else ""


def _pairs_section(pairs: Sequence[PairRow], groups: Sequence[RunGroup]) -> str:
    if not pairs:
        return '<p class="empty">No pretrained run with a random-init partner among these runs.</p>'
    titles = {g.parent_id: g.title for g in groups}
    out = []
    for group in dict.fromkeys(p.group for p in pairs):
        rows = []
        for p in (q for q in pairs if q.group == group):
            cells = [_e(c) for c in pair_cells(p)]
            cells[4] = f'<span class="{_diff_class(p)}">{cells[4]}</span>'
            rows.append(cells)
        out.append(f"<h3>{_e(titles.get(group, group))}</h3>" + _table(PAIR_HEAD, rows, left=2, raw=True))
    methods = sorted({p.interval for p in pairs})
    notes = {
        PAIRED: "paired bootstrap: the same test samples resampled for both runs (from their logged per-sample"
        " predictions, test_predictions.pt)",
        "from the two intervals": "d ± √(h₁² + h₂²) from the two runs' logged 95 % bootstrap intervals (normal"
        " approximation treating them as independent; both were scored on the same samples, so it is wider than"
        " a paired interval: conservative)",
        "none": "no interval: a run logged no bootstrap interval, or a value is missing",
    }
    legend = "".join(f"<li><b>{_e(m)}</b>: {_e(notes.get(m, m))}</li>" for m in methods)
    return (
        "<p>difference = pretrained − random, with its 95 % interval; <span class='pos'>green</span>: the interval"
        " lies above 0, <span class='neg'>red</span>: below 0.</p>"
        + "".join(out)
        + f"<ul class='meta'>{legend}</ul>"
    )


def _changes_section(diffs: Sequence[ParamDiff]) -> str:
    if not diffs:
        return '<p class="empty">Fewer than two runs of any one kind: nothing to compare.</p>'
    out = []
    for d in diffs:
        head = ["parameter", *(r.label for r in d.runs)]
        rows = [[k, *("—" if v is None else v for v in vals)] for k, vals in d.differing.items()]
        same = _table(["parameter", "value (all runs)"], [[k, v] for k, v in d.identical.items()])
        out.append(
            f"<h3>{_e(d.title)} ({len(d.runs)} runs): {len(d.differing)} parameter(s) differ</h3>"
            + (_table(head, rows) if rows else '<p class="empty">All logged parameters are the same.</p>')
            + f"<details><summary>{len(d.identical)} identical parameter(s)</summary>{same}</details>"
        )
    return (
        "<p>The logged recipe and DeepSpeed-config parameters (<code>ds.*</code>) that differ between runs of one"
        " kind and task (— : not logged by that run); the identical ones are folded away.</p>" + "".join(out)
    )


def _figure(plots: Mapping[str, Path], name: str, alt: str, empty: str) -> str:
    path = plots.get(name)
    if path is None:
        return f'<p class="empty">{_e(empty)}</p>'
    return f"<figure>{_img(path.read_bytes(), alt)}<figcaption class='meta'>{_e(path.name)}</figcaption></figure>"


def _gallery_section(galleries: Sequence[Gallery], runs: Sequence[RunSummary]) -> str:
    if not galleries:
        return (
            '<p class="empty">No evaluation run logged grounding overlays (run <code>launch/evaluate.py'
            " --grounding N</code> on shards with ground truth).</p>"
        )
    names = {r.run_id: r.label for r in runs}
    out = []
    for g in galleries:
        twin = names.get(g.random_run, "no random twin with overlays") if g.random_run else "no random twin"
        out.append(f"<h3>{_e(names.get(g.pretrained_run, g.pretrained_run))} beside {_e(twin)}</h3>")
        scores = " · ".join(f"{side} {_e(v)}" for side, v in g.pointing.items())
        out.append(
            f"<p class='meta'>map: <code>{_e(g.map or BEST_MAP)}</code>"
            + ("" if g.map else " (not recorded by these runs: the local similarity, the only map then)")
            + (f"; pointing game over the whole split: {scores}" if scores else "")
            + "</p>"
        )
        for finding, items in sorted(g.findings.items()):
            cards = []
            for item in items:
                panels = []
                for side, o in (("pretrained", item.pretrained), ("random", item.random)):
                    if o is None:
                        continue
                    verdict = (
                        ""
                        if o.hit is None
                        else (" <span class='hit'>hit</span>" if o.hit else " <span class='miss'>miss</span>")
                    )
                    panels.append(
                        f"<div>{_img(thumbnail(o.png), f'{side}: {item.finding} {item.key}')}"
                        f"<div class='cap'>{side}{verdict}</div></div>"
                    )
                phrase = f"“{_e(item.phrase)}” · " if item.phrase else ""
                cards.append(
                    f"<div class='pair'><div class='row'>{''.join(panels)}</div>"
                    f"<div class='cap'>{phrase}{_e(item.key)}</div></div>"
                )
            out.append(f"<h4>{_e(finding)} ({len(items)})</h4><div class='gallery'>{''.join(cards)}</div>")
    return (
        "<p>The finding phrase's grounding map over the film, for the pretrained model and its random twin on the"
        f" same films: the map named under each heading (<code>{_e(BEST_MAP)}</code> is the one"
        ' <code>MPMA.grounding</code> gives and every default plays: docs/model.md, "Which map MPMA.grounding'
        " uses\"); green box: where the finding was drawn (the truth); ×: the map's maximum (the pointing game's"
        " hit or miss).</p>" + "".join(out)
    )


def write_html(
    path: Path,
    *,
    experiment: str,
    uri: str,
    runs: Sequence[RunSummary],
    metrics: Sequence[str],
    groups: Sequence[RunGroup],
    pairs: Sequence[PairRow],
    diffs: Sequence[ParamDiff],
    plots: Mapping[str, Path],
    gallery: Sequence[Gallery],
    filter_string: str = "",
    smooth: float = 0.0,
) -> Path:
    """The report page at ``path``: every section of ``SECTIONS``, images embedded."""
    body = {
        "runs": _runs_section(groups, metrics),
        "pairs": _pairs_section(pairs, groups),
        "changes": _changes_section(diffs),
        "training": _figure(
            plots, "training_pretrain", "pretraining curves", "No pretraining run logged training curves."
        )
        + _figure(plots, "training_finetune", "fine-tuning curves", "No fine-tuning run logged training curves."),
        "evaluation": _figure(
            plots,
            "eval_over_steps",
            "evaluation metrics over steps",
            "No evaluation metric over steps in these runs.",
        ),
        "label-efficiency": _figure(
            plots,
            "label_efficiency",
            "label-efficiency curves",
            "No fine-tuning runs with a label fraction among these runs.",
        ),
        "grounding": _gallery_section(gallery, runs),
    }
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    selection = f", filter <code>{_e(filter_string)}</code>" if filter_string else ""
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{body[sid]}</section>' for sid, title in SECTIONS)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(experiment)}: run comparison</title>"
        f"<style>{CSS}</style></head><body><h1>MLflow experiment {_e(experiment)}</h1>"
        f"<p class='meta'>{len(runs)} run(s) in {len(groups)} group(s) from <code>{_e(uri)}</code>{selection};"
        f" written {now}{f'; curves smoothed (EMA {smooth:g})' if smooth else ''}</p><nav>{nav}</nav>{sections}"
        "</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
