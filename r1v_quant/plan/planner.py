"""`r1v-quant plan`: will a configuration fit a device, with how much context, and which to pick.

For a preset (the real 38B dimensions) or a model on disk, every candidate configuration (runtime x
weight formats x KV-cache type x where the vision tower runs) is costed term by term with
`memory_model`, checked against each device, and ranked. Device sizes follow the hardware convention:
"24GB" on a GPU or a laptop means 24 GiB (2^30 bytes), as memory is sold; figures are printed in GiB.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from r1v_quant.model.artifact import Artifact, Geometry, describe_artifact
from r1v_quant.model.spec import ModelSpec
from r1v_quant.model.storage import LLM_FORMATS, mmproj_bytes, parse_awq, weight_bytes
from r1v_quant.plan.image_cost import (
    CPU_CLASS,
    CPU_GFLOPS,
    QUESTION_TOKENS,
    tiles_per_image,
    ttft_estimate,
    ttft_lines,
)
from r1v_quant.plan.memory_model import (
    CUDA_CONTEXT,
    DTYPE_BYTES,
    KV_BYTES,
    Config,
    Workload,
    awq_load_transient,
    model_terms,
    peaks,
    vllm_utilization,
)
from r1v_quant.plan.vllm_memory import MAX_NUM_BATCHED_TOKENS
from r1v_quant.util.errors import R1VError

GiB = 1024**3
# Resident memory left to the OS on a laptop: an idle desktop session (kernel, display server, a
# terminal). A browser or IDE needs more: pass --reserve.
CPU_RESERVE = int(2.5 * GiB)
TIGHT = 0.05  # less headroom than this fraction of the device is reported as "tight"
# llama.cpp's n_ubatch (llama-server's default); vLLM's --max-num-batched-tokens as the plan writes it
DEFAULT_PREFILL = {"llama.cpp": 512, "vllm": MAX_NUM_BATCHED_TOKENS}
RUNTIME_ALIASES = {"gpu-engine": "vllm"}  # the name earlier versions of `plan` used
GGUF_LLM_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
# Quality tiers used for ranking (lower is better): same tier = comparable quantization error in the
# literature (AWQ int4 g128 and Q4_K_M both ~4.2-4.9 bits per weight); within a tier, more bits first.
TIERS = {"bf16": 0, "fp16": 0, "F16": 0, "BF16": 0, "Q8_0": 1, "awq-int8-g128": 1, "Q6_K": 2, "Q5_K_M": 2,
         "Q4_K_M": 3, "awq-int4-g128": 3, "Q4_0": 3}  # fmt: skip


@dataclass(frozen=True)
class Device:
    kind: str  # "gpu" | "cpu"
    capacity: int
    reserve: int
    text: str

    @property
    def usable(self) -> int:
        return self.capacity - self.reserve


_UNITS = {"": GiB, "G": GiB, "GB": GiB, "GIB": GiB, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
          "T": 1024**4, "TB": 1024**4, "TIB": 1024**4}  # fmt: skip


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise R1VError(f"cannot read the size {text!r}: write e.g. 30GB, 24GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_device(text: str, reserve: int | None = None) -> Device:
    kind, _, size = text.partition(":")
    kind = kind.strip().lower()
    if kind not in ("gpu", "cpu") or not size:
        raise R1VError(f"cannot read the device {text!r}: write gpu:SIZE or cpu:SIZE, e.g. gpu:30GB")
    cap = parse_size(size)
    res = reserve if reserve is not None else (CPU_RESERVE if kind == "cpu" else 0)
    if res >= cap:
        raise R1VError(f"{text}: the reserve ({res / GiB:.1f} GiB) leaves nothing for the model")
    return Device(kind, cap, res, text)


# -- candidate configurations -----------------------------------------------------------------------------
def _llm_part(w: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in w.items() if k not in ("vision", "projector")}


def _bits(cfg: Config, g: Geometry) -> float:
    n = g.params.get("decoder", 0)
    return 8 * cfg.weights.get("decoder", 0) / n if n else 0.0


def vllm_vision_formats(llm_format: str) -> tuple[str, ...]:
    """Vision formats vLLM can load beside a language model stored as `llm_format`.

    vLLM reads ONE quantization config per checkpoint (`AWQMarlinConfig`: one `bits`, one `group_size`,
    plus `modules_to_not_convert`), and `SkyworkR1VChatModel` builds InternViT's qkv/proj/fc1/fc2 with it
    unless "vision_model" is listed as not converted. So the tower is either 16-bit or AWQ with the
    language model's own bits and group size: an int8 tower beside an int4 language model (or any AWQ
    tower beside a 16-bit one) is not a checkpoint vLLM can load."""
    return ("bf16", llm_format) if parse_awq(llm_format) else ("bf16",)


def _vllm_configs(llm_format: str, vision_formats: tuple[str, ...], weights_for, kv_types) -> list[Config]:
    out = []
    for vfmt in vision_formats:
        w = weights_for(vfmt)
        for kv in kv_types:
            for eager in (False, True):
                out.append(Config("vllm", llm_format, vfmt, kv, "gpu", "gpu", weights=w, enforce_eager=eager))
    return out


def preset_configs(spec: ModelSpec, device: Device, runtimes: tuple[str, ...]) -> list[Config]:
    """Every configuration worth costing for a model known only by its dimensions."""
    out: list[Config] = []
    if device.kind == "gpu" and "vllm" in runtimes:
        for fmt in ("bf16", "awq-int4-g128"):
            out += _vllm_configs(
                fmt, vllm_vision_formats(fmt), lambda v, fmt=fmt: weight_bytes(spec, fmt, v), ("f16", "fp8")
            )
    if "llama.cpp" in runtimes:
        for fmt in GGUF_LLM_TYPES:
            llm = _llm_part(weight_bytes(spec, fmt))
            for mm in ("F16", "Q8_0"):
                w = {**llm, "vision": mmproj_bytes(spec, mm)}  # mmproj: vision tower + mlp1 together
                for vdev in ("gpu", "cpu") if device.kind == "gpu" else ("cpu",):
                    for kv in ("f16", "q8_0", "q4_0"):
                        out.append(Config("llama.cpp", fmt, mm, kv, device.kind, vdev, weights=w))
    if "torch" in runtimes:
        dtype = "bf16" if device.kind == "gpu" else "fp32"
        out.append(_torch_config(Geometry.from_spec(spec), "bf16", dtype, device.kind))
    return out


def _torch_config(g: Geometry, fmt: str, dtype: str, dev: str, awq: bool = False) -> Config:
    """r1v-quant's reference forward: every parameter dense at `dtype` (AWQ dequantized on load)."""
    cb = DTYPE_BYTES[dtype]
    w = {k: n * cb for k, n in g.params.items()}
    largest = max(g.vocab * g.hidden, g.ffn * g.hidden)
    transient = awq_load_transient(g) if awq else 2 * largest  # 16-bit: one tensor's bytes in flight
    return Config(
        "torch", fmt, f"{dtype} (torch)", dtype, dev, dev, dtype=dtype, weights=w, load_transient=transient
    )


