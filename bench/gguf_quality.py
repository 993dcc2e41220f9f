"""GGUF quality in llama.cpp: plain vs importance matrix vs activation-aware, side by side in one run.

Every variant is exported by `r1v-quant gguf` from the same 16-bit checkpoint, loaded by llama.cpp
(r1v_quant.runtime.llamacpp) and scored by per-token KL divergence against the 16-bit torch reference on
held-out windows (r1v_quant.data.evalset): text problems, and answers to questions about rendered pictures.
Image windows feed the torch vision tower's embeddings (the same for every variant) into llama.cpp at the
<IMG_CONTEXT> positions, so they measure the quantized language model reading an image, not the mmproj.

Variants per type: plain (no calibration), imatrix (calibration mean x² as llama.cpp's importance
matrix, what `llama-imatrix` + `llama-quantize --imatrix` would do with these statistics) and aware
(`--activation-aware`: scales folded in, imatrix in the folded basis), the last two once per
`--modality-weights` mode in --modes (variant names get the mode appended when more than one is asked
for, e.g. `aware/balanced`). "F16" is llama.cpp's 16-bit floor.

    python bench/gguf_quality.py [--model DIR] [--types Q4_K_M,Q4_0,Q8_0] [--modes auto,balanced]
                                 [--samples 32] [--eval 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from replica_scoring import KINDS, kld_by_kind, model_or_tiny, reference
from results_io import write_result

from r1v_quant.calibration.pipeline import calibrate
from r1v_quant.data.evalset import Window
from r1v_quant.exporters.gguf_aware import MODALITY_MODES
from r1v_quant.exporters.gguf_llm import export_llm_gguf
from r1v_quant.runtime.llamacpp import LlamaCppRuntime


def llama_window_logits(
    path: Path, windows: list[Window], embeds: list[np.ndarray | None], threads: int
) -> list[torch.Tensor]:
    longest = max(len(w.input_ids) for w in windows)
    with LlamaCppRuntime(path, n_ctx=longest + 16, n_threads=threads) as rt:
        return [
            torch.from_numpy(rt.logits(w.input_ids.tolist(), e))[w.score]
            for w, e in zip(windows, embeds, strict=True)
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="16-bit checkpoint (default: the tiny replica)")
    ap.add_argument("--types", default="Q4_K_M,Q4_0,Q8_0")
    ap.add_argument(
        "--modes", default="auto", help=f"--modality-weights modes, of {','.join(MODALITY_MODES)}"
    )
    ap.add_argument("--samples", type=int, default=32, help="calibration samples (default set)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (default set)")
    ap.add_argument("--eval", type=int, default=16, help="held-out windows per kind")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODALITY_MODES):
        ap.error(f"--modes: expected some of {', '.join(MODALITY_MODES)}")
    rows: dict[tuple[str, str], tuple[float, int, dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = model_or_tiny(args.model, tmp)
        ref_model, windows, ref = reference(model_dir, args.eval)
        embeds = [
            None if w.pixel_values is None else ref_model.image_embeds(w.pixel_values).reshape(
                -1, ref_model.spec.llm.hidden_size
            ).numpy()
            for w in windows
        ]  # fmt: skip
        calib = tmp / "calib"
        calibrate(model_dir, "default", args.samples, args.seq_len, calib, seed=args.seed, progress=False)
        plan = [("F16", "16-bit", {})]
        for t in types:
            plan.append((t, "plain", {}))
            for kind, aware in (("imatrix", False), ("aware", True)):
                for m in modes:
                    name = kind if len(modes) == 1 else f"{kind}/{m}"
                    plan.append((t, name, {"calib": calib, "activation_aware": aware, "modality_weights": m}))
        for i, (t, variant, kw) in enumerate(plan):
            out = tmp / f"v{i}" / f"m-{t}.gguf"
            t0 = time.perf_counter()
            rep = export_llm_gguf(model_dir, out, t, progress=False, **kw)
            secs = time.perf_counter() - t0
            cand = llama_window_logits(out, windows, embeds, args.threads)
            rows[(t, variant)] = (secs, rep["bytes"], kld_by_kind(ref, cand, windows))
            print(f"done {t} {variant} ({secs:.1f} s)", flush=True)
    n_text = sum(1 for w in windows if w.kind == "text")
    print(
        f"\nKLD vs the 16-bit torch model; {n_text} text + {len(windows) - n_text} image windows, "
        f"{rows[('F16', '16-bit')][2]['text']['tokens']} + {rows[('F16', '16-bit')][2]['image']['tokens']} "
        "scored tokens; ratio = KLD / plain KLD of the same type"
    )
    head = (
        f"{'type':<8}{'variant':<17}{'MiB':>7}{'s':>6}{'KLD text':>11}{'p99 txt':>9}{'top1 txt%':>10}"
        f"{'KLD image':>11}{'p99 img':>9}{'top1 img%':>10}{'ratio txt':>10}{'ratio img':>10}"
    )
    print(head)
    for (t, variant), (secs, nbytes, s) in rows.items():
        plain = rows.get((t, "plain"))
        ratios = "".join(
            f"{s[k]['kld_mean'] / plain[2][k]['kld_mean']:>10.3f}" if plain else f"{'':>10}" for k in KINDS
        )
        print(
            f"{t:<8}{variant:<17}{nbytes / 2**20:>7.2f}{secs:>6.1f}"
            f"{s['text']['kld_mean']:>11.2e}{s['text']['kld_p99']:>9.4f}{s['text']['same_top_pct']:>10.1f}"
            f"{s['image']['kld_mean']:>11.2e}{s['image']['kld_p99']:>9.4f}{s['image']['same_top_pct']:>10.1f}"
            f"{ratios}"
        )
    path = write_result(
        "gguf_quality",
        {
            "model": str(args.model) if args.model else "tiny replica (built by the bench)",
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seed": args.seed,
            "rows": [
                {"type": t, "variant": v, "seconds": round(secs, 2), "bytes": nbytes, **s}
                for (t, v), (secs, nbytes, s) in rows.items()
            ],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
