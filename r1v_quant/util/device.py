"""`--device` / `--torch-device auto|cpu|cuda[:N]`: one resolution and one error for every command that
places torch work (calibrate, awq, eval, check, chat)."""

from __future__ import annotations

import torch

from r1v_quant.util.errors import R1VError


def resolve_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """auto -> cuda when torch sees a CUDA device, else cpu; a cuda request without one is a user error.
    `option` names the flag in the error messages."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev: torch.device | None = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise R1VError(f"unknown {option} {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise R1VError(f"{option} {name}: no CUDA device is available to torch")
    return dev
