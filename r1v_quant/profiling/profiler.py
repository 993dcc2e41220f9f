"""`r1v-quant profile`: load time, time to first token, prefill / decode speed, vision ms per tile, peak
memory — each repeat in a fresh process (r1v_quant.profiling.worker), medians and spread over repeats —
plus the roofline (this machine's bandwidth and matmul peak) and the planner's prediction beside the
measurement.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from r1v_quant.model.artifact import Artifact, describe_artifact
from r1v_quant.plan.memory_model import (
    DTYPE_BYTES,
    KV_BYTES,
    Config,
    Workload,
    model_terms,
    pad,
    peaks,
)
from r1v_quant.util.errors import R1VError

# glibc returns freed blocks above this size to the OS at once. Its default threshold adapts upward
# (to 32 MiB) after the first frees, so on a small model freed activations stay in the heap and peak RSS
# overstates live memory by up to ~35 %; at 38B every activation is above 32 MiB anyway. Fixing the
# threshold makes the tiny replica's peak RSS mean what it means at full size. Set the variable
# yourself to measure with another value. MKL's own allocator likewise keeps its GEMM packing buffers
# (their size set by the CPU's blocking, not the model: 1-3 MB between two machines of the same test)
# after each call; MKL_DISABLE_FAST_MM frees them, so the peak is the model's, not this CPU's cache.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1"}
SUMMARY_KEYS = (
    "load_s",
    "ttft_s",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "vision_ms_per_tile",
    "peak_rss",
    "peak_rss_model",
    "baseline_rss",
    "peak_vram",
)


def synthetic_image(path: Path, size: int = 448) -> Path:
    """A deterministic size x size test picture (one tile): gradients and shapes, no randomness."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (x * 255 // size, y * 255 // size, (x + y) * 255 // (2 * size))
    d = ImageDraw.Draw(img)
    d.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(220, 40, 40))
    d.rectangle((size // 2, size // 2, size - size // 8, size - size // 8), fill=(40, 40, 220))
    img.save(path)
    return path


def resolve_backend(art: Artifact, backend: str | None) -> str:
    if backend is None:
        return art.backend
    if backend != art.backend:
        raise R1VError(f"{art.path}: a {art.kind} artifact runs on the {art.backend} backend, not {backend}")
    return backend


def run_worker(req: dict[str, Any]) -> dict[str, Any]:
    env = {**MALLOC_ENV, **os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "r1v_quant.profiling.worker"],
        input=json.dumps(req),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        raise R1VError(f"profile run failed (exit {proc.returncode}): {tail or 'no output'}")
    msg = json.loads(lines[-1])
    if not msg.get("ok"):
        raise R1VError(f"profile run failed: {msg.get('error')}")
    return msg["result"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min, max and spread ((max - min) / median) of each metric over the runs."""
    out = {}
    for key in SUMMARY_KEYS:
        vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if not vals:
            continue
        med = statistics.median(vals)
        out[key] = {
            "median": med,
            "min": min(vals),
            "max": max(vals),
            "spread": (max(vals) - min(vals)) / med if med else 0.0,
            "n": len(vals),
        }
    return out


def planner_config(art: Artifact, backend: str, dtype: str, device: str, vision: bool) -> Config:
    """The planner's configuration for what the worker runs."""
    from r1v_quant.plan.planner import _torch_config

    dev = "gpu" if device == "cuda" else "cpu"
    if backend == "torch":
        return _torch_config(art.geometry, art.llm_format, dtype, dev, awq=art.kind == "awq")
    weights = dict(art.stored)
    vformat = art.vision_format if vision and art.vision_format else "none"
    if vformat == "none":
        weights = {k: v for k, v in weights.items() if k not in ("vision", "projector")}
    # LlamaCppRuntime offloads every layer on CUDA but opens libmtmd on the CPU (MtmdVision's default)
    return Config(
        "llama.cpp", art.llm_format, vformat, "f16", dev, "cpu", weights=weights,
        repacked=art.extra.get("repacked", 0),
    )  # fmt: skip


def predict(art: Artifact, backend: str, dtype: str, device: str, run: dict[str, Any]) -> dict[str, Any]:
    """The planner's peak for one measured run's workload, without the runtime's base (the worker's
    baseline excludes it too)."""
    tiles = run["image_tiles"]
    cfg = planner_config(
        art, backend, dtype, device, vision=tiles > 0 and run.get("vision_runtime") != "onnx"
    )
    if backend == "torch":
        w = Workload(ctx=run["ctx_used"], prefill=run["prompt_tokens"], tiles=tiles)
    else:
        w = Workload(ctx=run["n_ctx"], prefill=run["n_ubatch"], tiles=tiles)
    terms = model_terms(art.geometry, cfg, w)
    pool = "gpu" if device == "cuda" else "cpu"
    terms = [t for t in terms if not t.name.startswith("runtime.")]
    return {
        "config": cfg.label(),
        "peak_model": peaks(terms, reclaimable=True).get(pool, 0),
        "terms": [t.__dict__ for t in terms],
    }


def profile(
    path: Path | str,
    *,
    backend: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    ctx: int | None = None,
    prompt_tokens: int = 512,
    gen_tokens: int = 32,
    image: Path | str | None = None,
    no_image: bool = False,
    repeat: int = 3,
    dtype: str | None = None,
    vision: str | None = None,
    mmproj: Path | str | None = None,
    roofline: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    art = describe_artifact(path, mmproj=mmproj)
    backend = resolve_backend(art, backend)
    if device not in ("cpu", "cuda"):
        raise R1VError(f"unknown --device {device!r}: cpu or cuda")
    if device == "cuda" and backend == "torch":
        import torch

        if not torch.cuda.is_available():
            raise R1VError("--device cuda: no CUDA device is available to torch")
    if device == "cuda" and backend == "llama.cpp":
        from r1v_quant.exporters.quantize import import_llama_cpp

        if not import_llama_cpp().llama_supports_gpu_offload():
            raise R1VError("--device cuda: this llama-cpp-python build has no GPU offload (a CPU build)")
    if repeat < 1 or prompt_tokens < 1 or gen_tokens < 1:
        raise R1VError("--repeat, --prompt-tokens and --gen-tokens must be positive")
    dtype = dtype or ("bf16" if device == "cuda" else "fp32")
    if dtype not in DTYPE_BYTES:
        raise R1VError(f"unknown --dtype {dtype!r}: one of {', '.join(DTYPE_BYTES)}")
    onnx_dir = None
    if vision:
        kind, _, where = vision.partition(":")
        if kind != "onnx" or not where:
            raise R1VError(f"--vision {vision!r}: expected onnx:DIR (an `r1v-quant onnx` export)")
        onnx_dir = str(Path(where).resolve())
    if backend == "llama.cpp":
        ctx = ctx or pad(prompt_tokens + gen_tokens, 256)
    elif ctx is not None and prompt_tokens + gen_tokens > ctx:
        raise R1VError(f"--prompt-tokens + --gen-tokens ({prompt_tokens + gen_tokens}) exceed --ctx {ctx}")
    with tempfile.TemporaryDirectory(prefix="r1v-profile-") as td:
        img = None
        if not no_image:
            if image is not None and not Path(image).is_file():
                raise R1VError(f"{image}: no such image file")
            img = str(Path(image).resolve()) if image else str(synthetic_image(Path(td) / "test-448.png"))
        req = {
            "backend": backend, "path": str(Path(path).resolve()), "device": device, "threads": threads,
            "ctx": ctx, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "image": img,
            "dtype": dtype, "onnx_vision": onnx_dir, "mmproj": str(mmproj) if mmproj else None,
        }  # fmt: skip
        from tqdm import tqdm

        runs = [run_worker(req) for _ in tqdm(range(repeat), desc="profile runs", disable=not progress)]
    summary = summarize(runs)
    first = runs[0]
    pred = predict(art, backend, dtype, device, first) if not onnx_dir else None
    result: dict[str, Any] = {
        "path": str(path),
        "backend": backend,
        "device": device,
        "dtype": dtype if backend == "torch" else None,
        "artifact": {
            "kind": art.kind,
            "llm_format": art.llm_format,
            "vision_format": art.vision_format,
            "stored_bytes": art.stored,
        },
        "workload": {
            k: first.get(k)
            for k in (
                "prompt_tokens",
                "image_tiles",
                "gen_tokens",
                "ctx_used",
                "n_ctx",
                "n_ubatch",
                "threads",
                "vision_runtime",
            )
        },
        "repeat": repeat,
        "summary": summary,
        "runs": runs,
    }
    if pred is not None:
        meas = (
            summary["peak_rss_model"]["median"]
            if device == "cpu"
            else summary.get("peak_vram", {}).get("median")
        )
        result["planner"] = {
            **pred,
            "measured_peak_model": meas,
            "error": (pred["peak_model"] - meas) / meas if meas else None,
        }
    if roofline:
        result["roofline"] = roofline_report(art, backend, dtype, first, summary, threads)
    return result


def roofline_report(
    art: Artifact, backend: str, dtype: str, run: dict[str, Any], summary: dict[str, Any], threads: int | None
) -> dict[str, Any]:
    from r1v_quant.plan import roofline as rl

    g = art.geometry
    n = run.get("threads") or threads
    bw = rl.measure_bandwidth(n)
    mm = rl.measure_matmul(n)
    if backend == "torch":
        cb = DTYPE_BYTES[dtype]
        held = {k: v * cb for k, v in g.params.items()}
        held["lm_head"] = g.vocab * g.hidden * cb
        kv_tok = g.kv_elements_per_token() * cb
    else:
        held = dict(art.stored)
        held["lm_head"] = art.extra.get("output_bytes")
        kv_tok = g.kv_elements_per_token() * KV_BYTES["f16"]
    ctx_avg = run["prompt_tokens"] + run["gen_tokens"] / 2
    med = {k: v["median"] for k, v in summary.items()}
    out = rl.roofline(
        g,
        med,
        bandwidth_gbs=bw["read_gbs"],
        gflops=mm["fp32_gflops"],
        decode_bytes=rl.decode_bytes_per_token(g, held, kv_tok, int(ctx_avg)),
        prompt_tokens=run["prompt_tokens"],
        llc_bytes=rl.last_level_cache_bytes(),
    )
    out["bandwidth"] = bw
    out["matmul"] = mm
    if backend == "llama.cpp":
        out["prefill"]["note"] = "ceiling from torch fp32 GEMM; llama.cpp's quantized dot products differ"
    return out


def format_profile(r: dict[str, Any]) -> str:
    s = r["summary"]
    w = r["workload"]

    def fmt(key: str, unit: str, scale: float = 1.0, nd: int = 2) -> str:
        if key not in s:
            return f"  {key:<22} n/a"
        m = s[key]
        return (
            f"  {key:<22} {m['median'] * scale:>10.{nd}f} {unit:<6} (min {m['min'] * scale:.{nd}f}, "
            f"max {m['max'] * scale:.{nd}f}, spread {100 * m['spread']:.0f} %)"
        )

    lines = [
        f"{r['path']}: {r['artifact']['kind']} ({r['artifact']['llm_format']}), backend {r['backend']} on "
        f"{r['device']}, {w['threads']} threads, {r['repeat']} runs (median, min, max)",
        f"  workload: {w['prompt_tokens']} prompt tokens ({w['image_tiles']} image tiles), "
        f"{w['gen_tokens']} generated, vision via {w['vision_runtime']}",
        fmt("load_s", "s"),
        fmt("ttft_s", "s"),
        fmt("prefill_tokens_per_s", "tok/s", nd=1),
        fmt("decode_tokens_per_s", "tok/s", nd=1),
        fmt("vision_ms_per_tile", "ms", nd=1),
        fmt("peak_rss", "MiB", 1 / 1024**2, 1),
        fmt("peak_rss_model", "MiB", 1 / 1024**2, 1),
    ]
    if "peak_vram" in s:
        lines.append(fmt("peak_vram", "MiB", 1 / 1024**2, 1))
    if "planner" in r:
        p = r["planner"]
        err = f"{100 * p['error']:+.1f} %" if p["error"] is not None else "n/a"
        lines.append(
            f"  planner predicts {p['peak_model'] / 1024**2:.1f} MiB above the runtime's base for this "
            f"workload ({err} vs measured)"
        )
    if "roofline" in r:
        rf = r["roofline"]
        d, pf = rf["decode"], rf["prefill"]
        lines.append(
            f"  roofline: {rf['bandwidth_gbs']} GB/s read bandwidth, {rf['fp32_gflops']} GFLOP/s fp32 matmul"
        )
        if d["fraction"] is not None:
            lines.append(
                f"    decode  {d['measured_tokens_per_s']:.1f} of {d['ceiling_tokens_per_s']} tok/s "
                f"({d['bytes_per_token'] / 1024**2:.1f} MiB per token): {100 * d['fraction']:.1f} %"
            )
        if d.get("note"):
            lines.append(f"            {d['note']}")
        if pf["fraction"] is not None:
            lines.append(
                f"    prefill {pf['measured_tokens_per_s']:.1f} of {pf['ceiling_tokens_per_s']} tok/s "
                f"(compute-bound): {100 * pf['fraction']:.1f} %"
            )
        if pf.get("note"):
            lines.append(f"            {pf['note']}")
        v = rf.get("vision")
        if v and v["fraction"] is not None:
            lines.append(
                f"    vision  {v['measured_ms_per_tile']:.1f} ms vs {v['ceiling_ms_per_tile']} ms per tile "
                f"(compute-bound): {100 * v['fraction']:.1f} %"
            )
    return "\n".join(lines)
