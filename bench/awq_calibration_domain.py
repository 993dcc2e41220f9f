"""Does the calibration data matter? AWQ calibrated on plain text (what Skywork's own release did: LMDeploy
on a text corpus) versus r1v-quant's multimodal long chain-of-thought set, side by side in one run.

Every variant quantizes the same 16-bit checkpoint with the same search, sample count and length; only the
calibration set differs. Each is scored by per-token KL divergence against the 16-bit model on held-out
windows (r1v_quant.data.evalset): text problems with worked reasoning, and answers to questions about
pictures.
Round-to-nearest is the floor every AWQ variant should beat. The text corpus is a plain-text
file (--text-calib; the published results used WikiText-2's validation split as raw text, not shipped
with r1v-quant).

    python bench/awq_calibration_domain.py --text-calib FILE [--model DIR] [--samples 16] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from replica_scoring import KINDS, kld_by_kind, model_or_tiny, reference
from results_io import write_result

from r1v_quant.calibration import prepare
from r1v_quant.data.evalset import window_logits
from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq
from r1v_quant.model.reference import R1VModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="16-bit checkpoint (default: the tiny replica)")
    ap.add_argument("--text-calib", type=Path, required=True, help="plain-text calibration corpus")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration subsample seeds")
    ap.add_argument("--eval", type=int, default=16, help="held-out windows per kind")
    ap.add_argument(
        "--no-match-tokens",
        dest="match_tokens",
        action="store_false",
        help="give the text set --samples chunks (by default: as many tokens as the multimodal set)",
    )
    args = ap.parse_args()
    if not args.text_calib.is_file():
        raise SystemExit(
            f"{args.text_calib}: not found (pass a plain-text file, e.g. WikiText-2's validation text)"
        )
    sources = {
        "multimodal CoT (default)": "default",
        f"plain text ({args.text_calib.stem[:16]})": str(args.text_calib),
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = model_or_tiny(args.model, tmp)
        _, windows, ref = reference(model_dir, args.eval)

        def score(out: Path) -> dict[str, float]:
            klds = kld_by_kind(ref, window_logits(R1VModel.from_checkpoint(out), windows), windows)
            return {k: klds[k]["kld_mean"] for k in KINDS}

        # the language model alone: the tower is bench/awq_vision.py's subject (and plain text has no tiles)
        base = AWQOptions(samples=args.samples, seq_len=args.seq_len, vision="16bit")
        quantize_awq(model_dir, tmp / "rtn", replace(base, method="rtn"), progress=False)
        rtn = score(tmp / "rtn")
        rows: dict[str, list[dict[str, float]]] = {}

        def run(label: str, calib: str, samples: int, seed: int) -> int:
            """Quantize with this calibration, score it, return its token count."""
            prep = prepare(model_dir, calib, samples, args.seq_len, seed=seed, progress=False)
            tokens = sum(r.length for r in prep.rendered)
            out = tmp / f"{label[:5]}-{seed}"
            opts = replace(base, calib=calib, seed=seed, samples=samples)
            quantize_awq(model_dir, out, opts, progress=False)
            rows.setdefault(label, []).append({**score(out), "tokens": tokens})
            print(f"done {label}, seed {seed}: {rows[label][-1]}", flush=True)
            return tokens

        (mm_label, mm_calib), (tx_label, tx_calib) = sources.items()
        per_text_sample = sum(r.length for r in prepare(model_dir, tx_calib, 4, args.seq_len).rendered) / 4
        for seed in args.seeds:
            t = run(mm_label, mm_calib, args.samples, seed)
            # the same number of calibration tokens: text chunks are ~seq_len long, multimodal samples vary
            run(
                tx_label,
                tx_calib,
                max(1, round(t / per_text_sample)) if args.match_tokens else args.samples,
                seed,
            )
    n_tok = {k: sum(int(w.score.sum()) for w in windows if w.kind == k) for k in KINDS}
    print(
        f"\nKLD vs the 16-bit model, mean over seeds {args.seeds}; {args.samples} calibration samples x up "
        f"to {args.seq_len} tokens; {args.eval} text + {args.eval} image-answer windows ({n_tok})"
    )
    print(
        f"{'calibration':34}{'tokens':>8}{'KLD text':>11}{'KLD image':>11}{'/RTN text':>11}{'/RTN image':>11}"
    )
    rtn_row = f"{rtn['text']:>11.3e}{rtn['image']:>11.3e}{1:>11.3f}{1:>11.3f}"
    print(f"{'round-to-nearest (no calibration)':34}{'':>8}{rtn_row}")
    means = {}
    for label, runs in rows.items():
        m = {k: statistics.mean(r[k] for r in runs) for k in (*KINDS, "tokens")}
        means[label] = m
        kld = f"{m['text']:>11.3e}{m['image']:>11.3e}"
        ratio = f"{m['text'] / rtn['text']:>11.3f}{m['image'] / rtn['image']:>11.3f}"
        print(f"{label:34}{m['tokens']:>8.0f}{kld}{ratio}")
    (mm, tx) = means.values()
    print(
        f"\nplain-text calibration / multimodal CoT calibration: KLD x{tx['text'] / mm['text']:.2f} on text "
        f"answers, x{tx['image'] / mm['image']:.2f} on image answers"
    )
    path = write_result(
        "awq_calibration_domain",
        {
            "model": str(args.model) if args.model else "tiny replica (built by the bench)",
            "text_calib": args.text_calib.name,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seeds": args.seeds,
            "rtn": rtn,
            "runs": rows,
            "means": means,
            "text_over_multimodal": {k: tx[k] / mm[k] for k in KINDS},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
