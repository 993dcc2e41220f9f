"""Full-width layers: one Skywork-R1V-38B decoder layer and one InternViT-6B layer through every heavy step.

The replica is 256 wide; the 38B model's layers are 5120 wide (FFN 27648, 40 heads on 8 KV heads, head dim
128) and its ViT layers 3200 wide (25 heads, FFN 12800, RMSNorm + q/k-norm). This bench writes a checkpoint
with exactly one layer of each at full width (plus a small vocabulary, the replica's tokenizer) with random
weights that have what quantization cares about: heavy-tailed weights (Student-t, 4 degrees of freedom) and
a few outlier input channels on every normed linear input (channels of the RMSNorm weights x 20-60 with the
matching weight columns divided alike, the function-preserving construction the replica uses).

On it, each in a fresh process with its wall time and peak RSS (VmHWM):
  calibrate   the default set (--samples, --seq-len), vision tower, capture and the sensitivity pass;
  awq         the whole AWQ job: search loss vs round-to-nearest, per-phase times, packing;
  independent the packed qweight/qzeros/scales unpacked by AutoAWQ's own algorithm (re-written here in
              numpy: shifts then its reverse order) against r1v-quant's loader and the 16-bit weights;
  gguf        Q8_0 and Q4_K_M through llama.cpp (its quantizer for K-quants), then llama.cpp's logits of a
              prompt against the torch reference;
and the job planner's prediction for the same jobs (calibration/job_plan.py: memory terms, FLOPs, time)
beside the measurement. The measured time per FLOP of each phase, relative to this machine's fp32 matmul
rate measured in the same process, is what job_plan.PHASE_EFFICIENCY holds.

    python bench/full_width.py --work DIR [--samples 8] [--seq-len 1024] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLM = {"hidden_size": 5120, "intermediate_size": 27648, "num_attention_heads": 40, "num_key_value_heads": 8}
VIT = {
    "hidden_size": 3200,
    "intermediate_size": 12800,
    "num_attention_heads": 25,
    "num_hidden_layers": 1,
    "qkv_bias": False,
    "qk_normalization": True,
    "norm_type": "rms_norm",
}
REUSE = False  # --reuse: steps whose output and measurement are in --work are not run again
OUTLIERS = 8  # outlier channels per normed input (real LLMs show a handful of such channels)


def build(out: Path, seed: int = 0) -> Path:
    """The one-layer full-width checkpoint, tensor by tensor (peak ~ the largest tensor in float32)."""
    import torch

    from r1v_quant.model.checkpoint import ShardedWriter
    from r1v_quant.model.spec import parse_config
    from r1v_quant.replica.build import TinyOptions, build_tiny, tiny_config

    tok = out.parent / "tokenizer-src"
    if not tok.is_dir():
        build_tiny(tok, TinyOptions(steps=0))
    src = json.loads((tok / "config.json").read_text())["llm_config"]
    cfg = tiny_config(
        "r1v",
        "rms",
        vocab_size=src["vocab_size"],
        bos=src["bos_token_id"],
        eos=src["eos_token_id"],
        llm_layers=1,
    )
    cfg["llm_config"].update(LLM)
    cfg["vision_config"].update(VIT)
    cfg["hidden_size"] = LLM["hidden_size"]
    spec = parse_config(cfg, flavor="r1v")
    out.mkdir(parents=True)
    for f in tok.iterdir():
        if f.name != "config.json" and not f.name.startswith("model") and f.is_file():
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)
    t_dist = torch.distributions.StudentT(torch.tensor(4.0))

    def heavy(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        return t_dist.sample(shape) / (2.0 * fan_in**0.5)  # Student-t(4) has variance 2

    def outlier_scale(n: int) -> torch.Tensor:
        s = torch.ones(n)
        idx = torch.randperm(n, generator=g)[:OUTLIERS]
        s[idx] = 20 + 40 * torch.rand(OUTLIERS, generator=g)
        return s

    # each normed input gets outlier channels: the norm's weight x s, the columns of its readers / s
    llm, vit = "language_model.model.layers.0", "vision_model.encoder.layers.0"
    readers = {
        f"{llm}.input_layernorm.weight": [f"{llm}.self_attn.{x}_proj.weight" for x in "qkv"],
        f"{llm}.post_attention_layernorm.weight": [
            f"{llm}.mlp.gate_proj.weight",
            f"{llm}.mlp.up_proj.weight",
        ],
        f"{vit}.norm1.weight": [f"{vit}.attn.qkv.weight"],
        f"{vit}.norm2.weight": [f"{vit}.mlp.fc1.weight"],
    }
    shapes = {k: tuple(v) for k, v in spec.tensor_shapes().items()}
    norm_scale = {norm: outlier_scale(shapes[norm][0]) for norm in readers}
    column_scale = {lin: norm_scale[norm] for norm, lins in readers.items() for lin in lins}
    writer = ShardedWriter(out, max_shard_bytes=2 * 1024**3)
    for name, shape in shapes.items():
        leaf = name.rpartition(".")[2]
        if name in norm_scale:
            t = norm_scale[name].clone()
        elif leaf in ("ls1", "ls2"):
            t = torch.full(shape, 0.1)
        elif "norm" in name or name == "mlp1.0.weight":
            t = torch.ones(shape)
        elif leaf == "bias" or name.endswith("class_embedding"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name.endswith("position_embedding") or "embed_tokens" in name:
            t = torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) == 2 else int(torch.tensor(shape[1:]).prod())
            t = heavy(shape, fan_in)
            if name in column_scale:
                t /= column_scale[name]
        writer.add(name, t.to(torch.bfloat16))
    writer.close()
    return out


def run(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run a command, returning its wall seconds and peak RSS (the child's ru_maxrss, via wait4). Linux
    carries a parent's peak into a child's ru_maxrss across fork + exec, so this process never holds a
    large model itself (the checkpoint is built by a child too). The measurement is kept beside the log, so
    `--reuse` can take a finished step's result."""
    done = log.with_suffix(".metrics.json")
    if REUSE and done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    m = {"wall_seconds": round(secs, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}
    done.write_text(json.dumps(m))
    return m


def fresh(out: Path, log: Path) -> None:
    """Remove a step's output before it runs (kept when --reuse takes its finished result)."""
    if not (REUSE and log.with_suffix(".metrics.json").is_file()):
        shutil.rmtree(out, ignore_errors=True)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "r1v_quant.cli.main", *args]


