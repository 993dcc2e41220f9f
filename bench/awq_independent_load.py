"""Independent load check: r1v-quant's AWQ output, loaded by transformers + gptqmodel, gives our logits.

r1v-quant reads its own AWQ checkpoints by unpacking `qweight`/`qzeros`/`scales`
(r1v_quant/model/awq_layout.py).
An independent reader is the real proof that the packing is the AutoAWQ GEMM layout: here transformers'
AWQ path (which needs gptqmodel on CPU) loads the language model and must produce the same logits.

transformers cannot load the whole InternVLChatModel without executing the checkpoint's remote code
(which r1v-quant never does), so the check presents the language model the way transformers expects a
Qwen2 AWQ model: `llm_config` + `quantization_config` as config.json and the `language_model.*` tensors
without their prefix, bytes unchanged. That is the part AWQ quantized; the vision tower and mlp1 are
16-bit and outside the question.

gptqmodel 7.6.0 pins numpy==2.2.6, so it lives in its own virtual environment:

    python3 -m venv /tmp/venv-gptq
    /tmp/venv-gptq/bin/pip install torch==2.13.0 transformers==5.24.0
    /tmp/venv-gptq/bin/pip install gptqmodel==7.6.0 numpy==2.2.6
    python bench/awq_independent_load.py --python /tmp/venv-gptq/bin/python [--awq DIR]

Without --awq the tiny replica is built and quantized first (a minute or two on 2 cores).

The vision tower (`awq --vision int4`): transformers cannot build InternViT without remote code either, so
`--autoawq DIR` (a folder holding AutoAWQ's `awq` package, e.g. `pip install --no-deps --target DIR
autoawq==0.2.9`) reads every packed ViT linear with AutoAWQ's own unpacker (`awq/utils/packing_utils.py`,
loaded by path: the package's __init__ imports model code this transformers may not support), dequantizes
it with the AutoAWQ formula (q - z) * s, and runs the tower + mlp1 with those weights against r1v-quant's
loader on held-out pictures. Either check alone: pass only --python or only --autoawq.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

PROMPTS = [
    "The answer is 37 * 45 = 1665. Check: 37 * 45 = 37 * 40 + 37 * 5 = 1480 + 185 = 1665.",
    "<think>\nThe triangle has base 6 and height 4, so its area is 12.</think>\n\nThe area is 12.",
]

CHILD = r"""
import json, sys, numpy as np, torch
from transformers import AutoModelForCausalLM
view, ids_file, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(view, device_map={"": "cpu"}, dtype=torch.float16)
kinds = sorted({type(m).__name__ for m in model.modules() if "awq" in type(m).__name__.lower()})
logits = []
with torch.no_grad():
    for ids in json.load(open(ids_file)):
        logits.append(model(torch.tensor([ids])).logits[0].float().numpy())
