"""The statistics of a report: Student t quantiles, the 95 % logit-t interval of a mean accuracy, t-intervals
of mean differences and log ratios, the paired t-test, the exact sign-flip permutation test and Holm's correction.

A mean accuracy over n >= 3 seeds gets the 95 % logit-t interval of the mean: the Student-t interval of the mean
of logit(accuracy), mapped back to %. It stays inside (0, 100) and is asymmetric near the bounds, where
accuracies pile up; far from them it is the usual t-interval. A t-interval on the % scale leaves the range
(clipping it only hides that its model is wrong there), and a bootstrap percentile interval over 3 seeds cannot
reach beyond the observed values and covers far less than 95 %. An accuracy of exactly 0 or 100 % enters the
logit half a test sample inside the range. With fewer than 3 seeds no interval is given.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

MIN_SEEDS_FOR_CI = 3
ALPHA = 0.05  # family-wise level of the leaderboard's significance column (Holm over its comparisons)
CI_KIND = "95 % logit-t CI"  # how every table and figure names the interval of a mean accuracy
DIFF_CI_KIND = "95 % paired t CI"  # the interval of a mean paired difference
DEFAULT_TEST_SIZE = 10_000  # for the logit of an exact 0 / 100 % when the store does not record the test size
EXACT_SIGN_FLIPS = 16  # enumerate all 2^n sign vectors up to this many pairs; sample beyond


def t_quantile(n) -> np.ndarray:
    """The 97.5 % quantile of Student's t with n - 1 degrees of freedom (NaN for n < 2)."""
    from scipy.special import stdtrit  # inverse t CDF; scipy.stats would add a second of import time

    n = np.asarray(n, float)
    with np.errstate(invalid="ignore"):
        return np.where(n >= 2, stdtrit(np.maximum(n - 1, 1), 0.975), np.nan)


def logit_scale(acc, test_size=DEFAULT_TEST_SIZE) -> np.ndarray:
    """logit of accuracies given in %; exact 0 or 100 % moves half a test sample inside the range."""
    half = 0.5 / np.asarray(test_size, float)
    p = np.clip(np.asarray(acc, float) / 100, half, 1 - half)
    return np.log(p) - np.log1p(-p)


def logit_t_bounds(mean_logit, std_logit, n) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % t-interval of the mean on the logit scale, mapped back to % (NaN below MIN_SEEDS_FOR_CI)."""
    from scipy.special import expit

    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = t_quantile(n) * np.asarray(std_logit, float) / np.sqrt(n)
    ok = n >= MIN_SEEDS_FOR_CI
    return (np.where(ok, 100 * expit(mean_logit - half), np.nan), np.where(ok, 100 * expit(mean_logit + half), np.nan))


def logit_t(values, test_size=DEFAULT_TEST_SIZE, axis: int = 0):
    """Mean, 95 % logit-t interval (lo, hi) and n of accuracies (%) along `axis`, ignoring NaN."""
    v = np.asarray(values, float)
    logits = np.where(np.isfinite(v), logit_scale(np.nan_to_num(v), test_size), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty or single-value slices give NaN, as they should
        n = np.isfinite(v).sum(axis)
        lo, hi = logit_t_bounds(np.nanmean(logits, axis), np.nanstd(logits, axis, ddof=1), n)
        return np.nanmean(v, axis), lo, hi, n


def t_bounds(mean, std, n) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % t-interval of a mean (of paired differences, of log ratios); NaN below MIN_SEEDS_FOR_CI."""
    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n >= MIN_SEEDS_FOR_CI, t_quantile(n) * np.asarray(std, float) / np.sqrt(n), np.nan)
    return mean - half, mean + half


def paired_t_p(diffs) -> float:
    """Two-sided p of the paired t-test (one-sample t on the differences); NaN for fewer than 2 pairs."""
    from scipy.special import stdtr

    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return math.nan
    mean, std = float(d.mean()), float(d.std(ddof=1))
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stdtr(d.size - 1, -abs(mean) / (std / math.sqrt(d.size))))


def sign_flip_p(diffs, draws: int = 20_000, seed: int = 0) -> float:
    """Two-sided p of the sign-flip permutation test of zero mean difference: the share of sign vectors s whose
    |sum(s * d)| is at least the observed |sum(d)|. Exact (all 2^n vectors) for n <= EXACT_SIGN_FLIPS, else
    `draws` random vectors with the usual +1 correction. With n pairs the smallest p is 2 / 2^n."""
    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    reach = abs(d.sum()) - 1e-9 * max(1.0, np.abs(d).sum())  # as extreme as observed, up to rounding
    if d.size <= EXACT_SIGN_FLIPS:
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        return float((np.abs(signs @ d) >= reach).mean())
    rng, hits = np.random.default_rng(seed), 0
    for start in range(0, draws, 10_000):  # in blocks: bounded memory for many pairs
        signs = 2.0 * rng.integers(0, 2, size=(min(10_000, draws - start), d.size)) - 1
        hits += int((np.abs(signs @ d) >= reach).sum())
    return (hits + 1) / (draws + 1)


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries ignored and kept): the i-th smallest of m is
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out
