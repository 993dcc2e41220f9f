"""This machine's memory bandwidth and matmul throughput, and how close a measured run comes to them.

Decoding one token reads every language-model weight once (plus the KV cache so far), so its ceiling is
bandwidth / bytes per token; prefill and the vision tower do ~2 FLOPs per weight per token, so theirs is
peak FLOP/s / FLOPs per token. Both ceilings are measured here, with torch on the same number of threads
as the run, medians of several repeats over buffers far larger than the last-level cache.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from r1v_quant.model.artifact import Geometry


def last_level_cache_bytes() -> int | None:
    """Largest CPU cache from sysfs (Linux), e.g. 32 MiB of L3; None when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes) if sizes else None


def _median_time(fn: Any, repeats: int) -> list[float]:
    fn()  # warm: page in the buffers, spin up the thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure_bandwidth(
    threads: int | None = None, *, buffer_bytes: int | None = None, repeats: int = 7
) -> dict:
    """Streaming read (sum) and copy bandwidth in GB/s (10^9 B/s) over a buffer >= 8x the LLC."""
    import torch

    llc = last_level_cache_bytes() or 32 * 1024**2
    nbytes = buffer_bytes or max(256 * 1024**2, 8 * llc)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.ones(nbytes // 4, dtype=torch.float32)
        b = torch.empty_like(a)
        read = _median_time(lambda: a.sum(), repeats)
        copy = _median_time(lambda: b.copy_(a), repeats)
    finally:
        torch.set_num_threads(old)
    return {
        "read_gbs": round(nbytes / statistics.median(read) / 1e9, 2),
        "copy_gbs": round(2 * nbytes / statistics.median(copy) / 1e9, 2),  # read + write
        "read_gbs_runs": [round(nbytes / t / 1e9, 2) for t in read],
        "buffer_mib": nbytes // 1024**2,
        "llc_mib": llc // 1024**2,
        "threads": threads or old,
        "method": "torch sum (read) and copy_ over float32 buffers, median",
    }


def measure_matmul(threads: int | None = None, *, n: int = 1024, repeats: int = 5) -> dict:
    """fp32 GEMM throughput in GFLOP/s (n x n x n, 2 n^3 FLOPs), median of repeats."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = _median_time(lambda: a @ b, repeats)
    finally:
        torch.set_num_threads(old)
    return {
        "fp32_gflops": round(2 * n**3 / statistics.median(times) / 1e9, 1),
        "n": n,
        "threads": threads or old,
        "method": "torch fp32 matmul, median",
    }


# -- per-token work of a model ----------------------------------------------------------------------------
def decode_bytes_per_token(
    g: Geometry, weight_bytes: dict[str, int], kv_bytes_per_token: float, ctx: int
) -> int:
    """Bytes one decode step reads: decoder + norms + lm_head (the embedding lookup reads one row), and the
    KV cache of `ctx` tokens. `weight_bytes` are as the runtime holds them, per component, with the
    embeddings split into "token_embd" and "lm_head" when known."""
    lm_head = weight_bytes.get("lm_head")
    if lm_head is None:  # untied embed_tokens + lm_head of equal size
        lm_head = weight_bytes.get("embeddings", 0) // 2
    return int(
        weight_bytes.get("decoder", 0) + weight_bytes.get("other", 0) + lm_head + kv_bytes_per_token * ctx
    )


def prefill_flops_per_token(g: Geometry, prompt_tokens: int) -> float:
    """2 FLOPs per matmul weight + causal attention (QK^T and AV over prompt/2 keys on average)."""
    attn = 2 * 2 * g.llm_layers * g.heads * g.head_dim * (prompt_tokens / 2)
    return 2 * g.llm_matmul_params + attn


def vision_flops_per_tile(g: Geometry) -> float:
    """ViT matmuls over every position + attention (N^2 per layer) + mlp1 over the shuffled tokens."""
    n, c = g.positions, g.vit_hidden
    vit_matmul = g.vit_layers * (4 * c * c + 2 * c * g.vit_ffn)  # qkv + proj + fc1 + fc2 weights
    attn = g.vit_layers * 2 * 2 * n * n * c
    mlp1 = g.tokens_per_tile * (g.projector_in * g.hidden + g.hidden * g.hidden)
    return 2 * vit_matmul * n + attn + 2 * mlp1


def roofline(
    g: Geometry,
    measured: dict[str, float | None],
    *,
    bandwidth_gbs: float,
    gflops: float,
    decode_bytes: int,
    prompt_tokens: int,
    llc_bytes: int | None,
) -> dict[str, Any]:
    """Measured rates as fractions of the bandwidth and compute ceilings."""
    out: dict[str, Any] = {"bandwidth_gbs": bandwidth_gbs, "fp32_gflops": gflops}
    ceiling = bandwidth_gbs * 1e9 / decode_bytes if decode_bytes else None
    dec = measured.get("decode_tokens_per_s")
    out["decode"] = {
        "bytes_per_token": decode_bytes,
        "ceiling_tokens_per_s": _r(ceiling),
        "measured_tokens_per_s": dec,
        "fraction": _r(dec / ceiling if dec and ceiling else None, 3),
    }
    if llc_bytes and decode_bytes <= llc_bytes:
        out["decode"]["note"] = (
            f"{decode_bytes / 1024**2:.1f} MiB per token fits in the {llc_bytes // 1024**2} MiB last-level "
            "cache: decode is not DRAM-bound here, so the fraction can exceed 1"
        )
    fpt = prefill_flops_per_token(g, prompt_tokens)
    pre = measured.get("prefill_tokens_per_s")
    pceil = gflops * 1e9 / fpt
    out["prefill"] = {
        "flops_per_token": fpt,
        "ceiling_tokens_per_s": _r(pceil),
        "measured_tokens_per_s": pre,
        "fraction": _r(pre / pceil if pre else None, 3),
    }
    vis = measured.get("vision_ms_per_tile")
    if g.vit_layers:
        vf = vision_flops_per_tile(g)
        vceil = vf / (gflops * 1e9) * 1000
        out["vision"] = {
            "flops_per_tile": vf,
            "ceiling_ms_per_tile": _r(vceil, 3),
            "measured_ms_per_tile": vis,
            "fraction": _r(vceil / vis if vis else None, 3),
        }
    return out


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)