UNPACK = r"""
import json, sys
import numpy as np
import torch
from safetensors import safe_open
from r1v_quant.model.checkpoint import open_checkpoint
from r1v_quant.model.awq_layout import dequantize_awq
awq, src = sys.argv[1], sys.argv[2]
index = json.load(open(f"{awq}/model.safetensors.index.json"))["weight_map"]
REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ's AWQ_REVERSE_ORDER

def autoawq_unpack(qweight, qzeros, scales, g):
    # AutoAWQ's unpack_awq + reverse_awq_order, in numpy: shift out 8 nibbles per int32, reorder
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    def nibbles(x):
        x = x.view(np.uint32)
        v = (x[:, :, None] >> shifts[None, None, :]) & 0xF
        v = v.reshape(x.shape[0], -1)
        order = np.arange(v.shape[1]).reshape(-1, 8)[:, REVERSE].reshape(-1)
        return v[:, order].astype(np.float32)
    w, z = nibbles(qweight), nibbles(qzeros)
    return ((w - np.repeat(z, g, axis=0)) * np.repeat(scales.astype(np.float32), g, axis=0)).T  # [out, in]

ckpt = open_checkpoint(src)
L = "language_model.model.layers.0"

def awq_tensor(name):
    with safe_open(f"{awq}/{index[name]}", "pt") as f:
        return f.get_tensor(name)

# AWQ folds each input-channel scale s into the producer: norm_awq = norm / s, so the stored linear holds
# W * s (columns). Its 16-bit counterpart is therefore W * (norm / norm_awq); down_proj's scale sits in
# up_proj's quantized rows, so it has no exact 16-bit counterpart and is compared for identity only.
norm_of = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
           "mlp.gate_proj": "post_attention_layernorm"}
rows = {}
for lin in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.gate_proj"):
    p = f"{L}.{lin}"
    t = {k: awq_tensor(f"{p}.{k}") for k in ("qweight", "qzeros", "scales")}
    g = t["qweight"].shape[0] // t["scales"].shape[0]
    theirs = autoawq_unpack(t["qweight"].numpy(), t["qzeros"].numpy(), t["scales"].numpy(), g)
    ours = dequantize_awq(t["qweight"], t["qzeros"], t["scales"]).numpy()
    row = {"max_abs_diff_vs_r1v_loader": float(np.abs(theirs - ours).max()),
           "identical": bool(np.array_equal(theirs.astype(np.float16), ours.astype(np.float16)))}
    if lin in norm_of:
        norm = f"{L}.{norm_of[lin]}.weight"
        s = (ckpt.get(norm).float() / awq_tensor(norm).float()).numpy()
        w = ckpt.get(p + ".weight").float().numpy() * s[None, :]
        row["rel_rms_error_vs_scaled_16bit"] = float(np.sqrt(((theirs - w) ** 2).mean() / (w ** 2).mean()))
    rows[lin] = row
print(json.dumps(rows))
"""

