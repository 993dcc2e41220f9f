"""The vision tower and mlp1 of an R1V checkpoint as a llama.cpp mmproj GGUF (`clip`, projector `internvl`).

Layout = what llama.cpp's `convert_hf_to_gguf.py --mmproj` writes for InternVL: fused `attn.qkv` split in
thirds, 1-D tensors, norms, biases, layer scales, `v.class_embd` and `v.position_embd` in F32, the patch
conv in F16 (F16 file) or F32, every other 2-D weight in the file type.

Two things differ from a plain conversion, because llama.cpp's InternVL graph is not InternVL's:

* position rows. llama.cpp appends CLS *after* the patches and adds the stored table in order, so patch k
  gets row k and CLS the last row; InternVL puts CLS first (patch k gets row k+1). `position_fix="shift"`
  stores the table rotated (rows 1..N-1, then row 0) so llama.cpp's order yields InternVL's sums exactly;
  `"none"` stores it unchanged (for a llama.cpp that fixed its order); `"auto"` (default) runs a small
  probe mmproj through the installed libmtmd and picks whichever of the two reproduces the torch
  reference (`detect_position_order`). Without llama-cpp-python, auto falls back to "shift" (the behaviour
  of every llama.cpp with InternVL support up to the one vendored by llama-cpp-python 0.3.36), with a
  warning. CLS never reaches the output (llama.cpp drops it before the pixel shuffle, as InternVL does).
* tiling. llama.cpp picks a different grid for non-square images; `r1v_quant.runtime.mtmd` feeds InternVL's
tiles.

Quantization fallback: a 2-D weight whose row length the block size does not divide is written in F16 with
a warning (llama.cpp's converter does the same); with `strict=True` it raises R1VError instead. For the
real InternViT-6B (3200, 12800, 5120) the 32-blocks of Q8_0 / Q4_0 divide every row, so no fallback happens
there. Q4_0 is the lowest type offered: libmtmd loads and runs it (measured in bench/awq_vision.py).

Memory: tensor infos are declared from the checkpoint header first, then each tensor is read, converted and
appended (the fused qkv is read once for its three parts); the file appears under its name when complete.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from r1v_quant.model.arch import VISION_GGUF_LAYER, VISION_QKV_PARTS
from r1v_quant.model.checkpoint import open_checkpoint
from r1v_quant.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from r1v_quant.model.spec import VIT_PREFIX, ModelSpec, parse_config
from r1v_quant.model.storage import FILE_TYPES, MMPROJ_FILE_TYPES
from r1v_quant.runtime.gguf_lib import (
    add_general_metadata,
    add_tensor_infos,
    import_gguf,
    quantize_rows,
    tensor_nbytes,
    write_header,
)
from r1v_quant.util.atomic import atomic_file
from r1v_quant.util.errors import R1VError
from r1v_quant.util.hub import model_name
from r1v_quant.util.signals import deferred_interrupt

log = logging.getLogger(__name__)

MMPROJ_TYPES: dict[str, str] = {n: FILE_TYPES[n].ftype for n in MMPROJ_FILE_TYPES}
POSITION_FIXES = ("auto", "shift", "none")
POSITION_KEY = "r1v_quant.position_fix"
TILING_KEYS = {k: f"r1v_quant.{k}" for k in ("use_thumbnail", "dynamic_image_size", "ps_version")}

EMB = "vision_model.embeddings"
# checkpoint suffix under a ViT layer -> GGUF suffix under v.blk.N (qkv is handled apart: it splits)
LAYER_TENSORS = VISION_GGUF_LAYER
QKV_PARTS = VISION_QKV_PARTS


def normalize_mmproj_type(mmproj_type: str) -> str:
    name = str(mmproj_type).upper()
    if name not in MMPROJ_TYPES:
        raise R1VError(f"unsupported mmproj type {mmproj_type!r}: expected one of {', '.join(MMPROJ_TYPES)}")
    return name


@dataclass(frozen=True)
class MmprojTensor:
    name: str  # GGUF name
    source: str  # checkpoint tensor it comes from
    part: int | None  # 0/1/2 = q/k/v third of a fused qkv tensor, None = whole tensor
    shape: tuple[int, ...]  # logical numpy shape as stored
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


def _source_shapes(spec: ModelSpec) -> list[tuple[str, str, int | None, tuple[int, ...]]]:
    """(gguf name, checkpoint name, qkv part, shape) for every mmproj tensor, in file order."""
    v = spec.vision
    c = v.hidden_size
    shapes = spec.tensor_shapes()
    whole = [
        ("v.class_embd", f"{EMB}.class_embedding"),
        ("v.patch_embd.weight", f"{EMB}.patch_embedding.weight"),
        ("v.patch_embd.bias", f"{EMB}.patch_embedding.bias"),
        ("v.position_embd.weight", f"{EMB}.position_embedding"),
    ]
    out: list[tuple[str, str, int | None, tuple[int, ...]]] = [(g, h, None, shapes[h]) for g, h in whole]
    layer_shapes = spec.vision_layer_shapes()
    for i in range(v.num_layers):
        src = f"{VIT_PREFIX}.{i}"
        for kind in ("weight", "bias"):
            if f"attn.qkv.{kind}" in layer_shapes:
                shape = (c, c) if kind == "weight" else (c,)
                for p, part in enumerate(QKV_PARTS):
                    out.append((f"v.blk.{i}.{part}.{kind}", f"{src}.attn.qkv.{kind}", p, shape))
        for key, gname in LAYER_TENSORS.items():
            if key in layer_shapes:
                out.append((f"v.blk.{i}.{gname}", f"{src}.{key}", None, layer_shapes[key]))
    for idx in (0, 1, 3):
        for kind in ("weight", "bias"):
            hf = f"mlp1.{idx}.{kind}"
            out.append((f"mm.model.mlp.{idx}.{kind}", hf, None, shapes[hf]))
    return out


def plan_mmproj(
    spec: ModelSpec, mmproj_type: str = "F16", *, strict: bool = False
) -> tuple[list[MmprojTensor], list[str]]:
    """Every mmproj tensor with its storage type and size, plus the names that fell back to F16."""
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    mmproj_type = normalize_mmproj_type(mmproj_type)
    target = q[mmproj_type]
    block = gguf.GGML_QUANT_SIZES[target][0]
    plan: list[MmprojTensor] = []
    fallback: list[str] = []
    for name, source, part, shape in _source_shapes(spec):
        if name == "v.patch_embd.weight":
            # The converter's rule: a conv kernel is never block-quantized.
            qtype = q.F16 if mmproj_type == "F16" else q.F32
        elif len(shape) != 2 or not name.endswith(".weight") or "norm" in name:
            qtype = q.F32  # 1-D tensors, norms, CLS and the position table: small, and precision matters
        elif shape[-1] % block:
            if strict:
                raise R1VError(
                    f"{mmproj_type} cannot store {name} {list(shape)}: its row length {shape[-1]} is not a "
                    f"multiple of the {block}-element block (use F16, or strict=False to fall back to F16)"
                )
            qtype = q.F16
            fallback.append(name)
        else:
            qtype = target
        plan.append(MmprojTensor(name, source, part, shape, qtype, tensor_nbytes(shape, qtype)))
    return plan, fallback


def add_mmproj_metadata(writer: Any, spec: ModelSpec, mmproj_type: str) -> None:
    gguf = import_gguf()
    v = spec.vision
    writer.add_file_type(gguf.LlamaFileType[MMPROJ_TYPES[mmproj_type]])
    if mmproj_type in ("Q8_0", "Q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.INTERNVL)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_layers)
    writer.add_vision_head_count(v.num_heads)
    writer.add_vision_attention_layernorm_eps(v.eps)
    writer.add_vision_projection_dim(spec.llm.hidden_size)
    writer.add_vision_image_mean(list(IMAGENET_MEAN))
    writer.add_vision_image_std(list(IMAGENET_STD))
    writer.add_vision_projector_scale_factor(round(1 / spec.downsample_ratio))
    writer.add_vision_preproc_min_tiles(spec.min_dynamic_patch)
    writer.add_vision_preproc_max_tiles(spec.max_dynamic_patch)
    writer.add_vision_use_gelu(True)  # parse_config accepts only gelu for the ViT


def shift_positions(table: torch.Tensor) -> torch.Tensor:
    """Rows 1..N-1 then row 0: llama.cpp's patches-then-CLS order then adds InternVL's row to each token."""
    return torch.cat([table[:, 1:], table[:, :1]], dim=1)


def _convert(t: MmprojTensor, src: torch.Tensor, shift: bool) -> np.ndarray:
    """One tensor in its storage type (row blocks bound the float32 scratch for big weights)."""
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    if t.part is not None:
        n = src.shape[0] // 3
        src = src[t.part * n : (t.part + 1) * n]
    if shift:
        src = shift_positions(src)
    if tuple(src.shape) != t.shape:
        raise R1VError(f"{t.source}: shape {list(src.shape)} does not match the config's {list(t.shape)}")
    if t.qtype == q.F32:
        return np.ascontiguousarray(src.float().numpy())
    return quantize_rows(src, t.qtype, t.shape, t.source, "export F32 instead")


def write_mmproj(
    path: Path,
    spec: ModelSpec,
    get: Callable[[str], torch.Tensor],
    plan: list[MmprojTensor],
    *,
    mmproj_type: str,
    position_fix: str,
    name: str,
    model_dir: Path | None = None,
) -> None:
    """Write the planned tensors (read through `get`) to `path` (not atomic). `position_fix`: shift|none.
    `model_dir`: the source checkpoint, for the `general.*` metadata (without one: type and name only)."""
    gguf = import_gguf()
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    try:
        if model_dir is None:
            writer.add_type(gguf.GGUFType.MMPROJ)
            writer.add_name(name)
        else:  # the converter's general.* keys, from the source's card and folder
            add_general_metadata(writer, model_dir, sum(math.prod(t.shape) for t in plan), name, mmproj=True)
        add_mmproj_metadata(writer, spec, mmproj_type)
        # Which row order the position table is stored in (llama.cpp ignores unknown keys).
        writer.add_string(POSITION_KEY, position_fix)
        # InternVL tiling settings llama.cpp has no keys for; r1v-quant's runtime tiles by them.
        writer.add_bool(TILING_KEYS["use_thumbnail"], spec.use_thumbnail)
        writer.add_bool(TILING_KEYS["dynamic_image_size"], spec.dynamic_image_size)
        writer.add_string(TILING_KEYS["ps_version"], spec.ps_version)
        add_tensor_infos(writer, plan)
        write_header(writer, path)
        cached: tuple[str, torch.Tensor] | None = None  # the fused qkv is read once for its three parts
        for t in plan:
            if cached is None or cached[0] != t.source:
                cached = (t.source, get(t.source))
            shift = position_fix == "shift" and t.name == "v.position_embd.weight"
            writer.write_tensor_data(_convert(t, cached[1], shift))
    finally:
        writer.close()


def resolve_position_fix(position_fix: str) -> tuple[str, dict[str, Any]]:
    """'shift' or 'none' for the installed llama.cpp, and what the probe measured (auto only)."""
    if position_fix not in POSITION_FIXES:
        raise R1VError(f"unknown position_fix {position_fix!r}: expected one of {', '.join(POSITION_FIXES)}")
    if position_fix != "auto":
        return position_fix, {}
    try:
        probe = detect_position_order()
    except ImportError as e:  # pragma: no cover - llama-cpp-python is an optional extra
        log.warning("position_fix=auto: llama-cpp-python unavailable (%s); writing 'shift'", e)
        return "shift", {"probe": "unavailable"}
    except R1VError as e:
        if "not installed" not in str(e):
            raise
        log.warning("position_fix=auto: %s; writing 'shift' (llama.cpp's known order)", e)
        return "shift", {"probe": "unavailable"}
    return probe["position_fix"], probe


def export_mmproj_gguf(
    model_dir: Path | str,
    out_path: Path | str,
    mmproj_type: str = "F16",
    *,
    position_fix: str = "auto",
    strict: bool = False,
    flavor: str | None = None,
    staging: Path | str | None = None,
) -> dict[str, Any]:
    """Export the vision tower + mlp1 of the checkpoint at `model_dir` as an mmproj GGUF at `out_path`.

    `mmproj_type`: F16 | F32 | Q8_0 | Q4_0 (2-D weights; see the module docstring for the fixed-type tensors).
    `position_fix`: auto | shift | none (module docstring). `strict`: raise instead of falling back to F16
    for rows a Q8_0 block does not divide. Returns a report: path, type, position_fix, tensors, bytes,
    f16_fallback, probe (auto only), seconds. `staging`: write into that private folder instead and leave
    the file there for the caller to publish (the report's `staged`); `path` still names the final file.
    """
    t0 = time.perf_counter()
    mmproj_type = normalize_mmproj_type(mmproj_type)
    out_path = Path(out_path)
    if out_path.exists():
        raise R1VError(f"{out_path}: already exists (choose another path or remove it)")
    ckpt = open_checkpoint(model_dir, flavor=flavor)
    spec = ckpt.spec
    if spec.is_quantized:
        raise R1VError(f"{model_dir}: quantized checkpoint; mmproj export needs the 16-bit original")
    if spec.ps_version != "v2":
        # llama.cpp has only the v2 pixel shuffle; v1 transposes the token grid of every tile.
        log.warning(
            "ps_version %r: llama.cpp's graph orders tokens as v2; use r1v-quant's libmtmd runtime "
            "(which reorders) or expect transposed image tokens in llama.cpp",
            spec.ps_version,
        )
    plan, fallback = plan_mmproj(spec, mmproj_type, strict=strict)
    for name in fallback:
        log.warning("%s: row length not a multiple of the %s block; written as F16", name, mmproj_type)
    with deferred_interrupt():  # libmtmd logs through a Python callback, where Ctrl-C would be swallowed
        fix, probe = resolve_position_fix(position_fix)
    target = out_path if staging is None else Path(staging) / out_path.name
    with atomic_file(target) as tmp:
        write_mmproj(
            tmp, spec, ckpt.get, plan, mmproj_type=mmproj_type, position_fix=fix, name=model_name(ckpt.path),
            model_dir=ckpt.path,
        )  # fmt: skip
        _default_mode(tmp)
    report: dict[str, Any] = {
        "path": str(out_path),
        "type": mmproj_type,
        "position_fix": fix,
        "position_fix_requested": position_fix,
        "tensors": len(plan),
        "bytes": target.stat().st_size,
        "f16_fallback": fallback,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if probe:
        report["probe"] = probe
    if staging is not None:
        report["staged"] = [str(target)]
    return report


def mmproj_bytes_planned(spec: ModelSpec, mmproj_type: str = "F16") -> int:
    """Tensor bytes of the mmproj file (its metadata adds a few kB): for the up-front space check."""
    plan, _ = plan_mmproj(spec, normalize_mmproj_type(mmproj_type))
    return sum(t.nbytes for t in plan)


def _default_mode(path: Path) -> None:
    """The permissions a plain open() would give (atomic_file's mkstemp makes the file 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# -- position-order probe (it needs this writer and libmtmd; the runtime needs neither) --------------------
PROBE_CONFIG: dict[str, Any] = {
    "architectures": ["SkyworkR1VChatModel"],
    "template": "skywork-r1v",
    "downsample_ratio": 0.5,
    "force_image_size": 448,
    "ps_version": "v2",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 1,
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "patch_size": 14,
        "image_size": 448,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    },
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 259,
    },
}


