"""Peak RSS while streaming every decoder layer: a checkpoint vs one with 4x the layers (target ratio <= 1.2).

Each measurement runs in its own process: open the checkpoint, then for every layer load its tensors from
the memory-mapped shards, build a Qwen2 layer, run 256 tokens through it and drop it. If streaming works,
peak memory tracks one layer, not the model, so the 4x-layer checkpoint costs about the same.

    python bench/stream_rss.py [--layers 6] [--hidden 1024] [--ffn 2816] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import psutil, torch
from r1v_quant.model.checkpoint import open_checkpoint
from r1v_quant.model.llm import Qwen2Layer, rope_cos_sin
proc = psutil.Process()
ckpt = open_checkpoint(sys.argv[1])
m = ckpt.spec.llm
base = proc.memory_info().rss
try:  # reset the kernel's high-water mark so import-time transients do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm = True
except OSError:
    hwm = False
x = torch.randn(1, 256, m.hidden_size)
cos, sin = rope_cos_sin(m, torch.arange(256))
peak_sampled = base
t0 = time.perf_counter()
with torch.no_grad():
    for i, tensors in ckpt.iter_layers():
        with torch.device("meta"):
            layer = Qwen2Layer(m)
        layer.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
        x = layer(x, cos, sin)
        peak_sampled = max(peak_sampled, proc.memory_info().rss)
        del layer, tensors
secs = time.perf_counter() - t0
if hwm:
    line = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    peak = int(line.split()[1]) * 1024
else:
    peak = max(peak_sampled, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"layers": m.num_layers, "bytes": ckpt.total_bytes(), "base": base, "peak": peak,
                  "seconds": secs}))
"""


def build(out: Path, layers: int, hidden: int, ffn: int) -> Path:
    from r1v_quant.replica.build import tiny_config, write_random_checkpoint

    cfg = tiny_config("r1v", "layernorm", vocab_size=4096, bos=0, eos=1, llm_layers=layers)
    cfg["llm_config"].update(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
    )
    cfg["hidden_size"] = hidden
    return write_random_checkpoint(out, cfg)


def measure(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        small = build(Path(d) / "small", args.layers, args.hidden, args.ffn)
        big = build(Path(d) / "big", 4 * args.layers, args.hidden, args.ffn)
        runs: dict[str, list[dict]] = {"small": [], "big": []}
        for _ in range(args.repeat):  # interleaved so machine noise hits both alike
            runs["small"].append(measure(small))
            runs["big"].append(measure(big))
    med = {k: sorted(v, key=lambda r: r["peak"])[len(v) // 2] for k, v in runs.items()}
    mb = 1024**2
    print(
        f"{'checkpoint':<12}{'layers':>7}{'weights MB':>12}{'base RSS MB':>13}{'peak RSS MB':>13}"
        f"{'peak-base MB':>14}{'s/layer':>9}"
    )
    for k, r in med.items():
        print(
            f"{k:<12}{r['layers']:>7}{r['bytes'] / mb:>12.0f}{r['base'] / mb:>13.0f}{r['peak'] / mb:>13.0f}"
            f"{(r['peak'] - r['base']) / mb:>14.0f}{r['seconds'] / r['layers']:>9.3f}"
        )
    ratio = med["big"]["peak"] / med["small"]["peak"]
    weights = med["big"]["bytes"] / med["small"]["bytes"]
    print(
        f"\npeak RSS ratio (4x layers / 1x): {ratio:.3f}  (weights ratio {weights:.2f}; target <= 1.2) "
        f"{'PASS' if ratio <= 1.2 else 'FAIL'}"
    )


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"bench wall time {time.perf_counter() - t:.0f} s")
