"""The budgeted curve, once: every number derived from a trial's operating points comes from here, for one
trial (the trial summary, `exitbench budget`) and for thousands at once (the reports).

A trial's operating points are (MACs, accuracy %) pairs: the 39 budgets' (expected MACs, test top-1) and each
exit run alone for every sample (cumulative MACs, anytime top-1). Its budgeted curve is their monotone upper
envelope (a point survives only if it beats every cheaper one), linear between envelope points (routing a
random share of samples through either of two operating points reaches any point between them), flat beyond
the dearest point (spare budget is not spent) and undefined below the cheapest (nothing spends less than exit 1).
`Curves` holds many such envelopes as padded arrays; the per-trial functions below are its one-row case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.errors import UsageError

Curve = Sequence[tuple[float, float]]  # (MACs, accuracy %) points of one trial


@dataclass
class Curves:
    """Budgeted curves of many trials as padded envelope arrays: row i holds the envelope of trial ids[i] in
    columns 0..count[i]-1 (MACs increasing, accuracy strictly increasing), then MACs inf and accuracy NaN.
    Every operation works on all rows at once, so a report's cost grows linearly with its trials."""

    ids: pd.Index
    macs: np.ndarray  # [N, P]
    acc: np.ndarray  # [N, P]
    count: np.ndarray  # [N]

    @classmethod
    def envelopes(cls, trial_ids, macs, acc, ids=None) -> Curves:
        """Envelopes of long-form operating points (trial id, MACs, accuracy), one row per id of `ids`."""
        trial_ids = np.asarray(trial_ids, dtype=object)
        ids = pd.Index(pd.unique(trial_ids) if ids is None else ids, name="trial_id")
        code = pd.Categorical(trial_ids, categories=ids).codes.astype(np.int64)
        macs, acc = np.asarray(macs, float), np.asarray(acc, float)
        ok = np.isfinite(macs) & np.isfinite(acc) & (code >= 0)
        code, macs, acc = code[ok], macs[ok], acc[ok]
        order = np.lexsort((-acc, macs, code))  # per trial by MACs; at equal MACs the best accuracy first
        code, macs, acc = code[order], macs[order], acc[order]
        running = pd.Series(acc).groupby(code).cummax().to_numpy()
        first = np.r_[True, code[1:] != code[:-1]] if code.size else np.zeros(0, bool)
        best_before = np.where(first, -np.inf, np.r_[-np.inf, running[:-1]])
        keep = acc > best_before  # a point survives only if it beats every cheaper one of its trial
        code, macs, acc = code[keep], macs[keep], acc[keep]
        count = np.bincount(code, minlength=len(ids))
        position = np.arange(code.size) - np.r_[0, np.cumsum(count)[:-1]][code]
        width = max(int(count.max(initial=0)), 1)
        out_macs, out_acc = np.full((len(ids), width), np.inf), np.full((len(ids), width), np.nan)
        out_macs[code, position], out_acc[code, position] = macs, acc
        return cls(ids, out_macs, out_acc, count)

    def take(self, trial_ids) -> Curves:
        rows = self.ids.get_indexer(pd.Index(trial_ids))
        if (rows < 0).any():
            raise KeyError(f"no curve for trial {list(pd.Index(trial_ids)[rows < 0])[:3]}")
        return Curves(self.ids[rows], self.macs[rows], self.acc[rows], self.count[rows])

    def points(self, trial_id) -> tuple[np.ndarray, np.ndarray]:
        """One trial's envelope points (MACs, accuracy)."""
        i = self.ids.get_loc(trial_id)
        return self.macs[i, : self.count[i]], self.acc[i, : self.count[i]]

    def _take(self, values: np.ndarray, idx: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        return np.take_along_axis(values[rows], idx, axis=1)

    def at(self, q) -> np.ndarray:
        """Accuracy reachable with q MACs, row by row (q: [N] or [N, G]); NaN below the cheapest point."""
        q = np.asarray(q, float)
        grid = q.reshape(len(self.ids), -1)
        out = np.full(grid.shape, np.nan)
        last = self.count - 1
        chunk = max(1, 4_000_000 // max(1, grid.shape[1] * self.macs.shape[1]))  # bounds the [n, G, P] temporary
        for lo in range(0, len(grid), chunk):
            rows = slice(lo, lo + chunk)
            qq = grid[rows]
            i = (self.macs[rows][:, None, :] <= qq[:, :, None]).sum(-1) - 1  # last envelope point at or below q
            i0 = np.clip(i, 0, None)
            i1 = np.clip(np.minimum(i + 1, last[rows][:, None]), 0, None)
            x0, x1 = self._take(self.macs, i0, rows), self._take(self.macs, i1, rows)
            y0, y1 = self._take(self.acc, i0, rows), self._take(self.acc, i1, rows)
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(x1 > x0, (qq - x0) / (x1 - x0), 0.0)
            out[rows] = np.where(i < 0, np.nan, y0 + share * (y1 - y0))
        return out.reshape(q.shape)

    def top(self) -> np.ndarray:
        """The highest accuracy of each curve (its last envelope point)."""
        i = np.clip(self.count - 1, 0, None)
        return np.where(self.count > 0, self.acc[np.arange(len(self.ids)), i], np.nan)

    def macs_to_reach(self, target) -> np.ndarray:
        """Fewest MACs at which each curve reaches its target accuracy (NaN if it never does)."""
        target = np.broadcast_to(np.asarray(target, float), (len(self.ids),))
        j = (self.acc < target[:, None]).sum(1)  # first envelope point at or above the target
        jj = np.clip(j, 0, self.macs.shape[1] - 1)[:, None]
        jp = np.clip(j - 1, 0, None)[:, None]
        m1, a1 = self._take(self.macs, jj)[:, 0], self._take(self.acc, jj)[:, 0]
        m0, a0 = self._take(self.macs, jp)[:, 0], self._take(self.acc, jp)[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(j == 0, m1, m0 + (target - a0) / (a1 - a0) * (m1 - m0))
        return np.where(np.isfinite(target) & (j < self.count), value, np.nan)

    def mean_over(self, lo, hi) -> np.ndarray:
        """Mean accuracy of each curve over [lo, hi] MACs (exact for the piecewise-linear curve)."""
        lo, hi = (np.broadcast_to(np.asarray(v, float), (len(self.ids),))[:, None] for v in (lo, hi))
        xs = np.concatenate([lo, np.clip(self.macs, lo, hi), hi], axis=1)  # padding (inf) collapses onto hi
        ys = self.at(xs)
        area = np.sum((ys[:, 1:] + ys[:, :-1]) / 2 * np.diff(xs, axis=1), axis=1)
        width = (hi - lo)[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(width > 0, area / width, self.at(lo[:, 0]))


# ------------------------------------------------------------------------------------------- one trial

def budget_curve(budgets: list[dict], anytime_rows: list[dict] | None = None) -> list[tuple[float, float]]:
    """(expected MACs, test accuracy) of the budgets, plus, given the anytime rows, every exit on its own
    (sending all samples to exit k is a policy too; exits 1 and K are the protocol's limits q -> 0 and
    q -> infinity), so the curve spans exit 1's to exit K's MACs."""
    points = [(float(b["expected_macs"]), float(b["test_acc"])) for b in budgets]
    points += [(float(row["macs"]), float(row["top1"])) for row in anytime_rows or ()]
    return points


def one_curve(curve: Curve) -> Curves:
    """One trial's points as a one-row Curves."""
    points = list(curve)
    return Curves.envelopes(["trial"] * len(points), [m for m, _ in points], [a for _, a in points], ids=["trial"])


def _value(x) -> float | None:
    return None if np.isnan(x) else float(x)


def envelope(curve: Curve) -> list[tuple[float, float]]:
    """Monotone upper envelope: the points no cheaper point matches or beats, by increasing MACs."""
    macs, acc = one_curve(curve).points("trial")
    return [(float(m), float(a)) for m, a in zip(macs, acc)]


def acc_at(curve: Curve | Curves, macs: float) -> float | None:
    """Accuracy the curve reaches within `macs` (linear between envelope points, flat after the last);
    None below the cheapest point."""
    curves = curve if isinstance(curve, Curves) else one_curve(curve)
    return _value(curves.at([float(macs)])[0])


def macs_to_reach(curve: Curve | Curves, acc: float) -> float | None:
    """The fewest MACs at which the curve's envelope first reaches accuracy `acc`; None if it never does."""
    curves = curve if isinstance(curve, Curves) else one_curve(curve)
    return _value(curves.macs_to_reach([float(acc)])[0])


def speedup_at_equal_accuracy(curve: Curve, baseline_curve: Curve, acc: float) -> float | None:
    """How many times fewer MACs `curve` needs than `baseline_curve` to reach `acc`; None if either never does."""
    ours, theirs = macs_to_reach(curve, acc), macs_to_reach(baseline_curve, acc)
    if ours is None or theirs is None or ours <= 0:
        return None
    return theirs / ours


def area_under(curve: Curve | Curves, low: float, high: float) -> float:
    """Mean accuracy (%) of the envelope over [low, high] MACs: the exact area of the piecewise-linear
    envelope divided by (high - low)."""
    curves = curve if isinstance(curve, Curves) else one_curve(curve)
    if not high > low:
        raise UsageError(f"AUC range [{low}, {high}] is empty; need low < high")
    start = float(curves.macs[0, 0]) if curves.count[0] else float("nan")
    if not curves.count[0] or low < start:
        raise UsageError(f"AUC range starts at {low:g} MACs, below the curve's cheapest point {start:g}; "
                         f"start the range at or above it")
    return float(curves.mean_over([float(low)], [float(high)])[0])
