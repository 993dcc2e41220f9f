"""The runtime protocol's engines (r1v_quant.runtime.protocol) and the one function that opens them.

Language models: `TorchLM` (a 16-bit or AWQ checkpoint in the torch reference forward; AWQ dequantized by
r1v-quant's loader) and `LlamaCppLM` (a GGUF in llama.cpp, KV cache reused for a shared prefix).
Vision encoders: `TorchVision` (the checkpoint's tower + mlp1), `MmprojVision` (the mmproj GGUF through
libmtmd) and `OnnxVision` (an `r1v-quant onnx` export in ONNX Runtime). All three tile by InternVL's rule
with the same cap (`max_tiles`, None: the model's own).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1v_quant.model.preprocess import ImageSource
from r1v_quant.runtime.options import RuntimeOptions
from r1v_quant.runtime.protocol import ImageEmbeds, LanguageModel, OnToken, VisionEncoder, check_pair
from r1v_quant.runtime.sampling import RuntimeResult, sample_tokens
from r1v_quant.util.errors import R1VError


# -- language models ---------------------------------------------------------------------------------------
class LlamaCppLM:
    """A GGUF in llama.cpp (`LlamaCppRuntime`); the KV cache is reused for the prefix shared across calls."""

    name = "llama.cpp"

    def __init__(self, runtime: Any):
        self.rt = runtime
        self.flavor = runtime.flavor
        self.n_embd = runtime.n_embd
        self.n_ctx = runtime.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.rt.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.rt.detokenize(ids)

    def logits(self, ids: Sequence[int], image_embeds: Any, positions: Any = None) -> np.ndarray:
        out = self.rt.logits(list(ids), image_embeds)
        return out if positions is None else out[np.asarray(positions)]

    def generate(self, ids: Sequence[int], image_embeds: np.ndarray | None, **options: Any) -> RuntimeResult:
        # the protocol's keywords are LlamaCppRuntime.generate's: passed through as they are
        return self.rt.generate(ids, image_embeds, **options)

    def close(self) -> None:
        self.rt.close()  # the runtime silences llama_free's buffer report itself


class TorchLM:
    """The torch reference forward of a 16-bit or AWQ checkpoint, on the device and dtype it was loaded to."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, *, n_ctx: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.tok = tokenizer
        self.flavor = model.spec.flavor
        self.n_embd = model.spec.llm.hidden_size
        self.n_ctx = n_ctx
        self.stop_ids = tokenizer.stop_ids(self.flavor)

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def embed(self, ids: Sequence[int], image_embeds: Any) -> Any:
        """(1, n, hidden) input embeddings on the model's device, image rows written over <IMG_CONTEXT>."""
        import torch

        rows = image_embeds
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(rows)
        with torch.device(self.device):
            x = torch.tensor([list(ids)])
            return self.model.embed(x, image_embeds=None if rows is None else rows.to(self.device))

    def logits(self, ids: Sequence[int], image_embeds: Any, positions: Any = None) -> np.ndarray:
        import torch

        lm = self.model.language_model
        with torch.inference_mode(), torch.device(self.device):
            hidden = lm.forward_embeds(self.embed(ids, image_embeds))[0]
            if positions is not None:  # only the asked rows reach the LM head and the host
                hidden = hidden[torch.as_tensor(positions, device=self.device)]
            return lm.logits(hidden).float().cpu().numpy()

    def generate(
        self,
        ids: Sequence[int],
        image_embeds: Any,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_token: OnToken | None = None,
        ignore_stop: bool = False,
        repetition_penalty: float = 1.0,
    ) -> RuntimeResult:
        import torch

        from r1v_quant.model.llm import KVCache

        lm = self.model.language_model
        t0 = time.perf_counter()

        def row(h: torch.Tensor) -> np.ndarray:  # the last position's float32 logits, on the host
            return lm.logits(h[0, -1]).float().cpu().numpy()

        with torch.inference_mode(), torch.device(self.device):
            cache = KVCache(self.model.spec.llm.num_layers)
            hidden = lm.forward_embeds(self.embed(ids, image_embeds), cache)
            first = row(hidden)
            t1 = time.perf_counter()

            def feed(token: int) -> np.ndarray | None:
                if cache.length + 1 > self.n_ctx:
                    return None
                return row(lm.forward_embeds(lm.model.embed_tokens(torch.tensor([[token]])), cache))

            result = sample_tokens(
                first,
                feed,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_ids=() if ignore_stop else self.stop_ids,
                on_token=on_token,
                repetition_penalty=repetition_penalty,
                prompt_ids=ids,
            )
        t2 = time.perf_counter()
        result.timings = {"prompt_s": t1 - t0, "decode_s": t2 - t1, "n_prompt": len(ids), "n_reused": 0,
                          "n_gen": len(result.tokens)}  # fmt: skip
        return result

    def close(self) -> None:
        self.model = None


