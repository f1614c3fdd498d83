"""The 3,955 real Indiana University reports (torchxrayvision's NLMCXR_reports.tgz) through the iu-xray reader.

The collection's images are not shipped, so the test pairs the reports of a few patients with generated
images; every other referenced image is rejected as missing, and the counts must add up.
"""

from __future__ import annotations

import importlib.util
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shards_testdata import read_shards

from data_tools.build_shards import build_shards
from data_tools.sources.iu import parse_iu_xml

_spec = importlib.util.find_spec("torchxrayvision")
REPORTS_TGZ = Path(_spec.submodule_search_locations[0]) / "data" / "NLMCXR_reports.tgz" if _spec else None
pytestmark = pytest.mark.skipif(
    REPORTS_TGZ is None or not REPORTS_TGZ.is_file(), reason="torchxrayvision data missing"
)

# Counts in the 3,955 Open-I reports (non-empty sections after stripping).
N_REPORTS = 3955
N_WITH_FINDINGS = 3425
N_WITH_IMPRESSION = 3921
N_WITH_BOTH = 3419
N_WITHOUT_IMAGES = 104
N_IMAGE_REFS = 7470


@pytest.fixture(scope="module")
def iu_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("iu")
    with tarfile.open(REPORTS_TGZ) as tgz:
        tgz.extractall(root, filter="data")
    return root


def _xmls(root: Path) -> list[Path]:
    return sorted((root / "ecgen-radiology").glob("*.xml"), key=lambda p: int(p.stem))


def test_all_real_reports_parse_with_stated_section_counts(iu_root):
    reports = [parse_iu_xml(p) for p in _xmls(iu_root)]
    assert len(reports) == N_REPORTS
    assert sum(bool(r.sections.get("findings")) for r in reports) == N_WITH_FINDINGS
    assert sum(bool(r.sections.get("impression")) for r in reports) == N_WITH_IMPRESSION
    assert (
        sum(bool(r.sections.get("findings")) and bool(r.sections.get("impression")) for r in reports)
        == N_WITH_BOTH
    )
    assert sum(not r.image_ids for r in reports) == N_WITHOUT_IMAGES
    assert sum(len(r.image_ids) for r in reports) == N_IMAGE_REFS
    first = reports[0]
    assert first.uid == "CXR1" and first.image_ids == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert first.sections["impression"] == "Normal chest x-XXXX."


def test_iu_xray_build_pairs_reports_with_images(iu_root):
    reports = {p.stem: parse_iu_xml(p) for p in _xmls(iu_root)}
    chosen = [str(n) for n in range(1, 13)]  # CXR1 .. CXR12, two images each
    empty = [
        k for k, r in reports.items() if r.image_ids and not (r.sections["findings"] or r.sections["impression"])
    ]
    assert len(empty) == 25
    images = iu_root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    made = []
    for n, stem in enumerate(chosen + empty[:2]):
        for image_id in reports[stem].image_ids:
            px = (np.linspace(0, 200, 160)[None, :] + rng.normal(0, 20, (180, 160))).clip(0, 255).astype(np.uint8)
            Image.fromarray(px).save(images / f"{image_id}.{'jpg' if n % 3 == 0 else 'png'}")
            made.append(image_id)
    n_empty_images = sum(len(reports[s].image_ids) for s in empty[:2])

    out = iu_root.parent / f"{iu_root.name}-shards"  # outside the input (issue 26)
    summary = build_shards("iu-xray", iu_root, out, image_size=64, shard_size=10, progress=False)
    n_written = len(made) - n_empty_images
    assert summary["written"] == n_written == 24
    assert summary["rejects"] == {
        "empty_report": n_empty_images,
        "missing_image": N_IMAGE_REFS - len(made),
        "report_without_images": N_WITHOUT_IMAGES,
    }
    assert summary["written"] + summary["rejected"] == N_IMAGE_REFS == summary["inputs"]
    samples = {json.loads(s["json"])["image_id"]: s for s in read_shards(out).values()}
    assert len(samples) == n_written
    cxr1 = samples["CXR1_1_IM-0001-3001"]
    assert cxr1["txt"].decode() == (
        "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema. "
        "There is no focal consolidation. There are no XXXX of a pleural effusion. There is no evidence of "
        "pneumothorax. Normal chest x-XXXX."
    )
    meta = json.loads(cxr1["json"])
    assert (meta["source"], meta["subject_id"], meta["view"], meta["width"], meta["height"]) == (
        "iu-xray", "CXR1", None, 160, 180,
    )  # fmt: skip
    # One patient per report: both images of a report share its split.
    splits = Counter(
        (json.loads(s["json"])["subject_id"], json.loads(s["json"])["split"]) for s in samples.values()
    )
    assert all(n == 2 for n in splits.values()) and len(splits) == len(chosen)
