"""Activation-aware weight quantization of one InternViT layer (the math; data movement in
exporters/awq_vision.py). Same search as the decoder's (r1v_quant/quant/awq_search.py), adapted to the ViT
block; its groups are declared in r1v_quant/model/arch.py.

The block is `h = x + attn(norm1(x)) * ls1; out = h + mlp(norm2(h)) * ls2`, with one fused `attn.qkv`
linear, `attn.proj`, and `mlp.fc1` -> GELU -> `mlp.fc2`. The layer scales ls1 / ls2 multiply the
attention and MLP outputs per channel on their way into the residual, so a group's error is measured
there: attention and proj errors times ls1, MLP errors times ls2, i.e. as they reach the block output.
ls never touches a linear's input, so it changes no fold.

Scaling groups (a per-input-channel scale s divides the preceding module's output channels and
multiplies the linear's input columns; exact at 16-bit):
  - norm1 -> attn.qkv, scored on attn(norm1(x)) * ls1 (full bidirectional attention over each tile);
  - the v rows of attn.qkv -> attn.proj, scored on proj(context) * ls1 (the context is linear in v);
  - norm2 -> mlp.fc1, scored on mlp(norm2(h)) * ls2.
mlp.fc2 gets no scale: GELU sits between fc1 and fc2 and gelu(x / s) != gelu(x) / s, so a scale folded
into fc1's rows would change the 16-bit function (AutoAWQ inserts a ScaledActivation module for such
blocks; vLLM's InternViT has no such module, so the checkpoint could not carry it): fc2 is plainly
rounded. With cfg.apply_clip, per-group clipping for every linear except the q / k rows of qkv (clipping
them would distort the attention logits, as AutoAWQ skips q / k), scored through Gram matrices as in
awq.py; `awq --vision int4` runs without it (exporters/awq_vision.vision_config: measured to move the image
embeddings away from 16-bit). The whole layer falls back to round-to-nearest when its block-output error
is not lower.

Every token of a tile counts once (no modality weights: all are vision tokens). The scale statistic
mean |x| is over every calibration tile (the caller accumulates it with `VitInputStats`); the scores
and Gram matrices use a fixed subset of tiles (`score`), attention over all 1025 tokens of each.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.model.arch import VISION_GROUPS, VISION_LINEARS
from r1v_quant.model.groupwise import QuantizedWeight, check_group, quantize_weight
from r1v_quant.model.vision import VisionLayer
from r1v_quant.quant.awq_search import (
    AWQConfig,
    LayerResult,
    _quantize_clipped,
    _round_params_fp16,
    _search_clip,
    pick_scale,
    scale_candidates,
)
from r1v_quant.util.errors import R1VError

VIT_LINEARS = VISION_LINEARS
VISION_MODES = ("int4", "int8", "16bit")


@dataclass(frozen=True)
class VitGroup:
    name: str
    prev: str  # a norm, or "attn.qkv:v" (the v rows of the fused qkv)
    linear: str  # the consumer whose input columns absorb the scale
    scored: str  # which output the search compares: attn | proj | mlp


VIT_GROUPS = tuple(VitGroup(g.scale, g.prev, g.linears[0], g.module) for g in VISION_GROUPS if g.prev)
INPUT_KEYS = {"attn.qkv": "xn1", "attn.proj": "ctx", "mlp.fc1": "xn2", "mlp.fc2": "act"}


@dataclass(frozen=True)
class VitSearch:
    """Knobs of the ViT search beyond AWQConfig's (grid, clip, bits, group size)."""

    score_tiles: int = 16  # tiles whose block outputs score the candidates (the caller picks them)
    screen_tiles: int = 4  # every candidate is first scored on this many of them; 0 = no screen
    screen_keep: int = 4  # the best this many (and plain rounding) are re-scored on all score tiles
    # True: weigh each residual channel's error by its cost to the image embeddings
    # (embedding_channel_weights); measured no better on the replica (docs/awq.md), so off by default
    embedding_weights: bool = False


