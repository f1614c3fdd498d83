"""benchmarks/bench_supervised_bound.py: the truth of a batch becomes the BCE targets the bound is trained on."""

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_supervised_bound", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_supervised_bound.py"
)
bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bound)


def test_targets_follow_the_truth():
    labels = bound.CHEXPERT_LABELS
    edema = {"Edema": {"present": True, "side": None, "box": [0, 0, 4, 4]}, "Fracture": {"present": False}}
    batch = {"meta": [{"truth": edema}, {"truth": {"Edema": {"present": False}}}]}
    y = bound.targets_of(batch)
    assert y.shape == (2, len(labels))
    e, f = labels.index("Edema"), labels.index("Fracture")
    assert y[0, e] == 1 and y[0, f] == 0 and y[1, e] == 0
    assert math.isnan(y[1, f])  # a label the truth does not name is unknown, left out of the loss and the AUROC


def test_samples_without_truth_are_refused():
    with pytest.raises(SystemExit, match="without 'truth'"):
        bound.targets_of({"meta": [{"truth": {"Edema": {"present": True}}}, {}]})
