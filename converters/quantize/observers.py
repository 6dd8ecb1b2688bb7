"""Range observers for calibration: min-max, and a fixed-size streaming histogram for the
percentile, entropy (KL) and MSE methods.

The histogram never grows: when a batch falls outside its range, the range widens by an integer
factor of the bin width so that old bins merge exactly into new ones. Memory is O(bins) per tensor
whatever the number of calibration samples.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.kinds import CalibrationMethod

__all__ = ["AUTO_CANDIDATES", "ChannelMinMaxObserver", "HistogramObserver", "METHODS", "MinMaxObserver", "Observer", "check_method", "make_observer"]

METHODS = tuple(method.value for method in CalibrationMethod)
#: "auto" chooses per tensor among these by the error each causes in the consumer's output (range_search.py).
AUTO_CANDIDATES = ("minmax", "percentile", "entropy", "mse")


def check_method(method: str) -> None:
    """OptionError unless `method` is one of METHODS."""
    if method not in METHODS:
        raise OptionError(f"unknown calibration method '{method}'", hint=f"choose from {', '.join(METHODS)}")


class MinMaxObserver:
    """Running min and max."""

    def __init__(self) -> None:
        self.low = math.inf
        self.high = -math.inf

    def observe(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.low = min(self.low, float(np.min(values)))
        self.high = max(self.high, float(np.max(values)))

    @property
    def seen(self) -> bool:
        return self.low <= self.high

    def range(self, symmetric: bool) -> tuple[float, float]:
        return (self.low, self.high) if self.seen else (0.0, 0.0)


class HistogramObserver(MinMaxObserver):
    """Min/max plus a histogram of `bins` bins whose range widens (never re-bins from raw data)."""

    def __init__(self, method: str = "percentile", *, bins: int = 2048, percentile: float = 99.99, levels: int = 256) -> None:
        super().__init__()
        check_method(method)
        self.method = method
        self.bins = bins
        self.percentile = percentile
        self.levels = levels
        self.counts = np.zeros(bins, dtype=np.float64)
        self.origin = 0.0
        self.width = 0.0

    def observe(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        values = values.astype(np.float32, copy=False).ravel()
        low, high = float(np.min(values)), float(np.max(values))
        super().observe(values)
        if self.width == 0.0:
            span = max(high - low, 1e-8)
            self.origin, self.width = low, span / self.bins
        else:
            self._widen(low, high)
        index = np.floor((values - self.origin) / self.width).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _widen(self, low: float, high: float) -> None:
        end = self.origin + self.bins * self.width
        if low >= self.origin and high <= end:
            return
        below = max(0.0, self.origin - low)
        above = max(0.0, high - end)
        factor = max(1, math.ceil((self.bins * self.width + below + above) / (self.bins * self.width)))
        while True:
            new_width = self.width * factor
            shift = math.ceil(below / new_width) if below > 0 else 0  # new bins added below the old origin
            new_origin = self.origin - shift * new_width
            if new_origin + self.bins * new_width >= high and self.bins - shift >= math.ceil(self.bins / factor):
                break
            factor += 1
        grouped = np.pad(self.counts, (0, (-self.bins) % factor)).reshape(-1, factor).sum(axis=1)
        counts = np.zeros(self.bins, dtype=np.float64)
        counts[shift : shift + len(grouped)] = grouped[: self.bins - shift]
        self.counts, self.origin, self.width = counts, new_origin, new_width

    # -- ranges -------------------------------------------------------------------------------------------

    def _edges(self) -> np.ndarray:
        return self.origin + self.width * np.arange(self.bins + 1)

    def _centers(self) -> np.ndarray:
        return self.origin + self.width * (np.arange(self.bins) + 0.5)

    def _cdf(self, points: np.ndarray) -> np.ndarray:
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        return np.interp(points, self._edges(), cumulative)

    def range(self, symmetric: bool) -> tuple[float, float]:
        """The range of this observer's method; "auto" alone gives min-max (its choice needs the
        consumers, see range_search.choose_ranges)."""
        return self.range_by("minmax" if self.method == "auto" else self.method, symmetric)

    def range_by(self, method: str, symmetric: bool, percentile: float | None = None) -> tuple[float, float]:
        """The range `method` picks from this histogram (`percentile` overrides the observer's)."""
        if not self.seen:
            return (0.0, 0.0)
        if method == "minmax" or self.low == self.high:
            return (self.low, self.high)
        if method == "percentile":
            return self._percentile_range(symmetric, self.percentile if percentile is None else percentile)
        if method == "entropy":
            return self._entropy_range(symmetric)
        if method == "mse":
            return self._mse_range(symmetric)
        raise OptionError(f"no range method '{method}' on a histogram", hint=f"choose from {', '.join(AUTO_CANDIDATES)}")

    def _percentile_range(self, symmetric: bool, percentile: float) -> tuple[float, float]:
        total = self.counts.sum()
        tail = total * (1.0 - percentile / 100.0)
        if symmetric:
            amax = max(abs(self.low), abs(self.high))
            thresholds = np.linspace(0.0, amax, 4097)
            outside = total - (self._cdf(thresholds) - self._cdf(-thresholds))
            t = float(thresholds[np.argmax(outside <= tail)])
            return (max(self.low, -t), min(self.high, t))
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        low, high = np.interp([tail, total - tail], cumulative, self._edges())
        low = max(self.low, min(float(low), 0.0)) if self.low < 0 else self.low
        return (low, min(self.high, max(float(high), 0.0)))

    def _folded(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| over [0, amax] with `bins` bins."""
        amax = max(abs(self.low), abs(self.high))
        edges = np.linspace(0.0, amax, self.bins + 1)
        mass = (self._cdf(edges[1:]) - self._cdf(edges[:-1])) + (self._cdf(-edges[:-1]) - self._cdf(-edges[1:]))
        return np.maximum(mass, 0.0), amax

    def _entropy_range(self, symmetric: bool) -> tuple[float, float]:
        """TensorRT's KL-divergence calibration on the |x| histogram (one-sided for non-negative data)."""
        one_sided = self.low >= 0.0
        hist, amax = self._folded()
        if one_sided:  # the spike of exact zeros after ReLU would otherwise pull the threshold down
            hist[0] = hist[1]
        levels = self.levels if one_sided else self.levels // 2
        best_kl, best_bin = math.inf, self.bins
        for stop in range(levels, self.bins + 1, max(1, self.bins // 256)):
            reference = hist[:stop].copy()
            reference[stop - 1] += hist[stop:].sum()
            if reference.sum() == 0:
                continue
            kept = hist[:stop]
            starts = (np.arange(levels) * stop) // levels
            sums = np.add.reduceat(kept, starts)
            nonzero = np.add.reduceat((kept > 0).astype(np.float64), starts)
            level_of_bin = np.repeat(np.arange(levels), np.diff(np.append(starts, stop)))
            expanded = np.where(kept > 0, (sums / np.maximum(nonzero, 1.0))[level_of_bin], 0.0)
            p = reference / reference.sum()
            q = expanded / max(expanded.sum(), 1e-30)
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best_kl, best_bin = kl, stop
        threshold = amax * best_bin / self.bins
        if one_sided:
            return (self.low, min(self.high, threshold))
        return (max(self.low, -threshold), min(self.high, threshold))

    def _mse_range(self, symmetric: bool) -> tuple[float, float]:
        """The clipping range that minimizes expected quantization MSE over the histogram."""
        centers, counts = self._centers(), self.counts
        levels = self.levels - 1
        best = (math.inf, (self.low, self.high))
        for fraction in np.geomspace(1e-3, 1.0, 161):
            if symmetric:
                amax = max(abs(self.low), abs(self.high)) * fraction
                low, high = -amax, amax
            else:
                low, high = min(self.low * fraction, 0.0), max(self.high * fraction, 0.0)
            step = (high - low) / levels
            if step <= 0:
                continue
            clipped = np.clip(centers, low, high)
            error = np.where(centers == clipped, step * step / 12.0, (centers - clipped) ** 2)
            mse = float(np.sum(counts * error))
            if mse < best[0]:
                best = (mse, (max(low, self.low), min(high, self.high)))
        return best[1]


class ChannelMinMaxObserver:
    """Running min and max of each channel on `axis` (a site with per-channel scales)."""

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None

    def observe(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        others = tuple(i for i in range(values.ndim) if i != self.axis)
        low, high = values.min(axis=others).astype(np.float64), values.max(axis=others).astype(np.float64)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    @property
    def seen(self) -> bool:
        return self.low is not None

    def range(self, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
        if self.low is None or self.high is None:
            return np.zeros(1), np.zeros(1)
        return self.low, self.high


Observer = MinMaxObserver | HistogramObserver | ChannelMinMaxObserver


def make_observer(method: str, percentile: float, levels: int) -> Observer:
    """Min-max needs no histogram; the other methods share one."""
    if method == "minmax":
        return MinMaxObserver()
    return HistogramObserver(method, percentile=percentile, levels=levels)
