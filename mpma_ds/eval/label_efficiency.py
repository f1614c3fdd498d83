"""The label-efficiency table of a pretrained-vs-random comparison (SPEC §7): linear-probe AUROC at each label
fraction and VQA accuracy per question type, pretrained beside its randomly initialised twin."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Row order of the VQA section; other settings follow in the order given.
VQA_ORDER: tuple[str, ...] = ("overall", "closed", "open")
TASK_TITLES: dict[str, str] = {"linear_probe": "linear probe AUROC", "vqa": "VQA accuracy"}
COLUMNS: tuple[str, ...] = ("pretrained", "random", "difference")


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _cell(value: Any, interval: Any, *, signed: bool = False) -> str:
    """``0.812 [0.790, 0.833]``; ``n/a`` for a missing or NaN value."""
    x = _number(value)
    if x is None:
        return "n/a"
    text = f"{x:+.3f}" if signed else f"{x:.3f}"
    if isinstance(interval, list | tuple) and len(interval) == 2:
        lo, hi = _number(interval[0]), _number(interval[1])
        bound = "n/a" if lo is None or hi is None else f"{lo:.3f}, {hi:.3f}"
        text += f" [{bound}]"
    return text


def _fraction_label(key: str) -> str:
    """``"0.01"`` -> ``"1 % labels"``; a key that is not a number is kept."""
    x = _number(key)
    if x is None:
        return str(key)
    return f"{100 * x:g} % labels"


def _ordered_settings(task: str, settings: Mapping[str, Any]) -> list[str]:
    keys = list(settings)
    if task == "vqa":
        return [k for k in VQA_ORDER if k in settings] + [k for k in keys if k not in VQA_ORDER]
    numeric = [k for k in keys if _number(k) is not None]
    return sorted(numeric, key=lambda k: float(k)) + [k for k in keys if _number(k) is None]


def format_label_efficiency(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One plain-text table: a row per label fraction / VQA question type; columns pretrained, random, difference.

    Args:
        results: ``{"linear_probe": {"0.01": {"pretrained": x, "random": y}, "0.1": {...}, "1.0": {...}},
            "vqa": {"overall" | "closed" | "open": {"pretrained": x, "random": y}}}``. Each setting may also hold
            ``pretrained_ci95`` / ``random_ci95`` (``[low, high]``), shown in brackets, and
            ``difference`` / ``difference_ci95`` (e.g. from a paired bootstrap); without ``difference`` it is
            pretrained - random, with no interval (two separate intervals do not give the difference's).
            Fractions are sorted numerically; other tasks are printed after these two, in the order given.
    Returns:
        The table, lines joined by ``\\n`` (no trailing newline); missing or NaN values print as ``n/a``.
    """
    order = [t for t in TASK_TITLES if t in results] + [t for t in results if t not in TASK_TITLES]
    rows: list[tuple[str, str, str, str, str]] = []
    for task in order:
        settings = results[task]
        for key in _ordered_settings(task, settings):
            entry = settings[key]
            pre, rnd = _number(entry.get("pretrained")), _number(entry.get("random"))
            diff = entry.get("difference", None if pre is None or rnd is None else pre - rnd)
            setting = _fraction_label(key) if task == "linear_probe" else str(key)
            rows.append(
                (
                    TASK_TITLES.get(task, task),
                    setting,
                    _cell(pre, entry.get("pretrained_ci95")),
                    _cell(rnd, entry.get("random_ci95")),
                    _cell(diff, entry.get("difference_ci95"), signed=True),
                )
            )
    header = ("task", "setting", *COLUMNS)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
