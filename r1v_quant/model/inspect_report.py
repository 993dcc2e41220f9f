"""`r1v-quant inspect`: architecture, parameters per component, dtypes, weight memory per format.

Works from config.json + index alone (shapes come from the spec), so the real 38B layout can be
inspected without downloading 77 GB.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.spec import component_of, param_count
from r1v_quant.model.storage import LLM_FORMATS, mmproj_bytes, weight_bytes

COMPONENTS = ("vision", "projector", "decoder", "embeddings", "other")


def inspect_model(path: Path | str, *, flavor: str | None = None) -> dict[str, Any]:
    ckpt = Checkpoint(path, flavor=flavor, require_weights=False)
    spec = ckpt.spec
    shapes = spec.tensor_shapes()
    if ckpt.has_weights and not spec.is_quantized:
        ckpt.validate()
    params = {c: 0 for c in COMPONENTS}
    for name, shape in shapes.items():
        params[component_of(name)] += math.prod(shape)
    params = {k: v for k, v in params.items() if v}
    missing_in_index = [n for n in shapes if n not in ckpt.weight_map] if ckpt.weight_map else []
    dtypes: dict[str, int] = {}
    if ckpt.has_weights:
        dtypes = dict(Counter(i.dtype for i in (ckpt.info(n) for n in ckpt.names())))
    memory = {fmt: sum(weight_bytes(spec, fmt).values()) for fmt in LLM_FORMATS}
    v, m = spec.vision, spec.llm
    return {
        "path": str(ckpt.path),
        "flavor": spec.flavor,
        "architecture": spec.architecture,
        "quantized": spec.quantization,
        "has_weights": ckpt.has_weights,
        "tensors_in_index": len(ckpt.weight_map),
        "missing_in_index": missing_in_index[:10],
        "vision": {
            "layers": v.num_layers,
            "hidden": v.hidden_size,
            "heads": v.num_heads,
            "ffn": v.intermediate_size,
            "norm": v.norm_type,
            "qk_norm": v.qk_norm,
            "qkv_bias": v.qkv_bias,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
        },
        "projector": {
            "in": spec.projector_in,
            "out": m.hidden_size,
            "pixel_shuffle": spec.ps_version,
            "downsample_ratio": spec.downsample_ratio,
            "tokens_per_tile": spec.num_image_token,
        },
        "llm": {
            "layers": m.num_layers,
            "hidden": m.hidden_size,
            "heads": m.num_heads,
            "kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "ffn": m.intermediate_size,
            "vocab": m.vocab_size,
            "rope_theta": m.rope_theta,
        },
        "tiling": {
            "min": spec.min_dynamic_patch,
            "max": spec.max_dynamic_patch,
            "thumbnail": spec.use_thumbnail,
            "dynamic": spec.dynamic_image_size,
        },
        "tokens": spec.tokens.__dict__,
        "params": params,
        "params_total": param_count(shapes),
        "dtypes": dtypes,
        "weight_bytes": memory,
        "mmproj_bytes": {"F16": mmproj_bytes(spec, "F16"), "Q8_0": mmproj_bytes(spec, "Q8_0")},
    }


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.2f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n} {unit}"


def format_report(r: dict[str, Any]) -> str:
    v, p, m = r["vision"], r["projector"], r["llm"]
    lines = [
        f"{r['path']}  ({r['architecture']}, flavour {r['flavor']}"
        + (", AWQ-quantized" if r["quantized"] else "")
        + ")",
        f"  vision    InternViT {v['layers']} layers x {v['hidden']} ({v['heads']} heads, ffn {v['ffn']}), "
        f"{v['norm']}{', q/k-norm' if v['qk_norm'] else ''}{', qkv bias' if v['qkv_bias'] else ''}, "
        f"{v['image_size']}px / patch {v['patch_size']}",
        f"  projector mlp1 {p['in']} -> {p['out']}, pixel shuffle {p['pixel_shuffle']}, "
        f"{p['tokens_per_tile']} tokens per tile",
        f"  llm       Qwen2 {m['layers']} layers x {m['hidden']} ({m['heads']} heads / {m['kv_heads']} KV, "
        f"head dim {m['head_dim']}), ffn {m['ffn']}, vocab {m['vocab']}",
        "  parameters:",
    ]
    for comp, n in r["params"].items():
        lines.append(f"    {comp:<11}{_human(n, '')}")
    lines.append(f"    {'total':<11}{_human(r['params_total'], '')}  ({r['params_total']:,})")
    if r["dtypes"]:
        lines.append("  stored dtypes: " + ", ".join(f"{k} x{v}" for k, v in r["dtypes"].items()))
    elif not r["has_weights"]:
        lines.append("  (config + index only: shapes from the spec)")
    lines.append("  weight memory (vision + mlp1 kept 16-bit):")
    for fmt, b in r["weight_bytes"].items():
        lines.append(f"    {fmt:<14}{_human(b)}")
    mm = r["mmproj_bytes"]
    lines.append(f"  mmproj GGUF: F16 {_human(mm['F16'])}, Q8_0 {_human(mm['Q8_0'])}")
    return "\n".join(lines)