BUILD = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench.full_width import build
build(Path(sys.argv[2]))
"""

LOGITS = r"""
import json, sys
import numpy as np, torch
import llama_cpp
from r1v_quant.model.reference import R1VModel
from r1v_quant.model.tokenizer import R1VTokenizer
src, ggufs = sys.argv[1], sys.argv[2:]
text = "The chart shows 37 and 45. What is 37 * 45? <think>\n37 * 45 = 1665.</think>\n\nThe answer is 1665."
ids = R1VTokenizer.from_dir(src).encode(text)
with torch.no_grad():
    ref = R1VModel.from_checkpoint(src)(torch.tensor([ids]))[0].double()
out = {"tokens": len(ids)}
for path in ggufs:
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
    llm.close()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    out[path.rsplit("/", 1)[-1]] = {
        "mean_kld": float(kld.mean()),
        "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
        "logit_cosine_min": float(torch.nn.functional.cosine_similarity(ref, got, dim=-1).min())}
print(json.dumps(out))
"""


LAYERS = r"""
import json, sys, time
import torch
from r1v_quant.model.artifact import Geometry
from r1v_quant.calibration.job_plan import _layer_flops, measure_cpu_gflops
from r1v_quant.model.checkpoint import open_checkpoint
from r1v_quant.model.llm import Qwen2Layer, rope_cos_sin
from r1v_quant.plan.roofline import vision_flops_per_tile
from r1v_quant.model.vision import VisionLayer
ckpt = open_checkpoint(sys.argv[1])
spec, g = ckpt.spec, Geometry.from_spec(ckpt.spec)
rate = measure_cpu_gflops()
out = {"matmul_gflops": rate}
with torch.no_grad():
    with torch.device("meta"):
        vit = VisionLayer(spec.vision)
    vit.load_state_dict({k: t.float() for k, t in ckpt.layer(0, vision=True).items()}, assign=True)
    x = torch.randn(2, g.positions, g.vit_hidden)
    t0 = time.perf_counter(); vit(x); secs = time.perf_counter() - t0
    vit_only = vision_flops_per_tile(g) - 2 * g.tokens_per_tile * (g.projector_in * g.hidden + g.hidden**2)
    out["vit_layer"] = {"tiles": 2, "seconds": secs, "gflops": 2 * vit_only / secs / 1e9}
    del vit
    with torch.device("meta"):
        layer = Qwen2Layer(spec.llm)
    layer.load_state_dict({k: t.float() for k, t in ckpt.layer(0).items()}, assign=True)
    n = 2048
    cos, sin = rope_cos_sin(spec.llm, torch.arange(n))
    x = torch.randn(2, n, g.hidden)
    t0 = time.perf_counter(); layer(x, cos, sin); secs = time.perf_counter() - t0
    flops = 2 * _layer_flops(spec, g, n)
    out["decoder_layer"] = {"tokens": 2 * n, "seconds": secs, "gflops": flops / secs / 1e9}
rate = (rate + measure_cpu_gflops()) / 2  # the machine's rate around the measurement
out["matmul_gflops"] = rate
for k in ("vit_layer", "decoder_layer"):
    out[k]["efficiency"] = out[k]["gflops"] / rate
