"""Masked-token accuracy of the fused text stream, overall and on finding words (mpma_ds.eval.mlm)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mpma_ds.eval.mlm import FINDING_WORDS, MaskedTokenAccuracy, finding_token_mask, word_ids
from mpma_ds.models import create_model

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "there", "is", "a", "small", "right", "pleural", "eff",
         "##usion", "heart", "size", "normal", ".", "no", "pneumo", "##thorax", "left"]  # fmt: skip


def _tokenizer() -> PreTrainedTokenizerFast:
    """A real WordPiece tokenizer (BERT normaliser, ``##`` pieces) over a hand-made vocabulary."""
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def _ids(tok, text: str) -> list[int]:
    return [tok.cls_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.sep_token_id]


def test_word_pieces_join_into_words():
    assert word_ids(["[CLS]", "a", "eff", "##usion", ".", "[SEP]"]) == [-1, 0, 1, 1, 2, -1]
    assert {"effusion", "pneumothorax", "right", "left", "small", "severe"} <= FINDING_WORDS
    assert not {"no", "there", "is", "heart", "normal", "without"} & FINDING_WORDS


def test_finding_tokens_are_the_pieces_of_finding_words():
    tok = _tokenizer()
    ids = torch.tensor(
        [
            _ids(tok, "There is a small right pleural effusion."),
            [*_ids(tok, "No pneumothorax. Heart size normal."), 0],  # + [PAD]
        ]
    )
    got = finding_token_mask(ids, tok)
    # [CLS] there is a small right pleural eff ##usion . [SEP]
    assert got[0].tolist() == [False, False, False, False, True, True, True, True, True, False, False]
    # [CLS] no pneumo ##thorax . heart size normal . [SEP] [PAD]
    assert got[1].tolist() == [False, False, True, True, False, False, False, False, False, False, False]


def test_accuracy_counts_masked_tokens_of_valid_rows():
    """A tiny MPMA whose MLM head always says "small" (a large decoder bias): the accuracy is known exactly."""
    tok = _tokenizer()
    torch.manual_seed(0)
    model = create_model("mpma_tiny", vocab_size=len(VOCAB))
    small = VOCAB.index("small")
    with torch.no_grad():
        model.mlm_head.decoder.bias[small] = 1.0e4
    rows = [
        _ids(tok, "There is a small right pleural effusion."),
        _ids(tok, "There is a small left pneumothorax."),
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows] * 2)  # rows 2, 3 repeat 0, 1: stand-ins
    # row 0: [CLS] there is a small right pleural eff ##usion . [SEP]; row 1: ... small left pneumo ##thorax .
    masked_at = [(0, 4), (0, 6), (0, 2), (1, 4), (1, 7), (2, 4), (3, 5)]  # small, pleural, is, small, ##thorax
    inputs, labels = ids.clone(), torch.full_like(ids, -100)
    for r, c in masked_at:
        inputs[r, c], labels[r, c] = tok.mask_token_id, ids[r, c]
    batch = {"image": torch.randn(4, 1, 64, 64), "input_ids": inputs, "attention_mask": (ids != 0).long(),
             "mlm_labels": labels, "valid": torch.tensor([True, True, False, False])}  # fmt: skip
    acc = MaskedTokenAccuracy(model, tok, "cpu")
    assert list(acc.stream([batch])) == [batch]  # the pass goes through unchanged
    result = acc.result()
    # valid rows: 5 masked tokens, the two "small" right; finding-word tokens: small, pleural, small, ##thorax
    assert result == {"mlm_acc": 2 / 5, "mlm_tokens": 5.0, "mlm_acc_findings": 2 / 4, "mlm_tokens_findings": 4.0}
    # per valid sample (the stand-ins left out), what a paired bootstrap of two models resamples
    assert acc.per_sample("all").tolist() == [[1, 3], [1, 2]]
    assert acc.per_sample("findings").tolist() == [[1, 2], [1, 2]]
    assert model.training  # put back as it was
    empty = MaskedTokenAccuracy(model, tok, "cpu")
    list(empty.stream([dict(batch, valid=torch.zeros(4, dtype=torch.bool))]))
    assert empty.per_sample().shape == (0, 2)
    assert empty.result()["mlm_tokens"] == 0 and empty.result()["mlm_acc"] != empty.result()["mlm_acc"]  # NaN


