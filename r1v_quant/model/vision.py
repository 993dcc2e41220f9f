"""InternViT (6B: RMSNorm + q/k-norm; 300M: LayerNorm + qkv bias), pixel shuffle and the mlp1 projector.

Module and parameter names equal the checkpoint's (`vision_model.encoder.layers.N.attn.qkv.weight`, ...)
so `load_state_dict` takes checkpoint tensors as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.model.norms import RMSNorm
from r1v_quant.model.spec import ModelSpec, VisionSpec


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if norm_type == "rms_norm" else nn.LayerNorm(dim, eps=eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, v: VisionSpec):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, v.hidden_size))
        self.patch_embedding = nn.Conv2d(3, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, v.num_positions, v.hidden_size))
        self.grid = v.grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        b, c, h, w = x.shape
        if (h, w) != (self.grid, self.grid):
            raise ValueError(f"vision tower expects a {self.grid}x{self.grid} patch grid, got {h}x{w}")
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(b, 1, c).to(x.dtype)
        # HF order: CLS first, so patch k gets position row k+1 (llama.cpp differs: exporters/gguf_mmproj.py)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, v: VisionSpec):
        super().__init__()
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=v.qkv_bias)
        self.qk_norm = v.qk_norm
        if v.qk_norm:
            # InternViT normalises the full q / k vectors (all heads together) before the head split.
            self.q_norm = RMSNorm(v.hidden_size, v.eps)
            self.k_norm = RMSNorm(v.hidden_size, v.eps)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VisionMLP(nn.Module):
    def __init__(self, v: VisionSpec):
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, v: VisionSpec):
        super().__init__()
        self.attn = VisionAttention(v)
        self.mlp = VisionMLP(v)
        self.norm1 = make_norm(v.norm_type, v.hidden_size, v.eps)
        self.norm2 = make_norm(v.norm_type, v.hidden_size, v.eps)
        self.ls1 = nn.Parameter(torch.ones(v.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(v.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, v: VisionSpec):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(v) for _ in range(v.num_layers))


class VisionModel(nn.Module):
    """`vision_model.*`: embeddings + encoder; no final norm (InternViT has none)."""

    def __init__(self, v: VisionSpec):
        super().__init__()
        self.embeddings = VisionEmbeddings(v)
        self.encoder = VisionEncoder(v)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states[select_layer]  # -1 = last layer; hidden_states[0] is the embedding output


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """InternVL's pixel shuffle on (n, w, h, c): merges scale^-2 neighbours into the channel dim."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class Projector(nn.Sequential):
    """`mlp1` = LayerNorm(4C) -> Linear(4C, H) -> GELU (exact) -> Linear(H, H), checkpoint indices."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )


def extract_feature(
    vision_model: VisionModel, mlp1: Projector, spec: ModelSpec, pixel_values: torch.Tensor
) -> torch.Tensor:
    """(tiles, 3, S, S) -> (tiles, num_image_token, llm hidden): the <IMG_CONTEXT> embeddings."""
    x = vision_model(pixel_values, spec.select_layer)[:, 1:, :]  # drop CLS
    n, t, c = x.shape
    side = int(t**0.5)
    x = pixel_shuffle(x.reshape(n, side, side, c), spec.downsample_ratio, spec.ps_version)
    x = x.reshape(n, -1, x.shape[-1])
    return mlp1(x.to(mlp1[0].weight.dtype))