class VitInputStats:
    """Sum of |x| per input channel of each of the four linears, over every token run through `layer`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def run(self, layer: VisionLayer, x: torch.Tensor) -> torch.Tensor:
        """layer(x) for (tiles, T, c), accumulating the statistics on the way."""

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], key: str) -> None:
            acc = args[0].abs().reshape(-1, args[0].shape[-1]).sum(0).to(torch.float32)
            self.sums[key] = acc if key not in self.sums else self.sums[key] + acc

        handles = [
            layer.get_submodule(n).register_forward_pre_hook(lambda m, a, k=n: hook(m, a, k))
            for n in VIT_LINEARS
        ]
        try:
            out = layer(x)
        finally:
            for h in handles:
                h.remove()
        self.count += x.shape[0] * x.shape[1]
        return out

    def mean_abs(self) -> dict[str, torch.Tensor]:
        return {k: (v / max(self.count, 1)).clamp(min=1e-8) for k, v in self.sums.items()}


@dataclass
class VitFeatures:
    """The 16-bit layer at the score tiles (n, T, ·): linear inputs, group outputs, block output."""

    x: torch.Tensor
    xn1: torch.Tensor
    ctx: torch.Tensor
    xn2: torch.Tensor
    act: torch.Tensor
    attn_out: torch.Tensor  # attn(norm1(x)) * ls1
    proj_in_target: torch.Tensor  # proj(ctx) * ls1 (= attn_out)
    mlp_out: torch.Tensor  # mlp(norm2(h)) * ls2
    out: torch.Tensor

    def inputs(self, linear: str) -> torch.Tensor:
        return getattr(self, INPUT_KEYS[linear])

    def rescale(self, linear: str, s: torch.Tensor) -> None:
        key = INPUT_KEYS[linear]
        setattr(self, key, getattr(self, key) / s)


@torch.no_grad()
def vit_features(layer: VisionLayer, x: torch.Tensor) -> VitFeatures:
    ctx: list[torch.Tensor] = []
    handle = layer.attn.proj.register_forward_pre_hook(lambda _m, a: ctx.append(a[0]))
    try:
        xn1 = layer.norm1(x)
        a = layer.attn(xn1) * layer.ls1
    finally:
        handle.remove()
    h = x + a
    xn2 = layer.norm2(h)
    act = F.gelu(layer.mlp.fc1(xn2))
    m = layer.mlp.fc2(act) * layer.ls2
    return VitFeatures(x, xn1, ctx[0], xn2, act, a, a, m, h + m)


def _weight(layer: nn.Module, name: str) -> torch.Tensor:
    return layer.get_submodule(name).weight


@torch.no_grad()
def _group_output(layer: VisionLayer, g: VitGroup, f: VitFeatures, tiles: slice) -> tuple[torch.Tensor, ...]:
    """(output of the group's module with the layer's current weights, 16-bit target), at `tiles`."""
    if g.scored == "attn":
        return layer.attn(f.xn1[tiles]) * layer.ls1, f.attn_out[tiles]
    if g.scored == "proj":
        return layer.attn.proj(f.ctx[tiles]) * layer.ls1, f.proj_in_target[tiles]
    if g.scored == "mlp":
        return layer.mlp(f.xn2[tiles]) * layer.ls2, f.mlp_out[tiles]
    raise ValueError(f"no output rule for {g.scored!r}")


def _mse(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """Mean squared error; with `w` (c,) each channel's squared error is weighted (normalised to mean 1)."""
    d = (a - b).pow(2)
    return float(d.mean() if w is None else (d * (w / w.mean())).mean())


