"""Calibration throughput and peak RSS: all in RAM, `--max-memory auto` (the default: fitted to this
machine by the preflight plan) and a small budget (spilling to disk); predicted vs measured peak RSS.

Each configuration runs in its own subprocess so its peak RSS is its own:

    .venv/bin/python bench/calibration_bench.py [MODEL] [--samples 8] [--seq-len 1024] [--budget 1MB]

Without MODEL a tiny replica is built first (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _worker(args: argparse.Namespace) -> None:
    """Child process: one calibration, then print its report and own peak RSS as JSON."""
    from r1v_quant.calibration import calibrate

    report = calibrate(
        args.model, args.set, args.samples, args.seq_len, args.out, args.max_memory, seed=0, progress=False
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"report": report, "peak_rss_bytes": peak_kib * 1024}))


def _run(model: Path, out: Path, samples: int, seq_len: int, set_spec: str, budget: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(model), "--out", str(out), "--samples", str(samples)]
    cmd += ["--seq-len", str(seq_len), "--set", set_spec, "--max-memory", budget or "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"calibration failed ({budget=}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--set", default="default")
    ap.add_argument("--budget", default="1MB", help="memory budget of the second run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="calib-bench-") as tmp:
        model = args.model
        if model is None:
            from r1v_quant.replica.build import TinyOptions, build_tiny

            model = Path(tmp) / "tiny"
            print("building the tiny replica ...", file=sys.stderr)
            build_tiny(model, TinyOptions())
        rows = []
        for label, budget in (("in RAM", None), ("auto", "auto"), (f"budget {args.budget}", args.budget)):
            res = _run(model, Path(tmp) / f"out-{len(rows)}", args.samples, args.seq_len, args.set, budget)
            rows.append((label, res))
    print(
        f"{args.samples} samples x up to {args.seq_len} tokens, set {args.set}, model {args.model or 'tiny'}"
    )
    print(f"{'':18}" + "".join(f"{label:>22}" for label, _ in rows))
    lines = [
        ("tokens", lambda r: f"{r['report']['tokens']['total']}"),
        ("capture tokens/s", lambda r: f"{r['report']['tokens_per_second']:.0f}"),
        ("total seconds", lambda r: f"{r['report']['seconds']:.1f}"),
        ("peak RSS (MB)", lambda r: f"{r['peak_rss_bytes'] / 1e6:.0f}"),
        ("planned peak (MB)", lambda r: f"{r['report']['plan']['predicted_peak_bytes'] / 1e6:.0f}"),
        ("cached in RAM (MB)", lambda r: f"{r['report']['memory']['peak_cached_ram_bytes'] / 1e6:.1f}"),
        ("spilled (MB)", lambda r: f"{r['report']['memory']['spilled_bytes'] / 1e6:.1f}"),
    ]
    for name, fmt in lines:
        print(f"{name:18}" + "".join(f"{fmt(r):>22}" for _, r in rows))


if __name__ == "__main__":
    main()
