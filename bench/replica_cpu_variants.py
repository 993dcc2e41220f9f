"""Does the tiny replica learn the same skills whatever float kernels the CPU runs?

Builds the replica (`r1v-quant tiny`, trained to a verified held-out accuracy) once per CPU-kernel
variant and thread count, each in a fresh process, and prints every build's held-out accuracies, the
steps it needed and its build time. The variants:

    ATEN_CPU_CAPABILITY=default|avx2|avx512   torch's own vectorized kernels (softmax, attention, GELU, ...)
    ONEDNN_MAX_CPU_ISA=AVX2 (with avx2)       oneDNN's kernels (it changes GELU's bits on an AVX-512 CPU)
    MKL_ENABLE_INSTRUCTIONS=AVX2 (with avx2)  MKL's GEMM path (set for completeness: on AMD CPUs MKL
                                              already runs its AVX2 path, so matmul bits do not change)
    1 and 2 threads                           parallel reductions change their order

A variant the CPU cannot run (avx512 on an AVX2-only CPU) is skipped. Every build must clear the
threshold; the bench exits 1 if one does not. Results: bench/results/replica_cpu_variants.json.

    .venv/bin/python bench/replica_cpu_variants.py [--threads 1,2] [--caps default,avx2,avx512] [--seed 0]
                                                  [--parallel N] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_result  # noqa: E402

ISA_ENV = {
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
}


def _build(out: Path, cap: str, threads: int, seed: int) -> dict:
    env = {**os.environ, **ISA_ENV[cap], "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    exe = Path(sys.executable).with_name("r1v-quant")
    cmd = [str(exe), "tiny", str(out), "--seed", str(seed), "--json"]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    # other processes on the machine stretch the wall time: the 1-minute load before and after says how
    # busy it was, the build's own CPU seconds (all its threads) are much less sensitive to it
    load = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if proc.returncode != 0:
        return {"cap": cap, "threads": threads, "ok": False, "error": proc.stderr.strip().splitlines()[-1:],
                "wall_s": round(wall, 1), "load_1min_before_after": load}  # fmt: skip
    report = json.loads(proc.stdout)
    return {
        "cap": cap,
        "threads": threads,
        "ok": True,
        "torch_capability": report["cpu_capability"],
        "torch_threads": report["threads"],
        "steps": report["steps_trained"],
        "heldout": report["heldout"],
        "wall_s": round(wall, 1),
        "cpu_s": report.get("cpu_seconds"),
        "load_1min_before_after": load,
        "omp_wait_policy": env.get("OMP_WAIT_POLICY"),  # how idle OpenMP threads wait: not the bits
        "seconds_training": report.get("seconds_training"),
        "weights_sha256": _weights_hash(out),
    }


def _weights_hash(model: Path) -> str:
    """One hash over every weight shard: equal only if the two builds wrote the same bytes."""
    h = hashlib.sha256()
    for f in sorted(model.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _previous(seed: int) -> list[dict]:
    from results_io import RESULTS, machine

    try:
        doc = json.loads((RESULTS / "replica_cpu_variants.json").read_text())
    except (OSError, ValueError):
        return []
    here = machine()
    same = all(doc["machine"].get(k) == here[k] for k in ("cpu", "torch", "torch_cpu_capability"))
    return doc["builds"] if same and doc.get("seed") == seed else []


def _write(seed: int, native: str, rows: list[dict]) -> tuple[Path, int]:
    distinct = len({r["weights_sha256"] for r in rows if r["ok"]})
    path = write_result(
        "replica_cpu_variants",
        {"seed": seed, "native_capability": native, "distinct_weights": distinct, "builds": rows},
    )
    return path, distinct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--caps", default="default,avx2,avx512")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="builds run at once (2 on a 2-core machine runs two 1-thread builds side by side; their wall "
        "times then count a shared machine)",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the builds of the last run on this machine (same CPU, torch and seed) that this run does "
        "not repeat: a long bench can be run in parts",
    )
    args = ap.parse_args()
    import torch

    native = torch.backends.cpu.get_cpu_capability().lower()
    jobs = []
    for cap in args.caps.split(","):
        if cap == "avx512" and native != "avx512":
            print(f"{cap}: skipped (this CPU runs {native})", flush=True)
            continue
        jobs += [(cap, threads) for threads in map(int, args.threads.split(","))]

    def show(row: dict) -> None:
        cap, threads = row["cap"], row["threads"]
        if row["ok"]:
            h = row["heldout"]
            load = row["load_1min_before_after"]
            print(f"{cap:8s} {threads} thread(s): image {h['image']:.0%}  text {h['text']:.0%}  "
                  f"steps {row['steps']} {row['wall_s']:.0f} s wall ({row['cpu_s']:.0f} CPU s, load {load}) "
                  f"weights {row['weights_sha256']}", flush=True)  # fmt: skip
        else:
            print(f"{cap:8s} {threads} thread(s): FAILED {row['error']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="replica-cpu-") as tmp:
        earlier = _previous(args.seed) if args.keep else []  # builds of an earlier run here, not repeated
        rows = [r for r in earlier if (r["cap"], r["threads"]) not in set(jobs)]
        written = _write(args.seed, native, rows) if not jobs else None
        lock = threading.Lock()

        def one(job: tuple[str, int]) -> dict:
            row = _build(Path(tmp) / f"{job[0]}-{job[1]}", job[0], job[1], args.seed)
            row["parallel"] = args.parallel
            show(row)
            shutil.rmtree(Path(tmp) / f"{job[0]}-{job[1]}", ignore_errors=True)
            nonlocal written
            with lock:  # written after every build: a long run stopped midway keeps what it measured
                rows.append(row)
                written = _write(args.seed, native, rows)
            return row

        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            list(pool.map(one, jobs))
    path, distinct = written
    print(f"{distinct} distinct weight files from {len(rows)} builds; wrote {path}")
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
