"""The batch run behind ``mpma-predict``: decode films in loader workers, score them, ground phrases, write
``predictions.jsonl`` / ``predictions.csv``, overlays, thumbnails and the viewer; resumable.

Output folder::

    predictions.jsonl   one record per film (Predictor.record + thumb, overlays, run); appended batch by batch
    predictions.csv     the same, one row per film: scores (and probabilities), findings
    skipped.jsonl       the files not scored this run: file, reason (the build's reject code), detail
    thumbs/<key>.jpg    overlays/<key>/<phrase>.png    index.html

**Resume**: a record already in ``predictions.jsonl`` whose ``run`` (a hash of the model, labels, prompts,
calibration and grounding options) matches this run's is kept and its film not redone; records of other options
are redone. A line torn by a kill is dropped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_tools.sources.common import ImageRejected
from mpma_ds.predict.inputs import DecodeRules, Film, load_film
from mpma_ds.predict.overlays import map_peak, phrase_slug, save_overlay, save_thumbnail
from mpma_ds.predict.predictor import Predictor
from mpma_ds.predict.viewer import write_viewer

RECORDS_FILE = "predictions.jsonl"
CSV_FILE = "predictions.csv"
SKIPPED_FILE = "skipped.jsonl"


@dataclass
class PredictOptions:
    phrases: list[str] = field(default_factory=list)
    """Phrases grounded on every film."""
    ground_findings: bool = True
    """Also ground the findings at or above ``threshold`` (at most ``max_findings`` per film)."""
    threshold: float | None = None
    """Findings cut: calibrated probability (default 0.5), else zero-shot score (default 0.0)."""
    max_findings: int = 3
    batch_size: int = 16
    workers: int = 2
    """Decoding processes (0: in this process)."""
    rules: DecodeRules = field(default_factory=DecodeRules)
    """What a film must be (DICOM modalities, body parts, size, aspect): build_shards' defaults."""


@dataclass
class RunResult:
    scored: int
    """Films scored in this run."""
    kept: int
    """Films whose results an earlier run had written (resume)."""
    skipped: list[dict[str, str]]
    seconds: float
    """Wall time of the scoring loop (decode + model + writing)."""
    records: list[dict[str, Any]]


class _Films(torch.utils.data.Dataset):
    """Decodes one film (`load_film`) and makes its eval tensor in a loader worker."""

    def __init__(self, paths: Sequence[Path], transform: Callable, rules: DecodeRules) -> None:
        self.paths, self.transform, self.rules = list(paths), transform, rules

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Path, Film | None, torch.Tensor | None, tuple[str, str] | None]:
        path = self.paths[i]
        try:
            film = load_film(path, self.rules)
        except ImageRejected as err:
            return path, None, None, (err.reason, err.detail)
        return path, film, self.transform(film.image), None


def _as_list(batch: list) -> list:
    return batch


def run_fingerprint(predictor: Predictor, opts: PredictOptions) -> str:
    """The ``run`` field of a record: what its content depends on besides the film."""
    cal = predictor.calibration
    what = {**predictor.fingerprint(), "calibration": None if cal is None else [cal.method, cal.params],
            "phrases": opts.phrases, "ground_findings": opts.ground_findings, "threshold": opts.threshold,
            "max_findings": opts.max_findings}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``predictions.jsonl`` (a torn last line is dropped)."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "file" in rec:
                out.append(rec)
    return out


