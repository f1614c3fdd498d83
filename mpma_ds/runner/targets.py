"""The demo's targets (issue 25) and whether a run meets each: what ``make demo`` prints at the end and records
under ``targets`` in ``results.json``.

- zero-shot AUROC >= `ZERO_SHOT_SHARE` x the supervised bound of the same image encoder and budget
  (`runner.supervised_bound`);
- image->report R@10 >= `RETRIEVAL_FACTOR` x the random twin's;
- pointing game >= `POINTING_FACTOR` x chance (the mean box share of the image) and above the random twin outside
  both 95 % intervals;
- every linear-probe and VQA difference (pretrained - random) above 0: its paired 95 % interval's low end > 0.

A target is ``holds``, ``missed`` (with the measurement beside it), or ``not measured`` where a value it needs is
missing (a split too small for the metric, no ground truth for the pointing game): a missed target is a finding
of the run, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

ZERO_SHOT_SHARE = 0.95
RETRIEVAL_FACTOR = 3.0
POINTING_FACTOR = 2.0
VQA_KINDS = ("overall", "closed", "open")


def _num(value: Any) -> float | None:
    """A finite float, else None (missing, null in JSON, NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _interval(ci: Sequence[Any] | None) -> tuple[float, float] | None:
    if not ci or len(ci) != 2:
        return None
    low, high = _num(ci[0]), _num(ci[1])
    return None if low is None or high is None else (low, high)


def cell(value: Any, ci: Sequence[Any] | None = None) -> str:
    """``0.412 [0.371, 0.455]``, ``0.412`` without an interval, ``n/a`` without a value."""
    value = _num(value)
    if value is None:
        return "n/a"
    band = _interval(ci)
    return f"{value:.3f}" + (f" [{band[0]:.3f}, {band[1]:.3f}]" if band else "")


def verdict(holds: bool | None) -> str:
    return "not measured" if holds is None else "holds" if holds else "missed"


def _target(claim: str, holds: bool | None, measured: str, **values: Any) -> dict[str, Any]:
    return {"target": claim, "verdict": verdict(holds), "holds": holds, "measured": measured, **values}


def _at_least(entry: Mapping[str, Any], claim: str, reference: str, factor: float) -> dict[str, Any]:
    """``entry["pretrained"] >= factor x entry[reference]`` (each beside its ``ci95_*`` interval)."""
    pre, ref = _num(entry.get("pretrained")), _num(entry.get(reference))
    need = None if ref is None else factor * ref
    holds = None if pre is None or need is None else pre >= need
    measured = (
        f"{cell(pre, entry.get('ci95_pretrained'))} vs {factor:g} x {reference.replace('_', ' ')} "
        f"{cell(ref, entry.get(f'ci95_{reference}'))} = {cell(need)}"
    )
    ratio = None if pre is None or not ref else pre / ref
    return _target(claim, holds, measured, threshold=need, ratio=ratio)


def zero_shot_target(entry: Mapping[str, Any]) -> dict[str, Any]:
    """``entry``: results.json's ``pretrain_eval["zero_shot_auroc"]``."""
    claim = f"zero-shot AUROC >= {ZERO_SHOT_SHARE:g} x the supervised bound"
    return _at_least(entry, claim, "supervised_bound", ZERO_SHOT_SHARE)


def retrieval_target(entry: Mapping[str, Any]) -> dict[str, Any]:
    """``entry``: results.json's ``pretrain_eval["i2t_R@10"]``."""
    claim = f"image->report R@10 >= {RETRIEVAL_FACTOR:g} x the random twin"
    return _at_least(entry, claim, "random", RETRIEVAL_FACTOR)


def pointing_target(entry: Mapping[str, Any] | None) -> dict[str, Any]:
    """``entry``: results.json's ``pretrain_eval["pointing_game"]`` (None: the shards carry no ground truth)."""
    claim = f"pointing game >= {POINTING_FACTOR:g} x chance and above the random twin outside both 95 % intervals"
    entry = entry or {}
    pre, rnd, chance = (_num(entry.get(k)) for k in ("pretrained", "random", "chance"))
    pre_ci, rnd_ci = _interval(entry.get("ci95_pretrained")), _interval(entry.get("ci95_random"))
    need = None if chance is None else POINTING_FACTOR * chance
    over_chance = None if pre is None or need is None else pre >= need
    over_twin = None if pre_ci is None or rnd_ci is None else pre_ci[0] > rnd_ci[1]
    holds = None if over_chance is None or over_twin is None else over_chance and over_twin
    measured = (
        f"{cell(pre, entry.get('ci95_pretrained'))} vs {POINTING_FACTOR:g} x chance {cell(chance)} = "
        f"{cell(need)}; random twin {cell(rnd, entry.get('ci95_random'))}"
    )
    return _target(claim, holds, measured, threshold=need, above_chance=over_chance, above_twin=over_twin)


def downstream_target(linear_probe: Mapping[str, Any], vqa: Mapping[str, Any]) -> dict[str, Any]:
    """Every linear-probe fraction's and every VQA kind's paired difference above 0."""
    rows = [(f"linear probe {float(f):.0%} labels", e) for f, e in linear_probe.items()]
    rows += [
        (f"VQA {kind.upper() if kind != 'overall' else kind}", vqa[kind]) for kind in VQA_KINDS if kind in vqa
    ]
    items = []
    for name, e in rows:
        ci = _interval(e.get("difference_ci95"))
        items.append(
            {"name": name, "difference": _num(e.get("difference")), "difference_ci95": list(ci) if ci else None,
             "above_zero": None if ci is None else ci[0] > 0.0}
        )  # fmt: skip
    known = [i["above_zero"] for i in items if i["above_zero"] is not None]
    holds = None if not items or len(known) < len(items) else all(known)
    below = [f"{i['name']} {i['difference']:+.3f}" for i in items if i["above_zero"] is False]
    measured = f"{sum(known)} of {len(items)} paired intervals above 0" + (
        f" (not: {', '.join(below)})" if below else ""
    )
    return _target(
        "every linear-probe and VQA difference above 0 (paired 95 % interval)", holds, measured, differences=items
    )


def demo_targets(payload: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target's verdict from results.json's ``pretrain_eval``, ``linear_probe`` and ``vqa``."""
    evals = payload["pretrain_eval"]
    return {
        "zero_shot_auroc": zero_shot_target(evals.get("zero_shot_auroc") or {}),
        "i2t_R@10": retrieval_target(evals.get("i2t_R@10") or {}),
        "pointing_game": pointing_target(evals.get("pointing_game")),
        "downstream": downstream_target(payload.get("linear_probe") or {}, payload.get("vqa") or {}),
    }


def format_targets(targets: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per target: its verdict, the claim, the measurement."""
    held = sum(t["holds"] is True for t in targets.values())
    lines = [f"targets (issue 25): {held} of {len(targets)} hold"]
    for t in targets.values():
        lines.append(f"  [{t['verdict']:^12}] {t['target']}: {t['measured']}")
    return "\n".join(lines)