def test_image_control_reads_the_same_masked_reports_beside_another_image():
    """A head that is right only beside its own image (a stand-in that compares the image with the row) scores
    1 on the finding words and 0 beside the rolled images: the gain is what the image gave."""
    tok = _tokenizer()
    model = create_model("mpma_tiny", vocab_size=len(VOCAB))
    rows = [
        _ids(tok, "There is a small right pleural effusion."),
        _ids(tok, "There is a small left pneumothorax."),
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    inputs, labels = ids.clone(), torch.full_like(ids, -100)
    for r, c in [(0, 4), (0, 5), (1, 4), (1, 2)]:  # small, right, small, is
        inputs[r, c], labels[r, c] = tok.mask_token_id, ids[r, c]
    images = torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 1, 64, 64)  # image b holds the value b

    def reads_own_image(images, input_ids, attention_mask):  # noqa: ARG001
        own = images[:, 0, 0, 0].long() == torch.arange(len(images))  # (B,)
        return torch.where(own[:, None], ids, torch.zeros_like(ids))

    model.masked_token_predictions = reads_own_image
    batch = {"image": images, "input_ids": inputs, "attention_mask": (ids != 0).long(), "mlm_labels": labels}
    acc = MaskedTokenAccuracy(model, tok, "cpu", image_control=True)
    list(acc.stream([batch]))
    result = acc.result()
    assert result["mlm_acc_findings"] == 1.0 and result["mlm_tokens_findings"] == 3.0
    assert result["mlm_acc_findings_shuffled"] == 0.0 and result["mlm_tokens_findings_shuffled"] == 3.0
    assert acc.per_sample("findings_shuffled").tolist() == [[0, 2], [0, 1]]
    from mpma_ds.sweep.arm_eval import finding_word_gain

    gain = finding_word_gain(acc.per_sample("findings"), acc.per_sample("findings_shuffled"))
    assert gain == {"mlm_findings_image_gain": 1.0}
    assert "mlm_acc_findings_shuffled" not in MaskedTokenAccuracy(model, tok, "cpu").result()


def test_image_control_per_word_class():
    """With ``classes`` the finding words are also counted per class: the masked "small"s are extent words, the
    "right" a side word; the stand-in head right only beside its own image gains 1 on each class, and a class
    with no masked token has no accuracy (NaN), not 0."""
    from mpma_ds.data.masking import FINDING_CLASSES
    from mpma_ds.sweep.arm_eval import finding_word_gain, image_gains

    tok = _tokenizer()
    model = create_model("mpma_tiny", vocab_size=len(VOCAB))
    ids = torch.tensor([_ids(tok, "There is a small right pleural effusion.")] * 2)
    inputs, labels = ids.clone(), torch.full_like(ids, -100)
    for r, c in [(0, 4), (0, 5), (1, 4), (1, 2)]:  # small, right, small, is
        inputs[r, c], labels[r, c] = tok.mask_token_id, ids[r, c]
    images = torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 1, 64, 64)

    def reads_own_image(images, input_ids, attention_mask):  # noqa: ARG001
        own = images[:, 0, 0, 0].long() == torch.arange(len(images))  # (B,)
        return torch.where(own[:, None], ids, torch.zeros_like(ids))

    model.masked_token_predictions = reads_own_image
    batch = {"image": images, "input_ids": inputs, "attention_mask": (ids != 0).long(), "mlm_labels": labels}
    acc = MaskedTokenAccuracy(model, tok, "cpu", image_control=True, classes=FINDING_CLASSES)
    list(acc.stream([batch]))
    result = acc.result()
    assert result["mlm_tokens_findings"] == 3.0
    assert result["mlm_tokens_findings_extent"] == 2.0 and result["mlm_tokens_findings_side"] == 1.0
    assert result["mlm_acc_findings_side"] == 1.0 and result["mlm_acc_findings_shuffled_side"] == 0.0
    assert (
        result["mlm_tokens_findings_zone"] == 0.0
        and result["mlm_acc_findings_zone"] != result["mlm_acc_findings_zone"]
    )
    assert acc.per_sample("findings_extent").tolist() == [[1, 1], [1, 1]]
    assert result["mlm_image_changed"] == 1.0  # every masked guess differs beside the other image (0 vs the word)
    gain = finding_word_gain(acc.per_sample("findings_side"), acc.per_sample("findings_shuffled_side"))
    assert gain == {"mlm_findings_image_gain": 1.0}
    gains = image_gains(acc, n_resamples=50)  # what evaluate_rows reports: the overall gain and each class's
    assert gains["mlm_findings_image_gain"] == 1.0 and gains["mlm_findings_image_gain_side"] == 1.0
    assert gains["mlm_findings_image_gain_extent_ci95"] == [1.0, 1.0]
    assert "mlm_findings_image_gain_zone" not in gains and "mlm_findings_image_gain_finding" not in gains
