"""Flatten nested settings (recipe, DeepSpeed config) into MLflow-sized ``key -> str`` parameters."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# MLflow's conservative limits: older servers reject values over 500 characters (newer ones accept 6000),
# and one log_batch call takes at most 100 params/tags and 1000 metrics.
MAX_PARAM_VALUE_CHARS = 500
MAX_PARAM_KEY_CHARS = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    return value


def _value_str(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        try:
            text = json.dumps(value, default=str, sort_keys=True)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return text


def _walk(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    value = _to_plain(value)
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            yield from _walk(f"{prefix}.{key}" if prefix else str(key), sub)
    else:
        yield prefix, value


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts / dataclasses -> ``{"train.lr": "0.0003", ...}``.

    Nested mappings become dotted keys; lists and other leaves become JSON text. Values are cut to
    ``MAX_PARAM_VALUE_CHARS`` (ending in ``...``) and characters MLflow refuses in keys become ``_``.
    """
    flat: dict[str, str] = {}
    for key, value in _walk(prefix, params):
        clean = _BAD_KEY_CHARS.sub("_", key)[:MAX_PARAM_KEY_CHARS] or "value"
        flat[clean] = _value_str(value)
    return flat


def chunked(items: list, size: int) -> Iterator[list]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / ±inf float replaced by ``None``, so ``json.dumps`` writes strict JSON (a metric
    that is undefined on a split, e.g. a macro AUROC with no label scored, is ``null``, not ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
