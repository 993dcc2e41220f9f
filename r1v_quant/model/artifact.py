"""What a path holds: a 16-bit or AWQ checkpoint, or a GGUF (+ mmproj). One description for every command.

`read_artifact` classifies a path and reads config.json, safetensors and GGUF headers only (no weights
loaded): what `eval` / `check` compare (vocabulary, hidden size, layers, flavour, GGUF tokens) and, with
`geometry=True`, what the profiler and planner need (every dimension memory and speed depend on, and the
bytes each component occupies). The entry points apply each command's rules:

- `describe_artifact` (profile, plan): geometry required; a GGUF file is the language model alone unless
  the mmproj is named.
- `resolve_artifact` / `resolve_reference` (eval, check): complete weights; a GGUF file takes the
  `mmproj*.gguf` beside it; a GGUF must carry r1v-quant's flavour key (the chat template).

GGUF folders are paired the llama.cpp runtime's way (`find_gguf_pair`, which the runtime uses too): one
language model, at most one
mmproj.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.model.spec import ModelSpec, component_of
from r1v_quant.model.storage import REPACKED_BLOCK_TYPES
from r1v_quant.util.errors import R1VError
from r1v_quant.util.hub import model_name

COMPONENTS = ("vision", "projector", "decoder", "embeddings", "other")
REPACKED_TYPES = REPACKED_BLOCK_TYPES  # what llama.cpp's CPU backend repacks (model/storage.py)


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

    name: str  # short label for reports: the folder (or Hub repo) name, or the GGUF file's stem
    path: Path  # what was named: a checkpoint folder, a .gguf file or a folder of GGUFs
    kind: str  # "checkpoint" (16-bit safetensors) | "awq" | "gguf" | "server" (an OpenAI-compatible endpoint)
    flavor: str | None  # r1v / r1v2 / r1v3 (the chat template); None for a GGUF without r1v-quant's key
    vocab: int  # tokens the tokenizer knows (GGUF: its token list)
    hidden: int
    layers: int
    quant: str  # report label: "bfloat16", "AWQ int4 g128", "Q4_K_M", ...
    llm_format: str  # planner format: bf16 / fp16 / awq-int4-g128 / GGUF file type (Q4_K_M, ...)
    vision_format: str | None  # 16-bit dtype, mmproj type, or None (GGUF without mmproj)
    size_bytes: int  # the files on disk (safetensors shards; GGUF + mmproj)
    stored: dict[str, int] = field(default_factory=dict)  # bytes per component in the files
    geometry: Geometry | None = None  # read with geometry=True (always set by describe_artifact)
    spec: ModelSpec | None = None
    llm_gguf: Path | None = None
    mmproj_gguf: Path | None = None
    gguf_tokens: list[str] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return {"gguf": "llama.cpp", "server": "openai"}.get(self.kind, "torch")

    def describe(self) -> dict[str, Any]:
        return {
            "artifact": self.name,
            "path": self.extra.get("url", str(self.path)),
            "backend": self.backend,
            "quant": self.quant,
            "size_bytes": self.size_bytes,
            "flavor": self.flavor,
            "mmproj": str(self.mmproj_gguf) if self.mmproj_gguf else None,
        }


def read_artifact(
    path: Path | str,
    *,
    mmproj: Path | str | None = None,
    sibling_mmproj: bool = False,
    require_weights: bool = False,
    geometry: bool = False,
    name: str | None = None,
) -> Artifact:
    """Classify `path` and read its description (headers only).

    `mmproj` names the vision GGUF explicitly; otherwise a folder's own mmproj is used, and for a GGUF file
    the sibling `mmproj*.gguf` when `sibling_mmproj`. `require_weights`: a checkpoint must have all its
    weights (checked against its config). `geometry`: also read every dimension the planner needs.
    """
    path = Path(path)
    if not path.exists():
        raise R1VError(
            f"{path}: no such model (a checkpoint folder or Hub repo id, a .gguf file or a folder with one)"
        )
    if path.is_dir() and (path / "config.json").is_file():
        return _checkpoint_artifact(path, name, require_weights=require_weights, geometry=geometry)
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        llm, mm = _pair_gguf(path, mmproj, sibling_mmproj)
        return _gguf_artifact(path, llm, mm, name, geometry=geometry)
    raise R1VError(f"{path}: neither a checkpoint folder (config.json) nor a GGUF")


def describe_artifact(path: Path | str, *, mmproj: Path | str | None = None) -> Artifact:
    """For the profiler and planner: geometry and bytes per component; a GGUF file alone is the language
    model only (`mmproj` names the vision GGUF)."""
    return read_artifact(path, mmproj=mmproj, geometry=True)


def resolve_artifact(path: Path | str, name: str | None = None) -> Artifact:
    """For eval / check: a candidate with complete weights; a GGUF with its sibling mmproj and flavour key."""
    art = read_artifact(path, sibling_mmproj=True, require_weights=True, name=name)
    if art.kind == "gguf" and not art.flavor:
        raise R1VError(f"{art.llm_gguf}: no r1v_quant.flavor key (not written by `r1v-quant gguf`)")
    return art


def resolve_reference(path: Path | str, name: str | None = None) -> Artifact:
    """The reference: a checkpoint folder (its tokenizer and preprocessing define the scored windows)."""
    art = resolve_artifact(path, name)
    if art.backend != "torch":
        raise R1VError(f"{path}: the reference must be a checkpoint folder (16-bit or AWQ), not a GGUF")
    return art


# -- safetensors checkpoints ---------------------------------------------------------------------------------
def _checkpoint_artifact(path: Path, name: str | None, *, require_weights: bool, geometry: bool) -> Artifact:
    from r1v_quant.model.checkpoint import Checkpoint, open_checkpoint

    ckpt = open_checkpoint(path) if require_weights else Checkpoint(path, require_weights=False)
    spec = ckpt.spec
    stored = {c: 0 for c in COMPONENTS}
    dtypes: set[str] = set()
    for tensor in ckpt.names() if ckpt.has_weights else ():
        info = ckpt.info(tensor)
        stored[component_of(tensor)] += info.nbytes
        if component_of(tensor) == "vision":
            dtypes.add(info.dtype)
    floats = sorted(dtypes - {"I32"})  # I32: packed AWQ linears (awq --vision int4)
    vision_dtype = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(next(iter(floats), "BF16"), "bf16")
    q = spec.quantization if spec.is_quantized else None
    if q is not None:
        kind, fmt = "awq", f"awq-int{q.get('bits', 4)}-g{q.get('group_size', 128)}"
        quant = f"AWQ int{q.get('bits', 4)} g{q.get('group_size', 128)}"
        if "I32" in dtypes:  # packed vision linears (`awq --vision`): the same config quantized them
            vision_dtype = fmt
    else:
        kind, fmt, quant = "checkpoint", vision_dtype, spec.torch_dtype
    if not ckpt.has_weights:  # config + index only (a Hub snapshot for `plan`): sizes from the shapes
        from r1v_quant.model.storage import LLM_FORMATS, weight_bytes

        stored.update(weight_bytes(spec, fmt if fmt in LLM_FORMATS else "bf16"))
    return Artifact(
        name=name or model_name(path),
        path=path,
        kind=kind,
        flavor=spec.flavor,
        vocab=spec.llm.vocab_size,
        hidden=spec.llm.hidden_size,
        layers=spec.llm.num_layers,
        quant=quant,
        llm_format=fmt,
        vision_format=vision_dtype,
        size_bytes=sum(p.stat().st_size for p in path.glob("*.safetensors")),
        stored={k: v for k, v in stored.items() if v},
        geometry=Geometry.from_spec(spec) if geometry else None,
        spec=spec,
    )


# -- GGUF -------------------------------------------------------------------------------------------------
def _gguf_reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError as e:
        raise R1VError(f"the gguf package is not installed ({e}): pip install 'r1v-quant[gguf]'") from None
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise R1VError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _sibling_mmproj(llm: Path) -> Path | None:
    found = sorted(p for p in llm.parent.glob("*.gguf") if "mmproj" in p.name and p != llm)
    if len(found) > 1:  # several: the one named after this model (mmproj-<name>-<TYPE>.gguf)
        base = llm.stem.rsplit("-", 1)[0]
        found = [p for p in found if base in p.name]
    return found[0] if len(found) == 1 else None


def find_gguf_pair(path: Path | str) -> tuple[Path, Path | None]:
    """A .gguf file, or a folder holding one language-model GGUF and at most one mmproj GGUF."""
    path = Path(path)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise R1VError(f"{path}: no such GGUF file or folder")
    # `gguf --calib` writes the importance matrix beside the model as <name>.imatrix.gguf: not a model
    files = sorted(
        p for p in path.glob("*.gguf") if not p.name.startswith(".") and not p.name.endswith(".imatrix.gguf")
    )
    mmproj = [p for p in files if "mmproj" in p.name]
    # a split model is named -00001-of-0000N; llama.cpp loads it from its first part
    llm = [p for p in files if p not in mmproj and ("-of-" not in p.stem or "-00001-of-" in p.stem)]
    if len(llm) != 1:
        found = ", ".join(p.name for p in llm) or "none"
        raise R1VError(f"{path}: expected one language-model .gguf, found {found}; pass the file itself")
    if len(mmproj) > 1:
        raise R1VError(f"{path}: several mmproj files ({', '.join(p.name for p in mmproj)}); pass --mmproj")
    return llm[0], (mmproj[0] if mmproj else None)


def _pair_gguf(path: Path, mmproj: Path | str | None, sibling: bool) -> tuple[Path, Path | None]:
    """(language-model GGUF, mmproj GGUF or None). A folder: the llama.cpp runtime's rule (one language model,
    at most one mmproj). A file: the language model, with the sibling mmproj when `sibling`. An explicit
    `mmproj` takes precedence."""
    if path.is_file() and "mmproj" in path.name:
        raise R1VError(f"{path}: an mmproj GGUF; pass the language-model GGUF (or their folder)")
    llm, found = find_gguf_pair(path)
    if path.is_file() and sibling:
        found = _sibling_mmproj(llm)
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


def _qwen2(reader: Any, llm: Path, key: str, default: Any = None) -> Any:
    v = _field(reader, f"qwen2.{key}", default)
    if v is None:
        raise R1VError(f"{llm}: no qwen2.{key} in the GGUF header")
    return v


def _type_name(ftype: Any) -> str:
    return str(ftype.name).replace("MOSTLY_", "").replace("ALL_", "")


def _file_type(reader: Any) -> Any:
    import gguf

    try:
        return gguf.LlamaFileType(int(_field(reader, "general.file_type")))
    except (TypeError, ValueError):
        return None


def _file_identity(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _gguf_artifact(
    path: Path, llm: Path, mmproj: Path | None, name: str | None, *, geometry: bool
) -> Artifact:
    """The description of a GGUF pair, read once per file version in a process: the gguf package parses
    every header field eagerly (a 151k-token vocabulary takes seconds), and a model card's planned commands
    describe the same files several times. Callers get their own copy of the mutable parts."""
    art = _read_gguf_artifact(
        path, llm, _file_identity(llm), mmproj, _file_identity(mmproj), name, geometry=geometry
    )
    return dataclasses.replace(
        art, stored=dict(art.stored), extra=dict(art.extra), gguf_tokens=list(art.gguf_tokens or [])
    )


@functools.lru_cache(maxsize=8)
def _read_gguf_artifact(
    path: Path,
    llm: Path,
    llm_id: tuple[int, int, int] | None,  # part of the cache key: a rewritten file is reread
    mmproj: Path | None,
    mmproj_id: tuple[int, int, int] | None,
    name: str | None,
    *,
    geometry: bool,
) -> Artifact:
    r = _gguf_reader(llm)
    arch = _field(r, "general.architecture")
    if arch == "clip":
        raise R1VError(f"{llm}: an mmproj GGUF; pass the language-model GGUF (or their folder)")
    if arch != "qwen2":
        raise R1VError(f"{llm}: GGUF architecture {arch!r}, expected qwen2 (an R1V language-model GGUF)")

    stored = {c: 0 for c in COMPONENTS}
    params = {c: 0 for c in COMPONENTS}
    repacked = 0
    for t in r.tensors:
        stored[_gguf_component(t.name)] += int(t.n_bytes)
        params[_gguf_component(t.name)] += int(t.n_elements)
        if t.tensor_type.name in REPACKED_TYPES and t.name != "token_embd.weight" and len(t.shape) == 2:
            repacked += int(t.n_bytes)
    tokens = list(_field(r, "tokenizer.ggml.tokens", []) or [])
    ftype = _file_type(r)
    m = _gguf_reader(mmproj) if mmproj is not None else None
    vision_format = None
    if m is not None:
        for t in m.tensors:
            stored[_gguf_component(t.name)] += int(t.n_bytes)
            params[_gguf_component(t.name)] += int(t.n_elements)
        mtype = _file_type(m)
        vision_format = _type_name(mtype) if mtype is not None else None
    flavor = _field(r, "r1v_quant.flavor")
    return Artifact(
        name=name or llm.stem,
        path=path,
        kind="gguf",
        flavor=str(flavor) if flavor else None,
        vocab=len(tokens),
        hidden=int(_qwen2(r, llm, "embedding_length")),
        layers=int(_qwen2(r, llm, "block_count")),
        quant=ftype.name.removeprefix("MOSTLY_") if ftype is not None else "unknown",
        llm_format=_type_name(ftype) if ftype is not None else "?",
        vision_format=vision_format,
        size_bytes=llm.stat().st_size + (mmproj.stat().st_size if mmproj else 0),
        stored={k: v for k, v in stored.items() if v},
        geometry=_gguf_geometry(r, llm, m, mmproj, params, len(tokens)) if geometry else None,
        llm_gguf=llm,
        mmproj_gguf=mmproj,
        gguf_tokens=tokens,
        extra={"output_bytes": _output_bytes(r), "repacked": repacked},
    )


def _gguf_geometry(
    r: Any, llm: Path, m: Any, mmproj: Path | None, params: dict[str, int], n_tokens: int
) -> Geometry:
    """Every dimension the planner needs, from the language-model header and the mmproj's (when there is
    one); a missing key is an error."""

    def key(k: str, default: Any = None) -> Any:
        return _qwen2(r, llm, k, default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vit: dict[str, Any] = {
        "vit_layers": 0, "vit_hidden": 0, "vit_heads": 1, "vit_ffn": 0, "vit_qk_norm": False,
        "positions": 0, "tokens_per_tile": 0, "projector_in": 0, "max_tiles": 0, "image_size": 448,
    }  # fmt: skip
    if m is not None:
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
    return Geometry(
        llm_layers=int(key("block_count")),
        hidden=hidden,
        heads=heads,
        kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(_field(r, "qwen2.attention.key_length") or hidden // heads),
        ffn=int(key("feed_forward_length")),
        vocab=int(_field(r, "qwen2.vocab_size") or n_tokens),
        max_ctx=int(key("context_length")),
        params={k: v for k, v in params.items() if v},
        **vit,
    )
