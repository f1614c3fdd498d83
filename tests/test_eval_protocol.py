"""The evaluation protocol on fixed tiny cases with known answers: zero-shot AUROC only over labels with enough
positives and negatives (the others reported), the synthetic truth as the reference, prompt ensembles,
retrieval with identical reports merged and on abnormal studies only, bootstrap intervals (zero width for a
constant metric), the printed table, results.json's pretrain_eval block and the demo's validation size."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.cli.demo import beats, parse_args
from mpma_ds.eval import (
    abnormal_rows,
    alignment_metrics,
    bootstrap_ci,
    ensemble_embeddings,
    group_ranks,
    reference_targets,
    retrieval_metrics,
    with_intervals,
    zero_shot_auroc,
)
from mpma_ds.eval.retrieval import retrieval_metrics_resampler
from mpma_ds.runner.demo import MIN_VALIDATION_IMAGES, pretrain_eval_block
from mpma_ds.runner.evaluate import format_table

REPO = Path(__file__).resolve().parents[1]
NAN = math.nan


def _truth(present: set[str]) -> dict:
    normal = not (present - {"Support Devices"})
    return {
        n: {"present": (n in present) if n != "No Finding" else normal, "side": None, "box": None}
        for n in CHEXPERT_LABELS
    }


def test_zero_shot_auroc_leaves_out_a_label_below_n_and_says_why():
    # 40 samples. Label A: 25 positives, 15 negatives (< 20) -> left out. Label B: 20 / 20, the positives score
    # 1..20 and the negatives 0.5..19.5: positive i beats the negatives below it -> AUROC = 210/400 = 0.525.
    scores = np.zeros((40, 2))
    targets = np.zeros((40, 2))
    targets[:25, 0] = 1
    targets[:20, 1] = 1
    scores[:20, 1] = np.arange(1, 21)
    scores[20:, 1] = np.arange(20) + 0.5
    m = zero_shot_auroc(scores, targets, ["A", "B"], min_count=20)
    assert "zeroshot_auroc/A" not in m
    assert m["zeroshot_labels_left_out"] == {
        "A": "25 positive and 15 negative labelled rows (needs >= 20 of each)"
    }
    assert m["zeroshot_auroc/B"] == pytest.approx(210 / 400)
    assert m["zeroshot_auroc_mean"] == pytest.approx(210 / 400) and m["zeroshot_labels"] == 1
    assert m["zeroshot_min_count"] == 20 and "zeroshot_note" not in m
    # with N = 15 both count
    assert zero_shot_auroc(scores, targets, ["A", "B"], min_count=15)["zeroshot_labels"] == 2
    # no label qualifies: NaN and a message, never a number from too few samples
    none = zero_shot_auroc(scores[:30], targets[:30], ["A", "B"], min_count=20)
    assert math.isnan(none["zeroshot_auroc_mean"]) and none["zeroshot_labels"] == 0
    assert set(none["zeroshot_labels_left_out"]) == {"A", "B"}
    assert none["zeroshot_note"].startswith("no label has >= 20 positives and >= 20 negatives among 30 samples")
    # uncertain (-1) and blank (NaN) are not negatives: 20 positives, 20 negatives, 5 uncertain, 5 blank
    t = np.array([1.0] * 20 + [0.0] * 20 + [-1.0] * 5 + [NAN] * 5)[:, None]
    s = np.array([1.0] * 20 + [0.0] * 20 + [9.0] * 10)[:, None]  # the left-out rows score highest
    assert zero_shot_auroc(s, t, ["C"], min_count=20)["zeroshot_auroc/C"] == 1.0


def test_truth_is_the_reference_when_every_sample_has_it():
    names = ["Pneumothorax", "No Finding"]
    full = [CHEXPERT_LABELS.index(n) for n in names]
    labels = np.full((4, 14), NAN)
    labels[0, full[0]] = 1.0  # the report names a pneumothorax in sample 0 only; the others are silent / hedged
    labels[1, full[0]] = -1.0
    truths = [_truth({"Pneumothorax"}), _truth({"Pneumothorax"}), _truth(set()), _truth({"Support Devices"})]
    targets, reference = reference_targets(labels, truths)
    assert reference == "truth"
    assert targets[:, full].tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]  # devices alone are "No Finding"
    # one sample without truth: the report labels, blank and uncertain left out
    targets, reference = reference_targets(labels, truths[:3] + [None])
    assert reference == "labels"
    assert targets[0, full[0]] == 1.0 and np.isnan(targets[1:, full[0]]).all()
    # abnormal = a pathology present (truth), or labelled 1 (labels)
    assert abnormal_rows(labels, truths).tolist() == [True, True, False, False]
    assert abnormal_rows(labels, None).tolist() == [True, False, False, False]
    # scored against the truth, a model that sees the drawn pneumothorax gets AUROC 1 where the report labels
    # would have had one positive and no negative
    scores = np.zeros((4, 14))
    scores[:2, full[0]] = 1.0
    by_truth = zero_shot_auroc(scores, reference_targets(labels, truths)[0], min_count=1, reference="truth")
    assert by_truth["zeroshot_auroc/Pneumothorax"] == 1.0 and by_truth["zeroshot_reference"] == "truth"
    by_labels = zero_shot_auroc(scores, reference_targets(labels, None)[0], min_count=1)
    assert "Pneumothorax" in by_labels["zeroshot_labels_left_out"]


def test_prompt_ensembles_average_the_normalised_phrasings():
    table = {"a": [3.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]}
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    out = ensemble_embeddings(encode, [["a", "b"], ["c"]])
    assert seen == [["a", "b", "c"]]  # one call for every phrasing
    r = 1 / math.sqrt(2)
    assert torch.allclose(out, torch.tensor([[r, r], [r, r]]))  # mean of (1,0) and (0,1), normalised


def test_group_ranks_takes_the_best_correct_candidate_and_counts_ties_against_the_query():
    scores = torch.tensor([[0.9, 0.8, 0.95, 0.1], [0.2, 0.2, 0.5, 0.1], [NAN, 0.1, 0.0, 0.3]])
    correct = torch.tensor([[True, False, True, False], [True, False, False, False], [True, True, False, False]])
    # row 0: best correct 0.95 -> rank 0; row 1: correct 0.2 tied by a wrong 0.2 and beaten by 0.5 -> rank 2;
    # row 2: the NaN correct one is ignored, best correct 0.1, beaten by 0.3 -> rank 1
    assert group_ranks(scores, correct).tolist() == [0, 2, 1]
    # every score NaN: behind both wrong candidates (the worst rank, as correct_ranks gives)
    assert group_ranks(torch.full((1, 3), NAN), torch.tensor([[True, False, False]])).tolist() == [2]


# Hand-made retrieval case: 5 images, reports r0 (abnormal), r1 twice (two normal studies, identical text), r2
# (abnormal), r3 (normal). Embeddings in 4 dims: each report its own axis; images near their report except
# image 4, which is closest to r2.
TEXTS = ["Left effusion.", "No acute process.", "no  acute process.", "Right pneumothorax.", "Clear lungs."]
REPORT_AXIS = [0, 1, 1, 2, 3]
ABNORMAL = [True, False, False, True, False]


def _embeddings():
    img = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.9, 0.0, 0.1],
            [0.0, 0.2, 0.0, 0.98],
            [0.1, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.9, 0.3],
        ]
    )
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.eye(4)[REPORT_AXIS]  # (5, 4) each pair's report embedding
    return img, txt


def test_retrieval_merges_identical_reports():
    img, txt = _embeddings()
    merged = retrieval_metrics(img, txt, ks=(1, 2), texts=TEXTS)
    # i2t over all 5 images against the 4 distinct reports: img0 -> r0 hit; img1 -> r1 hit; img2 is closest
    # to r3 (0.98) and its own r1 is second -> miss at 1, hit at 2; img3 -> r2 hit; img4 -> r2 (0.9) above its
    # own r3 (0.3) -> miss at 1, hit at 2.
    assert merged["i2t_R@1"] == pytest.approx(3 / 5) and merged["i2t_R@2"] == 1.0
    # t2i over the 4 distinct reports against the 5 images: r0 -> img0; r1 -> img1 (0.9 beats img2's 0.2) hit;
    # r2 -> img3 (1.0 > img4's 0.95) hit; r3 -> img2 (0.98) is not its image (img4: 0.32) -> rank 1.
    assert merged["t2i_R@1"] == pytest.approx(3 / 4) and merged["t2i_R@2"] == 1.0
    assert merged["retrieval_images"] == 5 and merged["retrieval_pairs"] == 4
    # without the texts, pairs 1 and 2 are distinct although their reports are identical: image 1 now also
    # faces its twin's report (the same embedding): a tie, counted against it
    distinct = retrieval_metrics(img, txt, ks=(1,))
    assert distinct["i2t_R@1"] == pytest.approx(2 / 5) and distinct["retrieval_pairs"] == 5


def test_retrieval_on_abnormal_studies_only():
    img, txt = _embeddings()
    m = retrieval_metrics(img, txt, ks=(1,), texts=TEXTS, abnormal=ABNORMAL)
    # abnormal image queries: img0 (hit) and img3 (hit); abnormal report queries: r0 and r2 (both hit)
    assert m["i2t_R@1_abnormal"] == 1.0 and m["t2i_R@1_abnormal"] == 1.0
    assert m["retrieval_abnormal_images"] == 2 and m["retrieval_abnormal_reports"] == 2
    assert m["i2t_R@1"] == pytest.approx(3 / 5)  # the all-studies numbers are unchanged
    none = retrieval_metrics(img, txt, ks=(1,), texts=TEXTS, abnormal=[False] * 5)
    assert math.isnan(none["i2t_R@1_abnormal"]) and none["retrieval_abnormal_images"] == 0


def test_the_retrieval_resampler_matches_the_point_estimate():
    img, txt = _embeddings()
    resample = retrieval_metrics_resampler(img, txt, ks=(1, 2), texts=TEXTS, abnormal=ABNORMAL)
    point = retrieval_metrics(img, txt, ks=(1, 2), texts=TEXTS, abnormal=ABNORMAL)
    weights = np.array([[1.0] * 5, [0.0, 0.0, 0.0, 0.0, 2.0]])  # all rows once; only image 4, twice
    out = resample(weights)
    for key, values in out.items():
        assert values[0] == pytest.approx(point[key], nan_ok=True), key
    assert out["i2t_R@1"][1] == 0.0 and out["t2i_R@2"][1] == 1.0  # img4 misses at 1; r3 finds it at 2
    assert math.isnan(out["i2t_R@1_abnormal"][1])  # no abnormal query drawn


def test_bootstrap_interval_of_a_constant_metric_has_zero_width():
    values = np.arange(50.0)
    assert tuple(bootstrap_ci(lambda x: 0.7, values, n_resamples=200)) == (0.7, 0.7)
    # perfect retrieval: every resample scores 1.0
    img = torch.eye(6)
    m = with_intervals(retrieval_metrics, img, img.clone(), ks=(1,), n_resamples=200)
    assert m["i2t_R@1"] == 1.0 and m["i2t_R@1_ci95"] == [1.0, 1.0] and m["t2i_R@1_ci95"] == [1.0, 1.0]
    # a perfect zero-shot label: AUROC 1 in every resample
    s = np.r_[np.ones(25), np.zeros(25)][:, None]
    z = with_intervals(zero_shot_auroc, s, s.copy(), label_names=["A"], min_count=20, n_resamples=200)
    assert z["zeroshot_auroc_mean"] == 1.0 and z["zeroshot_auroc_mean_ci95"] == [1.0, 1.0]


def test_alignment_metrics_put_an_interval_beside_every_metric():
    img, txt = _embeddings()
    labels = np.full((5, 14), NAN)
    labels[:, CHEXPERT_LABELS.index("Pleural Effusion")] = [1, 0, 0, 0, 0]
    truths = [_truth({"Pleural Effusion"}), _truth(set()), _truth(set()), _truth({"Pneumothorax"}), _truth(set())]
    scores = torch.zeros(5, 14)
    scores[0, CHEXPERT_LABELS.index("Pleural Effusion")] = 1.0
    m = alignment_metrics(
        img, txt, TEXTS, scores=scores, labels=torch.tensor(labels), truths=truths, ks=(1,), min_count=1,
        n_resamples=100,
    )  # fmt: skip
    assert m["zeroshot_reference"] == "truth" and m["zeroshot_auroc/Pleural Effusion"] == 1.0
    for key in ("i2t_R@1", "t2i_R@1", "i2t_R@1_abnormal", "t2i_R@1_abnormal", "zeroshot_auroc_mean"):
        low, high = m[f"{key}_ci95"]
        assert low <= m[key] <= high, key
    assert m["i2t_R@1_abnormal"] == 1.0  # by truth: img0 (effusion) and img3 (pneumothorax)
    assert m["bootstrap_resamples"] == 100


def test_format_table_prints_the_interval_beside_each_value_and_the_labels_left_out():
    metrics = {
        "i2t_R@1": 0.5, "i2t_R@1_ci95": [0.41, 0.6], "zeroshot_auroc_mean": NAN, "zeroshot_labels": 0,
        "zeroshot_min_count": 20, "zeroshot_reference": "truth",
        "zeroshot_labels_left_out": {"Fracture": "3 positive and 497 negative labelled rows (needs >= 20 of each)"},
        "zeroshot_note": "no label has >= 20 positives",
    }  # fmt: skip
    text = format_table({"pretrained": metrics})
    assert "image->report R@1" in text and "0.500 [0.410, 0.600]" in text
    assert "zero-shot AUROC (mean)" in text and "n/a" in text
    assert "left out: Fracture: 3 positive and 497 negative" in text and "no label has >= 20 positives" in text
    assert "zero-shot AUROC: mean over 0 of 1 labels, those with >= 20 positives and negatives" in text
    # the same split for both models: the labels left out are listed once
    both = format_table({"pretrained": metrics, "random": dict(metrics)})
    assert both.count("left out: Fracture") == 1 and "[pretrained]" not in both


def test_the_demo_writes_pretrain_eval_in_the_agreed_shape():
    pre = {"zeroshot_auroc_mean": 0.9, "zeroshot_auroc_mean_ci95": [0.85, 0.94], "i2t_R@1_abnormal": 0.4,
           "i2t_R@1_abnormal_ci95": [0.3, 0.5], "t2i_R@1_abnormal": 0.35, "t2i_R@1_abnormal_ci95": [0.3, 0.4],
           "eval_samples": 547}  # fmt: skip
    rnd = {"zeroshot_auroc_mean": 0.5, "zeroshot_auroc_mean_ci95": [0.45, 0.55], "i2t_R@1_abnormal": 0.01,
           "i2t_R@1_abnormal_ci95": [0.0, 0.02]}  # fmt: skip
    block = pretrain_eval_block(pre, rnd)
    assert block["zero_shot_auroc"] == {"pretrained": 0.9, "random": 0.5, "ci95_pretrained": [0.85, 0.94],
                                        "ci95_random": [0.45, 0.55], "supervised_bound": None,
                                        "ci95_supervised_bound": None}  # fmt: skip
    bounded = pretrain_eval_block(pre, rnd, {"auroc": 0.93, "ci95": [0.9, 0.95]})["zero_shot_auroc"]
    assert bounded["supervised_bound"] == 0.93 and bounded["ci95_supervised_bound"] == [0.9, 0.95]
    assert block["i2t_R@1_abnormal"]["ci95_random"] == [0.0, 0.02]
    assert set(block["t2i_R@1_abnormal"]) == {"pretrained", "random", "ci95_pretrained", "ci95_random"}
    assert block["eval_samples"] == 547
    assert beats(pre, rnd, "zeroshot_auroc_mean") and not beats(pre, rnd, "t2i_R@1_abnormal")


def test_the_demos_validation_split_holds_at_least_500_images():
    from data_tools.synth.corpus import plan_corpus

    args = parse_args([])
    plans = plan_corpus(args.studies, args.seed, min_size=2 * args.image_size, max_size=2 * args.image_size + 64,
                        lateral_fraction=0.6, with_faults=False, eval_fraction=args.eval_fraction)  # fmt: skip
    # build_shards keeps the frontal films (PA / AP): one per study
    frontal = [im for p in plans if p.split == "validate" for im in p.images if im.view != "LATERAL"]
    assert len(frontal) >= MIN_VALIDATION_IMAGES, len(frontal)


def test_evaluate_cli_prints_intervals_and_writes_them_with_the_labels_left_out(
    tmp_path, tmp_path_factory, capsys
):
    import json

    from train_testdata import tiny_shards, tiny_tokenizer

    from mpma_ds.cli.evaluate import main

    base = str(tmp_path_factory.getbasetemp())  # the session's: the training tests' build is shared
    out = tmp_path / "eval"
    argv = ["--random-init", "mpma_tiny", "--shards", str(tiny_shards(base)), "--tokenizer",
            str(tiny_tokenizer(base)), "--out-dir", str(out), "--no-mlflow", "--bootstrap", "50",
            "--min-label-count", "2", "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "image->report R@1, abnormal" in text and "zero-shot AUROC (mean)" in text
    assert re.search(r"image->report R@1 +\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", text), text
    assert "labels, those with >= 2 positives and negatives (reference: truth)" in text  # the shards carry truth
    result = json.loads((out / "results.json").read_text())  # strict JSON: NaN would fail here
    m = result["metrics"]
    assert m["zeroshot_reference"] == "truth" and m["zeroshot_min_count"] == 2
    assert m["i2t_R@1_ci95"][0] <= m["i2t_R@1"] <= m["i2t_R@1_ci95"][1]
    assert m["zeroshot_labels"] + len(m["zeroshot_labels_left_out"]) == 14
    for name, why in m["zeroshot_labels_left_out"].items():
        assert "needs >= 2 of each" in why or why == "no labelled rows", (name, why)
    assert main([*argv[:-4], "--min-label-count", "0"]) == 2
    assert "--min-label-count must be >= 1" in capsys.readouterr().err


def test_loggable_metrics_drop_an_undefined_interval_read_back_from_json():
    from mpma_ds.eval import loggable_metrics

    metrics = {"zeroshot_auroc_mean": None, "zeroshot_auroc_mean_ci95": [None, None], "i2t_R@1": 0.5,
               "i2t_R@1_ci95": [0.4, 0.6], "zeroshot_reference": "truth", "zeroshot_labels": 3}  # fmt: skip
    assert loggable_metrics(metrics) == {"i2t_R@1": 0.5, "i2t_R@1_ci95_low": 0.4, "i2t_R@1_ci95_high": 0.6,
                                         "zeroshot_labels": 3.0}  # fmt: skip
