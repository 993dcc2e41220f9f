"""KL divergence, perplexity and top-token agreement against hand computations."""

from __future__ import annotations

import math

import torch

from r1v_quant.evaluate.metrics import concat_stats, kld_summary, nll, summarize, token_kld, token_stats


def test_kld_by_hand() -> None:
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    got = token_kld(p.log()[None], q.log()[None] + 3.0)  # logits are shift-invariant
    assert abs(float(got[0]) - expected) < 1e-12
    assert float(token_kld(p.log()[None], p.log()[None])[0]) == 0.0


def test_summary_and_perplexity() -> None:
    ref = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float64))
    cand = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]], dtype=torch.float64))
    targets = torch.tensor([0, 1])
    s = kld_summary(token_kld(ref, cand), ref, cand, targets)
    assert s["tokens"] == 2 and s["same_top_pct"] == 50.0
    assert abs(s["ppl_ref"] - math.exp(-(math.log(0.7) + math.log(0.8)) / 2)) < 1e-9
    assert abs(s["ppl_cand"] - math.exp(-(math.log(0.6) + math.log(0.4)) / 2)) < 1e-9
    assert abs(float(nll(ref, targets)[1]) + math.log(0.8)) < 1e-12


def test_token_stats_and_summary_by_hand() -> None:
    """Four positions with known distributions: every statistic recomputed with plain Python."""
    p_ref = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.25, 0.5, 0.25]]
    p_cand = [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [0.25, 0.5, 0.25]]
    targets = [0, 1, 2, 0]
    ref = torch.tensor(p_ref, dtype=torch.float64).log() * 1.0
    cand = torch.tensor(p_cand, dtype=torch.float64).log() - 7.0  # shifted logits: same distribution
    s = summarize(token_stats(ref, cand, torch.tensor(targets)))

    kl = [
        sum(p * math.log(p / q) for p, q in zip(a, b, strict=True))
        for a, b in zip(p_ref, p_cand, strict=True)
    ]
    dp = [p_cand[i][t] - p_ref[i][t] for i, t in enumerate(targets)]
    nr = [-math.log(p_ref[i][t]) for i, t in enumerate(targets)]
    nc = [-math.log(p_cand[i][t]) for i, t in enumerate(targets)]
    n = 4
    mean = sum(kl) / n
    sd = math.sqrt(sum((k - mean) ** 2 for k in kl) / (n - 1))
    srt = sorted(kl)
    assert s["tokens"] == 4
    assert abs(s["kld_mean"] - mean) < 1e-12
    assert abs(s["kld_stderr"] - sd / 2) < 1e-12
    assert abs(s["kld_median"] - (srt[1] + srt[2]) / 2) < 1e-12
    # linear interpolation between the two largest values at rank 0.99 * 3 = 2.97
    assert abs(s["kld_p99"] - (srt[2] + 0.97 * (srt[3] - srt[2]))) < 1e-12
    assert abs(s["kld_max"] - max(kl)) < 1e-12 and abs(s["kld_min"]) < 1e-15  # position 4: same distribution
    # top tokens: [0 vs 0], [1 vs 0], [2 vs 2], [1 vs 1] -> 3 of 4 agree
    assert s["same_top_pct"] == 75.0
    assert abs(s["same_top_stderr"] - 100 * math.sqrt(0.75 * 0.25 / 3)) < 1e-12
    assert abs(s["dp_mean_pct"] - 100 * sum(dp) / n) < 1e-12
    assert abs(s["dp_rms_pct"] - 100 * math.sqrt(sum(d * d for d in dp) / n)) < 1e-12
    assert abs(s["dp_min_pct"] - 100 * min(dp)) < 1e-12 and abs(s["dp_max_pct"] - 100 * max(dp)) < 1e-12
    assert abs(s["dp_p50_pct"] - 100 * sorted(dp)[1] * 0.5 - 100 * sorted(dp)[2] * 0.5) < 1e-12
    ppl_r, ppl_c = math.exp(sum(nr) / n), math.exp(sum(nc) / n)
    assert abs(s["ppl_ref"] - ppl_r) < 1e-12 and abs(s["ppl_cand"] - ppl_c) < 1e-12
    assert abs(s["ppl_ratio"] - ppl_c / ppl_r) < 1e-12
    d = [c - r for c, r in zip(nc, nr, strict=True)]
    dm = sum(d) / n
    d_err = math.sqrt(sum((x - dm) ** 2 for x in d) / (n - 1)) / 2
    assert abs(s["ln_ppl_ratio_stderr"] - d_err) < 1e-12
    assert abs(s["ppl_ratio_stderr"] - ppl_c / ppl_r * d_err) < 1e-12


def test_summary_of_identical_models_is_zero() -> None:
    logits = torch.randn(50, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (50,), generator=torch.Generator().manual_seed(1))
    s = summarize(token_stats(logits, logits.clone(), targets))
    assert s["kld_mean"] < 1e-15 and s["kld_max"] < 1e-15
    assert s["same_top_pct"] == 100.0 and s["ppl_ratio"] == 1.0
    assert s["dp_rms_pct"] == 0.0 and abs(s["ppl_cor"] - 1.0) < 1e-12


def test_concat_stats_equals_one_pass() -> None:
    g = torch.Generator().manual_seed(3)
    ref, cand = torch.randn(30, 7, generator=g), torch.randn(30, 7, generator=g)
    t = torch.randint(0, 7, (30,), generator=g)
    whole = summarize(token_stats(ref, cand, t))
    parts = summarize(
        concat_stats([token_stats(ref[:11], cand[:11], t[:11]), token_stats(ref[11:], cand[11:], t[11:])])
    )
    assert whole.keys() == parts.keys()
    for k in whole:
        assert abs(whole[k] - parts[k]) < 1e-12, k
