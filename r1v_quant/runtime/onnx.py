"""Run an exported vision encoder (exporters.onnx_vision) with onnxruntime, on an explicitly chosen provider.

onnxruntime quietly runs on CPU when the CUDA provider cannot load (CPU-only wheel, missing CUDA/cuDNN
libraries, no GPU): the session is created all the same. `OnnxVisionEncoder` compares what it asked for
with `session.get_providers()` and reports a fallback as a warning and in `report()`, or raises with
`strict=True`. It needs numpy and onnxruntime only (plus r1v_quant.model.preprocess for `encode_image`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from r1v_quant.util.errors import R1VError

MODEL_NAME = "vision.onnx"
PREPROCESSING_NAME = "preprocessing.json"
REPORT_NAME = "onnx_export.json"

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = {"cpu": CPU, "cuda": CUDA}


class ProviderFallbackWarning(UserWarning):
    """The execution provider that was asked for is not the one running the model."""


def choose_providers(provider: str, available: list[str]) -> list[str]:
    """The provider list to request: 'auto' = CUDA when this onnxruntime build has it, else CPU.

    CPU always ends the list: it is onnxruntime's fallback for nodes the GPU provider lacks.
    """
    if provider == "auto":
        provider = "cuda" if CUDA in available else "cpu"
    if provider not in PROVIDERS:
        raise R1VError(f"unknown provider {provider!r}: expected auto, cpu or cuda")
    return [CUDA, CPU] if provider == "cuda" else [CPU]


class OnnxVisionEncoder:
    """pixel_values (tiles, 3, S, S) float32 -> image_embeds (tiles, 256, llm hidden) float32.

    Same contract as `R1VModel.image_embeds`, so the profiler and chat can swap it in for the torch tower.
    `path` is an export directory (or a .onnx file inside one).
    """

    def __init__(
        self,
        path: Path | str,
        provider: str = "auto",
        *,
        threads: int = 0,
        strict: bool = False,
        device_id: int = 0,
    ):
        try:
            import onnxruntime as ort
        except ImportError:
            raise R1VError(
                "onnxruntime is not installed: pip install 'r1v-quant[onnx]' (or [onnx-gpu])"
            ) from None
        path = Path(path)
        self.dir = path.parent if path.suffix == ".onnx" else path
        self.model_path = path if path.suffix == ".onnx" else self.dir / MODEL_NAME
        if not self.model_path.is_file():
            raise R1VError(f"{self.model_path}: no exported ONNX model (run `r1v-quant onnx` first)")
        self.export_report: dict[str, Any] = read_json(self.dir / REPORT_NAME)
        self.preprocessing: dict[str, Any] = read_json(self.dir / PREPROCESSING_NAME)

        available = ort.get_available_providers()
        self.provider_requested = provider
        requested = choose_providers(provider, available)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            opts.intra_op_num_threads = threads
        provider_options = [{"device_id": str(device_id)} if p == CUDA else {} for p in requested]
        with warnings.catch_warnings():
            # onnxruntime's own "provider not available" UserWarning: we report it ourselves, below.
            warnings.simplefilter("ignore", UserWarning)
            try:
                self.session = ort.InferenceSession(
                    str(self.model_path),
                    sess_options=opts,
                    providers=requested,
                    provider_options=provider_options,
                )
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
                raise R1VError(
                    f"{self.model_path}: onnxruntime cannot load it: {' '.join(str(e).split())[:300]}"
                ) from None
        self.providers_requested = requested
        self.providers_active: list[str] = list(self.session.get_providers())
        self.active_provider = self.providers_active[0]
        self.fallback: str | None = None
        if self.active_provider != requested[0]:
            why = (
                "this onnxruntime build has no CUDA provider (install onnxruntime-gpu, not onnxruntime)"
                if requested[0] not in available
                else "the CUDA provider failed to load (CUDA/cuDNN libraries or GPU missing; see the log)"
            )
            self.fallback = f"asked for {requested[0]} but running on {self.active_provider}: {why}"
            if strict:
                raise R1VError(self.fallback)
            warnings.warn(self.fallback, ProviderFallbackWarning, stacklevel=2)

        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.image_size = int(inp.shape[-1])
        self.num_image_token = int(out.shape[1])
        self.hidden_size = int(out.shape[2])

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(tiles, 3, S, S) -> (tiles, num_image_token, hidden) float32; a (3, S, S) array is one tile.

        Accepts numpy arrays or CPU torch tensors (converted to float32)."""
        x = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        s = self.image_size
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (3, s, s) or x.shape[0] < 1:
            raise R1VError(f"pixel_values must be (tiles, 3, {s}, {s}), got {tuple(x.shape)}")
        (y,) = self.session.run([self.output_name], {self.input_name: x})
        return y

    def encode_image(self, source: Any, max_tiles: int | None = None) -> tuple[np.ndarray, int]:
        """Preprocess one image per preprocessing.json (r1v_quant.model.preprocess) and encode it; `max_tiles`
        overrides the grid's tile cap (the thumbnail rule is kept).

        Returns (image_embeds, num_tiles): the prompt's `<image>` expands to num_tiles * 256 <IMG_CONTEXT>.
        """
        from r1v_quant.model.preprocess import preprocess_image

        pp = self.preprocessing
        tiling = pp.get("tiling", {})
        prepped = preprocess_image(
            source,
            image_size=int(pp.get("image_size", self.image_size)),
            min_num=int(tiling.get("min_tiles", 1)),
            max_num=int(tiling.get("max_tiles", 12)) if max_tiles is None else max_tiles,
            use_thumbnail=bool(tiling.get("use_thumbnail", True)),
            dynamic=bool(tiling.get("dynamic", True)),
        )
        return self.encode(prepped.pixel_values.numpy()), prepped.num_tiles

    def report(self) -> dict[str, Any]:
        """What runs where: for logs, the profiler and --json outputs."""
        return {
            "model": str(self.model_path),
            "weights": self.export_report.get("weights"),
            "provider_requested": self.provider_requested,
            "providers_requested": self.providers_requested,
            "providers_active": self.providers_active,
            "active_provider": self.active_provider,
            "fallback": self.fallback,
            "image_size": self.image_size,
            "num_image_token": self.num_image_token,
            "hidden_size": self.hidden_size,
        }


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise R1VError(f"{path}: invalid JSON ({e.msg})") from None
