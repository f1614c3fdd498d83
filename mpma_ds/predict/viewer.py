"""``index.html``: one self-contained page over `mpma-predict`'s results (no server, no network).

The records are inlined as JSON; the thumbnails and overlays are the PNG / JPEG files beside the page
(``thumbs/``, ``overlays/``), referenced by relative paths, so the folder opens from disk (``file://``) or any
static host. The page: a grid of films; a finding selector and a minimum-value slider (probability when the run
was calibrated, else zero-shot score) that filter and sort the grid; a click on a film opens its panel — the
overlays per phrase (a button each) and every label's score and probability. ``index.html#film=<key>`` opens
with that film's panel open.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PAGE = "index.html"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#111;color:#ddd}
header{padding:10px 16px;background:#1b1b1b;border-bottom:1px solid #333}
header h1{font-size:18px;margin:0 0 4px} header p{margin:2px 0;font-size:13px;color:#aaa}
#controls{padding:8px 16px;display:flex;gap:16px;align-items:center;font-size:14px;flex-wrap:wrap}
#grid{display:flex;flex-wrap:wrap;gap:10px;padding:8px 16px}
.card{background:#1e1e1e;border:1px solid #333;border-radius:6px;padding:6px;width:180px;cursor:pointer}
.card:hover{border-color:#6af} .card img{width:100%;height:180px;object-fit:contain;background:#000}
.card .name{font-size:12px;word-break:break-all;margin-top:4px} .card .top{font-size:12px;color:#9cf}
#detail{position:fixed;inset:0;background:rgba(0,0,0,.85);display:none;overflow:auto}
#detail .box{background:#1a1a1a;margin:24px auto;max-width:1100px;padding:14px;border-radius:8px;display:flex;gap:16px}
#detail .left{flex:2} #detail .right{flex:1;font-size:13px}
#detail img.overlay{max-width:100%;max-height:78vh;display:block;background:#000}
#phrases button{margin:0 6px 6px 0;background:#2a2a2a;color:#ddd;border:1px solid #555;border-radius:4px;padding:3px 8px}
#phrases button.on{background:#35a;border-color:#6af}
table{border-collapse:collapse;width:100%} td,th{padding:2px 6px;border-bottom:1px solid #333;text-align:left}
tr.pos td{color:#fc6} #close{float:right;cursor:pointer;font-size:20px}
#skipped{font-size:12px;color:#c99;padding:0 16px}
"""

_SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
const recs = DATA.records, calibrated = DATA.calibrated, labels = DATA.labels;
const sel = document.getElementById('finding'), rng = document.getElementById('min'),
      out = document.getElementById('minval'), grid = document.getElementById('grid'),
      count = document.getElementById('count');
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
function value(r, l){ const v = calibrated ? (r.probabilities||{})[l] : r.scores[l]; return v==null ? NaN : v; }
function best(r){ let b = null; for (const l of labels){ if (l==='No Finding') continue; const v = value(r,l);
  if (!isNaN(v) && (b===null || v>b[1])) b=[l,v]; } return b; }
