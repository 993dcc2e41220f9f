"""What an evaluation backend is: the requests it takes, the generations it returns, and the protocol the
torch, llama.cpp and OpenAI-server backends implement (r1v_quant.evaluate.backends,
r1v_quant.evaluate.server_backend)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from r1v_quant.data.evalset import Window
from r1v_quant.model.artifact import Artifact
from r1v_quant.model.preprocess import ImageSource
from r1v_quant.runtime.decoding import Decoding
from r1v_quant.util.device import resolve_device
from r1v_quant.util.errors import R1VError


@dataclass
class Generation:
    text: str
    n_tokens: int
    stopped: bool  # False: the max-tokens budget (or the context) cut the answer off
    budget: int = 0  # the new tokens this answer was allowed: the decoding's budget, capped by the context


@dataclass(frozen=True)
class GenRequest:
    question: str  # the user turn with one `<image>` placeholder per image
    images: Sequence[ImageSource]
    seed: int


OnDone = Callable[[int, Generation], None]


class Backend(Protocol):
    artifact: Artifact

    def tokenize(self, text: str) -> list[int]: ...

    def logprobs(self, window: Window) -> torch.Tensor: ...

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation: ...

    def generate_many(
        self, reqs: Sequence[GenRequest], decoding: Decoding, on_done: OnDone | None = None
    ) -> list[Generation]: ...

    def speed(self, req: GenRequest, n_tokens: int = 32) -> float: ...

    def close(self) -> None: ...


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
