"""Vision cost per 448 x 448 tile on this CPU: torch fp32 / bf16, onnxruntime fp32 / int8, mmproj F16 / Q8_0
(libmtmd), on the replica and on an InternViT-6B-shaped tower measured at a few depths and scaled to 45.

    .venv/bin/python bench/vision_cost.py --work DIR [--replica DIR] [--depths 1 2] [--threads 2]
                                          [--repeats 2] [--skip-6b]

The 6B-shaped tower has InternViT-6B's layer shapes (3200 wide, 25 heads of 128, FFN 12800, 1,025
positions per tile) and the 38B model's mlp1 (12800 -> 5120 -> 5120), random weights. It uses LayerNorm
without q/k-norm: llama.cpp runs its RMSNorm + q/k-norm InternViT graph only for a tower exactly 3200 x 45,
and the norms are < 0.1 % of a layer's FLOPs. Each backend has both depths d1 and d2 open and, after one
warm-up each, encodes one tile at each depth in turn, `--repeats` rounds, so load from other jobs falls on
both alike; t is the fastest repeat (other jobs on a shared machine only ever add time). The per-layer cost
is (t(d2) - t(d1)) / (d2 - d1) and the tile's fixed cost (patch embedding, pixel shuffle, mlp1) is
t(d1) - d1 x per-layer, so the 45-layer estimate is fixed + 45 x per-layer. Effective GFLOP/s = FLOPs of
one layer (r1v_quant.plan.roofline's count) / per-layer time. The process's CPU seconds are recorded beside.
Results go to bench/results/vision_cost.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FULL_LAYERS = 45
BACKENDS = ("torch fp32", "torch bf16", "onnxruntime fp32", "onnxruntime int8", "mmproj F16", "mmproj Q8_0")


def _tiles(n: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):  # smooth random pictures (closer to a photo's statistics than white noise)
        small = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((448, 448), Image.Resampling.BICUBIC))
    return out


def config_6b(layers: int) -> dict[str, Any]:
    """A checkpoint config: InternViT-6B's layer shapes at `layers` deep (LayerNorm, no q/k-norm), mlp1 to
    the 38B decoder's 5120 width, a one-layer stand-in decoder."""
    sys.path.insert(0, str(ROOT))
    from bench.mmproj_6b import config

    cfg = config()
    cfg["vision_config"].update(num_hidden_layers=layers, norm_type="layer_norm", qk_normalization=False)
    return cfg


def write_6b(out: Path, layers: int) -> Path:
    """Random weights for `config_6b(layers)`, one tensor in memory at a time (bf16 on disk)."""
    from bench.mmproj_6b import write_random_checkpoint

    return write_random_checkpoint(out, config_6b(layers))


def _factories(model: Path, work: Path, threads: int, tiles: list[Any]) -> dict[str, Callable[[], Any]]:
    """Backend name -> a function that opens it and returns (encode(), close())."""
    import torch

    from r1v_quant.model.preprocess import to_tensor

    pixels = np.stack([to_tensor(t) for t in tiles])

    def torch_backend(dtype: Any) -> Callable[[], Any]:
        def open_() -> Any:
            from r1v_quant.exporters.onnx_vision import load_vision
            from r1v_quant.model.checkpoint import open_checkpoint

            graph = load_vision(open_checkpoint(model), dtype)
            x = torch.from_numpy(pixels).to(dtype)

            def enc() -> np.ndarray:
                with torch.inference_mode():
                    return graph(x).float().numpy()

            return enc, lambda: None

        return open_

    def onnx_backend(int8: bool) -> Callable[[], Any]:
        def open_() -> Any:
            from r1v_quant.exporters.onnx_vision import export_onnx
            from r1v_quant.runtime.onnx import OnnxVisionEncoder

            out = work / f"onnx-{'int8' if int8 else 'fp32'}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            export_onnx(model, out, verify=False, int8=int8)
            export_s = time.perf_counter() - t
            enc = OnnxVisionEncoder(out, provider="cpu", threads=threads)

            def close() -> None:
                shutil.rmtree(out, ignore_errors=True)

            fn = lambda: enc.encode(pixels)  # noqa: E731
            fn.export_s = export_s  # type: ignore[attr-defined]
            return fn, close

        return open_

    def mmproj_backend(gtype: str) -> Callable[[], Any]:
        def open_() -> Any:
            from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf
            from r1v_quant.runtime.mtmd import MtmdVision

            path = work / f"mmproj-{gtype}.gguf"
            path.unlink(missing_ok=True)
            t = time.perf_counter()
            export_mmproj_gguf(model, path, gtype)
            export_s = time.perf_counter() - t
            mv = MtmdVision(path, n_threads=threads)

            def close() -> None:
                mv.close()
                path.unlink(missing_ok=True)

            fn = lambda: mv.encode_tiles(tiles)  # noqa: E731
            fn.export_s = export_s  # type: ignore[attr-defined]
            return fn, close

        return open_

    return {
        "torch fp32": torch_backend(torch.float32),
        "torch bf16": torch_backend(torch.bfloat16),
        "onnxruntime fp32": onnx_backend(False),
        "onnxruntime int8": onnx_backend(True),
        "mmproj F16": mmproj_backend("F16"),
        "mmproj Q8_0": mmproj_backend("Q8_0"),
    }


