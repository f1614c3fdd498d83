"""The benchmark's grounding protocol scores the map its suite entry names (default `eval.grounding.BEST_MAP`),
the same map `mpma-evaluate --grounding` and the predictor play; a map it cannot score is one line at suite load."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from train_testdata import tiny_tokenizer

import mpma_ds
from data_tools.benchmarks.common import BenchRecord, Box
from mpma_ds.benchmark.features import Batch
from mpma_ds.benchmark.model import load_model
from mpma_ds.benchmark.protocols import grounding_pairs
from mpma_ds.benchmark.suite import SuiteError, load_suite
from mpma_ds.eval.grounding import BEST_MAP, LINEAR_MAPS, finding_phrase, phrase_maps

SIZE = 64


def _suite(tmp_path, entry: str) -> object:
    path = tmp_path / "suite.yaml"
    path.write_text(f"name: mine\nentries:\n  - {entry}\n")
    return load_suite(path)


def test_grounding_entries_default_to_the_best_map_and_take_another(tmp_path):
    assert BEST_MAP in LINEAR_MAPS and "similarity" in LINEAR_MAPS
    for name in ("cxr-core", "cxr-full"):
        grounding = [e for e in load_suite(name).entries if e.protocol == "grounding"]
        assert grounding and all(e.map == BEST_MAP for e in grounding)
    entry = _suite(tmp_path, "{dataset: nih-cxr14, protocol: grounding, map: similarity}").entries[0]
    assert entry.map == "similarity"


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{dataset: nih-cxr14, protocol: grounding, map: gradcam_itc}", "map must be one of similarity"),
        ("{dataset: nih-cxr14, protocol: zero_shot, map: similarity}", "map applies only to grounding"),
    ],
)
def test_a_map_the_protocol_cannot_score_is_one_line(tmp_path, entry, message):
    with pytest.raises(SuiteError, match=message) as err:
        _suite(tmp_path, entry)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    exported = base / "grounding_map_model"
    torch.manual_seed(3)
    mpma_ds.create_model("mpma_tiny", image_size=SIZE).save_pretrained(exported)
    shutil.copytree(tiny_tokenizer(str(base)), exported / "text_encoder", dirs_exist_ok=True)
    return load_model(str(exported))


def test_each_map_is_scored_on_the_map_evaluate_plays(model):
    """Each pair's hit is the pointing game of `phrase_maps` of the same map: the protocol plays that map, and
    the maps (raw, neutral phrase or finding phrases taken off) give different maps on the same films."""
    torch.manual_seed(0)
    images = torch.rand(3, model.net.config.in_chans, SIZE, SIZE)
    boxes = [(0, 0, 32, 32), (32, 32, 64, 64), (0, 32, 32, 64)]
    records = [BenchRecord(f"img{i}", f"img{i}.png", f"p{i}", "test", boxes=[Box("Cardiomegaly", *b)])
               for i, b in enumerate(boxes)]  # fmt: skip
    batch = Batch(index=[0, 1, 2], images=images, sizes=[(SIZE, SIZE)] * 3, originals=[(SIZE, SIZE)] * 3)
    phrase = finding_phrase("Cardiomegaly")
    grids = {}
    for name in LINEAR_MAPS:
        found = grounding_pairs(model, [batch], records, device="cpu", map=name)
        assert not found["problems"] and len(found["pairs"]) == 3
        grids[name] = phrase_maps(model.net, model.tokenizer, images, phrase, map=name)
        hp = grids[name].shape[-1]
        cell = SIZE / hp
        for (i, hit, *_), (x0, y0, x1, y1) in zip(found["pairs"], boxes):
            flat = grids[name][i].flatten()
            best = (flat == flat.max()).nonzero().flatten().tolist()
            inside = [x0 <= (c % hp + 0.5) * cell < x1 and y0 <= (c // hp + 0.5) * cell < y1 for c in best]
            assert hit == float(all(inside)), (name, i)
    assert not np.allclose(grids["similarity"].numpy(), grids["similarity_neutral"].numpy())
    assert not np.allclose(grids["similarity_findings"].numpy(), grids["similarity_neutral"].numpy())
