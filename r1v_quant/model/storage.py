"""The storage-type registry: every block type and every GGUF file type r1v-quant writes, declared once.

`gguf --type`, `inspect`, `plan`, the mmproj writer, the activation-aware proxy and the llama.cpp quantizer
wrapper all read these tables. A file type's per-tensor choices (which tensors get more bits) follow
llama.cpp's `llama_tensor_get_type` for a dense, non-Falcon model, so predicted sizes match what
`llama-quantize` writes to within the metadata kilobytes (a test quantizes the replica with libllama
and compares every tensor's type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1v_quant.model.arch import VISION_LINEARS
from r1v_quant.model.spec import LLM_PREFIX, ModelSpec, component_of


@dataclass(frozen=True)
class BlockType:
    """A ggml block type: `block` elements stored in `nbytes` bytes."""

    name: str
    block: int
    nbytes: int

    @property
    def bits(self) -> float:
        return self.nbytes * 8 / self.block


BLOCK_TYPES: dict[str, BlockType] = {
    b.name: b
    for b in (
        BlockType("F32", 1, 4),
        BlockType("F16", 1, 2),
        BlockType("BF16", 1, 2),
        BlockType("Q8_0", 32, 34),
        BlockType("Q4_0", 32, 18),
        BlockType("Q4_1", 32, 20),
        BlockType("Q5_0", 32, 22),
        BlockType("Q5_1", 32, 24),
        BlockType("IQ4_NL", 32, 18),
        BlockType("Q2_K", 256, 84),
        BlockType("Q3_K", 256, 110),
        BlockType("Q4_K", 256, 144),
        BlockType("Q5_K", 256, 176),
        BlockType("Q6_K", 256, 210),
        BlockType("IQ4_XS", 256, 136),
    )
}
# bits per weight of one block type (block bytes * 8 / block size)
GGML_BITS: dict[str, float] = {name: b.bits for name, b in BLOCK_TYPES.items()}


@dataclass(frozen=True)
class FileType:
    """One `gguf --type` value.

    writer: "gguf-py" (packed in Python by the gguf package, every 2-D weight in `base`) or "llama.cpp"
    (libllama's quantizer from a 16-bit GGUF, with its per-tensor mix). `ftype`: the llama_ftype constant
    (general.file_type; libllama's quantizer argument). `act_block`: the activation block llama.cpp's CPU
    matmul rounds to int8 for this weight type (Q8_0: 32, Q8_K: 256), used by the activation-aware proxy.
    `imatrix_pure`: a Python-packed type that goes through libllama (`pure`, one type for every weight)
    when an importance matrix is given, since only libllama's quantizer uses one.
    """

    name: str
    base: str
    writer: str
    ftype: str
    act_block: int = 0
    imatrix_pure: bool = False


FILE_TYPES: dict[str, FileType] = {
    t.name: t
    for t in (
        FileType("F32", "F32", "gguf-py", "ALL_F32"),
        FileType("F16", "F16", "gguf-py", "MOSTLY_F16"),
        FileType("BF16", "BF16", "gguf-py", "MOSTLY_BF16"),
        FileType("Q8_0", "Q8_0", "gguf-py", "MOSTLY_Q8_0", 32),
        FileType("Q4_0", "Q4_0", "gguf-py", "MOSTLY_Q4_0", 32, imatrix_pure=True),
        FileType("Q2_K", "Q2_K", "llama.cpp", "MOSTLY_Q2_K", 256),
        FileType("Q3_K_S", "Q3_K", "llama.cpp", "MOSTLY_Q3_K_S", 256),
        FileType("Q3_K_M", "Q3_K", "llama.cpp", "MOSTLY_Q3_K_M", 256),
        FileType("Q3_K_L", "Q3_K", "llama.cpp", "MOSTLY_Q3_K_L", 256),
        FileType("Q4_K_S", "Q4_K", "llama.cpp", "MOSTLY_Q4_K_S", 256),
        FileType("Q4_K_M", "Q4_K", "llama.cpp", "MOSTLY_Q4_K_M", 256),
        FileType("Q5_K_S", "Q5_K", "llama.cpp", "MOSTLY_Q5_K_S", 256),
        FileType("Q5_K_M", "Q5_K", "llama.cpp", "MOSTLY_Q5_K_M", 256),
        FileType("Q6_K", "Q6_K", "llama.cpp", "MOSTLY_Q6_K", 256),
        FileType("IQ4_NL", "IQ4_NL", "llama.cpp", "MOSTLY_IQ4_NL", 32),
        FileType("IQ4_XS", "IQ4_XS", "llama.cpp", "MOSTLY_IQ4_XS", 256),
    )
}
# the mmproj: llama.cpp's CLIP loader reads these for the vision tower and projector (Q4_0: the lowest
# type measured through libmtmd, bench/awq_vision.py)
MMPROJ_FILE_TYPES: tuple[str, ...] = ("F32", "F16", "Q8_0", "Q4_0")
# weight types llama.cpp's CPU backend repacks into interleaved layouts on x86-64 with AVX2 / AVX-512
# (its CPU_REPACK buffer; the embedding table is read by row and stays as stored)
REPACKED_BLOCK_TYPES: tuple[str, ...] = ("Q4_0", "Q4_K", "IQ4_NL")

AWQ_FORMAT = "awq-int4-g128"
# what `plan` proposes and `inspect` lists: the 16-bit checkpoint, AWQ int4 and the common GGUF types, largest
# first (`weight_bytes` sizes every SIZED_FORMATS entry)
LLM_FORMATS: tuple[str, ...] = ("bf16", AWQ_FORMAT, "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
SIZED_FORMATS: tuple[str, ...] = ("bf16", AWQ_FORMAT, *FILE_TYPES)


# The vision tower as `r1v-quant awq --vision` stores it: 16-bit, or its encoder linears (attn.qkv,
# attn.proj, mlp.fc1, mlp.fc2) AWQ-packed; patch/position embeddings, norms, ls1/ls2 and mlp1 stay 16-bit.
VISION_FORMATS = ("bf16", "awq-int4-g128", "awq-int8-g128")
_VISION_LINEAR_SUFFIXES = tuple(f".{lin}.weight" for lin in VISION_LINEARS)


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
    return name.startswith("vision_model.encoder.layers.") and name.endswith(_VISION_LINEAR_SUFFIXES)


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp: the first and last eighth of layers, and every third one between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix(kind: str, ftype: str, i: int, n: int, gqa: int, imatrix: bool) -> str | None:
    """llama.cpp's per-category choice for a decoder weight (None: the file type's base)."""
    if kind == "attn_v":
        if ftype == "Q2_K":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            return "Q5_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and i < 4:
            return "Q5_K"
    elif kind == "ffn_down":
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype in ("Q4_K_M", "Q5_K_M"):
            return "Q6_K" if _use_more_bits(i, n) else None
        if ftype in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not imatrix:
            return "Q5_K"
        if ftype == "Q4_K_S" and i < n // 8:
            return "Q5_K"
        if ftype == "Q4_0" and imatrix and i < n // 8:
            return "Q4_1"
    elif kind == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype)
    return None


# llama.cpp's fallback when a row length is not a multiple of the block size
_FALLBACK = {
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL",
}  # fmt: skip


def _fit(block_type: str, ncols: int) -> str:
    if ncols % BLOCK_TYPES[block_type].block == 0:
        return block_type
    fallback = _FALLBACK.get(block_type, "F16")
    return fallback if ncols % BLOCK_TYPES[fallback].block == 0 else "F16"


def gguf_type(
    name: str, ftype: str, n_layers: int, *, gqa: int = 1, ncols: int = 0, imatrix: bool = False
) -> str:
    """GGML type llama.cpp gives a language-model tensor (HF name) under a file type.

    `gqa`: query heads per KV head; `ncols`: the row length (0 = compatible with every block);
    `imatrix`: an importance matrix is used (llama.cpp then keeps IQ4's first ffn_down layers at base).
    """
    t = FILE_TYPES.get(ftype)
    if t is None:
        raise ValueError(f"unknown GGUF type {ftype}")
    if not name.endswith(".weight") or name.endswith("norm.weight"):
        return "F32"
    if t.writer == "gguf-py" and not (imatrix and t.imatrix_pure):
        return t.base
    base = t.base
    if t.writer == "gguf-py":  # pure: one type everywhere
        return _fit(base, ncols) if ncols else base
    if name.endswith("lm_head.weight"):
        if ncols and ncols % BLOCK_TYPES[base].block:
            return "Q8_0"
        return "Q6_K" if base != "Q8_0" else base
    chosen = base
    if name.startswith(LLM_PREFIX):
        i = int(name[len(LLM_PREFIX) + 1 :].split(".")[0])
        kind = (
            "attn_v"
            if ".v_proj." in name
            else "ffn_down"
            if ".down_proj." in name
            else "attn_output"
            if ".o_proj." in name
            else ""
        )
        chosen = _mix(kind, ftype, i, n_layers, gqa, imatrix) or base
    return _fit(chosen, ncols) if ncols else chosen


def tensor_bits(
    name: str, fmt: str, spec: ModelSpec, vision: str = "bf16", shape: tuple[int, ...] | None = None
) -> float:
    """Bits per element of one checkpoint tensor when the LLM is stored as `fmt` and the vision tower as
    `vision` (one of VISION_FORMATS)."""
    comp = component_of(name)
    awq_vision = parse_awq(vision)
    if comp == "vision" and awq_vision and is_vision_linear(name):
        return awq_bits(awq_vision[1], awq_vision[0])
    if fmt == "bf16" or comp in ("vision", "projector"):
        return 16.0
    if fmt == AWQ_FORMAT:
        if comp == "decoder" and name.endswith("_proj.weight"):
            return awq_bits(128)
        return 16.0
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return 32.0  # GGUF keeps 1-D tensors in F32
    shape = spec.tensor_shapes().get(name, ()) if shape is None else shape
    gqa = spec.llm.num_heads // spec.llm.num_kv_heads
    return GGML_BITS[gguf_type(name, fmt, spec.llm.num_layers, gqa=gqa, ncols=shape[-1] if shape else 0)]


def weight_bytes(spec: ModelSpec, fmt: str, vision: str = "bf16") -> dict[str, int]:
    """Bytes per component (vision, projector, decoder, embeddings, other) when the LLM is stored as `fmt`
    and the vision tower as `vision`."""
    out: dict[str, float] = {}
    for name, shape in spec.tensor_shapes().items():
        comp = component_of(name)
        out[comp] = out.get(comp, 0.0) + math.prod(shape) * tensor_bits(name, fmt, spec, vision, shape) / 8
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
