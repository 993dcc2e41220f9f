"""Qwen2 decoder in plain torch, parameter names as in the checkpoint (`self_attn.q_proj`, `mlp.gate_proj`).

Written out (about 100 lines) rather than taken from transformers so that one decoder layer can be built
and run on its own: calibration, the AWQ search and streaming all work a layer at a time. A test checks it
against transformers' Qwen2ForCausalLM on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.model.norms import RMSNorm
from r1v_quant.model.spec import LLMSpec

Qwen2RMSNorm = RMSNorm  # same computation; the name mirrors transformers'


def rope_cos_sin(
    m: LLMSpec, positions: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for `positions` (1-D), shape (len, head_dim), Qwen2's non-interleaved layout."""
    d = m.head_dim
    inv_freq = 1.0 / (m.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Per-layer key/value tensors for incremental decoding."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is not None:
            k = torch.cat([self.k[i], k], dim=2)
            v = torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


class Qwen2Attention(nn.Module):
    def __init__(self, m: LLMSpec):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = m.num_heads, m.num_kv_heads, m.head_dim
        self.q_proj = nn.Linear(m.hidden_size, m.num_heads * m.head_dim, bias=True)
        self.k_proj = nn.Linear(m.hidden_size, m.num_kv_heads * m.head_dim, bias=True)
        self.v_proj = nn.Linear(m.hidden_size, m.num_kv_heads * m.head_dim, bias=True)
        self.o_proj = nn.Linear(m.num_heads * m.head_dim, m.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = (
            apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)),
            apply_rope(k, cos.to(k.dtype), sin.to(k.dtype)),
        )
        past = 0
        if cache is not None:
            prev = cache.k[layer_idx]
            past = 0 if prev is None else prev.shape[2]
            k, v = cache.update(layer_idx, k, v)
        rep = self.num_heads // self.num_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
        else:
            # new query i (absolute position past+i) sees keys 0..past+i
            mask = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, m: LLMSpec):
        super().__init__()
        self.gate_proj = nn.Linear(m.hidden_size, m.intermediate_size, bias=False)
        self.up_proj = nn.Linear(m.hidden_size, m.intermediate_size, bias=False)
        self.down_proj = nn.Linear(m.intermediate_size, m.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Layer(nn.Module):
    """One decoder layer `language_model.model.layers.N`: the unit of calibration, search and streaming."""

    def __init__(self, m: LLMSpec):
        super().__init__()
        self.self_attn = Qwen2Attention(m)
        self.mlp = Qwen2MLP(m)
        self.input_layernorm = Qwen2RMSNorm(m.hidden_size, m.rms_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(m.hidden_size, m.rms_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """`language_model.model`."""

    def __init__(self, m: LLMSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(m.vocab_size, m.hidden_size)
        self.layers = nn.ModuleList(Qwen2Layer(m) for _ in range(m.num_layers))
        self.norm = Qwen2RMSNorm(m.hidden_size, m.rms_eps)


class Qwen2ForCausalLM(nn.Module):
    """`language_model`: decoder + untied lm_head."""

    def __init__(self, m: LLMSpec):
        super().__init__()
        self.spec = m
        self.model = Qwen2Model(m)
        self.lm_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)

    def forward_embeds(self, embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Embeddings (b, n, h) -> final hidden states (b, n, h), continuing after `cache` if given."""
        start = cache.length if cache is not None else 0
        cos, sin = rope_cos_sin(self.spec, torch.arange(start, start + embeds.shape[1]))
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
