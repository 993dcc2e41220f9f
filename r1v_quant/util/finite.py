"""NaN / Inf checks for tensors read from checkpoints and tensors about to be written.

A non-finite weight never becomes a "valid" output: every reader of checkpoint tensors and every writer of
quantized or exported tensors calls `check_finite`, which names the tensor and its first bad element. The
scan runs in bounded chunks, so checking a 778 M-element embedding costs no 778 MB temporary.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from r1v_quant.util.errors import R1VError

CHUNK_ELEMENTS = 1 << 24


def first_nonfinite(t: torch.Tensor | np.ndarray) -> tuple[tuple[int, ...], float] | None:
    """Index and value of the first NaN / ±Inf in `t` (row-major order), or None when all are finite.

    Integer and boolean tensors are always finite.
    """
    if isinstance(t, np.ndarray):
        if not np.issubdtype(t.dtype, np.floating):
            return None
        flat_np = t.reshape(-1)
        for start in range(0, flat_np.size, CHUNK_ELEMENTS):
            bad = np.flatnonzero(~np.isfinite(flat_np[start : start + CHUNK_ELEMENTS]))
            if bad.size:
                k = start + int(bad[0])
                return _unravel(k, t.shape), float(flat_np[k])
        return None
    if not (t.is_floating_point() or t.is_complex()):
        return None
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        chunk = flat[start : start + CHUNK_ELEMENTS]
        ok = torch.isfinite(chunk)
        if not bool(ok.all()):
            k = start + int((~ok).nonzero()[0, 0])
            return _unravel(k, tuple(t.shape)), float(flat[k].float())
    return None


def _unravel(k: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return ()
    return tuple(int(i) for i in np.unravel_index(k, shape)) if math.prod(shape) else ()


def describe_value(v: float) -> str:
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")


def check_finite(t: torch.Tensor | np.ndarray, what: str, hint: str = "") -> None:
    """Raise one R1VError line naming `what` and its first non-finite element, if it has one."""
    bad = first_nonfinite(t)
    if bad is not None:
        index, value = bad
        raise R1VError(
            f"{what} holds {describe_value(value)} at index {list(index)} (its first non-finite value)"
            + (f"; {hint}" if hint else "")
        )
