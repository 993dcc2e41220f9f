"""ONNX export of the image path: InternViT -> pixel shuffle -> mlp1, for onnxruntime on CPU, GPU or edge.

The exported graph maps `pixel_values` (tiles, 3, S, S) float32 -> `image_embeds` (tiles, 256, llm hidden)
float32, with a dynamic tile axis. Only `vision_model.*` and `mlp1.*` are read from the checkpoint, so the
38B's language model never enters memory. Output directory (written atomically):

    vision.onnx          the graph (weights inline below ~1.8 GB, else in vision.onnx.data)
    vision.onnx.data     external weights, one file (InternViT-6B: ~11 GB fp16, ~22 GB fp32, ~5.6 GB int8)
    preprocessing.json   everything another runtime needs to build `pixel_values` and the prompt
    onnx_export.json     the export report (variant, sizes, versions, verification against torch)

The runner is `r1v_quant.runtime.onnx.OnnxVisionEncoder`; the CLI command is in r1v_quant.cli.onnx.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from r1v_quant import __version__
from r1v_quant.model.checkpoint import Checkpoint, open_checkpoint
from r1v_quant.model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from r1v_quant.model.prompts import IMAGE_PLACEHOLDER as IMAGE_TAG
from r1v_quant.model.prompts import IMG_CONTEXT, IMG_END, IMG_START
from r1v_quant.model.spec import ModelSpec
from r1v_quant.model.vision import Projector, VisionModel, extract_feature
from r1v_quant.util.atomic import atomic_dir, check_output_dir
from r1v_quant.util.errors import R1VError
from r1v_quant.util.outputs import claim_output

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
MODEL_NAME = "vision.onnx"
DATA_NAME = "vision.onnx.data"
PREPROCESSING_NAME = "preprocessing.json"
REPORT_NAME = "onnx_export.json"
FORMAT = "r1v-quant/onnx-vision"
FORMAT_VERSION = 1

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
MIN_OPSET, MAX_OPSET = 17, 20  # 17: LayerNormalization; 20: the legacy exporter's newest symbolics
# protobuf cannot serialise a message above 2 GiB; keep a margin for the graph itself.
INLINE_LIMIT = int(1.8 * 1024**3)
# The TorchScript exporter (no onnxscript needed, dynamic axes by name); torch >= 2.9 defaults to dynamo,
# torch < 2.5 has no such switch.
_LEGACY: dict[str, Any] = (
    {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
)
# Tensors at least this large go to the .data file when weights are external (as onnx does by default).
EXTERNAL_MIN_BYTES = 1024


class VisionEncoderGraph(nn.Module):
    """What gets traced: the reference `extract_feature`, with float32 in and out for every weight dtype."""

    def __init__(self, vision_model: VisionModel, mlp1: Projector, spec: ModelSpec):
        super().__init__()
        self.vision_model = vision_model
        self.mlp1 = mlp1
        self.spec = spec

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The embeddings cast the input to the weight dtype, so an fp16 graph still takes float32 pixels;
        # casting the output back keeps one I/O contract for fp32 / fp16 / int8 files.
        return extract_feature(self.vision_model, self.mlp1, self.spec, pixel_values).float()


def load_vision(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> VisionEncoderGraph:
    """Vision tower + mlp1 only, straight from the checkpoint tensors (names already match the modules)."""
    spec = ckpt.spec
    with torch.device("meta"):
        graph = VisionEncoderGraph(
            VisionModel(spec.vision), Projector(spec.projector_in, spec.llm.hidden_size), spec
        )
    state = {n: ckpt.get(n).to(dtype) for n in ckpt.names() if n.startswith(("vision_model.", "mlp1."))}
    try:
        graph.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise R1VError(f"{ckpt.path}: vision tower tensors do not fit the config ({first})") from None
    missing = sorted(n for n, p in graph.named_parameters() if p.is_meta)
    if missing:
        raise R1VError(f"{ckpt.path}: checkpoint lacks vision tensor {missing[0]!r} ({len(missing)} missing)")
    return graph.eval()


def preprocessing_config(spec: ModelSpec) -> dict[str, Any]:
    """preprocessing.json: the exact InternVL pipeline (r1v_quant.model.preprocess) written down as data."""
    s = spec.force_image_size
    tokens = spec.tokens
    return {
        "format": f"{FORMAT}/preprocessing",
        "version": FORMAT_VERSION,
        "image_size": s,
        "patch_size": spec.vision.patch_size,
        "color_mode": "RGB",
        "convert_to_rgb_first": True,  # before any resize: palette/RGBA images resize differently otherwise
        "exif_orientation": "ignored",  # the reference pipeline does not apply it either
        "resize": {
            "interpolation": "bicubic",
            "reference": "PIL.Image.Resampling.BICUBIC",
            "antialias": True,
        },
        "rescale_factor": 1 / 255,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "normalize": "x = (pixel / 255 - mean[c]) / std[c], float32, channels first",
        "tiling": {
            "dynamic": spec.dynamic_image_size,
            "min_tiles": spec.min_dynamic_patch,
            "max_tiles": spec.max_dynamic_patch,
            "use_thumbnail": spec.use_thumbnail,
            "rule": (
                "among grids (cols, rows) with min_tiles <= cols*rows <= max_tiles, ordered by cols*rows, "
                "take the one whose cols/rows is closest to width/height; on an exact tie move to the later "
                f"(larger) grid only if width*height > 0.5 * {s}^2 * cols*rows. Resize (bicubic, stretching, "
                f"no padding) to ({s}*cols, {s}*rows) and cut {s}x{s} tiles row-major"
            ),
            "thumbnail": (
                "when the grid has more than one tile and use_thumbnail is true, append a bicubic "
                f"{s}x{s} resize of the whole image as the last tile"
            ),
            "when_not_dynamic": f"one tile: bicubic resize of the whole image to {s}x{s}",
        },
        "input": {"name": INPUT_NAME, "shape": ["tiles", 3, s, s], "dtype": "float32"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["tiles", spec.num_image_token, spec.llm.hidden_size],
            "dtype": "float32",
        },
        "tokens_per_tile": spec.num_image_token,
        "placeholder": {
            "image_tag": IMAGE_TAG,
            "start": IMG_START,
            "context": IMG_CONTEXT,
            "end": IMG_END,
            "expansion": f"{IMG_START} + {IMG_CONTEXT} * ({spec.num_image_token} * tiles) + {IMG_END}",
            "token_ids": {
                "img_start": tokens.img_start,
                "img_context": tokens.img_context,
                "img_end": tokens.img_end,
            },
            "merge": f"image_embeds rows, tile-major, replace the {IMG_CONTEXT} token embeddings in order",
        },
        "reference": "r1v_quant.model.preprocess.preprocess_image",
    }


# -- export ----------------------------------------------------------------------------------------------
def export_onnx(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    dtype: str = "fp32",
    int8: bool = False,
    opset: int = 17,
    external_data: bool | None = None,
    verify: bool = True,
    flavor: str | None = None,
    finish: Callable[[Path, dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Export vision tower + pixel shuffle + mlp1 of MODEL_DIR to OUT_DIR/vision.onnx; returns the report.

    `external_data` None decides by size (fp32 weights above ~1.8 GB go to vision.onnx.data, as protobuf
    cannot hold 2 GB); True / False force it. `int8` applies onnxruntime's dynamic quantization to the fp32
    graph. `verify` runs two tiles through torch and onnxruntime (CPU) and records the difference.
    `finish(folder, report)` adds files (the model card) to the folder before it appears under its name.
    OUT_DIR is owned by this run (r1v_quant.util.outputs.claim_output): a second run into it fails at once.
    """
    t0 = time.perf_counter()
    _import_onnx()  # a missing extra is reported before anything else
    if dtype not in DTYPES:
        raise R1VError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if int8 and dtype != "fp32":
        raise R1VError("--int8 quantizes the fp32 graph's weights (activations stay fp32): use --dtype fp32")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise R1VError(f"opset {opset} not supported: choose {MIN_OPSET}..{MAX_OPSET}")
    out_dir = Path(out_dir)
    check_output_dir(out_dir)  # fail before loading anything
    with claim_output(out_dir):
        return _export_onnx(model_dir, out_dir, dtype, int8, opset, external_data, verify, flavor, finish, t0)


