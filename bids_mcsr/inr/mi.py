"""Mutual information between predicted contrasts, and the MI-plateau stopping rule.

MI (paper Eq. 2) is estimated from a joint histogram with ``bins`` x ``bins``
equal-width bins, each variable's bins spanning its own [min, max] over the
sample (equivalent to min-max scaling both predictions first), natural log (nats).

Stopping rule (``plateau_status``), on the per-epoch MI curves of every pair:

1. ``d[e]`` = mean over pairs of ``|MI[e] - MI[e-1]|`` (epoch-to-epoch change).
2. ``s[e]`` = mean of ``d`` over the last ``window`` epochs (smoothing against noise).
3. Epoch ``e`` is *flat* when ``s[e] <= rel_tol * max(s[window..e])``: the smoothed
   change has fallen to a small fraction of its largest (early) value. Because
   the threshold is relative to the curve's own early dynamics, pure noise of any
   size keeps ``s`` near its typical value and does not stop training.
4. Stop after epoch ``e`` when the last ``patience`` epochs were all flat and at
   least ``min_epochs`` epochs have run.

Selection (``select_epoch``): after a plateau stop, the epoch with the smallest
``d`` within the final run of consecutive flat epochs (the most stable
equilibrium point); without a plateau, the last epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Histogram MI (nats) between two equally long 1-D samples."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError("mutual_information needs two non-empty samples of equal length")
    joint, _, _ = np.histogram2d(a, b, bins=bins, range=[_span(a), _span(b)])
    p = joint / joint.sum()
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])))


def _span(x: np.ndarray) -> tuple[float, float]:
    lo, hi = float(x.min()), float(x.max())
    # A constant prediction (e.g. an untrained head) still needs a valid range.
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def pair_key(a: str, b: str) -> str:
    """Curve name of a contrast pair, e.g. ``"T1w|FLAIR"`` (input order kept)."""
    return f"{a}|{b}"


def pairwise_mi(values: np.ndarray, names: Sequence[str], bins: int = 32) -> dict[str, float]:
    """MI of every pair of columns of ``values`` ``(n, N)``, keyed ``"A|B"``."""
    return {
        pair_key(names[i], names[j]): mutual_information(values[:, i], values[:, j], bins)
        for i, j in combinations(range(len(names)), 2)
    }


@dataclass(frozen=True)
class PlateauRule:
    """Parameters of the MI-plateau rule (see module docstring)."""

    min_epochs: int = 10
    patience: int = 5
    window: int = 3
    rel_tol: float = 0.1


@dataclass(frozen=True)
class PlateauStatus:
    """Rule state after the last epoch of a curve (indices are 0-based epochs)."""

    stop: bool
    flat: bool  # the last epoch is flat
    run_start: int | None  # first epoch of the current run of flat epochs
    best: int | None  # epoch with the smallest change within that run


def epoch_changes(curves: Mapping[str, Sequence[float]] | Sequence[Sequence[float]]) -> np.ndarray:
    """``d`` ``(E,)``: mean over curves of ``|MI[e] - MI[e-1]|``; ``d[0]`` is NaN."""
    arr = np.atleast_2d(
        np.asarray(list(curves.values()) if isinstance(curves, Mapping) else curves, dtype=float)
    )
    d = np.full(arr.shape[1], np.nan)
    if arr.shape[1] > 1:
        d[1:] = np.abs(np.diff(arr, axis=1)).mean(axis=0)
    return d


def flat_epochs(d: np.ndarray, rule: PlateauRule) -> np.ndarray:
    """Boolean ``(E,)``: which epochs satisfy the flatness condition of step 3."""
    flat = np.zeros(len(d), dtype=bool)
    peak = 0.0
    for e in range(rule.window, len(d)):
        s = float(np.mean(d[e - rule.window + 1 : e + 1]))
        peak = max(peak, s)
        flat[e] = s <= rule.rel_tol * peak
    return flat


def plateau_status(curves, rule: PlateauRule) -> PlateauStatus:
    """Evaluate the stopping rule on the curves so far (one value per epoch run)."""
    d = epoch_changes(curves)
    flat = flat_epochs(d, rule)
    n = len(d)
    if n == 0 or not flat[-1]:
        return PlateauStatus(stop=False, flat=False, run_start=None, best=None)
    start = n - 1
    while start > 0 and flat[start - 1]:
        start -= 1
    best = start + int(np.argmin(d[start:]))
    stop = n >= rule.min_epochs and n - start >= rule.patience
    return PlateauStatus(stop=stop, flat=True, run_start=start, best=best)


def select_epoch(curves, rule: PlateauRule, stopped: bool) -> int:
    """0-based epoch whose model is written: see the module docstring."""
    n = len(epoch_changes(curves))
    if not stopped:
        return n - 1
    status = plateau_status(curves, rule)
    if status.best is None:
        raise ValueError("stopped=True but the curves do not end on a plateau")
    return status.best