def artifact_configs(
    art: Artifact, device: Device, runtimes: tuple[str, ...], dtype: str | None, kv_type: str | None
) -> list[Config]:
    g = art.geometry
    out: list[Config] = []
    if art.kind == "gguf":
        if "llama.cpp" in runtimes:
            vdevs = ("gpu", "cpu") if device.kind == "gpu" else ("cpu",)
            for vdev in vdevs if art.mmproj_gguf else (device.kind,):
                for kv in (kv_type,) if kv_type else ("f16", "q8_0", "q4_0"):
                    out.append(
                        Config(
                            "llama.cpp",
                            art.llm_format,
                            art.vision_format or "none",
                            kv,
                            device.kind,
                            vdev,
                            weights=dict(art.stored),
                        )
                    )
        return out
    if "torch" in runtimes:
        dt = dtype or ("bf16" if device.kind == "gpu" else "fp32")
        out.append(_torch_config(g, art.llm_format, dt, device.kind, awq=art.kind == "awq"))
    vfmt = art.vision_format or "bf16"
    loadable = parse_awq(vfmt) is None or vfmt in vllm_vision_formats(art.llm_format)  # 16-bit, or same AWQ
    if device.kind == "gpu" and "vllm" in runtimes and loadable:
        out += _vllm_configs(
            art.llm_format, (vfmt,), lambda _v: dict(art.stored), (kv_type,) if kv_type else ("f16", "fp8")
        )
    return out


