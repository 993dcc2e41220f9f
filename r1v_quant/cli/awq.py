"""`r1v-quant awq` command."""

from __future__ import annotations

import json
from pathlib import Path

import click

from r1v_quant.cli.params import model_argument


@click.command("awq")
@model_argument()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory.")
@click.option("--group-size", type=int, default=128, show_default=True)
@click.option(
    "--calib",
    default="default",
    show_default=True,
    help="Calibration set: 'default' (built-in multimodal reasoning set) or a path (JSONL dir, TSV, text).",
)
@click.option("--samples", type=int, default=64, show_default=True)
@click.option("--seq-len", type=int, default=4096, show_default=True)
@click.option("--text-ratio", type=float, default=0.25, show_default=True, help="Share of text-only samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the vision tower, the capture, the sensitivity pass and the search run, one layer resident "
    "(auto: cuda when torch sees one); cached activations stay in RAM / spill.",
)
@click.option(
    "--max-memory",
    default="auto",
    show_default=True,
    help="RAM for cached activations, the rest spills to disk: auto (what this machine's available memory "
    "leaves after the run's working set and a 10%% margin), a size (8GB, 0 = spill all) or none (no budget).",
)
@click.option(
    "--modality-weights",
    type=click.Choice(["auto", "uniform", "text", "balanced"]),
    default="auto",
    show_default=True,
    help="Per-token loss weights by modality (vision / prompt / response). auto: each modality's measured "
    "sensitivity of the answer loss, per layer (MBQ); text: vision tokens ignored; balanced: equal total "
    "weight per modality.",
)
@click.option(
    "--method",
    type=click.Choice(["awq", "rtn"]),
    default="awq",
    show_default=True,
    help="rtn: plain round-to-nearest, same packing (a baseline).",
)
@click.option(
    "--propagate",
    type=click.Choice(["fp", "quant"]),
    default="fp",
    show_default=True,
    help="Feed the next layer the 16-bit outputs (fp) or the quantized layer's outputs (quant).",
)
@click.option(
    "--vision",
    type=click.Choice(["int4", "int8", "16bit"]),
    default="16bit",
    show_default=True,
    help="The InternViT tower: 16bit, or int4 (searched like the decoder on the calibration set's image "
    "tiles, AWQ-packed; vLLM builds it with the AWQ method; ~8 GB less for InternViT-6B). int8 is refused: "
    "vLLM's AWQ kernels are 4-bit only (docs/awq.md).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer.")
@click.option("--json", "as_json", is_flag=True)
def awq_command(
    model: Path,
    out: Path,
    group_size: int,
    calib: str,
    samples: int,
    seq_len: int,
    text_ratio: float,
    seed: int,
    device: str,
    max_memory: str | None,
    modality_weights: str,
    method: str,
    propagate: str,
    vision: str,
    resume: bool,
    as_json: bool,
) -> None:
    """AWQ int4 (AutoAWQ GEMM layout, vLLM-loadable) of the language model and (--vision int4) the vision
    tower; mlp1, embeddings and lm_head stay 16-bit."""
    from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq

    opts = AWQOptions(
        group_size=group_size,
        calib=calib,
        samples=samples,
        seq_len=seq_len,
        text_ratio=text_ratio,
        seed=seed,
        modality_weights=modality_weights,
        method=method,
        propagate=propagate,
        device=device,
        max_memory=max_memory,
        vision=vision,
    )
    report = quantize_awq(model, out, opts, resume=resume, progress=not as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    fb, mb = report["fallback_layers"], 1e6
    vis = report["vision"]
    if vis.get("mode") == "int4":
        cos = vis["embedding_cosine"]
        tower = (
            f"vision tower int4: block-output loss {vis['loss_sum']:.3e} (round-to-nearest "
            f"{vis['loss_rtn_sum']:.3e}), image-embedding 1 - cosine {cos['searched']['one_minus_mean']:.2e} "
            f"(round-to-nearest {cos['round_to_nearest']['one_minus_mean']:.2e})"
        )
    else:
        tower = "vision tower 16-bit"
    click.echo(
        f"wrote {out}: {len(report['layers'])} layers, block-output loss {report['loss_sum']:.3e} "
        f"(round-to-nearest {report['loss_rtn_sum']:.3e}), plain-rounding fallbacks: {fb or 'none'}, "
        f"{tower}, calibration set {report['calibration_set_hash'][:12]}, peak RSS "
        f"{report['memory']['peak_rss_bytes'] / mb:.0f} MB "
        f"(planned {report['plan']['predicted_peak_bytes'] / mb:.0f} MB)"
    )
