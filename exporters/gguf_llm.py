"""The language model of an R1V checkpoint as a llama.cpp GGUF (arch `qwen2`), streamed one tensor at a time.

Only `language_model.*` tensors are written (the vision tower and mlp1 go to the mmproj GGUF). The layout is
what llama.cpp's `convert_hf_to_gguf.py` produces for InternVL-style checkpoints: prefix stripped, qwen2
hyper-parameters, byte-level BPE vocab, chat template, 1-D tensors in F32 and 2-D weights in the chosen type.

Two paths:
* F32/F16/BF16/Q8_0/Q4_0 are packed in Python by `gguf.quants` (bytes equal libllama's), every 2-D
  weight in that one type (a row length the block does not divide falls back to F16, as in the converter);
* K-quants and IQ4 go through llama.cpp's quantizer (`quantize.llama_quantize`) from a 16-bit GGUF written
  first to a temporary file, so the per-tensor type mix is exactly llama.cpp's.

With calibration statistics (`calib`) the importance matrix goes to that quantizer (Q4_0 then takes the
second path too) and to an imatrix file; `activation_aware` folds scales into each tensor as it is read
(gguf_aware.py). `split_max_size` writes llama.cpp-style shards. Everything is staged in a hidden folder
next to the output and renamed into place when complete.

Peak memory is about one tensor: all tensor infos are declared from the checkpoint header, then each tensor
is read from its memory-mapped shard, converted in row blocks and appended to the file.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r1v_quant.exporters.gguf_aware import (
    AWARE_KEY,
    CALIB_KEY,
    MODALITY_MODES,
    AwareOptions,
    FoldedCheckpoint,
    load_calibration,
    plan_aware,
)
from r1v_quant.exporters.gguf_imatrix import write_imatrix_gguf
from r1v_quant.exporters.gguf_vocab import add_vocab, load_vocab
from r1v_quant.exporters.quantize import (
    IMATRIX_PURE_TYPES,
    LLAMA_TYPES,
    PYTHON_TYPES,
    import_llama_cpp,
    llama_quantize,
    normalize_type,
    set_default_mode,
)
from r1v_quant.model.arch import LLM_GGUF_GLOBAL, LLM_GGUF_LAYER
from r1v_quant.model.checkpoint import Checkpoint, open_checkpoint
from r1v_quant.model.spec import LLM_PREFIX, ModelSpec, read_config
from r1v_quant.runtime.gguf_lib import ROW_BLOCK_BYTES as COMMON_ROW_BLOCK_BYTES
from r1v_quant.runtime.gguf_lib import (
    add_general_metadata,
    add_tensor_infos,
    import_gguf,
    quantize_rows,
    tensor_nbytes,
    write_header,
)
from r1v_quant.util.errors import R1VError, os_error
from r1v_quant.util.hub import model_name
from r1v_quant.util.outputs import require_free_space

FLAVOR_KEY = "r1v_quant.flavor"
LM_PREFIX = "language_model."
# HF name (prefix stripped) -> gguf MODEL_TENSOR member name; per-layer names take the layer index.
GLOBAL_TENSORS = LLM_GGUF_GLOBAL
LAYER_TENSORS = LLM_GGUF_LAYER
# Non-persistent buffers some exports carry; llama.cpp computes RoPE itself.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)

ROW_BLOCK_BYTES = COMMON_ROW_BLOCK_BYTES  # module-level so a test can shrink it


def gguf_tensor_name(hf_name: str, num_layers: int) -> str | None:
    """llama.cpp's name for a checkpoint tensor; None for tensors that do not belong in the LLM GGUF."""
    gguf = import_gguf()
    if not hf_name.startswith(LM_PREFIX) or hf_name.endswith(SKIPPED_SUFFIXES):
        return None
    name = hf_name[len(LM_PREFIX) :]
    base, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise R1VError(f"cannot map tensor {hf_name!r} to a llama.cpp name")
    if base in GLOBAL_TENSORS:
        return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[GLOBAL_TENSORS[base]]]}.{suffix}"
    layer_prefix = LLM_PREFIX[len(LM_PREFIX) :] + "."
    if base.startswith(layer_prefix):
        idx, _, rest = base[len(layer_prefix) :].partition(".")
        if idx.isdigit() and int(idx) < num_layers and rest in LAYER_TENSORS:
            key = gguf.MODEL_TENSOR[LAYER_TENSORS[rest]]
            return f"{gguf.TENSOR_NAMES[key].format(bid=int(idx))}.{suffix}"
    raise R1VError(f"cannot map tensor {hf_name!r} to a llama.cpp name")


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


