"""`r1v-quant onnx`: vision tower + mlp1 as ONNX. Registered in r1v_quant.cli.main with add_command."""

from __future__ import annotations

import json
from pathlib import Path

import click

from r1v_quant.cli.params import model_argument
from r1v_quant.exporters.model_card import onnx_card, write_card
from r1v_quant.exporters.onnx_vision import DTYPES, MAX_OPSET, MIN_OPSET, export_onnx


@click.command("onnx")
@model_argument()
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option(
    "--int8", is_flag=True, help="Dynamic int8 weight quantization of the fp32 graph (onnxruntime)."
)
@click.option(
    "--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=17, show_default=True, help="ONNX opset."
)
@click.option("--no-verify", is_flag=True, help="Skip the torch vs onnxruntime check on two tiles.")
@click.option("--flavor", type=click.Choice(["r1v", "r1v2", "r1v3"]), default=None)
@click.option("--json", "as_json", is_flag=True)
def onnx_command(
    model: Path,
    out_dir: Path,
    dtype: str,
    int8: bool,
    opset: int,
    no_verify: bool,
    flavor: str | None,
    as_json: bool,
) -> None:
    """Export the vision tower, pixel shuffle and mlp1 of MODEL to DIR/vision.onnx (+ preprocessing.json)."""
    report = export_onnx(
        model,
        out_dir,
        dtype=dtype,
        int8=int8,
        opset=opset,
        verify=not no_verify,
        flavor=flavor,
        # the card goes in before the folder appears under its name
        finish=lambda folder, rep: write_card(folder, onnx_card(rep, model, folder, out_name=str(out_dir))),
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    v = report["verification"]
    check = f"; vs torch: max |diff| {v['max_abs_diff']:.2e}, min cosine {v['cosine_min']:.5f}" if v else ""
    if v and v["nonfinite"]:
        check += f"; WARNING: {v['nonfinite']} non-finite outputs (fp16 overflow? use --dtype fp32)"
    ext = f" + {report['external_data']}" if report["external_data"] else ""
    click.echo(
        f"wrote {report['path']}/{report['model']}{ext} ({report['weights']}, opset {report['opset']}, "
        f"{report['bytes'] / 1024**2:.1f} MiB, {report['seconds']['total']} s{check})"
    )
