"""config.json of the three real 38B releases, from their published dimensions.

Used by the planner (`--preset`) and to test that every size computation comes out right at 38B
without the weights. `write_layout` writes config.json + a safetensors index naming every tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1v_quant.model.spec import ModelSpec, parse_config
from r1v_quant.util.atomic import write_text_atomic

VISION_6B = {
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "hidden_size": 3200,
    "intermediate_size": 12800,
    "num_attention_heads": 25,
    "num_hidden_layers": 45,
    "patch_size": 14,
    "image_size": 448,
    "num_channels": 3,
    "qkv_bias": False,
    "qk_normalization": True,
    "norm_type": "rms_norm",
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "initializer_factor": 0.1,
    "use_flash_attn": True,
    "torch_dtype": "bfloat16",
}


def _llm(bos: int, eos: int, vocab: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "num_hidden_layers": 64,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
    }


PRESETS: dict[str, dict[str, Any]] = {
    "r1v-38b": {"template": "skywork-r1v", "llm": _llm(151643, 151643, 152064)},
    "r1v2-38b": {"template": "skywork-r1v2", "llm": _llm(151643, 151645, 152064)},
    "r1v3-38b": {"template": "internvl2_5", "llm": _llm(151643, 151645, 151674)},
}


def preset_config(name: str) -> dict[str, Any]:
    p = PRESETS[name]
    return {
        "architectures": ["SkyworkR1VChatModel"],
        "model_type": "skywork_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "hidden_size": 5120,
        "select_layer": -1,
        "ps_version": "v2",
        "template": p["template"],
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vision_config": dict(VISION_6B),
        "llm_config": dict(p["llm"]),
    }


def preset_spec(name: str) -> ModelSpec:
    return parse_config(preset_config(name))


def write_layout(out: Path | str, name: str, *, shards: int = 16) -> Path:
    """A config + index directory shaped like the real checkpoint (no weights), for inspect/plan."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset_config(name)
    names = list(parse_config(cfg).tensor_shapes())
    per = -(-len(names) // shards)
    wm = {n: f"model-{i // per + 1:05d}-of-{shards:05d}.safetensors" for i, n in enumerate(names)}
    write_text_atomic(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    write_text_atomic(
        out / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": wm}, indent=2)
    )
    return out