def plan_tensors(ckpt: Checkpoint, gguf_type: str) -> list[PlannedTensor]:
    """Every LLM tensor with its GGUF name, storage type and byte size, in the spec's order."""
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    target = q[PYTHON_TYPES[gguf_type][0]]
    block = gguf.GGML_QUANT_SIZES[target][0]
    # The spec's order (embeddings, layers 0..N, norm, head) rather than the index's alphabetical one.
    order = {n: i for i, n in enumerate(ckpt.spec.tensor_shapes())}
    plan: list[PlannedTensor] = []
    for hf_name in sorted(ckpt.names(), key=lambda n: order.get(n, len(order))):
        name = gguf_tensor_name(hf_name, ckpt.spec.llm.num_layers)
        if name is None:
            continue
        shape = tuple(ckpt.info(hf_name).shape)
        if len(shape) != 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            qtype = q.F32  # biases and norms: tiny, and precision matters there
        elif shape[-1] % block:
            qtype = q.F16  # the block does not divide the row: the converter's fallback
        else:
            qtype = target
        plan.append(PlannedTensor(hf_name, name, shape, qtype, tensor_nbytes(shape, qtype)))
    if not any(p.name.startswith("token_embd.") for p in plan):
        raise R1VError(f"{ckpt.path}: no language_model.model.embed_tokens.weight in the checkpoint")
    return plan


def _convert(ckpt: Checkpoint, t: PlannedTensor) -> np.ndarray:
    """One tensor in its GGUF storage type, converted in row blocks to bound the float32 scratch."""
    src = ckpt.get(t.hf_name)
    if src.dim() == 1:
        return src.float().numpy()
    return quantize_rows(src, t.qtype, t.shape, t.hf_name, "export BF16 instead", ROW_BLOCK_BYTES)


def add_hparams(writer: Any, spec: ModelSpec, file_type: int) -> None:
    m = spec.llm
    writer.add_context_length(m.max_position_embeddings)
    writer.add_embedding_length(m.hidden_size)
    writer.add_block_count(m.num_layers)
    writer.add_feed_forward_length(m.intermediate_size)
    writer.add_head_count(m.num_heads)
    writer.add_head_count_kv(m.num_kv_heads)
    if m.head_dim * m.num_heads != m.hidden_size:  # llama.cpp derives it from n_embd / n_head otherwise
        writer.add_key_length(m.head_dim)
        writer.add_value_length(m.head_dim)
    writer.add_rope_freq_base(m.rope_theta)
    writer.add_layer_norm_rms_eps(m.rms_eps)
    writer.add_vocab_size(m.vocab_size)
    writer.add_file_type(file_type)


def add_rope_scaling(writer: Any, llm_config: dict[str, Any]) -> None:
    """RoPE scaling keys as llama.cpp's converter writes them (none for plain RoPE)."""
    gguf = import_gguf()
    rs = llm_config.get("rope_scaling") or llm_config.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default", "dynamic"):
        return  # dynamic NTK only acts beyond max_position_embeddings; the converter drops it too
    if kind not in ("linear", "yarn") or not rs.get("factor"):
        raise R1VError(f"llm_config rope scaling {rs!r} is not supported by the GGUF export")
    writer.add_rope_scaling_type(
        gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN
    )
    writer.add_rope_scaling_factor(float(rs["factor"]))
    if kind == "yarn":
        orig = rs.get("original_max_position_embeddings")
        if orig is None:
            raise R1VError("llm_config yarn rope scaling lacks original_max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(int(orig))


def write_llm_gguf(
    ckpt: Checkpoint,
    path: Path,
    gguf_type: str,
    *,
    name: str | None = None,
    progress: bool = False,
    split_max_size: int = 0,
    meta: dict[str, str | int | bool] | None = None,
) -> tuple[int, list[Path]]:
    """Write the LLM of `ckpt` as a GGUF of a Python-packable type at `path` (not atomic).

    `split_max_size` > 0 splits the tensor data into shards of at most that many bytes (llama.cpp's
    `<stem>-00001-of-0000N.gguf` names, metadata in the first); `meta`: extra string/int/bool keys.
    Returns the tensor count and the files written.
    """
    gguf = import_gguf()
    from tqdm import tqdm

    spec = ckpt.spec
    vocab = load_vocab(
        ckpt.path,
        flavor=spec.flavor,
        vocab_size=spec.llm.vocab_size,
        bos_fallback=_first_id(spec.llm.bos_token_id),
        eos_fallback=_first_id(spec.llm.eos_token_id),
    )
    plan = plan_tensors(ckpt, gguf_type)
    # only split what needs it (the writer warns about a split request it cannot honour)
    split = split_max_size if 0 < split_max_size < sum(t.nbytes for t in plan) else 0
    writer = gguf.GGUFWriter(
        path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2], split_max_size=split
    )
    try:
        total_params = sum(math.prod(t.shape) for t in plan)
        add_general_metadata(writer, ckpt.path, total_params, name or ckpt.path.name)
        add_hparams(writer, spec, gguf.LlamaFileType[PYTHON_TYPES[gguf_type][1]])
        add_rope_scaling(writer, read_config(ckpt.path).get("llm_config") or {})
        if gguf_type not in ("F32", "F16", "BF16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, vocab)
        writer.add_string(FLAVOR_KEY, spec.flavor)  # which chat template family; llama.cpp ignores it
        add_meta(writer, meta or {})
        add_tensor_infos(writer, plan)
        files = writer.format_shard_names(Path(path))
        write_header(writer, path)
        for t in tqdm(plan, desc=f"GGUF {gguf_type}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_convert(ckpt, t))
    finally:
        writer.close()
    return len(plan), files


def add_meta(writer: Any, meta: dict[str, str | int | bool]) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))


