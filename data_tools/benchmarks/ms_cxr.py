"""MS-CXR (Boecking et al., ECCV 2022; PhysioNet) as its download unpacks: ``MS_CXR_Local_Alignment_v1.1.0.csv``
(or v1.0.0; one row per box: ``dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height``
and, from v1.1.0, ``split``) whose ``path`` is a MIMIC-CXR-JPG image (``files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg``):
the images are read from ``images`` (default: the MS-CXR folder itself, else a ``mimic-cxr-jpg`` folder beside
it). Each box keeps its phrase (``label_text``): grounding queries the phrase, as BioViL reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_tools.benchmarks.common import (
    BENCHMARKS,
    BenchmarkData,
    BenchRecord,
    Box,
    RowProblem,
    read_rows,
    require_file,
)

MS_CXR_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity", "Pleural Effusion", "Pneumonia",
    "Pneumothorax",
)  # fmt: skip


@dataclass(frozen=True)
class MsCxrOptions:
    table: str | None = None
    images: str | None = None
    """The MIMIC-CXR-JPG folder the ``path`` column is relative to."""
    check_images: bool = True


@BENCHMARKS.register("ms-cxr", options=MsCxrOptions, task="multilabel")
def read_ms_cxr(root: Path, opts: MsCxrOptions) -> BenchmarkData:
    root = Path(root)
    table = require_file(root, opts.table, ("MS_CXR_Local_Alignment_v1.1.0.csv", "MS_CXR_Local_Alignment_v1.0.0.csv"),
                         "MS-CXR table")  # fmt: skip
    need = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
    header, rows = read_rows(table, need)
    col = {h: i for i, h in enumerate(header)}
    bases = [Path(opts.images)] if opts.images else [root, root.parent / "mimic-cxr-jpg"]
    index = {n: i for i, n in enumerate(MS_CXR_LABELS)}
    problems: list[RowProblem] = []
    images: dict[str, dict] = {}
    for n, row in enumerate(rows, 1):
        key, label, phrase = (
            row[col["dicom_id"]].strip(),
            row[col["category_name"]].strip(),
            row[col["label_text"]],
        )
        if label not in index:
            problems.append(
                RowProblem(table.name, n, "unknown_label", f"{key}: {label!r} is not an MS-CXR category")
            )
            continue
        try:
            x, y, w, h, iw, ih = (float(row[col[c]]) for c in ("x", "y", "w", "h", "image_width", "image_height"))
        except ValueError:
            problems.append(RowProblem(table.name, n, "bad_value", f"{key}: box or image size is not numeric"))
            continue
        if not (w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= iw + 0.5 and y + h <= ih + 0.5):
            problems.append(RowProblem(table.name, n, "box_outside_image",
                                       f"{key}: x={x:g} y={y:g} w={w:g} h={h:g} not in {iw:g}x{ih:g}"))  # fmt: skip
            continue
        entry = images.get(key)
        if entry is None:
            rel = row[col["path"]].strip()
            path = next((str(b / rel) for b in bases if (b / rel).is_file()), None) if opts.check_images else rel
            if path is None:
                problems.append(
                    RowProblem(table.name, n, "missing_image", f"{rel} is not under {', '.join(map(str, bases))}")
                )
                images[key] = {"missing": n}
                continue
            parts = Path(rel).parts
            patient = next((p for p in parts if p.startswith("p") and len(p) > 3), key)
            split = row[col["split"]].strip() if "split" in col else "test"
            images[key] = entry = {"path": path, "patient": patient, "split": {"val": "validate"}.get(split, split),
                                   "labels": [0.0] * len(MS_CXR_LABELS), "boxes": []}  # fmt: skip
        if entry.get("missing"):
            problems.append(
                RowProblem(table.name, n, "missing_image", f"{key}: its image is missing (row {entry['missing']})")
            )
            continue
        entry["labels"][index[label]] = 1.0
        entry["boxes"].append(Box(label, x, y, x + w, y + h, (int(iw), int(ih)), phrase.strip()))
    records = [BenchRecord(k, e["path"], e["patient"], e["split"], tuple(e["labels"]), e["boxes"])
               for k, e in images.items() if not e.get("missing")]  # fmt: skip
    notes = [] if "split" in col else ["no split column (v1.0.0): every image in split 'test'"]
    return BenchmarkData("ms-cxr", MS_CXR_LABELS, records, problems, {"table": str(table)}, notes)
