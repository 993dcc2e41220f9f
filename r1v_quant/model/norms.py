"""RMSNorm as both InternViT (InternRMSNorm) and Qwen2 compute it."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalised in float32, weight applied in the input dtype (identical in InternViT and Qwen2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
