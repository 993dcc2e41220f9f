"""The models `eval` and `check` compare, behind one small interface, and the same-architecture check.

An artifact (`r1v_quant.artifact.resolve_artifact`) is a checkpoint folder (16-bit or AWQ: the torch
reference forward, AWQ dequantized by r1v-quant's loader) or a GGUF (a `.gguf` file, with a sibling
`mmproj*.gguf` picked up when there is one, or a folder holding one language-model GGUF and at most one
mmproj: llama.cpp through `r1v_quant.llamacpp_runtime`). Both backends score the same token ids (the
reference's tokenization, checked equal) and generate from each artifact's own template and stop tokens.

Only one model is open at a time: callers open, use and close each backend in turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from r1v_quant.artifact import Artifact
from r1v_quant.device import resolve_device
from r1v_quant.errors import R1VError
from r1v_quant.evalset import Window
from r1v_quant.preprocess import ImageSource
from r1v_quant.prompts import DS_ASSISTANT, DS_BOS, DS_USER, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

# Tokenizer probe: ordinary text in several scripts, numbers, whitespace runs and every special token the
# templates and the image placeholder use. Two tokenizers that agree on all of these are treated as equal.
PROBE_TEXTS = (
    "Hello world, the answer is 42.",
    "What is 37 * 45? 37 * 45 = 1665, so \\boxed{1665}.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  ",
    "I'll check: it's 5, they're equal, WE'VE done it.",
    "图中显示了一个三角形，求它的面积。",
    "3.14159 -17 +42 100% 1,234,567 2025-07-15",
    "Emoji 🙂🚀 and symbols ∑ ∫ √ π ≤ ≥ → °C",
    f"{IMG_START}{IMG_CONTEXT * 3}{IMG_END}\nWhat shape is in the image?",
    f"{DS_BOS}{DS_USER}\nWhat is 6*7?{DS_ASSISTANT}<think>\nok</think>\n\n42",
    f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n<think>\n",
)


@dataclass
class Generation:
    text: str
    n_tokens: int
    stopped: bool  # False: the max-tokens budget cut the answer off


class Backend(Protocol):
    artifact: Artifact

    def tokenize(self, text: str) -> list[int]: ...

    def logprobs(self, window: Window) -> torch.Tensor: ...

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation: ...

    def close(self) -> None: ...


# -- same architecture, same tokenizer --------------------------------------------------------------------


def check_compatible(ref: Artifact, cand: Artifact, *, needs_images: bool) -> None:
    """Refuse, with the reason, a candidate that is not the reference's architecture and tokenizer."""
    for what, a, b in (
        ("vocabulary size", ref.vocab, cand.vocab),
        ("hidden size", ref.hidden, cand.hidden),
        ("layer count", ref.layers, cand.layers),
        ("flavour (chat template)", ref.flavor, cand.flavor),
    ):
        if a != b:
            raise R1VError(f"{cand.path}: {what} {b} differs from the reference's {a}: not the same model")
    if needs_images and cand.backend == "llama.cpp" and cand.mmproj_gguf is None:
        raise R1VError(f"{cand.path}: no mmproj GGUF next to it; image windows and image items need one")
    ref_tok = _tokenizer(ref)
    if cand.backend == "torch":
        compare_tokenizers(ref_tok.encode, _tokenizer(cand).encode, cand.path)
    elif cand.gguf_tokens is not None:
        want = [ref_tok.id_to_token(i) or f"[PAD{i}]" for i in range(ref.vocab)]
        diff = [i for i, (a, b) in enumerate(zip(want, cand.gguf_tokens, strict=True)) if a != b]
        if diff:
            i = diff[0]
            raise R1VError(
                f"{cand.path}: tokenizer differs from the reference's ({len(diff)} token(s); id {i} is "
                f"{cand.gguf_tokens[i]!r}, the reference has {want[i]!r})"
            )


def compare_tokenizers(ref_encode: Any, cand_encode: Any, where: Path | str) -> None:
    """Both tokenizers must give the same ids for every probe text."""
    for text in PROBE_TEXTS:
        a, b = ref_encode(text), cand_encode(text)
        if list(a) != list(b):
            raise R1VError(
                f"{where}: tokenizer differs from the reference's on {text[:40]!r}: {list(b)[:12]} vs "
                f"{list(a)[:12]}"
            )