def _partial_offload(g: Geometry, cfg: Config, dev: Device, ctx: int, kw: dict[str, Any]) -> Config | None:
    """llama.cpp on a GPU that cannot hold every layer: the same configuration with the most decoder
    layers (`-ngl L`) that fit at `ctx`, the rest on the host; None when all fit or not even one does."""
    if cfg.runtime != "llama.cpp" or cfg.llm_device != "gpu" or cfg.gpu_layers is not None:
        return None
    if evaluate(g, cfg, dev, ctx=ctx, **kw)["verdict"] != "does not fit":
        return None

    def ok(layers: int) -> bool:
        c = replace(cfg, gpu_layers=layers)
        return evaluate(g, c, dev, ctx=ctx, **kw)["verdict"] != "does not fit"

    lo, hi = 0, g.llm_layers - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return replace(cfg, gpu_layers=lo) if lo > 0 else None


# -- costing -----------------------------------------------------------------------------------------------
def workload_for(
    cfg: Config, ctx: int, batch: int, prefill: int | None, tiles: int, images: int = 1
) -> Workload:
    if prefill is None:
        prefill = ctx if cfg.runtime == "torch" else min(DEFAULT_PREFILL[cfg.runtime], ctx)
    return Workload(ctx=ctx, prefill=min(prefill, ctx), tiles=tiles, batch=batch, images=images)


def evaluate(
    g: Geometry, cfg: Config, device: Device, *, ctx: int, batch: int, prefill: int | None, tiles: int,
    host_ram: int | None = None, images: int = 1,
) -> dict[str, Any]:  # fmt: skip
    w = workload_for(cfg, ctx, batch, prefill, tiles, images)
    terms = model_terms(g, cfg, w)
    pk = peaks(terms)
    need = pk.get(device.kind, 0)
    util = None
    if cfg.runtime == "vllm":  # what vLLM takes: the CUDA context + the fraction (rounded up) of TOTAL memory
        util = vllm_utilization(terms, device.capacity)
        need = max(need, CUDA_CONTEXT + int(util * device.capacity))
    fits = need <= device.usable and (util is None or util <= 1.0)
    if device.kind == "gpu" and host_ram is not None:  # the host must hold what runs beside the GPU
        fits = fits and pk.get("cpu", 0) <= host_ram
    headroom = device.usable - need
    verdict = "does not fit" if not fits else ("tight" if headroom < TIGHT * device.capacity else "fits")
    return {
        "config": cfg.label(),
        "runtime": cfg.runtime,
        "llm_format": cfg.llm_format,
        "vision_format": cfg.vision_format,
        "kv_type": cfg.kv_type,
        "llm_device": cfg.llm_device,
        "vision_device": cfg.vision_device,
        "workload": asdict(w),
        "terms": [asdict(t) for t in terms],
        "weights": dict(cfg.weights),
        "peak": pk,
        "device_need": need,
        "headroom": headroom,
        "verdict": verdict,
        "llm_bits_per_weight": round(_bits(cfg, g), 2),
        "enforce_eager": cfg.enforce_eager,
        "gpu_layers": cfg.gpu_layers,
        "gpu_memory_utilization": util,
    }


def max_context(
    g: Geometry, cfg: Config, device: Device, *, batch: int, prefill: int | None, tiles: int,
    host_ram: int | None = None, images: int = 1,
) -> int:  # fmt: skip
    """Largest context (multiple of 256, up to the model's limit) at which the configuration fits."""

    def ok(ctx: int) -> bool:
        r = evaluate(g, cfg, device, ctx=ctx, batch=batch, prefill=prefill, tiles=tiles, host_ram=host_ram,
                     images=images)  # fmt: skip
        return r["verdict"] != "does not fit"

    lo, hi = 0, max(1, g.max_ctx // 256)
    if not ok(256):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid * 256):
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


