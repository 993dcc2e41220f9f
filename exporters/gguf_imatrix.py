"""llama.cpp importance matrices: per-column mean x² of each weight's input, keyed by GGUF tensor name.

Two uses of the same numbers:
* handed straight to libllama's quantizer (`llama_model_quantize_params.imatrix`, see quantize.py);
* written as llama.cpp's imatrix GGUF so `llama-quantize --imatrix FILE` can reuse them. The layout is
  what `tools/imatrix/imatrix.cpp` (`save_imatrix`) writes and `common/imatrix-loader.cpp` reads in the
  llama.cpp vendored by llama-cpp-python 0.3.36: `general.type = imatrix`, `imatrix.datasets` (string
  array), `imatrix.chunk_count` and `imatrix.chunk_size` (u32; the quantize tool refuses a GGUF imatrix
  without all three), and per weight two F32 tensors `<name>.in_sum2` (ne = [columns, 1]: the raw sum of
  x²) and `<name>.counts` (ne = [1, 1]: tokens summed). llama-quantize divides the one by the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r1v_quant.exporters.quantize import set_default_mode
from r1v_quant.runtime.gguf_lib import import_gguf
from r1v_quant.util.atomic import atomic_file
from r1v_quant.util.errors import R1VError

IMATRIX_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class Imatrix:
    """Sums of x² per input column and the token count behind them, per GGUF weight name."""

    sums: dict[str, np.ndarray]  # name -> float32 (columns,)
    counts: dict[str, int]
    dataset: str = ""  # what the statistics were computed on (the calibration set hash)
    chunk_count: int = 0  # llama-imatrix: chunks processed; here: calibration samples
    chunk_size: int = 0  # llama-imatrix: tokens per chunk; here: the calibration sequence length

    def means(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer receives: in_sum2 / counts, in float32 as llama-quantize computes it."""
        out = {}
        for name, s in self.sums.items():
            s32 = np.asarray(s, np.float32)
            c = np.float32(self.counts[name])
            out[name] = s32 / c if c > 0 else np.ones_like(s32)  # llama-quantize: 1 for unseen columns
        return out

    def check_finite(self) -> None:
        for name, s in self.sums.items():
            if not np.isfinite(s).all():
                raise R1VError(f"importance matrix for {name} has NaN/Inf (broken calibration statistics?)")


def write_imatrix_gguf(imatrix: Imatrix, path: Path | str) -> Path:
    """Write `imatrix` as llama.cpp's GGUF imatrix file at `path` (atomically); returns the path."""
    gguf = import_gguf()
    imatrix.check_finite()
    path = Path(path)
    if path.exists():
        raise R1VError(f"{path}: already exists")
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(path=None, arch=IMATRIX_TYPE)
        # GGUFWriter always adds general.architecture; llama-imatrix writes none (readers ignore it anyway)
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        try:
            writer.add_type(IMATRIX_TYPE)
            writer.add_array(KEY_DATASETS, [imatrix.dataset or "unknown"])
            writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
            writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
            for name in sorted(imatrix.sums):  # llama-imatrix sorts too: deterministic files
                writer.add_tensor(name + SUM_SUFFIX, np.asarray(imatrix.sums[name], np.float32)[None, :])
                writer.add_tensor(name + COUNT_SUFFIX, np.array([[imatrix.counts[name]]], np.float32))
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        set_default_mode(tmp)
    return path


def read_imatrix_gguf(path: Path | str) -> Imatrix:
    """Read an imatrix GGUF (ours or llama-imatrix's), as common_imatrix_load does."""
    gguf = import_gguf()
    try:
        r = gguf.GGUFReader(Path(path))
    except (OSError, ValueError) as e:
        raise R1VError(f"{path}: not a GGUF imatrix ({e})") from None

    def value(key: str, default):
        f = r.get_field(key)
        return f.contents() if f is not None else default

    if value("general.type", None) != IMATRIX_TYPE:
        raise R1VError(f"{path}: general.type is not 'imatrix'")
    tensors = {t.name: t for t in r.tensors}
    sums, counts = {}, {}
    for name, t in tensors.items():
        if not name.endswith(SUM_SUFFIX):
            continue
        base = name[: -len(SUM_SUFFIX)]
        c = tensors.get(base + COUNT_SUFFIX)
        if c is None:
            raise R1VError(f"{path}: {name} has no matching {base + COUNT_SUFFIX}")
        sums[base] = np.array(t.data, np.float32).reshape(-1)
        counts[base] = int(round(float(np.asarray(c.data).reshape(-1)[0])))
    datasets = value(KEY_DATASETS, [])
    return Imatrix(
        sums,
        counts,
        dataset=datasets[0] if datasets else "",
        chunk_count=int(value(KEY_CHUNK_COUNT, 0)),
        chunk_size=int(value(KEY_CHUNK_SIZE, 0)),
    )
