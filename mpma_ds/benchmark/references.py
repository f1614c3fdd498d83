"""The published reference numbers (``references.yaml``, shipped with the package): shown beside ours, labelled
"published, not reproduced here", never mixed into our own figures.

Each entry says whether its value was seen in a source one can name: ``checked: true`` with ``checked_against``
(where the number was read), or ``checked: false`` with ``unverified_because`` (why no reachable source states
it). `status` is the one line a table shows for it."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

LABEL = "published, not reproduced here"
CHECKED = "published, checked against"
UNCHECKED = "published, unchecked transcription"
_REQUIRED = {"dataset", "protocol", "metric", "value", "model", "source", "checked"}
_BY_CHECKED = {True: "checked_against", False: "unverified_because"}


def status(entry: dict[str, Any]) -> str:
    """``published, checked against <where>`` or ``published, unchecked transcription (<why>)``."""
    if entry["checked"]:
        return f"{CHECKED} {entry['checked_against']}"
    return f"{UNCHECKED} ({entry['unverified_because']})"


def _validate(i: int, entry: dict[str, Any]) -> None:
    where = f"references.yaml entry {i + 1}"
    if not isinstance(entry.get("checked"), bool):
        raise ValueError(f"{where}: `checked` must be true or false, got {entry.get('checked')!r}")
    wanted = _REQUIRED | {_BY_CHECKED[entry["checked"]]}
    if set(entry) != wanted:
        raise ValueError(f"{where}: fields {sorted(entry)}, expected {sorted(wanted)} (checked: "
                         f"{str(entry['checked']).lower()} takes `{_BY_CHECKED[entry['checked']]}`)")  # fmt: skip
    reason = entry[_BY_CHECKED[entry["checked"]]]
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"{where}: `{_BY_CHECKED[entry['checked']]}` must say where (or why not), got {reason!r}")
    if not isinstance(entry["value"], (int, float)) or not 0 <= entry["value"] <= 1:
        raise ValueError(f"{where}: value {entry['value']!r} is not a fraction (88.6 % is 0.886)")


def parse_references(raw: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The entries of a parsed ``references.yaml``, each checked for its fields (raises ``ValueError`` naming
    the entry) and given ``label`` and ``status``."""
    out = []
    for i, entry in enumerate(raw["references"]):
        _validate(i, entry)
        out.append({**entry, "label": LABEL, "status": status(entry)})
    return tuple(out)


@functools.cache
def load_references() -> tuple[dict[str, Any], ...]:
    """The shipped entries (`parse_references`; a malformed entry is a packaging bug: it raises)."""
    path = resources.files("mpma_ds.benchmark") / "references.yaml"
    return parse_references(yaml.safe_load(path.read_text(encoding="utf-8")))


def references_for(dataset: str, protocol: str) -> list[dict[str, Any]]:
    """The reference numbers of one suite entry."""
    return [dict(r) for r in load_references() if r["dataset"] == dataset and r["protocol"] == protocol]
