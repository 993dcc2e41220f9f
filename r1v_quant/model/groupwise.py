"""Group-wise asymmetric integer quantization (AWQ's w4 g128 scheme), shared by search, packing and loading.

Scales are rounded to fp16 *before* the integers are computed, because fp16 is what the AutoAWQ format
stores: fake-quant, packed checkpoint and loader then agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1v_quant.util.errors import R1VError


@dataclass
class QuantizedWeight:
    """A Linear weight [out, in] as integers with per (row, group) scale and zero point."""

    q: torch.Tensor  # uint8 [out, in], values 0 .. 2^bits-1
    scales: torch.Tensor  # fp16 [out, in / group]
    zeros: torch.Tensor  # uint8 [out, in / group]
    group_size: int
    bits: int = 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.q.shape
        g = self.group_size
        q = self.q.to(torch.float32).reshape(out, inp // g, g)
        w = (q - self.zeros.to(torch.float32)[..., None]) * self.scales.to(torch.float32)[..., None]
        return w.reshape(out, inp).to(dtype)


def check_group(in_features: int, group_size: int, name: str = "layer") -> None:
    if group_size <= 0 or in_features % group_size:
        raise R1VError(f"group size {group_size} does not divide {name} input size {in_features}")


def quantize_weight(
    w: torch.Tensor,
    group_size: int = 128,
    bits: int = 4,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Asymmetric min/max quantization per group of `group_size` input columns.

    `clip_max`/`clip_min` ([out, in/group]) replace each group's range (AWQ's clipping search result).
    """
    out, inp = w.shape
    check_group(inp, group_size)
    g = w.detach().to(torch.float32).reshape(out, inp // group_size, group_size)
    wmax = g.amax(-1) if clip_max is None else clip_max.to(torch.float32)
    wmin = g.amin(-1) if clip_min is None else clip_min.to(torch.float32)
    scales, q, zeros = _quantize_groups(g, wmax, wmin, bits)
    return QuantizedWeight(
        q.reshape(out, inp).to(torch.uint8), scales, zeros.to(torch.uint8), group_size, bits
    )


def _quantize_groups(
    g: torch.Tensor, wmax: torch.Tensor, wmin: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp16 scales, integer codes as float, zeros as float) for groups g [..., gs] with ranges [...]."""
    qmax = 2**bits - 1
    scales = ((wmax - wmin).clamp(min=1e-5) / qmax).to(torch.float16)
    s = scales.to(torch.float32)
    zeros = torch.clamp(torch.round(-wmin / s), 0, qmax)
    q = torch.clamp(torch.round(g / s[..., None]) + zeros[..., None], 0, qmax)
    return scales, q, zeros


def fake_quantize_ranges(
    g: torch.Tensor, wmax: torch.Tensor, wmin: torch.Tensor, bits: int = 4
) -> torch.Tensor:
    """Dequantized fp32 groups for many candidate ranges at once: g [..., groups, gs] is clamped to each
    [wmin, wmax] ([..., groups], broadcast against g) and quantized exactly as `quantize_weight` with
    clip_max/clip_min would (same operations, so the same bits); used by the vectorised clip search."""
    g = torch.maximum(torch.minimum(g, wmax[..., None]), wmin[..., None]).to(torch.float32)
    scales, q, zeros = _quantize_groups(g, wmax.to(torch.float32), wmin.to(torch.float32), bits)
    return (q - zeros[..., None]) * scales.to(torch.float32)[..., None]


def fake_quantize(
    w: torch.Tensor, group_size: int = 128, bits: int = 4, **clip: torch.Tensor
) -> torch.Tensor:
    """Quantize then dequantize, in w's dtype: what the int4 model computes with."""
    return quantize_weight(w, group_size, bits, **clip).dequantize(w.dtype)