@torch.no_grad()
def _search_scales(
    layer: VisionLayer,
    g: VitGroup,
    f: VitFeatures,
    mean_abs: torch.Tensor,
    cfg: AWQConfig,
    knobs: VitSearch,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The best per-input-channel scale of one group (s = 1, plain rounding, always competes)."""
    lin = layer.get_submodule(g.linear)
    original = lin.weight.detach().clone()
    gs = cfg.group_size
    x_mean = mean_abs.to(original.device)
    candidates = scale_candidates(original, x_mean, cfg)

    def scores(idx: Sequence[int], tiles: slice) -> list[float]:
        out = []
        for i in idx:
            s = candidates[i][2]
            lin.weight.copy_(quantize_weight(original * s, gs, cfg.bits).dequantize() / s)
            out.append(_mse(*_group_output(layer, g, f, tiles), w))
        return out

    def screened(idx: list[int]) -> list[float]:
        return scores(idx, slice(0, knobs.screen_tiles))

    screen = 0 < knobs.screen_tiles < f.x.shape[0]
    try:
        return pick_scale(
            candidates, lambda idx: scores(idx, slice(None)), screened if screen else None, knobs.screen_keep
        )
    finally:
        lin.weight.copy_(original)


@torch.no_grad()
def fold(layer: VisionLayer, g: VitGroup, s: torch.Tensor) -> None:
    """prev output channels / s, consumer input columns * s: the 16-bit function is unchanged."""
    if g.prev == "attn.qkv:v":
        qkv = layer.attn.qkv
        c = qkv.weight.shape[1]
        qkv.weight[2 * c :].div_(s[:, None])
        if qkv.bias is not None:
            qkv.bias[2 * c :].div_(s)
    else:
        norm = layer.get_submodule(g.prev)
        norm.weight.div_(s)
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s)
    layer.get_submodule(g.linear).weight.mul_(s)


def _gram(x: torch.Tensor, gs: int) -> torch.Tensor:
    xg = x.reshape(-1, x.shape[-1] // gs, gs).to(torch.float32)
    return torch.einsum("tgc,tgd->gcd", xg, xg) / xg.shape[0]


@torch.no_grad()
def block_error(layer: VisionLayer, f: VitFeatures, w: torch.Tensor | None = None) -> float:
    """Mean squared error of the block output at the score tiles against the 16-bit output (channels
    weighted by `w` when given)."""
    return _mse(layer(f.x), f.out, w)


def check_vit_shapes(layer: VisionLayer, cfg: AWQConfig, index: int) -> None:
    for n in VIT_LINEARS:
        check_group(_weight(layer, n).shape[1], cfg.group_size, f"vision layer {index} {n}")


def rtn_vit_layer(layer: VisionLayer, cfg: AWQConfig) -> dict[str, QuantizedWeight]:
    return {n: quantize_weight(_weight(layer, n), cfg.group_size, cfg.bits) for n in VIT_LINEARS}


def apply_vit_quantized(layer: VisionLayer, q: dict[str, QuantizedWeight]) -> None:
    with torch.no_grad():
        for n, qw in q.items():
            _weight(layer, n).copy_(qw.dequantize(_weight(layer, n).dtype))


def vit_state(layer: VisionLayer) -> dict[str, torch.Tensor]:
    """Norms, biases, layer scales (fp16 values): everything of the layer the packed linears do not carry."""
    return {
        k: v.detach().to(torch.float16)
        for k, v in layer.state_dict().items()
        if not (k.endswith(".weight") and k.rsplit(".", 1)[0] in VIT_LINEARS)
    }


@torch.no_grad()
def quantize_vit_layer(
    index: int,
    layer: VisionLayer,
    score: torch.Tensor,
    mean_abs: dict[str, torch.Tensor],
    cfg: AWQConfig,
    method: str = "awq",
    knobs: VitSearch = VitSearch(),
    channel_weight: torch.Tensor | None = None,
) -> LayerResult:
    """AWQ (or plain round-to-nearest) of one ViT layer. `score`: (tiles, T, c) inputs of the score tiles;
    `mean_abs`: mean |x| per input channel of each linear over every calibration token (VitInputStats);
    `channel_weight` (c,): how much an error in each residual channel costs the image embeddings
    (`embedding_channel_weights`); None scores every channel alike. `layer` is left holding the fake-quant
    weights (and the folded norms)."""
    t0 = time.perf_counter()
    check_vit_shapes(layer, cfg, index)
    if not torch.isfinite(score).all():
        raise R1VError(f"NaN/Inf in the inputs of vision layer {index}")
    original = copy.deepcopy(layer)
    report: dict = {"layer": index, "method": method, "score_tokens": int(score.shape[0] * score.shape[1]),
                    "groups": {}, "clip": {}}  # fmt: skip
    f = vit_features(layer, score)
    if method == "rtn":
        q = rtn_vit_layer(layer, cfg)
        _round_params_fp16(layer)
        apply_vit_quantized(layer, q)
        report["loss"] = report["loss_rtn"] = block_error(layer, f, channel_weight)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return LayerResult(index, q, vit_state(layer), report)
    timings: dict[str, float] = {}
    for g in VIT_GROUPS:
        t = time.perf_counter()
        s, rep = _search_scales(layer, g, f, mean_abs[g.linear], cfg, knobs, channel_weight)
        fold(layer, g, s)
        f.rescale(g.linear, s)
        report["groups"][g.name] = rep
        timings[f"scale_{g.name}"] = time.perf_counter() - t
    t = time.perf_counter()
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if cfg.apply_clip:
        for n in VIT_LINEARS:
            w = _weight(layer, n)
            cmax, cmin = _search_clip(w, _gram(f.inputs(n), cfg.group_size), cfg)
            if n == "attn.qkv":  # no clipping on the q and k rows
                c2 = 2 * w.shape[1]
                wg = w[:c2].reshape(c2, -1, cfg.group_size)
                cmax[:c2], cmin[:c2] = wg.amax(-1), wg.amin(-1)
            clips[n] = (cmax, cmin)
            shrink = cmax / w.reshape(*cmax.shape, -1).amax(-1).clamp(min=1e-12)
            report["clip"][n] = round(float(shrink.mean()), 4)
    timings["clip"] = time.perf_counter() - t
    t = time.perf_counter()
    _round_params_fp16(layer)
    q = {n: _quantize_clipped(_weight(layer, n), *(clips.get(n) or (None, None)), cfg) for n in VIT_LINEARS}
    apply_vit_quantized(layer, q)
    loss = block_error(layer, f, channel_weight)
    rtn = original
    q_rtn = rtn_vit_layer(rtn, cfg)
    _round_params_fp16(rtn)
    apply_vit_quantized(rtn, q_rtn)
    loss_rtn = block_error(rtn, f, channel_weight)
    report.update(loss=loss, loss_rtn=loss_rtn, fallback=loss >= loss_rtn)
    if loss >= loss_rtn:  # the search lost to plain rounding on this layer: keep plain rounding
        layer.load_state_dict(rtn.state_dict())
        q = q_rtn
    timings["check"] = time.perf_counter() - t
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return LayerResult(index, q, vit_state(layer), report)


@torch.no_grad()
def embedding_channel_weights(mlp1: nn.Module, hidden: int) -> torch.Tensor:
    """(hidden,) first-order cost of an error in each channel of the tower's last hidden state to the image
    embeddings: pixel shuffle puts ViT channel c at the projector inputs k * hidden + c (k = the 4 merged
    neighbours), where mlp1's LayerNorm scales it by gamma and its first Linear spreads it with column
    norm |W[:, j]|, so an error e_c costs about e_c^2 * mean_k (gamma_j |W[:, j]|)^2 (up to the common
    LayerNorm scale). The residual carries an error of any layer to the last hidden state nearly
    unchanged when the blocks' updates are small against it (on the replica each adds 0.4-0.7 %)."""
    gamma, w = mlp1[0].weight.float(), mlp1[1].weight.float()
    s = (gamma * w.norm(dim=0)).pow(2)
    return s.reshape(-1, hidden).mean(0).clamp(min=1e-12)


def vllm_skips(prefix: str, modules_to_not_convert: Sequence[str]) -> bool:
    """vLLM's rule for an AWQ checkpoint's linear at `prefix` (awq.py / awq_marlin.py
    `is_layer_skipped_awq`): skipped, i.e. built unquantized, when any listed name is a substring."""
    return any(m in prefix for m in modules_to_not_convert)