# -- vision encoders ---------------------------------------------------------------------------------------
class MmprojVision:
    """The mmproj GGUF through libmtmd, tiled by InternVL's rule (`LlamaCppRuntime.image_embeds`)."""

    name = "mmproj (llama.cpp)"

    def __init__(self, runtime: Any):
        self.rt = runtime
        self.width = runtime.n_embd

    def load(self) -> None:
        """Load the mmproj now (it loads on the first image otherwise)."""
        self.rt.vision  # noqa: B018

    def encode(self, image: ImageSource) -> ImageEmbeds:
        rows = self.rt.image_embeds(image)
        return ImageEmbeds(rows, rows.shape[0] // self.rt.tokens_per_tile)


class TorchVision:
    """The checkpoint's own vision tower + mlp1 in torch."""

    name = "vision tower (torch)"

    def __init__(self, model: Any, max_tiles: int | None = None):
        self.model = model
        self.width = model.spec.llm.hidden_size
        self.max_tiles = max_tiles

    def encode_pixels(self, pixel_values: Any) -> np.ndarray:
        """Preprocessed tiles (n, 3, s, s) -> (n * tokens_per_tile, hidden) float32 rows."""
        weight = next(self.model.parameters())  # the model's device and dtype
        out = self.model.image_embeds(pixel_values.to(device=weight.device, dtype=weight.dtype))
        return out.reshape(-1, out.shape[-1]).float().cpu().numpy()

    def encode(self, image: ImageSource) -> ImageEmbeds:
        from r1v_quant.model.preprocess import preprocess_for_spec

        prepped = preprocess_for_spec(image, self.model.spec, self.max_tiles)
        return ImageEmbeds(self.encode_pixels(prepped.pixel_values), prepped.num_tiles)


class OnnxVision:
    """An `r1v-quant onnx` export in onnxruntime (tiling and normalisation from its preprocessing.json)."""

    def __init__(
        self,
        path: Path | str,
        *,
        provider: str = "auto",
        threads: int = 0,
        max_tiles: int | None = None,
        strict: bool = False,
    ):
        from r1v_quant.runtime.onnx import OnnxVisionEncoder

        self.max_tiles = max_tiles
        self.encoder = OnnxVisionEncoder(path, provider, threads=threads, strict=strict)
        self.width = self.encoder.hidden_size
        self.name = f"ONNX ({self.encoder.active_provider})"

    def encode(self, image: ImageSource) -> ImageEmbeds:
        out, tiles = self.encoder.encode_image(image, self.max_tiles)
        return ImageEmbeds(np.ascontiguousarray(out.reshape(-1, out.shape[-1]), np.float32), tiles)


# -- opening ---------------------------------------------------------------------------------------------
def open_engines(
    *,
    gguf: Path | None = None,
    mmproj: Path | None = None,
    model: Path | None = None,
    vision_onnx: Path | None = None,
    options: RuntimeOptions | None = None,
    n_ctx: int | None = None,
    flavor: str | None = None,
    onnx_provider: str = "auto",
) -> tuple[LanguageModel, VisionEncoder | None]:
    """The language model and vision encoder for a GGUF (+ mmproj, found beside it when not given) or a
    checkpoint folder, optionally with an ONNX vision export in place of the model's own tower (the torch
    tower is then not kept in memory). `options` places the model (RuntimeOptions: llama.cpp threads and GPU
    layers, torch device and dtype, the tile cap); `n_ctx` is the context (None: 4096 for llama.cpp, the
    checkpoint's position limit for torch); `flavor` overrides a checkpoint's chat template."""
    from r1v_quant.plan.image_cost import check_max_tiles

    opts = options or RuntimeOptions()
    check_max_tiles(opts.max_tiles)
    if (gguf is None) == (model is None):
        raise R1VError("give either --gguf (llama.cpp) or --model (torch checkpoint), not both or neither")
    onnx = None
    if vision_onnx is not None:
        onnx = OnnxVision(  # a provider asked for by name must be the one that runs
            vision_onnx, provider=onnx_provider, threads=opts.n_threads or 0, max_tiles=opts.max_tiles,
            strict=onnx_provider != "auto",
        )  # fmt: skip
    if gguf is not None:
        from r1v_quant.model.artifact import find_gguf_pair
        from r1v_quant.runtime.llamacpp import LlamaCppRuntime

        if flavor is not None:
            raise R1VError("--flavor applies to a checkpoint; a GGUF carries its own template")
        llm_file, found = find_gguf_pair(gguf)
        mmproj = mmproj or (None if onnx else found)
        if mmproj is not None and not Path(mmproj).is_file():
            raise R1VError(f"{mmproj}: no such mmproj file")
        rt = LlamaCppRuntime(
            llm_file, mmproj, n_ctx=n_ctx or 4096, n_threads=opts.n_threads, n_gpu_layers=opts.n_gpu_layers,
            max_tiles=opts.max_tiles,
        )  # fmt: skip
        lm: LanguageModel = LlamaCppLM(rt)
        vision: VisionEncoder | None = onnx or (MmprojVision(rt) if rt.has_vision else None)
    else:
        if mmproj is not None:
            raise R1VError("--mmproj goes with --gguf; a --model checkpoint has its own vision tower")
        import torch

        from r1v_quant.model.checkpoint import open_checkpoint
        from r1v_quant.model.reference import R1VModel
        from r1v_quant.model.tokenizer import R1VTokenizer

        assert model is not None
        device, dtype = opts.torch_placement()
        if opts.n_threads:
            torch.set_num_threads(opts.n_threads)
        net = R1VModel.from_checkpoint(open_checkpoint(model, flavor=flavor), dtype=dtype, device=device)
        if onnx is not None:  # the ONNX session replaces the tower: its weights are not kept
            del net.vision_model, net.mlp1
        lm = TorchLM(net, R1VTokenizer.from_dir(model), n_ctx=n_ctx or net.spec.llm.max_position_embeddings)
        vision = onnx or TorchVision(net, opts.max_tiles)
    check_pair(lm, vision)
    return lm, vision