print(json.dumps(out))
"""


def estimate_38b(rate_gflops: float) -> dict[str, Any]:
    """The planner's 38B figures for the README's defaults (64 x 4096 tokens, 48 with a 7-tile image, a
    24 GB machine with 22 GB available) at `rate_gflops` of fp32 matmul, with its measured efficiencies."""
    import tempfile

    import r1v_quant.calibration.job_plan as jp
    from r1v_quant.model.presets import preset_spec

    spec = preset_spec("r1v-38b")
    samples = [jp.SampleShape(4096, 7 if j < 48 else 0, 2048) for j in range(64)]
    out: dict[str, Any] = {"gflops": rate_gflops, "efficiency": dict(jp.PHASE_EFFICIENCY)}
    with tempfile.TemporaryDirectory() as d:
        for job in ("calibrate", "awq"):
            p = jp.make_plan(job, spec, samples, list(range(4, 64, 8)), budget="auto", spill_dir=d,
                             available=22 * 10**9, gflops={"cpu": rate_gflops})  # fmt: skip
            out[job] = {
                "peak_gb": round(p.peak_bytes / 1e9, 2),
                "peak_phase": p.peak_phase,
                "spill_gb": round(p.spill_bytes / 1e9, 2),
                "pflop": {k: round(v / 1e15, 2) for k, v in p.flops.items()},
                "hours": round(p.seconds / 3600, 2),
                "hours_at_full_matmul_rate": round(sum(p.flops.values()) / (rate_gflops * 1e9) / 3600, 2),
            }
    return out


def phase_efficiency(calib: dict[str, Any], awq: dict[str, Any]) -> dict[str, Any]:
    """Each phase's measured rate as a fraction of the matmul rate the planner measured at the start of the
    same job (the rate its estimate is multiplied by): the calibrate job times vision + capture together
    (one factor for both) and the sensitivity pass; the awq job's search timing also holds that job's own
    vision + capture, which are taken off at the calibrate job's factor."""
    rate_c = calib["plan"]["gflops_measured"]["cpu"] * 1e9
    f_c = calib["plan"]["flops"]
    t_sens = calib["sensitivity"]
    t_vc = calib["seconds"] - calib["prepare_seconds"] - t_sens
    e_vc = (f_c["vision"] + f_c["capture"]) / (t_vc * rate_c)
    e_sens = f_c["sensitivity"] / (t_sens * rate_c)
    rate_a = awq["plan"]["gflops_measured"]["cpu"] * 1e9
    f_a = awq["plan"]["flops"]
    t_search = awq["timings"]["search"] - (f_a["vision"] + f_a["capture"]) / (rate_a * e_vc)
    e_search = f_a["search"] / (t_search * rate_a)
    return {
        "vision": round(e_vc, 3),
        "capture": round(e_vc, 3),
        "sensitivity": round(e_sens, 3),
        "search": round(e_search, 3),
        "seconds": {"vision+capture": round(t_vc, 1), "sensitivity": t_sens, "search": round(t_search, 1)},
        "matmul_gflops": {"calibrate": rate_c / 1e9, "awq": rate_a / 1e9},
    }


