"""Activation-aware weight quantization of one Qwen2 decoder layer (the math; data movement lives elsewhere).

Every token gets a loss weight by modality (token_weights; the default measures each modality's
sensitivity of the answer loss, MBQ's idea). Per layer, the search needs: per-channel weighted mean |x|
of every linear's input over all tokens (from the capture pass's statistics), and one 16-bit pass at a
fixed, modality-stratified subsample of "loss tokens" (loss_tokens) recording the linear inputs and module
outputs there and the per-group Gram matrices X^T W X of the inputs. Then, for each scaling group (a norm
or linear feeding one or more linears):
  1. grid-search per-input-channel scales s (activation-only s = mean|x|^r, and AutoAWQ's duo scaling
     s = mean|x|^r / mean|w|^(1-r)), always including s = 1 (plain rounding), by the weighted error of
     the group's module output (attention, MLP, down_proj) against the 16-bit output at the loss tokens
     (attention queries there see every earlier token as key / value). Every candidate is first scored
     on a cheap screen (a few samples, few tokens); plain rounding and the best few are then re-scored on
     all loss tokens;
  2. fold the winner into the preceding norm / linear (exact at 16-bit; the recorded inputs are divided
     by s instead of being recaptured).
Then search per-group clipping ranges for every linear but q/k, all shrink candidates at once, scored
exactly through the Gram matrices; quantize; and keep plain round-to-nearest for the whole layer if the
searched layer's output error is not lower than plain rounding's.

Duo scaling alone can be catastrophic when outlier activations meet small weight columns (the scale
that helps the outlier channel starves the others), which is why both families compete and s = 1 is
always a candidate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.model.arch import DECODER_GROUPS, DECODER_LINEARS, DECODER_NO_CLIP
from r1v_quant.model.groupwise import QuantizedWeight, check_group, fake_quantize_ranges, quantize_weight
from r1v_quant.model.llm import Qwen2Layer, apply_rope
from r1v_quant.util.errors import R1VError

LINEARS = DECODER_LINEARS
NO_CLIP = DECODER_NO_CLIP
VISION, PROMPT, RESPONSE = 0, 1, 2
MODALITY_MODES = ("auto", "uniform", "text", "balanced")
# linears reading the same input share its statistics; the key is the first of them
INPUT_OF = {lin: g.recorded for g in DECODER_GROUPS for lin in g.linears}
Rope = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ScaleGroup:
    name: str
    prev: str  # module whose output channels carry the scale (a norm, or a linear's rows)
    linears: tuple[str, ...]  # consumers whose input columns absorb it
    module: str  # whose output the search compares ("" = the linear itself)


SCALE_GROUPS = tuple(ScaleGroup(g.scale, g.prev, g.linears, g.module) for g in DECODER_GROUPS)


@dataclass(frozen=True)
class AWQConfig:
    group_size: int = 128
    bits: int = 4
    n_grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5
    # tokens whose block output scores the scale candidates (stratified by modality; 0 = all tokens)
    loss_tokens: int = 4096
    # every candidate is first scored on a screen: about screen_tokens of the loss tokens of a share of the
    # samples (fewer samples = shorter attention context); the screen_keep best and plain rounding are
    # then scored on all loss tokens. screen_fraction 0: no screen
    screen_fraction: float = 0.125
    screen_tokens: int = 512
    screen_keep: int = 4
    clip_elements: int = 1 << 24  # candidates x rows x columns searched at once: bounds the clip buffer
    scaling: tuple[str, ...] = ("act", "duo")
    modality_weights: str = "auto"  # one of MODALITY_MODES (token_weights)
    apply_clip: bool = True


@dataclass
class LayerResult:
    index: int
    quantized: dict[str, QuantizedWeight]
    state: dict[str, torch.Tensor]  # the layer's non-quantized parameters after folding (norms, biases)
    report: dict = field(default_factory=dict)


def token_weights(
    masks: Sequence[torch.Tensor], mode: str, sensitivity: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per-token loss weights from modality codes (MBQ's idea: modalities differ in how errors matter).

    auto: each token weighs its modality's measured sensitivity (`sensitivity`, (3,): mean |dL/dh|² of
    the answer loss w.r.t. this layer's output, from calibration.capture.layer_sensitivity). uniform:
    every token counts once. text: vision tokens count zero (what text-only calibration sees). balanced:
    each modality present gets the same total weight (the former default; measured worse, see docs/awq.md).
    Weights are normalised to mean 1; all-zero weights fall back to uniform.
    """
    if mode not in MODALITY_MODES:
        raise R1VError(f"unknown --modality-weights {mode!r}: expected {', '.join(MODALITY_MODES)}")
    cat = torch.cat([m.long() for m in masks])
    w = torch.ones(cat.shape[0])  # CPU; quantize_layer moves them to the activations' device
    if mode == "auto":
        if sensitivity is None:
            raise R1VError("--modality-weights auto needs the per-layer sensitivities (layer_sensitivity)")
        w = sensitivity.float().cpu()[cat]
    elif mode == "text":
        w[cat == VISION] = 0.0
    elif mode == "balanced":
        present = [c for c in (VISION, PROMPT, RESPONSE) if (cat == c).any()]
        for c in present:
            sel = cat == c
            w[sel] = cat.shape[0] / (len(present) * int(sel.sum()))
    if not float(w.sum()) > 0:
        w = torch.ones_like(w)  # e.g. nothing but vision tokens under "text": fall back to uniform
    w = w * (w.numel() / w.sum())
    return _split(w, [m.numel() for m in masks])


