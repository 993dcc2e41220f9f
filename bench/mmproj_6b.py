"""InternViT-6B mmproj in llama.cpp, checked numerically at full size (opt-in: ~12 GB of disk per copy).

llama.cpp switches its InternVL vision graph to RMSNorm only for a tower exactly 3200 wide and 45 layers deep,
so the replica (128 wide) never runs that path. This bench writes a 3200 x 45 RMSNorm + q/k-norm tower with
random weights (InternViT-6B's shapes, streamed to disk in bf16, one tensor at a time), exports the mmproj as
F16 and Q8_0, and compares libmtmd's image embeddings for one 448 x 448 tile with the torch reference (run
layer by layer from the checkpoint, fp32): per-token cosine, wall time and peak RSS of every step. Each
step runs in its own process, so its peak RSS (VmHWM) is its own.

    python bench/mmproj_6b.py --work /big/disk/dir [--keep] [--threads 2]
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

from r1v_quant.model.presets import VISION_6B

VISION = {k: v for k, v in VISION_6B.items() if k != "use_flash_attn"}  # the released 6B tower


SMALL = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2}


def config() -> dict[str, Any]:
    """A checkpoint config with InternViT-6B + mlp1 at full size and a one-layer stand-in decoder (the
    mmproj reads only vision_model.* and mlp1.*; the decoder keeps the real width for mlp1's output)."""
    from r1v_quant.replica.build import tiny_config

    cfg = tiny_config("r1v", "rms", vocab_size=1024, bos=0, eos=1, llm_layers=1)
    cfg["vision_config"] = dict(VISION, **(SMALL if os.environ.get("R1V_BENCH_SMALL") else {}))
    cfg["llm_config"].update(
        hidden_size=5120, intermediate_size=256, num_attention_heads=40, num_key_value_heads=8
    )
    cfg["hidden_size"] = 5120
    cfg["max_dynamic_patch"] = 1
    return cfg


def _tensor(name: str, shape: tuple[int, ...], g: Any) -> Any:
    import torch

    if name.endswith(("ls1", "ls2")):
        return torch.full(shape, 0.1)  # InternViT's initializer_factor
    if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "norm.weight")):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if name == "mlp1.0.weight":
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if name.endswith("position_embedding") or name.endswith("class_embedding"):
        return 0.5 * torch.randn(shape, generator=g)
    fan_in = shape[-1] if len(shape) == 2 else int(torch.tensor(shape[1:]).prod())
    return torch.randn(shape, generator=g) / fan_in**0.5


def write_random_checkpoint(out: Path, cfg: dict[str, Any]) -> Path:
    """Random weights for `cfg`, streamed: one tensor in memory at a time (bf16 on disk), 2 GB shards."""
    import torch

    from r1v_quant.model.checkpoint import ShardedWriter
    from r1v_quant.model.spec import parse_config

    spec = parse_config(cfg, flavor="r1v")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    writer = ShardedWriter(out, max_shard_bytes=2 * 1024**3)
    g = torch.Generator().manual_seed(0)
    for name, shape in spec.tensor_shapes().items():
        writer.add(name, _tensor(name, tuple(shape), g).to(torch.bfloat16))
    writer.close()
    return out


