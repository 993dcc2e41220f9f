"""What the quality benchmarks share: the model they measure (a given checkpoint, else a freshly built tiny
replica) and KL divergence against the 16-bit model per held-out window kind (r1v_quant.data.evalset).

Imported by the scripts beside it (`python bench/NAME.py` puts this folder on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import torch

from r1v_quant.data.evalset import Window, heldout_windows, window_logits
from r1v_quant.evaluate.metrics import kld_summary, token_kld
from r1v_quant.model.reference import R1VModel

KINDS = ("text", "image")


def model_or_tiny(model: Path | None, tmp: Path) -> Path:
    """`model`, or the tiny replica built under `tmp` when none is given (a benchmark needs no download)."""
    if model is not None:
        return model
    from r1v_quant.replica.build import TinyOptions, build_tiny

    build_tiny(tmp / "tiny", TinyOptions())
    return tmp / "tiny"


def reference(model_dir: Path, n_eval: int) -> tuple[R1VModel, list[Window], list[torch.Tensor]]:
    """The 16-bit model, `n_eval` held-out text and image-answer windows, and its logits on them."""
    model = R1VModel.from_checkpoint(model_dir)
    windows = heldout_windows(model_dir, model.spec, n_eval, n_eval)
    return model, windows, window_logits(model, windows)


def kld_by_kind(ref: list[torch.Tensor], cand: list[torch.Tensor], windows: list[Window]) -> dict[str, dict]:
    """KLD summary of candidate vs reference logits over each window kind's tokens (kinds without windows
    are left out)."""
    out = {}
    for kind in KINDS:
        idx = [i for i, w in enumerate(windows) if w.kind == kind]
        if not idx:
            continue
        r = torch.cat([ref[i] for i in idx])
        c = torch.cat([cand[i] for i in idx])
        out[kind] = kld_summary(token_kld(r, c), r, c)
    return out