def _export_onnx(
    model_dir: Path | str,
    out_dir: Path,
    dtype: str,
    int8: bool,
    opset: int,
    external_data: bool | None,
    verify: bool,
    flavor: str | None,
    finish: Callable[[Path, dict[str, Any]], object] | None,
    t0: float,
) -> dict[str, Any]:
    onnx, _ = _import_onnx()
    ckpt = open_checkpoint(model_dir, flavor=flavor)
    spec = ckpt.spec
    graph = load_vision(ckpt, DTYPES[dtype])
    vision_info = {
        "hidden_size": spec.vision.hidden_size,
        "layers": spec.vision.num_layers,
        "norm_type": spec.vision.norm_type,
        "qk_norm": spec.vision.qk_norm,
        "parameters": sum(p.numel() for p in graph.parameters()),
    }
    example = _verification_input(spec.force_image_size)
    ref = None
    if verify:
        with torch.no_grad():
            ref = graph(example).numpy()
    with atomic_dir(out_dir) as tmp:
        (tmp / PREPROCESSING_NAME).write_text(json.dumps(preprocessing_config(spec), indent=2) + "\n")
        quant_info = write_graph(
            graph, tmp, int8=int8, opset=opset, external_data=external_data, example=example[:1]
        )
        export_s = time.perf_counter() - t0
        del graph  # the torch copy of the weights goes before onnxruntime loads its own (6B: 11-22 GB)
        gc.collect()
        verification = None
        if ref is not None:
            from r1v_quant.runtime.onnx import OnnxVisionEncoder

            enc = OnnxVisionEncoder(tmp, provider="cpu")
            verification = {
                "reference": f"torch {dtype}",
                "tiles": len(example),
                "provider": enc.active_provider,
            }
            verification |= compare(ref, enc.encode(example.numpy()))
            del enc
        s = spec.force_image_size
        report: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": MODEL_NAME,
            "external_data": DATA_NAME if (tmp / DATA_NAME).exists() else None,
            "source": str(Path(model_dir).resolve()),
            "flavor": spec.flavor,
            "dtype": dtype,
            "weights": "int8" if int8 else dtype,
            "int8": quant_info,
            "opset": opset,
            "input": {"name": INPUT_NAME, "shape": ["tiles", 3, s, s], "dtype": "float32"},
            "output": {
                "name": OUTPUT_NAME,
                "shape": ["tiles", spec.num_image_token, spec.llm.hidden_size],
                "dtype": "float32",
            },
            "vision": vision_info,
            "files": {},
            "bytes": 0,
            "verification": verification,
            "versions": _versions(onnx),
            "r1v_quant": __version__,
            "seconds": {"export": round(export_s, 2), "total": round(time.perf_counter() - t0, 2)},
        }
        report["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}  # all but this report
        report["bytes"] = sum(report["files"].values())
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if finish is not None:
            finish(tmp, report)
    report["path"] = str(out_dir)
    return report


def write_graph(
    graph: VisionEncoderGraph,
    out: Path,
    *,
    int8: bool = False,
    opset: int = 17,
    external_data: bool | None = None,
    example: torch.Tensor | None = None,
) -> dict[str, Any] | None:
    """Trace `graph` into out/vision.onnx (+ out/vision.onnx.data); returns the int8 summary if any."""
    onnx, quantization = _import_onnx()
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    # Decide by the traced graph: with int8 that is the fp32 intermediate, 4x the final file.
    external = weight_bytes > INLINE_LIMIT if external_data is None else bool(external_data)
    if example is None:
        example = _verification_input(graph.spec.force_image_size)[:1]
    stage = out / ".stage"  # above 2 GB the legacy exporter writes one file per tensor: keep those apart
    stage.mkdir()
    raw = stage / MODEL_NAME
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            graph,
            (example,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "tiles"}, OUTPUT_NAME: {0: "tiles"}},
            opset_version=opset,
            do_constant_folding=True,
            **_LEGACY,
        )
    final = out / MODEL_NAME
    quant_info: dict[str, Any] | None = None
    try:
        if int8:
            with _quiet_export():
                quant_info = quantize_int8(
                    raw, final, external=external, quantization=quantization, onnx=onnx
                )
        else:
            relocate_model(raw, final, external=external, onnx=onnx)
    finally:
        shutil.rmtree(stage)
    _check_model(final, onnx)
    return quant_info


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what is expected: tracer warnings on the fixed 448 px geometry (the shape checks and the
    32x32 grid are constants by design), the legacy-exporter deprecation notice, and quantize_dynamic's
    root-logger advice to run shape pre-processing."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        root.setLevel(level)


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        from onnxruntime import quantization
    except ImportError as e:
        raise R1VError(
            f"ONNX export needs onnx and onnxruntime: pip install 'r1v-quant[onnx]' ({e})"
        ) from None
    return onnx, quantization