def step_write(out: Path) -> dict[str, Any]:
    """The random checkpoint (config()), streamed."""
    write_random_checkpoint(out, config())
    return {"bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def step_export(model: Path, out: Path, mmproj_type: str) -> dict[str, Any]:
    from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf

    report = export_mmproj_gguf(model, out, mmproj_type, position_fix="auto")
    return {k: report[k] for k in ("bytes", "tensors", "position_fix", "f16_fallback")}


def _tile() -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # a smooth random picture (a real photo's statistics are closer to this than to white noise)
    small = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((448, 448), Image.Resampling.BICUBIC)


def step_reference(model: Path, out: Path) -> dict[str, Any]:
    """The torch reference, layer by layer from the shards (fp32): never more than one layer resident."""
    import numpy as np
    import torch

    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.preprocess import to_tensor
    from r1v_quant.model.vision import Projector, VisionEmbeddings, VisionLayer, pixel_shuffle

    ckpt = open_checkpoint(model)
    spec = ckpt.spec
    v = spec.vision
    pixels = torch.from_numpy(to_tensor(_tile()))[None]
    with torch.no_grad():
        with torch.device("meta"):
            emb = VisionEmbeddings(v)
        emb_state = ckpt.with_prefix("vision_model.embeddings")
        emb.load_state_dict({k: t.float() for k, t in emb_state.items()}, assign=True)
        x = emb(pixels)
        for i in range(v.num_layers):
            with torch.device("meta"):
                layer = VisionLayer(v)
            layer.load_state_dict({k: t.float() for k, t in ckpt.layer(i, vision=True).items()}, assign=True)
            x = layer(x)
            del layer
        x = x[:, 1:, :]
        n, t, c = x.shape
        side = int(t**0.5)
        x = pixel_shuffle(x.reshape(n, side, side, c), spec.downsample_ratio, spec.ps_version)
        x = x.reshape(n, -1, x.shape[-1])
        with torch.device("meta"):
            mlp1 = Projector(spec.projector_in, spec.llm.hidden_size)
        mlp1.load_state_dict({k: t.float() for k, t in ckpt.with_prefix("mlp1").items()}, assign=True)
        y = mlp1(x)[0].numpy()
    np.save(out, y)
    return {"tokens": int(y.shape[0]), "rms": float(np.sqrt((y.astype(np.float64) ** 2).mean()))}


def step_mtmd(mmproj: Path, out: Path, threads: int) -> dict[str, Any]:
    import numpy as np

    from r1v_quant.runtime.mtmd import MtmdVision

    t0 = time.perf_counter()
    with MtmdVision(mmproj, n_threads=threads) as mv:
        loaded = time.perf_counter() - t0
        t1 = time.perf_counter()
        y = mv.encode_tile(_tile())
        encode = time.perf_counter() - t1
    np.save(out, y)
    return {"load_seconds": round(loaded, 2), "encode_seconds": round(encode, 2)}


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_step(args: list[str]) -> dict[str, Any]:
    """One step in a fresh process: its result, wall seconds and peak RSS."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"step {args} failed:\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_gb"] = round(out.pop("peak_rss") / 1e9, 2)
    print(args[0], out, flush=True)
    return out


def cosines(a: Path, b: Path) -> dict[str, float]:
    import numpy as np

    from r1v_quant.runtime.mtmd import cosine_rows

    cos = cosine_rows(np.load(a), np.load(b))
    return {"min": float(cos.min()), "median": float(np.median(cos)), "mean": float(cos.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder on a disk with ~30 GB free (required)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and mmproj files")
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:
        name, *rest = a.step
        if name == "write":
            res = step_write(Path(rest[0]))
        elif name == "export":
            res = step_export(Path(rest[0]), Path(rest[1]), rest[2])
        elif name == "reference":
            res = step_reference(Path(rest[0]), Path(rest[1]))
        else:
            res = step_mtmd(Path(rest[0]), Path(rest[1]), int(rest[2]))
        print(json.dumps({**res, "peak_rss": _vmhwm()}))
        return

    from bench.results_io import write_result

    if a.work is None:
        ap.error("--work is required")
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    model = work / "internvit6b-random"
    steps: dict[str, Any] = {}
    try:
        if not (model / "model.safetensors.index.json").is_file():
            shutil.rmtree(model, ignore_errors=True)
            steps["write_checkpoint"] = run_step(["write", str(model)])
        steps["reference"] = run_step(["reference", str(model), str(work / "ref.npy")])
        result: dict[str, Any] = {"config": VISION, "threads": a.threads, "steps": steps, "cosine": {}}
        for t in ("F16", "Q8_0"):
            mmproj = work / f"mmproj-6b-{t}.gguf"
            mmproj.unlink(missing_ok=True)
            steps[f"export_{t}"] = run_step(["export", str(model), str(mmproj), t])
            steps[f"mtmd_{t}"] = run_step(["mtmd", str(mmproj), str(work / f"mtmd-{t}.npy"), str(a.threads)])
            result["cosine"][t] = cosines(work / f"mtmd-{t}.npy", work / "ref.npy")
            print(t, result["cosine"][t], flush=True)
            if not a.keep:
                mmproj.unlink()
        path = write_result("mmproj_6b", result)
        print(f"wrote {path}")
    finally:
        if not a.keep:
            shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