def _probe_model(seed: int) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    from r1v_quant.model.vision import Projector, VisionModel

    spec = parse_config(PROBE_CONFIG)
    g = torch.Generator().manual_seed(seed)
    vm, mlp1 = VisionModel(spec.vision), Projector(spec.projector_in, spec.llm.hidden_size)
    state = {f"vision_model.{k}": v for k, v in vm.state_dict().items()}
    state.update({f"mlp1.{k}": v for k, v in mlp1.state_dict().items()})
    for k, v in state.items():
        if k.endswith(("norm1.weight", "norm2.weight", "mlp1.0.weight")):
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("position_embedding"):
            state[k] = torch.randn(v.shape, generator=g)  # large rows: a one-row shift is unmistakable
        else:
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
    return spec, state


def _reference(spec: ModelSpec, state: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
    from r1v_quant.model.vision import Projector, VisionModel, extract_feature

    vm, mlp1 = VisionModel(spec.vision), Projector(spec.projector_in, spec.llm.hidden_size)
    vm.load_state_dict(
        {k[len("vision_model.") :]: v for k, v in state.items() if k.startswith("vision_model.")}
    )
    mlp1.load_state_dict({k[len("mlp1.") :]: v for k, v in state.items() if k.startswith("mlp1.")})
    with torch.no_grad():
        return extract_feature(vm.eval(), mlp1.eval(), spec, pixel_values)


@functools.cache
def detect_position_order(seed: int = 0) -> dict[str, Any]:
    """Which stored position-row order makes the installed libmtmd reproduce InternVL: 'shift' or 'none'.

    A random probe ViT (1 layer x 64, large random position table) is written unchanged ('none') and run
    on one random tile; its output is compared with the torch reference in InternVL's order and with the
    reference whose table is rotated the way a CLS-last graph reads it. Cached per process.
    """
    from r1v_quant.runtime.mtmd import MtmdVision, cosine_rows, import_mtmd

    llama_cpp, _ = import_mtmd()
    spec, state = _probe_model(seed)
    rng = np.random.default_rng(seed)
    tile = Image.fromarray(rng.integers(0, 256, (spec.vision.image_size,) * 2 + (3,), dtype=np.uint8))
    pixels = torch.from_numpy(to_tensor(tile))[None]
    ref = _reference(spec, state, pixels)
    # What a CLS-last graph computes from an unchanged table: patch k gets row k, CLS the last row.
    cls_last = dict(state)
    table = state["vision_model.embeddings.position_embedding"]
    cls_last["vision_model.embeddings.position_embedding"] = torch.roll(table, 1, dims=1)
    ref_cls_last = _reference(spec, cls_last, pixels)
    with tempfile.TemporaryDirectory(prefix="r1v-probe-") as td:
        path = Path(td) / "probe-mmproj.gguf"
        plan, _ = plan_mmproj(spec, "F32")
        write_mmproj(
            path, spec, state.__getitem__, plan, mmproj_type="F32", position_fix="none", name="probe"
        )
        with MtmdVision(path, n_threads=1) as mv:
            got = mv.encode_tile(tile)
    as_is = float(cosine_rows(got, ref[0]).min())
    cls_last_cos = float(cosine_rows(got, ref_cls_last[0]).min())
    result = {
        "min_cosine_stored_order": round(as_is, 6),
        "min_cosine_cls_last_order": round(cls_last_cos, 6),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
    }
    if as_is > 0.999 and as_is > cls_last_cos:
        return {"position_fix": "none", **result}
    if cls_last_cos > 0.999 and cls_last_cos > as_is:
        return {"position_fix": "shift", **result}
    raise R1VError(
        f"position_fix=auto: the installed libmtmd matches neither position order ({result}); "
        "pass position_fix='shift' or 'none' explicitly"
    )
