"""The statistics an eval report needs: a score's uncertainty (Wilson interval for a
pass rate, bootstrap for other metrics), latency percentiles, and the tensor metrics.

A suite has tens to hundreds of cases, so a score alone says little: 8 of 10 passed is
compatible with a true rate anywhere from about 0.49 to 0.94. Every score goes out
with its interval so that the gate and the reader can tell noise from a change.
Undefined values (AUC with one class, a percentile of nothing) are NaN, never an
exception, so that a report is always produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (95 % by default).
    Unlike p ± z·se it stays inside [0, 1] and is sound at 0/n and n/n."""
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], not {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (q in 0..100) with linear interpolation, as numpy's
    default; NaN for no values."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=float), q))


def accuracy(labels: Sequence[int], predicted: Sequence[int]) -> float:
    """The fraction of predictions equal to their label; NaN for none."""
    y, p = _pair(labels, predicted)
    return float(np.mean(y == p)) if len(y) else math.nan


def f1(labels: Sequence[int], predicted: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class (the others are negatives). NaN when neither the
    labels nor the predictions hold a positive (nothing to find, nothing claimed)."""
    y, p = _pair(labels, predicted)
    tp = int(np.sum((y == positive) & (p == positive)))
    fp = int(np.sum((y != positive) & (p == positive)))
    fn = int(np.sum((y == positive) & (p != positive)))
    if tp + fp + fn == 0:
        return math.nan
    return 2 * tp / (2 * tp + fp + fn)


def auc(labels: Sequence[int], scores: Sequence[float], positive: int = 1) -> float:
    """ROC AUC of ``scores`` for the ``positive`` class: the chance that a random
    positive scores above a random negative, ties counting half (Mann–Whitney U on
    ranks with ties averaged). NaN when only one class is present."""
    y, s = _pair(labels, scores)
    is_pos = y == positive
    n_pos = int(is_pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s.astype(float))
    u = float(ranks[is_pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def bootstrap_ci(
    metric_fn: Callable[[Sequence[int], Sequence[float]], float],
    labels: Sequence[int],
    values: Sequence[float],
    rounds: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of ``metric_fn(labels, values)``:
    cases resampled with replacement ``rounds`` times, by a generator seeded with
    ``seed`` (the same inputs give the same interval). Resamples where the metric is
    undefined (one class for AUC) are left out; (NaN, NaN) when all are."""
    y, v = _pair(labels, values)
    n = len(y)
    if n == 0 or rounds < 1:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(rounds, n))
    results = np.array([metric_fn(y[idx].tolist(), v[idx].tolist()) for idx in draws])
    results = results[~np.isnan(results)]
    if len(results) == 0:
        return (math.nan, math.nan)
    low, high = np.percentile(results, [2.5, 97.5])
    return (float(low), float(high))


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two flat sequences of one length, not {x.shape} and {y.shape}")
    return x, y


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(len(values), dtype=float)
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks
