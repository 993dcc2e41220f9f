"""Every CUDA path of r1v-quant in one run, each compared with the same step on the CPU.

    .venv/bin/python bench/gpu_check.py --device cuda [--work DIR] [--size large] [--json] [--no-save]
    .venv/bin/python bench/gpu_check.py --device cpu  [--work DIR] [--size small] [--json] [--no-save]

On one replica (`--size small`: the untrained tiny replica, the CPU mode's default; `--size large`: the
same architecture widened so the GPU has real work, LLM 2048 wide x 8 layers with FFN 8192 and 16 heads
on 4 KV heads, ViT 1024 wide x 12 layers, random weights; the CUDA mode's default) each step runs twice,
once on the CPU in float32 (the reference pass) and once on `--device` (the device pass), each through
the `r1v-quant` command line in its own process:

  calibrate   calibrate --device D (default set, no sensitivity pass; large: --samples 8 --seq-len 512,
              small: --samples 4 --seq-len 256)
  awq         awq --device D on the same set
  eval        eval ppl --set heldout, REF vs that pass's AWQ checkpoint; device pass with
              --torch-device D --torch-dtype bfloat16
  profile     profile --device D (torch backend, one run; on CUDA peak VRAM beside the planner's figure)
  llama.cpp   gguf F16 + mmproj F16 once, then eval ppl of the GGUF with --gpu-layers 0 and (CUDA pass,
              when llama-cpp-python is a CUDA build) --gpu-layers 99

Checks (device pass vs reference pass), tolerances chosen for bfloat16 on the device pass's eval:
  calibrate   every statistic tensor: relative L2 difference <= 1e-3 (both passes compute in float32)
  awq         packed int4 words identical in >= 99 % (a different grid choice changes a whole channel)
  eval        reference PPL (bf16 vs fp32) within 2 %; AWQ KLD |dev - ref| <= 0.5 x ref + 0.01
  profile     the run completes with a finite time to first token; on CUDA peak VRAM > 0
  llama.cpp   GGUF PPL with offload within 1e-3 relative of the CPU run
With `--device cpu` both passes run on the CPU, so calibrate and awq agree exactly and eval compares
bfloat16 with float32 compute. The result (one JSON, via bench/results_io) is bench/results/
gpu_check_<device>.json; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LARGE = {
    "llm": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_hidden_layers": 8,
    },
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 12,
    },
}
CALIB = {"small": ["--samples", "4", "--seq-len", "256"], "large": ["--samples", "8", "--seq-len", "512"]}
TOL = {
    "calibrate_rel_l2": 1e-3,
    "awq_words_equal": 0.99,
    "ref_ppl_rel": 0.02,
    "awq_kld_rel": 0.5,
    "awq_kld_abs": 0.01,
    "gguf_offload_ppl_rel": 1e-3,
}


def cli(args: list[str], log: Path) -> tuple[dict[str, Any], float]:
    """`r1v-quant ARGS --json` in a fresh process: its JSON and wall seconds (stderr goes to `log`)."""
    t0 = time.perf_counter()
    with open(log, "a") as err:
        err.write(f"$ r1v-quant {' '.join(args)}\n")
        err.flush()
        p = subprocess.run(
            [sys.executable, "-m", "r1v_quant.cli.main", *args, "--json"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    secs = time.perf_counter() - t0
    out = p.stdout
    if p.returncode != 0:
        tail = log.read_text().splitlines()[-3:]
        raise RuntimeError(f"r1v-quant {args[0]} exited {p.returncode}: {' | '.join(tail)}")
    return json.loads(out[out.index("{") :]), secs


def build_replica(out: Path, size: str) -> Path:
    """The untrained tiny replica, widened for `--size large` (random weights, InternViT layer scale 0.1)."""
    import torch
    from safetensors.torch import save_file

    from r1v_quant.model.reference import R1VModel
    from r1v_quant.model.spec import load_spec
    from r1v_quant.replica.build import TinyOptions, build_tiny

    build_tiny(out, TinyOptions(steps=0))
    if size == "small":
        return out
    cfg = json.loads((out / "config.json").read_text())
    cfg["llm_config"].update(LARGE["llm"])
    cfg["vision_config"].update(LARGE["vision"])
    cfg["hidden_size"] = LARGE["llm"]["hidden_size"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    torch.manual_seed(0)
    model = R1VModel(load_spec(out))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1", "ls2")):
                p.fill_(0.1)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return out


def rel_l2(a: Any, b: Any) -> float:
    import torch

    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / max(float(torch.linalg.norm(a)), 1e-30))


def compare_stats(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "stats.safetensors")), load_file(str(b / "stats.safetensors"))
    if ta.keys() != tb.keys():
        return {"ok": False, "why": "different statistic tensors"}
    worst = max(
        ((rel_l2(ta[k].float(), tb[k].float()), k) for k in ta if ta[k].is_floating_point()),
        default=(0.0, ""),
    )
    return {
        "ok": worst[0] <= TOL["calibrate_rel_l2"],
        "max_rel_l2": worst[0],
        "worst": worst[1],
        "tensors": len(ta),
    }


def compare_awq(a: Path, b: Path) -> dict[str, Any]:
    from safetensors import safe_open

    def qweights(d: Path) -> dict[str, Any]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys() if k.endswith(".qweight")})  # noqa: SIM118
        return out

    qa, qb = qweights(a), qweights(b)
    if qa.keys() != qb.keys() or not qa:
        return {"ok": False, "why": "different or no qweight tensors"}
    equal = sum(int((qa[k] == qb[k]).sum()) for k in qa)
    total = sum(qa[k].numel() for k in qa)
    return {"ok": equal / total >= TOL["awq_words_equal"], "words_equal": equal / total, "tensors": len(qa)}


def _ppl(report: dict[str, Any]) -> dict[str, float]:
    return {k: v["ppl"] for k, v in report["reference"]["ppl"].items()}


def _kld(report: dict[str, Any]) -> dict[str, float]:
    return {k: v["kld_mean"] for k, v in report["candidates"][0]["kinds"].items()}


def compare_eval(ref: dict[str, Any], dev: dict[str, Any]) -> dict[str, Any]:
    pr, pd = _ppl(ref), _ppl(dev)
    kr, kd = _kld(ref), _kld(dev)
    ppl_rel = max(abs(pd[k] - pr[k]) / pr[k] for k in pr)
    kld_ok = all(abs(kd[k] - kr[k]) <= TOL["awq_kld_rel"] * kr[k] + TOL["awq_kld_abs"] for k in kr)
    return {
        "ok": ppl_rel <= TOL["ref_ppl_rel"] and kld_ok,
        "ref_ppl_rel_diff": ppl_rel,
        "ref_ppl": {"reference": pr, "device": pd},
        "awq_kld": {"reference": kr, "device": kd},
    }


def gpu_offload_available() -> bool:
    try:
        from r1v_quant.exporters.quantize import import_llama_cpp

        return bool(import_llama_cpp().llama_supports_gpu_offload())
    except Exception:  # no llama-cpp-python at all
        return False


def run(device: str, size: str, work: Path, log: Path) -> dict[str, Any]:
    model = build_replica(work / f"replica-{size}", size)
    passes = {"reference": ("cpu", "float32"), "device": (device, "bfloat16")}
    res: dict[str, Any] = {"steps": {}, "checks": {}, "seconds": {}}
    art: dict[str, dict[str, Any]] = {}

    def step(name: str, which: str, args: list[str]) -> dict[str, Any]:
        out, secs = cli(args, log)
        res["seconds"][f"{name}/{which}"] = round(secs, 1)
        print(f"  {name:<10} {which:<9} {secs:7.1f} s", file=sys.stderr, flush=True)
        return out

    for which, (dev, dtype) in passes.items():
        calib, awq = work / f"calib-{which}", work / f"awq-{which}"
        for d in (calib, awq):
            shutil.rmtree(d, ignore_errors=True)
        art[which] = {
            "calibrate": step(
                "calibrate",
                which,
                [
                    "calibrate",
                    str(model),
                    "--out",
                    str(calib),
                    *CALIB[size],
                    "--no-sensitivity",
                    "--device",
                    dev,
                ],
            ),
            "awq": step("awq", which, ["awq", str(model), "--out", str(awq), *CALIB[size], "--device", dev]),
            "eval": step(
                "eval",
                which,
                [
                    "eval",
                    "ppl",
                    "--ref",
                    str(model),
                    "--cand",
                    str(awq),
                    "--set",
                    "heldout",
                    "--torch-device",
                    dev,
                    "--torch-dtype",
                    dtype,
                ],
            ),
            "profile": step(
                "profile",
                which,
                [
                    "profile",
                    str(model),
                    "--backend",
                    "torch",
                    "--device",
                    dev,
                    "--repeat",
                    "1",
                    "--prompt-tokens",
                    "600",
                    "--gen-tokens",
                    "8",
                    "--no-roofline",
                ],
            ),
        }
    res["checks"]["calibrate"] = compare_stats(work / "calib-reference", work / "calib-device")
    res["checks"]["awq"] = compare_awq(work / "awq-reference", work / "awq-device")
    res["checks"]["eval"] = compare_eval(art["reference"]["eval"], art["device"]["eval"])
    prof = {}
    for which in passes:
        p = art[which]["profile"]
        s = p["summary"]
        prof[which] = {
            "ttft_s": s.get("ttft_s", {}).get("median"),
            "decode_tokens_per_s": s.get("decode_tokens_per_s", {}).get("median"),
            "peak_vram": s.get("peak_vram", {}).get("median"),
            "planner_error": p.get("planner", {}).get("error"),
        }
    ok = all(v["ttft_s"] is not None and math.isfinite(v["ttft_s"]) for v in prof.values())
    if device == "cuda":
        ok = ok and bool(prof["device"]["peak_vram"])
    res["checks"]["profile"] = {"ok": ok, **prof}

    gguf = work / "gguf"
    shutil.rmtree(gguf, ignore_errors=True)
    try:
        step(
            "gguf",
            "reference",
            ["gguf", str(model), "--out", str(gguf), "--type", "F16", "--mmproj-type", "F16"],
        )
    except RuntimeError as e:  # no llama.cpp tooling here: reported, not a failure of the CUDA paths
        res["checks"]["llama.cpp"] = {"ok": True, "skipped": str(e)}
    else:
        layers = {"reference": "0"}
        if device == "cuda" and gpu_offload_available():
            layers["device"] = "99"
        ppl = {}
        for which, n in layers.items():
            out = step(
                "llama.cpp",
                which,
                [
                    "eval",
                    "ppl",
                    "--ref",
                    str(model),
                    "--cand",
                    str(gguf),
                    "--set",
                    "heldout",
                    "--torch-device",
                    "cpu",
                    "--gpu-layers",
                    n,
                ],
            )
            ppl[which] = {k: v["ppl_cand"] for k, v in out["candidates"][0]["kinds"].items()}
        if "device" in ppl:
            rel = max(
                abs(ppl["device"][k] - ppl["reference"][k]) / ppl["reference"][k] for k in ppl["reference"]
            )
            res["checks"]["llama.cpp"] = {
                "ok": rel <= TOL["gguf_offload_ppl_rel"],
                "ppl_rel_diff": rel,
                "ppl": ppl,
            }
        else:
            why = "CPU mode" if device == "cpu" else "llama-cpp-python here is a CPU build"
            res["checks"]["llama.cpp"] = {"ok": True, "offload": f"not run ({why})", "ppl": ppl}
    res["steps"] = {w: {k: _brief(k, v) for k, v in a.items()} for w, a in art.items()}
    return res


def _brief(step: str, out: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of each step's JSON worth keeping."""
    if step == "calibrate":
        return {"tokens": out.get("tokens"), "device": out.get("device"), "layers": out.get("layers")}
    if step == "awq":
        return {k: out.get(k) for k in ("device", "seconds", "search", "layers") if k in out}
    if step == "eval":
        return {"runtime": out.get("runtime"), "ref_ppl": _ppl(out), "awq_kld": _kld(out)}
    return {"device": out.get("device"), "summary": {k: v.get("median") for k, v in out["summary"].items()}}


def table(res: dict[str, Any]) -> str:
    lines = [f"{'check':<11}{'result':<7}detail"]
    for name, c in res["checks"].items():
        detail = {k: v for k, v in c.items() if k != "ok" and not isinstance(v, dict)}
        if name == "profile":
            detail = {f"ttft {w}": c[w]["ttft_s"] for w in ("reference", "device")}
            detail.update({f"VRAM {w}": c[w]["peak_vram"] for w in ("device",) if c[w]["peak_vram"]})
        if name == "eval":
            detail.update({f"AWQ KLD {w}": c["awq_kld"][w].get("all") for w in ("reference", "device")})
        text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in detail.items())
        lines.append(f"{name:<11}{'ok' if c['ok'] else 'FAIL':<7}{text}")
    lines.append(f"total {res['total_seconds']:.0f} s on {res['device']} ({res['size']} replica)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], required=True)
    ap.add_argument(
        "--size", choices=["small", "large"], default=None, help="default: small on cpu, large on cuda"
    )
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the result JSON instead of the table")
    ap.add_argument(
        "--no-save", action="store_true", help="do not write bench/results/gpu_check_<device>.json"
    )
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: torch sees no CUDA device", file=sys.stderr)
            sys.exit(2)
    size = a.size or ("large" if a.device == "cuda" else "small")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "gpu_check.log"
        try:
            res = run(a.device, size, work, log)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    res = {
        "device": a.device,
        "size": size,
        "tolerances": TOL,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "passed": all(c["ok"] for c in res["checks"].values()),
        **res,
    }
    if a.device == "cuda":
        import torch

        res["gpu"] = torch.cuda.get_device_name(0)
    if not a.no_save:
        from bench.results_io import write_result

        res["saved"] = str(write_result(f"gpu_check_{a.device}", res))
    print(json.dumps(res, indent=2, default=str) if a.json else table(res))
    sys.exit(0 if res["passed"] else 1)


if __name__ == "__main__":
    main()