def measure(models: dict[str, Path], work: Path, *, n_tiles: int, repeats: int, threads: int,
            only: tuple[str, ...]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """ms per tile of each backend on each model, cosine vs torch fp32 on the same model.

    One backend at a time has every model open; after one warm-up each, the models are encoded in turn,
    `repeats` rounds, so load from other jobs falls on all of them alike. Per model: wall time of each
    repeat, the fastest (`ms_per_tile`: other jobs only ever add time), the median, and the process's
    CPU seconds per tile (all threads)."""
    from r1v_quant.exporters.onnx_vision import compare

    tiles = _tiles(n_tiles)
    rows: dict[str, dict[str, Any]] = {label: {} for label in models}
    ref: dict[str, np.ndarray] = {}
    for name in BACKENDS:
        if name not in only:
            continue
        opened: dict[str, Any] = {}
        try:
            for label, model in models.items():
                (work / label).mkdir(parents=True, exist_ok=True)
                opened[label] = _factories(model, work / label, threads, tiles)[name]()
        except Exception as e:  # a missing runtime (onnxruntime, llama-cpp-python) leaves its row out
            for _, close in opened.values():
                close()
            err = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            for label in models:
                rows[label][name] = {"error": err}
            print(f"  {name}: left out ({err})", flush=True)
            continue
        try:
            outs = {label: np.asarray(fn()) for label, (fn, _) in opened.items()}  # warm-up
            wall: dict[str, list[float]] = {label: [] for label in models}
            cpu: dict[str, list[float]] = {label: [] for label in models}
            for _ in range(repeats):
                for label, (fn, _) in opened.items():
                    t, c = time.perf_counter(), time.process_time()
                    outs[label] = np.asarray(fn())
                    wall[label].append(time.perf_counter() - t)
                    cpu[label].append(time.process_time() - c)
        finally:
            for _, close in opened.values():
                close()
        for label, (fn, _) in opened.items():
            out = outs[label].reshape(-1, outs[label].shape[-1])
            ref.setdefault(label, out)
            rows[label][name] = {
                "ms_per_tile": round(min(wall[label]) * 1000 / n_tiles, 2),
                "median_ms_per_tile": round(statistics.median(wall[label]) * 1000 / n_tiles, 2),
                "times_s": [round(t, 4) for t in wall[label]],
                "cpu_s_per_tile": round(min(cpu[label]) / n_tiles, 3),
                "export_s": round(getattr(fn, "export_s", 0.0), 1),
                **compare(ref[label], out),
            }
            r = rows[label][name]
            print(f"  {label} {name}: {r['ms_per_tile']:.1f} ms/tile (median {r['median_ms_per_tile']:.1f}, "
                  f"min cosine vs torch fp32 {r['cosine_min']:.5f})", flush=True)  # fmt: skip
        del opened, outs
        gc.collect()
    return rows


def layer_flops(width: int, ffn: int, positions: int) -> float:
    """FLOPs of one ViT layer on one tile: 2 per weight per position plus attention (QK^T and AV)."""
    return 2.0 * (4 * width * width + 2 * width * ffn) * positions + 2 * 2 * positions * positions * width


def scale(rows: dict[int, dict[str, Any]], d1: int, d2: int, threads: int) -> dict[str, Any]:
    """Per-layer and fixed cost from two depths, the 45-layer estimate and the effective GFLOP/s: from wall
    time as measured, and for an unloaded machine from the process's CPU seconds / threads (on a shared
    machine the wall time also holds the time other jobs had the cores; CPU time does not, while spinning
    threads waiting at a barrier still count, so this estimate errs slow)."""
    from r1v_quant.model.presets import VISION_6B

    lf = layer_flops(VISION_6B["hidden_size"], VISION_6B["intermediate_size"], 1025)
    out = {}
    for name in rows[d1]:
        if "times_s" not in rows[d1][name] or "times_s" not in rows[d2].get(name, {}):
            continue
        # the fastest repeat: other jobs on a shared machine only ever add time
        a, b = (1000 * min(rows[d][name]["times_s"]) for d in (d1, d2))
        ca, cb = (rows[d][name].get("cpu_s_per_tile") for d in (d1, d2))
        per_layer = (b - a) / (d2 - d1)
        fixed = a - d1 * per_layer
        out[name] = {
            "per_layer_ms": round(per_layer, 1),
            "fixed_ms": round(fixed, 1),
            "ms_per_tile_45_layers": round(fixed + FULL_LAYERS * per_layer, 0),
            "s_per_tile_45_layers": round((fixed + FULL_LAYERS * per_layer) / 1000, 1),
            "layer_gflops_per_s": round(lf / (per_layer / 1000) / 1e9, 1) if per_layer > 0 else None,
            "cpu_s_per_layer": round((cb - ca) / (d2 - d1), 2) if ca is not None and cb is not None else None,
        }
        if ca is not None and cb is not None and cb > ca:
            cpu_layer = (cb - ca) / (d2 - d1)
            cpu_fixed = ca - d1 * cpu_layer
            out[name]["unloaded_s_per_tile_45_layers"] = round(
                (cpu_fixed + FULL_LAYERS * cpu_layer) / threads, 1
            )
            out[name]["unloaded_gflops_per_s"] = round(lf / (cpu_layer / threads) / 1e9, 1)
    return {"layer_flops": lf, "depths": [d1, d2], "backends": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (~3 GB free)")
    ap.add_argument("--replica", type=Path, default=None, help="replica checkpoint (default: untrained tiny)")
    ap.add_argument("--depths", type=int, nargs=2, default=[1, 2])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--replica-tiles", type=int, default=4)
    ap.add_argument("--skip-6b", action="store_true")
    ap.add_argument("--only", nargs="+", default=list(BACKENDS), choices=BACKENDS, metavar="BACKEND")
    ap.add_argument("--rescale", action="store_true", help="recompute `scaled` in the saved result only")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.results_io import RESULTS, write_result

    if a.rescale:
        doc = json.loads((RESULTS / "vision_cost.json").read_text())
        by_depth = {int(d): r for d, r in doc["vit6b"]["by_depth"].items()}
        doc["vit6b"]["scaled"] = scale(by_depth, *sorted(by_depth), doc["threads"])
        (RESULTS / "vision_cost.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(json.dumps(doc["vit6b"]["scaled"], indent=2))
        return

    torch.set_num_threads(a.threads)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    only = tuple(a.only)
    result: dict[str, Any] = {"threads": a.threads, "repeats": a.repeats}
    result["load_average_start"] = os.getloadavg()
    replica = a.replica
    if replica is None:
        from r1v_quant.replica.build import TinyOptions, build_tiny

        replica = work / "tiny"
        if not replica.is_dir():
            build_tiny(replica, TinyOptions(steps=0))
    cfg = json.loads((replica / "config.json").read_text())["vision_config"]
    print(f"replica ({cfg['hidden_size']} x {cfg['num_hidden_layers']}), {a.replica_tiles} tiles", flush=True)
    result["replica"] = {
        "vit": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "norm_type")},
        "tiles": a.replica_tiles,
        "rows": measure(
            {"replica": replica},
            work,
            n_tiles=a.replica_tiles,
            repeats=max(a.repeats, 3),
            threads=a.threads,
            only=only,
        )["replica"],  # fmt: skip
    }
    if not a.skip_6b:
        d1, d2 = a.depths
        models = {}
        for d in (d1, d2):
            models[f"depth{d}"] = work / f"vit6b-{d}"
            if not (models[f"depth{d}"] / "config.json").is_file():
                print(f"writing the 6B-shaped tower at depth {d}", flush=True)
                write_6b(models[f"depth{d}"], d)
        print(f"6B-shaped tower at depths {d1} and {d2}, 1 tile, interleaved", flush=True)
        rows = measure(models, work, n_tiles=1, repeats=a.repeats, threads=a.threads, only=only)
        per_depth = {d: rows[f"depth{d}"] for d in (d1, d2)}
        for m in models.values():
            shutil.rmtree(m, ignore_errors=True)
        result["vit6b"] = {
            "vit": {k: v for k, v in config_6b(d1)["vision_config"].items() if k != "num_hidden_layers"},
            "by_depth": {str(d): r for d, r in per_depth.items()},
            "scaled": scale(per_depth, d1, d2, a.threads),
        }
    result["load_average_end"] = os.getloadavg()
    path = write_result("vision_cost", result)
    print(f"wrote {path}")
    if "vit6b" in result:
        print(
            f"{'backend':<20}{'ms/layer':>10}{'fixed ms':>10}{'s/tile@45':>11}{'GFLOP/s':>10}{'unloaded':>10}"
        )
        for name, r in result["vit6b"]["scaled"]["backends"].items():
            print(f"{name:<20}{r['per_layer_ms']:>10}{r['fixed_ms']:>10}{r['s_per_tile_45_layers']:>12}"
                  f"{r['layer_gflops_per_s'] or 0:>10}{r.get('unloaded_gflops_per_s') or 0:>10}")  # fmt: skip


if __name__ == "__main__":
    main()
