"""Time to first token with an image on a CPU, and the tile cap (`--max-tiles`) that sets it.

InternViT-6B does ~12 TFLOP per 448 x 448 tile (5.5 B matmul weights x 1,025 positions x 2, plus attention
and mlp1: `r1v_quant.plan.roofline.vision_flops_per_tile`), and every tile adds 256 prompt tokens, which the
38B decoder prefills at ~64 GFLOP each (`prefill_flops_per_token`). A CPU's time to the first token is
therefore vision FLOPs / vision rate + prefill FLOPs / prefill rate, the rates being effective FLOP/s of the
runtime's kernels for the weight type.

The rates below were measured on this project's reference CPU class (2 threads of an AVX-512 AMD EPYC,
a small laptop's budget) by `bench/vision_cost.py`: one InternViT-6B-shaped layer (3200 wide, FFN 12800,
1,025 positions, random weights) per backend, the per-layer cost taken from two depths so fixed costs
cancel (bench/results/vision_cost.json). Prefill is not measured at 38B width: it is
costed at the ViT's rate for the same kind of weights (llama.cpp's quantized types at its Q8_0 rate, F16 /
BF16 at its F16 rate, torch at its dtype's rate) - matmuls of the same size class (1,025 x 3,200 x 12,800
per ViT layer, 512 x 5,120 x 27,648 per decoder layer). A faster machine scales every figure: pass your
own rate (`plan --cpu-gflops`, e.g. the fp32 GEMM rate `r1v-quant profile` measures).
"""

from __future__ import annotations

from typing import Any

from r1v_quant.util.errors import R1VError

__all__ = [
    "CPU_CLASS",
    "CPU_GFLOPS",
    "QUESTION_TOKENS",
    "check_max_tiles",
    "rate_kind",
    "tiles_per_image",
    "ttft_estimate",
    "ttft_lines",
]

CPU_CLASS = "2 threads of an AVX-512 CPU, bench/vision_cost.py"
# Effective GFLOP/s of one InternViT-6B-shaped layer per backend on CPU_CLASS, unloaded (bench/results/
# vision_cost.json, `vit6b.scaled.backends.*.unloaded_gflops_per_s`; tests/test_image_cost.py checks the two
# agree). The bench ran on a shared machine (load average ~9 on 2 cores): its wall-clock rates were 34-61
# GFLOP/s; these come from the process's CPU seconds / 2 threads, what the same cores give one job alone.
CPU_GFLOPS: dict[str, float] = {
    "torch fp32": 166.9,
    "torch bf16": 338.2,
    "mmproj F16": 164.7,
    "mmproj Q8_0": 165.1,
}
QUESTION_TOKENS = 64  # template + a short question beside the image tokens


def check_max_tiles(max_tiles: int | None) -> None:
    """`--max-tiles` must allow at least one tile (None: the model's own cap)."""
    if max_tiles is not None and max_tiles < 1:
        raise R1VError(f"--max-tiles must be at least 1 (got {max_tiles})")


def tiles_per_image(max_tiles: int, thumbnail: bool = True) -> int:
    """The most tiles one image gives under a cap: the grid plus the thumbnail when the grid has more than one
    tile (an image that fills the largest grid; smaller or oddly shaped images give fewer)."""
    check_max_tiles(max_tiles)
    return max_tiles + (1 if thumbnail and max_tiles > 1 else 0)


def rate_kind(runtime: str, fmt: str, dtype: str | None = None, *, vision: bool) -> str:
    """Which measured rate applies to the vision tower (`vision=True`) or the decoder's prefill."""
    if runtime == "llama.cpp":
        if vision:
            return "mmproj Q8_0" if fmt.upper().startswith("Q") else "mmproj F16"
        return "mmproj F16" if fmt.upper() in ("F16", "BF16", "F32") else "mmproj Q8_0"
    # torch (AWQ dequantized, so its dtype decides) and a GPU engine's tower placed on the host (bf16)
    d = dtype or ("bf16" if runtime == "gpu-engine" else "fp32")
    return "torch fp32" if d == "fp32" else "torch bf16"


def ttft_estimate(
    g: Any,
    row: dict[str, Any],
    *,
    tiles: int,
    question_tokens: int = QUESTION_TOKENS,
    cpu_gflops: float | None = None,
) -> dict[str, Any] | None:
    """Seconds to the first token for one image of `tiles` tiles when the vision tower runs on the CPU
    (None when it runs on a GPU: not estimated). The prefill is costed when the decoder is on the CPU too.
    `row` is a planner row (runtime, llm_format, vision_format, llm_device, vision_device)."""
    from r1v_quant.plan.roofline import prefill_flops_per_token, vision_flops_per_tile

    if row["vision_device"] != "cpu" or not g.vit_layers:
        return None
    dtype = row["vision_format"].split(" ")[0] if row["runtime"] == "torch" else None
    vkind = rate_kind(row["runtime"], row["vision_format"], dtype, vision=True)
    vrate = (cpu_gflops or CPU_GFLOPS[vkind]) * 1e9
    vflops = vision_flops_per_tile(g) * tiles
    out: dict[str, Any] = {
        "tiles": tiles,
        "vision_flops": vflops,
        "vision_rate": f"{vkind}: {vrate / 1e9:.0f} GFLOP/s",
        "vision_s": round(vflops / vrate, 1),
        "prefill_tokens": tiles * g.tokens_per_tile + question_tokens,
        "prefill_s": None,
        "prefill_rate": None,
        "basis": f"--cpu-gflops {cpu_gflops:g}" if cpu_gflops else CPU_CLASS,
    }
    if row["llm_device"] == "cpu":
        n = out["prefill_tokens"]
        pkind = rate_kind(row["runtime"], row["llm_format"], dtype, vision=False)
        prate = (cpu_gflops or CPU_GFLOPS[pkind]) * 1e9
        pflops = prefill_flops_per_token(g, n) * n
        out.update(prefill_flops=pflops, prefill_rate=f"{pkind} (assumed): {prate / 1e9:.0f} GFLOP/s",
                   prefill_s=round(pflops / prate, 1))  # fmt: skip
    out["ttft_s"] = round(out["vision_s"] + (out["prefill_s"] or 0.0), 1)
    return out


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def ttft_lines(device: dict[str, Any]) -> list[str]:
    """Text lines under a device's table in `plan`: time to first token of each recommendation."""
    rows = [(i, r["ttft"]) for i, r in enumerate(device["recommendations"], 1) if r.get("ttft")]
    if not rows:
        return []
    t0 = rows[0][1]
    lines = [
        f"  time to first token, one image of {t0['tiles']} tiles + a {QUESTION_TOKENS}-token question "
        f"(CPU rates: {t0['basis']}):"
    ]
    for i, t in rows:
        pre = f" + prefill {_dur(t['prefill_s'])} ({t['prefill_tokens']} tokens)" if t["prefill_s"] else ""
        where = "" if t["prefill_s"] is not None else " (decoder on the GPU: its prefill not counted)"
        lines.append(f"  {i:>4}  {_dur(t['ttft_s'])}: vision {_dur(t['vision_s'])}{pre}{where}")
    return lines
