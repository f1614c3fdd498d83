"""The published reference numbers (``references.yaml``, shipped with the package): shown beside ours, labelled
"published, not reproduced here", never mixed into our own figures."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

LABEL = "published, not reproduced here"
_FIELDS = {"dataset", "protocol", "metric", "value", "model", "source", "checked"}


@functools.cache
def load_references() -> tuple[dict[str, Any], ...]:
    """Every reference entry, checked for its fields (a malformed entry is a packaging bug: it raises)."""
    raw = yaml.safe_load((resources.files("mpma_ds.benchmark") / "references.yaml").read_text(encoding="utf-8"))
    out = []
    for i, entry in enumerate(raw["references"]):
        if set(entry) != _FIELDS:
            raise ValueError(f"references.yaml entry {i + 1}: fields {sorted(entry)}, expected {sorted(_FIELDS)}")
        out.append({**entry, "label": LABEL})
    return tuple(out)


def references_for(dataset: str, protocol: str) -> list[dict[str, Any]]:
    """The reference numbers of one suite entry."""
    return [dict(r) for r in load_references() if r["dataset"] == dataset and r["protocol"] == protocol]
