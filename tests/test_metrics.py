"""KL divergence, perplexity and top-token agreement against hand computations."""

from __future__ import annotations

import math

import torch

from r1v_quant.metrics import kld_summary, nll, token_kld


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
