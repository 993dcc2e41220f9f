"""Paired statistics for benchmark deltas: both models answer the same items, so the comparison is per item.

`paired_bootstrap` resamples items (not models) with a seeded numpy Generator: the same seed gives the same
interval. `mcnemar_exact` is the exact binomial McNemar test on the discordant pairs (items exactly one of the
two models gets right).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

BOOT_CHUNK = 1000  # resamples drawn at once (bounds memory at BOOT_CHUNK x items)


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
    p_mcnemar: float

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


def paired_delta(
    ref: Sequence[bool], cand: Sequence[bool], *, n_boot: int = 10_000, seed: int = 0
) -> PairedDelta:
    """Accuracies, the paired delta with its bootstrap 95 % interval, the 2x2 table and McNemar's p."""
    r, c = np.asarray(ref, dtype=bool), np.asarray(cand, dtype=bool)
    delta, low, high = paired_bootstrap(r, c, n_boot=n_boot, seed=seed)
    only_ref, only_cand = int((r & ~c).sum()), int((~r & c).sum())
    return PairedDelta(
        n=len(r),
        ref_acc=100 * float(r.mean()),
        cand_acc=100 * float(c.mean()),
        delta=delta,
        ci_low=low,
        ci_high=high,
        both=int((r & c).sum()),
        only_ref=only_ref,
        only_cand=only_cand,
        neither=int((~r & ~c).sum()),
        p_mcnemar=mcnemar_exact(only_ref, only_cand),
    )