def split_gguf(src: Path, dst: Path, max_size: int) -> list[Path]:
    """Copy the GGUF `src` into shards `<dst stem>-0000i-of-0000N.gguf` of at most `max_size` tensor bytes.

    Metadata and tensor bytes are copied unchanged (one memory-mapped tensor at a time); this is how
    K-quant outputs are split, since llama.cpp's quantizer can only keep the input's own split.
    """
    gguf = import_gguf()
    r = gguf.GGUFReader(src)
    vt = gguf.GGUFValueType
    arch = r.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    total = sum(int(t.n_bytes) for t in r.tensors)
    writer = gguf.GGUFWriter(path=None, arch=arch, split_max_size=max_size if max_size < total else 0)
    try:
        for key, field in r.fields.items():
            if key.startswith(("GGUF.", "split.")) or key == gguf.Keys.General.ARCHITECTURE:
                continue  # the writer adds these itself
            if key == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(field.contents())
            main = vt(field.types[0])
            sub = vt(field.types[-1]) if main == vt.ARRAY else None
            writer.add_key_value(key, field.contents(), main, sub_type=sub)
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # the reader gives ggml's ne order
            writer.add_tensor_info(
                t.name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=t.tensor_type
            )
        files = writer.format_shard_names(dst)
        write_header(writer, dst)
        for t in r.tensors:
            writer.write_tensor_data(t.data)
    finally:
        writer.close()
    return files


def _first_id(value: int | list[int] | None) -> int | None:
    # config.json ids may be one int or a list (generation stops on any; GGUF holds one).
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _intermediate_type(ckpt: Checkpoint) -> str:
    # BF16 holds a bf16 checkpoint exactly (F16 would round small and clip huge values); llama.cpp's
    # quantizer reads either.
    dtypes = {ckpt.info(n).dtype for n in ckpt.names() if n.startswith(LM_PREFIX)}
    return "BF16" if dtypes == {"BF16"} else "F16"


