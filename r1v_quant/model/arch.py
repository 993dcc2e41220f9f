"""Per-architecture layer facts, declared once: which linears a layer has, which of them read the same input,
where an input scale can be folded, which must not be clipped, and the HF -> GGUF tensor names.

Every stage reads these tables: the AWQ search (scale groups, clip exclusions), calibration statistics (input
groups), activation-aware GGUF (fold groups), the GGUF writers (tensor names) and the planner (through the
spec's tensor shapes). Names are relative to a decoder layer (`language_model.model.layers.N.`) or a vision
layer (`vision_model.encoder.layers.N.`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputGroup:
    """Linears that read one input: they share its activation statistics and one input-channel scale."""

    name: str  # calibration statistics key ("qkv")
    linears: tuple[str, ...]  # consumers, the first one's input is the one recorded
    prev: str  # producer whose output channels can absorb 1/s (a norm, or a linear's rows)
    scale: str  # AWQ / activation-aware GGUF name of the scale ("attn_in")
    module: str  # whose output the AWQ search compares ("" = the linear itself)

    @property
    def recorded(self) -> str:
        return self.linears[0]


# Qwen2 decoder layer (R1V's 32B language model): four inputs, seven linears.
DECODER_GROUPS: tuple[InputGroup, ...] = (
    InputGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
               "attn_in", "self_attn"),
    InputGroup("o_proj", ("self_attn.o_proj",), "self_attn.v_proj", "v_o", "self_attn.o_proj"),
    InputGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp_in", "mlp"),
    InputGroup("down_proj", ("mlp.down_proj",), "mlp.up_proj", "up_down", "mlp.down_proj"),
)  # fmt: skip
DECODER_LINEARS: tuple[str, ...] = tuple(lin for g in DECODER_GROUPS for lin in g.linears)
# clipping q/k weights distorts attention logits (AutoAWQ skips them too)
DECODER_NO_CLIP: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

# language-model tensors -> gguf-py MODEL_TENSOR member (names under `language_model.`, suffix kept)
LLM_GGUF_GLOBAL: dict[str, str] = {
    "model.embed_tokens": "TOKEN_EMBD",
    "model.norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
}
LLM_GGUF_LAYER: dict[str, str] = {
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

# InternViT layer (`awq --vision`): three foldable inputs; fc2 reads GELU(fc1(x)), which no scale passes
# through, so it gets no scale. `prev` "attn.qkv:v" = the v rows of the fused qkv; `module` names the
# output the search scores (attn | proj | mlp).
VISION_GROUPS: tuple[InputGroup, ...] = (
    InputGroup("qkv", ("attn.qkv",), "norm1", "norm1_qkv", "attn"),
    InputGroup("proj", ("attn.proj",), "attn.qkv:v", "v_proj", "proj"),
    InputGroup("fc1", ("mlp.fc1",), "norm2", "norm2_fc1", "mlp"),
    InputGroup("fc2", ("mlp.fc2",), "", "", "mlp"),
)
VISION_LINEARS: tuple[str, ...] = tuple(lin for g in VISION_GROUPS for lin in g.linears)
# InternViT tensors in the mmproj: the fused qkv is split into three GGUF tensors; the rest maps one to one
VISION_QKV_PARTS: tuple[str, ...] = ("attn_q", "attn_k", "attn_v")
VISION_GGUF_LAYER: dict[str, str] = {  # checkpoint suffix -> GGUF suffix under v.blk.N
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "attn.proj.weight": "attn_out.weight",
    "attn.proj.bias": "attn_out.bias",
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "norm2.weight": "ln2.weight",
    "norm2.bias": "ln2.bias",
    "mlp.fc1.weight": "ffn_up.weight",
    "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight",
    "mlp.fc2.bias": "ffn_down.bias",
    "ls1": "ls1.weight",
    "ls2": "ls2.weight",
}
