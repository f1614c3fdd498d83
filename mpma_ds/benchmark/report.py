"""The benchmark page (``OUT/benchmark.html``) and the console table: one row per (dataset, protocol, metric), one
column per model with its 95 % interval, the paired differences (B - A, paired bootstrap interval; bold when it
excludes 0), and the published reference numbers in a column of their own, labelled "published, not reproduced
here", each saying whether its value was checked against a named source or is an unchecked transcription
(`references.status`). Self-contained HTML: no script, no network."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpma_ds.benchmark.references import LABEL, UNCHECKED

_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}th{background:#f2f2f2}
td.l{text-align:left}td.ref{background:#fbf7e8;color:#555;font-style:italic}.sig{font-weight:bold}
.note{color:#666;font-size:12px}"""


def _num(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def cell(metrics: Mapping[str, Any], key: str) -> str:
    """``0.812 [0.790, 0.833]``: the value and its 95 % interval (the value alone without one)."""
    value = metrics.get(key)
    if value is None or isinstance(value, float) and math.isnan(value):
        return "n/a"
    ci = metrics.get(f"{key}_ci95")
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return _num(value)
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (dataset, protocol, metric) shown: the headline metric and, for the linear probe, every
    fraction's mean; each with every model's cell, each paired difference and the reference numbers."""
    rows = []
    for dataset, protocols in results["entries"].items():
        for protocol, block in protocols.items():
            models = block["models"]
            keys: list[str] = []
            for m in models.values():
                if "metrics" not in m:
                    continue
                met = m["metrics"]
                wanted = [m["headline"]]
                if protocol in ("linear_probe", "finetune"):
                    wanted = [
                        k for k in met if k.startswith(("auroc_mean@", "accuracy@")) and not k.endswith("_ci95")
                    ]
                if protocol == "grounding":
                    wanted = ["pointing_game", "pointing_game_chance", "cnr", "miou"]
                if protocol == "retrieval":
                    wanted = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
                if protocol == "vqa":
                    wanted = ["accuracy_overall", "accuracy_closed", "accuracy_open"]
                keys += [k for k in wanted if k not in keys]
            refs = results.get("references", {}).get(dataset, {}).get(protocol, [])
            maps = {m.get("info", {}).get("map") for m in models.values() if "metrics" in m} - {None}
            for key in keys:
                diffs = {}
                for pair, d in block.get("paired", {}).items():
                    if key in d or (
                        protocol in ("linear_probe", "finetune")
                        and key.replace("auroc_mean", "auroc") + "_macro" in d
                    ):
                        diffs[pair] = d.get(key) or d[key.replace("auroc_mean", "auroc") + "_macro"]
                shown = f"{key} ({', '.join(sorted(maps))})" if maps and key != "pointing_game_chance" else key
                rows.append({
                    "dataset": dataset, "protocol": protocol, "metric": shown, "split": block["split"],
                    "images": block["images"],
                    "cells": {n: cell(m.get("metrics", {}), key) if "metrics" in m else f"error: {m['error']}"
                              for n, m in models.items()},
                    "paired": {p: (d["difference"], d["difference_ci95"]) for p, d in diffs.items()},
                    "references": [r for r in refs if r["metric"] == key],
                })  # fmt: skip
    return rows


def ref_status(ref: Mapping[str, Any]) -> str:
    """A reference's checked / unchecked line (``references.status``; results written before it carried one
    get the short form)."""
    return ref.get("status") or ("published, checked" if ref.get("checked") else UNCHECKED)


def _diff_text(diff: tuple[float, list[float]]) -> tuple[str, bool]:
    d, (lo, hi) = diff
    if d is None or lo is None or hi is None or any(map(math.isnan, (d, lo, hi))):
        return "n/a", False
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]", lo > 0 or hi < 0


def format_console(results: Mapping[str, Any]) -> str:
    """A plain-text table of `table_rows`."""
    rows = table_rows(results)
    models = list(results["models"])
    pairs = sorted({p for r in rows for p in r["paired"]})
    head = ["dataset/protocol", "metric", *models, *pairs, f"reference ({LABEL})"]
    body = []
    for r in rows:
        refs = "; ".join(f"{x['model']} {x['value']:g}{'' if x.get('checked') else '*'}" for x in r["references"])
        body.append([f"{r['dataset']}/{r['protocol']}", r["metric"], *(r["cells"].get(m, "") for m in models),
                     *(_diff_text(r["paired"][p])[0] if p in r["paired"] else "" for p in pairs), refs])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in body]
    if any(not x.get("checked") for r in rows for x in r["references"]):
        lines.append(f"* reference: {UNCHECKED} (not found in a reachable source; see references.yaml)")
    lines += [f"skipped: {why}" for why in results.get("skipped", {}).values()]
    return "\n".join(lines)


def write_page(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write the HTML page; returns its path."""
    esc = html.escape
    rows = table_rows(results)
    models = list(results["models"])
    pairs = sorted({p for r in rows for p in r["paired"]})
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Benchmark {esc(results['suite'])}</title>"
           f"<style>{_STYLE}</style></head><body>",
           f"<h1>Benchmark suite {esc(results['suite'])}</h1>",
           "<p class='note'>Each value with its 95 % bootstrap interval; a difference is paired per sample (the same "
           "resampled images for both models), bold when its interval excludes 0. Reference numbers are "
           f"<i>{LABEL}</i>: other models, other code, taken from the papers cited; each says whether its value "
           "was checked against a named source or is an unchecked transcription.</p>",
           "<h2>Results</h2><table id='results'><tr><th>dataset / protocol</th><th>split (images)</th><th>metric</th>"
           + "".join(f"<th>{esc(m)}</th>" for m in models) + "".join(f"<th>{esc(p)}</th>" for p in pairs)
           + f"<th>reference ({esc(LABEL)})</th></tr>"]  # fmt: skip
    for r in rows:
        diffs = []
        for p in pairs:
            text, sig = _diff_text(r["paired"][p]) if p in r["paired"] else ("", False)
            diffs.append(f"<td class='{'sig' if sig else ''}'>{esc(text)}</td>")
        refs = "<br>".join(f"{esc(x['model'])}: {x['value']:g} <span class='note'>({esc(x['source'])}; "
                           f"{esc(ref_status(x))})</span>" for x in r["references"])  # fmt: skip
        out.append(f"<tr><td class='l'>{esc(r['dataset'])} / {esc(r['protocol'])}</td><td>{esc(r['split'])} "
                   f"({r['images']})</td><td class='l'>{esc(r['metric'])}</td>"
                   + "".join(f"<td>{esc(r['cells'].get(m, ''))}</td>" for m in models) + "".join(diffs)
                   + f"<td class='l ref'>{refs}</td></tr>")  # fmt: skip
    out.append("</table><h2>Datasets</h2><table id='datasets'><tr><th>dataset</th><th>images</th><th>patients</th>"
               "<th>boxes</th><th>row problems</th><th>version</th><th>parse s</th></tr>")  # fmt: skip
    for name, d in results.get("datasets", {}).items():
        c = d["counts"]
        probs = ", ".join(f"{k}: {v}" for k, v in c["problems"].items()) or "none"
        out.append(f"<tr><td class='l'>{esc(name)}</td><td>{c['images']}</td><td>{c['patients']}</td><td>{c['boxes']}"
                   f"</td><td class='l'>{esc(probs)}</td><td>{esc(d['version'])}</td><td>{d['parse_seconds']:.2f}</td></tr>")  # fmt: skip
    out.append("</table>")
    if results.get("skipped"):
        out.append(
            "<h2>Skipped</h2><ul>" + "".join(f"<li>{esc(v)}</li>" for v in results["skipped"].values()) + "</ul>"
        )
    out.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(out), encoding="utf-8")
    return path
