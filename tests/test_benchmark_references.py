"""The published reference numbers (``mpma_ds/benchmark/references.yaml``): every shipped entry either names the
source its value was checked against or says why it could not be, sits beside a suite entry that exists, and the
console table and the page say which numbers are checked. Fast: no model, no data."""

from __future__ import annotations

import copy

import pytest

from mpma_ds.benchmark.references import (
    CHECKED,
    LABEL,
    UNCHECKED,
    load_references,
    parse_references,
    references_for,
)
from mpma_ds.benchmark.report import format_console, table_rows, write_page
from mpma_ds.benchmark.suite import load_suite, suite_names

GOOD = {"dataset": "rsna-pneumonia", "protocol": "linear_probe", "metric": "auroc_mean@1%", "value": 0.5,
        "model": "M", "source": "A et al., Table 1", "checked": True, "checked_against": "repo README, table X"}  # fmt: skip


def test_every_shipped_entry_says_checked_against_or_why_not():
    refs = load_references()
    assert refs
    for r in refs:
        assert r["label"] == LABEL
        if r["checked"]:
            assert r["checked_against"].strip() and "unverified_because" not in r
            assert r["status"] == f"{CHECKED} {r['checked_against']}"
        else:
            assert r["unverified_because"].strip() and "checked_against" not in r
            assert r["status"].startswith(UNCHECKED)
    # the ones read in a named source this round, and the ones no reachable source printed
    assert any(r["checked"] for r in refs) and any(not r["checked"] for r in refs)


def test_every_entry_sits_beside_a_suite_entry_and_its_metric():
    entries = {(e.dataset, e.protocol): e for n in suite_names() for e in load_suite(n).entries}
    for r in load_references():
        entry = entries.get((r["dataset"], r["protocol"]))
        assert entry is not None, f"{r['model']} {r['dataset']}/{r['protocol']}: no suite runs it"
        if r["protocol"] in ("linear_probe", "finetune"):
            fracs = {f"auroc_mean@{f * 100:g}%" for f in entry.fractions}
            assert r["metric"] in fracs, (r["metric"], fracs)
        if r["protocol"] == "vqa":
            assert r["metric"] in ("accuracy_overall", "accuracy_closed", "accuracy_open")


def test_references_for_carries_label_and_status():
    refs = references_for("nih-cxr14", "finetune")
    assert refs and all(r["label"] == LABEL and r["status"] and r["source"] for r in refs)
    assert references_for("nih-cxr14", "no-such-protocol") == []


@pytest.mark.parametrize(
    "change, message",
    [
        ({"checked_against": None}, "must say where"),
        ({"checked": False}, "unverified_because"),
        ({"unverified_because": "x"}, "expected"),
        ({"checked": "yes"}, "true or false"),
        ({"value": 88.6}, "not a fraction"),
        ({"checked_against": "  "}, "must say where"),
    ],
)
def test_a_malformed_entry_is_refused_by_number(change, message):
    entry = {**GOOD, **change}
    with pytest.raises(ValueError, match=message) as err:
        parse_references({"references": [GOOD, entry]})
    assert "entry 2" in str(err.value)
    unchecked = {**{k: v for k, v in GOOD.items() if k != "checked_against"}, "checked": False,
                 "unverified_because": "no source reachable"}  # fmt: skip
    assert parse_references({"references": [unchecked]})[0]["status"] == f"{UNCHECKED} (no source reachable)"


def _results() -> dict:
    checked = {**GOOD, "model": "Checked-M", "label": LABEL}
    unchecked = {**GOOD, "model": "Loose-M", "metric": "auroc_mean@100%", "checked": False, "label": LABEL,
                 "unverified_because": "no table reachable"}  # fmt: skip
    del unchecked["checked_against"]
    refs = [dict(r, status=parse_references({"references": [{k: v for k, v in r.items() if k != "label"}]})[0]["status"])
            for r in (checked, unchecked)]  # fmt: skip
    metrics = {"auroc_mean@1%": 0.7, "auroc_mean@100%": 0.8}
    return {"suite": "t", "models": {"a": {}},
            "entries": {"rsna-pneumonia": {"linear_probe": {"split": "test", "images": 10, "paired": {},
                                                            "models": {"a": {"headline": "auroc_mean@100%",
                                                                             "metrics": metrics}}}}},
            "references": {"rsna-pneumonia": {"linear_probe": refs}}}  # fmt: skip


def test_console_and_page_say_which_numbers_are_checked(tmp_path):
    results = _results()
    rows = {r["metric"]: r for r in table_rows(results)}
    assert [x["model"] for x in rows["auroc_mean@1%"]["references"]] == ["Checked-M"]
    text = format_console(results)
    assert "Checked-M 0.5" in text and "Checked-M 0.5*" not in text and "Loose-M 0.5*" in text
    assert f"* reference: {UNCHECKED}" in text
    page = write_page(results, tmp_path / "b.html").read_text()
    assert f"{CHECKED} repo README, table X" in page
    assert f"{UNCHECKED} (no table reachable)" in page
    # results.json written before the status field: the page still says which is which
    old = copy.deepcopy(results)
    for r in old["references"]["rsna-pneumonia"]["linear_probe"]:
        del r["status"]
    page = write_page(old, tmp_path / "old.html").read_text()
    assert "published, checked" in page and UNCHECKED in page