def _verification_input(image_size: int) -> torch.Tensor:
    # Normalised pixels of a deterministic random image: the range real tiles have (about -2.1 .. 2.6).
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, image_size, image_size, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def relocate_model(src: Path, dst: Path, *, external: bool, onnx: Any) -> int:
    """Write `src` (inline, or external data in any number of files) as `dst`, weights inline or in one
    `dst.data` file. Streams tensor by tensor, so a 22 GB graph never sits in memory whole."""
    model = onnx.load(str(src), load_external_data=False)
    data_path = dst.parent / (dst.name + ".data")
    moved = 0
    with open(data_path, "wb") if external else _NullFile() as out:
        for tensor, is_initializer in _all_tensors(model):
            blob = _tensor_bytes(tensor, src.parent, onnx)
            if blob is None:
                continue
            if external and is_initializer and len(blob) >= EXTERNAL_MIN_BYTES:
                pad = -out.tell() % 4096  # page-aligned offsets let onnxruntime mmap the weights
                out.write(b"\0" * pad)
                offset = out.tell()
                out.write(blob)
                _set_external(tensor, data_path.name, offset, len(blob), onnx)
                moved += len(blob)
            else:
                _set_inline(tensor, blob, onnx)
    if not external and model.ByteSize() > 2**31 - 1:
        raise R1VError("the model is over 2 GB and cannot be stored inline: allow external data")
    onnx.save_model(model, str(dst))
    return moved


