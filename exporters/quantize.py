"""K-quants (and IQ4) through llama.cpp's own quantizer, `llama_model_quantize` in libllama.

The Python `gguf` package can only pack F16/BF16/Q8_0/Q4_x/Q5_x; K-quant packing and llama.cpp's per-tensor
type mix (e.g. Q4_K_M keeps attn_v/ffn_down of some layers and output.weight at Q6_K) live in C, so they
are never imitated here: we hand a 16-bit GGUF to libllama and rename its output into place when complete.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from r1v_quant.model.storage import FILE_TYPES
from r1v_quant.util.atomic import atomic_file
from r1v_quant.util.errors import R1VError
from r1v_quant.util.signals import die_with_parent, run_child

# Types the gguf package packs in Python: name -> (ggml type name, llama_ftype name for general.file_type).
PYTHON_TYPES: dict[str, tuple[str, str]] = {
    n: (t.base, t.ftype) for n, t in FILE_TYPES.items() if t.writer == "gguf-py"
}
# --type name -> llama_ftype constant name in llama_cpp. Only types that need no importance matrix:
# IQ1/IQ2/IQ3_XXS and Q2_K_S refuse to run without one (llama.cpp's `tensor_requires_imatrix`).
LLAMA_TYPES: dict[str, str] = {
    n: f"LLAMA_FTYPE_{t.ftype}" for n, t in FILE_TYPES.items() if t.writer == "llama.cpp"
}
GGUF_TYPES: tuple[str, ...] = (*PYTHON_TYPES, *LLAMA_TYPES)
FULL_DISK_BYTES = 64 * 1024**2  # less free space than this after a failed quantization: the disk filled up
# Python-packed types whose llama.cpp quantizer uses an importance matrix (Q8_0 ignores one): with an
# imatrix they go through libllama with `pure` (every 2-D weight in the one type, like our Python packing).
IMATRIX_PURE_TYPES: dict[str, str] = {
    n: f"LLAMA_FTYPE_{t.ftype}" for n, t in FILE_TYPES.items() if t.imatrix_pure
}


def normalize_type(gguf_type: str) -> str:
    name = gguf_type.upper()
    if name not in GGUF_TYPES:
        raise R1VError(f"unsupported GGUF type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    return name


def set_default_mode(path: Path) -> None:
    """Give a finished file the permissions a plain `open()` would (atomic_file's mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:  # an optional extra; the CPU/CUDA wheels are built from source
        raise R1VError(f"llama-cpp-python is not installed ({e}): pip install 'r1v-quant[gguf]'") from None
    return llama_cpp


def imatrix_array(lc: Any, imatrix: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """`llama_model_imatrix_data[]` ending in a null name, plus the objects that must outlive the call."""
    keep: list[Any] = []
    arr = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, name in enumerate(sorted(imatrix)):
        values = np.ascontiguousarray(imatrix[name], np.float32)
        if values.ndim != 1 or not np.isfinite(values).all():
            raise R1VError(f"importance matrix for {name}: expected finite values, one per input column")
        key = name.encode()
        keep += [values, key]
        arr[i].name = key
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(imatrix)].name = None  # terminator
    return arr, keep


def llama_quantize(
    src: Path | str,
    dst: Path | str,
    gguf_type: str,
    *,
    nthread: int = 0,
    imatrix: dict[str, np.ndarray] | None = None,
    verbose: bool = False,
) -> None:
    """Quantize the 16/32-bit GGUF `src` to `gguf_type` (a key of LLAMA_TYPES) at `dst`, atomically.

    `nthread` <= 0 uses every core. `imatrix`: per-column importance (mean x²) per GGUF weight name, handed
    to libllama as `llama_model_quantize_params.imatrix`; with one, IMATRIX_PURE_TYPES are accepted too.
    `verbose`: libllama's per-tensor log on stderr.

    libllama runs in a child process (`python -m r1v_quant.exporters.quantize`): its quantizer has no
    abort hook, and a Ctrl-C that lands in its log callback would be swallowed there, so in-process it
    could be neither interrupted nor stopped cleanly. The child is killed on Ctrl-C and dies with its
    parent (r1v_quant.util.signals.run_child). The output is written under a temporary name next to `dst` and
    renamed only when libllama reports success, so `dst` never holds a half-written file.
    """
    name = gguf_type.upper()
    pure = imatrix is not None and name in IMATRIX_PURE_TYPES
    if name not in LLAMA_TYPES and not pure:
        raise R1VError(
            f"llama.cpp quantization type {gguf_type!r} is not supported: {', '.join(LLAMA_TYPES)}"
        )
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise R1VError(f"{src}: no such GGUF file")
    import_llama_cpp()  # a missing extra is reported here, in one line, not by the child
    request: dict[str, Any] = {
        "src": str(src),
        "ftype": IMATRIX_PURE_TYPES[name] if pure else LLAMA_TYPES[name],
        "nthread": nthread if nthread > 0 else (os.cpu_count() or 1),
        "pure": pure,
        "verbose": verbose,
        "parent": os.getpid(),
    }
    with atomic_file(dst) as tmp:
        request["dst"] = str(tmp)
        matrix = tmp.with_name(tmp.name + ".imatrix.npz")
        try:
            if imatrix is not None:
                for key, values in imatrix.items():
                    v = np.asarray(values)
                    if v.ndim != 1 or not np.isfinite(v).all():
                        raise R1VError(
                            f"importance matrix for {key}: expected finite values, one per input column"
                        )
                np.savez(matrix, **{k: np.ascontiguousarray(v, np.float32) for k, v in imatrix.items()})
                request["imatrix"] = str(matrix)
            rc = run_child([sys.executable, "-m", __name__, json.dumps(request)])
        finally:
            matrix.unlink(missing_ok=True)
        if rc != 0 and shutil.disk_usage(tmp.parent).free < FULL_DISK_BYTES:
            # libllama reports a failed write only as "failed"; a full disk is the common reason
            raise R1VError(
                f"{dst.parent}: no space left on device (nothing was written under the final name)"
            )
        if rc != 0:
            # libllama logs the reason to stderr; the return code alone says only "failed".
            raise R1VError(
                f"llama.cpp failed to quantize {src.name} to {name} (code {rc}; see its log above)"
            )
        set_default_mode(tmp)


def _quantize_child(request: dict[str, Any]) -> int:
    """The child's side of `llama_quantize`: one libllama call; returns its status."""
    import logging

    die_with_parent(int(request["parent"]))
    lc = import_llama_cpp()
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if request["verbose"] else logging.ERROR)
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, request["ftype"])
    params.nthread = int(request["nthread"])
    params.pure = bool(request["pure"])
    keep: list[Any] = []
    if request.get("imatrix"):
        with np.load(request["imatrix"], allow_pickle=False) as z:
            arr, keep = imatrix_array(lc, {k: z[k] for k in z.files})
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_imatrix_data))
        keep.append(arr)
    rc = lc.llama_model_quantize(request["src"].encode(), request["dst"].encode(), ctypes.byref(params))
    del keep  # the arrays libllama read from had to stay alive until here
    return int(rc)


if __name__ == "__main__":
    try:
        sys.exit(1 if _quantize_child(json.loads(sys.argv[1])) else 0)
    except R1VError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