def _film_outputs(predictor: Predictor, film: Film, rec: dict[str, Any], phrases: list[tuple[str | None, str]],
                  out_dir: Path) -> None:  # fmt: skip
    """Thumbnail and one overlay per phrase for one film; their relative paths into ``rec``."""
    rec["thumb"] = (
        save_thumbnail(out_dir / "thumbs" / f"{film.key}.jpg", film.image).relative_to(out_dir).as_posix()
    )
    maps = predictor.phrase_maps(film, [p for _, p in phrases])
    sx, sy = film.width / film.image.width, film.height / film.image.height
    rec["overlays"] = []
    for label, phrase in phrases:
        grid = maps[phrase]
        x, y = map_peak(grid)
        caption = f'"{phrase}"' + (f" ({label}: {rec['scores'][label]:+.3f})" if label else "")
        path = save_overlay(out_dir / "overlays" / film.key / f"{phrase_slug(phrase)}.png", film.image, grid,
                            caption=caption)  # fmt: skip
        rec["overlays"].append({"phrase": phrase, "label": label, "file": path.relative_to(out_dir).as_posix(),
                                "peak": [round(x * sx), round(y * sy)], "max": round(float(grid.max()), 4),
                                "min": round(float(grid.min()), 4)})  # fmt: skip


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    out_dir: str | Path,
    opts: PredictOptions,
    *,
    summary: str = "",
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> RunResult:
    """Score and ground ``files`` into ``out_dir`` (see the module docstring); a file that is no readable chest
    film is reported once through ``report`` (``skipped FILE: reason (detail)``) and skipped."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = run_fingerprint(predictor, opts)
    earlier = read_records(out_dir / RECORDS_FILE)
    kept = [r for r in earlier if r.get("run") == run]
    done = {str(Path(r["file"]).resolve()) for r in kept}
    todo = [f for f in files if str(Path(f).resolve()) not in done]
    kept_here = len(files) - len(todo)
    records_file = out_dir / RECORDS_FILE
    # rewrite without the records of other options (and a torn line), then append batch by batch
    records_file.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    skipped: list[dict[str, str]] = []
    new: list[dict[str, Any]] = []
    loader = torch.utils.data.DataLoader(
        _Films(todo, predictor.transform, opts.rules), batch_size=opts.batch_size, num_workers=opts.workers if todo else 0,
        collate_fn=_as_list, shuffle=False,
    )  # fmt: skip
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="film", disable=not progress or None, desc="mpma-predict")
    with open(records_file, "a", encoding="utf-8") as sink:
        for batch in loader:
            good = [(f, t) for _, f, t, _ in batch if f is not None]
            for path, _, _, why in batch:
                if why is not None:
                    skipped.append({"file": str(path), "reason": why[0], "detail": why[1]})
                    report(f"skipped {path}: {why[0]} ({why[1]})")
            if good:
                scores = predictor.scores_of(torch.stack([t for _, t in good]))  # (B, C)
                probs = predictor.probabilities_of(scores)
                for i, (film, _) in enumerate(good):
                    p = probs[i] if probs is not None else None
                    found = predictor.finding_phrases(scores[i].numpy(), p, opts.threshold, len(predictor.labels))
                    rec = predictor.record(film, scores[i].numpy(), p, [label for label, _ in found])
                    wanted = [(None, ph) for ph in opts.phrases]
                    if opts.ground_findings:
                        wanted += [
                            (label, ph) for label, ph in found[: opts.max_findings] if ph not in opts.phrases
                        ]
                    _film_outputs(predictor, film, rec, wanted, out_dir)
                    rec["run"] = run
                    sink.write(json.dumps(rec) + "\n")
                    new.append(rec)
                sink.flush()
            bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    records = kept + new
    write_csv(out_dir / CSV_FILE, records, predictor.labels)
    (out_dir / SKIPPED_FILE).write_text("".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8")
    write_viewer(out_dir, records, labels=predictor.labels, title=f"mpma-predict: {predictor.source.path.name}",
                 summary=summary, skipped=skipped)  # fmt: skip
    return RunResult(len(new), kept_here, skipped, seconds, records)


def write_csv(path: Path, records: Sequence[dict[str, Any]], labels: Sequence[str]) -> Path:
    """One row per film: file, key, geometry, view, ``score/<label>``, ``probability/<label>`` (when calibrated),
    findings (``;``-separated)."""
    calibrated = any(r.get("probabilities") for r in records)
    head = ["file", "key", "width", "height", "view", *(f"score/{n}" for n in labels)]
    head += [f"probability/{n}" for n in labels] if calibrated else []
    head.append("findings")
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for r in records:
            row = [r["file"], r["key"], r["width"], r["height"], r.get("view") or "",
                   *(r["scores"].get(n, "") for n in labels)]  # fmt: skip
            if calibrated:
                probs = r.get("probabilities") or {}
                row += ["" if probs.get(n) is None else probs[n] for n in labels]
            row.append(";".join(r.get("findings") or []))
            w.writerow(row)
    return path
