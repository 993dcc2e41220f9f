"""AutoAWQ GEMM packing against the documented bit formula, and the quantizer it packs."""

from __future__ import annotations

import pytest
import torch

from r1v_quant.model.awq_layout import AWQ_ORDER, dequantize_awq, pack_awq, pack_columns, unpack_columns
from r1v_quant.model.groupwise import fake_quantize, quantize_weight
from r1v_quant.util.errors import R1VError


def test_pack_known_integers() -> None:
    # output columns 0..7 hold 0..7: word = sum(v[ORDER[i]] << 4i) = 0x75316420
    row = torch.arange(8).reshape(1, 8)
    assert int(pack_columns(row)[0, 0]) & 0xFFFFFFFF == 0x75316420
    # one nibble at a time, checked bit by bit against the formula
    for col in range(8):
        v = torch.zeros(1, 8, dtype=torch.int64)
        v[0, col] = 0xF
        word = int(pack_columns(v)[0, 0]) & 0xFFFFFFFF
        assert word == 0xF << (4 * AWQ_ORDER.index(col))
    # high nibble set -> negative int32, as AutoAWQ's int32 tensors store it
    v = torch.full((1, 8), 15)
    assert int(pack_columns(v)[0, 0]) == -1 and pack_columns(v).dtype == torch.int32


def test_pack_unpack_roundtrip_random() -> None:
    v = torch.randint(0, 16, (37, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_columns(pack_columns(v)), v)


def test_quantize_layout_and_dequant() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    qw = quantize_weight(w, 128)
    packed = pack_awq(qw)
    assert packed["qweight"].shape == (256, 8) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (2, 8) and packed["scales"].shape == (2, 64)
    assert packed["scales"].dtype == torch.float16
    deq = dequantize_awq(**packed)
    assert torch.equal(deq, fake_quantize(w, 128))
    # weight = (q - z) * s, written out for one element
    o, i = 5, 200
    q = int(qw.q[o, i])
    z, s = int(qw.zeros[o, i // 128]), float(qw.scales[o, i // 128])
    assert float(deq[o, i]) == pytest.approx((q - z) * s, abs=0)
    # 4-bit asymmetric error bound: half a step of rounding + up to half a step from the rounded zero
    assert torch.all((deq - w).abs() <= qw.scales.float().repeat_interleave(128, 1) + 1e-6)


def test_clip_narrows_range() -> None:
    w = torch.randn(8, 128)
    w[0, 0] = 50.0
    full = quantize_weight(w, 128)
    clipped = quantize_weight(w, 128, clip_max=torch.full((8, 1), 3.0), clip_min=torch.full((8, 1), -3.0))
    assert float(clipped.scales[0, 0]) < float(full.scales[0, 0])


def test_group_must_divide() -> None:
    with pytest.raises(R1VError, match="does not divide"):
        quantize_weight(torch.randn(4, 100), 128)
