"""The language model of an R1V checkpoint as a llama.cpp GGUF (arch `qwen2`), streamed one tensor at a time.

Only `language_model.*` tensors are written (the vision tower and mlp1 go to the mmproj GGUF). The layout is
what llama.cpp's `convert_hf_to_gguf.py` produces for InternVL-style checkpoints: prefix stripped, qwen2
hyper-parameters, byte-level BPE vocab, chat template, 1-D tensors in F32 and 2-D weights in the chosen type.

Two paths:
* F32/F16/BF16/Q8_0/Q4_0 are packed in Python by `gguf.quants` (bytes equal libllama's), every 2-D
  weight in that one type (a row length the block does not divide falls back to F16, as in the converter);
* K-quants and IQ4 go through llama.cpp's quantizer (`quantize.llama_quantize`) from a 16-bit GGUF written
  first to a temporary file, so the per-tensor type mix is exactly llama.cpp's.

Peak memory is about one tensor: all tensor infos are declared from the checkpoint header, then each tensor
is read from its memory-mapped shard, converted in row blocks and appended to the file.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r1v_quant.atomic import atomic_file
from r1v_quant.checkpoint import Checkpoint, open_checkpoint
from r1v_quant.errors import R1VError
from r1v_quant.spec import LLM_PREFIX, ModelSpec, read_config

from .gguf_common import ROW_BLOCK_BYTES as COMMON_ROW_BLOCK_BYTES
from .gguf_common import import_gguf, llama_log, quantize_rows
from .gguf_vocab import add_vocab, load_vocab
from .quantize import (
    LLAMA_TYPES,
    PYTHON_TYPES,
    import_llama_cpp,
    llama_quantize,
    normalize_type,
    set_default_mode,
)

FLAVOR_KEY = "r1v_quant.flavor"
LM_PREFIX = "language_model."
# HF name (prefix stripped) -> gguf MODEL_TENSOR member name; per-layer names take the layer index.
GLOBAL_TENSORS = {
    "model.embed_tokens": "TOKEN_EMBD",
    "model.norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
}
LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
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
        if qtype in (q.F32, q.F16):
            nbytes = math.prod(shape) * (4 if qtype == q.F32 else 2)
        else:
            nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))
        plan.append(PlannedTensor(hf_name, name, shape, qtype, nbytes))
    if not any(p.name.startswith("token_embd.") for p in plan):
        raise R1VError(f"{ckpt.path}: no language_model.model.embed_tokens.weight in the checkpoint")
    return plan


def _convert(ckpt: Checkpoint, t: PlannedTensor) -> np.ndarray:
    """One tensor in its GGUF storage type, converted in row blocks to bound the float32 scratch."""
    src = ckpt.get(t.hf_name)
    if src.dim() == 1:
        return src.float().numpy()
    return quantize_rows(src, t.qtype, t.shape, t.hf_name, "export BF16 instead", ROW_BLOCK_BYTES)


def add_hparams(writer: Any, spec: ModelSpec, name: str, file_type: int) -> None:
    m = spec.llm
    writer.add_name(name)
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
    ckpt: Checkpoint, path: Path, gguf_type: str, *, name: str | None = None, progress: bool = False
) -> int:
    """Write the LLM of `ckpt` as a GGUF of a Python-packable type at `path` (not atomic); tensor count."""
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
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    try:
        add_hparams(writer, spec, name or ckpt.path.name, gguf.LlamaFileType[PYTHON_TYPES[gguf_type][1]])
        add_rope_scaling(writer, read_config(ckpt.path).get("llm_config") or {})
        if gguf_type not in ("F32", "F16", "BF16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, vocab)
        writer.add_string(FLAVOR_KEY, spec.flavor)  # which chat template family; llama.cpp ignores it
        for t in plan:
            # The logical shape with raw_dtype: the writer stores it (reversed) and trusts our byte count.
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, desc=f"GGUF {gguf_type}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_convert(ckpt, t))
    finally:
        writer.close()
    return len(plan)


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
) -> dict[str, Any]:
    """Export the language model of the checkpoint at `model_dir` to the GGUF file `out_path`.

    `gguf_type`: one of quantize.GGUF_TYPES. K-quants first write a 16-bit GGUF under `tmp_dir`
    (default: next to `out_path`; it needs the 16-bit model's size in free space) and delete it afterwards.
    The output appears under its final name only when complete. `flavor` overrides the detected release
    (it picks the pre-tokenizer name). Returns a report: type, path, bytes, tensors, seconds.
    """
    t0 = time.perf_counter()
    gguf_type = normalize_type(gguf_type)
    out_path = Path(out_path)
    if out_path.exists():
        raise R1VError(f"{out_path}: already exists (choose another --out or remove it)")
    import_gguf()
    if gguf_type in LLAMA_TYPES:
        import_llama_cpp()  # fail before the long 16-bit write, not after it
    ckpt = open_checkpoint(model_dir, flavor=flavor)
    if ckpt.spec.is_quantized:
        raise R1VError(f"{model_dir}: quantized checkpoint; GGUF export needs the 16-bit original")
    # Read the tokenizer before writing anything: a missing file should cost nothing.
    load_vocab(ckpt.path, flavor=ckpt.spec.flavor, vocab_size=ckpt.spec.llm.vocab_size)
    name = ckpt.path.name
    report: dict[str, Any] = {"type": gguf_type, "path": str(out_path)}
    if gguf_type in PYTHON_TYPES:
        with atomic_file(out_path) as tmp:
            n = write_llm_gguf(ckpt, tmp, gguf_type, name=name, progress=progress)
            set_default_mode(tmp)
    else:
        src_type = _intermediate_type(ckpt)
        scratch = Path(tmp_dir) if tmp_dir is not None else out_path.parent
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".r1v-gguf-", dir=scratch) as td:
            src = Path(td) / f"{name}-{src_type}.gguf"
            n = write_llm_gguf(ckpt, src, src_type, name=name, progress=progress)
            with llama_log(progress):
                llama_quantize(src, out_path, gguf_type, nthread=nthread)
        report["intermediate"] = src_type
    report.update(bytes=out_path.stat().st_size, tensors=n, seconds=round(time.perf_counter() - t0, 2))
    return report