def export_llm_gguf(
    model_dir: Path | str,
    out_path: Path | str,
    gguf_type: str = "F16",
    *,
    progress: bool = True,
    tmp_dir: Path | str | None = None,
    nthread: int = 0,
    flavor: str | None = None,
    calib: Path | str | None = None,
    activation_aware: bool = False,
    modality_weights: str = "auto",
    split_max_size: int = 0,
    staging: Path | str | None = None,
    extra_bytes: int = 0,
) -> dict[str, Any]:
    """Export the language model of the checkpoint at `model_dir` to the GGUF file `out_path`.

    `gguf_type`: one of quantize.GGUF_TYPES. K-quants first write a 16-bit GGUF under `tmp_dir`
    (default: next to `out_path`; it needs the 16-bit model's size in free space) and delete it afterwards.
    `calib`: a `calibrate` output directory; its per-column mean x² becomes llama.cpp's importance matrix
    (used by the K-quants, IQ4 and Q4_0, and written next to the output as `<stem>.imatrix.gguf`).
    `activation_aware` also folds per-channel scales into the weights first (gguf_aware.py).
    `modality_weights` (awq's modes) weighs vision / prompt / response tokens in both; "auto" reads the
    calibration's sensitivity.json, or, for an older calibration without one, measures it now from the
    model and the set its report.json records (refused if that set no longer has the calibrated hash).
    `split_max_size` > 0: shards of at most that many tensor bytes (`<stem>-00001-of-0000N.gguf`).
    Outputs appear under their final names only when complete. `flavor` overrides the detected release
    (it picks the pre-tokenizer name). Returns a report: type, path, files, bytes, tensors, seconds.
    `staging`: a private folder beside the output (same file system) where the finished files are left
    for the caller to publish with others (`gguf` publishes the GGUF and its mmproj together); the report
    then lists them under `staged` and `path` / `files` name where they will go. `extra_bytes`: what
    the caller writes beside it in the same run (the mmproj), counted in the up-front space check.
    """
    t0 = time.perf_counter()
    gguf_type = normalize_type(gguf_type)
    out_path = Path(out_path)
    if activation_aware and calib is None:
        raise R1VError("--activation-aware needs --calib DIR (statistics from `r1v-quant calibrate`)")
    if modality_weights not in MODALITY_MODES:
        raise R1VError(
            f"unknown --modality-weights {modality_weights!r}: expected {', '.join(MODALITY_MODES)}"
        )
    if split_max_size < 0:
        raise R1VError("--split-max-size must be positive")
    imatrix_path = imatrix_output_path(out_path) if calib is not None else None
    for p in existing_outputs(out_path, imatrix_path):
        raise R1VError(f"{p}: already exists (choose another --out or remove it)")
    import_gguf()
    uses_imatrix = calib is not None and (gguf_type in LLAMA_TYPES or gguf_type in IMATRIX_PURE_TYPES)
    if gguf_type in LLAMA_TYPES or calib is not None:
        import_llama_cpp()  # fail before the long 16-bit write, not after it
    ckpt = open_checkpoint(model_dir, flavor=flavor)
    if ckpt.spec.is_quantized:
        raise R1VError(f"{model_dir}: quantized checkpoint; GGUF export needs the 16-bit original")
    # Read the tokenizer and the statistics before writing anything: a missing file should cost nothing.
    load_vocab(ckpt.path, flavor=ckpt.spec.flavor, vocab_size=ckpt.spec.llm.vocab_size)
    stats = load_calibration(calib, ckpt.spec) if calib is not None else None
    name = model_name(ckpt.path)  # the repo name for a Hub snapshot, not its commit hash
    report: dict[str, Any] = {"type": gguf_type, "path": str(out_path)}
    source: Any = ckpt
    meta: dict[str, str | int | bool] = {}
    aware = None
    if stats is not None:
        opts = AwareOptions(fold=activation_aware, modality_weights=modality_weights, nthread=nthread)
        n_layers = ckpt.spec.llm.num_layers
        sens, sens_source = None, None
        if modality_weights == "auto":  # the measured per-layer weights `awq` uses, stored by `calibrate`
            from r1v_quant.calibration.pipeline import calibration_sensitivity

            sens, sens_source = calibration_sensitivity(
                calib, ckpt.path, set_hash=stats.set_hash, num_layers=n_layers, flavor=flavor,
                scratch=out_path.parent, progress=progress,  # spill room if it must be measured now
            )  # fmt: skip
        aware = plan_aware(
            ckpt,
            stats,
            gguf_type,
            opts,
            tensor_name=lambda n: gguf_tensor_name(n, n_layers),
            sensitivity=None if sens is None else sens.weights,
            progress=progress,
        )
        if sens is not None:
            aware.report["sensitivity"] = {"source": sens_source, "samples": sens.sample_ids}
        if activation_aware:
            source = FoldedCheckpoint(ckpt, aware)
        meta = {AWARE_KEY: activation_aware, CALIB_KEY: stats.set_hash}
        if uses_imatrix:  # the keys llama-quantize writes when it is given an imatrix
            meta.update(
                {
                    "quantize.imatrix.dataset": aware.imatrix.dataset,
                    "quantize.imatrix.entries_count": len(aware.imatrix.sums),
                    "quantize.imatrix.chunks_count": aware.imatrix.chunk_count,
                }
            )
        report["calibration_set_hash"] = stats.set_hash  # the model card lists it
        report["aware"] = aware.report
    python_path = gguf_type in PYTHON_TYPES and not uses_imatrix
    src_type = gguf_type if python_path else _intermediate_type(ckpt)
    check_free_space(
        ckpt, out_path.parent, tmp_dir, gguf_type, src_type, python_path, split_max_size, extra_bytes
    )
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if staging is None:
                temp = tempfile.TemporaryDirectory(prefix=f".{out_path.name}.partial-", dir=out_path.parent)
                work = Path(stack.enter_context(temp))
            else:
                work = Path(staging)
            staged_llm = work / out_path.name
            if python_path:
                n, files = write_llm_gguf(
                    source, staged_llm, gguf_type, name=name, progress=progress,
                    split_max_size=split_max_size, meta=meta,
                )  # fmt: skip
            else:
                scratch = Path(tmp_dir) if tmp_dir is not None else work
                scratch.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix=".r1v-gguf-", dir=scratch) as td:
                    src = Path(td) / f"{name}-{src_type}.gguf"
                    n, _ = write_llm_gguf(source, src, src_type, name=name, progress=progress, meta=meta)
                    single = work / f".single-{out_path.name}"
                    llama_quantize(
                        src,
                        single,
                        gguf_type,
                        nthread=nthread,
                        imatrix=aware.imatrix.means() if uses_imatrix and aware is not None else None,
                        verbose=progress,
                    )
                if split_max_size:
                    files = split_gguf(single, staged_llm, split_max_size)
                    single.unlink()
                else:
                    single.rename(staged_llm)
                    files = [staged_llm]
                report["intermediate"] = src_type
            staged_imatrix = None
            if aware is not None and imatrix_path is not None:
                staged_imatrix = write_imatrix_gguf(aware.imatrix, work / imatrix_path.name)
            staged = [*files, *([staged_imatrix] if staged_imatrix else [])]
            nbytes = sum(p.stat().st_size for p in files)
            if staging is None:
                finals = publish(staged, out_path.parent)
            else:
                finals = [out_path.parent / p.name for p in staged]
                report["staged"] = [str(p) for p in staged]
    except OSError as e:
        raise disk_error(e, out_path.parent) from None
    shards = finals[: len(files)]
    report.update(
        path=str(shards[0]),
        files=[str(p) for p in shards],
        bytes=nbytes,
        tensors=n,
        seconds=round(time.perf_counter() - t0, 2),
    )
    if calib is not None:
        report["imatrix"] = {"path": str(imatrix_path), "used_by_quantizer": uses_imatrix}
    return report