class _NullFile:
    def __enter__(self) -> _NullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _all_tensors(model: Any) -> list[tuple[Any, bool]]:
    """(tensor, is_initializer): Constant nodes hold small folded tensors too; those always go inline."""
    out = [(t, True) for t in model.graph.initializer]
    for node in model.graph.node:
        out.extend((a.t, False) for a in node.attribute if a.HasField("t"))
    return out


def _tensor_bytes(tensor: Any, base: Path, onnx: Any) -> bytes | None:
    """Raw little-endian bytes of an initializer, read from its external file when it has one."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        path = (base / info["location"]).resolve()
        if base.resolve() not in path.parents:
            raise R1VError(f"external tensor {tensor.name!r} points outside the export directory")
        offset, length = int(info.get("offset", 0)), info.get("length")
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(int(length)) if length is not None else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return None  # typed fields (float_data, ...): small constants, left as they are


def _set_external(tensor: Any, location: str, offset: int, length: int, onnx: Any) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _set_inline(tensor: Any, blob: bytes, onnx: Any) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = blob


def quantize_int8(src: Path, dst: Path, *, external: bool, quantization: Any, onnx: Any) -> dict[str, Any]:
    """onnxruntime dynamic quantization: int8 weights (per output channel), uint8 activations at run time.

    Only MatMul nodes with a constant weight are rewritten (-> DynamicQuantizeLinear + MatMulInteger, which
    onnxruntime fuses into MatMulIntegerToFloat); activation x activation MatMuls (attention) stay fp32.
    Gemm has no dynamic-quantization rule in onnxruntime and would stay fp32, but the exporter emits none
    here (nn.Linear on 3-D input becomes MatMul + Add). The 14x14 patch Conv stays fp32 on purpose: it
    holds ~0.03 % of InternViT-6B's weights and would quantize the raw pixels to uint8 per tensor.
    Memory: quantize_dynamic holds the whole fp32 model (measured: peak RSS ~3x the fp32 file size).
    """
    before = _op_counts(onnx.load(str(src), load_external_data=False))
    # Quantize beside the source (its own folder: quantize_dynamic names the data file after the model),
    # then move into place with the weights inline or in one aligned DATA_NAME file.
    staged = src.parent / "int8" / MODEL_NAME
    staged.parent.mkdir()
    quantization.quantize_dynamic(
        str(src),
        str(staged),
        op_types_to_quantize=["MatMul"],
        per_channel=True,  # one scale per output column: the ViT's columns differ a lot in range
        weight_type=quantization.QuantType.QInt8,
        use_external_data_format=external,
        extra_options={"MatMulConstBOnly": True},
    )
    relocate_model(staged, dst, external=external, onnx=onnx)
    after = _op_counts(onnx.load(str(dst), load_external_data=False))
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "int8 symmetric, per output channel",
        "activations": "uint8 asymmetric, per tensor, computed at run time",
        "matmul_fp32_before": before.get("MatMul", 0),
        "matmul_fp32_after": after.get("MatMul", 0),
        "matmul_integer": after.get("MatMulInteger", 0),
        "gemm": after.get("Gemm", 0),
        "conv_fp32": after.get("Conv", 0),
    }


def _op_counts(model: Any) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def _check_model(path: Path, onnx: Any) -> None:
    # check_model by path handles external data and the 2 GB limit.
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises ValidationError and friends
        raise R1VError(f"exported graph failed onnx.checker: {' '.join(str(e).split())[:300]}") from None


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Max |diff|, min / mean cosine over tokens (last axis) in float64, and non-finite outputs (fp16
    overflow shows up here first)."""
    a = ref.astype(np.float64).reshape(-1, ref.shape[-1])
    b = got.astype(np.float64).reshape(-1, got.shape[-1])
    nonfinite = int((~np.isfinite(b)).sum())
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "ref_max_abs": float(np.abs(a).max()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "nonfinite": nonfinite,
    }


def _versions(onnx: Any) -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
