"""Quality numbers the llama.cpp way: per-token KL divergence against the 16-bit model, top-token agreement,
perplexity. Pure functions of logits, so every backend (torch, AWQ loader, llama.cpp) is scored alike.
"""

from __future__ import annotations

import math

import torch


def token_kld(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_cand) per position; logits (..., vocab) -> (...)."""
    ref = torch.log_softmax(ref_logits.double(), -1)
    cand = torch.log_softmax(cand_logits.double(), -1)
    return (ref.exp() * (ref - cand)).sum(-1).clamp(min=0)


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of `targets` (...,) under `logits` (..., vocab), per position."""
    return -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]


def kld_summary(
    kld: torch.Tensor,
    ref_logits: torch.Tensor,
    cand_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
) -> dict[str, float]:
    """llama-perplexity --kl-divergence style statistics over the given positions (flattened)."""
    k = kld.flatten().double()
    n = k.numel()
    same = (ref_logits.argmax(-1) == cand_logits.argmax(-1)).flatten().double()
    out = {
        "tokens": n,
        "kld_mean": float(k.mean()),
        "kld_stderr": float(k.std() / math.sqrt(n)) if n > 1 else 0.0,
        "kld_median": float(k.median()),
        "kld_p99": float(torch.quantile(k, 0.99)),
        "kld_p999": float(torch.quantile(k, 0.999)),
        "kld_max": float(k.max()),
        "same_top_pct": 100 * float(same.mean()),
    }
    if targets is not None:
        ppl_ref = math.exp(float(nll(ref_logits, targets).mean()))
        ppl_cand = math.exp(float(nll(cand_logits, targets).mean()))
        out.update(ppl_ref=ppl_ref, ppl_cand=ppl_cand, ppl_ratio=ppl_cand / ppl_ref)
    return out
