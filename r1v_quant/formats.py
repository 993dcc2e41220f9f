"""Bytes per weight of each storage format, and which tensors each export keeps at which type.

Shared by `inspect` and the memory planner. GGUF K-quant mixes follow llama.cpp's rules for Q4_K_M /
Q5_K_M (attn_v and ffn_down get Q6_K on the "use more bits" layers; the output matrix gets Q6_K), so
the sizes match what llama.cpp writes to within the few metadata kilobytes.
"""

from __future__ import annotations

import math

from r1v_quant.spec import LLM_PREFIX, ModelSpec, component_of

# bits per weight of one block type (block bytes * 8 / block size)
GGML_BITS = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q4_0": 4.5,
    "Q4_1": 5.0,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "Q2_K": 2.625,
    "Q3_K": 3.4375,
    "Q4_K": 4.5,
    "Q5_K": 5.5,
    "Q6_K": 6.5625,
}

LLM_FORMATS = ("bf16", "awq-int4-g128", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
K_MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
# The vision tower as `r1v-quant awq --vision` stores it: 16-bit, or its encoder linears (attn.qkv,
# attn.proj, mlp.fc1, mlp.fc2) AWQ-packed; patch/position embeddings, norms, ls1/ls2 and mlp1 stay 16-bit.
VISION_FORMATS = ("bf16", "awq-int4-g128", "awq-int8-g128")
VISION_LINEARS = (".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc1.weight", ".mlp.fc2.weight")


def awq_bits(group_size: int = 128, bits: int = 4) -> float:
    """Packed weight + fp16 scale + packed zero point per group of `group_size` input channels."""
    return bits + (16.0 + bits) / group_size


def parse_awq(fmt: str) -> tuple[int, int] | None:
    """(bits, group size) of an "awq-int{bits}-g{group}" format name; None for anything else."""
    if not fmt.startswith("awq-int"):
        return None
    bits, _, group = fmt[len("awq-int") :].partition("-g")
    return int(bits), int(group)


def is_vision_linear(name: str) -> bool:
    return name.startswith("vision_model.encoder.layers.") and name.endswith(VISION_LINEARS)


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp llama-quant.cpp: the first and last eighth of layers, and every third one between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_type(name: str, ftype: str, n_layers: int) -> str:
    """GGML type llama.cpp gives a language-model tensor (HF name) under a file type."""
    if not name.endswith(".weight") or name.endswith("norm.weight"):
        return "F32"
    if ftype in ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return ftype
    if ftype == "Q6_K":
        return "Q6_K"
    base = K_MIXES.get(ftype)
    if base is None:
        raise ValueError(f"unknown GGUF type {ftype}")
    if name.endswith("lm_head.weight"):
        return "Q6_K"
    if name.startswith(LLM_PREFIX) and (".v_proj." in name or ".down_proj." in name):
        i = int(name[len(LLM_PREFIX) + 1 :].split(".")[0])
        return "Q6_K" if _use_more_bits(i, n_layers) else base
    return base


def tensor_bits(name: str, fmt: str, spec: ModelSpec, vision: str = "bf16") -> float:
    """Bits per element of one checkpoint tensor when the LLM is stored as `fmt` and the vision tower as
    `vision` (one of VISION_FORMATS)."""
    comp = component_of(name)
    awq_vision = parse_awq(vision)
    if comp == "vision" and awq_vision and is_vision_linear(name):
        return awq_bits(awq_vision[1], awq_vision[0])
    if fmt == "bf16" or comp in ("vision", "projector"):
        return 16.0
    if fmt == "awq-int4-g128":
        if comp == "decoder" and name.endswith("_proj.weight"):
            return awq_bits(128)
        return 16.0
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return 32.0  # GGUF keeps 1-D tensors in F32
    return GGML_BITS[gguf_type(name, fmt, spec.llm.num_layers)]


def weight_bytes(spec: ModelSpec, fmt: str, vision: str = "bf16") -> dict[str, int]:
    """Bytes per component (vision, projector, decoder, embeddings, other) when the LLM is stored as `fmt`
    and the vision tower as `vision`."""
    out: dict[str, float] = {}
    for name, shape in spec.tensor_shapes().items():
        comp = component_of(name)
        out[comp] = out.get(comp, 0.0) + math.prod(shape) * tensor_bits(name, fmt, spec, vision) / 8
    return {k: int(v) for k, v in out.items()}


def mmproj_bytes(spec: ModelSpec, mmproj_type: str = "F16") -> int:
    """Vision tower + projector as an mmproj GGUF: 2-D matrices at `mmproj_type`, the rest F32."""
    total = 0.0
    for name, shape in spec.tensor_shapes().items():
        if component_of(name) not in ("vision", "projector"):
            continue
        big = len(shape) >= 2 and "position_embedding" not in name and "class_embedding" not in name
        total += math.prod(shape) * (GGML_BITS[mmproj_type] if big else 32.0) / 8
    return int(total)
