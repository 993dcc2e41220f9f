"""How a model is placed and run: llama.cpp's threads and GPU layers, torch's device and dtype, batch and
parallelism for evaluation, and the tile cap of the dynamic tiling. Every engine opener reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from r1v_quant.util.device import resolve_device
from r1v_quant.util.errors import R1VError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RuntimeOptions:
    """How each model runs: llama.cpp's threads and GPU layers, and the torch backend's device and dtype
    (the 16-bit reference and AWQ candidates: a 38B reference needs ~77 GB in bfloat16, 154 GB in float32,
    so it runs on a large GPU or a large-memory host, while the GGUF candidates stay in llama.cpp)."""

    n_threads: int | None = None
    n_gpu_layers: int = 0
    torch_device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    torch_dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    batch_size: int = 8  # torch backend: answers decoded at once
    parallel: int = 4  # server backend: requests in flight at once
    max_tiles: int | None = None  # tile cap of the dynamic tiling (None: the checkpoint's max_dynamic_patch)

    def torch_placement(self) -> tuple[torch.device, torch.dtype]:
        device = resolve_device(self.torch_device, "--torch-device")
        if self.torch_dtype == "auto":
            return device, torch.float32 if device.type == "cpu" else torch.bfloat16
        if self.torch_dtype not in TORCH_DTYPES:
            raise R1VError(f"--torch-dtype {self.torch_dtype}: expected auto, {', '.join(TORCH_DTYPES)}")
        return device, TORCH_DTYPES[self.torch_dtype]

    def describe(self) -> dict[str, Any]:
        device, dtype = self.torch_placement()
        return {
            "torch_device": str(device),
            "torch_dtype": str(dtype).removeprefix("torch."),
            "llama_threads": self.n_threads,
            "llama_gpu_layers": self.n_gpu_layers,
            "batch_size": self.batch_size,
            "parallel": self.parallel,
            "max_tiles": self.max_tiles,
        }
