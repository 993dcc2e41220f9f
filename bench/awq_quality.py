"""AWQ quality and cost, measured side by side in one run on the same model and calibration data.

Variants: round-to-nearest (same packing; it uses no calibration data), and AWQ with each token-weighting
mode (--modes, default uniform / text / auto) for each calibration subsample seed (--seeds); and, when
AutoAWQ 0.2.9 is importable (--peer), AutoAWQ on the same language-model weights with the first seed's
calibration samples as text (it cannot see images). Every output is loaded back and scored by end-to-end
KL divergence against the 16-bit model on held-out text problems and on answers to image questions
(r1v_quant.data.evalset). Wall and CPU time (all threads) of ours (default options, first seed) and AutoAWQ
come from the same process. Targets (issue #4): AWQ <= 0.5x RTN; ours <= AutoAWQ in KLD and <= 0.5x its
wall time.

    python bench/awq_quality.py [--model DIR] [--samples 16] [--seq-len 1024] [--seeds 0 1] [--peer]

AutoAWQ as the peer: `pip install --no-deps autoawq==0.2.9 && pip install datasets zstandard` (bench only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from replica_scoring import kld_by_kind, model_or_tiny, reference
from results_io import write_result

from r1v_quant.data.evalset import window_logits
from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq
from r1v_quant.model.checkpoint import open_checkpoint
from r1v_quant.model.reference import R1VModel


def score(model: R1VModel, ref_logits: list[torch.Tensor], windows) -> dict[str, dict]:
    return kld_by_kind(ref_logits, window_logits(model, windows), windows)


class Clock:
    """Wall and process CPU seconds (all threads) of a block."""

    def __enter__(self) -> Clock:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


def run_ours(model_dir: Path, tmp: Path, name: str, opts: AWQOptions) -> tuple[R1VModel, Clock]:
    with Clock() as clock:
        quantize_awq(model_dir, tmp / name, opts, progress=False)
    return R1VModel.from_checkpoint(tmp / name), clock


def run_autoawq(model_dir: Path, tmp: Path, opts: AWQOptions) -> tuple[R1VModel, Clock] | None:
    """AutoAWQ on the language model alone (exported as a plain Qwen2 checkpoint), same calibration text."""
    try:
        import awq  # noqa: F401
        from awq import AutoAWQForCausalLM
        from transformers import AutoTokenizer
    except Exception as e:  # not installed, or broken against this transformers
        print(f"AutoAWQ peer skipped: {e}")
        return None
    from safetensors.torch import save_file

    from r1v_quant.calibration import prepare
    from r1v_quant.model.tokenizer import R1VTokenizer

    ckpt = open_checkpoint(model_dir)
    hf = tmp / "peer-src"
    hf.mkdir(parents=True)
    # with_prefix strips "language_model.", leaving HF Qwen2 names (model.layers.N..., lm_head.weight)
    state = {k: v.float().contiguous() for k, v in ckpt.with_prefix("language_model").items()}
    save_file(state, str(hf / "model.safetensors"))
    cfg = json.loads((model_dir / "config.json").read_text())["llm_config"]
    cfg.update(torch_dtype="float32", architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (hf / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (model_dir / f).exists():
            (hf / f).write_bytes((model_dir / f).read_bytes())
    prep = prepare(model_dir, opts.calib, opts.samples, opts.seq_len, seed=opts.seed, progress=False)
    tok = R1VTokenizer.from_dir(model_dir)
    ctx = ckpt.spec.tokens.img_context
    texts = [tok.decode([t for t in r.input_ids.tolist() if t != ctx]) for r in prep.rendered]
    with Clock() as clock:
        model = AutoAWQForCausalLM.from_pretrained(str(hf), device_map={"": "cpu"}, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(hf))
        model.quantize(
            tokenizer,
            quant_config={"zero_point": True, "q_group_size": opts.group_size, "w_bit": 4, "version": "GEMM"},
            calib_data=texts,
            max_calib_samples=len(texts),
            max_calib_seq_len=min(512, opts.seq_len),
        )
    peer_out = tmp / "peer-out"
    model.save_quantized(str(peer_out))
    from safetensors.torch import load_file

    from r1v_quant.model.awq_layout import dequantize_awq

    peer = {}
    for f in peer_out.glob("*.safetensors"):
        peer.update(load_file(str(f)))
    ours = R1VModel.from_checkpoint(model_dir)
    with torch.no_grad():
        for i, layer in enumerate(ours.language_model.model.layers):
            p = f"model.layers.{i}."
            for name, mod in layer.named_modules():
                if f"{p}{name}.qweight" in peer:
                    mod.weight.copy_(
                        dequantize_awq(
                            peer[f"{p}{name}.qweight"], peer[f"{p}{name}.qzeros"], peer[f"{p}{name}.scales"]
                        )
                    )
            for name, param in layer.named_parameters():
                if not name.endswith("_proj.weight") and f"{p}{name}" in peer:
                    param.copy_(peer[f"{p}{name}"].float())
    return ours, clock


def independent_check(out_dir: Path) -> str:
    """Unpack our qweight/qzeros with AutoAWQ's own code and compare integers (exact) and weights."""
    try:
        from awq.utils.packing_utils import reverse_awq_order, unpack_awq
    except Exception as e:
        return f"skipped ({e})"
    from r1v_quant.model.awq_layout import unpack_awq as ours_unpack

    ckpt = open_checkpoint(out_dir)
    n_lin, mismatched = 0, 0
    for name in ckpt.names():
        if not name.endswith(".qweight"):
            continue
        base = name[: -len(".qweight")]
        qw, qz, sc = ckpt.get(name), ckpt.get(f"{base}.qzeros"), ckpt.get(f"{base}.scales")
        iw, iz = reverse_awq_order(*unpack_awq(qw, qz, 4), 4)
        mine = ours_unpack(qw, qz, sc)
        same = torch.equal(iw & 0xF, mine.q.T.long()) and torch.equal(iz & 0xF, mine.zeros.T.long())
        n_lin += 1
        mismatched += not same
    return f"{n_lin - mismatched}/{n_lin} linears unpack to identical integers with AutoAWQ's unpack_awq"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", type=Path, default=None, help="16-bit checkpoint (default: build the tiny replica)"
    )
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--eval", type=int, default=16, help="held-out windows per kind")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration subsample seeds")
    ap.add_argument("--modes", nargs="+", default=["uniform", "text", "auto"], help="--modality-weights")
    ap.add_argument("--peer", action="store_true", help="also run AutoAWQ (if importable)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--timing-only", action="store_true", help="skip the quality variants: time ours and AutoAWQ only"
    )
    ap.add_argument(
        "--timing-rounds",
        type=int,
        default=3,
        help="ours (default options) and AutoAWQ timed this many times, alternating; the minimum counts",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    default_mode = AWQOptions().modality_weights
    modes = [default_mode] + [m for m in args.modes if m != default_mode]
    if args.timing_only:
        args.peer, args.seeds, modes = True, args.seeds[:1], [default_mode]
    rows: dict[str, tuple[Clock, dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = model_or_tiny(args.model, tmp)
        ref, windows, ref_logits = reference(model_dir, args.eval)
        # the language model alone, as AutoAWQ sees it (the tower is bench/awq_vision.py's subject)
        base = AWQOptions(samples=args.samples, seq_len=args.seq_len, seed=args.seeds[0], vision="16bit")
        variants = {"rtn": replace(base, method="rtn")}
        for seed in args.seeds:
            for mode in modes:
                variants[f"awq {mode} seed {seed}"] = replace(base, seed=seed, modality_weights=mode)
        first = f"awq {default_mode} seed {args.seeds[0]}"
        check = "not run"
        for i, (name, opts) in enumerate(variants.items()):
            model, clock = run_ours(model_dir, tmp, f"v{i}", opts)
            rows[name] = (clock, score(model, ref_logits, windows))
            if name == first:
                check = independent_check(tmp / f"v{i}")
        timing: dict[str, list[Clock]] = {"ours": [rows[first][0]], "peer": []}
        if args.peer:
            peer = run_autoawq(model_dir, tmp / "peer0", base)
            if peer is not None:
                rows["AutoAWQ 0.2.9 (text calib)"] = (peer[1], score(peer[0], ref_logits, windows))
                timing["peer"].append(peer[1])
                # other work on the machine inflates single timings: alternate the two, keep each minimum
                for r in range(1, args.timing_rounds):
                    timing["ours"].append(run_ours(model_dir, tmp, f"t{r}", variants[first])[1])
                    timing["peer"].append(run_autoawq(model_dir, tmp / f"peer{r}", base)[1])  # type: ignore[index]
    rtn = rows["rtn"][1]

    def vs_rtn(s: dict, kind: str) -> float:
        return s[kind]["kld_mean"] / rtn[kind]["kld_mean"]

    print(
        f"\n{'variant':<28}{'wall s':>8}{'cpu s':>8}{'KLD text':>11}{'KLD image':>11}{'top1 txt%':>10}"
        f"{'top1 img%':>10}{'vs RTN txt':>11}{'vs RTN img':>11}"
    )
    for name, (clock, s) in rows.items():
        print(
            f"{name:<28}{clock.wall:>8.1f}{clock.cpu:>8.1f}{s['text']['kld_mean']:>11.5f}"
            f"{s['image']['kld_mean']:>11.5f}{s['text']['same_top_pct']:>10.1f}{s['image']['same_top_pct']:>10.1f}"
            f"{vs_rtn(s, 'text'):>11.3f}{vs_rtn(s, 'image'):>11.3f}"
        )
    print(f"\nindependent format check: {check}")
    print(f"\nKLD / RTN per weighting mode, mean over seeds {args.seeds} (text, image, both):")
    for mode in modes:
        got = [rows[f"awq {mode} seed {seed}"][1] for seed in args.seeds]
        t = statistics.fmean(vs_rtn(s, "text") for s in got)
        i = statistics.fmean(vs_rtn(s, "image") for s in got)
        tag = " (default)" if mode == default_mode else ""
        print(f"  {mode + tag:<18}{t:>8.3f}{i:>8.3f}{(t + i) / 2:>8.3f}")
    auto = rows[first]
    both = statistics.fmean([vs_rtn(auto[1], k) for k in ("text", "image")])
    print(f"\nAWQ (default) / RTN mean KLD: {both:.3f} (target <= 0.5) {'PASS' if both <= 0.5 else 'FAIL'}")
    if "AutoAWQ 0.2.9 (text calib)" in rows:
        peer = rows["AutoAWQ 0.2.9 (text calib)"]
        kr = statistics.fmean([auto[1][k]["kld_mean"] / peer[1][k]["kld_mean"] for k in ("text", "image")])
        ours_t, peer_t = timing["ours"], timing["peer"]
        wall = min(c.wall for c in ours_t) / min(c.wall for c in peer_t)
        cpu = min(c.cpu for c in ours_t) / min(c.cpu for c in peer_t)
        print(
            f"ours / AutoAWQ: KLD {kr:.3f} (target <= 1.0); minimum of {len(peer_t)} alternating runs each: "
            f"wall time {wall:.3f} (target <= 0.5), CPU time {cpu:.3f}"
        )
        print("  ours wall/cpu s: " + ", ".join(f"{c.wall:.1f}/{c.cpu:.1f}" for c in ours_t))
        print("  AutoAWQ wall/cpu s: " + ", ".join(f"{c.wall:.1f}/{c.cpu:.1f}" for c in peer_t))
    path = write_result(
        "awq_quality",
        {
            "model": str(args.model) if args.model else "tiny replica (built by the bench)",
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seeds": args.seeds,
            "rows": {
                name: {"wall_s": round(c.wall, 2), "cpu_s": round(c.cpu, 2), **sc}
                for name, (c, sc) in rows.items()
            },
            "independent_check": check,
            "default_vs_rtn_mean_kld": round(both, 4),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
