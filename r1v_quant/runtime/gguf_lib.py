"""Pieces shared by the language-model GGUF, the mmproj GGUF and the libmtmd runtime."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import torch

from r1v_quant.util.errors import R1VError
from r1v_quant.util.finite import describe_value, first_nonfinite

ROW_BLOCK_BYTES = 256 * 1024**2  # float32 scratch per conversion step, whatever the tensor size
F16_MAX = 65504.0


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise R1VError(f"the gguf package is not installed ({e}): pip install 'r1v-quant[gguf]'") from None
    return gguf


# general.sampling.* keys the converter copies from generation_config.json (gguf.Metadata.load's list)
_SAMPLING = {
    "sampling_sequence": "sequence", "sampling_top_k": "top_k", "sampling_top_p": "top_p",
    "sampling_min_p": "min_p", "sampling_xtc_probability": "xtc_probability",
    "sampling_xtc_threshold": "xtc_threshold", "sampling_temp": "temperature",
    "sampling_penalty_last_n": "penalty_last_n", "sampling_penalty_repeat": "penalty_repeat",
    "sampling_mirostat": "mirostat", "sampling_mirostat_tau": "mirostat_tau",
    "sampling_mirostat_eta": "mirostat_eta",
}  # fmt: skip


def general_metadata(model_dir: Path | str, total_params: int, fallback_name: str) -> Any:
    """The `general.*` metadata llama.cpp's convert_hf_to_gguf.py derives for a checkpoint, with gguf-py's
    own `gguf.Metadata` heuristics: the source's model card (name, basename, size label, license,
    `base_model` list -> general.base_model.*, tags, languages), config.json's `_name_or_path`, the folder
    name, generation_config.json's sampling settings, and a size label from the parameter count.

    A Hub snapshot's folder is named by its commit, so there the repo id stands in for the folder name
    (org -> organization, `Name-38B` -> basename and size label) and, as what this file was quantized from
    (the model card's `base_model`), comes first in general.base_model.* with its Hub URL.
    """
    gguf = import_gguf()
    from r1v_quant.util.hub import hub_source

    model_dir = Path(model_dir)
    meta_cls = gguf.Metadata
    card = meta_cls.load_model_card(model_dir)
    hf = meta_cls.load_hf_parameters(model_dir)
    src = hub_source(model_dir)
    if src is not None:
        hf = {**hf, "_name_or_path": src.repo_id}
    meta = meta_cls.apply_metadata_heuristic(
        meta_cls(), card, hf, None if src is not None else model_dir, total_params
    )
    gen = meta_cls.load_generation_config(model_dir)
    for attr, key in _SAMPLING.items():
        if key in gen:
            setattr(meta, attr, gen[key])
    if src is not None:
        name, org, _, _, version, _ = meta_cls.get_model_id_components(src.repo_id, total_params)
        entry = {
            "name": meta_cls.id_to_title(name or src.repo_id),
            "repo_url": f"https://huggingface.co/{src.repo_id}",
        }
        if org:
            entry["organization"] = meta_cls.id_to_title(org)
        if version:
            entry["version"] = version
        meta.base_models = [entry, *(b for b in meta.base_models or [] if b != entry)]
    if meta.name is None:
        meta.name = fallback_name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, 0, 0, 0)
    return meta


def add_general_metadata(
    writer: Any, model_dir: Path | str, total_params: int, fallback_name: str, *, mmproj: bool = False
) -> None:
    """`general.type` (model / mmproj) and the converter's `general.*` keys (see `general_metadata`)."""
    gguf = import_gguf()
    writer.add_type(gguf.GGUFType.MMPROJ if mmproj else gguf.GGUFType.MODEL)
    general_metadata(model_dir, total_params, fallback_name).set_gguf_meta_model(writer)


class PlannedTensorInfo(Protocol):
    """What the GGUF writers need to declare a tensor before its data (gguf_llm and gguf_mmproj plans)."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


def tensor_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    """Bytes of a tensor of logical `shape` stored as GGML type `qtype` (F32, F16 or block-quantized)."""
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    if qtype in (q.F32, q.F16):
        return math.prod(shape) * (4 if qtype == q.F32 else 2)
    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def add_tensor_infos(writer: Any, plan: Iterable[PlannedTensorInfo]) -> None:
    """Declare every planned tensor to a `gguf.GGUFWriter` before the header is written."""
    for t in plan:
        # The logical shape with raw_dtype: the writer stores it (reversed) and trusts our byte count.
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)


def write_header(writer: Any, path: Path | str) -> None:
    """Header, key-values and tensor infos of a `gguf.GGUFWriter`, in the order the format needs them."""
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


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
        bad = first_nonfinite(block)
        if bad is not None:
            (r, c), value = bad
            raise R1VError(
                f"tensor {name!r} holds {describe_value(value)} at index {[i + r, c]} (its first non-finite "
                "value); nothing was written"
            )
        if qtype == q.F16 and np.abs(block).max(initial=0.0) > F16_MAX:
            raise R1VError(f"tensor {name!r} has values beyond the float16 range: {f16_hint}")
        with np.errstate(over="ignore"):  # an overflowing block scale is refused just below, in one line
            out[i : i + step] = packed = gguf.quants.quantize(block, qtype)
        if qtype not in (q.F32, q.F16, q.BF16):
            _check_block_scales(packed, qtype, name, i, cols, f16_hint)
    return out.reshape(shape) if qtype in (q.F32, q.F16) else out


def _check_block_scales(packed: np.ndarray, qtype: Any, name: str, row0: int, cols: int, hint: str) -> None:
    """Q8_0 / Q4_0 blocks start with a float16 scale (block max / 127 or / 8): one beyond float16's range
    would dequantize to Inf, so it is refused like an F16 overflow."""
    gguf = import_gguf()
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    scales = np.ascontiguousarray(packed.reshape(-1, type_size)[:, :2]).view(np.float16).reshape(-1)
    ok = np.isfinite(scales)
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0]) * block_size  # first element of the first bad block
        raise R1VError(
            f"tensor {name!r} has values beyond what {qtype.name}'s float16 block scales hold (block at "
            f"index {[row0 + k // cols, k % cols]}): {hint}"
        )


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


def free_handle(handle: Any, free: Callable[[Any], Any]) -> None:
    """`free(handle)` unless it is already gone; returns None for `self._x = free_handle(self._x, ...)`."""
    if handle is not None:
        free(handle)
    return None


class Closeable:
    """`with` support and a last-chance `close()` when collected, for objects holding llama.cpp handles.

    The subclass's `close()` frees its handles and must be safe to call twice (and on a half-built object:
    `__del__` also runs after a failed `__init__`).
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
