"""Paired statistics for benchmark deltas: both models answer the same items, so the comparison is per item.

An item's score is its accuracy over the k samples answered for it (0 or 1 when k = 1). `paired_bootstrap`
resamples items (not models) with a seeded numpy Generator: the same seed gives the same interval.
`mcnemar_exact` is the exact binomial McNemar test on the discordant pairs (items exactly one of the two
models gets right); with k > 1 the same exact test counts the items either model scores higher on (the
sign test). `detectable_drop` is the smallest true delta the run has 80 % power to find at two-sided 5 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

BOOT_CHUNK = 1000  # resamples drawn at once (bounds memory at BOOT_CHUNK x items)


Z_95, Z_80 = 1.959964, 0.841621  # two-sided 5 % and 80 % power


@dataclass(frozen=True)
class PairedDelta:
    n: int
    ref_acc: float  # percent
    cand_acc: float
    delta: float  # cand - ref, percentage points
    ci_low: float
    ci_high: float
    both: int  # right in both
    only_ref: int  # discordant: right only in the reference
    only_cand: int
    neither: int
    p_mcnemar: float  # exact McNemar (k = 1) / sign test over items (k > 1)
    detectable: float = 0.0  # points: the smallest delta this n and k resolve (see detectable_drop)

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def paired_bootstrap(
    ref: Sequence[bool],
    cand: Sequence[bool],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(delta, low, high): accuracy difference cand − ref in points and its percentile bootstrap interval."""
    r, c = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if r.shape != c.shape or r.ndim != 1:
        raise ValueError("paired results must be two 1-D sequences of the same length")
    n = len(r)
    if n == 0:
        raise ValueError("no items")
    d = 100 * (c - r)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, BOOT_CHUNK):
        k = min(BOOT_CHUNK, n_boot - start)
        means[start : start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(d.mean()), float(low), float(high)


def mcnemar_exact(only_ref: int, only_cand: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven) under Binomial(b + c, 1/2)."""
    n = only_ref + only_cand
    if n == 0:
        return 1.0
    k = min(only_ref, only_cand)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)  # exact, no float underflow
    return float(min(Fraction(1), 2 * tail))


def detectable_drop(diffs: Sequence[float], k: int = 1) -> float:
    """Points: the smallest true delta a paired test of these n items (k samples each) detects with 80 %
    power at two-sided 5 %: (z.975 + z.80) * sd / sqrt(n), with sd the per-item differences' spread in
    points, but never below what a run that saw no disagreement could rule out (3 / (n k) of the answers
    differing, the rule of three). So a small run that happens to agree everywhere still reports its limit."""
    d = 100 * np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("no items")
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    floor = 100 * math.sqrt(3 / n) / k
    return (Z_95 + Z_80) * max(sd, floor) / math.sqrt(n)


def paired_delta(
    ref: Sequence[float], cand: Sequence[float], *, n_boot: int = 10_000, seed: int = 0, k: int = 1
) -> PairedDelta:
    """Accuracies, the paired delta with its bootstrap 95 % interval, the per-item table (an item is
    "right" for a model when it scores higher than the other, "both" / "neither" on a tie at 1 / below 1),
    the exact test's p and the detectable delta. Scores are 0/1 per item, or accuracies over k samples."""
    r, c = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    delta, low, high = paired_bootstrap(r, c, n_boot=n_boot, seed=seed)
    only_ref, only_cand = int((r > c).sum()), int((c > r).sum())
    tie = r == c
    return PairedDelta(
        n=len(r),
        ref_acc=100 * float(r.mean()),
        cand_acc=100 * float(c.mean()),
        delta=delta,
        ci_low=low,
        ci_high=high,
        both=int((tie & (r == 1)).sum()),
        only_ref=only_ref,
        only_cand=only_cand,
        neither=int((tie & (r < 1)).sum()),
        p_mcnemar=mcnemar_exact(only_ref, only_cand),
        detectable=detectable_drop(c - r, k),
    )
