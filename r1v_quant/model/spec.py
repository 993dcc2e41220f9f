"""One data object describing a Skywork-R1V checkpoint, parsed from its config.json.

R1V, R1V2 and R1V3 share one weight layout; what differs between them (prompt style, stop tokens, template
name) is data in `FLAVORS`, never a subclass. Everything downstream (forward, calibration, AWQ, GGUF, the
planner) reads dimensions from a `ModelSpec`, so the 38B and the tiny replica run the same code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.util.errors import CheckpointError

# Top-level architecture names seen on R1V releases and their AWQ copies (LMDeploy renames to InternVL).
KNOWN_ARCHITECTURES = ("SkyworkR1VChatModel", "SkyworkChatModel", "InternVLChatModel")
KNOWN_LLM_ARCHITECTURES = ("Qwen2ForCausalLM",)
KNOWN_VISION_ARCHITECTURES = ("InternVisionModel",)

LLM_PREFIX = "language_model.model.layers"
VIT_PREFIX = "vision_model.encoder.layers"


@dataclass(frozen=True)
class Flavor:
    """Per-release differences. Prompt formats themselves live in `prompts.CHAT_FORMATS` under `name`."""

    name: str
    release: str
    base_llm: str
    # `template` values in config.json that identify this flavour (InternVL conversation.py names).
    template_names: tuple[str, ...]


FLAVORS: dict[str, Flavor] = {
    "r1v": Flavor(
        "r1v", "Skywork-R1V-38B", "DeepSeek-R1-Distill-Qwen-32B", ("skywork-r1v", "deepseek-r1", "r1v")
    ),
    "r1v2": Flavor("r1v2", "Skywork-R1V2-38B", "QwQ-32B", ("skywork-r1v2", "qwq", "r1v2")),
    "r1v3": Flavor(
        "r1v3", "Skywork-R1V3-38B", "InternVL3-38B (Qwen2.5-32B)", ("internvl2_5", "skywork-r1v3", "r1v3")
    ),
}


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    qkv_bias: bool
    qk_norm: bool
    norm_type: str  # "rms_norm" (InternViT-6B) | "layer_norm" (InternViT-300M)
    eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1


@dataclass(frozen=True)
class LLMSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None


@dataclass(frozen=True)
class TokenIds:
    """Ids read from the checkpoint's tokenizer (never hard-coded: they differ per release)."""

    img_context: int | None = None
    img_start: int | None = None
    img_end: int | None = None
    think_start: int | None = None
    think_end: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    flavor: str
    architecture: str
    vision: VisionSpec
    llm: LLMSpec
    downsample_ratio: float
    ps_version: str
    select_layer: int
    force_image_size: int
    dynamic_image_size: bool
    use_thumbnail: bool
    min_dynamic_patch: int
    max_dynamic_patch: int
    template: str | None
    torch_dtype: str
    quantization: dict[str, Any] | None = None
    tokens: TokenIds = field(default_factory=TokenIds)

    # -- derived geometry -------------------------------------------------------------------------------
    @property
    def num_image_token(self) -> int:
        # InternVL: (image_size // patch_size)^2 * downsample_ratio^2 = 256 for 448/14/0.5
        return int((self.force_image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def projector_in(self) -> int:
        return int(self.vision.hidden_size * round(1 / self.downsample_ratio) ** 2)

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_image_token"] = self.num_image_token
        d["projector_in"] = self.projector_in
        return d

    # -- the checkpoint layout as data -------------------------------------------------------------------
    def vision_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        v = self.vision
        c, f = v.hidden_size, v.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"attn.qkv.weight": (3 * c, c)}
        if v.qkv_bias:
            shapes["attn.qkv.bias"] = (3 * c,)
        if v.qk_norm:
            shapes["attn.q_norm.weight"] = (c,)
            shapes["attn.k_norm.weight"] = (c,)
        shapes.update(
            {
                "attn.proj.weight": (c, c),
                "attn.proj.bias": (c,),
                "mlp.fc1.weight": (f, c),
                "mlp.fc1.bias": (f,),
                "mlp.fc2.weight": (c, f),
                "mlp.fc2.bias": (c,),
                "norm1.weight": (c,),
                "norm2.weight": (c,),
                "ls1": (c,),
                "ls2": (c,),
            }
        )
        if v.norm_type == "layer_norm":
            shapes["norm1.bias"] = (c,)
            shapes["norm2.bias"] = (c,)
        return shapes

    def llm_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        m = self.llm
        h, q, kv, f = (
            m.hidden_size,
            m.num_heads * m.head_dim,
            m.num_kv_heads * m.head_dim,
            m.intermediate_size,
        )
        return {
            "self_attn.q_proj.weight": (q, h),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of a 16-bit checkpoint with its shape, in checkpoint order."""
        v, m = self.vision, self.llm
        c = v.hidden_size
        out: dict[str, tuple[int, ...]] = {
            "vision_model.embeddings.class_embedding": (1, 1, c),
            "vision_model.embeddings.patch_embedding.weight": (c, 3, v.patch_size, v.patch_size),
            "vision_model.embeddings.patch_embedding.bias": (c,),
            "vision_model.embeddings.position_embedding": (1, v.num_positions, c),
        }
        for i in range(v.num_layers):
            for k, s in self.vision_layer_shapes().items():
                out[f"{VIT_PREFIX}.{i}.{k}"] = s
        p = self.projector_in
        out.update(
            {
                "mlp1.0.weight": (p,),
                "mlp1.0.bias": (p,),
                "mlp1.1.weight": (m.hidden_size, p),
                "mlp1.1.bias": (m.hidden_size,),
                "mlp1.3.weight": (m.hidden_size, m.hidden_size),
                "mlp1.3.bias": (m.hidden_size,),
                "language_model.model.embed_tokens.weight": (m.vocab_size, m.hidden_size),
            }
        )
        for i in range(m.num_layers):
            for k, s in self.llm_layer_shapes().items():
                out[f"{LLM_PREFIX}.{i}.{k}"] = s
        out["language_model.model.norm.weight"] = (m.hidden_size,)
        if not m.tie_word_embeddings:
            out["language_model.lm_head.weight"] = (m.vocab_size, m.hidden_size)
        return out


def component_of(name: str) -> str:
    """Which part of the model a checkpoint tensor belongs to (for reports and memory plans)."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("mlp1."):
        return "projector"
    if name.startswith(LLM_PREFIX + "."):
        return "decoder"
    if name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        return "embeddings"
    return "other"


# -- parsing ---------------------------------------------------------------------------------------------
def _req(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"config.json: missing '{key}' in {where}")
    return cfg[key]


def _divides(what: str, a: int, b: int) -> None:
    if b <= 0 or a % b:
        raise CheckpointError(f"unsupported dimension: {what} ({a} is not divisible by {b})")


def detect_flavor(cfg: dict[str, Any], chat_template: str | None = None) -> str:
    """Flavour from the config's `template` name, else from the tokenizer's chat template, else from ids."""
    template = (cfg.get("template") or "").lower()
    for name, fl in FLAVORS.items():
        if template in fl.template_names:
            return name
    if chat_template:
        if "｜User｜" in chat_template:
            return "r1v"
        if "<|im_start|>" in chat_template:
            return "r1v3" if "internvl" in template else "r1v2"
    llm = cfg.get("llm_config", {})
    eos = llm.get("eos_token_id")
    if eos == 151643 and llm.get("bos_token_id") == 151643:
        return "r1v"  # DeepSeek-R1-Distill-Qwen keeps <｜end▁of▁sentence｜>=151643 as eos
    if template.startswith("internvl"):
        return "r1v3"
    raise CheckpointError(
        f"cannot tell the R1V flavour (template {cfg.get('template')!r}); pass --flavor r1v|r1v2|r1v3"
    )


def parse_config(
    cfg: dict[str, Any],
    *,
    flavor: str | None = None,
    chat_template: str | None = None,
    tokens: TokenIds | None = None,
) -> ModelSpec:
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in KNOWN_ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture {arch!r}: r1v-quant handles {', '.join(KNOWN_ARCHITECTURES)}"
        )
    vc = _req(cfg, "vision_config", "the top level")
    lc = _req(cfg, "llm_config", "the top level")
    larch = (lc.get("architectures") or ["Qwen2ForCausalLM"])[0]
    if larch not in KNOWN_LLM_ARCHITECTURES:
        raise CheckpointError(f"unknown language model architecture {larch!r}: expected Qwen2ForCausalLM")
    varch = (vc.get("architectures") or ["InternVisionModel"])[0]
    if varch not in KNOWN_VISION_ARCHITECTURES:
        raise CheckpointError(f"unknown vision architecture {varch!r}: expected InternVisionModel")

    norm_type = vc.get("norm_type", "rms_norm")
    if norm_type not in ("rms_norm", "layer_norm"):
        raise CheckpointError(f"unsupported vision norm_type {norm_type!r}")
    image_size = vc.get("image_size", 448)
    patch_size = vc.get("patch_size", 14)
    if isinstance(image_size, list):
        image_size = image_size[0]
    if isinstance(patch_size, list):
        patch_size = patch_size[0]
    vision = VisionSpec(
        hidden_size=int(_req(vc, "hidden_size", "vision_config")),
        num_layers=int(_req(vc, "num_hidden_layers", "vision_config")),
        num_heads=int(_req(vc, "num_attention_heads", "vision_config")),
        intermediate_size=int(_req(vc, "intermediate_size", "vision_config")),
        image_size=int(image_size),
        patch_size=int(patch_size),
        qkv_bias=bool(vc.get("qkv_bias", False)),
        qk_norm=bool(vc.get("qk_normalization", False)),
        norm_type=norm_type,
        eps=float(vc.get("layer_norm_eps", 1e-6)),
        hidden_act=vc.get("hidden_act", "gelu"),
    )
    if vision.hidden_act != "gelu":
        raise CheckpointError(f"unsupported vision hidden_act {vision.hidden_act!r} (InternViT uses gelu)")
    _divides("vision hidden_size / num_attention_heads", vision.hidden_size, vision.num_heads)
    _divides("vision image_size / patch_size", vision.image_size, vision.patch_size)

    heads = int(_req(lc, "num_attention_heads", "llm_config"))
    hidden = int(_req(lc, "hidden_size", "llm_config"))
    _divides("llm hidden_size / num_attention_heads", hidden, heads)
    kv = int(lc.get("num_key_value_heads", heads))
    _divides("llm num_attention_heads / num_key_value_heads", heads, kv)
    act = lc.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"unsupported llm hidden_act {act!r} (Qwen2 uses silu)")
    rope_theta = lc.get("rope_theta")
    if rope_theta is None:
        rope_theta = (lc.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
    llm = LLMSpec(
        hidden_size=hidden,
        num_layers=int(_req(lc, "num_hidden_layers", "llm_config")),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(lc.get("head_dim") or hidden // heads),
        intermediate_size=int(_req(lc, "intermediate_size", "llm_config")),
        vocab_size=int(_req(lc, "vocab_size", "llm_config")),
        rope_theta=float(rope_theta),
        rms_eps=float(lc.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(lc.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(lc.get("tie_word_embeddings", False)),
        bos_token_id=lc.get("bos_token_id"),
        eos_token_id=lc.get("eos_token_id"),
    )
    ratio = float(cfg.get("downsample_ratio", 0.5))
    scale = round(1 / ratio)
    if abs(scale * ratio - 1) > 1e-6 or (vision.grid % scale):
        raise CheckpointError(f"unsupported downsample_ratio {ratio} for a {vision.grid}x{vision.grid} grid")
    ps = cfg.get("ps_version", "v1")
    if ps not in ("v1", "v2"):
        raise CheckpointError(f"unsupported ps_version {ps!r}")
    quant = cfg.get("quantization_config") or lc.get("quantization_config")
    force = cfg.get("force_image_size") or vision.image_size
    if force != vision.image_size:
        raise CheckpointError(
            f"force_image_size {force} differs from vision image_size {vision.image_size}: not supported"
        )
    return ModelSpec(
        flavor=flavor or detect_flavor(cfg, chat_template),
        architecture=arch,
        vision=vision,
        llm=llm,
        downsample_ratio=ratio,
        ps_version=ps,
        select_layer=int(cfg.get("select_layer", -1)),
        force_image_size=int(force),
        dynamic_image_size=bool(cfg.get("dynamic_image_size", True)),
        use_thumbnail=bool(cfg.get("use_thumbnail", True)),
        min_dynamic_patch=int(cfg.get("min_dynamic_patch", 1)),
        max_dynamic_patch=int(cfg.get("max_dynamic_patch", 12)),
        template=cfg.get("template"),
        torch_dtype=str(cfg.get("torch_dtype") or lc.get("torch_dtype") or "bfloat16"),
        quantization=quant,
        tokens=tokens or TokenIds(),
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).exists():
        raise CheckpointError(f"{model_dir}: no such directory")
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    for key in ("llm_config", "vision_config"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise CheckpointError(f"{path}: '{key}' must be a JSON object, found {type(cfg[key]).__name__}")
    return cfg


def load_spec(model_dir: Path | str, *, flavor: str | None = None) -> ModelSpec:
    """Parse config.json; image/think token ids and the chat template come from the tokenizer if present."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    tokens, chat_template = TokenIds(), None
    if (model_dir / "tokenizer.json").is_file():
        from r1v_quant.model.tokenizer import R1VTokenizer

        tok = R1VTokenizer.from_dir(model_dir)
        tokens = TokenIds(
            tok.img_context_id, tok.img_start_id, tok.img_end_id, tok.think_start_id, tok.think_end_id
        )
        chat_template = tok.chat_template
    if flavor is not None and flavor not in FLAVORS:
        raise CheckpointError(f"unknown flavour {flavor!r}: expected one of {', '.join(FLAVORS)}")
    try:
        return parse_config(cfg, flavor=flavor, chat_template=chat_template, tokens=tokens)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        # a value of the wrong JSON type ("hidden_size": "big", "architectures": {}): data, not a bug
        raise CheckpointError(
            f"{model_dir / 'config.json'}: a value has the wrong type or form ({type(e).__name__}: {e})"
        ) from None


def param_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())
