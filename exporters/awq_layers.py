"""Finished layers of an `awq` run in its work folder: one safetensors file per layer (packed linears plus
the layer's 16-bit state, its report in the metadata), written atomically, read back by `--resume` and by
the final assembly. Shared by the decoder (awq_export) and the vision tower (awq_vision).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from r1v_quant.model.awq_layout import pack_awq
from r1v_quant.model.checkpoint import read_header
from r1v_quant.quant.awq_search import LayerResult
from r1v_quant.util.errors import R1VError


def layer_tensors(res: LayerResult) -> dict[str, torch.Tensor]:
    out = {}
    for name, qw in res.quantized.items():
        for k, v in pack_awq(qw).items():
            out[f"{name}.{k}"] = v
    out.update(res.state)
    return out


def load_layer_result(path: Path, index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors = load_file(str(path))
    with open(path, "rb") as f:  # the layer's report rides in the safetensors metadata
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__", {})
    return json.loads(meta.get("report", "{}")), tensors


def load_saved_layer(path: Path, index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """A finished layer of an interrupted run, or None to compute it: absent, or damaged (then removed,
    with a note: the file was written atomically, so damage came from outside the run)."""
    if not path.exists():
        return None
    try:
        read_header(path)  # the full safetensors check before the library reads it
        report, tensors = load_layer_result(path, index)
        if not isinstance(report, dict) or "loss" not in report:
            raise ValueError("no layer report in its metadata")
        return report, tensors
    except (R1VError, OSError, ValueError, SafetensorError) as e:
        print(f"note: {path} is damaged ({e}); layer {index} is computed again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
