"""Paired bootstrap and exact McNemar test: determinism under a seed and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from r1v_quant.evaluate.stats_tests import mcnemar_exact, paired_bootstrap, paired_delta


def _pairs(seed: int = 0, n: int = 120) -> tuple[list[bool], list[bool]]:
    r = np.random.default_rng(seed)
    ref = r.random(n) < 0.7
    cand = np.where(r.random(n) < 0.85, ref, ~ref)
    return ref.tolist(), cand.tolist()


def test_bootstrap_is_deterministic_under_a_seed() -> None:
    ref, cand = _pairs()
    a = paired_bootstrap(ref, cand, n_boot=3000, seed=7)
    b = paired_bootstrap(ref, cand, n_boot=3000, seed=7)
    c = paired_bootstrap(ref, cand, n_boot=3000, seed=8)
    assert a == b
    assert a[0] == c[0] and (a[1], a[2]) != (c[1], c[2])  # same delta, different resamples
    # the chunked draw gives the same interval as one big draw with the same generator
    d = 100 * (np.asarray(cand, float) - np.asarray(ref, float))
    g = np.random.default_rng(7)
    means = d[g.integers(0, len(d), size=(3000, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert a[1] == pytest.approx(lo, abs=1e-12) and a[2] == pytest.approx(hi, abs=1e-12)


def test_bootstrap_interval_contains_delta_and_is_zero_when_identical() -> None:
    ref, cand = _pairs(1)
    delta, lo, hi = paired_bootstrap(ref, cand, seed=0)
    assert lo <= delta <= hi
    assert delta == pytest.approx(100 * (sum(cand) - sum(ref)) / len(ref))
    assert paired_bootstrap(ref, ref, seed=0) == (0.0, 0.0, 0.0)


def test_mcnemar_exact_by_hand() -> None:
    # b=1, c=5: n=6, P(X<=1) = (1 + 6) / 64, two-sided = 14/64
    assert mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact(5, 1) == mcnemar_exact(1, 5)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0  # capped at 1
    # b=0, c=10: 2 / 2^10
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    # large counts stay exact (no float underflow): 2 * P(X <= 400) for n = 2000
    p = mcnemar_exact(400, 1600)
    assert 0 < p < 1e-150
    logs = [
        math.lgamma(2001) - math.lgamma(k + 1) - math.lgamma(2001 - k) - 2000 * math.log(2)
        for k in range(401)
    ]
    top = max(logs)
    log_p = math.log(2) + top + math.log(sum(math.exp(x - top) for x in logs))
    assert math.log(p) == pytest.approx(log_p, rel=1e-9)


def test_paired_delta_table() -> None:
    ref = [True, True, True, False, False, True, False, True]
    cand = [True, False, True, True, False, False, False, True]
    d = paired_delta(ref, cand, n_boot=500, seed=0)
    assert (d.both, d.only_ref, d.only_cand, d.neither) == (3, 2, 1, 2)
    assert d.ref_acc == 62.5 and d.cand_acc == 50.0 and d.delta == -12.5
    assert d.p_mcnemar == pytest.approx(mcnemar_exact(2, 1)) == 1.0
    assert d.ci_low <= d.delta <= d.ci_high