def last_json(log: Path) -> dict[str, Any]:
    return json.loads(log.read_text().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs in --work")
    ap.add_argument("--reuse", action="store_true", help="take finished steps' results from --work")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip (layers,calibrate,awq,gguf)")
    a = ap.parse_args()
    global REUSE
    REUSE = a.reuse
    sys.path.insert(0, str(ROOT))
    from bench.results_io import write_result

    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    model = work / "full-width"
    skip = set(filter(None, a.skip.split(",")))
    res: dict[str, Any] = {"llm": LLM, "vit": VIT, "samples": a.samples, "seq_len": a.seq_len}
    previous = ROOT / "bench" / "results" / "full_width.json"
    if skip and previous.is_file():  # a partial re-run keeps the other steps' last results
        old = json.loads(previous.read_text())
        res.update({k: v for k, v in old.items() if k not in ("bench", "date", "machine")})
    if not (model / "model.safetensors.index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        (work / "build.metrics.json").unlink(missing_ok=True)  # a missing checkpoint is always built
        res["build"] = run([sys.executable, "-c", BUILD, str(ROOT), str(model)], work / "build.log")
    common = ["--samples", str(a.samples), "--seq-len", str(a.seq_len), "--json"]
    try:
        if "layers" not in skip:  # one forward of each full-width layer, timed against the matmul rate
            m = run([sys.executable, "-c", LAYERS, str(model)], work / "layers.log")
            res["layer_forward"] = {**m, **last_json(work / "layers.log")}
            print("layers", res["layer_forward"], flush=True)
        if "calibrate" not in skip:
            out = work / "calib"
            fresh(out, work / "calib.log")
            m = run(
                cli("calibrate", str(model), "--set", "default", "--out", str(out), *common),
                work / "calib.log",
            )
            rep = json.loads((out / "report.json").read_text())
            res["calibrate"] = {
                **m,
                "seconds": rep.get("seconds"),
                "plan": rep["plan"],
                "memory": rep["memory"],
                "sensitivity": rep.get("sensitivity", {}).get("seconds"),
                "prepare_seconds": rep.get("prepare_seconds"),
            }
            print("calibrate", m, flush=True)
        if "awq" not in skip:
            out = work / "awq"
            fresh(out, work / "awq.log")
            m = run(cli("awq", str(model), "--out", str(out), *common), work / "awq.log")
            rep = json.loads((out / "quant_report.json").read_text())
            res["awq"] = {
                **m,
                "timings": rep["timings"],
                "plan": rep["plan"],
                "memory": rep["memory"],
                "layers": rep["layers"],
                "loss": rep["loss_sum"],
                "loss_rtn": rep["loss_rtn_sum"],
            }
            print("awq", m, rep["loss_sum"], rep["loss_rtn_sum"], flush=True)
            m = run([sys.executable, "-c", UNPACK, str(out), str(model)], work / "unpack.log")
            res["independent_unpack"] = {**m, "linears": last_json(work / "unpack.log")}
            print("unpack", res["independent_unpack"], flush=True)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
        if "gguf" not in skip:
            paths = []
            res["gguf"] = {}
            for t in ("Q8_0", "Q4_K_M"):
                out = work / f"gguf-{t}"
                fresh(out, work / f"gguf-{t}.log")
                m = run(
                    cli(
                        "gguf", str(model), "--out", str(out), "--type", t, "--mmproj-type", "none", "--json"
                    ),
                    work / f"gguf-{t}.log",
                )
                path = next(p for p in out.glob("*.gguf"))
                res["gguf"][t] = {**m, "bytes": path.stat().st_size}
                paths.append(str(path))
                print("gguf", t, m, flush=True)
            m = run([sys.executable, "-c", LOGITS, str(model), *paths], work / "logits.log")
            res["gguf"]["llama_cpp_vs_torch"] = {**m, **last_json(work / "logits.log")}
            print("logits", res["gguf"]["llama_cpp_vs_torch"], flush=True)
            if not a.keep:
                for t in ("Q8_0", "Q4_K_M"):
                    shutil.rmtree(work / f"gguf-{t}", ignore_errors=True)
        # the 38B figures from these measurements: at this machine's matmul rate and at 1 TFLOP/s, with the
        # planner's current factors and with the ones measured here
        import r1v_quant.calibration.job_plan as jp

        rate = res.get("layer_forward", {}).get("matmul_gflops")
        res["estimate_38b"] = {"planner_factors": {"assumed_1tflops": estimate_38b(1000.0)}}
        if rate:
            res["estimate_38b"]["planner_factors"]["this_machine"] = estimate_38b(rate)
        if "calibrate" in res and "awq" in res:
            res["phase_efficiency"] = eff = phase_efficiency(res["calibrate"], res["awq"])
            saved = dict(jp.PHASE_EFFICIENCY)
            jp.PHASE_EFFICIENCY.update({k: eff[k] for k in saved})
            try:
                m = {"assumed_1tflops": estimate_38b(1000.0)}
                if rate:
                    m["this_machine"] = estimate_38b(rate)
            finally:
                jp.PHASE_EFFICIENCY.clear()
                jp.PHASE_EFFICIENCY.update(saved)
            res["estimate_38b"]["measured_factors"] = m
        print("38B", json.dumps(res["estimate_38b"], indent=1), flush=True)
        print(f"wrote {write_result('full_width', res)}")
    except BaseException:
        print(f"failed: {work} keeps the checkpoint and outputs for --reuse", file=sys.stderr)
        raise
    if not a.keep:
        shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
