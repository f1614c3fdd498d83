"""Percentile bootstrap intervals for evaluation metrics: resample the evaluated rows with replacement, recompute
the metric, report the (alpha/2, 1 - alpha/2) quantiles of the resampled values (SPEC §7: a 95 % interval
beside each metric).

``bootstrap_ci`` works with any ``metric_fn(*arrays) -> float``; ``with_intervals`` puts an interval beside
every metric of a dict-returning function. For the package's own metrics (``multilabel_auroc``,
``multiclass_metrics``, ``vqa_accuracy``, ``retrieval_metrics``, ``zero_shot_auroc``) ``with_intervals`` uses
their resamplers: all resamples at once as row-count weights, the very same resamples as the generic path
(same seed, same rows), about two orders of magnitude faster than calling scikit-learn per resample.

Resample r is the r-th ``numpy.random.default_rng(seed).integers(0, N, size=N)`` draw: deterministic per seed,
whatever the chunking.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import UndefinedMetricWarning

from mpma_ds.eval.classification import (
    multiclass_metrics,
    multiclass_metrics_resampler,
    multilabel_auroc,
    multilabel_auroc_resampler,
)
from mpma_ds.eval.retrieval import retrieval_metrics, retrieval_metrics_resampler
from mpma_ds.eval.vqa import vqa_accuracy, vqa_accuracy_resampler
from mpma_ds.eval.zeroshot import zero_shot_auroc, zero_shot_auroc_resampler

# Weights of at most this many (resample x row) cells are held at once.
CHUNK_CELLS = 1 << 21


class Interval(tuple):
    """A bootstrap interval: unpacks and compares as ``(low, high)``; also carries ``skipped`` (resamples where
    the metric was undefined, left out) and ``resamples`` (resamples drawn)."""

    skipped: int
    resamples: int

    def __new__(cls, low: float, high: float, *, skipped: int = 0, resamples: int = 0) -> Interval:
        self = super().__new__(cls, (float(low), float(high)))
        self.skipped = skipped
        self.resamples = resamples
        return self

    @property
    def low(self) -> float:
        return self[0]

    @property
    def high(self) -> float:
        return self[1]


# metric function -> resampler factory taking the same arguments (see the module docstring).
RESAMPLERS: dict[Callable[..., Any], Callable[..., Callable[[np.ndarray], dict[str, np.ndarray]]]] = {
    multilabel_auroc: multilabel_auroc_resampler,
    multiclass_metrics: multiclass_metrics_resampler,
    vqa_accuracy: vqa_accuracy_resampler,
    retrieval_metrics: retrieval_metrics_resampler,
    zero_shot_auroc: zero_shot_auroc_resampler,
}


def _num_rows(arrays: Sequence[Any]) -> int:
    if not arrays:
        raise ValueError("no arrays to resample: pass the per-row arrays positionally")
    lengths = [len(a) for a in arrays]
    if len(set(lengths)) != 1:
        raise ValueError(
            f"the arrays to resample differ in length ({lengths}): pass only per-row arrays positionally and "
            "everything else (names, vocabularies, ks) by keyword"
        )
    if lengths[0] == 0:
        raise ValueError("no rows to resample")
    return lengths[0]


def _index_chunks(n: int, n_resamples: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """(c, n) resample indices, ``chunk`` resamples at a time; row r is the r-th ``integers`` draw of the seed."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        yield np.stack([rng.integers(0, n, size=n) for _ in range(min(chunk, n_resamples - start))])


def resample_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) int64 row indices of each bootstrap resample (with replacement), as the functions here
    draw them."""
    return np.concatenate(list(_index_chunks(n, n_resamples, seed, max(n_resamples, 1))))


def _counts(idx: np.ndarray) -> np.ndarray:
    """(c, n) row indices -> (c, n) float64 count of each original row in each resample."""
    c, n = idx.shape
    flat = (idx + np.arange(c)[:, None] * n).ravel()
    return np.bincount(flat, minlength=c * n).reshape(c, n).astype(np.float64)


def _take(array: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of an array, tensor or list, kept as that kind of container."""
    if isinstance(array, torch.Tensor):
        return array[torch.from_numpy(idx).to(array.device)]
    if isinstance(array, np.ndarray):
        return array[idx]
    return [array[i] for i in idx]