VERDICT_ORDER = {"fits": 0, "tight": 1, "does not fit": 2}


def _rank_key(r: dict[str, Any], device: Device) -> tuple:
    native = {"gpu": ("vllm",), "cpu": ("llama.cpp",)}[device.kind]
    if r["verdict"] == "does not fit":  # nothing else matters: the closest miss first
        return (2, r["device_need"])
    return (
        VERDICT_ORDER[r["verdict"]],  # fitting with headroom at the asked context first
        r["gpu_layers"] is not None,  # decoder layers on the host cost time on every token
        device.kind == "gpu" and r["vision_device"] != "gpu",  # a 6B ViT on a CPU costs seconds per tile
        TIERS.get(r["llm_format"], 9),
        r["runtime"] not in native,
        -r["llm_bits_per_weight"],
        TIERS.get(r["vision_format"], 0),
        -KV_BYTES.get(r["kv_type"], 2.0),
        r["enforce_eager"],  # CUDA graphs decode faster; eager only where graphs do not fit
        -r["max_ctx"],
    )


def plan(
    *,
    model: Path | str | None = None,
    preset: str | None = None,
    devices: list[str],
    ctx: int = 4096,
    batch: int = 1,
    prefill: int | None = None,
    tiles: int | None = None,
    runtime: str = "auto",
    dtype: str | None = None,
    kv_type: str | None = None,
    reserve: str | None = None,
    host_ram: str | None = None,
    top: int = 5,
    images: int = 1,
    mmproj: Path | str | None = None,
    max_tiles: int | None = None,
    cpu_gflops: float | None = None,
) -> dict[str, Any]:
    if (model is None) == (preset is None):
        raise R1VError("give either --model DIR or --preset NAME")
    if ctx < 1 or batch < 1:
        raise R1VError("--ctx and --batch must be positive")
    if images < 0:
        raise R1VError("--images must be 0 (text only) or more")
    if kv_type is not None and kv_type not in KV_BYTES:
        raise R1VError(f"unknown KV-cache type {kv_type!r}: one of {', '.join(KV_BYTES)}")
    runtime = RUNTIME_ALIASES.get(runtime, runtime)
    runtimes = ("torch", "llama.cpp", "vllm") if runtime == "auto" else (runtime,)
    art: Artifact | None = None
    if preset is not None:
        from r1v_quant.model.presets import PRESETS, preset_spec

        if preset not in PRESETS:
            raise R1VError(f"unknown preset {preset!r}: one of {', '.join(PRESETS)}")
        spec = preset_spec(preset)
        g = Geometry.from_spec(spec)
        if runtime == "auto":
            runtimes = ("llama.cpp", "vllm")  # what someone deploying a 38B model would run
        formats = {f: sum(weight_bytes(spec, f).values()) for f in LLM_FORMATS}
        source: dict[str, Any] = {"preset": preset, "flavor": spec.flavor, "formats": formats}
    else:
        art = describe_artifact(model, mmproj=mmproj)  # type: ignore[arg-type]
        g = art.geometry
        source = {"path": str(art.path), "kind": art.kind, "flavor": art.flavor, "llm_format": art.llm_format,
                  "vision_format": art.vision_format, "stored": art.stored,
                  "llm_gguf": str(art.llm_gguf) if art.llm_gguf else None,
                  "mmproj_gguf": str(art.mmproj_gguf) if art.mmproj_gguf else None}  # fmt: skip
    if cpu_gflops is not None and cpu_gflops <= 0:
        raise R1VError(f"--cpu-gflops must be positive (got {cpu_gflops:g})")
    if images == 0:
        tiles = 0
    elif tiles is None:  # one image at the cap: the grid plus its thumbnail (R1V always adds one)
        tiles = g.max_tiles if max_tiles is None else tiles_per_image(max_tiles, g.max_tiles > 1)
    notes = list(NOTES)
    if ctx > g.max_ctx:  # vLLM refuses a --max-model-len above max_position_embeddings; llama.cpp warns
        notes.insert(0, f"The context asked for ({ctx}) is above the model's limit: planned at {g.max_ctx}.")
        ctx = g.max_ctx
    res_bytes = parse_size(reserve) if reserve else None
    host = parse_size(host_ram) if host_ram else None
    out_devices = []
    for text in devices:
        dev = parse_device(text, res_bytes)
        if preset is not None:
            cfgs = preset_configs(spec, dev, runtimes)
        else:
            cfgs = artifact_configs(art, dev, runtimes, dtype, kv_type)  # type: ignore[arg-type]
        if kv_type is not None:
            cfgs = [c for c in cfgs if c.runtime == "torch" or c.kv_type == kv_type]
        if not cfgs:
            raise R1VError(f"no {'/'.join(runtimes)} configuration applies to {text}")
        kw = {"batch": batch, "prefill": prefill, "tiles": tiles, "host_ram": host, "images": images}
        cfgs += [c for c in (_partial_offload(g, cfg, dev, ctx, kw) for cfg in cfgs) if c is not None]
        rows = []
        for cfg in cfgs:
            r = evaluate(g, cfg, dev, ctx=ctx, **kw)
            r["max_ctx"] = max_context(g, cfg, dev, **kw)
            r["ttft"] = ttft_estimate(g, r, tiles=tiles, cpu_gflops=cpu_gflops)  # vision on the CPU only
            rows.append(r)
        rows.sort(key=lambda r: _rank_key(r, dev))
        groups = _group_kv(rows)
        fitting = [r for r in groups if r["verdict"] != "does not fit"]
        out_devices.append(
            {
                "device": text,
                "kind": dev.kind,
                "capacity": dev.capacity,
                "reserve": dev.reserve,
                "usable": dev.usable,
                "verdict": fitting[0]["verdict"] if fitting else "does not fit",
                "recommendations": (fitting or groups)[:top],
                "configs": rows,
            }
        )
    return {
        "model": {
            **source,
            "geometry": asdict(g),
            "params_total": sum(g.params.values()),
            "kv_bytes_per_token": {k: int(g.kv_elements_per_token() * v) for k, v in KV_BYTES.items()},
        },
        "ctx": ctx,
        "batch": batch,
        "tiles": tiles,
        "images": images,
        "image_cost": {
            "max_tiles": max_tiles,
            "tiles": tiles,
            "question_tokens": QUESTION_TOKENS,
            "cpu_class": CPU_CLASS if cpu_gflops is None else "--cpu-gflops",
            "cpu_gflops": CPU_GFLOPS if cpu_gflops is None else cpu_gflops,
        },  # fmt: skip
        "devices": out_devices,
        "notes": notes,
    }


