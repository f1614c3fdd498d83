"""The demo's targets (issue 25): results.json's ``pretrain_eval`` keys with their intervals, the supervised bound
beside the zero-shot AUROC, and each target's verdict — held, missed (with the measurement) or not measured."""

from __future__ import annotations

import json

from mpma_ds.runner.demo import results_payload
from mpma_ds.runner.targets import format_targets


def _metrics(zs, i2t10, pg, *, chance=0.127):
    return {
        "zeroshot_auroc_mean": zs[0], "zeroshot_auroc_mean_ci95": list(zs[1:]),
        "i2t_R@10": i2t10[0], "i2t_R@10_ci95": list(i2t10[1:]),
        "pointing_game": pg[0], "pointing_game_ci95": list(pg[1:]), "pointing_game_chance": chance,
        "grounding_map": "similarity", "zeroshot_reference": "truth", "eval_samples": 547,
    }  # fmt: skip


def _down(lp_low=0.05, vqa_low=0.01):
    entry = {"pretrained": 0.7, "random": 0.6, "difference": 0.1, "difference_ci95": [lp_low, 0.15]}
    vqa = {k: {"pretrained": 0.7, "random": 0.6, "difference": 0.05, "difference_ci95": [vqa_low, 0.09]}
           for k in ("overall", "closed", "open")}  # fmt: skip
    return {
        "linear_probe": {"0.01": dict(entry), "1.0": dict(entry)},
        "vqa": {**vqa, "questions": 1511},
        "runs": {},
    }


def _results(pre, rnd, bound, **down):
    return {"pretrain_eval": {"pretrained": pre, "random-init": rnd}, "supervised_bound": bound, **_down(**down)}


BOUND = {"auroc": 0.80, "ci95": [0.78, 0.82], "steps": 900, "cached": True, "key": "k"}


def test_pretrain_eval_holds_the_issue_keys_each_with_its_interval_and_every_verdict():
    pre = _metrics((0.77, 0.75, 0.79), (0.09, 0.07, 0.11), (0.30, 0.27, 0.33))
    rnd = _metrics((0.53, 0.50, 0.56), (0.02, 0.01, 0.03), (0.19, 0.16, 0.22))
    payload = results_payload(_results(pre, rnd, BOUND))
    zs = payload["pretrain_eval"]["zero_shot_auroc"]
    assert zs == {"pretrained": 0.77, "random": 0.53, "supervised_bound": 0.80, "ci95_pretrained": [0.75, 0.79],
                  "ci95_random": [0.50, 0.56], "ci95_supervised_bound": [0.78, 0.82]}  # fmt: skip
    r10 = payload["pretrain_eval"]["i2t_R@10"]
    assert (r10["pretrained"], r10["random"], r10["ci95_pretrained"]) == (0.09, 0.02, [0.07, 0.11])
    pg = payload["pretrain_eval"]["pointing_game"]
    assert pg["chance"] == 0.127 and pg["ci95_random"] == [0.16, 0.22] and pg["map"] == "similarity"
    assert payload["supervised_bound"]["key"] == "k"
    t = payload["targets"]
    assert set(t) == {"zero_shot_auroc", "i2t_R@10", "pointing_game", "downstream"}
    assert t["zero_shot_auroc"]["verdict"] == "holds" and abs(t["zero_shot_auroc"]["threshold"] - 0.76) < 1e-9
    assert t["i2t_R@10"]["verdict"] == "holds" and abs(t["i2t_R@10"]["threshold"] - 0.06) < 1e-9
    assert t["pointing_game"]["verdict"] == "holds"  # 0.30 >= 0.254 and 0.27 > 0.22
    assert t["downstream"]["verdict"] == "holds" and len(t["downstream"]["differences"]) == 5
    json.dumps(payload, allow_nan=False)  # strict JSON
    text = format_targets(t)
    assert text.splitlines()[0] == "targets (issue 25): 4 of 4 hold"
    assert "0.770 [0.750, 0.790] vs 0.95 x supervised bound 0.800 [0.780, 0.820] = 0.760" in text


def test_a_missed_target_is_a_verdict_with_its_measurement_not_an_error():
    pre = _metrics((0.75, 0.73, 0.77), (0.05, 0.03, 0.07), (0.21, 0.18, 0.24))
    rnd = _metrics((0.53, 0.50, 0.56), (0.02, 0.01, 0.03), (0.19, 0.16, 0.22))
    t = results_payload(_results(pre, rnd, BOUND, vqa_low=-0.004))["targets"]
    assert t["zero_shot_auroc"]["verdict"] == "missed" and abs(t["zero_shot_auroc"]["ratio"] - 0.9375) < 1e-9
    assert t["i2t_R@10"]["verdict"] == "missed"  # 0.05 < 3 x 0.02
    pg = t["pointing_game"]
    assert pg["verdict"] == "missed" and pg["above_chance"] is False and pg["above_twin"] is False
    # 2 x chance reached but inside the twin's interval: still missed
    inside = _metrics((0.75, 0.73, 0.77), (0.05, 0.03, 0.07), (0.27, 0.21, 0.33))
    pg = results_payload(_results(inside, rnd, BOUND))["targets"]["pointing_game"]
    assert pg["above_chance"] is True and pg["above_twin"] is False and pg["verdict"] == "missed"
    down = t["downstream"]
    assert (
        down["verdict"] == "missed"
        and "(not: VQA overall +0.050, VQA CLOSED +0.050, VQA OPEN +0.050)" in (down["measured"])
    )
    lines = format_targets(t).splitlines()
    assert lines[0] == "targets (issue 25): 0 of 4 hold" and all("[   missed   ]" in ln for ln in lines[1:])


def test_a_target_without_its_measurement_is_not_measured():
    """The test-sized demo: too few validation images for a zero-shot label (NaN -> null), no bound."""
    nan = float("nan")
    pre = _metrics((nan, nan, nan), (0.5, 0.2, 0.8), (0.3, 0.1, 0.5))
    rnd = _metrics((nan, nan, nan), (0.4, 0.1, 0.7), (0.2, 0.0, 0.4))
    payload = results_payload(_results(pre, rnd, {"auroc": None, "ci95": [None, None]}, lp_low=None))
    t = payload["targets"]
    assert payload["pretrain_eval"]["zero_shot_auroc"]["supervised_bound"] is None
    assert t["zero_shot_auroc"]["verdict"] == "not measured" and t["zero_shot_auroc"]["holds"] is None
    assert t["i2t_R@10"]["verdict"] == "missed"
    assert t["downstream"]["verdict"] == "not measured"  # a linear-probe interval is undefined
    assert "n/a vs 0.95 x supervised bound n/a" in format_targets(t)
    without = {k: v for k, v in pre.items() if not k.startswith("pointing_game")}
    rnd_without = {k: v for k, v in rnd.items() if not k.startswith("pointing_game")}
    t = results_payload(_results(without, rnd_without, BOUND))["targets"]
    assert t["pointing_game"]["verdict"] == "not measured"  # shards without ground truth
