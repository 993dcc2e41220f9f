"""Quantized vision tower: image quality of int4 / int8 InternViT (AWQ search and plain rounding) and of the
mmproj GGUF types, against the 16-bit tower, on one model (default: the trained tiny replica).

Tower-only variants keep the language model 16-bit, so every difference comes from the tower: its linears
are replaced by the searched (AWQ) or round-to-nearest (RTN) weights, at 4 bits (what `awq --vision int4`
packs) and 8 bits (measured here only: vLLM's AWQ kernels are 4-bit, docs/awq.md). End-to-end variants are
the real `awq` checkpoints, language model int4, with `--vision 16bit` and `--vision int4`. Per variant:
  - per-token cosine of the image embeddings (after mlp1) against the 16-bit tower, over the held-out
    image windows' tiles (r1v_quant.data.evalset);
  - KL divergence of the answer tokens after an image (and, end to end, of held-out text) vs 16-bit;
  - image-answer accuracy on the replica's held-out image questions and probe pictures (greedy, the
    build's own skill check, r1v_quant/replica/train.py).
The mmproj rows: libmtmd's embeddings of the same pictures (InternVL tiling) vs the torch 16-bit tower,
per mmproj type the exporter writes (F16, Q8_0, Q4_0).

    python bench/awq_vision.py [--model DIR] [--samples 8] [--seq-len 1024] [--eval 32]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from replica_scoring import kld_by_kind, model_or_tiny, reference
from results_io import write_result

from r1v_quant.calibration.pipeline import prepare
from r1v_quant.data.evalset import window_logits
from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq
from r1v_quant.exporters.awq_vision import embedding_agreement, search_vision, vision_config
from r1v_quant.model.reference import R1VModel
from r1v_quant.quant.awq_search import AWQConfig


def with_tower(ref: R1VModel, layers: dict[int, dict[str, torch.Tensor]]) -> R1VModel:
    """`ref` (16-bit) with the given ViT layer states; everything else rounded to fp16 as a checkpoint stores
    it, so the tower is the only difference from the fp16 reference row."""
    m = copy.deepcopy(ref)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.float16).float())
        for i, state in layers.items():
            m.vision_model.encoder.layers[i].load_state_dict(state)
    return m


def searched_tower(
    model_dir: Path, tmp: Path, bits: int, method: str, opts: AWQOptions, cfg: AWQConfig | None = None
) -> tuple[dict, dict]:
    prep = prepare(model_dir, opts.calib, opts.samples, opts.seq_len, seed=opts.seed, progress=False)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    report = search_vision(
        prep,
        None,
        cfg or vision_config(opts.group_size, bits),
        method,
        torch.device("cpu"),
        tmp / f"work-{bits}-{method}-{len(list(tmp.glob('work-*')))}",
        progress=True,
        on_layer=lambda i, m: layers.__setitem__(i, {k: v.clone() for k, v in m.state_dict().items()}),
    )
    return layers, report


def image_accuracy(model: R1VModel, model_dir: Path) -> dict:
    from r1v_quant.replica.train import Encoder, HeldOut

    held = HeldOut(Encoder(model_dir, model.spec.flavor, model.spec.num_image_token))
    hits = held._image_hits(model, held.images, held.pixels, held.image_seqs)
    probes = held._image_hits(model, held.probes, held.probe_pixels, held.probe_seqs)
    return {"heldout_pct": round(100 * sum(hits) / len(hits), 2), "heldout_n": len(hits),
            "probes_right": sum(probes), "probes_n": len(probes)}  # fmt: skip


def embeddings(model: R1VModel, windows) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.image_embeds(w.pixel_values) for w in windows if w.pixel_values is not None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="16-bit checkpoint (default: build the replica)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--eval", type=int, default=32, help="held-out windows per kind")
    ap.add_argument("--no-mmproj", action="store_true", help="skip the llama.cpp mmproj rows")
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="only the int4 towers: plain rounding, scales + clipping, scales only, clipping only",
    )
    args = ap.parse_args()
    rows: dict[str, dict] = {}
    searches: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = model_or_tiny(args.model, tmp)
        ref, windows, ref_logits = reference(model_dir, args.eval)
        img_windows = [w for w in windows if w.kind == "image"]
        e_ref = embeddings(ref, img_windows)
        opts = AWQOptions(samples=args.samples, seq_len=args.seq_len)

        def score(name: str, model: R1VModel, seconds: float | None = None) -> None:
            t = time.perf_counter()
            kld = kld_by_kind(ref_logits, window_logits(model, windows), windows)
            rows[name] = {
                "embedding_cosine": embedding_agreement(embeddings(model, img_windows), e_ref),
                "kld": {k: v["kld_mean"] for k, v in kld.items()},
                "same_top_pct": {k: v["same_top_pct"] for k, v in kld.items()},
                "image_accuracy": image_accuracy(model, model_dir),
                "build_seconds": seconds,
            }
            r = rows[name]
            print(
                f"{name:<34} 1-cos {r['embedding_cosine']['one_minus_mean']:.2e} "
                f"(min cos {r['embedding_cosine']['min']:.6f}) KLD img {r['kld']['image']:.2e} "
                f"txt {r['kld']['text']:.2e} acc {r['image_accuracy']['heldout_pct']}% "
                f"probes {r['image_accuracy']['probes_right']}/{r['image_accuracy']['probes_n']} "
                f"({time.perf_counter() - t:.0f} s)",
                flush=True,
            )

        score("16-bit tower (fp16)", with_tower(ref, {}))
        if args.ablation:
            variants = {
                "int4 rtn": ("rtn", None),
                "int4 awq, scales + clipping": ("awq", AWQConfig(group_size=opts.group_size)),
                "int4 awq, scales only (default)": ("awq", vision_config(opts.group_size)),
                "int4 awq, clipping only": ("awq", AWQConfig(group_size=opts.group_size, scaling=())),
            }
            for name, (method, cfg) in variants.items():
                t = time.perf_counter()
                layers, rep = searched_tower(model_dir, tmp, 4, method, opts, cfg)
                searches[name] = {k: v for k, v in rep.items() if k != "layers"}
                score(f"tower {name}, LLM 16-bit", with_tower(ref, layers), time.perf_counter() - t)
            path = write_result(
                "awq_vision_ablation",
                {"model": str(args.model) if args.model else "tiny replica (built by the bench)",
                 "samples": args.samples, "seq_len": args.seq_len, "eval_windows_per_kind": args.eval,
                 "rows": rows, "tower_searches": searches},
            )  # fmt: skip
            print(f"wrote {path}")
            return
        for bits in (8, 4):
            for method in ("rtn", "awq"):
                t = time.perf_counter()
                layers, rep = searched_tower(model_dir, tmp, bits, method, opts)
                searches[f"int{bits} {method}"] = {k: v for k, v in rep.items() if k != "layers"}
                score(
                    f"tower int{bits} {method}, LLM 16-bit", with_tower(ref, layers), time.perf_counter() - t
                )
        for vision in ("16bit", "int4"):
            t = time.perf_counter()
            out = tmp / f"ckpt-{vision}"
            report = quantize_awq(model_dir, out, AWQOptions(samples=args.samples, seq_len=args.seq_len,
                                                             vision=vision), progress=True)  # fmt: skip
            seconds = time.perf_counter() - t
            score(f"awq checkpoint, --vision {vision}", R1VModel.from_checkpoint(out), seconds)
            rows[f"awq checkpoint, --vision {vision}"]["report_vision"] = {
                k: v for k, v in report["vision"].items() if k != "layers"
            }
        mmproj: dict[str, dict] = {}
        if not args.no_mmproj:
            from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf
            from r1v_quant.runtime.mtmd import embedding_parity

            pictures = [im for w in img_windows for im in w.images]
            for typ in ("F16", "Q8_0", "Q4_0"):
                path = tmp / f"mmproj-{typ}.gguf"
                info = export_mmproj_gguf(model_dir, path, typ)
                par = embedding_parity(model_dir, path, pictures, n_threads=1)
                mmproj[typ] = {k: par[k] for k in ("min", "median", "mean") if k in par} | {
                    "bytes": info.get("bytes"),
                    "one_minus_mean": float(f"{1 - par['mean']:.3e}"),
                }
                print(f"mmproj {typ}: {mmproj[typ]}", flush=True)
    path = write_result(
        "awq_vision",
        {
            "model": str(args.model) if args.model else "tiny replica (built by the bench)",
            "samples": args.samples,
            "seq_len": args.seq_len,
            "eval_windows_per_kind": args.eval,
            "rows": rows,
            "tower_searches": searches,
            "mmproj": mmproj,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