np.savez(out, *logits)
print(json.dumps({"awq_modules": kinds}))
"""


def make_awq(work: Path) -> Path:
    from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq
    from r1v_quant.replica.build import TinyOptions, build_tiny

    tiny = work / "r1v-tiny"
    build_tiny(tiny, TinyOptions())
    out = work / "r1v-tiny-awq"
    quantize_awq(tiny, out, AWQOptions(group_size=64, samples=4, seq_len=512, vision="int4"), progress=True)
    return out


def transformers_view(awq: Path, view: Path) -> dict:
    """config.json + model.safetensors of the language model, tensors byte-identical to the AWQ output."""
    from r1v_quant.model.checkpoint import open_checkpoint

    cfg = json.loads((awq / "config.json").read_text())
    llm = dict(cfg["llm_config"])
    llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    llm["quantization_config"] = cfg["quantization_config"]
    view.mkdir(parents=True)
    (view / "config.json").write_text(json.dumps(llm, indent=2))
    ckpt = open_checkpoint(awq)
    prefix = "language_model."
    tensors = {n[len(prefix) :]: ckpt.get(n).contiguous() for n in ckpt.names() if n.startswith(prefix)}
    save_file(tensors, str(view / "model.safetensors"))
    return llm["quantization_config"]


def vision_check(awq: Path, autoawq_dir: Path) -> dict:
    """Every packed ViT linear read by AutoAWQ's unpacker; the tower's image embeddings with those weights
    against r1v-quant's loader (held-out pictures of the replica's evaluation set)."""
    import importlib.util

    from r1v_quant.data.evalset import heldout_windows
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.reference import R1VModel

    spec_ = importlib.util.spec_from_file_location("awq_packing", autoawq_dir / "awq/utils/packing_utils.py")
    if spec_ is None or spec_.loader is None:
        sys.exit(f"no awq/utils/packing_utils.py under {autoawq_dir}")
    pu = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(pu)
    ckpt = open_checkpoint(awq)
    ours = R1VModel.from_checkpoint(ckpt)
    theirs = R1VModel.from_checkpoint(ckpt)
    linears = 0
    with torch.no_grad():
        for name in ckpt.names():
            if not (name.startswith("vision_model.") and name.endswith(".qweight")):
                continue
            base = name[: -len(".qweight")]
            qw, qz, sc = ckpt.get(name), ckpt.get(f"{base}.qzeros"), ckpt.get(f"{base}.scales")
            iw, iz = pu.reverse_awq_order(*pu.unpack_awq(qw, qz, 4), 4)
            iw, iz = (iw & 0xF).float(), (iz & 0xF).float()
            g = qw.shape[0] // sc.shape[0]
            w = (iw - iz.repeat_interleave(g, 0)) * sc.float().repeat_interleave(g, 0)  # [in, out]
            theirs.get_submodule(base).weight.copy_(w.T)
            linears += 1
    if not linears:
        sys.exit(f"{awq}: no packed vision linears (made with --vision 16bit?)")
    windows = [w for w in heldout_windows(awq, ckpt.spec, 0, 8) if w.pixel_values is not None]
    with torch.no_grad():
        a = torch.cat([ours.image_embeds(w.pixel_values) for w in windows])
        b = torch.cat([theirs.image_embeds(w.pixel_values) for w in windows])
    cos = torch.nn.functional.cosine_similarity(
        a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    )
    return {
        "vision_linears_read_by_autoawq": linears,
        "tokens": int(cos.numel()),
        "max_abs_diff": float((a - b).abs().max()),
        "max_abs_embedding": float(a.abs().max()),
        "min_cosine": float(cos.min()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", help="python of a venv with transformers + gptqmodel 7.6.0 (the LLM check)")
    ap.add_argument("--autoawq", type=Path, help="folder holding AutoAWQ's awq package (the vision check)")
    ap.add_argument("--awq", type=Path, help="an r1v-quant AWQ output (default: quantize the tiny replica)")
    args = ap.parse_args()
    if not (args.python or args.autoawq):
        ap.error("pass --python (language model via gptqmodel) and/or --autoawq (vision tower)")
    if args.autoawq:
        with tempfile.TemporaryDirectory(prefix="r1v-awq-load-") as tmp:
            awq = args.awq or make_awq(Path(tmp))
            vis = vision_check(awq, args.autoawq)
        print(json.dumps(vis, indent=2))
        from results_io import write_result

        vis["awq"] = str(args.awq or "tiny replica (quantized here, --vision int4)")
        vis["autoawq_packing_utils"] = (
            "AutoAWQ 0.2.9 awq/utils/packing_utils.py (unpack_awq, reverse_awq_order)"
        )
        print(f"wrote {write_result('awq_independent_vision', vis)}")
        print(
            f"AutoAWQ's unpacker read {vis['vision_linears_read_by_autoawq']} vision linears: image "
            f"embeddings "
            f"max |diff| {vis['max_abs_diff']:.3g} (max |x| {vis['max_abs_embedding']:.3g}), min cosine "
            f"{vis['min_cosine']:.8f} over {vis['tokens']} tokens vs r1v-quant's loader"
        )
        if not args.python:
            return

    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.reference import R1VModel
    from r1v_quant.model.tokenizer import R1VTokenizer

    with tempfile.TemporaryDirectory(prefix="r1v-awq-load-") as tmp:
        work = Path(tmp)
        awq = args.awq or make_awq(work)
        qc = transformers_view(awq, work / "view")
        tok = R1VTokenizer.from_dir(awq)
        ids = [tok.encode(p) for p in PROMPTS]
        (work / "ids.json").write_text(json.dumps(ids))

        ours = R1VModel.from_checkpoint(open_checkpoint(awq))
        with torch.no_grad():
            mine = [ours(torch.tensor([i]))[0].numpy() for i in ids]

        proc = subprocess.run(
            [args.python, "-c", CHILD, str(work / "view"), str(work / "ids.json"), str(work / "theirs.npz")],
            capture_output=True,
            text=True,
            env={"GPTQMODEL_CPU_WORKERS": "2", "PATH": "/usr/bin:/bin", "HOME": str(work)},
        )
        if proc.returncode != 0:
            sys.exit(f"transformers + gptqmodel failed:\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs_npz = np.load(work / "theirs.npz")
        theirs = [theirs_npz[f"arr_{k}"] for k in range(len(ids))]

    a, b = np.concatenate(mine), np.concatenate(theirs)
    result = {
        "awq": str(args.awq or "tiny replica (quantized here)"),
        "quantization_config": qc,
        "their_awq_modules": info["awq_modules"],
        "positions": int(a.shape[0]),
        "max_abs_logit": float(np.abs(a).max()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "mean_abs_diff": float(np.abs(a - b).mean()),
        "top1_agree_pct": 100 * float((a.argmax(-1) == b.argmax(-1)).mean()),
    }
    print(json.dumps(result, indent=2))
    print(
        f"transformers+gptqmodel ({', '.join(info['awq_modules'])}) vs r1v-quant loader: "
        f"max |dlogit| {result['max_abs_diff']:.4f} (max |logit| {result['max_abs_logit']:.2f}), "
        f"top-1 agreement {result['top1_agree_pct']:.1f}% over {result['positions']} positions"
    )


if __name__ == "__main__":
    main()