def imatrix_output_path(out_path: Path) -> Path:
    return out_path.with_name(f"{out_path.stem}.imatrix.gguf")


def existing_outputs(out_path: Path, *others: Path | None) -> list[Path]:
    """The output file, shards of it, or the other outputs named, already present."""
    shards = sorted(out_path.parent.glob(f"{glob.escape(out_path.stem)}-*-of-*.gguf"))
    return [p for p in [out_path, *shards, *others] if p is not None and p.exists()]


def publish(staged: list[Path], out_dir: Path) -> list[Path]:
    """Rename finished files into `out_dir`; the first shard (what users open) comes last."""
    finals = [out_dir / p.name for p in staged]
    for p in staged:
        set_default_mode(p)
    for p, f in reversed(list(zip(staged, finals, strict=True))):
        os.replace(p, f)
    return finals


def disk_error(e: OSError, where: Path) -> R1VError:
    return os_error(e, where, "write the GGUF")


def check_free_space(
    ckpt: Checkpoint,
    out_dir: Path,
    tmp_dir: Path | str | None,
    gguf_type: str,
    src_type: str,
    python_path: bool,
    split_max_size: int,
    extra_bytes: int = 0,
) -> None:
    """Refuse up front when the output, the caller's `extra_bytes` beside it (the mmproj) and, for K-quants,
    the 16-bit intermediate cannot fit (locations on one file system counted together)."""
    from r1v_quant.exporters.gguf_aware import PROXY_TYPES
    from r1v_quant.model.storage import GGML_BITS

    src_bytes = sum(t.nbytes for t in plan_tensors(ckpt, src_type if src_type in PYTHON_TYPES else "F16"))
    if python_path:
        needs = {out_dir: src_bytes + extra_bytes}
    else:
        bits = GGML_BITS.get(PROXY_TYPES.get(gguf_type, ("Q4_K", 0))[0], 4.5)
        out_bytes = int(src_bytes * bits / 16) * (2 if split_max_size else 1)  # split: a copy of the file
        scratch = Path(tmp_dir) if tmp_dir is not None else out_dir
        needs = {out_dir: out_bytes + extra_bytes}
        needs[scratch] = needs.get(scratch, 0) + src_bytes
    require_free_space(needs, "the GGUF files")