for (const l of labels){ const o=document.createElement('option'); o.value=l; o.textContent=l; sel.appendChild(o); }
const lo = calibrated ? 0 : Math.min(...recs.flatMap(r => labels.map(l => value(r,l))).filter(v=>!isNaN(v)), 0);
const hi = calibrated ? 1 : Math.max(...recs.flatMap(r => labels.map(l => value(r,l))).filter(v=>!isNaN(v)), 0);
rng.min = lo; rng.max = hi; rng.step = (hi-lo)/200 || 0.001; rng.value = lo;
function render(){
  const l = sel.value, m = parseFloat(rng.value); out.textContent = m.toFixed(3);
  let shown = recs.map((r,i)=>[r,i]).filter(([r]) => l==='*' ? true : value(r,l) >= m);
  if (l!=='*') shown.sort((a,b)=>value(b[0],l)-value(a[0],l));
  grid.innerHTML = '';
  for (const [r,i] of shown){
    const c = document.createElement('div'); c.className='card'; c.dataset.index=i; c.dataset.key=r.key;
    const b = l==='*' ? best(r) : [l, value(r,l)];
    c.innerHTML = `<img loading="lazy" alt="${r.key}" src="${r.thumb}"><div class="name">${esc(r.name)}</div>` +
      `<div class="top">${b ? esc(b[0])+': '+b[1].toFixed(3) : ''}</div>`;
    c.onclick = () => openFilm(i); grid.appendChild(c);
  }
  count.textContent = `${shown.length} of ${recs.length} films`;
}
function openFilm(i){
  const r = recs[i], d = document.getElementById('detail'); d.style.display='block'; d.dataset.key = r.key;
  document.getElementById('dname').textContent = r.file;
  document.getElementById('dgeom').textContent = `${r.width} x ${r.height} px` + (r.view ? `, view ${r.view}` : '');
  const ph = document.getElementById('phrases'), img = document.getElementById('dimg'); ph.innerHTML='';
  const show = (o, btn) => { img.src = o ? o.file : r.thumb; img.alt = o ? o.phrase : r.key;
    [...ph.children].forEach(x=>x.classList.remove('on')); if (btn) btn.classList.add('on'); };
  (r.overlays||[]).forEach((o, k) => { const b=document.createElement('button'); b.textContent=o.phrase;
    b.onclick=()=>show(o,b); ph.appendChild(b); if(k===0) show(o,b); });
  if (!(r.overlays||[]).length) show(null, null);
  const rows = labels.map(l => { const s=r.scores[l], p=(r.probabilities||{})[l];
    const pos = r.findings.includes(l) ? ' class="pos"' : '';
    return `<tr${pos}><td>${esc(l)}</td><td>${s.toFixed(3)}</td><td>${p==null?'':p.toFixed(3)}</td></tr>`; });
  document.getElementById('dscores').innerHTML =
    `<tr><th>label</th><th>score</th><th>${calibrated?'probability':''}</th></tr>` + rows.join('');
}
document.getElementById('close').onclick = () => document.getElementById('detail').style.display='none';
sel.oninput = render; rng.oninput = render; render();
const asked = location.hash.match(/^#film=(.+)$/);  // index.html#film=<key> opens that film
if (asked) { const i = recs.findIndex(r => r.key === decodeURIComponent(asked[1])); if (i >= 0) openFilm(i); }
"""


def _json_for_script(data: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` can close it)."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def write_viewer(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    labels: Sequence[str],
    title: str = "mpma-predict",
    summary: str = "",
    skipped: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write ``out_dir/index.html`` over ``records`` (`Predictor.record` dicts with ``thumb`` and ``overlays``:
    paths relative to ``out_dir``); ``skipped``: ``{"file", "reason", "detail"}`` of the files not scored."""
    out = Path(out_dir) / PAGE
    calibrated = any(r.get("probabilities") for r in records)
    data = {
        "labels": list(labels),
        "calibrated": calibrated,
        "records": [
            {
                **{
                    k: r.get(k)
                    for k in (
                        "file",
                        "key",
                        "width",
                        "height",
                        "view",
                        "scores",
                        "probabilities",
                        "findings",
                        "thumb",
                        "overlays",
                    )
                },
                "name": Path(str(r["file"])).name,
            }
            for r in records
        ],  # fmt: skip
    }
    what = "probability" if calibrated else "zero-shot score"
    skipped_html = ""
    if skipped:
        items = "".join(
            f"<li>{html.escape(str(s['file']))}: {html.escape(str(s['reason']))}</li>" for s in skipped
        )
        skipped_html = (
            f"<details id='skipped'><summary>{len(skipped)} files skipped</summary><ul>{items}</ul></details>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body>
<header><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>
<p>Not a medical device: research output of a vision-language model, for inspection only.</p></header>
{skipped_html}
<div id="controls">
<label>finding <select id="finding"><option value="*">all films</option></select></label>
<label>minimum {what} <input id="min" type="range"> <span id="minval"></span></label>
<span id="count"></span></div>
<div id="grid"></div>
<div id="detail"><div class="box"><div class="left"><span id="close">&times;</span>
<div id="dname"></div><div id="dgeom"></div><div id="phrases"></div><img id="dimg" class="overlay" alt=""></div>
<div class="right"><table id="dscores"></table></div></div></div>
<script type="application/json" id="data">{_json_for_script(data)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out
