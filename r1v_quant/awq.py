"""Activation-aware weight quantization of one Qwen2 decoder layer (the math; data movement lives elsewhere).

Per layer, in order, for each scaling group (a norm or linear feeding one or more linears):
  1. grid-search per-input-channel scales s (activation-only s = mean|x|^r, and AutoAWQ's duo scaling
     s = mean|x|^r / mean|w|^(1-r)), always including s = 1 (plain rounding), by the modality-weighted
     error of the group's module output (attention, MLP, down_proj) against the 16-bit output;
  2. fold the winner into the preceding norm / linear (exact at 16-bit) and re-capture the inputs;
then search per-group clipping ranges for every linear but q/k, quantize, and keep plain round-to-nearest
for the whole layer if the searched layer's output error is not lower than plain rounding's.

Duo scaling alone can be catastrophic when outlier activations meet small weight columns (REFERENCE §6),
which is why both families compete and s = 1 is always a candidate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from r1v_quant.errors import R1VError
from r1v_quant.llm import Qwen2Layer
from r1v_quant.quant import QuantizedWeight, check_group, quantize_weight

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # clipping q/k distorts attention logits (AutoAWQ skips)
VISION, PROMPT, RESPONSE = 0, 1, 2


@dataclass(frozen=True)
class ScaleGroup:
    name: str
    prev: str  # module whose output channels carry the scale (a norm, or a linear's rows)
    linears: tuple[str, ...]  # consumers whose input columns absorb it
    module: str  # whose output the search compares ("" = the linear itself)


SCALE_GROUPS = (
    ScaleGroup("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "self_attn"),
    ScaleGroup("v_o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("up_down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)  # fmt: skip


@dataclass(frozen=True)
class AWQConfig:
    group_size: int = 128
    bits: int = 4
    n_grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512  # token subsample for the clip search (AutoAWQ's n_sample_token)
    clip_rows: int = 256  # output rows searched at once: bounds the tokens x rows x groups buffer
    scaling: tuple[str, ...] = ("act", "duo")
    modality_weights: str = "auto"  # auto | uniform | text
    apply_clip: bool = True


@dataclass
class LayerResult:
    index: int
    quantized: dict[str, QuantizedWeight]
    state: dict[str, torch.Tensor]  # the layer's non-quantized parameters after folding (norms, biases)
    report: dict = field(default_factory=dict)


def token_weights(masks: Sequence[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """Per-token loss weights from modality codes (MBQ's idea: modalities differ in how errors matter).

    uniform: every token counts once. text: vision tokens count zero (what text-only calibration sees).
    auto: each modality present gets the same total weight, so the 256-per-tile vision tokens do not drown
    the prompt and the reasoning tokens the model is judged on.
    """
    if mode not in ("auto", "uniform", "text"):
        raise R1VError(f"unknown --modality-weights {mode!r}: expected auto, uniform or text")
    cat = torch.cat([m.long() for m in masks])
    w = torch.ones(cat.shape[0])  # CPU; quantize_layer moves them to the activations' device
    if mode == "text":
        w[cat == VISION] = 0.0
    elif mode == "auto":
        present = [c for c in (VISION, PROMPT, RESPONSE) if (cat == c).any()]
        for c in present:
            sel = cat == c
            w[sel] = cat.shape[0] / (len(present) * int(sel.sum()))
    if float(w.sum()) == 0:
        w = torch.ones_like(w)  # nothing but vision tokens under "text": fall back to uniform
    w = w * (w.numel() / w.sum())
    out, i = [], 0
    for m in masks:
        out.append(w[i : i + m.numel()])
        i += m.numel()
    return out


def _get(layer: nn.Module, name: str) -> nn.Module:
    return layer.get_submodule(name)


def _weighted_mse(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> float:
    return float(((a - b).pow(2).mean(-1) * w).sum() / w.sum())


class _Capture:
    """Inputs of named submodules for every sample, via forward pre-hooks on one full-layer pass."""

    def __init__(self, layer: Qwen2Layer, names: Sequence[str]):
        self.layer, self.names = layer, names

    @torch.no_grad()
    def run(
        self, inputs: Sequence[torch.Tensor], rope: Callable[[int], tuple]
    ) -> dict[str, list[torch.Tensor]]:
        got: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        hooks = [
            _get(self.layer, n).register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0][0].detach()))
            for n in self.names
        ]
        try:
            for x in inputs:
                cos, sin = rope(x.shape[0])
                self.layer(x[None], cos, sin)
        finally:
            for h in hooks:
                h.remove()
        return got


def _module_out(layer: Qwen2Layer, name: str, x: torch.Tensor, rope: Callable[[int], tuple]) -> torch.Tensor:
    mod = _get(layer, name)
    if name == "self_attn":
        cos, sin = rope(x.shape[0])
        return mod(x[None], cos, sin)[0]
    return mod(x[None])[0]


@torch.no_grad()
def _search_scales(
    layer: Qwen2Layer,
    g: ScaleGroup,
    xs: list[torch.Tensor],
    ws: list[torch.Tensor],
    rope: Callable[[int], tuple],
    cfg: AWQConfig,
) -> tuple[torch.Tensor, dict]:
    """Best per-channel scale for one group; returns (scales, report)."""
    target = [_module_out(layer, g.module or g.linears[0], x, rope) for x in xs]
    w_tok = torch.cat(ws)
    x_all = torch.cat(xs)
    x_mean = ((x_all.abs() * w_tok[:, None]).sum(0) / w_tok.sum()).clamp(min=1e-8)
    weights = torch.cat([_get(layer, n).weight for n in g.linears], 0)
    gs = cfg.group_size
    wg = weights.abs().reshape(weights.shape[0], -1, gs)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(weights.shape).mean(0).clamp(min=1e-8)
    originals = {n: _get(layer, n).weight.detach().clone() for n in g.linears}
    candidates: list[tuple[str, float, torch.Tensor]] = [("none", 0.0, torch.ones_like(x_mean))]
    for r in [i / cfg.n_grid for i in range(cfg.n_grid)]:
        for kind in cfg.scaling:
            s = x_mean.pow(r) if kind == "act" else x_mean.pow(r) / w_mean.pow(1 - r)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            if r > 0 or kind == "duo":
                candidates.append((kind, r, s))
    results = []
    try:
        for kind, r, s in candidates:
            for n in g.linears:
                w = originals[n] * s
                _get(layer, n).weight.copy_(quantize_weight(w, gs, cfg.bits).dequantize() / s)
            err = sum(
                _weighted_mse(_module_out(layer, g.module or g.linears[0], x, rope), t, w) * len(w)
                for x, t, w in zip(xs, target, ws, strict=True)
            ) / max(1, len(w_tok))
            results.append((err, kind, r, s))
    finally:
        for n in g.linears:
            _get(layer, n).weight.copy_(originals[n])
    best = min(results, key=lambda t: t[0])
    rtn = results[0][0]
    return best[3], {"kind": best[1], "ratio": best[2], "loss": best[0], "loss_rtn": rtn}


@torch.no_grad()
def _fold(layer: Qwen2Layer, g: ScaleGroup, s: torch.Tensor) -> None:
    """prev output channels / s, consumer input columns * s: the 16-bit function is unchanged."""
    prev = _get(layer, g.prev)
    prev.weight.div_(s.view(-1, *([1] * (prev.weight.dim() - 1))))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for n in g.linears:
        _get(layer, n).weight.mul_(s)


@torch.no_grad()
def _search_clip(
    w: torch.Tensor, x: torch.Tensor, wt: torch.Tensor, cfg: AWQConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output row, group) shrink of [min, max] minimising the weighted partial-product error."""
    out, inp = w.shape
    gs = cfg.group_size
    if x.shape[0] > cfg.clip_tokens:  # evenly spaced tokens: deterministic, covers every sample
        idx = torch.linspace(0, x.shape[0] - 1, cfg.clip_tokens).long()
        x, wt = x[idx], wt[idx]
    xg = x.reshape(x.shape[0], inp // gs, gs)  # tokens, groups, gs
    maxes, mins = [], []
    for r0 in range(0, out, cfg.clip_rows):
        wg = w[r0 : r0 + cfg.clip_rows].reshape(-1, inp // gs, gs)
        rows = wg.shape[0]
        ref = torch.einsum("tgc,ogc->tog", xg, wg)  # per-group partial outputs
        org_max, org_min = wg.amax(-1), wg.amin(-1)
        best_err = torch.full((rows, inp // gs), float("inf"), device=w.device)
        best_max, best_min = org_max.clone(), org_min.clone()
        for i in range(cfg.clip_grid):
            shrink = 1 - cfg.max_shrink * i / cfg.clip_grid
            cmax, cmin = org_max * shrink, org_min * shrink
            deq = _quantize_clipped(wg.reshape(rows, inp), cmax, cmin, cfg).dequantize()
            q = torch.einsum("tgc,ogc->tog", xg, deq.reshape(rows, inp // gs, gs))
            err = ((q - ref).pow(2) * wt[:, None, None]).sum(0)  # rows, groups
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, cmax, best_max)
            best_min = torch.where(better, cmin, best_min)
        maxes.append(best_max)
        mins.append(best_min)
    return torch.cat(maxes), torch.cat(mins)


def _quantize_clipped(
    w: torch.Tensor, cmax: torch.Tensor | None, cmin: torch.Tensor | None, cfg: AWQConfig
) -> QuantizedWeight:
    if cmax is None:
        return quantize_weight(w, cfg.group_size, cfg.bits)
    out, inp = w.shape
    wg = w.reshape(out, inp // cfg.group_size, cfg.group_size)
    wc = torch.maximum(torch.minimum(wg, cmax[..., None]), cmin[..., None]).reshape(out, inp)
    return quantize_weight(wc, cfg.group_size, cfg.bits, clip_max=cmax, clip_min=cmin)


def _round_params_fp16(layer: nn.Module) -> None:
    # the checkpoint stores non-quantized parameters in fp16; search and loader must see the same values
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))


def rtn_layer(layer: Qwen2Layer, cfg: AWQConfig) -> dict[str, QuantizedWeight]:
    return {n: quantize_weight(_get(layer, n).weight, cfg.group_size, cfg.bits) for n in LINEARS}


def apply_quantized(layer: Qwen2Layer, q: dict[str, QuantizedWeight]) -> None:
    with torch.no_grad():
        for n, qw in q.items():
            _get(layer, n).weight.copy_(qw.dequantize(_get(layer, n).weight.dtype))


def _layer_error(
    layer: Qwen2Layer,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    ws: Sequence[torch.Tensor],
    rope: Callable[[int], tuple],
) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, t, w in zip(inputs, targets, ws, strict=True):
            cos, sin = rope(x.shape[0])
            tot += _weighted_mse(layer(x[None], cos, sin)[0], t, w) * len(w)
            n += len(w)
    return tot / max(n, 1)


def check_layer_shapes(layer: Qwen2Layer, cfg: AWQConfig, index: int) -> None:
    for n in LINEARS:
        check_group(_get(layer, n).weight.shape[1], cfg.group_size, f"layer {index} {n}")


@torch.no_grad()
def quantize_layer(
    index: int,
    layer: Qwen2Layer,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    rope: Callable[[int], tuple],
    cfg: AWQConfig,
    method: str = "awq",
) -> LayerResult:
    """AWQ (or plain RTN with method="rtn") for one layer. `layer` is left holding the fake-quant weights."""
    t0 = time.perf_counter()
    check_layer_shapes(layer, cfg, index)
    for j, x in enumerate(inputs):
        if not torch.isfinite(x).all():
            raise R1VError(f"NaN/Inf in the inputs of decoder layer {index} (sample {j})")
    ws = [w.to(inputs[0].device) for w in token_weights(masks, cfg.modality_weights)]
    original = copy.deepcopy(layer)
    report: dict = {"layer": index, "method": method, "groups": {}, "clip": {}}
    if method == "rtn":
        q = rtn_layer(layer, cfg)
        _round_params_fp16(layer)
        apply_quantized(layer, q)
        report["loss"] = report["loss_rtn"] = _layer_error(layer, inputs, targets, ws, rope)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return LayerResult(index, q, _nonquant_state(layer), report)

    for g in SCALE_GROUPS:
        prev, first = _get(layer, g.prev), _get(layer, g.linears[0])
        if prev.weight.shape[0] != first.weight.shape[1]:
            report["groups"][g.name] = {"skipped": "shapes differ (GQA)"}
            continue
        xs = _Capture(layer, [g.linears[0]]).run(inputs, rope)[g.linears[0]]
        s, rep = _search_scales(layer, g, xs, ws, rope, cfg)
        _fold(layer, g, s)
        report["groups"][g.name] = rep
    clips: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    if cfg.apply_clip:
        feats = _Capture(layer, [n for n in LINEARS if n not in NO_CLIP]).run(inputs, rope)
        wt = torch.cat(ws)
        for n, xs in feats.items():
            cmax, cmin = _search_clip(_get(layer, n).weight, torch.cat(xs), wt, cfg)
            clips[n] = (cmax, cmin)
            shrink = cmax / _get(layer, n).weight.reshape(*cmax.shape, -1).amax(-1).clamp(min=1e-12)
            report["clip"][n] = round(float(shrink.mean()), 4)
    _round_params_fp16(layer)
    q = {n: _quantize_clipped(_get(layer, n).weight, *(clips.get(n) or (None, None)), cfg) for n in LINEARS}
    apply_quantized(layer, q)
    loss = _layer_error(layer, inputs, targets, ws, rope)

    rtn = copy.deepcopy(original)
    q_rtn = rtn_layer(rtn, cfg)
    _round_params_fp16(rtn)
    apply_quantized(rtn, q_rtn)
    loss_rtn = _layer_error(rtn, inputs, targets, ws, rope)
    report.update(loss=loss, loss_rtn=loss_rtn, fallback=loss >= loss_rtn)
    if loss >= loss_rtn:  # the search lost to plain rounding on this layer: keep plain rounding
        layer.load_state_dict(rtn.state_dict())
        q = q_rtn
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return LayerResult(index, q, _nonquant_state(layer), report)


def _nonquant_state(layer: Qwen2Layer) -> dict[str, torch.Tensor]:
    """Norms and biases (fp16 values) — everything of the layer the packed linears do not carry."""
    return {
        k: v.detach().to(torch.float16)
        for k, v in layer.state_dict().items()
        if not (k.endswith(".weight") and k.rsplit(".", 1)[0] in LINEARS)
    }
