"""Activation-aware GGUF: per-channel scales chosen from calibration statistics and folded into the weights.

For each decoder layer and each scaling group (input_layernorm → q/k/v, v_proj → o_proj, post_attention_
layernorm → gate/up, up_proj → down_proj) the consumers' input columns are multiplied by s and the producer
(a norm's weight, or a linear's output rows and bias) divided by s: the 16-bit function is unchanged, but
the columns that carry large activations get finer quantization steps, and the activations themselves lose
their outlier channels before llama.cpp rounds them to 8 bits for its quantized matmuls.

v_proj → o_proj under GQA: o_proj's input column (head h, dim d) is the attention output of query head h,
which reads KV head h // (n_head / n_kv_head); so a scale s on v_proj's output (KV head g, dim d) is
compensated by multiplying every o_proj column (h, d) with h // rep = g by s[g, d] (s repeated per group).

The scales come from statistics only (no block inputs are stored by `calibrate`): the calibration's
per-channel mean |x| gives the candidates s = mean|x|^α (α on a grid, normalised like AutoAWQ so that
sqrt(max·min) = 1; α = 0 is "no scaling"), and each candidate is scored by a proxy of the layer's output
error on a subsample of weight rows:

  weight term      Σ_ij (Q(W·diag(s))_ij − (W·diag(s))_ij)² · E[x_j²] / s_j²
                   with Q llama.cpp's own quantizer (ggml_quantize_chunk) for the target's main block type,
                   given the same importance matrix the real quantization gets;
  activation term  Σ_j ‖Q(W·diag(s))_:,j‖² · δ_b(j)² / 12, the variance of llama.cpp's 8-bit activation
                   rounding (step δ_b = block max / 127, blocks of 32 or 256 columns), with the per-token
                   block max estimated from the per-channel RMS of x/s.

Both terms assume independent columns (a diagonal second moment): cheap, but a proxy, not AWQ's search on
the layer's real outputs. E[x²] and mean |x| are modality-weighted exactly as `awq` weighs its tokens
(modality_shares; auto: each token by its modality's measured sensitivity in this layer, from the
calibration's sensitivity.json).
"""

from __future__ import annotations

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1v_quant.calibration.render import MODALITIES, VISION
from r1v_quant.calibration.stats import CalibrationStats
from r1v_quant.exporters.gguf_imatrix import Imatrix
from r1v_quant.exporters.quantize import import_llama_cpp
from r1v_quant.model.arch import DECODER_GROUPS
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.spec import LLM_PREFIX, ModelSpec
from r1v_quant.model.storage import FILE_TYPES
from r1v_quant.quant.awq_search import MODALITY_MODES as AWQ_MODALITY_MODES
from r1v_quant.runtime.gguf_lib import import_gguf
from r1v_quant.util.errors import R1VError


@dataclass(frozen=True)
class FoldGroup:
    name: str
    stat: str  # calibration input group of the consumers (calibration.stats.LINEAR_GROUPS)
    prev: str  # producer: its output channels are divided by s
    linears: tuple[str, ...]  # consumers: their input columns are multiplied by s


FOLD_GROUPS = tuple(FoldGroup(g.scale, g.name, g.prev, g.linears) for g in DECODER_GROUPS)
LINEARS = tuple(lin for g in FOLD_GROUPS for lin in g.linears)

# --type -> (block type most weights get, activation block llama.cpp's CPU matmul rounds to int8 per block:
# Q8_0 blocks of 32 for the legacy types and IQ4_NL, Q8_K blocks of 256 for the K-quants and IQ4_XS).
# 16-bit outputs are scored for Q4_K, the usual `llama-quantize` target of a folded F16 file.
PROXY_TYPES: dict[str, tuple[str, int]] = {
    n: (t.base, t.act_block) for n, t in FILE_TYPES.items() if t.act_block
}
DEFAULT_PROXY = ("Q4_K", 256)
MODALITY_MODES = AWQ_MODALITY_MODES  # auto, uniform, text, balanced: the same names and meanings as `awq`
AWARE_KEY = "r1v_quant.activation_aware"  # GGUF metadata: scales folded in
CALIB_KEY = "r1v_quant.calibration_set"  # GGUF metadata: hash of the calibration set used
IMPORTANCE_FLOOR = 1e-6  # relative to the tensor's mean: a never-active column still gets a tiny weight


