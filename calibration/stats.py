"""Per-linear input statistics by modality, and the safetensors file that stores them.

For each decoder layer and each distinct linear input (q/k/v share one, gate/up share one) we keep, per
modality (vision / prompt / response, plus "all"), per input channel:
  mean_abs  mean |x|          (AWQ's activation scale)
  sum_sq    sum of x²         (llama.cpp's importance matrix before dividing by the count)
  max_abs   max |x|           (clipping / outlier checks)
  count     tokens seen       (one value)
File names: `layers.{i}.{group}.{quantity}.{modality}`, e.g. `layers.3.qkv.sum_sq.response`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from r1v_quant.calibration.render import MODALITIES
from r1v_quant.model.arch import DECODER_GROUPS
from r1v_quant.util.errors import R1VError
from r1v_quant.util.finite import check_finite

STATS_FILE = "stats.safetensors"
FORMAT = "r1v-quant-calibration-stats/1"
QUANTITIES = ("mean_abs", "sum_sq", "max_abs", "count")
ALL = "all"

# input group -> (module whose input is recorded, linears that read that same input)
LINEAR_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    g.name: (g.recorded, g.linears) for g in DECODER_GROUPS
}
GROUP_OF_LINEAR = {lin: g for g, (_, lins) in LINEAR_GROUPS.items() for lin in lins}


def group_of(linear: str) -> str:
    """'self_attn.k_proj' / 'k_proj' / 'qkv' -> 'qkv'."""
    if linear in LINEAR_GROUPS:
        return linear
    for full, g in GROUP_OF_LINEAR.items():
        if linear in (full, full.split(".")[-1]):
            return g
    raise R1VError(f"unknown linear {linear!r} (known: {', '.join(GROUP_OF_LINEAR)})")


class _Acc:
    """Running sums for one input group and one modality (float64 so long runs do not lose precision)."""

    def __init__(self, dim: int):
        self.sum_abs = torch.zeros(dim, dtype=torch.float64)
        self.sum_sq = torch.zeros(dim, dtype=torch.float64)
        self.max_abs = torch.zeros(dim, dtype=torch.float32)
        self.count = 0

    def to(self, device: torch.device | str) -> None:
        self.sum_abs, self.sum_sq, self.max_abs = (
            t.to(device) for t in (self.sum_abs, self.sum_sq, self.max_abs)
        )

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        a = x.abs()
        self.sum_abs += a.sum(0, dtype=torch.float64)
        self.sum_sq += (x * x).sum(0, dtype=torch.float64)
        self.max_abs = torch.maximum(self.max_abs, a.amax(0).float())
        self.count += x.shape[0]


class LayerStats:
    """Statistics of one decoder layer's linear inputs, filled by forward pre-hooks."""

    def __init__(self, layer_index: int, dims: dict[str, int]):
        self.index = layer_index
        self.acc = {g: [_Acc(d) for _ in MODALITIES] for g, d in dims.items()}

    @classmethod
    def for_layer(cls, layer_index: int, layer: nn.Module) -> LayerStats:
        dims = {g: layer.get_submodule(mod).in_features for g, (mod, _) in LINEAR_GROUPS.items()}
        return cls(layer_index, dims)

    def to(self, device: torch.device | str) -> None:
        """Keep the running sums where the layer runs, so the hooks accumulate there (and back after)."""
        for accs in self.acc.values():
            for acc in accs:
                acc.to(device)

    def add(self, group: str, x: torch.Tensor, modality: torch.Tensor) -> None:
        """x: (n, d) inputs of one sample, modality: (n,) codes."""
        for code, acc in enumerate(self.acc[group]):
            acc.add(x[modality == code])

    @contextmanager
    def hooks(self, layer: nn.Module, modality: list[torch.Tensor]) -> Iterator[None]:
        """While active, each forward of `layer` adds its linear inputs; `modality[0]` is the current mask."""
        handles = []
        for g, (mod, _) in LINEAR_GROUPS.items():

            def pre(_m: nn.Module, args: tuple[torch.Tensor, ...], g: str = g) -> None:
                x = args[0]
                self.add(g, x.reshape(-1, x.shape[-1]), modality[0])

            handles.append(layer.get_submodule(mod).register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def get(self, linear: str, quantity: str, modality: str = ALL) -> torch.Tensor:
        """In-memory twin of CalibrationStats.get for this layer (e.g. for an AWQ search in the same run)."""
        return self.tensors()[f"layers.{self.index}.{group_of(linear)}.{quantity}.{modality}"]

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for g, accs in self.acc.items():
            combined = _Acc(accs[0].sum_abs.numel())
            for name, acc in [*zip(MODALITIES, accs, strict=True), (ALL, combined)]:
                if acc is not combined:
                    combined.sum_abs += acc.sum_abs
                    combined.sum_sq += acc.sum_sq
                    combined.max_abs = torch.maximum(combined.max_abs, acc.max_abs)
                    combined.count += acc.count
                p = f"layers.{self.index}.{g}"
                out[f"{p}.mean_abs.{name}"] = (acc.sum_abs / max(acc.count, 1)).float()
                out[f"{p}.sum_sq.{name}"] = acc.sum_sq.float()
                out[f"{p}.max_abs.{name}"] = acc.max_abs.clone()
                out[f"{p}.count.{name}"] = torch.tensor([acc.count], dtype=torch.int64)
                module = LINEAR_GROUPS[g][0]
                for quantity in ("mean_abs", "sum_sq", "max_abs"):
                    # an overflowing activation (x² beyond float32, or Inf) would become an Inf scale or
                    # importance downstream: refused here, naming where it happened
                    check_finite(
                        out[f"{p}.{quantity}.{name}"],
                        f"calibration statistic {quantity} of decoder layer {self.index}'s {module} input "
                        f"({name} tokens)",
                        "the model's activations overflow there",
                    )
        return out


class CalibrationStats:
    """A written statistics file, read back: what the AWQ search and the GGUF imatrix consume."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.tensors = tensors
        self.metadata = metadata
        self.num_layers = 1 + max((int(k.split(".")[1]) for k in tensors), default=-1)

    @classmethod
    def load(cls, path: Path | str) -> CalibrationStats:
        """`path`: a calibration output directory or its stats.safetensors."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        if not path.is_file():
            raise R1VError(f"{path}: no calibration statistics here (run `r1v-quant calibrate` first)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise R1VError(f"{path}: cannot read statistics ({e})") from None
        if meta.get("format") != FORMAT:
            raise R1VError(f"{path}: not an r1v-quant statistics file (format {meta.get('format')!r})")
        return cls(tensors, meta)

    @property
    def set_hash(self) -> str:
        return self.metadata.get("set_hash", "")

    @property
    def info(self) -> dict[str, Any]:
        return json.loads(self.metadata.get("info", "{}"))

    def get(self, layer: int, linear: str, quantity: str, modality: str = ALL) -> torch.Tensor:
        """One per-channel vector (count: 1 element). `linear` may be 'k_proj', 'mlp.up_proj', 'qkv'."""
        if quantity not in QUANTITIES:
            raise R1VError(f"unknown statistic {quantity!r} (known: {', '.join(QUANTITIES)})")
        if modality not in (*MODALITIES, ALL):
            raise R1VError(f"unknown modality {modality!r} (known: {', '.join((*MODALITIES, ALL))})")
        name = f"layers.{layer}.{group_of(linear)}.{quantity}.{modality}"
        if name not in self.tensors:
            raise R1VError(f"statistic {name!r} is not in the file (layers: {self.num_layers})")
        return self.tensors[name]

    def count(self, layer: int, linear: str, modality: str = ALL) -> int:
        return int(self.get(layer, linear, "count", modality)[0])

    def importance(self, layer: int, linear: str, modality: str = ALL) -> torch.Tensor:
        """Mean of x² per input channel: llama.cpp's per-column importance (imatrix `data`)."""
        n = self.count(layer, linear, modality)
        return self.get(layer, linear, "sum_sq", modality) / max(n, 1)
