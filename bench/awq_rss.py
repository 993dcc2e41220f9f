"""Peak RSS of `r1v-quant awq` on a checkpoint vs one with 4x the decoder layers (target ratio <= 1.2).

Both checkpoints have the same widths and tokenizer (the tiny replica's), random weights; each run is a
separate process quantizing with the same calibration settings, so activations are the same size and
only the number of layers differs. Streaming means one layer is resident at a time, so the peak should
not grow with depth.

It also prints the preflight plan's predicted peak RSS, cached-activation bytes, spill and time
(calibration/job_plan.py) next to the measured ones.

    python bench/awq_rss.py [--layers 4] [--hidden 512] [--ffn 1536] [--samples 4] [--seq-len 512]
                            [--max-memory auto]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq
t0 = time.perf_counter()
r = quantize_awq(sys.argv[1], sys.argv[2], AWQOptions(samples=int(sys.argv[3]), seq_len=int(sys.argv[4]),
                 max_memory=sys.argv[5]), progress=False)
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
plan, mem = r["plan"], r["memory"]
print(json.dumps({"peak": int(peak.split()[1]) * 1024, "seconds": time.perf_counter() - t0,
                  "predicted": plan["predicted_peak_bytes"], "phase": plan["peak_phase"],
                  "acts_predicted": plan["cache_peak_bytes"], "acts_measured": mem["peak_cached_ram_bytes"],
                  "spill_predicted": plan["predicted_spill_bytes"],
                  "spill_measured": mem["peak_spill_disk_bytes"],
                  "est_seconds": plan["estimated_seconds"]}))
"""


def build(root: Path, layers: int, hidden: int, ffn: int) -> Path:
    from r1v_quant.replica.build import TinyOptions, build_tiny, tiny_config, write_random_checkpoint

    tok_src = root / "tok"
    if not tok_src.exists():
        build_tiny(tok_src, TinyOptions(steps=0))
    cfg = json.loads((tok_src / "config.json").read_text())
    base = tiny_config(
        "r1v",
        "layernorm",
        vocab_size=cfg["llm_config"]["vocab_size"],
        bos=cfg["llm_config"]["bos_token_id"],
        eos=cfg["llm_config"]["eos_token_id"],
        llm_layers=layers,
    )
    base["llm_config"].update(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
    )
    base["hidden_size"] = hidden
    out = write_random_checkpoint(root / f"L{layers}", base)
    for f in tok_src.iterdir():  # tokenizer, template, preprocessor: same for both depths
        if f.name not in ("config.json",) and not f.name.startswith("model"):
            shutil.copy2(f, out / f.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-memory", default="auto", help="passed to awq (e.g. 1MB to make it spill)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        rows = {}
        for n in (args.layers, 4 * args.layers):
            model = build(root, n, args.hidden, args.ffn)
            r = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(model),
                    str(root / f"out{n}"),
                    str(args.samples),
                    str(args.seq_len),
                    args.max_memory,
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode:
                sys.exit(r.stderr[-2000:])
            rows[n] = json.loads(r.stdout.strip().splitlines()[-1])
            rows[n]["bytes"] = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    mb = 1024**2
    print(
        f"{'decoder layers':<16}{'weights MB':>12}{'peak RSS MB':>13}{'planned MB':>12}{'ratio':>7}"
        f"{'seconds':>9}{'planned s':>11}  cached activations in RAM planned / measured, "
        "spill planned / measured (bytes)"
    )
    for n, r in rows.items():
        print(
            f"{n:<16}{r['bytes'] / mb:>12.0f}{r['peak'] / mb:>13.0f}{r['predicted'] / mb:>12.0f}"
            f"{r['predicted'] / r['peak']:>7.2f}{r['seconds']:>9.1f}{r['est_seconds']:>11.1f}  "
            f"{r['acts_predicted']} / {r['acts_measured']}, {r['spill_predicted']} / {r['spill_measured']}"
            f" (peak phase: {r['phase']})"
        )
    small, big = rows[args.layers], rows[4 * args.layers]
    ratio = big["peak"] / small["peak"]
    print(
        f"\npeak RSS ratio (4x layers / 1x): {ratio:.3f} (weights ratio {big['bytes'] / small['bytes']:.2f}; "
        f"target <= 1.2) {'PASS' if ratio <= 1.2 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