def language_vision_sensitivity(sens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """MBQ's two modalities from per-layer (layers, 3) mean |dL/dh|² and (3,) token counts: prompt and
    response tokens pooled into one language weight, vision tokens their own, per layer.

    Keeping prompt and response apart measured worse on held-out text answers (docs/awq.md): early
    layers' prompt gradients dominate and starve the answer tokens of weight.
    """
    n_p, n_r = counts[PROMPT], counts[RESPONSE]
    lang = (sens[:, PROMPT] * n_p + sens[:, RESPONSE] * n_r) / (n_p + n_r).clamp(min=1)
    return torch.stack([sens[:, VISION], lang, lang], dim=1)


def _split(t: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(t, list(sizes)))


@dataclass
class LossTokens:
    """The tokens that score scale candidates: per sample, sorted positions and each one's weight."""

    pos: list[torch.Tensor]
    weight: list[torch.Tensor]

    @property
    def all_weights(self) -> torch.Tensor:
        return torch.cat(self.weight)

    def subset(self, rows: torch.Tensor) -> LossTokens:
        """The loss tokens at sorted `rows` (indices into the concatenation over samples)."""
        starts = torch.tensor([0, *[p.numel() for p in self.pos]]).cumsum(0).tolist()
        rows = rows.to(self.pos[0].device)
        pos, wt = [], []
        for j, (p, w) in enumerate(zip(self.pos, self.weight, strict=True)):
            r = rows[(rows >= starts[j]) & (rows < starts[j + 1])] - starts[j]
            pos.append(p[r])
            wt.append(w[r])
        return LossTokens(pos, wt)

    def screen_rows(self, samples: Sequence[int], budget: int) -> torch.Tensor:
        """About `budget` rows, evenly spaced over the loss tokens of `samples` (all of them if fewer)."""
        starts = torch.tensor([0, *[p.numel() for p in self.pos]]).cumsum(0).tolist()
        rows = torch.cat([torch.arange(starts[j], starts[j + 1]) for j in sorted(samples)])
        n = rows.numel()
        if 0 < budget < n:
            rows = rows[(torch.arange(budget) * 2 + 1) * n // (2 * budget)]
        return rows.to(self.pos[0].device)


def loss_tokens(masks: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], budget: int) -> LossTokens:
    """About `budget` tokens, deterministic, stratified by modality.

    Each modality gets a share of the budget proportional to its total loss weight (at least one token),
    taken evenly spaced over all its tokens in sample order, so every sample and every part of a sample is
    represented; a picked token stands for n_c / k_c tokens of its stratum, so the weighted mean error over
    the subsample estimates the weighted mean over all tokens. Zero-weight tokens are never picked. With
    budget <= 0 or no more tokens than the budget, every token is kept with its own weight (exact).
    """
    sizes = [m.numel() for m in masks]
    codes = torch.cat([m.long().cpu() for m in masks])
    w = torch.cat([x.float().cpu() for x in ws])
    if budget <= 0 or codes.numel() <= budget:
        keep = torch.arange(codes.numel())
        new_w = w.clone()
    else:
        mass = {c: float(w[codes == c].sum()) for c in torch.unique(codes).tolist()}
        total = sum(mass.values())
        picks, weights = [], []
        for c, m in sorted(mass.items()):
            if m <= 0:
                continue
            where = torch.nonzero((codes == c) & (w > 0)).flatten()
            n = where.numel()
            k = min(n, max(1, round(budget * m / total)))
            # centre of each of k equal slices: integer arithmetic, distinct since n >= k
            idx = where[(torch.arange(k) * 2 + 1) * n // (2 * k)]
            picks.append(idx)
            weights.append(w[idx] * (n / k))
        keep = torch.cat(picks)
        order = torch.argsort(keep)
        keep, new_w = keep[order], torch.cat(weights)[order]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    pos, wt = [], []
    for j in range(len(sizes)):
        sel = (keep >= starts[j]) & (keep < starts[j + 1])
        pos.append(keep[sel] - starts[j])
        wt.append(new_w[sel])
    return LossTokens(pos, wt)


def screen_samples(masks: Sequence[torch.Tensor], fraction: float) -> list[int]:
    """About `fraction` of the samples (at least one of each kind), evenly spaced among the samples with
    vision tokens and among those without: the cheap first round of the scale search scores on them."""
    kinds: dict[bool, list[int]] = {}
    for j, m in enumerate(masks):
        kinds.setdefault(bool((m == VISION).any()), []).append(j)
    out = []
    for members in kinds.values():
        n = len(members)
        k = min(n, max(1, round(n * fraction)))
        out += [members[(2 * i + 1) * n // (2 * k)] for i in range(k)]
    return sorted(out)


def modality_weights_of(masks: Sequence[torch.Tensor], ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3,) the per-token weight of each modality code (token_weights is constant within a modality)."""
    codes, w = torch.cat([m.long().cpu() for m in masks]), torch.cat([x.cpu() for x in ws])
    return torch.tensor([float(w[codes == c][0]) if (codes == c).any() else 0.0 for c in range(3)])


def _get(layer: nn.Module, name: str) -> nn.Module:
    return layer.get_submodule(name)


def _weighted_mse(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> float:
    return float(((a - b).pow(2).mean(-1) * w).sum() / w.sum().clamp(min=1e-30))


class AttentionAtTokens:
    """Self-attention at the loss tokens of every sample, for whatever q/k/v/o weights the layer holds when
    called; what the weights do not change (normed inputs up to each sample's last loss token, rope tables,
    causal masks) is prepared once, and each projection runs over all samples in one matmul."""

    def __init__(self, layer: Qwen2Layer, inputs: Sequence[torch.Tensor], lt: LossTokens, rope: Rope):
        self.attn = a = layer.self_attn
        rep = a.num_heads // a.num_kv
        used = [j for j, p in enumerate(lt.pos) if p.numel()]
        n_ctx = [int(lt.pos[j][-1]) + 1 for j in used]
        self.x = torch.cat([layer.input_layernorm(inputs[j][:n]) for j, n in zip(used, n_ctx, strict=True)])
        cos, sin = zip(*(rope(n) for n in n_ctx), strict=True)
        self.cos, self.sin = torch.cat(cos)[:, None], torch.cat(sin)[:, None]
        starts = [0, *torch.tensor(n_ctx).cumsum(0).tolist()]
        self.ctx = [slice(x0, x1) for x0, x1 in zip(starts[:-1], starts[1:], strict=True)]
        self.q_rows = torch.cat([lt.pos[j] + x0 for j, x0 in zip(used, starts[:-1], strict=True)])
        self.n_q = [lt.pos[j].numel() for j in used]
        # the `rep` query heads sharing a key/value head attend together: no copies of K and V
        self.masks = [
            (torch.arange(n, device=self.x.device)[None, :] <= lt.pos[j][:, None]).repeat(rep, 1)
            for j, n in zip(used, n_ctx, strict=True)
        ]

    def context(self) -> torch.Tensor:
        """(loss tokens, heads * head_dim): attention output before o_proj."""
        a = self.attn
        h, kv, d = a.num_heads, a.num_kv, a.head_dim
        q = apply_rope(
            a.q_proj(self.x[self.q_rows]).view(-1, h, d), self.cos[self.q_rows], self.sin[self.q_rows]
        )
        k = apply_rope(a.k_proj(self.x).view(-1, kv, d), self.cos, self.sin).transpose(0, 1)
        v = a.v_proj(self.x).view(-1, kv, d).transpose(0, 1)
        outs, q0 = [], 0
        for sl, n_q, mask in zip(self.ctx, self.n_q, self.masks, strict=True):
            qj = q[q0 : q0 + n_q].view(n_q, kv, h // kv, d).permute(1, 2, 0, 3).reshape(kv, -1, d)
            oj = F.scaled_dot_product_attention(qj, k[:, sl], v[:, sl], attn_mask=mask)
            outs.append(oj.view(kv, h // kv, n_q, d).permute(2, 0, 1, 3).reshape(n_q, h * d))
            q0 += n_q
        return torch.cat(outs)

    def __call__(self) -> torch.Tensor:
        return self.attn.o_proj(self.context())


ChannelStats = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per input key (INPUT_OF values): mean |x| per modality and channel (3, d), tokens per modality (3,)."""


@dataclass
class LayerFeatures:
    """What the search needs of the 16-bit layer (keys: INPUT_OF values)."""

    mean_abs: dict[str, torch.Tensor]  # weighted mean |x| per input channel
    gram: dict[str, torch.Tensor]  # (groups, gs, gs) weighted X^T X per input-column group, loss tokens
    rows: dict[str, torch.Tensor]  # inputs at the loss tokens (all samples concatenated)
    attn_out: torch.Tensor  # 16-bit self_attn output at the loss tokens
    mlp_out: torch.Tensor  # 16-bit mlp output at the loss tokens

    def rescale(self, key: str, s: torch.Tensor) -> None:
        """The input `key` after its scale s was folded in: x / s."""
        if key in self.rows:
            self.rows[key] = self.rows[key] / s
        if key in self.gram:
            g = self.gram[key]
            sg = s.reshape(g.shape[0], g.shape[1])
            self.gram[key] = g / (sg[:, :, None] * sg[:, None, :])


@torch.no_grad()
def layer_features(
    layer: Qwen2Layer,
    inputs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    ws: Sequence[torch.Tensor],
    lt: LossTokens,
    rope: Rope,
    cfg: AWQConfig,
    channel_stats: ChannelStats | None = None,
) -> LayerFeatures:
    """The layer's 16-bit linear inputs and outputs at the loss tokens, their Gram matrices, and the
    per-channel mean |x| over all tokens weighted by `ws`: from `channel_stats` (the capture pass's
    per-modality statistics), else by one more pass over every token. (Estimated on the loss tokens alone
    it is too noisy: it changed the chosen attention scales in tests.)"""
    attn = AttentionAtTokens(layer, inputs, lt, rope)
    x1 = attn.x[attn.q_rows]
    ctx = attn.context()
    a = layer.self_attn.o_proj(ctx)
    x = torch.cat([xj[p] for xj, p in zip(inputs, lt.pos, strict=True)])
    x2 = layer.post_attention_layernorm(x + a)
    x3 = F.silu(layer.mlp.gate_proj(x2)) * layer.mlp.up_proj(x2)
    w = lt.all_weights.to(x.device)
    feats = {"self_attn.q_proj": x1, "self_attn.o_proj": ctx, "mlp.gate_proj": x2, "mlp.down_proj": x3}
    gram, mean_abs = {}, {}
    for key, xin in feats.items():
        if cfg.apply_clip:
            xg = xin.reshape(xin.shape[0], -1, cfg.group_size)
            gram[key] = torch.einsum("tgc,tgd->gcd", xg * w[:, None, None], xg)
        if channel_stats is not None:
            mean, count = (t.to(x.device, torch.float32) for t in channel_stats[key])
            cw = modality_weights_of(masks, ws).to(x.device) * count
            mean_abs[key] = ((mean * cw[:, None]).sum(0) / cw.sum().clamp(min=1e-30)).clamp(min=1e-8)
    if channel_stats is None:
        mean_abs = _mean_abs_all_tokens(layer, inputs, ws, rope)
    rows = {k: v for k, v in feats.items() if k != "self_attn.q_proj"}  # q/k/v rescore from the layer
    return LayerFeatures(mean_abs, gram, rows, a, layer.mlp.down_proj(x3))


def _mean_abs_all_tokens(
    layer: Qwen2Layer, inputs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], rope: Rope
) -> dict[str, torch.Tensor]:
    """Weighted mean |x| of each linear input over every token, from one full forward pass."""
    sums: dict[str, torch.Tensor] = {}
    current: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], key: str) -> None:
        acc = (args[0][0].abs() * current[0][:, None]).sum(0)
        sums[key] = acc if key not in sums else sums[key] + acc

    keys = sorted(set(INPUT_OF.values()))
    handles = [_get(layer, k).register_forward_pre_hook(lambda m, a, k=k: hook(m, a, k)) for k in keys]
    try:
        for x, w in zip(inputs, ws, strict=True):
            current[:] = [w.to(x.device)]
            layer(x[None], *rope(x.shape[0]))
    finally:
        for h in handles:
            h.remove()
    total = torch.cat([w.to(inputs[0].device) for w in ws]).sum().clamp(min=1e-30)
    return {k: (v / total).clamp(min=1e-8) for k, v in sums.items()}


def _group_output(
    layer: Qwen2Layer,
    g: ScaleGroup,
    feats: LayerFeatures,
    attn: AttentionAtTokens | None,
    rows: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of the group's module at the loss tokens `rows` (None: all) with the layer's current
    weights, the 16-bit target there)."""
    if g.module == "self_attn" and attn is not None:
        out, target = attn(), feats.attn_out
        return out, target if rows is None else target[rows]
    sel = (lambda t: t) if rows is None else (lambda t: t[rows])
    if g.module == "self_attn.o_proj":
        return layer.self_attn.o_proj(sel(feats.rows["self_attn.o_proj"])), sel(feats.attn_out)
    if g.module == "mlp":
        return layer.mlp(sel(feats.rows["mlp.gate_proj"])), sel(feats.mlp_out)
    if g.module == "mlp.down_proj":
        return layer.mlp.down_proj(sel(feats.rows["mlp.down_proj"])), sel(feats.mlp_out)
    raise ValueError(f"no output rule for scaling group module {g.module!r}")


@torch.no_grad()
def scale_candidates(
    weights: torch.Tensor, x_mean: torch.Tensor, cfg: AWQConfig
) -> list[tuple[str, float, torch.Tensor]]:
    """The grid of input-channel scales the search scores: (kind, ratio, s), "none" first. `weights`: the
    consumers' weights stacked by rows; `x_mean`: mean |x| per input channel."""
    gs = cfg.group_size
    wg = weights.abs().reshape(weights.shape[0], -1, gs)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(weights.shape).mean(0).clamp(min=1e-8)
    candidates: list[tuple[str, float, torch.Tensor]] = [("none", 0.0, torch.ones_like(x_mean))]
    for r in [i / cfg.n_grid for i in range(cfg.n_grid)]:
        for kind in cfg.scaling:
            s = x_mean.pow(r) if kind == "act" else x_mean.pow(r) / w_mean.pow(1 - r)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            if r > 0 or kind == "duo":
                candidates.append((kind, r, s))
    return candidates


def _search_scales(
    layer: Qwen2Layer,
    g: ScaleGroup,
    feats: LayerFeatures,
    inputs: Sequence[torch.Tensor],
    lt: LossTokens,
    screen: Sequence[int] | None,
    rope: Rope,
    cfg: AWQConfig,
) -> tuple[torch.Tensor, dict]:
    """Best per-channel scale for one group; returns (scales, report).

    With `screen` (sample indices), every candidate is first scored on about cfg.screen_tokens loss tokens
    of those samples alone (for attention, fewer samples also shorten the key/value context, the cost that
    does not shrink with the number of loss tokens); plain rounding and the cfg.screen_keep best are then
    scored on all loss tokens.
    """
    w_all = lt.all_weights.to(feats.attn_out.device)
    x_mean = feats.mean_abs[INPUT_OF[g.linears[0]]]
    weights = torch.cat([_get(layer, n).weight for n in g.linears], 0)
    gs = cfg.group_size
    originals = {n: _get(layer, n).weight.detach().clone() for n in g.linears}
    candidates = scale_candidates(weights, x_mean, cfg)
    is_attn = g.module == "self_attn"

    def scores(
        idx: Sequence[int], sub: LossTokens, rows: torch.Tensor | None, w: torch.Tensor
    ) -> list[float]:
        attn = AttentionAtTokens(layer, inputs, sub, rope) if is_attn else None
        out = []
        for i in idx:
            s = candidates[i][2]
            for n in g.linears:
                _get(layer, n).weight.copy_(quantize_weight(originals[n] * s, gs, cfg.bits).dequantize() / s)
            pred, target = _group_output(layer, g, feats, attn, rows)
            out.append(_weighted_mse(pred, target, w))
        return out

    def screened(idx: list[int]) -> list[float]:
        rows = lt.screen_rows(screen, cfg.screen_tokens)
        return scores(idx, lt.subset(rows), rows, w_all[rows])

    try:
        return pick_scale(
            candidates,
            lambda idx: scores(idx, lt, None, w_all),
            screened if screen is not None else None,
            cfg.screen_keep,
        )
    finally:
        for n in g.linears:
            _get(layer, n).weight.copy_(originals[n])


def pick_scale(
    candidates: list[tuple[str, float, torch.Tensor]],
    full: Callable[[list[int]], list[float]],
    screened: Callable[[list[int]], list[float]] | None,
    keep: int,
) -> tuple[torch.Tensor, dict]:
    """The candidate with the lowest `full` loss, and its report. With `screened`, every candidate is first
    scored cheaply and only plain rounding (candidate 0, always) and the `keep` best go on to `full`;
    ties go to grid order. The decoder and the vision searches share this rule."""
    finalists = list(range(len(candidates)))
    if screened is not None and len(candidates) > keep + 1:
        first = screened(finalists)
        ranked = sorted(range(1, len(candidates)), key=lambda i: (first[i], i))
        finalists = [0, *sorted(ranked[:keep])]
    final = full(finalists)
    best = min(range(len(finalists)), key=lambda i: (final[i], i))
    kind, r, s = candidates[finalists[best]]
    return s, {"kind": kind, "ratio": r, "loss": final[best], "loss_rtn": final[0],
               "scored": [len(candidates), len(finalists)]}  # fmt: skip


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
def _search_clip(w: torch.Tensor, gram: torch.Tensor, cfg: AWQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output row, group) shrink of [min, max] minimising the weighted partial-product error.

    For row o and input group g the error over all tokens is sum_t w_t (x_tg . dw_og)^2 = dw^T G_g dw with
    G_g the group's weighted Gram matrix, so every token counts and all shrink candidates are scored in one
    batched einsum (rows chunked to bound the candidates x rows x columns buffer).
    """
    out, inp = w.shape
    gs = cfg.group_size
    n_groups = inp // gs
    shrinks = [1 - cfg.max_shrink * i / cfg.clip_grid for i in range(cfg.clip_grid)]  # as the scalar loop had
    shrink = torch.tensor(shrinks, dtype=torch.float32, device=w.device)
    step = max(1, cfg.clip_elements // (cfg.clip_grid * inp))
    maxes, mins = [], []
    for r0 in range(0, out, step):
        wg = w[r0 : r0 + step].reshape(-1, n_groups, gs).to(torch.float32)
        org_max, org_min = wg.amax(-1), wg.amin(-1)
        cmax, cmin = org_max * shrink[:, None, None], org_min * shrink[:, None, None]  # cands, rows, groups
        dw = fake_quantize_ranges(wg, cmax, cmin, cfg.bits) - wg
        err = torch.einsum("krgc,gcd,krgd->krg", dw, gram, dw)
        best = err.argmin(0, keepdim=True)  # the first minimum: ties keep the smaller shrink
        maxes.append(cmax.gather(0, best)[0])
        mins.append(cmin.gather(0, best)[0])
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


@torch.no_grad()
def _layer_error(
    layer: Qwen2Layer,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    lt: LossTokens,
    rope: Rope,
) -> float:
    """Weighted mean squared error of the layer output at the loss tokens."""
    x = torch.cat([x[pos] for x, pos in zip(inputs, lt.pos, strict=True)])
    ref = torch.cat([t[pos] for t, pos in zip(targets, lt.pos, strict=True)])
    h = x + AttentionAtTokens(layer, inputs, lt, rope)()
    out = h + layer.mlp(layer.post_attention_layernorm(h))
    return _weighted_mse(out, ref, lt.all_weights.to(out.device))


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
    rope: Rope,
    cfg: AWQConfig,
    method: str = "awq",
    channel_stats: ChannelStats | None = None,
    sensitivity: torch.Tensor | None = None,
) -> LayerResult:
    """AWQ (or plain RTN with method="rtn") for one layer. `layer` is left holding the fake-quant weights.

    `channel_stats`: the capture pass's per-modality mean |x| of this layer's linear inputs over all tokens
    (without them one more pass computes them); `sensitivity`: this layer's per-modality weights for
    --modality-weights auto (see token_weights)."""
    t0 = time.perf_counter()
    check_layer_shapes(layer, cfg, index)
    for j, x in enumerate(inputs):
        if not torch.isfinite(x).all():
            raise R1VError(f"NaN/Inf in the inputs of decoder layer {index} (sample {j})")
    ws_cpu = token_weights(masks, cfg.modality_weights, sensitivity)
    dev = inputs[0].device
    lt = loss_tokens(masks, ws_cpu, cfg.loss_tokens)
    lt = LossTokens([p.to(dev) for p in lt.pos], [w.to(dev) for w in lt.weight])
    original = copy.deepcopy(layer)
    report: dict = {"layer": index, "method": method, "loss_tokens": int(lt.all_weights.numel()),
                    "modality_weights": [round(float(v), 6) for v in modality_weights_of(masks, ws_cpu)],
                    "groups": {}, "clip": {}}  # fmt: skip
    timings: dict[str, float] = {}
    if method == "rtn":
        q = rtn_layer(layer, cfg)
        _round_params_fp16(layer)
        apply_quantized(layer, q)
        report["loss"] = report["loss_rtn"] = _layer_error(layer, inputs, targets, lt, rope)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return LayerResult(index, q, _nonquant_state(layer), report)

    t = time.perf_counter()
    ws = [w.to(dev) for w in ws_cpu]
    feats = layer_features(layer, inputs, masks, ws, lt, rope, cfg, channel_stats)
    screen = screen_samples(masks, cfg.screen_fraction) if cfg.screen_fraction > 0 else None
    timings["features"] = time.perf_counter() - t
    for g in SCALE_GROUPS:
        t = time.perf_counter()
        prev, first = _get(layer, g.prev), _get(layer, g.linears[0])
        if prev.weight.shape[0] != first.weight.shape[1]:
            report["groups"][g.name] = {"skipped": "shapes differ (GQA)"}
            continue
        s, rep = _search_scales(layer, g, feats, inputs, lt, screen, rope, cfg)
        _fold(layer, g, s)
        feats.rescale(INPUT_OF[g.linears[0]], s)
        report["groups"][g.name] = rep
        timings[f"scale_{g.name}"] = time.perf_counter() - t
    t = time.perf_counter()
    clips: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    if cfg.apply_clip:
        for n in LINEARS:
            if n in NO_CLIP:
                continue
            w = _get(layer, n).weight
            cmax, cmin = _search_clip(w, feats.gram[INPUT_OF[n]], cfg)
            clips[n] = (cmax, cmin)
            shrink = cmax / w.reshape(*cmax.shape, -1).amax(-1).clamp(min=1e-12)
            report["clip"][n] = round(float(shrink.mean()), 4)
    timings["clip"] = time.perf_counter() - t
    t = time.perf_counter()
    del feats
    _round_params_fp16(layer)
    q = {n: _quantize_clipped(_get(layer, n).weight, *(clips.get(n) or (None, None)), cfg) for n in LINEARS}
    apply_quantized(layer, q)
    loss = _layer_error(layer, inputs, targets, lt, rope)

    rtn = original
    q_rtn = rtn_layer(rtn, cfg)
    _round_params_fp16(rtn)
    apply_quantized(rtn, q_rtn)
    loss_rtn = _layer_error(rtn, inputs, targets, lt, rope)
    report.update(loss=loss, loss_rtn=loss_rtn, fallback=loss >= loss_rtn)
    if loss >= loss_rtn:  # the search lost to plain rounding on this layer: keep plain rounding
        layer.load_state_dict(rtn.state_dict())
        q = q_rtn
    timings["check"] = time.perf_counter() - t
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return LayerResult(index, q, _nonquant_state(layer), report)


def _nonquant_state(layer: Qwen2Layer) -> dict[str, torch.Tensor]:
    """Norms and biases (fp16 values) — everything of the layer the packed linears do not carry."""
    return {
        k: v.detach().to(torch.float16)
        for k, v in layer.state_dict().items()
        if not (k.endswith(".weight") and k.rsplit(".", 1)[0] in LINEARS)
    }
