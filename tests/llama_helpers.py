"""Shared helper of the llama.cpp tests (import it after `pytest.importorskip("llama_cpp")`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits at every position of `ids` from llama.cpp's own `Llama` (not r1v-quant's runtime)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
