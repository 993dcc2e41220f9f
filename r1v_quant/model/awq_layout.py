"""The AutoAWQ "GEMM" tensor layout that vLLM, transformers (via GPTQModel) and LMDeploy load.

Per linear: `qweight` int32 [in, out/8] and `qzeros` int32 [in/g, out/8], eight 4-bit values per int32
packed along the output dimension in the nibble order [0, 2, 4, 6, 1, 3, 5, 7] (value of output column
8c + ORDER[i] sits in bits 4i..4i+3 of word c); `scales` fp16 [in/g, out]; weight = (q - z) * s.
"""

from __future__ import annotations

import torch

from r1v_quant.model.groupwise import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 32 bits / 4 bits


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in 0..15 -> int32 [rows, cols/8] in AWQ nibble order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"AWQ packing needs a multiple of 8 output columns, got {cols}")
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        packed |= v[..., col] << (4 * i)
    return _to_int32(packed)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_columns: int32 [rows, cols/8] -> int64 [rows, cols] in 0..15."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    rows, words = p.shape
    out = torch.empty(rows, words, PACK, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        out[..., col] = (p >> (4 * i)) & 0xF
    return out.reshape(rows, words * PACK)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    # values are < 2^32; reinterpret the upper half as negative int32 like the C packers do
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight of a Linear [out, in] -> {qweight, qzeros, scales} in AutoAWQ GEMM layout."""
    if qw.bits != 4:
        raise ValueError("the AWQ GEMM layout is 4-bit")
    return {
        "qweight": pack_columns(qw.q.T.contiguous()),  # [in, out/8]
        "qzeros": pack_columns(qw.zeros.T.contiguous()),  # [in/g, out/8]
        "scales": qw.scales.T.contiguous().to(torch.float16),  # [in/g, out]
    }


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    q = unpack_columns(qweight).T.contiguous().to(torch.uint8)  # [out, in]
    z = unpack_columns(qzeros).T.contiguous().to(torch.uint8)  # [out, in/g]
    s = scales.T.contiguous().to(torch.float16)
    group = q.shape[1] // z.shape[1]
    return QuantizedWeight(q, s, z, group, 4)


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Linear weight [out, in] from the packed tensors: (q - z) * s."""
    return unpack_awq(qweight, qzeros, scales).dequantize(dtype)


def awq_state_dict(
    ckpt, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Dense state dict of an AWQ checkpoint (decoder linears dequantized) on `device`, for r1v-quant's
    own loader (checks, profiler, chat). `ckpt` is an r1v_quant.model.checkpoint.Checkpoint; tensors are read
    and dequantized one at a time on the host, then moved.
    """
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.names():
        if name.endswith((".qzeros", ".scales")):
            continue
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            state[f"{base}.weight"] = dequantize_awq(
                ckpt.get(name), ckpt.get(f"{base}.qzeros"), ckpt.get(f"{base}.scales"), dtype
            ).to(device)
        else:
            state[name] = ckpt.get(name).to(device=device, dtype=dtype)
    return state
