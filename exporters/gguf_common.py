"""Pieces shared by the language-model GGUF, the mmproj GGUF and the libmtmd runtime."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from r1v_quant.errors import R1VError

ROW_BLOCK_BYTES = 256 * 1024**2  # float32 scratch per conversion step, whatever the tensor size
F16_MAX = 65504.0


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise R1VError(f"the gguf package is not installed ({e}): pip install 'r1v-quant[gguf]'") from None
    return gguf


def quantize_rows(
    src: torch.Tensor,
    qtype: Any,
    shape: tuple[int, ...],
    name: str,
    f16_hint: str,
    row_block_bytes: int = ROW_BLOCK_BYTES,
) -> np.ndarray:
    """A tensor (2-D or more) in GGML type `qtype`, converted in row blocks to bound the float32 scratch.

    Float types come back in `shape`; block-quantized types as the byte array gguf's writer expects.
    """
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    rows, cols = src.shape[0], math.prod(src.shape[1:])
    flat = src.reshape(rows, cols)
    if qtype == q.F32:
        out = np.empty((rows, cols), np.float32)
    elif qtype == q.F16:
        out = np.empty((rows, cols), np.float16)
    else:
        out = np.empty(gguf.quant_shape_to_byte_shape((rows, cols), qtype), np.uint8)
    step = max(1, row_block_bytes // (4 * cols))
    for i in range(0, rows, step):
        block = flat[i : i + step].float().numpy()
        if qtype == q.F16 and np.abs(block).max(initial=0.0) > F16_MAX:
            raise R1VError(f"tensor {name!r} has values beyond the float16 range: {f16_hint}")
        out[i : i + step] = gguf.quants.quantize(block, qtype)
    return out.reshape(shape) if qtype in (q.F32, q.F16) else out


@contextmanager
def llama_log(verbose: bool) -> Iterator[None]:
    # libllama and libmtmd print through llama-cpp-python's logger (INFO lines per tensor otherwise)
    logger = logging.getLogger("llama-cpp-python")
    old = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)