def _tokenizer(art: Artifact) -> Any:
    from r1v_quant.tokenizer import R1VTokenizer

    return R1VTokenizer.from_dir(art.path)


# -- backends -------------------------------------------------------------------------------------------


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
        }


class TorchBackend:
    """The torch reference forward on a 16-bit or AWQ checkpoint, on the device and dtype `runtime` says
    (default: CPU float32, or a CUDA GPU in bfloat16 when there is one)."""

    def __init__(self, artifact: Artifact, runtime: RuntimeOptions | None = None):
        from r1v_quant.checkpoint import open_checkpoint
        from r1v_quant.model import R1VModel
        from r1v_quant.tokenizer import R1VTokenizer

        self.artifact = artifact
        self.device, self.dtype = (runtime or RuntimeOptions()).torch_placement()
        ckpt = open_checkpoint(artifact.path)
        self.spec = ckpt.spec
        self.model = R1VModel.from_checkpoint(ckpt, dtype=self.dtype, device=self.device)
        self.tok = R1VTokenizer.from_dir(artifact.path)
        self.stop_ids = self.tok.stop_ids(self.spec.flavor)

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def _pixels(self, pixels: torch.Tensor | None) -> torch.Tensor | None:
        return None if pixels is None else pixels.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def logprobs(self, window: Window) -> torch.Tensor:
        with torch.device(self.device):  # tensors the forward creates (cache, positions) land there too
            logits = self.model(window.input_ids[None].to(self.device), self._pixels(window.pixel_values))
        # only the scored rows come back to the host (a 38B window's full logits are GBs)
        return torch.log_softmax(logits[0][window.score.to(self.device)].float().cpu(), -1)

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation:
        from r1v_quant.model import build_inputs

        ids, pixels, _ = build_inputs(self.artifact.path, self.spec, question, list(images))
        with torch.device(self.device):
            res = self.model.generate(
                ids.to(self.device),
                self._pixels(pixels),
                max_new_tokens=max_new_tokens,
                stop_ids=self.stop_ids,
            )
        return Generation(self.tok.decode(res.tokens), len(res.tokens), res.stopped)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


class LlamaCppBackend:
    """A GGUF (+ mmproj) in llama.cpp via r1v_quant.llamacpp_runtime; CPU unless n_gpu_layers."""

    def __init__(
        self, artifact: Artifact, *, n_ctx: int, n_threads: int | None = None, n_gpu_layers: int = 0
    ):
        from r1v_quant.llamacpp_runtime import LlamaCppRuntime

        self.artifact = artifact
        self.rt = LlamaCppRuntime(
            artifact.llm_gguf,
            artifact.mmproj_gguf,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
        )

    def tokenize(self, text: str) -> list[int]:
        return self.rt.tokenize(text)

    def logprobs(self, window: Window) -> torch.Tensor:
        embeds = None
        if window.images:
            embeds = np.concatenate([self.rt.image_embeds(im) for im in window.images])
        logits = self.rt.logits(window.input_ids.tolist(), embeds)
        return torch.log_softmax(torch.from_numpy(logits)[window.score], -1)

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation:
        ids, embeds = self.rt.prompt([{"role": "user", "content": question}], list(images), think=True)
        res = self.rt.generate(ids, embeds, max_new_tokens=max_new_tokens)
        return Generation(self.rt.detokenize(res.tokens), len(res.tokens), res.stopped)

    def close(self) -> None:
        self.rt.close()


def open_backend(artifact: Artifact, *, n_ctx: int = 4096, runtime: RuntimeOptions | None = None) -> Backend:
    rt = runtime or RuntimeOptions()
    if artifact.backend == "torch":
        return TorchBackend(artifact, rt)
    return LlamaCppBackend(artifact, n_ctx=n_ctx, n_threads=rt.n_threads, n_gpu_layers=rt.n_gpu_layers)


def check_runtime_tokenizer(ref: Artifact, backend: Backend) -> None:
    """After loading: the backend's own tokenizer (llama.cpp's reading of the GGUF) must match the ref's."""
    compare_tokenizers(_tokenizer(ref).encode, backend.tokenize, backend.artifact.path)
