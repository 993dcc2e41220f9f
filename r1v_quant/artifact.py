"""What a path holds, for the profiler and the planner: a 16-bit or AWQ checkpoint, or GGUF (+ mmproj).

`describe_artifact` returns the model's geometry (everything memory and speed depend on) and the bytes
each component really occupies in the files, read from safetensors / GGUF headers only (no weights
loaded). GGUF files are paired the llama.cpp runtime's way (`find_gguf_pair`). `eval_backends.Artifact`
describes the same paths for comparing tokenizers; this one carries what the planner needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.errors import R1VError
from r1v_quant.spec import ModelSpec, component_of

COMPONENTS = ("vision", "projector", "decoder", "embeddings", "other")
# Weight types llama.cpp's CPU backend repacks into interleaved layouts on x86-64 with AVX2 / AVX-512
# (its CPU_REPACK buffer; the embedding table is read by row and stays as stored).
REPACKED_TYPES = ("Q4_0", "Q4_K", "IQ4_NL")


@dataclass(frozen=True)
class Geometry:
    """The dimensions memory and FLOPs depend on; from a ModelSpec or from GGUF metadata."""

    llm_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_ctx: int
    vit_layers: int
    vit_hidden: int
    vit_heads: int
    vit_ffn: int
    vit_qk_norm: bool
    positions: int  # patches + CLS per tile (1025 at 448 px / patch 14)
    tokens_per_tile: int  # after pixel shuffle (256)
    projector_in: int
    max_tiles: int  # max_dynamic_patch + thumbnail: the most tiles one image can give
    image_size: int = 448  # tile side in pixels
    params: dict[str, int] = field(default_factory=dict)  # dense parameter count per component

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Geometry:
        v, m = spec.vision, spec.llm
        params = {c: 0 for c in COMPONENTS}
        for name, shape in spec.tensor_shapes().items():
            params[component_of(name)] += math.prod(shape)
        thumb = 1 if spec.use_thumbnail and spec.max_dynamic_patch > 1 else 0
        return cls(
            llm_layers=m.num_layers,
            hidden=m.hidden_size,
            heads=m.num_heads,
            kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            ffn=m.intermediate_size,
            vocab=m.vocab_size,
            max_ctx=m.max_position_embeddings,
            vit_layers=v.num_layers,
            vit_hidden=v.hidden_size,
            vit_heads=v.num_heads,
            vit_ffn=v.intermediate_size,
            vit_qk_norm=v.qk_norm,
            positions=v.num_positions,
            tokens_per_tile=spec.num_image_token,
            projector_in=spec.projector_in,
            max_tiles=spec.max_dynamic_patch + thumb,
            image_size=v.image_size,
            params=params,
        )

    def kv_elements_per_token(self) -> int:
        """K and V elements one token adds to the cache: 2 x layers x KV heads x head dim."""
        return 2 * self.llm_layers * self.kv_heads * self.head_dim

    @property
    def llm_matmul_params(self) -> int:
        """Parameters every generated token multiplies: decoder + lm_head (not the embedding lookup)."""
        return self.params.get("decoder", 0) + self.vocab * self.hidden


@dataclass
class Artifact:
    """A model on disk as one runtime would load it."""

    path: Path
    kind: str  # "checkpoint" (16-bit safetensors) | "awq" | "gguf"
    geometry: Geometry
    stored: dict[str, int]  # bytes per component in the files
    llm_format: str  # bf16 / fp16 / awq-int4-g128 / GGUF file type (Q4_K_M, ...)
    vision_format: str | None  # 16-bit dtype, mmproj type, or None (GGUF without mmproj)
    spec: ModelSpec | None = None
    llm_gguf: Path | None = None
    mmproj_gguf: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return "llama.cpp" if self.kind == "gguf" else "torch"


def describe_artifact(path: Path | str, *, mmproj: Path | str | None = None) -> Artifact:
    """`mmproj` names the vision GGUF explicitly (a GGUF file alone is the language model only)."""
    path = Path(path)
    if not path.exists():
        raise R1VError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise R1VError(f"{path}: expected a model directory or a .gguf file")
        return _gguf_artifact(*_pair_gguf(path, mmproj))
    if (path / "config.json").is_file():
        return _checkpoint_artifact(path)
    if list(path.glob("*.gguf")):
        return _gguf_artifact(*_pair_gguf(path, mmproj))
    raise R1VError(f"{path}: neither a checkpoint (config.json) nor a directory with GGUF files")


# -- safetensors checkpoints ---------------------------------------------------------------------------------
def _checkpoint_artifact(path: Path) -> Artifact:
    from r1v_quant.checkpoint import Checkpoint

    ckpt = Checkpoint(path, require_weights=False)
    spec = ckpt.spec
    stored = {c: 0 for c in COMPONENTS}
    dtypes: set[str] = set()
    for name in ckpt.names() if ckpt.has_weights else ():
        info = ckpt.info(name)
        stored[component_of(name)] += info.nbytes
        if component_of(name) == "vision":
            dtypes.add(info.dtype)
    if not ckpt.has_weights:  # config + index only: sizes from the shapes at the config's dtype
        from r1v_quant.formats import weight_bytes

        stored.update(weight_bytes(spec, "bf16"))
    vision_dtype = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(next(iter(dtypes), "BF16"), "bf16")
    if spec.is_quantized:
        q = spec.quantization or {}
        kind, fmt = "awq", f"awq-int{q.get('bits', 4)}-g{q.get('group_size', 128)}"
    else:
        kind, fmt = "checkpoint", vision_dtype
    return Artifact(
        path=path,
        kind=kind,
        geometry=Geometry.from_spec(spec),
        stored={k: v for k, v in stored.items() if v},
        llm_format=fmt,
        vision_format=vision_dtype,
        spec=spec,
    )


# -- GGUF -------------------------------------------------------------------------------------------------
def _gguf_reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise R1VError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _pair_gguf(path: Path, mmproj: Path | None = None) -> tuple[Path, Path | None]:
    """(language-model GGUF, mmproj GGUF or None): the llama.cpp runtime's rule (a file is the language
    model alone; a directory holds one of each at most), with an explicit mmproj taking precedence."""
    from r1v_quant.llamacpp_runtime import find_gguf_pair

    llm, found = find_gguf_pair(path)
    if _field(_gguf_reader(llm), "general.architecture") == "clip":
        raise R1VError(f"{llm}: an mmproj GGUF; give the language-model GGUF (or their directory)")
    return llm, (Path(mmproj) if mmproj else found)


def _gguf_component(name: str) -> str:
    if name.startswith("blk."):
        return "decoder"
    if name in ("token_embd.weight", "output.weight"):
        return "embeddings"
    if name.startswith("v."):
        return "vision"
    if name.startswith("mm."):
        return "projector"
    return "other"


def _output_bytes(reader: Any) -> int | None:
    return next((int(t.n_bytes) for t in reader.tensors if t.name == "output.weight"), None)


def _gguf_artifact(llm: Path, mmproj: Path | None) -> Artifact:
    import gguf

    r = _gguf_reader(llm)
    arch = _field(r, "general.architecture")
    if arch != "qwen2":
        raise R1VError(f"{llm}: architecture {arch!r}, expected qwen2 (an R1V language-model GGUF)")
    stored = {c: 0 for c in COMPONENTS}
    params = {c: 0 for c in COMPONENTS}
    repacked = 0
    for t in r.tensors:
        stored[_gguf_component(t.name)] += int(t.n_bytes)
        params[_gguf_component(t.name)] += int(t.n_elements)
        if t.tensor_type.name in REPACKED_TYPES and t.name != "token_embd.weight" and len(t.shape) == 2:
            repacked += int(t.n_bytes)

    def key(k: str, default: Any = None) -> Any:
        v = _field(r, f"qwen2.{k}", default)
        if v is None:
            raise R1VError(f"{llm}: no qwen2.{k} in the GGUF header")
        return v

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = _field(r, "qwen2.vocab_size") or len(_field(r, "tokenizer.ggml.tokens", []))
    ftype = _field(r, "general.file_type")
    llm_format = gguf.LlamaFileType(ftype).name.replace("MOSTLY_", "").replace("ALL_", "") if ftype else "?"
    vit: dict[str, Any] = {
        "vit_layers": 0, "vit_hidden": 0, "vit_heads": 1, "vit_ffn": 0, "vit_qk_norm": False,
        "positions": 0, "tokens_per_tile": 0, "projector_in": 0, "max_tiles": 0, "image_size": 448,
    }  # fmt: skip
    vision_format = None
    if mmproj is not None:
        m = _gguf_reader(mmproj)
        if _field(m, "clip.projector_type") != "internvl":
            raise R1VError(f"{mmproj}: projector type is not 'internvl'")

        def v(k: str) -> int:
            val = _field(m, f"clip.vision.{k}")
            if val is None:
                raise R1VError(f"{mmproj}: no clip.vision.{k} in the GGUF header")
            return int(val)

        grid = v("image_size") // v("patch_size")
        scale = v("projector.scale_factor")
        names = {t.name for t in m.tensors}
        thumb = 1 if _field(m, "r1v_quant.use_thumbnail", True) and v("preproc_max_tiles") > 1 else 0
        vit = {
            "vit_layers": v("block_count"),
            "vit_hidden": v("embedding_length"),
            "vit_heads": v("attention.head_count"),
            "vit_ffn": v("feed_forward_length"),
            "vit_qk_norm": "v.blk.0.attn_q_norm.weight" in names,
            "positions": grid * grid + 1,
            "tokens_per_tile": (grid // scale) ** 2,
            "projector_in": v("embedding_length") * scale * scale,
            "max_tiles": v("preproc_max_tiles") + thumb,
            "image_size": v("image_size"),
        }
        for t in m.tensors:
            stored[_gguf_component(t.name)] += int(t.n_bytes)
            params[_gguf_component(t.name)] += int(t.n_elements)
        mtype = _field(m, "general.file_type")
        vision_format = gguf.LlamaFileType(mtype).name.replace("MOSTLY_", "").replace("ALL_", "")
    geometry = Geometry(
        llm_layers=int(key("block_count")),
        hidden=hidden,
        heads=heads,
        kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(_field(r, "qwen2.attention.key_length") or hidden // heads),
        ffn=int(key("feed_forward_length")),
        vocab=int(vocab),
        max_ctx=int(key("context_length")),
        params={k: v for k, v in params.items() if v},
        **vit,
    )
    return Artifact(
        path=llm.parent,
        kind="gguf",
        geometry=geometry,
        stored={k: v for k, v in stored.items() if v},
        llm_format=llm_format,
        vision_format=vision_format,
        llm_gguf=llm,
        mmproj_gguf=mmproj,
        extra={
            "flavor": _field(r, "r1v_quant.flavor"),
            "output_bytes": _output_bytes(r),
            "repacked": repacked,
        },
    )