def _group_kv(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (runtime, formats, placement): its best-ranked KV-cache type, with every KV type's
    verdict and largest context beside it (rows come ranked)."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["runtime"], r["llm_format"], r["vision_format"], r["llm_device"], r["vision_device"],
               r["enforce_eager"], r["gpu_layers"] is not None)  # fmt: skip
        if key not in out:
            out[key] = {**r, "kv_options": {}}
        out[key]["kv_options"][r["kv_type"]] = {
            "verdict": r["verdict"], "max_ctx": r["max_ctx"], "device_need": r["device_need"],
        }  # fmt: skip
    return list(out.values())


NOTES = [
    "Sizes of devices are GiB (2^30 bytes); 'gpu:30GB' means a 30 GiB GPU.",
    "llama.cpp allocates the KV cache for the whole context and reserves compute buffers up front.",
    "vLLM figures follow vLLM's start-up accounting (weights + profiling peak + CUDA graphs + KV cache "
    "inside --gpu-memory-utilization x total memory, the CUDA context outside it; vLLM >= 0.21 counts CUDA "
    "graphs inside the fraction). They and every GPU term are estimates: the CUDA context is an assumed "
    "0.5 GiB and nothing GPU-side was measured on this machine; the vLLM process's host memory is not "
    "modelled.",
    "vLLM loads one quantization config per checkpoint: the vision tower is 16-bit or AWQ with the "
    "language model's bits; vLLM has no mode that runs the vision tower on the CPU.",
    "With K-quants on AVX2/AVX-512 CPUs llama.cpp repacks weights into a second buffer; the file pages it "
    "read stay mapped and show in RSS but are reclaimable page cache, so they are not counted here.",
]


