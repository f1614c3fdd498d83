"""The retrieval ceiling of benchmarks/diagnose_alignment.py on hand-made studies with known answers."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "diagnose_alignment", Path(__file__).resolve().parents[1] / "benchmarks" / "diagnose_alignment.py"
)
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)


def _truth(**present: str | None) -> dict:
    """A truth dict with the given findings present (value: side)."""
    names = (*diag.PATHOLOGIES, "Support Devices", "No Finding")
    out = {n: {"present": False, "side": None, "box": None} for n in names}
    for name, side in present.items():
        out[name.replace("_", " ")] = {"present": True, "side": side, "box": [0, 0, 1, 1]}
    if not present:
        out["No Finding"]["present"] = True
    return out


def test_retrieval_ceiling_counts_the_reports_an_image_cannot_tell_apart():
    texts = [
        "The lungs are clear.",  # normal: not a query
        "Small left pleural effusion.",  # A
        "There is a small left pleural effusion.",  # B: same drawn findings as A, other words
        "Large right pneumothorax.",  # C: alone
        "Moderate right pleural effusion.",  # D: A's finding, other side
        "SMALL  left pleural effusion.",  # E: A's report up to case and spaces: merged with it
    ]
    truths = [
        _truth(),
        _truth(Pleural_Effusion="left"),
        _truth(Pleural_Effusion="left"),
        _truth(Pneumothorax="right"),
        _truth(Pleural_Effusion="right"),
        _truth(Pleural_Effusion="left"),
    ]
    # with sides: A, B, E share 2 distinct reports (A = E merged) -> 1/2 each; C and D alone -> 1
    assert diag.retrieval_ceiling(texts, truths, with_side=True) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
    # findings only: A, B, D, E share 3 distinct reports -> 1/3 each; C alone -> 1
    assert diag.retrieval_ceiling(texts, truths, with_side=False) == pytest.approx((4 / 3 + 1.0) / 5)
    # support devices are drawn: they separate two otherwise equal studies
    devices = [_truth(Pleural_Effusion="left", Support_Devices=None), _truth(Pleural_Effusion="left")]
    assert diag.retrieval_ceiling(["a b c", "d e f"], devices, with_side=True) == 1.0


def test_retrieval_ceiling_needs_an_abnormal_study():
    with pytest.raises(ValueError, match="no abnormal study"):
        diag.retrieval_ceiling(["The lungs are clear."], [_truth()], with_side=True)
