"""`--device auto|cpu|cuda` for the streamed jobs (`calibrate`, `awq`): one resolution, one error."""

from __future__ import annotations

import torch

from r1v_quant.errors import R1VError


def resolve_device(device: str | torch.device) -> torch.device:
    """auto -> cuda when torch sees a CUDA device, else cpu; a cuda request without one is a user error."""
    if isinstance(device, torch.device):
        device = device.type
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise R1VError("--device cuda: no CUDA device is available to torch")
    if device not in ("cpu", "cuda"):
        raise R1VError(f"unknown --device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)