# -- text report -------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 1024**2:.2f} MiB"


def format_plan(p: dict[str, Any], *, detail: bool = True) -> str:
    m = p["model"]
    name = m.get("preset") or m.get("path")
    g = m["geometry"]
    kv = m["kv_bytes_per_token"]
    lines = [
        f"{name}: {_count(m['params_total'])} parameters; KV cache per token = 2 x {g['llm_layers']} "
        f"layers x {g['kv_heads']} KV heads x {g['head_dim']} x bytes = {kv['f16'] / 1024:.0f} KiB at f16, "
        f"{kv['q8_0'] / 1024:.0f} KiB at q8_0",
        f"context {p['ctx']} tokens, batch {p['batch']}, {p['tiles']} image tiles",
    ]
    for d in p["devices"]:
        lines.append("")
        lines.append(
            f"== {d['device']} ({_gib(d['capacity'])} GiB, {_gib(d['usable'])} usable): "
            + d["verdict"].upper()
        )
        lines.append(
            f"  {'#':>2}  {'configuration':<84} {'needs':>10} {'host':>10}  {'verdict':<13} "
            "largest context per KV type"
        )
        for i, r in enumerate(d["recommendations"], 1):
            host = r["peak"].get("cpu") if d["kind"] == "gpu" else None
            ctxs = " ".join(f"{k}:{v['max_ctx']}" for k, v in r["kv_options"].items())
            lines.append(
                f"  {i:>2}  {r['config']:<84} {_size(r['device_need']):>10} "
                f"{_size(host) if host is not None else '':>10}  {r['verdict']:<13} {ctxs}"
            )
        lines += ttft_lines(d)
        if detail and d["recommendations"]:
            best = d["recommendations"][0]
            lines.append(f"  breakdown of #1 ({best['config']}):")
            for t in best["terms"]:
                note = f"  ({t['note']})" if t["note"] else ""
                lines.append(
                    f"    {t['pool']:<4} {t['phase']:<9} {t['name']:<26} {_size(t['bytes']):>10}{note}"
                )
            pk = ", ".join(f"{k} {_size(v)}" for k, v in best["peak"].items())
            lines.append(f"    peak: {pk}")
            if best.get("gpu_memory_utilization") is not None:
                util = best["gpu_memory_utilization"]
                lines.append(
                    f"    vLLM takes --gpu-memory-utilization {util:.2f} x {_gib(d['capacity'])} GiB = "
                    f"{_size(util * d['capacity'])} plus the CUDA context outside it"
                )
            if best.get("command"):
                lines.append(f"  command for #1: {best['command']}")
    return "\n".join(lines)


def markdown_table(p: dict[str, Any]) -> str:
    """The first recommendation per device as a Markdown table (the README's table comes from this)."""
    lines = [
        f"| device | recommended configuration | needs (GiB) | host RAM (GiB) | verdict at {p['ctx']} tokens "
        "| largest context by KV-cache type |",
        "|---|---|---:|---:|---|---|",
    ]
    for d in p["devices"]:
        r = d["recommendations"][0]
        host = _gib(r["peak"]["cpu"]) if d["kind"] == "gpu" and "cpu" in r["peak"] else ""
        ctxs = ", ".join(f"{k} {v['max_ctx']:,}" for k, v in r["kv_options"].items())
        verdict = d["verdict"] if d["verdict"] != "does not fit" else "does not fit (closest shown)"
        lines.append(
            f"| {d['device']} | {r['config']} | {_gib(r['device_need'])} | {host} | {verdict} | {ctxs} |"
        )
    return "\n".join(lines)
