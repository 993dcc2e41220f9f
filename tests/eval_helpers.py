"""Shared helpers of the eval / check tests: perturbed copies of the tiny replica (never written in place)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LM_HEAD = "language_model.lm_head.weight"


def perturbed_copy(src: Path, dst: Path, *, noise: float, seed: int = 0, tensor: str = LM_HEAD) -> Path:
    """A copy of checkpoint `src` with relative Gaussian noise on one tensor (noise=0: an exact copy)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][tensor]
    state = load_file(str(shard))
    w = state[tensor].float()
    g = torch.Generator().manual_seed(seed)
    state[tensor] = (w + noise * w.std() * torch.randn(w.shape, generator=g)).to(state[tensor].dtype)
    shard.unlink()  # a fresh file, not a write through a link or into a shared inode
    save_file(state, str(shard), metadata={"format": "pt"})
    return dst