def _quantiles(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
    """(low, high, skipped) of the resampled values, NaN ones skipped."""
    valid = values[~np.isnan(values)]
    skipped = int(values.size - valid.size)
    if valid.size == 0:
        return math.nan, math.nan, skipped
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high), skipped


def _check(n_resamples: int, alpha: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _scalar(value: Any) -> float:
    if value is None:
        return math.nan
    value = float(value.item() if hasattr(value, "item") else value)
    return value


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    **kwargs: Any,
) -> Interval:
    """Percentile bootstrap interval of ``metric_fn(*arrays, **kwargs)`` over rows resampled with replacement.

    A resample where the metric is undefined (``metric_fn`` raises ``ValueError``, as scikit-learn's AUROC does
    with one class, or returns NaN / None) is skipped; ``Interval.skipped`` says how many. A constant metric
    gives ``(c, c)``.

    Args:
        metric_fn: the metric of one sample of rows, returning a number.
        *arrays: per-row arrays (numpy, torch or lists) of equal length N, resampled together.
        n_resamples: resamples drawn.
        seed: the resamples are a function of (seed, N, n_resamples) only.
        alpha: 0.05 for a 95 % interval.
        **kwargs: passed to ``metric_fn`` unchanged (not resampled).
    Returns:
        ``Interval(low, high)`` (NaN, NaN when every resample was skipped).
    """
    _check(n_resamples, alpha)
    n = _num_rows(arrays)
    values = np.full(n_resamples, np.nan)
    r = 0
    with warnings.catch_warnings():
        # an undefined resample is counted in Interval.skipped; scikit-learn would also warn about each one
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for idx in _index_chunks(n, n_resamples, seed, max(1, CHUNK_CELLS // n)):
            for row in idx:
                try:
                    values[r] = _scalar(metric_fn(*(_take(a, row) for a in arrays), **kwargs))
                except ValueError:
                    pass
                r += 1
    low, high, skipped = _quantiles(values, alpha)
    return Interval(low, high, skipped=skipped, resamples=n_resamples)


def _is_metric(value: Any) -> bool:
    """A float-valued entry: what gets an interval by default (counts are ints, lists and dicts are reports)."""
    return isinstance(value, float | np.floating)


def _resampled(
    fn: Callable[..., Mapping[str, Any]],
    arrays: Sequence[Any],
    point: Mapping[str, Any],
    keys: Sequence[str] | None,
    n_resamples: int,
    seed: int,
    fast: bool,
    kwargs: Mapping[str, Any],
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The metrics to bootstrap and each one's ``n_resamples`` values (NaN where a resample left it undefined),
    over the resamples ``seed`` draws (the same rows for every call with the same ``seed`` and N)."""
    n = _num_rows(list(arrays))
    chunks = _index_chunks(n, n_resamples, seed, max(1, CHUNK_CELLS // n))
    factory = RESAMPLERS.get(fn) if fast else None
    samples: dict[str, list[np.ndarray]] = {}
    if factory is not None:
        resample = factory(*arrays, **kwargs)
        for idx in chunks:
            for key, values in resample(_counts(idx)).items():
                samples.setdefault(key, []).append(np.asarray(values, dtype=np.float64))
        wanted = list(keys) if keys is not None else [k for k in point if k in samples and _is_metric(point[k])]
    else:
        wanted = list(keys) if keys is not None else [k for k, v in point.items() if _is_metric(v)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)  # undefined resamples are counted instead
            for idx in chunks:
                block = np.full((len(idx), len(wanted)), np.nan)  # (c, metrics)
                for i, row in enumerate(idx):
                    try:
                        result = fn(*(_take(a, row) for a in arrays), **kwargs)
                    except ValueError:
                        continue
                    block[i] = [_scalar(result.get(k)) for k in wanted]
                for j, key in enumerate(wanted):
                    samples.setdefault(key, []).append(block[:, j])
    missing = [k for k in wanted if k not in point or k not in samples]
    if missing:
        raise KeyError(f"no bootstrap for {missing}: {fn.__name__} returns {sorted(point)}")
    return wanted, {k: np.concatenate(samples[k]) for k in wanted}


def with_intervals(
    fn: Callable[..., Mapping[str, Any]],
    *arrays: Any,
    keys: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    fast: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """``fn(*arrays, **kwargs)`` with a percentile bootstrap interval beside each metric.

    Example: ``with_intervals(vqa_accuracy, predicted, gold, types, answer_vocab=vocab)`` ->
    ``{"accuracy_overall": 0.71, "accuracy_overall_ci95": [0.66, 0.75], ..., "questions": 451, ...}``.

    Args:
        fn: a function returning a dict of metrics.
        *arrays: its per-row arguments (length N each), resampled together; pass everything else by keyword.
        keys: the metrics to bootstrap; default: every float-valued entry (counts are ints and get none) that the
            resampler produces.
        n_resamples, seed, alpha: as ``bootstrap_ci``; the interval key is ``<metric>_ci95`` for alpha 0.05
            (``_ci90`` for 0.1, ...).
        fast: use ``fn``'s resampler from ``RESAMPLERS`` when it has one (a ``functools.partial`` has none: pass
            keywords instead); False forces one ``fn`` call per resample. Both see the same resamples. For
            ``retrieval_metrics`` the resampler resamples queries against the fixed gallery (see
            ``retrieval_metrics_resampler``), which the generic path cannot do.
        **kwargs: passed to ``fn`` unchanged.
    Returns:
        ``fn``'s dict with ``<metric>_ci95: [low, high]`` after each bootstrapped metric, plus
        ``bootstrap_resamples`` (int) and ``bootstrap_skipped`` ({metric: resamples where it was undefined}, only
        metrics with some).
    """
    _check(n_resamples, alpha)
    point = dict(fn(*arrays, **kwargs))
    wanted, samples = _resampled(fn, arrays, point, keys, n_resamples, seed, fast, kwargs)
    tag = f"_ci{round(100 * (1 - alpha))}"
    intervals, skipped = {}, {}
    for key in wanted:
        low, high, n_skipped = _quantiles(samples[key], alpha)
        intervals[key] = [low, high]
        if n_skipped:
            skipped[key] = n_skipped
    out: dict[str, Any] = {}
    for key, value in point.items():
        out[key] = value
        if key in intervals:
            out[key + tag] = intervals[key]
    out["bootstrap_resamples"] = n_resamples
    out["bootstrap_skipped"] = skipped
    return out


def loggable_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics dict as ``{name: float}`` for a metric logger (MLflow takes scalars only).

    ``x_ci95: [lo, hi]`` becomes ``x_ci95_low`` / ``x_ci95_high``; ``bootstrap_skipped: {m: n}`` becomes
    ``bootstrap_skipped/<m>``; ints become floats; other lists and dicts (``labels_left_out``...), strings and
    ``None`` (an undefined metric read back from strict JSON) are dropped.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float | np.integer | np.floating):
            out[key] = float(value)
        elif isinstance(value, list | tuple) and len(value) == 2 and "_ci" in key:
            if value[0] is not None and value[1] is not None:  # [null, null]: undefined (read back from JSON)
                out[f"{key}_low"], out[f"{key}_high"] = float(value[0]), float(value[1])
        elif key == "bootstrap_skipped" and isinstance(value, Mapping):
            out.update({f"bootstrap_skipped/{m}": float(n) for m, n in value.items()})
    return out


def paired_difference(
    fn: Callable[..., Mapping[str, Any]],
    arrays_a: Sequence[Any],
    arrays_b: Sequence[Any],
    *,
    keys: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """``fn(*arrays_a) - fn(*arrays_b)`` for each of ``keys``, with a *paired* percentile bootstrap interval.

    Models A and B were evaluated on the same N rows (row i of every array of both is the same sample): each
    resample draws N rows once and scores both models on them, so the interval is that of the difference on
    one test set, much narrower than two separate intervals when the models err on the same hard rows. This is
    what "A beats B" should be decided on (the interval excludes 0).

    Returns:
        ``{key: {"difference": d, "difference_ci95": [low, high], "a": fn(A)[key], "b": fn(B)[key],
        "skipped": resamples where either was undefined}}``.
    """
    _check(n_resamples, alpha)
    _num_rows(list(arrays_a) + list(arrays_b))  # the same N rows for both
    point_a, point_b = dict(fn(*arrays_a, **kwargs)), dict(fn(*arrays_b, **kwargs))
    # the same seed and N draw the same resamples for both: each value of a resample pairs with b's
    _, draws_a = _resampled(fn, arrays_a, point_a, keys, n_resamples, seed, True, kwargs)
    _, draws_b = _resampled(fn, arrays_b, point_b, keys, n_resamples, seed, True, kwargs)
    tag = f"difference_ci{round(100 * (1 - alpha))}"
    out = {}
    for k in keys:
        low, high, skipped = _quantiles(draws_a[k] - draws_b[k], alpha)
        a, b = _scalar(point_a.get(k)), _scalar(point_b.get(k))
        out[k] = {"difference": a - b, tag: [low, high], "a": a, "b": b, "skipped": skipped}
    return out


def mean_paired_difference(
    fn: Callable[..., Mapping[str, Any]],
    pairs: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    *,
    keys: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """`paired_difference` averaged over several (A, B) pairs evaluated on the same N rows: the mean over pairs
    of ``fn(A_s) - fn(B_s)``, with each resample drawing the same N rows for every pair (one test set, several
    training seeds). The interval is that of the test set's sampling only; the spread between seeds is the
    returned ``per_pair`` differences (with 2 seeds that is all there is to say about it).

    Returns:
        ``{key: {"difference", "difference_ci95": [low, high], "a", "b" (means over pairs), "per_pair":
        [difference of each pair], "skipped"}}``.
    """
    _check(n_resamples, alpha)
    if not pairs:
        raise ValueError("no (A, B) pairs to compare")
    sums: dict[str, np.ndarray] = {}
    points: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for arrays_a, arrays_b in pairs:
        _num_rows(list(arrays_a) + list(arrays_b))
        point_a, point_b = dict(fn(*arrays_a, **kwargs)), dict(fn(*arrays_b, **kwargs))
        _, draws_a = _resampled(fn, arrays_a, point_a, keys, n_resamples, seed, True, kwargs)
        _, draws_b = _resampled(fn, arrays_b, point_b, keys, n_resamples, seed, True, kwargs)
        for k in keys:
            sums[k] = sums.get(k, 0.0) + (draws_a[k] - draws_b[k])
        points.append((point_a, point_b))
    tag = f"difference_ci{round(100 * (1 - alpha))}"
    out = {}
    for k in keys:
        low, high, skipped = _quantiles(sums[k] / len(pairs), alpha)
        a = [_scalar(pa.get(k)) for pa, _ in points]
        b = [_scalar(pb.get(k)) for _, pb in points]
        per_pair = [x - y for x, y in zip(a, b)]
        out[k] = {"difference": float(np.mean(per_pair)), tag: [low, high], "a": float(np.mean(a)),
                  "b": float(np.mean(b)), "per_pair": per_pair, "skipped": skipped}  # fmt: skip
    return out
