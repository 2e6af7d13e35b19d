"""Small numpy metrics and the isotonic fit for the CPU head (no scikit-learn needed at run time)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def average_precision(y: npt.NDArray[np.bool_], score: F64) -> float:
    """Area under the precision-recall curve as average precision (ties broken pessimistically)."""
    if not y.any():
        return float("nan")
    order = np.lexsort((y.astype(np.int8), -score))  # among equal scores, negatives first
    ys = y[order]
    tp = np.cumsum(ys)
    precision = tp / np.arange(1, len(ys) + 1)
    return float((precision * ys).sum() / ys.sum())


def isotonic_fit(x: F64, y: F64, lo: float = 0.005, hi: float = 0.995) -> tuple[F64, F64]:
    """Pool-adjacent-violators: the non-decreasing step function of x closest to y (squared error).

    Returned as strictly increasing knots (x, y) for ``np.interp`` (each block contributes its first and
    last x); y is clipped to [lo, hi] so no score claims certainty from a few hundred calibration rows.
    """
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order].astype(np.float64)
    means: list[float] = []
    weights: list[float] = []
    starts: list[int] = []
    for k, v in enumerate(ys):
        means.append(float(v))
        weights.append(1.0)
        starts.append(k)
        while len(means) > 1 and means[-2] >= means[-1]:
            w = weights[-2] + weights[-1]
            m = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w
            means[-2:] = [m]
            weights[-2:] = [w]
            starts.pop()
    kx: list[float] = []
    ky: list[float] = []
    ends = [*starts[1:], len(xs)]
    for s, e, m in zip(starts, ends, means, strict=True):
        for xv in (float(xs[s]), float(xs[e - 1])):
            if not kx or xv > kx[-1]:
                kx.append(xv)
                ky.append(min(max(m, lo), hi))
    return np.array(kx), np.array(ky)


def rate(mask: npt.NDArray[np.bool_], flagged: npt.NDArray[np.bool_]) -> float:
    """Share of the rows in ``mask`` that were flagged (e.g. the false-positive rate of hard negatives)."""
    n = int(mask.sum())
    return float((flagged & mask).sum() / n) if n else float("nan")
