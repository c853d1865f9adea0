"""Aggregation over cases: means, 95% intervals and harmonic-mean composites.

Convention (and what the reference, kmeng01/memit, does):

* **Scale and intervals.** Per-case values are fractions (0–1); aggregates are multiplied by 100,
  as the reference's summarize does for every metric (so GE is reported ×100 too: the paper's
  GE 619.9). The 95% interval of a per-case metric is the normal approximation
  mean ± 1.96·s/√n (s: sample standard deviation, ddof=1; None when n < 2; not clipped to the
  metric's range, so a small-n success rate may show a bound below 0). For the composite
  S (and zsRE score) it is a percentile bootstrap over cases (1000 resamples, seed 0); its `n` is
  the smallest number of cases behind any of its parts.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 1000


def hmean(values: Sequence[float]) -> float:
    values = [float(v) for v in values]
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _stat(values: Sequence[float], scale: float = 100.0) -> dict:
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64) * scale
    mean = float(arr.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = 1.96 * float(arr.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def _hmean_stat(per_case: Sequence[dict], parts: Sequence[str], stats: dict, scale: float = 100.0) -> dict:
    means = [stats[p]["mean"] for p in parts]
    n = min(stats[p]["n"] for p in parts)
    if any(m is None for m in means):
        return {"mean": None, "ci95": None, "n": 0}
    mean = hmean(means)
    table = np.array([[np.nan if c.get(p) is None else float(c[p]) for p in parts] for c in per_case], dtype=np.float64)
    ci = None
    if len(per_case) >= 2:
        rng = np.random.default_rng(0)
        draws = []
        chunk = max(1, min(BOOTSTRAP_SAMPLES, 4_000_000 // max(1, table.size)))
        done = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            while done < BOOTSTRAP_SAMPLES:
                k = min(chunk, BOOTSTRAP_SAMPLES - done)
                idx = rng.integers(0, len(per_case), size=(k, len(per_case)))
                part_means = np.nanmean(table[idx], axis=1) * scale  # (k, parts)
                for row in part_means:
                    if not np.isnan(row).any():
                        draws.append(hmean(row))
                done += k
        if draws:
            lo, hi = np.percentile(draws, [2.5, 97.5])
            ci = [float(lo), float(hi)]
    return {"mean": mean, "ci95": ci, "n": n}


def aggregate(per_case: Sequence[dict], names: Sequence[str], composite: Optional[tuple[str, Sequence[str]]] = None) -> dict:
    """Mean (×100), 95% interval and count of each metric over the cases that have it."""
    stats = {name: _stat([c[name] for c in per_case if c.get(name) is not None]) for name in names}
    if composite is None:
        return stats
    comp_name, parts = composite
    out = {}
    for name in names:  # the composite right after its parts, for readable tables
        out[name] = stats[name]
        if name == parts[-1]:
            out[comp_name] = _hmean_stat(per_case, parts, stats)
    out.setdefault(comp_name, _hmean_stat(per_case, parts, stats))
    return out



def summary(result: dict) -> dict:
    """Flat {metric: mean (percent)} from an `evaluate` result."""
    return {name: stat["mean"] for name, stat in result["metrics"].items()}
