"""CPU latency per tile of the image path: torch fp32 vs onnxruntime fp32 / int8 vs llama.cpp mmproj.

    .venv/bin/python bench/onnx_vision_bench.py [MODEL] [--tiles 4] [--repeats 5] [--threads 0]
                                                [--vit-width 384 --vit-layers 6] [--no-mmproj] [--json]

Without MODEL an untrained tiny replica is built (its vision tower is untrained in every replica anyway).
`--vit-width/--vit-layers` rebuild that replica's vision tower at another size with random weights, since
the 128-wide tiny tower measures per-op overhead more than matrix throughput. Each backend encodes the
same `--tiles` tiles `--repeats` times after one warm-up; the table shows the median ms per tile, its
ratio to torch and the worst per-token cosine against torch. The llama.cpp columns need llama-cpp-python
(libmtmd) and exporters/gguf_mmproj.export_mmproj_gguf; they are left out when either is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _tiny(out: Path) -> Path:
    from r1v_quant.replica.build import TinyOptions, build_tiny

    build_tiny(out, TinyOptions(steps=0))
    return out


def _resize_vit(src: Path, out: Path, width: int, layers: int) -> Path:
    """Copy `src` with its vision tower replaced by a random one of the given width / depth."""
    from safetensors.torch import save_file

    from r1v_quant.model.reference import R1VModel
    from r1v_quant.model.spec import load_spec

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    cfg = json.loads((out / "config.json").read_text())
    heads = max(1, width // 64)
    cfg["vision_config"].update(
        hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, num_hidden_layers=layers
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(0)
    model = R1VModel(load_spec(out))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1", "ls2")):
                p.fill_(0.1)  # InternViT's layer-scale init: keeps a random deep tower numerically sane
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return out


def _time(fn: Callable[[], np.ndarray], repeats: int) -> tuple[list[float], np.ndarray]:
    out = fn()  # warm-up: session initialisation, allocator, caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def _mmproj_backends(model: Path, tmp: Path, threads: int, tiles_pil: list) -> dict[str, Callable]:
    try:
        from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf
        from r1v_quant.runtime.mtmd import MtmdVision, import_mtmd

        import_mtmd()
    except Exception as e:  # missing module, missing llama-cpp-python, or its shared library
        print(f"(llama.cpp mmproj columns left out: {e})")
        return {}
    out: dict[str, Callable] = {}
    for gtype in ("F16", "Q8_0"):
        path = tmp / f"mmproj-{gtype}.gguf"
        export_mmproj_gguf(model, path, gtype)
        vision = MtmdVision(path, n_threads=threads)
        out[f"llama.cpp mmproj {gtype}"] = lambda v=vision: v.encode_tiles(tiles_pil)
    return out


def run(model: Path, tmp: Path, tiles: int, repeats: int, threads: int, mmproj: bool) -> dict[str, Any]:
    from PIL import Image

    from r1v_quant.exporters.onnx_vision import compare, export_onnx, load_vision
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.preprocess import to_tensor
    from r1v_quant.runtime.onnx import OnnxVisionEncoder

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    tiles_pil = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(tiles)]
    pixels = np.stack([to_tensor(t) for t in tiles_pil])

    ckpt = open_checkpoint(model)
    graph = load_vision(ckpt)
    backends: dict[str, Callable[[], np.ndarray]] = {}

    def torch_fp32() -> np.ndarray:
        with torch.no_grad():
            return graph(torch.from_numpy(pixels)).numpy()

    backends["torch fp32"] = torch_fp32
    export_s = {}
    for name, kw in (("fp32", {}), ("int8", {"int8": True})):
        rep = export_onnx(model, tmp / f"onnx-{name}", verify=False, **kw)
        export_s[name] = rep["seconds"]["total"]
        enc = OnnxVisionEncoder(tmp / f"onnx-{name}", provider="cpu", threads=threads)
        backends[f"onnxruntime {name}"] = lambda e=enc: e.encode(pixels)
    if mmproj:
        backends.update(_mmproj_backends(model, tmp, threads, tiles_pil))

    rows = []
    ref = None
    for name, fn in backends.items():
        times, out = _time(fn, repeats)
        if ref is None:
            ref = out
        ms = statistics.median(times) * 1000 / tiles
        rows.append({"backend": name, "ms_per_tile": ms, "times_s": times, **compare(ref, out)})
    base = rows[0]["ms_per_tile"]
    for r in rows:
        r["ratio_vs_torch"] = r["ms_per_tile"] / base
    spec = ckpt.spec
    return {
        "model": str(model),
        "vit": {
            "hidden": spec.vision.hidden_size,
            "layers": spec.vision.num_layers,
            "norm": spec.vision.norm_type,
        },
        "tiles": tiles,
        "repeats": repeats,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "export_seconds": export_s,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=0, help="0: all cores (torch, onnxruntime, llama.cpp alike)"
    )
    ap.add_argument("--vit-width", type=int, default=0, help="rebuild the ViT at this width (random weights)")
    ap.add_argument("--vit-layers", type=int, default=4)
    ap.add_argument("--no-mmproj", action="store_true", help="skip the llama.cpp columns")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as t:
        tmp = Path(t)
        model = args.model or _tiny(tmp / "tiny")
        if args.vit_width:
            model = _resize_vit(
                model, tmp / f"vit{args.vit_width}x{args.vit_layers}", args.vit_width, args.vit_layers
            )
        res = run(model, tmp, args.tiles, args.repeats, args.threads, not args.no_mmproj)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    v = res["vit"]
    print(
        f"ViT {v['hidden']} x {v['layers']} ({v['norm']}), {res['tiles']} tiles x {res['repeats']} repeats, "
        f"{res['threads']} threads, load average {res['load_average'][0]:.1f} on {res['cpu_count']} cores"
    )
    print(f"{'backend':<26}{'ms/tile (median)':>18}{'vs torch':>10}{'min cosine':>12}{'max |diff|':>12}")
    for r in res["rows"]:
        print(
            f"{r['backend']:<26}{r['ms_per_tile']:>18.1f}{r['ratio_vs_torch']:>9.2f}x"
            f"{r['cosine_min']:>12.5f}{r['max_abs_diff']:>12.2e}"
        )


if __name__ == "__main__":
    main()