@dataclass(frozen=True)
class AwareOptions:
    fold: bool = True  # False: importance matrix only (llama.cpp's usual imatrix recipe)
    modality_weights: str = "auto"
    n_grid: int = 10  # α = 0, 1/n, ..., (n-1)/n
    rows: int = 256  # weight rows per linear scored by the proxy (evenly spaced)
    nthread: int = 0  # candidates scored in parallel (ggml's quantizer releases the GIL); 0: all cores


@dataclass
class AwarePlan:
    """Scales per (layer, group) (None: not scaled) and the importance matrix in the folded basis."""

    spec: ModelSpec
    scales: dict[tuple[int, str], np.ndarray | None]
    imatrix: Imatrix
    report: dict[str, Any] = field(default_factory=dict)

    def consumer_scale(self, layer: int, group: FoldGroup) -> np.ndarray | None:
        """The scale of the consumers' input columns (v_o: repeated over the query heads of each KV head)."""
        s = self.scales.get((layer, group.name))
        if s is None or group.name != "v_o":
            return s
        return expand_kv(s, self.spec)

    def fold(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` (a checkpoint tensor) with the scales folded in; other tensors come back unchanged."""
        prefix = LLM_PREFIX + "."
        if not hf_name.startswith(prefix):
            return t
        idx, _, rest = hf_name[len(prefix) :].partition(".")
        module, _, kind = rest.rpartition(".")
        if not idx.isdigit():
            return t
        layer, out = int(idx), None
        for g in FOLD_GROUPS:
            s = self.scales.get((layer, g.name))
            if s is None:
                continue
            if module == g.prev:  # producer: output channels (rows / bias / norm weight) divided by s
                st = torch.from_numpy(s)
                out = (out if out is not None else t.float()) / (st if t.dim() == 1 else st[:, None])
            elif module in g.linears and kind == "weight":  # consumer: input columns multiplied by s
                cs = torch.from_numpy(self.consumer_scale(layer, g))
                out = (out if out is not None else t.float()) * cs[None, :]
        return t if out is None else out


class FoldedCheckpoint:
    """A checkpoint whose tensors come back with the plan's scales folded in (all else delegated)."""

    def __init__(self, ckpt: Checkpoint, plan: AwarePlan):
        self._ckpt, self._plan = ckpt, plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)

    def get(self, name: str) -> torch.Tensor:
        return self._plan.fold(name, self._ckpt.get(name))


def expand_kv(s: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Per-KV-channel values -> per-o_proj-column values (query head h reads KV head h // rep)."""
    m = spec.llm
    rep = m.num_heads // m.num_kv_heads
    return np.repeat(s.reshape(m.num_kv_heads, 1, m.head_dim), rep, axis=1).reshape(-1)


def reduce_kv(x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Per-o_proj-column statistic -> per KV channel (mean over the query heads sharing that KV head)."""
    m = spec.llm
    rep = m.num_heads // m.num_kv_heads
    return x.reshape(m.num_kv_heads, rep, m.head_dim).mean(1).reshape(-1)


# -- calibration statistics ------------------------------------------------------------------------------
def _widths(spec: ModelSpec) -> dict[str, int]:
    m = spec.llm
    return {
        "qkv": m.hidden_size,
        "o_proj": m.num_heads * m.head_dim,
        "gate_up": m.hidden_size,
        "down_proj": m.intermediate_size,
    }


def load_calibration(path: Path | str, spec: ModelSpec) -> CalibrationStats:
    """Read `calibrate`'s statistics and check they belong to a model of this shape."""
    stats = CalibrationStats.load(path)
    where = Path(path)
    if stats.num_layers != spec.llm.num_layers:
        raise R1VError(
            f"{where}: calibration statistics have {stats.num_layers} decoder layers, the model has "
            f"{spec.llm.num_layers} (statistics from another model? run `r1v-quant calibrate` on this one)"
        )
    for group, width in _widths(spec).items():
        for i in range(spec.llm.num_layers):
            got = stats.get(i, group, "sum_sq").numel()
            if got != width:
                raise R1VError(
                    f"{where}: calibration statistics for layer {i} {group} have {got} channels, the model "
                    f"has {width} (statistics from another model? run `r1v-quant calibrate` on this one)"
                )
    if stats.count(0, "qkv") == 0:
        raise R1VError(f"{where}: calibration statistics hold no tokens")
    return stats


def check_mode(mode: str) -> None:
    if mode not in MODALITY_MODES:
        raise R1VError(f"unknown --modality-weights {mode!r}: expected {', '.join(MODALITY_MODES)}")


def modality_shares(counts: np.ndarray, mode: str, sensitivity: np.ndarray | None = None) -> np.ndarray:
    """(3,) total weight of each modality's tokens (codes as MODALITIES), summing to 1.

    `awq.token_weights` summed over each modality's tokens, so a mean under these shares is the weighted
    mean AWQ's search uses: auto: a token weighs its modality's measured sensitivity in this layer
    (`sensitivity`, (3,), from sensitivity.json); uniform: every token once; text: vision tokens zero;
    balanced: each modality present the same total. All-zero weights fall back to uniform, as in AWQ.
    """
    check_mode(mode)
    counts = np.asarray(counts, np.float64)
    if mode == "auto":
        if sensitivity is None:
            raise R1VError("--modality-weights auto needs the measured sensitivities (sensitivity.json)")
        shares = np.asarray(sensitivity, np.float64) * counts
    elif mode == "text":
        shares = counts.copy()
        shares[VISION] = 0.0
    elif mode == "balanced":
        shares = (counts > 0).astype(np.float64)
    else:
        shares = counts.copy()
    if not shares.sum() > 0:
        shares = counts  # e.g. a vision-only set under "text"
    return shares / max(float(shares.sum()), 1e-300)


def input_stats(
    stats: CalibrationStats, layer: int, group: str, mode: str, sensitivity: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean |x|, mean x², tokens with weight) per input channel, the modalities weighted by
    modality_shares (`sensitivity`: this layer's per-token weights by modality, for auto)."""
    counts = np.array([stats.count(layer, group, m) for m in MODALITIES], np.float64)
    shares = modality_shares(counts, mode, sensitivity)
    if np.array_equal(shares, counts / max(counts.sum(), 1)):  # every token once: the stored 'all' values
        return (
            stats.get(layer, group, "mean_abs").double().numpy(),
            stats.importance(layer, group).double().numpy(),
            stats.count(layer, group),
        )
    # scaled so the largest share is 1: balanced is then exactly the plain mean of the modalities' means
    used = [(m, float(w)) for m, w in zip(MODALITIES, shares / shares.max(), strict=True) if w > 0]
    total = sum(w for _, w in used)
    mean_abs = sum(w * stats.get(layer, group, "mean_abs", m).double().numpy() for m, w in used) / total
    mean_sq = sum(w * stats.importance(layer, group, m).double().numpy() for m, w in used) / total
    return mean_abs, mean_sq, sum(stats.count(layer, group, m) for m, _ in used)


# -- llama.cpp's quantizer as a fake-quantizer -------------------------------------------------------------
class GgmlQuantizer:
    """ggml_quantize_chunk (the code llama_model_quantize runs) + gguf's dequantizer: W -> Q(W) in float."""

    def __init__(self) -> None:
        import_llama_cpp()
        try:
            from llama_cpp import _ggml

            lib = _ggml.libggml
            fn = lib.ggml_quantize_chunk
        except (ImportError, AttributeError, OSError) as e:
            raise R1VError(f"this llama-cpp-python does not expose ggml's quantizer ({e})") from None
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
        self._fn = fn
        self._gguf = import_gguf()

    def __call__(self, w: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
        gguf = self._gguf
        t = gguf.GGMLQuantizationType[qtype]
        w = np.ascontiguousarray(w, np.float32)
        rows, cols = w.shape
        out = np.zeros(gguf.quant_shape_to_byte_shape((rows, cols), t), np.uint8)
        imat = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
        n = self._fn(int(t), w.ctypes.data, out.ctypes.data, 0, rows, cols,
                     None if imat is None else imat.ctypes.data)  # fmt: skip
        if n != out.nbytes:
            raise R1VError(f"ggml_quantize_chunk wrote {n} bytes for {qtype}, expected {out.nbytes}")
        return gguf.quants.dequantize(out, t).reshape(rows, cols)


def _act_variance(imp: np.ndarray, block: int) -> np.ndarray:
    """Per-column variance of llama.cpp's int8 activation rounding, from per-channel mean x² (see above)."""
    d = imp.shape[0]
    nb = -(-d // block)
    rms = np.sqrt(np.pad(imp, (0, nb * block - d))).reshape(nb, block)
    # a token's block max: at least the largest channel RMS, and about sqrt(2 ln n) RMS for n alike channels
    peak = np.maximum(rms.max(1), math.sqrt(2 * math.log(block)) * np.sqrt((rms**2).mean(1)))
    var = (peak / 127) ** 2 / 12
    return np.repeat(var, block)[:d]


def _floor(imp: np.ndarray) -> np.ndarray:
    return np.maximum(imp, IMPORTANCE_FLOOR * float(imp.mean()) + 1e-30)


def proxy_error(
    weights: list[tuple[np.ndarray, int]],
    s: np.ndarray,
    imp: np.ndarray,
    quantize: GgmlQuantizer,
    qtype: str,
    act_block: int,
) -> float:
    """Proxy output error of the consumers (sampled rows, count of all rows) with column scale `s`."""
    imp_f = _floor(imp / s**2)
    act_var = _act_variance(imp_f, act_block)
    total = 0.0
    for w, n_rows in weights:
        wf = w * s[None, :]
        q = quantize(wf, qtype, imp_f.astype(np.float32))
        q64 = q.astype(np.float64)
        err = float((((q64 - wf) ** 2) @ imp_f).sum()) + float(((q64**2).sum(0) * act_var).sum())
        total += err * n_rows / w.shape[0]
    return total


def _sample_rows(w: torch.Tensor, n: int) -> np.ndarray:
    rows = w.shape[0]
    idx = np.unique(np.linspace(0, rows - 1, min(n, rows)).round().astype(np.int64))
    return w[torch.from_numpy(idx)].float().numpy()


def candidate_scales(mean_abs: np.ndarray, n_grid: int) -> list[tuple[float, np.ndarray]]:
    """(α, s) for α = 0, 1/n, ..., (n-1)/n; s = mean|x|^α normalised so that sqrt(max · min) = 1."""
    x = np.clip(mean_abs, 1e-8, None)
    out = [(0.0, np.ones_like(x))]
    for i in range(1, n_grid):
        a = i / n_grid
        s = np.clip(x**a, 1e-4, None)
        out.append((a, s / math.sqrt(float(s.max() * s.min()))))
    return out


def plan_aware(
    ckpt: Checkpoint,
    stats: CalibrationStats,
    gguf_type: str,
    opts: AwareOptions,
    *,
    tensor_name: Any,
    sensitivity: Any = None,
    progress: bool = False,
) -> AwarePlan:
    """Choose the scales (opts.fold) and build the importance matrix in the folded basis.

    `tensor_name(hf_name) -> GGUF name` names the imatrix entries. `sensitivity`: (layers, 3) per-token
    weights by modality (calibration.sensitivity; needed by modality_weights "auto").
    """
    check_mode(opts.modality_weights)
    sens = None if sensitivity is None else np.asarray(sensitivity, np.float64)
    if opts.modality_weights == "auto" and (
        sens is None or sens.shape != (stats.num_layers, len(MODALITIES))
    ):
        got = None if sens is None else sens.shape
        raise R1VError(f"--modality-weights auto needs ({stats.num_layers}, 3) sensitivities, got {got}")
    with ThreadPoolExecutor(opts.nthread if opts.nthread > 0 else (os.cpu_count() or 1)) as pool:
        return _plan(ckpt, stats, gguf_type, opts, tensor_name, sens, pool, progress)


def _plan(
    ckpt: Checkpoint,
    stats: CalibrationStats,
    gguf_type: str,
    opts: AwareOptions,
    tensor_name: Any,
    sens: np.ndarray | None,
    pool: ThreadPoolExecutor,
    progress: bool,
) -> AwarePlan:
    from tqdm import tqdm

    spec = ckpt.spec
    qtype, act_block = PROXY_TYPES.get(gguf_type, DEFAULT_PROXY)
    gguf = import_gguf()
    quantize = GgmlQuantizer() if opts.fold else None
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    scales: dict[tuple[int, str], np.ndarray | None] = {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    layers_report = []
    for i in tqdm(range(spec.llm.num_layers), desc="scales", unit="layer", disable=not progress):
        layer_sens = None if sens is None else sens[i]
        counts_i = np.array([stats.count(i, "qkv", m) for m in MODALITIES], np.float64)
        shares = modality_shares(counts_i, opts.modality_weights, layer_sens)
        rep: dict[str, Any] = {"layer": i, "modality_shares": [round(float(v), 6) for v in shares]}
        for g in FOLD_GROUPS:
            mean_abs, mean_sq, n_tok = input_stats(stats, i, g.stat, opts.modality_weights, layer_sens)
            s_cols: np.ndarray | None = None
            if opts.fold and quantize is not None:
                ws = []
                for lin in g.linears:
                    w = ckpt.get(f"{LLM_PREFIX}.{i}.{lin}.weight")
                    ws.append((_sample_rows(w, opts.rows), w.shape[0]))
                if ws[0][0].shape[1] % block:
                    rep[g.name] = {"skipped": f"{ws[0][0].shape[1]} columns are not a multiple of {block}"}
                else:
                    stat_abs = reduce_kv(mean_abs, spec) if g.name == "v_o" else mean_abs
                    cands = candidate_scales(stat_abs, opts.n_grid)
                    cols = [expand_kv(s, spec) if g.name == "v_o" else s for _, s in cands]
                    score = partial(proxy_error, ws, imp=mean_sq, quantize=quantize, qtype=qtype,
                                    act_block=act_block)  # fmt: skip
                    errors = list(pool.map(score, cols))
                    results = [(e, a, s) for e, (a, s) in zip(errors, cands, strict=True)]
                    best = min(results, key=lambda r: r[0])
                    base = results[0][0]
                    rep[g.name] = {"alpha": best[1], "proxy_ratio": round(best[0] / base, 4) if base else 1.0}
                    if best[1] > 0:
                        s32 = best[2].astype(np.float32)  # what the fold uses; the imatrix must match it
                        scales[(i, g.name)] = s32
                        s_cols = expand_kv(s32, spec) if g.name == "v_o" else s32
            imp = mean_sq if s_cols is None else mean_sq / s_cols.astype(np.float64) ** 2
            imp = _floor(imp)
            for lin in g.linears:
                name = tensor_name(f"{LLM_PREFIX}.{i}.{lin}.weight")
                sums[name] = (imp * n_tok).astype(np.float32)
                counts[name] = n_tok
        layers_report.append(rep)
    info = stats.info
    imatrix = Imatrix(
        sums,
        counts,
        dataset=stats.set_hash,
        chunk_count=int(info.get("set", {}).get("samples", 0)),
        chunk_size=int(info.get("seq_len", 0)),
    )
    report = {
        "fold": opts.fold,
        "proxy_type": qtype if opts.fold else None,
        "modality_weights": opts.modality_weights,
        "calibration_set": stats.set_hash,
        "scaled_groups": sum(1 for v in scales.values() if v is not None),
        "layers": layers_report,
    }
    return AwarePlan(spec, scales, imatrix, report)
