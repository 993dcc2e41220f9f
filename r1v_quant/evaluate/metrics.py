"""Quality numbers the llama.cpp way: per-token KL divergence against the 16-bit model, top-token agreement,
Δp (change in the probability of the correct token), perplexity and its ratio. Pure functions of logits, so
every backend (torch, AWQ loader, llama.cpp) is scored alike.

Per-token values come from :func:`token_stats` (one window at a time, so a 152k vocabulary never has to be
held for a whole evaluation); :func:`summarize` turns the concatenated per-token values into the statistics
`llama-perplexity --kl-divergence` prints, with the same definitions (linear-interpolated percentiles,
standard errors of the mean, PPL ratio error from the paired per-token log-probability difference).
"""

from __future__ import annotations

import math

import torch

# Percentiles reported for Δp (llama-perplexity prints the same set).
DP_PERCENTILES = (0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


def token_kld(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_cand) per position; logits (..., vocab) -> (...)."""
    ref = torch.log_softmax(ref_logits.double(), -1)
    cand = torch.log_softmax(cand_logits.double(), -1)
    return (ref.exp() * (ref - cand)).sum(-1).clamp(min=0)


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of `targets` (...,) under `logits` (..., vocab), per position."""
    return -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]


def token_stats(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-position values (float64, flattened) that :func:`summarize` aggregates.

    Log-probabilities are accepted as logits (softmax is shift-invariant), so a stored reference
    `log_softmax` works as well as raw logits.
    """
    ref = torch.log_softmax(ref_logits.double(), -1).reshape(-1, ref_logits.shape[-1])
    cand = torch.log_softmax(cand_logits.double(), -1).reshape(-1, cand_logits.shape[-1])
    out = {
        "kld": (ref.exp() * (ref - cand)).sum(-1).clamp(min=0),
        "same_top": (ref.argmax(-1) == cand.argmax(-1)).double(),
    }
    if targets is not None:
        t = targets.reshape(-1, 1).long()
        lp_ref, lp_cand = ref.gather(-1, t)[:, 0], cand.gather(-1, t)[:, 0]
        out.update(nll_ref=-lp_ref, nll_cand=-lp_cand, dp=lp_cand.exp() - lp_ref.exp())
    return out


def _stderr(x: torch.Tensor) -> float:
    n = x.numel()
    return float(x.std() / math.sqrt(n)) if n > 1 else 0.0


def _q(x: torch.Tensor, pct: float) -> float:
    return float(torch.quantile(x, pct / 100)) if x.numel() <= 16_000_000 else _q_np(x, pct)


def _q_np(x: torch.Tensor, pct: float) -> float:
    # torch.quantile refuses inputs above 16M elements; numpy's default is the same linear interpolation
    import numpy as np

    return float(np.percentile(x.numpy(), pct))


def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """llama-perplexity --kl-divergence statistics over per-token values from :func:`token_stats`.

    Keys: tokens; kld_mean/_stderr/_median/_p99/_p999/_max/_min; same_top_pct/_stderr; with targets also
    ppl_ref/_stderr, ppl_cand/_stderr, ln_ppl_ratio/_stderr, ppl_ratio/_stderr, ppl_cor (correlation of
    the per-token log-likelihoods), dp_mean_pct/_stderr, dp_rms_pct/_stderr and dp_pNN_pct percentiles
    (Δp = p_cand(target) − p_ref(target), in percent), dp_min_pct, dp_max_pct.
    """
    k = stats["kld"].flatten().double()
    n = k.numel()
    if n == 0:
        raise ValueError("no scored tokens")
    same = stats["same_top"].flatten().double()
    p_same = float(same.mean())
    out: dict[str, float] = {
        "tokens": n,
        "kld_mean": float(k.mean()),
        "kld_stderr": _stderr(k),
        "kld_median": _q(k, 50),
        "kld_p99": _q(k, 99),
        "kld_p999": _q(k, 99.9),
        "kld_max": float(k.max()),
        "kld_min": float(k.min()),
        "same_top_pct": 100 * p_same,
        "same_top_stderr": 100 * math.sqrt(p_same * (1 - p_same) / (n - 1)) if n > 1 else 0.0,
    }
    if "nll_ref" not in stats:
        return out
    a, b = stats["nll_ref"].flatten().double(), stats["nll_cand"].flatten().double()
    d = b - a  # ln(PPL_cand / PPL_ref) is the mean of this paired difference
    ppl_ref, ppl_cand = math.exp(float(a.mean())), math.exp(float(b.mean()))
    ln_ratio = float(d.mean())
    cor = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if n > 1 and a.std() > 0 and b.std() > 0 else 1.0
    out.update(
        ppl_ref=ppl_ref,
        ppl_ref_stderr=ppl_ref * _stderr(a),
        ppl_cand=ppl_cand,
        ppl_cand_stderr=ppl_cand * _stderr(b),
        ppl_cor=cor,
        ln_ppl_ratio=ln_ratio,
        ln_ppl_ratio_stderr=_stderr(d),
        ppl_ratio=math.exp(ln_ratio),
        ppl_ratio_stderr=math.exp(ln_ratio) * _stderr(d),
    )
    dp = stats["dp"].flatten().double()
    rms = math.sqrt(float((dp * dp).mean()))
    # RMS error by the delta method: d sqrt(m) = dm / (2 sqrt(m)), m = mean(dp^2)
    rms_err = _stderr(dp * dp) / (2 * rms) if rms > 0 else 0.0
    out.update(dp_mean_pct=100 * float(dp.mean()), dp_mean_stderr=100 * _stderr(dp))
    out.update(dp_rms_pct=100 * rms, dp_rms_stderr=100 * rms_err)
    out.update(dp_min_pct=100 * float(dp.min()), dp_max_pct=100 * float(dp.max()))
    for p in DP_PERCENTILES:
        out[f"dp_p{p:g}_pct".replace(".", "_")] = 100 * _q(dp, p)
    return out


def concat_stats(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-token values of several windows, concatenated key by key."""
    if not parts:
        return {}
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def kld_summary(
    kld: torch.Tensor,
    ref_logits: torch.Tensor,
    cand_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
) -> dict[str, float]:
    """llama-perplexity --kl-divergence style statistics over the given positions (flattened)."""
    stats = token_stats(ref_logits, cand_logits, targets)
    stats["kld"] = kld.flatten().double()
    return summarize(stats)
