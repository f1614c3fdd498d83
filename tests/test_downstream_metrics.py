"""Downstream metrics against values worked out by hand: VQA accuracy (unseen answers, a split without OPEN
questions), multi-label AUROC (labels missing from a split, ties, uncertain policies), multi-class accuracy /
F1, retrieval R@K with ties, bootstrap intervals (constant metric, determinism, coverage, skipped resamples,
the vectorised resamplers equal to the one-call-per-resample path) and the label-efficiency table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from mpma_ds.eval import (
    answer_indices,
    apply_uncertain_policy,
    bootstrap_ci,
    build_answer_vocab,
    format_label_efficiency,
    loggable_metrics,
    multiclass_metrics,
    multilabel_auroc,
    normalize_answer,
    resample_indices,
    retrieval_metrics,
    soft_answer_targets,
    vqa_accuracy,
    weighted_auroc,
    with_intervals,
    zero_shot_auroc,
)

NAN = math.nan

# --- VQA -------------------------------------------------------------------------------------------------------

VOCAB = ["yes", "no", "left lung"]
# q1 CLOSED right (case/space), q2 CLOSED wrong, q3 CLOSED right, q4 OPEN right (whitespace),
# q5 OPEN gold "right kidney" is not in the vocabulary: wrong whatever is predicted, and counted as unseen.
GOLD = ["yes", "no", "no", "Left  Lung", "right kidney"]
TYPES = ["CLOSED", "CLOSED", "closed ", "OPEN", "OPEN"]
PRED = ["Yes ", "yes", "no", "left lung", "left lung"]


def test_normalize_answer():
    assert normalize_answer("  Left \t Lung\n") == "left lung"
    assert normalize_answer("T2-weighted.") == "t2-weighted."  # punctuation kept


def test_vqa_accuracy_with_an_unseen_answer():
    m = vqa_accuracy(PRED, GOLD, TYPES, answer_vocab=VOCAB)
    assert m["accuracy_overall"] == pytest.approx(3 / 5)
    assert m["accuracy_closed"] == pytest.approx(2 / 3)
    assert m["accuracy_open"] == pytest.approx(1 / 2)
    assert (m["questions"], m["questions_closed"], m["questions_open"]) == (5, 3, 2)
    assert (m["unseen_answers"], m["unseen_closed"], m["unseen_open"]) == (1, 0, 1)
    # the same predictions as ids into the vocabulary (list, numpy, torch)
    for ids in ([0, 0, 1, 2, 2], np.array([0, 0, 1, 2, 2]), torch.tensor([0, 0, 1, 2, 2])):
        assert vqa_accuracy(ids, GOLD, TYPES, answer_vocab=VOCAB) == m
    # predicting the unseen answer's text does not make it right: a classifier over VOCAB cannot output it
    cheat = vqa_accuracy(PRED[:4] + ["right kidney"], GOLD, TYPES, answer_vocab=VOCAB)
    assert cheat["accuracy_open"] == pytest.approx(1 / 2)


def test_vqa_accuracy_split_without_open_questions():
    m = vqa_accuracy(PRED[:3], GOLD[:3], TYPES[:3], answer_vocab=VOCAB)
    assert m["accuracy_closed"] == pytest.approx(2 / 3) and m["accuracy_overall"] == pytest.approx(2 / 3)
    assert math.isnan(m["accuracy_open"]) and m["questions_open"] == 0 and m["unseen_answers"] == 0
    only_open = vqa_accuracy(PRED[3:], GOLD[3:], TYPES[3:], answer_vocab=VOCAB)
    assert math.isnan(only_open["accuracy_closed"]) and only_open["accuracy_open"] == 0.5


def test_vqa_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="CLOSED or OPEN"):
        vqa_accuracy(PRED, GOLD, TYPES[:4] + ["yes/no"], answer_vocab=VOCAB)
    with pytest.raises(ValueError, match="length"):
        vqa_accuracy(PRED[:4], GOLD, TYPES, answer_vocab=VOCAB)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        vqa_accuracy([0, 1, 2, 3, 0], GOLD, TYPES, answer_vocab=VOCAB)


def test_build_answer_vocab_orders_by_frequency_then_text():
    splits = {"train": ["yes", "no", "Yes", "left lung", "no ", "yes", "b", "a"], "test": ["right kidney", "no"]}
    # train counts: yes 3, no 2, then 1 each for "a", "b", "left lung" (alphabetical)
    assert build_answer_vocab(splits) == ["yes", "no", "a", "b", "left lung"]
    # all splits (M3AE): "no" now 3, ties with "yes" -> by text
    assert build_answer_vocab(splits, mode="all") == ["no", "yes", "a", "b", "left lung", "right kidney"]
    with pytest.raises(ValueError, match="'train' split"):
        build_answer_vocab({"trainset": ["yes"]})
    with pytest.raises(ValueError, match="mode"):
        build_answer_vocab(splits, mode="test")


def test_answer_indices_and_soft_targets():
    assert answer_indices(["No", "right kidney", "left  lung"], VOCAB).tolist() == [1, -1, 2]
    t = soft_answer_targets(["No", "right kidney", ["yes", "No"]], VOCAB)
    assert t.dtype == torch.float32 and t.shape == (3, 3)
    assert t.tolist() == [[0, 1, 0], [0, 0, 0], [1, 1, 0]]


# --- multi-label AUROC -----------------------------------------------------------------------------------------

# A: positives 0.9, 0.3 vs negatives 0.8, 0.1 -> 3 of 4 pairs ordered -> 0.75 (the blank row scores 0.5, ignored)
# B: never labelled in this split -> left out.  C: only negatives -> left out.
# D: positives 0.2, 0.7 vs negatives 0.2 (tie = 1/2), 0.1, 0.0 -> (0.5 + 1 + 1 + 3) / 6 = 11/12
ML_SCORES = np.array(
    [[0.9, 0.1, 0.4, 0.2], [0.8, 0.2, 0.3, 0.2], [0.3, 0.3, 0.2, 0.7], [0.1, 0.4, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]]
)
ML_TARGETS = np.array(
    [[1, NAN, 0, 1], [0, NAN, 0, 0], [1, NAN, NAN, 1], [0, NAN, 0, 0], [NAN, NAN, 0, 0]], dtype=np.float64
)
ML_NAMES = ["A", "B", "C", "D"]


def test_multilabel_auroc_hand_values_and_missing_labels():
    m = multilabel_auroc(ML_SCORES, ML_TARGETS, ML_NAMES)
    assert m["auroc/A"] == pytest.approx(0.75)
    assert m["auroc/D"] == pytest.approx(11 / 12)
    assert "auroc/B" not in m and "auroc/C" not in m
    assert m["auroc_macro"] == pytest.approx((0.75 + 11 / 12) / 2)
    assert m["labels_used"] == 2
    assert list(m["labels_left_out"]) == ["B", "C"]
    assert m["labels_left_out"]["B"] == "no labelled rows"
    assert "0 positive and 4 negative" in m["labels_left_out"]["C"]
    # torch in, same numbers
    assert multilabel_auroc(torch.tensor(ML_SCORES), torch.tensor(ML_TARGETS), ML_NAMES) == m


def test_multilabel_auroc_min_each_and_nothing_scored():
    # A has 2 positives / 2 negatives, D 2 / 3: min_each=3 leaves both out -> no macro, no crash
    m = multilabel_auroc(ML_SCORES, ML_TARGETS, ML_NAMES, min_each=3)
    assert m["labels_used"] == 0 and math.isnan(m["auroc_macro"])
    assert list(m["labels_left_out"]) == ML_NAMES
    assert multilabel_auroc(ML_SCORES, ML_TARGETS, ML_NAMES, min_each=2)["labels_used"] == 2


def test_multilabel_auroc_matches_sklearn_and_refuses_uncertain():
    rng = np.random.default_rng(1)
    y = rng.choice([0.0, 1.0, NAN], size=(200, 3), p=[0.5, 0.3, 0.2])
    s = np.round(rng.normal(size=(200, 3)) + np.nan_to_num(y), 1)  # rounded: many ties
    m = multilabel_auroc(s, y, ["x", "y", "z"])
    for c, name in enumerate("xyz"):
        keep = ~np.isnan(y[:, c])
        assert m[f"auroc/{name}"] == pytest.approx(roc_auc_score(y[keep, c], s[keep, c]))
        assert weighted_auroc(s[keep, c], y[keep, c] == 1, np.ones((1, keep.sum())))[0] == pytest.approx(
            m[f"auroc/{name}"]
        )
    with pytest.raises(ValueError, match="apply_uncertain_policy"):
        multilabel_auroc(s, np.where(y == 0, -1.0, y), ["x", "y", "z"])
    with pytest.raises(ValueError, match="agree"):
        multilabel_auroc(s, y, ["x", "y"])


def test_uncertain_policies():
    t = np.array([[1.0, -1.0, NAN, 0.0]])
    np.testing.assert_array_equal(apply_uncertain_policy(t, "zeros"), [[1, 0, NAN, 0]])
    np.testing.assert_array_equal(apply_uncertain_policy(t, "ones"), [[1, 1, NAN, 0]])
    np.testing.assert_array_equal(apply_uncertain_policy(t, "ignore"), [[1, NAN, NAN, 0]])
    assert t[0, 1] == -1.0  # input not modified
    tt = torch.tensor(t, dtype=torch.float32)
    out = apply_uncertain_policy(tt, "ones")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out[0, :2].tolist() == [1.0, 1.0] and out[0, 2].isnan() and tt[0, 1] == -1
    with pytest.raises(ValueError, match="policy"):
        apply_uncertain_policy(t, "u-ones")
    with pytest.raises(ValueError, match="1, 0, -1 or NaN"):
        apply_uncertain_policy(np.array([[2.0]]), "zeros")
    # the policy decides the AUROC: label A of ML_TARGETS with its blank row turned uncertain
    a = ML_TARGETS[:, :1].copy()
    a[4, 0] = -1  # scores 0.5
    assert multilabel_auroc(ML_SCORES[:, :1], apply_uncertain_policy(a, "ignore"), ["A"])["auroc/A"] == 0.75
    # as a negative: positives 0.9, 0.3 vs 0.8, 0.1, 0.5 -> (3 + 1) / 6
    assert multilabel_auroc(ML_SCORES[:, :1], apply_uncertain_policy(a, "zeros"), ["A"])[
        "auroc/A"
    ] == pytest.approx(4 / 6)


# --- multi-class -----------------------------------------------------------------------------------------------


def test_multiclass_metrics_hand_values():
    targets = np.array([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 2, 0]
    logits = np.full((6, 3), -1.0)
    logits[np.arange(6), predicted] = 2.0
    logits[:, 2] += np.linspace(0, 0.5, 6)  # vary the scores a little so AUROC is not all ties
    m = multiclass_metrics(logits, targets, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: TP 1, FP 1 (row 5), FN 1 (row 1) -> 2/4; b: TP 2, FP 1 -> 4/5; c: TP 1, FN 1 -> 2/3
    assert (
        m["f1/a"] == pytest.approx(0.5) and m["f1/b"] == pytest.approx(0.8) and m["f1/c"] == pytest.approx(2 / 3)
    )
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["f1_macro"] == pytest.approx(f1_score(targets, predicted, average="macro"))
    probs = torch.softmax(torch.tensor(logits), dim=1).numpy()
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr"))
    assert m["classes_used"] == 3 and m["classes_left_out"] == {}
    # probabilities are detected and used as they are
    from_probs = multiclass_metrics(probs, targets, ["a", "b", "c"])
    assert {k: from_probs[k] for k in m if k != "classes_left_out"} == pytest.approx(
        {k: m[k] for k in m if k != "classes_left_out"}
    )


def test_multiclass_metrics_absent_class():
    targets = np.array([0, 0, 1, 1])
    logits = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 2.0, 0], [0, 2.0, 0]])
    m = multiclass_metrics(logits, targets, ["a", "b", "never"])
    assert "f1/never" not in m and m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert list(m["classes_left_out"]) == ["never"] and m["classes_used"] == 2
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        multiclass_metrics(logits, np.array([0, 1, 2, 3]), ["a", "b", "c"])


# --- retrieval -------------------------------------------------------------------------------------------------


def test_retrieval_ties_nan_and_duplicate_reports():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # pairs 1 and 2 have the same embeddings: each ties with the other -> rank 1, a miss at R@1
    m = retrieval_metrics(img, txt, ks=(1, 2))
    assert m["i2t_R@1"] == pytest.approx(1 / 3) and m["t2i_R@1"] == pytest.approx(1 / 3) and m["i2t_R@2"] == 1.0
    # they are the same report (PA + lateral): with texts they are one candidate, and retrieval is perfect
    texts = ["No effusion.", "Small effusion.", "small  effusion."]
    m = retrieval_metrics(img, txt, ks=(1,), texts=texts)
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0 and m["retrieval_pairs"] == 2.0
    # a NaN embedding counts against the query instead of scoring a hit
    broken = torch.full((3, 2), NAN)
    assert retrieval_metrics(broken, txt, ks=(1, 3)) == {
        "i2t_R@1": 0.0,
        "i2t_R@3": 1.0,
        "t2i_R@1": 0.0,
        "t2i_R@3": 1.0,
        "retrieval_images": 3,
        "retrieval_pairs": 3,
    }
    assert retrieval_metrics(img.numpy(), txt.numpy(), ks=(1,))["i2t_R@1"] == pytest.approx(1 / 3)


def test_retrieval_interval_resamples_queries_over_the_fixed_gallery():
    img = torch.eye(4)
    txt = torch.eye(4)
    txt[3] = 0.9 * txt[0]  # image 3 scores 0 with every report (a 4-way tie: a miss); the others hit
    m = with_intervals(retrieval_metrics, img, txt, ks=(1,), n_resamples=200)
    assert m["i2t_R@1"] == 0.75 and "retrieval_pairs_ci95" not in m
    low, high = m["i2t_R@1_ci95"]
    # resampled queries: the hit rate of 4 draws from {1, 1, 1, 0}, in [0, 1]; pairs are never duplicated in
    # the gallery, so a resample drawing only hits gets 1.0 (resampling pairs would make it tie -> a miss)
    assert 0.0 <= low < 0.75 < high == 1.0
    idx = resample_indices(4, 200, seed=0)
    hits = np.array([1, 1, 1, 0])[idx].mean(1)
    assert [low, high] == pytest.approx(np.quantile(hits, [0.025, 0.975]).tolist())


# --- bootstrap -------------------------------------------------------------------------------------------------


def test_bootstrap_constant_metric_gives_a_point_interval():
    rows = np.arange(50)
    ci = bootstrap_ci(lambda x: 0.7, rows, n_resamples=100)
    assert ci == (0.7, 0.7) and ci.skipped == 0 and ci.resamples == 100
    lo, hi = bootstrap_ci(lambda x: float(np.mean(x >= 0)), rows)
    assert (lo, hi) == (1.0, 1.0)
    all_right = with_intervals(vqa_accuracy, PRED[:1] * 5, ["yes"] * 5, ["CLOSED"] * 5, answer_vocab=VOCAB)
    assert all_right["accuracy_overall_ci95"] == [1.0, 1.0] and all_right["accuracy_closed_ci95"] == [1.0, 1.0]
    assert all(math.isnan(v) for v in all_right["accuracy_open_ci95"])  # no OPEN question in any resample
    assert all_right["bootstrap_skipped"] == {"accuracy_open": 1000}


def test_bootstrap_is_deterministic_per_seed_and_covers_the_estimate():
    x = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    a = bootstrap_ci(np.mean, x, seed=3)
    assert a == bootstrap_ci(np.mean, x, seed=3)
    assert a != bootstrap_ci(np.mean, x, seed=4)
    assert a.low < x.mean() < a.high
    # the percentile interval of a mean is about +- 1.96 standard errors
    half = 1.96 * x.std() / math.sqrt(len(x))
    assert a.high - a.low == pytest.approx(2 * half, rel=0.15)
    np.testing.assert_array_equal(resample_indices(400, 5, seed=3), resample_indices(400, 5, seed=3))
    # torch tensors and lists resample the same rows as numpy
    assert bootstrap_ci(lambda t: float(t.mean()), torch.tensor(x), seed=3) == pytest.approx(a)
    assert bootstrap_ci(lambda v: float(np.mean(v)), x.tolist(), seed=3) == pytest.approx(a)


def test_bootstrap_skips_undefined_resamples():
    # one positive in 20 rows: a resample misses it with probability (19/20)^20 ~ 0.36 -> AUROC undefined there
    y = np.zeros(20)
    y[7] = 1
    s = np.linspace(0, 1, 20)
    ci = bootstrap_ci(roc_auc_score, y, s, n_resamples=300, seed=1)
    expected_skips = int((resample_indices(20, 300, seed=1) != 7).all(axis=1).sum())
    assert ci.skipped == expected_skips and 70 < ci.skipped < 150
    assert 0 <= ci.low <= ci.high <= 1
    m = with_intervals(multilabel_auroc, s[:, None], y[:, None], names=["A"], n_resamples=300, seed=1)
    assert m["bootstrap_skipped"] == {"auroc/A": expected_skips, "auroc_macro": expected_skips}
    assert m["auroc/A_ci95"] == pytest.approx(list(ci))


@pytest.mark.parametrize("seed", [0, 1])
def test_with_intervals_fast_path_equals_one_call_per_resample(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = rng.choice([0.0, 1.0, NAN], size=(n, 3), p=[0.6, 0.25, 0.15])
    y[:, 2] = np.where(rng.random(n) < 0.9, NAN, y[:, 2])  # a sparse label: undefined in many resamples
    s = np.round(rng.normal(size=(n, 3)) + np.nan_to_num(y), 1)
    cases = [
        (multilabel_auroc, (s, y), {"names": ["x", "y", "z"]}),
        (multiclass_metrics, (rng.normal(size=(n, 4)), rng.integers(0, 3, n)), {"class_names": list("abcd")}),
        (
            vqa_accuracy,
            ([VOCAB[i] for i in rng.integers(0, 3, n)], [VOCAB[i] for i in rng.integers(0, 3, n)]),
            {"answer_vocab": VOCAB},
        ),
        (
            zero_shot_auroc,
            (torch.tensor(s), torch.tensor(np.where(y == 0, -1.0, y))),
            {"label_names": ["x", "y", "z"]},
        ),
    ]
    for fn, arrays, kw in cases:
        if fn is vqa_accuracy:
            arrays = (*arrays, rng.choice(["OPEN", "CLOSED"], n).tolist())
        fast = with_intervals(fn, *arrays, n_resamples=50, seed=seed, **kw)
        slow = with_intervals(fn, *arrays, n_resamples=50, seed=seed, fast=False, **kw)
        # zero_shot_auroc returns its label count as a float, so the generic path bootstraps it too
        assert set(fast) <= set(slow) and (fn is zero_shot_auroc or fast.keys() == slow.keys()), fn.__name__
        for key, value in fast.items():
            if key.endswith("_ci95"):
                np.testing.assert_allclose(
                    value, slow[key], rtol=1e-12, atol=1e-12, err_msg=f"{fn.__name__} {key}"
                )
        assert fast["bootstrap_skipped"] == slow["bootstrap_skipped"], fn.__name__


def test_with_intervals_keys_and_logging():
    m = with_intervals(
        vqa_accuracy, PRED, GOLD, TYPES, answer_vocab=VOCAB, keys=["accuracy_overall"], n_resamples=50
    )
    assert [k for k in m if k.endswith("_ci95")] == ["accuracy_overall_ci95"]
    assert list(m)[:2] == ["accuracy_overall", "accuracy_overall_ci95"]
    assert m["questions"] == 5 and m["bootstrap_resamples"] == 50
    flat = loggable_metrics(m)
    assert flat["accuracy_overall_ci95_low"] <= 0.6 <= flat["accuracy_overall_ci95_high"]
    assert flat["unseen_answers"] == 1.0 and all(isinstance(v, float) for v in flat.values())
    assert "labels_left_out" not in loggable_metrics(multilabel_auroc(ML_SCORES, ML_TARGETS, ML_NAMES))
    with pytest.raises(KeyError, match="accuracy"):
        with_intervals(vqa_accuracy, PRED, GOLD, TYPES, answer_vocab=VOCAB, keys=["accuracy"], n_resamples=5)
    with pytest.raises(ValueError, match="by keyword"):
        with_intervals(multilabel_auroc, ML_SCORES, ML_TARGETS, ML_NAMES, n_resamples=5)
    assert with_intervals(vqa_accuracy, PRED, GOLD, TYPES, answer_vocab=VOCAB, alpha=0.1, n_resamples=5).get(
        "accuracy_overall_ci90"
    )


# --- label-efficiency table ------------------------------------------------------------------------------------


def test_format_label_efficiency_contains_the_numbers():
    results = {
        "vqa": {
            "open": {"pretrained": 0.41, "random": 0.305},
            "overall": {"pretrained": 0.652, "random": 0.55, "pretrained_ci95": [0.61, 0.69]},
            "closed": {"pretrained": 0.8, "random": NAN},
        },
        "linear_probe": {
            "1.0": {
                "pretrained": 0.861,
                "random": 0.702,
                "pretrained_ci95": [0.85, 0.872],
                "random_ci95": [0.69, 0.71],
            },
            "0.01": {"pretrained": 0.784, "random": 0.611},
            "0.1": {"pretrained": 0.83, "random": 0.65},
        },
    }
    table = format_label_efficiency(results)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "setting", "pretrained", "random", "difference"]
    body = lines[2:]
    assert len(body) == 6
    # linear probe first, fractions ascending; then VQA overall, closed, open
    assert ["1 %" in body[0], "10 %" in body[1], "100 %" in body[2]] == [True, True, True]
    assert "0.784" in body[0] and "0.611" in body[0] and "+0.173" in body[0]
    assert "0.861 [0.850, 0.872]" in body[2] and "0.702 [0.690, 0.710]" in body[2] and "+0.159" in body[2]
    assert "overall" in body[3] and "0.652 [0.610, 0.690]" in body[3] and "+0.102" in body[3]
    assert "closed" in body[4] and body[4].split()[-2:] == ["n/a", "n/a"]
    assert "open" in body[5] and "+0.105" in body[5]


def test_paired_difference_is_exact_on_identical_models_and_tighter_than_two_intervals():
    from mpma_ds.eval.bootstrap import paired_difference

    vocab = ["yes", "no"]
    gold = ["yes", "no"] * 100
    types = ["CLOSED"] * 200
    right = [0 if g == "yes" else 1 for g in gold]
    a = [1 - x if i < 30 else x for i, x in enumerate(right)]  # wrong on rows 0-29: 170 / 200
    b = [1 - x if i < 60 else x for i, x in enumerate(right)]  # wrong on rows 0-59: 140 / 200
    out = paired_difference(
        vqa_accuracy,
        (a, gold, types),
        (b, gold, types),
        keys=["accuracy_closed"],
        answer_vocab=vocab,
        n_resamples=400,
    )["accuracy_closed"]
    assert out["a"] == pytest.approx(0.85) and out["b"] == pytest.approx(0.70)
    assert out["difference"] == pytest.approx(0.15)
    low, high = out["difference_ci95"]
    # A is right wherever B is: only rows 30-59 differ, so the paired difference is 30/200 up to resampling
    # of those rows, far from 0
    assert 0.08 < low < 0.15 < high < 0.22
    same = paired_difference(
        vqa_accuracy,
        (a, gold, types),
        (a, gold, types),
        keys=["accuracy_closed"],
        answer_vocab=vocab,
        n_resamples=50,
    )["accuracy_closed"]
    assert same["difference"] == 0.0 and same["difference_ci95"] == [0.0, 0.0]
    # the marginal intervals of A and B overlap more than the paired one's width suggests
    wa = with_intervals(vqa_accuracy, a, gold, types, answer_vocab=vocab, n_resamples=400)["accuracy_closed_ci95"]
    assert (wa[1] - wa[0]) > (high - low) * 0.9
